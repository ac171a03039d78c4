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
The cost tables they work on (restricted to the searched layers, with the reachable range and
the target checks) are `costs.py`'s.

Resources are stacked in the order of `CostTables.stacked()`: index 0 params, index 1 FLOPs.
Everything but the numpy helpers is pure and jittable. Temperatures follow
`sampling.py`: samples come from softmax(theta / tau), so lowering tau sharpens them (the
search's 'relaxed' reading samples at tau = 1 instead).

The command-line tool that optimises and evaluates proposals alone is `tools/proposals.py`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hournas_jax import costs, sampling

RESOURCE_NAMES = costs.RESOURCE_NAMES

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
TOLERANCE = costs.TOLERANCE


class ProposalError(costs.TargetError):
  """A command-line value the proposals tool cannot use."""


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


def mean_entropy(theta, tau, mask):
  """The entropy of softmax(theta / tau) per layer over its allowed ops, as a share of the
  largest it can be (log of the allowed count; layers with one op count 0), averaged over
  layers: 0 for one-hot rows, 1 for uniform ones. theta [..., L, O] -> [...]."""
  p = sampling.probabilities(theta, tau, mask)
  # 0 log 0 = 0, with a finite gradient: masked ops and underflowed ones.
  used = mask & (p > 0)
  entropy = -jnp.sum(jnp.where(used, p * jnp.log(jnp.where(used, p, 1.0)), 0.0), axis=-1)
  allowed = jnp.sum(mask, axis=-1)
  largest = jnp.log(jnp.maximum(allowed, 2).astype(entropy.dtype))
  return jnp.mean(jnp.where(allowed > 1, entropy / largest, 0.0), axis=-1)


def _optimize(key, tables, mask, offset, targets, maxima, active, *, num_proposals, iterations,
              samples_per_step, candidates_per_proposal, screen_samples, learning_rate, tau0,
              tau_decay, init_std, tolerance, entropy_weight):
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
    loss = jnp.mean(resource_loss(a, tables, offset, targets, maxima, active))
    # Among proposals that meet the targets, prefer the least decided: Eqn 5 alone is
    # minimised by a point mass, and a proposal that always samples one op in a layer leaves
    # the search nothing to learn there (its straight-through gradient vanishes).
    return loss - entropy_weight * mean_entropy(theta, tau, mask)

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
                       entropy_weight=0.0, return_losses=False):
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
      tolerance=tolerance, entropy_weight=jnp.float32(entropy_weight))
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
