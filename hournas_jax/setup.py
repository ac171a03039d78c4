"""What every mode needs, derived from a config once: the `Setup` and its helpers.

`resolve_setup(config, workdir)` reads the dataset's shape and classes, builds the search space
and the device mesh; `Setup.batches` streams the config's data onto that mesh. `check_config`
checks the config's top-level fields (the sections are checked by the modules that own them),
`steps` turns a duration given in epochs or steps into steps, and `resolve_architecture` reads
the architecture a mode trains. This module sits below every phase (search, retraining,
baseline, analyses, export) and imports none of them.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Iterator

import jax

from hournas_jax import arch as arch_lib
from hournas_jax import checkpoint
from hournas_jax import data
from hournas_jax import decoys
from hournas_jax import errors
from hournas_jax import mesh as mesh_lib
from hournas_jax import spaces


class ConfigError(errors.UserError, ValueError):
  """A config value that cannot be used; the message names the field."""


@dataclasses.dataclass
class Setup:
  """Everything a phase needs that is derived from the config once."""

  config: Any
  workdir: str
  dataset: str
  data_dir: str | None
  image_size: int
  channels: int
  num_classes: int
  space: spaces.SearchSpace
  mesh: Any
  data_options: data.DataOptions = dataclasses.field(default_factory=data.DataOptions)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (self.image_size, self.image_size, self.channels)

  def data_source(self) -> dict:
    """What, besides the dataset's name, decides which images a run sees.

    Returns:
      A folder's path and the non-default config.data options ({} for the defaults, so
      fingerprints of runs that set nothing stay as they were).
    """
    out = {}
    if self.dataset == data.FOLDER:
      out['data_dir'] = os.path.abspath(os.path.expanduser(self.data_dir or ''))
    default = data.DataOptions()
    changed = {
        k: v
        for k, v in dataclasses.asdict(self.data_options).items()
        if v != getattr(default, k)
    }
    if changed:
      out['options'] = changed
    return out

  def steps_per_epoch(self, split: str, batch_size: int, train: bool = True) -> int:
    """Batches per epoch of `batches(split, batch_size, train=train)`."""
    return data.steps_per_epoch(
        self.dataset, split, batch_size, train=train, data_dir=self.data_dir,
        options=self.data_options)

  def batches(self, split: str, batch_size: int, *, seed: int, start_step: int = 0,
              train: bool = True, on_mesh: bool = True) -> Iterator[dict]:
    """The config's data as batches.

    Args:
      split: 'search_train' (D_tr), 'search_val' (D_val), 'train' or 'eval'.
      batch_size: the global batch size.
      seed: the shuffling and augmentation seed.
      start_step: the number of batches to skip (a resumed run continues its stream).
      train: augment and shuffle (False: the evaluation pipeline).
      on_mesh: put each batch onto the mesh (False: host numpy).

    Returns:
      An iterator of {'image': [B, H, W, C] float32, 'label': [B] int32}.
    """
    batches = data.make_batches(
        self.dataset, split, batch_size=batch_size, image_size=self.image_size, seed=seed,
        start_step=start_step, train=train, data_dir=self.data_dir, channels=self.channels,
        options=self.data_options)
    return data.prefetch_to_mesh(batches, self.mesh) if on_mesh else batches


def steps(per_epoch: int, *, epochs: float = 0.0, steps: int = 0, at_least: int = 1) -> int:  # pylint: disable=redefined-outer-name
  """A duration as steps: `steps` when positive, else `epochs` of `per_epoch` steps.

  Args:
    per_epoch: steps in one epoch.
    epochs: the duration in epochs (used when `steps` is 0).
    steps: the duration in steps (0 = given in epochs).
    at_least: the fewest steps returned for a duration given in epochs.

  Returns:
    The number of steps (epochs * per_epoch rounded to the nearest integer).
  """
  if steps > 0:
    return int(steps)
  return max(at_least, int(round(epochs * per_epoch)))


# --------------------------------------------------------------------------------------------
# Config checks.


def check(condition: bool, message: str) -> None:
  """Raises ConfigError(message) unless `condition`."""
  if not condition:
    raise ConfigError(message)


def finite(x) -> bool:
  """Whether `x` is a finite int or float (not a bool)."""
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_config(config) -> None:
  """The top-level fields, the dataset fields and config.targets (one error line each)."""
  check(isinstance(config.seed, int) and config.seed >= 0,
        f'config.seed must be a non-negative integer, got {config.seed!r}')
  data.check_config(config)  # dataset, channels, data_dir and config.data.*
  check(config.image_size >= 0, 'config.image_size must be >= 0 (0 = dataset default)')
  for key in ('params', 'flops', 'latency_ms'):
    value = config.targets[key]
    check(finite(value) and value >= 0,
          f'config.targets.{key} must be a number >= 0 (0 = no target), got {value!r}')
  if config.targets.latency_ms > 0:
    table = config.targets.latency_table
    check(bool(table), 'config.targets.latency_ms needs config.targets.latency_table, the '
          'latency table of your device (python -m hournas_jax.tools.latency --help)')
    check(os.path.isfile(os.path.expanduser(table)), f'config.targets.latency_table {table!r} '
          'is not a file (measure one with python -m hournas_jax.tools.latency)')
  check(config.stem_stride in (1, 2),
        f'config.stem_stride must be 1 or 2, got {config.stem_stride!r}')
  check(config.checkpoint_every_steps > 0, 'config.checkpoint_every_steps must be positive')
  check(config.log_every_steps > 0, 'config.log_every_steps must be positive')
  check(config.keep_checkpoints >= 1, 'config.keep_checkpoints must be >= 1')


# --------------------------------------------------------------------------------------------
# Resolution.


def configure_jax(config) -> None:
  """Applies the config's JAX settings (fast compiles, the persistent compilation cache)."""
  if config.xla_fast_compile:
    jax.config.update('jax_disable_most_optimizations', True)
  if config.compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir',
                      os.path.abspath(os.path.expanduser(config.compilation_cache_dir)))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)


def resolve_setup(config, workdir: str) -> Setup:
  """The Setup of a checked config: the data's shape and classes, the space, the mesh."""
  data_dir = config.data_dir or None
  options = data.options_from_config(config)
  info = data.dataset_info(config.dataset, data_dir, options)
  image_size = config.image_size or int(info['image_shape'][0])
  channels = config.channels or int(info['image_shape'][2])
  ops = tuple(o.strip() for o in config.ops.split(',') if o.strip()) or None
  space = spaces.get_space(config.space, resolution=image_size,
                           num_classes=int(info['num_classes']), width=config.width, ops=ops,
                           stem_stride=config.stem_stride, in_channels=channels)
  space = decoys.with_decoys(space, decoys.parse(config.decoys), config.decoy_kind)
  return Setup(config=config, workdir=workdir, dataset=config.dataset, data_dir=data_dir,
               image_size=image_size, channels=channels, num_classes=int(info['num_classes']),
               space=space, mesh=mesh_lib.make_mesh(), data_options=options)


def write_config(setup: Setup) -> None:
  """<workdir>/config.json: the config with what was resolved from the data and devices."""
  config = setup.config.to_dict()
  config['image_size'] = setup.image_size
  config['channels'] = setup.channels
  resolved = {'num_classes': setup.num_classes, 'image_shape': list(setup.image_shape),
              'devices': jax.device_count(), 'processes': jax.process_count(),
              'platform': jax.devices()[0].platform}
  if jax.process_index() == 0:
    checkpoint.atomic_write_json(os.path.join(setup.workdir, 'config.json'),
                                 {**config, 'resolved': resolved})


def resolve_architecture(setup: Setup) -> list[str]:
  """The ops config.train.arch names ('' = the workdir's searched arch.json)."""
  spec = setup.config.train.arch
  if not spec:
    path = os.path.join(setup.workdir, 'arch.json')
    if not os.path.exists(path):
      raise ConfigError(f'no searched architecture in {setup.workdir} (arch.json): run '
                        '--config.mode=search there first, or set --config.train.arch to a '
                        'preset, a JSON file or comma-separated ops')
    return list(arch_lib.load(path, setup.space).ops)
  return list(arch_lib.resolve(spec, setup.space).ops)


def check_model_data(setup: Setup, meta, run_dir: str) -> None:
  """Refuses a saved model trained on other data than the config's."""
  if (meta.get('dataset') != setup.dataset or tuple(meta['image_shape']) != setup.image_shape
      or meta.get('data', {}) != setup.data_source()):
    raise ConfigError(f'the model in {run_dir} was trained on {meta.get("dataset")} '
                      f'{tuple(meta["image_shape"])}, not {setup.dataset} '
                      f'{setup.image_shape}: use the config it was trained with')
