"""The driver: `train_and_evaluate(config, workdir)` runs a config's mode in a workdir.

Modes (config.mode):
- 'search': the two HourNAS stages (vital blocks, then non-vital blocks under the space
  proposals), then the result: arch.json, summary.txt and plots in the workdir; then, with
  config.retrain_after_search, retraining of the found architecture (workdir/train) and, with
  config.random_baseline, a comparison with random architectures of the same budget
  (workdir/baseline, comparison.json).
- 'train': trains config.train.arch from scratch ('' = the workdir's arch.json, a preset name,
  a JSON file or comma-separated ops), and the random baseline when configured.
- 'eval': loads the trained model(s) saved in the workdir and evaluates them.
- 'masking', 'sensitivity', 'saturation': the block-importance analyses of the paper's
  Figure 2, Appendix A and Appendix B (`importance_modes.py`; config.analysis).
- 'export': writes the workdir's trained model (or config.train.arch with fresh weights) as
  jax.export, TFLite and ONNX files, each checked against JAX (`export.py`; config.export).

Workdir layout:
    config.json         the resolved config of the latest run (rewritten by every run)
    fingerprint.json    the fields that matter, per phase; a run of another config is refused
    search/checkpoints  orbax checkpoints of the search state
    search/history.jsonl  the distributions the search samples from (theta_vital; pi and the
                        leading proposal), one line per progress line
    arch.json, summary.txt, theta.png, pi.png, proposals.png   the search result
    train/checkpoints, train/results.json     retraining of the searched (or given) arch
    baseline/population.jsonl, comparison.json   the searched architecture and random ones
                        of its budget, trained with several seeds (config.baseline)
    eval_results.json   written by 'eval' mode
    masking.json/png, sensitivity.json/png (+ sensitivity/population.jsonl),
    saturation.json/png (+ train/snapshots)   written by the analysis modes
    tensorboard/<phase> event files
Every run continues from the latest complete checkpoint of the phase it is in, so a killed run
restarted with the same command ends as an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Sequence

import jax
import numpy as np

from hournas_jax import analysis
from hournas_jax import arch as arch_lib
from hournas_jax import blocks
from hournas_jax import checkpoint
from hournas_jax import costs
from hournas_jax import data
from hournas_jax import errors
from hournas_jax import logging_utils
from hournas_jax import loop
from hournas_jax import mesh as mesh_lib
from hournas_jax import retrain
from hournas_jax import sampling
from hournas_jax import spaces

MODES = ('search', 'train', 'eval', 'masking', 'sensitivity', 'saturation', 'export')


class ConfigError(errors.UserError, ValueError):
  """A config value that cannot be used; the message names the field."""


@dataclasses.dataclass
class Setup:
  """Everything a phase needs that is derived from the config once."""
  config: Any
  workdir: str
  dataset: str
  data_dir: str | None
  image_size: int
  channels: int
  num_classes: int
  space: spaces.SearchSpace
  mesh: Any
  data_options: data.DataOptions = dataclasses.field(default_factory=data.DataOptions)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (self.image_size, self.image_size, self.channels)

  def data_source(self) -> dict:
    """What, besides the dataset's name, decides which images a run sees: a folder's path and
    the non-default config.data options ({} for the defaults, so fingerprints of runs that
    set nothing stay as they were)."""
    out = {}
    if self.dataset == data.FOLDER:
      out['data_dir'] = os.path.abspath(os.path.expanduser(self.data_dir or ''))
    default = data.DataOptions()
    changed = {k: v for k, v in dataclasses.asdict(self.data_options).items()
               if v != getattr(default, k)}
    if changed:
      out['options'] = changed
    return out

  def steps_per_epoch(self, split: str, batch_size: int, train: bool = True) -> int:
    """Batches per epoch of `batches(split, batch_size, train=train)`."""
    return data.steps_per_epoch(self.dataset, split, batch_size, train=train,
                                data_dir=self.data_dir, options=self.data_options)

  def batches(self, split: str, batch_size: int, *, seed: int, start_step: int = 0,
              train: bool = True, on_mesh: bool = True):
    """The config's data as batches (`data.make_batches`), put onto the mesh unless
    `on_mesh` is False (host numpy)."""
    batches = data.make_batches(self.dataset, split, batch_size=batch_size,
                                image_size=self.image_size, seed=seed, start_step=start_step,
                                train=train, data_dir=self.data_dir, channels=self.channels,
                                options=self.data_options)
    return data.prefetch_to_mesh(batches, self.mesh) if on_mesh else batches


# --------------------------------------------------------------------------------------------
# Config checks and resolution.


def _check(condition: bool, message: str) -> None:
  if not condition:
    raise ConfigError(message)


def _finite(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def validate_config(config) -> None:
  _check(config.mode in MODES, f'config.mode must be one of {", ".join(MODES)}, got '
         f'{config.mode!r}')
  _check(isinstance(config.seed, int) and config.seed >= 0,
         f'config.seed must be a non-negative integer, got {config.seed!r}')
  data.check_config(config)  # dataset, channels, data_dir and config.data.*
  _check(config.image_size >= 0, 'config.image_size must be >= 0 (0 = dataset default)')
  for key in ('params', 'flops', 'latency_ms'):
    value = config.targets[key]
    _check(_finite(value) and value >= 0, f'config.targets.{key} must be a number >= 0 '
           f'(0 = no target), got {value!r}')
  if config.targets.latency_ms > 0:
    table = config.targets.latency_table
    _check(bool(table), 'config.targets.latency_ms needs config.targets.latency_table, the '
           'latency table of your device (python -m hournas_jax.tools.latency --help)')
    _check(os.path.isfile(os.path.expanduser(table)), f'config.targets.latency_table '
           f'{table!r} is not a file (measure one with python -m hournas_jax.tools.latency)')
  from hournas_jax import engines, search  # pylint: disable=g-import-not-at-top
  s = config.search
  _check(s.sampler in search.SAMPLERS, f'config.search.sampler must be one of '
         f'{", ".join(search.SAMPLERS)}, got {s.sampler!r}')
  _check(s.batch_size > 0, 'config.search.batch_size must be positive')
  for key in ('vital_epochs', 'nonvital_epochs', 'vital_steps', 'nonvital_steps', 'val_every'):
    _check(s[key] >= 0, f'config.search.{key} must be >= 0')
  _check(s.num_proposals >= 1, 'config.search.num_proposals must be >= 1')
  _check(_finite(s.arch_lr) and s.arch_lr >= 0 and _finite(s.weight_lr) and s.weight_lr > 0,
         f'config.search.weight_lr must be > 0 and config.search.arch_lr >= 0 (0 = the '
         f'architecture never moves), got {s.weight_lr!r} and {s.arch_lr!r}')
  _check(_finite(s.arch_warmup) and 0 <= s.arch_warmup < 1,
         f'config.search.arch_warmup must be in [0, 1), got {s.arch_warmup!r}')
  _check(s.tau0 > 0 and 0 < s.tau_decay <= 1,
         'config.search.tau0 must be > 0 and config.search.tau_decay in (0, 1]')
  try:
    engines.engine_class(s.engine, s.sampler)
  except ValueError as e:
    raise ConfigError(f'config.{e}') from None
  for key, allowed in (('precision', blocks.PRECISIONS), ('schedule', search.SCHEDULES),
                       ('temperature', search.TEMPERATURES),
                       ('weight_sharing', search.WEIGHT_SHARING),
                       ('arch_gradient', search.ARCH_GRADIENTS),
                       ('vital_init', search.VITAL_INITS)):
    _check(s[key] in allowed, f'config.search.{key} must be one of {", ".join(allowed)}, got '
           f'{s[key]!r}')
  _check(config.stem_stride in (1, 2), f'config.stem_stride must be 1 or 2, got '
         f'{config.stem_stride!r}')
  t = config.train
  _check(t.precision in blocks.PRECISIONS, f'config.train.precision must be one of '
         f'{", ".join(blocks.PRECISIONS)}, got {t.precision!r}')
  _check(t.optimizer in retrain.OPTIMIZERS, f'config.train.optimizer must be one of '
         f'{", ".join(retrain.OPTIMIZERS)}, got {t.optimizer!r}')
  _check(t.schedule in retrain.SCHEDULES, f'config.train.schedule must be one of '
         f'{", ".join(retrain.SCHEDULES)}, got {t.schedule!r}')
  _check(t.lr_scaling in ('linear', 'none'), "config.train.lr_scaling must be 'linear' or "
         f"'none', got {t.lr_scaling!r}")
  _check(t.batch_size > 0 and t.eval_batch_size > 0,
         'config.train.batch_size and eval_batch_size must be positive')
  _check(t.epochs >= 0 and t.steps >= 0 and (t.epochs > 0 or t.steps > 0),
         'config.train.epochs or config.train.steps must be positive')
  _check(_finite(t.learning_rate) and t.learning_rate > 0,
         'config.train.learning_rate must be positive')
  _check(0 <= t.label_smoothing < 1, 'config.train.label_smoothing must be in [0, 1)')
  _check(0 <= t.dropout_rate < 1, 'config.train.dropout_rate must be in [0, 1)')
  _check(0 <= t.ema_decay < 1, 'config.train.ema_decay must be in [0, 1)')
  _check(t.warmup_epochs >= 0 and t.decay_epochs > 0, 'config.train.warmup_epochs must be >= 0'
         ' and decay_epochs > 0')
  b = config.baseline
  _check(b.architectures >= 2 and b.seeds >= 1 and b.workers >= 0,
         'config.baseline.architectures must be >= 2, baseline.seeds >= 1 and baseline.workers '
         '>= 0')
  _check(_finite(t.snapshot_every_epochs) and t.snapshot_every_epochs >= 0,
         'config.train.snapshot_every_epochs must be >= 0 (0 = no weight snapshots)')
  a = config.analysis
  _check(a.mask_draws >= 1 and a.seeds >= 1 and a.workers >= 0,
         'config.analysis.mask_draws and analysis.seeds must be >= 1 and analysis.workers >= 0')
  from hournas_jax import importance  # pylint: disable=g-import-not-at-top
  try:
    importance.parse_probabilities(a.mask_probabilities)
  except importance.AnalysisError as e:
    raise ConfigError(f'config.analysis.{e}') from None
  _check(config.checkpoint_every_steps > 0, 'config.checkpoint_every_steps must be positive')
  _check(config.log_every_steps > 0, 'config.log_every_steps must be positive')
  _check(config.keep_checkpoints >= 1, 'config.keep_checkpoints must be >= 1')


def configure_jax(config) -> None:
  if config.xla_fast_compile:
    jax.config.update('jax_disable_most_optimizations', True)
  if config.compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir',
                      os.path.abspath(os.path.expanduser(config.compilation_cache_dir)))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)


def resolve_setup(config, workdir: str) -> Setup:
  data_dir = config.data_dir or None
  options = data.options_from_config(config)
  info = data.dataset_info(config.dataset, data_dir, options)
  image_size = config.image_size or int(info['image_shape'][0])
  channels = config.channels or int(info['image_shape'][2])
  ops = tuple(o.strip() for o in config.ops.split(',') if o.strip()) or None
  space = spaces.get_space(config.space, resolution=image_size,
                           num_classes=int(info['num_classes']), width=config.width, ops=ops,
                           stem_stride=config.stem_stride)
  return Setup(config=config, workdir=workdir, dataset=config.dataset, data_dir=data_dir,
               image_size=image_size, channels=channels, num_classes=int(info['num_classes']),
               space=space, mesh=mesh_lib.make_mesh(), data_options=options)


def write_config(setup: Setup) -> None:
  config = setup.config.to_dict()
  config['image_size'] = setup.image_size
  config['channels'] = setup.channels
  resolved = {'num_classes': setup.num_classes, 'image_shape': list(setup.image_shape),
              'devices': jax.device_count(), 'processes': jax.process_count(),
              'platform': jax.devices()[0].platform}
  if jax.process_index() == 0:
    checkpoint.atomic_write_json(os.path.join(setup.workdir, 'config.json'),
                                 {**config, 'resolved': resolved})


# --------------------------------------------------------------------------------------------
# Entry point.


def train_and_evaluate(config, workdir: str) -> dict:
  """Runs config.mode in workdir; returns a summary dict (also what was written to disk)."""
  validate_config(config)
  mesh_lib.maybe_initialize_distributed(config.distributed)
  configure_jax(config)
  workdir = checkpoint.prepare_workdir(workdir)
  with checkpoint.workdir_lock(workdir):
    setup = resolve_setup(config, workdir)
    write_config(setup)
    return _run_mode(setup)


def _run_mode(setup: Setup) -> dict:
  config = setup.config
  if config.mode == 'search':
    result = run_search(setup)
    summary = {'search': result}
    if config.retrain_after_search:
      ops = [result['ops'][name] for name in setup.space.searchable_names]
      summary.update(_train_phases(setup, ops))
    return summary
  if config.mode == 'train':
    return _train_phases(setup, resolve_architecture(setup))
  if config.mode == 'eval':
    return run_eval(setup)
  if config.mode == 'export':
    from hournas_jax import export  # pylint: disable=g-import-not-at-top
    return export.run(setup)
  from hournas_jax import importance_modes  # pylint: disable=g-import-not-at-top
  return {'masking': importance_modes.run_masking,
          'sensitivity': importance_modes.run_sensitivity,
          'saturation': importance_modes.run_saturation}[config.mode](setup)


def _train_phases(setup: Setup, ops: Sequence[str]) -> dict:
  results = {'train': retrain.run(setup, os.path.join(setup.workdir, 'train'), ops,
                                  phase='train')}
  if setup.config.random_baseline:
    from hournas_jax import baseline  # pylint: disable=g-import-not-at-top
    results['comparison'] = baseline.compare_with_random(setup, ops)
  return results


# --------------------------------------------------------------------------------------------
# Architectures.


def resolve_architecture(setup: Setup) -> list[str]:
  spec = setup.config.train.arch
  if not spec:
    path = os.path.join(setup.workdir, 'arch.json')
    if not os.path.exists(path):
      raise ConfigError(f'no searched architecture in {setup.workdir} (arch.json): run '
                        '--config.mode=search there first, or set --config.train.arch to a '
                        'preset, a JSON file or comma-separated ops')
    return list(arch_lib.load(path, setup.space).ops)
  return list(arch_lib.resolve(spec, setup.space).ops)


# --------------------------------------------------------------------------------------------
# Search.


# Fields added to the search fingerprint after its first release, with the value earlier
# versions behaved as, so that their workdirs still resume.
SEARCH_FINGERPRINT_ADDED = {'stem_stride': 2, 'search.schedule': 'interleaved',
                            'search.temperature': 'logits', 'search.weight_sharing': 'none',
                            'search.arch_gradient': 'straight_through',
                            'search.arch_warmup': 0.0, 'search.vital_init': 'uniform',
                            'processes': 1, 'search.engine': '', 'search.precision': 'float32',
                            'targets.latency_ms': 0.0, 'targets.latency_table': ''}


def search_fingerprint(setup: Setup) -> dict:
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


def search_steps(setup: Setup) -> tuple[int, int, int, int]:
  """(steps per epoch of D_tr, of D_val, vital weight steps, non-vital weight steps).

  D_val's steps per epoch are counted only for the 'epoch' schedule (0 otherwise): the
  interleaved one never asks for them, and a run that takes no D_val step needs no D_val batch.
  """
  s = setup.config.search
  per_epoch = setup.steps_per_epoch('search_train', s.batch_size)
  val_per_epoch = 0
  if s.get('schedule', 'interleaved') == 'epoch':
    val_per_epoch = setup.steps_per_epoch('search_val', s.batch_size)
  vital = int(s.vital_steps) or max(1, int(round(s.vital_epochs * per_epoch)))
  nonvital = int(s.nonvital_steps) or max(1, int(round(s.nonvital_epochs * per_epoch)))
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
  import hashlib  # pylint: disable=g-import-not-at-top
  with open(os.path.expanduser(path), 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


def cost_tables(setup: Setup) -> costs.CostTables:
  """The space's params and FLOPs tables, with the latency table of config.targets when a
  latency target is set (refused when it was measured for another space or input)."""
  tables = costs.cost_tables(setup.space)
  targets = setup.config.targets
  if not targets.latency_ms:
    return tables
  from hournas_jax import latency  # pylint: disable=g-import-not-at-top
  table = latency.latency_tables(os.path.expanduser(targets.latency_table), setup.space,
                                 channels=setup.channels)
  return tables.with_latency(table.latency, table.fixed_ms)


def make_searcher(setup: Setup):
  """The Searcher of a setup's config (steps from the dataset's split sizes)."""
  from hournas_jax import search  # pylint: disable=g-import-not-at-top
  config = setup.config
  per_epoch, val_per_epoch, vital_steps, nonvital_steps = search_steps(setup)
  return search.Searcher(setup.space, config.search, config.targets, setup.image_shape,
                         vital_steps, nonvital_steps, tr_steps_per_epoch=per_epoch,
                         val_steps_per_epoch=val_per_epoch, tables=cost_tables(setup))


def load_search_state(setup: Setup):
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
  from hournas_jax import search  # pylint: disable=g-import-not-at-top
  arrays, meta = ckpt.restore(step, lambda meta: _with_sharding(searcher.template(meta), mesh))
  return search.SearchState.from_parts(arrays, meta)


def run_search(setup: Setup) -> dict:
  config = setup.config
  checkpoint.check_fingerprint(setup.workdir, 'search', search_fingerprint(setup),
                              implicit=SEARCH_FINGERPRINT_ADDED)
  per_epoch, val_per_epoch, _, _ = search_steps(setup)
  searcher = make_searcher(setup)
  directory = os.path.join(setup.workdir, 'search', 'checkpoints')
  with checkpoint.Checkpointer(directory, keep=config.keep_checkpoints) as ckpt:
    latest = ckpt.latest_step()
    if latest is None:
      if searcher.schedule == 'epoch':
        cadence = (f'each epoch {per_epoch} weight steps on D_tr, then {val_per_epoch} '
                   'architecture steps on D_val')
      else:
        cadence = f'one architecture step on D_val every {searcher.val_every} weight steps'
      logging_utils.info(
          f'[search] {setup.space.name} on {setup.dataset} {setup.image_shape}: '
          f'{searcher.stage_steps["vital"]} vital + {searcher.stage_steps["nonvital"]} '
          f'non-vital weight steps, {cadence}; '
          f'{searcher.total_steps} steps in all (batch {config.search.batch_size}, '
          f'{per_epoch} steps per epoch of D_tr), on {mesh_lib.describe(setup.mesh)}')
      state = searcher.init(config.seed)
    else:
      state = _restore_search(searcher, ckpt, latest, setup.mesh)
      logging_utils.info(f'[search] resuming from the checkpoint of step {latest} (stage '
                         f'{state.stage}) in {directory}')
    if state.stage != 'done':
      state = _search_loop(setup, searcher, state, ckpt, directory, latest)
    ckpt.wait()
  return _write_search_result(setup, searcher, state)


def _search_loop(setup, searcher, state, ckpt, directory, last_good):
  from hournas_jax import search  # pylint: disable=g-import-not-at-top
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
  search. (The result's probabilities are at tau = 1, not at the tau the search draws at.)

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
    # Searcher.probabilities is at tau = 1, and softmax(theta / t) = softmax of theta / t at 1.
    t = float(sampling.sampling_tau(tau, searcher.tau_mode))
    scaled = {k: v / t if k in ('theta', 'thetas') else v for k, v in arch.items()}
    line = {'step': state.step, 'stage': stage, 'tau': tau,
            'probabilities': searcher.stage_of(state.replace(stage=stage)).probabilities(
                scaled)}
    if 'pi' in arch:
      pi = np.asarray(jax.nn.softmax(arch['pi']))
      line.update(pi=pi.tolist(), proposal=int(np.argmax(pi)))
    with open(path, 'a') as f:
      f.write(json.dumps(line) + '\n')

  if resumed_step is None:
    record(state, state.stage)
  return record


def _write_search_result(setup: Setup, searcher, state) -> dict:
  config = setup.config
  result = searcher.result(state)
  architecture = arch_lib.Architecture.from_dict(result, setup.space)
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


# --------------------------------------------------------------------------------------------
# Eval.


def check_model_data(setup: Setup, meta, run_dir: str) -> None:
  """Refuses a saved model trained on other data than the config's."""
  if (meta.get('dataset') != setup.dataset or tuple(meta['image_shape']) != setup.image_shape
      or meta.get('data', {}) != setup.data_source()):
    raise ConfigError(f'the model in {run_dir} was trained on {meta.get("dataset")} '
                      f'{tuple(meta["image_shape"])}, not {setup.dataset} '
                      f'{setup.image_shape}: use the config it was trained with')


def run_eval(setup: Setup) -> dict:
  results = {}
  for phase in ('train',):
    run_dir = os.path.join(setup.workdir, phase)
    trainer, state, meta = retrain.load_model(setup, run_dir, phase)
    check_model_data(setup, meta, run_dir)
    step = int(mesh_lib.to_host(state['step']))
    if step < int(meta['total_steps']):
      logging_utils.info(f'[eval] note: the {phase} run stopped at step {step} of '
                         f'{meta["total_steps"]}; evaluating that checkpoint')
    batches = retrain.eval_batches(setup, setup.config.train.eval_batch_size)
    out = trainer.evaluate(state, batches)
    out.update({'step': step, 'ops': meta['ops']})
    results[phase] = out
    logging_utils.info(f'[eval] {phase}: top-1 {100 * out["top1"]:.2f}%  top-5 '
                       f'{100 * out["top5"]:.2f}%  loss {out["loss"]:.4f} '
                       f'({out["examples"]} examples, step {step})')
  if jax.process_index() == 0:
    checkpoint.atomic_write_json(os.path.join(setup.workdir, 'eval_results.json'), results)
  return results
