"""The device-resident engine (hournas_jax/engines/switch.py) against the chained single-path one:
the same weights, batch and path give the same loss, gradients and updated state; a search
through it makes no host round trip between reports."""

import contextlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax._src import array as jax_array

from configs import default
from hournas_jax import costs, engines, search, supernet
from hournas_jax.engines import single_path, switch as switch_engine
from spaces_for_tests import toy_space

RES = 16


def _batch(seed=0, n=8):
  rng = np.random.default_rng(seed)
  return {'image': jnp.asarray(rng.standard_normal((n, RES, RES, 3)), jnp.float32),
          'label': jnp.asarray(rng.integers(0, 10, n), jnp.int32)}


def _engines(space, ops, weight_sharing):
  kwargs = dict(momentum=0.9, weight_decay=4e-5, weight_sharing=weight_sharing)
  return (single_path.SinglePathEngine(space, ops, **kwargs),
          switch_engine.SwitchEngine(space, ops, **kwargs))


def _close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-6), a, b)


PATHS = [
    {'layer1_1': 'k3e3', 'layer2_1': 'k3e1', 'layer2_2': 'skip', 'layer3_1': 'k3e3',
     'layer3_2': 'k3e1'},
    {'layer1_1': 'skip', 'layer2_1': 'k3e3', 'layer2_2': 'k3e3', 'layer3_1': 'k3e1',
     'layer3_2': 'skip'},
]


@pytest.mark.parametrize('weight_sharing', [False, True])
def test_steps_equal_the_chained_engine(weight_sharing):
  space = toy_space(RES)
  chained, switch = _engines(space, supernet.layer_ops(space), weight_sharing)
  state = chained.init(0, (RES, RES, 3))
  chained_state = switch_state = state
  for i, path in enumerate(PATHS * 2):  # momentum and running statistics carry over
    choice = engines.Choice.from_path(space, path)
    batch = _batch(i)
    chained_state, m1 = chained.train_step(chained_state, batch, choice, 0.1)
    switch_state, m2 = switch.train_step(switch_state, batch, choice, 0.1)
    np.testing.assert_allclose(m1['loss'], m2['loss'], rtol=1e-5)
    assert float(m1['accuracy']) == float(m2['accuracy'])
    _close(chained_state, switch_state)
  # Unsampled candidates stay exactly as they were: weights, momenta, statistics.
  never = [(n, o) for n, l in ((l.name, l) for l in space.searchable_layers) for o in l.ops
           if o != 'skip' and all(p[n] != o for p in PATHS)]
  for name, op in never:
    for part in ('params', 'opt_state', 'batch_stats'):
      if op in state[part][name]:
        jax.tree.map(np.testing.assert_array_equal, state[part][name][op],
                     switch_state[part][name][op])

  # Architecture gradients and the forward-only loss, on the trained weights.
  choice = engines.Choice.from_path(space, PATHS[0])
  batch = _batch(10)
  w1, m1, g1 = chained.arch_grads(chained_state, batch, choice)
  w2, m2, g2 = switch.arch_grads(chained_state, batch, choice)
  np.testing.assert_allclose(m1['loss'], m2['loss'], rtol=1e-5)
  np.testing.assert_allclose(g1, g2, rtol=2e-4, atol=1e-6)
  assert np.count_nonzero(np.asarray(g2)) == len(choice.layers)  # only the sampled entries
  _close(w1, w2)
  l1, lm1 = chained.path_loss(chained_state, batch, choice)
  l2, lm2 = switch.path_loss(chained_state, batch, choice)
  np.testing.assert_allclose(lm1['loss'], lm2['loss'], rtol=1e-5)
  _close(l1, l2)


def _config(engine, **overrides):
  cfg = default.get_search_config()
  cfg.update(dict(num_proposals=2, proposal_iterations=0, val_every=2, engine=engine))
  cfg.update(overrides)
  return cfg


def _targets(space):
  ops = ('k3e3', 'k3e3', 'k3e1', 'k3e3', 'skip')
  params, flops = costs.cost_tables(space).cost([space.op_names.index(o) for o in ops])
  return ml_collections.ConfigDict({'params': float(params), 'flops': float(flops),
                                    'latency_ms': 0.0})


def _search(engine, steps=None, guarded_from=None, stage_steps=3, **overrides):
  """Runs a search on the toy space (to the end, or `steps` iterations); the iterations from
  `guarded_from` on run under `no_host_reads`."""
  space = toy_space(RES)
  s = search.Searcher(space, _config(engine, **overrides), _targets(space), (RES, RES, 3),
                      stage_steps, stage_steps)
  state, metrics = s.init(0), []
  batches = [_batch(i) for i in range(8)]  # put on the device before any guarded step
  jax.block_until_ready(batches)
  while state.stage != 'done' and (steps is None or len(metrics) < steps):
    i = state.step
    needs_tr, needs_val = s.batches_needed(state)
    tr = batches[i % 8] if needs_tr else None
    val = batches[(i + 4) % 8] if needs_val else None
    guard = guarded_from is not None and i >= guarded_from
    with no_host_reads() if guard else contextlib.nullcontext():
      state, m = s.train_step(state, tr, val)
    metrics.append(m)
  return s, state, metrics


def test_a_search_through_it_runs_as_through_the_chained_engine(monkeypatch):
  """Both stages, weight and architecture steps, the same sampled paths: the same losses at
  every step, the same architecture gradients (in Adam's moments), and the SuperNet ends with
  the same weights. The architecture parameters are held still (arch_lr 0): at initialisation a
  gate in front of a BatchNorm has a gradient of zero up to rounding, and Adam would normalise
  that rounding noise into steps that differ between any two implementations (the gradients
  themselves are compared above).

  Through the switch engine each iteration is one program: the samples, the weight step and,
  when due, the architecture step and its update, fused by the searcher. The engine's own
  step programs and the chained iteration are refused, and the fused program is called once an
  iteration."""
  dispatches = []
  fused_program = search.Searcher._fused_program

  def counted(self, stage, weight_step, arch_step):
    program = fused_program(self, stage, weight_step, arch_step)

    def dispatch(*args):
      dispatches.append((weight_step, arch_step))
      return program(*args)
    return dispatch

  def refused(*args, **kwargs):
    raise AssertionError('a fused iteration dispatched a program of its own')

  runs = {}
  for engine in ('single_path', 'switch'):
    if engine == 'switch':
      monkeypatch.setattr(search.Searcher, '_fused_program', counted)
      monkeypatch.setattr(search.Searcher, '_chained_iteration', refused)
      for name in ('train_step', 'arch_grads', 'path_loss', '_program'):
        monkeypatch.setattr(switch_engine.SwitchEngine, name, refused)
    s, state, metrics = _search(engine, arch_lr=0.0)
    runs[engine] = (state, [float(m['loss']) for m in metrics],
                    [float(m['val_loss']) for m in metrics if 'val_loss' in m])
  (chained, c_loss, c_val), (switch, s_loss, s_val) = runs['single_path'], runs['switch']
  assert switch.stage == chained.stage == 'done' and switch.vital_ops == chained.vital_ops
  assert len(dispatches) == len(s_loss) == switch.step
  assert set(dispatches) == {(True, False), (True, True)}  # weight steps, and with an arch step
  np.testing.assert_allclose(s_loss, c_loss, rtol=1e-4)
  np.testing.assert_allclose(s_val, c_val, rtol=1e-4)
  _close(chained.weights, switch.weights)
  _close(chained.arch_opt, switch.arch_opt)


@contextlib.contextmanager
def no_host_reads():
  """Refuses every read of a jax.Array's value by the host: JAX's device-to-host transfer guard
  (which is what fires on an accelerator; on a CPU an array's memory is the host's, so JAX
  never counts a read as a transfer), and, for the CPU, every Python way to a value: float(),
  bool(), .item(), .tolist(), the cached host copy, and numpy's asarray/array."""
  def refused(*args, **kwargs):
    raise RuntimeError('the host read a value of a jax.Array')

  def numpy_guard(fn):
    def guarded(x, *args, **kwargs):
      if isinstance(x, jax.Array):
        refused()
      return fn(x, *args, **kwargs)
    return guarded

  names = ('__float__', '__int__', '__bool__', '__index__', 'item', 'tolist')
  saved = {name: jax_array.ArrayImpl.__dict__[name] for name in names + ('_value',)}
  saved_numpy = (np.asarray, np.array)
  try:
    for name in names:
      setattr(jax_array.ArrayImpl, name, refused)
    jax_array.ArrayImpl._value = property(refused)  # pylint: disable=protected-access
    np.asarray, np.array = numpy_guard(np.asarray), numpy_guard(np.array)
    with jax.transfer_guard_device_to_host('disallow'):
      yield
  finally:
    for name, attr in saved.items():
      setattr(jax_array.ArrayImpl, name, attr)
    np.asarray, np.array = saved_numpy


def test_search_steps_make_no_host_round_trip():
  """Steps of the first stage, weight and architecture steps, while every host read of an
  array is refused: the sampled path, the metrics and the architecture update stay on the
  device. (The chained engine reads the path back every step, and is refused; the stage
  boundary, which fixes the vital ops, reads theta once.)"""
  # Iterations 0-1 compile the weight and architecture steps; 2-5 run guarded (2 of them
  # with an architecture step).
  s, state, metrics = _search('switch', steps=6, guarded_from=2, stage_steps=8)
  assert state.step == 6 and state.stage == 'vital'
  assert sum('val_loss' in m for m in metrics[2:]) == 2
  with pytest.raises(RuntimeError, match='the host read a value'):
    with no_host_reads():
      float(metrics[-1]['loss'])  # read by the caller when it reports: refused here
  with pytest.raises(RuntimeError, match='the host read a value'):
    _search('single_path', steps=3, guarded_from=2, stage_steps=8)


# --------------------------------------------------------------------------------------------
# Mixed precision (search.precision / train.precision = 'bfloat16').


def test_bfloat16_computes_in_bfloat16_and_keeps_float32_state():
  """Convolutions and matmuls in bfloat16, the loss and everything kept (parameters, BatchNorm
  statistics, momenta) in float32; the two engines still agree with each other, and with
  float32 to bfloat16's precision."""
  space = toy_space(RES)
  ops = supernet.layer_ops(space)
  kwargs = dict(momentum=0.9, weight_decay=4e-5, dtype=jnp.bfloat16)
  chained = single_path.SinglePathEngine(space, ops, **kwargs)
  switch = switch_engine.SwitchEngine(space, ops, **kwargs)
  full = switch_engine.SwitchEngine(space, ops, momentum=0.9, weight_decay=4e-5)
  state = full.init(0, (RES, RES, 3))
  choice, batch = engines.Choice.from_path(space, PATHS[0]), _batch()
  jaxpr = str(jax.make_jaxpr(lambda s: switch._train_step(choice.layers, s, batch['image'],  # pylint: disable=protected-access
                                                          batch['label'], choice.idx, 0.1))(
                                                              state))
  assert 'conv_general_dilated' in jaxpr and 'bf16[8,8,8,8]' in jaxpr
  after, metrics = switch.train_step(state, batch, choice, 0.1)
  chained_after, chained_metrics = chained.train_step(state, batch, choice, 0.1)
  reference, reference_metrics = full.train_step(state, batch, choice, 0.1)
  assert {x.dtype for x in jax.tree.leaves(after)} == {jnp.dtype(jnp.float32)}
  assert metrics['loss'].dtype == jnp.float32
  np.testing.assert_allclose(metrics['loss'], chained_metrics['loss'], rtol=1e-3)
  np.testing.assert_allclose(metrics['loss'], reference_metrics['loss'], rtol=2e-2)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-3),
               after['params'], reference['params'])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-3),
               after['params'], chained_after['params'])


def test_auto_engine_chooses_by_platform():
  """search.engine='auto': the chained engine on a CPU, the fused switch engine on an
  accelerator; the relaxed sampler keeps its only engine."""
  assert engines.auto_engine('gumbel_max', 'cpu') == 'single_path'
  assert engines.auto_engine('gumbel_max', 'gpu') == engines.auto_engine('gumbel_max',
                                                                          'tpu') == 'switch'
  assert engines.auto_engine('gumbel_softmax', 'gpu') == 'all_candidates'
  here = engines.ENGINES[engines.auto_engine('gumbel_max')]
  assert engines.engine_class('auto', 'gumbel_max') is here
  search.check_config(_config('auto'))
