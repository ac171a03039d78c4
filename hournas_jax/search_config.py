"""The search section of a config (config.search): the values each field may take, and
`check_config`, which checks every field a search reads once, before anything is built.
"""

from __future__ import annotations

import math

from hournas_jax import blocks, engines, final_selection, sampling, weight_sampling
from hournas_jax.search_problem import SearchError

# 'none': every candidate owns its weights (the paper, FBNet); 'nested': a layer's candidates
# share kernels, smaller ones being slices of the largest (blocks.SharedKernels).
WEIGHT_SHARING = ('none', 'nested')
SCHEDULES = ('interleaved', 'epoch')
TEMPERATURES = sampling.TAU_MODES
# How the architecture parameters get their gradient from the D_val loss: 'straight_through'
# (the paper: d loss / d A through the straight-through sample) or 'reinforce' (score function).
ARCH_GRADIENTS = ('straight_through', 'reinforce')
VITAL_INITS = ('uniform', 'targets')
SAMPLERS = tuple(engines.DEFAULT_ENGINE)
# Which paths a weight step trains (the SuperNet training recipe, `weight_sampling.py`):
# 'distribution' = one path from theta / Theta / pi (the paper), 'uniform', 'strict_fair',
# 'sandwich'.
WEIGHT_SAMPLINGS = weight_sampling.RECIPES
# How the result is read from the final distribution (`final_selection.py`).
FINAL_SELECTIONS = final_selection.SELECTIONS


def check_config(cfg) -> None:
  """Checks config.search (`cfg`), every field a search reads, before anything is built.

  Raises:
    SearchError: one line naming the first field that cannot be used and what it may be.
  """
  def need(ok: bool, message: str):
    if not ok:
      raise SearchError(f'config.search.{message}')

  def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)

  for key, allowed in (('sampler', SAMPLERS), ('precision', blocks.PRECISIONS),
                       ('schedule', SCHEDULES), ('temperature', TEMPERATURES),
                       ('weight_sharing', WEIGHT_SHARING), ('arch_gradient', ARCH_GRADIENTS),
                       ('vital_init', VITAL_INITS), ('weight_sampling', WEIGHT_SAMPLINGS),
                       ('final_selection', FINAL_SELECTIONS)):
    need(cfg[key] in allowed, f'{key} must be one of {", ".join(allowed)}, got {cfg[key]!r}')
  need(cfg.batch_size > 0, f'batch_size must be > 0, got {cfg.batch_size!r}')
  for key in ('vital_epochs', 'nonvital_epochs', 'vital_steps', 'nonvital_steps', 'val_every',
              'proposal_iterations'):
    need(cfg[key] >= 0, f'{key} must be >= 0, got {cfg[key]!r}')
  need(isinstance(cfg.final_candidates, int) and cfg.final_candidates >= 1,
       f'final_candidates must be an integer >= 1, got {cfg.final_candidates!r}')
  need(cfg.num_proposals >= 1, f'num_proposals must be >= 1, got {cfg.num_proposals!r}')
  need(finite(cfg.proposal_entropy) and cfg.proposal_entropy >= 0,
       f'proposal_entropy must be >= 0 (0 = Eqn 5 alone), got {cfg.proposal_entropy!r}')
  need(finite(cfg.weight_lr) and cfg.weight_lr > 0,
       f'weight_lr must be > 0, got {cfg.weight_lr!r}')
  need(finite(cfg.arch_lr) and cfg.arch_lr >= 0,
       f'arch_lr must be >= 0 (0 = the architecture never moves), got {cfg.arch_lr!r}')
  need(finite(cfg.alpha) and cfg.alpha >= 0, f'alpha must be >= 0, got {cfg.alpha!r}')
  need(finite(cfg.arch_warmup) and 0 <= cfg.arch_warmup < 1,
       f'arch_warmup must be in [0, 1), got {cfg.arch_warmup!r}')
  need(finite(cfg.tau0) and cfg.tau0 > 0, f'tau0 must be > 0, got {cfg.tau0!r}')
  need(finite(cfg.tau_decay) and 0 < cfg.tau_decay <= 1,
       f'tau_decay must be in (0, 1], got {cfg.tau_decay!r}')
  try:
    engine_class = engines.engine_class(cfg.engine, cfg.sampler)
  except ValueError as e:
    raise SearchError(f'config.{e}') from None
  need(cfg.arch_gradient != 'reinforce' or engine_class.runs == 'path',
       f"arch_gradient 'reinforce' needs a sampled path (config.search.sampler 'gumbel_max'), "
       f"got sampler {cfg.sampler!r}; use 'straight_through' with it")
  name = next(n for n, c in engines.ENGINES.items() if c is engine_class)
  need(cfg.weight_sampling == 'distribution' or name == 'single_path',
       f"weight_sampling {cfg.weight_sampling!r} trains paths of its own choosing on the "
       f"'single_path' engine only, got engine {name!r}; set config.search.engine=single_path "
       f"(sampler 'gumbel_max') or weight_sampling 'distribution'")
  need(cfg.final_selection == 'mode' or name == 'single_path',
       f"final_selection 'inherited' evaluates paths with the 'single_path' engine's weights, "
       f"got engine {name!r}; set config.search.engine=single_path or final_selection 'mode'")
