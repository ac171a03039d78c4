"""How well a trained SuperNet ranks architectures (the search's ranking diagnostic).

A one-shot search can only pick good architectures if the accuracy an architecture gets with
weights inherited from the SuperNet orders architectures as their stand-alone accuracy does
(Yu et al. 2020; Li and Talwalkar 2019). `inherited_accuracy` evaluates one path of a trained
SuperNet with its BatchNorm statistics recalibrated on training batches; `kendall_tau` and
`spearman_rho` compare two orderings, `regret` says what picking the SuperNet's first costs, and
`seed_agreement` how well the ground truth's training seeds agree with each other (its noise).
"""

from __future__ import annotations

import itertools
from typing import Iterable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from hournas_jax import mesh as mesh_lib


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
  """Kendall's tau-b between two rankings of the same items (ties in either count as neither
  concordant nor discordant, and shrink the normaliser as tau-b does). nan for < 2 items."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.shape != y.shape or x.ndim != 1:
    raise ValueError(f'kendall_tau needs two 1-d sequences of one length, got {x.shape} and '
                     f'{y.shape}')
  if len(x) < 2:
    return float('nan')
  i, j = np.triu_indices(len(x), k=1)
  dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
  pairs_x, pairs_y = np.count_nonzero(dx), np.count_nonzero(dy)
  if pairs_x == 0 or pairs_y == 0:
    return float('nan')
  return float(np.sum(dx * dy) / np.sqrt(pairs_x * pairs_y))


def average_ranks(x: Sequence[float]) -> np.ndarray:
  """Ranks 1..n of `x` in ascending order, tied values sharing the mean of their ranks."""
  x = np.asarray(x, np.float64)
  order = np.argsort(x, kind='stable')
  ranks = np.empty(len(x), np.float64)
  ranks[order] = np.arange(1, len(x) + 1)
  for value in np.unique(x):
    tied = x == value
    ranks[tied] = ranks[tied].mean()
  return ranks


def spearman_rho(x: Sequence[float], y: Sequence[float]) -> float:
  """Spearman's rho: the Pearson correlation of the average ranks of x and y. nan for < 2 items
  or when either is constant."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.shape != y.shape or x.ndim != 1:
    raise ValueError(f'spearman_rho needs two 1-d sequences of one length, got {x.shape} and '
                     f'{y.shape}')
  if len(x) < 2:
    return float('nan')
  rx, ry = average_ranks(x) - (len(x) + 1) / 2, average_ranks(y) - (len(y) + 1) / 2
  norm = np.sqrt(np.sum(rx * rx) * np.sum(ry * ry))
  return float(np.sum(rx * ry) / norm) if norm > 0 else float('nan')


def regret(predicted: Sequence[float], truth: Sequence[float]) -> float:
  """The best true score minus the true score of the item `predicted` ranks first (the first of
  those it ties at the top): what choosing by the prediction loses."""
  predicted, truth = np.asarray(predicted, np.float64), np.asarray(truth, np.float64)
  if predicted.shape != truth.shape or predicted.ndim != 1 or not len(truth):
    raise ValueError(f'regret needs two non-empty 1-d sequences of one length, got '
                     f'{predicted.shape} and {truth.shape}')
  return float(truth.max() - truth[int(np.argmax(predicted))])


def seed_agreement(scores) -> float:
  """The mean Kendall tau between the rankings of every two training seeds, `scores` [items,
  seeds]: how far one seed's ranking predicts another's, a ceiling on what a SuperNet's
  ranking of single trainings can reach. nan with fewer than 2 seeds."""
  scores = np.asarray(scores, np.float64)
  if scores.ndim != 2 or scores.shape[1] < 2:
    return float('nan')
  taus = [kendall_tau(scores[:, i], scores[:, j])
          for i, j in itertools.combinations(range(scores.shape[1]), 2)]
  return float(np.nanmean(taus)) if not np.all(np.isnan(taus)) else float('nan')


def path_of(space, ops: Sequence[str]) -> dict:
  """{layer: op} of an architecture given as one op per searchable layer."""
  return dict(zip(space.searchable_names, ops))


def inherited_accuracy(engine, state, path: Mapping[str, str], calibration: Iterable,
                       evaluation: Iterable) -> float:
  """Top-1 of `path` with the SuperNet's weights (single-path engine state), BatchNorm
  statistics recalibrated on the `calibration` batches; `evaluation` batches carry 'image',
  'label' and optionally 'mask' (padding rows)."""
  state = engine.recalibrate(state, (b['image'] for b in calibration), path)
  correct = total = 0.0
  for batch in evaluation:
    logits = engine.logits(state, batch['image'], path)
    hits = (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)
    mask = batch.get('mask', jnp.ones_like(hits))
    correct += float(mesh_lib.to_host(jnp.sum(hits * mask)))
    total += float(mesh_lib.to_host(jnp.sum(mask)))
  if not total:
    raise ValueError('the evaluation batches hold no examples')
  return correct / total


def take(batches: Iterable, count: int) -> list:
  """The first `count` batches of an iterator, as a list (reused for every architecture)."""
  return list(itertools.islice(batches, count))
