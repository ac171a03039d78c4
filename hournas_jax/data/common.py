"""Names, errors, options, seeds and batch arithmetic shared by every dataset backend."""

import dataclasses
import math
import re
from typing import Any

import numpy as np

from hournas_jax import errors

# Datasets with handling of their own; any other name is looked up in TFDS.
DATASETS = ('imagenet2012', 'cifar10', 'digits', 'cluttered_digits', 'folder')
# Built from scikit-learn's digits on the host: no download, no TensorFlow, 1 or 3 channels.
OFFLINE_DATASETS = ('digits', 'cluttered_digits')
# TFDS datasets read with their papers' preprocessing (always RGB).
KNOWN_TFDS_DATASETS = ('imagenet2012', 'cifar10')
# A directory of class folders of JPEG/PNG images, given as data_dir (see folder.py).
FOLDER = 'folder'

# HourNAS trains supernet weights on D_tr and architecture parameters on D_val
# (both carved from the train split); 'train' is the whole train split for
# retraining the found architecture and 'eval' the held-out test data.
SPLITS = ('search_train', 'search_val', 'train', 'eval')

# Share of the train split that becomes D_tr; the rest is D_val.
SEARCH_TRAIN_FRACTION = 0.8

# A TFDS name: 'name', 'name/config', 'name:1.2.3', 'namespace:name', ... The
# check only rejects what cannot be a name; TFDS itself says whether it knows it.
_TFDS_NAME = re.compile(r'[A-Za-z0-9_][A-Za-z0-9_.:/+*-]*')


class DataError(errors.UserError, ValueError):
  """A dataset request that cannot be served; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class DataOptions:
  """How the TFDS-by-name and folder datasets are split and augmented (config.data).

  The split is fixed by split_seed, not by the run seed, so that the search,
  the retraining and every training seed of a comparison share one test set.
  """
  train_split: str = 'train'     # TFDS split (or slice, 'train[:80%]') to train on
  eval_split: str = ''           # TFDS split to test on; '' = 'test', else 'validation'
  holdout_fraction: float = 0.2  # folder without a test/ folder: share held out per class
  split_seed: int = 0            # folder: which images are held out and the train order
  random_flip: bool = True       # mirror training images (off for digits or text)


def options_from_config(config: Any) -> DataOptions:
  """config.data as DataOptions (the defaults where a config has no data block)."""
  block = config.get('data') if hasattr(config, 'get') else None
  if block is None:
    return DataOptions()
  fields = {f.name for f in dataclasses.fields(DataOptions)}
  return DataOptions(**{k: v for k, v in block.items() if k in fields})


def check_options(options: DataOptions) -> None:
  if not isinstance(options.train_split, str) or not options.train_split:
    raise DataError('config.data.train_split must name a split, e.g. "train" or '
                    f'"train[:80%]", got {options.train_split!r}.')
  if not isinstance(options.eval_split, str):
    raise DataError('config.data.eval_split must be a split name or "" (= test, else '
                    f'validation), got {options.eval_split!r}.')
  fraction = options.holdout_fraction
  if (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
      or not 0 < fraction < 1):
    raise DataError('config.data.holdout_fraction must be in (0, 1), got '
                    f'{fraction!r}.')
  seed = options.split_seed
  if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
    raise DataError('config.data.split_seed must be a non-negative integer, got '
                    f'{seed!r}.')
  if not isinstance(options.random_flip, bool):
    raise DataError('config.data.random_flip must be True or False, got '
                    f'{options.random_flip!r}.')


def check_dataset(name: str) -> None:
  """Accepts the datasets above and anything that can be a TFDS name.

  Whether TFDS knows the name, and whether it is prepared, is only found out
  when the data is opened (that needs TensorFlow).
  """
  if name in DATASETS:
    return
  if not isinstance(name, str) or not _TFDS_NAME.fullmatch(name):
    raise DataError(
        f'Unknown dataset {name!r}; choose one of {", ".join(DATASETS)} or the '
        'name of a TFDS image classification dataset (e.g. mnist, tf_flowers).')


def allowed_channels(name: str) -> tuple[int, ...]:
  """Channel counts a dataset can be read with (gray images are repeated to 3)."""
  if name in KNOWN_TFDS_DATASETS:
    return (3,)
  return (1, 3)


def check_channels(name: str, channels: int | None) -> None:
  if channels is not None and channels not in allowed_channels(name):
    raise DataError(f'{name} supports channels in {allowed_channels(name)}, got '
                    f'{channels}.')


def check_config(config: Any) -> None:
  """The config's dataset fields: name, channels, data_dir and config.data."""
  check_dataset(config.dataset)
  allowed = (0,) + allowed_channels(config.dataset)
  if config.channels not in allowed:
    raise DataError(f'config.channels must be one of {allowed} for '
                    f'{config.dataset} (0 = the dataset\'s own), got '
                    f'{config.channels!r}.')
  if config.dataset == FOLDER and not config.data_dir:
    raise DataError('config.dataset=folder reads the images in config.data_dir; set '
                    '--config.data_dir=DIR (DIR/<class>/*.jpg or DIR/train/<class>/ and '
                    'DIR/test/<class>/).')
  check_options(options_from_config(config))


def check_split(split: str) -> None:
  if split not in SPLITS:
    raise DataError(
        f'Unknown split {split!r}; choose one of {", ".join(SPLITS)}.')


def local_batch_size(batch_size: int, process_count: int) -> int:
  """This process's share of a global batch."""
  if batch_size <= 0 or batch_size % process_count:
    raise DataError(
        f'batch_size {batch_size} must be a positive multiple of the number '
        f'of JAX processes ({process_count}); pick a multiple of '
        f'{process_count}.')
  return batch_size // process_count


def process_share(num_examples: int, process_index: int, process_count: int, *,
                  drop_remainder: bool) -> slice:
  """This process's contiguous block of num_examples, as TFDS's even_splits cuts it.

  With drop_remainder every process gets num_examples // process_count (the
  rest is unused); otherwise the first num_examples % process_count processes
  get one example more.
  """
  base, extra = divmod(num_examples, process_count)
  if drop_remainder:
    return slice(process_index * base, (process_index + 1) * base)
  start = process_index * base + min(process_index, extra)
  return slice(start, start + base + (process_index < extra))


def examples_per_process(num_examples: int, process_count: int, *,
                         train: bool) -> int:
  """Examples of the largest process_share: the one every process's steps follow."""
  if train:
    return num_examples // process_count
  return math.ceil(num_examples / process_count)


def derive_seed(*values: int) -> int:
  """Mixes non-negative integers into one well-spread 31-bit seed.

  Neighbouring epochs or runs must not get correlated shuffles, so the values
  go through numpy's SeedSequence hash instead of plain arithmetic.
  """
  return int(np.random.SeedSequence(list(values)).generate_state(1)[0] >> 1)


def num_batches(num_examples: int, batch_size: int, *, train: bool,
                split: str) -> int:
  """Batches per epoch: full batches only when training, all data for eval."""
  if train:
    steps = num_examples // batch_size
    if steps == 0:
      raise DataError(
          f'split {split!r} has {num_examples} examples, fewer than one batch '
          f'of {batch_size}; use a smaller batch_size.')
    return steps
  return math.ceil(num_examples / batch_size)
