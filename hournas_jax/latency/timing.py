"""How a latency table times a function: its protocol, the runtimes and the timing loop.

One measurement (`Runtime.time`) is `warmup` untimed runs, then `repeats` samples, each the
mean of `inner` back-to-back runs, `inner` grown until one sample takes `min_sample_ms` (so a
0.01 ms block is timed over hundreds of runs, above the timer's granularity and noise). A
measurement whose spread, (p90 - p10) / median, exceeds `max_spread` is timed again, up to
`retries` times, and the attempt of least spread kept. Around each attempt it reads the load
(the processes running or waiting for a CPU) and the share of wall time the process spent on a
CPU (`Machine`): figures from which `load_verdict` says whether the machine was too busy to
trust them.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import time
from typing import Callable

import numpy as np

from hournas_jax import errors, spaces, tf_env

RUNTIMES = ('xla_cpu', 'xla_gpu', 'xla_tpu', 'tflite')
PRECISIONS = ('float32', 'float16')
DEFAULT_WARMUP = 10
DEFAULT_REPEATS = 50
# A sample spans at least this long: far above the timers' resolution and a scheduler tick's
# jitter, yet 50 samples of a block take a quarter of a second.
DEFAULT_MIN_SAMPLE_MS = 5.0
MAX_INNER = 100_000
DEFAULT_MAX_SPREAD = 0.10
DEFAULT_RETRIES = 2
# Passes over a table's entries, the lowest median kept: a slowdown of a second or so from
# elsewhere (once: layer1_1/k5e6 of FBNet at 64 px timed at 2.1x, with a 10% spread, then at
# 1.0x in 8 fresh interpreters) only ever makes a block slower, and a 2nd pass minutes later
# rarely meets it again.
DEFAULT_PASSES = 2
# Whole networks measured with the table, to fit its correction (see `predict`).
DEFAULT_CALIBRATION = 5
# Busy: a load (runnable processes, the measuring one included, averaged over a build's
# measurements) above this many per core, or single-threaded runs that had less than this
# share of a core.
BUSY_LOAD_PER_CORE = 0.75
BUSY_CPU_SHARE = 0.9
# The overhead graph's input: one value, so the graph costs the call and nothing else.
OVERHEAD_SHAPE = (1, 1, 1, 1)
SKIP_RULE = ('0.0, not measured: the identity is no op in the network graph (XLA and the TFLite '
             'converter drop it)')

# How a run is timed: wall-clock time (the latency a user sees, on an idle machine), or the CPU
# time of the whole process (immune to waiting while other processes run, so usable on a
# shared machine; it equals the latency only where the runtime computes on this process's
# cores without spinning idle threads: TFLite at 1 thread, or XLA:CPU pinned to one core).
TIMERS = {
    'wall': (time.perf_counter, 'time.perf_counter around each sample'),
    'process_cpu': (time.process_time, 'time.process_time (CPU time of the process, all its '
                    'threads) around each sample'),
}


class LatencyError(errors.UserError, ValueError):
  """A latency table that cannot be used: unreadable, for another space, protocol or device."""


@dataclasses.dataclass(frozen=True)
class Protocol:
  """How every entry of a table is measured; a table is resumed only under the same one."""
  runtime: str
  threads: int | None  # tflite: interpreter threads; xla_cpu: cores pinned; None: accelerator
  warmup: int = DEFAULT_WARMUP
  repeats: int = DEFAULT_REPEATS
  precision: str = 'float32'
  timer: str = 'wall'  # a key of TIMERS
  min_sample_ms: float = DEFAULT_MIN_SAMPLE_MS  # 0: one run a sample
  calibration: int = DEFAULT_CALIBRATION  # whole networks measured to correct the sums
  passes: int = DEFAULT_PASSES  # passes over the entries, each entry's lowest median kept

  def to_dict(self) -> dict:
    if self.runtime == 'tflite':
      runs = ('export.to_tflite (BatchNorm folded), a TFLite interpreter as export.run_tflite\'s '
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
        'sample': (f'the mean of as many back-to-back runs as take >= {self.min_sample_ms:g} ms'
                   if self.min_sample_ms > 0 else 'one run'),
        'depthwise_impl': depthwise, 'skip': SKIP_RULE,
        'overhead': f'one-op graph (input times a constant) on a {list(OVERHEAD_SHAPE)} input',
        'calibration_networks': self.calibration,
        'passes': (f'{self.passes} passes over the entries, each entry\'s lowest median kept '
                   '(with its p10 and p90)' if self.passes > 1 else 'one pass')}


# --------------------------------------------------------------------------------------------
# The device, the space and the load.


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
    info['tensorflow'] = _tf().__version__
    from hournas_jax import export
    info['interpreter'] = export.tflite_runtime()
  else:
    device = xla_device(runtime)
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


def runnable_processes(stat_path: str = '/proc/stat') -> float:
  """The machine's load now: the processes (threads) running or waiting for a CPU, the
  reader included (Linux's `procs_running`). The 1-minute load average, where there is no
  such count, damps the same figure over minutes: a job that ended a minute ago still weighs
  in it, and one that just started barely does. NaN where neither can be read."""
  try:
    with open(stat_path) as f:
      for line in f:
        if line.startswith('procs_running '):
          return float(line.split()[1])
  except (OSError, ValueError, IndexError):
    pass
  try:
    return os.getloadavg()[0]
  except OSError:  # not every system has one
    return float('nan')


@dataclasses.dataclass(frozen=True)
class Machine:
  """Where the load figures come from: the processes running or waiting for a CPU, read before
  and after each measurement (`runnable_processes`, the measuring process included; their
  mean over a build is its load average), and the process's CPU and wall clocks, whose ratio
  over a measurement is the share of a core it got. Tests inject fakes."""
  load: Callable[[], float] = runnable_processes
  cpu: Callable[[], float] = time.process_time
  wall: Callable[[], float] = time.perf_counter
  cores: int = os.cpu_count() or 1


def load_verdict(load: float | None, cores: int, cpu_share: float | None,
                 single_thread: bool) -> str | None:
  """Why figures taken under these conditions are not to be trusted, or None.

  Args:
    load: the mean number of runnable processes while measuring (None or NaN: unknown).
    cores: the machine's cores.
    cpu_share: the median CPU time / wall time of the measurements (None: unknown).
    single_thread: whether the runs compute on one core, so that a share under 1 is time the
      process waited for a CPU (multi-threaded runs can exceed 1; accelerators idle the CPU).
  """
  reasons = []
  if load is not None and load == load and load > BUSY_LOAD_PER_CORE * cores:
    reasons.append(f'load average {load:.1f} on {cores} cores')
  if single_thread and cpu_share is not None and cpu_share < BUSY_CPU_SHARE:
    reasons.append(f'the timed runs got {cpu_share:.0%} of a core')
  return '; '.join(reasons) or None


# --------------------------------------------------------------------------------------------
# Timing.


def time_runs(run: Callable[[], object], warmup: int, repeats: int,
              timer: Callable[[], float] = time.perf_counter, inner: int = 1) -> np.ndarray:
  """Milliseconds per run of `run` (which must wait for its result): `repeats` samples, each
  the mean of `inner` back-to-back runs, after `warmup` untimed runs. Returns [repeats]."""
  for _ in range(warmup):
    run()
  out = np.empty(repeats)
  for i in range(repeats):
    t = timer()
    for _ in range(inner):
      run()
    out[i] = (timer() - t) * 1e3 / inner
  return out


def inner_runs(run: Callable[[], object], timer: Callable[[], float], min_ms: float,
               limit: int = MAX_INNER) -> int:
  """How many back-to-back runs of `run` take at least `min_ms` by `timer` (1 if min_ms <= 0):
  doubling or more each try, by the measured time, at most `limit`."""
  n = 1
  while min_ms > 0 and n < limit:
    t = timer()
    for _ in range(n):
      run()
    ms = (timer() - t) * 1e3
    if ms >= min_ms:
      break
    # Aim a little past min_ms; a reading of 0 (a coarse clock) grows tenfold.
    grow = 1.2 * min_ms / ms if ms > 0 else 10.0
    n = min(limit, n * int(min(100.0, max(2.0, math.ceil(grow)))))
  return n


def summarize(samples_ms) -> dict:
  s = np.asarray(samples_ms, np.float64)
  p10, p50, p90 = np.percentile(s, [10, 50, 90])
  return {'median': float(p50), 'p10': float(p10), 'p90': float(p90)}


def spread(samples_ms) -> float:
  """(p90 - p10) / median of samples (0 for a median of 0)."""
  s = summarize(samples_ms)
  return (s['p90'] - s['p10']) / s['median'] if s['median'] > 0 else 0.0


def xla_device(runtime: str):
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


def inference_fn(module):
  return lambda variables, x: module.apply(variables, x, train=False)


class Runtime:
  """Times inference functions `apply(variables, x)` in one runtime, under a protocol.

  After each `time` call, `last_timing` describes it (runs per sample, attempts, spread, load,
  CPU share) and `timings` keeps every one; subclasses that make up their samples leave them
  empty."""

  def __init__(self, protocol: Protocol, timer: Callable[[], float] | None = None, *,
               max_spread: float = DEFAULT_MAX_SPREAD, retries: int = DEFAULT_RETRIES,
               machine: Machine | None = None):
    if protocol.timer not in TIMERS:
      raise LatencyError(f'unknown timer {protocol.timer!r}; one of {", ".join(TIMERS)}')
    self.protocol = protocol
    self.timer = timer or TIMERS[protocol.timer][0]
    self.max_spread = max_spread
    self.retries = retries
    self.machine = machine or Machine()
    self.last_timing: dict | None = None
    self.timings: list[dict] = []
    self.tflite = protocol.runtime == 'tflite'
    if not self.tflite:
      self.device = xla_device(protocol.runtime)

  @property
  def single_thread(self) -> bool:
    """Whether the runs compute on one core (see `load_verdict`)."""
    return self.protocol.runtime in ('tflite', 'xla_cpu') and self.protocol.threads == 1

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
    """Milliseconds per run of `run`: the protocol's `repeats` samples after its `warmup` runs,
    timed again (up to `retries` times) while their spread exceeds `max_spread`; the attempt
    of least spread. Returns [repeats]."""
    p, m = self.protocol, self.machine
    for _ in range(p.warmup):
      run()
    inner = inner_runs(run, self.timer, p.min_sample_ms)
    attempts = []
    for _ in range(1 + max(0, self.retries)):
      load, wall, cpu = m.load(), m.wall(), m.cpu()
      samples = time_runs(run, 0, p.repeats, self.timer, inner)
      wall, cpu = m.wall() - wall, m.cpu() - cpu
      attempts.append((spread(samples), samples, (load + m.load()) / 2,
                       cpu / wall if wall > 0 else float('nan')))
      if attempts[-1][0] <= self.max_spread:
        break
    best = min(attempts, key=lambda a: a[0])
    self.last_timing = {'inner': inner, 'attempts': len(attempts), 'spread': best[0],
                        'load': float(np.mean([a[2] for a in attempts])),
                        'cpu_share': float(np.mean([a[3] for a in attempts]))}
    self.timings.append(self.last_timing)
    return best[1]

  def samples(self, apply_fn, variables, shape, seed: int = 0) -> np.ndarray:
    """Milliseconds of `repeats` samples of apply_fn(variables, x), x ~ N(0, 1) of `shape`."""
    return self.time(self.prepare(apply_fn, variables, shape, seed))

  def block_samples(self, space, layer, op, channels: int = 3) -> np.ndarray:
    from hournas_jax import blocks
    module = blocks.make_block(space, layer, op)
    shape = input_shape(space, layer, channels)
    return self.samples(inference_fn(module), block_variables(module, shape), shape)

  def network_samples(self, space, ops, channels: int = 3) -> np.ndarray:
    """The whole network of `ops` (one op name per searchable layer), end to end."""
    from hournas_jax import supernet
    net = supernet.SuperNet(space, supernet.fixed_layer_ops(space, ops))
    shape = input_shape(space, space.layers[0], channels)
    return self.samples(inference_fn(net), block_variables(net, shape), shape)

  def overhead_samples(self, shape) -> np.ndarray:
    """A one-op graph at `shape`: the input times a constant (a variable, so not folded)."""
    return self.samples(lambda v, x: x * v['scale'], {'scale': np.float32(1.5)}, shape)


def _tf():
  tf_env.quiet()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf


def tflite_model(apply_fn, variables, shape, precision: str = 'float32') -> bytes:
  """The TFLite flatbuffer of apply_fn(variables, x) for x of `shape`: `export.to_tflite`
  (BatchNorm folded, depthwise convs as DEPTHWISE_CONV_2D, builtin ops only)."""
  from hournas_jax import export
  return export.to_tflite(apply_fn, variables, tuple(shape), precision=precision)


def tflite_runner(model: bytes, x: np.ndarray, threads: int) -> Callable[[], object]:
  """invoke() of a TFLite model on `threads` threads, its input set once: the interpreter
  export.run_tflite and export.tflite_latency_ms use (ai_edge_litert when installed, else
  tf.lite; default delegate), timed here to keep every sample, not just a median."""
  from hournas_jax import export
  interpreter = export.tflite_interpreter(model, threads)
  detail = interpreter.get_input_details()[0]
  interpreter.set_tensor(detail['index'], x.astype(detail['dtype']))
  return interpreter.invoke


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
