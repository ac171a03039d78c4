"""Seed noise of a stand-alone training recipe: how far apart do seeds of one architecture land?

    python benchmarks/seed_noise.py [--config configs/quickstart.py] [--architectures 10] \
        [--seeds 3] [--epochs 5,40] [--set train.warmup_epochs=2 ...] [--out DIR]

Every comparison of architectures (the quickstart's, the search-quality benchmark's, a SuperNet's
ranking) rests on the stand-alone training recipe (config.train) telling architectures apart
better than its own seeds do. This trains --architectures random architectures of the config's
budget (each layer's op uniform over its candidates, within 5% of the targets), each with
--seeds training seeds, at each of --epochs (config.train.epochs; default: the config's), and
reports per epoch count:
- seed_std: the std over seeds of one architecture (ddof 1), mean and max over architectures;
- worst_shortfall: the most any run fell below the mean of its siblings (the other seeds of its
  architecture), and how many runs fell more than 3 points below theirs;
- spread: the std between the architectures' means, the signal a ranking has to read.
Trainings live in the population store <out>/population (resumable; a recipe change trains
anew). The last line printed is the JSON of <out>/results.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=wrong-import-position

from benchmarks import search_quality  # pylint: disable=wrong-import-position

# A run this many points below the mean of its siblings counts as one that failed to train.
SHORTFALL_POINTS = 3.0


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--config', default='configs/quickstart.py',
                 help='config whose space, budget and training recipe (config.train) are measured')
  p.add_argument('--architectures', type=int, default=10, help='random architectures')
  p.add_argument('--seeds', type=int, default=3, help='training seeds per architecture')
  p.add_argument('--epochs', default='', help='comma-separated config.train.epochs to measure '
                 '(default: the config\'s)')
  p.add_argument('--arch-seed', type=int, default=0,
                 help='seed of the random architectures\' draw')
  search_quality.add_run_arguments(p, out='/tmp/hournas_seed_noise')
  args = p.parse_args(argv)
  problems = []
  if args.architectures < 2 or args.seeds < 2:
    problems.append('--architectures and --seeds must be >= 2')
  try:
    args.epochs = [float(e) for e in args.epochs.split(',') if e.strip()]
  except ValueError:
    problems.append(f'--epochs takes comma-separated numbers, got {args.epochs!r}')
  else:
    if any(not e > 0 for e in args.epochs):
      problems.append('--epochs must be positive')
  if problems:
    print(f'error: {"; ".join(problems)}', file=sys.stderr)
    sys.exit(2)
  # What search_quality.load_config reads besides --config, --dataset, --targets and --set.
  args.steps_scale = 1.0
  return args


def seed_noise(top1: dict[tuple[str, ...], list[float]]) -> dict:
  """The noise figures of {architecture: [top-1 of each seed]} (fractions in, points out).

  Returns:
    seed_std_mean / seed_std_max: the std over seeds (ddof 1) averaged / maxed over
    architectures; worst_shortfall: the largest amount by which a run fell below the mean of
    its siblings; failed_runs: the runs more than SHORTFALL_POINTS below theirs; spread: the
    std between architecture means; runs: their number.
  """
  per_arch = [100 * np.asarray(v, np.float64) for v in top1.values()]
  if any(len(v) < 2 for v in per_arch):
    raise ValueError('every architecture needs at least 2 seeds')
  stds = [float(np.std(v, ddof=1)) for v in per_arch]
  shortfalls = [float((v.sum() - x) / (len(v) - 1) - x) for v in per_arch for x in v]
  means = [float(np.mean(v)) for v in per_arch]
  return {'seed_std_mean': float(np.mean(stds)), 'seed_std_max': float(np.max(stds)),
          'worst_shortfall': float(max(shortfalls)),
          'failed_runs': int(sum(s > SHORTFALL_POINTS for s in shortfalls)),
          'runs': len(shortfalls),
          'spread': float(np.std(means, ddof=1)) if len(means) > 1 else 0.0,
          'mean_top1': float(np.mean(means)), 'lowest_run': float(min(v.min() for v in per_arch))}


def main(argv=None):
  args = parse_args(argv)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  from hournas_jax import population, setup as setup_lib  # pylint: disable=g-import-not-at-top
  started = time.time()
  base, setup, out, workers = search_quality.start(args)
  targets = {k: float(base.targets[k]) for k in ('params', 'flops') if base.targets[k]}
  archs = population.random_architectures(setup.space, targets, args.architectures,
                                          seed=args.arch_seed)
  epochs_list = args.epochs or [float(base.train.epochs)]

  results, lines = {}, [
      f'Seed noise of config.train on {setup.dataset} ({setup.space.name}): '
      f'{args.architectures} random architectures within 5% of {targets}, {args.seeds} seeds '
      f'each.', '',
      '| epochs | mean top-1 | seed std mean / max | worst run below its siblings | runs > '
      f'{SHORTFALL_POINTS:g} points below | spread between architectures | lowest run |',
      '|---|---|---|---|---|---|---|']
  for epochs in epochs_list:
    base.train.epochs = epochs
    # config.train.steps would take precedence over the epochs.
    base.train.steps = 0
    member_setup = setup_lib.resolve_setup(base, args.out)
    members = [population.Member(ops, s, 'random') for ops in archs for s in range(args.seeds)]
    records = population.train_population(member_setup, members,
                                          os.path.join(out, 'population'), workers=workers,
                                          log_prefix=f'[{epochs:g} epochs]')
    top1: dict[tuple[str, ...], list[float]] = {}
    for r in records:
      top1.setdefault(tuple(r['ops']), []).append(float(r['top1']))
    figures = seed_noise(top1)
    figures['top1_seeds'] = [top1[tuple(a)] for a in archs]
    results[f'{epochs:g}'] = figures
    lines.append(f'| {epochs:g} | {figures["mean_top1"]:.2f}% | {figures["seed_std_mean"]:.2f} / '
                 f'{figures["seed_std_max"]:.2f} | {figures["worst_shortfall"]:.2f} | '
                 f'{figures["failed_runs"]} of {figures["runs"]} | {figures["spread"]:.2f} | '
                 f'{figures["lowest_run"]:.2f}% |')
  report = {'config': args.config, 'set': args.set, 'dataset': setup.dataset,
            'space': setup.space.name, 'architectures': [list(a) for a in archs],
            'seeds': args.seeds, 'by_epochs': results, 'wall_s': time.time() - started}
  return search_quality.finish(out, lines, report)


if __name__ == '__main__':
  main()
