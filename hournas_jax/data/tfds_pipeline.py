"""tf.data pipelines for the TFDS datasets (imagenet2012, cifar10).

Resuming at step k must give exactly the batches an uninterrupted run gives:
each epoch is read in an order fixed by (seed, epoch), images stay encoded
until after the records of already-consumed steps are skipped, and every
example's augmentation seed is its position in the epoch, not a stateful RNG.
"""

import functools
import itertools
import math
import os
from typing import Callable, Iterator

import numpy as np
import tensorflow as tf


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

# pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow_datasets as tfds

from hournas_jax.data import common
from hournas_jax.data import preprocess
# pylint: enable=g-import-not-at-top,wrong-import-position

DEFAULT_IMAGE_SIZE = {'imagenet2012': 224, 'cifar10': 32}

_TFDS_SPLITS = {
    'imagenet2012': {
        'search_train': 'train[:80%]',
        'search_val': 'train[80%:]',
        'train': 'train',
        'eval': 'validation',
    },
    'cifar10': {
        'search_train': 'train[:80%]',
        'search_val': 'train[80%:]',
        'train': 'train',
        'eval': 'test',
    },
}

_PREPROCESS = {
    'imagenet2012': preprocess.preprocess_imagenet,
    'cifar10': preprocess.preprocess_cifar10,
}

# Shuffle buffer in still-encoded examples per process: about 1 GB of
# ImageNet JPEGs, and all of CIFAR-10 (a full shuffle).
_SHUFFLE_BUFFER = {'imagenet2012': 10_000, 'cifar10': 50_000}

# Tags that keep the shuffle and augmentation seeds independent.
_SHUFFLE_STREAM = 0
_AUGMENT_STREAM = 1


def _not_prepared_message(name: str, root: str) -> str:
  if name == 'imagenet2012':
    return (
        f'imagenet2012 is not prepared in {root}: it needs a manual download, '
        'put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar into '
        f'{root}/downloads/manual and run '
        f'`tfds build imagenet2012 --data_dir={root}`.')
  return (f'{name} is not prepared in {root}: run '
          f'`tfds build {name} --data_dir={root}` on a machine with internet '
          'access.')


def load_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  """The prepared dataset's builder; DataError if it still has to be built."""
  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    # builder.data_dir is <root>/<name>/<version>.
    root = os.path.dirname(os.path.dirname(builder.data_dir))
    raise common.DataError(_not_prepared_message(name, root))
  return builder


def dataset_info(name: str, data_dir: str | None) -> dict:
  builder = load_builder(name, data_dir)
  size = DEFAULT_IMAGE_SIZE[name]
  return {
      'num_classes': builder.info.features['label'].num_classes,
      'image_shape': (size, size, 3),
      'splits': {
          split: builder.info.splits[tfds_split].num_examples
          for split, tfds_split in _TFDS_SPLITS[name].items()
      },
  }


def _process_split(name: str, split: str, *, train: bool, process_index: int,
                   process_count: int):
  # Training drops the remainder so that every process runs the same number
  # of steps; eval keeps every example and pads instead.
  return tfds.split_for_jax_process(
      _TFDS_SPLITS[name][split], process_index=process_index,
      process_count=process_count, drop_remainder=train)


def _steps(builder: tfds.core.DatasetBuilder, name: str, split: str,
           local_batch: int, *, train: bool, process_count: int) -> int:
  total = builder.info.splits[_TFDS_SPLITS[name][split]].num_examples
  # Training shares are equal (floor); eval runs until the largest share,
  # which even_splits gives ceil(total / process_count) examples, is done.
  per_process = (total // process_count if train
                 else math.ceil(total / process_count))
  return common.num_batches(per_process, local_batch, train=train, split=split)


def steps_per_epoch(name: str, split: str, batch_size: int, *, train: bool,
                    data_dir: str | None, process_count: int) -> int:
  local_batch = common.local_batch_size(batch_size, process_count)
  return _steps(load_builder(name, data_dir), name, split, local_batch,
                train=train, process_count=process_count)


def _read(builder: tfds.core.DatasetBuilder, split,
          shuffle_seed: int | None) -> tf.data.Dataset:
  """Encoded examples; file order shuffled by shuffle_seed when given."""
  options = tf.data.Options()
  options.deterministic = True
  read_config = tfds.ReadConfig(
      shuffle_seed=shuffle_seed,
      options=options,
      # The pipeline is rebuilt every epoch, so a cache would never be reused.
      try_autocache=False)
  return builder.as_dataset(
      split=split,
      shuffle_files=shuffle_seed is not None,
      # Decoding happens in our preprocessing, after skipping: resuming deep
      # into an epoch then costs reading records, not decoding images.
      decoders={'image': tfds.decode.SkipDecoding()},
      read_config=read_config)


def _train_batches(builder: tfds.core.DatasetBuilder, split,
                   preprocess_fn: Callable, *, seed: int, start_step: int,
                   steps: int, local_batch: int, process_index: int,
                   shuffle_buffer: int) -> Iterator[dict[str, np.ndarray]]:
  records_per_epoch = steps * local_batch
  first_epoch, first_step = divmod(start_step, steps)
  for epoch in itertools.count(first_epoch):
    epoch_seed = common.derive_seed(seed, _SHUFFLE_STREAM, epoch)
    augment_seed = common.derive_seed(seed, _AUGMENT_STREAM, epoch,
                                      process_index)
    ds = _read(builder, split, shuffle_seed=epoch_seed)
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


def _eval_batches(builder: tfds.core.DatasetBuilder, split,
                  preprocess_fn: Callable, *, image_size: int, start_step: int,
                  steps: int,
                  local_batch: int) -> Iterator[dict[str, np.ndarray]]:
  ds = _read(builder, split, shuffle_seed=None)
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
      'image': tf.zeros([image_size, image_size, 3]),
      'label': tf.constant(0, tf.int32),
      'mask': tf.constant(0.0),
  }).repeat()
  ds = ds.concatenate(padding).take(max(0, steps - start_step) * local_batch)
  ds = ds.batch(local_batch).prefetch(tf.data.AUTOTUNE)
  return ds.as_numpy_iterator()


def make_batches(name: str, split: str, *, batch_size: int, image_size: int,
                 seed: int, start_step: int, train: bool, data_dir: str | None,
                 process_index: int,
                 process_count: int) -> Iterator[dict[str, np.ndarray]]:
  builder = load_builder(name, data_dir)
  local_batch = common.local_batch_size(batch_size, process_count)
  steps = _steps(builder, name, split, local_batch, train=train,
                 process_count=process_count)
  process_split = _process_split(name, split, train=train,
                                 process_index=process_index,
                                 process_count=process_count)
  preprocess_fn = functools.partial(_PREPROCESS[name], image_size=image_size,
                                    train=train)
  if train:
    return _train_batches(builder, process_split, preprocess_fn, seed=seed,
                          start_step=start_step, steps=steps,
                          local_batch=local_batch, process_index=process_index,
                          shuffle_buffer=_SHUFFLE_BUFFER[name])
  return _eval_batches(builder, process_split, preprocess_fn,
                       image_size=image_size, start_step=start_step,
                       steps=steps, local_batch=local_batch)
