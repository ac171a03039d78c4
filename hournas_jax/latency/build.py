"""Building a latency table: every missing entry measured, then measured again in later passes
(`Protocol.passes`; each entry keeps its lowest median, `passes` counts them per entry, so a
build cut short resumes in the pass it was in), then the calibration networks.

Each build records a session in `quality`: the load average and the CPU share of the timed
runs, the spread of the measurements, how many were timed again; a session whose figures
`timing.load_verdict` distrusts sets `quality.busy`, and measurements whose spread stayed
above the limit are listed in `quality.wide`.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from typing import Sequence

import numpy as np

from hournas_jax import spaces
from hournas_jax.latency import predict, timing
from hournas_jax.latency.timing import LatencyError, Protocol, Runtime, input_shape

# The calibration networks' draw; benchmarks/latency_table.py validates on seed 0's, others.
CALIBRATION_SEED = 7919


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')


def _layers_info(space: spaces.SearchSpace, channels: int) -> dict:
  return {l.name: {'input_shape': list(input_shape(space, l, channels)),
                   'out_channels': l.out_channels, 'stride': l.stride, 'ops': list(l.ops)}
          for l in space.layers}


def _entry_key(space, layer, op, channels):
  """Blocks that are the same module on the same input shape measure once (a stage's layers
  after its first are all alike)."""
  from hournas_jax import blocks
  if space.ops[op].kind == 'skip':
    return None
  return (blocks.make_block(space, layer, op), input_shape(space, layer, channels))


def entries_to_measure(space: spaces.SearchSpace, ops: Sequence[str] | None = None):
  """(layer, op) pairs of every layer, stem and head included; `ops` limits the searchable
  layers to those candidates."""
  out = []
  for layer in space.layers:
    for op in layer.ops:
      if layer.searchable and ops is not None and op not in ops:
        continue
      out.append((layer, op))
  return out


def calibration_networks(space: spaces.SearchSpace, count: int,
                         ops: Sequence[str] | None = None) -> list[dict[str, str]]:
  """`count` random networks as {layer: op} over all the layers (fixed ones included), each
  searchable layer's op drawn among its candidates in `ops`; none if a layer has none."""
  allowed = [[o for o in l.ops if ops is None or o in ops] for l in space.searchable_layers]
  if not all(allowed):
    return []
  rng = np.random.default_rng(CALIBRATION_SEED)
  out = []
  for _ in range(count):
    chosen = iter([a[rng.integers(len(a))] for a in allowed])
    out.append({l.name: next(chosen) if l.searchable else l.ops[0] for l in space.layers})
  return out


def _stats(table: dict, layer: str, op: str) -> dict:
  return {s: table[column][layer][op] for s, column in
          (('median', 'latency_ms'), ('p10', 'p10_ms'), ('p90', 'p90_ms'))}


def _set(table: dict, layer: str, op: str, stats: dict) -> None:
  for s, column in (('median', 'latency_ms'), ('p10', 'p10_ms'), ('p90', 'p90_ms')):
    table[column].setdefault(layer, {})[op] = stats[s]


def _passes(passes: dict, layer, op: str) -> int:
  """Passes measured for an entry; tables written before passes were counted hold one."""
  return passes.get(layer.name, {}).get(op, 1)


def _write(path: str, table: dict) -> None:
  from hournas_jax import checkpoint
  table['updated'] = _now()
  checkpoint.atomic_write_text(path, json.dumps(table, indent=1) + '\n')


class _Session:
  """The load and spread figures of one build, kept in table['quality']['sessions']."""

  def __init__(self, runtime: Runtime, quality: dict):
    self.runtime = runtime
    self.machine = getattr(runtime, 'machine', None) or timing.Machine()
    self.quality = quality
    self.loads = [self.machine.load()]
    self.spreads, self.timings = [], []
    self.record = None

  def measure(self, label: str, fn) -> dict:
    """Runs fn() -> samples; returns their summary with 'spread', and records them."""
    self.runtime.last_timing = None
    samples = fn()
    stats = timing.summarize(samples)
    stats['spread'] = timing.spread(samples)
    last = self.runtime.last_timing
    if last:
      self.timings.append(last)
      self.loads.append(last['load'])
    self.spreads.append(stats['spread'])
    self.mark_wide(label, stats['spread'])
    self.update()
    return stats

  def mark_wide(self, label: str, spread: float) -> None:
    """Lists `label` in quality.wide when the spread of its kept figures exceeds the limit."""
    wide = self.quality.setdefault('wide', {})
    if spread > self.quality['max_spread']:
      wide[label] = round(spread, 4)
    else:
      wide.pop(label, None)

  def update(self) -> None:
    loads = [x for x in self.loads if x == x]  # NaN: no load average on this system
    load = float(np.mean(loads)) if loads else None
    shares = [t['cpu_share'] for t in self.timings if t['cpu_share'] == t['cpu_share']]
    share = float(np.median(shares)) if shares else None
    busy = timing.load_verdict(load, self.machine.cores, share, self.runtime.single_thread)
    record = {
        'started': self.record['started'] if self.record else _now(),
        'measurements': len(self.spreads),
        'load_average': ({'mean': round(load, 2), 'max': round(max(loads), 2)}
                         if loads else None),
        'cores': self.machine.cores,
        'cpu_share': ({'median': round(share, 3), 'min': round(min(shares), 3)}
                      if shares else None),
        'spread': {'median': round(float(np.median(self.spreads)), 4),
                   'max': round(float(max(self.spreads)), 4)},
        'retried': sum(t['attempts'] > 1 for t in self.timings),
        'runs_per_sample': ([min(t['inner'] for t in self.timings),
                             max(t['inner'] for t in self.timings)] if self.timings else None),
        'busy': busy}
    sessions = self.quality.setdefault('sessions', [])
    if self.record is None:
      sessions.append(record)
    else:
      sessions[sessions.index(self.record)] = record
    self.record = record
    self.quality['busy'] = any(s.get('busy') for s in sessions)


def build_table(space: spaces.SearchSpace, protocol: Protocol, out: str, *, channels: int = 3,
                ops: Sequence[str] | None = None, overwrite: bool = False,
                runtime: Runtime | None = None, log=None) -> dict:
  """Measures every missing entry of `space`, and the missing calibration networks, into the
  table at `out` (created or resumed).

  Returns the table. Raises LatencyError when `out` holds a table of another protocol, device
  or space (unless overwrite)."""
  runtime = runtime or Runtime(protocol)
  log = log or sys.stderr
  header = {'format': predict.TABLE_FORMAT, 'space': timing.space_info(space, channels),
            'runtime': protocol.runtime, 'protocol': protocol.to_dict(),
            'device': timing.device_info(protocol.runtime)}
  table = None
  if os.path.exists(out) and not overwrite:
    table = predict.read_json(out)
    diffs = [d for part in ('space', 'protocol', 'device')
             for d in predict.diff(part, table.get(part, {}), header[part])]
    if diffs:
      raise LatencyError(f'{out} holds a table measured another way ({"; ".join(diffs[:3])}'
                         f'{"; ..." if len(diffs) > 3 else ""}); use --overwrite to measure it '
                         'again, or another --out')
  if table is None:
    table = {**header, 'created': _now(), 'updated': None, 'overhead_ms': None,
             'layers': {}, 'latency_ms': {}, 'p10_ms': {}, 'p90_ms': {}}
  table['layers'].update(_layers_info(space, channels))
  calibration = table.get('calibration') or {'seed': CALIBRATION_SEED, 'networks': []}
  table['calibration'] = calibration
  quality = table.setdefault('quality', {})
  quality['max_spread'] = getattr(runtime, 'max_spread', timing.DEFAULT_MAX_SPREAD)
  quality['retries'] = getattr(runtime, 'retries', timing.DEFAULT_RETRIES)
  entries = [(layer, op, _entry_key(space, layer, op, channels))
             for layer, op in entries_to_measure(space, ops)]
  passes = table.setdefault('passes', {})  # layer -> op -> passes measured (absent: 1)
  done = {}  # entry key -> stats, from entries already in the table
  todo = []
  for layer, op, key in entries:
    if op in table['latency_ms'].get(layer.name, {}):
      if key is not None:
        done.setdefault(key, _stats(table, layer.name, op))
    else:
      todo.append((layer, op, key))
  # Entries alike (one key) share their measurements: the first of each key stands for all.
  alike = {}
  for layer, op, key in entries:
    if key is not None:
      alike.setdefault(key, []).append((layer, op))
  networks = calibration_networks(space, protocol.calibration, ops)
  networks = networks[len(calibration['networks']):]
  distinct = {k for _, _, k in todo if k is not None and k not in done}
  again = sum(max(0, protocol.passes - _passes(passes, *members[0]))
              for key, members in alike.items() if key not in distinct)
  count = (len(distinct) * protocol.passes + again + (table['overhead_ms'] is None)
           + len(networks))
  print(f'latency table {out}: {len(todo)} entries to fill, {len(networks)} calibration '
        f'networks ({count} measurements), {protocol.runtime}, threads {protocol.threads}',
        file=log, flush=True)
  session = _Session(runtime, quality)
  start, measured = time.perf_counter(), 0

  def progress(what, stats):
    nonlocal measured
    measured += 1
    elapsed = time.perf_counter() - start
    eta = elapsed / measured * (count - measured)
    last = runtime.last_timing or {}
    extra = (f', {last["inner"]} runs a sample, load {last["load"]:.1f}, cpu '
             f'{last["cpu_share"]:.0%}' + (f', {last["attempts"]} attempts'
                                           if last['attempts'] > 1 else '')) if last else ''
    wide = ' WIDE' if stats['spread'] > quality['max_spread'] else ''
    print(f'[{measured}/{count}] {what}: {stats["median"]:.4f} ms (p10 {stats["p10"]:.4f}, '
          f'p90 {stats["p90"]:.4f}, spread {stats["spread"]:.1%}{wide}{extra}); '
          f'{elapsed:.0f} s, ETA {eta:.0f} s', file=log, flush=True)

  if table['overhead_ms'] is None:
    stats = session.measure('overhead', lambda: runtime.overhead_samples(timing.OVERHEAD_SHAPE))
    table['overhead_ms'] = {s: stats[s] for s in ('median', 'p10', 'p90')}
    table['overhead_ms']['input_shape'] = list(timing.OVERHEAD_SHAPE)
    _write(out, table)
    progress(f'overhead {timing.OVERHEAD_SHAPE}', stats)
  for layer, op, key in todo:
    fresh = key is not None and key not in done
    if key is None:
      stats = {'median': 0.0, 'p10': 0.0, 'p90': 0.0}
    elif fresh:
      stats = done[key] = session.measure(
          f'{layer.name}/{op}', lambda l=layer, o=op: runtime.block_samples(space, l, o, channels))
    else:
      stats = done[key]
    _set(table, layer.name, op, stats)
    if key is not None:
      passes.setdefault(layer.name, {})[op] = 1 if fresh else _passes(passes, *alike[key][0])
    if fresh:
      _write(out, table)
      progress(f'{layer.name} {op} {input_shape(space, layer, channels)}', stats)
  # Later passes, after the whole first one: each distinct entry again, its lowest median kept.
  for number in range(2, protocol.passes + 1):
    for members in alike.values():
      layer, op = members[0]
      if _passes(passes, layer, op) >= number:
        continue
      stats = session.measure(
          f'{layer.name}/{op}', lambda l=layer, o=op: runtime.block_samples(space, l, o, channels))
      kept = min(stats, _stats(table, layer.name, op), key=lambda s: s['median'])
      for l, o in members:
        _set(table, l.name, o, kept)
        passes.setdefault(l.name, {})[o] = number
      session.mark_wide(f'{layer.name}/{op}', (kept['p90'] - kept['p10']) / kept['median']
                        if kept['median'] > 0 else 0.0)
      _write(out, table)
      progress(f'{layer.name} {op} pass {number} (kept {kept["median"]:.4f} ms)', stats)
  for layer_ops in networks:
    i = len(calibration['networks'])
    searchable = [layer_ops[n] for n in space.searchable_names]
    stats = session.measure(f'network {i}',
                            lambda s=searchable: runtime.network_samples(space, s, channels))
    calibration['networks'].append({'layers': layer_ops, 'median': stats['median'],
                                    'p10': stats['p10'], 'p90': stats['p90']})
    _write(out, table)
    progress(f'calibration network {i}', stats)
  if calibration['networks']:
    calibration['scale'] = {mode: round(predict.correction(table, mode == 'net')[0], 5)
                            for mode in ('net', 'plain')}
  _write(out, table)
  return table


def quality_lines(table: dict) -> list[str]:
  """The table's load and spread figures in a line, and a `warning:` line for each reason to
  distrust them (a busy machine, measurements of too wide a spread)."""
  quality = table.get('quality') or {}
  sessions = quality.get('sessions') or []
  lines = []
  for s in sessions[-1:]:
    load, share = s.get('load_average'), s.get('cpu_share')
    lines.append(
        f'measured under load average {load["mean"]:.1f} (max {load["max"]:.1f}) on '
        f'{s["cores"]} cores' if load else f'no load average ({s["cores"]} cores)')
    lines[-1] += (f'; the timed runs got {share["median"]:.0%} of a core (median)'
                  if share else '')
    lines[-1] += (f'; spread (p90 - p10) / median {s["spread"]["median"]:.1%} median, '
                  f'{s["spread"]["max"]:.1%} max; {s["retried"]} of {s["measurements"]} '
                  'timed again')
  for s in sessions:
    if s.get('busy'):
      lines.append(f'warning: figures taken on a busy machine ({s["busy"]}, session of '
                   f'{s["started"]}): they may be off by more than usual; measure again on '
                   'a quiet machine (--overwrite)')
  wide = quality.get('wide') or {}
  if wide:
    shown = ', '.join(f'{k} {v:.0%}' for k, v in list(wide.items())[:5])
    lines.append(f'warning: {len(wide)} measurements stayed wider than spread '
                 f'{quality.get("max_spread", 0):.0%} after {quality.get("retries")} '
                 f'retries ({shown}{", ..." if len(wide) > 5 else ""}): less reliable')
  calibration = table.get('calibration') or {}
  if calibration.get('scale'):
    n = len(calibration.get('networks', ()))
    lines.append(f'correction from {n} whole networks: predictions x '
                 f'{calibration["scale"]["net"]:.3f} (measured / sum of blocks)')
  return lines
