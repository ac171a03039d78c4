"""Params and FLOPs of an architecture, per layer and in total.

    python -m hournas_jax.profile --space fbnet --arch hournas_a
    python -m hournas_jax.profile --space fbnet --arch run/arch.json --json
    python -m hournas_jax.profile --space mnasnet --vital

ARCH is a preset name, a JSON file, or a comma-separated op list. FLOPs are multiply-adds.
"""

from __future__ import annotations

import argparse
import json
import sys

from hournas_jax import arch as arch_lib
from hournas_jax import costs, spaces, vital


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line and exit 2, as for every bad input
    print(f'error: {message}', file=sys.stderr)
    raise SystemExit(2)


def build_parser():
  p = _Parser(description=__doc__.splitlines()[0])
  p.add_argument('--space', required=True, help=f'one of {", ".join(spaces.SPACE_NAMES)}')
  p.add_argument('--arch', help='preset, JSON file or comma-separated ops')
  p.add_argument('--resolution', type=int, default=224)
  p.add_argument('--classes', type=int, default=None, help="default: the space's (1000)")
  p.add_argument('--width', type=float, default=1.0)
  p.add_argument('--json', action='store_true', help='print one JSON object')
  p.add_argument('--vital', action='store_true', help='list the vital layers of the space')
  return p


def profile(space: spaces.SearchSpace, architecture: arch_lib.Architecture | None) -> dict:
  rows = costs.layer_costs(space, architecture.ops) if architecture else None
  out = {'space': space.name, 'resolution': space.resolution,
         'num_classes': space.num_classes, 'vital': list(vital.vital_layers(space))}
  if rows is not None:
    out.update(params=sum(r['params'] for r in rows), flops=sum(r['flops'] for r in rows),
               layers=rows)
  return out


def _print_table(result: dict) -> None:
  vital_set = set(result['vital'])
  print(f"{'layer':<10} {'op':<8} {'in':>5} {'out':>5} {'s':>2} {'res':>4} "
        f"{'params':>10} {'MFLOPs':>9}  vital")
  for r in result['layers']:
    mark = 'yes' if r['layer'] in vital_set or not r['searchable'] else ''
    print(f"{r['layer']:<10} {r['op']:<8} {r['in_channels']:>5} {r['out_channels']:>5} "
          f"{r['stride']:>2} {r['resolution']:>4} {r['params']:>10,} {r['flops'] / 1e6:>9.2f}  "
          f"{mark}")
  print(f"total: {result['params'] / 1e6:.3f}M params, {result['flops'] / 1e6:.1f}M FLOPs "
        f"(multiply-adds) at {result['resolution']}x{result['resolution']}, "
        f"{result['num_classes']} classes")


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    space = spaces.get_space(args.space, args.resolution, args.classes, args.width)
    if not args.arch and not args.vital:
      raise spaces.SpaceError('give --arch ARCH (preset, JSON file or ops) and/or --vital')
    architecture = arch_lib.resolve(args.arch, space) if args.arch else None
  except spaces.SpaceError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  result = profile(space, architecture)
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
