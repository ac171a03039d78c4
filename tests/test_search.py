"""The HourNAS search on a tiny space, fed arrays directly."""

import itertools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default
from hournas_jax import (analysis, arch as arch_lib, checkpoint, costs, engines, proposals,
                         sampling, search, spaces, stages, supernet, vital)
from hournas_jax.engines import all_candidates, single_path
from hournas_jax.tools import proposals as proposals_tool
from spaces_for_tests import toy_space

RES = 16
SPACE = toy_space(RES)
VITAL = vital.vital_layers(SPACE)
W, A = (True, False), (False, True)  # the batches of a weight step and of an architecture step


def _config(**overrides):
  """config.search of the defaults, small and fast (no proposal iterations, m = 4)."""
  cfg = default.get_search_config()
  cfg.update(dict(num_proposals=4, proposal_iterations=0, val_every=2))
  cfg.update(overrides)
  return cfg


def _target_config(params=0.0, flops=0.0, latency_ms=0.0):
  """config.targets with these targets (0 = none)."""
  return ml_collections.ConfigDict({'params': float(params), 'flops': float(flops),
                                    'latency_ms': float(latency_ms)})


def _targets(ops=('k3e3', 'k3e3', 'k3e1', 'k3e3', 'skip'), space=SPACE):
  """Targets that an architecture of the space meets exactly."""
  params, flops = costs.cost_tables(space).cost([space.op_names.index(o) for o in ops])
  return _target_config(params, flops)


def _data(n=16, seed=0, res=RES):
  """Ten classes, each a fixed random template plus noise: easy to learn."""
  rng = np.random.default_rng(seed)
  templates = np.random.default_rng(99).standard_normal((10, res, res, 3))
  labels = rng.integers(0, 10, n)
  images = templates[labels] + 0.5 * rng.standard_normal((n, res, res, 3))
  return {'image': jnp.asarray(images, jnp.float32), 'label': jnp.asarray(labels, jnp.int32)}


def _recording_engines(space, cfg, paths):
  """An engine factory: the engines `cfg` names, their steps recording the sampled paths
  (layer -> op) into `paths`."""
  build = search.config_engine_factory(space, cfg)

  def factory(layer_ops):
    eng = build(layer_ops)
    step, grads = eng.train_step, eng.arch_grads
    eng.train_step = lambda w, batch, choice, lr: (
        paths.append(choice.path(space)), step(w, batch, choice, lr))[1]
    eng.arch_grads = lambda w, batch, choice: (
        paths.append(choice.path(space)), grads(w, batch, choice))[1]
    return eng
  return factory


class _StubEngine:
  """Stands in for a stage's networks (the engine interface, `engines.Engine`), so that a test of
  the schedule or of the architecture update compiles none: weight steps leave the weights as
  they are, architecture steps return grad_a(A) (zeros by default) as d cross-entropy / d A, A
  the sampled one-hot [L, O], and forward-only steps ('reinforce') loss(idx) (1 by default) as
  the D_val loss of the sampled op indices [L]."""

  runs = 'path'

  def __init__(self, engine, grad_a, loss):
    self.engine, self.grad_a, self.loss = engine, grad_a, loss

  def __getattr__(self, name):  # init, state_shapes, net, chain: the real engine's
    return getattr(self.engine, name)

  def train_step(self, weights, batch, choice, lr):
    return weights, {'loss': 1.0, 'accuracy': 0.0}

  def arch_grads(self, weights, batch, choice):
    g = jnp.zeros(choice.a.shape) if self.grad_a is None else self.grad_a(choice.a)
    return weights, {'loss': 1.0, 'accuracy': 0.0}, g

  def path_loss(self, weights, batch, choice):
    loss = 1.0 if self.loss is None else self.loss(np.asarray(choice.idx))
    return weights, {'loss': loss, 'accuracy': 0.0}


def _stub_engines(space=SPACE, grad_a=None, loss=None):
  """An engine factory whose engines are `_StubEngine`s (see there) over the default config's
  engine (which gives their initial state)."""
  build = search.config_engine_factory(space, _config())
  return lambda layer_ops: _StubEngine(build(layer_ops), grad_a, loss)


def _run(searcher, state, steps=None, res=RES):
  """Runs to the end of the search (or `steps` iterations), giving the batches it asks for."""
  metrics = []
  while state.stage != 'done' and (steps is None or len(metrics) < steps):
    i = int(state.counters['step'])
    needs_tr, needs_val = searcher.batches_needed(state)
    tr = _data(seed=i, res=res) if needs_tr else None
    val = _data(seed=1000 + i, res=res) if needs_val else None
    state, m = searcher.train_step(state, tr, val)
    metrics.append({**m, 'batches': (needs_tr, needs_val)})
  return state, metrics


def _set_arch(searcher, state, arch):
  return state.replace(arch=arch, arch_opt=searcher.arch_tx.init(arch))


def _one_hot_ops(space, op, scale, m=None):
  theta = scale * jax.nn.one_hot(jnp.full(len(space.searchable_names), space.op_names.index(op)),
                                 len(space.op_names))
  return theta if m is None else jnp.broadcast_to(theta, (m, *theta.shape))


# --------------------------------------------------------------------------------------------
# The two stages end to end.


def test_two_stage_search_end_to_end():
  targets = _targets()
  paths = []
  s = search.Searcher(SPACE, _config(), targets, (RES, RES, 3), vital_steps=4, nonvital_steps=4,
                      engine_factory=_recording_engines(SPACE, _config(), paths))
  state = s.init(0)
  assert state.stage == 'vital'
  # S_vital holds the vital SuperBlocks only.
  chain = [l.name for l, _ in s.stage_of(state).engine.chain]
  assert chain == ['stem', *VITAL, 'head']
  state, metrics = _run(s, state)
  assert [m['stage'] for m in metrics] == ['vital'] * 4 + ['nonvital'] * 4
  stage1, stage2 = paths[:6], paths[6:]  # 4 weight steps + 2 architecture steps each
  assert all(set(p) == set(VITAL) for p in stage1)
  nonvital = [n for n in SPACE.searchable_names if n not in VITAL]
  assert all(set(p) == set(nonvital) for p in stage2)
  # Stage 2 runs the vital ops fixed by stage 1.
  vital_ops = state.vital_ops
  assert set(vital_ops) == set(VITAL)
  stage2_net = s.stage_of(state).engine.net
  for layer, ops in zip(SPACE.layers, stage2_net.ops):
    if layer.name in vital_ops:
      assert ops == (vital_ops[layer.name],)
  result = s.result(state)
  assert all(result['ops'][n] == op for n, op in vital_ops.items())
  # The reported params are those of the network the architecture builds.
  ops = [result['ops'][n] for n in SPACE.searchable_names]
  net = supernet.SuperNet(SPACE, supernet.fixed_layer_ops(SPACE, ops))
  built = net.variable_shapes((RES, RES, 3))['params']
  assert result['params'] == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(built))
  assert result['deviation'] == pytest.approx(
      {'params': result['params'] / targets.params - 1, 'flops': result['flops'] / targets.flops
       - 1})
  assert len(result['pi']) == 4 and np.isclose(sum(result['pi']), 1.0)
  # The probabilities reported are those the search sampled from: each stage's at the tau it
  # ended with (the vital layers' after 4 iterations, the others' after 8), not at tau = 1.
  assert result['tau'] == pytest.approx(5.0 * 0.9999 ** 8)
  assert set(result['probabilities']) == set(SPACE.searchable_names)
  vital_stage = s.stage_of(state.replace(stage='vital'))
  for stage, thetas, tau in (
      (vital_stage, np.asarray(result['theta_vital']), 5.0 * 0.9999 ** 4),
      (s.stage_of(state), np.asarray(state.arch['thetas'][int(np.argmax(result['pi']))]),
       result['tau'])):
    for name, theta in zip(stage.layers, thetas):
      allowed = [j for j, op in enumerate(SPACE.op_names) if op in SPACE.layer(name).ops]
      logits = theta[allowed] / tau
      expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
      got = [result['probabilities'][name][SPACE.op_names[j]] for j in allowed]
      np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
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


@pytest.mark.parametrize('temperature', ['logits', 'relaxed'])
def test_proposals_meet_the_targets_and_so_does_the_found_architecture(temperature):
  # A space with enough layers for a proposal to be a real subspace: the toy one has too few
  # architectures near any target.
  space = spaces.get_space('fbnet_shallow', resolution=32, num_classes=10, width=0.25)
  ops = ['k3e3', 'k5e6', 'k3g2', 'k3e3', 'k5e1', 'k5e6', 'skip', 'k3e6', 'k3e1', 'k5e3', 'k3e3',
         'k5e6']
  targets = _targets(ops, space)
  # Architecture steps take a noisy stand-in for the cross-entropy gradient.
  rng = np.random.default_rng(0)
  noise = _stub_engines(space, lambda a: jnp.asarray(rng.normal(0.0, 0.05, a.shape), jnp.float32))
  s = search.Searcher(space, _config(num_proposals=8, vital_priority=False, val_every=1,
                                     arch_lr=0.05, temperature=temperature),
                      targets, (32, 32, 3), 0, 10, engine_factory=noise)
  state = s.init(0)
  assert state.stage == 'nonvital'
  # At tau0 = 5: 'logits' rescaled the proposals to it, 'relaxed' samples at tau = 1 anyway.
  sampled_params, sampled_flops = s.proposal_samples(state, 4000)
  within = ((np.abs(sampled_params - targets.params) <= 0.05 * targets.params)
            & (np.abs(sampled_flops - targets.flops) <= 0.05 * targets.flops))
  assert within.mean() >= 0.9, within.mean()
  # After the architecture steps, the result is the best proposal's most probable
  # architecture, and it must meet the targets too.
  state, _ = _run(s, state, res=32)
  result = s.result(state)
  assert set(result['deviation']) == {'params', 'flops'}
  assert max(abs(v) for v in result['deviation'].values()) <= 0.05, result['deviation']


def test_both_temperatures_start_stage_two_on_the_fitted_distribution():
  """'logits' rescales the fitted proposals to the search's tau (5 here); 'relaxed' samples at
  tau = 1 whatever tau is, so it must not rescale them: both then sample the same, fitted,
  distribution when stage 2 starts."""
  start = []
  for temperature in ('logits', 'relaxed'):
    s = search.Searcher(SPACE, _config(vital_priority=False, temperature=temperature),
                        _targets(), (RES, RES, 3), 0, 1)
    state = s.init(0)
    start.append(np.asarray(sampling.probabilities(
        state.arch['thetas'], s.tau(state), jnp.asarray(SPACE.op_mask()), temperature)))
  np.testing.assert_allclose(start[0], start[1], rtol=1e-4, atol=1e-6)
  assert start[0].max() > 0.5  # a fitted proposal, not the uniform distribution


def test_the_result_is_the_most_probable_architecture_that_meets_the_targets():
  """A proposal whose per-layer mode misses the targets yields its most probable architecture
  within 5% of them (checked against every architecture of the toy space); a mode that meets
  them is the result as it is."""
  target_ops = ('k3e3', 'k3e3', 'k3e1', 'k3e3', 'skip')
  targets = _targets(target_ops)
  s = search.Searcher(SPACE, _config(vital_priority=False, num_proposals=1), targets,
                      (RES, RES, 3), 0, 1)
  state = s.init(0)
  names, ops = SPACE.searchable_names, SPACE.op_names
  mask = SPACE.op_mask()
  # Mode: k3e3 everywhere (more than the targets); the target ops a little less probable.
  theta = np.where(mask, 0.0, -1e9)
  for l, op in enumerate(target_ops):
    theta[l, ops.index('k3e3')] = 1.0
    theta[l, ops.index(op)] = max(theta[l, ops.index(op)], 0.9)
  state = _set_arch(s, state, {'thetas': jnp.asarray(theta[None], jnp.float32),
                               'pi': jnp.zeros(1)})
  tables = costs.cost_tables(SPACE)
  t = np.array([targets.params, targets.flops])
  mode_cost = np.array(tables.cost([ops.index('k3e3')] * len(names)))
  assert np.any(np.abs(mode_cost - t) > 0.05 * t)
  logp = np.where(mask, theta, -np.inf)
  logp = logp - np.log(np.exp(logp - logp.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logp.max(-1, keepdims=True)
  feasible = [c for c in itertools.product(*[np.flatnonzero(row) for row in mask])
              if np.all(np.abs(np.array(tables.cost(list(c))) - t) <= 0.05 * t)]
  best = max(feasible, key=lambda c: sum(logp[l, o] for l, o in enumerate(c)))
  result = s.result(state)
  assert tuple(result['ops'][n] for n in names) == tuple(ops[o] for o in best)
  assert max(abs(v) for v in result['deviation'].values()) <= 0.05
  # A mode within the targets is kept.
  theta = np.where(mask, 0.0, -1e9)
  for l, op in enumerate(target_ops):
    theta[l, ops.index(op)] = 2.0
  state = _set_arch(s, state, {'thetas': jnp.asarray(theta[None], jnp.float32),
                               'pi': jnp.zeros(1)})
  assert tuple(s.result(state)['ops'][n] for n in names) == target_ops


def test_summary_flags_a_result_more_than_5_percent_off_its_targets():
  ops = ('k3e3', 'k3e3', 'k3e1', 'k3e3', 'skip')
  params, flops = costs.cost_tables(SPACE).cost([SPACE.op_names.index(o) for o in ops])
  result = {'space': SPACE.name, 'ops': dict(zip(SPACE.searchable_names, ops)),
            'targets': {'params': params / 1.1, 'flops': float(flops)}}
  lines = analysis.summary_text(SPACE, result).splitlines()
  assert [l for l in lines if l.startswith('target')] == [
      f'target params: {params / 1.1e6:.3f}M (deviation +10.0%)  ** more than 5% off the '
      'target **', f'target flops: {flops / 1e6:.3f}M (deviation +0.0%)']


def test_impossible_targets_are_refused_up_front():
  _, tables, mask, offset = costs.restrict_tables(costs.cost_tables(SPACE))
  high = costs.reachable_range(tables, mask, offset)[1][1]
  with pytest.raises(costs.TargetError, match='reach'):
    search.Searcher(SPACE, _config(), _target_config(flops=2.0 * high), (RES, RES, 3), 1, 1)
  with pytest.raises(search.SearchError, match='at least one'):
    search.Searcher(SPACE, _config(), _target_config(), (RES, RES, 3), 1, 1)
  # Each target alone is within the space's range, but a params budget this small leaves k3e1
  # the only op for both vital blocks, and after that the other layers cannot add the FLOPs.
  both = _target_config(params=3000.0, flops=130000.0)
  with pytest.raises(search.SearchError, match='no choice of the vital blocks') as error:
    search.Searcher(SPACE, _config(), both, (RES, RES, 3), 1, 1)
  assert '\n' not in str(error.value)
  search.Searcher(SPACE, _config(vital_priority=False), both, (RES, RES, 3), 1, 1)


# --------------------------------------------------------------------------------------------
# Stage 1.


def test_vital_stage_finds_the_clearly_better_op():
  """S_vital's weights are trained on the k3e3 path only, so k3e3 is the clearly better op of
  both vital layers (k3e1 keeps random weights). With the weights frozen, the architecture
  steps alone must find it."""
  s = search.Searcher(SPACE, _config(weight_lr=0.0, arch_lr=0.05, val_every=1), _targets(),
                      (RES, RES, 3), vital_steps=30, nonvital_steps=1)
  state = s.init(0)
  engine = s.stage_of(state).engine
  good = {n: 'k3e3' for n in VITAL}
  weights = state.weights
  for i in range(40):
    batch = _data(32, seed=i)
    weights, m = engine.train_path(weights, batch['image'], batch['label'], good, 0.1)
  assert m['loss'] < 1.0  # the k3e3 path has learnt the task
  state = state.replace(weights=weights)
  while state.stage == 'vital':
    state, _ = s.train_step(state, _data(32, seed=500), _data(32, seed=600))
  assert state.vital_ops == good


def test_vital_choice_keeps_the_targets_reachable(capsys):
  """theta prefers k3e3 on both vital blocks (layer3_1 more strongly), which costs more params
  than the target allows. Within reach are (k3e1, k3e1) and (k3e3, k3e1) -- not (k3e1, k3e3),
  layer3_1's k3e3 being the dearer -- and the more probable of the two is (k3e3, k3e1)."""
  targets = _target_config(params=3500.0, flops=60000.0)
  s = search.Searcher(SPACE, _config(arch_lr=0.0, val_every=1), targets, (RES, RES, 3), 1, 1,
                      engine_factory=_stub_engines())
  state = s.init(0)
  k3e3 = SPACE.op_names.index('k3e3')
  theta = jnp.zeros((2, len(SPACE.op_names))).at[0, k3e3].set(1.0).at[1, k3e3].set(3.0)
  state = _set_arch(s, state, {'theta': theta})
  table = costs.cost_tables(SPACE)
  rows = [SPACE.searchable_names.index(n) for n in VITAL]
  assert VITAL == ('layer2_1', 'layer3_1')
  assert table.fixed_params + table.params[rows, k3e3].sum() > targets.params  # out of reach
  state, _ = s.train_step(state, _data(), _data(seed=1))  # the vital stage's only step
  assert state.vital_ops == {'layer2_1': 'k3e3', 'layer3_1': 'k3e1'}
  assert state.stage == 'nonvital'
  assert 'would leave the targets out of reach' in capsys.readouterr().out


def test_best_reachable_choice_is_the_exact_optimum():
  rng = np.random.default_rng(0)
  num_layers, num_ops = 4, 5
  low, high = np.array([10.0, 20.0]), np.array([60.0, 90.0])
  found = 0
  for trial in range(12):
    log_probs = rng.normal(size=(num_layers, num_ops))
    log_probs[rng.random((num_layers, num_ops)) < 0.3] = -np.inf
    log_probs[:, 0] = rng.normal(size=num_layers)  # every layer keeps an op
    layer_costs = rng.integers(0, 100, size=(2, num_layers, num_ops)).astype(float)
    targets = np.array([rng.uniform(100, 300), rng.uniform(150, 350)])
    active = np.array([True, trial % 3 != 0])
    # Brute force over every joint choice.
    best, best_score = None, -np.inf
    for choice in itertools.product(*[np.flatnonzero(np.isfinite(r)) for r in log_probs]):
      c = layer_costs[:, range(num_layers), choice].sum(-1)
      ok = (low + c <= targets) & (targets <= high + c)
      score = log_probs[range(num_layers), choice].sum()
      if np.all(ok | ~active) and score > best_score:
        best, best_score = tuple(int(o) for o in choice), score
    found += best is not None
    for chunk in (1, 7, 2 ** 20):  # all in the loop, mixed, all vectorised
      assert costs.best_reachable_choice(log_probs, layer_costs, low, high, targets, active,
                                         chunk) == best
  assert 0 < found < 12  # both outcomes were exercised


def test_layers_with_a_single_candidate_get_no_architecture_gradient():
  """ops 'k3e1,skip' leave the vital (shape-changing) layers k3e1 alone: no gate, no error."""
  space = toy_space(RES, ops=('k3e1', 'skip'))
  assert all(space.layer(n).ops == ('k3e1',) for n in VITAL)
  targets = _targets(('k3e1', 'k3e1', 'k3e1', 'k3e1', 'skip'), space)
  s = search.Searcher(space, _config(val_every=1, num_proposals=2), targets, (RES, RES, 3), 2, 2)
  state, metrics = _run(s, s.init(0))
  assert [m['batches'] for m in metrics] == [(True, True)] * 4
  assert state.vital_ops == {n: 'k3e1' for n in VITAL}
  assert state.theta_vital == [[0.0, 0.0], [0.0, 0.0]]


def test_efficientnet_layer1_1_stays_at_the_supernets_k3e1se():
  """Table 14: the SuperNet holds layer1_1 at k3e1se. It is vital by the graph, but neither a
  vital block to search nor a layer of the proposals; architectures may still change it."""
  space = spaces.get_space('efficientnet', resolution=32, num_classes=10, width=0.5,
                           ops=('k3e1se', 'k5e6se', 'skip'))
  assert 'layer1_1' in vital.vital_layers(space)
  preset = arch_lib.preset('hournas_f')
  targets = _targets([o if o in space.op_names else 'k5e6se' for o in preset.ops], space)
  s = search.Searcher(space, _config(num_proposals=2, val_every=1), targets, (32, 32, 3), 1, 1,
                      engine_factory=_stub_engines(space))
  vital_names = s.problem.vital_names
  assert 'layer1_1' not in vital_names and len(vital_names) == 6
  state = s.init(0)
  ops = dict(zip((l.name for l in space.layers), s.stage_of(state).engine.net.ops))
  assert ops['layer1_1'] == ('k3e1se',)
  assert state.arch['theta'].shape == (6, len(space.op_names))
  state, _ = _run(s, state, steps=1, res=32)
  assert state.stage == 'nonvital'
  assert 'layer1_1' not in s.stage_of(state).layers
  assert state.arch['thetas'].shape[1] == len(space.searchable_names) - 7
  ops = dict(zip((l.name for l in space.layers), s.stage_of(state).engine.net.ops))
  assert ops['layer1_1'] == ('k3e1se',)
  result = s.result(state)
  assert result['ops']['layer1_1'] == 'k3e1se' and result['fixed_ops'] == {'layer1_1': 'k3e1se'}
  assert 'layer1_1' not in result['vital_ops']
  # The report maps theta_vital's rows to the searched vital layers, and marks layer1_1 fixed.
  probabilities = analysis.layer_probabilities(space, result)
  assert set(probabilities) == set(vital_names) | set(s.stage_of(state).layers)
  row = next(l for l in analysis.summary_text(space, result).splitlines()
             if l.startswith('layer1_1 '))
  assert row.split()[1] == 'k3e1se' and row.endswith('fixed')
  # The space still holds EfficientNet-Max's k5e6se there, and costs it.
  table = costs.cost_tables(space)
  effmax = arch_lib.resolve('efficientnet_max', spaces.get_space('efficientnet', resolution=32,
                                                                 num_classes=10, width=0.5))
  assert effmax.ops[0] == 'k5e6se'
  heavy = table.cost([space.op_names.index('k5e6se')] * len(space.searchable_names))
  light = table.cost([space.op_names.index('k3e1se')] + [space.op_names.index('k5e6se')] * 21)
  assert heavy[1] > light[1]
  # The proposals CLI fixes it as the search does.
  summary = proposals_tool.run(space, (targets.params, targets.flops), num_proposals=2, samples=100)
  assert summary['fixed'] == {'layer1_1': 'k3e1se'}


# --------------------------------------------------------------------------------------------
# Stage 2.


def test_stage_one_weights_of_the_vital_ops_carry_into_stage_two():
  s = search.Searcher(SPACE, _config(val_every=2), _targets(), (RES, RES, 3), 2, 1)
  state = s.init(0)
  seen = {}
  advance = s._advance

  def recording_advance(st):
    seen['weights'] = st.weights
    return advance(st)
  s._advance = recording_advance
  while state.stage == 'vital':
    state, _ = _run(s, state, steps=1)
  before, after = seen['weights'], state.weights
  fresh = s.stage_of(state).engine.init(state.seed + 1, (RES, RES, 3))  # stage 2's own init
  for layer, op in state.vital_ops.items():
    for part in ('params', 'batch_stats', 'opt_state'):
      for x, y in zip(jax.tree.leaves(before[part][layer][op]),
                      jax.tree.leaves(after[part][layer][op])):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(
        jax.tree.leaves(after['params'][layer][op]), jax.tree.leaves(fresh['params'][layer][op])))
  for layer in ('stem', 'head'):
    for x, y in zip(jax.tree.leaves(before['params'][layer]),
                    jax.tree.leaves(after['params'][layer])):
      np.testing.assert_array_equal(x, y)


def test_pi_prefers_the_proposal_whose_architectures_are_clearly_better():
  """Proposal 0 samples the all-k3e3 architecture, proposal 1 the all-k3e1 one, on a task whose
  cross-entropy falls with every k3e3 and rises with every k3e1: L(A) = <A, C>, C = -1 on k3e3
  and +1 on k3e1, so d L / d A is C on the sampled ops, as the network's gates give it. With
  no resource term, pi must come to prefer proposal 0.

  The task is this linear stand-in rather than a trained network because the single-path
  straight-through signal is the derivative of the loss with respect to the sampled ops' output
  scales, not the loss itself: on the toy networks it does not rank a trained path above an
  untrained one reliably (its sign for the untrained path flips with XLA's optimisation flags).
  """
  ops = SPACE.op_names
  c = np.zeros(len(ops))
  c[ops.index('k3e3')], c[ops.index('k3e1')] = -1.0, 1.0
  s = search.Searcher(SPACE, _config(vital_priority=False, num_proposals=2, arch_lr=0.05,
                                     alpha=0.0, val_every=1, tau0=1.0, tau_decay=1.0),
                      _targets(), (RES, RES, 3), 0, 30,
                      # Only the sampled entries, like the gates.
                      engine_factory=_stub_engines(grad_a=lambda a: jnp.round(a) * c))
  state = s.init(0)
  thetas = jnp.stack([_one_hot_ops(SPACE, 'k3e3', 10.0), _one_hot_ops(SPACE, 'k3e1', 10.0)])
  state = _set_arch(s, state, {'thetas': thetas, 'pi': jnp.zeros(2)})
  state, _ = _run(s, state)
  pi = np.asarray(jax.nn.softmax(state.arch['pi']))
  assert pi[0] > 0.75, pi
  assert s.result(state)['proposal'] == 0


def test_gumbel_softmax_stage_two_moves_pi():
  """The ablation picks its proposal through a straight-through sample, so pi learns from the
  cross-entropy (alpha = 0: no resource term)."""
  s = search.Searcher(SPACE, _config(sampler='gumbel_softmax', vital_priority=False,
                                     num_proposals=2, val_every=1, arch_lr=0.05, alpha=0.0),
                      _targets(), (RES, RES, 3), 0, 3)
  state = s.init(0)
  assert np.all(np.asarray(state.arch['pi']) == 0)
  state, _ = _run(s, state)
  assert np.max(np.abs(np.asarray(state.arch['pi']))) > 0.01


def test_resource_term_pulls_theta_toward_the_targets():
  """With no cross-entropy gradient, architecture steps move only by alpha * Eqn 5: started on
  the heaviest op of every layer, the expected cost must come down to the (light) targets."""
  targets = _targets(('k3e1', 'k3e1', 'skip', 'k3e1', 'skip'))
  s = search.Searcher(SPACE, _config(vital_priority=False, num_proposals=2, arch_lr=0.05,
                                     val_every=1, tau0=1.0, tau_decay=1.0),
                      targets, (RES, RES, 3), 0, 40, engine_factory=_stub_engines())
  state = s.init(0)
  state = _set_arch(s, state, {'thetas': _one_hot_ops(SPACE, 'k3e3', 2.0, m=2),
                               'pi': jnp.zeros(2)})
  _, tables, mask, offset = costs.restrict_tables(s.problem.tables)
  t = np.array([targets.params, targets.flops])

  def gap(state):
    expected = np.asarray(proposals.expected_cost(state.arch['thetas'], tables, offset, 1.0,
                                                  mask))
    mean = np.asarray(jax.nn.softmax(state.arch['pi'])) @ expected
    return np.abs(mean - t) / t

  before = gap(state)
  state, _ = _run(s, state)
  after = gap(state)
  assert np.all(after < 0.5 * before), (before, after)


# --------------------------------------------------------------------------------------------
# The schedule: which batches each iteration takes, counters, resume.


def test_interleaved_schedule_takes_a_val_batch_every_fourth_step_by_default():
  s = search.Searcher(SPACE, _config(val_every=0), _targets(), (RES, RES, 3), 8, 8,
                      engine_factory=_stub_engines())
  state = s.init(0)
  state, metrics = _run(s, state)
  assert [m['batches'] for m in metrics] == [(True, (i + 1) % 4 == 0) for i in range(16)]
  assert state.counters == {'step': 16, 'tr_step': 16, 'val_step': 4, 'stage_step': 0}
  assert s.total_steps == 16


def test_epoch_schedule_is_algorithm_1_and_resumes_exactly():
  """5 D_tr and 2 D_val steps an epoch; 6 vital weight steps: one epoch, then a partial one of
  1 weight step with its proportional architecture pass (round(2 / 5) = 0, so 1 step); 10
  non-vital weight steps: two whole epochs."""
  def searcher():
    return search.Searcher(SPACE, _config(schedule='epoch'), _targets(), (RES, RES, 3), 6, 10,
                           tr_steps_per_epoch=5, val_steps_per_epoch=2,
                           engine_factory=_stub_engines())

  s = searcher()
  state, metrics = _run(s, s.init(0))
  expected = [W] * 5 + [A] * 2 + [W] + [A] + ([W] * 5 + [A] * 2) * 2
  assert [m['batches'] for m in metrics] == expected and s.total_steps == len(expected)
  assert [m['stage'] for m in metrics] == ['vital'] * 9 + ['nonvital'] * 14
  assert state.counters == {'step': 23, 'tr_step': 16, 'val_step': 7, 'stage_step': 0}
  np.testing.assert_allclose([m['tau'] for m in metrics], 5.0 * 0.9999 ** np.arange(23))
  # The weights' cosine schedule runs over a stage's weight steps, not its iterations.
  lrs = [m['lr'] for m in metrics[:9] if 'lr' in m]
  np.testing.assert_allclose(lrs, 0.1 * 0.5 * (1 + np.cos(np.pi * np.arange(6) / 6)))

  # Stopped in the middle of an architecture pass and restored from its saved parts.
  s = searcher()
  state, first = _run(s, s.init(0), steps=6)
  state = search.SearchState.from_parts(state.arrays(), json.loads(json.dumps(state.meta())))
  s = searcher()
  resumed, rest = _run(s, state)
  assert [m['batches'] for m in first + rest] == expected
  assert resumed.counters == {'step': 23, 'tr_step': 16, 'val_step': 7, 'stage_step': 0}
  uninterrupted = searcher()
  uninterrupted, _ = _run(uninterrupted, uninterrupted.init(0))
  for x, y in zip(jax.tree.leaves(resumed.arch), jax.tree.leaves(uninterrupted.arch)):
    np.testing.assert_array_equal(x, y)


def test_arch_warmup_holds_the_architecture_for_its_share_of_each_stage():
  """arch_warmup=0.5 with 8 weight steps a stage and an architecture step every 2: the D_val
  batches of weight steps 0-3 pass without an update (the batches asked for stay the same), and
  every architecture step after them moves theta (stage 1) or Theta / pi (stage 2)."""
  grad = lambda a: a  # d loss / d A = A: every step pushes the sampled ops down
  s = search.Searcher(SPACE, _config(arch_warmup=0.5), _targets(), (RES, RES, 3), 8, 8,
                      engine_factory=_stub_engines(grad_a=grad))
  state = s.init(0)
  arch_before = jax.tree.map(np.asarray, state.arch)
  moved = []
  metrics = []
  while state.stage != 'done':
    before = jax.tree.map(np.asarray, state.arch)
    stage = state.stage
    needs = s.batches_needed(state)
    state, m = s.train_step(state, _data() if needs[0] else None, _data() if needs[1] else None)
    metrics.append(m)
    if needs[1] and stage == state.stage:
      moved.append(any(not np.array_equal(x, y) for x, y in zip(
          jax.tree.leaves(before), jax.tree.leaves(state.arch))))
  # Per stage: val steps after weight steps 1, 3 (warm-up), 5, 7 (last one ends the stage).
  assert moved == [False, False, True, False, False, True]
  assert [('val_loss' in m) for m in metrics if m['stage'] == 'vital'] == [
      False, False, False, False, False, True, False, True]
  assert state.counters['val_step'] == 8
  # The vital stage's last architecture step (it ends the stage) moved theta too.
  assert not np.array_equal(np.asarray(state.theta_vital), arch_before['theta'])


def test_vital_init_targets_starts_stage_one_where_architectures_meet_the_targets():
  """With vital_init='targets', theta_vital starts as a proposal fitted to the targets: nearly
  all its probability sits on vital choices that the other layers can complete to within 5% of
  the targets; uniform theta puts much less there. (Targets at the light end of the space,
  where heavy vital ops strand them.)"""
  targets = _targets(('k3e1', 'k3e1', 'skip', 'k3e1', 'skip'))
  fitted = search.Searcher(SPACE, _config(vital_init='targets'), targets, (RES, RES, 3), 4, 4)
  uniform = search.Searcher(SPACE, _config(), targets, (RES, RES, 3), 4, 4)
  assert np.all(np.asarray(uniform.init(0).arch['theta']) == 0.0)
  problem = fitted.problem
  tables = problem.tables.stacked()[:, problem.vital_rows]
  low, high = problem.others_range
  t = problem.targets
  vital_mask = problem.op_mask[problem.vital_rows]

  def mass_meeting_targets(theta, tau):
    logits = np.where(vital_mask, np.asarray(theta) / tau, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    total = 0.0
    for choice in itertools.product(*[np.flatnonzero(row) for row in vital_mask]):
      cost = sum(tables[:, l, o] for l, o in enumerate(choice))
      if np.all((low + cost <= 1.05 * t) & (high + cost >= 0.95 * t)):
        total += np.prod([probs[l, o] for l, o in enumerate(choice)])
    return total

  tau0 = fitted.schedule.tau0
  started = mass_meeting_targets(fitted.init(0).arch['theta'], tau0)
  assert started > 0.9 and started > mass_meeting_targets(np.zeros_like(tables[0]), tau0) + 0.2
  with pytest.raises(search.SearchError, match='search.vital_init must be one of'):
    search.check_config(_config(vital_init='proposal'))


def test_steps_given_the_wrong_batches_and_bad_settings_are_refused():
  s = search.Searcher(SPACE, _config(schedule='epoch'), _targets(), (RES, RES, 3), 2, 2,
                      tr_steps_per_epoch=2, val_steps_per_epoch=1)
  state = s.init(0)
  with pytest.raises(search.SearchError, match='takes a D_tr batch, got a D_tr batch and a '
                                               'D_val batch'):
    s.train_step(state, _data(), _data())
  with pytest.raises(search.SearchError, match='takes a D_tr batch, got no batch'):
    s.train_step(state)
  # A setting that needs the data: checked when the searcher is built.
  with pytest.raises(search.SearchError, match='needs at least one step per epoch') as error:
    search.Searcher(SPACE, _config(schedule='epoch'), _targets(), (RES, RES, 3), 2, 2)
  assert '\n' not in str(error.value)


@pytest.mark.parametrize('overrides,match', [
    ({'schedule': 'epochs'}, 'config.search.schedule must be one of interleaved, epoch'),
    ({'temperature': 'theta'}, 'config.search.temperature must be one of'),
    ({'arch_gradient': 'score'}, 'config.search.arch_gradient must be one of'),
    ({'arch_gradient': 'reinforce', 'sampler': 'gumbel_softmax'},
     "'reinforce' needs a sampled path"),
    ({'sampler': 'gumbel'}, 'config.search.sampler must be one of gumbel_max, gumbel_softmax'),
    ({'precision': 'float16'}, 'config.search.precision must be one of'),
    ({'weight_sharing': 'all'}, 'config.search.weight_sharing must be one of'),
    ({'num_proposals': 0}, r'config.search.num_proposals must be >= 1'),
    ({'proposal_entropy': -0.01}, r'config.search.proposal_entropy must be >= 0'),
    ({'val_every': -1}, r'config.search.val_every must be >= 0'),
    ({'batch_size': 0}, r'config.search.batch_size must be > 0'),
    ({'weight_lr': 0.0}, r'config.search.weight_lr must be > 0'),
    ({'arch_lr': -0.1}, r'config.search.arch_lr must be >= 0'),
    ({'tau_decay': 1.5}, r'config.search.tau_decay must be in \(0, 1\]'),
    ({'arch_warmup': 1.0}, r'config.search.arch_warmup must be in \[0, 1\)'),
    ({'engine': 'fused'}, ('config.search.engine must be one of single_path, switch, '
                           'all_candidates')),
    ({'sampler': 'gumbel_softmax', 'engine': 'single_path'},
     "runs path candidates, but sampler 'gumbel_softmax' needs .* all_candidates"),
])
def test_check_config_refuses_bad_settings_in_one_line(overrides, match):
  search.check_config(_config())  # the defaults pass
  with pytest.raises(search.SearchError, match=match) as error:
    search.check_config(_config(**overrides))
  assert '\n' not in str(error.value)


def test_ablation_switches():
  targets = _targets()
  # Without vital-block priority: one stage over every SuperBlock.
  s = search.Searcher(SPACE, _config(vital_priority=False, num_proposals=2), targets,
                      (RES, RES, 3), 5, 1)
  state = s.init(0)
  assert state.stage == 'nonvital'
  assert s.stage_of(state).layers == SPACE.searchable_names
  assert state.arch['thetas'].shape == (2, len(SPACE.searchable_names), len(SPACE.op_names))
  assert state.arch['pi'].shape == (2,)
  assert isinstance(s.stage_of(state).engine, single_path.SinglePathEngine)
  # Gumbel-softmax over all candidates: every candidate of every searched layer trains.
  s = search.Searcher(SPACE, _config(sampler='gumbel_softmax'), targets, (RES, RES, 3), 5, 1)
  state = s.init(0)
  assert isinstance(s.stage_of(state).engine, all_candidates.AllCandidatesEngine)
  new_state, _ = s.train_step(state, _data(), None)
  for n in VITAL:
    for op in SPACE.layer(n).ops:
      before = jax.tree.leaves(state.weights['params'][n][op])
      after = jax.tree.leaves(new_state.weights['params'][n][op])
      assert any(not np.array_equal(a, b) for a, b in zip(before, after)), (n, op)


def test_a_latency_target_is_a_third_resource():
  """A measured latency table (here a stand-in: each op's FLOPs at 1 GFLOP/s plus a per-layer
  call cost) makes latency_ms a target like params and FLOPs: refused when out of reach,
  fitted by the proposals, met by the result, and reported."""
  space = spaces.get_space('fbnet_shallow', resolution=32, num_classes=10, width=0.25)
  tables = costs.cost_tables(space)
  latency = np.where(tables.mask, tables.flops / 1e6 + 0.002, 0.0)  # ms
  tables = tables.with_latency(latency, tables.fixed_flops / 1e6 + 0.004)
  ops = ['k3e3', 'k5e6', 'k3g2', 'k3e3', 'k5e1', 'k5e6', 'skip', 'k3e6', 'k3e1', 'k5e3', 'k3e3',
         'k5e6']
  target = float(tables.resources([space.op_names.index(o) for o in ops])[2])
  targets = _target_config(latency_ms=target)
  cfg = _config(num_proposals=8, vital_priority=False, val_every=1, arch_lr=0.05)
  with pytest.raises(search.SearchError, match='latency table'):
    search.Searcher(space, cfg, targets, (32, 32, 3), 0, 10)  # no latency table
  high = costs.reachable_range(*costs.restrict_tables(tables)[1:])[1][2]
  with pytest.raises(costs.TargetError, match=r'latency target .* ms is outside what space'):
    search.Searcher(space, cfg, _target_config(latency_ms=2 * high), (32, 32, 3), 0, 10,
                    tables=tables)
  rng = np.random.default_rng(0)
  noise = _stub_engines(space, lambda a: jnp.asarray(rng.normal(0.0, 0.05, a.shape), jnp.float32))
  s = search.Searcher(space, cfg, targets, (32, 32, 3), 0, 10, tables=tables,
                      engine_factory=noise)
  assert list(s.problem.active) == [False, False, True]
  state = s.init(0)
  theta = state.arch['thetas']
  expected = proposals.expected_cost(theta, jnp.asarray(s.stage_of(state).tables[0], jnp.float32),
                                     jnp.asarray(s.stage_of(state).tables[2], jnp.float32),
                                     s.tau(state), s.stage_of(state).mask)
  np.testing.assert_allclose(np.asarray(expected)[:, 2], target, rtol=0.05)
  state, _ = _run(s, state, res=32)
  result = s.result(state)
  assert result['targets'] == {'params': None, 'flops': None, 'latency_ms': target}
  assert set(result['deviation']) == {'latency_ms'}
  assert abs(result['deviation']['latency_ms']) <= 0.05
  chosen = [space.op_names.index(result['ops'][n]) for n in space.searchable_names]
  assert result['latency_ms'] == pytest.approx(float(tables.resources(chosen)[2]))
  text = analysis.summary_text(space, result)
  assert f'{result["latency_ms"]:.4f} ms predicted latency' in text
  assert 'target latency_ms' in text


def test_an_engine_plugs_in_by_name_from_the_config(monkeypatch):
  """A third engine registered in engines.ENGINES is what config search.engine names: the
  searcher trains through it without knowing it, and gets the same result as through the
  single-path engine it wraps."""
  calls = []

  class CountingEngine(single_path.SinglePathEngine):
    def train_step(self, weights, batch, choice, lr):
      calls.append(('train_step', choice.layers))
      return super().train_step(weights, batch, choice, lr)

    def arch_grads(self, weights, batch, choice):
      calls.append(('arch_grads', choice.layers))
      return super().arch_grads(weights, batch, choice)

  monkeypatch.setitem(engines.ENGINES, 'counting', CountingEngine)
  results = []
  for engine in ('counting', ''):
    s = search.Searcher(SPACE, _config(engine=engine), _targets(), (RES, RES, 3), 2, 2)
    state, _ = _run(s, s.init(0))
    results.append(s.result(state))
  assert results[0]['ops'] == results[1]['ops']
  np.testing.assert_array_equal(results[0]['pi'], results[1]['pi'])
  assert [c[0] for c in calls] == ['train_step', 'train_step', 'arch_grads'] * 2
  assert calls[0][1] == VITAL and set(calls[3][1]) == set(SPACE.searchable_names) - set(VITAL)


# --------------------------------------------------------------------------------------------
# The score-function (REINFORCE) architecture gradient.


def _np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _np_grad_log_prob(theta, idx, tau, mask):
  """d / d theta of sum_l log softmax(theta_l / tau)[idx_l] over allowed ops, by hand."""
  p = _np_softmax(np.where(mask, theta / tau, -np.inf))
  return (np.eye(theta.shape[-1])[idx] - p) / tau


@pytest.mark.parametrize('tau_mode', ['logits', 'relaxed'])
def test_reinforce_gradient_is_advantage_times_score(tau_mode):
  rng = np.random.default_rng(0)
  theta = rng.normal(size=(3, 5)).astype(np.float32)
  mask = np.ones((3, 5), bool)
  mask[0, 4] = mask[2, 1] = False
  idx = np.array([1, 4, 0])
  tau, loss, baseline = 2.5, 1.7, 1.2
  tau_eff = tau if tau_mode == 'logits' else 1.0  # 'relaxed' samples from softmax(theta)
  grad_fn = jax.jit(lambda t, l, b: stages.reinforce_grads(
      lambda x: stages.path_log_prob(x, idx, tau, jnp.asarray(mask), tau_mode), t, l, b))
  got = np.asarray(grad_fn(jnp.asarray(theta), loss, baseline))
  want = (loss - baseline) * _np_grad_log_prob(theta, idx, tau_eff, mask)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert np.all(got[~mask] == 0)
  # Stage 2: log softmax(pi)[k] + the chosen proposal's log p; other proposals get nothing.
  thetas = rng.normal(size=(2, 3, 5)).astype(np.float32)
  pi = np.array([0.3, -0.4], np.float32)
  arch = {'thetas': jnp.asarray(thetas), 'pi': jnp.asarray(pi)}
  k = 1
  grads = stages.reinforce_grads(
      lambda a: stages.two_level_log_prob(a['thetas'], a['pi'], k, idx, tau, jnp.asarray(mask),
                                          tau_mode), arch, loss, baseline)
  np.testing.assert_allclose(grads['pi'], (loss - baseline) * (np.eye(2)[k] - _np_softmax(pi)),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grads['thetas'][k], (loss - baseline) * _np_grad_log_prob(
      thetas[k], idx, tau_eff, mask), rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(grads['thetas'][1 - k]) == 0)


def test_reinforce_step_is_adams_first_step_on_the_estimate():
  """One architecture step of the Searcher: theta moves by Adam's first step,
  -lr * g / (|g| + eps), on g = (L - b) * grad log p(A) of the path it sampled."""
  lr, tau = 0.01, 5.0
  seen = []
  s = search.Searcher(SPACE, _config(arch_gradient='reinforce', val_every=1, arch_lr=lr,
                                     tau_decay=1.0), _targets(), (RES, RES, 3), 5, 1,
                      engine_factory=_stub_engines(loss=lambda idx: (seen.append(idx), 2.0)[1]))
  state = s.init(0)
  rng = np.random.default_rng(1)
  theta = rng.normal(size=state.arch['theta'].shape).astype(np.float32)
  state = _set_arch(s, state, {'theta': jnp.asarray(theta)}).replace(
      arch_baseline=jnp.float32(1.5))
  new, _ = s.train_step(state, _data(), _data(seed=1))
  mask = SPACE.op_mask()[[SPACE.searchable_names.index(n) for n in VITAL]]
  g = (2.0 - 1.5) * _np_grad_log_prob(theta, seen[0], tau, mask)
  np.testing.assert_allclose(new.arch['theta'] - theta, -lr * g / (np.abs(g) + 1e-8),
                             rtol=1e-4, atol=1e-7)
  assert float(new.arch_baseline) == pytest.approx(0.9 * 1.5 + 0.1 * 2.0)


def test_reinforce_baseline_starts_at_the_first_loss_and_moves_as_an_ema():
  b, nxt = stages.baseline_step(jnp.float32(jnp.nan), 3.0)
  assert float(b) == 3.0 and float(nxt) == 3.0
  losses = iter([2.0, 1.0, 3.0, 0.5])
  s = search.Searcher(SPACE, _config(arch_gradient='reinforce', val_every=1, num_proposals=2),
                      _targets(), (RES, RES, 3), 3, 1,
                      engine_factory=_stub_engines(loss=lambda idx: next(losses)))
  state = s.init(0)
  assert np.isnan(float(state.arch_baseline))  # no loss yet
  theta0 = np.asarray(state.arch['theta'])
  baselines = []
  for _ in range(3):
    state, _ = s.train_step(state, _data(), _data(seed=1))
    if state.stage == 'vital':
      baselines.append(float(state.arch_baseline))
      if len(baselines) == 1:  # L - b = 0 on the first step: theta has not moved
        np.testing.assert_array_equal(state.arch['theta'], theta0)
  np.testing.assert_allclose(baselines, [2.0, 0.9 * 2.0 + 0.1 * 1.0], rtol=1e-6)
  # A new stage starts a new average.
  assert state.stage == 'nonvital' and np.isnan(float(state.arch_baseline))
  state, _ = s.train_step(state, _data(), _data(seed=1))
  assert float(state.arch_baseline) == 0.5


def test_reinforce_vital_stage_finds_the_op_with_the_lower_loss():
  """A stand-in loss (no network): 1 for every vital layer on k3e3, 2 on any other op, plus
  noise. A few hundred REINFORCE steps must make theta prefer k3e3 on both vital layers."""
  k3e3 = SPACE.op_names.index('k3e3')
  rng = np.random.default_rng(0)
  loss = lambda idx: float(np.sum(np.where(idx == k3e3, 1.0, 2.0)) + rng.normal(0.0, 0.1))
  s = search.Searcher(SPACE, _config(arch_gradient='reinforce', val_every=1, arch_lr=0.05,
                                     tau0=1.0, tau_decay=1.0), _targets(), (RES, RES, 3), 1000, 1,
                      engine_factory=_stub_engines(loss=loss))
  state, _ = _run(s, s.init(0), steps=300)
  assert state.stage == 'vital'
  probs = s.probabilities(state)
  for n in VITAL:
    assert max(probs[n], key=probs[n].get) == 'k3e3' and probs[n]['k3e3'] > 0.6, probs[n]


def test_reinforce_pi_prefers_the_proposal_whose_samples_have_lower_loss():
  """Proposal 0 samples all-k3e3 architectures, proposal 1 all-k3e1 ones; the stand-in loss is
  lower for every k3e3. With no resource term, pi must come to prefer proposal 0."""
  k3e3, k3e1 = SPACE.op_names.index('k3e3'), SPACE.op_names.index('k3e1')
  loss = lambda idx: 2.0 + float(np.mean((idx == k3e1) * 1.0 - (idx == k3e3)))
  s = search.Searcher(SPACE, _config(arch_gradient='reinforce', vital_priority=False,
                                     num_proposals=2, arch_lr=0.05, alpha=0.0, val_every=1,
                                     tau0=1.0, tau_decay=1.0), _targets(), (RES, RES, 3), 0, 200,
                      engine_factory=_stub_engines(loss=loss))
  state = s.init(0)
  thetas = jnp.stack([_one_hot_ops(SPACE, 'k3e3', 10.0), _one_hot_ops(SPACE, 'k3e1', 10.0)])
  state = _set_arch(s, state, {'thetas': thetas, 'pi': jnp.zeros(2)}).replace(
      arch_baseline=state.arch_baseline)
  state, _ = _run(s, state)
  pi = np.asarray(jax.nn.softmax(state.arch['pi']))
  assert pi[0] > 0.75, pi
  assert s.result(state)['proposal'] == 0


def test_path_loss_is_the_forward_half_of_arch_grads():
  s = search.Searcher(SPACE, _config(), _targets(), (RES, RES, 3), 1, 1)
  state = s.init(0)
  engine = s.stage_of(state).engine
  batch = _data()
  choice = engines.Choice.from_path(SPACE, {'layer2_1': 'k3e1', 'layer3_1': 'k3e3'})
  with_grads, metrics, _ = engine.arch_grads(state.weights, batch, choice)
  forward, forward_metrics = engine.path_loss(state.weights, batch, choice)
  np.testing.assert_allclose(forward_metrics['loss'], metrics['loss'], rtol=1e-6)
  for x, y in zip(jax.tree.leaves(forward), jax.tree.leaves(with_grads)):
    np.testing.assert_allclose(x, y, rtol=1e-6)
  assert any(not np.array_equal(x, y) for x, y in zip(
      jax.tree.leaves(forward['batch_stats']), jax.tree.leaves(state.weights['batch_stats'])))


def test_reinforce_search_runs_end_to_end_and_resumes_from_checkpoints(tmp_path):
  def searcher():
    return search.Searcher(SPACE, _config(arch_gradient='reinforce', val_every=1,
                                          num_proposals=2), _targets(), (RES, RES, 3), 2, 2)

  s = searcher()
  reference, metrics = _run(s, s.init(3))
  assert [m['stage'] for m in metrics] == ['vital'] * 2 + ['nonvital'] * 2
  assert all(np.isfinite(m['val_loss']) for m in metrics)
  assert np.isfinite(float(reference.arch_baseline))
  assert s.result(reference)['ops']

  # Stopped after step 1 (vital) and step 3 (non-vital), saved, restored against the template.
  state, steps = s.init(3), 0
  with checkpoint.Checkpointer(str(tmp_path / 'ckpt')) as ckpt:
    for stop in (1, 3):
      state, _ = _run(searcher(), state, steps=stop - steps)
      steps = stop
      ckpt.save(stop, state.arrays(), state.meta())
      ckpt.wait()
      s = searcher()
      template = s.template(state.meta())
      assert 'arch_baseline' in template
      arrays, meta = ckpt.restore(stop, s.template)
      saved_arrays = state.arrays()
      assert jax.tree.structure(arrays) == jax.tree.structure(saved_arrays)
      for x, y in zip(jax.tree.leaves(arrays), jax.tree.leaves(saved_arrays)):
        assert (x.shape, x.dtype) == (np.shape(y), jnp.asarray(y).dtype)
      state = search.SearchState.from_parts(arrays, meta)
  resumed, _ = _run(searcher(), state)
  for part in ('arch', 'arch_baseline', 'weights'):
    for x, y in zip(jax.tree.leaves(getattr(resumed, part)),
                    jax.tree.leaves(getattr(reference, part))):
      np.testing.assert_array_equal(x, y)
  assert resumed.vital_ops == reference.vital_ops
