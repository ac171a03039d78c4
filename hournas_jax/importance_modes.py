"""The block-importance analyses as main.py modes: they read and train models in a workdir and
write their numbers (JSON) and pictures (PNG) there.

- 'masking': the trained model of <workdir>/train, one block masked at a time
  (masking.json, masking.png). With no trained model there, it first trains
  config.train.arch (or the workdir's searched arch.json) as --config.mode=train would.
- 'sensitivity': the grid of config.analysis (backbones x blocks x candidate ops), each model
  trained on its own with config.train, resumable in <workdir>/sensitivity/population.jsonl;
  sensitivity.json and sensitivity.png are redrawn as models finish, so an interrupted grid
  still has its picture of whatever is done.
- 'saturation': trains config.train.arch in <workdir>/train keeping weight snapshots
  (config.train.snapshot_every_epochs), then Eqn 7 per layer (saturation.json,
  saturation.png).
"""

from __future__ import annotations

import os
import time

import numpy as np

from hournas_jax import analysis
from hournas_jax import arch as arch_lib
from hournas_jax import checkpoint, importance, logging_utils, population, retrain
from hournas_jax import setup as setup_lib
from hournas_jax import snapshots as snapshots_lib

TRAIN_PHASE = 'train'
# The sensitivity picture is redrawn at most this often while the grid trains.
REDRAW_EVERY_S = 20.0


def check_config(a) -> None:
  """config.analysis: raises setup.ConfigError naming the field that cannot be used."""
  setup_lib.check(a.mask_draws >= 1 and a.seeds >= 1 and a.workers >= 0,
                  'config.analysis.mask_draws and analysis.seeds must be >= 1 and '
                  'analysis.workers >= 0')
  try:
    importance.parse_probabilities(a.mask_probabilities)
  except importance.AnalysisError as e:
    raise setup_lib.ConfigError(f'config.analysis.{e}') from None


def _is_primary() -> bool:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index() == 0


def _write_json(path: str, obj) -> None:
  if _is_primary():
    checkpoint.atomic_write_json(path, obj)


# --------------------------------------------------------------------------------------------
# The model an analysis looks at.


def _requested_ops(setup: setup_lib.Setup) -> tuple[str, ...] | None:
  spec = setup.config.train.arch
  return tuple(arch_lib.resolve(spec, setup.space).ops) if spec else None


def trained_model(setup: setup_lib.Setup):
  """(trainer, state, meta) of the finished training in <workdir>/train.

  With none finished there, trains config.train.arch (or the searched arch.json) first,
  continuing a stopped training. A model of another architecture than
  config.train.arch asks for, or of other data, is refused.
  """
  run_dir = os.path.join(setup.workdir, TRAIN_PHASE)
  requested = _requested_ops(setup)
  if not os.path.exists(retrain.RunPaths(run_dir).results):
    has_search = os.path.exists(os.path.join(setup.workdir, 'arch.json'))
    if requested is None and not has_search:
      raise importance.AnalysisError(
          f'no trained model in {setup.workdir}: train one there first (--config.mode=train '
          'or search), or set --config.train.arch to a preset, a JSON file or comma-separated '
          'ops to train here')
    ops = list(requested) if requested is not None else setup_lib.resolve_architecture(setup)
    retrain.run(setup, run_dir, ops, phase=TRAIN_PHASE)
  trainer, state, meta = retrain.load_model(setup, run_dir, TRAIN_PHASE)
  if requested is not None and tuple(meta['ops']) != requested:
    raise importance.AnalysisError(
        f'the model in {run_dir} is {",".join(meta["ops"])}, but config.train.arch asks for '
        f'{",".join(requested)}; use another workdir, or leave config.train.arch empty to '
        'analyse the model that is there')
  setup_lib.check_model_data(setup, meta, run_dir)
  return trainer, state, meta


# --------------------------------------------------------------------------------------------
# Channel masking (Figure 2).


def run_masking(setup: setup_lib.Setup) -> dict:
  a = setup.config.analysis
  space = setup.space
  block_names = importance.parse_names(
      a.blocks, importance.maskable_blocks(space), 'block in config.analysis.blocks',
      'the head is not masked: its output is the logits')
  probabilities = importance.parse_probabilities(a.mask_probabilities)
  trainer, state, meta = trained_model(setup)
  plan = importance.mask_plan(space, block_names, probabilities, int(a.mask_draws),
                              int(setup.config.seed))
  logging_utils.info(f'[masking] {len(block_names)} blocks x {len(probabilities)} '
                     f'probabilities x {a.mask_draws} draws = {len(plan)} evaluations of '
                     f'{",".join(meta["ops"])}')
  start = time.time()
  accuracies = importance.masked_accuracies(
      trainer.net, trainer.eval_variables(state),
      retrain.eval_batches(setup, setup.config.train.eval_batch_size), plan, space.num_classes,
      setup.mesh)
  summary = importance.summarize_masking(space, meta['ops'], plan, accuracies)
  summary.update({'ops': list(meta['ops']), 'model': os.path.join(setup.workdir, TRAIN_PHASE),
                  'seed': int(setup.config.seed), 'wall_s': time.time() - start})
  json_path = os.path.join(setup.workdir, 'masking.json')
  png_path = os.path.join(setup.workdir, 'masking.png')
  _write_json(json_path, summary)
  if _is_primary():
    analysis.plot_masking(png_path, summary)
  logging_utils.info(masking_text(summary))
  logging_utils.info(f'[masking] wrote {json_path} and {png_path}')
  return summary


def masking_text(summary) -> str:
  keys = [f'{p:g}' for p in summary['probabilities']]
  lines = [f'[masking] unmasked top-1 {100 * summary["reference_top1"]:.2f}%, chance '
           f'{100 * summary["chance"]["majority_class"]:.2f}% (majority class); top-1 (%) '
           'with one block masked, mean over draws:',
           f'  {"block":<10} {"op":<7} {"vital":<5} ' + ' '.join(f'{"p=" + k:>7}' for k in keys)]
  for r in summary['blocks']:
    lines.append(f'  {r["block"]:<10} {r["op"]:<7} {"yes" if r["vital"] else "":<5} '
                 + ' '.join(f'{100 * r["top1"][k]["mean"]:>7.2f}' for k in keys))
  for group in ('vital', 'non_vital'):
    drops = summary['mean_drop'][group]
    lines.append(f'  mean drop, {group.replace("_", "-")} blocks: '
                 + ', '.join(f'p={k}: {100 * drops[k]:.2f}' for k in keys))
  return '\n'.join(lines)


# --------------------------------------------------------------------------------------------
# Block sensitivity (Appendix A, Figure 4).


def sensitivity_members(setup: setup_lib.Setup):
  """(grid, members) of the slice config.analysis asks for."""
  a = setup.config.analysis
  space = setup.space
  block_names = importance.parse_names(a.blocks, space.searchable_names,
                                       'block in config.analysis.blocks')
  backbones = importance.parse_names(a.backbones, space.op_names,
                                     'op in config.analysis.backbones')
  candidates = importance.parse_names(a.candidate_ops, space.op_names,
                                      'op in config.analysis.candidate_ops')
  grid = importance.sensitivity_grid(space, backbones, block_names, candidates)
  members = [population.Member(m.ops, seed, f'{m.backbone}:{m.block}={m.op}')
             for m in grid for seed in range(int(a.seeds))]
  return grid, members


def run_sensitivity(setup: setup_lib.Setup) -> dict:
  grid, members = sensitivity_members(setup)
  directory = os.path.join(setup.workdir, 'sensitivity')
  json_path = os.path.join(setup.workdir, 'sensitivity.json')
  png_path = os.path.join(setup.workdir, 'sensitivity.png')
  distinct = len({m.ops for m in grid})
  logging_utils.info(f'[sensitivity] {len(grid)} grid cells ({distinct} distinct networks) x '
                     f'{setup.config.analysis.seeds} seeds; finished ones in '
                     f'{os.path.join(directory, population.FILENAME)} are not trained again')
  last_draw = [0.0]

  def write(final: bool) -> dict:
    records = population.Store(directory).done(population.recipe_fingerprint(setup))
    wanted = {(m.ops, m.seed) for m in members}
    finished = [r for key, r in records.items() if key in wanted]
    means = {ops: v[0] for ops, v in population.mean_by_architecture(finished).items()}
    summary = {'backbones': importance.summarize_sensitivity(setup.space, grid, means),
               'models': len(grid), 'finished': sum(m.ops in means for m in grid),
               'seeds': int(setup.config.analysis.seeds), 'complete': final}
    _write_json(json_path, summary)
    if _is_primary() and means:
      analysis.plot_sensitivity(png_path, summary['backbones'])
    last_draw[0] = time.time()
    return summary

  def on_record(_):
    if time.time() - last_draw[0] >= REDRAW_EVERY_S:
      write(final=False)

  write(final=False)
  try:
    workers = population.default_workers(int(setup.config.analysis.workers))
    population.train_population(setup, members, directory, workers=workers,
                                log_prefix='[sensitivity]', on_record=on_record)
  except BaseException:
    write(final=False)  # an interrupted grid leaves the picture of what finished
    raise
  summary = write(final=True)
  logging_utils.info(sensitivity_text(summary))
  logging_utils.info(f'[sensitivity] wrote {json_path} and {png_path}')
  return summary


def sensitivity_text(summary) -> str:
  lines = ['[sensitivity] std of top-1 over each block\'s ops (%), mean over vital and '
           'non-vital blocks, per backbone:']
  for backbone, s in summary['backbones'].items():
    m = s['mean_std']
    lines.append(f'  {backbone:<8} vital {100 * m["vital"]:.2f}  non-vital '
                 f'{100 * m["non_vital"]:.2f}')
  return '\n'.join(lines)


# --------------------------------------------------------------------------------------------
# Saturation (Appendix B, Eqn 7).


def run_saturation(setup: setup_lib.Setup) -> dict:
  run_dir = os.path.join(setup.workdir, TRAIN_PHASE)
  paths = retrain.RunPaths(run_dir)
  if not os.path.exists(paths.results) and setup.config.train.snapshot_every_epochs <= 0:
    raise importance.AnalysisError(
        'saturation needs weight snapshots: set --config.train.snapshot_every_epochs to a '
        'positive number of epochs (configs/analysis_saturation.py keeps one per epoch)')
  _, _, meta = trained_model(setup)
  snapshots = snapshots_lib.load(paths.snapshots)
  steps = [s for s, _ in snapshots]
  total = int(meta['total_steps'])
  if not steps or steps[0] != 0 or steps[-1] != total:
    raise importance.AnalysisError(
        f'the training in {run_dir} kept no complete set of weight snapshots (it needs step 0 '
        f'and the last step {total}, found {len(steps)}); train in a fresh workdir with '
        '--config.train.snapshot_every_epochs set')
  space = setup.space
  names = [l.name for l in space.layers]
  weights = [importance.layer_weights(params, [n for n in names if n in params])
             for _, params in snapshots]
  curves = importance.saturation(weights)
  epochs = [s / int(meta['steps_per_epoch']) for s in steps]
  op_of = dict(zip(space.searchable_names, meta['ops']))
  vital_set = set(importance.vital_blocks(space))
  rows = []
  for name in names:
    if name not in curves:
      continue
    rows.append({'layer': name, 'op': op_of.get(name, space.layer(name).ops[0]),
                 'vital': name in vital_set, 'curve': curves[name],
                 'epochs_to_0.9': importance.epochs_to_reach(epochs, curves[name], 0.9),
                 'mean_saturation': float(np.mean(curves[name]))})
  groups = {}
  for group, is_vital in (('vital', True), ('non_vital', False)):
    chosen = [r for r in rows if r['vital'] == is_vital]
    groups[group] = {key: _finite_mean([r[key] for r in chosen])
                     for key in ('epochs_to_0.9', 'mean_saturation')}
  summary = {'ops': list(meta['ops']), 'epochs': epochs, 'steps': steps, 'layers': rows,
             'groups': groups}
  json_path = os.path.join(setup.workdir, 'saturation.json')
  png_path = os.path.join(setup.workdir, 'saturation.png')
  _write_json(json_path, summary)
  if _is_primary():
    analysis.plot_saturation(png_path, epochs, rows)
  logging_utils.info('[saturation] ' + '; '.join(
      f'{g.replace("_", "-")} layers: C reaches 0.9 at epoch {v["epochs_to_0.9"]:.2f} on '
      f'average, mean C over training {v["mean_saturation"]:.3f}' for g, v in groups.items()))
  logging_utils.info(f'[saturation] wrote {json_path} and {png_path}')
  return summary


def _finite_mean(values) -> float:
  finite = [v for v in values if np.isfinite(v)]
  return float(np.mean(finite)) if finite else float('nan')
