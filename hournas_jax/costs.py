"""Parameters and FLOPs of every (layer, op) pair, as tables.

FLOPs are multiply-adds of convolutions and fully connected layers, the convention of FBNet,
MnasNet, EfficientNet and the HourNAS tables. Parameters are every trainable value of the Flax
network built by `blocks.py`: conv kernels, BatchNorm scales and biases, SE and classifier
biases. The cost of an architecture A is sum(A * table), Eqn 4's R_F(A); tests check the tables
against the built network's parameter count and against XLA's own cost analysis.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Mapping

import numpy as np

from hournas_jax import errors, op_kinds, spaces

# The rows of the stacked tables, in this order; latency only when a measured table is given.
RESOURCE_NAMES = ('params', 'FLOPs', 'latency')
TARGET_KEYS = ('params', 'flops', 'latency_ms')  # the config.targets field of each row
TOLERANCE = 0.05  # "within the targets": |R_i - T_i| <= 5% of T_i
# The exact search over a few layers' joint choices scores at most this many at once.
_CHOICE_CHUNK = 2 ** 20


class TargetError(errors.UserError, ValueError):
  """Targets or fixed layers that no architecture of the space can satisfy."""


def op_cost(layer: spaces.LayerSpec, op: spaces.OpSpec, space: spaces.SearchSpace
            ) -> tuple[int, int]:
  """(params, multiply-adds) of `op` placed in `layer`, for one image (`op_kinds.py`)."""
  return op_kinds.kind(op).cost(layer, op, space)


@dataclasses.dataclass(frozen=True)
class CostTables:
  """Per-layer, per-op costs of a space's searchable layers, plus the fixed layers' total.

  params/flops: float64 [L, O], columns in `space.op_names`; 0 where the op is not allowed.
  mask: bool [L, O], the allowed ops. fixed_params/fixed_flops: stem, fixed layers and head.
  latency / fixed_latency: milliseconds from a measured lookup table (`latency.py`), or None
  when the search has no latency target (`with_latency` adds them).
  """
  layer_names: tuple[str, ...]
  op_names: tuple[str, ...]
  params: np.ndarray
  flops: np.ndarray
  mask: np.ndarray
  fixed_params: int
  fixed_flops: int
  latency: np.ndarray | None = None
  fixed_latency: float = 0.0

  @property
  def has_latency(self) -> bool:
    return self.latency is not None

  @property
  def num_resources(self) -> int:
    return 2 if self.latency is None else 3

  @property
  def resource_names(self) -> tuple[str, ...]:
    """The name of each row of `stacked` (`RESOURCE_NAMES`, latency only when measured)."""
    return RESOURCE_NAMES[:self.num_resources]

  @property
  def target_keys(self) -> tuple[str, ...]:
    """The config.targets field of each row of `stacked` (`TARGET_KEYS`)."""
    return TARGET_KEYS[:self.num_resources]

  def stacked(self) -> np.ndarray:
    """[R, L, O]: params, FLOPs (and latency), the resource tables of Eqn 5 in that order."""
    return np.stack([self.params, self.flops] + ([] if self.latency is None
                                                 else [self.latency]))

  def fixed(self) -> np.ndarray:
    """[R]: the cost of the layers outside the searchable ones (stem, fixed layers, head)."""
    return np.array([self.fixed_params, self.fixed_flops] + (
        [] if self.latency is None else [self.fixed_latency]), np.float64)

  def resources(self, op_indices) -> np.ndarray:
    """[R]: every resource of the architecture given as one op index per searchable layer."""
    rows = np.arange(len(self.layer_names))
    return self.fixed() + self.stacked()[:, rows, np.asarray(op_indices)].sum(-1)

  def named_resources(self, op_indices) -> dict[str, float]:
    """{target key ('params', 'flops', 'latency_ms'): value} of `resources`."""
    return {k: float(v) for k, v in zip(self.target_keys, self.resources(op_indices))}

  def with_latency(self, latency, fixed_latency: float) -> 'CostTables':
    """These tables with a latency table [L, O] (ms) and the fixed layers' latency."""
    latency = np.asarray(latency, np.float64)
    if latency.shape != self.params.shape:
      raise TargetError(f'the latency table has shape {latency.shape}, the space '
                        f'{self.params.shape}')
    return dataclasses.replace(self, latency=latency, fixed_latency=float(fixed_latency))

  def cost(self, op_indices) -> tuple[int, int]:
    """Total (params, FLOPs) of the architecture given as one op index per searchable layer."""
    rows = np.arange(len(self.layer_names))
    idx = np.asarray(op_indices)
    return (int(self.fixed_params + self.params[rows, idx].sum()),
            int(self.fixed_flops + self.flops[rows, idx].sum()))


def cost_tables(space: spaces.SearchSpace) -> CostTables:
  layers = space.searchable_layers
  params = np.zeros((len(layers), len(space.op_names)))
  flops = np.zeros_like(params)
  for i, layer in enumerate(layers):
    for j, name in enumerate(space.op_names):
      if name in layer.ops:
        params[i, j], flops[i, j] = op_cost(layer, space.ops[name], space)
  fixed_params = fixed_flops = 0
  for layer in space.layers:
    if not layer.searchable:
      p, f = op_cost(layer, space.ops[layer.ops[0]], space)
      fixed_params += p
      fixed_flops += f
  return CostTables(space.searchable_names, space.op_names, params, flops, space.op_mask(),
                    fixed_params, fixed_flops)


def layer_costs(space: spaces.SearchSpace, op_names) -> list[dict]:
  """Per-layer rows (every layer, fixed ones included) of an architecture given by op names."""
  chosen = dict(zip(space.searchable_names, op_names))
  rows = []
  for layer in space.layers:
    op = chosen.get(layer.name, layer.ops[0])
    p, f = op_cost(layer, space.ops[op], space)
    rows.append(dict(layer=layer.name, op=op, in_channels=layer.in_channels,
                     out_channels=layer.out_channels, stride=layer.stride,
                     resolution=layer.in_resolution, params=p, flops=f,
                     searchable=layer.searchable))
  return rows


# --------------------------------------------------------------------------------------------
# Restricted tables, reachable ranges and target checks (numpy, outside jit).


def reachable_range(tables, mask, offset):
  """(lowest [R], highest [R]) cost over every architecture of the (restricted) space."""
  tables, mask = np.asarray(tables, np.float64), np.asarray(mask, bool)
  offset = np.asarray(offset, np.float64)
  if tables.shape[1] == 0:
    return offset.copy(), offset.copy()
  lowest = np.where(mask, tables, np.inf).min(axis=-1).sum(axis=-1) + offset
  highest = np.where(mask, tables, -np.inf).max(axis=-1).sum(axis=-1) + offset
  return lowest, highest


def millions(x: float, digits: int = 1) -> str:
  """A cost in millions with enough digits for small values (12.3M, 0.045M)."""
  return f'{x / 1e6:.{digits}f}M' if abs(x) >= 1e5 else f'{x / 1e6:.3f}M'


def show(resource: int, x: float, digits: int = 1) -> str:
  """A value of resource row `resource`: params and FLOPs in millions, latency in ms."""
  if resource == 2:
    return f'{x:.{digits + 2}f} ms'
  return millions(x, digits)


def check_targets(tables, mask, offset, targets, active, space_name: str = 'the space'):
  """Raises TargetError, one line, for a non-finite, non-positive or unreachable target."""
  low, high = reachable_range(tables, mask, offset)
  for i, name in enumerate(RESOURCE_NAMES[:len(low)]):
    if not active[i]:
      continue
    t = float(targets[i])
    if not math.isfinite(t) or t <= 0:
      raise TargetError(f'{name} target must be a positive number, got {t!r}')
    if not low[i] <= t <= high[i]:
      digits = 1  # enough digits that the target does not print as the bound it misses
      while digits < 4 and show(i, t, digits) in (show(i, low[i], digits),
                                                  show(i, high[i], digits)):
        digits += 1
      raise TargetError(f'{name} target {show(i, t, digits)} is outside what space '
                        f'{space_name} can reach: {show(i, low[i], digits)} to '
                        f'{show(i, high[i], digits)}')


def best_reachable_choice(log_probs, layer_costs, low, high, targets, active,
                          chunk: int = _CHOICE_CHUNK):
  """The joint choice of a few layers' ops with the highest total log-probability that keeps
  every active target within reach of the rest of the network; None when no choice does.

  log_probs: [V, O], -inf where an op is not allowed; layer_costs: [R, V, O]; low, high: [R],
  the range of everything else (fixed layers and the layers still to search); targets, active:
  [R]. A choice with summed cost c [R] keeps target i within reach when
  low_i + c_i <= T_i <= high_i + c_i. Feasibility depends on the summed costs alone, so every
  joint choice is scored exactly (vectorised numpy, `chunk` at a time): the paper's spaces have
  at most 6 vital layers of 13 ops, 13**6 ~ 4.8M choices. Ties go to the lowest op indices.
  Returns op indices [V] (a tuple of ints) or None.
  """
  log_probs = np.asarray(log_probs, np.float64)
  active = np.asarray(active, bool)
  layer_costs = np.asarray(layer_costs, np.float64)[active]
  targets = np.asarray(targets, np.float64)[active]
  need_low = targets - np.asarray(high, np.float64)[active]  # c >= T - high
  need_high = targets - np.asarray(low, np.float64)[active]  # c <= T - low
  allowed = [np.flatnonzero(np.isfinite(row)) for row in log_probs]
  # The trailing layers are enumerated as arrays, the leading ones in a Python loop.
  split, size = len(allowed), 1
  while split > 0 and size * len(allowed[split - 1]) <= chunk:
    split -= 1
    size *= len(allowed[split])
  inner_score = np.zeros(1)
  inner_cost = np.zeros((len(targets), 1))
  for l in range(split, len(allowed)):
    ops = allowed[l]
    inner_score = (inner_score[:, None] + log_probs[l, ops][None, :]).reshape(-1)
    inner_cost = (inner_cost[:, :, None] + layer_costs[:, l, ops][:, None, :]).reshape(
        len(targets), -1)
  inner_shape = [len(a) for a in allowed[split:]]
  best, best_score = None, -np.inf
  for outer in itertools.product(*allowed[:split]):
    score = sum(log_probs[l, o] for l, o in enumerate(outer)) + inner_score
    cost = sum((layer_costs[:, l, o] for l, o in enumerate(outer)),
               np.zeros(len(targets)))[:, None] + inner_cost
    ok = np.all((cost >= need_low[:, None]) & (cost <= need_high[:, None]), axis=0)
    if not ok.any():
      continue
    score = np.where(ok, score, -np.inf)
    k = int(np.argmax(score))
    if score[k] > best_score:
      inner = np.unravel_index(k, inner_shape) if inner_shape else ()
      best_score = score[k]
      best = tuple(int(o) for o in outer) + tuple(
          int(allowed[split + j][i]) for j, i in enumerate(inner))
  return best


def restrict_tables(cost_tables: CostTables, fixed: Mapping[int, int] | None = None):
  """Removes the layers of `fixed` (layer index -> op index) from the search.

  Their cost joins the stem and head's in the offset, so for a full architecture `arch`,
  cost_tables.cost(arch) == resource_cost(one_hot(arch[free]), tables, offset).
  Returns (free layer indices [Lf], tables [2, Lf, O], mask [Lf, O], offset [2]), numpy.
  """
  fixed = dict(fixed or {})
  full, mask = cost_tables.stacked(), np.asarray(cost_tables.mask, bool)
  num_layers, num_ops = mask.shape
  offset = cost_tables.fixed()
  for layer, op in fixed.items():
    if not (isinstance(layer, (int, np.integer)) and 0 <= layer < num_layers):
      raise TargetError(f'fixed layer index {layer!r} is not one of the {num_layers} '
                          f'searchable layers')
    if not (isinstance(op, (int, np.integer)) and 0 <= op < num_ops and mask[layer, op]):
      raise TargetError(f'op index {op!r} is not a candidate of searchable layer {layer} '
                          f'({cost_tables.layer_names[layer]})')
    offset += full[:, layer, op]
  free = np.array([l for l in range(num_layers) if l not in fixed], dtype=np.int32)
  return free, full[:, free], mask[free], offset


def space_maxima(tables, mask, offset):
  """M_i of Eqn 4-5: the largest cost the (restricted) space reaches, per resource."""
  return reachable_range(tables, mask, offset)[1]


def architecture_costs(indices, tables, offset):
  """Exact float64 costs [n, R] of op indices [n, L] (numpy; for evaluation)."""
  indices = np.asarray(indices)
  tables = np.asarray(tables, np.float64)
  rows = np.arange(tables.shape[1])
  return tables[:, rows, indices].sum(axis=-1).T + np.asarray(offset, np.float64)


def full_indices(free, fixed: Mapping[int, int], free_indices):
  """Op indices of the whole space [n, L] from those of the free layers [n, Lf]."""
  free_indices = np.asarray(free_indices)
  out = np.zeros(free_indices.shape[:-1] + (len(free) + len(fixed),), np.int32)
  out[..., free] = free_indices
  for layer, op in fixed.items():
    out[..., layer] = op
  return out
