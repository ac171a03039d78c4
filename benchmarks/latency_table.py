"""How well a latency lookup table predicts whole networks, the way FBNet validates its table.

For each runtime: build (or resume) the space's latency table (hournas_jax.latency, as
`python -m hournas_jax.tools.latency` does), draw --archs random architectures (each layer's
op uniform over its candidates, seed fixed), and compare the table's prediction with the
measured latency of the whole network at batch 1 in the same runtime under the same protocol
(--rounds passes over all the networks, the median of all their runs) (TFLite:
export.to_tflite of the whole network; xla_cpu: jax.jit of its inference apply). Two
predictions: `plain` = the sum of the entries (FBNet), `net` = each entry less the per-call
overhead, plus that overhead once (latency.predict_ms's default). Prints per-architecture
figures, the mean and worst absolute error in %, the mean signed error and the rank
correlation; the last line is JSON.

    python benchmarks/latency_table.py                       # fbnet, 64 px, width 0.5, 10 classes
    python benchmarks/latency_table.py --image-size 224 --width 1.0 --num-classes 1000
    python benchmarks/latency_table.py --runtimes xla_cpu --archs 30

Tables are kept in --tables-dir (one per runtime and space) and resumed on a rerun. --threads
is the TFLite interpreter's thread count and the cores the process is pinned to for xla_cpu.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from hournas_jax import latency, spaces, supernet  # noqa: E402


def random_archs(space: spaces.SearchSpace, count: int, seed: int) -> list[tuple[str, ...]]:
  rng = np.random.default_rng(seed)
  return [tuple(l.ops[rng.integers(len(l.ops))] for l in space.searchable_layers)
          for _ in range(count)]


def network_runner(runtime: latency.Runtime, space, ops, channels: int = 3):
  """One batch-1 inference of the whole network, compiled (XLA) or converted (TFLite)."""
  net = supernet.SuperNet(space, supernet.fixed_layer_ops(space, ops))
  shape = latency.input_shape(space, space.layers[0], channels)
  variables = latency.block_variables(net, shape)
  return runtime.prepare(lambda v, x: net.apply(v, x, train=False), variables, shape)


def spearman(a, b) -> float:
  ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
  return float(np.corrcoef(ra, rb)[0, 1])


def errors_pct(predicted, measured) -> dict:
  err = (np.asarray(predicted) - np.asarray(measured)) / np.asarray(measured) * 100
  return {'mean_abs_pct': float(np.abs(err).mean()), 'worst_abs_pct': float(np.abs(err).max()),
          'mean_signed_pct': float(err.mean()), 'spearman': spearman(predicted, measured)}


def run_runtime(args, space, name: str, threads) -> dict:
  protocol = latency.Protocol(name, threads, args.warmup, args.repeats, timer=args.timer)
  runtime = latency.Runtime(protocol)
  os.makedirs(args.tables_dir, exist_ok=True)
  path = os.path.join(args.tables_dir, f'{space.name}_{space.resolution}px_w{space.width:g}_'
                      f'c{space.num_classes}_s{space.stem_stride}_{name}_t{threads}_'
                      f'{args.timer}.json')
  t = time.perf_counter()
  latency.build_table(space, protocol, path, runtime=runtime, overwrite=args.overwrite)
  table_s = time.perf_counter() - t
  tables = {mode: latency.latency_tables(path, space, overhead=mode == 'net')
            for mode in ('net', 'plain')}
  print(f'\n{name} (threads {threads}): table {path} in {table_s:.0f} s, overhead '
        f'{tables["net"].overhead_ms:.4f} ms')
  print(f'{"arch":>4} {"measured":>9} {"p10":>8} {"p90":>8} {"net":>9} {"err%":>7} '
        f'{"plain":>9} {"err%":>7}')
  t = time.perf_counter()
  archs = random_archs(space, args.archs, args.seed)
  runners = [network_runner(runtime, space, ops) for ops in archs]
  prepare_s = time.perf_counter() - t
  # Rounds over all the networks, so that a burst of load from elsewhere hits a share of each
  # network's runs, not all the runs of a few.
  samples = [[] for _ in archs]
  for _ in range(args.rounds):
    for i, run in enumerate(runners):
      samples[i].append(runtime.time(run))
  rows = []
  for i, ops in enumerate(archs):
    stats = latency.summarize(np.concatenate(samples[i]))
    row = {'ops': list(ops), 'measured_ms': stats['median'], 'p10_ms': stats['p10'],
           'p90_ms': stats['p90']}
    for mode, table in tables.items():
      row[f'{mode}_ms'] = latency.predict_ms(table, ops)
      row[f'{mode}_err_pct'] = (row[f'{mode}_ms'] / stats['median'] - 1) * 100
    rows.append(row)
    print(f'{i:>4} {stats["median"]:>9.3f} {stats["p10"]:>8.3f} {stats["p90"]:>8.3f} '
          f'{row["net_ms"]:>9.3f} {row["net_err_pct"]:>+7.1f} {row["plain_ms"]:>9.3f} '
          f'{row["plain_err_pct"]:>+7.1f}', flush=True)
  networks_s = time.perf_counter() - t
  del runners
  measured = [r['measured_ms'] for r in rows]
  summary = {mode: errors_pct([r[f'{mode}_ms'] for r in rows], measured)
             for mode in ('net', 'plain')}
  for mode, s in summary.items():
    print(f'{name} {mode:>5}: mean |error| {s["mean_abs_pct"]:.1f}%, worst '
          f'{s["worst_abs_pct"]:.1f}%, mean signed {s["mean_signed_pct"]:+.1f}%, Spearman '
          f'{s["spearman"]:.3f}')
  return {'runtime': name, 'threads': threads, 'table': path, 'table_s': round(table_s, 1),
          'networks_s': round(networks_s, 1), 'networks_prepare_s': round(prepare_s, 1),
          'overhead_ms': tables['net'].overhead_ms,
          'measured_ms_range': [min(measured), max(measured)], **summary, 'archs': rows}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--space', default='fbnet')
  p.add_argument('--image-size', type=int, default=64)
  p.add_argument('--width', type=float, default=0.5)
  p.add_argument('--num-classes', type=int, default=10)
  p.add_argument('--stem-stride', type=int, default=None)
  p.add_argument('--runtimes', default='tflite,xla_cpu')
  p.add_argument('--threads', type=int, default=1)
  p.add_argument('--archs', type=int, default=20)
  p.add_argument('--rounds', type=int, default=3,
                 help='passes over all the networks, each of warmup + repeats runs')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--warmup', type=int, default=latency.DEFAULT_WARMUP)
  p.add_argument('--repeats', type=int, default=latency.DEFAULT_REPEATS)
  p.add_argument('--timer', choices=tuple(latency.TIMERS), default='wall',
                 help='process_cpu on a machine shared with other work (see hournas_jax.latency)')
  p.add_argument('--tables-dir', default='/tmp/hournas_latency_tables')
  p.add_argument('--overwrite', action='store_true')
  args = p.parse_args()

  space = spaces.get_space(args.space, args.image_size, args.num_classes, args.width,
                           stem_stride=args.stem_stride)
  names = [r.strip() for r in args.runtimes.split(',') if r.strip()]
  # Pins the process once (xla_cpu's thread setting) so every runtime runs on the same cores.
  threads = {n: latency.setup_threads(n, args.threads) for n in names}
  print(f'{space.name}, {args.image_size} px, width {args.width:g}, {args.num_classes} classes; '
        f'{args.archs} random architectures (seed {args.seed}); warmup {args.warmup}, repeats '
        f'{args.repeats}, median, timer {args.timer}; cores available '
        f'{len(os.sched_getaffinity(0))}')
  load0 = os.getloadavg()[0]
  t = time.perf_counter()
  results = [run_runtime(args, space, n, threads[n]) for n in names]
  total_s = time.perf_counter() - t
  print(f'\ntotal {total_s:.0f} s; load average (1 min) {os.getloadavg()[0]:.1f} at the end, '
        f'{load0:.1f} at the start')
  brief = {'space': space.name, 'image_size': args.image_size, 'width': args.width,
           'num_classes': args.num_classes, 'archs': args.archs, 'seed': args.seed,
           'rounds': args.rounds, 'timer': args.timer, 'total_s': round(total_s, 1),
           'load_average_start_end': [round(load0, 2), round(os.getloadavg()[0], 2)],
           'runtimes': {r['runtime']: {k: v for k, v in r.items() if k != 'archs'}
                        for r in results}}
  print(json.dumps(brief))


if __name__ == '__main__':
  main()
