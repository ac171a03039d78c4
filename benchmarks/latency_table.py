"""How well a latency lookup table predicts whole networks, the way FBNet validates its table.

For each runtime: build (or resume) the space's latency table (hournas_jax.latency, as
`python -m hournas_jax.tools.latency` does; its calibration networks are drawn with their own
seed), draw --archs random architectures (each layer's op uniform over its candidates, --seed),
and compare the table's prediction with the measured latency of the whole network at batch 1
in the same runtime under the same protocol (--rounds passes over all the networks, the median
of all their samples) (TFLite: export.to_tflite of the whole network; xla_cpu: jax.jit of its
inference apply). Three predictions: `net` = each entry less the per-call overhead, plus that
overhead once, times the table's correction (latency.predict_ms's default); `uncorrected` =
the same without the correction; `plain` = the sum of the entries (FBNet). Prints
per-architecture figures, the mean and worst absolute error in %, the mean signed error and
the rank correlation (Spearman), the load and spread figures of the table and of the network
measurements, and a `warning:` line when either was taken on a busy machine; the last line is
JSON.

    python benchmarks/latency_table.py                       # fbnet, 64 px, width 0.5, 10 classes
    python benchmarks/latency_table.py --image-size 224 --width 1.0 --num-classes 1000
    python benchmarks/latency_table.py --runtimes xla_cpu --archs 30

Tables are kept in --tables-dir (one per runtime and space) and resumed on a rerun;
--overwrite measures them again. --threads is the TFLite interpreter's thread count and the
cores the process is pinned to for xla_cpu.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from hournas_jax import errors, latency, spaces, supernet, tools  # noqa: E402

MODES = ('net', 'uncorrected', 'plain')


def network_runner(runtime: latency.Runtime, space, ops, channels: int = 3):
  """One batch-1 inference of the whole network, compiled (XLA) or converted (TFLite)."""
  net = supernet.SuperNet(space, supernet.fixed_layer_ops(space, ops))
  shape = latency.input_shape(space, space.layers[0], channels)
  variables = latency.block_variables(net, shape)
  return runtime.prepare(latency.inference_fn(net), variables, shape)


def spearman(a, b) -> float:
  ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
  return float(np.corrcoef(ra, rb)[0, 1])


def errors_pct(predicted, measured) -> dict:
  err = (np.asarray(predicted) - np.asarray(measured)) / np.asarray(measured) * 100
  return {'mean_abs_pct': float(np.abs(err).mean()), 'worst_abs_pct': float(np.abs(err).max()),
          'mean_signed_pct': float(err.mean()), 'spearman': spearman(predicted, measured)}


def timing_figures(runtime: latency.Runtime, timings: list[dict]) -> dict:
  """Load, CPU share and spread of the network measurements, and the busy verdict."""
  loads = [t['load'] for t in timings if t['load'] == t['load']]
  shares = [t['cpu_share'] for t in timings]
  load = float(np.mean(loads)) if loads else None
  share = float(np.median(shares))
  return {'load_average_mean': None if load is None else round(load, 2),
          'cpu_share_median': round(share, 3),
          'spread_median': round(float(np.median([t['spread'] for t in timings])), 4),
          'spread_max': round(float(max(t['spread'] for t in timings)), 4),
          'retried': sum(t['attempts'] > 1 for t in timings), 'measurements': len(timings),
          'busy': latency.load_verdict(load, runtime.machine.cores, share,
                                       runtime.single_thread)}


def run_runtime(args, space, name: str, threads) -> dict:
  protocol = latency.Protocol(name, threads, args.warmup, args.repeats, timer=args.timer,
                              min_sample_ms=args.min_sample_ms, calibration=args.calibration,
                              passes=args.passes)
  runtime = latency.Runtime(protocol, max_spread=args.max_spread, retries=args.retries)
  os.makedirs(args.tables_dir, exist_ok=True)
  path = os.path.join(args.tables_dir, f'{space.name}_{space.resolution}px_w{space.width:g}_'
                      f'c{space.num_classes}_s{space.stem_stride}_{name}_t{threads}_'
                      f'{args.timer}.json')
  t = time.perf_counter()
  table_data = latency.build_table(space, protocol, path, runtime=runtime,
                                   overwrite=args.overwrite)
  table_s = time.perf_counter() - t
  tables = {mode: latency.latency_tables(path, space, overhead=mode != 'plain',
                                         correct=mode == 'net') for mode in MODES}
  print(f'\n{name} (threads {threads}): table {path} in {table_s:.0f} s, overhead '
        f'{tables["net"].overhead_ms:.4f} ms, correction x{tables["net"].scale:.3f} from '
        f'{tables["net"].calibration_networks} networks')
  table_lines = latency.quality_lines(table_data)
  for line in table_lines:
    print(f'table: {line}')
  print(f'{"arch":>4} {"measured":>9} {"p10":>8} {"p90":>8} {"net":>9} {"err%":>7} '
        f'{"uncorr.":>9} {"err%":>7} {"plain":>9} {"err%":>7}')
  t = time.perf_counter()
  runners = [network_runner(runtime, space, ops) for ops in args.arch_list]
  prepare_s = time.perf_counter() - t
  # Rounds over all the networks, so that a burst of load from elsewhere hits a share of each
  # network's runs, not all the runs of a few.
  samples = [[] for _ in args.arch_list]
  first = len(runtime.timings)
  for _ in range(args.rounds):
    for i, run in enumerate(runners):
      samples[i].append(runtime.time(run))
  figures = timing_figures(runtime, runtime.timings[first:])
  rows = []
  for i, ops in enumerate(args.arch_list):
    stats = latency.summarize(np.concatenate(samples[i]))
    row = {'ops': list(ops), 'measured_ms': stats['median'], 'p10_ms': stats['p10'],
           'p90_ms': stats['p90']}
    for mode, table in tables.items():
      row[f'{mode}_ms'] = latency.predict_ms(table, ops)
      row[f'{mode}_err_pct'] = (row[f'{mode}_ms'] / stats['median'] - 1) * 100
    rows.append(row)
    print(f'{i:>4} {stats["median"]:>9.3f} {stats["p10"]:>8.3f} {stats["p90"]:>8.3f}'
          + ''.join(f' {row[f"{m}_ms"]:>9.3f} {row[f"{m}_err_pct"]:>+7.1f}' for m in MODES),
          flush=True)
  networks_s = time.perf_counter() - t
  del runners
  measured = [r['measured_ms'] for r in rows]
  summary = {mode: errors_pct([r[f'{mode}_ms'] for r in rows], measured) for mode in MODES}
  for mode, s in summary.items():
    print(f'{name} {mode:>11}: mean |error| {s["mean_abs_pct"]:.1f}%, worst '
          f'{s["worst_abs_pct"]:.1f}%, mean signed {s["mean_signed_pct"]:+.1f}%, Spearman '
          f'{s["spearman"]:.3f}')
  load = figures['load_average_mean']
  print(f'networks: load average {"n/a" if load is None else f"{load:.1f}"} (mean) on '
        f'{runtime.machine.cores} cores, timed runs got {figures["cpu_share_median"]:.0%} of a '
        f'core (median), spread {figures["spread_median"]:.1%} median / '
        f'{figures["spread_max"]:.1%} max, {figures["retried"]} of '
        f'{figures["measurements"]} timed again')
  busy = [line for line in table_lines if line.startswith('warning: figures taken on a busy')]
  if figures['busy']:
    busy.append(f'warning: networks measured on a busy machine ({figures["busy"]}): the '
                'errors may be off by more than usual')
    print(busy[-1])
  quality = table_data.get('quality') or {}
  return {'runtime': name, 'threads': threads, 'table': path, 'table_s': round(table_s, 1),
          'networks_s': round(networks_s, 1), 'networks_prepare_s': round(prepare_s, 1),
          'overhead_ms': tables['net'].overhead_ms, 'correction': tables['net'].scale,
          'measured_ms_range': [min(measured), max(measured)], **summary,
          'table_quality': {'sessions': quality.get('sessions'),
                            'wide': len(quality.get('wide') or {}),
                            'busy': bool(quality.get('busy'))},
          'networks_quality': figures, 'busy': bool(busy), 'warnings': busy, 'archs': rows}


def build_parser() -> tools.Parser:
  p = tools.Parser(description=__doc__.splitlines()[0])
  p.add_argument('--space', default='fbnet')
  p.add_argument('--image-size', type=int, default=64)
  p.add_argument('--width', type=float, default=0.5)
  p.add_argument('--num-classes', type=int, default=10)
  p.add_argument('--stem-stride', type=int, default=None)
  p.add_argument('--runtimes', default='tflite,xla_cpu')
  p.add_argument('--threads', type=int, default=1)
  p.add_argument('--archs', type=tools.positive_int, default=20)
  p.add_argument('--rounds', type=tools.positive_int, default=3,
                 help='passes over all the networks, each of warmup + repeats samples')
  p.add_argument('--seed', type=tools.seed, default=0)
  p.add_argument('--warmup', type=int, default=latency.DEFAULT_WARMUP)
  p.add_argument('--repeats', type=tools.positive_int, default=latency.DEFAULT_REPEATS)
  p.add_argument('--min-sample-ms', type=float, default=latency.DEFAULT_MIN_SAMPLE_MS)
  p.add_argument('--max-spread', type=float, default=latency.DEFAULT_MAX_SPREAD)
  p.add_argument('--retries', type=int, default=latency.DEFAULT_RETRIES)
  p.add_argument('--calibration', type=int, default=latency.DEFAULT_CALIBRATION,
                 help='whole networks the table measures to correct its sums (0: none)')
  p.add_argument('--passes', type=tools.positive_int, default=latency.DEFAULT_PASSES,
                 help='passes over the table\'s entries, each entry\'s lowest median kept')
  p.add_argument('--timer', choices=tuple(latency.TIMERS), default='wall',
                 help='process_cpu on a machine shared with other work (see hournas_jax.latency)')
  p.add_argument('--tables-dir', default='/tmp/hournas_latency_tables')
  p.add_argument('--overwrite', action='store_true', help='measure the tables again')
  return p


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    names = [r.strip() for r in args.runtimes.split(',') if r.strip()]
    bad = [n for n in names if n not in latency.RUNTIMES]
    if bad or not names:
      raise latency.LatencyError(f'--runtimes: unknown {", ".join(bad) or "(none)"}; from '
                                 f'{", ".join(latency.RUNTIMES)}')
    if not (args.warmup >= 0 and args.min_sample_ms >= 0 and args.max_spread > 0
            and args.retries >= 0 and args.calibration >= 0):
      raise latency.LatencyError('--warmup, --min-sample-ms, --retries and --calibration must '
                                 'be >= 0, --max-spread > 0')
    space = spaces.get_space(args.space, args.image_size, args.num_classes, args.width,
                             stem_stride=args.stem_stride)
    args.arch_list = latency.random_archs(space, args.archs, args.seed)
    held_out = {tuple(n[l] for l in space.searchable_names)
                for n in latency.calibration_networks(space, args.calibration)}
    if held_out & set(args.arch_list):
      raise latency.LatencyError(f'--seed {args.seed} draws a calibration network of the '
                                 'table; use another seed')
    # Pins the process once (xla_cpu's thread setting) so every runtime runs on the same cores.
    threads = {n: latency.setup_threads(n, args.threads) for n in names}
    print(f'{space.name}, {args.image_size} px, width {args.width:g}, {args.num_classes} '
          f'classes; {args.archs} random architectures (seed {args.seed}); warmup '
          f'{args.warmup}, repeats {args.repeats} of >= {args.min_sample_ms:g} ms, median, '
          f'timer {args.timer}; cores available {len(os.sched_getaffinity(0))}')
    load0 = os.getloadavg()[0]
    t = time.perf_counter()
    results = [run_runtime(args, space, n, threads[n]) for n in names]
  except (spaces.SpaceError, errors.UserError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  total_s = time.perf_counter() - t
  load1 = os.getloadavg()[0]
  print(f'\ntotal {total_s:.0f} s; load average (1 min) {load1:.1f} at the end, {load0:.1f} '
        'at the start')
  for r in results:
    s = r['net']
    print(f'{r["runtime"]}: net mean |error| {s["mean_abs_pct"]:.1f}%, mean signed '
          f'{s["mean_signed_pct"]:+.1f}%, Spearman {s["spearman"]:.3f}'
          + ('; figures taken on a busy machine' if r['busy'] else ''))
  brief = {'space': space.name, 'image_size': args.image_size, 'width': args.width,
           'num_classes': args.num_classes, 'archs': args.archs, 'seed': args.seed,
           'rounds': args.rounds, 'timer': args.timer, 'min_sample_ms': args.min_sample_ms,
           'total_s': round(total_s, 1), 'load_average_start_end': [round(load0, 2),
                                                                     round(load1, 2)],
           'busy': any(r['busy'] for r in results),
           'runtimes': {r['runtime']: {k: v for k, v in r.items() if k != 'archs'}
                        for r in results}}
  print(json.dumps(brief))
  return 0


if __name__ == '__main__':
  sys.exit(main())
