"""SuperNet training recipes (search.weight_sampling): the path samplers alone, the engine's
multi-path step, a toy search under each recipe, and the config check."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default
from hournas_jax import costs, engines, search, spaces, supernet, train, weight_sampling
from hournas_jax.engines import single_path
from spaces_for_tests import TOY_TABLE, tiny_config, toy_space

SPACE = toy_space(16)
# Layers allowing 4, 2, 3 and 1 of 4 ops.
MASK = np.array([[True, True, True, True], [False, True, False, True],
                 [True, True, True, False], [False, False, True, False]])
SIZES = np.array([[1.0, 4.0, 3.0, 2.0], [9.0, 1.0, 9.0, 5.0], [0.0, 2.0, 1.0, 7.0],
                  [1.0, 1.0, 1.0, 1.0]])


def _keys(n):
  return jax.random.split(jax.random.key(0), n)


def test_uniform_takes_allowed_ops_only_and_all_of_them():
  idx = np.concatenate([np.asarray(weight_sampling.uniform_paths(k, MASK)) for k in _keys(100)])
  assert idx.shape == (100, 4)
  for layer, allowed in enumerate(MASK):
    assert set(idx[:, layer]) == set(np.flatnonzero(allowed))


def test_strict_fair_takes_every_candidate_of_every_layer_once_a_step():
  for key in _keys(20):
    idx = np.asarray(weight_sampling.strict_fair_paths(key, MASK))
    assert idx.shape == (4, 4)  # n = the largest number of candidates of a layer
    for layer, allowed in enumerate(MASK):
      counts = np.bincount(idx[:, layer], minlength=4)
      assert np.all(counts[~allowed] == 0)
      assert np.all(counts[allowed] >= 1)  # every candidate at least once ...
      assert counts[allowed].max() - counts[allowed].min() <= 1  # ... as evenly as can be
    np.testing.assert_array_equal(np.sort(idx[:, 0]), [0, 1, 2, 3])  # 4 of 4: each once
  # The order is random: the first path differs between steps.
  firsts = {tuple(np.asarray(weight_sampling.strict_fair_paths(k, MASK))[0]) for k in _keys(20)}
  assert len(firsts) > 1


def test_sandwich_holds_the_largest_and_the_smallest_path():
  for key in _keys(10):
    idx = np.asarray(weight_sampling.sandwich_paths(key, MASK, SIZES))
    assert idx.shape == (2 + weight_sampling.SANDWICH_RANDOM, 4)
    np.testing.assert_array_equal(idx[0], [1, 3, 1, 2])  # the largest allowed op of each layer
    np.testing.assert_array_equal(idx[1], [0, 1, 0, 2])  # the smallest
    assert all(MASK[l, i] for row in idx for l, i in enumerate(row))


def test_sample_paths_by_recipe_and_sizes_from_the_cost_tables():
  key = jax.random.key(1)
  assert weight_sampling.sample_paths('uniform', key, MASK, SIZES).shape == (1, 4)
  assert weight_sampling.sample_paths('strict_fair', key, MASK, SIZES).shape == (4, 4)
  assert weight_sampling.sample_paths('sandwich', key, MASK, SIZES).shape == (4, 4)
  with pytest.raises(ValueError, match='no path sampler'):
    weight_sampling.sample_paths('distribution', key, MASK, SIZES)
  assert [weight_sampling.distills(r) for r in weight_sampling.RECIPES] == [
      False, False, False, True]
  # In the toy space the largest op is k3e3 and the smallest skip, where a layer allows it.
  tables = costs.cost_tables(SPACE)
  sizes = weight_sampling.op_sizes(tables, range(len(SPACE.searchable_names)))
  mask = SPACE.op_mask()
  largest = weight_sampling.extreme_path(mask, sizes, True)
  smallest = weight_sampling.extreme_path(mask, sizes, False)
  assert [SPACE.op_names[i] for i in largest] == ['k3e3'] * 5
  assert [SPACE.op_names[i] for i in smallest] == ['skip', 'k3e1', 'skip', 'k3e1', 'skip']


def _data(n=16, seed=0):
  rng = np.random.default_rng(seed)
  return {'image': jnp.asarray(rng.standard_normal((n, 16, 16, 3)), jnp.float32),
          'label': jnp.asarray(rng.integers(0, 10, n), jnp.int32)}


def _changed(before, after):
  """{(layer, part)} whose parameters differ."""
  return {(layer, part) for layer, parts in after['params'].items() for part in parts
          if not all(np.array_equal(a, b) for a, b in zip(
              jax.tree.leaves(before['params'][layer][part]),
              jax.tree.leaves(after['params'][layer][part])))}


def test_one_path_multi_path_step_is_the_single_path_step():
  engine = single_path.SinglePathEngine(SPACE, supernet.layer_ops(SPACE))
  state = engine.init(0, (16, 16, 3))
  path = dict(zip(SPACE.searchable_names, ['k3e3', 'k3e1', 'skip', 'k3e3', 'k3e1']))
  batch = _data()
  one, m1 = engine.train_path(state, batch['image'], batch['label'], path, 0.1)
  multi, m2 = engine.train_multi(state, batch['image'], batch['label'], [path], 0.1)
  np.testing.assert_allclose(m1['loss'], m2['loss'], rtol=1e-6)
  for kind in ('params', 'batch_stats', 'opt_state'):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 one[kind], multi[kind])


def _search_config(recipe, **overrides):
  cfg = default.get_search_config()
  cfg.update(dict(num_proposals=2, proposal_iterations=0, val_every=2, weight_sampling=recipe,
                  engine='single_path'))
  cfg.update(overrides)
  return cfg


@pytest.mark.parametrize('recipe', weight_sampling.RECIPES)
def test_a_toy_supernet_trains_under_each_recipe(recipe):
  params, flops = costs.cost_tables(SPACE).cost(
      [SPACE.op_names.index(o) for o in ('k3e3', 'k3e3', 'k3e1', 'k3e3', 'skip')])
  targets = ml_collections.ConfigDict({'params': params, 'flops': flops, 'latency_ms': 0.0})
  cfg = _search_config(recipe, vital_priority=False)
  search.check_config(cfg)
  searcher = search.Searcher(SPACE, cfg, targets, (16, 16, 3), vital_steps=0, nonvital_steps=2)
  state = searcher.init(0)
  before = state.weights
  assert searcher.batches_needed(state) == (True, False)
  state, metrics = searcher.train_step(state, tr_batch=_data())  # a weight step
  assert np.isfinite(float(metrics['loss']))
  changed = _changed(before, state.weights)
  assert ('stem', 'conv3') in changed and ('head', 'head') in changed
  candidates = {(n, op) for n in SPACE.searchable_names for op in SPACE.layer(n).ops
                if op != 'skip'}
  trained = candidates & changed
  if recipe == 'strict_fair':
    assert trained == candidates  # every candidate of every layer, in one step
  elif recipe == 'sandwich':
    assert {(n, 'k3e3') for n in SPACE.searchable_names} <= trained  # the largest path
    assert {('layer2_1', 'k3e1'), ('layer3_1', 'k3e1')} <= trained  # the smallest's non-skips
  else:
    assert len(trained) <= len(SPACE.searchable_names)  # one path
  # The architecture step still samples from theta / Theta / pi, and the search goes on.
  assert searcher.batches_needed(state) == (True, True)
  state, metrics = searcher.train_step(state, _data(seed=2), _data(seed=1))
  assert np.isfinite(float(metrics['val_loss'])) and state.stage == 'done'
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.weights))


def test_a_two_stage_search_runs_a_multi_path_recipe_in_both_stages():
  params, flops = costs.cost_tables(SPACE).cost(
      [SPACE.op_names.index(o) for o in ('k3e3', 'k3e3', 'k3e1', 'k3e3', 'skip')])
  targets = ml_collections.ConfigDict({'params': params, 'flops': flops, 'latency_ms': 0.0})
  searcher = search.Searcher(SPACE, _search_config('strict_fair', val_every=1), targets,
                             (16, 16, 3), vital_steps=1, nonvital_steps=1)
  state = searcher.init(0)
  losses = []
  while state.stage != 'done':
    needs_tr, needs_val = searcher.batches_needed(state)
    state, metrics = searcher.train_step(state, _data() if needs_tr else None,
                                         _data(seed=1) if needs_val else None)
    losses += [float(metrics[k]) for k in ('loss', 'val_loss') if k in metrics]
  assert len(losses) >= 4 and np.all(np.isfinite(losses))


def test_a_bad_recipe_is_one_config_error():
  with pytest.raises(search.SearchError) as e:
    search.check_config(_search_config('fair'))
  message = str(e.value)
  assert '\n' not in message
  assert message.startswith('config.search.weight_sampling must be one of')
  for name in weight_sampling.RECIPES:
    assert name in message
  # Engines that train one path of their own choosing refuse the others.
  with pytest.raises(search.SearchError, match="'single_path' engine only"):
    search.check_config(_search_config('uniform', engine='switch'))
  with pytest.raises(search.SearchError, match="'single_path' engine only"):
    search.check_config(_search_config('sandwich', engine='', sampler='gumbel_softmax'))
  search.check_config(_search_config('distribution', engine='switch'))  # the default: any engine


def test_engines_without_multi_path_steps_say_so():
  engine = engines.ENGINES['switch'](SPACE, supernet.layer_ops(SPACE))
  with pytest.raises(NotImplementedError, match='single_path'):
    engine.train_paths({}, _data(), [], 0.1)


@pytest.mark.parametrize('recipe', ['sandwich', 'distribution'])
def test_the_search_says_whose_losses_the_progress_lines_show(recipe, tmp_path, monkeypatch,
                                                              capsys):
  """Under a multi-path recipe `loss` and `val loss` come from different paths; the search says
  so once, and only then."""
  monkeypatch.setitem(spaces.SPACE_TABLES, 'toy', TOY_TABLE)
  config = tiny_config(mode='search', retrain_after_search=False,
                       **{'search.weight_sampling': recipe})
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  said = [l for l in capsys.readouterr().out.splitlines() if 'not the sampled one' in l]
  assert len(said) == (recipe != 'distribution')
  assert all(l.startswith('[search] weight steps train sandwich paths') for l in said)
