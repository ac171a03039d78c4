"""The SuperNet, its single-path engine and the whole-network programs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hournas_jax import blocks, engines, optim, spaces, supernet, vital
from hournas_jax.engines import all_candidates, single_path
from spaces_for_tests import switch_on_residual_branches, toy_space

RES = 16


@pytest.fixture(scope='module')
def space():
  return toy_space(RES)


@pytest.fixture(scope='module')
def engine(space):
  return single_path.SinglePathEngine(space, supernet.layer_ops(space))


@pytest.fixture(scope='module')
def batch():
  rng = np.random.default_rng(0)
  return (jnp.asarray(rng.standard_normal((8, RES, RES, 3)), jnp.float32),
          jnp.asarray(rng.integers(0, 10, 8), jnp.int32))


def _path(space, choice):
  return {l.name: l.ops[choice(i, l)] for i, l in enumerate(space.searchable_layers)}


def _sub(tree, space, ops):
  """The variables of the fixed network of `ops` inside the SuperNet's."""
  fixed = supernet.fixed_layer_ops(space, ops)
  return {l.name: {o[0]: tree[l.name][o[0]]} for l, o in zip(space.layers, fixed)
          if o[0] in tree[l.name]}


def test_supernet_holds_every_candidate(space, engine):
  shapes = engine.state_shapes((RES, RES, 3))
  for layer in space.layers:
    held = set(shapes['params'][layer.name])
    assert held == set(layer.ops) - {'skip'}, layer.name
  # Candidate variables are exactly those of the stand-alone block.
  layer = space.searchable_layers[3]
  block = blocks.make_block(space, layer, 'k3e3')
  alone = jax.eval_shape(lambda: block.init(
      jax.random.key(0), jnp.zeros((1, layer.in_resolution, layer.in_resolution,
                                    layer.in_channels)), train=False))
  assert jax.tree.map(lambda x: x.shape, alone['params']) == jax.tree.map(
      lambda x: x.shape, shapes['params'][layer.name]['k3e3'])


def test_single_path_step_equals_fixed_network(space, engine, batch):
  images, labels = batch
  state = engine.init(0, (RES, RES, 3))
  path = _path(space, lambda i, l: (i * 7 + 3) % len(l.ops))
  ops = [path[n] for n in space.searchable_names]
  fixed = all_candidates.AllCandidatesEngine(space, supernet.fixed_layer_ops(space, ops))
  fstate = {k: _sub(state[k], space, ops) for k in state}
  for _ in range(2):  # two steps: momentum and running statistics matter too
    batch_dict = {'image': images, 'label': labels}
    state, m = engine.train_step(state, batch_dict, engines.Choice.from_path(space, path), 0.1)
    fstate, fm = fixed.train_step(fstate, batch_dict, engines.Choice.none(space), 0.1)
    np.testing.assert_allclose(m['loss'], fm['loss'], rtol=1e-5)
  for k in state:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 _sub(state[k], space, ops), fstate[k])
  np.testing.assert_allclose(engine.logits(state, images, path), fixed.logits(fstate, images),
                             rtol=1e-4, atol=1e-5)
  # The SuperNet module running the path with the same weights gives the same outputs too.
  variables = {'params': state['params'], 'batch_stats': state['batch_stats']}
  out = supernet.SuperNet(space, supernet.layer_ops(space)).apply(variables, images, path=path,
                                                                   train=False)
  np.testing.assert_allclose(out, fixed.logits(fstate, images), rtol=1e-4, atol=1e-5)


def test_unsampled_candidates_are_untouched(space, engine, batch):
  images, labels = batch
  state = engine.init(1, (RES, RES, 3))
  first = _path(space, lambda i, l: 0)
  second = _path(space, lambda i, l: len(l.ops) - 1 if l.ops[-1] != 'skip' else 1)
  state1, _ = engine.train_path(state, images, labels, first, 0.1)
  state2, _ = engine.train_path(state1, images, labels, second, 0.1)
  for layer in space.searchable_layers:
    for op in set(layer.ops) - {'skip'}:
      for k in ('params', 'batch_stats', 'opt_state'):
        before = state1[k][layer.name][op]
        after = state2[k][layer.name][op]
        same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before),
                                                        jax.tree.leaves(after)))
        # Step 2 changes exactly its own path's candidates: those of step 1 keep their
        # weights, statistics and momentum (no decay or momentum drift).
        assert same == (op != second[layer.name]), (layer.name, op, k)
      if op != first[layer.name]:
        leaves0 = jax.tree.leaves(state['params'][layer.name][op])
        leaves1 = jax.tree.leaves(state1['params'][layer.name][op])
        assert all(np.array_equal(a, b) for a, b in zip(leaves0, leaves1))


def test_gate_gradients_are_the_straight_through_gradients(space, engine, batch):
  images, labels = batch
  state = engine.init(2, (RES, RES, 3))
  switch_on_residual_branches(state['params'])
  path = _path(space, lambda i, l: (i + 1) % len(l.ops))
  _, _, gates = engine.path_gates(state, images, labels, path)
  assert set(gates) == set(space.searchable_names)
  net = supernet.SuperNet(space, supernet.layer_ops(space))
  variables = {'params': state['params'], 'batch_stats': state['batch_stats']}

  def loss(g):
    logits, _ = net.apply(variables, images, path=path, gates=g, train=True,
                          mutable=['batch_stats'])
    return optim.cross_entropy(logits, labels)
  expected = jax.grad(loss)({n: jnp.float32(1.0) for n in space.searchable_names})
  for n in space.searchable_names:
    np.testing.assert_allclose(gates[n], expected[n], rtol=2e-3, atol=1e-5)
  assert any(abs(float(g)) > 1e-4 for g in gates.values())


def test_vital_only_and_frozen_networks(space):
  vital_names = vital.vital_layers(space)
  ops = supernet.layer_ops(space, vital_only=True)
  kept = {l.name for l, o in zip(space.layers, ops) if o}
  assert kept == set(vital_names) | {'stem', 'head'}
  frozen = {n: 'k3e1' for n in vital_names}
  ops = supernet.layer_ops(space, frozen=frozen)
  for layer, o in zip(space.layers, ops):
    if layer.name in frozen:
      assert o == ('k3e1',)
    elif layer.searchable:
      assert o == layer.ops
  with pytest.raises(spaces.SpaceError, match='not allowed'):
    supernet.layer_ops(space, frozen={vital_names[0]: 'skip'})
  eng = single_path.SinglePathEngine(space, supernet.layer_ops(space, vital_only=True))
  assert eng.choice_layers == vital_names


def test_all_candidates_engine(space, batch):
  images, labels = batch
  eng = all_candidates.AllCandidatesEngine(space, supernet.layer_ops(space))
  state = eng.init(3, (RES, RES, 3))
  switch_on_residual_branches(state['params'])
  mask = space.op_mask()
  uniform = engines.Choice(space.searchable_names, jnp.zeros(len(mask), jnp.int32),
                           jnp.asarray(mask / mask.sum(-1, keepdims=True), jnp.float32))
  batch_dict = {'image': images, 'label': labels}
  _, metrics, grad_a = eng.arch_grads(state, batch_dict, uniform)
  assert np.isfinite(float(metrics['loss']))
  # d loss / d A in A's layout: a gradient for each layer's own candidates, zero elsewhere.
  assert grad_a.shape == mask.shape
  assert np.all(np.asarray(grad_a)[~mask] == 0) and np.all(np.asarray(grad_a)[mask] != 0)
  new_state, _ = eng.train_step(state, batch_dict, uniform, 0.1)
  # Every candidate moves in the all-candidates mode.
  for layer in space.searchable_layers:
    for op in set(layer.ops) - {'skip'}:
      kernel_before = jax.tree.leaves(state['params'][layer.name][op])
      kernel_after = jax.tree.leaves(new_state['params'][layer.name][op])
      assert any(not np.array_equal(a, b) for a, b in zip(kernel_before, kernel_after))
