"""The HourNAS search (Algorithm 1): vital blocks first, then the rest through space proposals.

Stage 'vital': the minimal SuperNet S_vital (vital SuperBlocks only) trains its weights on D_tr
with paths sampled from theta_vital by Gumbel-Max, and every `val_every` weight steps theta_vital
takes an Adam step on a D_val batch. At the end each vital block is fixed to its most probable
op.
Stage 'nonvital': m space proposals Theta are optimised for the targets on the cost tables of
the remaining layers (seconds, `proposals.py`); pi over proposals starts uniform. Each step
samples a proposal from pi and an architecture from it (Appendix C); weights train on D_tr, and
pi and Theta update on D_val with cross-entropy + alpha * the resource term (Eqn 6). The result
takes the proposal with the highest pi and each layer's most probable op.

Ablations are configuration: `vital_priority=False` searches every layer in one 'nonvital' stage
(HourNAS-G/H); `sampler='gumbel_softmax'` runs every candidate weighted by FBNet's relaxed
weights instead of one sampled path (HourNAS-I); `num_proposals` is m.

The whole state is a pytree of arrays (plus `meta`, JSON-able), so the driver checkpoints and
resumes it at any step; every random draw is keyed by (seed, step), so a resumed run is the
uninterrupted one.
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hournas_jax import (arch as arch_lib, costs, proposals, sampling, singlepath, spaces,
                         supernet, vital, wholenet)

STAGES = ('vital', 'nonvital', 'done')
_COUNTERS = ('step', 'tr_step', 'val_step', 'stage_step')


class SearchError(ValueError):
  """A search configuration that cannot run (impossible targets, bad settings)."""


def _cosine(base_lr, step, total):
  return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


class Searcher:
  """Runs Algorithm 1 one step at a time; the caller owns data, checkpoints and logging."""

  def __init__(self, space: spaces.SearchSpace, cfg, targets, image_shape, vital_steps: int,
               nonvital_steps: int):
    self.space = space
    self.cfg = cfg
    self.image_shape = tuple(image_shape)
    self.vital_priority = bool(cfg.vital_priority)
    self.stage_steps = {'vital': int(vital_steps) if self.vital_priority else 0,
                        'nonvital': int(nonvital_steps)}
    if cfg.sampler not in ('gumbel_max', 'gumbel_softmax'):
      raise SearchError(f"search.sampler must be 'gumbel_max' or 'gumbel_softmax', got "
                        f'{cfg.sampler!r}')
    if int(cfg.num_proposals) < 1:
      raise SearchError(f'search.num_proposals must be >= 1, got {cfg.num_proposals}')
    self.val_every = int(cfg.val_every) or 4  # 80/20 split: one D_val batch per 4 D_tr batches
    self.tables = costs.cost_tables(space)
    self.mask = space.op_mask()
    self.vital_names = vital.vital_layers(space)
    self.vital_rows = [space.searchable_names.index(n) for n in self.vital_names]
    target_values = [float(targets.params or 0.0), float(targets.flops or 0.0)]
    self.active = np.array([t > 0 for t in target_values])
    if not self.active.any():
      raise SearchError('set at least one of targets.params and targets.flops (> 0)')
    self.targets = np.array(target_values)
    # Refuse impossible targets before any training: the vital stage may still narrow the
    # range, which the proposals check again when they are built.
    free, tables, mask, offset = proposals.restrict_tables(self.tables)
    proposals.check_targets(tables, mask, offset, self.targets, self.active, space.name)
    self.maxima = proposals.space_maxima(tables, mask, offset)
    self._engines = {}
    self._arch_tx = optax.adam(float(cfg.arch_lr))

  # ------------------------------------------------------------------------------------------
  # Networks of each stage.

  def choice_layers(self, meta) -> tuple[str, ...]:
    """The layers whose op is sampled in the current stage, in network order."""
    if meta['stage'] == 'vital':
      return self.vital_names
    fixed = meta.get('vital_ops') or {}
    return tuple(n for n in self.space.searchable_names if n not in fixed)

  def _layer_ops(self, meta):
    if meta['stage'] == 'vital':
      return supernet.layer_ops(self.space, vital_only=True)
    return supernet.layer_ops(self.space, frozen=meta.get('vital_ops') or {})

  def engine(self, meta):
    ops = self._layer_ops(meta)
    if ops not in self._engines:
      kwargs = dict(momentum=float(self.cfg.momentum), weight_decay=float(self.cfg.weight_decay))
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
    return state

  def stage(self, state) -> str:
    return state['meta']['stage']

  def tau(self, state):
    return sampling.temperature(int(state['counters']['step']), float(self.cfg.tau0),
                                float(self.cfg.tau_decay))

  def needs_val(self, state) -> bool:
    return (int(state['counters']['tr_step']) + 1) % self.val_every == 0

  def _key(self, state, purpose: int):
    key = jax.random.wrap_key_data(jnp.asarray(state['key']))
    return jax.random.fold_in(jax.random.fold_in(key, int(state['counters']['step'])), purpose)

  def _start_nonvital(self, state, meta) -> dict:
    """Builds the space proposals for the layers left after the vital stage."""
    fixed = {self.space.searchable_names.index(n): self.space.op_names.index(op)
             for n, op in meta['vital_ops'].items()}
    free, tables, mask, offset = proposals.restrict_tables(self.tables, fixed)
    try:
      proposals.check_targets(tables, mask, offset, self.targets, self.active, self.space.name)
    except proposals.ProposalError as e:
      raise SearchError(f'after fixing the vital blocks: {e}') from None
    key = jax.random.fold_in(jax.random.wrap_key_data(jnp.asarray(state['key'])), 2 ** 31)
    thetas, final_tau = proposals.optimize_proposals(
        key, tables, mask, offset, self.targets, self.maxima, self.active,
        num_proposals=int(self.cfg.num_proposals),
        iterations=int(self.cfg.proposal_iterations) or proposals.DEFAULT_ITERATIONS)
    # The proposals were fitted so that softmax(theta / final_tau) meets the targets; the search
    # samples at its own tau, so rescale theta to keep theta / tau, and with it the fitted
    # distribution, as it was at the start of this stage.
    thetas = thetas * (self.tau(state) / float(final_tau))
    arch = {'thetas': thetas, 'pi': jnp.zeros((int(self.cfg.num_proposals),))}
    return {'arch': arch, 'arch_opt': self._arch_tx.init(arch)}

  def _stage2_tables(self, meta):
    fixed = {self.space.searchable_names.index(n): self.space.op_names.index(op)
             for n, op in meta['vital_ops'].items()}
    _, tables, mask, offset = proposals.restrict_tables(self.tables, fixed)
    return (jnp.asarray(tables, jnp.float32), jnp.asarray(mask), jnp.asarray(offset, jnp.float32))

  # ------------------------------------------------------------------------------------------
  # Sampling: (op indices [L], and a function of the arch params giving the ST one-hot A).

  def _sample_fn(self, meta):
    layers = self.choice_layers(meta)
    rows = [self.space.searchable_names.index(n) for n in layers]
    mask = jnp.asarray(self.mask[rows])
    if meta['stage'] == 'vital':
      def sample(arch, key, tau):
        if self.cfg.sampler == 'gumbel_softmax':
          w = sampling.gumbel_softmax(key, arch['theta'], tau, mask)
          return jnp.argmax(w, -1), w
        return sampling.gumbel_max(key, arch['theta'], tau, mask)
    else:
      def sample(arch, key, tau):
        _, idx, a = proposals.two_level_straight_through(key, arch['thetas'], arch['pi'], tau,
                                                         mask)
        if self.cfg.sampler == 'gumbel_softmax':
          w = sampling.gumbel_softmax(jax.random.fold_in(key, 1), arch['thetas'], tau, mask)
          k = jnp.argmax(arch['pi'] + jax.random.gumbel(key, arch['pi'].shape))
          return idx, w[k]
        return idx, a
    return layers, sample

  def _jitted(self, meta):
    """The jitted sample and architecture-update functions of a stage (cached)."""
    cache_key = (meta['stage'], tuple(sorted((meta.get('vital_ops') or {}).items())))
    if getattr(self, '_jit_key', None) == cache_key:
      return self._jit_fns
    layers, sample = self._sample_fn(meta)
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

    self._jit_key, self._jit_fns = cache_key, (layers, sample_ops, update)
    return self._jit_fns

  # ------------------------------------------------------------------------------------------
  # Steps.

  def train_step(self, state, tr_batch, val_batch=None):
    """One weight step on D_tr, and an architecture step on D_val when `val_batch` is given.

    Moves to the next stage once the current one has run its steps.
    """
    meta = state['meta']
    if meta['stage'] == 'done':
      raise SearchError('the search is done; nothing left to train')
    # Counters and seed come back from a checkpoint as arrays.
    counters = {k: int(v) for k, v in state['counters'].items()}
    state = {**state, 'counters': counters, 'seed': int(state['seed'])}
    engine = self.engine(meta)
    layers, sample_ops, update = self._jitted(meta)
    tau = self.tau(state)
    lr = _cosine(float(self.cfg.weight_lr), counters['stage_step'],
                 self.stage_steps[meta['stage']])

    idx, a = sample_ops(state['arch'], self._key(state, 0), tau)
    weights, metrics = self._weight_step(engine, state['weights'], tr_batch, layers, idx, a, lr)
    state = {**state, 'weights': weights}
    counters['tr_step'] += 1
    out = {'loss': float(metrics['loss']), 'accuracy': float(metrics['accuracy']),
           'tau': float(tau), 'lr': lr, 'stage': meta['stage']}

    if val_batch is not None:
      key = self._key(state, 1)
      idx, a = sample_ops(state['arch'], key, tau)
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
    if counters['stage_step'] >= self.stage_steps[meta['stage']]:
      state = self._advance(state)
    return state, out

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
    grad_a = jnp.stack([jax.nn.one_hot(idx[i], num_ops) * gates[n]
                        for i, n in enumerate(layers)])
    return weights, metrics, grad_a

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
      best = np.asarray(sampling.argmax_ops(state['arch']['theta'],
                                            jnp.asarray(self.mask[self.vital_rows])))
      vital_ops = {n: self.space.op_names[int(i)] for n, i in zip(self.vital_names, best)}
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
    for layer, ops in weights['params'].items():
      for op in ops:
        if layer in out['params'] and op in out['params'][layer]:
          for k in out:
            out[k][layer][op] = weights[k][layer][op]
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
    best = np.asarray(sampling.argmax_ops(state['arch']['thetas'][k],
                                          jnp.asarray(self.mask[rows])))
    chosen = dict(meta.get('vital_ops') or {})
    chosen.update({n: self.space.op_names[int(i)] for n, i in zip(layers, best)})
    return arch_lib.Architecture(self.space.name,
                                 tuple(chosen[n] for n in self.space.searchable_names))

  def result(self, state) -> dict:
    architecture = self.architecture(state)
    params, flops = self.tables.cost(architecture.indices(self.space))
    pi = np.asarray(jax.nn.softmax(state['arch']['pi']))
    return {
        **architecture.to_dict(self.space),
        'params': params, 'flops': flops,
        'targets': {'params': float(self.targets[0]) if self.active[0] else None,
                    'flops': float(self.targets[1]) if self.active[1] else None},
        'vital_ops': dict(state['meta'].get('vital_ops') or {}),
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
    _, tables, _, offset = proposals.restrict_tables(self.tables, {
        self.space.searchable_names.index(k): self.space.op_names.index(v)
        for k, v in (meta.get('vital_ops') or {}).items()})
    idx = proposals.sample_architectures(
        self._key(state, 2), state['arch']['thetas'], state['arch']['pi'], self.tau(state),
        jnp.asarray(self.mask[rows]), n)
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
    return {'weights': weights, 'arch': abstract(arch),
            'arch_opt': jax.eval_shape(self._arch_tx.init, arch),
            'key': jax.ShapeDtypeStruct((2,), jnp.uint32),
            'counters': {k: jax.ShapeDtypeStruct((), jnp.int32) for k in _COUNTERS},
            'seed': jax.ShapeDtypeStruct((), jnp.int32)}
