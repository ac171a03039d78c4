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

The stages themselves (their layers, architecture parameters, samplers, resource terms and
results) are objects in `stages.py`; the searcher owns the schedule and the state, and trains
through whichever engine (`engines.py`) config search.engine names, without asking which.

The state (`SearchState`) is arrays in a pytree plus JSON-able meta (stage, vital ops, counters,
seed), so the driver checkpoints and resumes it at any step; every random draw is keyed by
(seed, step), and which batches a step takes follows from the counters, so a resumed run is the
uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hournas_jax import (arch as arch_lib, blocks, costs, engines, errors, proposals, sampling,
                         spaces, stages, vital)

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
SAMPLERS = tuple(engines.DEFAULT_ENGINE)
COUNTERS = ('step', 'tr_step', 'val_step', 'stage_step')


class SearchError(errors.UserError, ValueError):
  """A search that cannot run (impossible targets, bad settings) or go on."""


def _cosine(base_lr, step, total):
  return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


# --------------------------------------------------------------------------------------------
# State.


@dataclasses.dataclass(frozen=True)
class SearchState:
  """The whole search state: arrays (`arrays()`, a pytree) and JSON-able meta (`meta()`).

  weights: the stage's SuperNet state {'params', 'batch_stats', 'opt_state'} ({layer: {op}});
  arch / arch_opt: the stage's architecture parameters ({'theta'} in the vital stage,
  {'thetas', 'pi'} after it) and their Adam state; key: the run's PRNG key data;
  arch_baseline: the REINFORCE baseline (None with straight-through gradients);
  stage, vital_ops ({layer: op} fixed by stage 1), theta_vital (stage 1's final theta, kept for
  the report), counters {step, tr_step, val_step, stage_step} and the seed.
  """
  weights: Any
  arch: Any
  arch_opt: Any
  key: Any
  stage: str
  counters: Mapping[str, int]
  seed: int
  vital_ops: Mapping[str, str] = dataclasses.field(default_factory=dict)
  theta_vital: list | None = None
  arch_baseline: Any = None

  @property
  def step(self) -> int:
    return int(self.counters['step'])

  def replace(self, **changes) -> 'SearchState':
    return dataclasses.replace(self, **changes)

  def arrays(self) -> dict:
    out = {'weights': self.weights, 'arch': self.arch, 'arch_opt': self.arch_opt,
           'key': self.key}
    if self.arch_baseline is not None:
      out['arch_baseline'] = self.arch_baseline
    return out

  def meta(self) -> dict:
    """The JSON side of a checkpoint."""
    stage = {'stage': self.stage, 'vital_ops': dict(self.vital_ops)}
    if self.theta_vital is not None:
      stage['theta_vital'] = self.theta_vital
    return {'meta': stage, 'counters': {k: int(self.counters[k]) for k in COUNTERS},
            'seed': int(self.seed)}

  @classmethod
  def from_parts(cls, arrays: Mapping[str, Any], meta: Mapping[str, Any]) -> 'SearchState':
    """The state saved as `arrays` and `meta` (see `arrays` and `meta`)."""
    stage = meta['meta']
    return cls(weights=arrays['weights'], arch=arrays['arch'], arch_opt=arrays['arch_opt'],
               key=arrays['key'], arch_baseline=arrays.get('arch_baseline'),
               stage=stage['stage'], vital_ops=dict(stage.get('vital_ops') or {}),
               theta_vital=stage.get('theta_vital'),
               counters={k: int(meta['counters'][k]) for k in COUNTERS},
               seed=int(meta['seed']))


# --------------------------------------------------------------------------------------------
# The searcher.


class Searcher:
  """Runs Algorithm 1 one iteration at a time; the caller owns data, checkpoints and logging.

  The driver asks `batches_needed(state)` before each `train_step`, and gives a D_tr batch for a
  weight step and a D_val batch for an architecture step. With the 'epoch' schedule the Searcher
  must know the steps per epoch of D_tr and D_val.
  """

  def __init__(self, space: spaces.SearchSpace, cfg, targets, image_shape, vital_steps: int,
               nonvital_steps: int, tr_steps_per_epoch: int = 0, val_steps_per_epoch: int = 0,
               tables: costs.CostTables | None = None):
    """targets: .params, .flops (and .latency_ms, which needs `tables` with latency); 0 = no
    target. tables: the space's cost tables, `costs.cost_tables(space)` when None."""
    self.space = space
    self.cfg = cfg
    self.image_shape = tuple(image_shape)
    self.vital_priority = bool(cfg.vital_priority)
    self.stage_steps = {'vital': int(vital_steps) if self.vital_priority else 0,
                        'nonvital': int(nonvital_steps)}
    self.sampler = cfg.sampler
    choose = lambda key, allowed, default: self._choice(cfg, key, allowed, default)
    choose('sampler', SAMPLERS, None)
    self.weight_sharing = choose('weight_sharing', WEIGHT_SHARING, 'none') == 'nested'
    self.schedule = choose('schedule', SCHEDULES, 'interleaved')
    self.tau_mode = choose('temperature', TEMPERATURES, 'logits')
    self.arch_gradient = choose('arch_gradient', ARCH_GRADIENTS, 'straight_through')
    self.vital_init = choose('vital_init', VITAL_INITS, 'uniform')
    self.dtype = blocks.compute_dtype(choose('precision', blocks.PRECISIONS, 'float32'))
    try:
      self.engine_class = engines.engine_class(cfg.get('engine', ''), self.sampler)
    except ValueError as e:
      raise SearchError(str(e)) from None
    self.reinforce = self.arch_gradient == 'reinforce'
    if self.reinforce and self.engine_class.runs != 'path':
      raise SearchError(f"search.arch_gradient 'reinforce' needs search.sampler 'gumbel_max' (a "
                        f"sampled path), got {cfg.sampler!r}; use 'straight_through' with it")
    self.steps_per_epoch = (int(tr_steps_per_epoch), int(val_steps_per_epoch))
    if self.schedule == 'epoch' and min(self.steps_per_epoch) < 1:
      raise SearchError(f"search.schedule 'epoch' needs at least one step per epoch of D_tr and "
                        f'of D_val, got {self.steps_per_epoch[0]} and {self.steps_per_epoch[1]}')
    if int(cfg.num_proposals) < 1:
      raise SearchError(f'search.num_proposals must be >= 1, got {cfg.num_proposals}')
    self.arch_warmup = float(cfg.get('arch_warmup', 0.0))
    if not 0.0 <= self.arch_warmup < 1.0:
      raise SearchError(f'search.arch_warmup must be in [0, 1), got {self.arch_warmup}')
    self.val_every = int(cfg.val_every) or 4  # 80/20 split: one D_val batch per 4 D_tr batches
    self.arch_tx = optax.adam(float(cfg.arch_lr))
    self._engines, self._stages = {}, {}

    # The cost tables, the targets, and what the layers other than the vital ones can add.
    self.tables = costs.cost_tables(space) if tables is None else tables
    self.mask = space.op_mask()
    self.fixed_ops = dict(space.supernet_fixed)
    self.vital_names = tuple(n for n in vital.vital_layers(space) if n not in self.fixed_ops)
    self.vital_rows = [space.searchable_names.index(n) for n in self.vital_names]
    target_values = [float(targets.get(key, 0.0) or 0.0) for key in costs.TARGET_KEYS]
    if target_values[2] > 0 and self.tables.latency is None:
      raise SearchError('targets.latency_ms needs a latency table (targets.latency_table)')
    target_values = target_values[:self.tables.num_resources]
    self.active = np.array([t > 0 for t in target_values])
    if not self.active.any():
      raise SearchError('set at least one of targets.params, targets.flops and '
                        'targets.latency_ms (> 0)')
    self.targets = np.array(target_values)
    # Refuse impossible targets before any training.
    free, tables, mask, offset = costs.restrict_tables(self.tables, self.fixed_indices({}))
    costs.check_targets(tables, mask, offset, self.targets, self.active, space.name)
    self.maxima = costs.space_maxima(tables, mask, offset)
    # The vital choice must keep the targets inside what the layers searched after it (and the
    # fixed ones) can add.
    others = np.array([l not in self.vital_rows for l in free], bool)
    self.others_range = costs.reachable_range(tables[:, others], mask[others], offset)
    if self.vital_priority and self.vital_names:
      allowed = np.where(self.mask[self.vital_rows], 0.0, -np.inf)
      if stages.best_reachable_choice(allowed, self.tables.stacked()[:, self.vital_rows],
                                      *self.others_range, self.targets, self.active) is None:
        shown = ', '.join(f'{name} {costs.show(i, t, 3)}' for i, (name, t, on) in
                          enumerate(zip(costs.RESOURCE_NAMES, self.targets, self.active)) if on)
        raise SearchError(f'no choice of the vital blocks ({", ".join(self.vital_names)}) of '
                          f'space {space.name} leaves the targets ({shown}) within reach of the '
                          'other layers, so the vital stage could not end; change the targets '
                          'or set search.vital_priority=False')

  @staticmethod
  def _choice(cfg, key: str, allowed, default):
    value = cfg.get(key, default) if default is not None else cfg[key]
    if value not in allowed:
      raise SearchError(f'search.{key} must be one of {", ".join(allowed)}, got {value!r}')
    return value

  # ------------------------------------------------------------------------------------------
  # Stages and engines.

  def fixed_indices(self, vital_ops: Mapping[str, str]) -> dict:
    """{searchable layer index: op index} of the supernet-fixed layers and `vital_ops`."""
    fixed = {**self.fixed_ops, **vital_ops}
    return {self.space.searchable_names.index(n): self.space.op_names.index(op)
            for n, op in fixed.items()}

  def make_engine(self, layer_ops):
    """The engine of a stage's SuperNet (one per set of layer ops, shared by stages)."""
    if layer_ops not in self._engines:
      self._engines[layer_ops] = self.engine_class(
          self.space, layer_ops, momentum=float(self.cfg.momentum),
          weight_decay=float(self.cfg.weight_decay), weight_sharing=self.weight_sharing,
          dtype=self.dtype)
    return self._engines[layer_ops]

  def stage_of(self, state: SearchState) -> stages.Stage:
    """The stage object of a state (a finished search's is its last stage)."""
    if state.stage == 'vital':
      return self._stage('vital', {})
    return self._stage('nonvital', state.vital_ops)

  def _stage(self, name: str, vital_ops: Mapping[str, str]) -> stages.Stage:
    key = (name, tuple(sorted(vital_ops.items())))
    if key not in self._stages:
      self._stages[key] = (stages.VitalStage(self) if name == 'vital'
                           else stages.NonVitalStage(self, vital_ops))
    return self._stages[key]

  def fitted_proposals(self, key, tables, mask, offset, num_proposals: int, tau):
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

  # ------------------------------------------------------------------------------------------
  # State.

  def init(self, seed: int) -> SearchState:
    key = jax.random.key_data(jax.random.key(seed))
    counters = {k: 0 for k in COUNTERS}
    if not self.vital_priority:
      stage = self._stage('nonvital', {})
      state = SearchState(weights=stage.engine.init(seed, self.image_shape), arch=None,
                          arch_opt=None, key=key, stage='nonvital', counters=counters,
                          seed=seed)
      return self._start_nonvital(state)
    stage = self._stage('vital', {})
    arch = stage.init_arch(seed)
    return SearchState(weights=stage.engine.init(seed, self.image_shape), arch=arch,
                       arch_opt=self.arch_tx.init(arch), key=key, stage='vital',
                       counters=counters, seed=seed,
                       arch_baseline=stages.no_baseline() if self.reinforce else None)

  def template(self, meta: Mapping[str, Any]) -> dict:
    """The abstract arrays of a checkpoint whose JSON side is `meta` (`SearchState.meta`)."""
    stage_meta = meta['meta']
    name = 'nonvital' if stage_meta['stage'] == 'done' else stage_meta['stage']
    stage = self._stage(name, stage_meta.get('vital_ops') or {})
    arch = stage.arch_shapes()
    abstract = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t)
    out = {'weights': stage.engine.state_shapes(self.image_shape), 'arch': abstract(arch),
           'arch_opt': jax.eval_shape(self.arch_tx.init, arch),
           'key': jax.ShapeDtypeStruct((2,), jnp.uint32)}
    if self.reinforce:
      out['arch_baseline'] = jax.ShapeDtypeStruct((), jnp.float32)
    return out

  def tau_at(self, step: int):
    """The temperature of the schedule at iteration `step`."""
    return sampling.temperature(int(step), float(self.cfg.tau0), float(self.cfg.tau_decay))

  def tau(self, state: SearchState):
    return self.tau_at(state.step)

  def _key(self, state: SearchState, purpose: int):
    key = jax.random.wrap_key_data(jnp.asarray(state.key))
    return jax.random.fold_in(jax.random.fold_in(key, state.step), purpose)

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

  def batches_needed(self, state: SearchState) -> tuple[bool, bool]:
    """(needs a D_tr batch, needs a D_val batch) for the next `train_step`."""
    if state.stage == 'done':
      return False, False
    return self._position(state.stage, state.counters)[:2]

  def _warming_up(self, stage: str, stage_weight_steps: int) -> bool:
    """Whether architecture steps still wait (the first arch_warmup share of the stage's
    weight steps)."""
    return stage_weight_steps < self.arch_warmup * self.stage_steps[stage]

  # ------------------------------------------------------------------------------------------
  # Steps.

  def train_step(self, state: SearchState, tr_batch=None, val_batch=None):
    """One iteration: a weight step on `tr_batch` (D_tr) and/or an architecture step on
    `val_batch` (D_val), exactly the batches `batches_needed(state)` asks for.

    Moves to the next stage once the current one has run its iterations.
    """
    if state.stage == 'done':
      raise SearchError('the search is done; nothing left to train')
    counters = dict(state.counters)
    needs_tr, needs_val, stage_weight_steps = self._position(state.stage, counters)
    given = (tr_batch is not None, val_batch is not None)
    if given != (needs_tr, needs_val):
      describe = lambda tr, val: ' and '.join(['a D_tr batch'] * tr + ['a D_val batch'] * val)
      raise SearchError(f'search step {state.step} takes {describe(needs_tr, needs_val)}, got '
                        f'{describe(*given) or "no batch"} (see Searcher.batches_needed)')
    stage = self.stage_of(state)
    tau = self.tau(state)
    out = {'tau': float(tau), 'stage': state.stage}
    weights, arch, arch_opt, baseline = (state.weights, state.arch, state.arch_opt,
                                         state.arch_baseline)

    if needs_tr:
      lr = _cosine(float(self.cfg.weight_lr), stage_weight_steps, self.stage_steps[state.stage])
      idx, a = stage.sample_ops(arch, self._key(state, 0), tau)
      weights, metrics = stage.engine.train_step(weights, tr_batch,
                                                 engines.Choice(stage.layers, idx, a), lr)
      counters['tr_step'] += 1
      # Metrics stay on the device: the caller reads them when it reports (a read here would
      # make the host wait for every step).
      out.update(loss=metrics['loss'], accuracy=metrics['accuracy'], lr=lr)

    if needs_val and self._warming_up(state.stage, stage_weight_steps):
      counters['val_step'] += 1  # the D_val batch is passed over: theta waits for the weights
    elif needs_val:
      key = self._key(state, 1)
      idx, a = stage.sample_ops(arch, key, tau)
      choice = engines.Choice(stage.layers, idx, a)
      if self.reinforce:
        weights, val_metrics = stage.engine.path_loss(weights, val_batch, choice)
        arch, arch_opt, baseline = stage.update_reinforce(
            arch, arch_opt, key, tau, jnp.asarray(val_metrics['loss'], jnp.float32), baseline)
      else:
        weights, val_metrics, grad_a = stage.engine.arch_grads(weights, val_batch, choice)
        arch, arch_opt = stage.update(arch, arch_opt, key, tau, grad_a)
      counters['val_step'] += 1
      out['val_loss'] = val_metrics['loss']
      out['val_accuracy'] = val_metrics['accuracy']

    counters['step'] += 1
    counters['stage_step'] += 1
    state = state.replace(weights=weights, arch=arch, arch_opt=arch_opt, arch_baseline=baseline,
                          counters=counters)
    if counters['stage_step'] >= self.stage_iterations(state.stage):
      state = self._advance(state)
    return state, out

  def _advance(self, state: SearchState) -> SearchState:
    counters = {**state.counters, 'stage_step': 0}
    if state.stage != 'vital':
      return state.replace(stage='done', counters=counters)
    try:
      vital_ops = self.stage_of(state).finish(state.arch['theta'])
    except stages.StageError as e:
      raise SearchError(str(e)) from None
    state = state.replace(stage='nonvital', vital_ops=vital_ops, counters=counters,
                          theta_vital=np.asarray(state.arch['theta']).tolist())
    # Stage-2 weights: the fixed vital ops keep what stage 1 trained; the rest start fresh.
    fresh = self.stage_of(state).engine.init(state.seed + 1, self.image_shape)
    weights = {k: {layer: dict(ops) for layer, ops in fresh[k].items()} for k in fresh}
    for k in weights:
      for layer, parts in state.weights[k].items():
        for part in parts:  # ops, and 'shared' kernels
          if part in weights[k].get(layer, {}):
            weights[k][layer][part] = state.weights[k][layer][part]
    return self._start_nonvital(state.replace(weights=weights))

  def _start_nonvital(self, state: SearchState) -> SearchState:
    """Builds the space proposals for the layers left after the vital stage."""
    key = jax.random.fold_in(jax.random.wrap_key_data(jnp.asarray(state.key)), 2 ** 31)
    try:
      arch = self.stage_of(state).init_arch(key, self.tau(state))
    except stages.StageError as e:
      raise SearchError(str(e)) from None
    # The REINFORCE baseline averages the losses of the current stage only.
    return state.replace(arch=arch, arch_opt=self.arch_tx.init(arch),
                         arch_baseline=stages.no_baseline() if self.reinforce else None)

  # ------------------------------------------------------------------------------------------
  # Results.

  def probabilities(self, state: SearchState) -> dict:
    """{layer: {op: probability}} of the current stage's distribution at tau = 1."""
    return self.stage_of(state).probabilities(state.arch)

  def architecture(self, state: SearchState) -> arch_lib.Architecture:
    if state.stage == 'vital':
      raise SearchError('the vital stage has not finished; no architecture yet')
    return self.stage_of(state).architecture(state.arch, state.seed)

  def result(self, state: SearchState) -> dict:
    architecture = self.architecture(state)
    values = self.tables.resources(architecture.indices(self.space))
    params, flops = self.tables.cost(architecture.indices(self.space))
    pi = np.asarray(jax.nn.softmax(state.arch['pi']))
    keys = costs.TARGET_KEYS[:len(values)]
    # Relative deviation from each active target: the search does not guarantee the 5%.
    deviation = {key: (float(value) - float(target)) / float(target)
                 for key, value, target, on in zip(keys, values, self.targets, self.active)
                 if on}
    latency = {} if len(values) < 3 else {'latency_ms': float(values[2])}
    return {
        **architecture.to_dict(self.space),
        'params': params, 'flops': flops, **latency,
        'targets': {key: float(target) if on else None
                    for key, target, on in zip(keys, self.targets, self.active)},
        'deviation': deviation,
        'vital_ops': dict(state.vital_ops),
        'fixed_ops': dict(self.fixed_ops),
        'theta_vital': state.theta_vital,
        'pi': pi.tolist(), 'proposal': int(np.argmax(pi)),
        'probabilities': self.probabilities(state),
        'resolution': self.space.resolution, 'num_classes': self.space.num_classes,
        'width': self.space.width,
        'steps': dict(state.counters),
    }

  def proposal_samples(self, state: SearchState, n: int = 10000):
    """(params [n], FLOPs [n]) of architectures drawn through pi and Theta at the current tau."""
    return self.stage_of(state).proposal_samples(state.arch, self._key(state, 2),
                                                 self.tau(state), n)
