"""tf.data pipelines for TFDS datasets: imagenet2012, cifar10 and any other by name.

Any TFDS dataset with an Image feature 'image' and a ClassLabel 'label' can be
searched on. Its train split (config.data.train_split) gives D_tr (its first
80%), D_val (the rest) and 'train' (all of it); 'eval' is config.data.eval_split,
by default 'test', else 'validation' (imagenet2012: 'validation', its test
split has no labels). imagenet2012 and cifar10 keep their papers'
preprocessing; the others get preprocess.preprocess_image, picked by size.
Batching, resuming and sharding over processes are tf_batches'.
"""

import functools
import os
import re
from typing import Callable, Iterator

import numpy as np
import tensorflow as tf

# Imported before TFDS: it hides the accelerators from TensorFlow.
from hournas_jax.data import tf_batches

# pylint: disable=g-import-not-at-top,wrong-import-position,g-bad-import-order
import tensorflow_datasets as tfds

from hournas_jax.data import common
from hournas_jax.data import preprocess
# pylint: enable=g-import-not-at-top,wrong-import-position,g-bad-import-order

DEFAULT_IMAGE_SIZE = {'imagenet2012': 224, 'cifar10': 32}
# Default size for datasets whose images differ in size: ImageNet's.
VARIABLE_IMAGE_SIZE = 224

# Tried in order when config.data.eval_split is ''.
EVAL_SPLITS = ('test', 'validation')
_DEFAULT_EVAL_SPLIT = {'imagenet2012': 'validation'}

_PREPROCESS = {
    'imagenet2012': preprocess.preprocess_imagenet,
    'cifar10': preprocess.preprocess_cifar10,
}

# Shuffle buffer in still-encoded examples per process: about 1 GB of
# ImageNet JPEGs, and all of CIFAR-10 (a full shuffle).
_SHUFFLE_BUFFER = {'imagenet2012': 10_000, 'cifar10': 50_000}
_DEFAULT_SHUFFLE_BUFFER = 10_000

_PLAIN_SPLIT = re.compile(r'\w+')


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


def _check_features(name: str, features) -> None:
  image = features['image'] if 'image' in features else None
  label = features['label'] if 'label' in features else None
  if (not isinstance(image, tfds.features.Image)
      or not isinstance(label, tfds.features.ClassLabel)):
    keys = ', '.join(sorted(features.keys())) if hasattr(features, 'keys') else '?'
    raise common.DataError(
        f'{name} is not an image classification dataset here: it has the '
        f'features ({keys}), and HourNAS reads an Image feature named "image" '
        'and a ClassLabel feature named "label".')
  if len(image.shape) != 3:
    raise common.DataError(
        f'{name}\'s images have shape {image.shape}; HourNAS reads 2-D images '
        '(height, width, channels).')


def load_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  """The prepared dataset's builder; DataError if it is unknown, not an image
  classification dataset or still has to be built."""
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise common.DataError(
        f'Unknown dataset {name!r}: not one of {", ".join(common.DATASETS)} and '
        'not a dataset TFDS knows (`tfds build --help` and the TFDS catalog list '
        'them).') from None
  except (ValueError, AssertionError) as e:  # e.g. an unknown config or version
    first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise common.DataError(f'TFDS cannot open {name!r}: {first_line}') from None
  _check_features(name, builder.info.features)
  if not builder.is_prepared():
    # builder.data_dir is <root>/<name>/<version> (<root>/<name>/<config>/...
    # for a name with a config).
    root = builder.data_dir
    for _ in range(name.count('/') + 2):
      root = os.path.dirname(root)
    raise common.DataError(_not_prepared_message(name, root))
  return builder


def _pieces(builder: tfds.core.DatasetBuilder,
            spec: str) -> list[tuple[str, int, int]]:
  """A split spec ('train', 'train[:80%]+test') as (split, start, stop) pieces."""
  instruction = tfds.core.ReadInstruction.from_spec(spec)
  pieces = []
  for piece in instruction.to_absolute(builder.info.splits):
    size = builder.info.splits[piece.splitname].num_examples
    pieces.append((piece.splitname, piece.from_ or 0,
                   size if piece.to is None else piece.to))
  return pieces


def _checked_pieces(name: str, builder: tfds.core.DatasetBuilder, spec: str,
                    field: str) -> list[tuple[str, int, int]]:
  try:
    pieces = _pieces(builder, spec)
  except (ValueError, KeyError, AssertionError, TypeError):
    pieces = None
  if not pieces or not sum(stop - start for _, start, stop in pieces):
    raise common.DataError(
        f'{name} has no split {spec!r} (its splits: '
        f'{", ".join(builder.info.splits.keys())}); config.data.{field} takes a '
        'split name or a TFDS slice such as "train[:80%]".')
  return pieces


def _search_specs(train_spec: str,
                  pieces: list[tuple[str, int, int]]) -> tuple[str, str]:
  """D_tr and D_val: the first SEARCH_TRAIN_FRACTION of train_spec and the rest."""
  percent = round(100 * common.SEARCH_TRAIN_FRACTION)
  if _PLAIN_SPLIT.fullmatch(train_spec):
    return f'{train_spec}[:{percent}%]', f'{train_spec}[{percent}%:]'
  # A slice or a sum of splits: cut its pieces at the same point.
  cut = round(common.SEARCH_TRAIN_FRACTION *
              sum(stop - start for _, start, stop in pieces))
  first, rest = [], []
  for split, start, stop in pieces:
    middle = min(max(start + cut, start), stop)
    cut -= middle - start
    if middle > start:
      first.append(f'{split}[{start}:{middle}]')
    if stop > middle:
      rest.append(f'{split}[{middle}:{stop}]')
  return '+'.join(first), '+'.join(rest)


def _overlap(a: list[tuple[str, int, int]],
             b: list[tuple[str, int, int]]) -> bool:
  return any(sa == sb and max(start_a, start_b) < min(stop_a, stop_b)
             for sa, start_a, stop_a in a for sb, start_b, stop_b in b)


def split_specs(name: str, builder: tfds.core.DatasetBuilder,
                options: common.DataOptions) -> dict[str, str]:
  """The TFDS split spec of each of the project's splits."""
  available = list(builder.info.splits.keys())
  train_spec = options.train_split
  train_pieces = _checked_pieces(name, builder, train_spec, 'train_split')
  eval_spec = options.eval_split or _DEFAULT_EVAL_SPLIT.get(name) or next(
      (split for split in EVAL_SPLITS if split in available), None)
  if eval_spec is None:
    raise common.DataError(
        f'{name} has no test or validation split (its splits: '
        f'{", ".join(available)}); hold out part of its training data, e.g. '
        "--config.data.train_split='train[:80%]' "
        "--config.data.eval_split='train[80%:]'.")
  eval_pieces = _checked_pieces(name, builder, eval_spec, 'eval_split')
  if _overlap(train_pieces, eval_pieces):
    raise common.DataError(
        f'config.data.eval_split {eval_spec!r} overlaps config.data.train_split '
        f'{train_spec!r} of {name}, so the test data would be trained on; use '
        "disjoint slices such as 'train[:80%]' and 'train[80%:]'.")
  search_train, search_val = _search_specs(train_spec, train_pieces)
  return {'search_train': search_train, 'search_val': search_val,
          'train': train_spec, 'eval': eval_spec}


def native_shape(name: str,
                 builder: tfds.core.DatasetBuilder) -> tuple[int, int, int]:
  """The default (image_size, image_size, channels) to read the dataset at."""
  if name in DEFAULT_IMAGE_SIZE:
    size = DEFAULT_IMAGE_SIZE[name]
    return (size, size, 3)
  height, width, channels = builder.info.features['image'].shape
  size = (min(height, width) if height and width else VARIABLE_IMAGE_SIZE)
  # RGBA and unknown channel counts are read as RGB.
  return (size, size, 1 if channels == 1 else 3)


def dataset_info(name: str, data_dir: str | None,
                 options: common.DataOptions) -> dict:
  builder = load_builder(name, data_dir)
  specs = split_specs(name, builder, options)
  return {
      'num_classes': builder.info.features['label'].num_classes,
      'image_shape': native_shape(name, builder),
      'splits': {split: builder.info.splits[spec].num_examples
                 for split, spec in specs.items()},
  }


def _process_split(spec: str, *, train: bool, process_index: int,
                   process_count: int):
  # Training drops the remainder so that every process runs the same number
  # of steps; eval keeps every example and pads instead.
  return tfds.split_for_jax_process(
      spec, process_index=process_index, process_count=process_count,
      drop_remainder=train)


def _steps(builder: tfds.core.DatasetBuilder, spec: str, split: str,
           local_batch: int, *, train: bool, process_count: int) -> int:
  # even_splits cuts each piece of a spec separately: training shares are the
  # sums of equal (floor) shares; eval runs until the largest share is done.
  per_process = sum(
      common.examples_per_process(stop - start, process_count, train=train)
      for _, start, stop in _pieces(builder, spec))
  return common.num_batches(per_process, local_batch, train=train, split=split)


def steps_per_epoch(name: str, split: str, batch_size: int, *, train: bool,
                    data_dir: str | None, process_count: int,
                    options: common.DataOptions) -> int:
  local_batch = common.local_batch_size(batch_size, process_count)
  builder = load_builder(name, data_dir)
  spec = split_specs(name, builder, options)[split]
  return _steps(builder, spec, split, local_batch, train=train,
                process_count=process_count)


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
  ds = builder.as_dataset(
      split=split,
      shuffle_files=shuffle_seed is not None,
      # Decoding happens in our preprocessing, after skipping: resuming deep
      # into an epoch then costs reading records, not decoding images.
      decoders={'image': tfds.decode.SkipDecoding()},
      read_config=read_config)
  return ds.map(lambda example: {'image': example['image'],
                                 'label': example['label']})


def _preprocess_fn(name: str, *, image_size: int, channels: int, train: bool,
                   options: common.DataOptions) -> Callable:
  if name in _PREPROCESS:
    return functools.partial(_PREPROCESS[name], image_size=image_size,
                             train=train)

  def preprocess_fn(image_bytes, seed):
    return preprocess.preprocess_image(
        preprocess.decode_image(image_bytes, channels), seed,
        image_size=image_size, train=train,
        random_flip_on=options.random_flip)

  return preprocess_fn


def make_batches(name: str, split: str, *, batch_size: int, image_size: int,
                 seed: int, start_step: int, train: bool, data_dir: str | None,
                 process_index: int, process_count: int,
                 channels: int | None = None,
                 options: common.DataOptions | None = None
                 ) -> Iterator[dict[str, np.ndarray]]:
  options = options or common.DataOptions()
  builder = load_builder(name, data_dir)
  channels = channels or native_shape(name, builder)[2]
  local_batch = common.local_batch_size(batch_size, process_count)
  spec = split_specs(name, builder, options)[split]
  steps = _steps(builder, spec, split, local_batch, train=train,
                 process_count=process_count)
  read = functools.partial(
      _read, builder, _process_split(spec, train=train,
                                     process_index=process_index,
                                     process_count=process_count))
  preprocess_fn = _preprocess_fn(name, image_size=image_size,
                                 channels=channels, train=train,
                                 options=options)
  if train:
    return tf_batches.train_batches(
        read, preprocess_fn, seed=seed, start_step=start_step, steps=steps,
        local_batch=local_batch, process_index=process_index,
        shuffle_buffer=_SHUFFLE_BUFFER.get(name, _DEFAULT_SHUFFLE_BUFFER))
  return tf_batches.eval_batches(
      read, preprocess_fn, image_shape=(image_size, image_size, channels),
      start_step=start_step, steps=steps, local_batch=local_batch)
