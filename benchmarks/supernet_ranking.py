"""SuperNet ranking: how well does a SuperNet trained under a recipe order architectures?

    python benchmarks/supernet_ranking.py [--recipes distribution,uniform,strict_fair,sandwich]
        [--architectures 30] [--train-seeds 3] [--train-epochs E] [--out DIR] [--tiny]

Ground truth: --architectures distinct architectures drawn uniformly within 5% of the config's
targets (`population.random_architectures`), each trained stand-alone with config.train and
--train-seeds seeds, tested on the test split; kept in the population store
<out>/population/population.jsonl (or --population DIR, e.g. the search-quality benchmark's),
reused by every recipe and every rerun with the same retraining recipe.

A recipe is tokens joined by '+' (a token alone adds to 'distribution'):
- 'distribution' | 'uniform' | 'strict_fair' | 'sandwich': search.weight_sampling, which paths a
  weight step trains (`hournas_jax/weight_sampling.py`);
- 'hournas': the SuperNet as the two-stage search trains it: S_vital's weights (stage 1) for
  the vital candidates the search did not keep, the final ones (stage 2, vital ops fixed) for
  the rest. Without it, one stage over every layer (search.vital_priority False) with the
  weight steps of both stages together, so every recipe gets the search's weight steps;
- 'x2', 'x4' (any 'xN'): N times those weight steps;
- 'separate' | 'nested': search.weight_sharing 'none' | 'nested' (default: the config's).
e.g. --recipes distribution,uniform,strict_fair,sandwich,hournas,x2,uniform+x4,sandwich+separate

Each SuperNet is the search of that config with seed config.seed (architecture steps included,
as the search takes them); it scores each architecture by its top-1 on D_val with inherited
weights, BatchNorm statistics recalibrated on 20 D_tr batches
(`search_quality.inherited_scores`). Against the mean stand-alone top-1 over seeds: Kendall tau,
Spearman rho, and regret (the population's best mean top-1 minus that of the architecture the
SuperNet ranks first; top-1 as a fraction, 0.01 = 1 point). The noise ceiling: the ground
truth's seed std (mean over architectures of the std over seeds) against its spread (the std of
the architectures' means), and the mean Kendall tau between two seeds' rankings.

Resumable: the population store, each single-stage SuperNet's search workdir (checkpoints) and
each recipe's result (<out>/recipes/<recipe>/result.json) live in --out; a rerun skips what is
done (a recipe's scores are reused only from the same D_val evaluation; otherwise its stored
SuperNet is scored again). Prints a table, then a JSON last line: kendall_tau, spearman,
regret_top1, recipe, supernet_steps, wall_s of the first recipe, and the same per recipe under
'recipes'. Default task: configs/quickstart.py (16 px digits); --config for another.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=wrong-import-position

from benchmarks import search_quality  # pylint: disable=wrong-import-position

SAMPLINGS = ('distribution', 'uniform', 'strict_fair', 'sandwich')
SHARING = {'separate': 'none', 'nested': 'nested'}
DEFAULT_RECIPES = 'distribution,uniform,strict_fair,sandwich,hournas'
SUPERNET = 'supernet'  # the single-stage search's method name (its workdir)
CALIBRATION = 20       # D_tr batches the BatchNorm statistics are recalibrated on


def parse_recipe(name: str) -> dict:
  """{'sampling', 'two_stage', 'multiplier', 'sharing' (None = the config's)} of a recipe name;
  raises ValueError naming what is wrong."""
  recipe = {'sampling': None, 'two_stage': False, 'multiplier': None, 'sharing': None}
  tokens = name.split('+')
  for token in tokens:
    if token in SAMPLINGS:
      key, value = 'sampling', token
    elif token == 'hournas':
      key, value = 'two_stage', True
    elif token in SHARING:
      key, value = 'sharing', SHARING[token]
    elif re.fullmatch(r'x[1-9][0-9]*', token):
      key, value = 'multiplier', int(token[1:])
    else:
      raise ValueError(f'recipe {name!r}: unknown token {token!r}; tokens: '
                       f'{", ".join(SAMPLINGS)}, hournas, xN (x2, x4), '
                       f'{", ".join(SHARING)}, joined by "+"')
    if recipe[key] not in (None, False):
      raise ValueError(f'recipe {name!r}: more than one {key} token')
    recipe[key] = value
  recipe['sampling'] = recipe['sampling'] or 'distribution'
  recipe['multiplier'] = recipe['multiplier'] or 1
  return recipe


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--config', default='configs/quickstart.py',
                 help='base config (task, space, search and retraining recipe)')
  p.add_argument('--recipes', default=DEFAULT_RECIPES,
                 help='comma-separated recipes (see above); the first is the headline')
  p.add_argument('--architectures', type=int, default=30,
                 help='ground-truth architectures within 5%% of the targets')
  p.add_argument('--train-seeds', type=int, default=3,
                 help='stand-alone trainings per architecture; the truth is their mean')
  p.add_argument('--train-epochs', type=float, default=0.0,
                 help='config.train.epochs of the ground truth (0 = the config\'s)')
  p.add_argument('--population', default='',
                 help='the population store directory (default <out>/population)')
  search_quality.add_run_arguments(p, out='/tmp/hournas_supernet_ranking')
  p.add_argument('--tiny', action='store_true',
                 help='a few steps of everything (tests): 4 + 4 search weight steps, 4 '
                 'training steps, small batches')
  args = p.parse_args(argv)
  args.steps_scale = 1.0  # what search_quality.load_config reads; recipes scale the search
  problems = []
  if args.architectures < 2 or args.train_seeds < 1:
    problems.append('--architectures must be >= 2 and --train-seeds >= 1')
  if args.train_epochs < 0 or not math.isfinite(args.train_epochs):
    problems.append('--train-epochs must be >= 0')
  names = [r for r in args.recipes.split(',') if r]
  if not names:
    problems.append('--recipes names no recipe')
  if len(set(names)) != len(names):
    problems.append('--recipes names a recipe twice')
  for name in names:
    try:
      parse_recipe(name)
    except ValueError as e:
      problems.append(str(e))
  if args.targets:
    try:
      values = [float(v) for v in args.targets.split(',')]
      assert len(values) == 2 and all(math.isfinite(v) and v >= 0 for v in values)
    except (ValueError, AssertionError):
      problems.append(f'--targets must be PARAMS,FLOPS (numbers >= 0), got {args.targets!r}')
  if problems:
    print(f'error: {"; ".join(problems)}', file=sys.stderr)
    sys.exit(2)
  args.recipe_names = names
  return args


# --------------------------------------------------------------------------------------------
# Configs.


def base_config(args):
  """The config every recipe starts from: the file's, with --set, --train-epochs, --tiny."""
  config = search_quality.load_config(args)
  if args.train_epochs:
    config.train.epochs = float(args.train_epochs)
    config.train.steps = 0
  if args.tiny:
    s = config.search
    s.vital_steps = s.nonvital_steps = 4
    s.batch_size = 8
    s.val_every = 2
    s.proposal_iterations = 20
    config.train.steps = 4
    config.train.batch_size = 16
    config.proposal_samples = 100
  config.search.engine = 'single_path'  # the ranking reads single-path weights
  config.checkpoint_every_steps = max(int(config.checkpoint_every_steps), 200)
  return config


def recipe_config(base, recipe: dict, weight_steps: tuple[int, int]):
  """The search config of a recipe; weight_steps: the base search's (vital, non-vital)
  weight steps."""
  config = copy.deepcopy(base)
  s = config.search
  s.weight_sampling = recipe['sampling']
  if recipe['sharing']:
    s.weight_sharing = recipe['sharing']
  vital, nonvital = (recipe['multiplier'] * n for n in weight_steps)
  if recipe['two_stage']:
    s.vital_priority = True
    s.vital_steps, s.nonvital_steps = vital, nonvital
  else:
    s.vital_priority = False
    s.vital_steps, s.nonvital_steps = 0, vital + nonvital
  return config


# --------------------------------------------------------------------------------------------
# SuperNets.


def _two_stage_supernet(setup):
  """(engine, weights, weight steps) of the two-stage search's SuperNet over every candidate:
  S_vital's weights for the vital candidates stage 2 does not hold, stage 2's for the rest.
  The searcher's own loop (no checkpoints: stage 1's weights of the vital candidates it does not
  keep are dropped when stage 2 starts, so they are kept here, as of stage 1's last-but-one
  step, where the cosine learning rate is all but 0)."""
  from hournas_jax import search, search_phase, supernet  # pylint: disable=g-import-not-at-top
  config = setup.config
  s = config.search
  searcher = search_phase.make_searcher(setup)
  state = searcher.init(config.seed, mesh=setup.mesh)
  streams = {split: setup.batches(split, s.batch_size, seed=config.seed)
             for split in ('search_train', 'search_val')}
  vital_weights = {}
  while state.stage != 'done':
    needs_tr, needs_val = searcher.batches_needed(state)
    if state.stage == 'vital':
      vital_weights = state.weights
    state, _ = searcher.train_step(state, next(streams['search_train']) if needs_tr else None,
                                   next(streams['search_val']) if needs_val else None)
  final = state.weights
  weights = {kind: {layer: {**vital_weights.get(kind, {}).get(layer, {}),
                            **final[kind].get(layer, {})}
                    for layer in {*vital_weights.get(kind, {}), *final[kind]}}
             for kind in ('params', 'batch_stats')}
  engine = search.config_engine_factory(setup.space, s)(
      supernet.layer_ops(setup.space, frozen=searcher.problem.fixed_ops))
  return engine, {**weights, 'opt_state': {}}, int(state.counters['tr_step'])


def run_recipe(name, config, out, archs, truth):
  """Trains (or finds) the SuperNet of one recipe and scores `archs` with it; returns its
  result (also <out>/recipes/<name>/result.json)."""
  from hournas_jax import checkpoint, ranking, search_phase, setup as setup_lib  # pylint: disable=g-import-not-at-top
  directory = os.path.join(out, 'recipes', name)
  path = os.path.join(directory, 'result.json')
  os.makedirs(directory, exist_ok=True)
  setup = setup_lib.resolve_setup(config, directory)
  fingerprint = search_phase.search_fingerprint(setup)
  # Scores are reused only from the same evaluation: a dataset whose fixed D_val pass changed
  # scores the stored SuperNet again (its training is kept in its workdir).
  evaluation = {'split': 'search_val', 'calibration_batches': CALIBRATION,
                'batches': setup.steps_per_epoch('search_val', search_quality.INHERITED_BATCH,
                                                 train=False)}
  keys = [','.join(a) for a in archs]
  done = checkpoint.read_json(path) if os.path.exists(path) else None
  if (done and done['fingerprint'] == fingerprint and done.get('evaluation') == evaluation
      and all(k in done['inherited'] for k in keys)):
    print(f'[supernet_ranking] {name}: done earlier ({path})', flush=True)
    inherited = [done['inherited'][k] for k in keys]
    timing = {k: done[k] for k in ('supernet_steps', 'supernet_wall_s', 'ranking_wall_s')}
  else:
    print(f'[supernet_ranking] {name}: training (or loading) its SuperNet and scoring', flush=True)
    start = time.time()
    if parse_recipe(name)['two_stage']:
      engine, weights, steps = _two_stage_supernet(setup)
      supernet_wall = time.time() - start
      start = time.time()
      inherited, evaluated_on = search_quality.inherited_scores(setup, engine, weights, archs,
                                                                calibration=CALIBRATION)
    else:
      searched = search_quality.run_searches(config, directory, [(SUPERNET, 0)], workers=1)
      supernet_wall = searched[SUPERNET, 0]['wall_s']
      steps = int(config.search.nonvital_steps)
      start = time.time()
      r = search_quality.ranking(lambda c, w: setup_lib.resolve_setup(c, w), directory, config,
                                 archs, truth, calibration=CALIBRATION, method=SUPERNET)
      inherited, evaluated_on = r['inherited_top1'], r['evaluated_on']
    timing = {'supernet_steps': steps, 'supernet_wall_s': supernet_wall,
              'ranking_wall_s': time.time() - start}
    checkpoint.atomic_write_json(path, {
        'recipe': name, 'fingerprint': fingerprint, 'evaluated_on': evaluated_on,
        'evaluation': evaluation,
        'inherited': dict(zip(keys, inherited)), **timing})
  return {'recipe': name,
          'kendall_tau': ranking.kendall_tau(inherited, truth),
          'spearman': ranking.spearman_rho(inherited, truth),
          'regret_top1': ranking.regret(inherited, truth),
          'supernet_steps': timing['supernet_steps'],
          'wall_s': timing['supernet_wall_s'] + timing['ranking_wall_s'],
          'supernet_wall_s': timing['supernet_wall_s'],
          'inherited_top1': list(inherited),
          'weight_sampling': config.search.weight_sampling,
          'weight_sharing': config.search.weight_sharing}


# --------------------------------------------------------------------------------------------
# Report.


def noise(records, archs) -> dict:
  """The ground truth's noise: seed std, spread between architectures, seed agreement."""
  from hournas_jax import population, ranking  # pylint: disable=g-import-not-at-top
  by_arch = population.mean_by_architecture(records)
  means = [by_arch[tuple(a)][0] for a in archs]
  stds = [by_arch[tuple(a)][1] for a in archs if not math.isnan(by_arch[tuple(a)][1])]
  seeds = sorted({int(r['seed']) for r in records})
  table = {(tuple(r['ops']), int(r['seed'])): float(r['top1']) for r in records}
  scores = [[table[tuple(a), s] for s in seeds] for a in archs]
  return {'seed_std': float(np.mean(stds)) if stds else float('nan'),
          'spread': float(np.std(means, ddof=1)),
          'seed_tau': ranking.seed_agreement(scores),
          'worst_seed_gap': float(max((max(row) - min(row) for row in scores), default=0.0))}


def markdown(report) -> str:
  g, n = report['population'], report['noise']
  lines = [f'SuperNet ranking on {report["dataset"]} ({report["space"]}), '
           f'{g["architectures"]} architectures within 5% of {g["targets"]}, ground truth '
           f'the mean test top-1 of {g["train_seeds"]} stand-alone trainings each '
           f'({g["train_epochs"]:g} epochs); SuperNet scores on D_val with inherited weights.',
           '', '| recipe | weight steps | Kendall tau | Spearman rho | regret (points) | '
           'inherited top-1 mean (%) | wall (s) |', '|---|---|---|---|---|---|---|']
  for name, r in report['recipes'].items():
    lines.append(f'| {name} | {r["supernet_steps"]} | {r["kendall_tau"]:.3f} | '
                 f'{r["spearman"]:.3f} | {100 * r["regret_top1"]:.2f} | '
                 f'{100 * np.mean(r["inherited_top1"]):.2f} | {r["wall_s"]:.0f} |')
  lines += ['', f'Ground truth: top-1 {100 * g["mean"]:.2f}% mean, best {100 * g["best"]:.2f}%; '
            f'seed std {100 * n["seed_std"]:.2f} points against a spread between architectures '
            f'of {100 * n["spread"]:.2f}; two seeds\' rankings agree at Kendall tau '
            f'{n["seed_tau"]:.3f}; the widest gap between seeds of one architecture '
            f'{100 * n["worst_seed_gap"]:.2f} points.']
  return '\n'.join(lines) + '\n'


# --------------------------------------------------------------------------------------------


def main(argv=None):
  args = parse_args(argv)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  from hournas_jax import checkpoint, population, search, search_phase, setup as setup_lib, train  # pylint: disable=g-import-not-at-top
  started = time.time()
  try:
    base = base_config(args)
    train.validate_config(base)
  except ValueError as e:  # ConfigError is a ValueError
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  recipes = {name: parse_recipe(name) for name in args.recipe_names}
  setup_lib.configure_jax(base)
  out = checkpoint.prepare_workdir(args.out)
  setup = setup_lib.resolve_setup(base, out)
  weight_steps = search_phase.search_steps(setup)[2:]
  configs = {name: recipe_config(base, r, weight_steps) for name, r in recipes.items()}
  try:
    for config in configs.values():
      search.check_config(config.search)
  except search.SearchError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)

  # The ground truth.
  targets = {k: float(base.targets[k]) for k in ('params', 'flops') if base.targets[k]}
  archs = population.random_architectures(setup.space, targets, args.architectures, seed=0)
  records = population.train_population(
      setup, [population.Member(ops, s, 'random') for ops in archs
              for s in range(args.train_seeds)],
      args.population or os.path.join(out, 'population'),
      workers=population.default_workers(args.workers), log_prefix='[ground truth]')
  by_arch = population.mean_by_architecture(records)
  truth = [by_arch[tuple(a)][0] for a in archs]

  results = {}
  for name, config in configs.items():
    try:
      results[name] = run_recipe(name, config, out, archs, truth)
    except checkpoint.WorkdirError as e:
      print(f'error: {e}', file=sys.stderr)
      sys.exit(2)

  report = {
      'dataset': setup.dataset, 'space': setup.space.name,
      'population': {'architectures': len(archs), 'train_seeds': args.train_seeds,
                     'targets': targets, 'train_epochs': float(base.train.epochs),
                     'train_steps': int(base.train.steps),
                     'recipe_fingerprint': population.recipe_fingerprint(setup),
                     'top1': truth, 'ops': [list(a) for a in archs],
                     'mean': float(np.mean(truth)), 'best': float(np.max(truth))},
      'noise': noise(records, archs),
      'recipes': results,
  }
  first = results[args.recipe_names[0]]
  summary = {k: first[k] for k in ('kendall_tau', 'spearman', 'regret_top1', 'recipe',
                                   'supernet_steps', 'wall_s')}
  summary.update(report, total_wall_s=time.time() - started)
  checkpoint.atomic_write_json(os.path.join(out, 'results.json'), summary)
  table = markdown(report)
  checkpoint.atomic_write_text(os.path.join(out, 'results.md'), table)
  print(table, flush=True)
  print(json.dumps(summary, default=float), flush=True)


if __name__ == '__main__':
  main()
