"""Space-proposal benchmark: the FBNet bar (m = 8, 4.8M params / 300M FLOPs at 224px, 1000
classes), m = 1, 2, 4, 16, FBNet with the vital layers fixed, MnasNet and EfficientNet.

    python benchmarks/proposals.py [--seeds 3] [--samples 10000]

For every case: optimisation seconds on the first call (compile included: each case has new
shapes or static sizes, so it compiles afresh), the same call again (compiled), the fraction
of 10,000 architectures sampled through uniform pi at the final tau within 5% of both targets,
how many distinct architectures those samples hold, and how different the proposals are.
Figures only, no pass/fail; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from hournas_jax import costs, proposals, spaces  # noqa: E402

VITAL = 'k5e6'  # every first block of a stage fixed to this op: stage 2 of the search


def case(name, space_name, params, flops, m=8, fix_vital=False, candidates=None):
  return dict(name=name, space=space_name, params=params, flops=flops, m=m,
              fix_vital=fix_vital, candidates=candidates)


CASES = [
    case('fbnet_m8 (bar)', 'fbnet', 4.8e6, 300e6, m=8),
    case('fbnet_m1', 'fbnet', 4.8e6, 300e6, m=1),
    case('fbnet_m2', 'fbnet', 4.8e6, 300e6, m=2),
    case('fbnet_m4', 'fbnet', 4.8e6, 300e6, m=4),
    case('fbnet_m16', 'fbnet', 4.8e6, 300e6, m=16),
    case('fbnet_m8_unscreened', 'fbnet', 4.8e6, 300e6, m=8, candidates=1),
    case('fbnet_m8_vital_fixed', 'fbnet', 4.8e6, 300e6, m=8, fix_vital=True),
    case('mnasnet_m8', 'mnasnet', 3.9e6, 312e6, m=8),
    case('efficientnet_m8', 'efficientnet', 5.3e6, 390e6, m=8),
]


def measure(c, seeds, samples):
  space = spaces.get_space(c['space'])
  table = costs.cost_tables(space)
  fixed = ({i: space.op_names.index(VITAL) for i, n in enumerate(space.searchable_names)
            if n.endswith('_1')} if c['fix_vital'] else {})
  free, tables, mask, offset = costs.restrict_tables(table, fixed)
  targets, active = np.array([c['params'], c['flops']]), np.array([True, True])
  costs.check_targets(tables, mask, offset, targets, active, space.name)
  maxima = costs.space_maxima(tables, mask, offset)
  options = {} if c['candidates'] is None else {'candidates_per_proposal': c['candidates']}
  rows = []
  for seed in range(seeds):
    key = jax.random.PRNGKey(seed)
    start, cpu_start = time.perf_counter(), time.process_time()
    thetas, tau = proposals.optimize_proposals(key, tables, mask, offset, targets, maxima,
                                               active, num_proposals=c['m'], **options)
    thetas = jax.block_until_ready(thetas)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    indices = np.asarray(proposals.sample_architectures(
        jax.random.fold_in(key, 1), thetas, jnp.zeros(c['m']), tau, jnp.asarray(mask),
        samples))
    hits = proposals.within_targets(costs.architecture_costs(indices, tables, offset),
                                    targets, active)
    rows.append(dict(seed=seed, seconds=seconds, cpu_seconds=cpu_seconds,
                     within_5pct=float(hits.mean()),
                     distinct_sampled=len({tuple(r) for r in indices}),
                     final_tau=float(tau), **proposals.diversity(thetas, mask)))
  # Run time once compiled: the last seed again.
  start = time.perf_counter()
  jax.block_until_ready(proposals.optimize_proposals(
      jax.random.PRNGKey(seeds - 1), tables, mask, offset, targets, maxima, active,
      num_proposals=c['m'], **options)[0])
  warm = time.perf_counter() - start
  return dict(case=c['name'], space=c['space'], m=c['m'], targets=[c['params'], c['flops']],
              fixed_layers=len(fixed), first_call_seconds=rows[0]['seconds'],
              first_call_cpu_seconds=rows[0]['cpu_seconds'],
              warm_seconds=warm,
              within_5pct=[r['within_5pct'] for r in rows],
              min_within_5pct=min(r['within_5pct'] for r in rows),
              distinct_sampled=[r['distinct_sampled'] for r in rows],
              mean_hamming=[r['mean_hamming'] for r in rows],
              distinct_architectures=[r['distinct_architectures'] for r in rows],
              final_tau=rows[0]['final_tau'])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--seeds', type=int, default=3)
  parser.add_argument('--samples', type=int, default=10000)
  args = parser.parse_args()
  jax.block_until_ready(jnp.zeros(1) + 1)  # backend start-up is not the optimisation's time
  load = os.getloadavg()[0]
  print(f'{jax.devices()[0].platform}, jax {jax.__version__}, {os.cpu_count()} CPUs, load '
        f'average {load:.1f} at start; defaults: '
        f'{proposals.DEFAULT_ITERATIONS} iterations, {proposals.DEFAULT_SAMPLES_PER_STEP} '
        f'samples/step, lr {proposals.DEFAULT_LEARNING_RATE}, tau {proposals.DEFAULT_TAU0} x '
        f'{proposals.DEFAULT_TAU_DECAY}^step, {proposals.DEFAULT_CANDIDATES_PER_PROPOSAL} '
        f'candidates/proposal')
  print(f'{"case":<22} {"first s":>8} {"cpu s":>6} {"warm s":>7} {"within 5% (per seed)":>26} '
        f'{"distinct":>9} {"hamming":>8}')
  results = []
  for c in CASES:
    r = measure(c, args.seeds, args.samples)
    results.append(r)
    within = ' '.join(f'{w:.1%}' for w in r['within_5pct'])
    print(f'{r["case"]:<22} {r["first_call_seconds"]:>8.2f} '
          f'{r["first_call_cpu_seconds"]:>6.2f} {r["warm_seconds"]:>7.2f} '
          f'{within:>26} {int(np.mean(r["distinct_sampled"])):>9} '
          f'{np.mean(r["mean_hamming"]):>8.2f}', flush=True)
  print('first s: first call, compile included (cpu s: its CPU time); warm s: the same call '
        f'compiled; distinct: distinct architectures in {args.samples} samples; hamming: '
        'mean fraction of layers whose most probable op differs between two proposals')
  print(json.dumps(dict(benchmark='proposals', samples=args.samples, seeds=args.seeds,
                        cpus=os.cpu_count(), load_at_start=load,
                        load_at_end=os.getloadavg()[0], results=results)))


if __name__ == '__main__':
  main()
