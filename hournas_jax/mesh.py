"""Device mesh and sharding helpers: one ('data',) axis over every device of every process.

All training is data parallel under `jax.jit` (no pmap): a batch is a global `jax.Array` split
along its first axis over the mesh, the model state is replicated, and XLA inserts the
cross-device reductions (gradient sums, BatchNorm statistics over the global batch). Results
therefore depend on the global batch, not on how many devices share it.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = 'data'

# Environment variables that say this process is one of several (jax.distributed.initialize()
# reads the coordinator from them, or from the cluster environment it detects itself).
_MULTI_PROCESS_ENV = ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES')


def multi_host_requested(multi_host: bool) -> bool:
  return bool(multi_host) or any(os.environ.get(name) for name in _MULTI_PROCESS_ENV)


def maybe_initialize_distributed(multi_host: bool) -> bool:
  """Calls jax.distributed.initialize() once when the config or the environment asks for it.

  Must run before anything touches a JAX backend. Returns whether JAX is (now) distributed.
  """
  if not multi_host_requested(multi_host):
    return False
  if not jax.distributed.is_initialized():
    jax.distributed.initialize()
  return True


def make_mesh(devices=None) -> Mesh:
  """A 1-D ('data',) mesh over all devices (of all processes) or the given ones."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.array(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicate(tree, mesh: Mesh):
  """Puts every leaf (host numpy or device arrays) on all devices of the mesh.

  Host values must be the same in every process (they are: they come from the seed or a
  checkpoint). Built with make_array_from_callback, which also works when the mesh spans
  devices of other processes.
  """
  sharding = replicated(mesh)

  def put(x):
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      x = x.addressable_data(0)  # a replicated value: any local copy is the whole of it
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(put, tree)


def abstract(tree, mesh: Mesh):
  """ShapeDtypeStructs of `tree` with the replicated sharding (restore templates)."""
  sharding = replicated(mesh)

  def shape_of(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    return jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype if not hasattr(x, 'dtype')
                                else x.dtype, sharding=sharding)

  return jax.tree.map(shape_of, tree)


def to_host(tree):
  """Fully replicated device arrays to numpy (the local copy)."""
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(x.addressable_data(0))
    return np.asarray(x)
  return jax.tree.map(get, tree)


def describe(mesh: Mesh) -> str:
  kinds = sorted({d.platform for d in mesh.devices.flat})
  return (f'{mesh.devices.size} device(s) ({", ".join(kinds)}) in {jax.process_count()} '
          f'process(es), mesh axis {DATA_AXIS!r}')
