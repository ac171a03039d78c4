"""Cluttered digits: scikit-learn's 8x8 digits placed on a larger canvas among clutter.

A fully offline task on which architectures differ (numpy only, no TF). It follows the recipe
of cluttered MNIST: each image is one source digit, upscaled and placed at a random position
on an empty canvas, with fragments of other digits of the same split scattered around it as
clutter. Finding the digit needs a receptive field that covers it and features that tell whole
digits from fragments, so kernel size, depth and where capacity sits change the accuracy, which
the 8x8 digits (360 test images, a few pixels of context) cannot show.

Splits are built from disjoint source digits: the 20% held out by `digits.split_indices` give
the test set, the rest give D_tr / D_val (80/20) and 'train' (both). Training images are drawn
afresh every epoch: image i of epoch e depends only on (seed, e, i), and one epoch visits every
source digit of the split once. The test set is fixed (TEST_SEED) and large (TEST_SIZE images),
so evaluation noise is small next to the differences between architectures.
"""

import functools
import itertools
from typing import Iterator

import numpy as np

from hournas_jax.data import common
from hournas_jax.data import digits

NUM_CLASSES = 10
DEFAULT_IMAGE_SIZE = 24
MIN_IMAGE_SIZE = 16
TEST_SIZE = 10000
# A fixed pass over D_val (ranking SuperNet paths, the final choice by inherited accuracy) is as
# large as the test set: two paths' inherited top-1 differ by about 1 point, which 2,000 images
# (binomial SE of a difference about 0.7 points) could not resolve. On the search-quality task,
# 10,000 images raised the Kendall tau of three SuperNets from 0.49 / 0.45 / 0.42 to
# 0.51 / 0.49 / 0.51 (README, SuperNet ranking).
FIXED_PASS_SIZE = TEST_SIZE
TEST_SEED = 20260
DIGIT_FRACTION = 0.5      # the digit's side, as a fraction of the canvas side
FRAGMENT_FRACTION = 0.35  # a fragment's side, as a fraction of the digit's side
NUM_FRAGMENTS = 2

# Tags that keep the random streams of the splits and of shuffling apart.
_SHUFFLE_STREAM = 0
_RENDER_STREAM = 1


def sources(split: str) -> np.ndarray:
  """Indices into load_digits() of the source digits of a split (disjoint across splits, except
  that 'train' is search_train + search_val)."""
  return digits.split_indices()[split]


def num_examples(split: str, train: bool = True) -> int:
  """Images per epoch: one per source digit when training; a fixed pass is the TEST_SIZE test
  images for 'eval', FIXED_PASS_SIZE for the other splits (e.g. to rank SuperNet paths on
  D_val with less noise than its 288 sources give)."""
  if split == 'eval':
    return TEST_SIZE
  return len(sources(split)) if train else FIXED_PASS_SIZE


def steps_per_epoch(split: str, batch_size: int, *, train: bool) -> int:
  return common.num_batches(num_examples(split, train), batch_size, train=train, split=split)


def check_image_size(image_size: int) -> None:
  if image_size < MIN_IMAGE_SIZE:
    raise common.DataError(f'cluttered_digits needs image_size >= {MIN_IMAGE_SIZE} (the digit '
                           f'is {DIGIT_FRACTION:g} of the canvas), got {image_size}.')


def digit_size(image_size: int) -> int:
  return max(8, int(round(image_size * DIGIT_FRACTION)))


@functools.lru_cache(maxsize=None)
def _upscaled(image_size: int) -> np.ndarray:
  """Every source digit upscaled to the digit size of this canvas, [1797, d, d] in [0, 1]."""
  out = digits.resize_bilinear(digits._raw()[0], digit_size(image_size))  # pylint: disable=protected-access
  out = np.clip(out, 0.0, 1.0)
  out.flags.writeable = False
  return out


def _paste(canvas, patches, top, left):
  """canvas[b, top_b:top_b+h, left_b:left_b+w] = max(canvas, patch_b), for every b at once."""
  count, height, width = patches.shape
  rows = top[:, None] + np.arange(height)
  cols = left[:, None] + np.arange(width)
  index = (np.arange(count)[:, None, None], rows[:, :, None], cols[:, None, :])
  canvas[index] = np.maximum(canvas[index], patches)


def render(source_ids: np.ndarray, pool: np.ndarray, rng: np.random.Generator,
           image_size: int) -> np.ndarray:
  """Images [n, S, S] in [0, 1]: each source digit at a random position, plus NUM_FRAGMENTS
  random crops of random digits of `pool` (the same split's sources) at random positions."""
  upscaled = _upscaled(image_size)
  d = upscaled.shape[-1]
  f = max(2, int(round(d * FRAGMENT_FRACTION)))
  n = len(source_ids)
  canvas = np.zeros((n, image_size, image_size), np.float32)
  for _ in range(NUM_FRAGMENTS):
    donors = upscaled[rng.choice(pool, size=n)]
    y, x = rng.integers(0, d - f + 1, size=(2, n))
    crops = donors[np.arange(n)[:, None, None], (y[:, None] + np.arange(f))[:, :, None],
                   (x[:, None] + np.arange(f))[:, None, :]]
    _paste(canvas, crops, *rng.integers(0, image_size - f + 1, size=(2, n)))
  _paste(canvas, upscaled[source_ids], *rng.integers(0, image_size - d + 1, size=(2, n)))
  return canvas


@functools.lru_cache(maxsize=None)
def _pixel_stats(image_size: int) -> tuple[float, float]:
  """Mean/std of pixels of training images (a fixed sample of the 'train' split's renders)."""
  rng = np.random.default_rng([TEST_SEED, 1])
  pool = sources('train')
  images = render(rng.choice(pool, 2000), pool, rng, image_size)
  return float(images.mean()), float(images.std())


@functools.lru_cache(maxsize=4)
def _fixed_set(split: str, image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """One fixed rendering of a split: the test set for 'eval', one image per source otherwise."""
  pool = sources(split)
  rng = np.random.default_rng([TEST_SEED, _RENDER_STREAM, common.SPLITS.index(split)])
  ids = pool[np.arange(num_examples(split, train=False)) % len(pool)]
  images = render(ids, pool, rng, image_size)
  images.flags.writeable = False
  return images, digits._raw()[1][ids]  # pylint: disable=protected-access


def _finish(images: np.ndarray, channels: int, image_size: int) -> np.ndarray:
  images = digits.standardize(images, *_pixel_stats(image_size))
  return np.repeat(images[..., None], channels, axis=-1).astype(np.float32)


def _train_batches(split, *, batch_size, image_size, seed, start_step, steps, channels,
                   local_rows) -> Iterator[dict[str, np.ndarray]]:
  pool = sources(split)
  labels = digits._raw()[1]  # pylint: disable=protected-access
  first_epoch, first_step = divmod(start_step, steps)
  for epoch in itertools.count(first_epoch):
    order = np.random.default_rng([seed, _SHUFFLE_STREAM, epoch]).permutation(pool)
    for step in range(first_step if epoch == first_epoch else 0, steps):
      ids = order[step * batch_size:(step + 1) * batch_size]
      # The whole global batch is rendered from one stream, so each row does not depend on
      # how many processes share the batch; this process keeps its rows.
      rng = np.random.default_rng([seed, _RENDER_STREAM, epoch, step])
      images = render(ids, pool, rng, image_size)[local_rows]
      yield {'image': _finish(images, channels, image_size), 'label': labels[ids[local_rows]]}


def _eval_batches(split, *, batch_size, image_size, start_step, steps, channels,
                  local_rows) -> Iterator[dict[str, np.ndarray]]:
  images, labels = _fixed_set(split, image_size)
  padded = np.full(steps * batch_size, -1)
  padded[:len(labels)] = np.arange(len(labels))
  for step in range(start_step, steps):
    rows = padded[step * batch_size:(step + 1) * batch_size][local_rows]
    mask = rows >= 0
    batch = _finish(images[rows], channels, image_size)
    batch[~mask] = 0.0
    yield {'image': batch, 'label': np.where(mask, labels[rows], 0).astype(np.int32),
           'mask': mask.astype(np.float32)}


def make_batches(split: str, *, batch_size: int, image_size: int, seed: int, start_step: int,
                 train: bool, channels: int, process_index: int,
                 process_count: int) -> Iterator[dict[str, np.ndarray]]:
  """This process's rows of each global batch (see input_pipeline.make_batches)."""
  check_image_size(image_size)
  local_batch = common.local_batch_size(batch_size, process_count)
  local_rows = slice(process_index * local_batch, (process_index + 1) * local_batch)
  steps = steps_per_epoch(split, batch_size, train=train)
  if train:
    return _train_batches(split, batch_size=batch_size, image_size=image_size, seed=seed,
                          start_step=start_step, steps=steps, channels=channels,
                          local_rows=local_rows)
  return _eval_batches(split, batch_size=batch_size, image_size=image_size, start_step=start_step,
                       steps=steps, channels=channels, local_rows=local_rows)
