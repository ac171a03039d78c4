"""Which paths a SuperNet weight step trains: the SuperNet training recipes of config
search.weight_sampling, as pure path samplers.

- 'distribution' (the default, the paper's): one path drawn from the distribution the
  architecture learns (theta, or Theta and pi); the stage samples it, not this module.
- 'uniform' (SPOS, Guo et al. 2020): one path, each layer's op uniform over its allowed
  candidates, whatever the architecture parameters say.
- 'strict_fair' (FairNAS, Chu et al. 2021): n paths, n the largest number of candidates of a
  layer, that together take every candidate of every layer once (a layer with fewer
  candidates takes each of them at least once, and no candidate twice more often than another);
  their gradients are summed into one update, so every candidate gets one gradient a step.
- 'sandwich' (BigNAS, Yu et al. 2020; AttentiveNAS): the largest path, the smallest path and
  `SANDWICH_RANDOM` uniform ones; the largest learns from the labels and the others from its
  soft predictions (in-place distillation), their gradients summed into one update.

A sampler maps (key, mask [L, O] of the allowed ops, op sizes [L, O]) to op indices [n, L], row
i the i-th path; `distills` says whether row 0 teaches the others. The architecture steps are
not affected: they always sample from theta. Layers here are the stage's choice layers, columns
the space's op order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

RECIPES = ('distribution', 'uniform', 'strict_fair', 'sandwich')
SANDWICH_RANDOM = 2  # uniform paths of a sandwich step besides the largest and the smallest


def _allowed(mask) -> np.ndarray:
  mask = np.asarray(mask, bool)
  if mask.ndim != 2 or not mask.any(axis=-1).all():
    raise ValueError(f'mask must be [layers, ops] with an allowed op in every layer, got '
                     f'shape {mask.shape}')
  return mask


def uniform_paths(key, mask, n: int = 1):
  """[n, L]: n paths, each layer's op uniform over the ops `mask` allows, drawn independently."""
  mask = _allowed(mask)
  u = jax.random.uniform(key, (n, *mask.shape))
  return jnp.argmax(jnp.where(mask, u, -1.0), axis=-1).astype(jnp.int32)


def strict_fair_paths(key, mask):
  """[n, L], n = the largest number of allowed ops of a layer: in each layer a random order of
  its allowed ops, repeated when the layer has fewer than n (so each appears once, or
  floor / ceil of n / k times in a layer of k ops)."""
  mask = _allowed(mask)
  counts = mask.sum(axis=-1)  # [L]
  n = int(counts.max(initial=1))
  u = jax.random.uniform(key, mask.shape)
  # Allowed ops first, in random order: position j of layer l takes order[l, j mod k_l].
  order = jnp.argsort(jnp.where(mask, u, 2.0), axis=-1)  # [L, O]
  slots = jnp.arange(n)[:, None] % jnp.asarray(counts)[None, :]  # [n, L]
  return jnp.take_along_axis(order.T, slots, axis=0).astype(jnp.int32)


def extreme_path(mask, sizes, largest: bool) -> np.ndarray:
  """[L]: each layer's largest (or smallest) allowed op by `sizes` [L, O] (first on ties)."""
  mask = _allowed(mask)
  sizes = np.asarray(sizes, np.float64)
  if largest:
    return np.argmax(np.where(mask, sizes, -np.inf), axis=-1).astype(np.int32)
  return np.argmin(np.where(mask, sizes, np.inf), axis=-1).astype(np.int32)


def sandwich_paths(key, mask, sizes, randoms: int = SANDWICH_RANDOM):
  """[2 + randoms, L]: the largest path, the smallest path, then `randoms` uniform paths."""
  ends = np.stack([extreme_path(mask, sizes, True), extreme_path(mask, sizes, False)])
  return jnp.concatenate([jnp.asarray(ends), uniform_paths(key, mask, randoms)], axis=0)


def sample_paths(recipe: str, key, mask, sizes):
  """[n, L]: the paths one weight step of `recipe` trains (not 'distribution', which samples
  from the architecture parameters)."""
  if recipe == 'uniform':
    return uniform_paths(key, mask)
  if recipe == 'strict_fair':
    return strict_fair_paths(key, mask)
  if recipe == 'sandwich':
    return sandwich_paths(key, mask, sizes)
  raise ValueError(f'no path sampler for weight_sampling {recipe!r}; samplers: '
                   f'{", ".join(r for r in RECIPES if r != "distribution")}')


def distills(recipe: str) -> bool:
  """Whether the first path of a step teaches the others (in-place distillation)."""
  return recipe == 'sandwich'


def op_sizes(tables, rows) -> np.ndarray:
  """[L, O] sizes of the ops of searchable layers `rows` that 'largest' and 'smallest' mean:
  FLOPs, ties broken by params (a fraction below one FLOP)."""
  rows = np.asarray(rows, int)
  params = np.asarray(tables.params, np.float64)[rows]
  flops = np.asarray(tables.flops, np.float64)[rows]
  return flops + params / (params.max(initial=0.0) + 1.0)
