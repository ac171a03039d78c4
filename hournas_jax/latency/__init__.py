"""Latency lookup tables: the measured latency of every (layer, op) candidate of a space.

    python -m hournas_jax.tools.latency --space fbnet --image-size 224 --num-classes 1000 \\
        --runtime tflite --threads 1 --out table.json [--width 1.0] [--ops k3e1,k5e6,skip]

As FBNet's latency table: each candidate block runs alone, at batch 1, on an input of its
layer's real shape, on the machine the tool runs on and in one runtime; an architecture's
latency is predicted from the sum of its chosen entries (`predict_ms`). Runtimes:
- `xla_cpu`: jax.jit of the block's inference apply (train=False) on the CPU device, timed
  with block_until_ready; `--threads N` pins the process to N cores (sched_setaffinity), since
  XLA:CPU has no thread-count setting of its own.
- `xla_gpu` (or `xla_tpu`): the same code on the default accelerator device.
- `tflite`: the block converted by `export.to_tflite` (BatchNorm folded, depthwise convs as
  DEPTHWISE_CONV_2D) and run by the interpreter export.run_tflite uses (ai_edge_litert or
  tf.lite, num_threads=N, its default XNNPACK delegate); the input is set once, the timer
  covers `invoke()`.

Protocol (stored in the table, checked on resume; `timing.py`): `warmup` untimed runs, then
`repeats` samples, each the mean of as many back-to-back runs as take `min_sample_ms` (5 ms:
a 0.01 ms block is timed over ~500 runs a sample, so neither the timer's granularity nor a
scheduler tick decides its figure), timed with time.perf_counter (or, --timer process_cpu, the
process's CPU time, for a machine shared with other work); the entry is their median, with
p10 and p90 kept beside it. A measurement whose spread, (p90 - p10) / median, exceeds
`max_spread` (10%) is timed again, up to `retries` (2) times; one that stays wider is kept
and listed in the table's `quality.wide`. A second pass over the entries (`passes`, after the
whole first one) times each again and keeps its lower median: a burst of load from elsewhere
only ever slows a block, and rarely comes back minutes later. float32 (or --precision),
batch 1, inputs N(0, 1), variables drawn by `blocks.initial_value` (latency does not depend
on their values). `skip` is 0.0 and is not measured: the identity is no op in the network's
graph (XLA and the TFLite converter drop it). The stem, MnasNet's fixed SepConv and the head
are measured like any candidate.

Load (`build.py`): every measurement reads the load (the processes running or waiting for a
CPU, before and after it: not the 1-minute load average, which still carries a job that ended a
minute ago) and the share of a core the timed runs got (process CPU time / wall time); each
build records them, with the spread figures, as a session in `quality` (the load's mean as
`load_average`), and sets `quality.busy` (and the tool prints a warning) when that mean exceeds
0.75 per core or single-threaded runs got under 90% of a core.

Overhead: every measured entry includes the cost of one call of the runtime (dispatch, invoke;
on a CPU from under 1 to ~10 microseconds) that the network pays once, not once a layer. The
table also stores `overhead_ms`, the latency of a one-op graph (one input value times a
constant): the call and nothing else. `latency_tables(..., overhead=True)` counts it once:
the sum over the layers of (entry - overhead), plus the overhead; overhead=False is FBNet's
plain sum of entries.

Correction (`predict.py`): a block timed alone, run after run, keeps its weights and
activations in cache, a network does not, so whole networks run slower than the sum of their
blocks (14-19% at 224 px). The build also measures `calibration` (5) random whole networks
(their own seed) under the same protocol, and predictions are multiplied by the median of
their measured / summed latency (`correct=False` leaves it out). A table without those
networks (an older one) predicts the sum, as before.

The table is JSON (see `TABLE_FORMAT`), written atomically after every measurement; a rerun
with the same --out skips the entries already there and refuses, in one line, a table
measured under another protocol, on another device or for another space, unless --overwrite.
"""

from hournas_jax.latency.build import (CALIBRATION_SEED, build_table, calibration_networks,
                                       entries_to_measure, quality_lines)
from hournas_jax.latency.predict import (TABLE_FORMAT, LatencyTable, command, correction,
                                         latency_tables, load_table, predict_ms, random_archs,
                                         read_json, sum_ms)
from hournas_jax.latency.timing import (BUSY_CPU_SHARE, BUSY_LOAD_PER_CORE, DEFAULT_CALIBRATION,
                                        DEFAULT_MAX_SPREAD, DEFAULT_MIN_SAMPLE_MS,
                                        DEFAULT_PASSES, DEFAULT_REPEATS, DEFAULT_RETRIES,
                                        DEFAULT_WARMUP,
                                        OVERHEAD_SHAPE, PRECISIONS, RUNTIMES, SKIP_RULE, TIMERS,
                                        LatencyError, Machine, Protocol, Runtime,
                                        block_variables, device_info, inference_fn, inner_runs,
                                        input_shape, load_verdict, runnable_processes,
                                        setup_threads, space_info,
                                        spread, summarize, time_runs, tflite_model,
                                        tflite_runner)

__all__ = [
    'BUSY_CPU_SHARE', 'BUSY_LOAD_PER_CORE', 'CALIBRATION_SEED', 'DEFAULT_CALIBRATION',
    'DEFAULT_MAX_SPREAD', 'DEFAULT_MIN_SAMPLE_MS', 'DEFAULT_PASSES', 'DEFAULT_REPEATS',
    'DEFAULT_RETRIES', 'DEFAULT_WARMUP', 'LatencyError', 'LatencyTable', 'Machine',
    'OVERHEAD_SHAPE', 'PRECISIONS',
    'Protocol', 'RUNTIMES', 'Runtime', 'SKIP_RULE', 'TABLE_FORMAT', 'TIMERS', 'block_variables',
    'build_table', 'calibration_networks', 'command', 'correction', 'device_info',
    'entries_to_measure', 'inference_fn', 'inner_runs', 'input_shape', 'latency_tables',
    'load_table', 'load_verdict', 'predict_ms', 'quality_lines', 'random_archs', 'read_json',
    'runnable_processes', 'setup_threads', 'space_info', 'spread', 'sum_ms', 'summarize',
    'time_runs', 'tflite_model', 'tflite_runner']
