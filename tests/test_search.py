"""The HourNAS search on a tiny space, fed arrays directly."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from hournas_jax import costs, proposals, search, singlepath, spaces, vital, wholenet
from spaces_for_tests import toy_space

RES = 16
SPACE = toy_space(RES)
VITAL = vital.vital_layers(SPACE)


def _config(**overrides):
  cfg = dict(num_proposals=4, proposal_iterations=0, tau0=5.0, tau_decay=0.9999, weight_lr=0.1,
             momentum=0.9, weight_decay=4e-5, arch_lr=0.01, alpha=1.0, vital_priority=True,
             sampler='gumbel_max', val_every=2)
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def _targets(ops=('k3e3', 'k3e3', 'k3e1', 'k3e3', 'skip')):
  """Targets that an architecture of the toy space meets exactly."""
  tables = costs.cost_tables(SPACE)
  params, flops = tables.cost([SPACE.op_names.index(o) for o in ops])
  return ml_collections.ConfigDict({'params': float(params), 'flops': float(flops)})


def _data(n=16, seed=0):
  """Ten classes, each a fixed random template plus noise: easy to learn."""
  rng = np.random.default_rng(seed)
  templates = np.random.default_rng(99).standard_normal((10, RES, RES, 3))
  labels = rng.integers(0, 10, n)
  images = templates[labels] + 0.5 * rng.standard_normal((n, RES, RES, 3))
  return {'image': jnp.asarray(images, jnp.float32), 'label': jnp.asarray(labels, jnp.int32)}


def _record_paths(searcher, paths):
  """Wraps the engines' steps to record the sampled paths (layer -> op)."""
  original = searcher.engine

  def engine(meta):
    eng = original(meta)
    if not getattr(eng, '_recording', False):
      step, grads = eng.train_step, eng.arch_grads
      eng.train_step = lambda st, x, y, path, lr: (paths.append(dict(path)), step(st, x, y, path,
                                                                                    lr))[1]
      eng.arch_grads = lambda st, x, y, path: (paths.append(dict(path)), grads(st, x, y, path))[1]
      eng._recording = True
    return eng
  searcher.engine = engine


def _run(searcher, state, batches=None):
  metrics = []
  i = 0
  while searcher.stage(state) != 'done':
    tr = (batches or [_data(seed=i)])[i % len(batches or [0])]
    val = _data(seed=1000 + i) if searcher.needs_val(state) else None
    state, m = searcher.train_step(state, tr, val)
    metrics.append(m)
    i += 1
  return state, metrics


def test_two_stage_search_end_to_end():
  s = search.Searcher(SPACE, _config(), _targets(), (RES, RES, 3), vital_steps=4,
                      nonvital_steps=4)
  paths = []
  _record_paths(s, paths)
  state = s.init(0)
  assert s.stage(state) == 'vital'
  # S_vital holds the vital SuperBlocks only.
  chain = [l.name for l, _ in s.engine(state['meta']).chain]
  assert chain == ['stem', *VITAL, 'head']
  state, metrics = _run(s, state)
  assert [m['stage'] for m in metrics] == ['vital'] * 4 + ['nonvital'] * 4
  stage1, stage2 = paths[:6], paths[6:]  # 4 weight steps + 2 architecture steps each
  assert all(set(p) == set(VITAL) for p in stage1)
  nonvital = [n for n in SPACE.searchable_names if n not in VITAL]
  assert all(set(p) == set(nonvital) for p in stage2)
  # Stage 2 runs the vital ops fixed by stage 1.
  vital_ops = state['meta']['vital_ops']
  assert set(vital_ops) == set(VITAL)
  stage2_net = s.engine(state['meta']).net
  for layer, ops in zip(SPACE.layers, stage2_net.ops):
    if layer.name in vital_ops:
      assert ops == (vital_ops[layer.name],)
  result = s.result(state)
  assert all(result['ops'][n] == op for n, op in vital_ops.items())
  tables = costs.cost_tables(SPACE)
  ops = [result['ops'][n] for n in SPACE.searchable_names]
  assert (result['params'], result['flops']) == tables.cost(
      [SPACE.op_names.index(o) for o in ops])
  assert len(result['pi']) == 4 and np.isclose(sum(result['pi']), 1.0)
  assert metrics[-1]['tau'] < metrics[0]['tau']
  # Taus follow the paper's schedule, one multiplication per iteration.
  np.testing.assert_allclose([m['tau'] for m in metrics], 5.0 * 0.9999 ** np.arange(8))


def test_same_seed_same_architecture():
  results = []
  for _ in range(2):
    s = search.Searcher(SPACE, _config(), _targets(), (RES, RES, 3), 2, 2)
    state, _ = _run(s, s.init(7))
    results.append(s.result(state))
  assert results[0]['ops'] == results[1]['ops']
  np.testing.assert_allclose(results[0]['pi'], results[1]['pi'])


def test_proposals_meet_the_targets_when_stage_two_starts():
  # A space with enough layers for a proposal to be a real subspace: the toy one has too few
  # architectures near any target.
  space = spaces.get_space('fbnet_shallow', resolution=32, num_classes=10, width=0.25)
  ops = ['k3e3', 'k5e6', 'k3g2', 'k3e3', 'k5e1', 'k5e6', 'skip', 'k3e6', 'k3e1', 'k5e3', 'k3e3',
         'k5e6']
  params, flops = costs.cost_tables(space).cost([space.op_names.index(o) for o in ops])
  targets = ml_collections.ConfigDict({'params': float(params), 'flops': float(flops)})
  s = search.Searcher(space, _config(num_proposals=8, vital_priority=False), targets,
                      (32, 32, 3), 0, 1)
  state = s.init(0)
  assert s.stage(state) == 'nonvital'
  sampled_params, sampled_flops = s.proposal_samples(state, 4000)
  within = ((np.abs(sampled_params - params) <= 0.05 * params)
            & (np.abs(sampled_flops - flops) <= 0.05 * flops))
  assert within.mean() >= 0.9, within.mean()


def test_impossible_targets_are_refused_up_front():
  low, high = costs.cost_tables(SPACE).bounds()[1]
  with pytest.raises(proposals.ProposalError, match='reach'):
    search.Searcher(SPACE, _config(), ml_collections.ConfigDict({'params': 0.0,
                                                                 'flops': 2.0 * high}),
                    (RES, RES, 3), 1, 1)
  with pytest.raises(search.SearchError, match='at least one'):
    search.Searcher(SPACE, _config(), ml_collections.ConfigDict({'params': 0.0, 'flops': 0.0}),
                    (RES, RES, 3), 1, 1)


def test_vital_stage_finds_the_clearly_better_op():
  """S_vital's weights are trained on the k3e3 path only, so k3e3 is the clearly better op of
  both vital layers (k3e1 keeps random weights). With the weights frozen, the architecture
  steps alone must find it."""
  s = search.Searcher(SPACE, _config(weight_lr=0.0, arch_lr=0.05, val_every=1), _targets(),
                      (RES, RES, 3), vital_steps=30, nonvital_steps=1)
  state = s.init(0)
  engine = s.engine(state['meta'])
  good = {n: 'k3e3' for n in VITAL}
  weights = state['weights']
  for i in range(40):
    batch = _data(32, seed=i)
    weights, m = engine.train_step(weights, batch['image'], batch['label'], good, 0.1)
  assert m['loss'] < 1.0  # the k3e3 path has learnt the task
  state = {**state, 'weights': weights}
  while s.stage(state) == 'vital':
    state, _ = s.train_step(state, _data(32, seed=500), _data(32, seed=600))
  assert state['meta']['vital_ops'] == good


def test_ablation_switches():
  targets = _targets()
  # Without vital-block priority: one stage over every SuperBlock.
  s = search.Searcher(SPACE, _config(vital_priority=False, num_proposals=2), targets,
                      (RES, RES, 3), 5, 1)
  state = s.init(0)
  assert s.stage(state) == 'nonvital'
  assert s.choice_layers(state['meta']) == SPACE.searchable_names
  assert state['arch']['thetas'].shape == (2, len(SPACE.searchable_names), len(SPACE.op_names))
  assert state['arch']['pi'].shape == (2,)
  assert isinstance(s.engine(state['meta']), singlepath.SinglePathEngine)
  # Gumbel-softmax over all candidates: every candidate of every searched layer trains.
  s = search.Searcher(SPACE, _config(sampler='gumbel_softmax'), targets, (RES, RES, 3), 5, 1)
  state = s.init(0)
  assert isinstance(s.engine(state['meta']), wholenet.WholeNetEngine)
  new_state, _ = s.train_step(state, _data(), None)
  for n in VITAL:
    for op in SPACE.layer(n).ops:
      before = jax.tree.leaves(state['weights']['params'][n][op])
      after = jax.tree.leaves(new_state['weights']['params'][n][op])
      assert any(not np.array_equal(a, b) for a, b in zip(before, after)), (n, op)
