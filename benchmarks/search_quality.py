"""Search quality: does the search find better architectures than random ones of its budget?

    python benchmarks/search_quality.py [--out DIR] [--seeds 5] [--random 20] ...

At one budget (the config's targets, or --targets PARAMS,FLOPS) it trains, stand-alone with one
recipe (config.train) and --train-seeds seeds each:
- K random architectures (each layer's op uniform over its candidates, kept when within 5% of
  both targets): the reference distribution;
- the architecture found by the HourNAS search with each of N seeds, and by its control
  `prior_only` (no architecture step: what the search starts from) with as many seeds; the
  difference of their means and its standard error say whether the search learns;
- `uniform`: every one-op network (the same op in every layer) within the budget, the best of
  them being what a practitioner would keep;
- the paper's ablations at the same budget, each with --ablation-seeds seeds: no vital-block
  priority (HourNAS-G/H, one stage with twice the search steps), Gumbel-softmax sampling
  (HourNAS-I), one space proposal (m = 1; HourNAS uses the config's m, 8);
- any --variants of the search (Algorithm 1's epoch schedule, the literal temperature,
  separate weights per candidate, the REINFORCE architecture gradient, the final choice by
  inherited accuracy) for choosing the defaults.
It also measures how well a trained SuperNet ranks architectures: Kendall tau between the
accuracy of the random architectures with weights inherited from the SuperNet of the
no-vital-priority search (every layer searchable; BatchNorm statistics recalibrated on training
batches; evaluated on D_val) and their stand-alone accuracy.

Everything is resumable: stand-alone results live in <out>/population/population.jsonl (the
population store), each search in its own workdir <out>/searches/<method>/seed<k>; a rerun
skips what is done. Results: <out>/results.json (also the last line printed), results.md (the
table) and results.png (the random distribution with searched and ablation results marked).
The default size takes about 2.5 hours on a 2-core CPU with one process per core (estimated
from its parts: a stand-alone training 90-140 s, a search of the default recipe 220-280 s, the
Gumbel-softmax ablation's about 900 s); --random 8 --train-seeds 2 --ablations '' took 59 minutes.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=wrong-import-position

from configs import default as default_config  # pylint: disable=wrong-import-position
from configs.ablations import gumbel_softmax  # pylint: disable=wrong-import-position
from configs.ablations import no_vital_priority  # pylint: disable=wrong-import-position
from configs.ablations import num_proposals  # pylint: disable=wrong-import-position

# How each method changes config.search (the HourNAS row is the config itself): the paper's
# ablations as configs/ablations/ define them (the no-vital-priority search gets twice the
# counterparts' steps, as the paper gives it), and variants of the search for its defaults.
ABLATIONS = {
    'no_vital_priority': no_vital_priority.ablate,
    'gumbel_softmax': gumbel_softmax.ablate,
    'one_proposal': lambda s: num_proposals.ablate(s, 1),
}


def _setter(field, value):
  return lambda s: s.__setitem__(field, value)


VARIANTS = {
    'epoch_schedule': _setter('schedule', 'epoch'),
    'interleaved_schedule': _setter('schedule', 'interleaved'),
    'relaxed_temperature': _setter('temperature', 'relaxed'),
    'logits_temperature': _setter('temperature', 'logits'),
    'separate_weights': _setter('weight_sharing', 'none'),
    'nested_weights': _setter('weight_sharing', 'nested'),
    'arch_warmup': _setter('arch_warmup', 0.5),
    'vital_init_targets': _setter('vital_init', 'targets'),
    'vital_init_uniform': _setter('vital_init', 'uniform'),
    'no_arch_warmup': _setter('arch_warmup', 0.0),
    'reinforce': _setter('arch_gradient', 'reinforce'),
    'straight_through': _setter('arch_gradient', 'straight_through'),
    # The final architecture chosen among the distribution's most probable ones by inherited
    # accuracy on D_val (hournas_jax/final_selection.py) instead of its mode.
    'inherited_choice': _setter('final_selection', 'inherited'),
    # The SuperNet recipe that ranked best in benchmarks/supernet_ranking.py, with that choice.
    'sandwich_inherited': lambda s: (s.__setitem__('weight_sampling', 'sandwich'),
                                     s.__setitem__('final_selection', 'inherited')),
    # The recipe that learnt in benchmarks/decoys.py (configs/default.py, use_learning_recipe),
    # the default of configs/search_quality.py: for other base configs.
    'sandwich_reinforce': default_config.use_learning_recipe,
    # The paper's recipe (configs/default.py's), for base configs that use the other.
    'paper_recipe': default_config.use_paper_recipe,
}
# The control, run with as many seeds as HourNAS: no architecture step at all and the result
# read off the distribution's mode, so nothing the SuperNet learnt reaches it: it is what the
# search starts from (theta_vital and the space proposals fitted to the targets).
CONTROL = 'prior_only'
CONTROLS = {CONTROL: lambda s: (s.__setitem__('arch_lr', 0.0),
                                s.__setitem__('final_selection', 'mode'))}
RANKING_METHOD = 'no_vital_priority'


def add_run_arguments(p: argparse.ArgumentParser, out: str) -> None:
  """--dataset, --targets and --set (what `load_config` reads besides --config), --workers and
  --out (default `out`), as every benchmark of searches or stand-alone trainings takes them."""
  p.add_argument('--dataset', default='', help='override config.dataset')
  p.add_argument('--targets', default='', help='PARAMS,FLOPS (default: the config\'s)')
  p.add_argument('--workers', type=int, default=0,
                 help='processes training at once (0 = one per CPU core on a CPU, 1 on '
                 'accelerators)')
  p.add_argument('--out', default=out, help='results directory')
  p.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                 help='override a config field, e.g. --set search.arch_lr=0.05 or --set '
                 'train.warmup_epochs=2 (repeatable)')


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--config', default='configs/search_quality.py',
                 help='base config (task, space, search and retraining recipe)')
  p.add_argument('--seeds', type=int, default=5, help='HourNAS searches (N), and as many of '
                 'the prior_only control')
  p.add_argument('--random', type=int, default=20, help='random architectures (K)')
  p.add_argument('--train-seeds', type=int, default=3, help='stand-alone trainings per '
                 'architecture; every score is their mean')
  p.add_argument('--ablations', default=','.join(ABLATIONS),
                 help=f'comma-separated subset of {",".join(ABLATIONS)} ("" = none)')
  p.add_argument('--ablation-seeds', type=int, default=2, help='searches per ablation')
  p.add_argument('--variants', default='', help=f'search variants to compare, comma-separated '
                 f'from {",".join(VARIANTS)}; each runs with --ablation-seeds seeds')
  p.add_argument('--steps-scale', type=float, default=1.0,
                 help='multiplies the search epochs and the retraining epochs')
  add_run_arguments(p, out='/tmp/hournas_search_quality')
  args = p.parse_args(argv)
  problems = []
  if args.seeds < 1 or args.random < 2 or args.train_seeds < 1 or args.ablation_seeds < 1:
    problems.append('--seeds, --ablation-seeds and --train-seeds must be >= 1 and --random '
                    '>= 2')
  if not args.steps_scale > 0:
    problems.append('--steps-scale must be positive')
  for name in filter(None, args.ablations.split(',')):
    if name not in ABLATIONS:
      problems.append(f'unknown ablation {name!r}; allowed: {", ".join(ABLATIONS)}')
  for name in filter(None, args.variants.split(',')):
    if name not in VARIANTS:
      problems.append(f'unknown variant {name!r}; allowed: {", ".join(VARIANTS)}')
  if args.targets:
    try:
      values = [float(v) for v in args.targets.split(',')]
      assert len(values) == 2 and all(math.isfinite(v) and v >= 0 for v in values)
    except (ValueError, AssertionError):
      problems.append(f'--targets must be PARAMS,FLOPS (numbers >= 0), got {args.targets!r}')
  if problems:
    print(f'error: {"; ".join(problems)}', file=sys.stderr)
    sys.exit(2)
  return args


# --------------------------------------------------------------------------------------------
# Config.


def load_config(args):
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from ml_collections.config_flags import config_flags as impl  # pylint: disable=g-import-not-at-top
  del config_flags
  path = args.config.split(':', 1)[0]
  if not os.path.isfile(path):
    raise ValueError(f'--config {args.config}: no such config file')
  config = impl.ConfigFileFlagParser('config').parse(args.config)
  if args.dataset:
    config.dataset = args.dataset
  if args.targets:
    config.targets.params, config.targets.flops = (float(v) for v in args.targets.split(','))
  for item in args.set:
    field, _, value = item.partition('=')
    *parents, key = field.split('.')
    holder = config
    try:
      for part in parents:
        holder = holder[part]
      old = holder[key]
    except (KeyError, AttributeError, TypeError):
      raise ValueError(f'--set {item}: the config has no field {field!r}') from None
    if isinstance(old, bool):
      if value.lower() not in ('true', 'false'):
        raise ValueError(f'--set {item}: {field} is true or false')
      holder[key] = value.lower() == 'true'
    else:
      try:
        holder[key] = type(old)(value)
      except ValueError:
        raise ValueError(f'--set {item}: {field} takes a {type(old).__name__}') from None
  s, t = config.search, config.train
  s.vital_epochs *= args.steps_scale
  s.nonvital_epochs *= args.steps_scale
  t.epochs *= args.steps_scale
  config.retrain_after_search = False
  config.random_baseline = False
  config.tensorboard = False
  config.mode = 'search'
  return config


def start(args, load=None):
  """The opening of a benchmark that trains in <args.out>: its config (`load(args)`, by default
  `load_config`) checked, JAX configured, the setup resolved and the results directory
  prepared; a bad config is one `error:` line and exit status 2.

  Returns:
    (config, setup, out, workers): workers as population.default_workers makes of --workers.
  """
  from hournas_jax import checkpoint, population, setup as setup_lib, train  # pylint: disable=g-import-not-at-top
  try:
    config = (load or load_config)(args)
    train.validate_config(config)
    setup_lib.configure_jax(config)
    setup = setup_lib.resolve_setup(config, args.out)
  except ValueError as e:  # ConfigError and SpaceError are ValueErrors
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  return (config, setup, checkpoint.prepare_workdir(args.out),
          population.default_workers(args.workers))


def finish(out: str, lines, report: dict) -> dict:
  """The close of such a benchmark: `report` written to <out>/results.json, then the `lines` a
  reader reads and the report's JSON as the last line printed. Returns `report`."""
  from hournas_jax import checkpoint  # pylint: disable=g-import-not-at-top
  checkpoint.atomic_write_json(os.path.join(out, 'results.json'), report)
  print('\n'.join(lines), flush=True)
  print(json.dumps(report, default=float), flush=True)
  return report


def method_config(base, method: str, seed: int):
  config = copy.deepcopy(base)
  change = ABLATIONS.get(method) or VARIANTS.get(method) or CONTROLS.get(method)
  if change is not None:
    change(config.search)
  config.seed = seed
  return config


# --------------------------------------------------------------------------------------------
# Searches (in worker processes on a CPU).


def search_dir(out, method, seed):
  return os.path.join(out, 'searches', method, f'seed{seed}')


def _run_search(task):
  """Runs (or finishes) one search in its workdir; returns its result and wall time."""
  config, workdir = task
  from hournas_jax import checkpoint, search_phase, setup as setup_lib  # pylint: disable=g-import-not-at-top
  done_path = os.path.join(workdir, 'search_time.json')
  if os.path.exists(done_path) and os.path.exists(os.path.join(workdir, 'arch.json')):
    return checkpoint.read_json(os.path.join(workdir, 'arch.json')), checkpoint.read_json(
        done_path)
  start = time.time()
  resumed = os.path.isdir(os.path.join(workdir, 'search', 'checkpoints'))
  setup_lib.configure_jax(config)
  setup = setup_lib.resolve_setup(config, checkpoint.prepare_workdir(workdir))
  result = search_phase.run(setup)
  # A resumed search's time is that of its last part only.
  timing = {'wall_s': time.time() - start, 'resumed': resumed}
  checkpoint.atomic_write_json(done_path, timing)
  return result, timing


def run_searches(base, out, methods_seeds, workers):
  from hournas_jax import checkpoint, population, search_phase, setup as setup_lib  # pylint: disable=g-import-not-at-top
  tasks = [(method_config(base, m, s), search_dir(out, m, s)) for m, s in methods_seeds]
  pending = [t for t in tasks if not os.path.exists(os.path.join(t[1], 'search_time.json'))]
  for config, workdir in tasks:
    # A finished search is reused only if it ran with this configuration.
    if os.path.exists(os.path.join(workdir, checkpoint.FINGERPRINT_FILE)):
      checkpoint.check_fingerprint(workdir, 'search', search_phase.search_fingerprint(
          setup_lib.resolve_setup(config, workdir)), implicit=search_phase.SEARCH_FINGERPRINT_ADDED)
  results = {}
  print(f'[search_quality] {len(tasks) - len(pending)} of {len(tasks)} searches done; running '
        f'{len(pending)}', flush=True)
  if workers > 1 and len(pending) > 1:
    with population.worker_pool(base, out, workers) as pool:
      outputs = list(pool.map(_run_search, tasks))
  else:
    outputs = [_run_search(t) for t in tasks]
  for (method, seed), (result, timing) in zip(methods_seeds, outputs):
    results[method, seed] = {'ops': result['ops'], 'params': result['params'],
                             'flops': result['flops'], 'wall_s': timing['wall_s'],
                             'deviation': result.get('deviation')}
  return results


# --------------------------------------------------------------------------------------------
# Ranking diagnostic.


# Batch size of the inherited-accuracy passes (ranking diagnostics).
INHERITED_BATCH = 64


def inherited_scores(setup, engine, weights, archs, batch_size=INHERITED_BATCH, calibration=20):
  """(top-1 on D_val of each architecture of `archs` with the SuperNet weights `weights` of the
  single-path `engine`, BatchNorm statistics recalibrated on `calibration` D_tr batches; what
  they were evaluated on)."""
  from hournas_jax import ranking as ranking_lib  # pylint: disable=g-import-not-at-top

  def batches(split, train_mode, count=None):
    it = setup.batches(split, batch_size, seed=0, train=train_mode)
    return ranking_lib.take(it, count) if count else list(it)

  calib = batches('search_train', True, calibration)
  evaluation = batches('search_val', False)
  inherited = []
  for ops in archs:
    path = ranking_lib.path_of(setup.space, ops)
    inherited.append(ranking_lib.inherited_accuracy(engine, weights, path, calib, evaluation))
  images = sum(int(np.asarray(b['mask']).sum()) for b in evaluation)
  return inherited, f'search_val ({images} images)'


def ranking(setup_fn, out, base, random_archs, random_means, batch_size=INHERITED_BATCH,
            calibration=20, method=RANKING_METHOD):
  """Kendall tau between inherited-weight accuracy (SuperNet of the `method` search, by default
  the no-vital-priority one, seed 0) and stand-alone accuracy, over the random architectures."""
  from hournas_jax import ranking as ranking_lib, search_phase  # pylint: disable=g-import-not-at-top
  workdir = search_dir(out, method, 0)
  setup = setup_fn(method_config(base, method, 0), workdir)
  searcher, state = search_phase.load_search_state(setup)
  inherited, evaluated_on = inherited_scores(setup, searcher.stage_of(state).engine,
                                             state.weights, random_archs, batch_size,
                                             calibration)
  tau = ranking_lib.kendall_tau(inherited, random_means)
  return {'kendall_tau': tau, 'inherited_top1': inherited, 'supernet': workdir,
          'evaluated_on': evaluated_on}


# --------------------------------------------------------------------------------------------
# Report.


def percentile(value, population):
  """Percent of the population below `value` (ties count half)."""
  population = np.asarray(population)
  return float(100.0 * (np.sum(population < value) + 0.5 * np.sum(population == value))
               / len(population))


def summarise(name, rows, random_means):
  scores = [r['top1'] for r in rows]
  return {'top1': scores, 'mean': float(np.mean(scores)),
          'std': float(np.std(scores, ddof=1)) if len(scores) > 1 else 0.0,
          'percentiles': [percentile(v, random_means) for v in scores],
          'median_percentile': float(np.median([percentile(v, random_means) for v in scores])),
          'search_wall_s': [r['wall_s'] for r in rows],
          'architectures': [r['ops'] for r in rows],
          'params': [r['params'] for r in rows], 'flops': [r['flops'] for r in rows]}


def difference(learned, prior) -> dict:
  """mean(learned) - mean(prior) over searches, its standard error (Welch: each side's
  variance over its count) and the ratio of the two (nan with fewer than 2 of either)."""
  learned, prior = np.asarray(learned, np.float64), np.asarray(prior, np.float64)
  diff = float(learned.mean() - prior.mean())
  if len(learned) < 2 or len(prior) < 2:
    return {'difference': diff, 'se': float('nan'), 'ratio': float('nan')}
  se = float(math.sqrt(learned.var(ddof=1) / len(learned) + prior.var(ddof=1) / len(prior)))
  return {'difference': diff, 'se': se, 'ratio': diff / se if se > 0 else float('nan')}


def uniform_summary(archs, by_arch, random_means) -> dict:
  """The uniform baseline: every one-op architecture within the budget, and the best of them
  (what a practitioner keeps after trying each)."""
  if not archs:
    return {'top1': None, 'architecture': None, 'tried': {}}
  scores = {ops[0]: by_arch[tuple(ops)][0] for ops in archs}
  op = max(scores, key=scores.get)
  return {'top1': scores[op], 'architecture': op, 'tried': scores,
          'percentile': percentile(scores[op], random_means)}


def markdown(report) -> str:
  r = report['random']
  lines = [f'Search quality on {report["dataset"]} ({report["space"]}), budget '
           f'{report["targets"]["params"] / 1e3:.0f}k params / '
           f'{report["targets"]["flops"] / 1e6:.2f}M FLOPs; every score is the mean test top-1 of '
           f'{report["train_seeds"]} stand-alone trainings.', '',
           '| method | archs | top-1 mean (%) | std (%) | percentile among random (each) | '
           'median pct | search wall time (s) |', '|---|---|---|---|---|---|---|',
           f'| random (within 5% of both targets) | {len(r["top1"])} | {100 * r["mean"]:.2f} | '
           f'{100 * r["std"]:.2f} | 25th/50th/75th: {100 * r["p25"]:.2f} / {100 * r["p50"]:.2f}'
           f' / {100 * r["p75"]:.2f} | | |']
  u = report.get('uniform') or {}
  if u.get('top1') is not None:
    tried = ', '.join(f'{op} {100 * v:.2f}' for op, v in u['tried'].items())
    lines.append(f'| uniform: best one-op network within the budget ({u["architecture"]} '
                 f'everywhere; tried {tried}) | {len(u["tried"])} | {100 * u["top1"]:.2f} | | '
                 f'{u["percentile"]:.0f} | | |')
  for name, m in report['methods'].items():
    pcts = ' '.join(f'{p:.0f}' for p in m['percentiles'])
    lines.append(f'| {name} | {len(m["top1"])} | {100 * m["mean"]:.2f} | {100 * m["std"]:.2f} '
                 f'| {pcts} | {m["median_percentile"]:.0f} | '
                 f'{np.mean(m["search_wall_s"]):.0f} |')
  n = report['noise']
  lines += ['', f'Spread between random architectures (std of their means): '
            f'{100 * r["std"]:.2f}%; training noise (mean std over seeds of one architecture): '
            f'{100 * n["seed_std"]:.2f}%, so a {report["train_seeds"]}-seed mean carries '
            f'{100 * n["seed_std"] / math.sqrt(report["train_seeds"]):.2f}%.']
  d = report.get('learned_vs_prior') or {}
  if d:
    lines.append(f'HourNAS minus its prior ({CONTROL}: no architecture step): '
                 f'{100 * d["difference"]:+.2f} points, standard error {100 * d["se"]:.2f} '
                 f'({d["ratio"]:+.1f} SE; learning shows at 2 or more).')
  k = report.get('ranking') or {}
  if k:
    lines.append(f'Kendall tau (inherited-weight accuracy on D_val vs stand-alone, '
                 f'{len(k["inherited_top1"])} random architectures, SuperNet of '
                 f'{RANKING_METHOD} seed 0): {k["kendall_tau"]:.3f}.')
  return '\n'.join(lines) + '\n'


def plot(path, report):
  from hournas_jax import analysis  # pylint: disable=g-import-not-at-top
  fig, ax = analysis.new_figure(figsize=(8, 3.2 + 0.35 * len(report['methods'])))
  rows = [('random', report['random']['top1'])] + [(k, v['top1'])
                                                   for k, v in report['methods'].items()]
  for i, (name, values) in enumerate(rows):
    jitter = np.random.default_rng(i).uniform(-0.15, 0.15, len(values))
    ax.scatter(100 * np.asarray(values), i + jitter, s=22, alpha=0.8,
               color='gray' if name == 'random' else f'C{i}')
  for q in ('p25', 'p50', 'p75'):
    ax.axvline(100 * report['random'][q], color='gray', lw=0.8, ls=':' if q != 'p50' else '-')
  ax.set_yticks(range(len(rows)))
  ax.set_yticklabels([name for name, _ in rows])
  ax.invert_yaxis()
  ax.set_xlabel('stand-alone test top-1 (%), mean over training seeds')
  ax.set_title('searched architectures among random ones of the same budget '
               '(lines: random 25th/50th/75th percentiles)', fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


# --------------------------------------------------------------------------------------------


def main(argv=None):
  args = parse_args(argv)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  from hournas_jax import checkpoint, population, setup as setup_lib, train  # pylint: disable=g-import-not-at-top
  started = time.time()
  try:
    base = load_config(args)
    train.validate_config(base)
  except ValueError as e:  # ConfigError is a ValueError
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  setup_lib.configure_jax(base)
  out = checkpoint.prepare_workdir(args.out)
  workers = population.default_workers(args.workers)

  def setup_fn(config, workdir):
    return setup_lib.resolve_setup(config, workdir)

  setup = setup_fn(base, out)
  targets = {k: float(base.targets[k]) for k in ('params', 'flops') if base.targets[k]}
  store_dir = os.path.join(out, 'population')

  # Random architectures: the reference distribution.
  random_archs = population.random_architectures(setup.space, targets, args.random, seed=0)
  seeds = range(args.train_seeds)
  random_records = population.train_population(
      setup, [population.Member(ops, s, 'random') for ops in random_archs for s in seeds],
      store_dir, workers=workers, log_prefix='[random]')
  by_arch = population.mean_by_architecture(random_records)
  random_means = [by_arch[tuple(ops)][0] for ops in random_archs]

  # The practitioner's first try: one op in every layer, the best of those within the budget.
  uniform_archs = population.uniform_architectures(setup.space, targets)
  uniform_records = population.train_population(
      setup, [population.Member(ops, s, 'uniform') for ops in uniform_archs for s in seeds],
      store_dir, workers=workers, log_prefix='[uniform]')
  uniform_by_arch = population.mean_by_architecture(uniform_records)

  # Searches: HourNAS, its prior-only control, ablations, variants.
  ablations = [a for a in args.ablations.split(',') if a]
  variants = [v for v in args.variants.split(',') if v]
  methods_seeds = [(m, s) for m in ('hournas', CONTROL) for s in range(args.seeds)]
  methods_seeds += [(m, s) for m in ablations + variants for s in range(args.ablation_seeds)]
  try:
    searched = run_searches(base, out, methods_seeds, workers)
  except checkpoint.WorkdirError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  members = [population.Member(tuple(r['ops'][n] for n in setup.space.searchable_names), s, m)
             for (m, _), r in searched.items() for s in seeds]
  searched_records = population.train_population(setup, members, store_dir, workers=workers,
                                                 log_prefix='[searched]')
  searched_by_arch = population.mean_by_architecture(searched_records)

  methods = {}
  for method in ['hournas', CONTROL] + ablations + variants:
    rows = []
    for (m, s), r in searched.items():
      if m == method:
        ops = tuple(r['ops'][n] for n in setup.space.searchable_names)
        rows.append({**r, 'ops': list(ops), 'top1': searched_by_arch[ops][0], 'seed': s})
    methods[method] = summarise(method, rows, random_means)

  seed_stds = [v[1] for v in by_arch.values() if not math.isnan(v[1])]
  report = {
      'dataset': setup.dataset, 'space': setup.space.name, 'targets': targets,
      'train_seeds': args.train_seeds,
      'random': {'top1': random_means, 'architectures': [list(a) for a in random_archs],
                 'mean': float(np.mean(random_means)),
                 'std': float(np.std(random_means, ddof=1)),
                 'p25': float(np.percentile(random_means, 25)),
                 'p50': float(np.percentile(random_means, 50)),
                 'p75': float(np.percentile(random_means, 75))},
      'noise': {'seed_std': float(np.mean(seed_stds)) if seed_stds else float('nan')},
      'uniform': uniform_summary(uniform_archs, uniform_by_arch, random_means),
      'methods': methods,
      'learned_vs_prior': difference(methods['hournas']['top1'], methods[CONTROL]['top1']),
  }
  if RANKING_METHOD in ablations:
    report['ranking'] = ranking(setup_fn, out, base, random_archs, random_means)
  report['wall_s'] = time.time() - started
  # The headline figures, flat, first: results.json is also the last line printed.
  hournas = methods['hournas']
  learned = report['learned_vs_prior']
  results = {
      'prior_only_top1': methods[CONTROL]['top1'],
      'learned_minus_prior': learned['difference'],
      'learned_minus_prior_se': learned['se'],
      'uniform_top1': report['uniform']['top1'],
      'random_top1': random_means,
      'searched_top1': hournas['top1'],
      'searched_percentiles': hournas['percentiles'],
      'searched_median_percentile': hournas['median_percentile'],
      'random_p75': report['random']['p75'],
      'kendall_tau': (report.get('ranking') or {}).get('kendall_tau'),
      'ablations': {k: {'top1': v['top1'], 'percentiles': v['percentiles'],
                        'median_percentile': v['median_percentile'],
                        'search_wall_s': v['search_wall_s']}
                    for k, v in methods.items() if k not in ('hournas', CONTROL)},
      'search_wall_s': hournas['search_wall_s'],
      'random_std': report['random']['std'], 'seed_std': report['noise']['seed_std'],
      **report,
  }
  checkpoint.atomic_write_json(os.path.join(out, 'results.json'), results)
  table = markdown(report)
  checkpoint.atomic_write_text(os.path.join(out, 'results.md'), table)
  plot(os.path.join(out, 'results.png'), report)
  print(table, flush=True)
  print(json.dumps(results, default=float), flush=True)


if __name__ == '__main__':
  main()
