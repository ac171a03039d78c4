"""Each program compiles once (the state placed where the programs put it), and the guard that
stops before XLA:CPU's memory mappings cross vm.max_map_count."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from configs import default
from hournas_jax import compiles, costs, errors, mesh as mesh_lib, search
from spaces_for_tests import toy_space

RES = 16
SPACE = toy_space(RES)


def _config(**overrides):
  """config.search of the defaults, small (no proposal iterations, m = 2)."""
  cfg = default.get_search_config()
  cfg.update(dict(num_proposals=2, proposal_iterations=0, val_every=2))
  cfg.update(overrides)
  return cfg


def _targets(ops=('k3e3', 'k3e3', 'k3e1', 'k3e3', 'skip')):
  """Targets that an architecture of the space meets exactly."""
  params, flops = costs.cost_tables(SPACE).cost([SPACE.op_names.index(o) for o in ops])
  return ml_collections.ConfigDict({'params': float(params), 'flops': float(flops),
                                    'latency_ms': 0.0})


def _batch(mesh, seed, n=8):
  """A batch split over the mesh, as the driver's input pipeline gives it."""
  rng = np.random.default_rng(seed)
  batch = {'image': rng.standard_normal((n, RES, RES, 3)).astype(np.float32),
           'label': rng.integers(0, 10, n).astype(np.int32)}
  sharding = NamedSharding(mesh, PartitionSpec(mesh_lib.DATA_AXIS))
  return jax.tree.map(lambda x: jax.device_put(x, sharding), batch)


def _search(searcher, state, mesh):
  """Runs to the end of the search; returns (final state, the last iteration's metrics)."""
  metrics = None
  while state.stage != 'done':
    needs_tr, needs_val = searcher.batches_needed(state)
    i = state.step
    state, metrics = searcher.train_step(state, _batch(mesh, i) if needs_tr else None,
                                         _batch(mesh, 1000 + i) if needs_val else None)
  return state, metrics


def test_compile_log_sees_a_program_compiled_for_another_placement():
  mesh = mesh_lib.make_mesh()
  f = jax.jit(lambda x: jnp.sin(x) * 2.0)
  with compiles.CompileLog() as log:
    y = f(np.arange(5, dtype=np.float32))  # a host array: no placement
    f(mesh_lib.replicate(y, mesh))  # the same shapes, replicated over the mesh
    f(mesh_lib.replicate(y + 1, mesh))  # as before: no compile
  assert log.count >= 2 and log.seconds > 0
  again = log.recompiled()
  assert [name for name, _ in again] == ['jit(<lambda>)']
  assert len(next(iter(again.values()))) == 2
  assert 'programs compiled' in log.summary()
  with compiles.CompileLog() as quiet:
    f(mesh_lib.replicate(y, mesh))
  assert quiet.count == 0 and not quiet.recompiled()


@pytest.mark.parametrize('engine', ['single_path'])
def test_search_compiles_each_program_once(engine):
  """Both stages of a tiny search, batches on the mesh as in the driver: no program is compiled
  twice for the same inputs (the initial state, stage 2's fresh weights and its architecture
  parameters start where the programs put them), and a second search compiles nothing."""
  mesh = mesh_lib.make_mesh()
  searcher = search.Searcher(SPACE, _config(engine=engine), _targets(), (RES, RES, 3), 3, 3)
  with compiles.CompileLog() as log:
    state, _ = _search(searcher, searcher.init(0, mesh=mesh), mesh)
  assert state.stage == 'done' and log.count > 0
  assert not log.recompiled(), log.recompiled().keys()
  replicated = mesh_lib.replicated(mesh)
  assert all(x.sharding == replicated for x in jax.tree.leaves(state.arrays()))
  with compiles.CompileLog() as again:
    _search(searcher, searcher.init(0, mesh=mesh), mesh)
  assert again.count == 0, again.summary()


class _Maps:
  """A process whose compiles each add `per_program` mappings (read_maps for MapGuard)."""

  def __init__(self, start, per_program):
    self.maps, self.per_program, self.reads = start, per_program, 0

  def compile(self, guard):
    guard._on_scalar(compiles.COMPILE_EVENT, 0.0, fun_name='jit(f)')  # as JAX calls it
    self.maps += self.per_program

  def __call__(self):
    self.reads += 1
    return self.maps


def test_map_guard_stops_before_the_limit_and_reads_rarely():
  maps = _Maps(start=1000, per_program=100)
  guard = compiles.MapGuard(every=8, per_program=10, margin=2.0, limit=20000, read_maps=maps)
  with pytest.raises(compiles.MapLimitError) as raised:
    for _ in range(1000):
      maps.compile(guard)
  # Refused while at least one look's worth of programs was still left below the limit.
  assert maps.maps + guard.every * maps.per_program <= guard.limit
  assert maps.reads <= guard.compiles // guard.every + 1
  message = str(raised.value)
  assert isinstance(raised.value, errors.UserError) and '\n' not in message
  for needle in ('vm.max_map_count=20000', 'sysctl -w vm.max_map_count=262144', "'switch'"):
    assert needle in message
  # Other events and an unknown limit are passed over.
  quiet = compiles.MapGuard(limit=0, read_maps=maps)
  quiet._on_scalar(compiles.COMPILE_EVENT, 0.0)
  quiet._on_scalar('/jax/other', 0.0)


def test_map_guard_reads_this_process():
  if compiles.max_map_count() is None:
    pytest.skip('no /proc/sys/vm/max_map_count here')
  assert 0 < compiles.map_count() < compiles.max_map_count()
  guard = compiles.install_map_guard()
  assert guard is compiles.install_map_guard()  # one per process
  before = guard.compiles
  jax.jit(lambda x: x * 3.0 + 1.0)(np.float32(np.random.default_rng().random()) + np.arange(3))
  assert guard.compiles > before


def test_map_guard_error_comes_out_of_the_call_that_compiles():
  if compiles.map_count() is None:
    pytest.skip('no /proc/self/maps here')
  guard = compiles.MapGuard(every=1, per_program=1, margin=1.0,
                            limit=compiles.map_count() + 1).install()
  try:
    with pytest.raises(compiles.MapLimitError, match='vm.max_map_count'):
      jax.jit(lambda x: x - 7.0)(np.arange(4.0, dtype=np.float32))
  finally:
    guard.uninstall()
  jax.jit(lambda x: x - 7.0)(np.arange(4.0, dtype=np.float32))  # uninstalled: compiles
