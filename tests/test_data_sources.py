"""Tests for the general image sources: any TFDS dataset by name and folders of images.

Folders are written to tmp_path as tiny PNG/JPEG files whose pixel value encodes
the image's id (class * 10 + index), so a batch says which images it holds.
TFDS datasets by name run under tfds.testing.mock_data with split sizes written
to tmp_path, and on a small prepared dataset whose label is the example's id.
"""

import itertools
import os

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import quickstart
from hournas_jax import data, errors, spaces, train
from hournas_jax.data import folder, preprocess
from spaces_for_tests import TOY_TABLE, tiny_config

CLASSES = ('cherry', 'apple', 'banana')  # labels by sorted name: apple 0, banana 1, cherry 2
PER_CLASS = 10


def take(iterator, count):
  return list(itertools.islice(iterator, count))


def assert_batches_equal(actual, expected):
  assert actual.keys() == expected.keys()
  for key in expected:
    np.testing.assert_array_equal(actual[key], expected[key], err_msg=key)


def image_id(label: int, index: int) -> int:
  return label * PER_CLASS + index


def write_image(path, image: np.ndarray) -> None:
  image = tf.constant(image, tf.uint8)
  encoded = (tf.io.encode_png(image) if str(path).endswith('.png')
             else tf.io.encode_jpeg(image, quality=100))
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(encoded.numpy())


def write_folder(root, *, classes=CLASSES, per_class=PER_CLASS, size=12,
                 channels=3, suffix='.png'):
  """root/<class>/<i>.png, each image filled with 8 * its id (unique below 32 ids)."""
  for label, name in enumerate(sorted(classes)):
    for index in range(per_class):
      value = 8 * image_id(label, index) % 256
      write_image(root / name / f'{index:02d}{suffix}',
                  np.full((size, size, channels), value, np.uint8))
  return str(root)


def ids_of(images: np.ndarray, root: str) -> np.ndarray:
  """The ids in a batch of preprocessed images of the folder `root` (median: padding is 0)."""
  mean, std = folder.pixel_statistics(root, images.shape[-1], data.DataOptions())
  pixels = images[..., 0] * std[0] + mean[0]
  return np.round(np.median(pixels.reshape(len(images), -1), axis=1) / 8).astype(int)


def one_pass(name, split, data_dir, batch_size=4, **kwargs):
  batches = list(data.make_batches(name, split, batch_size=batch_size,
                                   image_size=12, seed=0, train=False,
                                   data_dir=data_dir, **kwargs))
  mask = np.concatenate([b['mask'] for b in batches]) == 1
  return batches, mask


@pytest.fixture(scope='module')
def flowers(tmp_path_factory):
  return write_folder(tmp_path_factory.mktemp('folder'))


# --------------------------------------------------------------------------------------------
# Folders: classes, splits, batches.


def test_folder_classes_labels_and_split_sizes(flowers):
  info = data.dataset_info('folder', flowers)
  assert info['num_classes'] == 3 and info['image_shape'] == (12, 12, 3)
  assert info['splits'] == {'search_train': 19, 'search_val': 5, 'train': 24, 'eval': 6}
  index = folder.load_index(flowers, data.DataOptions())
  assert index.classes == ('apple', 'banana', 'cherry')
  for paths, labels in index.splits.values():
    for path, label in zip(paths, labels):
      assert os.path.basename(os.path.dirname(path)) == index.classes[label]
  paths = {split: set(paths) for split, (paths, _) in index.splits.items()}
  assert paths['search_train'] | paths['search_val'] == paths['train']
  assert not paths['search_train'] & paths['search_val']
  assert not paths['train'] & paths['eval']
  assert len(paths['train'] | paths['eval']) == 30
  # Held out per class: 2 of each class's 10.
  np.testing.assert_array_equal(np.bincount(index.splits['eval'][1]), [2, 2, 2])


def test_folder_holdout_is_fixed_by_split_seed(flowers):
  def eval_paths(split_seed, fraction=0.2):
    options = data.DataOptions(split_seed=split_seed, holdout_fraction=fraction)
    return set(folder.load_index(flowers, options).splits['eval'][0])

  assert eval_paths(0) == eval_paths(0)
  assert eval_paths(0) != eval_paths(1) and len(eval_paths(1)) == 6
  assert len(eval_paths(3, fraction=0.5)) == 15
  # The run seed does not move the test set: it is not an input of the index.
  ids = [ids_of(np.concatenate([b['image'] for b in batches]), flowers)[mask]
         for batches, mask in (one_pass('folder', 'eval', flowers),) * 2]
  np.testing.assert_array_equal(*ids)


def test_folder_eval_pass_holds_each_test_image_once_with_its_label(flowers):
  batches, mask = one_pass('folder', 'eval', flowers)
  assert len(batches) == data.steps_per_epoch('folder', 'eval', 4, train=False,
                                              data_dir=flowers) == 2
  np.testing.assert_array_equal(mask, np.arange(8) < 6)
  images = np.concatenate([b['image'] for b in batches])
  labels = np.concatenate([b['label'] for b in batches])
  assert images.shape == (8, 12, 12, 3) and images.dtype == np.float32
  assert not images[~mask].any()
  ids = ids_of(images[mask], flowers)
  np.testing.assert_array_equal(ids // PER_CLASS, labels[mask])
  held_out = folder.load_index(flowers, data.DataOptions()).splits['eval'][0]
  np.testing.assert_array_equal(
      sorted(ids),
      sorted(image_id(['apple', 'banana', 'cherry'].index(p.split(os.sep)[-2]),
                      int(os.path.basename(p)[:2])) for p in held_out))


def test_folder_train_batches_epochs_and_resume(flowers):
  kwargs = dict(batch_size=4, image_size=12, seed=5, data_dir=flowers)
  steps = data.steps_per_epoch('folder', 'search_train', 4, data_dir=flowers)
  assert steps == 19 // 4
  run = take(data.make_batches('folder', 'search_train', **kwargs), 2 * steps + 1)
  batch = run[0]
  assert batch.keys() == {'image', 'label'}
  assert batch['image'].shape == (4, 12, 12, 3) and batch['image'].dtype == np.float32
  assert batch['label'].dtype == np.int32 and set(batch['label']) <= {0, 1, 2}
  assert np.isfinite(batch['image']).all() and np.abs(batch['image']).max() < 3
  for b in run:
    np.testing.assert_array_equal(ids_of(b['image'], flowers) // PER_CLASS, b['label'])
  first = np.concatenate([ids_of(b['image'], flowers) for b in run[:steps]])
  second = np.concatenate([ids_of(b['image'], flowers) for b in run[steps:2 * steps]])
  assert len(set(first)) == 16 and not np.array_equal(first, second)
  for start_step in (1, steps, steps + 1):
    resumed = take(data.make_batches('folder', 'search_train', start_step=start_step,
                                     **kwargs), 1)
    assert_batches_equal(resumed[0], run[start_step])
  other_seed = next(data.make_batches('folder', 'search_train', **{**kwargs, 'seed': 6}))
  assert not np.array_equal(other_seed['image'], batch['image'])


def test_folder_process_shares_are_disjoint(flowers, monkeypatch):
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  train_shares, eval_shares = [], []
  for index in range(2):
    monkeypatch.setattr(jax, 'process_index', lambda index=index: index)
    assert data.steps_per_epoch('folder', 'train', 4, data_dir=flowers) == 12 // 2
    batches = take(data.make_batches('folder', 'train', batch_size=4, image_size=12, seed=1,
                                     data_dir=flowers), 6)
    assert batches[0]['image'].shape == (2, 12, 12, 3)
    train_shares.append(set(ids_of(np.concatenate([b['image'] for b in batches]), flowers)))
    batches, mask = one_pass('folder', 'eval', flowers, batch_size=2)
    eval_shares.append(ids_of(np.concatenate([b['image'] for b in batches])[mask], flowers))
  assert len(train_shares[0]) == len(train_shares[1]) == 12
  assert not train_shares[0] & train_shares[1]
  assert len(eval_shares[0]) == len(eval_shares[1]) == 3
  assert not set(eval_shares[0]) & set(eval_shares[1])


def test_folder_with_train_and_test_folders(tmp_path):
  write_folder(tmp_path / 'train', per_class=8)
  # The test images: the same classes, ids 8 and 9.
  for label, name in enumerate(sorted(CLASSES)):
    for index in (8, 9):
      write_image(tmp_path / 'test' / name / f'{index}.png',
                  np.full((12, 12, 3), 8 * image_id(label, index), np.uint8))
  info = data.dataset_info('folder', str(tmp_path), data.DataOptions(holdout_fraction=0.5))
  assert info['num_classes'] == 3
  assert info['splits'] == {'search_train': 19, 'search_val': 5, 'train': 24, 'eval': 6}
  batches, mask = one_pass('folder', 'eval', str(tmp_path))
  ids = ids_of(np.concatenate([b['image'] for b in batches])[mask], str(tmp_path))
  assert sorted(ids % PER_CLASS) == [8, 8, 8, 9, 9, 9]


def test_folder_is_standardized_with_its_training_images_statistics(tmp_path):
  """Mean and std per channel of the training images only (a test image as bright as 255
  moves nothing); the eval images come out standardized by them."""
  write_folder(tmp_path / 'train', per_class=8, channels=1)
  for name in CLASSES:
    write_image(tmp_path / 'test' / name / '0.png', np.full((12, 12, 1), 255, np.uint8))
  values = np.array([8 * image_id(label, index) for label in range(3) for index in range(8)],
                    float)
  mean, std = folder.pixel_statistics(str(tmp_path), 1, data.DataOptions())
  assert mean == pytest.approx((values.mean(),)) and std == pytest.approx((values.std(),))
  batches, mask = one_pass('folder', 'eval', str(tmp_path))
  images = np.concatenate([b['image'] for b in batches])[mask]
  np.testing.assert_allclose(images, (255 - values.mean()) / values.std(), rtol=1e-5)


def test_folder_of_gray_jpegs_and_channel_conversion(tmp_path):
  root = write_folder(tmp_path, channels=1, suffix='.jpg', size=20)
  assert data.dataset_info('folder', root)['image_shape'] == (20, 20, 1)
  gray = next(data.make_batches('folder', 'train', batch_size=4, image_size=12, seed=0,
                                data_dir=root))
  assert gray['image'].shape == (4, 12, 12, 1)
  np.testing.assert_array_equal(ids_of(gray['image'], root) // PER_CLASS, gray['label'])
  rgb = next(data.make_batches('folder', 'train', batch_size=4, image_size=12, seed=0,
                               data_dir=root, channels=3))
  assert rgb['image'].shape == (4, 12, 12, 3)
  np.testing.assert_array_equal(rgb['label'], gray['label'])


def test_mixed_sizes_default_to_the_median_shorter_side(tmp_path):
  for index, (height, width) in enumerate([(30, 40), (50, 20), (90, 90)]):
    write_image(tmp_path / 'a' / f'{index}.jpg', np.zeros((height, width, 3), np.uint8))
    write_image(tmp_path / 'b' / f'{index}.png', np.zeros((height, width, 3), np.uint8))
  assert data.dataset_info('folder', str(tmp_path))['image_shape'] == (30, 30, 3)
  assert folder.image_header(str(tmp_path / 'a' / '1.jpg')) == (50, 20, 3)


# --------------------------------------------------------------------------------------------
# Folders: bad input, one line each.


def bad_folder_cases(tmp_path):
  cases = {}
  cases['missing'] = (str(tmp_path / 'nowhere'), 'no such directory')
  (tmp_path / 'a_file').write_text('x')
  cases['file'] = (str(tmp_path / 'a_file'), 'not a directory')
  (tmp_path / 'no_classes').mkdir()
  (tmp_path / 'no_classes' / 'LICENSE.txt').write_text('x')
  cases['no_classes'] = (str(tmp_path / 'no_classes'), 'no class folders')
  root = tmp_path / 'empty_class'
  write_folder(root, classes=('a',), per_class=2)
  (root / 'b').mkdir()
  cases['empty_class'] = (str(root), 'empty_class/b: a class folder with no images')
  root = tmp_path / 'text'
  write_folder(root, classes=('a', 'b'), per_class=2)
  (root / 'b' / 'notes.txt').write_text('x')
  cases['text'] = (str(root), 'notes.txt: not an image file')
  root = tmp_path / 'garbage'
  write_folder(root, classes=('a', 'b'), per_class=2)
  (root / 'b' / 'broken.png').write_bytes(b'this is not an image' * 4)
  cases['garbage'] = (str(root), 'broken.png: not a readable image (neither JPEG nor PNG')
  root = tmp_path / 'empty_file'
  write_folder(root, classes=('a', 'b'), per_class=2)
  (root / 'a' / 'zero.jpg').write_bytes(b'')
  cases['empty_file'] = (str(root), 'zero.jpg: not a readable image (an empty file)')
  root = tmp_path / 'cut_jpeg'
  write_folder(root, classes=('a', 'b'), per_class=2)
  (root / 'a' / 'cut.jpg').write_bytes(b'\xff\xd8\xff\xe0\x00\x10JFIF')
  cases['cut_jpeg'] = (str(root), 'cut.jpg: not a readable image (a JPEG that ends')
  root = tmp_path / 'unknown_test_class'
  write_folder(root / 'train', classes=('a', 'b'), per_class=2)
  write_folder(root / 'test', classes=('a', 'z'), per_class=1)
  cases['unknown_test_class'] = (str(root), 'test/z: a test class with no training folder')
  root = tmp_path / 'singletons'
  write_folder(root, classes=('a', 'b'), per_class=1)
  cases['singletons'] = (str(root), 'no image can be held out')
  return cases


def test_bad_folders_are_one_line_errors(tmp_path):
  for case, (root, match) in bad_folder_cases(tmp_path).items():
    with pytest.raises(data.DataError) as error:
      data.dataset_info('folder', root)
    message = str(error.value)
    assert match in message, (case, message)
    assert '\n' not in message, case
    # make_batches raises at the call, before any batch is asked for.
    with pytest.raises(data.DataError, match='folder|directory|image|class|held out'):
      data.make_batches('folder', 'train', batch_size=2, image_size=12, seed=0, data_dir=root)
  with pytest.raises(data.DataError, match='set --config.data_dir=DIR'):
    data.dataset_info('folder', None)


def test_image_that_fails_to_decode_is_named(tmp_path):
  root = write_folder(tmp_path, classes=('a', 'b'), per_class=6)
  good = tf.io.encode_png(tf.zeros([12, 12, 3], tf.uint8)).numpy()
  # A valid header, then the data stops.
  (tmp_path / 'b' / 'truncated.png').write_bytes(good[:40])
  info = data.dataset_info('folder', root)  # the header reads fine
  assert info['splits']['train'] + info['splits']['eval'] == 13
  for split, train_mode in (('train', True), ('eval', False)):
    with pytest.raises(data.DataError) as error:
      list(itertools.islice(data.make_batches(
          'folder', split, batch_size=2, image_size=12, seed=0, data_dir=root,
          train=train_mode), 20))
    if 'truncated.png' not in str(error.value):
      continue  # the file is in the other split
    assert 'b/truncated.png: cannot be decoded' in str(error.value)
    assert '\n' not in str(error.value)
    break
  else:
    pytest.fail('truncated.png was never named')


# --------------------------------------------------------------------------------------------
# Names, config and options.


def test_data_error_is_a_user_error_and_a_value_error():
  assert issubclass(data.DataError, errors.UserError)
  assert issubclass(data.DataError, ValueError)


def test_check_config_accepts_any_tfds_name_and_rejects_bad_fields():
  config = quickstart.get_config()
  for name in ('digits', 'cifar10', 'mnist', 'oxford_flowers102', 'imagenet_resized/32x32'):
    config.dataset = name
    config.channels = 3
    data.check_config(config)
  bad = [
      ({'dataset': 'two words'}, 'Unknown dataset'),
      ({'dataset': 'cifar10', 'channels': 1}, 'config.channels must be one of (0, 3)'),
      ({'dataset': 'mnist', 'channels': 2}, 'config.channels must be one of (0, 1, 3)'),
      ({'dataset': 'folder', 'data_dir': ''}, 'config.data_dir=DIR'),
      ({'data.holdout_fraction': 1.0}, 'holdout_fraction must be in (0, 1)'),
      ({'data.split_seed': -1}, 'split_seed must be a non-negative integer'),
      ({'data.train_split': ''}, 'train_split must name a split'),
  ]
  for overrides, match in bad:
    config = quickstart.get_config()
    config.update_from_flattened_dict(overrides)
    with pytest.raises(data.DataError) as error:
      train.validate_config(config)
    assert match in str(error.value), overrides
  config = quickstart.get_config()
  config.data.split_seed, config.data.eval_split = 3, 'test[:50%]'
  assert data.options_from_config(config) == data.DataOptions(
      split_seed=3, eval_split='test[:50%]')


def test_preprocess_image_recipes_by_size():
  image = tf.constant(np.random.default_rng(0).integers(0, 255, (40, 30, 3)), tf.uint8)
  seed = tf.constant([3, 4], tf.int64)
  for size in (16, preprocess.SMALL_IMAGE_SIZE + 8):
    out = preprocess.preprocess_image(image, seed, image_size=size, train=True)
    assert out.shape == (size, size, 3) and out.dtype == tf.float32
    np.testing.assert_array_equal(
        out, preprocess.preprocess_image(image, seed, image_size=size, train=True))
    evaluated = preprocess.preprocess_image(image, None, image_size=size, train=False)
    assert evaluated.shape == (size, size, 3)
  # Left half dark, right half bright: flips show as a bright left side.
  halves = np.zeros((12, 12, 1), np.uint8)
  halves[:, 6:] = 255

  def flipped(seed_value, flip):
    out = preprocess.preprocess_image(tf.constant(halves), tf.constant([seed_value, 0],
                                                                        tf.int64),
                                      image_size=12, train=True, random_flip_on=flip).numpy()
    return out[:, :3].mean() > out[:, -3:].mean()

  assert any(flipped(s, True) for s in range(8))
  assert not any(flipped(s, False) for s in range(8))


# --------------------------------------------------------------------------------------------
# TFDS datasets by name.


def write_tfds_metadata(data_dir, name, split_sizes):
  """The split sizes mock_data reads (it fakes the examples)."""
  builder = tfds.builder(name, data_dir=str(data_dir))
  template = tfds.core.ShardedFileTemplate(data_dir=builder.data_dir, dataset_name=name,
                                           filetype_suffix='tfrecord')
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=split, shard_lengths=[count], num_bytes=0,
                          filename_template=template)
      for split, count in split_sizes.items()]))
  os.makedirs(builder.data_dir, exist_ok=True)
  builder.info.write_to_directory(builder.data_dir)


@pytest.fixture(scope='module')
def mock_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('tfds_metadata')
  write_tfds_metadata(root, 'mnist', {'train': 30, 'test': 10})
  write_tfds_metadata(root, 'tf_flowers', {'train': 20})
  return str(root)


def test_mnist_by_name_is_gray_with_metadata_classes_and_splits(mock_dir):
  with tfds.testing.mock_data(num_examples=30, data_dir=mock_dir):
    info = data.dataset_info('mnist', mock_dir)
    assert info == {'num_classes': 10, 'image_shape': (28, 28, 1),
                    'splits': {'search_train': 24, 'search_val': 6, 'train': 30, 'eval': 10}}
    assert data.steps_per_epoch('mnist', 'search_train', 8, data_dir=mock_dir) == 3
    batch = next(data.make_batches('mnist', 'search_train', batch_size=8, image_size=28,
                                   seed=0, data_dir=mock_dir))
    rgb = next(data.make_batches('mnist', 'eval', batch_size=8, image_size=16, seed=0,
                                 data_dir=mock_dir, train=False, channels=3))
  assert batch['image'].shape == (8, 28, 28, 1) and batch['image'].dtype == np.float32
  assert batch['label'].dtype == np.int32 and batch['label'].max() < 10
  assert rgb['image'].shape == (8, 16, 16, 3) and rgb['mask'].sum() == 8


def test_dataset_with_only_a_train_split_needs_a_held_out_slice(mock_dir):
  with tfds.testing.mock_data(num_examples=20, data_dir=mock_dir):
    with pytest.raises(data.DataError) as error:
      data.dataset_info('tf_flowers', mock_dir)
    assert "--config.data.eval_split='train[80%:]'" in str(error.value)
    assert 'its splits: train' in str(error.value) and '\n' not in str(error.value)
    options = data.DataOptions(train_split='train[:80%]', eval_split='train[80%:]')
    info = data.dataset_info('tf_flowers', mock_dir, options)
    assert info['num_classes'] == 5 and info['image_shape'] == (224, 224, 3)
    assert info['splits'] == {'search_train': 13, 'search_val': 3, 'train': 16, 'eval': 4}
    batch = next(data.make_batches('tf_flowers', 'search_train', batch_size=4, image_size=16,
                                   seed=0, data_dir=mock_dir, options=options))
    assert batch['image'].shape == (4, 16, 16, 3)
    with pytest.raises(data.DataError, match='overlaps config.data.train_split'):
      data.dataset_info('tf_flowers', mock_dir, data.DataOptions(eval_split='train[80%:]'))
    with pytest.raises(data.DataError, match="has no split 'validation'"):
      data.dataset_info('tf_flowers', mock_dir, data.DataOptions(eval_split='validation'))


def test_unknown_unprepared_and_non_image_datasets_are_one_line_errors(tmp_path):
  cases = [('no_such_dataset_hournas', 'not a dataset TFDS knows'),
           ('mnist', f'mnist is not prepared in {tmp_path}: run `tfds build mnist'),
           ('imdb_reviews', 'not an image classification dataset here: it has the '
                            'features (label, text)')]
  for name, match in cases:
    with pytest.raises(data.DataError) as error:
      data.make_batches(name, 'train', batch_size=4, image_size=16, seed=0,
                        data_dir=str(tmp_path))
    assert match in str(error.value) and '\n' not in str(error.value)


class HournasGrayIds(tfds.core.GeneratorBasedBuilder):
  """A real, sharded gray dataset (registered as 'hournas_gray_ids'); label = example id."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(10, 10, 1)),
            'label': tfds.features.ClassLabel(num_classes=128),
        }))

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {'train': self._generate_examples(50, first_id=0),
            'test': self._generate_examples(10, first_id=100)}

  def _generate_examples(self, count, first_id):
    for example_id in range(first_id, first_id + count):
      yield example_id, {'image': np.full((10, 10, 1), example_id, np.uint8),
                         'label': example_id}


@pytest.fixture(scope='module')
def gray_ids_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  HournasGrayIds(data_dir=data_dir, file_format='tfrecord').download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          num_shards=3, compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return data_dir


def labels_of(batches, mask=None):
  labels = np.concatenate([b['label'] for b in batches])
  return labels if mask is None else labels[mask]


def test_tfds_by_name_resumes_and_shards_over_processes(gray_ids_dir, monkeypatch):
  info = data.dataset_info('hournas_gray_ids', gray_ids_dir)
  assert info['num_classes'] == 128 and info['image_shape'] == (10, 10, 1)
  kwargs = dict(batch_size=8, image_size=10, seed=4, data_dir=gray_ids_dir)
  steps = data.steps_per_epoch('hournas_gray_ids', 'search_train', 8, data_dir=gray_ids_dir)
  assert steps == 40 // 8
  run = take(data.make_batches('hournas_gray_ids', 'search_train', **kwargs), 2 * steps + 1)
  assert run[0]['image'].shape == (8, 10, 10, 1)
  for start_step in (2, steps, steps + 1):
    resumed = next(data.make_batches('hournas_gray_ids', 'search_train',
                                     start_step=start_step, **kwargs))
    assert_batches_equal(resumed, run[start_step])
  first_epoch = labels_of(run[:steps])
  assert len(set(first_epoch)) == 40 and max(first_epoch) < 50
  val_batches, mask = one_pass('hournas_gray_ids', 'search_val', gray_ids_dir)
  assert not set(labels_of(val_batches, mask)) & set(first_epoch)
  eval_batches, mask = one_pass('hournas_gray_ids', 'eval', gray_ids_dir)
  np.testing.assert_array_equal(sorted(labels_of(eval_batches, mask)), range(100, 110))

  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  shares = []
  for index in range(2):
    monkeypatch.setattr(jax, 'process_index', lambda index=index: index)
    shares.append(set(labels_of(take(data.make_batches(
        'hournas_gray_ids', 'search_train', **kwargs), 40 // 8))))
  assert len(shares[0]) == len(shares[1]) == 20 and not shares[0] & shares[1]


def test_tfds_slices_and_sums_of_splits(gray_ids_dir):
  options = data.DataOptions(train_split='train[:30]+test[:4]', eval_split='test[4:]')
  info = data.dataset_info('hournas_gray_ids', gray_ids_dir, options)
  assert info['splits'] == {'search_train': 27, 'search_val': 7, 'train': 34, 'eval': 6}

  def ids(split):
    batches = list(data.make_batches('hournas_gray_ids', split, batch_size=4, image_size=10,
                                     seed=0, train=False, data_dir=gray_ids_dir,
                                     options=options))
    mask = np.concatenate([b['mask'] for b in batches]) == 1
    return set(labels_of(batches, mask))

  search_train, search_val, train_ids, eval_ids = map(
      ids, ('search_train', 'search_val', 'train', 'eval'))
  assert search_train | search_val == train_ids and not search_train & search_val
  assert len(train_ids) == 34 and len(eval_ids) == 6 and not train_ids & eval_ids
  assert len(train_ids & set(range(100, 110))) == 4


# --------------------------------------------------------------------------------------------
# End to end.


def test_search_and_retrain_on_a_folder(tmp_path, monkeypatch):
  monkeypatch.setitem(spaces.SPACE_TABLES, 'toy', TOY_TABLE)
  root = write_folder(tmp_path / 'images', per_class=20, size=16)
  config = tiny_config(dataset='folder', data_dir=root, image_size=0, channels=0,
                       tensorboard=False)
  config.train.eval_batch_size = 8
  summary = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert set(summary['search']['ops']) == set(spaces.get_space(
      'toy', resolution=16, num_classes=3).searchable_names)
  # 4 of each class's 20 images held out: every one evaluated once.
  assert summary['train']['examples'] == 12 and summary['train']['steps'] == 4
  assert 0.0 <= summary['train']['top1'] <= 1.0
