"""Architectures as data: one op name per searchable layer, in order.

On disk an architecture is JSON a person can read and edit:
    {"space": "fbnet", "ops": {"layer1_1": "k3e1", "layer2_1": "k5e6", ...}}
Fixed layers (stem, head, MnasNet's SepConv) are not listed. Extra keys (a search result's costs,
probabilities, ...) are kept alongside and ignored when loading.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Mapping, Sequence

from hournas_jax import spaces
from hournas_jax.spaces import SpaceError


@dataclasses.dataclass(frozen=True)
class Architecture:
  space: str
  ops: tuple[str, ...]

  def validate(self, space: spaces.SearchSpace) -> 'Architecture':
    """Checks length and that every op is a candidate of its layer; returns self."""
    if self.space != space.name:
      raise SpaceError(f'architecture is for space {self.space!r}, not {space.name!r}')
    layers = space.searchable_layers
    if len(self.ops) != len(layers):
      raise SpaceError(f'space {space.name!r} has {len(layers)} searchable layers, the '
                       f'architecture lists {len(self.ops)} ops')
    for layer, op in zip(layers, self.ops):
      if op not in space.op_names:
        raise SpaceError(f'unknown op {op!r} at {layer.name}; ops of {space.name!r}: '
                         f'{", ".join(space.op_names)}')
      if op not in layer.ops:
        raise SpaceError(f'op {op!r} is not allowed at {layer.name} (it changes the shape, so '
                         f'no identity fits); allowed: {", ".join(layer.ops)}')
    return self

  def indices(self, space: spaces.SearchSpace) -> tuple[int, ...]:
    """Column index of each op in the space's cost tables and theta."""
    self.validate(space)
    return tuple(space.op_names.index(op) for op in self.ops)

  @classmethod
  def from_indices(cls, space: spaces.SearchSpace, indices: Sequence[int]) -> 'Architecture':
    return cls(space.name, tuple(space.op_names[int(i)] for i in indices)).validate(space)

  def to_dict(self, space: spaces.SearchSpace) -> dict:
    return {'space': self.space, 'ops': dict(zip(space.searchable_names, self.ops))}

  def to_json(self, space: spaces.SearchSpace, **extra) -> str:
    return json.dumps({**self.to_dict(space), **extra}, indent=2)

  @classmethod
  def from_dict(cls, data: Mapping, space: spaces.SearchSpace | None = None) -> 'Architecture':
    if not isinstance(data, Mapping) or 'ops' not in data:
      raise SpaceError('an architecture is a JSON object with "space" and "ops" '
                       '({"layer1_1": "k3e1", ...} or a list of op names)')
    name = data.get('space', space.name if space else None)
    if not isinstance(name, str):
      raise SpaceError(f'"space" must name a search space ({", ".join(spaces.SPACE_NAMES)})')
    if space is None:
      space = spaces.get_space(name)
    elif name != space.name:
      raise SpaceError(f'architecture is for space {name!r}, not {space.name!r}')
    ops = data['ops']
    if isinstance(ops, Mapping):
      missing = [n for n in space.searchable_names if n not in ops]
      unknown = [n for n in ops if n not in space.searchable_names]
      if missing or unknown:
        raise SpaceError(f'architecture layers do not match space {space.name!r}: missing '
                         f'{missing or "none"}, unknown {unknown or "none"}')
      ops = [ops[n] for n in space.searchable_names]
    if not isinstance(ops, (list, tuple)) or not all(isinstance(o, str) for o in ops):
      raise SpaceError('"ops" must map layer names to op names, or list op names in order')
    return cls(name, tuple(ops)).validate(space)


def load(path: str, space: spaces.SearchSpace | None = None) -> Architecture:
  try:
    with open(path) as f:
      data = json.load(f)
  except OSError as e:
    raise SpaceError(f'cannot read architecture file {path!r}: {e.strerror}') from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise SpaceError(f'architecture file {path!r} is not valid JSON: {e}') from None
  return Architecture.from_dict(data, space)


def save(path: str, architecture: Architecture, space: spaces.SearchSpace, **extra) -> None:
  """Writes atomically: a reader never sees half a file and an old file survives a crash."""
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    f.write(architecture.to_json(space, **extra) + '\n')
  os.replace(tmp, path)


def _ops(text: str) -> tuple[str, ...]:
  return tuple(text.split())


# The architectures the paper lists (Tables 8, 10, 12, 14). HourNAS-I's two-digit misprints in
# Table 8 are read as kernel+expansion (31 = k3e1), HourNAS-E's layer4_4 `k3e3s3` as k3e3se.
PRESETS = {
    'hournas_a': ('fbnet', _ops('k3e1 k5e6 k5g2 skip k3g2 k5e6 k3g2 k5g2 k5e1 k5e6 k5e3 k3e1 '
                                'k5e3 k5e6 k3e3 k3e3 k3e3 k5e6 k5e3 k5e3 k3e6 k5e6')),
    'hournas_b': ('fbnet', _ops('k3e3 k5e6 k3e3 k5g2 skip k5e6 k3e3 k3e3 k3e3 k5e6 k5e6 k5e6 '
                                'k3e6 k5e6 k3e6 k3e6 k5e3 k5e6 k3e6 k3e6 k5e6 k5e6')),
    'hournas_g': ('fbnet', _ops('k3e3 k5g2 k3g2 k3e3 k3e3 k5e1 k3e1 k3e3 k3e3 k5e3 k3e6 k3e3 '
                                'k5e6 k3e3 k3e3 k5e3 k5e3 k3e6 k5e6 k3e6 k5e3 k3e3')),
    'hournas_i': ('fbnet', _ops('k3e1 k5e6 k5e1 k3e1 k3e1 k5e6 k5e3 k5e3 k3e3 k5e6 k5e3 k5e3 '
                                'k5e6 k5e6 k5e3 k3e1 k5e3 k5e6 k3e3 k5e3 k5e6 k5e6')),
    'fbnet_max': ('fbnet', ('k5e6',) * 22),
    'hournas_c': ('fbnet_enlarged', _ops('skip k3e6 k3e3 skip k3e3 k5e6 k3e3 k3e3 k3e3 k5e6 '
                                         'k3e3 k5e3 k7e1 k7e6 k5e3 k5e1 k5e1 k7e6 k5e3 k3e3 '
                                         'k3e6 k7e6')),
    'hournas_d': ('fbnet_enlarged', _ops('k3e3 k3e6 k5e1 k5e1 k5e3 k5e6 k5e3 k3e6 k5e1 k5e6 '
                                         'k3e6 k3e6 k3e6 k7e6 k7e3 k5e3 k5e3 k7e6 k7e6 k5e6 '
                                         'k7e6 k7e6')),
    'hournas_h': ('fbnet_enlarged', _ops('k3e3 k3e1 k3e3 k3e3 k5e1 k5e3 k3e3 k3e3 k7e1 k7e3 '
                                         'k7e3 k7e3 k7e3 k7e3 k5e3 k5e3 k7e3 k7e3 k3e6 k7e3 '
                                         'k7e3 k7e6')),
    'hournas_e': ('mnasnet', _ops('k5e6 k3e3se k3e1se k3e3 k5e6se k5e1 k3e1se k5e1 k5e6se '
                                  'k3e3se k3e3 k3e3se k5e6se k3e3se k3e3 k3e3 k5e6se k3e6 '
                                  'k5e3se k5e3se k5e6se')),
    'hournas_f': ('efficientnet', _ops('k3e1se k5e6se k5e1se k5e1se k3e1se k5e6se k5e1se '
                                       'k3e1se k5e1se k5e6se k3e6se k3e6se k3e6se k5e6se k5e3se '
                                       'k5e3se k5e3se k5e6se k5e6se k3e6se k5e6se k5e6se')),
    'efficientnet_max': ('efficientnet', ('k5e6se',) * 22),
}

# Params (M) and FLOPs (M) as the paper prints them, at 224x224 and 1000 classes.
PAPER_COSTS = {
    'hournas_a': (4.8, 298), 'hournas_b': (5.5, 406), 'hournas_g': (4.7, 297),
    'hournas_i': (4.8, 318), 'fbnet_max': (5.7, 583), 'hournas_c': (4.8, 296),
    'hournas_d': (5.5, 394), 'hournas_h': (4.8, 299), 'hournas_e': (3.8, 313),
    'hournas_f': (5.3, 383), 'efficientnet_max': (5.8, 738),
}


def preset(name: str) -> Architecture:
  if name not in PRESETS:
    raise SpaceError(f'unknown preset {name!r}; presets: {", ".join(PRESETS)}')
  space_name, ops = PRESETS[name]
  return Architecture(space_name, ops)


def resolve(spec: str, space: spaces.SearchSpace) -> Architecture:
  """An architecture from a preset name, a JSON file, a comma-separated op list, or one op
  name (that op at every searchable layer: a uniform backbone)."""
  if spec in PRESETS:
    arch = preset(spec)
    if arch.space != space.name:
      raise SpaceError(f'preset {spec!r} belongs to space {arch.space!r}, not {space.name!r}')
    return arch.validate(space)
  if spec.endswith('.json') or os.path.sep in spec or os.path.exists(spec):
    return load(spec, space)
  if spec in space.op_names:
    return Architecture(space.name, (spec,) * len(space.searchable_names)).validate(space)
  if ',' in spec:
    return Architecture(space.name, tuple(o.strip() for o in spec.split(','))).validate(space)
  raise SpaceError(f'architecture {spec!r} is neither a preset ({", ".join(PRESETS)}), a JSON '
                   f'file, nor a comma-separated list of ops')
