"""Tests for hournas_jax.costs: the paper's published costs, cost = sum over the table, and the
tables against the real Flax network (parameter count) and XLA's own cost analysis (FLOPs)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hournas_jax import arch, blocks, costs, op_kinds, spaces, supernet


@functools.lru_cache(maxsize=None)
def space_and_tables(name, resolution=224, num_classes=None, width=1.0):
  space = spaces.get_space(name, resolution, num_classes, width)
  return space, costs.cost_tables(space)


def random_architectures(space, tables, n, seed=0):
  rng = np.random.default_rng(seed)
  allowed = [np.flatnonzero(row) for row in tables.mask]
  return np.stack([rng.choice(ops, size=n) for ops in allowed], axis=1)


# ----------------------------------------------------------------------------- the paper


@pytest.mark.parametrize('name', sorted(arch.PRESETS))
def test_presets_match_paper_costs(name):
  """Tables 8, 10, 12, 14 and 3: Params (M) and FLOPs (M multiply-adds) at 224x224, 1000
  classes. Measured: params within 1.5%, FLOPs within 3.3% (FBNet's FLOPs come out 2-3% low)."""
  a = arch.preset(name)
  space, tables = space_and_tables(a.space)
  params, flops = tables.cost(a.indices(space))
  paper_params, paper_flops = arch.PAPER_COSTS[name]
  assert params / 1e6 == pytest.approx(paper_params, rel=0.05)
  assert flops / 1e6 == pytest.approx(paper_flops, rel=0.05)


def test_mnasnet_and_efficientnet_presets_are_close():
  """HourNAS-E and -F fix the space conventions (expansion conv at e1, SE on input channels):
  with them their FLOPs come out within 0.1% of the printed 313M and 383M."""
  for name in ('hournas_e', 'hournas_f'):
    a = arch.preset(name)
    space, tables = space_and_tables(a.space)
    assert tables.cost(a.indices(space))[1] / 1e6 == pytest.approx(arch.PAPER_COSTS[name][1],
                                                                   rel=0.002)


@pytest.mark.parametrize('name,space_name', [('fbnet_max', 'fbnet'),
                                             ('efficientnet_max', 'efficientnet')])
def test_max_presets_are_the_most_complex_architectures(name, space_name):
  """FBNet-Max / EfficientNet-Max are 'the most complex architecture in the space' (Sec. 4.4):
  the upper bound of both tables."""
  space, tables = space_and_tables(space_name)
  _, (max_params, max_flops) = reachable(tables)
  assert tables.cost(arch.preset(name).indices(space)) == (max_params, max_flops)


# ----------------------------------------------------------------------------- the tables


@pytest.mark.parametrize('name', spaces.SPACE_NAMES)
def test_table_shapes_and_mask(name):
  space, tables = space_and_tables(name)
  shape = (len(space.searchable_layers), len(space.op_names))
  assert tables.params.shape == tables.flops.shape == tables.mask.shape == shape
  assert tables.stacked().shape == (2, *shape)
  assert np.array_equal(tables.stacked()[0], tables.params)
  assert np.array_equal(tables.stacked()[1], tables.flops)
  assert tables.layer_names == space.searchable_names
  assert tables.op_names == space.op_names
  assert np.array_equal(tables.mask, space.op_mask())
  # Disallowed cells are 0; allowed non-skip cells are positive; skip costs nothing.
  assert not tables.params[~tables.mask].any() and not tables.flops[~tables.mask].any()
  skip = space.op_names.index('skip')
  non_skip = np.ones(shape[1], bool)
  non_skip[skip] = False
  assert (tables.params[:, non_skip] > 0).all() and (tables.flops[:, non_skip] > 0).all()
  assert not tables.params[:, skip].any() and not tables.flops[:, skip].any()


@pytest.mark.parametrize('name', spaces.SPACE_NAMES)
def test_cost_is_sum_of_layer_rows(name):
  space, tables = space_and_tables(name, resolution=32, num_classes=10, width=0.5)
  archs = random_architectures(space, tables, 20, seed=1)
  presets = [arch.preset(p) for p, (s, _) in arch.PRESETS.items() if s == name]
  for a in presets:
    archs = np.vstack([archs, a.indices(space)])
  for idx in archs:
    op_names = [space.op_names[i] for i in idx]
    rows = costs.layer_costs(space, op_names)
    assert [r['layer'] for r in rows] == [l.name for l in space.layers]
    params, flops = tables.cost(idx)
    assert params == sum(r['params'] for r in rows)
    assert flops == sum(r['flops'] for r in rows)
    # The searchable rows are the table's cells, the fixed rows its fixed totals.
    searchable = [r for r in rows if r['searchable']]
    assert [r['op'] for r in searchable] == op_names
    for i, r in enumerate(searchable):
      assert (r['params'], r['flops']) == (tables.params[i, idx[i]], tables.flops[i, idx[i]])
    fixed = [r for r in rows if not r['searchable']]
    assert sum(r['params'] for r in fixed) == tables.fixed_params
    assert sum(r['flops'] for r in fixed) == tables.fixed_flops


def test_layer_costs_rows_describe_the_layer():
  space, _ = space_and_tables('mnasnet')
  rows = costs.layer_costs(space, arch.preset('hournas_e').ops)
  by_name = {r['layer']: r for r in rows}
  assert by_name['layer1_1']['op'] == 'sep3' and not by_name['layer1_1']['searchable']
  assert by_name['stem']['op'] == 'conv3' and by_name['head']['op'] == 'head'
  r = by_name['layer3_1']
  assert (r['op'], r['in_channels'], r['out_channels'], r['stride'], r['resolution']) == (
      'k5e6se', 24, 40, 2, 56)


def reachable(tables):
  """((min params, min FLOPs), (max params, max FLOPs)) over the whole space."""
  _, t, mask, offset = costs.restrict_tables(tables)
  return costs.reachable_range(t, mask, offset)


def test_reachable_range():
  space, tables = space_and_tables('fbnet')
  (pmin, fmin), (pmax, fmax) = reachable(tables)
  archs = random_architectures(space, tables, 200, seed=2)
  for idx in archs:
    p, f = tables.cost(idx)
    assert pmin <= p <= pmax and fmin <= f <= fmax
  # The cheapest: skip wherever allowed, the cheapest op (k3g2) elsewhere.
  cheapest = [space.op_names.index('skip' if l.keeps_shape else 'k3g2')
              for l in space.searchable_layers]
  assert tables.cost(cheapest) == (pmin, fmin)


def test_op_cost_by_hand():
  """A few cells worked out by hand at 224x224 (FBNet layer2_1: 16 -> 24, stride 2, 112 -> 56).
  """
  space, _ = space_and_tables('fbnet')
  layer = space.layer('layer2_1')
  # k3e1: expansion 16*16 + BN, depthwise 9*16 + BN, projection 16*24 + BN.
  p, f = costs.op_cost(layer, space.ops['k3e1'], space)
  assert p == 16 * 16 + 32 + 9 * 16 + 32 + 16 * 24 + 48
  assert f == 16 * 16 * 112 ** 2 + 9 * 16 * 56 ** 2 + 16 * 24 * 56 ** 2
  # k5g2: grouped 1x1 convs halve the pointwise weights.
  p, f = costs.op_cost(layer, space.ops['k5g2'], space)
  assert p == 16 * 16 // 2 + 32 + 25 * 16 + 32 + 16 * 24 // 2 + 48
  assert f == 128 * 112 ** 2 + 25 * 16 * 56 ** 2 + 192 * 56 ** 2
  assert costs.op_cost(space.layer('layer2_2'), space.ops['skip'], space) == (0, 0)
  # MnasNet layer3_1 k3e3se: SE squeezes to 24 // 4 = 6 channels.
  mspace, _ = space_and_tables('mnasnet')
  layer = mspace.layer('layer3_1')
  p, f = costs.op_cost(layer, mspace.ops['k3e3se'], mspace)
  p0, f0 = costs.op_cost(layer, mspace.ops['k3e3'], mspace)
  assert (p - p0, f - f0) == (72 * 6 + 6 + 6 * 72 + 72, 2 * 72 * 6)
  assert op_kinds.se_channels(24, 0.25) == 6 and op_kinds.se_channels(2, 0.25) == 1
  # Head: 1x1 conv + BN, classifier with bias.
  head = space.layer('head')
  assert costs.op_cost(head, space.ops['head'], space) == (
      352 * 1984 + 2 * 1984 + 1984 * 1000 + 1000, 352 * 1984 * 49 + 1984 * 1000)


# ---------------------------------------------------- against the real network and XLA
#
# XLA's HloCostAnalysis counts a convolution as 2 flops (multiply + add) per kernel tap that
# falls *inside* the input: taps over the zero padding are not counted. The tables count every
# tap (k*k per output, the FBNet/MnasNet convention), so at 32x32, where the last stages are 1x1
# or 2x2 maps under 3x3 / 5x5 kernels, XLA's MACs are 10-15% below the table's; at 224 about 1%.
# `count_macs` below recomputes each op's MACs with and without the padded taps: without
# clipping it must equal the table exactly (so it mirrors op_cost), with clipping it is what
# XLA must count. On top XLA adds the elementwise ops: eval BatchNorm is 3 flops per element
# (subtract mean, scale, shift) after every conv, ReLU 1, swish ~4, the residual add 1, SE's
# pooling and rescaling ~2 per element of the expanded map, the head's pooling 1. Measured
# (jax 0.10.2, CPU), per element of conv output: ReLU nets 4.3-4.5 (blocks 3.7-4.1), ReLU+SE
# 5.1-5.3 (blocks 5.1-6.6), swish+SE 7.6 (blocks 7.0-8.5; the head, with its pooling, 5.5 with
# ReLU and 8.5 with swish). The bands below are those bounds: between 3 (BN alone) and 5 / 7 / 9
# (+1 for the head alone).


def _taps(n, kernel, stride, clip):
  """Kernel taps along one axis summed over the outputs of a conv with padding kernel // 2."""
  out = -(-n // stride)
  if not clip:
    return out * kernel
  pad = kernel // 2
  return sum(1 for o in range(out) for t in range(kernel) if 0 <= o * stride - pad + t < n)


def count_macs(layer, op, space, clip=True):
  """(multiply-adds, conv output elements) of `op` in `layer`, written from the block's
  structure in blocks.py, independently of costs.op_cost."""
  macs = elements = 0

  def conv(n, kernel, stride, in_per_group, out):
    nonlocal macs, elements
    macs += _taps(n, kernel, stride, clip) ** 2 * in_per_group * out
    elements += (-(-n // stride)) ** 2 * out

  cin, cout, n, s = layer.in_channels, layer.out_channels, layer.in_resolution, layer.stride
  if op.kind == 'conv':
    conv(n, op.kernel, s, cin, cout)
  elif op.kind == 'sep':
    conv(n, op.kernel, s, 1, cin)
    conv(layer.out_resolution, 1, 1, cin, cout)
  elif op.kind == 'head':
    conv(n, 1, 1, cin, cout)
    macs += cout * space.num_classes
  elif op.kind == 'ir':
    mid, g = cin * op.expansion, op.groups
    conv(n, 1, 1, cin // g, mid)
    conv(n, op.kernel, s, 1, mid)
    if op.se:
      macs += 2 * mid * op_kinds.se_channels(cin, space.se_ratio)
    conv(layer.out_resolution, 1, 1, mid // g, cout)
  return macs, elements


def elementwise_band(space, op_names):
  """(min, max) elementwise flops per conv output element; see the comment above. The head
  alone gets one more: its global pooling adds every element, and on its tiny maps (2x2 here)
  the per-channel work (BN's rsqrt, the mean's division) is another ~0.5 per element."""
  head = 1.0 if list(op_names) == ['head'] else 0.0
  if space.activation == 'swish':
    return 3.0, 9.0 + head
  if any(space.ops[o].se for o in op_names):
    return 3.0, 7.0 + head
  return 3.0, 5.0 + head


def xla_flops(fn, *args):
  """XLA's flop count of the compiled `fn(*args)` (args may be ShapeDtypeStructs), with XLA's
  own depthwise convolution (whose count skips the padding taps, as `count_macs` models)."""
  with blocks.depthwise_implementation('conv'):
    analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per computation
    analysis = analysis[0]
  return float(analysis.get('flops', 0.0))  # no 'flops' key when there are none (skip)


def num_params(variables):
  return sum(int(np.prod(x.shape))
             for x in jax.tree_util.tree_leaves(variables.get('params', {})))


# (preset, width, resolution): g2 ops and skip (FBNet); SE, the fixed SepConv and an odd
# resolution (30 -> 15 -> 8 -> 4 -> 2 -> 1) (MnasNet); SE on every op with swish (EfficientNet).
NETWORKS = [('hournas_a', 0.25, 32), ('hournas_e', 0.25, 30), ('hournas_f', 0.25, 32)]


@functools.lru_cache(maxsize=None)
def fixed_network(preset, width, resolution, num_classes=10):
  space_name, ops = arch.PRESETS[preset]
  space, tables = space_and_tables(space_name, resolution, num_classes, width)
  net = supernet.SuperNet(space, supernet.fixed_layer_ops(space, ops))
  shapes = net.variable_shapes((resolution, resolution, 3))
  return space, tables, ops, net, shapes


@pytest.mark.parametrize('preset,width,resolution', NETWORKS)
def test_params_equal_real_network(preset, width, resolution):
  space, tables, ops, net, shapes = fixed_network(preset, width, resolution)
  params, _ = tables.cost(arch.Architecture(space.name, ops).indices(space))
  assert num_params(shapes) == params
  # Only the chosen op of each layer is built (skip has no variables at all).
  chosen = dict(zip(space.searchable_names, ops))
  built = {l.name: chosen.get(l.name, l.ops[0]) for l in space.layers}
  assert {k: list(v) for k, v in shapes['params'].items()} == {
      name: [op] for name, op in built.items() if op != 'skip'}
  if preset == 'hournas_a':
    assert built['layer2_3'] == 'skip'


def test_params_equal_real_network_values():
  """init_all draws real values with the same shapes (the engines' initialisation path)."""
  space, tables, ops, net, shapes = fixed_network(*NETWORKS[0])
  variables = net.init_all(0, (32, 32, 3))
  assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(shapes)
  assert num_params(variables) == tables.cost(
      arch.Architecture(space.name, ops).indices(space))[0]


@pytest.mark.parametrize('preset,width,resolution', NETWORKS)
def test_flops_against_xla_cost_analysis(preset, width, resolution):
  """Measured xla / (2 x table): hournas_a 1.026, hournas_e 1.043, hournas_f 1.073 at these
  sizes: padding (-10 to -11%) and elementwise ops (+14 to +21% over the exact MACs) partly
  cancel. Over the padding-exact MAC count the elementwise remainder is 4.46, 5.07 and 7.63
  flops per conv output element, inside the 3-5, 3-7 and 3-9 bands."""
  space, tables, ops, net, shapes = fixed_network(preset, width, resolution)
  table_flops = tables.cost(arch.Architecture(space.name, ops).indices(space))[1]
  chosen = dict(zip(space.searchable_names, ops))
  exact = full = elements = 0
  for layer in space.layers:
    op = space.ops[chosen.get(layer.name, layer.ops[0])]
    m, e = count_macs(layer, op, space)
    exact, elements = exact + m, elements + e
    full += count_macs(layer, op, space, clip=False)[0]
  assert full == table_flops  # count_macs mirrors the table ...
  assert exact < table_flops  # ... and padding only removes taps
  x = jax.ShapeDtypeStruct((1, resolution, resolution, 3), jnp.float32)
  flops = xla_flops(lambda v, x: net.apply(v, x, train=False), shapes, x)
  lo, hi = elementwise_band(space, ops)
  assert 2 * exact + lo * elements <= flops <= 2 * exact + hi * elements, (
      flops / (2 * table_flops), (flops - 2 * exact) / elements)
  # The plain ratio, loosely: the table is XLA's MAC count up to padding and elementwise ops.
  assert 0.9 <= flops / (2 * table_flops) <= 1.15


def test_paper_setting_against_xla():
  """HourNAS-A as published (224x224, 1000 classes, width 1): the real network has the table's
  4,831,928 parameters, and XLA counts 1.0305 x 2 x the table's 288.2M multiply-adds (padding
  -0.9%, elementwise ops +3.9%)."""
  space, tables, ops, net, shapes = fixed_network('hournas_a', 1.0, 224, 1000)
  params, table_flops = tables.cost(arch.Architecture(space.name, ops).indices(space))
  assert num_params(shapes) == params == 4_831_928
  x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  flops = xla_flops(lambda v, x: net.apply(v, x, train=False), shapes, x)
  assert 1.0 <= flops / (2 * table_flops) <= 1.05


# (space, width, layer, op): every kind of op, stride 1 and 2, residual or not.
BLOCKS = [
    ('fbnet', 0.25, 'layer2_1', 'k5e6'),   # stride 2, 16 -> 24
    ('fbnet', 0.25, 'layer2_2', 'k3g2'),   # grouped + shuffle, residual
    ('fbnet', 0.25, 'layer3_3', 'k5g2'),
    ('fbnet', 0.25, 'layer4_2', 'k3e1'),
    ('fbnet', 0.25, 'layer4_2', 'skip'),
    ('fbnet_enlarged', 0.25, 'layer5_1', 'k7e3'),  # stride 1, more channels: no residual
    ('mnasnet', 0.5, 'stem', 'conv3'),
    ('mnasnet', 0.5, 'layer1_1', 'sep3'),
    ('mnasnet', 0.5, 'layer3_1', 'k5e6se'),
    ('mnasnet', 0.5, 'layer3_2', 'k3e3se'),
    ('mnasnet', 0.5, 'head', 'head'),
    ('efficientnet', 0.5, 'layer1_1', 'k3e1se'),  # 32 -> 16, swish
    ('efficientnet', 0.5, 'layer2_2', 'k5e6se'),
    ('efficientnet', 0.5, 'head', 'head'),
]


@pytest.mark.parametrize('space_name,width,layer_name,op_name', BLOCKS)
def test_block_against_op_cost(space_name, width, layer_name, op_name):
  space, _ = space_and_tables(space_name, 64, 10, width)
  layer = space.layer(layer_name)
  op = space.ops[op_name]
  block = blocks.make_block(space, layer, op_name)
  shape = (1, layer.in_resolution, layer.in_resolution, layer.in_channels)
  variables = jax.eval_shape(lambda: block.init(jax.random.key(0), jnp.zeros(shape),
                                                train=False))
  params, table_flops = costs.op_cost(layer, op, space)
  assert num_params(variables) == params
  out = jax.eval_shape(lambda v, x: block.apply(v, x, train=False), variables,
                       jax.ShapeDtypeStruct(shape, jnp.float32))
  if op.kind == 'head':
    assert out.shape == (1, space.num_classes)
  else:
    assert out.shape == (1, layer.out_resolution, layer.out_resolution, layer.out_channels)
  exact, elements = count_macs(layer, op, space)
  assert count_macs(layer, op, space, clip=False)[0] == table_flops
  flops = xla_flops(lambda v, x: block.apply(v, x, train=False), variables,
                    jax.ShapeDtypeStruct(shape, jnp.float32))
  if op.kind == 'skip':
    assert flops == table_flops == 0
    return
  lo, hi = elementwise_band(space, [op_name])
  assert 2 * exact + lo * elements <= flops <= 2 * exact + hi * elements, (
      flops, 2 * exact, (flops - 2 * exact) / elements)


def test_se_and_group_shapes_in_real_block():
  """The SE squeeze width and the grouped 1x1 convs that op_cost assumes are what is built."""
  space, _ = space_and_tables('mnasnet', 64, 10, 1.0)
  layer = space.layer('layer3_1')  # 24 -> 40, k5e6se: mid 144, SE to 6
  block = blocks.make_block(space, layer, 'k5e6se')
  v = jax.eval_shape(lambda: block.init(jax.random.key(0), jnp.zeros((1, 16, 16, 24)),
                                        train=False))
  kernels = sorted(tuple(x.shape) for x in jax.tree_util.tree_leaves(v['params'])
                   if len(x.shape) == 4)
  assert kernels == sorted([(1, 1, 24, 144), (5, 5, 1, 144), (1, 1, 144, 6), (1, 1, 6, 144),
                            (1, 1, 144, 40)])
  fspace, _ = space_and_tables('fbnet', 64, 10, 1.0)
  layer = fspace.layer('layer2_2')  # 24 -> 24, k3g2
  block = blocks.make_block(fspace, layer, 'k3g2')
  v = jax.eval_shape(lambda: block.init(jax.random.key(0), jnp.zeros((1, 16, 16, 24)),
                                        train=False))
  kernels = sorted(tuple(x.shape) for x in jax.tree_util.tree_leaves(v['params']))
  assert kernels == sorted([(1, 1, 12, 24), (3, 3, 1, 24), (1, 1, 12, 24),
                            (24,), (24,), (24,), (24,), (24,), (24,)])


@pytest.mark.parametrize('channels', [1, 3])
def test_the_stem_costs_the_channels_of_the_images(channels):
  """Gray images (1 channel) give the stem a kernel of 1 input channel: the tables count the
  network that is built, not an RGB one."""
  space = spaces.get_space('fbnet_shallow', resolution=16, num_classes=10, width=0.25,
                           in_channels=channels)
  assert space.in_channels == channels and space.layers[0].in_channels == channels
  ops = ['k3e1'] * len(space.searchable_names)
  net = supernet.SuperNet(space, supernet.fixed_layer_ops(space, ops))
  params, flops = costs.cost_tables(space).cost(arch.Architecture(space.name, ops).indices(space))
  assert num_params(net.variable_shapes((16, 16, channels))) == params
  rgb = spaces.get_space('fbnet_shallow', resolution=16, num_classes=10, width=0.25)
  rgb_params, rgb_flops = costs.cost_tables(rgb).cost(
      arch.Architecture(rgb.name, ops).indices(rgb))
  stem_out = space.layers[0].out_channels
  # The stem's 3 x 3 kernel: 9 weights per (input, output) channel pair.
  assert rgb_params - params == 9 * stem_out * (3 - channels)
  assert (rgb_flops > flops) == (channels < 3)
  with pytest.raises(spaces.SpaceError, match='in_channels must be a positive integer'):
    spaces.get_space('fbnet_shallow', in_channels=0)
