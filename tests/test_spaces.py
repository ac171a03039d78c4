"""Tests for hournas_jax.spaces: every space against the paper's tables (Tables 6-14), skip only
where a layer keeps its shape, the width/resolution/classes/ops parameters, and errors."""

import math

import pytest

from hournas_jax import arch, spaces
from hournas_jax.spaces import SpaceError


def stages(*rows):
  """[(name, out channels, stride)] of the searchable layers, from (stage, out, count, stride)."""
  out = []
  for stage, channels, count, stride in rows:
    out += [(f'layer{stage}_{j + 1}', channels, stride if j == 0 else 1) for j in range(count)]
  return out


# The paper's tables, transcribed: (layer, out channels, stride) of every searchable layer.
TABLE_8_FBNET = stages((1, 16, 1, 1), (2, 24, 4, 2), (3, 32, 4, 2), (4, 64, 4, 2),
                       (5, 112, 4, 1), (6, 184, 4, 2), (7, 352, 1, 1))
TABLE_6_SHALLOW = stages((1, 16, 1, 1), (2, 24, 2, 2), (3, 32, 2, 2), (4, 64, 2, 2),
                         (5, 112, 2, 1), (6, 184, 2, 2), (7, 352, 1, 1))
TABLE_12_MNASNET = stages((2, 24, 4, 2), (3, 40, 4, 2), (4, 80, 4, 2), (5, 112, 4, 1),
                          (6, 160, 4, 2), (7, 320, 1, 1))
TABLE_14_EFFICIENTNET = stages((1, 16, 1, 1), (2, 24, 4, 2), (3, 40, 4, 2), (4, 80, 4, 2),
                               (5, 112, 4, 1), (6, 192, 4, 2), (7, 320, 1, 1))

# (stem channels, fixed layers between stem and SuperBlocks, searchable layers, head channels,
#  default classes, activation)
EXPECTED = {
    'fbnet': (16, [], TABLE_8_FBNET, 1984, 1000, 'relu'),
    'fbnet_enlarged': (16, [], TABLE_8_FBNET, 1984, 1000, 'relu'),  # Table 10: same backbone
    'fbnet_shallow': (16, [], TABLE_6_SHALLOW, 1984, 100, 'relu'),
    'mnasnet': (32, [('layer1_1', 'sep3', 16, 1)], TABLE_12_MNASNET, 1280, 1000, 'relu'),
    'efficientnet': (32, [], TABLE_14_EFFICIENTNET, 1280, 1000, 'swish'),
}

# Op tables: name -> (expansion, kernel, group, se), rows in the paper's order.
TABLE_7 = {'k3g2': (1, 3, 2, False), 'k3e1': (1, 3, 1, False), 'k3e3': (3, 3, 1, False),
           'k3e6': (6, 3, 1, False), 'k5g2': (1, 5, 2, False), 'k5e1': (1, 5, 1, False),
           'k5e3': (3, 5, 1, False), 'k5e6': (6, 5, 1, False), 'skip': None}
TABLE_9 = {'k3e1': (1, 3, 1, False), 'k3e3': (3, 3, 1, False), 'k3e6': (6, 3, 1, False),
           'k5e1': (1, 5, 1, False), 'k5e3': (3, 5, 1, False), 'k5e6': (6, 5, 1, False),
           'k7e1': (1, 7, 1, False), 'k7e3': (3, 7, 1, False), 'k7e6': (6, 7, 1, False),
           'skip': None}
TABLE_11 = {'k3e1': (1, 3, 1, False), 'k3e3': (3, 3, 1, False), 'k3e6': (6, 3, 1, False),
            'k5e1': (1, 5, 1, False), 'k5e3': (3, 5, 1, False), 'k5e6': (6, 5, 1, False),
            'k3e1se': (1, 3, 1, True), 'k3e3se': (3, 3, 1, True), 'k3e6se': (6, 3, 1, True),
            'k5e1se': (1, 5, 1, True), 'k5e3se': (3, 5, 1, True), 'k5e6se': (6, 5, 1, True),
            'skip': None}
TABLE_13 = {'k3e1se': (1, 3, 1, True), 'k3e3se': (3, 3, 1, True), 'k3e6se': (6, 3, 1, True),
            'k5e1se': (1, 5, 1, True), 'k5e3se': (3, 5, 1, True), 'k5e6se': (6, 5, 1, True),
            'skip': None}
OP_TABLES = {'fbnet': TABLE_7, 'fbnet_shallow': TABLE_7, 'fbnet_enlarged': TABLE_9,
             'mnasnet': TABLE_11, 'efficientnet': TABLE_13}


def test_space_names():
  assert set(spaces.SPACE_NAMES) == set(EXPECTED)


@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_backbone_matches_paper_table(name):
  stem, fixed, searchable, head, classes, act = EXPECTED[name]
  space = spaces.get_space(name)
  assert space.resolution == 224 and space.width == 1.0
  assert space.num_classes == classes
  assert space.activation == act
  layers = space.layers
  # Stem: 3x3 conv, stride 2, from RGB.
  assert (layers[0].name, layers[0].ops, layers[0].in_channels, layers[0].out_channels,
          layers[0].stride, layers[0].searchable) == ('stem', ('conv3',), 3, stem, 2, False)
  got_fixed = [(l.name, l.ops[0], l.out_channels, l.stride) for l in layers[1:1 + len(fixed)]]
  assert got_fixed == fixed
  assert all(not l.searchable for l in layers[1:1 + len(fixed)])
  got = [(l.name, l.out_channels, l.stride) for l in space.searchable_layers]
  assert got == searchable
  assert space.searchable_names == tuple(n for n, _, _ in searchable)
  # The searchable layers are one contiguous block between the fixed prefix and the head.
  assert [l.name for l in layers[1 + len(fixed):-1]] == list(space.searchable_names)
  assert (layers[-1].name, layers[-1].ops, layers[-1].out_channels, layers[-1].stride,
          layers[-1].searchable) == ('head', ('head',), head, 1, False)


@pytest.mark.parametrize('name,count', [('fbnet', 22), ('fbnet_enlarged', 22),
                                        ('fbnet_shallow', 12), ('mnasnet', 21),
                                        ('efficientnet', 22)])
def test_number_of_superblocks(name, count):
  assert len(spaces.get_space(name).searchable_layers) == count


@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_layers_chain(name):
  """Each layer reads what the previous one wrote; resolution halves (ceil) at each stride 2."""
  space = spaces.get_space(name)
  channels, res = 3, 224
  for layer in space.layers:
    assert layer.in_channels == channels, layer.name
    assert layer.in_resolution == res, layer.name
    assert layer.out_resolution == math.ceil(res / layer.stride)
    channels, res = layer.out_channels, layer.out_resolution
  # 224 / 32: five stride-2 layers (stem + four stages) in every space.
  assert space.layers[-1].in_resolution == 7


def test_fbnet_resolutions_per_stage():
  space = spaces.get_space('fbnet')
  res = {l.name: l.in_resolution for l in space.layers}
  assert res == {**res, 'stem': 224, 'layer1_1': 112, 'layer2_1': 112, 'layer2_2': 56,
                 'layer3_1': 56, 'layer3_2': 28, 'layer4_1': 28, 'layer4_2': 14,
                 'layer5_1': 14, 'layer6_1': 14, 'layer6_2': 7, 'layer7_1': 7, 'head': 7}


@pytest.mark.parametrize('name', sorted(OP_TABLES))
def test_op_sets_match_paper(name):
  space = spaces.get_space(name)
  table = OP_TABLES[name]
  assert space.op_names == tuple(table)  # the paper's row order: the cost-table columns
  for op_name, row in table.items():
    op = space.ops[op_name]
    assert op.name == op_name
    if row is None:
      assert op.kind == 'skip'
      continue
    expansion, kernel, groups, se = row
    assert (op.kind, op.expansion, op.kernel, op.groups, op.se) == (
        'ir', expansion, kernel, groups, se), op_name
  # The fixed layers' ops are there too, and nothing else.
  assert set(space.ops) == set(table) | {'conv3', 'sep3', 'head'}


def test_efficientnet_has_se_on_every_op_and_swish():
  space = spaces.get_space('efficientnet')
  assert space.activation == 'swish'
  assert space.se_ratio == 0.25
  for name in space.op_names:
    assert name == 'skip' or space.ops[name].se, name


def test_fbnet_spaces_have_no_se():
  for name in ('fbnet', 'fbnet_enlarged', 'fbnet_shallow'):
    space = spaces.get_space(name)
    assert not any(space.ops[o].se for o in space.op_names)
    assert space.activation == 'relu'


@pytest.mark.parametrize('name', sorted(EXPECTED))
@pytest.mark.parametrize('width', [1.0, 0.25, 0.05])
def test_skip_only_where_layer_keeps_shape(name, width):
  space = spaces.get_space(name, resolution=64, width=width)
  non_skip = tuple(o for o in space.op_names if o != 'skip')
  for layer in space.searchable_layers:
    keeps = layer.stride == 1 and layer.in_channels == layer.out_channels
    assert layer.keeps_shape == keeps
    assert layer.ops == (space.op_names if keeps else non_skip), layer.name
  mask = space.op_mask()
  assert mask.shape == (len(space.searchable_layers), len(space.op_names))
  assert mask[:, space.op_names.index('skip')].tolist() == [
      l.keeps_shape for l in space.searchable_layers]
  assert mask[:, [i for i, o in enumerate(space.op_names) if o != 'skip']].all()


def test_skip_layers_in_fbnet_at_full_width():
  space = spaces.get_space('fbnet')
  with_skip = [l.name for l in space.searchable_layers if 'skip' in l.ops]
  # Every block but the first of each stage, and layer1_1 (16 -> 16, stride 1).
  assert with_skip == ['layer1_1'] + [f'layer{s}_{j}' for s in range(2, 7) for j in (2, 3, 4)]


def test_efficientnet_first_block_changes_channels():
  layer = spaces.get_space('efficientnet').layer('layer1_1')
  assert (layer.in_channels, layer.out_channels, layer.stride) == (32, 16, 1)
  assert 'skip' not in layer.ops and layer.searchable


def test_mnasnet_sepconv_is_fixed():
  space = spaces.get_space('mnasnet')
  layer = space.layer('layer1_1')
  assert (layer.in_channels, layer.out_channels, layer.ops, layer.searchable) == (
      32, 16, ('sep3',), False)
  assert 'layer1_1' not in space.searchable_names
  assert space.ops['sep3'].kind == 'sep' and space.ops['sep3'].kernel == 3


@pytest.mark.parametrize('resolution', [32, 30, 17, 8, 1024])
def test_resolution_scales_space(resolution):
  space = spaces.get_space('fbnet', resolution=resolution)
  assert space.resolution == resolution
  res = resolution
  for layer in space.layers:
    assert layer.in_resolution == res
    res = -(-res // layer.stride)
  # Channels and ops do not depend on the resolution.
  full = spaces.get_space('fbnet')
  assert [(l.in_channels, l.out_channels, l.stride, l.ops) for l in space.layers] == [
      (l.in_channels, l.out_channels, l.stride, l.ops) for l in full.layers]


def test_resolution_32_ends_at_one_pixel():
  space = spaces.get_space('mnasnet', resolution=32)
  assert space.layers[-1].in_resolution == 1
  assert spaces.get_space('fbnet', resolution=30).layer('layer6_2').in_resolution == 1


@pytest.mark.parametrize('width', [0.25, 0.5, 0.75, 1.5, 2.0])
def test_width_scales_channels(width):
  space = spaces.get_space('fbnet', width=width)
  full = spaces.get_space('fbnet')
  assert space.width == width
  for layer, ref in zip(space.layers, full.layers):
    assert layer.name == ref.name and layer.stride == ref.stride
    if layer.name == 'stem':
      assert layer.in_channels == 3
    c, ref_c = layer.out_channels, ref.out_channels
    assert c == spaces.scale_channels(ref_c, width)
    # MobileNet rounding: a multiple of 8, at least 8 and at least 90% of the scaled value.
    assert c % 8 == 0 and c >= 8 and c >= 0.9 * ref_c * width
    # ... and within one step of 8 above it (rounding to nearest, or the 90% bump).
    assert c <= max(8, ref_c * width + 8)


def test_scale_channels_values():
  assert spaces.scale_channels(16, 1.0) == 16
  assert spaces.scale_channels(24, 1.0) == 24  # width 1 never rounds (184 is not a multiple of 8)
  assert spaces.scale_channels(184, 1.0) == 184
  assert spaces.scale_channels(16, 0.25) == 8
  assert spaces.scale_channels(352, 0.25) == 88
  assert spaces.scale_channels(1984, 0.25) == 496
  assert spaces.scale_channels(184, 0.05) == 16  # 8 would be below 90% of 9.2


def test_classes_parameter():
  assert spaces.get_space('fbnet', num_classes=10).num_classes == 10
  assert spaces.get_space('fbnet_shallow').num_classes == 100
  assert spaces.get_space('efficientnet', num_classes=2).num_classes == 2
  # The classifier is not a layer of the chain: classes change nothing else.
  a, b = spaces.get_space('fbnet', num_classes=10), spaces.get_space('fbnet')
  assert a.layers == b.layers


def test_ops_subset():
  space = spaces.get_space('fbnet', ops=('skip', 'k5e6', 'k3e3'))
  assert space.op_names == ('k3e3', 'k5e6', 'skip')  # table order, not the caller's
  assert set(space.ops) == {'k3e3', 'k5e6', 'skip', 'conv3', 'sep3', 'head'}
  for layer in space.searchable_layers:
    assert layer.ops == (('k3e3', 'k5e6', 'skip') if layer.keeps_shape else ('k3e3', 'k5e6'))
  assert space.op_mask().shape == (22, 3)
  # Without skip, no layer has it; the backbone is unchanged.
  no_skip = spaces.get_space('mnasnet', ops=('k3e3se',))
  assert all(l.ops == ('k3e3se',) for l in no_skip.searchable_layers)
  assert [l.out_channels for l in no_skip.layers] == [
      l.out_channels for l in spaces.get_space('mnasnet').layers]


def test_layer_lookup():
  space = spaces.get_space('fbnet')
  assert space.layer('layer5_1').out_channels == 112
  with pytest.raises(SpaceError, match="no layer 'layer9_1'"):
    space.layer('layer9_1')


def test_space_is_hashable_and_equal_by_value():
  a = spaces.get_space('fbnet', resolution=32, width=0.25)
  b = spaces.get_space('fbnet', resolution=32, width=0.25)
  assert a == b and hash(a) == hash(b)
  assert a != spaces.get_space('fbnet', resolution=32, width=0.5)


def test_space_error_is_value_error():
  assert issubclass(SpaceError, ValueError)


def test_bad_name_lists_spaces():
  with pytest.raises(SpaceError) as e:
    spaces.get_space('resnet50')
  msg = str(e.value)
  assert 'resnet50' in msg
  for name in spaces.SPACE_NAMES:
    assert name in msg


@pytest.mark.parametrize('resolution', [0, 7, 1025, -32, 32.0, '224', True, None])
def test_bad_resolution(resolution):
  with pytest.raises(SpaceError, match=r'resolution must be an integer from 8 to 1024') as e:
    spaces.get_space('fbnet', resolution=resolution)
  assert repr(resolution) in str(e.value)


@pytest.mark.parametrize('width', [0, -0.5, 4.5, '1', None, float('nan')])
def test_bad_width(width):
  with pytest.raises(SpaceError, match=r'width must be a number in \(0, 4\]'):
    spaces.get_space('fbnet', width=width)


@pytest.mark.parametrize('classes', [0, 1, -10, 10.0, '10'])
def test_bad_classes(classes):
  with pytest.raises(SpaceError, match=r'num_classes must be an integer >= 2') as e:
    spaces.get_space('fbnet', num_classes=classes)
  assert repr(classes) in str(e.value)


@pytest.mark.parametrize('ops', [('k7e6',), ('k3e3', 'bogus'), ('skip',), (), ('k3e3se',)])
def test_bad_ops_lists_allowed(ops):
  with pytest.raises(SpaceError) as e:
    spaces.get_space('fbnet', ops=ops)
  msg = str(e.value)
  assert 'at least one besides skip' in msg
  for op in spaces.FBNET_OPS:  # the allowed ops are listed
    assert op in msg


def test_efficientnet_supernet_holds_layer1_1_at_k3e1se():
  """Table 14: the SuperNet's layer1_1 is k3e1se (the search keeps it there); the space still
  offers every op at it, so EfficientNet-Max (k5e6se there) is an architecture of the space."""
  space = spaces.get_space('efficientnet')
  assert space.supernet_fixed == {'layer1_1': 'k3e1se'}
  layer = space.layer('layer1_1')
  assert layer.searchable and 'k5e6se' in layer.ops
  assert arch.preset('efficientnet_max').validate(space).ops[0] == 'k5e6se'
  for name in ('fbnet', 'fbnet_enlarged', 'mnasnet', 'fbnet_shallow'):
    assert spaces.get_space(name).supernet_fixed == {}
  # An op subset without k3e1se leaves the layer searchable among the ops it keeps.
  assert spaces.get_space('efficientnet', ops=('k3e6se', 'k5e6se')).supernet_fixed == {}
  bad = {**spaces.SPACE_TABLES['efficientnet'], 'supernet_fixed': {'layer9_1': 'k3e1se'}}
  with pytest.raises(spaces.SpaceError, match='supernet_fixed layer9_1=k3e1se'):
    spaces.from_table('efficientnet', bad)
