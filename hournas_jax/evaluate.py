"""'eval' mode: evaluates the trained model(s) saved in a workdir on the config's test set.

Writes <workdir>/eval_results.json ({phase: {top1, top5, loss, examples, step, ops}}).
"""

from __future__ import annotations

import os

import jax

from hournas_jax import checkpoint
from hournas_jax import logging_utils
from hournas_jax import mesh as mesh_lib
from hournas_jax import retrain
from hournas_jax import setup as setup_lib

# The runs of a workdir that hold a trained model.
PHASES = ('train',)


def run(setup: setup_lib.Setup) -> dict:
  """Evaluates each phase's latest checkpoint; returns what eval_results.json holds."""
  results = {}
  for phase in PHASES:
    run_dir = os.path.join(setup.workdir, phase)
    trainer, state, meta = retrain.load_model(setup, run_dir, phase)
    setup_lib.check_model_data(setup, meta, run_dir)
    step = int(mesh_lib.to_host(state['step']))
    if step < int(meta['total_steps']):
      logging_utils.info(f'[eval] note: the {phase} run stopped at step {step} of '
                         f'{meta["total_steps"]}; evaluating that checkpoint')
    batches = retrain.eval_batches(setup, setup.config.train.eval_batch_size)
    out = trainer.evaluate(state, batches)
    out.update({'step': step, 'ops': meta['ops']})
    results[phase] = out
    logging_utils.info(f'[eval] {phase}: top-1 {100 * out["top1"]:.2f}%  top-5 '
                       f'{100 * out["top5"]:.2f}%  loss {out["loss"]:.4f} '
                       f'({out["examples"]} examples, step {step})')
  if jax.process_index() == 0:
    checkpoint.atomic_write_json(os.path.join(setup.workdir, 'eval_results.json'), results)
  return results
