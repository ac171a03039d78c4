"""Using a latency table: reading it, aligning it with a space's cost tables, predicting.

An architecture's prediction is the sum of its entries (each less the call overhead, counted
once, by default), times the table's correction: the median, over the whole networks measured
with the table (`calibration`), of measured / summed latency. Tables without those networks
(older ones, or `--calibration 0`) predict the plain sum.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Mapping

import numpy as np

from hournas_jax import arch as arch_lib
from hournas_jax import spaces
from hournas_jax.latency.timing import LatencyError, input_shape, space_info

TABLE_FORMAT = 'hournas_jax.latency/1'


def read_json(path: str) -> dict:
  try:
    with open(path) as f:
      data = json.load(f)
  except OSError as e:
    raise LatencyError(f'cannot read latency table {path!r}: {e.strerror}') from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise LatencyError(f'latency table {path!r} is not valid JSON: {e}') from None
  if not isinstance(data, dict) or data.get('format') != TABLE_FORMAT:
    raise LatencyError(f'{path!r} is not a latency table (no "format": "{TABLE_FORMAT}")')
  return data


def diff(kind: str, old: Mapping, new: Mapping) -> list[str]:
  return [f'{kind} {k}: {old.get(k)!r} there, {new.get(k)!r} now'
          for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def command(space: spaces.SearchSpace, runtime: str, channels: int = 3) -> str:
  """The command line that measures a table for `space` (`hournas_jax.tools.latency`)."""
  return (f'python -m hournas_jax.tools.latency --space {space.name} --image-size '
          f'{space.resolution} --num-classes {space.num_classes} --width {space.width:g} '
          f'--stem-stride {space.stem_stride} --channels {channels} --runtime {runtime}')


def _entry_fn(data: Mapping, overhead: bool):
  """Entry (layer, op) -> ms as the prediction counts it (less the overhead when `overhead`;
  skip's 0 stays 0)."""
  over = float(data['overhead_ms']['median'])
  lat = data['latency_ms']

  def entry(name, op):
    ms = float(lat[name][op])
    return max(0.0, ms - over) if overhead and ms > 0 else ms
  return entry


def sum_ms(data: Mapping, layer_ops: Mapping[str, str], overhead: bool = True) -> float:
  """The uncorrected prediction of a network given as {layer: op} over all its layers (stem
  and head included): the sum of their entries, each less the overhead and the overhead once
  when `overhead`."""
  entry = _entry_fn(data, overhead)
  total = sum(entry(name, op) for name, op in layer_ops.items())
  return total + (float(data['overhead_ms']['median']) if overhead else 0.0)


def correction(data: Mapping, overhead: bool = True) -> tuple[float, list[float]]:
  """(scale, per-network ratios): measured / summed latency of the table's calibration
  networks, and their median, the factor every prediction is multiplied by (1.0 without such
  networks). Raises LatencyError when a network's entries are missing."""
  networks = (data.get('calibration') or {}).get('networks') or []
  ratios = []
  for net in networks:
    try:
      predicted = sum_ms(data, net['layers'], overhead)
    except KeyError as e:
      raise LatencyError(f'latency table: a calibration network lacks entry {e}') from None
    if predicted > 0:
      ratios.append(float(net['median']) / predicted)
  return (float(np.median(ratios)) if ratios else 1.0), ratios


@dataclasses.dataclass(frozen=True)
class LatencyTable:
  """A table aligned with `costs.CostTables`: latency [L, O] over the searchable layers, ops
  in `space.op_names`, 0 where the op is not allowed; `fixed_ms` the stem, fixed layers and
  head (and the overhead, counted once, when `overhead`); predict = fixed_ms + sum of rows.
  Both already carry the correction `scale` (1.0 for a table without calibration networks).
  `busy`: the table says its figures were taken on a busy machine; `wide`: entries whose
  spread stayed above the limit."""
  layer_names: tuple[str, ...]
  op_names: tuple[str, ...]
  latency: np.ndarray
  mask: np.ndarray
  fixed_ms: float
  overhead_ms: float
  overhead: bool
  runtime: str
  scale: float = 1.0
  calibration_networks: int = 0
  busy: bool = False
  wide: tuple[str, ...] = ()

  def cost(self, op_indices) -> float:
    rows = np.arange(len(self.layer_names))
    return float(self.fixed_ms + self.latency[rows, np.asarray(op_indices)].sum())

  def bounds(self) -> tuple[float, float]:
    """(fastest, slowest) predicted latency over the whole space, in ms."""
    lo = np.where(self.mask, self.latency, np.inf).min(axis=1).sum()
    hi = np.where(self.mask, self.latency, -np.inf).max(axis=1).sum()
    return float(self.fixed_ms + lo), float(self.fixed_ms + hi)


def latency_tables(table: str | Mapping, space: spaces.SearchSpace, image_size: int | None = None,
                   num_classes: int | None = None, *, channels: int = 3,
                   overhead: bool = True, correct: bool = True) -> LatencyTable:
  """The table (a path or the loaded JSON) aligned with `space`'s cost tables.

  Args:
    overhead: count the per-call overhead once (each entry less `overhead_ms`, clipped at 0,
      and `overhead_ms` once in fixed_ms; the default) or not (FBNet's plain sum of entries).
    correct: multiply by the table's correction (see `correction`; the default), or not.
  Returns:
    A LatencyTable. Raises LatencyError if the table was measured for another space (name,
    width, image size, classes, stem stride, input channels: any layer's input shape) or
    misses an entry the space needs.
  """
  where = table if isinstance(table, str) else 'latency table'
  data = read_json(table) if isinstance(table, str) else table
  image_size = space.resolution if image_size is None else image_size
  num_classes = space.num_classes if num_classes is None else num_classes
  if image_size != space.resolution or num_classes != space.num_classes:
    raise LatencyError(f'image size {image_size} / {num_classes} classes asked for, but the '
                       f'space is built for {space.resolution} / {space.num_classes}')
  want = space_info(space, channels)
  diffs = diff('', data.get('space', {}), want)
  if diffs:
    shown = '; '.join(d.strip() for d in diffs)
    raise LatencyError(f'{where} was measured for another space ({shown}); measure one with: '
                       f'{command(space, data.get("runtime", "RUNTIME"), channels)}')
  lat = data.get('latency_ms', {})
  shapes = data.get('layers', {})
  missing = []
  for layer in space.layers:
    shape = shapes.get(layer.name, {}).get('input_shape')
    if shape is not None and tuple(shape) != input_shape(space, layer, channels):
      raise LatencyError(f'{where}: layer {layer.name} was measured at input {shape}, the '
                         f'space has {list(input_shape(space, layer, channels))}')
    missing += [f'{layer.name}/{op}' for op in layer.ops if op not in lat.get(layer.name, {})]
  if missing or data.get('overhead_ms') is None:
    shown = ', '.join(missing[:5]) + (f' and {len(missing) - 5} more' if len(missing) > 5 else '')
    raise LatencyError(f'{where} lacks {shown or "the overhead"}; fill it in with: '
                       f'{command(space, data.get("runtime", "RUNTIME"), channels)} '
                       f'--out {where}')
  over = float(data['overhead_ms']['median'])
  entry = _entry_fn(data, overhead)
  scale, ratios = correction(data, overhead) if correct else (1.0, [])
  layers = space.searchable_layers
  latency = np.zeros((len(layers), len(space.op_names)))
  for i, layer in enumerate(layers):
    for j, op in enumerate(space.op_names):
      if op in layer.ops:
        latency[i, j] = scale * entry(layer.name, op)
  fixed = sum(entry(l.name, l.ops[0]) for l in space.layers if not l.searchable)
  quality = data.get('quality') or {}
  return LatencyTable(space.searchable_names, space.op_names, latency, space.op_mask(),
                      scale * (fixed + (over if overhead else 0.0)), over, overhead,
                      data.get('runtime'), scale, len(ratios), bool(quality.get('busy')),
                      tuple(sorted(quality.get('wide') or ())))


def load_table(path: str | Mapping, space: spaces.SearchSpace, image_size: int | None = None,
               num_classes: int | None = None, *, channels: int = 3,
               overhead: bool = True, correct: bool = True) -> np.ndarray:
  """Latency [num searchable layers, num ops] in ms, laid out as `costs.cost_tables(space)`'s
  params/flops (0 where an op is not allowed); the fixed part is
  `latency_tables(...).fixed_ms`."""
  return latency_tables(path, space, image_size, num_classes, channels=channels,
                        overhead=overhead, correct=correct).latency


def predict_ms(table: LatencyTable, arch, space: spaces.SearchSpace | None = None) -> float:
  """Predicted latency of `arch` (an Architecture, op names or op indices, one per searchable
  layer): the fixed layers plus its chosen entries, corrected (see `latency_tables`)."""
  del space  # the table is aligned with its space already
  if isinstance(arch, arch_lib.Architecture):
    ops = arch.ops
  else:
    ops = list(arch)
  if len(ops) != len(table.layer_names):
    raise LatencyError(f'the table has {len(table.layer_names)} searchable layers, the '
                       f'architecture {len(ops)} ops')
  idx = [o if isinstance(o, (int, np.integer)) else table.op_names.index(o) for o in ops]
  rows = np.arange(len(idx))
  if not table.mask[rows, idx].all():
    bad = [f'{table.layer_names[r]}/{table.op_names[i]}' for r, i in zip(rows, idx)
           if not table.mask[r, i]]
    raise LatencyError(f'ops not allowed at their layers: {", ".join(bad)}')
  return table.cost(idx)


def random_archs(space: spaces.SearchSpace, count: int, seed: int
                 ) -> list[tuple[str, ...]]:
  """`count` architectures, each searchable layer's op uniform over its candidates."""
  rng = np.random.default_rng(seed)
  return [tuple(l.ops[rng.integers(len(l.ops))] for l in space.searchable_layers)
          for _ in range(count)]

