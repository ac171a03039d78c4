"""HourNAS input pipeline: deterministic, resumable batches and mesh sharding.

Datasets: the offline 'digits' and 'cluttered_digits', 'imagenet2012' and
'cifar10' from TFDS, any other TFDS image classification dataset by name, and
'folder' (a directory of class folders of JPEG/PNG images, given as data_dir).

Splits: 'search_train' (first 80% of train, D_tr: supernet weights),
'search_val' (last 20%, D_val: architecture parameters), 'train' (all of it,
for retraining) and 'eval' (validation/test data).

Batch k of an iterator depends only on (dataset, split, batch_size,
image_size, seed, k), so a run killed at any point and restarted with
start_step=k continues with exactly the batches it would have seen.
"""

import collections
import itertools
from typing import Any, Iterable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hournas_jax.data import cluttered
from hournas_jax.data import common
from hournas_jax.data import digits

Batch = dict[str, np.ndarray]


def _tfds_pipeline():
  # Imported on first use so that the offline datasets never load TensorFlow.
  from hournas_jax.data import tfds_pipeline  # pylint: disable=g-import-not-at-top
  return tfds_pipeline


def _folder():
  from hournas_jax.data import folder  # pylint: disable=g-import-not-at-top
  return folder


def _offline(name: str):
  return {'digits': digits, 'cluttered_digits': cluttered}[name]


def dataset_info(name: str, data_dir: str | None = None,
                 options: common.DataOptions | None = None) -> dict[str, Any]:
  """num_classes, default image_shape (H, W, C) and the size of each split.

  For TFDS datasets this needs the prepared data (the split sizes come from
  its metadata) and a folder is indexed (every file's header is read); either
  raises DataError when the data cannot be used.
  """
  common.check_dataset(name)
  options = options or common.DataOptions()
  if name in common.OFFLINE_DATASETS:
    module = _offline(name)
    size = module.DEFAULT_IMAGE_SIZE
    return {
        'num_classes': module.NUM_CLASSES,
        'image_shape': (size, size, 1),
        'splits': {split: module.num_examples(split)
                   for split in common.SPLITS},
    }
  if name == common.FOLDER:
    return _folder().dataset_info(data_dir, options)
  common.check_options(options)
  return _tfds_pipeline().dataset_info(name, data_dir, options)


def steps_per_epoch(name: str, split: str, batch_size: int, *,
                    train: bool = True, data_dir: str | None = None,
                    options: common.DataOptions | None = None) -> int:
  """Batches per epoch of make_batches(name, split, batch_size, train=...).

  Training counts full batches only; eval counts the padded last batch.
  """
  common.check_dataset(name)
  common.check_split(split)
  options = options or common.DataOptions()
  if name in common.OFFLINE_DATASETS:
    common.local_batch_size(batch_size, jax.process_count())
    return _offline(name).steps_per_epoch(split, batch_size, train=train)
  kwargs = dict(train=train, process_count=jax.process_count(),
                options=options)
  if name == common.FOLDER:
    return _folder().steps_per_epoch(data_dir, split, batch_size, **kwargs)
  common.check_options(options)
  return _tfds_pipeline().steps_per_epoch(name, split, batch_size,
                                          data_dir=data_dir, **kwargs)


def make_batches(name: str, split: str, *, batch_size: int, image_size: int,
                 seed: int, start_step: int = 0, train: bool = True,
                 data_dir: str | None = None, channels: int | None = None,
                 options: common.DataOptions | None = None
                 ) -> Iterator[Batch]:
  """This process's share of each global batch, from batch start_step on.

  Args:
    name: 'imagenet2012', 'cifar10', 'digits', 'cluttered_digits', 'folder'
      or the name of a TFDS image classification dataset ('mnist', ...).
    split: 'search_train', 'search_val', 'train' or 'eval'.
    batch_size: global batch size, divisible by jax.process_count().
    image_size: output height and width.
    seed: non-negative run seed; fixes the order and the augmentation.
    start_step: index of the first batch to yield (for resuming).
    train: True gives an endless, shuffled, augmented stream of full batches
      (epoch e shuffled by (seed, e)); False gives one pass in a fixed order
      whose last batch is padded, with a float32 'mask' (1 real, 0 padding)
      in every batch so each example counts exactly once.
    data_dir: TFDS data directory (TFDS default when None); for 'folder' the
      directory of class folders; unused by the offline datasets.
    channels: 1 or 3, None for the dataset's own (imagenet2012 and cifar10
      are always RGB; the offline datasets default to 1).
    options: how TFDS-by-name and folder datasets are split and augmented
      (config.data); None for the defaults.

  Returns:
    Iterator of dicts: 'image' float32 (batch_size // process_count, H, W, C),
    'label' int32, and 'mask' for eval. Errors in the request raise DataError
    here, not on the first next().
  """
  common.check_dataset(name)
  common.check_split(split)
  common.check_channels(name, channels)
  options = options or common.DataOptions()
  if image_size <= 0:
    raise common.DataError(f'image_size must be positive, got {image_size}.')
  if seed < 0 or start_step < 0:
    raise common.DataError(
        f'seed and start_step must be non-negative, got seed={seed}, '
        f'start_step={start_step}.')
  kwargs = dict(batch_size=batch_size, image_size=image_size, seed=seed,
                start_step=start_step, train=train,
                process_index=jax.process_index(),
                process_count=jax.process_count())
  if name in common.OFFLINE_DATASETS:
    return _offline(name).make_batches(split, channels=channels or 1, **kwargs)
  if name == common.FOLDER:
    return _folder().make_batches(data_dir, split, channels=channels,
                                  options=options, **kwargs)
  common.check_options(options)
  return _tfds_pipeline().make_batches(name, split, data_dir=data_dir,
                                       channels=channels, options=options,
                                       **kwargs)


def prefetch_to_mesh(iterator: Iterable[Batch], mesh: Mesh,
                     size: int = 2) -> Iterator[dict[str, jax.Array]]:
  """Turns host-local batches into global arrays split along the batch axis.

  Keeps `size` batches already transferred, so copying the next batch to the
  devices overlaps with the step that consumes the current one.
  """
  sharding = NamedSharding(mesh, PartitionSpec('data'))
  data_axis_size = mesh.shape['data']
  process_count = jax.process_count()

  def to_global(batch: Batch) -> dict[str, jax.Array]:
    global_batch = len(next(iter(batch.values()))) * process_count
    if global_batch % data_axis_size:
      raise common.DataError(
          f'global batch {global_batch} does not split over the {data_axis_size}'
          f' devices of mesh axis "data"; use a batch_size divisible by '
          f'{data_axis_size}.')
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, x), batch)

  iterator = iter(iterator)
  queue = collections.deque(map(to_global, itertools.islice(iterator, size)))
  while queue:
    yield queue.popleft()
    queue.extend(map(to_global, itertools.islice(iterator, 1)))
