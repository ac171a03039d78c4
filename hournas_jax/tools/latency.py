"""Latency lookup tables: measure every (layer, op) candidate of a space on this machine.

    python -m hournas_jax.tools.latency --space fbnet --image-size 224 --num-classes 1000 \\
        --runtime tflite --threads 1 --out table.json [--width 1.0] [--ops k3e1,k5e6,skip]

The table, its protocol and its use are described in `hournas_jax/latency/__init__.py`; a
rerun with the same --out resumes it. The summary prints the load and spread figures the table
records, and a `warning:` line when they were taken on a busy machine.
"""

from __future__ import annotations

import sys
import time

from hournas_jax import errors, latency, spaces, tools


def build_parser() -> tools.Parser:
  p = tools.Parser(prog='python -m hournas_jax.tools.latency',
                   description=latency.__doc__.splitlines()[0])
  p.add_argument('--space', required=True, help=f'one of {", ".join(spaces.SPACE_NAMES)}')
  p.add_argument('--image-size', type=int, default=224)
  p.add_argument('--num-classes', type=int, default=None, help="default: the space's")
  p.add_argument('--width', type=float, default=1.0)
  p.add_argument('--stem-stride', type=int, default=None, help='default: 2')
  p.add_argument('--channels', type=int, default=3, help='image channels (the stem input)')
  p.add_argument('--ops', default='', help="a subset of the space's ops, comma-separated, as "
                 "config.ops (default: all); a rerun with more ops adds theirs")
  p.add_argument('--runtime', choices=latency.RUNTIMES, default='xla_cpu')
  p.add_argument('--threads', type=int, default=1,
                 help='tflite: interpreter threads; xla_cpu: cores the process is pinned to '
                 '(0: all available); ignored on accelerators')
  p.add_argument('--precision', choices=latency.PRECISIONS, default='float32',
                 help='tflite only')
  p.add_argument('--timer', choices=tuple(latency.TIMERS), default='wall',
                 help='wall: the latency on an idle machine; process_cpu: the CPU time of the '
                 'process, for a machine shared with other work (single-threaded runtimes)')
  p.add_argument('--warmup', type=int, default=latency.DEFAULT_WARMUP)
  p.add_argument('--repeats', type=int, default=latency.DEFAULT_REPEATS,
                 help='samples per measurement (each of --min-sample-ms)')
  p.add_argument('--min-sample-ms', type=float, default=latency.DEFAULT_MIN_SAMPLE_MS,
                 help='each sample times back-to-back runs until it spans this long (0: one '
                 'run a sample)')
  p.add_argument('--max-spread', type=float, default=latency.DEFAULT_MAX_SPREAD,
                 help='a measurement with a wider (p90 - p10) / median is timed again')
  p.add_argument('--retries', type=int, default=latency.DEFAULT_RETRIES,
                 help='times a measurement is timed again while too wide')
  p.add_argument('--calibration', type=int, default=latency.DEFAULT_CALIBRATION,
                 help='whole networks measured to correct the sums of blocks (0: none)')
  p.add_argument('--passes', type=int, default=latency.DEFAULT_PASSES,
                 help='passes over the entries, each entry\'s lowest median kept (a burst of '
                 'load from elsewhere only slows a measurement)')
  p.add_argument('--out', required=True, help='the table (JSON); resumed if it exists')
  p.add_argument('--overwrite', action='store_true',
                 help='start the table again if it was measured another way')
  return p


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    if args.warmup < 0 or args.repeats < 1:
      raise latency.LatencyError('--warmup must be >= 0 and --repeats >= 1')
    if not (args.min_sample_ms >= 0 and args.max_spread > 0 and args.retries >= 0
            and args.calibration >= 0 and args.passes >= 1):
      raise latency.LatencyError('--min-sample-ms, --retries and --calibration must be >= 0, '
                                 '--max-spread > 0, --passes >= 1')
    if args.precision != 'float32' and args.runtime != 'tflite':
      raise latency.LatencyError('--precision applies to --runtime tflite only')
    ops = tuple(o.strip() for o in args.ops.split(',') if o.strip()) or None
    space = spaces.get_space(args.space, args.image_size, args.num_classes, args.width,
                             ops=ops, stem_stride=args.stem_stride)
    if args.channels not in (1, 3):
      raise latency.LatencyError(f'--channels must be 1 or 3, got {args.channels}')
    threads = latency.setup_threads(args.runtime, args.threads)
    protocol = latency.Protocol(args.runtime, threads, args.warmup, args.repeats,
                                args.precision, args.timer, args.min_sample_ms,
                                args.calibration, args.passes)
    runtime = latency.Runtime(protocol, max_spread=args.max_spread, retries=args.retries)
    t = time.perf_counter()
    table = latency.build_table(space, protocol, args.out, channels=args.channels,
                                overwrite=args.overwrite, runtime=runtime)
    lo, hi = latency.latency_tables(table, space, channels=args.channels).bounds()
  except (spaces.SpaceError, errors.UserError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  n = sum(len(v) for v in table['latency_ms'].values())
  print(f'{args.out}: {n} entries, overhead {table["overhead_ms"]["median"]:.4f} ms, '
        f'{time.perf_counter() - t:.0f} s')
  for line in latency.quality_lines(table):
    print(line)
  print(f'predicted latency of the space{" (these ops)" if ops else ""}: {lo:.4f} to '
        f'{hi:.4f} ms ({args.runtime}, threads {threads})')
  return 0


if __name__ == '__main__':
  sys.exit(main())
