"""Space proposals (Section 3.4, Eqn 4-5; Figure 3; Appendix C).

A space proposal is a theta [L, O] whose Gumbel-Max samples (Eqn 3) meet the resource targets:
    theta^T = argmin_theta  sum_i |R_i(A(theta)) - T_i| / M_i                           (Eqn 5)
with R_i(A) = sum(A * table_i) (plus the cost of every layer that is not searched), T_i the
target and M_i the largest cost the space can reach, which puts every term in [0, 1]. HourNAS
optimises m randomly initialised proposals and later samples an architecture in two levels:
a proposal from pi, then an architecture from that proposal's theta (Appendix C).

Pieces:
- resource_cost / resource_loss: Eqn 4-5 on (straight-through) one-hot architectures; stage 2
  of the search reuses resource_loss as its alpha-weighted term (Eqn 6).
- optimize_proposals: m proposals in one jitted loop (vmap over proposals, scan over steps,
  Adam), tau = tau0 * decay**step; returns the thetas and the final tau to sample them at.
- sample_two_level / sample_architectures: pi, then theta; two_level_straight_through: the same
  with gradients to pi and Theta, for stage 2 (two_level_relaxed: its Gumbel-softmax ablation).
- restrict_tables: fixes layers (the vital ones after stage 1) and folds their cost into the
  offset; reachable_range / check_targets: refuse targets no architecture reaches.

Resources are stacked in the order of `CostTables.stacked()`: index 0 params, index 1 FLOPs.
Everything but the CLI and the numpy helpers is pure and jittable. Temperatures follow
`sampling.py`: samples come from softmax(theta / tau), so lowering tau sharpens them (the
search's 'relaxed' reading samples at tau = 1 instead).

CLI:
    python -m hournas_jax.proposals --space fbnet --params 4.8e6 --flops 300e6 --proposals 8
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hournas_jax import costs, sampling, spaces

RESOURCE_NAMES = ('params', 'FLOPs')

# Defaults of `optimize_proposals`, chosen to meet the FBNet bar (m = 8, 4.8M params / 300M
# FLOPs: >= 90% of samples within 5% of both targets, < 5 s on a 2-core CPU, compile included;
# measured by benchmarks/proposals.py: 97-99% over seeds; ~2.2 s of CPU time, of which ~0.5 s
# is the loop and the rest tracing and compiling; 1.9-2.1 s wall with other jobs on the 2 cores
# (load ~4), 3-3.4 s at load ~6).
# - Schedule: the paper anneals tau from 5.0 by x0.9999 an iteration over a whole search epoch.
#   Building proposals alone takes "a few seconds", so we keep the schedule's form and start
#   (tau0 * decay**step, tau0 = 5) and compress it into 300 steps: 0.99465**300 = 0.2, so tau
#   ends at 1.0. At tau = 1 a proposal is plain softmax(theta), so theta itself must carry the
#   concentration on the targets: an optimised proposal is a real subspace (each of the 8 FBNet
#   proposals yields thousands of distinct architectures in 10,000 samples) rather than a
#   single architecture made deterministic by a tiny tau. (A schedule ending at tau ~0.05 gets
#   100% within 5%, but its 10,000 samples hold ~10-15 distinct architectures.) Sampling at a
#   lower tau sharpens further, as Figure 3 shows.
# - Adam at 0.1 (the paper's 0.01 is for the long search): enough for theta to travel O(10) in
#   300 steps, which is what concentrating ~22 layers at tau = 1 takes. 0.15 gives ~99.5% within
#   5% but 2-3x fewer distinct architectures; 0.05 gives ~80%, short of the bar.
# - 8 samples per proposal and step: the L1 loss's straight-through gradient is noisy and a
#   batch steadies it. 4 gives ~94-96% within 5%; 16 gives ~99% but doubles the loop's run
#   time and, like a higher learning rate, concentrates the proposals more (fewer distinct
#   architectures).
# - 2 candidates per proposal, screened down to m (see `_optimize`): single FBNet candidates
#   land anywhere from ~80% to 100% within 5%; keeping the better half lifts the pooled figure
#   from ~93-97% to ~97-99% for ~0.2 s more run time.
DEFAULT_ITERATIONS = 300
DEFAULT_SAMPLES_PER_STEP = 8
DEFAULT_LEARNING_RATE = 0.1
DEFAULT_TAU0 = 5.0
DEFAULT_TAU_DECAY = 0.99465
DEFAULT_INIT_STD = 1.0
DEFAULT_CANDIDATES_PER_PROPOSAL = 2
DEFAULT_SCREEN_SAMPLES = 64
TOLERANCE = 0.05  # "within the targets": |R_i - T_i| <= 5% of T_i


class ProposalError(ValueError):
  """Targets or fixed layers that no architecture of the space can satisfy."""


# --------------------------------------------------------------------------------------------
# Pure, jittable pieces.


straight_through = sampling.straight_through  # the loop draws its noise up front


def _uniform_open(key, n):
  """n uniforms in (0, 1), drawn flat, as jax.random.gumbel draws them."""
  return jax.random.uniform(key, (n,), minval=jnp.finfo(jnp.float32).tiny, maxval=1.0)


def _gumbel(u):
  return -jnp.log(-jnp.log(u))


# Up to this many Gumbel values (128 MB) the optimisation loop's noise is drawn before the loop.
_MAX_PRECOMPUTED_NOISE = 2 ** 25


def resource_cost(a, tables, offset):
  """R_i(A) = sum(A * table_i) + offset_i.

  a: [..., L, O] one-hot (or straight-through one-hot) architectures; tables: [R, L, O];
  offset: [R], the cost of everything outside the searched layers. Returns [..., R].
  """
  return jnp.einsum('...lo,rlo->...r', a, tables) + offset


def resource_loss(a, tables, offset, targets, maxima, active):
  """Eqn 5 for each architecture: sum_i active_i * |R_i(A) - T_i| / M_i, shape [...].

  `active` ([R], bool or float) selects which resources are targeted, so any subset of
  {params, FLOPs} works; an inactive target's value is ignored. Differentiable in `a`, hence in
  theta through the straight-through estimator of `sampling.gumbel_max`. Stage 2 of the search
  adds alpha times this term to its cross-entropy.
  """
  active = jnp.asarray(active, dtype=jnp.result_type(float))
  gap = jnp.abs(resource_cost(a, tables, offset) - targets) / maxima
  return jnp.sum(jnp.where(active > 0, gap * active, 0.0), axis=-1)


@jax.jit
def expected_cost(theta, tables, offset, tau, mask):
  """E[R_i] under softmax(theta / tau): [..., R]. Cheap, exact, and what the CLI reports."""
  return resource_cost(sampling.probabilities(theta, tau, mask), tables, offset)


def within_targets(costs_, targets, active, tolerance=TOLERANCE):
  """Bool [...]: every active resource of costs_ [..., R] within `tolerance` (relative) of its
  target. numpy in, numpy out (float64 evaluation); jax arrays in, jax out (jittable)."""
  xp = np if isinstance(costs_, np.ndarray) else jnp
  targets = xp.asarray(targets, dtype=costs_.dtype)
  ok = xp.abs(costs_ - targets) <= tolerance * targets
  return xp.all(ok | (xp.asarray(active) <= 0), axis=-1)


def _optimize(key, tables, mask, offset, targets, maxima, active, *, num_proposals, iterations,
              samples_per_step, candidates_per_proposal, screen_samples, learning_rate, tau0,
              tau_decay, init_std, tolerance):
  """The whole loop: candidates vmapped, iterations scanned, one Adam state for all; then the
  screening that keeps m of them."""
  num_layers, num_ops = mask.shape
  num_candidates = num_proposals * candidates_per_proposal
  shape = (num_candidates, num_layers, num_ops)
  screen_shape = (num_candidates, screen_samples, num_layers, num_ops)
  loop_shape = (iterations, num_candidates, samples_per_step, num_layers, num_ops)
  sizes = (math.prod(shape), math.prod(screen_shape), math.prod(loop_shape))
  # Random numbers come from as few threefry calls as possible, and none inside the loop when
  # the loop's noise fits in memory (30 MB at the defaults): XLA:CPU compiles each call
  # separately, and one inside the scan costs ~1.5 s of compile, over half the 5 s budget.
  precompute = sizes[2] <= _MAX_PRECOMPUTED_NOISE
  if precompute:
    u = _uniform_open(key, sum(sizes))
    step_inputs = _gumbel(u[sizes[0] + sizes[1]:]).reshape(loop_shape)
  else:
    key, loop_key = jax.random.split(key)
    u = _uniform_open(key, sizes[0] + sizes[1])
    step_inputs = jax.random.split(loop_key, iterations)
  thetas = init_std * jnp.sqrt(2.0) * jax.lax.erf_inv(2.0 * u[:sizes[0]] - 1.0)  # N(0, std^2)
  thetas = thetas.reshape(shape)
  screen_noise = _gumbel(u[sizes[0]:sizes[0] + sizes[1]]).reshape(screen_shape)
  # Masked entries never reach a sample (sampling.masked_logits), so their value is moot; zero
  # keeps the returned thetas readable.
  thetas = jnp.where(mask, thetas, 0.0)
  optimizer = optax.adam(learning_rate)

  def proposal_loss(theta, noise, tau):
    # A batch of architectures from one proposal; the mean of Eqn 5 over them. Minimising the
    # mean |R - T| (not |E[R] - T|) also shrinks the spread of R around T, so the proposal
    # concentrates where every sample meets the targets.
    _, a = straight_through(noise, theta, tau, mask)  # theta [L, O] broadcasts over samples
    return jnp.mean(resource_loss(a, tables, offset, targets, maxima, active))

  def total_loss(thetas, noise, tau):
    # The proposals are independent, so the sum's gradient is each proposal's own gradient.
    return jnp.sum(jax.vmap(proposal_loss, in_axes=(0, 0, None))(thetas, noise, tau))

  def step(carry, inputs):
    thetas, opt_state = carry
    step_index, noise_or_key = inputs
    noise = noise_or_key if precompute else sampling.gumbel_noise(noise_or_key, loop_shape[1:])
    tau = sampling.temperature(step_index, tau0, tau_decay)
    loss, grads = jax.value_and_grad(total_loss)(thetas, noise, tau)
    updates, opt_state = optimizer.update(grads, opt_state, thetas)
    return (optax.apply_updates(thetas, updates), opt_state), loss / num_candidates

  (thetas, _), losses = jax.lax.scan(
      step, (thetas, optimizer.init(thetas)),
      (jnp.arange(iterations, dtype=jnp.float32), step_inputs))
  final_tau = sampling.temperature(jnp.float32(iterations), tau0, tau_decay)

  # Screening: candidates_per_proposal x m candidates were optimised; keep the m whose samples
  # at the final tau meet the targets most often. Some candidates settle with a wide spread or
  # an off-centre mean (FBNet: ~80-90% within 5%, where most reach 95-100%), or, with a fast
  # schedule to a small tau, freeze a layer choice that leaves one resource just off target.
  # The ranking is on a noisy 64-sample estimate and ties keep the random-init order, so the
  # kept proposals stay as diverse as the candidates.
  z = sampling.masked_logits(thetas[:, None], final_tau, mask) + screen_noise
  a = jax.nn.one_hot(jnp.argmax(z, axis=-1), num_ops)  # no gradient needed here
  hit_rate = jnp.mean(within_targets(resource_cost(a, tables, offset), targets, active,
                                     tolerance), axis=-1)
  _, keep = jax.lax.top_k(hit_rate, num_proposals)  # ties: lower index first
  return thetas[keep], final_tau, losses


_STATIC = ('num_proposals', 'iterations', 'samples_per_step', 'candidates_per_proposal',
           'screen_samples')
_optimize_jit = jax.jit(_optimize, static_argnames=_STATIC)
# On CPU, compiling dominates: XLA:CPU spends ~2.5 s of CPU time on this program with its
# defaults and ~1.2 s with its fusion emitters off and LLVM at -O1, and the compiled loop runs
# as fast either way (~0.45 s at the defaults; 2-core dev box, jax 0.10.2). The options apply
# to this one program only. Should a future XLA drop them, the default compile is used.
_CPU_COMPILER_OPTIONS = {'xla_cpu_use_fusion_emitters': False,
                         'xla_backend_optimization_level': 1}
_optimize_jit_cpu = jax.jit(_optimize, static_argnames=_STATIC,
                            compiler_options=_CPU_COMPILER_OPTIONS)
_cpu_options_rejected = False


def _run_optimize(*args, **kwargs):
  global _cpu_options_rejected
  if jax.default_backend() == 'cpu' and not _cpu_options_rejected:
    try:
      return _optimize_jit_cpu(*args, **kwargs)
    except jax.errors.JaxRuntimeError as e:
      if 'compile option' not in str(e):
        raise
      _cpu_options_rejected = True
  return _optimize_jit(*args, **kwargs)


def optimize_proposals(key, tables, mask, offset, targets, maxima, active, *, num_proposals=8,
                       iterations=DEFAULT_ITERATIONS, samples_per_step=DEFAULT_SAMPLES_PER_STEP,
                       learning_rate=DEFAULT_LEARNING_RATE, tau0=DEFAULT_TAU0,
                       tau_decay=DEFAULT_TAU_DECAY, init_std=DEFAULT_INIT_STD,
                       candidates_per_proposal=DEFAULT_CANDIDATES_PER_PROPOSAL,
                       screen_samples=DEFAULT_SCREEN_SAMPLES, tolerance=TOLERANCE,
                       return_losses=False):
  """Optimises m space proposals together in one jitted loop (Eqn 5).

  tables [R, L, O], mask [L, O], offset/targets/maxima/active [R]. Every step draws
  `samples_per_step` Gumbel-Max architectures from each proposal at tau = tau0 * tau_decay**step
  and takes an Adam step on their mean resource_loss. candidates_per_proposal x m proposals
  are optimised and the m whose `screen_samples` samples at the final tau meet the targets
  (within `tolerance`) most often are kept; candidates_per_proposal=1 turns screening off.

  Returns (thetas [m, L, O], final_tau): the temperature the schedule reaches after
  `iterations` steps, at which the proposals are meant to be sampled; with return_losses, also
  the mean loss of every step [iterations]. Costs are float32 inside; check targets first
  (`check_targets`).
  """
  for name, value in (('num_proposals', num_proposals), ('iterations', iterations),
                      ('samples_per_step', samples_per_step),
                      ('candidates_per_proposal', candidates_per_proposal),
                      ('screen_samples', screen_samples)):
    if int(value) < 1:
      raise ProposalError(f'{name} must be at least 1, got {value!r}')
  if np.asarray(mask).shape[0] == 0:
    raise ProposalError('no searchable layer is left: nothing to optimise')
  as_f32 = lambda x: jnp.asarray(x, jnp.float32)
  thetas, final_tau, losses = _run_optimize(
      key, as_f32(tables), jnp.asarray(mask, bool), as_f32(offset), as_f32(targets),
      as_f32(maxima), as_f32(active), num_proposals=int(num_proposals),
      iterations=int(iterations), samples_per_step=int(samples_per_step),
      candidates_per_proposal=int(candidates_per_proposal), screen_samples=int(screen_samples),
      learning_rate=learning_rate, tau0=tau0, tau_decay=tau_decay, init_std=init_std,
      tolerance=tolerance)
  return (thetas, final_tau, losses) if return_losses else (thetas, final_tau)


@functools.partial(jax.jit, static_argnames='n')
def sample_two_level(key, thetas, pi_logits, tau, mask, n, pi_tau=1.0):
  """Appendix C's two-level sampling, n times: a proposal k ~ softmax(pi / pi_tau) by
  Gumbel-Max, then an architecture from softmax(thetas[k] / tau) by Gumbel-Max.

  Returns (proposal indices [n] int32, op indices [n, L] int32). Not differentiable; see
  `two_level_straight_through` for the search's training step.
  """
  pi_key, arch_key = jax.random.split(key)
  m = thetas.shape[0]
  chosen, _ = sampling.gumbel_max(pi_key, jnp.broadcast_to(pi_logits, (n, m)), pi_tau)
  indices, _ = sampling.gumbel_max(arch_key, thetas[chosen], tau, mask)
  return chosen, indices


def sample_architectures(key, thetas, pi_logits, tau, mask, n):
  """n architectures (op indices [n, L]) by two-level sampling: pi, then the proposal's theta.
  (Not jitted itself, so it shares sample_two_level's compiled program.)"""
  return sample_two_level(key, thetas, pi_logits, tau, mask, n)[1]


def two_level_straight_through(key, thetas, pi_logits, tau, mask, pi_tau=1.0,
                               tau_mode='logits'):
  """One two-level sample with gradients for stage 2 of the search.

  Returns (proposal k, op indices [L], a [L, O]), with a = sum_k s_k * A_k: s the
  straight-through one-hot over proposals, A_k an ST sample of every proposal. Its value is
  A_k of the chosen k; a loss on `a` sends gradients to the chosen theta (only, since s is 0
  elsewhere) and to pi through s, so pi and Theta are optimised together as in Eqn 6.
  `tau_mode`: where tau acts on the architecture sample (`sampling.py`).
  """
  pi_key, arch_key = jax.random.split(key)
  chosen, s = sampling.gumbel_max(pi_key, pi_logits, pi_tau, tau_mode=tau_mode)
  # Every proposal's sample, [m, L] and [m, L, O].
  indices, a_all = sampling.gumbel_max(arch_key, thetas, tau, mask, tau_mode)
  return chosen, indices[chosen], jnp.einsum('m,mlo->lo', s, a_all)


def two_level_relaxed(key, thetas, pi_logits, tau, mask, pi_tau=1.0):
  """`two_level_straight_through` for the Gumbel-softmax ablation: a proposal by a
  straight-through Gumbel-Max sample s over pi, and FBNet's relaxed weights
  softmax((theta_k + g) / tau) of every proposal.

  Returns (proposal k, weights [L, O] = sum_k s_k * W_k): the chosen proposal's relaxed weights
  in value, with gradients to that proposal's theta and, through s, to pi.
  """
  pi_key, arch_key = jax.random.split(key)
  chosen, s = sampling.gumbel_max(pi_key, pi_logits, pi_tau)
  weights = sampling.gumbel_softmax(arch_key, thetas, tau, mask)  # [m, L, O]
  return chosen, jnp.einsum('m,mlo->lo', s, weights)


# --------------------------------------------------------------------------------------------
# Tables, ranges and checks (numpy, outside jit).


def reachable_range(tables, mask, offset):
  """(lowest [R], highest [R]) cost over every architecture of the (restricted) space."""
  tables, mask = np.asarray(tables, np.float64), np.asarray(mask, bool)
  offset = np.asarray(offset, np.float64)
  if tables.shape[1] == 0:
    return offset.copy(), offset.copy()
  lowest = np.where(mask, tables, np.inf).min(axis=-1).sum(axis=-1) + offset
  highest = np.where(mask, tables, -np.inf).max(axis=-1).sum(axis=-1) + offset
  return lowest, highest


def _millions(x: float, digits: int = 1) -> str:
  return f'{x / 1e6:.{digits}f}M' if abs(x) >= 1e5 else f'{x / 1e6:.3f}M'


def check_targets(tables, mask, offset, targets, active, space_name: str = 'the space'):
  """Raises ProposalError, one line, for a non-finite, non-positive or unreachable target."""
  low, high = reachable_range(tables, mask, offset)
  for i, name in enumerate(RESOURCE_NAMES[:len(low)]):
    if not active[i]:
      continue
    t = float(targets[i])
    if not math.isfinite(t) or t <= 0:
      raise ProposalError(f'{name} target must be a positive number, got {t!r}')
    if not low[i] <= t <= high[i]:
      digits = 1  # enough digits that the target does not print as the bound it misses
      while digits < 4 and _millions(t, digits) in (_millions(low[i], digits),
                                                    _millions(high[i], digits)):
        digits += 1
      raise ProposalError(f'{name} target {_millions(t, digits)} is outside what space '
                          f'{space_name} can reach: {_millions(low[i], digits)} to '
                          f'{_millions(high[i], digits)}')


def restrict_tables(cost_tables: costs.CostTables, fixed: Mapping[int, int] | None = None):
  """Removes the layers of `fixed` (layer index -> op index) from the search.

  Their cost joins the stem and head's in the offset, so for a full architecture `arch`,
  cost_tables.cost(arch) == resource_cost(one_hot(arch[free]), tables, offset).
  Returns (free layer indices [Lf], tables [2, Lf, O], mask [Lf, O], offset [2]), numpy.
  """
  fixed = dict(fixed or {})
  full, mask = cost_tables.stacked(), np.asarray(cost_tables.mask, bool)
  num_layers, num_ops = mask.shape
  offset = np.array([cost_tables.fixed_params, cost_tables.fixed_flops], np.float64)
  for layer, op in fixed.items():
    if not (isinstance(layer, (int, np.integer)) and 0 <= layer < num_layers):
      raise ProposalError(f'fixed layer index {layer!r} is not one of the {num_layers} '
                          f'searchable layers')
    if not (isinstance(op, (int, np.integer)) and 0 <= op < num_ops and mask[layer, op]):
      raise ProposalError(f'op index {op!r} is not a candidate of searchable layer {layer} '
                          f'({cost_tables.layer_names[layer]})')
    offset += full[:, layer, op]
  free = np.array([l for l in range(num_layers) if l not in fixed], dtype=np.int32)
  return free, full[:, free], mask[free], offset


def space_maxima(tables, mask, offset):
  """M_i of Eqn 4-5: the largest cost the (restricted) space reaches, per resource."""
  return reachable_range(tables, mask, offset)[1]


def architecture_costs(indices, tables, offset):
  """Exact float64 costs [n, R] of op indices [n, L] (numpy; for evaluation)."""
  indices = np.asarray(indices)
  tables = np.asarray(tables, np.float64)
  rows = np.arange(tables.shape[1])
  return tables[:, rows, indices].sum(axis=-1).T + np.asarray(offset, np.float64)


def argmax_architectures(thetas, mask):
  """The most probable op of every layer of every proposal, [m, L] (numpy; any tau)."""
  return np.argmax(np.where(np.asarray(mask, bool), np.asarray(thetas), -np.inf), axis=-1)


def diversity(thetas, mask):
  """How different the proposals are, from their most probable architectures.

  Returns mean_hamming (mean over proposal pairs of the fraction of layers whose argmax op
  differs), distinct_architectures and mean_ops_per_layer (distinct argmax ops across
  proposals, averaged over layers).
  """
  best = argmax_architectures(thetas, mask)  # [m, L]
  m = best.shape[0]
  pairs = [(i, j) for i in range(m) for j in range(i + 1, m)]
  hamming = float(np.mean([np.mean(best[i] != best[j]) for i, j in pairs])) if pairs else 0.0
  return dict(mean_hamming=hamming,
              distinct_architectures=len({tuple(b) for b in best}),
              mean_ops_per_layer=float(np.mean([len(set(best[:, l]))
                                                for l in range(best.shape[1])]))
              if best.shape[1] else 0.0)


def full_indices(free, fixed: Mapping[int, int], free_indices):
  """Op indices of the whole space [n, L] from those of the free layers [n, Lf]."""
  free_indices = np.asarray(free_indices)
  out = np.zeros(free_indices.shape[:-1] + (len(free) + len(fixed),), np.int32)
  out[..., free] = free_indices
  for layer, op in fixed.items():
    out[..., layer] = op
  return out


# --------------------------------------------------------------------------------------------
# CLI.


def parse_fix(text: str | None, space: spaces.SearchSpace) -> dict[int, int]:
  """'layer2_1=k5e6,layer3_1=k5e6' -> {searchable layer index: op index}."""
  if not text:
    return {}
  fixed = {}
  names = space.searchable_names
  for item in text.split(','):
    item = item.strip()
    if not item:
      continue
    layer, sep, op = (s.strip() for s in item.partition('='))
    if not sep or not layer or not op:
      raise ProposalError(f'--fix takes layer=op pairs separated by commas, got {item!r}')
    if layer not in names:
      raise ProposalError(f'--fix: no searchable layer {layer!r} in space {space.name} '
                          f'(layers {names[0]} to {names[-1]})')
    li = names.index(layer)
    allowed = space.searchable_layers[li].ops
    if op not in allowed:
      raise ProposalError(f'--fix: op {op!r} is not a candidate of {layer}; allowed: '
                          f'{", ".join(allowed)}')
    if li in fixed and fixed[li] != space.op_names.index(op):
      raise ProposalError(f'--fix: layer {layer} is given twice')
    fixed[li] = space.op_names.index(op)
  return fixed


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line and exit 2, instead of usage + message
    sys.stderr.write(f'{self.prog}: error: {message}\n')
    sys.exit(2)


def _positive_int(text):
  value = int(text)
  if value < 1:
    raise ValueError(text)
  return value


_positive_int.__name__ = 'positive integer'


def _seed(text):
  value = int(text)
  if not 0 <= value < 2 ** 32:
    raise ValueError(text)
  return value


_seed.__name__ = 'seed (0 to 2**32 - 1)'


def _decay(text):
  value = float(text)
  if not 0 < value <= 1:
    raise ValueError(text)
  return value


_decay.__name__ = 'decay in (0, 1]'


def _finite_float(text):
  value = float(text)
  if not math.isfinite(value):
    raise ValueError(text)
  return value


_finite_float.__name__ = 'number'


def build_parser() -> argparse.ArgumentParser:
  p = _Parser(prog='python -m hournas_jax.proposals',
              description='Optimise HourNAS space proposals for params/FLOPs targets.')
  p.add_argument('--space', default='fbnet', help=f'one of {", ".join(spaces.SPACE_NAMES)}')
  p.add_argument('--params', type=_finite_float, help='target parameters, e.g. 4.8e6')
  p.add_argument('--flops', type=_finite_float, help='target FLOPs (multiply-adds), e.g. 300e6')
  p.add_argument('--proposals', type=_positive_int, default=8, help='m, number of proposals')
  p.add_argument('--resolution', type=_positive_int, default=224)
  p.add_argument('--classes', type=_positive_int, default=1000)
  p.add_argument('--width', type=_finite_float, default=1.0)
  p.add_argument('--seed', type=_seed, default=0)
  p.add_argument('--iterations', type=_positive_int, default=DEFAULT_ITERATIONS,
                 help='optimisation steps; tau ends at 5 * tau_decay**iterations')
  p.add_argument('--tau-decay', type=_decay, default=DEFAULT_TAU_DECAY,
                 help='tau multiplier per step (the default takes tau from 5 to 1 in '
                      f'{DEFAULT_ITERATIONS} steps)')
  p.add_argument('--samples', type=_positive_int, default=10000,
                 help='architectures drawn to evaluate the proposals')
  p.add_argument('--fix', help='fixed layers, e.g. layer2_1=k5e6,layer3_1=k5e6')
  p.add_argument('--json', action='store_true', help='last stdout line: a JSON summary')
  p.add_argument('--plot', help='write Figure 3 (samples at several temperatures) to FILE.png')
  return p


def run(space: spaces.SearchSpace, targets: Sequence[float | None], *, num_proposals=8,
        seed=0, iterations=DEFAULT_ITERATIONS, tau_decay=DEFAULT_TAU_DECAY, samples=10000,
        fixed: Mapping[int, int] | None = None, plot: str | None = None) -> dict:
  """Optimises and evaluates proposals; returns the summary the CLI prints.

  The space's supernet-fixed layers (EfficientNet's layer1_1) are fixed as the search fixes
  them, unless `fixed` names them.
  """
  fixed = {**{space.searchable_names.index(layer): space.op_names.index(op)
              for layer, op in space.supernet_fixed.items()}, **dict(fixed or {})}
  if plot and not os.path.isdir(os.path.dirname(os.path.abspath(plot))):
    raise ProposalError(f'cannot write the plot {plot!r}: its folder does not exist')
  table = costs.cost_tables(space)
  free, tables, mask, offset = restrict_tables(table, fixed)
  if len(free) == 0:
    raise ProposalError('every searchable layer is fixed: nothing is left to search')
  active = np.array([t is not None for t in targets])
  if not active.any():
    raise ProposalError('give at least one target: --params and/or --flops')
  target_values = np.array([t if t is not None else 0.0 for t in targets], np.float64)
  label = space.name + (f' with {len(fixed)} fixed layer{"s" * (len(fixed) > 1)}' if fixed
                        else '')
  check_targets(tables, mask, offset, target_values, active, label)
  maxima = space_maxima(tables, mask, offset)

  key = jax.random.PRNGKey(seed)
  opt_key, sample_key = jax.random.split(key)
  # Wall time is the bar; CPU time (all threads) tells a busy machine from a slow program.
  start, cpu_start = time.perf_counter(), time.process_time()
  thetas, final_tau = optimize_proposals(opt_key, tables, mask, offset, target_values, maxima,
                                         active, num_proposals=num_proposals,
                                         iterations=iterations, tau_decay=tau_decay)
  thetas = jax.block_until_ready(thetas)
  seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
  final_tau = float(final_tau)

  pi_logits = jnp.zeros(num_proposals)  # uniform pi, as at the start of the search
  chosen, indices = sample_two_level(sample_key, thetas, pi_logits, final_tau,
                                     jnp.asarray(mask), n=samples)
  chosen, indices = np.asarray(chosen), np.asarray(indices)
  sample_costs = architecture_costs(indices, tables, offset)
  ok = within_targets(sample_costs, target_values, active)

  expected = np.asarray(expected_cost(thetas, jnp.asarray(tables, jnp.float32),
                                      jnp.asarray(offset, jnp.float32), final_tau,
                                      jnp.asarray(mask)), np.float64)
  best = argmax_architectures(thetas, mask)
  best_full = full_indices(free, fixed, best)
  per_proposal = []
  for k in range(num_proposals):
    mine = chosen == k
    per_proposal.append(dict(
        expected_params=float(expected[k, 0]), expected_flops=float(expected[k, 1]),
        within_5pct=float(ok[mine].mean()) if mine.any() else None,
        argmax_ops=[space.op_names[i] for i in best_full[k]]))
  low, high = reachable_range(tables, mask, offset)
  summary = dict(
      space=space.name, resolution=space.resolution, classes=space.num_classes,
      width=space.width, proposals=num_proposals, iterations=iterations, seed=seed,
      tau_decay=tau_decay,
      targets=dict(params=targets[0], flops=targets[1]),
      fixed={space.searchable_names[l]: space.op_names[o] for l, o in sorted(fixed.items())},
      reachable=dict(params=[float(low[0]), float(high[0])], flops=[float(low[1]),
                                                                   float(high[1])]),
      final_tau=final_tau, seconds=seconds, cpu_seconds=cpu_seconds, samples=samples,
      within_5pct=float(ok.mean()),
      distinct_sampled=len({tuple(r) for r in indices}),
      sampled_params=dict(mean=float(sample_costs[:, 0].mean()),
                          std=float(sample_costs[:, 0].std())),
      sampled_flops=dict(mean=float(sample_costs[:, 1].mean()),
                         std=float(sample_costs[:, 1].std())),
      diversity=diversity(thetas, mask),
      per_proposal=per_proposal)
  if plot:
    plot_figure3(plot, thetas, mask, tables, offset, target_values, active, final_tau,
                 sample_key, samples, space.name)
    summary['plot'] = plot
  return summary


def plot_figure3(path, thetas, mask, tables, offset, targets, active, final_tau, key,
                 samples, space_name, taus=(5.0, 2.0, 1.0, 0.2)):
  """Figure 3: sampled architectures' params (M) against FLOPs (M) at falling temperatures:
  `taus` and the final tau of the optimisation (marked), one panel each."""
  from hournas_jax import analysis  # pylint: disable=g-import-not-at-top  (analysis imports this)

  taus = sorted({float(t) for t in taus if not math.isclose(t, final_tau, rel_tol=0.01)}
                | {final_tau}, reverse=True)
  m = thetas.shape[0]
  fig, axes = analysis.new_figure(1, len(taus), figsize=(4 * len(taus), 4), sharex=True,
                                  sharey=True)
  for ax, tau in zip(np.atleast_1d(axes), taus):
    _, idx = sample_two_level(key, thetas, jnp.zeros(m), tau, jnp.asarray(mask), n=samples)
    c = architecture_costs(np.asarray(idx), tables, offset) / 1e6
    share = within_targets(c * 1e6, targets, active).mean()
    ax.scatter(c[:, 0], c[:, 1], s=2, alpha=0.3, color='tab:blue', rasterized=True)
    if active[0]:
      ax.axvline(targets[0] / 1e6, color='tab:red', ls='--', lw=1)
    if active[1]:
      ax.axhline(targets[1] / 1e6, color='tab:red', ls='--', lw=1)
    if active.all():  # the +-5% box around the targets
      lo, hi = (1 - TOLERANCE) * targets / 1e6, (1 + TOLERANCE) * targets / 1e6
      ax.add_patch(analysis.rectangle((lo[0], lo[1]), hi[0] - lo[0], hi[1] - lo[1],
                                      fill=False, edgecolor='tab:red', lw=1))
    final = ' (final)' if tau == final_tau else ''
    ax.set_title(f'tau = {tau:.3g}{final}: {share:.1%} within 5%')
    ax.set_xlabel('params (M)')
  np.atleast_1d(axes)[0].set_ylabel('FLOPs (M)')
  fig.suptitle(f'{samples} architectures sampled from {m} space proposals ({space_name})')
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def _print_summary(s: dict) -> None:
  t = s['targets']
  shown = ', '.join(f'{k} {_millions(v)}' for k, v in (('params', t['params']),
                                                        ('FLOPs', t['flops'])) if v is not None)
  print(f'space {s["space"]} ({s["resolution"]}px, {s["classes"]} classes, width '
        f'{s["width"]}); targets: {shown}; {s["proposals"]} proposals, {s["iterations"]} '
        f'iterations, final tau {s["final_tau"]:.4g}')
  if s['fixed']:
    print('fixed: ' + ', '.join(f'{l}={o}' for l, o in s['fixed'].items()))
  print(f'{"proposal":>8} {"E[params]":>10} {"E[FLOPs]":>10} {"within 5%":>10}')
  for k, p in enumerate(s['per_proposal']):
    w = '-' if p['within_5pct'] is None else f'{p["within_5pct"]:.1%}'
    print(f'{k:>8} {_millions(p["expected_params"], 2):>10} {_millions(p["expected_flops"]):>10} '
          f'{w:>10}')
  d = s['diversity']
  print(f'diversity: {d["distinct_architectures"]} distinct argmax architectures, '
        f'{d["mean_hamming"]:.0%} of layers differ between two proposals on average, '
        f'{d["mean_ops_per_layer"]:.1f} distinct ops per layer')
  sp, sf = s['sampled_params'], s['sampled_flops']
  print(f'{s["within_5pct"]:.1%} of {s["samples"]} architectures (uniform pi, final tau) within '
        f'5% of every target ({s["distinct_sampled"]} distinct); sampled params '
        f'{_millions(sp["mean"], 2)} +- {_millions(sp["std"], 2)}, FLOPs '
        f'{_millions(sf["mean"])} +- {_millions(sf["std"])}')
  print(f'optimisation took {s["seconds"]:.2f} s (compile included; '
        f'{s["cpu_seconds"]:.2f} s of CPU time)')
  if s.get('plot'):
    print(f'wrote {s["plot"]}')


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    space = spaces.get_space(args.space, resolution=args.resolution, num_classes=args.classes,
                             width=args.width)
    fixed = parse_fix(args.fix, space)
    summary = run(space, (args.params, args.flops), num_proposals=args.proposals,
                  seed=args.seed, iterations=args.iterations, tau_decay=args.tau_decay,
                  samples=args.samples, fixed=fixed, plot=args.plot)
  except (spaces.SpaceError, ProposalError, ValueError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  _print_summary(summary)
  if args.json:
    print(json.dumps(summary))
  return 0


if __name__ == '__main__':
  sys.exit(main())
