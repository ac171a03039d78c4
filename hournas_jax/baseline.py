"""The searched architecture against random ones of the same budget (config.baseline).

`compare_with_random` trains the architecture and config.baseline.architectures random ones
within 5% of its budget, config.baseline.seeds seeds each (population training, resumable in
<workdir>/baseline) with config.train's recipe (config.baseline.epochs long when set), and says
where it falls among them and how that compares with the training noise: comparison.json, and
the lines a user reads.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Mapping, Sequence

import jax
import numpy as np

from hournas_jax import arch as arch_lib
from hournas_jax import checkpoint
from hournas_jax import costs
from hournas_jax import logging_utils
from hournas_jax import population
from hournas_jax import retrain
from hournas_jax import setup as setup_lib
from hournas_jax import spaces


def check_config(b) -> None:
  """config.baseline: raises setup.ConfigError naming the field that cannot be used."""
  setup_lib.check(b.architectures >= 2 and b.seeds >= 1 and b.workers >= 0,
                  'config.baseline.architectures must be >= 2, baseline.seeds >= 1 and '
                  'baseline.workers >= 0')
  setup_lib.check(setup_lib.finite(b.epochs) and b.epochs >= 0,
                  f'config.baseline.epochs must be >= 0 (0 = config.train.epochs), got '
                  f'{b.epochs}')


def comparison_setup(setup: setup_lib.Setup) -> setup_lib.Setup:
  """`setup` with the members' recipe: config.train, config.baseline.epochs long when set."""
  epochs = float(setup.config.baseline.epochs)
  if not epochs:
    return setup
  config = copy.deepcopy(setup.config)
  config.train.epochs = epochs
  # config.train.steps would take precedence over the epochs.
  config.train.steps = 0
  return dataclasses.replace(setup, config=config)


def baseline_budget(space: spaces.SearchSpace, targets, ops: Sequence[str]) -> dict:
  """The targets that are set, or the architecture's own params and FLOPs when none is."""
  budget = {key: float(targets[key]) for key in ('params', 'flops') if targets[key]}
  if budget:
    return budget
  own = costs.cost_tables(space).cost(arch_lib.Architecture(space.name, tuple(ops)).indices(
      space))
  return {'params': float(own[0]), 'flops': float(own[1])}


def compare_with_random(setup: setup_lib.Setup, ops: Sequence[str],
                        retrained: Mapping | None = None) -> dict:
  """Trains the architecture and config.baseline.architectures random ones of its budget with
  config.baseline.seeds seeds each (population training, resumable in <workdir>/baseline) and
  says where it falls among them and how that compares with the training noise.

  retrained: the results of `ops` retrained with config.train and config.seed (retrain.run's,
  with its wall_s). Where the comparison trains with that same recipe and seed, they stand for
  that member instead of a second, identical training."""
  full = setup
  setup = comparison_setup(setup)
  config, space = setup.config, setup.space
  b = config.baseline
  budget = baseline_budget(space, config.targets, ops)
  random_archs = population.random_architectures(space, budget, int(b.architectures),
                                                 seed=int(config.seed))
  seeds = range(int(b.seeds))
  directory = os.path.join(setup.workdir, 'baseline')
  # One process only: the others of a run would read the store before process 0 wrote it.
  if (retrained is not None and setup is full and int(config.seed) in seeds
      and jax.process_count() == 1):
    population.add_trained(setup, population.Member(tuple(ops), int(config.seed), 'searched'),
                           retrained, directory)
  members = [population.Member(tuple(ops), s, 'searched') for s in seeds]
  members += [population.Member(a, s, 'random') for a in random_archs for s in seeds]
  records = population.train_population(setup, members, directory,
                                        workers=population.default_workers(int(b.workers)),
                                        log_prefix='[baseline]')
  per_epoch = setup.steps_per_epoch('train', config.train.batch_size)
  steps = retrain.total_steps(config.train, per_epoch)
  means = population.mean_by_architecture(records)
  searched = means[tuple(ops)]
  random_means = np.array([means[tuple(a)][0] for a in random_archs])
  seed_stds = [v[1] for v in means.values() if np.isfinite(v[1])]
  noise = float(np.mean(seed_stds)) if seed_stds else float('nan')
  rank = 1 + int(np.sum(random_means > searched[0]))
  comparison = {
      'budget': budget, 'seeds': len(seeds), 'steps': steps, 'epochs': steps / per_epoch,
      'searched': {'ops': list(ops), 'top1': searched[0],
                   'top1_seeds': [r['top1'] for r in records[:len(seeds)]],
                   'params': records[0]['params'], 'flops': records[0]['flops']},
      'random': {'architectures': [list(a) for a in random_archs],
                 'top1': random_means.tolist(), 'median': float(np.median(random_means)),
                 'min': float(random_means.min()), 'max': float(random_means.max()),
                 'std': float(np.std(random_means, ddof=1)) if len(random_means) > 1 else 0.0},
      'rank': rank, 'of': len(random_archs) + 1,
      'percentile': float(100.0 * np.mean(random_means < searched[0])),
      'seed_std': noise,
  }
  if jax.process_index() == 0:
    checkpoint.atomic_write_json(os.path.join(setup.workdir, 'comparison.json'), comparison)
  logging_utils.info(comparison_text(comparison))
  return comparison


def comparison_text(c: Mapping) -> str:
  """What a user reads: where the searched architecture falls, against the noise."""
  pct = lambda x: f'{100 * x:.2f}%'
  r = c['random']
  seeds = c['seeds']
  gap = c['searched']['top1'] - r['median']
  after = f' after {c["epochs"]:.3g} epochs' if 'epochs' in c else ''
  lines = ['', f'searched vs {len(r["top1"])} random architectures of the same budget (test '
           f'top-1{after}, each the mean of {seeds} training seed{"s" * (seeds > 1)}):',
           f'  searched  {pct(c["searched"]["top1"])}  '
           f'{",".join(c["searched"]["ops"])}',
           f'  random    median {pct(r["median"])}, range {pct(r["min"])} to {pct(r["max"])}, '
           f'std {pct(r["std"])} between architectures',
           f'  the searched architecture ranks {c["rank"]} of {c["of"]} '
           f'({c["percentile"]:.0f}th percentile of the random ones), '
           f'{100 * gap:+.2f} points from their median.']
  if np.isfinite(c['seed_std']):
    noise = c['seed_std'] / np.sqrt(seeds)
    verdict = ('beyond' if abs(gap) > 2 * noise else 'within') + ' the training noise'
    lines.append(f'  training noise: {pct(c["seed_std"])} between seeds of one architecture, '
                 f'{pct(noise)} for a {seeds}-seed mean: the gap is {verdict}'
                 + (f' ({abs(gap) / noise:.1f}x)' if noise > 0 else '') + '.')
  else:
    lines.append('  training noise unknown with 1 seed per architecture: set '
                 'config.baseline.seeds >= 2 to tell a real gap from noise.')
  return '\n'.join(lines)
