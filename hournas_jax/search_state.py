"""The whole state of a search, as arrays (a pytree) and JSON-able meta: what a checkpoint holds.

Every random draw of a search is keyed by (seed, step), and which batches a step takes follows
from the counters, so a search restored from these two parts goes on as the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from hournas_jax.engines import base as engine_base

STAGES = ('vital', 'nonvital', 'done')
COUNTERS = ('step', 'tr_step', 'val_step', 'stage_step')


@dataclasses.dataclass(frozen=True)
class SearchState:
  """The whole search state: arrays (`arrays()`, a pytree) and JSON-able meta (`meta()`).

  weights: the stage's SuperNet state (`engines.EngineState`: {'params', 'batch_stats',
  'opt_state'}, each {layer: {op}}); arch / arch_opt: the stage's architecture parameters
  ({'theta'} in the vital stage, {'thetas', 'pi'} after it) and their Adam state; key: the run's
  PRNG key data; arch_baseline: the REINFORCE baseline (None with straight-through gradients);
  stage (one of STAGES), vital_ops ({layer: op} fixed by stage 1), theta_vital (stage 1's final
  theta, kept for the report), counters {step, tr_step, val_step, stage_step} and the seed.
  """
  weights: engine_base.EngineState
  arch: Any
  arch_opt: Any
  key: Any
  stage: str
  counters: Mapping[str, int]
  seed: int
  vital_ops: Mapping[str, str] = dataclasses.field(default_factory=dict)
  theta_vital: list | None = None
  arch_baseline: Any = None

  @property
  def step(self) -> int:
    return int(self.counters['step'])

  def replace(self, **changes) -> 'SearchState':
    return dataclasses.replace(self, **changes)

  def arrays(self) -> dict:
    out = {'weights': self.weights, 'arch': self.arch, 'arch_opt': self.arch_opt,
           'key': self.key}
    if self.arch_baseline is not None:
      out['arch_baseline'] = self.arch_baseline
    return out

  def meta(self) -> dict:
    """The JSON side of a checkpoint."""
    stage = {'stage': self.stage, 'vital_ops': dict(self.vital_ops)}
    if self.theta_vital is not None:
      stage['theta_vital'] = self.theta_vital
    return {'meta': stage, 'counters': {k: int(self.counters[k]) for k in COUNTERS},
            'seed': int(self.seed)}

  @classmethod
  def from_parts(cls, arrays: Mapping[str, Any], meta: Mapping[str, Any]) -> 'SearchState':
    """The state saved as `arrays` and `meta` (see `arrays` and `meta`)."""
    stage = meta['meta']
    return cls(weights=arrays['weights'], arch=arrays['arch'], arch_opt=arrays['arch_opt'],
               key=arrays['key'], arch_baseline=arrays.get('arch_baseline'),
               stage=stage['stage'], vital_ops=dict(stage.get('vital_ops') or {}),
               theta_vital=stage.get('theta_vital'),
               counters={k: int(meta['counters'][k]) for k in COUNTERS},
               seed=int(meta['seed']))
