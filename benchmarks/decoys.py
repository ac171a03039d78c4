"""Equal-cost decoys: does the search learn which ops are good, or only what they cost?

    python benchmarks/decoys.py [--out DIR] [--decoys k3e3,k5e3] [--seeds 5] ...

The space gets a decoy twin of each op of --decoys (hournas_jax/decoys.py): the same params and
FLOPs, its conv kernels frozen at their random initial values; with --decoy-kind
frozen_no_shortcut also without the real op's shortcut, so that where a layer keeps its shape
the twin cannot act as a skip (a frozen twin can, and there costs what a skip costs). The cost
model, the space proposals and the resource term cannot tell twins apart, so where a searched
layer ends on one of a pair, a search that does not learn from the data takes the decoy half
the time.

It runs the HourNAS search of the config (default: the search-quality task) with --seeds seeds,
each in its own workdir <out>/searches/decoys/seed<k> (reused when finished), and reports:
- decoy_pick_rate: of the searched layers whose op is a twinned real op or its decoy, the share
  that took the decoy; also per stage (vital layers, searched in stage 1; the others, stage 2);
- decoy_mass: the same share in probability, p(decoy) / (p(decoy) + p(real)) of the final
  distribution (arch.json's probabilities), averaged over those layers;
- the stand-alone test top-1 (config.train, --train-seeds seeds) of every layer at the real op
  against every layer at its decoy, for each twinned op: how much worse a decoy is;
- decoy_cost_top1 (unless --no-decoy-cost): what the decoys each search took cost it, in
  stand-alone test top-1 points: each searched architecture trained as it was found, with its
  vital layers' decoys made real, and with all of them made real (per stage: _vital is the
  second minus the first, _nonvital the third minus the second). A pick rate says how often the
  search took a decoy; this says whether taking it mattered.
Chance is 0.5. Stand-alone trainings live in <out>/population (resumable). The last line
printed is the JSON of <out>/results.json.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=wrong-import-position

from benchmarks import search_quality  # pylint: disable=wrong-import-position

METHOD = 'decoys'  # the searches' directory under <out>/searches


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--config', default='configs/search_quality.py',
                 help='base config (task, space, search and retraining recipe)')
  p.add_argument('--decoys', default='k3e3,k5e3',
                 help='real ops that get a decoy twin, comma-separated (config.decoys)')
  p.add_argument('--decoy-kind', default='frozen',
                 help='the flavour of twin (config.decoy_kind): frozen | frozen_no_shortcut')
  p.add_argument('--seeds', type=int, default=5, help='searches')
  p.add_argument('--train-seeds', type=int, default=2,
                 help='stand-alone trainings of each all-real and all-decoy network')
  p.add_argument('--steps-scale', type=float, default=1.0,
                 help='multiplies the search epochs and the retraining epochs')
  p.add_argument('--decoy-cost', action=argparse.BooleanOptionalAction, default=True,
                 help='train each searched architecture as found and with its decoys made real '
                      '(3 architectures per search, --train-seeds each)')
  p.add_argument('--tiny', action='store_true',
                 help='a few steps of everything (for tests; the figures mean nothing)')
  search_quality.add_run_arguments(p, out='/tmp/hournas_decoys')
  args = p.parse_args(argv)
  problems = []
  if args.seeds < 1 or args.train_seeds < 1:
    problems.append('--seeds and --train-seeds must be >= 1')
  if not args.steps_scale > 0:
    problems.append('--steps-scale must be positive')
  if not args.decoys.strip(' ,'):
    problems.append('--decoys must name at least one op')
  if problems:
    print(f'error: {"; ".join(problems)}', file=sys.stderr)
    sys.exit(2)
  return args


def load_config(args):
  """The search-quality benchmark's config loading, with the decoys and --tiny's sizes."""
  config = search_quality.load_config(args)
  config.decoys = args.decoys
  config.decoy_kind = args.decoy_kind
  if args.tiny:
    config.search.vital_steps = config.search.nonvital_steps = 2
    config.search.proposal_iterations = 2
    config.train.steps = 2
    config.proposal_samples = 50
    config.log_every_steps = 1
  return config


def pick_rates(space, searches, vital_layers):
  """decoy_pick_rate and decoy_mass overall and per stage, with the layer counts they rest on.

  searches: arch.json results. A layer counts where its op is a twinned real op or a decoy.
  """
  from hournas_jax import decoys  # pylint: disable=g-import-not-at-top
  _, twinned = decoys.split(space.op_names)
  flavour = decoys.flavour_of(space.op_names)
  twin_of = lambda real: decoys.twin_name(real, flavour)
  picks = {'vital': [], 'nonvital': []}
  masses = {'vital': [], 'nonvital': []}
  for result in searches:
    probabilities = result.get('probabilities') or {}
    for layer, op in result['ops'].items():
      real = decoys.real_of(op)
      if layer in space.supernet_fixed or real not in twinned:
        continue
      stage = 'vital' if layer in vital_layers else 'nonvital'
      picks[stage].append(float(op != real))
      p = probabilities.get(layer, {})
      pair = p.get(real, 0.0) + p.get(twin_of(real), 0.0)
      if pair > 0:
        masses[stage].append(p[twin_of(real)] / pair)
  mean = lambda v: float(np.mean(v)) if v else math.nan
  out = {'decoy_pick_rate': mean(picks['vital'] + picks['nonvital']),
         'decoy_mass': mean(masses['vital'] + masses['nonvital']),
         'layers_counted': len(picks['vital']) + len(picks['nonvital'])}
  for stage in ('vital', 'nonvital'):
    out[f'decoy_pick_rate_{stage}'] = mean(picks[stage])
    out[f'decoy_mass_{stage}'] = mean(masses[stage])
    out[f'layers_counted_{stage}'] = len(picks[stage])
  return out


def standalone(setup, twinned, train_seeds, out, workers):
  """{real op: {'real': mean top-1, 'decoy': mean top-1, 'real_seeds': [...], ...}}: every
  searchable layer at the real op against every layer at its decoy."""
  from hournas_jax import decoys, population  # pylint: disable=g-import-not-at-top
  layers = len(setup.space.searchable_names)
  flavour = decoys.flavour_of(setup.space.op_names)
  members = [population.Member((op,) * layers, s, kind) for real in twinned
             for kind, op in (('real', real), ('decoy', decoys.twin_name(real, flavour)))
             for s in range(train_seeds)]
  records = population.train_population(setup, members, os.path.join(out, 'population'),
                                        workers=workers, log_prefix='[stand-alone]')
  top1 = {}
  for m, r in zip(members, records):
    top1.setdefault(decoys.real_of(m.ops[0]), {}).setdefault(m.tag, []).append(float(r['top1']))
  return {real: {'real': float(np.mean(v['real'])), 'decoy': float(np.mean(v['decoy'])),
                 'real_seeds': v['real'], 'decoy_seeds': v['decoy']}
          for real, v in top1.items()}


COST_VARIANTS = ('searched', 'vital_real', 'all_real')


def cost_variants(space, ops, vital_layers) -> dict[str, tuple[str, ...]]:
  """A searched architecture (one op per searchable layer) as found ('searched'), with the
  decoys of its vital layers made real ('vital_real') and with every decoy made real
  ('all_real')."""
  from hournas_jax import decoys  # pylint: disable=g-import-not-at-top
  names = space.searchable_names
  return {'searched': tuple(ops),
          'vital_real': tuple(decoys.real_of(op) if name in vital_layers else op
                              for name, op in zip(names, ops)),
          'all_real': tuple(decoys.real_of(op) for op in ops)}


def decoy_costs(setup, architectures, vital_layers, train_seeds, out, workers):
  """decoy_cost_top1 (overall, _vital, _nonvital): the mean over searches of the stand-alone
  top-1 points each search's decoys cost it, with its standard error (_se; NaN for one
  search), the per-search figures and top-1s."""
  from hournas_jax import population  # pylint: disable=g-import-not-at-top
  variants = [cost_variants(setup.space, ops, vital_layers) for ops in architectures]
  members = [population.Member(v[kind], s, kind) for v in variants for kind in COST_VARIANTS
             for s in range(train_seeds)]
  records = population.train_population(setup, members, os.path.join(out, 'population'),
                                        workers=workers, log_prefix='[decoy cost]')
  top1 = {(tuple(r['ops']), int(r['seed'])): float(r['top1']) for r in records}
  mean_top1 = lambda ops: float(np.mean([top1[ops, s] for s in range(train_seeds)]))
  per_search = [{kind: mean_top1(v[kind]) for kind in COST_VARIANTS} for v in variants]
  costs = {'decoy_cost_top1': [r['all_real'] - r['searched'] for r in per_search],
           'decoy_cost_top1_vital': [r['vital_real'] - r['searched'] for r in per_search],
           'decoy_cost_top1_nonvital': [r['all_real'] - r['vital_real'] for r in per_search]}
  summary = {key: float(np.mean(v)) for key, v in costs.items()}
  summary.update({f'{key}_se': (float(np.std(v, ddof=1) / np.sqrt(len(v))) if len(v) > 1
                                else math.nan) for key, v in costs.items()})
  summary.update({f'{key}_per_search': v for key, v in costs.items()})
  summary['decoy_cost_standalone_top1'] = per_search
  return summary


def main(argv=None):
  args = parse_args(argv)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  from hournas_jax import checkpoint, decoys, vital  # pylint: disable=g-import-not-at-top
  started = time.time()
  base, setup, out, workers = search_quality.start(args, load_config)
  space = setup.space
  _, twinned = decoys.split(space.op_names)

  try:
    searched = search_quality.run_searches(base, out, [(METHOD, s) for s in range(args.seeds)],
                                           workers)
  except checkpoint.WorkdirError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  results = [checkpoint.read_json(os.path.join(search_quality.search_dir(out, METHOD, s),
                                               'arch.json')) for s in range(args.seeds)]
  vital_layers = set(vital.vital_layers(space))
  rates = pick_rates(space, results, vital_layers)
  alone = standalone(setup, twinned, args.train_seeds, out, workers)
  architectures = [[r['ops'][n] for n in space.searchable_names] for r in results]
  cost = (decoy_costs(setup, architectures, vital_layers, args.train_seeds, out, workers)
          if args.decoy_cost else {})

  lines = [f'Decoys on {setup.dataset} ({space.name}, {args.decoy_kind} twins of '
           f'{", ".join(twinned)}), {args.seeds} searches; chance is 0.50.', '',
           '| stage | layers counted | decoy pick rate | decoy probability mass |',
           '|---|---|---|---|']
  for stage, suffix in (('vital', '_vital'), ('non-vital', '_nonvital'), ('all', '')):
    lines.append(f'| {stage} | {rates["layers_counted" + suffix]} | '
                 f'{rates["decoy_pick_rate" + suffix]:.2f} | {rates["decoy_mass" + suffix]:.2f} |')
  lines += ['', f'Stand-alone test top-1 (mean of {args.train_seeds} seeds), every layer at:', '',
            '| op | real (%) | decoy (%) | real - decoy (points) |', '|---|---|---|---|']
  for real, v in alone.items():
    lines.append(f'| {real} | {100 * v["real"]:.2f} | {100 * v["decoy"]:.2f} | '
                 f'{100 * (v["real"] - v["decoy"]):.2f} |')
  if cost:
    lines += ['', 'What the decoys cost the searched architectures (stand-alone test top-1, '
              f'mean of {args.train_seeds} seeds; decoys made real in the vital layers, then '
              'in all):',
              '', '| search | as found (%) | vital decoys real (%) | all decoys real (%) |',
              '|---|---|---|---|']
    for seed, r in enumerate(cost['decoy_cost_standalone_top1']):
      lines.append(f'| seed {seed} | ' + ' | '.join(f'{100 * r[k]:.2f}' for k in COST_VARIANTS)
                   + ' |')
    lines += ['', 'Top-1 points the decoys cost, mean over searches (standard error): ' + ', '.join(
        f'{stage} {100 * cost["decoy_cost_top1" + suffix]:.2f} '
        f'({100 * cost["decoy_cost_top1" + suffix + "_se"]:.2f})'
        for stage, suffix in (('vital', '_vital'), ('non-vital', '_nonvital'), ('all', '')))]
  lines += ['', 'Searched architectures:'] + [
      f'  seed {s}: ' + ' '.join(ops) for s, ops in enumerate(architectures)]
  report = {
      **rates,
      'all_real_top1': {k: v['real'] for k, v in alone.items()},
      'all_decoy_top1': {k: v['decoy'] for k, v in alone.items()},
      'standalone': alone,
      'decoys': list(twinned), 'decoy_kind': args.decoy_kind, 'seeds': args.seeds,
      'train_seeds': args.train_seeds,
      'dataset': setup.dataset, 'space': space.name,
      **cost,
      'architectures': architectures,
      'search_wall_s': [searched[METHOD, s]['wall_s'] for s in range(args.seeds)],
      'wall_s': time.time() - started,
  }
  return search_quality.finish(out, lines, report)


if __name__ == '__main__':
  main()
