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

Schedule (`search.schedule`, `search_schedule.py`): 'interleaved' takes one D_val architecture
step after every `val_every` D_tr weight steps; 'epoch' is Algorithm 1 as written (a pass over
D_tr, then one over D_val, each epoch). A stage's length is its number of weight steps
(vital_steps / nonvital_steps). One `train_step` is one iteration, and tau decays once an
iteration. `batches_needed` tells the caller which batches the next iteration takes.

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

SuperNet training recipe (`search.weight_sampling`, `weight_sampling.py`): 'distribution' trains
the path each weight step samples from theta / Theta / pi (the paper); 'uniform', 'strict_fair'
and 'sandwich' train paths of their own choosing, one or several a step (SPOS, FairNAS, BigNAS;
the 'single_path' engine only), while the architecture steps still sample from theta.

Layers of the space's `supernet_fixed` (EfficientNet's layer1_1, Table 14) keep their op from
the start: they are neither vital blocks to search nor layers of the proposals, and their cost
joins the fixed offset like the vital ops'.

Ablations are configuration: `vital_priority=False` searches every layer in one 'nonvital' stage
(HourNAS-G/H); `sampler='gumbel_softmax'` runs every candidate weighted by FBNet's relaxed
weights instead of one sampled path (HourNAS-I); `num_proposals` is m.

The stages themselves (their layers, architecture parameters, samplers, resource terms and
results) are objects in `stages.py`, reading the search's problem (`search_problem.py`: space,
cost tables, targets); the searcher owns the schedule and the state, and trains through the
engines its engine factory builds (by default the one config search.engine names, `engines/`),
without asking which. `check_config` checks config.search once, before anything is built.

The state (`SearchState`, `search_state.py`) is arrays in a pytree plus JSON-able meta (stage,
vital ops, counters, seed), so the driver checkpoints and resumes it at any step; every random
draw is keyed by (seed, step), and which batches a step takes follows from the counters, so a
resumed run is the uninterrupted one.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hournas_jax import (arch as arch_lib, blocks, costs, engines, mesh as mesh_lib, search_config,
                         search_problem, search_schedule, search_state, spaces, stages,
                         weight_sampling)

# The search's error, state and problem, where a caller of the search finds them.
SearchError = search_problem.SearchError
SearchState = search_state.SearchState
STAGES = search_state.STAGES
COUNTERS = search_state.COUNTERS

# The values config.search's fields may take, and its check.
WEIGHT_SHARING = search_config.WEIGHT_SHARING
SCHEDULES = search_config.SCHEDULES
TEMPERATURES = search_config.TEMPERATURES
ARCH_GRADIENTS = search_config.ARCH_GRADIENTS
VITAL_INITS = search_config.VITAL_INITS
SAMPLERS = search_config.SAMPLERS
WEIGHT_SAMPLINGS = search_config.WEIGHT_SAMPLINGS
check_config = search_config.check_config


def config_engine_factory(space: spaces.SearchSpace, cfg) -> engines.EngineFactory:
  """The engines config.search (`cfg`) names (search.engine, or the sampler's default), built
  with its momentum, weight decay, weight sharing and precision."""
  engine_class = engines.engine_class(cfg.engine, cfg.sampler)
  dtype = blocks.compute_dtype(cfg.precision)

  def build(layer_ops):
    return engine_class(space, layer_ops, momentum=float(cfg.momentum),
                        weight_decay=float(cfg.weight_decay),
                        weight_sharing=cfg.weight_sharing == 'nested', dtype=dtype)
  return build



def _step_key(key_data, step, purpose: int):
  """The PRNG key of one draw of iteration `step` (purpose 0: the weight step's sample, 1: the
  architecture step's, 2: the proposal samples of the report); pure, so that a fused
  iteration derives the key the chained one does."""
  key = jax.random.wrap_key_data(jnp.asarray(key_data))
  return jax.random.fold_in(jax.random.fold_in(key, step), purpose)


def _placed(state: SearchState, sharding) -> SearchState:
  """`state` with every array on `sharding` (None: as it is)."""
  if sharding is None:
    return state
  return state.replace(**mesh_lib.place(state.arrays(), sharding))

class Searcher:
  """Runs Algorithm 1 one iteration at a time; the caller owns data, checkpoints and logging.

  The driver asks `batches_needed(state)` before each `train_step`, and gives a D_tr batch for a
  weight step and a D_val batch for an architecture step. With the 'epoch' schedule the Searcher
  must know the steps per epoch of D_tr and D_val.
  """

  def __init__(self, space: spaces.SearchSpace, cfg, targets, image_shape, vital_steps: int,
               nonvital_steps: int, tr_steps_per_epoch: int = 0, val_steps_per_epoch: int = 0,
               tables: costs.CostTables | None = None,
               engine_factory: engines.EngineFactory | None = None):
    """cfg: config.search, checked by `check_config`. targets: config.targets (.params,
    .flops, .latency_ms; 0 = no target; latency needs `tables` with latency). tables: the
    space's cost tables, `costs.cost_tables(space)` when None. engine_factory: builds the
    engine of a stage's SuperNet (called once per set of layer ops); None = the engine the
    config names (`config_engine_factory`)."""
    self.space = space
    self.image_shape = tuple(image_shape)
    if cfg.schedule == 'epoch' and min(tr_steps_per_epoch, val_steps_per_epoch) < 1:
      raise SearchError(f"search.schedule 'epoch' needs at least one step per epoch of D_tr and "
                        f'of D_val, got {tr_steps_per_epoch} and {val_steps_per_epoch}')
    self.schedule = search_schedule.Schedule.from_config(
        cfg, vital_steps, nonvital_steps, (tr_steps_per_epoch, val_steps_per_epoch))
    # Refuses impossible targets before any training.
    self.problem = search_problem.build(space, cfg, targets, tables)
    self.reinforce = cfg.arch_gradient == 'reinforce'
    self.weight_sampling = cfg.weight_sampling
    self.arch_tx = optax.adam(float(cfg.arch_lr))
    self._engine_factory = engine_factory or config_engine_factory(space, cfg)
    self._engines, self._stages, self._fused = {}, {}, {}

  # ------------------------------------------------------------------------------------------
  # Stages and engines.

  def _engine(self, layer_ops):
    """The engine of a stage's SuperNet (one per set of layer ops, shared by stages)."""
    if layer_ops not in self._engines:
      self._engines[layer_ops] = self._engine_factory(layer_ops)
    return self._engines[layer_ops]

  def stage_of(self, state: SearchState) -> stages.Stage:
    """The stage object of a state (a finished search's is its last stage)."""
    if state.stage == 'vital':
      return self._stage('vital', {})
    return self._stage('nonvital', state.vital_ops)

  def _stage(self, name: str, vital_ops: Mapping[str, str]) -> stages.Stage:
    key = (name, tuple(sorted(vital_ops.items())))
    if key not in self._stages:
      self._stages[key] = (
          stages.VitalStage(self.problem, self._engine, self.arch_tx) if name == 'vital'
          else stages.NonVitalStage(self.problem, vital_ops, self._engine, self.arch_tx))
    return self._stages[key]

  # ------------------------------------------------------------------------------------------
  # State.

  def init(self, seed: int, mesh=None) -> SearchState:
    """The state a search starts from.

    Args:
      seed: seeds the weights, the architecture parameters and every random draw.
      mesh: the device mesh the search runs on: every array of the state starts replicated
        over it, where the programs return them, so that each program compiles once (None:
        the arrays stay where they are made, on the host or the default device).

    Returns:
      The state of iteration 0.
    """
    key = jax.random.key_data(jax.random.key(seed))
    counters = {k: 0 for k in COUNTERS}
    if not self.problem.vital_priority:
      stage = self._stage('nonvital', {})
      state = SearchState(weights=stage.engine.init(seed, self.image_shape), arch=None,
                          arch_opt=None, key=key, stage='nonvital', counters=counters,
                          seed=seed)
      state = self._start_nonvital(state)
    else:
      stage = self._stage('vital', {})
      arch = stage.init_arch(seed, self.schedule.tau_at(0))
      state = SearchState(weights=stage.engine.init(seed, self.image_shape), arch=arch,
                          arch_opt=self.arch_tx.init(arch), key=key, stage='vital',
                          counters=counters, seed=seed,
                          arch_baseline=stages.no_baseline() if self.reinforce else None)
    return state if mesh is None else _placed(state, mesh_lib.replicated(mesh))

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

  def tau(self, state: SearchState):
    """The temperature of the state's iteration."""
    return self.schedule.tau_at(state.step)

  def _key(self, state: SearchState, purpose: int):
    return _step_key(state.key, state.step, purpose)

  @property
  def total_steps(self) -> int:
    """Iterations of the whole search."""
    return self.schedule.total_steps

  def batches_needed(self, state: SearchState) -> tuple[bool, bool]:
    """(needs a D_tr batch, needs a D_val batch) for the next `train_step`."""
    if state.stage == 'done':
      return False, False
    return self.schedule.position(state.stage, state.counters)[:2]

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
    needs_tr, needs_val, stage_weight_steps = self.schedule.position(state.stage, counters)
    given = (tr_batch is not None, val_batch is not None)
    if given != (needs_tr, needs_val):
      describe = lambda tr, val: ' and '.join(['a D_tr batch'] * tr + ['a D_val batch'] * val)
      raise SearchError(f'search step {state.step} takes {describe(needs_tr, needs_val)}, got '
                        f'{describe(*given) or "no batch"} (see Searcher.batches_needed)')
    stage = self.stage_of(state)
    tau = self.tau(state)
    out = {'tau': float(tau), 'stage': state.stage}
    lr = self.schedule.weight_lr_at(state.stage, stage_weight_steps) if needs_tr else None
    # During the warmup the D_val batch is passed over: theta waits for the weights.
    arch_step = needs_val and not self.schedule.warming_up(state.stage, stage_weight_steps)
    # An engine that does not say (a stand-in, `engines.Engine`) is run step by step, and so
    # are the recipes whose weight steps train paths of their own (single_path only).
    if getattr(stage.engine, 'fusable', False) and self.weight_sampling == 'distribution':
      program = self._fused_program(stage, needs_tr, arch_step)
      weights, arch, arch_opt, baseline, metrics = program(
          state.weights, state.arch, state.arch_opt, state.arch_baseline, state.key, state.step,
          tau, lr, tr_batch, val_batch if arch_step else None)
    else:
      weights, arch, arch_opt, baseline, metrics = self._chained_iteration(
          state, stage, tau, lr, tr_batch, val_batch if arch_step else None)
    # Metrics stay on the device: the caller reads them when it reports (a read here would
    # make the host wait for every step).
    out.update(metrics)
    if needs_tr:
      counters['tr_step'] += 1
      out['lr'] = lr
    if needs_val:
      counters['val_step'] += 1

    counters['step'] += 1
    counters['stage_step'] += 1
    state = state.replace(weights=weights, arch=arch, arch_opt=arch_opt, arch_baseline=baseline,
                          counters=counters)
    if counters['stage_step'] >= self.schedule.stage_iterations(state.stage):
      state = self._advance(state)
    return state, out

  def _chained_iteration(self, state: SearchState, stage, tau, lr, tr_batch, val_batch):
    """An iteration as separate programs from Python: the sampler, the engine's steps, the
    architecture update (an engine whose steps are not one program: 'single_path').

    Returns:
      (weights, arch, arch_opt, baseline, metrics {loss, accuracy} of the weight step and
      {val_loss, val_accuracy} of the architecture step, those taken).
    """
    weights, arch, arch_opt, baseline = (state.weights, state.arch, state.arch_opt,
                                         state.arch_baseline)
    metrics = {}
    if tr_batch is not None and self.weight_sampling != 'distribution':
      weights, m = self._recipe_weight_step(stage, weights, tr_batch, self._key(state, 0), lr)
      metrics.update(loss=m['loss'], accuracy=m['accuracy'])
    elif tr_batch is not None:
      idx, a = stage.sample_ops(arch, self._key(state, 0), tau)
      weights, m = stage.engine.train_step(weights, tr_batch,
                                           engines.Choice(stage.layers, idx, a), lr)
      metrics.update(loss=m['loss'], accuracy=m['accuracy'])
    if val_batch is not None:
      key = self._key(state, 1)
      idx, a = stage.sample_ops(arch, key, tau)
      choice = engines.Choice(stage.layers, idx, a)
      if self.reinforce:
        weights, m = stage.engine.path_loss(weights, val_batch, choice)
        arch, arch_opt, baseline = stage.update_reinforce(
            arch, arch_opt, key, tau, jnp.asarray(m['loss'], jnp.float32), baseline)
      else:
        weights, m, grad_a = stage.engine.arch_grads(weights, val_batch, choice)
        arch, arch_opt = stage.update(arch, arch_opt, key, tau, grad_a)
      metrics.update(val_loss=m['loss'], val_accuracy=m['accuracy'])
    return weights, arch, arch_opt, baseline, metrics

  def _recipe_weight_step(self, stage, weights, batch, key, lr):
    """A weight step of search.weight_sampling's recipe: the paths its sampler draws over the
    stage's choice layers (`weight_sampling.py`), trained together by the engine."""
    sizes = weight_sampling.op_sizes(self.problem.tables, stage.rows)
    idx = weight_sampling.sample_paths(self.weight_sampling, key, np.asarray(stage.mask), sizes)
    num_ops = len(self.space.op_names)
    choices = [engines.Choice(stage.layers, row, jax.nn.one_hot(row, num_ops)) for row in idx]
    return stage.engine.train_paths(weights, batch, choices, lr,
                                    distill=weight_sampling.distills(self.weight_sampling))

  def _fused_program(self, stage, weight_step: bool, arch_step: bool):
    """An iteration as one program (an engine whose steps are pure functions: 'switch'): the
    samples, the weight step and the architecture step, what the chained iteration computes,
    with nothing between them on the host. One program per stage and kind of iteration.

    Returns:
      jitted fn(weights, arch, arch_opt, baseline, key data, step, tau, lr, tr_batch,
      val_batch) -> what `_chained_iteration` returns.
    """
    cache_key = (stage, weight_step, arch_step)
    if cache_key in self._fused:
      return self._fused[cache_key]
    train = stage.engine.step_function('train', stage.layers)
    grads = stage.engine.step_function('loss' if self.reinforce else 'grads', stage.layers)

    def iteration(weights, arch, arch_opt, baseline, key_data, step, tau, lr, tr_batch,
                  val_batch):
      metrics = {}
      if weight_step:
        idx, _ = stage.sample_stopped(arch, _step_key(key_data, step, 0), tau)
        weights, m = train(weights, tr_batch['image'], tr_batch['label'], idx, lr)
        metrics.update(loss=m['loss'], accuracy=m['accuracy'])
      if arch_step:
        key = _step_key(key_data, step, 1)
        idx, _ = stage.sample_stopped(arch, key, tau)
        if self.reinforce:
          weights, m = grads(weights, val_batch['image'], val_batch['label'], idx)
          arch, arch_opt, baseline = stage.arch_update_reinforce(
              arch, arch_opt, key, tau, jnp.asarray(m['loss'], jnp.float32), baseline)
        else:
          weights, m, grad_a = grads(weights, val_batch['image'], val_batch['label'], idx)
          arch, arch_opt = stage.arch_update(arch, arch_opt, key, tau, grad_a)
        metrics.update(val_loss=m['loss'], val_accuracy=m['accuracy'])
      return weights, arch, arch_opt, baseline, metrics

    self._fused[cache_key] = jax.jit(iteration)
    return self._fused[cache_key]

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
    # The fresh weights and the proposals go where the state is (its key never moves: `init`
    # or a restore put it there); arrays made elsewhere would compile every program of the
    # stage a second time.
    return _placed(self._start_nonvital(state.replace(weights=weights)),
                   mesh_lib.sharding_of(state.key))

  def _start_nonvital(self, state: SearchState) -> SearchState:
    """Builds the space proposals for the layers left after the vital stage."""
    # The proposals are fitted from the host's copy of the key, on one device. Compiled for a
    # replicated mesh, the same fitting loop rounds differently (4 CPU devices: thetas apart by
    # up to 0.2 of 13), and Adam on sampled costs followed by a top-k by hit rate turns that
    # into other proposals: the search would depend on the device count.
    # The key is derived where the state's key lives (the fold-in program the step keys
    # use: integer hashing, the same bits on any mesh), then brought to the host.
    key = jax.random.fold_in(jax.random.wrap_key_data(jnp.asarray(state.key)), 2 ** 31)
    key = jax.random.wrap_key_data(jax.device_put(mesh_lib.to_host(jax.random.key_data(key))))
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
    """{layer: {op: probability}} of the current stage's distribution at the state's tau (the
    distribution the search samples from)."""
    return self.stage_of(state).probabilities(state.arch, self.tau(state))

  def vital_probabilities(self, state: SearchState) -> dict:
    """{vital layer: {op: probability}} of theta_vital at the tau of stage 1's end; {} before
    that end or without vital priority."""
    if state.theta_vital is None:
      return {}
    tau = self.schedule.tau_at(self.schedule.stage_iterations('vital'))
    theta = jnp.asarray(state.theta_vital, jnp.float32)
    return self._stage('vital', {}).probabilities({'theta': theta}, tau)

  def architecture(self, state: SearchState) -> arch_lib.Architecture:
    if state.stage == 'vital':
      raise SearchError('the vital stage has not finished; no architecture yet')
    return self.stage_of(state).architecture(state.arch, state.seed)

  def candidates(self, state: SearchState, count: int) -> list[arch_lib.Architecture]:
    """Up to `count` distinct architectures of the final distribution within the targets, most
    probable first (the first is `architecture`'s)."""
    if state.stage == 'vital':
      raise SearchError('the vital stage has not finished; no architecture yet')
    return self.stage_of(state).candidates(state.arch, state.seed, count)

  def result(self, state: SearchState,
             architecture: arch_lib.Architecture | None = None) -> dict:
    """The searched architecture (`architecture`, by default the distribution's choice) and its
    report: costs, targets and the deviation from them, the vital and fixed ops, theta_vital,
    pi, the probabilities, the steps taken."""
    architecture = architecture or self.architecture(state)
    tables = self.problem.tables
    indices = architecture.indices(self.space)
    resources = tables.named_resources(indices)
    params, flops = tables.cost(indices)
    pi = np.asarray(jax.nn.softmax(state.arch['pi']))
    targets = self.problem.named_targets
    # Relative deviation from each active target: the search does not guarantee the 5%.
    deviation = {key: (resources[key] - target) / target for key, target in targets.items()
                 if target is not None}
    latency = {'latency_ms': resources['latency_ms']} if tables.has_latency else {}
    return {
        **architecture.to_dict(self.space),
        'params': params, 'flops': flops, **latency,
        'targets': targets,
        'deviation': deviation,
        'vital_ops': dict(state.vital_ops),
        'fixed_ops': dict(self.problem.fixed_ops),
        'theta_vital': state.theta_vital,
        'pi': pi.tolist(), 'proposal': int(np.argmax(pi)),
        'tau': float(self.tau(state)),
        'probabilities': {**self.vital_probabilities(state), **self.probabilities(state)},
        'resolution': self.space.resolution, 'num_classes': self.space.num_classes,
        'width': self.space.width,
        'steps': dict(state.counters),
    }

  def proposal_samples(self, state: SearchState, n: int = 10000):
    """(params [n], FLOPs [n]) of architectures drawn through pi and Theta at the current tau."""
    return self.stage_of(state).proposal_samples(state.arch, self._key(state, 2),
                                                 self.tau(state), n)
