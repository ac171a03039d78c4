"""A tiny FBNet-like space for tests that train (few layers and ops keep XLA compiles few), a
tiny config on it, and main.py as a subprocess with it registered."""

import textwrap

import jax.numpy as jnp

from configs import quickstart
from hournas_jax import blocks, spaces

TOY_TABLE = dict(stem=8, fixed=(), stages=((8, 1, 1), (16, 2, 2), (24, 2, 2)), head=32,
                 ops=('k3e1', 'k3e3', 'skip'), activation='relu', num_classes=10)


def toy_space(resolution=16, num_classes=10, ops=None):
  """5 SuperBlocks: layer1_1 (keeps shape), layer2_1 (vital), layer2_2, layer3_1 (vital),
  layer3_2."""
  return spaces.from_table('toy', TOY_TABLE, resolution, num_classes, 1.0, ops)


def switch_on_residual_branches(params):
  """Sets every projection BatchNorm scale of a SuperNet's params ({layer: {op: tree}}, in
  place) to 1. Residual branches start at scale 0 (blocks.ZERO_INIT_RESIDUAL): every residual
  candidate is then the identity, with no gradient to its kernels or to what tells candidates
  apart, until the first steps of training switch them on; tests of one step do it here."""
  for ops in params.values():
    for variables in ops.values():
      if isinstance(variables, dict) and blocks.PROJECTION_BATCHNORM in variables:
        norm = variables[blocks.PROJECTION_BATCHNORM]
        norm['scale'] = jnp.ones_like(norm['scale'])
  return params


def tiny_config(**overrides):
  """configs/quickstart.py on the toy space (register it as 'toy' in spaces.SPACE_TABLES): a
  3 + 3 step search, 4 training steps."""
  config = quickstart.get_config()
  config.space, config.width, config.ops = 'toy', 1.0, ''
  config.targets.params, config.targets.flops = 7e3, 90e3
  config.search.vital_steps = config.search.nonvital_steps = 3
  config.search.batch_size = 8
  config.search.val_every = 2
  config.train.steps = 4
  config.train.batch_size = 16
  config.random_baseline = False
  config.proposal_samples = 100
  config.checkpoint_every_steps = 2
  config.log_every_steps = 1
  config.update_from_flattened_dict(overrides)
  return config


# `python -c TOY_MAIN [SLOW] ARGS...` is main.py with the toy space registered as 'toy'; SLOW
# also slows every search step down, so that a test can stop the run mid-way.
TOY_MAIN = textwrap.dedent('''
    import runpy, sys, time
    sys.path[:0] = ['.', 'tests']
    from spaces_for_tests import TOY_TABLE
    from hournas_jax import search, spaces
    spaces.SPACE_TABLES['toy'] = TOY_TABLE
    if sys.argv[1] == 'SLOW':
      del sys.argv[1]
      step = search.Searcher.train_step
      def slow_step(self, *args, **kwargs):
        time.sleep(0.3)
        return step(self, *args, **kwargs)
      search.Searcher.train_step = slow_step
    sys.argv = ['main.py'] + sys.argv[1:]
    runpy.run_path('main.py', run_name='__main__')
''')
