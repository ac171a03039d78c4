"""Names, errors, seeds and batch arithmetic shared by every dataset backend."""

import math

import numpy as np

DATASETS = ('imagenet2012', 'cifar10', 'digits', 'cluttered_digits')
# Built from scikit-learn's digits on the host: no download, no TensorFlow, 1 or 3 channels.
OFFLINE_DATASETS = ('digits', 'cluttered_digits')

# HourNAS trains supernet weights on D_tr and architecture parameters on D_val
# (both carved from the train split); 'train' is the whole train split for
# retraining the found architecture and 'eval' the held-out test data.
SPLITS = ('search_train', 'search_val', 'train', 'eval')

# Share of the train split that becomes D_tr; the rest is D_val.
SEARCH_TRAIN_FRACTION = 0.8


class DataError(ValueError):
  """A dataset request that cannot be served; the message says how to fix it."""


def check_dataset(name: str) -> None:
  if name not in DATASETS:
    raise DataError(
        f'Unknown dataset {name!r}; choose one of {", ".join(DATASETS)}.')


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
