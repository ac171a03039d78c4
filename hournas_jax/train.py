"""The driver: `train_and_evaluate(config, workdir)` runs a config's mode in a workdir.

Modes (config.mode):
- 'search': the two HourNAS stages (vital blocks, then non-vital blocks under the space
  proposals), then the result: arch.json, summary.txt and plots in the workdir; then, with
  config.retrain_after_search, retraining of the found architecture (workdir/train) and, with
  config.random_baseline, a comparison with random architectures of the same budget
  (workdir/baseline, comparison.json).
- 'train': trains config.train.arch from scratch ('' = the workdir's arch.json, a preset name,
  a JSON file or comma-separated ops), and the random baseline when configured.
- 'eval': loads the trained model(s) saved in the workdir and evaluates them.
- 'masking', 'sensitivity', 'saturation': the block-importance analyses of the paper's
  Figure 2, Appendix A and Appendix B (`importance_modes.py`; config.analysis).
- 'export': writes the workdir's trained model (or config.train.arch with fresh weights) as
  jax.export, TFLite and ONNX files, each checked against JAX (`export/`; config.export).

Workdir layout:
    config.json         the resolved config of the latest run (rewritten by every run)
    fingerprint.json    the fields that matter, per phase; a run of another config is refused
    search/checkpoints  orbax checkpoints of the search state
    search/history.jsonl  the distributions the search samples from (theta_vital; pi and the
                        leading proposal), one line per progress line
    arch.json, summary.txt, theta.png, pi.png, proposals.png   the search result
    train/checkpoints, train/results.json     retraining of the searched (or given) arch
    baseline/population.jsonl, comparison.json   the searched architecture and random ones
                        of its budget, trained with several seeds (config.baseline)
    eval_results.json   written by 'eval' mode
    masking.json/png, sensitivity.json/png (+ sensitivity/population.jsonl),
    saturation.json/png (+ train/snapshots)   written by the analysis modes
    tensorboard/<phase> event files
Every run continues from the latest complete checkpoint of the phase it is in, so a killed run
restarted with the same command ends as an uninterrupted one would.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Sequence

from hournas_jax import baseline
from hournas_jax import checkpoint
from hournas_jax import evaluate
from hournas_jax import export
from hournas_jax import importance_modes
from hournas_jax import mesh as mesh_lib
from hournas_jax import retrain
from hournas_jax import search
from hournas_jax import search_phase
from hournas_jax import setup as setup_lib


def _search_then_train(setup: setup_lib.Setup) -> dict:
  result = search_phase.run(setup)
  summary = {'search': result}
  if setup.config.retrain_after_search:
    ops = [result['ops'][name] for name in setup.space.searchable_names]
    summary.update(_train_phases(setup, ops))
  return summary


def _train(setup: setup_lib.Setup) -> dict:
  return _train_phases(setup, setup_lib.resolve_architecture(setup))


def _train_phases(setup: setup_lib.Setup, ops: Sequence[str]) -> dict:
  start = time.time()
  results = {'train': retrain.run(setup, os.path.join(setup.workdir, 'train'), ops,
                                  phase='train')}
  if setup.config.random_baseline:
    # The retraining is the comparison's member (ops, config.seed) when their recipes agree.
    results['comparison'] = baseline.compare_with_random(
        setup, ops, retrained={**results['train'], 'wall_s': time.time() - start})
  return results


# config.mode -> what runs it; each returns a summary dict (also what it wrote to disk).
MODES: dict[str, Callable[[setup_lib.Setup], dict]] = {
    'search': _search_then_train,
    'train': _train,
    'eval': evaluate.run,
    'masking': importance_modes.run_masking,
    'sensitivity': importance_modes.run_sensitivity,
    'saturation': importance_modes.run_saturation,
    'export': export.run,
}


def validate_config(config) -> None:
  """Checks every field of a config, section by section; raises a UserError naming the first
  field that cannot be used."""
  setup_lib.check(config.mode in MODES, f'config.mode must be one of {", ".join(MODES)}, got '
                  f'{config.mode!r}')
  setup_lib.check_config(config)
  search.check_config(config.search)
  retrain.check_config(config.train)
  baseline.check_config(config.baseline)
  importance_modes.check_config(config.analysis)
  export.check_config(config.export)


def train_and_evaluate(config, workdir: str) -> dict:
  """Runs config.mode in workdir; returns a summary dict (also what was written to disk)."""
  validate_config(config)
  mesh_lib.maybe_initialize_distributed(config.distributed)
  setup_lib.configure_jax(config)
  workdir = checkpoint.prepare_workdir(workdir)
  with checkpoint.workdir_lock(workdir):
    setup = setup_lib.resolve_setup(config, workdir)
    setup_lib.write_config(setup)
    return MODES[config.mode](setup)

