"""Population training (resumable store, fingerprints, random budgets) and the ranking tools."""

import concurrent.futures
import math
import os
import pathlib
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from configs import default as default_lib
from hournas_jax import setup as setup_lib
from hournas_jax import baseline, costs, population, ranking, spaces
from spaces_for_tests import toy_space

REPO_ROOT = pathlib.Path(__file__).parent.parent


def _setup(tmp_path, **train_overrides):
  config = default_lib.get_config()
  config.dataset = 'digits'
  config.image_size = 8
  config.channels = 1
  config.xla_fast_compile = True
  t = config.train
  t.batch_size = 64
  t.steps = 3
  t.eval_batch_size = 360
  for k, v in train_overrides.items():
    t[k] = v
  setup = setup_lib.resolve_setup(config, str(tmp_path))
  setup.space = toy_space(8)
  return setup


OPS = [('k3e1', 'k3e3', 'skip', 'k3e1', 'k3e3'), ('k3e3', 'k3e1', 'k3e1', 'k3e3', 'skip')]


def test_population_trains_each_member_once_and_resumes(tmp_path, monkeypatch):
  setup = _setup(tmp_path)
  calls = []
  real = population.train_member
  monkeypatch.setattr(population, 'train_member',
                      lambda s, ops, seed: calls.append((tuple(ops), seed)) or real(s, ops, seed))
  members = [population.Member(ops, seed, 'random') for ops in OPS for seed in (0, 1)]
  # A method that finds an architecture already listed does not train it twice.
  records = population.train_population(setup, members + [population.Member(OPS[0], 0, 'dup')],
                                        str(tmp_path / 'pop'))
  assert len(calls) == 4 and len(records) == 5
  tables = costs.cost_tables(setup.space)
  for member, record in zip(members, records):
    assert record['ops'] == list(member.ops) and record['seed'] == member.seed
    assert (record['params'], record['flops']) == tables.cost(
        [setup.space.op_names.index(o) for o in member.ops])
    assert 0.0 <= record['top1'] <= 1.0 and record['wall_s'] > 0
  # Seeds differ in their data and initialisation, so their results differ.
  assert records[0]['loss'] != records[1]['loss']
  # A rerun trains nothing and returns the stored records; a new member alone is trained.
  calls.clear()
  again = population.train_population(setup, members, str(tmp_path / 'pop'))
  assert calls == [] and again == records[:4]
  population.train_population(setup, members + [population.Member(OPS[0], 2)],
                              str(tmp_path / 'pop'))
  assert calls == [(OPS[0], 2)]


def test_store_skips_a_cut_short_line_and_other_recipes(tmp_path):
  store = population.Store(str(tmp_path))
  store.append({'ops': ['a'], 'seed': 0, 'recipe': 'r1', 'top1': 0.5})
  with open(store.path, 'a') as f:
    f.write('{"ops": ["b"], "seed": 0, "rec')  # a crash mid-write
  store.append({'ops': ['c'], 'seed': 1, 'recipe': 'r1', 'top1': 0.7})
  store.append({'ops': ['a'], 'seed': 0, 'recipe': 'r2', 'top1': 0.1})
  assert set(store.done('r1')) == {(('a',), 0), (('c',), 1)}
  assert store.done('r2')[('a',), 0]['top1'] == 0.1
  lines = open(store.path).read().splitlines()
  assert sum(1 for line in lines if line.startswith('{"ops": ["b"]')) == 1


def test_recipe_fingerprint_follows_what_changes_results(tmp_path):
  a = _setup(tmp_path)
  b = _setup(tmp_path, learning_rate=0.05)
  c = _setup(tmp_path, eval_batch_size=100, arch='hournas_a')
  assert population.recipe_fingerprint(a) != population.recipe_fingerprint(b)
  assert population.recipe_fingerprint(a) == population.recipe_fingerprint(c)


def test_a_diverged_member_fails_with_its_architecture_and_the_remedy(tmp_path):
  setup = _setup(tmp_path, learning_rate=1e12, lr_scaling='none', warmup_epochs=0.0)
  with pytest.raises(population.retrain.TrainingError) as error:
    population.train_member(setup, OPS[0], 0)
  message = str(error.value)
  assert ','.join(OPS[0]) in message and 'non-finite test loss' in message
  assert 'config.train.learning_rate' in message


def test_the_retraining_stands_in_for_the_comparisons_member_of_its_seed(tmp_path,
                                                                           monkeypatch):
  setup = _setup(tmp_path, steps=12)
  config = setup.config
  # No targets: the comparison's budget is the architecture's own costs.
  config.targets.params = config.targets.flops = 0
  config.baseline.architectures, config.baseline.seeds, config.baseline.workers = 2, 2, 1
  retrained = population.retrain.run(setup, str(tmp_path / 'train'), OPS[1])
  # What makes it valid: the retraining is the member's training, figure for figure.
  member = population.train_member(setup, OPS[1], int(config.seed))
  assert (member['top1'], member['loss']) == (retrained['top1'], retrained['loss'])
  calls = []
  real = population.train_member
  monkeypatch.setattr(population, 'train_member',
                      lambda s, ops, seed: calls.append((tuple(ops), seed)) or real(s, ops, seed))
  comparison = baseline.compare_with_random(setup, OPS[1],
                                            retrained={**retrained, 'wall_s': 1.0})
  assert (OPS[1], 0) not in calls and (OPS[1], 1) in calls and len(calls) == 5
  assert comparison['searched']['top1_seeds'][0] == retrained['top1']
  # A comparison of another length trains its own member of that seed.
  config.baseline.epochs = 0.01
  calls.clear()
  baseline.compare_with_random(setup, OPS[1], retrained={**retrained, 'wall_s': 1.0})
  assert (OPS[1], 0) in calls


def test_the_comparison_trains_baseline_epochs_long_and_leaves_the_config_alone(tmp_path):
  setup = _setup(tmp_path)
  setup.config.baseline.epochs = 0.0
  assert baseline.comparison_setup(setup) is setup
  setup.config.baseline.epochs = 2.0
  short = baseline.comparison_setup(setup)
  # config.train.steps (3 here) would override the epochs: the comparison clears it.
  assert (short.config.train.epochs, short.config.train.steps) == (2.0, 0)
  assert (setup.config.train.epochs, setup.config.train.steps) != (2.0, 0)
  assert short.space is setup.space and short.workdir == setup.workdir
  # Members of the shorter recipe are stored apart from those of config.train's.
  assert population.recipe_fingerprint(short) != population.recipe_fingerprint(setup)
  setup.config.baseline.epochs = -1.0
  with pytest.raises(setup_lib.ConfigError, match='config.baseline.epochs must be >= 0'):
    baseline.check_config(setup.config.baseline)


def test_random_architectures_lie_within_the_budget_and_are_distinct():
  space = spaces.get_space('fbnet_shallow', 24, 10, 0.25,
                           ('k3e1', 'k3e3', 'k3e6', 'k5e1', 'k5e3', 'k5e6', 'skip'), stem_stride=1)
  tables = costs.cost_tables(space)
  targets = {'params': 120e3, 'flops': 1.45e6}
  archs = population.random_architectures(space, targets, 25, seed=0)
  assert len(set(archs)) == 25
  for ops in archs:
    params, flops = tables.cost([space.op_names.index(o) for o in ops])
    assert abs(params - 120e3) <= 6e3 and abs(flops - 1.45e6) <= 0.05 * 1.45e6
  assert archs == population.random_architectures(space, targets, 25, seed=0)
  # Without targets, each layer's op is uniform over its candidates.
  many = population.random_architectures(space, {}, 3000, seed=1)
  for i, layer in enumerate(space.searchable_layers):
    counts = np.array([sum(ops[i] == op for ops in many) for op in layer.ops])
    np.testing.assert_allclose(counts / 3000, 1 / len(layer.ops), atol=0.03)
  with pytest.raises(spaces.SpaceError, match='fall within'):
    population.random_architectures(space, {'params': 63e3, 'flops': 3.0e6}, 3, seed=0,
                                    max_draws=20000)


def test_uniform_architectures_are_the_one_op_networks_within_the_budget():
  space = spaces.get_space('fbnet_shallow', 24, 10, 0.25,
                           ('k3e1', 'k3e3', 'k3e6', 'k5e1', 'k5e3', 'k5e6', 'skip'), stem_stride=1)
  tables = costs.cost_tables(space)
  cost = {op: tables.cost([space.op_names.index(op)] * len(space.searchable_names))
          for op in ('k3e1', 'k3e3', 'k3e6', 'k5e1', 'k5e3', 'k5e6')}
  # Between k3e3's and k5e3's FLOPs (1.20M and 1.61M): k5e3, k3e6 and k5e6 are over budget.
  targets = {'params': 150e3, 'flops': 1.45e6}
  archs = population.uniform_architectures(space, targets)
  kept = [ops[0] for ops in archs]
  assert all(len(set(ops)) == 1 and len(ops) == len(space.searchable_names) for ops in archs)
  assert set(kept) == {op for op, (p, f) in cost.items() if p <= 1.05 * 150e3
                       and f <= 1.05 * 1.45e6}
  assert set(kept) == {'k3e1', 'k3e3', 'k5e1'}
  # skip is not offered by the downsampling layers, so there is no all-skip network.
  assert 'skip' not in kept
  assert [cost[op][0] for op in kept] == sorted((cost[op][0] for op in kept), reverse=True)
  # A budget only the smallest fits; one none fits.
  assert population.uniform_architectures(space, {'params': 70e3}) == [('k3e1',) * 12]
  assert population.uniform_architectures(space, {'params': 10e3}) == []


def test_mean_by_architecture():
  records = [{'ops': ['a'], 'top1': 0.5}, {'ops': ['a'], 'top1': 0.7}, {'ops': ['b'],
                                                                         'top1': 0.9}]
  means = population.mean_by_architecture(records)
  assert means[('a',)][0] == pytest.approx(0.6) and means[('a',)][2] == 2
  assert means[('a',)][1] == pytest.approx(np.std([0.5, 0.7], ddof=1))
  assert means[('b',)][0] == 0.9 and math.isnan(means[('b',)][1])


def test_kendall_tau_against_hand_counted_pairs():
  assert ranking.kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
  assert ranking.kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
  # 5 items, one swapped pair: 9 concordant, 1 discordant of 10 -> 0.8.
  assert ranking.kendall_tau([1, 2, 3, 4, 5], [1, 3, 2, 4, 5]) == pytest.approx(0.8)
  # Ties (tau-b): x = [1, 1, 2], y = [1, 2, 3]: pairs (1,2) tie in x; 2 concordant of 2 untied
  # in x, 3 in y: 2 / sqrt(2 * 3).
  assert ranking.kendall_tau([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / math.sqrt(6))
  assert math.isnan(ranking.kendall_tau([1], [2]))
  with pytest.raises(ValueError):
    ranking.kendall_tau([1, 2], [1, 2, 3])


def _comparison(searched, random, seed_std, seeds=2):
  random = np.asarray(random)
  return {'seeds': seeds, 'searched': {'top1': searched, 'ops': ['k3e1']},
          'random': {'top1': random.tolist(), 'median': float(np.median(random)),
                     'min': float(random.min()), 'max': float(random.max()),
                     'std': float(np.std(random, ddof=1))},
          'rank': 1 + int(np.sum(random > searched)), 'of': len(random) + 1,
          'percentile': float(100 * np.mean(random < searched)), 'seed_std': seed_std}


def test_comparison_text_weighs_the_gap_against_the_noise():
  clear = baseline.comparison_text(_comparison(0.95, [0.90, 0.91, 0.92], seed_std=0.01))
  assert 'ranks 1 of 4' in clear and '100th percentile' in clear and '+4.00 points' in clear
  assert 'beyond the training noise' in clear  # 4 points against 0.71 for a 2-seed mean
  noisy = baseline.comparison_text(_comparison(0.95, [0.90, 0.94, 0.96], seed_std=0.05))
  assert 'ranks 2 of 4' in noisy and 'within the training noise' in noisy
  single = baseline.comparison_text(_comparison(0.95, [0.90, 0.94], seed_std=float('nan'),
                                             seeds=1))
  assert 'config.baseline.seeds >= 2' in single
  short = baseline.comparison_text({**_comparison(0.95, [0.90, 0.94], seed_std=0.01),
                                    'epochs': 2.5})
  assert 'test top-1 after 2.5 epochs, each the mean of 2 training seeds' in short


def test_a_worker_ends_when_its_parent_is_killed(tmp_path):
  """exit_with_parent (every pool worker calls it) ends a process whose parent died."""
  ready = tmp_path / 'ready'
  child_code = ('import pathlib, sys, time; from hournas_jax import population; '
                'population.exit_with_parent(0.1); pathlib.Path(sys.argv[1]).touch(); '
                'time.sleep(120)')
  parent_code = ('import subprocess, sys, time; child = subprocess.Popen([sys.executable, "-c", '
                 f'{child_code!r}, sys.argv[1]]); print(child.pid, flush=True); time.sleep(120)')
  parent = subprocess.Popen([sys.executable, '-c', parent_code, str(ready)],
                            stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
  child = int(parent.stdout.readline())
  deadline = time.time() + 120
  while not ready.exists() and time.time() < deadline:
    time.sleep(0.1)
  assert ready.exists()

  def alive(pid):
    try:
      with open(f'/proc/{pid}/stat') as f:
        return f.read().split(') ')[1][0] not in 'ZX'
    except FileNotFoundError:
      return False
  assert alive(child)
  parent.kill()
  parent.wait()
  deadline = time.time() + 20
  while alive(child) and time.time() < deadline:
    time.sleep(0.1)
  assert not alive(child)


def test_the_calling_process_trains_beside_its_workers(tmp_path, monkeypatch):
  """workers=2 spawns one process; this one trains too, starting with the first architecture
  (whose programs a caller may have compiled), and stores every record."""
  config = default_lib.get_config()
  config.dataset, config.image_size, config.channels = 'digits', 8, 1
  config.space, config.width, config.xla_fast_compile = 'fbnet_shallow', 0.25, True
  config.train.batch_size, config.train.steps, config.train.eval_batch_size = 64, 2, 360
  # The workers build their setup from the config, so the space is the config's own.
  setup = setup_lib.resolve_setup(config, str(tmp_path))
  archs = population.random_architectures(setup.space, {}, 3, seed=0)
  here = []
  real = population._train_architecture  # pylint: disable=protected-access

  def train_here(s, recipe, group):
    here.append(group[0].ops)
    records = real(s, recipe, group)
    # The worker takes every other architecture before this one ends: its results, and the
    # end of the feeding, arrive while this process is still at work.
    deadline = time.time() + 300
    while (any(t.name == 'population_feeder' for t in threading.enumerate())
           and time.time() < deadline):
      time.sleep(0.1)
    return records
  monkeypatch.setattr(population, '_train_architecture', train_here)
  members = [population.Member(a, seed) for a in archs for seed in (0, 1)]
  records = population.train_population(setup, members, str(tmp_path / 'pop'), workers=2)
  assert [(tuple(r['ops']), r['seed']) for r in records] == [(m.ops, m.seed) for m in members]
  assert all(0.0 <= r['top1'] <= 1.0 for r in records)
  stored = population.Store(str(tmp_path / 'pop')).done(population.recipe_fingerprint(setup))
  assert set(stored) == {(m.ops, m.seed) for m in members}
  # The first architecture here, the others in the worker.
  assert here == [archs[0]]
  # A training that fails, here or in the worker, fails the population with its message.
  config.train.update(learning_rate=1e12, lr_scaling='none', warmup_epochs=0.0)
  with pytest.raises(population.retrain.TrainingError, match='non-finite test loss'):
    population.train_population(setup, members, str(tmp_path / 'diverged'), workers=2)


def test_a_worker_that_dies_fails_its_job_instead_of_hanging(tmp_path):
  setup = _setup(tmp_path)
  with population.worker_pool(setup.config, str(tmp_path), 1) as pool:
    alive = pool.submit(os.getpid)
    assert alive.result(timeout=120) != os.getpid()
    died = pool.submit(os._exit, 3)  # pylint: disable=protected-access
    with pytest.raises(concurrent.futures.process.BrokenProcessPool):
      died.result(timeout=120)
