"""Convolutions as the blocks run them, and weights shared between a layer's candidates."""

import ast
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hournas_jax import blocks, decoys, op_kinds, optim, spaces, supernet
from hournas_jax.engines import single_path
from spaces_for_tests import switch_on_residual_branches


def _xla_conv(x, kernel, stride, groups):
  pad = kernel.shape[0] // 2
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                      feature_group_count=groups)


@pytest.mark.parametrize('kernel,stride,size', [(3, 1, 8), (5, 1, 7), (3, 2, 8), (5, 2, 9),
                                                (7, 2, 6)])
def test_shifted_depthwise_equals_xla_conv_values_and_gradients(kernel, stride, size):
  rng = np.random.default_rng(kernel * 10 + stride)
  x = jnp.asarray(rng.standard_normal((2, size, size, 6)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((kernel, kernel, 1, 6)), jnp.float32)
  ours = lambda x, w: blocks.conv2d(x, w, stride, groups=6, depthwise_impl='shift')
  xla = lambda x, w: _xla_conv(x, w, stride, 6)
  np.testing.assert_allclose(ours(x, w), xla(x, w), rtol=1e-5, atol=1e-5)
  assert ours(x, w).shape == (2, -(-size // stride), -(-size // stride), 6)
  loss = lambda f: (lambda x, w: jnp.sum(jnp.sin(f(x, w))))
  for a, b in zip(jax.grad(loss(ours), (0, 1))(x, w), jax.grad(loss(xla), (0, 1))(x, w)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_pointwise_conv_as_matmul_equals_xla_conv():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 5, 5, 8)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((1, 1, 8, 12)), jnp.float32)
  np.testing.assert_allclose(blocks.conv2d(x, w), _xla_conv(x, w, 1, 1), rtol=1e-5, atol=1e-5)
  # Grouped and strided 1x1 convs keep XLA's convolution.
  wg = jnp.asarray(rng.standard_normal((1, 1, 4, 12)), jnp.float32)
  np.testing.assert_allclose(blocks.conv2d(x, wg, groups=2), _xla_conv(x, wg, 1, 2), rtol=1e-5,
                             atol=1e-5)


def test_conv_module_keeps_flax_variable_layout():
  block = blocks.InvertedResidual(8, 8, 3, 3, 1, 1, 0, 'relu')
  variables = jax.eval_shape(lambda: block.init(jax.random.key(0), jnp.zeros((1, 6, 6, 8))))
  assert set(variables['params']) == {'Conv_0', 'Conv_1', 'Conv_2', 'BatchNorm_0',
                                      'BatchNorm_1', 'BatchNorm_2'}
  assert variables['params']['Conv_1']['kernel'].shape == (3, 3, 1, 24)
  with blocks.depthwise_implementation('conv'):
    assert blocks.resolve_depthwise('auto') == 'conv'
  with pytest.raises(ValueError, match='depthwise'):
    blocks.resolve_depthwise('fft')


def test_nested_kernels_are_the_centre_and_first_channels():
  rng = np.random.default_rng(2)
  full = {'expand': rng.standard_normal((1, 1, 4, 24)),
          'depthwise': rng.standard_normal((5, 5, 1, 24)),
          'project': rng.standard_normal((1, 1, 24, 6))}
  sliced = blocks.nested_kernels(full, 3, 8)
  np.testing.assert_array_equal(sliced['expand'], full['expand'][..., :8])
  np.testing.assert_array_equal(sliced['depthwise'], full['depthwise'][1:4, 1:4, :, :8])
  np.testing.assert_array_equal(sliced['project'], full['project'][:, :, :8, :])


SPACE = spaces.from_table('shared', dict(stem=8, fixed=(), stages=((8, 2, 1), (16, 1, 2)),
                                         head=16, ops=('k3e1', 'k5e3', 'k3g2', 'skip'),
                                         activation='relu', num_classes=4), 12)


def test_shared_supernet_layout_and_a_candidate_is_its_slice_of_the_largest():
  net = supernet.SuperNet(SPACE, supernet.layer_ops(SPACE), weight_sharing=True)
  variables = net.init_all(0, (12, 12, 3))
  layer = variables['params']['layer1_1']
  # One kernel set at the largest kernel (5) and expansion (3); BatchNorm per candidate; the
  # grouped op keeps its own convs.
  assert layer['shared']['depthwise']['kernel'].shape == (5, 5, 1, 24)
  assert 'Conv_0' not in layer['k3e1'] and 'BatchNorm_0' in layer['k3e1']
  assert 'Conv_0' in layer['k3g2']
  # The k3e1 candidate computes what a stand-alone k3e1 block with the sliced kernels does
  # (with its residual branch switched on, as training leaves it: it starts at scale 0).
  layer['k3e1']['BatchNorm_2']['scale'] = np.linspace(0.5, 1.5, 8, dtype=np.float32)
  x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 12, 12, 8)), jnp.float32)
  cand = net.candidate(SPACE.layer('layer1_1'), 'k3e1')
  y = cand.apply({k: layer[k] for k in cand.param_keys}, {'k3e1': variables['batch_stats'][
      'layer1_1']['k3e1']}, x, train=False)
  sliced = blocks.nested_kernels({k: v['kernel'] for k, v in layer['shared'].items()}, 3, 8)
  alone = blocks.make_block(SPACE, SPACE.layer('layer1_1'), 'k3e1')
  params = {**layer['k3e1'], 'Conv_0': {'kernel': sliced['expand']},
            'Conv_1': {'kernel': sliced['depthwise']}, 'Conv_2': {'kernel': sliced['project']}}
  expected = alone.apply({'params': params,
                          'batch_stats': variables['batch_stats']['layer1_1']['k3e1']}, x,
                         train=False)
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_residual_blocks_start_as_the_identity():
  """The projection BatchNorm of every inverted residual that adds its input starts at scale 0,
  in init_all's values and in the modules' own initialisers alike, so the block returns its
  input; blocks without a shortcut start at scale 1."""
  net = supernet.SuperNet(SPACE, supernet.layer_ops(SPACE))
  variables = net.init_all(0, (12, 12, 3))
  x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 12, 12, 8)), jnp.float32)
  for layer in SPACE.searchable_layers:
    for op in layer.ops:
      if op == 'skip':
        continue
      scale = variables['params'][layer.name][op]['BatchNorm_2']['scale']
      residual = blocks.has_shortcut(SPACE, layer, op)
      assert (blocks.zero_scale_batchnorm(SPACE, layer, op) is not None) == residual
      np.testing.assert_array_equal(scale, 0.0 if residual else 1.0)
      block = blocks.make_block(SPACE, layer, op)
      own = block.init(jax.random.key(0), jnp.zeros((1, 12, 12, layer.in_channels)))
      np.testing.assert_array_equal(own['params']['BatchNorm_2']['scale'], scale)
      if residual:
        y = block.apply({'params': variables['params'][layer.name][op],
                         'batch_stats': variables['batch_stats'][layer.name][op]}, x,
                        train=False)
        np.testing.assert_allclose(y, x, atol=1e-6)


def test_a_shared_step_trains_the_kernels_and_only_the_sampled_batchnorm():
  engine = single_path.SinglePathEngine(SPACE, supernet.layer_ops(SPACE), weight_sharing=True)
  state = engine.init(0, (12, 12, 3))
  switch_on_residual_branches(state['params'])
  rng = np.random.default_rng(4)
  images = jnp.asarray(rng.standard_normal((4, 12, 12, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 4, 4), jnp.int32)
  path = {'layer1_1': 'k3e1', 'layer1_2': 'k5e3', 'layer2_1': 'k3e1'}
  new, metrics = engine.train_path(state, images, labels, path, 0.1)
  assert np.isfinite(float(metrics['loss']))
  changed = lambda a, b: not np.allclose(np.asarray(a), np.asarray(b))
  shared_old = state['params']['layer1_1']['shared']
  shared_new = new['params']['layer1_1']['shared']
  # k3e1 uses the centre 3x3 and the first 8 channels: only those taps get a gradient; the
  # rest of the shared kernel only decays (weight decay 4e-5 at lr 0.1, no momentum yet).
  dw_old, dw_new = shared_old['depthwise']['kernel'], shared_new['depthwise']['kernel']
  assert changed(dw_old[1:4, 1:4, :, :8], dw_new[1:4, 1:4, :, :8])
  decayed = lambda w: np.asarray(w) * (1 - 0.1 * 4e-5)
  np.testing.assert_allclose(dw_new[0], decayed(dw_old[0]), rtol=1e-6)
  np.testing.assert_allclose(dw_new[..., 8:], decayed(dw_old[..., 8:]), rtol=1e-6)
  # Candidates not sampled keep their own variables exactly.
  for part in ('params', 'batch_stats', 'opt_state'):
    for op in ('k5e3', 'k3g2'):
      jax.tree.map(np.testing.assert_array_equal, state[part]['layer1_1'][op],
                   new[part]['layer1_1'][op])
  assert changed(state['batch_stats']['layer1_1']['k3e1']['BatchNorm_0']['mean'],
                 new['batch_stats']['layer1_1']['k3e1']['BatchNorm_0']['mean'])
  # The same step through the whole-network SuperNet (every variable, path mode) agrees.
  net = engine.net
  def loss(params):
    logits, _ = net.apply({'params': params, 'batch_stats': state['batch_stats']}, images,
                          path=path, train=True, mutable=['batch_stats'])
    return optim.cross_entropy(logits, labels)
  np.testing.assert_allclose(loss(state['params']), metrics['loss'], rtol=1e-5)


def test_recalibrated_statistics_are_the_average_batch_statistics():
  engine = single_path.SinglePathEngine(SPACE, supernet.layer_ops(SPACE), weight_sharing=True)
  state = engine.init(0, (12, 12, 3))
  rng = np.random.default_rng(5)
  batches = [jnp.asarray(rng.standard_normal((8, 12, 12, 3)), jnp.float32) for _ in range(3)]
  path = {'layer1_1': 'k5e3', 'layer1_2': 'skip', 'layer2_1': 'k3e1'}
  new = engine.recalibrate(state, batches, path)
  # The stem's first BatchNorm sees the stem conv's output: its mean is computable directly.
  stem = engine.net.candidate(SPACE.layer('stem'), 'conv3')
  kernel = state['params']['stem']['conv3']['Conv_0']['kernel']
  means = [jnp.mean(blocks.conv2d(b, kernel, 2), axis=(0, 1, 2)) for b in batches]
  np.testing.assert_allclose(new['batch_stats']['stem']['conv3']['BatchNorm_0']['mean'],
                             np.mean(means, axis=0), rtol=1e-4, atol=1e-5)
  assert stem.op == 'conv3'
  # Off-path candidates keep their statistics.
  jax.tree.map(np.testing.assert_array_equal, state['batch_stats']['layer1_1']['k3e1'],
               new['batch_stats']['layer1_1']['k3e1'])


def test_every_op_kind_builds_the_module_it_names():
  built = set()
  # mnasnet with a decoy of each flavour has a candidate of every kind.
  for flavour in decoys.FLAVOURS:
    space = decoys.with_decoys(spaces.get_space('mnasnet', resolution=32, num_classes=10,
                                               width=0.25), ('k3e3',), flavour)
    for layer in space.layers:
      for op_name in layer.ops:
        op = space.ops[op_name]
        module = blocks.MODULES[op_kinds.kind(op).module]
        assert type(blocks.make_block(space, layer, op_name, name='b')) is module, op_name
        built.add(op.kind)
  assert built == set(op_kinds.KINDS)


def test_op_kinds_is_data_that_never_imports_blocks():
  # blocks imports the table; an import back (even inside a function) would be a circle.
  tree = ast.parse(pathlib.Path(op_kinds.__file__).read_text())
  imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
              for alias in node.names}
  imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names}
  assert 'blocks' not in imported and 'hournas_jax.blocks' not in imported
