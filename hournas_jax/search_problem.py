"""What a search is asked to find: the space, its cost tables, the targets and what they allow.

`SearchProblem` is built once per search (`build`) from the space, the search config and the
targets, and is what the stages (`stages.py`) read: which layers are searched and which are
fixed, the targets and which of them are set, what the layers other than the vital ones can
still add, and the settings of the samplers and the resource term. Building it refuses targets
no architecture can meet, before any training.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from hournas_jax import costs, errors, proposals, spaces, vital


class SearchError(errors.UserError, ValueError):
  """A search that cannot run (impossible targets, bad settings) or go on."""


@dataclasses.dataclass(frozen=True)
class SearchProblem:
  """The search's space, costs and targets, and the settings the stages sample and learn with.

  tables: the space's cost tables (R resources, L searchable layers, O ops); targets [R] and
  active [R]: each resource's target and whether it is set (> 0); maxima [R]: the largest cost
  the space reaches with the fixed layers as they are (M_i of Eqn 4-5); others_range: (lowest
  [R], highest [R]) cost of everything but the vital blocks; op_mask [L, O]: the allowed ops;
  fixed_ops {layer: op}: the space's supernet-fixed layers; vital_names / vital_rows: the vital
  blocks to search and their rows [V] in the tables. The rest are config search fields.
  """
  space: spaces.SearchSpace
  tables: costs.CostTables
  targets: np.ndarray
  active: np.ndarray
  maxima: np.ndarray
  others_range: tuple[np.ndarray, np.ndarray]
  op_mask: np.ndarray
  fixed_ops: Mapping[str, str]
  vital_names: tuple[str, ...]
  vital_rows: np.ndarray
  vital_priority: bool
  sampler: str
  tau_mode: str
  vital_init: str
  alpha: float
  num_proposals: int
  proposal_iterations: int
  proposal_entropy: float

  @property
  def relaxed(self) -> bool:
    """Whether the samples are Gumbel-softmax weights over every candidate (the ablation)."""
    return self.sampler == 'gumbel_softmax'

  @property
  def named_targets(self) -> dict[str, float | None]:
    """{config.targets field: target, None where not set}, one per resource of the tables."""
    return {key: float(t) if on else None
            for key, t, on in zip(self.tables.target_keys, self.targets, self.active)}

  def fixed_indices(self, vital_ops: Mapping[str, str]) -> dict[int, int]:
    """{searchable layer index: op index} of the supernet-fixed layers and `vital_ops`."""
    fixed = {**self.fixed_ops, **vital_ops}
    return {self.space.searchable_names.index(n): self.space.op_names.index(op)
            for n, op in fixed.items()}

  def fitted_proposals(self, key, tables, mask, offset, num_proposals: int, tau):
    """m space proposals fitted to the targets (Eqn 5) on restricted `tables`, `mask`,
    `offset`, scaled for this search's sampler at temperature `tau`."""
    thetas, final_tau = proposals.optimize_proposals(
        key, tables, mask, offset, self.targets, self.maxima, self.active,
        num_proposals=int(num_proposals),
        iterations=self.proposal_iterations or proposals.DEFAULT_ITERATIONS,
        entropy_weight=self.proposal_entropy)
    if self.tau_mode == 'logits':
      # The proposals were fitted so that softmax(theta / final_tau) meets the targets; the
      # search samples at its own tau, so rescale theta to keep theta / tau, and with it the
      # fitted distribution, as it is at `tau`.
      return thetas * (tau / float(final_tau))
    # Samples come from softmax(theta) whatever tau is, so the search's tau must not enter;
    # theta / final_tau is the fitted distribution itself (final_tau is 1 by default).
    return thetas / float(final_tau)


def build(space: spaces.SearchSpace, cfg, targets,
          tables: costs.CostTables | None = None) -> SearchProblem:
  """The problem of searching `space` for `targets` with the search config `cfg`.

  Args:
    space: the search space.
    cfg: config.search (checked by `search.check_config`).
    targets: config.targets: .params, .flops and .latency_ms, 0 = no target (latency needs
      `tables` with a latency table).
    tables: the space's cost tables; `costs.cost_tables(space)` when None.

  Returns:
    The problem.

  Raises:
    SearchError: no target is set, a latency target has no table, or no choice of the vital
      blocks leaves the targets within reach of the other layers.
    costs.TargetError: a target no architecture of the space reaches.
  """
  tables = costs.cost_tables(space) if tables is None else tables
  values = {key: float(targets[key]) for key in costs.TARGET_KEYS}
  if values['latency_ms'] > 0 and not tables.has_latency:
    raise SearchError('targets.latency_ms needs a latency table (targets.latency_table)')
  target_values = np.array([values[key] for key in tables.target_keys])
  active = target_values > 0
  if not active.any():
    raise SearchError('set at least one of targets.params, targets.flops and '
                      'targets.latency_ms (> 0)')
  fixed_ops = dict(space.supernet_fixed)
  vital_names = tuple(n for n in vital.vital_layers(space) if n not in fixed_ops)
  vital_rows = np.array([space.searchable_names.index(n) for n in vital_names], int)
  # The targets, and what the layers other than the vital ones can add.
  fixed = {space.searchable_names.index(n): space.op_names.index(op)
           for n, op in fixed_ops.items()}
  free, restricted, mask, offset = costs.restrict_tables(tables, fixed)
  costs.check_targets(restricted, mask, offset, target_values, active, space.name)
  # The vital choice must keep the targets inside what the layers searched after it (and the
  # fixed ones) can add.
  others = np.array([l not in vital_rows for l in free], bool)
  problem = SearchProblem(
      space=space, tables=tables, targets=target_values, active=active,
      maxima=costs.space_maxima(restricted, mask, offset),
      others_range=costs.reachable_range(restricted[:, others], mask[others], offset),
      op_mask=space.op_mask(), fixed_ops=fixed_ops, vital_names=vital_names,
      vital_rows=vital_rows, vital_priority=bool(cfg.vital_priority), sampler=cfg.sampler,
      tau_mode=cfg.temperature, vital_init=cfg.vital_init, alpha=float(cfg.alpha),
      num_proposals=int(cfg.num_proposals), proposal_iterations=int(cfg.proposal_iterations),
      proposal_entropy=float(cfg.proposal_entropy))
  if problem.vital_priority and vital_names:
    allowed = np.where(problem.op_mask[vital_rows], 0.0, -np.inf)
    if costs.best_reachable_choice(allowed, tables.stacked()[:, vital_rows],
                                   *problem.others_range, problem.targets, active) is None:
      shown = ', '.join(f'{name} {costs.show(i, t, 3)}' for i, (name, t, on) in
                        enumerate(zip(tables.resource_names, problem.targets, active)) if on)
      raise SearchError(f'no choice of the vital blocks ({", ".join(vital_names)}) of space '
                        f'{space.name} leaves the targets ({shown}) within reach of the other '
                        'layers, so the vital stage could not end; change the targets or set '
                        'search.vital_priority=False')
  return problem
