"""The cluttered-digits dataset: disjoint sources, fresh training renders, a fixed test set."""

import itertools

import numpy as np
import pytest

from hournas_jax import data
from hournas_jax.data import cluttered, common, digits


def take(iterator, count):
  return list(itertools.islice(iterator, count))


def test_splits_come_from_disjoint_source_digits():
  search_train, search_val, test = (set(cluttered.sources(s).tolist())
                                    for s in ('search_train', 'search_val', 'eval'))
  assert not search_train & search_val and not search_train & test and not search_val & test
  assert set(cluttered.sources('train').tolist()) == search_train | search_val
  info = data.dataset_info('cluttered_digits')
  assert info['num_classes'] == 10 and info['image_shape'] == (24, 24, 1)
  assert info['splits']['eval'] == cluttered.TEST_SIZE
  assert info['splits']['train'] == len(search_train | search_val)


def test_render_places_the_digit_and_clutter_on_the_canvas():
  rng = np.random.default_rng(0)
  pool = cluttered.sources('train')
  images = cluttered.render(pool[:64], pool, rng, 24)
  assert images.shape == (64, 24, 24) and images.dtype == np.float32
  assert images.min() >= 0.0 and images.max() <= 1.0
  # The whole upscaled digit is on the canvas: the image holds at least its ink.
  ink = cluttered._upscaled(24)[pool[:64]].sum(axis=(1, 2))  # pylint: disable=protected-access
  assert np.all(images.sum(axis=(1, 2)) >= ink - 1e-3)
  # Clutter adds ink beyond the digit in most images (fragments may land on blank crops).
  assert np.mean(images.sum(axis=(1, 2)) > ink + 1e-3) > 0.5
  # The digit sits at different places.
  centres = [np.argwhere(im > 0.5).mean(0) for im in images]
  assert np.std(np.array(centres)[:, 0]) > 2.0


def test_training_batches_are_drawn_afresh_each_epoch_and_resume_exactly():
  kwargs = dict(batch_size=32, image_size=24, seed=3, channels=1)
  per_epoch = data.steps_per_epoch('cluttered_digits', 'search_train', 32)
  assert per_epoch == len(cluttered.sources('search_train')) // 32
  run = take(data.make_batches('cluttered_digits', 'search_train', **kwargs), per_epoch + 3)
  resumed = take(data.make_batches('cluttered_digits', 'search_train', start_step=per_epoch + 1,
                                   **kwargs), 2)
  for a, b in zip(run[per_epoch + 1:], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  # Every source digit once per epoch, each epoch a new rendering.
  first = np.concatenate([b['label'] for b in run[:per_epoch]])
  assert len(first) == per_epoch * 32
  assert not np.array_equal(run[0]['image'], run[per_epoch]['image'])
  other_seed = next(data.make_batches('cluttered_digits', 'search_train',
                                      **{**kwargs, 'seed': 4}))
  assert not np.array_equal(other_seed['image'], run[0]['image'])
  assert run[0]['image'].shape == (32, 24, 24, 1)


def test_test_set_is_fixed_large_and_padded_once():
  batches = list(data.make_batches('cluttered_digits', 'eval', batch_size=3000, image_size=24,
                                   seed=0, train=False))
  again = list(data.make_batches('cluttered_digits', 'eval', batch_size=3000, image_size=24,
                                 seed=9, train=False))
  assert len(batches) == 4
  assert sum(b['mask'].sum() for b in batches) == cluttered.TEST_SIZE
  for a, b in zip(batches, again):  # the run seed does not touch the test set
    np.testing.assert_array_equal(a['image'], b['image'])
  labels = np.concatenate([b['label'][b['mask'] > 0] for b in batches])
  assert set(np.bincount(labels).tolist()) and np.bincount(labels).min() > 800
  # A fixed pass over D_val (e.g. for ranking SuperNet paths) is larger than its sources.
  val = list(data.make_batches('cluttered_digits', 'search_val', batch_size=500, image_size=24,
                               seed=0, train=False))
  assert sum(b['mask'].sum() for b in val) == cluttered.FIXED_PASS_SIZE


def test_three_channels_and_bad_sizes():
  batch = next(data.make_batches('cluttered_digits', 'train', batch_size=8, image_size=32,
                                 seed=0, channels=3))
  assert batch['image'].shape == (8, 32, 32, 3)
  np.testing.assert_array_equal(batch['image'][..., 0], batch['image'][..., 2])
  with pytest.raises(common.DataError, match='image_size >= 16'):
    next(data.make_batches('cluttered_digits', 'train', batch_size=8, image_size=12, seed=0))
  assert cluttered.digit_size(24) == 12 and digits.NATIVE_SIZE == 8
