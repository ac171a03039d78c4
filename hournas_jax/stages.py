"""The two stages of Algorithm 1 as objects, and the pure math they share.

A stage owns its layers (the ones whose op it samples), its architecture parameters, its
sampler, its resource term, the engine that trains its SuperNet, and the abstract shape of its
architecture parameters (the checkpoint template):

- `VitalStage` (lines 1-11): the minimal SuperNet S_vital (vital SuperBlocks only), theta_vital
  [V, O] sampled by Gumbel-Max (or relaxed by Gumbel-softmax), no resource term; it ends by
  fixing the vital blocks to their most probable joint choice that keeps every target within
  reach of the other layers (`finish`).
- `NonVitalStage` (lines 12-22): the remaining layers, m space proposals Theta [m, L, O] fitted
  to the targets on the cost tables and pi [m] over them, a two-level sample (Appendix C), and
  the resource term of Eqn 6; it gives the searched architecture (`architecture`).

Each stage compiles its sampler and its architecture update once (`sample_ops`, `update`,
`update_reinforce`); the searcher (`search.py`) owns the schedule and the state.
"""

from __future__ import annotations

import itertools
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hournas_jax import arch as arch_lib, costs, logging_utils, proposals, sampling, supernet

BASELINE_DECAY = 0.9  # of the REINFORCE baseline's moving average
# The exact search over the vital blocks' joint choices scores at most this many at once.
_CHOICE_CHUNK = 2 ** 20


class StageError(ValueError):
  """Raised where no choice of the vital blocks keeps the targets within reach."""


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


def no_baseline():
  """The REINFORCE baseline of a stage that has seen no loss yet (NaN; see `baseline_step`)."""
  return jnp.full((), jnp.nan, jnp.float32)


# --------------------------------------------------------------------------------------------
# Stages.


class Stage:
  """What both stages share: the sampled layers, the engine, the compiled sampler and updates.

  `searcher` is the `search.Searcher` the stage belongs to: the space, its cost tables, the
  targets and the search config come from there.
  """

  name = ''
  has_resource = False  # whether `resource` adds a term to the architecture loss

  def __init__(self, searcher, frozen: Mapping[str, str]):
    self.searcher = searcher
    self.space = searcher.space
    self.frozen = dict(frozen)  # {layer: op} of the searchable layers held at one op
    self.layers = self.choice_layers()
    self.rows = [self.space.searchable_names.index(n) for n in self.layers]
    self.mask = jnp.asarray(searcher.mask[self.rows])
    self.engine = searcher.make_engine(self.layer_ops())
    self.relaxed = searcher.sampler == 'gumbel_softmax'
    self.tau_mode = searcher.tau_mode
    self.sample_ops = jax.jit(self._sample_stopped)
    self.update = jax.jit(self._update)
    self.update_reinforce = jax.jit(self._update_reinforce)

  # ----- What a stage defines.

  def choice_layers(self) -> tuple[str, ...]:
    """The layers whose op is sampled, in network order."""
    raise NotImplementedError

  def layer_ops(self):
    """The candidates of every layer of the stage's SuperNet (`supernet.layer_ops`)."""
    raise NotImplementedError

  def sample(self, arch, key, tau):
    """(op indices [L], A [L, O] as a function of arch: the straight-through one-hot, or the
    relaxed weights)."""
    raise NotImplementedError

  def log_prob(self, arch, key, tau):
    """log p of the sample `sample(arch, key, tau)` draws, as a function of arch."""
    raise NotImplementedError

  def resource(self, a):
    """The resource term of the architecture loss at A, or None (no term)."""
    return None

  def arch_shapes(self) -> dict:
    """Zeros of the architecture parameters' shapes."""
    raise NotImplementedError

  def leading_theta(self, arch):
    """The theta [L, O] the stage's result comes from."""
    raise NotImplementedError

  # ----- Compiled pieces.

  def _sample_stopped(self, arch, key, tau):
    idx, a = self.sample(arch, key, tau)
    return idx, jax.lax.stop_gradient(a)

  def _update(self, arch, opt_state, key, tau, grad_a):
    # grad_a: d cross-entropy / d A from the network (only the sampled entries are non-zero
    # for Gumbel-Max). The surrogate <A, grad_a> has exactly that gradient with respect to A,
    # so its gradient with respect to theta (or Theta and pi) is the straight-through one.
    def surrogate(arch):
      _, a = self.sample(arch, key, tau)
      loss = jnp.sum(a * grad_a)
      extra = self.resource(a)
      return loss if extra is None else loss + extra
    grads = jax.grad(surrogate)(arch)
    tx = self.searcher.arch_tx
    updates, opt_state = tx.update(grads, opt_state, arch)
    return optax.apply_updates(arch, updates), opt_state

  def _update_reinforce(self, arch, opt_state, key, tau, loss, baseline):
    # loss: the D_val cross-entropy of the path sample(arch, key, tau) drew. The estimate
    # (L - b) * grad log p(A), plus the resource term's straight-through gradient.
    b, new_baseline = baseline_step(baseline, loss)
    grads = reinforce_grads(lambda p: self.log_prob(p, key, tau), arch, loss, b)
    if self.has_resource:
      grads = jax.tree.map(jnp.add, grads, jax.grad(
          lambda arch: self.resource(self.sample(arch, key, tau)[1]))(arch))
    tx = self.searcher.arch_tx
    updates, opt_state = tx.update(grads, opt_state, arch)
    return optax.apply_updates(arch, updates), opt_state, new_baseline

  # ----- Results.

  def probabilities(self, arch) -> dict:
    """{layer: {op: probability}} of the leading distribution at tau = 1."""
    p = sampling.probabilities(self.leading_theta(arch), 1.0, self.mask)
    return {n: {op: float(row[j]) for j, op in enumerate(self.space.op_names)
                if op in self.space.layer(n).ops}
            for n, row in zip(self.layers, np.asarray(p))}


class VitalStage(Stage):
  """Stage 1: theta_vital over the vital blocks of S_vital."""

  name = 'vital'

  def __init__(self, searcher):
    super().__init__(searcher, searcher.fixed_ops)

  def choice_layers(self):
    return self.searcher.vital_names

  def layer_ops(self):
    return supernet.layer_ops(self.space, frozen=self.frozen, vital_only=True)

  def sample(self, arch, key, tau):
    if self.relaxed:
      w = sampling.gumbel_softmax(key, arch['theta'], tau, self.mask)
      return jnp.argmax(w, -1), w
    return sampling.gumbel_max(key, arch['theta'], tau, self.mask, self.tau_mode)

  def log_prob(self, arch, key, tau):
    idx, _ = sampling.gumbel_max(key, arch['theta'], tau, self.mask, self.tau_mode)
    return path_log_prob(arch['theta'], jax.lax.stop_gradient(idx), tau, self.mask,
                         self.tau_mode)

  def arch_shapes(self):
    return {'theta': jnp.zeros((len(self.layers), len(self.space.op_names)))}

  def leading_theta(self, arch):
    return arch['theta']

  def init_arch(self, seed: int) -> dict:
    """theta_vital at the start: uniform (zeros), or with search.vital_init='targets' the vital
    rows of one space proposal fitted to the targets over every searchable layer, so S_vital
    first samples the vital ops of architectures that meet the targets, and the cross-entropy
    moves theta away from there only where it has evidence."""
    s = self.searcher
    theta = jnp.zeros((len(self.layers), len(self.space.op_names)))
    if s.vital_init != 'targets' or not self.layers:
      return {'theta': theta}
    free, tables, mask, offset = costs.restrict_tables(s.tables, s.fixed_indices({}))
    key = jax.random.fold_in(jax.random.key(seed), 2 ** 30)
    thetas = s.fitted_proposals(key, tables, mask, offset, 1, s.tau_at(0))
    rows = [int(np.flatnonzero(free == r)[0]) for r in self.rows]
    return {'theta': jnp.where(self.mask, thetas[0, jnp.asarray(rows)], 0.0)}

  def reachable_choice(self, log_probs):
    """The most probable joint choice (op indices) that keeps the targets reachable, or None."""
    s = self.searcher
    return best_reachable_choice(log_probs, s.tables.stacked()[:, self.rows],
                                 *s.others_range, s.targets, s.active)

  def finish(self, theta) -> dict:
    """{vital layer: op}: the most probable joint choice that keeps the targets reachable (the
    per-layer argmax unless that one would strand a target)."""
    s = self.searcher
    mask = np.asarray(self.mask)
    logits = np.where(mask, np.asarray(theta, np.float64), -np.inf)
    top = logits.max(axis=-1, keepdims=True)
    log_probs = logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))
    per_layer = tuple(int(i) for i in np.argmax(logits, axis=-1))
    rows = np.arange(len(per_layer))
    cost = s.tables.stacked()[:, self.rows][:, rows, list(per_layer)].sum(axis=-1)
    low, high = s.others_range
    keeps = np.all(((low + cost <= s.targets) & (s.targets <= high + cost)) | ~s.active)
    choice = per_layer if keeps else self.reachable_choice(log_probs)
    if choice is None:  # refused when the searcher was built; a guard against changed tables
      raise StageError('no choice of the vital blocks leaves the targets within reach')
    name = lambda idx: {n: self.space.op_names[i] for n, i in zip(self.layers, idx)}
    if choice != per_layer:
      logging_utils.info(f'[search] the most probable vital ops per layer {name(per_layer)} '
                         f'would leave the targets out of reach; fixed the most probable choice '
                         f'that keeps them reachable: {name(choice)}')
    return name(choice)


class NonVitalStage(Stage):
  """Stage 2: space proposals Theta and pi over the layers the vital stage left."""

  name = 'nonvital'
  has_resource = True

  def __init__(self, searcher, vital_ops: Mapping[str, str]):
    self.vital_ops = dict(vital_ops)
    super().__init__(searcher, {**searcher.fixed_ops, **self.vital_ops})
    _, tables, mask, offset = costs.restrict_tables(searcher.tables,
                                                    searcher.fixed_indices(self.vital_ops))
    self.tables = (tables, mask, offset)  # numpy, of the stage's layers
    self._resource_tables = (jnp.asarray(tables, jnp.float32),
                             jnp.asarray(offset, jnp.float32))

  def choice_layers(self):
    return tuple(n for n in self.space.searchable_names if n not in self.frozen)

  def layer_ops(self):
    return supernet.layer_ops(self.space, frozen=self.frozen)

  def sample(self, arch, key, tau):
    if self.relaxed:
      # The proposal goes through a straight-through sample too, so that pi learns.
      _, w = proposals.two_level_relaxed(key, arch['thetas'], arch['pi'], tau, self.mask)
      return jnp.argmax(w, -1), w
    _, idx, a = proposals.two_level_straight_through(key, arch['thetas'], arch['pi'], tau,
                                                     self.mask, tau_mode=self.tau_mode)
    return idx, a

  def log_prob(self, arch, key, tau):
    k, idx, _ = proposals.two_level_straight_through(key, arch['thetas'], arch['pi'], tau,
                                                     self.mask, tau_mode=self.tau_mode)
    k, idx = jax.lax.stop_gradient(k), jax.lax.stop_gradient(idx)
    return two_level_log_prob(arch['thetas'], arch['pi'], k, idx, tau, self.mask, self.tau_mode)

  def resource(self, a):
    s = self.searcher
    t, offset = self._resource_tables
    return float(s.cfg.alpha) * proposals.resource_loss(
        a, t, offset, jnp.asarray(s.targets, jnp.float32), jnp.asarray(s.maxima, jnp.float32),
        jnp.asarray(s.active))

  def arch_shapes(self):
    m = int(self.searcher.cfg.num_proposals)
    return {'thetas': jnp.zeros((m, len(self.layers), len(self.space.op_names))),
            'pi': jnp.zeros((m,))}

  def leading_theta(self, arch):
    return arch['thetas'][int(jnp.argmax(arch['pi']))]

  def init_arch(self, key, tau) -> dict:
    """m space proposals fitted to the targets over the stage's layers, pi uniform."""
    s = self.searcher
    tables, mask, offset = self.tables
    try:
      costs.check_targets(tables, mask, offset, s.targets, s.active, self.space.name)
    except costs.TargetError as e:
      raise StageError(f'after fixing the vital blocks: {e}') from None
    m = int(s.cfg.num_proposals)
    thetas = s.fitted_proposals(key, tables, mask, offset, m, tau)
    return {'thetas': thetas, 'pi': jnp.zeros((m,))}

  def architecture(self, arch, seed: int) -> arch_lib.Architecture:
    """The proposal with the highest pi and each layer's most probable op, unless that misses a
    target by more than the tolerance (`within_targets`)."""
    s = self.searcher
    theta = np.asarray(self.leading_theta(arch), np.float64)
    best = np.asarray(sampling.argmax_ops(theta, self.mask))
    chosen = dict(self.frozen)
    frozen_cost = sum((s.tables.stacked()[:, self.space.searchable_names.index(n),
                                          self.space.op_names.index(o)]
                       for n, o in chosen.items()), np.zeros(s.tables.num_resources))
    best = self.within_targets(theta, best, frozen_cost, seed)
    chosen.update({n: self.space.op_names[int(i)] for n, i in zip(self.layers, best)})
    return arch_lib.Architecture(self.space.name,
                                 tuple(chosen[n] for n in self.space.searchable_names))

  def within_targets(self, theta, mode, frozen_cost, seed: int, samples: int = 20000,
                     tolerance: float = costs.TOLERANCE):
    """The proposal's most probable architecture (`mode`, op indices of the stage's layers)
    when it lies within `tolerance` of every active target; otherwise the most probable of
    `samples` draws from the proposal that does (the mode of a distribution that meets the
    targets need not meet them itself), or the mode when no draw does."""
    s = self.searcher
    tables = s.tables.stacked()[:, self.rows]  # [R, L, O]
    offset = s.tables.fixed() + frozen_cost
    t = np.where(s.active, s.targets, 1.0)
    n = len(self.rows)

    def meets(idx):  # idx [k, L] -> [k]
      cost = offset[:, None] + tables[:, np.arange(n), idx].sum(-1)
      return np.all((np.abs(cost - t[:, None]) <= tolerance * t[:, None]) |
                    ~s.active[:, None], axis=0)
    if meets(np.asarray(mode)[None])[0]:
      return mode
    logits = np.where(np.asarray(self.mask), theta, -np.inf)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    rng = np.random.default_rng([seed, 0x4d4f4445])
    idx = np.argmax(logp[None] + rng.gumbel(size=(samples, *logp.shape)), axis=-1)
    ok = meets(idx)
    if not ok.any():
      return mode
    score = np.where(ok, logp[np.arange(n), idx].sum(-1), -np.inf)
    return idx[int(np.argmax(score))]

  def proposal_samples(self, arch, key, tau, n: int):
    """(params [n], FLOPs [n]) of architectures drawn through pi and Theta at `tau`."""
    tables, _, offset = self.tables
    idx = proposals.sample_architectures(
        key, arch['thetas'], arch['pi'], sampling.sampling_tau(tau, self.tau_mode), self.mask,
        n)
    c = costs.architecture_costs(np.asarray(idx), tables, offset)
    return c[:, 0], c[:, 1]
