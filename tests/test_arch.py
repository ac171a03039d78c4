"""Tests for hournas_jax.arch: presets, JSON round trips, validation errors and resolve()."""

import json
import os

import pytest

from hournas_jax import arch, spaces
from hournas_jax.arch import Architecture
from hournas_jax.spaces import SpaceError

PRESET_SPACES = {
    'hournas_a': 'fbnet', 'hournas_b': 'fbnet', 'hournas_g': 'fbnet', 'hournas_i': 'fbnet',
    'fbnet_max': 'fbnet', 'hournas_c': 'fbnet_enlarged', 'hournas_d': 'fbnet_enlarged',
    'hournas_h': 'fbnet_enlarged', 'hournas_e': 'mnasnet', 'hournas_f': 'efficientnet',
    'efficientnet_max': 'efficientnet',
}

_SPACES = {}


def space_of(name, **kw):
  key = (name, tuple(sorted(kw.items())))
  if key not in _SPACES:
    _SPACES[key] = spaces.get_space(name, **kw)
  return _SPACES[key]


def test_presets_and_paper_costs_cover_the_same_architectures():
  assert set(arch.PRESETS) == set(PRESET_SPACES) == set(arch.PAPER_COSTS)


@pytest.mark.parametrize('name', sorted(PRESET_SPACES))
def test_preset_validates(name):
  a = arch.preset(name)
  assert a.space == PRESET_SPACES[name]
  space = space_of(a.space)
  assert a.validate(space) is a
  assert len(a.ops) == len(space.searchable_layers)
  # Also at a small resolution and width: presets do not depend on them.
  small = space_of(a.space, resolution=32, width=0.25, num_classes=10)
  a.validate(small)


def test_preset_spot_checks_against_paper_tables():
  ops = lambda name: dict(zip(space_of(PRESET_SPACES[name]).searchable_names,
                              arch.preset(name).ops))
  # Table 8, HourNAS-A: layer2_3 skip, layer2_4 k3g2, layer7_1 k5e6.
  a = ops('hournas_a')
  assert (a['layer1_1'], a['layer2_3'], a['layer2_4'], a['layer7_1']) == (
      'k3e1', 'skip', 'k3g2', 'k5e6')
  # Table 8, HourNAS-I misprints read as kernel + expansion: 31 = k3e1, 56 = k5e6, 33 = k3e3.
  i = ops('hournas_i')
  assert (i['layer2_3'], i['layer3_1'], i['layer3_4'], i['layer6_2']) == (
      'k3e1', 'k5e6', 'k3e3', 'k3e3')
  # Table 10, HourNAS-C starts with skip; Table 12, HourNAS-E layer4_4 k3e3s3 = k3e3se.
  assert ops('hournas_c')['layer1_1'] == 'skip'
  assert ops('hournas_e')['layer4_4'] == 'k3e3se'
  assert ops('hournas_e')['layer2_1'] == 'k5e6'
  # Table 14, HourNAS-F layer6_3 k3e6se; EfficientNet-Max all k5e6se.
  assert ops('hournas_f')['layer6_3'] == 'k3e6se'
  assert set(arch.preset('efficientnet_max').ops) == {'k5e6se'}
  assert set(arch.preset('fbnet_max').ops) == {'k5e6'}


def test_unknown_preset():
  with pytest.raises(SpaceError, match="unknown preset 'hournas_z'; presets: hournas_a"):
    arch.preset('hournas_z')


@pytest.mark.parametrize('name', sorted(PRESET_SPACES))
def test_json_round_trip(name):
  a = arch.preset(name)
  space = space_of(a.space)
  text = a.to_json(space)
  data = json.loads(text)
  assert data == {'space': a.space, 'ops': dict(zip(space.searchable_names, a.ops))}
  assert list(data['ops']) == list(space.searchable_names)  # network order, readable
  assert Architecture.from_dict(data) == a  # space from the file
  assert Architecture.from_dict(data, space) == a
  # The list form of "ops" loads too.
  assert Architecture.from_dict({'space': a.space, 'ops': list(a.ops)}) == a
  assert Architecture.from_dict({'ops': list(a.ops)}, space) == a  # space from the caller


@pytest.mark.parametrize('name', ['hournas_a', 'hournas_e', 'hournas_f'])
def test_save_load(tmp_path, name):
  a = arch.preset(name)
  space = space_of(a.space)
  path = str(tmp_path / 'arch.json')
  arch.save(path, a, space, params=123, note='x')
  assert os.listdir(tmp_path) == ['arch.json']  # the temporary file was renamed away
  data = json.load(open(path))
  assert data['params'] == 123 and data['note'] == 'x'  # extra keys kept...
  assert arch.load(path) == a  # ... and ignored on load
  assert arch.load(path, space) == a
  # Overwriting keeps a valid file.
  b = arch.preset('fbnet_max') if a.space == 'fbnet' else a
  arch.save(path, b, space_of(b.space))
  assert arch.load(path) == b


def test_load_list_form(tmp_path):
  a = arch.preset('hournas_c')
  path = tmp_path / 'list.json'
  path.write_text(json.dumps({'space': 'fbnet_enlarged', 'ops': list(a.ops)}))
  assert arch.load(str(path)) == a


def test_indices_round_trip():
  space = space_of('fbnet')
  a = arch.preset('hournas_a')
  idx = a.indices(space)
  assert idx[0] == space.op_names.index('k3e1')
  assert idx[3] == space.op_names.index('skip')
  assert Architecture.from_indices(space, idx) == a


# ----------------------------------------------------------------------------- errors


def fbnet_ops(**changes):
  space = space_of('fbnet')
  ops = dict(zip(space.searchable_names, arch.preset('hournas_a').ops))
  ops.update(changes)
  return ops


def test_unknown_op():
  space = space_of('fbnet')
  ops = list(fbnet_ops(layer3_2='k7e6').values())
  with pytest.raises(SpaceError) as e:
    Architecture('fbnet', tuple(ops)).validate(space)
  msg = str(e.value)
  assert "unknown op 'k7e6' at layer3_2" in msg
  assert ', '.join(spaces.FBNET_OPS) in msg  # lists the allowed ops


def test_wrong_length():
  space = space_of('fbnet')
  with pytest.raises(SpaceError, match="space 'fbnet' has 22 searchable layers, the "
                                       "architecture lists 21 ops"):
    Architecture('fbnet', arch.preset('hournas_a').ops[:-1]).validate(space)
  with pytest.raises(SpaceError, match='has 21 searchable layers, the architecture lists 22'):
    Architecture.from_dict({'space': 'mnasnet', 'ops': ['k3e3'] * 22})


@pytest.mark.parametrize('layer', ['layer2_1', 'layer5_1', 'layer7_1'])
def test_skip_in_shape_changing_layer(layer):
  space = space_of('fbnet')
  ops = tuple(fbnet_ops(**{layer: 'skip'}).values())
  with pytest.raises(SpaceError) as e:
    Architecture('fbnet', ops).validate(space)
  msg = str(e.value)
  assert f"op 'skip' is not allowed at {layer}" in msg
  assert 'allowed: k3g2, k3e1' in msg and 'skip' not in msg.split('allowed:')[1]


def test_skip_at_efficientnet_layer1_1_is_rejected():
  space = space_of('efficientnet')
  ops = ('skip',) + arch.preset('hournas_f').ops[1:]
  with pytest.raises(SpaceError, match="op 'skip' is not allowed at layer1_1"):
    Architecture('efficientnet', ops).validate(space)


def test_op_of_another_space():
  # k3e3se is a MnasNet op, not an FBNet one; k3g2 is not an EfficientNet one.
  with pytest.raises(SpaceError, match="unknown op 'k3e3se' at layer1_1"):
    Architecture('fbnet', ('k3e3se',) + ('k3e3',) * 21).validate(space_of('fbnet'))
  with pytest.raises(SpaceError, match="unknown op 'k3g2' at layer1_1; ops of 'efficientnet'"):
    Architecture('efficientnet', ('k3g2',) + ('k3e3se',) * 21).validate(
        space_of('efficientnet'))


def test_wrong_space():
  with pytest.raises(SpaceError, match="architecture is for space 'fbnet', not "
                                       "'fbnet_enlarged'"):
    arch.preset('hournas_a').validate(space_of('fbnet_enlarged'))
  # Same layer names, different space in the file.
  data = {'space': 'fbnet', 'ops': dict(zip(space_of('fbnet').searchable_names,
                                            arch.preset('hournas_c').ops))}
  with pytest.raises(SpaceError, match="architecture is for space 'fbnet', not "
                                       "'fbnet_enlarged'"):
    Architecture.from_dict(data, space_of('fbnet_enlarged'))


def test_unknown_space_in_file():
  with pytest.raises(SpaceError, match="unknown search space 'nasnet'; allowed: fbnet"):
    Architecture.from_dict({'space': 'nasnet', 'ops': ['k3e3'] * 22})


def test_missing_layer_names():
  ops = fbnet_ops()
  del ops['layer4_3']
  with pytest.raises(SpaceError) as e:
    Architecture.from_dict({'space': 'fbnet', 'ops': ops})
  msg = str(e.value)
  assert "do not match space 'fbnet'" in msg
  assert "missing ['layer4_3']" in msg and 'unknown none' in msg


def test_unknown_layer_names():
  ops = fbnet_ops(layer8_1='k3e3')
  with pytest.raises(SpaceError) as e:
    Architecture.from_dict({'space': 'fbnet', 'ops': ops})
  msg = str(e.value)
  assert "missing none" in msg and "unknown ['layer8_1']" in msg


@pytest.mark.parametrize('data', [
    [1, 2, 3],
    'k3e3',
    {'space': 'fbnet'},
    {'space': 'fbnet', 'ops': 'k3e3,k3e3'},
    {'space': 'fbnet', 'ops': [3] * 22},
    {'space': 'fbnet', 'ops': {n: 3 for n in spaces.get_space('fbnet').searchable_names}},
])
def test_malformed_data(data):
  with pytest.raises(SpaceError, match='"ops"|JSON object'):
    Architecture.from_dict(data)


def test_invalid_json(tmp_path):
  path = tmp_path / 'bad.json'
  path.write_text('{"space": "fbnet", "ops": [')
  with pytest.raises(SpaceError) as e:
    arch.load(str(path))
  assert f"architecture file '{path}' is not valid JSON" in str(e.value)
  assert e.value.__cause__ is None and e.value.__suppress_context__


def test_non_utf8_file(tmp_path):
  path = tmp_path / 'binary.json'
  path.write_bytes(b'\xff\xfe\x00\x80 not text')
  with pytest.raises(SpaceError, match='is not valid JSON'):
    arch.load(str(path))


def test_missing_file(tmp_path):
  path = str(tmp_path / 'nope.json')
  with pytest.raises(SpaceError, match=r"cannot read architecture file '.*nope\.json': "
                                       r"No such file or directory"):
    arch.load(path)


def test_directory_instead_of_file(tmp_path):
  with pytest.raises(SpaceError, match='cannot read architecture file'):
    arch.load(str(tmp_path))


# ----------------------------------------------------------------------------- resolve


def test_resolve_preset():
  assert arch.resolve('hournas_b', space_of('fbnet')) == arch.preset('hournas_b')
  assert arch.resolve('hournas_f', space_of('efficientnet', resolution=32, width=0.25)) == (
      arch.preset('hournas_f'))


def test_resolve_preset_of_other_space():
  with pytest.raises(SpaceError, match="preset 'hournas_e' belongs to space 'mnasnet', not "
                                       "'fbnet'"):
    arch.resolve('hournas_e', space_of('fbnet'))


def test_resolve_json(tmp_path):
  a = arch.preset('hournas_e')
  space = space_of('mnasnet')
  path = str(tmp_path / 'e.json')
  arch.save(path, a, space)
  assert arch.resolve(path, space) == a
  # A relative path without a directory part is found by its .json suffix.
  cwd = os.getcwd()
  try:
    os.chdir(tmp_path)
    assert arch.resolve('e.json', space) == a
  finally:
    os.chdir(cwd)
  with pytest.raises(SpaceError, match='cannot read architecture file'):
    arch.resolve(str(tmp_path / 'missing.json'), space)


def test_resolve_comma_list():
  space = space_of('fbnet')
  a = arch.preset('hournas_g')
  assert arch.resolve(','.join(a.ops), space) == a
  assert arch.resolve(', '.join(a.ops), space) == a  # spaces after commas are fine
  with pytest.raises(SpaceError, match='22 searchable layers, the architecture lists 2 ops'):
    arch.resolve('k3e3,k5e6', space)
  # One op name: that op at every searchable layer (a uniform backbone).
  assert arch.resolve('k3e3', space).ops == ('k3e3',) * 22
  with pytest.raises(SpaceError, match="'skip' is not allowed at layer2_1"):
    arch.resolve('skip', space)
  with pytest.raises(SpaceError, match="unknown op 'k9e9' at layer1_1"):
    arch.resolve(','.join(('k9e9',) + a.ops[1:]), space)


def test_resolve_garbage():
  with pytest.raises(SpaceError) as e:
    arch.resolve('hournas', space_of('fbnet'))
  msg = str(e.value)
  assert "'hournas' is neither a preset" in msg and 'hournas_a' in msg
  assert 'JSON file' in msg and 'comma-separated' in msg
