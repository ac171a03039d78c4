"""Population training: many architectures trained stand-alone with one recipe, resumably.

The random baseline of a search, the search-quality benchmark and the block-sensitivity grid all
need the same thing: train a list of (architecture, training seed) pairs from scratch with the
recipe of config.train and evaluate each on the test split. Each finished member is appended as
one JSON line to <directory>/population.jsonl:

    {"ops": [...], "seed": 0, "recipe": "<fingerprint>", "top1": 0.93, "top5": 0.99,
     "loss": 0.31, "params": 113410, "flops": 505664, "wall_s": 21.4, "tag": "random"}

A rerun reads the file and skips every member already there with the same recipe fingerprint,
so an interrupted population continues where it stopped (the architecture that was training
starts over: its seeds are stored together when the last one ends; a half-written last line is
ignored). Members train on all local
devices (the retraining program is data-parallel over the mesh); the training seeds of one
architecture share its compiled programs.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import queue
import threading
import time
from typing import Callable, Iterable, Mapping, Sequence

import jax
import numpy as np

from hournas_jax import arch as arch_lib
from hournas_jax import costs, logging_utils, retrain, spaces
from hournas_jax import setup as setup_lib

FILENAME = 'population.jsonl'


@dataclasses.dataclass(frozen=True)
class Member:
  """One stand-alone training: an architecture (one op per searchable layer) and a seed."""
  ops: tuple[str, ...]
  seed: int
  tag: str = ''


def default_workers(requested: int) -> int:
  """Processes for population training: `requested`, or one per CPU core on a CPU (one XLA:CPU
  program of these small networks keeps about one core busy) and 1 on accelerators."""
  if requested > 0:
    return int(requested)
  return (os.cpu_count() or 1) if jax.default_backend() == 'cpu' else 1


def recipe_fingerprint(setup: setup_lib.Setup) -> str:
  """A short hash of everything a member's result depends on besides its ops and seed."""
  space = setup.space
  train = {k: v for k, v in sorted(setup.config.train.to_dict().items())
           if k not in retrain.NOT_IN_FINGERPRINT}
  if train.get('precision') == 'float32':  # the default: stores from before it existed match
    del train['precision']
  fields = {'dataset': setup.dataset, 'image_shape': list(setup.image_shape),
            'space': space.name, 'width': space.width, 'space_ops': list(space.op_names),
            'layers': [(l.name, l.in_channels, l.out_channels, l.stride) for l in space.layers],
            'num_classes': space.num_classes, 'train': train}
  if setup.data_source():  # only then, so that stores written before it existed still match
    fields['data'] = setup.data_source()
  text = json.dumps(fields, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


class Store:
  """The JSON-lines file of finished members. Appends are whole lines, flushed and synced, so
  a crash loses at most the member that was being written, never an earlier one."""

  def __init__(self, directory: str):
    self.directory = directory
    self.path = os.path.join(directory, FILENAME)

  def records(self) -> list[dict]:
    if not os.path.exists(self.path):
      return []
    out = []
    with open(self.path) as f:
      for line in f:
        line = line.strip()
        if not line:
          continue
        try:
          out.append(json.loads(line))
        except json.JSONDecodeError:
          continue  # the tail of a write that was cut short
    return out

  def done(self, recipe: str) -> dict[tuple[tuple[str, ...], int], dict]:
    """{(ops, seed): record} of the members finished with this recipe."""
    return {(tuple(r['ops']), int(r['seed'])): r for r in self.records()
            if r.get('recipe') == recipe}

  def append(self, record: dict) -> None:
    os.makedirs(self.directory, exist_ok=True)
    text = json.dumps(record, sort_keys=True)
    # A line cut short by a crash may lack its newline; start on a fresh line after it.
    prefix = ''
    if os.path.exists(self.path) and os.path.getsize(self.path):
      with open(self.path, 'rb') as f:
        f.seek(-1, os.SEEK_END)
        prefix = '' if f.read(1) == b'\n' else '\n'
    with open(self.path, 'a') as f:
      f.write(prefix + text + '\n')
      f.flush()
      os.fsync(f.fileno())


def train_member(setup: setup_lib.Setup, ops: Sequence[str], seed: int) -> dict:
  """Trains `ops` from scratch with config.train and training seed `seed`; evaluates it on the
  test split. Returns top1, top5, loss, examples and wall_s (no checkpoints are written)."""
  tcfg = setup.config.train
  steps_per_epoch = setup.steps_per_epoch('train', tcfg.batch_size)
  total = retrain.total_steps(tcfg, steps_per_epoch)
  start = time.time()
  trainer = retrain.Retrainer(setup.space, ops, tcfg, image_shape=setup.image_shape,
                              steps_per_epoch=steps_per_epoch, total_steps=total,
                              mesh=setup.mesh, seed=seed)
  state = trainer.init()
  batches = setup.batches('train', tcfg.batch_size, seed=seed)
  for _ in range(total):
    state, _ = trainer.train_step(state, next(batches))
  results = trainer.evaluate(state, retrain.eval_batches(setup, tcfg.eval_batch_size))
  # Non-finite weights give a non-finite test loss: checked here rather than by a program of
  # its own over the weights, which costs each architecture one more compile (~1.4 s).
  if not math.isfinite(results['loss']):
    raise retrain.TrainingError(f'population: {",".join(ops)} (seed {seed}) ended with a '
                                'non-finite test loss (its weights diverged); try a lower '
                                'config.train.learning_rate')
  return {**results, 'wall_s': time.time() - start}


def _describe(record: dict) -> str:
  return (f'{record["tag"] or "member"} seed {record["seed"]}: top-1 '
          f'{100 * record["top1"]:.2f}% ({record["wall_s"]:.0f} s) {",".join(record["ops"])}')


def _record(setup: setup_lib.Setup, recipe: str, member: Member, result: Mapping) -> dict:
  """The store's record of `member` trained with `recipe`: its costs and `result`'s figures
  (top1, top5, loss, wall_s)."""
  architecture = arch_lib.Architecture(setup.space.name, tuple(member.ops))
  params, flops = costs.cost_tables(setup.space).cost(architecture.indices(setup.space))
  return {'ops': list(member.ops), 'seed': int(member.seed), 'recipe': recipe,
          'tag': member.tag, 'params': params, 'flops': flops,
          **{k: result[k] for k in ('top1', 'top5', 'loss', 'wall_s')}}


def _train_architecture(setup: setup_lib.Setup, recipe: str,
                        members: Sequence[Member]) -> list[dict]:
  """Records of the members of one architecture (its seeds share the compiled programs)."""
  return [_record(setup, recipe, member, train_member(setup, member.ops, member.seed))
          for member in members]


def add_trained(setup: setup_lib.Setup, member: Member, result: Mapping,
                directory: str) -> bool:
  """Stores `result`, the figures of a training of `member` done elsewhere with setup's recipe
  (config.train) and the member's seed (as retrain.run trains the searched architecture), as
  that member in <directory>/population.jsonl, so that train_population does not train it
  again. Returns whether it was added (not when the member is already there). For runs of one
  process: the others of a run would not see the record before they read the store."""
  store = Store(directory)
  recipe = recipe_fingerprint(setup)
  if (tuple(member.ops), int(member.seed)) in store.done(recipe):
    return False
  store.append(_record(setup, recipe, member, result))
  return True


# A worker process's setup, built once by `_init_worker`.
_WORKER_SETUP = None


def exit_with_parent(poll_s: float = 2.0) -> None:
  """Ends this process (from a daemon thread) once its parent is gone: a pool's workers
  outlive a parent that was killed, and would go on training for nobody."""
  import threading  # pylint: disable=g-import-not-at-top
  parent = os.getppid()

  def watch():
    while True:
      time.sleep(poll_s)
      if os.getppid() != parent:
        os._exit(1)  # pylint: disable=protected-access
  threading.Thread(target=watch, daemon=True, name='exit_with_parent').start()


def _init_worker(config, workdir):
  global _WORKER_SETUP
  exit_with_parent()
  setup_lib.configure_jax(config)
  _WORKER_SETUP = setup_lib.resolve_setup(config, workdir)


def _worker_task(args):
  recipe, members = args
  return _train_architecture(_WORKER_SETUP, recipe, members)


@contextlib.contextmanager
def worker_pool(config, workdir: str, workers: int):
  """A pool (concurrent.futures executor) of `workers` processes for CPU-bound jobs
  (population members, searches).

  On a CPU the networks here are small enough that one XLA:CPU program keeps about one core
  busy, so several single-threaded processes train several networks at once. Processes are
  spawned (not forked: JAX is initialised in this one) with XLA's intra-op threading off. A
  worker that dies (out of memory, killed) fails the futures it leaves (BrokenProcessPool)
  instead of leaving them waiting forever; a run stopped here stops its workers too.
  """
  import multiprocessing  # pylint: disable=g-import-not-at-top
  flags = os.environ.get('XLA_FLAGS', '')
  if 'xla_cpu_multi_thread_eigen' not in flags:
    # Read by the workers, which are spawned as jobs are submitted.
    os.environ['XLA_FLAGS'] = (flags + ' --xla_cpu_multi_thread_eigen=false').strip()
  pool = concurrent.futures.ProcessPoolExecutor(
      workers, mp_context=multiprocessing.get_context('spawn'), initializer=_init_worker,
      initargs=(config, workdir))
  try:
    yield pool
  except BaseException:
    # Stopped (Ctrl-C, an error): do not wait for the trainings in flight.
    for process in list((getattr(pool, '_processes', None) or {}).values()):
      process.terminate()
    pool.shutdown(wait=False, cancel_futures=True)
    raise
  else:
    pool.shutdown(wait=True)
  finally:
    os.environ['XLA_FLAGS'] = flags
    if not flags:
      del os.environ['XLA_FLAGS']


def _train_beside_workers(setup: setup_lib.Setup, tasks: list, workers: int,
                          record_all: Callable[[list[dict]], None]) -> None:
  """Trains `tasks` ((recipe, members of one architecture) pairs) in this process and in
  workers - 1 spawned ones, each taking the next task as it finishes one; this process takes
  the first task, so a caller lists first an architecture whose programs it has compiled
  already (the searched one, right after its retraining). Records are stored by this process
  alone, as tasks finish. Raises the first error of a task, here or in a worker.

  This process works rather than waits: it is warm (JAX initialised, the data read, programs
  compiled), where each spawned process pays its imports, its data and its compiles first.
  """
  pending = collections.deque(tasks)
  lock = threading.Lock()
  finished: queue.Queue = queue.Queue()
  stop = threading.Event()

  def next_task():
    with lock:
      return pending.popleft() if pending else None

  with worker_pool(setup.config, setup.workdir, workers - 1) as pool:

    def feed():
      # Keeps every worker busy with the next pending task; ends with a None.
      in_flight = set()
      try:
        while not stop.is_set():
          while len(in_flight) < workers - 1:
            task = next_task()
            if task is None:
              break
            in_flight.add(pool.submit(_worker_task, task))
          if not in_flight:
            break
          done, in_flight = concurrent.futures.wait(
              in_flight, timeout=1.0, return_when=concurrent.futures.FIRST_COMPLETED)
          for future in done:
            finished.put(future)
      except RuntimeError as e:
        # The pool was shut down (this process stopped) or broken (BrokenProcessPool is a
        # RuntimeError): said once, by the result.
        broken = concurrent.futures.Future()
        broken.set_exception(e)
        finished.put(broken)
      finally:
        finished.put(None)

    feeding = True

    def record_finished(block: bool) -> None:
      """Records the workers' finished tasks (block: until the feeder has ended)."""
      nonlocal feeding
      while feeding:
        try:
          future = finished.get(block=block)
        except queue.Empty:
          return
        if future is None:
          feeding = False
        else:
          record_all(future.result())

    first = next_task()
    feeder = threading.Thread(target=feed, daemon=True, name='population_feeder')
    feeder.start()
    try:
      task = first
      while task is not None:
        record_all(_train_architecture(setup, task[0], task[1]))
        record_finished(block=False)
        task = next_task()
      record_finished(block=True)
    finally:
      stop.set()
      feeder.join()


def train_population(setup: setup_lib.Setup, members: Iterable[Member], directory: str, *,
                     workers: int = 1, log_prefix: str = '[population]',
                     on_record: Callable[[dict], None] | None = None) -> list[dict]:
  """Trains every member not yet in <directory>/population.jsonl; returns the records of all
  `members` (finished earlier or now), in order.

  workers > 1 trains architectures in that many processes at once, this one and workers - 1
  spawned ones (CPU only: each process would claim every accelerator); results are appended by
  this process alone. This process starts with the first member's architecture. on_record is
  called with each record once it is stored (e.g. to redraw a picture as a grid fills).
  """
  members = list(members)
  store = Store(directory)
  recipe = recipe_fingerprint(setup)
  done = store.done(recipe)
  todo, queued = [], set()
  for m in members:  # several methods can find one architecture: train it once
    key = (tuple(m.ops), int(m.seed))
    if key not in done and key not in queued:
      queued.add(key)
      todo.append(m)
  if not todo:
    return [done[tuple(m.ops), int(m.seed)] for m in members]
  trained = sum((tuple(m.ops), int(m.seed)) in done for m in members)
  repeats = len(members) - trained - len(todo)
  logging_utils.info(f'{log_prefix} {trained} of {len(members)} members already trained in '
                     f'{store.path}; training {len(todo)}'
                     + (f' ({repeats} listed more than once are trained once)' if repeats else '')
                     + (f' in {workers} processes' if workers > 1 else ''))
  by_architecture: dict[tuple[str, ...], list[Member]] = {}
  for m in todo:
    by_architecture.setdefault(tuple(m.ops), []).append(m)
  tasks = [(recipe, group) for group in by_architecture.values()]
  finished = 0
  start = time.time()

  def record_all(records):
    nonlocal finished
    for record in records:
      if jax.process_index() == 0:
        store.append(record)
      done[tuple(record['ops']), int(record['seed'])] = record
      finished += 1
      eta = (time.time() - start) / finished * (len(todo) - finished)
      logging_utils.info(f'{log_prefix} {finished}/{len(todo)} {_describe(record)}'
                         + (f' | ETA {logging_utils.format_duration(eta)}'
                            if finished < len(todo) else ''))
      if on_record is not None:
        on_record(record)

  # Several processes of one run train each member together over the global mesh.
  if (workers > 1 and len(tasks) > 1 and jax.default_backend() == 'cpu'
      and jax.process_count() == 1):
    try:
      _train_beside_workers(setup, tasks, min(workers, len(tasks)), record_all)
    except concurrent.futures.process.BrokenProcessPool as e:
      raise retrain.TrainingError(
          f'{log_prefix} a worker process died ({e}); the {finished} members trained so '
          f'far are kept in {store.path}: rerun the same command to train the rest') from None
  else:
    for _, group in tasks:
      record_all(_train_architecture(setup, recipe, group))
  return [done[tuple(m.ops), int(m.seed)] for m in members]


def mean_by_architecture(records: Sequence[dict], key: str = 'top1') -> dict:
  """{ops tuple: (mean, std over seeds, number of seeds)} of `key`, in first-seen order."""
  groups: dict[tuple[str, ...], list[float]] = {}
  for r in records:
    groups.setdefault(tuple(r['ops']), []).append(float(r[key]))
  return {ops: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else math.nan, len(v))
          for ops, v in groups.items()}


def uniform_architectures(space, targets: dict, tolerance: float = 0.05) -> list[tuple]:
  """Every architecture that uses one op in all searchable layers (the first thing a
  practitioner tries) and stays within the budget: no target in `targets` ({'params': ...,
  'flops': ...}, the ones set) exceeded by more than `tolerance`. Ops some layer does not offer
  (skip, in the downsampling layers) give none. Largest first."""
  tables = costs.cost_tables(space)
  found = []
  for j, op in enumerate(space.op_names):
    if not tables.mask[:, j].all():
      continue
    idx = [j] * tables.mask.shape[0]
    params, flops = tables.cost(idx)
    values = {'params': params, 'flops': flops}
    if all(values[key] <= (1 + tolerance) * target for key, target in targets.items()):
      found.append((values['params'], tuple([op] * len(idx))))
  return [ops for _, ops in sorted(found, key=lambda item: -item[0])]


def random_architectures(space, targets: dict, count: int, seed: int,
                         tolerance: float = 0.05, max_draws: int = 200000) -> list[tuple]:
  """`count` distinct architectures drawn uniformly (each layer's op uniform over its
  candidates) and kept when within `tolerance` of every target in `targets`
  ({'params': ..., 'flops': ...}, the ones set). The reference distribution of a budget."""
  tables = costs.cost_tables(space)
  rng = np.random.default_rng([seed, 0x52414E44])
  rows = np.arange(tables.mask.shape[0])
  found: list[tuple] = []
  seen = set()
  drawn = 0
  while len(found) < count and drawn < max_draws:
    n = 20000
    u = np.where(tables.mask[None], rng.random((n, *tables.mask.shape)), -1.0)
    idx = u.argmax(-1)
    drawn += n
    values = {'params': tables.fixed_params + tables.params[rows, idx].sum(-1),
              'flops': tables.fixed_flops + tables.flops[rows, idx].sum(-1)}
    ok = np.ones(n, bool)
    for key, target in targets.items():
      ok &= np.abs(values[key] - target) <= tolerance * target
    for i in np.flatnonzero(ok):
      ops = tuple(space.op_names[j] for j in idx[i])
      if ops not in seen:
        seen.add(ops)
        found.append(ops)
        if len(found) == count:
          break
  if len(found) < count:
    raise spaces.SpaceError(f'only {len(found)} of {count} uniform random architectures of '
                     f'{space.name} fall within {tolerance:.0%} of the targets {targets} in '
                     f'{drawn} draws; widen the targets or lower the count')
  return found
