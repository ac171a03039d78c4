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

A stage reads the search's problem (`search_problem.SearchProblem`: space, cost tables,
targets, fixed and vital layers, sampler settings) and is handed its collaborators: a function
giving the engine of a set of layer ops, and the architecture optimizer. Each stage compiles its
sampler and its architecture update once (`sample_ops`, `update`, `update_reinforce`); the
searcher (`search.py`) owns the schedule and the state.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hournas_jax import (arch as arch_lib, costs, logging_utils, proposals, sampling,
                         search_problem, supernet)
from hournas_jax.engines import base as engine_base

BASELINE_DECAY = 0.9  # of the REINFORCE baseline's moving average


class StageError(ValueError):
  """Raised where no choice of the vital blocks keeps the targets within reach."""


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

  problem: the search's space, costs, targets and settings; frozen: {layer: op} of the
  searchable layers held at one op; engine_for: the engine of a set of layer ops (shared by the
  stages that ask for the same); arch_tx: the optimizer of the architecture parameters.
  """

  name = ''
  has_resource = False  # whether `resource` adds a term to the architecture loss

  def __init__(self, problem: search_problem.SearchProblem, frozen: Mapping[str, str],
               engine_for: engine_base.EngineFactory, arch_tx: optax.GradientTransformation):
    self.problem = problem
    self.space = problem.space
    self.frozen = dict(frozen)
    self.arch_tx = arch_tx
    self.layers = self.choice_layers()
    self.rows = [self.space.searchable_names.index(n) for n in self.layers]
    self.mask = jnp.asarray(problem.op_mask[self.rows])
    self.engine = engine_for(self.layer_ops())
    self.relaxed = problem.relaxed
    self.tau_mode = problem.tau_mode
    # The pure pieces (`sample_stopped`, `arch_update`, `arch_update_reinforce`) compiled alone;
    # a searcher may instead trace the pure ones into a program of its own.
    self.sample_ops = jax.jit(self.sample_stopped)
    self.update = jax.jit(self.arch_update)
    self.update_reinforce = jax.jit(self.arch_update_reinforce)

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

  # ----- Pure pieces of an iteration (jittable: arrays in, arrays out).

  def sample_stopped(self, arch, key, tau):
    """(op indices [L], A [L, O]) of `sample`, A held constant (the engines' input)."""
    idx, a = self.sample(arch, key, tau)
    return idx, jax.lax.stop_gradient(a)

  def arch_update(self, arch, opt_state, key, tau, grad_a):
    """(arch, opt_state) after one Adam step on the straight-through gradient.

    Args:
      arch: the architecture parameters; opt_state: their optimizer state.
      key, tau: those the sample of the step was drawn with (it is drawn again here).
      grad_a: d cross-entropy / d A [L, O] from the engine.
    """
    # Only the sampled entries of grad_a are non-zero for Gumbel-Max. The surrogate
    # <A, grad_a> has exactly that gradient with respect to A, so its gradient with respect to
    # theta (or Theta and pi) is the straight-through one.
    def surrogate(arch):
      _, a = self.sample(arch, key, tau)
      loss = jnp.sum(a * grad_a)
      extra = self.resource(a)
      return loss if extra is None else loss + extra
    grads = jax.grad(surrogate)(arch)
    updates, opt_state = self.arch_tx.update(grads, opt_state, arch)
    return optax.apply_updates(arch, updates), opt_state

  def arch_update_reinforce(self, arch, opt_state, key, tau, loss, baseline):
    """(arch, opt_state, next baseline) after one Adam step on the score-function estimate;
    `loss`: the D_val loss [] of the path drawn with `key` and `tau`."""
    # The estimate (L - b) * grad log p(A), plus the resource term's straight-through
    # gradient.
    b, new_baseline = baseline_step(baseline, loss)
    grads = reinforce_grads(lambda p: self.log_prob(p, key, tau), arch, loss, b)
    if self.has_resource:
      grads = jax.tree.map(jnp.add, grads, jax.grad(
          lambda arch: self.resource(self.sample(arch, key, tau)[1]))(arch))
    updates, opt_state = self.arch_tx.update(grads, opt_state, arch)
    return optax.apply_updates(arch, updates), opt_state, new_baseline

  # ----- Results.

  def probabilities(self, arch, tau) -> dict:
    """{layer: {op: probability}} of the leading distribution as the search samples from it at
    temperature `tau`."""
    p = sampling.probabilities(self.leading_theta(arch), tau, self.mask, self.tau_mode)
    return {n: {op: float(row[j]) for j, op in enumerate(self.space.op_names)
                if op in self.space.layer(n).ops}
            for n, row in zip(self.layers, np.asarray(p))}


class VitalStage(Stage):
  """Stage 1: theta_vital over the vital blocks of S_vital."""

  name = 'vital'

  def __init__(self, problem: search_problem.SearchProblem, engine_for: engine_base.EngineFactory,
               arch_tx: optax.GradientTransformation):
    super().__init__(problem, problem.fixed_ops, engine_for, arch_tx)

  def choice_layers(self):
    return self.problem.vital_names

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

  def init_arch(self, seed: int, tau) -> dict:
    """theta_vital at the start: uniform (zeros), or with search.vital_init='targets' the vital
    rows of one space proposal fitted to the targets over every searchable layer (scaled for
    the search's first temperature `tau`), so S_vital first samples the vital ops of
    architectures that meet the targets, and the cross-entropy moves theta away from there only
    where it has evidence."""
    p = self.problem
    theta = jnp.zeros((len(self.layers), len(self.space.op_names)))
    if p.vital_init != 'targets' or not self.layers:
      return {'theta': theta}
    free, tables, mask, offset = costs.restrict_tables(p.tables, p.fixed_indices({}))
    key = jax.random.fold_in(jax.random.key(seed), 2 ** 30)
    thetas = p.fitted_proposals(key, tables, mask, offset, 1, tau)
    rows = [int(np.flatnonzero(free == r)[0]) for r in self.rows]
    return {'theta': jnp.where(self.mask, thetas[0, jnp.asarray(rows)], 0.0)}

  def reachable_choice(self, log_probs):
    """The most probable joint choice (op indices) that keeps the targets reachable, or None."""
    p = self.problem
    return costs.best_reachable_choice(log_probs, p.tables.stacked()[:, self.rows],
                                       *p.others_range, p.targets, p.active)

  def finish(self, theta) -> dict:
    """{vital layer: op}: the most probable joint choice that keeps the targets reachable (the
    per-layer argmax unless that one would strand a target)."""
    p = self.problem
    mask = np.asarray(self.mask)
    logits = np.where(mask, np.asarray(theta, np.float64), -np.inf)
    top = logits.max(axis=-1, keepdims=True)
    log_probs = logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))
    per_layer = tuple(int(i) for i in np.argmax(logits, axis=-1))
    rows = np.arange(len(per_layer))
    cost = p.tables.stacked()[:, self.rows][:, rows, list(per_layer)].sum(axis=-1)
    low, high = p.others_range
    keeps = np.all(((low + cost <= p.targets) & (p.targets <= high + cost)) | ~p.active)
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

  def __init__(self, problem: search_problem.SearchProblem, vital_ops: Mapping[str, str],
               engine_for: engine_base.EngineFactory, arch_tx: optax.GradientTransformation):
    self.vital_ops = dict(vital_ops)
    super().__init__(problem, {**problem.fixed_ops, **self.vital_ops}, engine_for, arch_tx)
    _, tables, mask, offset = costs.restrict_tables(problem.tables,
                                                    problem.fixed_indices(self.vital_ops))
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
    p = self.problem
    t, offset = self._resource_tables
    return p.alpha * proposals.resource_loss(
        a, t, offset, jnp.asarray(p.targets, jnp.float32), jnp.asarray(p.maxima, jnp.float32),
        jnp.asarray(p.active))

  def arch_shapes(self):
    m = self.problem.num_proposals
    return {'thetas': jnp.zeros((m, len(self.layers), len(self.space.op_names))),
            'pi': jnp.zeros((m,))}

  def leading_theta(self, arch):
    return arch['thetas'][int(jnp.argmax(arch['pi']))]

  def init_arch(self, key, tau) -> dict:
    """m space proposals fitted to the targets over the stage's layers, pi uniform."""
    p = self.problem
    tables, mask, offset = self.tables
    try:
      costs.check_targets(tables, mask, offset, p.targets, p.active, self.space.name)
    except costs.TargetError as e:
      raise StageError(f'after fixing the vital blocks: {e}') from None
    m = p.num_proposals
    thetas = p.fitted_proposals(key, tables, mask, offset, m, tau)
    return {'thetas': thetas, 'pi': jnp.zeros((m,))}

  def architecture(self, arch, seed: int) -> arch_lib.Architecture:
    """The proposal with the highest pi and each layer's most probable op, unless that misses a
    target by more than the tolerance (`within_targets`)."""
    theta = np.asarray(self.leading_theta(arch), np.float64)
    best = np.asarray(sampling.argmax_ops(theta, self.mask))
    return self._architecture(self.within_targets(theta, best, seed))

  def candidates(self, arch, seed: int, count: int,
                 samples: int = 20000) -> list[arch_lib.Architecture]:
    """Up to `count` distinct architectures of the leading proposal, most probable first:
    `architecture`'s choice, then the most probable of `samples` draws that lie within the
    tolerance of every active target (the final choice by inherited accuracy scores these)."""
    theta = np.asarray(self.leading_theta(arch), np.float64)
    first = self.within_targets(theta, np.asarray(sampling.argmax_ops(theta, self.mask)), seed,
                                samples)
    idx, score = self._draws(theta, seed, samples)
    chosen, seen = [], set()
    for row in [np.asarray(first)] + [idx[i] for i in np.argsort(-score, kind='stable')
                                      if np.isfinite(score[i])]:
      key = tuple(int(i) for i in row)
      if key not in seen:
        seen.add(key)
        chosen.append(self._architecture(row))
      if len(chosen) == count:
        break
    return chosen

  def _architecture(self, idx) -> arch_lib.Architecture:
    """The whole architecture: the frozen layers' ops and `idx` (op indices of the stage's
    layers)."""
    chosen = dict(self.frozen)
    chosen.update({n: self.space.op_names[int(i)] for n, i in zip(self.layers, idx)})
    return arch_lib.Architecture(self.space.name,
                                 tuple(chosen[n] for n in self.space.searchable_names))

  def _meets(self, idx):
    """[k] whether each architecture (op indices [k, L] of the stage's layers, the frozen ones
    at their ops) lies within the tolerance of every active target."""
    tables, _, offset = self.tables
    return proposals.within_targets(costs.architecture_costs(idx, tables, offset),
                                    self.problem.targets, self.problem.active)

  def _draws(self, theta, seed: int, samples: int):
    """(op indices [samples, L] drawn from softmax(theta), their log-probability where they
    meet the targets and -inf elsewhere); the draws depend on `seed` alone."""
    logits = np.where(np.asarray(self.mask), theta, -np.inf)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    rng = np.random.default_rng([seed, 0x4d4f4445])
    idx = np.argmax(logp[None] + rng.gumbel(size=(samples, *logp.shape)), axis=-1)
    score = logp[np.arange(len(self.rows)), idx].sum(-1)
    return idx, np.where(self._meets(idx), score, -np.inf)

  def within_targets(self, theta, mode, seed: int, samples: int = 20000):
    """The proposal's most probable architecture (`mode`, op indices of the stage's layers)
    when it lies within the tolerance of every active target; otherwise the most probable of
    `samples` draws from the proposal that does (the mode of a distribution that meets the
    targets need not meet them itself), or the mode when no draw does."""
    if self._meets(np.asarray(mode)[None])[0]:
      return mode
    idx, score = self._draws(theta, seed, samples)
    if not np.isfinite(score).any():
      return mode
    return idx[int(np.argmax(score))]

  def proposal_samples(self, arch, key, tau, n: int):
    """(params [n], FLOPs [n]) of architectures drawn through pi and Theta at `tau`."""
    tables, _, offset = self.tables
    idx = proposals.sample_architectures(
        key, arch['thetas'], arch['pi'], sampling.sampling_tau(tau, self.tau_mode), self.mask,
        n)
    c = costs.architecture_costs(np.asarray(idx), tables, offset)
    return c[:, 0], c[:, 1]
