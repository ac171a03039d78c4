"""scikit-learn's 8x8 digits as a fully offline dataset (numpy only, no TF).

1,797 grayscale images, 10 classes. The splits are fixed by SPLIT_SEED, not by
the run seed, so every run and every resume sees the same D_tr / D_val / test.
"""

import functools
import itertools
from typing import Iterator

import jax
import numpy as np
from sklearn import datasets as sk_datasets
from sklearn import model_selection

from hournas_jax.data import common

NUM_CLASSES = 10
NATIVE_SIZE = 8
DEFAULT_IMAGE_SIZE = 16
EVAL_FRACTION = 0.2
SPLIT_SEED = 0

# Tags that keep the shuffle and augmentation random streams independent.
_SHUFFLE_STREAM = 0
_AUGMENT_STREAM = 1


@functools.lru_cache(maxsize=None)
def _raw() -> tuple[np.ndarray, np.ndarray]:
  """All images scaled from the 0..16 ink counts to [0, 1], and labels."""
  digits = sk_datasets.load_digits()
  images = (digits.images / 16.0).astype(np.float32)
  return images, digits.target.astype(np.int32)


@functools.lru_cache(maxsize=None)
def split_indices() -> dict[str, np.ndarray]:
  """Indices into load_digits() for each split (stratified, fixed seed)."""
  labels = _raw()[1]
  train, test = model_selection.train_test_split(
      np.arange(len(labels)), test_size=EVAL_FRACTION, stratify=labels,
      random_state=SPLIT_SEED)
  search_train, search_val = model_selection.train_test_split(
      train, train_size=common.SEARCH_TRAIN_FRACTION, stratify=labels[train],
      random_state=SPLIT_SEED)
  return {
      'search_train': search_train,
      'search_val': search_val,
      # D_tr first, as 'train[:80%]' is for the TFDS datasets.
      'train': np.concatenate([search_train, search_val]),
      'eval': test,
  }


@functools.lru_cache(maxsize=None)
def _pixel_stats() -> tuple[float, float]:
  """Mean/std of the retraining split's pixels, so no test data leaks in."""
  pixels = _raw()[0][split_indices()['train']]
  return float(pixels.mean()), float(pixels.std())


def num_examples(split: str) -> int:
  return len(split_indices()[split])


def resize_bilinear(images: np.ndarray, image_size: int) -> np.ndarray:
  """Resizes a stack of (N, H, W) images to (N, image_size, image_size)."""
  shape = (images.shape[0], image_size, image_size)
  # On the host CPU, so every machine type produces identical pixels.
  with jax.default_device(jax.local_devices(backend='cpu')[0]):
    return np.asarray(jax.image.resize(images, shape, method='bilinear'))


@functools.lru_cache(maxsize=None)
def _resized_images(image_size: int) -> np.ndarray:
  # Resizing once up front keeps per-batch work to indexing and shifting.
  images = resize_bilinear(_raw()[0], image_size)
  images.flags.writeable = False
  return images


def max_shift(image_size: int) -> int:
  """Shift range: 1 px below size 32, else 2 px (half an original pixel)."""
  return min(2, max(1, image_size // 16))


def random_shift(images: np.ndarray, rng: np.random.Generator,
                 shift: int) -> np.ndarray:
  """Moves each (H, W) image by up to `shift` px on each axis.

  Pads with 0 (the background) and crops a random window back to (H, W). No
  flips: digits are not mirror-invariant.
  """
  count, height, width = images.shape
  padded = np.pad(images, ((0, 0), (shift, shift), (shift, shift)))
  offset_y, offset_x = rng.integers(0, 2 * shift + 1, size=(2, count))
  rows = offset_y[:, None] + np.arange(height)
  cols = offset_x[:, None] + np.arange(width)
  return padded[np.arange(count)[:, None, None], rows[:, :, None],
                cols[:, None, :]]


def standardize(images: np.ndarray, mean: float, std: float) -> np.ndarray:
  return (images - mean) / std


def steps_per_epoch(split: str, batch_size: int, *, train: bool) -> int:
  return common.num_batches(num_examples(split), batch_size, train=train,
                            split=split)


def _finish(images: np.ndarray, channels: int) -> np.ndarray:
  """Standardizes (N, H, W) images in [0, 1] to float32 NHWC."""
  images = standardize(images, *_pixel_stats())
  return np.repeat(images[..., None], channels, axis=-1).astype(np.float32)


def _train_batches(indices: np.ndarray, *, batch_size: int, image_size: int,
                   seed: int, start_step: int, steps: int, channels: int,
                   local_rows: slice) -> Iterator[dict[str, np.ndarray]]:
  images = _resized_images(image_size)
  labels = _raw()[1]
  shift = max_shift(image_size)
  first_epoch, first_step = divmod(start_step, steps)
  for epoch in itertools.count(first_epoch):
    order = np.random.default_rng(
        [seed, _SHUFFLE_STREAM, epoch]).permutation(indices)
    for step in range(first_step if epoch == first_epoch else 0, steps):
      batch_indices = order[step * batch_size:(step + 1) * batch_size]
      rng = np.random.default_rng([seed, _AUGMENT_STREAM, epoch, step])
      # Augment the whole global batch so each row's shift does not depend on
      # the process count, then keep this process's rows.
      shifted = random_shift(images[batch_indices], rng, shift)[local_rows]
      yield {'image': _finish(shifted, channels),
             'label': labels[batch_indices[local_rows]]}


def _eval_batches(indices: np.ndarray, *, batch_size: int, image_size: int,
                  start_step: int, steps: int, channels: int,
                  local_rows: slice) -> Iterator[dict[str, np.ndarray]]:
  images = _resized_images(image_size)
  labels = _raw()[1]
  # -1 marks the padding rows that fill up the last batch.
  padded = np.full(steps * batch_size, -1)
  padded[:len(indices)] = indices
  for step in range(start_step, steps):
    batch_indices = padded[step * batch_size:(step + 1) * batch_size]
    batch_indices = batch_indices[local_rows]
    mask = batch_indices >= 0
    batch_images = _finish(images[batch_indices], channels)
    batch_images[~mask] = 0.0
    yield {'image': batch_images,
           'label': np.where(mask, labels[batch_indices], 0).astype(np.int32),
           'mask': mask.astype(np.float32)}


def make_batches(split: str, *, batch_size: int, image_size: int, seed: int,
                 start_step: int, train: bool, channels: int,
                 process_index: int,
                 process_count: int) -> Iterator[dict[str, np.ndarray]]:
  """Yields this process's rows of each global batch.

  Every process computes the same global batch (order and augmentation depend
  only on seed, epoch and step) and keeps its slice, so results do not depend
  on how many processes share the work.
  """
  local_batch = common.local_batch_size(batch_size, process_count)
  local_rows = slice(process_index * local_batch,
                     (process_index + 1) * local_batch)
  steps = steps_per_epoch(split, batch_size, train=train)
  indices = split_indices()[split]
  if train:
    return _train_batches(indices, batch_size=batch_size,
                          image_size=image_size, seed=seed,
                          start_step=start_step, steps=steps,
                          channels=channels, local_rows=local_rows)
  return _eval_batches(indices, batch_size=batch_size, image_size=image_size,
                       start_step=start_step, steps=steps, channels=channels,
                       local_rows=local_rows)
