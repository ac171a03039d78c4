"""A directory of class folders of JPEG/PNG images as a dataset (config.dataset=folder).

data_dir (DIR) holds one of two layouts:

  DIR/<class>/**/*.jpg|png       a test set is held out of every class:
                                 config.data.holdout_fraction of its images,
                                 drawn by config.data.split_seed
  DIR/train/<class>/...  and     the given test set (val/ or validation/ when
  DIR/test/<class>/...           there is no test/)

Classes are the folder names, sorted; label i is the i-th. 'train' is every
training image in an order shuffled by split_seed, D_tr its first 80% and D_val
the rest, as for the TFDS datasets. Every file's header is read when the folder
is indexed, so a file that is not a JPEG or PNG image is named before any
training starts; one that is damaged further in is named when it fails to
decode. Reading, batching and resuming are tf_batches'; images are decoded with
tf.io.decode_image and preprocessed by preprocess.preprocess_image, then
standardized with the folder's own pixel statistics (`pixel_statistics`).
"""

import dataclasses
import functools
import os
import struct
from typing import Iterator

import numpy as np
import tensorflow as tf

# Imported before anything else of TF's is used: it hides the accelerators.
from hournas_jax.data import tf_batches  # pylint: disable=g-bad-import-order
from hournas_jax.data import common
from hournas_jax.data import preprocess

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
TRAIN_FOLDER = 'train'
EVAL_FOLDERS = ('test', 'val', 'validation')
# Default output size: the images' median shorter side, at most ImageNet's.
MAX_DEFAULT_IMAGE_SIZE = 224
# Training images whose pixels give the standardization's mean and std: their
# spread between images is far wider than the error of a sample of this size.
STATISTICS_IMAGES = 512

LAYOUTS = ('DIR/<class>/*.jpg|png, or DIR/train/<class>/... with '
           'DIR/test/<class>/...')

# Tags that keep the random streams of the hold-out and the train order apart.
_HOLDOUT_STREAM = 0
_ORDER_STREAM = 1

_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
# JPEG start-of-frame markers: every one holds the image size.
_JPEG_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field.
_JPEG_STANDALONE_MARKERS = frozenset(range(0xD0, 0xD8)) | {0x01}
_JPEG_END_OR_SCAN = frozenset({0xD9, 0xDA})


class _BadImage(Exception):
  """A file whose header is not a JPEG's or PNG's; the message says why."""


def _png_header(head: bytes) -> tuple[int, int, int]:
  if len(head) < 26 or head[12:16] != b'IHDR':
    raise _BadImage('a PNG without its IHDR header')
  width, height = struct.unpack('>II', head[16:24])
  # Color types 0 and 4 are gray (without and with alpha).
  return height, width, 1 if head[25] in (0, 4) else 3


def _jpeg_header(f) -> tuple[int, int, int]:
  f.seek(2)
  while True:
    byte = f.read(1)
    if not byte:
      raise _BadImage('a JPEG that ends before its frame header')
    if byte != b'\xff':
      raise _BadImage('a JPEG with a broken marker')
    marker = f.read(1)
    while marker == b'\xff':  # fill bytes
      marker = f.read(1)
    if not marker:
      raise _BadImage('a JPEG that ends before its frame header')
    marker = marker[0]
    if marker in _JPEG_STANDALONE_MARKERS:
      continue
    if marker in _JPEG_END_OR_SCAN:
      raise _BadImage('a JPEG without a frame header')
    length_bytes = f.read(2)
    if len(length_bytes) < 2:
      raise _BadImage('a JPEG that ends before its frame header')
    length = struct.unpack('>H', length_bytes)[0]
    if marker in _JPEG_FRAME_MARKERS:
      frame = f.read(6)
      if len(frame) < 6:
        raise _BadImage('a JPEG with a cut-off frame header')
      height, width = struct.unpack('>HH', frame[1:5])
      return height, width, 1 if frame[5] == 1 else 3
    if length < 2:
      raise _BadImage('a JPEG with a broken segment')
    f.seek(length - 2, os.SEEK_CUR)


def image_header(path: str) -> tuple[int, int, int]:
  """(height, width, channels) from a JPEG or PNG file's header; DataError else."""
  try:
    with open(path, 'rb') as f:
      head = f.read(32)
      if not head:
        raise _BadImage('an empty file')
      if head.startswith(_PNG_SIGNATURE):
        shape = _png_header(head)
      elif head.startswith(b'\xff\xd8'):
        shape = _jpeg_header(f)
      else:
        raise _BadImage('neither JPEG nor PNG data')
  except OSError as e:
    raise common.DataError(f'{path}: cannot be read ({e.strerror}).') from None
  except _BadImage as e:
    raise common.DataError(
        f'{path}: not a readable image ({e}); dataset=folder reads JPEG and '
        'PNG files, fix or remove this one.') from None
  if not shape[0] or not shape[1]:
    raise common.DataError(
        f'{path}: not a readable image (its header says {shape[0]}x{shape[1]} '
        'pixels); fix or remove it.')
  return shape


def _class_images(class_dir: str) -> list[str]:
  """Every image under one class folder (sub-folders too), sorted; hidden
  files and folders are skipped, any other file is an error."""
  images = []
  for parent, dirs, files in os.walk(class_dir, followlinks=True):
    dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
    for file in sorted(files):
      if file.startswith('.'):
        continue
      path = os.path.join(parent, file)
      if not file.lower().endswith(IMAGE_EXTENSIONS):
        raise common.DataError(
            f'{path}: not an image file; a class folder may hold only '
            f'{", ".join(IMAGE_EXTENSIONS)} files (and hidden ones, which are '
            'skipped).')
      images.append(path)
  if not images:
    raise common.DataError(
        f'{class_dir}: a class folder with no images; each class needs at '
        f'least one {", ".join(IMAGE_EXTENSIONS)} file (remove the folder or '
        'add images).')
  return images


def _class_folders(directory: str) -> list[str]:
  return sorted(entry.name for entry in os.scandir(directory)
                if entry.is_dir() and not entry.name.startswith('.'))


@dataclasses.dataclass(frozen=True)
class _Listing:
  """The files of a folder dataset, before any split is drawn."""
  classes: tuple[str, ...]
  train: list[tuple[str, int]]        # (path, label), by class then path
  eval: list[tuple[str, int]] | None  # None: there is no test folder
  shapes: np.ndarray                  # (height, width, channels) of every file


def _listed(directory: str, classes: list[str],
            labels: dict[str, int]) -> list[tuple[str, int]]:
  return [(path, labels[name]) for name in classes
          for path in _class_images(os.path.join(directory, name))]


@functools.lru_cache(maxsize=8)
def _listing(root: str) -> _Listing:
  if not os.path.isdir(root):
    problem = 'not a directory' if os.path.exists(root) else 'no such directory'
    raise common.DataError(
        f'{root}: {problem}; dataset=folder reads data_dir=DIR laid out as '
        f'{LAYOUTS}.')
  train_dir = os.path.join(root, TRAIN_FOLDER)
  eval_dir = None
  if os.path.isdir(train_dir):
    eval_dir = next((os.path.join(root, name) for name in EVAL_FOLDERS
                     if os.path.isdir(os.path.join(root, name))), None)
  else:
    train_dir = root
  classes = _class_folders(train_dir)
  if not classes:
    raise common.DataError(
        f'{train_dir}: no class folders; dataset=folder reads data_dir=DIR laid '
        f'out as {LAYOUTS}.')
  labels = {name: label for label, name in enumerate(classes)}
  train = _listed(train_dir, classes, labels)
  eval_ = None
  if eval_dir is not None:
    eval_classes = _class_folders(eval_dir)
    unknown = [name for name in eval_classes if name not in labels]
    if unknown:
      raise common.DataError(
          f'{os.path.join(eval_dir, unknown[0])}: a test class with no '
          f'training folder in {train_dir}; the test classes must be among the '
          f'training classes ({", ".join(classes)}).')
    if not eval_classes:
      raise common.DataError(
          f'{eval_dir}: no class folders; the test images go into '
          f'{eval_dir}/<class>/, with the class names of {train_dir}.')
    eval_ = _listed(eval_dir, eval_classes, labels)
  shapes = np.array([image_header(path)
                     for path, _ in train + (eval_ or [])], np.int64)
  return _Listing(classes=tuple(classes), train=train, eval=eval_,
                  shapes=shapes)


@dataclasses.dataclass(frozen=True)
class FolderIndex:
  """A folder dataset's classes, default input shape and split files."""
  classes: tuple[str, ...]
  image_shape: tuple[int, int, int]
  splits: dict[str, tuple[np.ndarray, np.ndarray]]  # paths (str), labels


def _holdout(train: list[tuple[str, int]], fraction: float, split_seed: int,
             root: str) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
  """(kept, held out): `fraction` of each class held out, at least one image
  of every class with two or more, never its last one."""
  by_class = {}
  for path, label in train:
    by_class.setdefault(label, []).append((path, label))
  kept, held_out = [], []
  for label, files in sorted(by_class.items()):
    order = np.random.default_rng(
        [split_seed, _HOLDOUT_STREAM, label]).permutation(len(files))
    count = min(max(round(fraction * len(files)), 1), len(files) - 1)
    held_out += [files[i] for i in sorted(order[:count])]
    kept += [files[i] for i in sorted(order[count:])]
  if not held_out:
    raise common.DataError(
        f'{root}: no image can be held out for testing, every class has a '
        'single image; add images or give a test folder '
        f'({os.path.join(root, "test")}/<class>/).')
  return kept, held_out


def _as_arrays(files: list[tuple[str, int]]) -> tuple[np.ndarray, np.ndarray]:
  paths = np.array([path for path, _ in files], dtype=object).astype(str)
  labels = np.array([label for _, label in files], np.int32)
  return paths, labels


@functools.lru_cache(maxsize=8)
def _index(root: str, holdout_fraction: float, split_seed: int) -> FolderIndex:
  listing = _listing(root)
  train, eval_ = listing.train, listing.eval
  if eval_ is None:
    train, eval_ = _holdout(train, holdout_fraction, split_seed, root)
  # The files are listed class by class; D_tr and D_val take the first 80% /
  # the rest of a shuffled order so that both hold every class.
  order = np.random.default_rng([split_seed, _ORDER_STREAM]).permutation(
      len(train))
  train = [train[i] for i in order]
  cut = round(common.SEARCH_TRAIN_FRACTION * len(train))
  heights, widths, channels = listing.shapes.T
  size = int(min(MAX_DEFAULT_IMAGE_SIZE, np.median(np.minimum(heights,
                                                              widths))))
  return FolderIndex(
      classes=listing.classes,
      image_shape=(size, size, 1 if (channels == 1).all() else 3),
      splits={'search_train': _as_arrays(train[:cut]),
              'search_val': _as_arrays(train[cut:]),
              'train': _as_arrays(train),
              'eval': _as_arrays(eval_)})


def load_index(data_dir: str | None,
               options: common.DataOptions) -> FolderIndex:
  """The indexed folder (cached per process); DataError for any bad input."""
  if not data_dir:
    raise common.DataError(
        'dataset=folder reads the images in data_dir; set '
        f'--config.data_dir=DIR laid out as {LAYOUTS}.')
  common.check_options(options)
  return _index(os.path.abspath(os.path.expanduser(data_dir)),
                float(options.holdout_fraction), int(options.split_seed))


def dataset_info(data_dir: str | None, options: common.DataOptions) -> dict:
  index = load_index(data_dir, options)
  return {
      'num_classes': len(index.classes),
      'image_shape': index.image_shape,
      'splits': {split: len(paths)
                 for split, (paths, _) in index.splits.items()},
  }


@functools.lru_cache(maxsize=8)
def _pixel_statistics(root: str, holdout_fraction: float, split_seed: int,
                      channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
  index = _index(root, holdout_fraction, split_seed)
  # The training images' first ones in their shuffled order, so every class
  # counts and no test image does.
  paths = index.splits['train'][0][:STATISTICS_IMAGES]
  total = np.zeros(channels)
  squares = np.zeros(channels)
  count = 0
  for path in paths:
    try:
      image = preprocess.decode_image(tf.io.read_file(path), channels).numpy()
    except tf.errors.OpError as e:
      raise _undecodable(str(path), e.message) from None
    pixels = image.reshape(-1, channels).astype(np.float64)
    total += pixels.sum(axis=0)
    squares += np.square(pixels).sum(axis=0)
    count += len(pixels)
  mean = total / count
  # A constant channel would divide by zero: leave its scale alone.
  std = np.sqrt(np.maximum(squares / count - np.square(mean), 0.0))
  std = np.where(std < 1.0, 1.0, std)
  return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def pixel_statistics(data_dir: str | None, channels: int,
                     options: common.DataOptions
                     ) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(mean, std) per channel on the 0-255 scale of the folder's training images
  (the first STATISTICS_IMAGES of them), which standardize every image.

  Like the built-in digits, a folder is standardized with its own statistics,
  not ImageNet's: gray glyphs on black, X-rays or satellite images sit far from
  ImageNet's mean, and the stem then starts on inputs that are mostly offset.
  """
  load_index(data_dir, options)  # checks data_dir and the options
  return _pixel_statistics(os.path.abspath(os.path.expanduser(data_dir)),
                           float(options.holdout_fraction),
                           int(options.split_seed), int(channels))


def _steps(index: FolderIndex, split: str, local_batch: int, *, train: bool,
           process_count: int) -> int:
  per_process = common.examples_per_process(len(index.splits[split][0]),
                                            process_count, train=train)
  return common.num_batches(per_process, local_batch, train=train, split=split)


def steps_per_epoch(data_dir: str | None, split: str, batch_size: int, *,
                    train: bool, process_count: int,
                    options: common.DataOptions) -> int:
  local_batch = common.local_batch_size(batch_size, process_count)
  return _steps(load_index(data_dir, options), split, local_batch,
                train=train, process_count=process_count)


def first_unreadable(paths: np.ndarray, channels: int) -> tuple[str, str] | None:
  """(path, TF's reason) of the first file that does not decode, or None."""
  for path in paths:
    try:
      preprocess.decode_image(tf.io.read_file(path), channels)
    except tf.errors.OpError as e:
      return str(path), e.message.strip().splitlines()[0]
  return None


def _naming_bad_files(batches: tf_batches.Batches, paths: np.ndarray,
                      channels: int) -> tf_batches.Batches:
  # tf.data's error does not say which file failed; find it and say so.
  try:
    yield from batches
  except tf.errors.OpError:
    bad = first_unreadable(paths, channels)
    if bad is None:
      raise
    raise _undecodable(*bad) from None


def _undecodable(path: str, reason: str) -> common.DataError:
  return common.DataError(
      f'{path}: cannot be decoded ({reason.strip().splitlines()[0]}); '
      'dataset=folder reads JPEG and PNG files, fix or remove this one.')


def make_batches(data_dir: str | None, split: str, *, batch_size: int,
                 image_size: int, seed: int, start_step: int, train: bool,
                 process_index: int, process_count: int,
                 channels: int | None = None,
                 options: common.DataOptions | None = None
                 ) -> Iterator[dict[str, np.ndarray]]:
  options = options or common.DataOptions()
  index = load_index(data_dir, options)
  channels = channels or index.image_shape[2]
  local_batch = common.local_batch_size(batch_size, process_count)
  steps = _steps(index, split, local_batch, train=train,
                 process_count=process_count)
  mean, stddev = pixel_statistics(data_dir, channels, options)
  paths, labels = index.splits[split]
  share = common.process_share(len(paths), process_index, process_count,
                               drop_remainder=train)
  paths, labels = paths[share], labels[share]

  def read(shuffle_seed: int | None) -> tf.data.Dataset:
    order = (np.arange(len(paths)) if shuffle_seed is None else
             np.random.default_rng(shuffle_seed).permutation(len(paths)))
    return tf.data.Dataset.from_tensor_slices({'image': paths[order],
                                               'label': labels[order]})

  def preprocess_fn(path, seed):
    image = preprocess.decode_image(tf.io.read_file(path), channels)
    return preprocess.preprocess_image(image, seed, image_size=image_size,
                                       train=train,
                                       random_flip_on=options.random_flip,
                                       mean=mean, stddev=stddev)

  if train:
    # read() already gives a full permutation: no shuffle buffer needed.
    batches = tf_batches.train_batches(
        read, preprocess_fn, seed=seed, start_step=start_step, steps=steps,
        local_batch=local_batch, process_index=process_index,
        shuffle_buffer=0)
  else:
    batches = tf_batches.eval_batches(
        read, preprocess_fn, image_shape=(image_size, image_size, channels),
        start_step=start_step, steps=steps, local_batch=local_batch)
  return _naming_bad_files(batches, paths, channels)
