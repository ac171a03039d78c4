"""Latency lookup tables: the measured latency of every (layer, op) candidate of a space.

    python -m hournas_jax.tools.latency --space fbnet --image-size 224 --num-classes 1000 \\
        --runtime tflite --threads 1 --out table.json [--width 1.0] [--ops k3e1,k5e6,skip]

As FBNet's latency table: each candidate block runs alone, at batch 1, on an input of its
layer's real shape, on the machine the tool runs on and in one runtime; an architecture's
latency is predicted as the sum of its chosen entries (`predict_ms`). Runtimes:
- `xla_cpu`: jax.jit of the block's inference apply (train=False) on the CPU device, timed
  with block_until_ready; `--threads N` pins the process to N cores (sched_setaffinity), since
  XLA:CPU has no thread-count setting of its own.
- `xla_gpu` (or `xla_tpu`): the same code on the default accelerator device.
- `tflite`: the block converted by `hournas_jax.export.to_tflite` (BatchNorm folded, depthwise
  convs as DEPTHWISE_CONV_2D) and run by `export.tflite_interpreter`, the interpreter of
  `export.tflite_latency_ms` (tf.lite.Interpreter or ai_edge_litert, num_threads=N, its
  default XNNPACK delegate); the input is set once, the timer covers `invoke()`.

Protocol (stored in the table, checked on resume): `warmup` untimed runs, then `repeats`
timed runs, each timed alone with time.perf_counter (or, --timer process_cpu, the process's
CPU time, for a machine shared with other work); the entry is their median, with p10 and
p90 kept beside it. float32 (or --precision), batch 1, inputs N(0, 1), variables drawn by
`blocks.initial_value` (latency does not depend on their values). `skip` is 0.0 and is not
measured: the identity is no op in the network's graph (XLA and the TFLite converter drop it).
The stem, MnasNet's fixed SepConv and the head are measured like any candidate.

Overhead: every measured entry includes the cost of one call of the runtime (dispatch, invoke;
on a CPU from under 1 to ~10 microseconds) that the network pays once, not once a layer. The
table also stores `overhead_ms`, the latency of a one-op graph (one input value times a
constant): the call and nothing else. `latency_tables(..., overhead=True)` counts it once:
the sum over the layers of (entry - overhead), plus the overhead; overhead=False is FBNet's
plain sum of entries. Counting it once (the default) predicted whole networks better in 3 of
the 4 settings of benchmarks/latency_table.py (XLA:CPU by 15-20 points at 64 px), and as well
where networks are large.

The table is JSON (see `TABLE_FORMAT`), written atomically after every measurement; a rerun
with the same --out skips the entries already there and refuses, in one line, a table
measured under another protocol, on another device or for another space, unless --overwrite.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import sys
import time
from typing import Callable, Mapping, Sequence

import numpy as np

from hournas_jax import arch as arch_lib
from hournas_jax import errors, spaces

TABLE_FORMAT = 'hournas_jax.latency/1'
RUNTIMES = ('xla_cpu', 'xla_gpu', 'xla_tpu', 'tflite')
PRECISIONS = ('float32', 'float16')
DEFAULT_WARMUP = 10
DEFAULT_REPEATS = 50
# The overhead graph's input: one value, so the graph costs the call and nothing else.
OVERHEAD_SHAPE = (1, 1, 1, 1)
SKIP_RULE = ('0.0, not measured: the identity is no op in the network graph (XLA and the TFLite '
             'converter drop it)')


# How a run is timed: wall-clock time (the latency a user sees, on an idle machine), or the CPU
# time of the whole process (immune to waiting while other processes run, so usable on a
# shared machine; it equals the latency only where the runtime computes on this process's
# cores without spinning idle threads: TFLite at 1 thread, or XLA:CPU pinned to one core).
TIMERS = {
    'wall': (time.perf_counter, 'time.perf_counter around each run'),
    'process_cpu': (time.process_time, 'time.process_time (CPU time of the process, all its '
                    'threads) around each run'),
}


class LatencyError(errors.UserError, ValueError):
  """A latency table that cannot be used: unreadable, for another space, protocol or device."""


# --------------------------------------------------------------------------------------------
# Protocol, device and space descriptions (what the table records and a resume compares).


@dataclasses.dataclass(frozen=True)
class Protocol:
  runtime: str
  threads: int | None  # tflite: interpreter threads; xla_cpu: cores pinned; None: accelerator
  warmup: int = DEFAULT_WARMUP
  repeats: int = DEFAULT_REPEATS
  precision: str = 'float32'
  timer: str = 'wall'  # a key of TIMERS

  def to_dict(self) -> dict:
    if self.runtime == 'tflite':
      runs = ('export.to_tflite (BatchNorm folded), the interpreter of export.tflite_latency_ms '
              '(num_threads=threads, default delegate); input set once, the timer covers '
              'invoke() alone')
      depthwise = 'conv'
    else:
      runs = ('jax.jit(block.apply(train=False)) on the runtime\'s device, variables and input '
              'already there; the timer covers the call and block_until_ready')
      depthwise = 'auto'
    return {
        'runtime': self.runtime, 'threads': self.threads, 'warmup': self.warmup,
        'repeats': self.repeats, 'statistic': 'median', 'spread': ['p10', 'p90'], 'batch': 1,
        'dtype': (self.precision if self.precision == 'float32' else
                  f'{self.precision} (export.to_tflite: float16 weights, float32 compute)'),
        'input': 'N(0, 1), NHWC, the layer\'s input shape',
        'timer': f'{self.timer}: {TIMERS[self.timer][1]}', 'runs': runs,
        'depthwise_impl': depthwise, 'skip': SKIP_RULE,
        'overhead': f'one-op graph (input times a constant) on a {list(OVERHEAD_SHAPE)} input'}


def _cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.lower().startswith(('model name', 'hardware', 'cpu model')):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def device_info(runtime: str) -> dict:
  """What identifies the machine and software a table was measured with (no date)."""
  import jax
  info = {'machine': platform.machine(), 'system': platform.system(), 'cpu_model': _cpu_model(),
          'cpu_cores': os.cpu_count(), 'jax': jax.__version__}
  try:
    import jaxlib
    info['jaxlib'] = jaxlib.__version__
  except (ImportError, AttributeError):
    pass
  if runtime == 'tflite':
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # as export does
    import tensorflow as tf
    from hournas_jax import export
    info['tensorflow'] = tf.__version__
    info['interpreter'] = export.tflite_runtime()
  else:
    device = _xla_device(runtime)
    info['platform'] = device.platform
    info['device_kind'] = device.device_kind
  return info


def space_info(space: spaces.SearchSpace, channels: int = 3) -> dict:
  return {'name': space.name, 'width': space.width, 'image_size': space.resolution,
          'num_classes': space.num_classes, 'stem_stride': space.stem_stride,
          'channels': channels}


def input_shape(space: spaces.SearchSpace, layer: spaces.LayerSpec, channels: int = 3
                ) -> tuple[int, int, int, int]:
  """The batch-1 NHWC input of `layer` (the stem takes the image's `channels`)."""
  cin = channels if layer is space.layers[0] else layer.in_channels
  return (1, layer.in_resolution, layer.in_resolution, cin)


def _layers_info(space: spaces.SearchSpace, channels: int) -> dict:
  return {l.name: {'input_shape': list(input_shape(space, l, channels)),
                   'out_channels': l.out_channels, 'stride': l.stride, 'ops': list(l.ops)}
          for l in space.layers}


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')


# --------------------------------------------------------------------------------------------
# Timing.


def time_runs(run: Callable[[], object], warmup: int, repeats: int,
              timer: Callable[[], float] = time.perf_counter) -> np.ndarray:
  """Milliseconds of `repeats` runs of `run` (which must wait for its result), after `warmup`
  untimed ones."""
  for _ in range(warmup):
    run()
  out = np.empty(repeats)
  for i in range(repeats):
    t = timer()
    run()
    out[i] = (timer() - t) * 1e3
  return out


def summarize(samples_ms) -> dict:
  s = np.asarray(samples_ms, np.float64)
  p10, p50, p90 = np.percentile(s, [10, 50, 90])
  return {'median': float(p50), 'p10': float(p10), 'p90': float(p90)}


def _xla_device(runtime: str):
  import jax
  platform_name = runtime.split('_', 1)[1]
  if platform_name == 'cpu':
    return jax.devices('cpu')[0]
  device = jax.devices()[0]
  if device.platform != platform_name:
    raise LatencyError(f'runtime {runtime} needs a {platform_name} device; the default device '
                       f'is {device.platform} (use --runtime xla_{device.platform})')
  return device


def block_variables(module, shape, seed: int = 0) -> dict:
  """Inference variables of `module` for an input of `shape`, without compiling its init."""
  import jax
  import jax.numpy as jnp
  from hournas_jax import blocks
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros(shape, jnp.float32),
                                              train=False))
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: blocks.initial_value(seed, jax.tree_util.keystr(path), leaf.shape,
                                              leaf.dtype), shapes)


def _inference_fn(module):
  return lambda variables, x: module.apply(variables, x, train=False)


class Runtime:
  """Times inference functions `apply(variables, x)` in one runtime, under a protocol."""

  def __init__(self, protocol: Protocol, timer: Callable[[], float] | None = None):
    if protocol.timer not in TIMERS:
      raise LatencyError(f'unknown timer {protocol.timer!r}; one of {", ".join(TIMERS)}')
    self.protocol = protocol
    self.timer = timer or TIMERS[protocol.timer][0]
    self.tflite = protocol.runtime == 'tflite'
    if not self.tflite:
      self.device = _xla_device(protocol.runtime)

  def prepare(self, apply_fn, variables, shape, seed: int = 0) -> Callable[[], object]:
    """One run of apply_fn(variables, x), x ~ N(0, 1) of `shape`, compiled (or converted) and
    ready: a function that runs it and waits for the result."""
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    if self.tflite:
      model = tflite_model(apply_fn, variables, shape, self.protocol.precision)
      return tflite_runner(model, x, self.protocol.threads)
    import jax
    fn = jax.jit(apply_fn)
    variables = jax.device_put(variables, self.device)
    x = jax.device_put(x, self.device)
    run = lambda: jax.block_until_ready(fn(variables, x))
    run()  # compiles
    return run

  def time(self, run: Callable[[], object]) -> np.ndarray:
    """Milliseconds of the protocol's `repeats` runs of `run`, after its `warmup` runs."""
    return time_runs(run, self.protocol.warmup, self.protocol.repeats, self.timer)

  def samples(self, apply_fn, variables, shape, seed: int = 0) -> np.ndarray:
    """Milliseconds of `repeats` runs of apply_fn(variables, x), x ~ N(0, 1) of `shape`."""
    return self.time(self.prepare(apply_fn, variables, shape, seed))

  def block_samples(self, space, layer, op, channels: int = 3) -> np.ndarray:
    from hournas_jax import blocks
    module = blocks.make_block(space, layer, op)
    shape = input_shape(space, layer, channels)
    return self.samples(_inference_fn(module), block_variables(module, shape), shape)

  def overhead_samples(self, shape) -> np.ndarray:
    """A one-op graph at `shape`: the input times a constant (a variable, so not folded)."""
    return self.samples(lambda v, x: x * v['scale'], {'scale': np.float32(1.5)}, shape)


def tflite_model(apply_fn, variables, shape, precision: str = 'float32') -> bytes:
  """The TFLite flatbuffer of apply_fn(variables, x) for x of `shape`: `export.to_tflite`
  (BatchNorm folded, depthwise convs as DEPTHWISE_CONV_2D, builtin ops only)."""
  from hournas_jax import export
  return export.to_tflite(apply_fn, variables, tuple(shape), precision=precision)


def tflite_runner(model: bytes, x: np.ndarray, threads: int) -> Callable[[], object]:
  """invoke() of a TFLite model, its input set once: how `export.tflite_latency_ms` times a
  model, with the same interpreter (`export.tflite_interpreter`; that function gives the
  median alone; the table keeps p10 and p90 too, so it times the runs itself)."""
  from hournas_jax import export
  interpreter = export.tflite_interpreter(model, threads)
  detail = interpreter.get_input_details()[0]
  interpreter.set_tensor(detail['index'], x.astype(detail['dtype']))
  return interpreter.invoke


# --------------------------------------------------------------------------------------------
# Building a table.


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


def _diff(kind: str, old: Mapping, new: Mapping) -> list[str]:
  return [f'{kind} {k}: {old.get(k)!r} there, {new.get(k)!r} now'
          for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _write(path: str, table: dict) -> None:
  from hournas_jax import checkpoint
  table['updated'] = _now()
  checkpoint.atomic_write_text(path, json.dumps(table, indent=1) + '\n')


def build_table(space: spaces.SearchSpace, protocol: Protocol, out: str, *, channels: int = 3,
                ops: Sequence[str] | None = None, overwrite: bool = False,
                runtime: Runtime | None = None, log=None) -> dict:
  """Measures every missing entry of `space` into the table at `out` (created or resumed).

  Returns the table. Raises LatencyError when `out` holds a table of another protocol, device
  or space (unless overwrite)."""
  runtime = runtime or Runtime(protocol)
  log = log or sys.stderr
  header = {'format': TABLE_FORMAT, 'space': space_info(space, channels),
            'runtime': protocol.runtime, 'protocol': protocol.to_dict(),
            'device': device_info(protocol.runtime)}
  table = None
  if os.path.exists(out) and not overwrite:
    table = read_json(out)
    diffs = [d for part in ('space', 'protocol', 'device')
             for d in _diff(part, table.get(part, {}), header[part])]
    if diffs:
      raise LatencyError(f'{out} holds a table measured another way ({"; ".join(diffs[:3])}'
                         f'{"; ..." if len(diffs) > 3 else ""}); use --overwrite to measure it '
                         'again, or another --out')
  if table is None:
    table = {**header, 'created': _now(), 'updated': None, 'overhead_ms': None,
             'layers': {}, 'latency_ms': {}, 'p10_ms': {}, 'p90_ms': {}}
  table['layers'].update(_layers_info(space, channels))
  done = {}  # entry key -> stats, from entries already in the table
  todo = []
  for layer, op in entries_to_measure(space, ops):
    key = _entry_key(space, layer, op, channels)
    if op in table['latency_ms'].get(layer.name, {}):
      if key is not None:
        done.setdefault(key, {s: table[column][layer.name][op] for s, column in
                              (('median', 'latency_ms'), ('p10', 'p10_ms'), ('p90', 'p90_ms'))})
    else:
      todo.append((layer, op, key))
  distinct = {k for _, _, k in todo if k is not None and k not in done}
  count = len(distinct) + (table['overhead_ms'] is None)
  print(f'latency table {out}: {len(todo)} entries to fill ({count} measurements), '
        f'{protocol.runtime}, threads {protocol.threads}', file=log, flush=True)
  start, measured = time.perf_counter(), 0

  def progress(what, stats):
    nonlocal measured
    measured += 1
    elapsed = time.perf_counter() - start
    eta = elapsed / measured * (count - measured)
    print(f'[{measured}/{count}] {what}: {stats["median"]:.4f} ms (p10 {stats["p10"]:.4f}, '
          f'p90 {stats["p90"]:.4f}); {elapsed:.0f} s, ETA {eta:.0f} s', file=log, flush=True)

  if table['overhead_ms'] is None:
    stats = summarize(runtime.overhead_samples(OVERHEAD_SHAPE))
    table['overhead_ms'] = {**stats, 'input_shape': list(OVERHEAD_SHAPE)}
    _write(out, table)
    progress(f'overhead {OVERHEAD_SHAPE}', stats)
  for layer, op, key in todo:
    fresh = key is not None and key not in done
    if key is None:
      stats = {'median': 0.0, 'p10': 0.0, 'p90': 0.0}
    elif fresh:
      stats = done[key] = summarize(runtime.block_samples(space, layer, op, channels))
    else:
      stats = done[key]
    table['latency_ms'].setdefault(layer.name, {})[op] = stats['median']
    table['p10_ms'].setdefault(layer.name, {})[op] = stats['p10']
    table['p90_ms'].setdefault(layer.name, {})[op] = stats['p90']
    if fresh:
      _write(out, table)
      progress(f'{layer.name} {op} {input_shape(space, layer, channels)}', stats)
  _write(out, table)
  return table


# --------------------------------------------------------------------------------------------
# Using a table.


@dataclasses.dataclass(frozen=True)
class LatencyTable:
  """A table aligned with `costs.CostTables`: latency [L, O] over the searchable layers, ops
  in `space.op_names`, 0 where the op is not allowed; `fixed_ms` the stem, fixed layers and
  head (and the overhead, counted once, when `overhead`); predict = fixed_ms + sum of rows."""
  layer_names: tuple[str, ...]
  op_names: tuple[str, ...]
  latency: np.ndarray
  mask: np.ndarray
  fixed_ms: float
  overhead_ms: float
  overhead: bool
  runtime: str

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
                   overhead: bool = True) -> LatencyTable:
  """The table (a path or the loaded JSON) aligned with `space`'s cost tables.

  overhead: count the per-call overhead once (each entry less `overhead_ms`, clipped at 0, and
    `overhead_ms` once in fixed_ms; the default) or not (FBNet's plain sum of entries).
  Raises LatencyError if it was measured for another space (name, width, image size, classes,
  stem stride, input channels: any layer's input shape) or misses an entry the space needs."""
  where = table if isinstance(table, str) else 'latency table'
  data = read_json(table) if isinstance(table, str) else table
  image_size = space.resolution if image_size is None else image_size
  num_classes = space.num_classes if num_classes is None else num_classes
  if image_size != space.resolution or num_classes != space.num_classes:
    raise LatencyError(f'image size {image_size} / {num_classes} classes asked for, but the '
                       f'space is built for {space.resolution} / {space.num_classes}')
  want = space_info(space, channels)
  diffs = _diff('', data.get('space', {}), want)
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
  net = lambda ms: max(0.0, ms - over) if overhead and ms > 0 else ms
  layers = space.searchable_layers
  latency = np.zeros((len(layers), len(space.op_names)))
  for i, layer in enumerate(layers):
    for j, op in enumerate(space.op_names):
      if op in layer.ops:
        latency[i, j] = net(float(lat[layer.name][op]))
  fixed = sum(net(float(lat[l.name][l.ops[0]])) for l in space.layers if not l.searchable)
  return LatencyTable(space.searchable_names, space.op_names, latency, space.op_mask(),
                      fixed + (over if overhead else 0.0), over, overhead, data.get('runtime'))


def load_table(path: str | Mapping, space: spaces.SearchSpace, image_size: int | None = None,
               num_classes: int | None = None, *, channels: int = 3,
               overhead: bool = True) -> np.ndarray:
  """Latency [num searchable layers, num ops] in ms, laid out as `costs.cost_tables(space)`'s
  params/flops (0 where an op is not allowed); the fixed part is
  `latency_tables(...).fixed_ms`."""
  return latency_tables(path, space, image_size, num_classes, channels=channels,
                        overhead=overhead).latency


def predict_ms(table: LatencyTable, arch, space: spaces.SearchSpace | None = None) -> float:
  """Predicted latency of `arch` (an Architecture, op names or op indices, one per searchable
  layer): the fixed layers plus its chosen entries (see `latency_tables` for the overhead)."""
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


def command(space: spaces.SearchSpace, runtime: str, channels: int = 3) -> str:
  """The command line that measures a table for `space` (`hournas_jax.tools.latency`)."""
  return (f'python -m hournas_jax.tools.latency --space {space.name} --image-size '
          f'{space.resolution} --num-classes {space.num_classes} --width {space.width:g} '
          f'--stem-stride {space.stem_stride} --channels {channels} --runtime {runtime}')


# --------------------------------------------------------------------------------------------
# Threads.


def setup_threads(runtime: str, threads: int) -> int | None:
  """The thread count the protocol records; pins the process for xla_cpu (call before any
  measurement)."""
  if runtime in ('xla_gpu', 'xla_tpu'):
    return None
  available = sorted(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else None
  if threads <= 0:
    if runtime == 'tflite':
      raise LatencyError('--threads must be >= 1 for tflite')
    return len(available) if available else os.cpu_count()
  if runtime == 'xla_cpu':
    if available is None:
      raise LatencyError('--threads for xla_cpu needs os.sched_setaffinity (Linux); use 0')
    if threads > len(available):
      raise LatencyError(f'--threads {threads}: only {len(available)} cores are available')
    os.sched_setaffinity(0, available[:threads])
  return threads
