"""Tests for hournas_jax.vital: vital blocks read from the network's topology (Section 3.1,
Appendix A, Table 6)."""

import pytest

from hournas_jax import spaces, vital

FIRST_OF_STAGES_2_TO_7 = ('layer2_1', 'layer3_1', 'layer4_1', 'layer5_1', 'layer6_1',
                          'layer7_1')

# Table 6 (the shallow FBNet of the sensitivity experiments): layer -> vital?
TABLE_6 = {'layer1_1': False, 'layer2_1': True, 'layer2_2': False, 'layer3_1': True,
           'layer3_2': False, 'layer4_1': True, 'layer4_2': False, 'layer5_1': True,
           'layer5_2': False, 'layer6_1': True, 'layer6_2': False, 'layer7_1': True}


def vital_mask(space):
  """Boolean per searchable layer: is it vital."""
  names = set(vital.vital_layers(space))
  return tuple(name in names for name in space.searchable_names)


@pytest.mark.parametrize('name', ['fbnet', 'fbnet_enlarged', 'fbnet_shallow'])
def test_fbnet_first_block_of_every_stage_but_the_first(name):
  assert vital.vital_layers(spaces.get_space(name)) == FIRST_OF_STAGES_2_TO_7


def test_fbnet_shallow_matches_table_6():
  space = spaces.get_space('fbnet_shallow')
  assert space.searchable_names == tuple(TABLE_6)
  assert vital_mask(space) == tuple(TABLE_6.values())


def test_fbnet_vital_mask():
  space = spaces.get_space('fbnet')
  mask = vital_mask(space)
  assert len(mask) == 22 and sum(mask) == 6
  assert [n for n, v in zip(space.searchable_names, mask) if v] == list(FIRST_OF_STAGES_2_TO_7)


def test_fbnet_with_fixed_layers():
  assert vital.vital_layers(spaces.get_space('fbnet'), searchable_only=False) == (
      ('stem',) + FIRST_OF_STAGES_2_TO_7 + ('head',))


def test_mnasnet():
  space = spaces.get_space('mnasnet')
  assert vital.vital_layers(space) == FIRST_OF_STAGES_2_TO_7
  # The fixed stem, SepConv layer1_1 (32 -> 16 channels) and head are on every path too.
  assert vital.vital_layers(space, searchable_only=False) == (
      ('stem', 'layer1_1') + FIRST_OF_STAGES_2_TO_7 + ('head',))


def test_efficientnet_includes_layer1_1():
  space = spaces.get_space('efficientnet')
  # layer1_1 maps the stem's 32 channels to 16: no identity around it.
  assert vital.vital_layers(space) == ('layer1_1',) + FIRST_OF_STAGES_2_TO_7
  assert vital.vital_layers(space, searchable_only=False) == (
      ('stem', 'layer1_1') + FIRST_OF_STAGES_2_TO_7 + ('head',))


@pytest.mark.parametrize('name', spaces.SPACE_NAMES)
@pytest.mark.parametrize('width', [1.0, 0.25])
def test_vital_iff_layer_changes_shape(name, width):
  """In a chain, a SuperBlock is vital exactly when it has no identity around it: when it
  changes the shape, i.e. when skip is not among its candidates."""
  space = spaces.get_space(name, resolution=32, width=width)
  mask = vital_mask(space)
  for layer, is_vital in zip(space.searchable_layers, mask):
    assert is_vital == (not layer.keeps_shape) == ('skip' not in layer.ops), layer.name


def test_resolution_and_classes_do_not_change_vital_layers():
  for res, classes in ((32, 10), (17, 2), (512, 1000)):
    assert vital.vital_layers(spaces.get_space('fbnet', resolution=res, num_classes=classes)
                              ) == FIRST_OF_STAGES_2_TO_7


def test_graph_edges():
  space = spaces.get_space('fbnet_shallow')
  edges = vital.graph_edges(space)
  layer_edges = [e for e in edges if e[2] != 'identity']
  assert layer_edges == [(i, i + 1, l.name) for i, l in enumerate(space.layers)]
  identities = sorted(a for a, _, w in edges if w == 'identity')
  assert [space.layers[i].name for i in identities] == [
      n for n, v in TABLE_6.items() if not v]


def test_stage_that_keeps_its_channels_has_no_vital_first_block(monkeypatch):
  """A synthetic FBNet whose stage 5 keeps stage 4's 64 channels: layer5_1 (stride 1) gets an
  identity and stops being vital, and skip becomes a candidate there; stride-2 blocks stay."""
  table = dict(spaces.SPACE_TABLES['fbnet'])
  table['stages'] = tuple((64, n, s) if i == 5 else (c, n, s)
                          for i, (c, n, s) in enumerate(table['stages'], start=1))
  monkeypatch.setitem(spaces.SPACE_TABLES, 'fbnet_flat5', table)
  space = spaces.get_space('fbnet_flat5')
  layer = space.layer('layer5_1')
  assert (layer.in_channels, layer.out_channels, layer.stride) == (64, 64, 1)
  assert 'skip' in layer.ops
  assert vital.vital_layers(space) == ('layer2_1', 'layer3_1', 'layer4_1', 'layer6_1',
                                       'layer7_1')


def test_narrow_width_merges_channels():
  """Width scaling rounds channels to multiples of 8: at width 0.05 stages 1-5 all have 8
  channels and stage 6/7 16, so layer5_1 and layer7_1 keep their shape and stop being vital,
  while the stride-2 first blocks stay vital."""
  space = spaces.get_space('fbnet', resolution=32, width=0.05)
  assert space.layer('layer5_1').in_channels == space.layer('layer5_1').out_channels == 8
  assert space.layer('layer7_1').in_channels == space.layer('layer7_1').out_channels == 16
  assert vital.vital_layers(space) == ('layer2_1', 'layer3_1', 'layer4_1', 'layer6_1')


def test_op_subset_without_skip_keeps_topology():
  """Vital blocks come from the shapes, not from whether `skip` is a candidate: an inverted
  residual that keeps its shape has its residual shortcut anyway."""
  space = spaces.get_space('fbnet', ops=('k3e3', 'k5e6'))
  assert all('skip' not in l.ops for l in space.searchable_layers)
  assert vital.vital_layers(space) == FIRST_OF_STAGES_2_TO_7
