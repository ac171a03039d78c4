"""How the searched architecture is read from the final distribution (search.final_selection).

'mode' (the paper): the leading proposal's most probable op in each layer, or its most probable
draw within the targets when the mode misses them.

'inherited' (as SPOS and Once-for-All choose): the distribution's `final_candidates` most
probable distinct architectures within the targets, each scored by its top-1 on D_val with the
weights it inherits from the SuperNet (BatchNorm statistics recalibrated on D_tr batches, since
the shared statistics belong to no single path); the best scoring one is kept, ties going to
the more probable. This lets the SuperNet decide the layers the distribution left open, where
the mode would follow the proposals' prior.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple, Sequence

import numpy as np

from hournas_jax import arch as arch_lib
from hournas_jax import ranking

SELECTIONS = ('mode', 'inherited')
# D_tr batches each candidate's BatchNorm statistics are recalibrated on.
CALIBRATION_BATCHES = 20


class Scored(NamedTuple):
  """One candidate of the final choice: the architecture and its inherited-weight top-1."""
  architecture: arch_lib.Architecture
  inherited_top1: float


def score(engine, weights, space, candidates: Sequence[arch_lib.Architecture],
          calibration: Iterable, evaluation: Iterable) -> list[Scored]:
  """Each candidate's top-1 on the `evaluation` batches with the SuperNet's weights.

  Args:
    engine: the single-path engine the weights belong to (`recalibrate`, `logits`).
    weights: the engine's state (params and BatchNorm statistics).
    space: the search space the candidates belong to.
    candidates: architectures of the space.
    calibration: D_tr batches ({'image'}) that set each path's BatchNorm statistics.
    evaluation: D_val batches ({'image', 'label', optionally 'mask'}).

  Returns:
    One `Scored` per candidate, in the candidates' order.
  """
  calibration, evaluation = list(calibration), list(evaluation)
  return [Scored(a, ranking.inherited_accuracy(engine, weights, ranking.path_of(space, a.ops),
                                               calibration, evaluation))
          for a in candidates]


def best(scored: Sequence[Scored]) -> int:
  """The index of the highest inherited top-1 (the first, i.e. most probable, among ties)."""
  if not scored:
    raise ValueError('no candidate to choose from')
  return int(np.argmax([s.inherited_top1 for s in scored]))
