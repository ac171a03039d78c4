"""The search spaces of the HourNAS paper, as data.

A space is a chain of layers: a fixed stem, optional fixed layers, searchable SuperBlocks and a
fixed head. Every space below is one plain table (stages, channels, strides, candidate ops) fed
to the same builder; nothing here is code per space.

Conventions that the paper's tables leave implicit, chosen so that its published Params/FLOPs
come out (see tests/test_costs.py):
- Every inverted-residual op has its 1x1 expansion conv, also at expansion 1 (FBNet's IRF block).
  With it HourNAS-E is 3.85M/313M and HourNAS-F 5.27M/383M, as Tables 12 and 14 print.
- Squeeze-and-excitation reduces to 1/4 of the block's *input* channels (MnasNet, EfficientNet).
- The head is a 1x1 conv (1984 channels in FBNet, 1280 in MnasNet/EfficientNet), global average
  pooling and a fully connected classifier.
- `skip` is an identity, so it is only a candidate where a layer keeps its input shape; a layer
  that changes shape (stride 2 or more channels) has every op but `skip`.
- EfficientNet's layer1_1 holds every op, so that the space expresses and costs
  EfficientNet-Max, "the most complex architecture in the space", with k5e6se there (only with
  it does it come out at 738M FLOPs); but Table 14's SuperNet column fixes it at k3e1se, so the
  space's `supernet_fixed` tells the search to keep it there: it is neither a vital block to
  search nor a layer of the proposals (k5e6se there alone would take ~176M of HourNAS-F's 383M
  FLOPs).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

from hournas_jax import errors


class SpaceError(errors.UserError, ValueError):
  """A search space or architecture was asked for with values it does not allow."""


@dataclasses.dataclass(frozen=True)
class OpSpec:
  """One candidate operation of a SuperBlock."""
  name: str
  kind: str  # 'ir' (inverted residual), 'skip', 'sep' (depthwise-separable), 'conv', 'head'
  kernel: int = 0
  expansion: int = 0
  groups: int = 1
  se: bool = False


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """One layer of the chain. `ops` holds its candidates; a fixed layer has exactly one."""
  name: str
  in_channels: int
  out_channels: int
  stride: int
  in_resolution: int
  ops: tuple[str, ...]
  searchable: bool

  @property
  def out_resolution(self) -> int:
    # SAME padding: a stride-s layer gives ceil(H / s).
    return math.ceil(self.in_resolution / self.stride)

  @property
  def keeps_shape(self) -> bool:
    return self.stride == 1 and self.in_channels == self.out_channels


@dataclasses.dataclass(frozen=True)
class SearchSpace:
  name: str
  resolution: int
  num_classes: int
  width: float
  activation: str  # 'relu' or 'swish'
  se_ratio: float
  ops: Mapping[str, OpSpec]
  op_names: tuple[str, ...]  # the column order of every cost table and of theta
  layers: tuple[LayerSpec, ...]  # stem, fixed layers, SuperBlocks, head, in order
  # Searchable layers that the paper's SuperNet holds at one op ({layer: op}): architectures may
  # take any op there, the search keeps this one (EfficientNet's layer1_1, Table 14).
  supernet_fixed: Mapping[str, str] = dataclasses.field(default_factory=dict)

  def __hash__(self):
    return hash((self.name, self.resolution, self.num_classes, self.width, self.op_names,
                 self.stem_stride, self.in_channels))

  @property
  def stem_stride(self) -> int:
    return self.layers[0].stride

  @property
  def in_channels(self) -> int:
    """The input images' channels (the stem's input)."""
    return self.layers[0].in_channels

  @property
  def searchable_layers(self) -> tuple[LayerSpec, ...]:
    return tuple(l for l in self.layers if l.searchable)

  @property
  def searchable_names(self) -> tuple[str, ...]:
    return tuple(l.name for l in self.searchable_layers)

  def layer(self, name: str) -> LayerSpec:
    for l in self.layers:
      if l.name == name:
        return l
    raise SpaceError(f'no layer {name!r} in space {self.name!r}')

  def op_mask(self):
    """Boolean [L, O] table: which op columns each searchable layer allows."""
    import numpy as np
    return np.array([[op in l.ops for op in self.op_names] for l in self.searchable_layers])


def _ir(name: str) -> OpSpec:
  """Parses the papers' op names: k{kernel}e{expansion} or k{kernel}g{groups}, '+se' suffix."""
  body, se = (name[:-2], True) if name.endswith('se') else (name, False)
  kernel = int(body[1])
  if body[2] == 'g':
    return OpSpec(name, 'ir', kernel=kernel, expansion=1, groups=int(body[3:]), se=se)
  return OpSpec(name, 'ir', kernel=kernel, expansion=int(body[3:]), groups=1, se=se)


# Candidate ops per space, in the row order of the paper's op tables.
FBNET_OPS = ('k3g2', 'k3e1', 'k3e3', 'k3e6', 'k5g2', 'k5e1', 'k5e3', 'k5e6', 'skip')  # Table 7
FBNET_ENLARGED_OPS = ('k3e1', 'k3e3', 'k3e6', 'k5e1', 'k5e3', 'k5e6', 'k7e1', 'k7e3', 'k7e6',
                      'skip')  # Table 9
MNASNET_OPS = ('k3e1', 'k3e3', 'k3e6', 'k5e1', 'k5e3', 'k5e6', 'k3e1se', 'k3e3se', 'k3e6se',
               'k5e1se', 'k5e3se', 'k5e6se', 'skip')  # Table 11
EFFICIENTNET_OPS = ('k3e1se', 'k3e3se', 'k3e6se', 'k5e1se', 'k5e3se', 'k5e6se', 'skip')  # Table 13

_FBNET_STAGES = ((16, 1, 1), (24, 4, 2), (32, 4, 2), (64, 4, 2), (112, 4, 1), (184, 4, 2),
                 (352, 1, 1))  # (out channels, SuperBlocks, stride of the first), Table 8
_MNASNET_STAGES = ((24, 4, 2), (40, 4, 2), (80, 4, 2), (112, 4, 1), (160, 4, 2), (320, 1, 1))
_EFFICIENTNET_STAGES = ((16, 1, 1), (24, 4, 2), (40, 4, 2), (80, 4, 2), (112, 4, 1), (192, 4, 2),
                        (320, 1, 1))

# Each space: stem channels, fixed layers after the stem, searchable stages (numbered from the
# first stage), head channels, candidate ops, activation, default classes; optionally
# supernet_fixed, the searchable layers the search keeps at one op.
SPACE_TABLES = {
    'fbnet': dict(stem=16, fixed=(), stages=_FBNET_STAGES, head=1984, ops=FBNET_OPS,
                  activation='relu', num_classes=1000),
    'fbnet_enlarged': dict(stem=16, fixed=(), stages=_FBNET_STAGES, head=1984,
                           ops=FBNET_ENLARGED_OPS, activation='relu', num_classes=1000),
    # MnasNet's layer1_1 is a fixed SepConv 3x3 to 16 channels (Table 12).
    'mnasnet': dict(stem=32, fixed=(('layer1_1', 'sep3', 16, 1),), stages=_MNASNET_STAGES,
                    first_stage=2, head=1280, ops=MNASNET_OPS, activation='relu',
                    num_classes=1000),
    # Table 14: the SuperNet's layer1_1 is k3e1se; architectures may have any op there.
    'efficientnet': dict(stem=32, fixed=(), stages=_EFFICIENTNET_STAGES, head=1280,
                         ops=EFFICIENTNET_OPS, activation='swish', num_classes=1000,
                         supernet_fixed={'layer1_1': 'k3e1se'}),
    # The shallow FBNet of Table 6 (sensitivity experiments): 2 SuperBlocks a stage, 100 classes.
    'fbnet_shallow': dict(stem=16, fixed=(),
                          stages=((16, 1, 1), (24, 2, 2), (32, 2, 2), (64, 2, 2), (112, 2, 1),
                                  (184, 2, 2), (352, 1, 1)),
                          head=1984, ops=FBNET_OPS, activation='relu', num_classes=100),
}
SPACE_NAMES = tuple(SPACE_TABLES)

MIN_RESOLUTION, MAX_RESOLUTION = 8, 1024


def scale_channels(channels: int, width: float, divisor: int = 8) -> int:
  """MobileNet's rounding: a multiple of `divisor`, never below 90% of the scaled value."""
  if width == 1.0:
    return channels
  scaled = channels * width
  rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * scaled:
    rounded += divisor
  return rounded


def get_space(name: str, resolution: int = 224, num_classes: int | None = None,
              width: float = 1.0, ops: tuple[str, ...] | None = None,
              stem_stride: int | None = None, in_channels: int = 3) -> SearchSpace:
  """Builds a space from its table.

  Resolution, classes and width shrink it for tests and small data; `ops` keeps a subset of the
  space's candidate ops (in the table's order), e.g. for a quick search on a CPU. stem_stride
  (default 2) set to 1 keeps small inputs at full resolution through the first stage, as CIFAR
  versions of these networks do: at 32 px with stride 2, half the layers would see 2x2 or less.
  in_channels: the images' channels (1 for gray images), which the stem's cost counts.
  """
  if name not in SPACE_TABLES:
    raise SpaceError(f'unknown search space {name!r}; allowed: {", ".join(SPACE_NAMES)}')
  return from_table(name, SPACE_TABLES[name], resolution, num_classes, width, ops, stem_stride,
                    in_channels)


def from_table(name: str, table: Mapping, resolution: int = 224, num_classes: int | None = None,
               width: float = 1.0, ops: tuple[str, ...] | None = None,
               stem_stride: int | None = None, in_channels: int = 3) -> SearchSpace:
  """Builds a space from a table shaped like those of SPACE_TABLES (a new space is new data)."""
  stem_stride = table.get('stem_stride', 2) if stem_stride is None else stem_stride
  if stem_stride not in (1, 2):
    raise SpaceError(f'stem_stride must be 1 or 2, got {stem_stride!r}')
  if (not isinstance(resolution, int) or isinstance(resolution, bool)
      or not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION):
    raise SpaceError(f'resolution must be an integer from {MIN_RESOLUTION} to '
                     f'{MAX_RESOLUTION}, got {resolution!r}')
  if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels < 1:
    raise SpaceError(f'in_channels must be a positive integer, got {in_channels!r}')
  num_classes = table['num_classes'] if num_classes is None else num_classes
  if not isinstance(num_classes, int) or num_classes < 2:
    raise SpaceError(f'num_classes must be an integer >= 2, got {num_classes!r}')
  if not (isinstance(width, (int, float)) and 0 < width <= 4):
    raise SpaceError(f'width must be a number in (0, 4], got {width!r}')
  width = float(width)
  ch = lambda c: scale_channels(c, width)
  table_ops = tuple(table['ops'])
  if ops is not None:
    unknown = [o for o in ops if o not in table['ops']]
    if unknown or not [o for o in ops if o != 'skip']:
      raise SpaceError(f'ops must be a subset of the {name} ops with at least one besides skip '
                       f'({", ".join(table["ops"])}); got {", ".join(ops) or "none"}')
    table = {**table, 'ops': tuple(o for o in table['ops'] if o in ops)}

  ops = {op: (OpSpec('skip', 'skip') if op == 'skip' else _ir(op)) for op in table['ops']}
  ops['conv3'] = OpSpec('conv3', 'conv', kernel=3)
  ops['sep3'] = OpSpec('sep3', 'sep', kernel=3)
  ops['head'] = OpSpec('head', 'head', kernel=1)

  layers = []
  res = resolution
  stem = LayerSpec('stem', in_channels, ch(table['stem']), stem_stride, res, ('conv3',), False)
  layers.append(stem)
  channels, res = stem.out_channels, stem.out_resolution
  for lname, op, out, stride in table['fixed']:
    layer = LayerSpec(lname, channels, ch(out), stride, res, (op,), False)
    layers.append(layer)
    channels, res = layer.out_channels, layer.out_resolution
  first_stage = table.get('first_stage', 1)
  for s, (out, count, stride) in enumerate(table['stages'], start=first_stage):
    for j in range(count):
      layer_stride = stride if j == 0 else 1
      keeps = layer_stride == 1 and channels == ch(out)
      candidates = tuple(op for op in table['ops'] if keeps or op != 'skip')
      layer = LayerSpec(f'layer{s}_{j + 1}', channels, ch(out), layer_stride, res, candidates,
                        True)
      layers.append(layer)
      channels, res = layer.out_channels, layer.out_resolution
  layers.append(LayerSpec('head', channels, ch(table['head']), 1, res, ('head',), False))
  searchable = {l.name: l for l in layers if l.searchable}
  for lname, op in table.get('supernet_fixed', {}).items():
    if (lname not in searchable or op not in table_ops
        or (op == 'skip' and not searchable[lname].keeps_shape)):
      raise SpaceError(f'space {name}: supernet_fixed {lname}={op} must name a searchable '
                       f'layer and one of its candidate ops')
  # An op subset without the fixed op leaves that layer searchable among the ops it keeps.
  supernet_fixed = {l: op for l, op in table.get('supernet_fixed', {}).items()
                    if op in searchable[l].ops}
  return SearchSpace(name=name, resolution=resolution, num_classes=num_classes, width=width,
                     activation=table['activation'], se_ratio=0.25, ops=ops,
                     op_names=tuple(table['ops']), layers=tuple(layers),
                     supernet_fixed=supernet_fixed)
