"""The 'export' mode: config.export checked, the workdir's model exported to <workdir>/export.

`check_config` checks config.export once (one ExportError line) and returns its fields parsed;
`run(setup)` exports the workdir's trained model, compared on its dataset's eval split (or
config.train.arch with fresh weights, compared on random inputs).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

from hournas_jax import arch as arch_lib
from hournas_jax import checkpoint
from hournas_jax import logging_utils
from hournas_jax import mesh as mesh_lib
from hournas_jax import retrain
from hournas_jax import setup as setup_lib
from hournas_jax.export import base, model as model_lib, report, tflite


class Settings(NamedTuple):
  """config.export, parsed (configs/default.py describes the fields)."""
  formats: list[str]
  precisions: list[str]
  threads: list[int]
  warmup: int
  repeats: int
  examples: int
  calibration_examples: int


def parse_threads(text, field: str = 'threads') -> list[int]:
  """The distinct thread counts (each >= 1) of a comma-separated list; ExportError naming
  `field` otherwise."""
  try:
    threads = [int(t) for t in str(text).split(',') if t.strip()]
  except ValueError:
    threads = []
  if not threads or min(threads) < 1:
    raise base.ExportError(f'{field} must be comma-separated thread counts >= 1, got {text!r}')
  return list(dict.fromkeys(threads))


def check_config(ecfg) -> Settings:
  """Checks config.export; raises ExportError naming the first field that cannot be used.

  Args:
    ecfg: config.export, with every field of configs/default.py's export section.

  Returns:
    Its fields, parsed.
  """
  examples, calibration = int(ecfg.examples), int(ecfg.calibration_examples)
  warmup, repeats = int(ecfg.warmup), int(ecfg.repeats)
  if examples < 2 or warmup < 0 or repeats < 1 or calibration < 1:
    raise base.ExportError('config.export.examples must be >= 2, calibration_examples and '
                           'repeats >= 1, warmup >= 0')
  return Settings(
      formats=report.parse_list(ecfg.formats, report.FORMATS, 'config.export.formats'),
      precisions=report.parse_list(ecfg.tflite_precision, tflite.PRECISIONS,
                                   'config.export.tflite_precision'),
      threads=parse_threads(ecfg.threads, 'config.export.threads'),
      warmup=warmup, repeats=repeats, examples=examples, calibration_examples=calibration)


def load_workdir_model(setup: setup_lib.Setup,
                       calibration_examples: int) -> tuple[base.Model, bool]:
  """The model the 'export' mode exports.

  Args:
    setup: the run's setup.
    calibration_examples: for fresh weights, the number of random inputs their BatchNorm
      statistics come from.

  Returns:
    (model, trained): the trained model of <workdir>/train when there is one, else the
    architecture of config.train.arch (or the workdir's arch.json) with fresh weights.
  """
  config = setup.config
  run_dir = os.path.join(setup.workdir, 'train')
  checkpoints = retrain.RunPaths(run_dir).checkpoints
  trained = False
  if os.path.isdir(checkpoints):
    with checkpoint.Checkpointer(checkpoints, keep=config.keep_checkpoints) as ckpt:
      trained = ckpt.latest_step() is not None
  if trained:
    return _trained_model(setup, run_dir), True
  spec = config.train.arch
  if spec:
    ops = arch_lib.resolve(spec, setup.space).ops
  elif os.path.exists(os.path.join(setup.workdir, 'arch.json')):
    spec = os.path.join(setup.workdir, 'arch.json')
    ops = arch_lib.load(spec, setup.space).ops
  else:
    raise base.ExportError(f'nothing to export in {setup.workdir}: no trained model in '
                           f'{run_dir} and no architecture (set --config.train.arch to a preset, '
                           'a JSON file or comma-separated ops, or train one first)')
  logging_utils.info(f'[export] no trained model in {run_dir}: exporting architecture {spec} '
                     f'with FRESH (untrained) weights, seed {config.seed}, BatchNorm statistics '
                     f'of {calibration_examples} random inputs')
  calibration = model_lib.random_inputs(setup.image_shape, calibration_examples,
                                        model_lib.CALIBRATION_SEED)
  return model_lib.network_model(setup.space, ops, image_shape=setup.image_shape,
                                 seed=config.seed, calibration=calibration, info={
                                     'source': 'fresh weights', 'arch': spec,
                                     'seed': int(config.seed)}), False


def _trained_model(setup: setup_lib.Setup, run_dir: str) -> base.Model:
  config = setup.config
  trainer, state, meta = retrain.load_model(setup, run_dir)
  setup_lib.check_model_data(setup, meta, run_dir)
  step = int(mesh_lib.to_host(state['step']))
  variables = mesh_lib.to_host(trainer.eval_variables(state))
  model = model_lib.network_model(trainer.space, meta['ops'], variables,
                                  image_shape=meta['image_shape'], info={
      'source': 'trained', 'run_dir': os.path.abspath(run_dir), 'step': step,
      'total_steps': int(meta['total_steps']), 'dataset': meta.get('dataset'),
      'weights': 'ema' if trainer.ema_decay else 'weights'})
  logging_utils.info(f'[export] the trained model of {run_dir} (step {step} of '
                     f'{meta["total_steps"]}): {",".join(meta["ops"])}')
  if config.train.arch and list(arch_lib.resolve(config.train.arch, setup.space).ops) != list(
      meta['ops']):
    logging_utils.info(f'[export] note: config.train.arch={config.train.arch!r} is not the '
                       'trained architecture; exporting the trained one')
  return model


def _dataset_inputs(setup: setup_lib.Setup, split: str, count: int) -> np.ndarray:
  """The first `count` images [count, H, W, C] of a split, unaugmented (padding dropped)."""
  batches = setup.batches(split, count, seed=0, train=False, on_mesh=False)
  batch = next(iter(batches))
  images = np.asarray(batch['image'], np.float32)
  if 'mask' in batch:
    images = images[np.asarray(batch['mask']) > 0]
  return images


def run(setup: setup_lib.Setup) -> dict:
  """The 'export' mode: exports the workdir's model to <workdir>/export (see the module doc);
  returns the report."""
  settings = check_config(setup.config.export)
  report.require(settings.formats)  # before any slow work
  model, trained = load_workdir_model(setup, settings.calibration_examples)
  inputs, source, representative = None, 'random normal', None
  if trained:
    inputs = _dataset_inputs(setup, 'eval', settings.examples)
    source = f'{setup.dataset} eval split, first {len(inputs)} examples'
    if 'int8' in settings.precisions and 'tflite' in settings.formats:
      representative = _dataset_inputs(setup, 'train', settings.calibration_examples)
  else:  # the inputs the fresh weights' BatchNorm statistics come from
    representative = model_lib.random_inputs(model.image_shape, settings.calibration_examples,
                                             model_lib.CALIBRATION_SEED)
  return report.export_model(
      model, os.path.join(setup.workdir, 'export'), formats=settings.formats,
      precisions=settings.precisions, inputs=inputs, inputs_source=source,
      representative=representative, threads=settings.threads, warmup=settings.warmup,
      repeats=settings.repeats, examples=settings.examples)
