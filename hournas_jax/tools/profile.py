"""Params and FLOPs of an architecture, per layer and in total (and latency, from a table).

    python -m hournas_jax.tools.profile --space fbnet --arch hournas_a
    python -m hournas_jax.tools.profile --space fbnet --arch run/arch.json --json
    python -m hournas_jax.tools.profile --space fbnet --arch hournas_a --latency-table t.json
    python -m hournas_jax.tools.profile --space mnasnet --vital

ARCH is a preset name, a JSON file, or a comma-separated op list. FLOPs are multiply-adds.
"""

from __future__ import annotations

import json
import sys

from hournas_jax import arch as arch_lib
from hournas_jax import costs, errors, latency, spaces, tools, vital


def build_parser():
  p = tools.Parser(prog='python -m hournas_jax.tools.profile',
                   description=__doc__.splitlines()[0])
  p.add_argument('--space', required=True, help=f'one of {", ".join(spaces.SPACE_NAMES)}')
  p.add_argument('--arch', help='preset, JSON file or comma-separated ops')
  p.add_argument('--resolution', type=int, default=224)
  p.add_argument('--classes', type=int, default=None, help="default: the space's (1000)")
  p.add_argument('--width', type=float, default=1.0)
  p.add_argument('--ops', default='', help="a subset of the space's ops, comma-separated (as "
                 "config.ops)")
  p.add_argument('--latency-table', help='a latency table of the space (python -m '
                 'hournas_jax.tools.latency): adds each layer\'s latency and the prediction')
  p.add_argument('--channels', type=int, default=3, help='image channels the table was '
                 'measured with')
  p.add_argument('--json', action='store_true', help='print one JSON object')
  p.add_argument('--vital', action='store_true', help='list the vital layers of the space')
  return p


def profile(space: spaces.SearchSpace, architecture: arch_lib.Architecture | None,
            latency_table: str | None = None, channels: int = 3) -> dict:
  """Costs per layer and in total; with a latency table, each layer's measured latency (ms)
  and the architecture's predicted latency (`latency.predict_ms`)."""
  rows = costs.layer_costs(space, architecture.ops) if architecture else None
  out = {'space': space.name, 'resolution': space.resolution,
         'num_classes': space.num_classes, 'vital': list(vital.vital_layers(space))}
  if rows is not None:
    out.update(params=sum(r['params'] for r in rows), flops=sum(r['flops'] for r in rows),
               layers=rows)
    if latency_table:
      measured = latency.read_json(latency_table)
      table = latency.latency_tables(measured, space, channels=channels)
      for row in rows:
        row['latency_ms'] = float(measured['latency_ms'][row['layer']][row['op']])
      out.update(latency_ms=latency.predict_ms(table, architecture),
                 latency_runtime=measured.get('runtime'))
  return out


def _print_table(result: dict) -> None:
  vital_set = set(result['vital'])
  timed = 'latency_ms' in result
  print(f"{'layer':<10} {'op':<8} {'in':>5} {'out':>5} {'s':>2} {'res':>4} "
        f"{'params':>10} {'MFLOPs':>9}" + (f" {'ms':>8}" if timed else '') + '  vital')
  for r in result['layers']:
    mark = 'yes' if r['layer'] in vital_set or not r['searchable'] else ''
    print(f"{r['layer']:<10} {r['op']:<8} {r['in_channels']:>5} {r['out_channels']:>5} "
          f"{r['stride']:>2} {r['resolution']:>4} {r['params']:>10,} {r['flops'] / 1e6:>9.2f}"
          + (f" {r['latency_ms']:>8.4f}" if timed else '') + f"  {mark}")
  print(f"total: {result['params'] / 1e6:.3f}M params, {result['flops'] / 1e6:.1f}M FLOPs "
        f"(multiply-adds) at {result['resolution']}x{result['resolution']}, "
        f"{result['num_classes']} classes")
  if timed:
    print(f"predicted latency: {result['latency_ms']:.4f} ms ({result['latency_runtime']}; "
          'the call overhead counted once)')


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    ops = tuple(o.strip() for o in args.ops.split(',') if o.strip()) or None
    space = spaces.get_space(args.space, args.resolution, args.classes, args.width, ops=ops)
    if not args.arch and not args.vital:
      raise spaces.SpaceError('give --arch ARCH (preset, JSON file or ops) and/or --vital')
    architecture = arch_lib.resolve(args.arch, space) if args.arch else None
    if args.latency_table and architecture is None:
      raise spaces.SpaceError('--latency-table needs --arch')
    result = profile(space, architecture, args.latency_table, args.channels)
  except errors.UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if args.json:
    print(json.dumps(result))
  elif architecture is None:
    fixed = [n for n in vital.vital_layers(space, searchable_only=False)
             if n not in result['vital']]
    print(f'vital SuperBlocks of {space.name} (on every input-to-output path): '
          f'{", ".join(result["vital"])}; fixed layers, vital too: {", ".join(fixed)}')
  else:
    _print_table(result)
  return 0


if __name__ == '__main__':
  sys.exit(main())
