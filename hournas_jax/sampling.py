"""Gumbel-Max sampling of architectures (Eqn 3) with a straight-through estimator.

theta has shape [..., L, O]: one row of logits per searchable layer, columns in the space's op
order; `mask` [L, O] marks the ops a layer allows. All functions are pure and jittable.

Temperature. The paper follows FBNet and "adds the temperature tau on z for sharpening the
distribution progressively" (tau from 5.0, times 0.9999 an iteration). Taken literally, dividing
z = theta + g by tau leaves argmax(z) -- the sample -- unchanged, so two readings are offered
(`tau_mode`, the search's `search.temperature`):
- 'logits' (the default): tau divides theta. Samples come from softmax(theta / tau), lowering tau
  sharpens them, as Figure 3 shows; the straight-through gradient is that of
  softmax(theta / tau + g).
- 'relaxed' (FBNet's literal reading): the sample is argmax(theta + g), from softmax(theta) at
  every tau; tau acts only in the relaxed softmax((theta + g) / tau) that carries the
  straight-through gradient.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

_MASKED = -1e30  # a logit no Gumbel noise can lift to the argmax
TAU_MODES = ('logits', 'relaxed')


def check_tau_mode(tau_mode: str) -> None:
  if tau_mode not in TAU_MODES:
    raise ValueError(f'tau_mode must be one of {", ".join(TAU_MODES)}, got {tau_mode!r}')


def temperature(step, tau0: float = 5.0, decay: float = 0.9999):
  """tau after `step` iterations of the paper's schedule."""
  return tau0 * decay ** step


def gumbel_noise(key, shape, dtype=jnp.float32):
  """Gumbel(0, 1) noise drawn flat and reshaped: XLA:CPU compiles a flat draw in ~0.3 s and a
  3-4 dimensional one in 5-15 s (jax's partitionable threefry)."""
  return jax.random.gumbel(key, (math.prod(shape),), dtype).reshape(shape)


def masked_logits(theta, tau, mask=None):
  logits = theta / tau
  return logits if mask is None else jnp.where(mask, logits, _MASKED)


def sampling_tau(tau, tau_mode: str = 'logits'):
  """The temperature the samples themselves are drawn at: tau, or 1 when tau only relaxes."""
  check_tau_mode(tau_mode)
  return tau if tau_mode == 'logits' else 1.0


def probabilities(theta, tau=1.0, mask=None, tau_mode='logits'):
  """The distribution Gumbel-Max samples from over allowed ops: softmax(theta / tau), or
  softmax(theta) at any tau with tau_mode 'relaxed'."""
  return jax.nn.softmax(masked_logits(theta, sampling_tau(tau, tau_mode), mask), axis=-1)


def gumbel_max(key, theta, tau=1.0, mask=None, tau_mode='logits'):
  """One architecture per row of theta.

  Returns (indices [..., L] int32, a [..., L, O]): `a` is one-hot in value (up to rounding),
  and its gradient is that of softmax(theta / tau + g) ('logits') or softmax((theta + g) / tau)
  ('relaxed'), the straight-through estimator, so the loss of the sampled path sends gradients
  to every logit of each layer.
  """
  return straight_through(gumbel_noise(key, theta.shape, theta.dtype), theta, tau, mask,
                          tau_mode)


def straight_through(noise, theta, tau=1.0, mask=None, tau_mode='logits'):
  """`gumbel_max` with its Gumbel noise given (for loops that draw all their noise up front)."""
  check_tau_mode(tau_mode)
  if tau_mode == 'logits':
    z = masked_logits(theta, tau, mask) + noise
    relaxed = z
  else:
    # The masked logit stays hopeless after the division: -1e30 / tau is still far below any
    # allowed entry for the temperatures of a search.
    z = masked_logits(theta, 1.0, mask) + noise
    relaxed = z / tau
  indices = jnp.argmax(z, axis=-1).astype(jnp.int32)
  hard = jax.nn.one_hot(indices, theta.shape[-1], dtype=theta.dtype)
  soft = jax.nn.softmax(relaxed, axis=-1)
  return indices, hard + soft - jax.lax.stop_gradient(soft)


def gumbel_softmax(key, theta, tau=1.0, mask=None):
  """FBNet's relaxed weights softmax((theta + g) / tau), for the all-candidates ablation."""
  z = (theta + gumbel_noise(key, theta.shape, theta.dtype)) / tau
  if mask is not None:
    z = jnp.where(mask, z, _MASKED)
  return jax.nn.softmax(z, axis=-1)


def argmax_ops(theta, mask=None):
  """The highest-probability op of every layer: how an architecture is derived at the end."""
  return jnp.argmax(masked_logits(theta, 1.0, mask), axis=-1).astype(jnp.int32)
