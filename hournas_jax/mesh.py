"""Device mesh and sharding helpers: one ('data',) axis over every device of every process.

All training is data parallel under `jax.jit` (no pmap): a batch is a global `jax.Array` split
along its first axis over the mesh, the model state is replicated, and XLA inserts the
cross-device reductions (gradient sums, BatchNorm statistics over the global batch). Results
therefore depend on the global batch, not on how many devices share it.
"""

from __future__ import annotations

import os
import socket
import sys
import time

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hournas_jax import errors

DATA_AXIS = 'data'

class DistributedError(errors.UserError, RuntimeError):
  """A multi-process run cannot start (a setting missing or wrong, no coordinator)."""


# The three settings of a multi-process run, as config fields (config.distributed.*) and as the
# environment variables read when a field is unset.
ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = (
    'JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID')


def distributed_settings(dcfg, environ=None) -> dict | None:
  """{coordinator_address, num_processes, process_id} from config.distributed (fields) or the
  environment; {} to let JAX detect the cluster (SLURM, Cloud TPU, ...) when dcfg.auto_detect;
  None for a single-process run. Partial or malformed settings raise DistributedError."""
  environ = os.environ if environ is None else environ
  address = str(dcfg.coordinator_address or environ.get(ENV_COORDINATOR, '')).strip()
  count = dcfg.num_processes if dcfg.num_processes else environ.get(ENV_NUM_PROCESSES, '')
  index = dcfg.process_id if dcfg.process_id >= 0 else environ.get(ENV_PROCESS_ID, '')
  given = {'coordinator address (config.distributed.coordinator_address or '
           f'{ENV_COORDINATOR})': address,
           f'number of processes (config.distributed.num_processes or {ENV_NUM_PROCESSES})':
               count,
           f'process id (config.distributed.process_id or {ENV_PROCESS_ID})': index}
  if not any(str(v).strip() for v in given.values()):
    return {} if dcfg.auto_detect else None
  missing = [name for name, v in given.items() if not str(v).strip()]
  if missing:
    raise DistributedError(f'a multi-process run needs all three settings; missing the '
                           f'{" and the ".join(missing)}')
  host, _, port = address.rpartition(':')
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise DistributedError(f'coordinator address {address!r} must be HOST:PORT (e.g. '
                           '10.0.0.1:12345), the address of process 0')
  try:
    count, index = int(str(count).strip()), int(str(index).strip())
  except ValueError:
    raise DistributedError(f'the number of processes and the process id must be integers, got '
                           f'{count!r} and {index!r}') from None
  if count < 1 or not 0 <= index < count:
    raise DistributedError(f'the process id must be in [0, {count}) for {count} processes, got '
                           f'{index}' if count >= 1 else
                           f'the number of processes must be >= 1, got {count}')
  return {'coordinator_address': address, 'num_processes': count, 'process_id': index}


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
  """Returns once something listens at `address` (HOST:PORT); DistributedError after
  `timeout_s`."""
  host, _, port = address.rpartition(':')
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=2.0):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise DistributedError(
            f'could not start the multi-process run: nothing answered at the coordinator '
            f'address {address} within {timeout_s:g} s ({e.strerror or e}); start process 0 '
            'there (the coordinator), with the same number of processes') from None
      time.sleep(0.5)


def maybe_initialize_distributed(dcfg) -> bool:
  """Starts JAX's distributed runtime when config.distributed or the environment asks for it.

  Must run before anything touches a JAX backend. CPU processes exchange collectives over gloo
  (XLA:CPU has no cross-process collectives otherwise). A process that cannot reach the
  coordinator, or whose peers do not all arrive, gives up after
  dcfg.initialization_timeout_s; a peer that dies stops the others after
  dcfg.heartbeat_timeout_s. Returns whether JAX is (now) distributed.
  """
  settings = distributed_settings(dcfg)
  if settings is None:
    return False
  if jax.distributed.is_initialized():
    return True
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  timeout = int(dcfg.initialization_timeout_s)
  if settings and settings['process_id'] != 0:
    # JAX aborts the process (no exception) when it cannot register with the coordinator;
    # finding out first gives the user a sentence instead of a crash dump.
    _wait_for_coordinator(settings['coordinator_address'], timeout)
  if settings:
    print(f'[distributed] process {settings["process_id"]} of {settings["num_processes"]}, '
          f'coordinator {settings["coordinator_address"]} (waiting up to {timeout} s for every '
          'process to join)', file=sys.stderr, flush=True)
  try:
    jax.distributed.initialize(**settings, initialization_timeout=timeout,
                               heartbeat_timeout_seconds=int(dcfg.heartbeat_timeout_s))
  except Exception as e:  # pylint: disable=broad-except
    where = (f'the coordinator at {settings["coordinator_address"]} with '
             f'{settings["num_processes"]} processes' if settings else
             'a cluster (no SLURM, Cloud TPU or other environment JAX detects)')
    detail = ' '.join(str(e).split())[:200]
    raise DistributedError(f'could not start the multi-process run: {where} did not answer '
                           f'within {timeout} s ({type(e).__name__}: {detail}); start every '
                           'process with the same coordinator address and number of processes, '
                           'process 0 first') from None
  return True


def make_mesh(devices=None) -> Mesh:
  """A 1-D ('data',) mesh over all devices (of all processes) or the given ones."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.array(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def replicate(tree, mesh: Mesh):
  """Puts every leaf (host numpy or device arrays) on all devices of the mesh.

  Host values must be the same in every process (they are: they come from the seed or a
  checkpoint). Built with make_array_from_callback, which also works when the mesh spans
  devices of other processes.
  """
  return place(tree, replicated(mesh))


def place(tree, sharding):
  """Puts every leaf whole (a replicated value) on `sharding`; leaves already there are kept.

  A jitted program compiles once per placement of its inputs: a state that starts on the host
  while the programs return it replicated over the mesh compiles every program twice. Placing
  a fresh state where the programs put it keeps that to once.
  """
  def put(x):
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      x = x.addressable_data(0)  # a replicated value: any local copy is the whole of it
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(put, tree)


def sharding_of(tree):
  """The sharding of the first device array among `tree`'s leaves; None when there is none."""
  return next((x.sharding for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)), None)


def global_arrays(tree, mesh: Mesh):
  """`tree` with every device array that lives on one device only (the architecture
  parameters: each process computes the same ones on its own device) replicated over the mesh,
  as a checkpoint across processes needs; other leaves are kept as they are."""
  sharding = replicated(mesh)
  if jax.process_count() == 1:
    return tree  # one process addresses every device: any array can be saved

  local = lambda x: (isinstance(x, jax.Array) and x.is_fully_addressable
                     and x.sharding != sharding)
  leaves, treedef = jax.tree.flatten(tree)
  host = {i: np.asarray(x) for i, x in enumerate(leaves) if local(x)}
  # They are meant to be equal on every process (the same seed, the same replicated inputs);
  # checked here, where a divergence would otherwise be saved as if it were one value.
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  try:
    multihost_utils.assert_equal(list(host.values()), 'per-process arrays differ')
  except AssertionError as e:
    raise DistributedError(f'the processes no longer agree on the values each computes '
                           f'alone (the sampled architecture parameters): {e}') from None
  for i, x in host.items():
    leaves[i] = jax.make_array_from_callback(x.shape, sharding, lambda index, x=x: x[index])
  return jax.tree.unflatten(treedef, leaves)


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
