"""Retraining a fixed architecture from scratch with the baseline's recipe (config.train).

The network is `supernet.SuperNet` with one op per layer (`supernet.fixed_layer_ops`), compiled
as one program and run data parallel over the ('data',) mesh: state replicated, batches split
along the batch axis, BatchNorm statistics over the global batch.

Recipe pieces (config.train):
- optimizer 'sgd' (momentum, optional Nesterov; FBNet) or 'rmsprop' (TensorFlow style, as
  MnasNet/EfficientNet: decay 0.9, momentum 0.9, eps 1e-3 inside the square root, mean square
  initialised to 1). Weight decay is added to the gradient of conv and dense kernels only
  (BatchNorm scales/biases and biases are not decayed, as the TF MnasNet/EfficientNet code),
  before the optimizer, i.e. an L2 term in the loss. 'adamw' decouples it instead (the decay
  lr x weight_decay x w beside Adam's step, on kernels only).
- learning rate = learning_rate x batch_size / 256 when lr_scaling == 'linear'; linear warmup
  over warmup_epochs, then 'cosine' (to 0 at the end), 'exponential' (x decay_rate every
  decay_epochs, staircase, as TF's exponential_decay) or 'constant'.
- label smoothing, dropout before the classifier, and an exponential moving average of the
  weights and BatchNorm statistics (ema_decay > 0; TF's num_updates rule
  decay_t = min(ema_decay, (1 + t) / (10 + t))) which is then what gets evaluated.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

from hournas_jax import checkpoint
from hournas_jax import data
from hournas_jax import decoys
from hournas_jax import errors
from hournas_jax import logging_utils
from hournas_jax import loop
from hournas_jax import mesh as mesh_lib
from hournas_jax import setup as setup_lib
from hournas_jax import snapshots
from hournas_jax import blocks, optim, spaces, supernet


class TrainingError(errors.UserError, RuntimeError):
  """Training cannot go on (a non-finite loss); the last good checkpoint is kept."""


OPTIMIZERS = ('sgd', 'rmsprop', 'adamw')
SCHEDULES = ('cosine', 'exponential', 'constant')


def check_config(t) -> None:
  """config.train: raises setup.ConfigError naming the first field that cannot be used."""
  check, finite = setup_lib.check, setup_lib.finite
  check(t.precision in blocks.PRECISIONS, f'config.train.precision must be one of '
        f'{", ".join(blocks.PRECISIONS)}, got {t.precision!r}')
  check(t.optimizer in OPTIMIZERS, f'config.train.optimizer must be one of '
        f'{", ".join(OPTIMIZERS)}, got {t.optimizer!r}')
  check(t.schedule in SCHEDULES, f'config.train.schedule must be one of '
        f'{", ".join(SCHEDULES)}, got {t.schedule!r}')
  check(t.lr_scaling in ('linear', 'none'), "config.train.lr_scaling must be 'linear' or "
        f"'none', got {t.lr_scaling!r}")
  check(t.batch_size > 0 and t.eval_batch_size > 0,
        'config.train.batch_size and eval_batch_size must be positive')
  check(t.epochs >= 0 and t.steps >= 0 and (t.epochs > 0 or t.steps > 0),
        'config.train.epochs or config.train.steps must be positive')
  check(finite(t.learning_rate) and t.learning_rate > 0,
        'config.train.learning_rate must be positive')
  check(0 <= t.label_smoothing < 1, 'config.train.label_smoothing must be in [0, 1)')
  check(0 <= t.dropout_rate < 1, 'config.train.dropout_rate must be in [0, 1)')
  check(0 <= t.ema_decay < 1, 'config.train.ema_decay must be in [0, 1)')
  check(t.warmup_epochs >= 0 and t.decay_epochs > 0,
        'config.train.warmup_epochs must be >= 0 and decay_epochs > 0')
  check(finite(t.snapshot_every_epochs) and t.snapshot_every_epochs >= 0,
        'config.train.snapshot_every_epochs must be >= 0 (0 = no weight snapshots)')


def peak_learning_rate(tcfg) -> float:
  scale = tcfg.batch_size / 256 if tcfg.lr_scaling == 'linear' else 1.0
  return float(tcfg.learning_rate) * scale


def make_schedule(tcfg, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  peak = peak_learning_rate(tcfg)
  warmup = min(setup_lib.steps(steps_per_epoch, epochs=tcfg.warmup_epochs, at_least=0),
               max(total_steps - 1, 0))
  rest = max(total_steps - warmup, 1)
  if tcfg.schedule == 'cosine':
    main = optax.cosine_decay_schedule(peak, decay_steps=rest, alpha=0.0)
  elif tcfg.schedule == 'exponential':
    main = optax.exponential_decay(
        peak, transition_steps=setup_lib.steps(steps_per_epoch, epochs=tcfg.decay_epochs),
        decay_rate=tcfg.decay_rate, staircase=True)
  elif tcfg.schedule == 'constant':
    main = optax.constant_schedule(peak)
  else:
    raise ValueError(f'unknown schedule {tcfg.schedule!r}')
  if warmup <= 0:
    return main
  # Warmup reaches the peak at step `warmup` (starting from peak / warmup at step 0).
  ramp = optax.linear_schedule(peak / warmup, peak, warmup)
  return optax.join_schedules([ramp, main], [warmup])


def decay_mask(params):
  """True for conv and dense kernels (rank >= 2), the weights L2 applies to."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(tcfg, schedule) -> optax.GradientTransformation:
  if tcfg.optimizer == 'adamw':
    # Decoupled weight decay (Loshchilov and Hutter), scaled by the schedule like the step.
    return optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=tcfg.weight_decay,
                       mask=decay_mask)
  parts = []
  if tcfg.weight_decay:
    parts.append(optax.add_decayed_weights(tcfg.weight_decay, mask=decay_mask))
  if tcfg.optimizer == 'sgd':
    parts.append(optax.sgd(schedule, momentum=tcfg.momentum or None, nesterov=tcfg.nesterov))
  elif tcfg.optimizer == 'rmsprop':
    parts.append(optax.rmsprop(schedule, decay=tcfg.rmsprop_decay, eps=tcfg.rmsprop_epsilon,
                               initial_scale=1.0, eps_in_sqrt=True,
                               momentum=tcfg.momentum or None))
  else:
    raise ValueError(f'unknown optimizer {tcfg.optimizer!r}')
  return optax.chain(*parts)


def _all_finite(tree):
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


_COMPILED = {}


class Retrainer:
  """Compiled training and evaluation of one fixed architecture (initialised without
  compiling, by `SuperNet.init_all`)."""

  def __init__(self, space: spaces.SearchSpace, ops: Sequence[str], tcfg, *, image_shape,
               steps_per_epoch: int, total_steps: int, mesh, seed: int):
    self.space = space
    self.ops = tuple(ops)
    self.tcfg = tcfg
    self.image_shape = tuple(image_shape)
    self.total_steps = int(total_steps)
    self.steps_per_epoch = int(steps_per_epoch)
    self.mesh = mesh
    self.seed = int(seed)
    self.net = supernet.SuperNet(
        space, supernet.fixed_layer_ops(space, self.ops), dropout_rate=float(tcfg.dropout_rate),
        dtype=blocks.compute_dtype(tcfg.get('precision', 'float32')))
    self.schedule = make_schedule(tcfg, steps_per_epoch, total_steps)
    self.tx = make_optimizer(tcfg, self.schedule)
    self.ema_decay = float(tcfg.ema_decay)
    self.label_smoothing = float(tcfg.label_smoothing)
    # Compiled steps are shared by every Retrainer of the same network, recipe and mesh in this
    # process (e.g. 'eval' right after training, a second run, the training seeds of one
    # architecture in a population), so each compiles once; the seed is an argument.
    key = (self.net, tuple(sorted(tcfg.to_dict().items())), self.total_steps,
           self.steps_per_epoch, mesh)
    if key not in _COMPILED:
      repl = mesh_lib.replicated(mesh)
      _COMPILED[key] = (jax.jit(self._train_step, out_shardings=repl, donate_argnums=0),
                        jax.jit(self._eval_sums, out_shardings=repl),
                        jax.jit(_all_finite, out_shardings=repl),
                        jax.jit(self._state_from_variables, out_shardings=repl))
    compiled_step, self._eval_step, self.all_finite, self._initial_state = _COMPILED[key]
    seed_array = jnp.asarray(self.seed, jnp.uint32)
    self.train_step = lambda state, batch: compiled_step(state, batch, seed_array)

  # ----- state

  def _state_from_variables(self, variables) -> dict:
    params = variables['params']
    state = {'step': jnp.zeros((), jnp.int32), 'params': params,
             'batch_stats': variables['batch_stats'], 'opt_state': self.tx.init(params)}
    if self.ema_decay:
      state['ema'] = {'params': params, 'batch_stats': variables['batch_stats']}
    return state

  def init(self) -> dict:
    """The initial state, replicated over the mesh (values from `SuperNet.init_all`)."""
    # Host values go to the mesh by transfer alone: jnp.asarray of a numpy array compiles an
    # identity program per shape (tens of compiles before the first step). The state built
    # from them comes out replicated, the sharding the training step takes and returns, so
    # the step compiles once.
    variables = mesh_lib.replicate(self.net.init_all(self.seed, self.image_shape), self.mesh)
    return self._initial_state(variables)

  def abstract_state(self) -> dict:
    shapes = jax.eval_shape(lambda: self.net.init(
        jax.random.key(0), jnp.zeros((1, *self.image_shape)), train=False))
    return mesh_lib.abstract(jax.eval_shape(self._state_from_variables, shapes), self.mesh)

  # ----- steps

  def _train_step(self, state, batch, seed):
    step = state['step']
    rng = jax.random.fold_in(jax.random.key(seed), step)

    def loss_fn(params):
      logits, updated = self.net.apply(
          {'params': params, 'batch_stats': state['batch_stats']}, batch['image'],
          train=True, mutable=['batch_stats'], rngs={'dropout': rng})
      loss = optim.cross_entropy(logits, batch['label'], self.label_smoothing)
      return loss, (logits, updated['batch_stats'])

    (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state['params'])
    updates, opt_state = self.tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    new = {'step': step + 1, 'params': params, 'batch_stats': stats, 'opt_state': opt_state}
    if self.ema_decay:
      t = step.astype(jnp.float32)
      decay = jnp.minimum(self.ema_decay, (1.0 + t) / (10.0 + t))
      new['ema'] = jax.tree.map(lambda e, v: decay * e + (1.0 - decay) * v, state['ema'],
                                {'params': params, 'batch_stats': stats})
    metrics = {'loss': loss,
               'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label']),
               'learning_rate': self.schedule(step)}
    return new, metrics

  def eval_variables(self, state):
    source = state['ema'] if self.ema_decay else state
    return {'params': source['params'], 'batch_stats': source['batch_stats']}

  def _eval_sums(self, state, batch):
    logits = self.net.apply(self.eval_variables(state), batch['image'], train=False)
    labels = batch['label']
    mask = batch.get('mask', jnp.ones(labels.shape, jnp.float32))
    k = min(5, logits.shape[-1])
    top = jax.lax.top_k(logits, k)[1]
    correct1 = (top[:, 0] == labels).astype(jnp.float32)
    correct5 = jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return {'correct1': jnp.sum(correct1 * mask), 'correct5': jnp.sum(correct5 * mask),
            'loss': jnp.sum(loss * mask), 'count': jnp.sum(mask)}

  def evaluate(self, state, batches: Iterable[dict]) -> dict:
    totals = None
    for batch in batches:
      sums = self._eval_step(state, batch)
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if totals is None:
      raise data.DataError('the eval split yielded no batches')
    totals = {k: float(v) for k, v in mesh_lib.to_host(totals).items()}
    count = max(totals['count'], 1.0)
    return {'top1': totals['correct1'] / count, 'top5': totals['correct5'] / count,
            'loss': totals['loss'] / count, 'examples': int(totals['count'])}


# --------------------------------------------------------------------------------------------
# The driver.


@dataclasses.dataclass
class RunPaths:
  run_dir: str

  @property
  def checkpoints(self) -> str:
    return os.path.join(self.run_dir, 'checkpoints')

  @property
  def results(self) -> str:
    return os.path.join(self.run_dir, 'results.json')

  @property
  def snapshots(self) -> str:
    return os.path.join(self.run_dir, 'snapshots')


def total_steps(tcfg, steps_per_epoch: int) -> int:
  """The training's length in steps (config.train.steps, else its epochs)."""
  return setup_lib.steps(steps_per_epoch, epochs=tcfg.epochs, steps=tcfg.steps)


def model_meta(setup: setup_lib.Setup, ops, total: int, phase: str, steps_per_epoch: int) -> dict:
  """What a saved model needs besides its arrays to be rebuilt and evaluated."""
  space = setup.space
  return {'kind': 'retrain', 'phase': phase, 'space': space.name, 'width': space.width,
          'resolution': space.resolution, 'num_classes': space.num_classes,
          'stem_stride': space.stem_stride,
          'space_ops': list(space.op_names), 'image_shape': list(setup.image_shape),
          'dataset': setup.dataset,
          **({'data': setup.data_source()} if setup.data_source() else {}),
          'ops': list(ops), 'total_steps': int(total), 'steps_per_epoch': int(steps_per_epoch),
          'seed': int(setup.config.seed),
          'train': setup.config.train.to_dict()}


def fingerprint(setup: setup_lib.Setup, ops) -> dict:
  """The fields a retraining run's results depend on (checked when a workdir is reused)."""
  config = setup.config
  return {'space': setup.space.name, 'width': setup.space.width, 'dataset': setup.dataset,
          'stem_stride': setup.space.stem_stride,
          'image_shape': list(setup.image_shape), 'seed': int(config.seed), 'ops': list(ops),
          'processes': jax.process_count(),
          **({'data': setup.data_source()} if setup.data_source() else {}),
          **{f'train.{k}': v for k, v in sorted(config.train.to_dict().items())
             if k not in NOT_IN_FINGERPRINT}}


# Fields that do not change what training computes: a rerun may change them.
NOT_IN_FINGERPRINT = ('arch', 'eval_batch_size', 'eval_every_steps', 'snapshot_every_epochs')


def eval_batches(setup: setup_lib.Setup, batch_size: int):
  return setup.batches('eval', batch_size, seed=0, train=False)


def run(setup: setup_lib.Setup, run_dir: str, ops: Sequence[str], *, phase: str = 'train') -> dict:
  """Trains `ops` from scratch (or continues the run in `run_dir`) and evaluates it.

  Returns the results dict also written to <run_dir>/results.json.
  """
  config = setup.config
  tcfg = config.train
  paths = RunPaths(run_dir)
  os.makedirs(run_dir, exist_ok=True)
  checkpoint.check_fingerprint(os.path.dirname(run_dir), phase, fingerprint(setup, ops),
                              implicit={'stem_stride': 2, 'processes': 1,
                                        'train.precision': 'float32'})
  steps_per_epoch = setup.steps_per_epoch('train', tcfg.batch_size)
  total = total_steps(tcfg, steps_per_epoch)
  trainer = Retrainer(setup.space, ops, tcfg, image_shape=setup.image_shape,
                      steps_per_epoch=steps_per_epoch, total_steps=total, mesh=setup.mesh,
                      seed=config.seed)
  meta = model_meta(setup, ops, total, phase, steps_per_epoch)
  tensorboard = os.path.join(os.path.dirname(run_dir), 'tensorboard', phase)
  with checkpoint.Checkpointer(paths.checkpoints, keep=config.keep_checkpoints) as ckpt, \
      logging_utils.SummaryWriter(tensorboard, enabled=config.tensorboard) as writer:
    latest = ckpt.latest_step()
    if latest is None:
      state = trainer.init()
      if snapshots.interval(tcfg, steps_per_epoch):
        snapshots.save(paths.snapshots, 0, state['params'])
      logging_utils.info(f'[{phase}] training {setup.space.name} from scratch: {total} steps '
                         f'({total / steps_per_epoch:.3g} epochs of {steps_per_epoch}), batch '
                         f'{tcfg.batch_size}, on {mesh_lib.describe(setup.mesh)}')
    else:
      state, _ = ckpt.restore(latest, lambda _: trainer.abstract_state())
      logging_utils.info(f'[{phase}] resuming from the checkpoint of step {latest} in '
                         f'{paths.checkpoints}')
    step = int(mesh_lib.to_host(state['step']))
    if step < total:
      state = _train_loop(setup, trainer, state, step, total, ckpt, meta, phase, paths, latest,
                          writer)
    ckpt.wait()
    results = trainer.evaluate(state, eval_batches(setup, tcfg.eval_batch_size))
    writer.scalars(total, {'eval/top1': results['top1'], 'eval/top5': results['top5'],
                           'eval/loss': results['loss']})
  results.update({'phase': phase, 'steps': total, 'ops': list(ops),
                  'evaluated': 'ema' if trainer.ema_decay else 'weights'})
  if jax.process_index() == 0:
    checkpoint.atomic_write_json(paths.results, results)
  logging_utils.info(f'[{phase}] eval: top-1 {100 * results["top1"]:.2f}%  top-5 '
                     f'{100 * results["top5"]:.2f}%  loss {results["loss"]:.4f} '
                     f'({results["examples"]} examples)')
  return results


def _train_loop(setup: setup_lib.Setup, trainer, state, step, total, ckpt, meta, phase, paths,
                last_good, writer):
  config = setup.config
  tcfg = config.train
  batches = setup.batches('train', tcfg.batch_size, seed=config.seed, start_step=step)
  eval_every = max(0, tcfg.eval_every_steps)
  snapshot_every = snapshots.interval(tcfg, trainer.steps_per_epoch)

  def step_fn(state):
    state, metrics = trainer.train_step(state, next(batches))
    return state, metrics, False

  def after_step(step, state, boundary):  # pylint: disable=unused-argument
    if snapshot_every and (step % snapshot_every == 0 or step == total):
      snapshots.save(paths.snapshots, step, state['params'])
    if eval_every and step % eval_every == 0 and step < total:
      results = trainer.evaluate(state, eval_batches(setup, tcfg.eval_batch_size))
      logging_utils.info(f'[{phase}] step {step}: eval top-1 {100 * results["top1"]:.2f}%')
      writer.scalars(step, {'eval/top1': results['top1'], 'eval/top5': results['top5'],
                            'eval/loss': results['loss']})

  spec = loop.Loop(phase=phase, total=total, batch_size=tcfg.batch_size,
                   log_every=max(1, config.log_every_steps),
                   checkpoint_every=max(1, config.checkpoint_every_steps),
                   directory=paths.checkpoints, error=TrainingError,
                   hint='try a lower config.train.learning_rate')
  return loop.run(spec, state, step, last_good, step_fn=step_fn, writer=writer,
                  save_fn=lambda step, state: ckpt.save(step, state, {'meta': meta}),
                  wait_fn=ckpt.wait,
                  finite_fn=lambda state: bool(mesh_lib.to_host(trainer.all_finite(
                      state['params']))),
                  after_step=after_step)


def load_model(setup: setup_lib.Setup, run_dir: str, phase: str = 'train'):
  """(trainer, state, meta) of the latest checkpoint in `run_dir` (for 'eval' mode)."""
  paths = RunPaths(run_dir)
  if not os.path.isdir(paths.checkpoints):
    raise checkpoint.CheckpointError(
        f'no trained model in {run_dir}: run --config.mode=train (or search) in this workdir '
        'first')
  with checkpoint.Checkpointer(paths.checkpoints, keep=setup.config.keep_checkpoints) as ckpt:
    latest = ckpt.latest_step()
    if latest is None:
      raise checkpoint.CheckpointError(f'no complete checkpoint in {paths.checkpoints}: run '
                                       f'--config.mode={phase} in this workdir first')
    meta = ckpt.read_meta(latest).get('meta') or {}
    if meta.get('kind') != 'retrain':
      raise checkpoint.CheckpointError(f'{paths.checkpoints} does not hold a trained model')
    real_ops, twinned = decoys.split(meta['space_ops'])
    space = spaces.get_space(meta['space'], resolution=int(meta['resolution']),
                             num_classes=int(meta['num_classes']), width=float(meta['width']),
                             ops=real_ops,
                             stem_stride=int(meta.get('stem_stride', 2)),
                             in_channels=int(meta['image_shape'][-1]))
    space = decoys.with_decoys(space, twinned, decoys.flavour_of(meta['space_ops']))
    trainer = Retrainer(space, meta['ops'], ml_collections.ConfigDict(meta['train']),
                        image_shape=tuple(meta['image_shape']),
                        steps_per_epoch=int(meta.get('steps_per_epoch', 1)),
                        total_steps=int(meta['total_steps']), mesh=setup.mesh,
                        seed=int(meta.get('seed', setup.config.seed)))
    state, _ = ckpt.restore(latest, lambda _: trainer.abstract_state())
  return trainer, state, meta
