"""When a search takes its weight steps and its architecture steps, and at what rate and tau.

`Schedule` is pure: it maps the state's counters to what the iteration they point at does.
'interleaved' takes one D_val architecture step after every `val_every` D_tr weight steps;
'epoch' is Algorithm 1 as written: each epoch, a full pass of weight steps over D_tr, then a
full pass of architecture steps over D_val. Either way a stage's length is its number of weight
steps; with 'epoch' the stage ends after the architecture pass that follows its last weight
pass, a partial last epoch getting a proportional pass (at least one step). The weights' learning
rate follows a cosine over each stage's weight steps; tau decays once an iteration.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

from hournas_jax import sampling

STAGE_NAMES = ('vital', 'nonvital')
# config search.val_every = 0: the 80/20 split of D_tr and D_val, one D_val batch per 4 D_tr.
SPLIT_VAL_EVERY = 4


def cosine(base_lr: float, step: int, total: int) -> float:
  """The cosine schedule from `base_lr` to 0 over `total` steps, at `step`."""
  return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


@dataclasses.dataclass(frozen=True)
class Schedule:
  """The iterations of a search.

  kind: 'interleaved' or 'epoch'; stage_steps: {'vital', 'nonvital'}: each stage's weight steps
  (0 for a skipped stage); steps_per_epoch: (D_tr, D_val) batches an epoch ('epoch' only);
  val_every: weight steps per architecture step ('interleaved'); arch_warmup: the share of each
  stage's weight steps before architecture steps start; tau0, tau_decay: the temperature's
  schedule; weight_lr: the weights' peak learning rate.
  """
  kind: str
  stage_steps: Mapping[str, int]
  steps_per_epoch: tuple[int, int]
  val_every: int
  arch_warmup: float
  tau0: float
  tau_decay: float
  weight_lr: float

  @classmethod
  def from_config(cls, cfg, vital_steps: int, nonvital_steps: int,
                  steps_per_epoch: tuple[int, int]) -> 'Schedule':
    """The schedule of config.search `cfg` with the stages' weight steps (the vital stage's
    are dropped without search.vital_priority) and the data's (D_tr, D_val) steps an epoch."""
    return cls(kind=cfg.schedule,
               stage_steps={'vital': int(vital_steps) if cfg.vital_priority else 0,
                            'nonvital': int(nonvital_steps)},
               steps_per_epoch=(int(steps_per_epoch[0]), int(steps_per_epoch[1])),
               val_every=int(cfg.val_every) or SPLIT_VAL_EVERY,
               arch_warmup=float(cfg.arch_warmup), tau0=float(cfg.tau0),
               tau_decay=float(cfg.tau_decay), weight_lr=float(cfg.weight_lr))

  def _partial_val_steps(self, weight_steps: int) -> int:
    """Architecture steps after a partial epoch of `weight_steps`: the same share of D_val."""
    tr, val = self.steps_per_epoch
    return max(1, round(weight_steps * val / tr))

  def stage_iterations(self, stage: str) -> int:
    """Iterations (calls of `Searcher.train_step`) of a stage."""
    weight_steps = self.stage_steps[stage]
    if self.kind == 'interleaved' or weight_steps == 0:
      return weight_steps
    tr, val = self.steps_per_epoch
    full, rest = divmod(weight_steps, tr)
    return full * (tr + val) + (rest + self._partial_val_steps(rest) if rest else 0)

  @property
  def total_steps(self) -> int:
    """Iterations of the whole search."""
    return sum(self.stage_iterations(s) for s in STAGE_NAMES)

  def position(self, stage: str, counters: Mapping[str, int]) -> tuple[bool, bool, int]:
    """(takes a D_tr batch, takes a D_val batch, weight steps taken so far in the stage) of the
    iteration the counters {step, tr_step, val_step, stage_step} point at."""
    i = int(counters['stage_step'])
    if self.kind == 'interleaved':
      return True, (int(counters['tr_step']) + 1) % self.val_every == 0, i
    tr, val = self.steps_per_epoch
    full = self.stage_steps[stage] // tr
    epoch, j = divmod(i, tr + val)
    weight_steps = tr
    if epoch >= full:  # the partial last epoch
      epoch, j = full, i - full * (tr + val)
      weight_steps = self.stage_steps[stage] - full * tr
    weight_step = j < weight_steps
    return weight_step, not weight_step, epoch * tr + min(j, weight_steps)

  def warming_up(self, stage: str, stage_weight_steps: int) -> bool:
    """Whether architecture steps still wait (the first arch_warmup share of the stage's
    weight steps)."""
    return stage_weight_steps < self.arch_warmup * self.stage_steps[stage]

  def tau_at(self, step: int):
    """The temperature at iteration `step`."""
    return sampling.temperature(int(step), self.tau0, self.tau_decay)

  def weight_lr_at(self, stage: str, stage_weight_steps: int) -> float:
    """The weights' learning rate after `stage_weight_steps` weight steps of `stage`."""
    return cosine(self.weight_lr, stage_weight_steps, self.stage_steps[stage])
