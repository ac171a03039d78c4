"""A tiny FBNet-like space for tests that train (few layers and ops keep XLA compiles few), and
main.py as a subprocess with it registered."""

import textwrap

from hournas_jax import spaces

TOY_TABLE = dict(stem=8, fixed=(), stages=((8, 1, 1), (16, 2, 2), (24, 2, 2)), head=32,
                 ops=('k3e1', 'k3e3', 'skip'), activation='relu', num_classes=10)


def toy_space(resolution=16, num_classes=10, ops=None):
  """5 SuperBlocks: layer1_1 (keeps shape), layer2_1 (vital), layer2_2, layer3_1 (vital),
  layer3_2."""
  return spaces.from_table('toy', TOY_TABLE, resolution, num_classes, 1.0, ops)


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
