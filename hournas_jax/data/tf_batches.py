"""Deterministic, resumable tf.data batching shared by the TFDS and image-folder sources.

A source supplies read(shuffle_seed): its records for this process, each
{'image': <still encoded: JPEG/PNG bytes or a file path>, 'label': int}, in an
order fixed by shuffle_seed (None: the source's fixed order), and a
preprocess_fn(image, seed) that decodes and augments one record's image.

Resuming at step k must give exactly the batches an uninterrupted run gives:
each epoch is read in an order fixed by (seed, epoch), images stay encoded
until after the records of already-consumed steps are skipped, and every
example's augmentation seed is its position in the epoch, not a stateful RNG.
"""

import itertools
from typing import Callable, Iterator

import numpy as np
import tensorflow as tf

from hournas_jax.data import common


def _hide_accelerators_from_tensorflow() -> None:
  # TF only runs the input pipeline on CPU; left alone it would grab GPU/TPU
  # memory that JAX needs.
  for device_type in ('GPU', 'TPU'):
    try:
      tf.config.set_visible_devices([], device_type)
    except RuntimeError:
      # TF's devices were initialized before this import; nothing to change.
      pass


_hide_accelerators_from_tensorflow()

# Tags that keep the shuffle and augmentation seeds independent.
_SHUFFLE_STREAM = 0
_AUGMENT_STREAM = 1

Read = Callable[[int | None], tf.data.Dataset]
Batches = Iterator[dict[str, np.ndarray]]


def train_batches(read: Read, preprocess_fn: Callable, *, seed: int,
                  start_step: int, steps: int, local_batch: int,
                  process_index: int, shuffle_buffer: int) -> Batches:
  """Endless shuffled, augmented full batches from batch start_step on.

  shuffle_buffer: records held for tf.data's shuffle on top of read's own
  order; 0 when read already returns a full permutation.
  """
  records_per_epoch = steps * local_batch
  first_epoch, first_step = divmod(start_step, steps)
  for epoch in itertools.count(first_epoch):
    epoch_seed = common.derive_seed(seed, _SHUFFLE_STREAM, epoch)
    augment_seed = common.derive_seed(seed, _AUGMENT_STREAM, epoch,
                                      process_index)
    ds = read(epoch_seed)
    if shuffle_buffer:
      ds = ds.shuffle(min(shuffle_buffer, records_per_epoch), seed=epoch_seed)
    # take() makes every process run exactly `steps` steps.
    ds = ds.take(records_per_epoch).enumerate()
    if epoch == first_epoch:
      ds = ds.skip(first_step * local_batch)
    ds = ds.map(
        lambda index, example: {
            'image': preprocess_fn(
                example['image'],
                tf.stack([tf.constant(augment_seed, tf.int64), index])),
            'label': tf.cast(example['label'], tf.int32),
        },
        num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    yield from ds.as_numpy_iterator()


def eval_batches(read: Read, preprocess_fn: Callable, *,
                 image_shape: tuple[int, int, int], start_step: int,
                 steps: int, local_batch: int) -> Batches:
  """One pass in read's fixed order, padded to `steps` batches, with a 'mask'."""
  ds = read(None)
  ds = ds.skip(start_step * local_batch)
  ds = ds.map(
      lambda example: {
          'image': preprocess_fn(example['image'], None),
          'label': tf.cast(example['label'], tf.int32),
          'mask': tf.constant(1.0),
      },
      num_parallel_calls=tf.data.AUTOTUNE)
  # Zero examples with mask 0 fill the last batch, and whole batches on
  # processes whose share is one example short, so all processes run `steps`.
  padding = tf.data.Dataset.from_tensors({
      'image': tf.zeros(image_shape),
      'label': tf.constant(0, tf.int32),
      'mask': tf.constant(0.0),
  }).repeat()
  ds = ds.concatenate(padding).take(max(0, steps - start_step) * local_batch)
  ds = ds.batch(local_batch).prefetch(tf.data.AUTOTUNE)
  return ds.as_numpy_iterator()
