"""The HourNAS search (Algorithm 1): vital blocks first, then the rest through space proposals.

Stage 'vital': the minimal SuperNet S_vital (vital SuperBlocks only) trains its weights on D_tr
with paths sampled from theta_vital by Gumbel-Max, and theta_vital takes Adam steps on D_val
batches. At the end the vital blocks are fixed to their most probable joint choice (the highest
sum of log softmax(theta) over the vital layers) that leaves every target within reach of the
other layers: the per-layer argmax, unless that one would strand a target.
Stage 'nonvital': m space proposals Theta are optimised for the targets on the cost tables of
the remaining layers (seconds, `proposals.py`); pi over proposals starts uniform. Each step
samples a proposal from pi and an architecture from it (Appendix C); weights train on D_tr, and
pi and Theta update on D_val with cross-entropy + alpha * the resource term (Eqn 6). The result
takes the proposal with the highest pi and each layer's most probable op, or, when those miss a
target by more than 5%, the most probable of the proposal's sampled architectures that do not.

Where stage 1 starts (`search.vital_init`): 'uniform' theta_vital (the paper), or 'targets', the
vital rows of one space proposal fitted to the targets over every layer. `search.arch_warmup`
holds theta / Theta / pi still for that share of each stage's weight steps (the D_val batches
are passed over), so the weights learn under the initial sampling first.

Schedule (`search.schedule`): 'interleaved' takes one D_val architecture step after every
`val_every` D_tr weight steps; 'epoch' is Algorithm 1 as written: each epoch, a full pass of
weight steps over D_tr, then a full pass of architecture steps over D_val. Either way a stage's
length is its number of weight steps (vital_steps / nonvital_steps); with 'epoch' the stage ends
after the architecture pass that follows its last weight pass, a partial last epoch getting a
proportional pass (at least one step). One `train_step` is one iteration, and tau decays once
an iteration. `batches_needed` tells the caller which batches the next iteration takes.

Temperature (`search.temperature`): 'logits' samples from softmax(theta / tau); 'relaxed'
samples argmax(theta + g) and lets tau act only in the straight-through relaxation (see
`sampling.py`).

Architecture gradient (`search.arch_gradient`): 'straight_through' (the paper's) takes d loss / d A
from the network's gates through the straight-through sample A (a forward and a backward pass
of the sampled path); 'reinforce' takes the score-function estimator (L - b) * grad log p(A),
L the D_val cross-entropy of the sampled path and b a baseline (an exponential moving average of
the stage's past D_val losses, kept in the state as `arch_baseline`): unbiased for the gradient
of the expected loss, and needing only the forward pass. log p(A) is that of the sampler: the
vital layers' log softmax(theta / tau) (softmax(theta) with 'relaxed'), and in stage 2
log softmax(pi)[k] plus proposal k's, so pi and Theta both learn; the resource term keeps its
straight-through gradient. The Gumbel-softmax ablation runs every candidate and has no sampled
path: it keeps the straight-through / relaxed gradients.

Layers of the space's `supernet_fixed` (EfficientNet's layer1_1, Table 14) keep their op from
the start: they are neither vital blocks to search nor layers of the proposals, and their cost
joins the fixed offset like the vital ops'.

Ablations are configuration: `vital_priority=False` searches every layer in one 'nonvital' stage
(HourNAS-G/H); `sampler='gumbel_softmax'` runs every candidate weighted by FBNet's relaxed
weights instead of one sampled path (HourNAS-I); `num_proposals` is m.

The whole state is a pytree of arrays (plus `meta`, JSON-able), so the driver checkpoints and
resumes it at any step; every random draw is keyed by (seed, step), and which batches a step
takes follows from the counters, so a resumed run is the uninterrupted one.
"""

from __future__ import annotations

import itertools
import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hournas_jax import (arch as arch_lib, costs, logging_utils, proposals, sampling,
                         singlepath, spaces, supernet, vital, wholenet)

STAGES = ('vital', 'nonvital', 'done')
# 'none': every candidate owns its weights (the paper, FBNet); 'nested': a layer's candidates
# share kernels, smaller ones being slices of the largest (blocks.SharedKernels).
WEIGHT_SHARING = ('none', 'nested')
SCHEDULES = ('interleaved', 'epoch')
TEMPERATURES = sampling.TAU_MODES
# How the architecture parameters get their gradient from the D_val loss: 'straight_through'
# (the paper: d loss / d A through the straight-through sample) or 'reinforce' (score function).
ARCH_GRADIENTS = ('straight_through', 'reinforce')
VITAL_INITS = ('uniform', 'targets')
BASELINE_DECAY = 0.9  # of the REINFORCE baseline's moving average
_COUNTERS = ('step', 'tr_step', 'val_step', 'stage_step')
# The exact search over the vital blocks' joint choices scores at most this many at once.
_CHOICE_CHUNK = 2 ** 20


class SearchError(ValueError):
  """A search configuration that cannot run (impossible targets, bad settings)."""


def _cosine(base_lr, step, total):
  return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


def best_reachable_choice(log_probs, layer_costs, low, high, targets, active,
                          chunk: int = _CHOICE_CHUNK):
  """The joint choice of a few layers' ops with the highest total log-probability that keeps
  every active target within reach of the rest of the network; None when no choice does.

  log_probs: [V, O], -inf where an op is not allowed; layer_costs: [R, V, O]; low, high: [R],
  the range of everything else (fixed layers and the layers still to search); targets, active:
  [R]. A choice with summed cost c [R] keeps target i within reach when
  low_i + c_i <= T_i <= high_i + c_i. Feasibility depends on the summed costs alone, so every
  joint choice is scored exactly (vectorised numpy, `chunk` at a time): the paper's spaces have
  at most 6 vital layers of 13 ops, 13**6 ~ 4.8M choices. Ties go to the lowest op indices.
  Returns op indices [V] (a tuple of ints) or None.
  """
  log_probs = np.asarray(log_probs, np.float64)
  active = np.asarray(active, bool)
  layer_costs = np.asarray(layer_costs, np.float64)[active]
  targets = np.asarray(targets, np.float64)[active]
  need_low = targets - np.asarray(high, np.float64)[active]  # c >= T - high
  need_high = targets - np.asarray(low, np.float64)[active]  # c <= T - low
  allowed = [np.flatnonzero(np.isfinite(row)) for row in log_probs]
  # The trailing layers are enumerated as arrays, the leading ones in a Python loop.
  split, size = len(allowed), 1
  while split > 0 and size * len(allowed[split - 1]) <= chunk:
    split -= 1
    size *= len(allowed[split])
  inner_score = np.zeros(1)
  inner_cost = np.zeros((len(targets), 1))
  for l in range(split, len(allowed)):
    ops = allowed[l]
    inner_score = (inner_score[:, None] + log_probs[l, ops][None, :]).reshape(-1)
    inner_cost = (inner_cost[:, :, None] + layer_costs[:, l, ops][:, None, :]).reshape(
        len(targets), -1)
  inner_shape = [len(a) for a in allowed[split:]]
  best, best_score = None, -np.inf
  for outer in itertools.product(*allowed[:split]):
    score = sum(log_probs[l, o] for l, o in enumerate(outer)) + inner_score
    cost = sum((layer_costs[:, l, o] for l, o in enumerate(outer)),
               np.zeros(len(targets)))[:, None] + inner_cost
    ok = np.all((cost >= need_low[:, None]) & (cost <= need_high[:, None]), axis=0)
    if not ok.any():
      continue
    score = np.where(ok, score, -np.inf)
    k = int(np.argmax(score))
    if score[k] > best_score:
      inner = np.unravel_index(k, inner_shape) if inner_shape else ()
      best_score = score[k]
      best = tuple(int(o) for o in outer) + tuple(
          int(allowed[split + j][i]) for j, i in enumerate(inner))
  return best


def path_log_prob(theta, idx, tau=1.0, mask=None, tau_mode: str = 'logits'):
  """log p(idx) of a Gumbel-Max sample from theta [L, O]: the sum over layers of
  log softmax(theta_l / tau)[idx_l] (log softmax(theta_l) with tau_mode 'relaxed'), over the
  ops `mask` [L, O] allows. Pure and jittable."""
  logits = sampling.masked_logits(theta, sampling.sampling_tau(tau, tau_mode), mask)
  log_p = jax.nn.log_softmax(logits, axis=-1)
  return jnp.sum(jnp.take_along_axis(log_p, jnp.asarray(idx)[..., None], axis=-1))


def two_level_log_prob(thetas, pi, k, idx, tau=1.0, mask=None, tau_mode: str = 'logits'):
  """log p(k, idx) of a two-level sample (Appendix C): proposal k from softmax(pi), then idx
  from proposal k's theta (`path_log_prob`). thetas [m, L, O], pi [m]."""
  return (jax.nn.log_softmax(pi)[k]
          + path_log_prob(jnp.take(thetas, k, axis=0), idx, tau, mask, tau_mode))


def baseline_step(baseline, loss, decay: float = BASELINE_DECAY):
  """(b, next baseline): the baseline for this step's `loss`, the moving average of the
  stage's earlier losses, and that average once `loss` joins it. NaN stands for a stage with no
  loss yet: the first loss initialises the average (so the first step's L - b is 0)."""
  loss = jnp.asarray(loss, jnp.float32)
  b = jnp.where(jnp.isnan(baseline), loss, baseline)
  return b, b + (1.0 - decay) * (loss - b)  # decay * b + (1 - decay) * loss, exact at loss = b


def reinforce_grads(log_prob, params, loss, baseline):
  """The score-function estimate (loss - baseline) * grad log_prob(params) of the gradient of
  the expected loss with respect to `params` (a pytree); log_prob(params) is the log-probability
  of the sample that gave `loss`. Pure and jittable."""
  advantage = jax.lax.stop_gradient(jnp.asarray(loss, jnp.float32) - baseline)
  return jax.tree.map(lambda g: advantage * g, jax.grad(log_prob)(params))


def _no_baseline():
  return jnp.full((), jnp.nan, jnp.float32)


class Searcher:
  """Runs Algorithm 1 one iteration at a time; the caller owns data, checkpoints and logging.

  The driver asks `batches_needed(state)` before each `train_step`, and gives a D_tr batch for a
  weight step and a D_val batch for an architecture step. With the 'epoch' schedule the Searcher
  must know the steps per epoch of D_tr and D_val.
  """

  def __init__(self, space: spaces.SearchSpace, cfg, targets, image_shape, vital_steps: int,
               nonvital_steps: int, tr_steps_per_epoch: int = 0, val_steps_per_epoch: int = 0):
    self.space = space
    self.cfg = cfg
    self.image_shape = tuple(image_shape)
    self.vital_priority = bool(cfg.vital_priority)
    self.stage_steps = {'vital': int(vital_steps) if self.vital_priority else 0,
                        'nonvital': int(nonvital_steps)}
    if cfg.sampler not in ('gumbel_max', 'gumbel_softmax'):
      raise SearchError(f"search.sampler must be 'gumbel_max' or 'gumbel_softmax', got "
                        f'{cfg.sampler!r}')
    if cfg.get('weight_sharing', 'none') not in WEIGHT_SHARING:
      raise SearchError(f'search.weight_sharing must be one of {", ".join(WEIGHT_SHARING)}, '
                        f'got {cfg.weight_sharing!r}')
    self.weight_sharing = cfg.get('weight_sharing', 'none') == 'nested'
    self.schedule = cfg.get('schedule', 'interleaved')
    if self.schedule not in SCHEDULES:
      raise SearchError(f'search.schedule must be one of {", ".join(SCHEDULES)}, got '
                        f'{self.schedule!r}')
    self.tau_mode = cfg.get('temperature', 'logits')
    if self.tau_mode not in TEMPERATURES:
      raise SearchError(f'search.temperature must be one of {", ".join(TEMPERATURES)}, got '
                        f'{self.tau_mode!r}')
    self.arch_gradient = cfg.get('arch_gradient', 'straight_through')
    if self.arch_gradient not in ARCH_GRADIENTS:
      raise SearchError(f'search.arch_gradient must be one of {", ".join(ARCH_GRADIENTS)}, got '
                        f'{self.arch_gradient!r}')
    self.reinforce = self.arch_gradient == 'reinforce'
    if self.reinforce and cfg.sampler != 'gumbel_max':
      raise SearchError(f"search.arch_gradient 'reinforce' needs search.sampler 'gumbel_max' (a "
                        f"sampled path), got {cfg.sampler!r}; use 'straight_through' with it")
    self.steps_per_epoch = (int(tr_steps_per_epoch), int(val_steps_per_epoch))
    if self.schedule == 'epoch' and min(self.steps_per_epoch) < 1:
      raise SearchError(f"search.schedule 'epoch' needs at least one step per epoch of D_tr and "
                        f'of D_val, got {self.steps_per_epoch[0]} and {self.steps_per_epoch[1]}')
    if int(cfg.num_proposals) < 1:
      raise SearchError(f'search.num_proposals must be >= 1, got {cfg.num_proposals}')
    self.vital_init = cfg.get('vital_init', 'uniform')
    if self.vital_init not in VITAL_INITS:
      raise SearchError(f'search.vital_init must be one of {", ".join(VITAL_INITS)}, got '
                        f'{self.vital_init!r}')
    self.arch_warmup = float(cfg.get('arch_warmup', 0.0))
    if not 0.0 <= self.arch_warmup < 1.0:
      raise SearchError(f'search.arch_warmup must be in [0, 1), got {self.arch_warmup}')
    self.val_every = int(cfg.val_every) or 4  # 80/20 split: one D_val batch per 4 D_tr batches
    self.tables = costs.cost_tables(space)
    self.mask = space.op_mask()
    self.fixed_ops = dict(space.supernet_fixed)
    self.vital_names = tuple(n for n in vital.vital_layers(space) if n not in self.fixed_ops)
    self.vital_rows = [space.searchable_names.index(n) for n in self.vital_names]
    target_values = [float(targets.params or 0.0), float(targets.flops or 0.0)]
    self.active = np.array([t > 0 for t in target_values])
    if not self.active.any():
      raise SearchError('set at least one of targets.params and targets.flops (> 0)')
    self.targets = np.array(target_values)
    # Refuse impossible targets before any training.
    free, tables, mask, offset = proposals.restrict_tables(self.tables, self._fixed_indices({}))
    proposals.check_targets(tables, mask, offset, self.targets, self.active, space.name)
    self.maxima = proposals.space_maxima(tables, mask, offset)
    # What the layers searched after the vital stage (and the fixed ones) can add to the vital
    # blocks' cost: the vital choice must keep the targets inside it.
    others = np.array([l not in self.vital_rows for l in free], bool)
    self._others_range = proposals.reachable_range(tables[:, others], mask[others], offset)
    if self.vital_priority and self.vital_names:
      allowed = np.where(self.mask[self.vital_rows], 0.0, -np.inf)
      if self._reachable_vital_choice(allowed) is None:
        shown = ', '.join(f'{name} {t / 1e6:.3f}M' for name, t, on in
                          zip(('params', 'FLOPs'), self.targets, self.active) if on)
        raise SearchError(f'no choice of the vital blocks ({", ".join(self.vital_names)}) of '
                          f'space {space.name} leaves the targets ({shown}) within reach of the '
                          'other layers, so the vital stage could not end; change the targets '
                          'or set search.vital_priority=False')
    self._engines = {}
    self._arch_tx = optax.adam(float(cfg.arch_lr))

  # ------------------------------------------------------------------------------------------
  # Networks of each stage.

  def _frozen(self, meta) -> dict:
    """{layer: op} of the searchable layers held at one op in the current stage."""
    if meta['stage'] == 'vital':
      return dict(self.fixed_ops)
    return {**self.fixed_ops, **(meta.get('vital_ops') or {})}

  def _fixed_indices(self, vital_ops: Mapping[str, str]) -> dict:
    """{searchable layer index: op index} of the supernet-fixed layers and `vital_ops`."""
    fixed = {**self.fixed_ops, **vital_ops}
    return {self.space.searchable_names.index(n): self.space.op_names.index(op)
            for n, op in fixed.items()}

  def choice_layers(self, meta) -> tuple[str, ...]:
    """The layers whose op is sampled in the current stage, in network order."""
    if meta['stage'] == 'vital':
      return self.vital_names
    frozen = self._frozen(meta)
    return tuple(n for n in self.space.searchable_names if n not in frozen)

  def _layer_ops(self, meta):
    if meta['stage'] == 'vital':
      return supernet.layer_ops(self.space, frozen=self.fixed_ops, vital_only=True)
    return supernet.layer_ops(self.space, frozen=self._frozen(meta))

  def engine(self, meta):
    ops = self._layer_ops(meta)
    if ops not in self._engines:
      kwargs = dict(momentum=float(self.cfg.momentum), weight_decay=float(self.cfg.weight_decay),
                    weight_sharing=self.weight_sharing)
      cls = (wholenet.WholeNetEngine if self.cfg.sampler == 'gumbel_softmax'
             else singlepath.SinglePathEngine)
      self._engines[ops] = cls(self.space, ops, **kwargs)
    return self._engines[ops]

  # ------------------------------------------------------------------------------------------
  # State.

  def init(self, seed: int) -> dict:
    if self.vital_priority:
      meta = {'stage': 'vital', 'vital_ops': {}}
      weights = self.engine(meta).init(seed, self.image_shape)
      theta = jnp.zeros((len(self.vital_names), len(self.space.op_names)))
      if self.vital_init == 'targets' and self.vital_names:
        theta = self._vital_theta_from_targets(seed)
      arch = {'theta': theta}
    else:
      meta = {'stage': 'nonvital', 'vital_ops': {}}
      weights = self.engine(meta).init(seed, self.image_shape)
      arch = None
    state = {'meta': meta, 'weights': weights,
             'key': jax.random.key_data(jax.random.key(seed)),
             'counters': {k: 0 for k in _COUNTERS},
             'seed': seed}
    if arch is None:
      state.update(self._start_nonvital(state, meta))
    else:
      state['arch'] = arch
      state['arch_opt'] = self._arch_tx.init(arch)
      if self.reinforce:
        state['arch_baseline'] = _no_baseline()
    return state

  def stage(self, state) -> str:
    return state['meta']['stage']

  def _vital_theta_from_targets(self, seed: int):
    """theta_vital at the start of the vital stage with vital_init='targets': the vital rows of
    one space proposal fitted to the targets over every searchable layer, so S_vital first
    samples the vital ops of architectures that meet the targets, and the cross-entropy moves
    theta away from there only where it has evidence."""
    free, tables, mask, offset = proposals.restrict_tables(self.tables, self._fixed_indices({}))
    key = jax.random.fold_in(jax.random.key(seed), 2 ** 30)
    thetas = self._fitted_proposals(key, tables, mask, offset, 1, self.tau({'counters': {
        'step': 0}}))
    rows = [int(np.flatnonzero(free == r)[0]) for r in self.vital_rows]
    return jnp.where(jnp.asarray(self.mask[self.vital_rows]), thetas[0, jnp.asarray(rows)], 0.0)

  def _fitted_proposals(self, key, tables, mask, offset, num_proposals: int, tau):
    """m space proposals fitted to the targets (Eqn 5), scaled for this search's sampler at
    temperature `tau`."""
    thetas, final_tau = proposals.optimize_proposals(
        key, tables, mask, offset, self.targets, self.maxima, self.active,
        num_proposals=int(num_proposals),
        iterations=int(self.cfg.proposal_iterations) or proposals.DEFAULT_ITERATIONS)
    if self.tau_mode == 'logits':
      # The proposals were fitted so that softmax(theta / final_tau) meets the targets; the
      # search samples at its own tau, so rescale theta to keep theta / tau, and with it the
      # fitted distribution, as it is at `tau`.
      return thetas * (tau / float(final_tau))
    # Samples come from softmax(theta) whatever tau is, so the search's tau must not enter;
    # theta / final_tau is the fitted distribution itself (final_tau is 1 by default).
    return thetas / float(final_tau)

  def tau(self, state):
    """The temperature of the schedule at the state's iteration."""
    return sampling.temperature(int(state['counters']['step']), float(self.cfg.tau0),
                                float(self.cfg.tau_decay))

  def _key(self, state, purpose: int):
    key = jax.random.wrap_key_data(jnp.asarray(state['key']))
    return jax.random.fold_in(jax.random.fold_in(key, int(state['counters']['step'])), purpose)

  # ------------------------------------------------------------------------------------------
  # Schedule.

  def _partial_val_steps(self, weight_steps: int) -> int:
    """Architecture steps after a partial epoch of `weight_steps`: the same share of D_val."""
    tr, val = self.steps_per_epoch
    return max(1, round(weight_steps * val / tr))

  def stage_iterations(self, stage: str) -> int:
    """Iterations (calls of `train_step`) of a stage."""
    weight_steps = self.stage_steps[stage]
    if self.schedule == 'interleaved' or weight_steps == 0:
      return weight_steps
    tr, val = self.steps_per_epoch
    full, rest = divmod(weight_steps, tr)
    return full * (tr + val) + (rest + self._partial_val_steps(rest) if rest else 0)

  @property
  def total_steps(self) -> int:
    """Iterations of the whole search."""
    return sum(self.stage_iterations(s) for s in ('vital', 'nonvital'))

  def _position(self, stage: str, counters) -> tuple[bool, bool, int]:
    """(takes a D_tr batch, takes a D_val batch, weight steps taken so far in the stage) of the
    iteration the counters point at."""
    i = int(counters['stage_step'])
    if self.schedule == 'interleaved':
      return True, (int(counters['tr_step']) + 1) % self.val_every == 0, i
    tr, val = self.steps_per_epoch
    full = self.stage_steps[stage] // tr
    epoch, j = divmod(i, tr + val)
    weight_steps = tr
    if epoch >= full:  # the partial last epoch
      epoch, j = full, i - full * (tr + val)
      weight_steps = self.stage_steps[stage] - full * tr
    weight_step = j < weight_steps
    return weight_step, not weight_step, epoch * tr + min(j, weight_steps)

  def batches_needed(self, state) -> tuple[bool, bool]:
    """(needs a D_tr batch, needs a D_val batch) for the next `train_step`."""
    stage = state['meta']['stage']
    if stage == 'done':
      return False, False
    return self._position(stage, state['counters'])[:2]

  # ------------------------------------------------------------------------------------------
  # Stage boundaries.

  def _reachable_vital_choice(self, log_probs):
    return best_reachable_choice(log_probs, self.tables.stacked()[:, self.vital_rows],
                                 *self._others_range, self.targets, self.active)

  def _vital_choice(self, theta) -> dict:
    """{vital layer: op}: the most probable joint choice that keeps the targets reachable."""
    logits = np.where(self.mask[self.vital_rows], np.asarray(theta, np.float64), -np.inf)
    top = logits.max(axis=-1, keepdims=True)
    log_probs = logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))
    per_layer = tuple(int(i) for i in np.argmax(logits, axis=-1))
    rows = np.arange(len(per_layer))
    cost = self.tables.stacked()[:, self.vital_rows][:, rows, list(per_layer)].sum(axis=-1)
    low, high = self._others_range
    keeps = np.all(((low + cost <= self.targets) & (self.targets <= high + cost))
                   | ~self.active)
    choice = per_layer if keeps else self._reachable_vital_choice(log_probs)
    if choice is None:  # refused in __init__; a guard against a changed cost table
      raise SearchError('no choice of the vital blocks leaves the targets within reach')
    name = lambda idx: {n: self.space.op_names[i] for n, i in zip(self.vital_names, idx)}
    if choice != per_layer:
      logging_utils.info(f'[search] the most probable vital ops per layer {name(per_layer)} '
                         f'would leave the targets out of reach; fixed the most probable choice '
                         f'that keeps them reachable: {name(choice)}')
    return name(choice)

  def _start_nonvital(self, state, meta) -> dict:
    """Builds the space proposals for the layers left after the vital stage."""
    free, tables, mask, offset = proposals.restrict_tables(
        self.tables, self._fixed_indices(meta['vital_ops']))
    try:
      proposals.check_targets(tables, mask, offset, self.targets, self.active, self.space.name)
    except proposals.ProposalError as e:
      raise SearchError(f'after fixing the vital blocks: {e}') from None
    key = jax.random.fold_in(jax.random.wrap_key_data(jnp.asarray(state['key'])), 2 ** 31)
    thetas = self._fitted_proposals(key, tables, mask, offset, int(self.cfg.num_proposals),
                                    self.tau(state))
    arch = {'thetas': thetas, 'pi': jnp.zeros((int(self.cfg.num_proposals),))}
    out = {'arch': arch, 'arch_opt': self._arch_tx.init(arch)}
    if self.reinforce:  # the baseline averages the losses of the current stage only
      out['arch_baseline'] = _no_baseline()
    return out

  def _stage2_tables(self, meta):
    _, tables, mask, offset = proposals.restrict_tables(
        self.tables, self._fixed_indices(meta['vital_ops']))
    return (jnp.asarray(tables, jnp.float32), jnp.asarray(mask), jnp.asarray(offset, jnp.float32))

  # ------------------------------------------------------------------------------------------
  # Sampling: (op indices [L], and a function of the arch params giving the ST one-hot A), and
  # the log-probability of the sample a key draws (for REINFORCE).

  def _sample_fn(self, meta):
    layers = self.choice_layers(meta)
    rows = [self.space.searchable_names.index(n) for n in layers]
    mask = jnp.asarray(self.mask[rows])
    relaxed_weights = self.cfg.sampler == 'gumbel_softmax'
    tau_mode = self.tau_mode
    if meta['stage'] == 'vital':
      def sample(arch, key, tau):
        if relaxed_weights:
          w = sampling.gumbel_softmax(key, arch['theta'], tau, mask)
          return jnp.argmax(w, -1), w
        return sampling.gumbel_max(key, arch['theta'], tau, mask, tau_mode)
    else:
      def sample(arch, key, tau):
        if relaxed_weights:
          # The proposal goes through a straight-through sample too, so that pi learns.
          _, w = proposals.two_level_relaxed(key, arch['thetas'], arch['pi'], tau, mask)
          return jnp.argmax(w, -1), w
        _, idx, a = proposals.two_level_straight_through(key, arch['thetas'], arch['pi'], tau,
                                                         mask, tau_mode=tau_mode)
        return idx, a

    def log_prob(arch, key, tau):
      """log p of the sample `sample(arch, key, tau)` draws, as a function of arch."""
      if meta['stage'] == 'vital':
        idx, _ = sampling.gumbel_max(key, arch['theta'], tau, mask, tau_mode)
        return path_log_prob(arch['theta'], jax.lax.stop_gradient(idx), tau, mask, tau_mode)
      k, idx, _ = proposals.two_level_straight_through(key, arch['thetas'], arch['pi'], tau,
                                                       mask, tau_mode=tau_mode)
      k, idx = jax.lax.stop_gradient(k), jax.lax.stop_gradient(idx)
      return two_level_log_prob(arch['thetas'], arch['pi'], k, idx, tau, mask, tau_mode)
    return layers, sample, log_prob

  def _jitted(self, meta):
    """The jitted sample and architecture-update functions of a stage (cached)."""
    cache_key = (meta['stage'], tuple(sorted((meta.get('vital_ops') or {}).items())))
    if getattr(self, '_jit_key', None) == cache_key:
      return self._jit_fns
    layers, sample, log_prob = self._sample_fn(meta)
    stage2 = meta['stage'] == 'nonvital'
    tables = self._stage2_tables(meta) if stage2 else None
    alpha = float(self.cfg.alpha)
    targets = jnp.asarray(self.targets, jnp.float32)
    maxima = jnp.asarray(self.maxima, jnp.float32)
    active = jnp.asarray(self.active)

    @jax.jit
    def sample_ops(arch, key, tau):
      idx, a = sample(arch, key, tau)
      return idx, jax.lax.stop_gradient(a)

    @jax.jit
    def update(arch, opt_state, key, tau, grad_a):
      # grad_a: d cross-entropy / d A from the network (only the sampled entries are non-zero
      # for Gumbel-Max). The surrogate <A, grad_a> has exactly that gradient with respect to A,
      # so its gradient with respect to theta (or Theta and pi) is the straight-through one.
      def surrogate(arch):
        _, a = sample(arch, key, tau)
        loss = jnp.sum(a * grad_a)
        if stage2:
          t, _, offset = tables
          loss = loss + alpha * proposals.resource_loss(a, t, offset, targets, maxima, active)
        return loss
      grads = jax.grad(surrogate)(arch)
      updates, opt_state = self._arch_tx.update(grads, opt_state, arch)
      return optax.apply_updates(arch, updates), opt_state

    @jax.jit
    def update_reinforce(arch, opt_state, key, tau, loss, baseline):
      # loss: the D_val cross-entropy of the path sample(arch, key, tau) drew. The estimate
      # (L - b) * grad log p(A), plus in stage 2 the resource term's straight-through gradient.
      b, new_baseline = baseline_step(baseline, loss)
      grads = reinforce_grads(lambda p: log_prob(p, key, tau), arch, loss, b)
      if stage2:
        def resource(arch):
          _, a = sample(arch, key, tau)
          t, _, offset = tables
          return alpha * proposals.resource_loss(a, t, offset, targets, maxima, active)
        grads = jax.tree.map(jnp.add, grads, jax.grad(resource)(arch))
      updates, opt_state = self._arch_tx.update(grads, opt_state, arch)
      return optax.apply_updates(arch, updates), opt_state, new_baseline

    self._jit_key = cache_key
    self._jit_fns = (layers, sample_ops, update_reinforce if self.reinforce else update)
    return self._jit_fns

  # ------------------------------------------------------------------------------------------
  # Steps.

  def train_step(self, state, tr_batch=None, val_batch=None):
    """One iteration: a weight step on `tr_batch` (D_tr) and/or an architecture step on
    `val_batch` (D_val), exactly the batches `batches_needed(state)` asks for.

    Moves to the next stage once the current one has run its iterations.
    """
    meta = state['meta']
    if meta['stage'] == 'done':
      raise SearchError('the search is done; nothing left to train')
    # Counters and seed come back from a checkpoint as arrays.
    counters = {k: int(v) for k, v in state['counters'].items()}
    state = {**state, 'counters': counters, 'seed': int(state['seed'])}
    stage = meta['stage']
    needs_tr, needs_val, stage_weight_steps = self._position(stage, counters)
    given = (tr_batch is not None, val_batch is not None)
    if given != (needs_tr, needs_val):
      describe = lambda tr, val: ' and '.join(['a D_tr batch'] * tr + ['a D_val batch'] * val)
      raise SearchError(f'search step {counters["step"]} takes {describe(needs_tr, needs_val)},'
                        f' got {describe(*given) or "no batch"} (see Searcher.batches_needed)')
    engine = self.engine(meta)
    layers, sample_ops, update = self._jitted(meta)
    tau = self.tau(state)
    out = {'tau': float(tau), 'stage': stage}

    if needs_tr:
      lr = _cosine(float(self.cfg.weight_lr), stage_weight_steps, self.stage_steps[stage])
      idx, a = sample_ops(state['arch'], self._key(state, 0), tau)
      weights, metrics = self._weight_step(engine, state['weights'], tr_batch, layers, idx, a,
                                           lr)
      state = {**state, 'weights': weights}
      counters['tr_step'] += 1
      out.update(loss=float(metrics['loss']), accuracy=float(metrics['accuracy']), lr=lr)

    if needs_val and self._warming_up(stage, stage_weight_steps):
      counters['val_step'] += 1  # the D_val batch is passed over: theta waits for the weights
    elif needs_val:
      key = self._key(state, 1)
      idx, a = sample_ops(state['arch'], key, tau)
      if self.reinforce:
        weights, val_metrics = self._val_loss(engine, state['weights'], val_batch, layers, idx)
        arch, arch_opt, baseline = update(state['arch'], state['arch_opt'], key, tau,
                                          jnp.asarray(val_metrics['loss'], jnp.float32),
                                          state['arch_baseline'])
        state = {**state, 'arch_baseline': baseline}
      else:
        weights, val_metrics, grad_a = self._arch_grads(engine, state['weights'], val_batch,
                                                        layers, idx, a)
        arch, arch_opt = update(state['arch'], state['arch_opt'], key, tau, grad_a)
      state = {**state, 'weights': weights, 'arch': arch, 'arch_opt': arch_opt}
      counters['val_step'] += 1
      out['val_loss'] = float(val_metrics['loss'])
      out['val_accuracy'] = float(val_metrics['accuracy'])

    counters['step'] += 1
    counters['stage_step'] += 1
    state = {**state, 'counters': counters}
    if counters['stage_step'] >= self.stage_iterations(stage):
      state = self._advance(state)
    return state, out

  def _warming_up(self, stage: str, stage_weight_steps: int) -> bool:
    """Whether architecture steps still wait (the first arch_warmup share of the stage's
    weight steps)."""
    return stage_weight_steps < self.arch_warmup * self.stage_steps[stage]

  def _weight_step(self, engine, weights, batch, layers, idx, a, lr):
    if isinstance(engine, wholenet.WholeNetEngine):
      return engine.train_step(weights, batch['image'], batch['label'], lr,
                               self._relaxed_weights(engine, layers, a))
    return engine.train_step(weights, batch['image'], batch['label'],
                             self._path(layers, idx), lr)

  def _arch_grads(self, engine, weights, batch, layers, idx, a):
    """(weights with new BN statistics, metrics, d loss / d A [L, O])."""
    num_ops = len(self.space.op_names)
    if isinstance(engine, wholenet.WholeNetEngine):
      weights, metrics, grads = engine.arch_grads(weights, batch['image'], batch['label'],
                                                  self._relaxed_weights(engine, layers, a))
      grad_a = jnp.stack([self._scatter_layer(n, grads[n]) for n in layers])
      return weights, metrics, grad_a
    weights, metrics, gates = engine.arch_grads(weights, batch['image'], batch['label'],
                                                self._path(layers, idx))
    idx = np.asarray(idx)
    # The engine has no gate for a layer with a single candidate (an op subset can leave one,
    # e.g. no skip where the shape changes): its op is not a choice, so its gradient is zero.
    grad_a = jnp.stack([jax.nn.one_hot(idx[i], num_ops) * gates.get(n, 0.0)
                        for i, n in enumerate(layers)])
    return weights, metrics, grad_a

  def _val_loss(self, engine, weights, batch, layers, idx):
    """(weights with new BN statistics, metrics): the sampled path's D_val loss, forward only
    (REINFORCE)."""
    return engine.path_loss(weights, batch['image'], batch['label'], self._path(layers, idx))

  def _path(self, layers, idx) -> dict:
    idx = np.asarray(idx)
    return {n: self.space.op_names[int(i)] for n, i in zip(layers, idx)}

  def _relaxed_weights(self, engine, layers, a):
    """Per-layer weights over that layer's candidates (its own op order) from A [L, O]."""
    cols = {n: [self.space.op_names.index(o) for o in self.space.layer(n).ops] for n in layers}
    return {n: a[i, jnp.asarray(cols[n])] for i, n in enumerate(layers)}

  def _scatter_layer(self, name, grad):
    cols = [self.space.op_names.index(o) for o in self.space.layer(name).ops]
    return jnp.zeros(len(self.space.op_names)).at[jnp.asarray(cols)].set(grad)

  def _advance(self, state):
    meta = state['meta']
    counters = {**state['counters'], 'stage_step': 0}
    if meta['stage'] == 'vital':
      vital_ops = self._vital_choice(state['arch']['theta'])
      new_meta = {'stage': 'nonvital', 'vital_ops': vital_ops,
                  'theta_vital': np.asarray(state['arch']['theta']).tolist()}
      weights = self._carry_weights(state['weights'], new_meta, state['seed'])
      state = {**state, 'meta': new_meta, 'weights': weights, 'counters': counters}
      return {**state, **self._start_nonvital(state, new_meta)}
    return {**state, 'meta': {**meta, 'stage': 'done'}, 'counters': counters}

  def _carry_weights(self, weights, meta, seed):
    """Stage-2 weights: the fixed vital ops keep what stage 1 trained; the rest start fresh."""
    fresh = self.engine(meta).init(seed + 1, self.image_shape)
    out = {k: {layer: dict(ops) for layer, ops in fresh[k].items()} for k in fresh}
    for k in out:
      for layer, parts in weights[k].items():
        for part in parts:  # ops, and 'shared' kernels
          if part in out[k].get(layer, {}):
            out[k][layer][part] = weights[k][layer][part]
    return out

  # ------------------------------------------------------------------------------------------
  # Results.

  def probabilities(self, state) -> dict:
    """{layer: {op: probability}} of the current stage's distribution at tau = 1."""
    meta = state['meta']
    out = {}
    if 'theta' in state['arch']:
      p = sampling.probabilities(state['arch']['theta'], 1.0,
                                 jnp.asarray(self.mask[self.vital_rows]))
      names = self.vital_names
    else:
      layers = self.choice_layers(meta)
      rows = [self.space.searchable_names.index(n) for n in layers]
      k = int(jnp.argmax(state['arch']['pi']))
      p = sampling.probabilities(state['arch']['thetas'][k], 1.0, jnp.asarray(self.mask[rows]))
      names = layers
    for n, row in zip(names, np.asarray(p)):
      out[n] = {op: float(row[j]) for j, op in enumerate(self.space.op_names)
                if op in self.space.layer(n).ops}
    return out

  def architecture(self, state) -> arch_lib.Architecture:
    meta = state['meta']
    if meta['stage'] == 'vital':
      raise SearchError('the vital stage has not finished; no architecture yet')
    layers = self.choice_layers(meta)
    rows = [self.space.searchable_names.index(n) for n in layers]
    k = int(jnp.argmax(state['arch']['pi']))
    theta = np.asarray(state['arch']['thetas'][k], np.float64)
    best = np.asarray(sampling.argmax_ops(theta, jnp.asarray(self.mask[rows])))
    chosen = self._frozen(meta)
    frozen_cost = sum((self.tables.stacked()[:, self.space.searchable_names.index(n),
                                             self.space.op_names.index(o)]
                       for n, o in chosen.items()), np.zeros(2))
    best = self._within_targets(theta, rows, best, frozen_cost, int(state['seed']))
    chosen.update({n: self.space.op_names[int(i)] for n, i in zip(layers, best)})
    return arch_lib.Architecture(self.space.name,
                                 tuple(chosen[n] for n in self.space.searchable_names))

  def _within_targets(self, theta, rows, mode, frozen_cost, seed: int, samples: int = 20000,
                      tolerance: float = proposals.TOLERANCE):
    """The proposal's most probable architecture (`mode`, op indices of `rows`) when it lies
    within `tolerance` of every active target; otherwise the most probable of `samples` draws
    from the proposal that does (the mode of a distribution that meets the targets need not
    meet them itself), or the mode when no draw does."""
    tables = self.tables.stacked()[:, rows]  # [R, L, O]
    offset = np.array([self.tables.fixed_params, self.tables.fixed_flops]) + frozen_cost
    t = np.where(self.active, self.targets, 1.0)

    def meets(idx):  # idx [n, L] -> [n]
      cost = offset[:, None] + tables[:, np.arange(len(rows)), idx].sum(-1)
      return np.all((np.abs(cost - t[:, None]) <= tolerance * t[:, None]) |
                    ~self.active[:, None], axis=0)
    if meets(np.asarray(mode)[None])[0]:
      return mode
    logits = np.where(self.mask[rows], theta, -np.inf)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    rng = np.random.default_rng([seed, 0x4d4f4445])
    idx = np.argmax(logp[None] + rng.gumbel(size=(samples, *logp.shape)), axis=-1)
    ok = meets(idx)
    if not ok.any():
      return mode
    score = np.where(ok, logp[np.arange(len(rows)), idx].sum(-1), -np.inf)
    return idx[int(np.argmax(score))]

  def result(self, state) -> dict:
    architecture = self.architecture(state)
    params, flops = self.tables.cost(architecture.indices(self.space))
    pi = np.asarray(jax.nn.softmax(state['arch']['pi']))
    # Relative deviation from each active target: the search does not guarantee the 5%.
    deviation = {name: (value - float(target)) / float(target)
                 for name, value, target, on in zip(('params', 'flops'), (params, flops),
                                                    self.targets, self.active) if on}
    return {
        **architecture.to_dict(self.space),
        'params': params, 'flops': flops,
        'targets': {'params': float(self.targets[0]) if self.active[0] else None,
                    'flops': float(self.targets[1]) if self.active[1] else None},
        'deviation': deviation,
        'vital_ops': dict(state['meta'].get('vital_ops') or {}),
        'fixed_ops': dict(self.fixed_ops),
        'theta_vital': state['meta'].get('theta_vital'),
        'pi': pi.tolist(), 'proposal': int(np.argmax(pi)),
        'probabilities': self.probabilities(state),
        'resolution': self.space.resolution, 'num_classes': self.space.num_classes,
        'width': self.space.width,
        'steps': dict(state['counters']),
    }

  def proposal_samples(self, state, n: int = 10000):
    """(params [n], FLOPs [n]) of architectures drawn through pi and Theta at the current tau."""
    meta = state['meta']
    layers = self.choice_layers(meta)
    rows = [self.space.searchable_names.index(r) for r in layers]
    _, tables, _, offset = proposals.restrict_tables(
        self.tables, self._fixed_indices(meta.get('vital_ops') or {}))
    idx = proposals.sample_architectures(
        self._key(state, 2), state['arch']['thetas'], state['arch']['pi'],
        sampling.sampling_tau(self.tau(state), self.tau_mode), jnp.asarray(self.mask[rows]), n)
    c = proposals.architecture_costs(np.asarray(idx), tables, offset)
    return c[:, 0], c[:, 1]

  def template(self, meta: Mapping):
    """The abstract state of a checkpoint whose meta is `meta` (for restoring with orbax)."""
    weights = self.engine(meta).state_shapes(self.image_shape)
    if meta['stage'] == 'vital':
      arch = {'theta': jnp.zeros((len(self.vital_names), len(self.space.op_names)))}
    else:
      m, layers = int(self.cfg.num_proposals), self.choice_layers(meta)
      arch = {'thetas': jnp.zeros((m, len(layers), len(self.space.op_names))),
              'pi': jnp.zeros((m,))}
    abstract = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t)
    out = {'weights': weights, 'arch': abstract(arch),
           'arch_opt': jax.eval_shape(self._arch_tx.init, arch),
           'key': jax.ShapeDtypeStruct((2,), jnp.uint32),
           'counters': {k: jax.ShapeDtypeStruct((), jnp.int32) for k in _COUNTERS},
           'seed': jax.ShapeDtypeStruct((), jnp.int32)}
    if self.reinforce:
      out['arch_baseline'] = jax.ShapeDtypeStruct((), jnp.float32)
    return out
