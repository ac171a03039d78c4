"""Export a fixed-architecture network as jax.export / TFLite / ONNX, each export checked.

    python -m hournas_jax.tools.export --workdir=/tmp/q --formats=jax,tflite,onnx
    python -m hournas_jax.tools.export --arch=hournas_a --out=/tmp/hournas_a \\
        --precision=float32,float16

--workdir exports the workdir's trained model (its config.json, in mode 'export'); --arch and
--out an architecture with fresh weights. The formats, checks and report are described in
the `hournas_jax.export` package.
"""

from __future__ import annotations

import json
import os
import sys

import ml_collections

from hournas_jax import arch as arch_lib
from hournas_jax import errors, export, logging_utils, spaces, tools


def build_parser() -> tools.Parser:
  p = tools.Parser(
      prog='python -m hournas_jax.tools.export',
      description='Export a fixed-architecture network (a workdir\'s trained model, or an '
      'architecture with fresh weights) as jax.export / TFLite / ONNX, each checked against '
      'the JAX model; writes report.json beside the files.')
  source = p.add_argument_group('what to export')
  source.add_argument('--workdir', help='a workdir: its trained model (<workdir>/train), '
                      'compared on its dataset\'s eval data; the config is <workdir>/'
                      'config.json. Files go to <workdir>/export')
  source.add_argument('--arch', default='', help='a preset (hournas_a, ...), JSON file or '
                      'comma-separated ops: exported with fresh weights (with --workdir: only '
                      'when the workdir has no trained model)')
  source.add_argument('--space', default='', help='search space of --arch (default: the '
                      'preset\'s, else fbnet)')
  source.add_argument('--image_size', type=int, default=224)
  source.add_argument('--channels', type=int, default=3)
  source.add_argument('--num_classes', type=int, default=1000)
  source.add_argument('--width', type=float, default=1.0)
  source.add_argument('--stem_stride', type=int, default=2)
  source.add_argument('--seed', type=int, default=0, help='seed of the fresh weights')
  source.add_argument('--out', default='', help='output folder (with --arch)')
  how = p.add_argument_group('how')
  how.add_argument('--formats', default='jax,tflite',
                   help=f'comma-separated: {", ".join(export.FORMATS)}')
  how.add_argument('--precision', default='float32',
                   help=f'TFLite precisions, comma-separated: {", ".join(export.PRECISIONS)}')
  how.add_argument('--threads', default='1', help='thread counts for latency, e.g. 1,2')
  how.add_argument('--warmup', type=int, default=10)
  how.add_argument('--repeats', type=int, default=50)
  how.add_argument('--examples', type=int, default=32, help='inputs compared with JAX')
  how.add_argument('--calibration_examples', type=int, default=100,
                   help='int8: training examples for calibration')
  return p


def _settings_from_args(args):
  return ml_collections.ConfigDict({
      'formats': args.formats, 'tflite_precision': args.precision, 'threads': args.threads,
      'warmup': args.warmup, 'repeats': args.repeats, 'examples': args.examples,
      'calibration_examples': args.calibration_examples})


def _workdir_config(args):
  """The config of the workdir's latest run (<workdir>/config.json) in mode 'export', over
  configs/default.py's defaults where it lacks a field, with the command line's settings."""
  path = os.path.join(args.workdir, 'config.json')
  if not os.path.exists(path):
    raise export.ExportError(f'no config.json in {args.workdir}: not a workdir of main.py '
                             '(export an architecture with --arch and --out instead)')
  with open(path) as f:
    values = json.load(f)
  values.pop('resolved', None)
  values['mode'] = 'export'
  values['export'] = _settings_from_args(args).to_dict()
  if args.arch:
    values.setdefault('train', {})['arch'] = args.arch
  try:
    from configs import default  # pylint: disable=g-import-not-at-top
  except ImportError:  # not run from the repository root
    return ml_collections.ConfigDict(values)

  def merge(base, update):
    for key, value in update.items():
      if isinstance(value, dict) and isinstance(base.get(key), ml_collections.ConfigDict):
        merge(base[key], value)
      else:
        base[key] = value

  config = default.get_config()
  merge(config, values)
  return config


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    if args.workdir:
      # The driver runs the 'export' mode as it runs every mode: checks, lock, config.json.
      from hournas_jax import train  # pylint: disable=g-import-not-at-top
      train.train_and_evaluate(_workdir_config(args), args.workdir)
      return 0
    if not args.arch or not args.out:
      raise export.ExportError('give --workdir, or --arch and --out')
    space_name = args.space or (arch_lib.PRESETS[args.arch][0] if args.arch in arch_lib.PRESETS
                                else 'fbnet')
    space = spaces.get_space(space_name, resolution=args.image_size,
                             num_classes=args.num_classes, width=args.width,
                             stem_stride=args.stem_stride)
    if args.channels < 1:
      raise export.ExportError(f'--channels must be >= 1, got {args.channels}')
    settings = export.check_config(_settings_from_args(args))
    export.require(settings.formats)  # before any slow work
    ops = arch_lib.resolve(args.arch, space).ops
    logging_utils.info(f'[export] {args.arch} in {space_name} at {args.image_size}x'
                       f'{args.image_size}x{args.channels}, {args.num_classes} classes, with '
                       f'FRESH (untrained) weights (seed {args.seed}), BatchNorm statistics of '
                       f'{settings.calibration_examples} random inputs')
    image_shape = (args.image_size, args.image_size, args.channels)
    calibration = export.random_inputs(image_shape, settings.calibration_examples,
                                       export.CALIBRATION_SEED)
    model = export.network_model(space, ops, image_shape=image_shape, seed=args.seed,
                                 calibration=calibration,
                                 info={'source': 'fresh weights', 'arch': args.arch,
                                       'seed': args.seed})
    export.export_model(model, args.out, formats=settings.formats,
                        precisions=settings.precisions, threads=settings.threads,
                        representative=calibration, warmup=settings.warmup,
                        repeats=settings.repeats, examples=settings.examples)
    return 0
  except errors.UserError as e:
    print(f'error: {" ".join(str(e).split())}', file=sys.stderr, flush=True)
    return int(getattr(e, 'exit_code', 1))


if __name__ == '__main__':
  sys.exit(main())
