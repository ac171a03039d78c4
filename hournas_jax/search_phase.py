"""The search phase of a run: the two HourNAS stages in a workdir, resumable, and the result.

`run(setup)` checks the workdir's search fingerprint, builds the `search.Searcher` from the
config (steps from the dataset's split sizes, the cost tables with a latency table when one is
targeted), continues from the latest checkpoint or starts afresh, drives it through `loop.run`
(data streams, checkpoints, the history file, TensorBoard) and writes arch.json, summary.txt and
the plots. `load_search_state` reopens a finished search for the analyses.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import numpy as np

from hournas_jax import analysis
from hournas_jax import checkpoint
from hournas_jax import costs
from hournas_jax import final_selection
from hournas_jax import latency
from hournas_jax import logging_utils
from hournas_jax import loop
from hournas_jax import mesh as mesh_lib
from hournas_jax import ranking
from hournas_jax import search
from hournas_jax import setup as setup_lib

# Fields added to the search fingerprint after its first release, with the value earlier
# versions behaved as, so that their workdirs still resume.
SEARCH_FINGERPRINT_ADDED = {'stem_stride': 2, 'search.schedule': 'interleaved',
                            'search.temperature': 'logits', 'search.weight_sharing': 'none',
                            'search.arch_gradient': 'straight_through',
                            'search.arch_warmup': 0.0, 'search.vital_init': 'uniform',
                            'processes': 1, 'search.engine': '', 'search.precision': 'float32',
                            'targets.latency_ms': 0.0, 'targets.latency_table': '',
                            'search.weight_sampling': 'distribution',
                            'search.proposal_entropy': 0.0, 'search.final_selection': 'mode',
                            'search.final_candidates': 16}


def search_fingerprint(setup: setup_lib.Setup) -> dict:
  """The fields a search's checkpoints depend on; a workdir's search of others is refused."""
  config = setup.config
  return {'space': setup.space.name, 'width': setup.space.width, 'dataset': setup.dataset,
          'ops': list(setup.space.op_names), 'stem_stride': setup.space.stem_stride,
          **({'data': setup.data_source()} if setup.data_source() else {}),
          'image_shape': list(setup.image_shape), 'seed': int(config.seed),
          # A checkpoint holds what each process was at: resuming with another count would
          # not continue the same run.
          'processes': jax.process_count(),
          'targets.params': float(config.targets.params),
          'targets.flops': float(config.targets.flops),
          'targets.latency_ms': float(config.targets.latency_ms),
          # The table's measurements, not its path, are what the search depends on.
          'targets.latency_table': (_file_digest(config.targets.latency_table)
                                    if config.targets.latency_ms else ''),
          **{f'search.{k}': v for k, v in sorted(config.search.to_dict().items())}}


def search_steps(setup: setup_lib.Setup) -> tuple[int, int, int, int]:
  """(steps per epoch of D_tr, of D_val, vital weight steps, non-vital weight steps).

  D_val's steps per epoch are counted only for the 'epoch' schedule (0 otherwise): the
  interleaved one never asks for them, and a run that takes no D_val step needs no D_val batch.
  """
  s = setup.config.search
  per_epoch = setup.steps_per_epoch('search_train', s.batch_size)
  val_per_epoch = 0
  if s.schedule == 'epoch':
    val_per_epoch = setup.steps_per_epoch('search_val', s.batch_size)
  vital = setup_lib.steps(per_epoch, epochs=s.vital_epochs, steps=s.vital_steps)
  nonvital = setup_lib.steps(per_epoch, epochs=s.nonvital_epochs, steps=s.nonvital_steps)
  return per_epoch, val_per_epoch, vital, nonvital


def _with_sharding(template, mesh):
  """Adds the replicated sharding to template leaves that have none."""
  sharding = mesh_lib.replicated(mesh)

  def fix(x):
    if isinstance(x, jax.ShapeDtypeStruct) and getattr(x, 'sharding', None) is None:
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    return x

  return jax.tree.map(fix, template)


def _file_digest(path: str) -> str:
  """sha256 of a file's bytes ('' for no file)."""
  if not path:
    return ''
  with open(os.path.expanduser(path), 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


def cost_tables(setup: setup_lib.Setup) -> costs.CostTables:
  """The space's params and FLOPs tables, with the latency table of config.targets when a
  latency target is set (refused when it was measured for another space or input)."""
  tables = costs.cost_tables(setup.space)
  targets = setup.config.targets
  if not targets.latency_ms:
    return tables
  table = latency.latency_tables(os.path.expanduser(targets.latency_table), setup.space,
                                 channels=setup.channels)
  return tables.with_latency(table.latency, table.fixed_ms)


def make_searcher(setup: setup_lib.Setup) -> search.Searcher:
  """The Searcher of a setup's config (steps from the dataset's split sizes)."""
  config = setup.config
  per_epoch, val_per_epoch, vital_steps, nonvital_steps = search_steps(setup)
  return search.Searcher(setup.space, config.search, config.targets, setup.image_shape,
                         vital_steps, nonvital_steps, tr_steps_per_epoch=per_epoch,
                         val_steps_per_epoch=val_per_epoch, tables=cost_tables(setup))


def load_search_state(setup: setup_lib.Setup):
  """(searcher, state) of the latest search checkpoint in the workdir (e.g. a finished
  search's SuperNet, for analyses); raises CheckpointError when there is none."""
  searcher = make_searcher(setup)
  directory = os.path.join(setup.workdir, 'search', 'checkpoints')
  with checkpoint.Checkpointer(directory, keep=setup.config.keep_checkpoints) as ckpt:
    latest = ckpt.latest_step()
    if latest is None:
      raise checkpoint.CheckpointError(f'no search checkpoint in {directory}: run '
                                       '--config.mode=search there first')
    state = _restore_search(searcher, ckpt, latest, setup.mesh)
  return searcher, state


def _restore_search(searcher, ckpt, step: int, mesh):
  arrays, meta = ckpt.restore(step, lambda meta: _with_sharding(searcher.template(meta), mesh))
  return search.SearchState.from_parts(arrays, meta)


def run(setup: setup_lib.Setup) -> dict:
  """Runs (or continues) the search in the workdir and writes its result.

  Returns:
    The result dict also written to <workdir>/arch.json (`search.Searcher.result`).
  """
  config = setup.config
  checkpoint.check_fingerprint(setup.workdir, 'search', search_fingerprint(setup),
                              implicit=SEARCH_FINGERPRINT_ADDED)
  per_epoch, val_per_epoch, _, _ = search_steps(setup)
  searcher = make_searcher(setup)
  directory = os.path.join(setup.workdir, 'search', 'checkpoints')
  with checkpoint.Checkpointer(directory, keep=config.keep_checkpoints) as ckpt:
    latest = ckpt.latest_step()
    if latest is None:
      if searcher.schedule.kind == 'epoch':
        cadence = (f'each epoch {per_epoch} weight steps on D_tr, then {val_per_epoch} '
                   'architecture steps on D_val')
      else:
        cadence = f'one architecture step on D_val every {searcher.schedule.val_every} weight steps'
      logging_utils.info(
          f'[search] {setup.space.name} on {setup.dataset} {setup.image_shape}: '
          f'{searcher.schedule.stage_steps["vital"]} vital + '
          f'{searcher.schedule.stage_steps["nonvital"]} '
          f'non-vital weight steps, {cadence}; '
          f'{searcher.total_steps} steps in all (batch {config.search.batch_size}, '
          f'{per_epoch} steps per epoch of D_tr), on {mesh_lib.describe(setup.mesh)}')
      state = searcher.init(config.seed, mesh=setup.mesh)
    else:
      state = _restore_search(searcher, ckpt, latest, setup.mesh)
      logging_utils.info(f'[search] resuming from the checkpoint of step {latest} (stage '
                         f'{state.stage}) in {directory}')
    if state.stage != 'done' and searcher.weight_sampling != 'distribution':
      # The two losses of the progress lines then come from different paths; a user comparing
      # them would otherwise take the gap for a broken search.
      logging_utils.info(
          f'[search] weight steps train {searcher.weight_sampling} paths, not the sampled one: '
          '`loss` and `acc` are theirs; `val loss` is the architecture step\'s path, drawn from '
          'the distribution, and stays higher while it still gives poor ops weight')
    if state.stage != 'done':
      state = _search_loop(setup, searcher, state, ckpt, directory, latest)
    ckpt.wait()
  return _write_search_result(setup, searcher, state)


def _search_loop(setup: setup_lib.Setup, searcher, state, ckpt, directory, last_good):
  config = setup.config
  s = config.search

  def stream(split, start):
    return setup.batches(split, s.batch_size, seed=config.seed, start_step=int(start))

  # The streams resume where the counters say; each is created on first use (a run may never
  # take a D_val step, and an 'epoch' run resumed in an architecture pass takes no D_tr batch
  # for a while).
  streams = {}

  def next_batch(split, state, counter):
    if split not in streams:
      streams[split] = stream(split, state.counters[counter])
    return next(streams[split])

  record_history = _search_history(setup.workdir, searcher, state, last_good)
  stage_before = {'stage': state.stage}  # the stage of the step being logged

  def step_fn(state):
    stage_before['stage'] = state.stage
    needs_tr, needs_val = searcher.batches_needed(state)
    tr_batch = next_batch('search_train', state, 'tr_step') if needs_tr else None
    val_batch = next_batch('search_val', state, 'val_step') if needs_val else None
    new_state, metrics = searcher.train_step(state, tr_batch, val_batch)
    return new_state, metrics, new_state.stage != state.stage

  def on_log(step, state):  # pylint: disable=unused-argument
    stage = stage_before['stage']
    record_history(state, stage)
    if state.stage not in (stage, 'done'):  # where the next stage starts from
      record_history(state, state.stage)

  def after_step(step, state, boundary):
    if boundary:
      stage = stage_before['stage']
      vital_ops = state.vital_ops if stage == 'vital' else None
      logging_utils.info(f'[search] {stage} stage done at step {step}'
                         + (f'; vital ops: {vital_ops}' if vital_ops else ''))

  spec = loop.Loop(phase='search', total=searcher.total_steps, batch_size=s.batch_size,
                   log_every=config.log_every_steps,
                   checkpoint_every=config.checkpoint_every_steps, directory=directory,
                   error=search.SearchError, hint='try a lower config.search.weight_lr')
  with logging_utils.SummaryWriter(os.path.join(setup.workdir, 'tensorboard', 'search'),
                                   enabled=config.tensorboard) as writer:
    return loop.run(spec, state, state.step, last_good, step_fn=step_fn, writer=writer,
                    save_fn=lambda step, state: ckpt.save(
                        step, mesh_lib.global_arrays(state.arrays(), setup.mesh),
                        state.meta()),
                    wait_fn=ckpt.wait, on_log=on_log, after_step=after_step)


def _search_history(workdir: str, searcher, state, resumed_step):
  """`record(state, stage)`: appends one JSON line to <workdir>/search/history.jsonl, the
  distributions the search samples from after the state's step (a step of `stage`): step,
  stage, tau (the schedule's at that step), probabilities {layer: {op: p}} at that tau (stage 1:
  theta_vital; stage 2: the proposal with the highest pi), and in stage 2 pi (softmax) and that
  proposal's index. TensorBoard gets scalars only; this file is how theta and pi move over the
  search.

  A fresh search (resumed_step None) starts the file with its step 0; a resumed one drops the
  lines after its checkpoint's step, which it takes again, so the file reads as the
  uninterrupted run's. Process 0 writes, a whole line at a time; elsewhere `record` does
  nothing.
  """
  path = os.path.join(workdir, 'search', 'history.jsonl')
  primary = jax.process_index() == 0
  if primary:
    kept = []
    if resumed_step is not None and os.path.exists(path):
      with open(path) as f:
        for line in f:
          try:
            if json.loads(line)['step'] > resumed_step:
              break
          except ValueError:  # a line cut short by a kill
            break
          kept.append(line)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    checkpoint.atomic_write_text(path, ''.join(kept))

  def record(state, stage):
    if not primary:
      return
    # Host copies: the record is computed on process 0 alone, never as a program over the mesh.
    arch = {k: np.asarray(v) for k, v in state.arch.items()}
    if stage == 'vital' and 'theta' not in arch:  # the vital stage has just ended
      arch = {'theta': np.asarray(state.theta_vital, np.float32)}
    tau = float(searcher.tau(state))
    line = {'step': state.step, 'stage': stage, 'tau': tau,
            'probabilities': searcher.stage_of(state.replace(stage=stage)).probabilities(
                arch, tau)}
    if 'pi' in arch:
      pi = np.asarray(jax.nn.softmax(arch['pi']))
      line.update(pi=pi.tolist(), proposal=int(np.argmax(pi)))
    with open(path, 'a') as f:
      f.write(json.dumps(line) + '\n')

  if resumed_step is None:
    record(state, state.stage)
  return record


def final_choice(setup: setup_lib.Setup, searcher, state):
  """(the searched architecture, the record of how it was chosen or None) as
  config.search.final_selection says (`final_selection.py`)."""
  s = setup.config.search
  if s.final_selection == 'mode':
    return searcher.architecture(state), None
  candidates = searcher.candidates(state, int(s.final_candidates))
  calibration = ranking.take(setup.batches('search_train', s.batch_size, seed=setup.config.seed,
                                           train=True), final_selection.CALIBRATION_BATCHES)
  evaluation = list(setup.batches('search_val', s.batch_size, seed=setup.config.seed,
                                  train=False))
  scored = final_selection.score(searcher.stage_of(state).engine, state.weights, setup.space,
                                 candidates, calibration, evaluation)
  chosen = final_selection.best(scored)
  # Host copies of global sums: the batches may span processes.
  images = sum(int(mesh_lib.to_host(jax.numpy.sum(b['mask']))) if 'mask' in b
               else int(b['label'].shape[0]) for b in evaluation)
  logging_utils.info(
      f'[search] final choice by inherited accuracy: candidate {chosen + 1} of {len(scored)} '
      f'({100 * scored[chosen].inherited_top1:.2f}% on D_val, {images} images; the most '
      f'probable: {100 * scored[0].inherited_top1:.2f}%)')
  record = {'method': 'inherited', 'evaluated_on': f'search_val ({images} images)',
            'chosen': chosen,
            'candidates': [{'ops': list(c.architecture.ops), 'inherited_top1': c.inherited_top1}
                           for c in scored]}
  return scored[chosen].architecture, record


def _write_search_result(setup: setup_lib.Setup, searcher, state) -> dict:
  config = setup.config
  architecture, record = final_choice(setup, searcher, state)
  result = searcher.result(state, architecture)
  if record is not None:
    result['final_selection'] = record
  if jax.process_index() == 0:
    checkpoint.atomic_write_json(os.path.join(setup.workdir, 'arch.json'), result)
    samples = None
    if config.proposal_samples > 0:
      samples = searcher.proposal_samples(state, int(config.proposal_samples))
    analysis.write_search_report(setup.workdir, setup.space, result, samples)
    with open(os.path.join(setup.workdir, 'summary.txt')) as f:
      logging_utils.info('\n' + f.read())
  logging_utils.info(f'[search] architecture written to {setup.workdir}/arch.json: '
                     f'{",".join(architecture.ops)}')
  off = {k: v for k, v in result.get('deviation', {}).items() if abs(v) > costs.TOLERANCE}
  if off:
    shown = ', '.join(f'{k} {100 * v:+.1f}%' for k, v in off.items())
    logging_utils.info(f'[search] warning: the architecture is more than '
                       f'{100 * costs.TOLERANCE:.0f}% off its targets ({shown})')
  return result
