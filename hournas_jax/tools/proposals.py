"""Space proposals alone: optimise m proposals for targets and say how well they sample.

    python -m hournas_jax.tools.proposals --space fbnet --params 4.8e6 --flops 300e6 \\
        --proposals 8 [--fix layer2_1=k5e6] [--json] [--plot fig3.png]
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hournas_jax import analysis, costs, proposals, spaces, tools


def parse_fix(text: str | None, space: spaces.SearchSpace) -> dict[int, int]:
  """'layer2_1=k5e6,layer3_1=k5e6' -> {searchable layer index: op index}."""
  if not text:
    return {}
  fixed = {}
  names = space.searchable_names
  for item in text.split(','):
    item = item.strip()
    if not item:
      continue
    layer, sep, op = (s.strip() for s in item.partition('='))
    if not sep or not layer or not op:
      raise proposals.ProposalError(f'--fix takes layer=op pairs separated by commas, got {item!r}')
    if layer not in names:
      raise proposals.ProposalError(f'--fix: no searchable layer {layer!r} in space {space.name} '
                          f'(layers {names[0]} to {names[-1]})')
    li = names.index(layer)
    allowed = space.searchable_layers[li].ops
    if op not in allowed:
      raise proposals.ProposalError(f'--fix: op {op!r} is not a candidate of {layer}; allowed: '
                          f'{", ".join(allowed)}')
    if li in fixed and fixed[li] != space.op_names.index(op):
      raise proposals.ProposalError(f'--fix: layer {layer} is given twice')
    fixed[li] = space.op_names.index(op)
  return fixed


def build_parser() -> tools.Parser:
  p = tools.Parser(prog='python -m hournas_jax.tools.proposals',
              description='Optimise HourNAS space proposals for params/FLOPs targets.')
  p.add_argument('--space', default='fbnet', help=f'one of {", ".join(spaces.SPACE_NAMES)}')
  p.add_argument('--params', type=tools.finite_float, help='target parameters, e.g. 4.8e6')
  p.add_argument('--flops', type=tools.finite_float,
                 help='target FLOPs (multiply-adds), e.g. 300e6')
  p.add_argument('--proposals', type=tools.positive_int, default=8, help='m, number of proposals')
  p.add_argument('--resolution', type=tools.positive_int, default=224)
  p.add_argument('--classes', type=tools.positive_int, default=1000)
  p.add_argument('--width', type=tools.finite_float, default=1.0)
  p.add_argument('--seed', type=tools.seed, default=0)
  p.add_argument('--iterations', type=tools.positive_int, default=proposals.DEFAULT_ITERATIONS,
                 help='optimisation steps; tau ends at 5 * tau_decay**iterations')
  p.add_argument('--tau-decay', type=tools.decay, default=proposals.DEFAULT_TAU_DECAY,
                 help='tau multiplier per step (the default takes tau from 5 to 1 in '
                      f'{proposals.DEFAULT_ITERATIONS} steps)')
  p.add_argument('--entropy', type=tools.finite_float, default=0.01,
                 help='weight of the entropy term in the fit (config.search.proposal_entropy; '
                      '0 = Eqn 5 alone)')
  p.add_argument('--samples', type=tools.positive_int, default=10000,
                 help='architectures drawn to evaluate the proposals')
  p.add_argument('--fix', help='fixed layers, e.g. layer2_1=k5e6,layer3_1=k5e6')
  p.add_argument('--json', action='store_true', help='last stdout line: a JSON summary')
  p.add_argument('--plot', help='write Figure 3 (samples at several temperatures) to FILE.png')
  return p


def run(space: spaces.SearchSpace, targets: Sequence[float | None], *, num_proposals=8,
        seed=0, iterations=proposals.DEFAULT_ITERATIONS,
        tau_decay=proposals.DEFAULT_TAU_DECAY, entropy_weight=0.0, samples=10000,
        fixed: Mapping[int, int] | None = None, plot: str | None = None) -> dict:
  """Optimises and evaluates proposals; returns the summary the CLI prints.

  The space's supernet-fixed layers (EfficientNet's layer1_1) are fixed as the search fixes
  them, unless `fixed` names them.
  """
  fixed = {**{space.searchable_names.index(layer): space.op_names.index(op)
              for layer, op in space.supernet_fixed.items()}, **dict(fixed or {})}
  if plot and not os.path.isdir(os.path.dirname(os.path.abspath(plot))):
    raise proposals.ProposalError(f'cannot write the plot {plot!r}: its folder does not exist')
  table = costs.cost_tables(space)
  free, tables, mask, offset = costs.restrict_tables(table, fixed)
  if len(free) == 0:
    raise proposals.ProposalError('every searchable layer is fixed: nothing is left to search')
  active = np.array([t is not None for t in targets])
  if not active.any():
    raise proposals.ProposalError('give at least one target: --params and/or --flops')
  target_values = np.array([t if t is not None else 0.0 for t in targets], np.float64)
  label = space.name + (f' with {len(fixed)} fixed layer{"s" * (len(fixed) > 1)}' if fixed
                        else '')
  costs.check_targets(tables, mask, offset, target_values, active, label)
  maxima = costs.space_maxima(tables, mask, offset)

  key = jax.random.PRNGKey(seed)
  opt_key, sample_key = jax.random.split(key)
  # Wall time is the bar; CPU time (all threads) tells a busy machine from a slow program.
  start, cpu_start = time.perf_counter(), time.process_time()
  thetas, final_tau = proposals.optimize_proposals(opt_key, tables, mask, offset, target_values,
                                                   maxima, active, num_proposals=num_proposals,
                                         iterations=iterations, tau_decay=tau_decay,
                                         entropy_weight=entropy_weight)
  thetas = jax.block_until_ready(thetas)
  seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
  final_tau = float(final_tau)

  pi_logits = jnp.zeros(num_proposals)  # uniform pi, as at the start of the search
  chosen, indices = proposals.sample_two_level(sample_key, thetas, pi_logits, final_tau,
                                     jnp.asarray(mask), n=samples)
  chosen, indices = np.asarray(chosen), np.asarray(indices)
  sample_costs = costs.architecture_costs(indices, tables, offset)
  ok = proposals.within_targets(sample_costs, target_values, active)

  expected = np.asarray(proposals.expected_cost(thetas, jnp.asarray(tables, jnp.float32),
                                      jnp.asarray(offset, jnp.float32), final_tau,
                                      jnp.asarray(mask)), np.float64)
  best = proposals.argmax_architectures(thetas, mask)
  best_full = costs.full_indices(free, fixed, best)
  per_proposal = []
  for k in range(num_proposals):
    mine = chosen == k
    per_proposal.append(dict(
        expected_params=float(expected[k, 0]), expected_flops=float(expected[k, 1]),
        within_5pct=float(ok[mine].mean()) if mine.any() else None,
        argmax_ops=[space.op_names[i] for i in best_full[k]]))
  low, high = costs.reachable_range(tables, mask, offset)
  summary = dict(
      space=space.name, resolution=space.resolution, classes=space.num_classes,
      width=space.width, proposals=num_proposals, iterations=iterations, seed=seed,
      tau_decay=tau_decay,
      targets=dict(params=targets[0], flops=targets[1]),
      fixed={space.searchable_names[l]: space.op_names[o] for l, o in sorted(fixed.items())},
      reachable=dict(params=[float(low[0]), float(high[0])], flops=[float(low[1]),
                                                                   float(high[1])]),
      final_tau=final_tau, seconds=seconds, cpu_seconds=cpu_seconds, samples=samples,
      within_5pct=float(ok.mean()),
      distinct_sampled=len({tuple(r) for r in indices}),
      sampled_params=dict(mean=float(sample_costs[:, 0].mean()),
                          std=float(sample_costs[:, 0].std())),
      sampled_flops=dict(mean=float(sample_costs[:, 1].mean()),
                         std=float(sample_costs[:, 1].std())),
      diversity=proposals.diversity(thetas, mask),
      per_proposal=per_proposal)
  if plot:
    analysis.plot_figure3(plot, thetas, mask, tables, offset, target_values, active, final_tau,
                 sample_key, samples, space.name)
    summary['plot'] = plot
  return summary


def _print_summary(s: dict) -> None:
  t = s['targets']
  shown = ', '.join(f'{k} {costs.millions(v)}' for k, v in (('params', t['params']),
                                                        ('FLOPs', t['flops'])) if v is not None)
  print(f'space {s["space"]} ({s["resolution"]}px, {s["classes"]} classes, width '
        f'{s["width"]}); targets: {shown}; {s["proposals"]} proposals, {s["iterations"]} '
        f'iterations, final tau {s["final_tau"]:.4g}')
  if s['fixed']:
    print('fixed: ' + ', '.join(f'{l}={o}' for l, o in s['fixed'].items()))
  print(f'{"proposal":>8} {"E[params]":>10} {"E[FLOPs]":>10} {"within 5%":>10}')
  for k, p in enumerate(s['per_proposal']):
    w = '-' if p['within_5pct'] is None else f'{p["within_5pct"]:.1%}'
    print(f'{k:>8} {costs.millions(p["expected_params"], 2):>10} '
          f'{costs.millions(p["expected_flops"]):>10} '
          f'{w:>10}')
  d = s['diversity']
  print(f'diversity: {d["distinct_architectures"]} distinct argmax architectures, '
        f'{d["mean_hamming"]:.0%} of layers differ between two proposals on average, '
        f'{d["mean_ops_per_layer"]:.1f} distinct ops per layer')
  sp, sf = s['sampled_params'], s['sampled_flops']
  print(f'{s["within_5pct"]:.1%} of {s["samples"]} architectures (uniform pi, final tau) within '
        f'5% of every target ({s["distinct_sampled"]} distinct); sampled params '
        f'{costs.millions(sp["mean"], 2)} +- {costs.millions(sp["std"], 2)}, FLOPs '
        f'{costs.millions(sf["mean"])} +- {costs.millions(sf["std"])}')
  print(f'optimisation took {s["seconds"]:.2f} s (compile included; '
        f'{s["cpu_seconds"]:.2f} s of CPU time)')
  if s.get('plot'):
    print(f'wrote {s["plot"]}')


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    space = spaces.get_space(args.space, resolution=args.resolution, num_classes=args.classes,
                             width=args.width)
    fixed = parse_fix(args.fix, space)
    summary = run(space, (args.params, args.flops), num_proposals=args.proposals,
                  seed=args.seed, iterations=args.iterations, tau_decay=args.tau_decay,
                  entropy_weight=args.entropy, samples=args.samples, fixed=fixed, plot=args.plot)
  except (spaces.SpaceError, proposals.ProposalError, ValueError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  _print_summary(summary)
  if args.json:
    print(json.dumps(summary))
  return 0


if __name__ == '__main__':
  sys.exit(main())
