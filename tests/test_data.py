"""Tests for hournas_jax.data: splits, determinism/resume, preprocessing, mesh."""

import itertools
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hournas_jax import data
from hournas_jax.data import digits
from hournas_jax.data import preprocess

TESTDATA = pathlib.Path(__file__).parent / 'testdata'
REPO_ROOT = pathlib.Path(__file__).parent.parent


def take(iterator, count):
  return list(itertools.islice(iterator, count))


def assert_batches_equal(actual, expected):
  assert actual.keys() == expected.keys()
  for key in expected:
    np.testing.assert_array_equal(actual[key], expected[key], err_msg=key)


def jpeg_bytes(image: np.ndarray) -> tf.Tensor:
  return tf.io.encode_jpeg(tf.constant(image, tf.uint8), quality=100)


def synthetic_image(height: int, width: int) -> np.ndarray:
  """An RGB image whose pixels all differ, so crops and flips are visible."""
  rows = np.arange(height)[:, None] * 255 // max(height - 1, 1)
  cols = np.arange(width)[None, :] * 255 // max(width - 1, 1)
  return np.stack(
      [np.broadcast_to(rows, (height, width)),
       np.broadcast_to(cols, (height, width)),
       np.full((height, width), 128)], axis=-1).astype(np.uint8)


# --------------------------------------------------------------------------
# digits


@pytest.mark.parametrize('image_size,channels', [(16, None), (32, 3)])
def test_digits_batch_shapes_dtypes_and_labels(image_size, channels):
  batch = next(data.make_batches('digits', 'search_train', batch_size=64,
                                 image_size=image_size, seed=0,
                                 channels=channels))
  assert batch.keys() == {'image', 'label'}
  assert batch['image'].shape == (64, image_size, image_size, channels or 1)
  assert batch['image'].dtype == np.float32
  assert batch['label'].dtype == np.int32
  assert batch['label'].min() >= 0 and batch['label'].max() < 10
  # Standardized with the train split's statistics: roughly centered.
  assert abs(batch['image'].mean()) < 0.3


def test_digits_splits_are_disjoint_and_complete():
  splits = digits.split_indices()
  search = np.concatenate([splits['search_train'], splits['search_val']])
  np.testing.assert_array_equal(np.sort(search), np.sort(splits['train']))
  everything = np.concatenate([splits['train'], splits['eval']])
  np.testing.assert_array_equal(np.sort(everything), np.arange(1797))

  info = data.dataset_info('digits')
  assert info['num_classes'] == 10
  assert info['image_shape'] == (16, 16, 1)
  sizes = info['splits']
  assert sizes['search_train'] + sizes['search_val'] == sizes['train']
  assert sizes['train'] + sizes['eval'] == 1797
  assert sizes['search_train'] == pytest.approx(0.8 * sizes['train'], abs=1)
  assert sizes['eval'] == pytest.approx(0.2 * 1797, abs=1)


def test_digits_same_seed_same_batches_other_seed_other_batches():
  def first_batches(seed):
    return take(data.make_batches('digits', 'search_val', batch_size=32,
                                  image_size=16, seed=seed), 3)

  for first, second in zip(first_batches(3), first_batches(3)):
    assert_batches_equal(first, second)
  assert not np.array_equal(first_batches(3)[0]['label'],
                            first_batches(4)[0]['label'])


def test_digits_resume_matches_uninterrupted_run():
  kwargs = dict(batch_size=256, image_size=16, seed=7)
  steps = data.steps_per_epoch('digits', 'search_train', 256)
  assert steps == 1149 // 256
  uninterrupted = take(data.make_batches('digits', 'search_train', **kwargs),
                       2 * steps + 1)
  # Resume inside epoch 0, just before the boundary, and inside epoch 1.
  for start_step in (1, steps - 1, steps + 1):
    resumed = take(data.make_batches('digits', 'search_train',
                                     start_step=start_step, **kwargs), 2)
    for offset, batch in enumerate(resumed):
      assert_batches_equal(batch, uninterrupted[start_step + offset])
  # Epochs are reshuffled.
  assert not np.array_equal(uninterrupted[0]['label'],
                            uninterrupted[steps]['label'])


def test_digits_eval_pads_and_counts_each_example_once():
  batches = list(data.make_batches('digits', 'eval', batch_size=100,
                                   image_size=16, seed=0, train=False))
  assert len(batches) == data.steps_per_epoch('digits', 'eval', 100,
                                              train=False) == 4
  masks = np.concatenate([b['mask'] for b in batches])
  labels = np.concatenate([b['label'] for b in batches])
  assert masks.dtype == np.float32 and masks.sum() == 360
  # Real examples first, in the split's order, then padding.
  np.testing.assert_array_equal(masks, np.arange(400) < 360)
  expected_labels = digits._raw()[1][digits.split_indices()['eval']]
  np.testing.assert_array_equal(labels[:360], expected_labels)
  assert not batches[-1]['image'][60:].any()
  resumed = next(data.make_batches('digits', 'eval', batch_size=100,
                                   image_size=16, seed=0, train=False,
                                   start_step=3))
  assert_batches_equal(resumed, batches[3])


def test_digits_process_shares_partition_the_global_batch(monkeypatch):
  kwargs = dict(batch_size=8, image_size=16, seed=5, start_step=3)
  whole = next(data.make_batches('digits', 'search_train', **kwargs))
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  shares = []
  for index in range(2):
    monkeypatch.setattr(jax, 'process_index', lambda index=index: index)
    shares.append(next(data.make_batches('digits', 'search_train', **kwargs)))
  for key in whole:
    np.testing.assert_array_equal(
        np.concatenate([share[key] for share in shares]), whole[key])


def test_digits_random_shift_moves_image_within_padding():
  images = np.random.default_rng(0).random((5, 6, 6)).astype(np.float32)
  shifted = digits.random_shift(images, np.random.default_rng(1), shift=2)
  assert shifted.shape == images.shape
  padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))
  for image, result in zip(padded, shifted):
    assert any(np.array_equal(image[y:y + 6, x:x + 6], result)
               for y in range(5) for x in range(5))


def test_digits_resize_bilinear_and_standardize():
  images = np.full((2, 8, 8), 0.25, np.float32)
  resized = digits.resize_bilinear(images, 16)
  assert resized.shape == (2, 16, 16)
  np.testing.assert_allclose(resized, 0.25, atol=1e-6)
  np.testing.assert_allclose(digits.standardize(resized, 0.25, 2.0), 0.0)


# --------------------------------------------------------------------------
# errors


def test_request_errors_raise_data_error_eagerly(monkeypatch):
  with pytest.raises(data.DataError, match='imagenet2012, cifar10, digits'):
    data.make_batches('no_such_dataset', 'train', batch_size=8, image_size=16, seed=0)
  with pytest.raises(data.DataError, match='search_train'):
    data.make_batches('digits', 'test', batch_size=8, image_size=16, seed=0)
  with pytest.raises(data.DataError, match='channels'):
    data.make_batches('digits', 'train', batch_size=8, image_size=16, seed=0,
                      channels=2)
  with pytest.raises(data.DataError, match='fewer than one batch'):
    data.make_batches('digits', 'search_val', batch_size=1024, image_size=16,
                      seed=0)
  monkeypatch.setattr(jax, 'process_count', lambda: 3)
  with pytest.raises(data.DataError, match='multiple of the number of JAX'):
    data.make_batches('digits', 'train', batch_size=8, image_size=16, seed=0)


def test_missing_imagenet_says_how_to_prepare_it(tmp_path):
  with pytest.raises(data.DataError, match='downloads/manual') as error:
    data.make_batches('imagenet2012', 'train', batch_size=8, image_size=32,
                      seed=0, data_dir=str(tmp_path))
  assert 'tfds build imagenet2012' in str(error.value)
  assert '\n' not in str(error.value)
  with pytest.raises(data.DataError, match='tfds build cifar10'):
    data.dataset_info('cifar10', data_dir=str(tmp_path))


# --------------------------------------------------------------------------
# imagenet2012 and cifar10 under tfds.testing.mock_data


def mock_tfds(num_examples):
  # The committed metadata gives train 20 and validation/test 10 examples;
  # mock_data yields num_examples random examples for any split.
  return tfds.testing.mock_data(num_examples=num_examples,
                                data_dir=str(TESTDATA))


@pytest.mark.parametrize('name,split,batch_size,steps', [
    ('imagenet2012', 'search_train', 4, 4),
    ('cifar10', 'train', 8, 2),
])
def test_tfds_train_shapes_normalization_and_resume(name, split, batch_size,
                                                    steps):
  kwargs = dict(batch_size=batch_size, image_size=16, seed=11)
  with mock_tfds(num_examples=20):
    assert data.steps_per_epoch(name, split, batch_size) == steps
    uninterrupted = take(data.make_batches(name, split, **kwargs),
                         steps + 2)
    resumed = take(data.make_batches(name, split, start_step=steps + 1,
                                     **kwargs), 1)
  batch = uninterrupted[0]
  assert batch['image'].shape == (batch_size, 16, 16, 3)
  assert batch['image'].dtype == np.float32
  assert batch['label'].dtype == np.int32
  # Mock pixels are uniform on 0-255, close to the datasets' mean.
  assert abs(batch['image'].mean()) < 0.5
  assert_batches_equal(resumed[0], uninterrupted[steps + 1])


class ImageIdDataset(tfds.core.GeneratorBasedBuilder):
  """A real, sharded TFDS dataset with ImageNet's features; label = example id.

  mock_data replaces the TFDS reader, so the file shuffling and interleaving
  the resume guarantee relies on are tested on this prepared copy instead.
  """
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3),
                                         encoding_format='jpeg'),
            'label': tfds.features.ClassLabel(num_classes=1000),
        }))

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {'train': self._generate_examples(60, first_id=0),
            'validation': self._generate_examples(10, first_id=100)}

  def _generate_examples(self, count, first_id):
    rng = np.random.default_rng(first_id)
    for example_id in range(first_id, first_id + count):
      image = rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)
      yield example_id, {'image': image, 'label': example_id}


@pytest.fixture(scope='module')
def image_id_builder(tmp_path_factory):
  builder = ImageIdDataset(data_dir=str(tmp_path_factory.mktemp('tfds')),
                           file_format='tfrecord')
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      num_shards=4, compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return builder


@pytest.fixture
def real_reader(image_id_builder, monkeypatch):
  """Serves 'imagenet2012' from the prepared ImageIdDataset."""
  from hournas_jax.data import tfds_pipeline  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(tfds_pipeline, 'load_builder',
                      lambda name, data_dir: image_id_builder)


def ids(batches):
  return np.concatenate([batch['label'] for batch in batches])


def test_tfds_reader_epochs_resume_and_process_shares(real_reader,
                                                      monkeypatch):
  del real_reader  # Used for its effect.
  kwargs = dict(batch_size=8, image_size=16, seed=2)
  steps = data.steps_per_epoch('imagenet2012', 'search_train', 8)
  assert steps == 48 // 8
  uninterrupted = take(data.make_batches('imagenet2012', 'search_train',
                                         **kwargs), 2 * steps + 1)
  for start_step in (2, steps, steps + 3):
    resumed = take(data.make_batches('imagenet2012', 'search_train',
                                     start_step=start_step, **kwargs), 1)
    assert_batches_equal(resumed[0], uninterrupted[start_step])
  # Each epoch visits every D_tr example once, in a new order.
  first_epoch, second_epoch = (ids(uninterrupted[:steps]),
                               ids(uninterrupted[steps:2 * steps]))
  assert len(set(first_epoch)) == 48
  assert set(first_epoch) == set(second_epoch)
  assert not np.array_equal(first_epoch, second_epoch)
  val = ids(take(data.make_batches('imagenet2012', 'search_val', **kwargs),
                 1))
  assert not set(val) & set(first_epoch)

  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  shares = []
  for index in range(2):
    monkeypatch.setattr(jax, 'process_index', lambda index=index: index)
    shares.append(ids(take(data.make_batches('imagenet2012', 'search_train',
                                             **kwargs), steps)))
  assert len(shares[0]) == len(shares[1]) == 48 // 2
  assert not set(shares[0]) & set(shares[1])


def test_tfds_reader_eval_reads_each_example_once(real_reader):
  del real_reader  # Used for its effect.
  batches = list(data.make_batches('imagenet2012', 'eval', batch_size=4,
                                   image_size=16, seed=0, train=False))
  masks = np.concatenate([batch['mask'] for batch in batches])
  real_ids = ids(batches)[masks == 1]
  np.testing.assert_array_equal(np.sort(real_ids), np.arange(100, 110))
  again = list(data.make_batches('imagenet2012', 'eval', batch_size=4,
                                 image_size=16, seed=0, train=False))
  np.testing.assert_array_equal(ids(again), ids(batches))


@pytest.mark.parametrize('name', ['imagenet2012', 'cifar10'])
def test_tfds_eval_is_one_padded_pass(name):
  with mock_tfds(num_examples=10):
    assert data.steps_per_epoch(name, 'eval', 4, train=False) == 3
    batches = list(data.make_batches(name, 'eval', batch_size=4,
                                     image_size=16, seed=0, train=False))
    again = list(data.make_batches(name, 'eval', batch_size=4, image_size=16,
                                   seed=0, train=False, start_step=2))
  assert len(batches) == 3
  np.testing.assert_array_equal(np.concatenate([b['mask'] for b in batches]),
                                np.arange(12) < 10)
  assert not batches[-1]['image'][2:].any()
  assert_batches_equal(again[0], batches[2])


def test_tfds_dataset_info_reads_split_sizes():
  with mock_tfds(num_examples=1):
    info = data.dataset_info('imagenet2012')
  assert info['num_classes'] == 1000
  assert info['image_shape'] == (224, 224, 3)
  assert info['splits'] == {'search_train': 16, 'search_val': 4, 'train': 20,
                            'eval': 10}


# --------------------------------------------------------------------------
# TF preprocessing functions


SEEDS = [tf.constant([seed, 0], tf.int64) for seed in range(8)]


def test_random_crop_window_stays_inside_and_respects_area():
  shape = tf.constant([40, 60, 3])
  for seed in SEEDS:
    offset_y, offset_x, height, width = preprocess.random_crop_window(
        shape, seed).numpy()
    assert 0 <= offset_y and offset_y + height <= 40
    assert 0 <= offset_x and offset_x + width <= 60
    # Integer rounding can push the area just under 8%.
    assert 0.07 <= height * width / (40 * 60) <= 1.0


def test_decode_and_random_resized_crop_output():
  image_bytes = jpeg_bytes(synthetic_image(40, 60))
  crops = [preprocess.decode_and_random_resized_crop(image_bytes, seed, 24)
           for seed in SEEDS[:3]]
  assert crops[0].shape == (24, 24, 3) and crops[0].dtype == tf.float32
  np.testing.assert_array_equal(
      crops[0],
      preprocess.decode_and_random_resized_crop(image_bytes, SEEDS[0], 24))
  assert not all(np.array_equal(crops[0], crop) for crop in crops[1:])


def test_center_crop_window_geometry():
  # Keeps 224/256 of the shorter side, centered.
  window = preprocess.center_crop_window(tf.constant([100, 60, 3]), 224)
  np.testing.assert_array_equal(window, [24, 4, 52, 52])


def test_decode_and_center_crop_matches_crop_of_full_image():
  image = synthetic_image(50, 70)
  image_bytes = jpeg_bytes(image)
  result = preprocess.decode_and_center_crop(image_bytes, 16)
  offset_y, offset_x, size, _ = preprocess.center_crop_window(
      tf.constant(image.shape), 16).numpy()
  full = tf.io.decode_jpeg(image_bytes)
  expected = preprocess.resize(
      full[offset_y:offset_y + size, offset_x:offset_x + size], 16)
  assert result.shape == (16, 16, 3)
  np.testing.assert_allclose(result, expected, atol=1.0)


def test_random_flip_is_identity_or_mirror():
  image = tf.constant(synthetic_image(4, 5))
  flipped = 0
  for seed in SEEDS:
    result = preprocess.random_flip(image, seed).numpy()
    if np.array_equal(result, image.numpy()[:, ::-1]):
      flipped += 1
    else:
      np.testing.assert_array_equal(result, image)
  assert 0 < flipped < len(SEEDS)


def test_pad_and_random_crop_is_a_shifted_window():
  image = synthetic_image(8, 8)
  padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
  for seed in SEEDS[:4]:
    result = preprocess.pad_and_random_crop(tf.constant(image), seed).numpy()
    assert result.shape == image.shape
    assert any(np.array_equal(padded[y:y + 8, x:x + 8], result)
               for y in range(9) for x in range(9))


def test_normalize_per_channel():
  image = tf.constant([[[10, 20, 30]]], tf.uint8)
  result = preprocess.normalize(image, (10.0, 10.0, 10.0), (1.0, 2.0, 4.0))
  np.testing.assert_allclose(result, [[[0.0, 5.0, 5.0]]])


def test_preprocess_cifar10_resizes_when_asked():
  png = tf.io.encode_png(tf.constant(synthetic_image(32, 32)))
  native = preprocess.preprocess_cifar10(png, SEEDS[0], image_size=32,
                                         train=True)
  smaller = preprocess.preprocess_cifar10(png, None, image_size=16,
                                          train=False)
  assert native.shape == (32, 32, 3) and smaller.shape == (16, 16, 3)


# --------------------------------------------------------------------------
# prefetch_to_mesh


def test_prefetch_to_mesh_on_local_devices():
  mesh = Mesh(np.array(jax.devices()), ('data',))
  batch_size = 4 * jax.device_count()
  source = take(data.make_batches('digits', 'eval', batch_size=batch_size,
                                  image_size=16, seed=0, train=False), 3)
  prefetched = list(data.prefetch_to_mesh(iter(source), mesh, size=2))
  assert len(prefetched) == 3
  for device_batch, host_batch in zip(prefetched, source):
    for key, value in device_batch.items():
      assert isinstance(value, jax.Array)
      assert value.sharding.is_equivalent_to(
          NamedSharding(mesh, PartitionSpec('data')), value.ndim)
      np.testing.assert_array_equal(np.asarray(value), host_batch[key])


def test_prefetch_to_mesh_splits_batch_over_four_cpu_devices():
  # The device count is fixed when JAX starts, so this runs in a subprocess.
  script = textwrap.dedent('''
      import jax, numpy as np, pytest
      from jax.sharding import Mesh
      from hournas_jax import data
      assert jax.device_count() == 4
      mesh = Mesh(np.array(jax.devices()), ('data',))
      images = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
      batches = [{'image': images + i, 'label': np.arange(8, dtype=np.int32)}
                 for i in range(3)]
      out = list(data.prefetch_to_mesh(iter(batches), mesh, size=2))
      for i, batch in enumerate(out):
        shards = batch['image'].addressable_shards
        assert len(shards) == 4
        for shard in shards:
          rows = shard.index[0]
          assert shard.data.shape == (2, 3)
          np.testing.assert_array_equal(shard.data, images[rows] + i)
      with pytest.raises(data.DataError, match='divisible by 4'):
        next(data.prefetch_to_mesh(iter([{'x': np.zeros(6)}]), mesh))
  ''')
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=4')
  result = subprocess.run([sys.executable, '-c', script], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
