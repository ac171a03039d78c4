"""Retraining a fixed architecture: recipe pieces, resume, EMA/dropout, padded eval, NaN stop."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default, quickstart
from hournas_jax import setup as setup_lib
from hournas_jax import arch as arch_lib
from hournas_jax import baseline, costs, errors, population, retrain, spaces, train
from spaces_for_tests import TOY_TABLE

OPS = 'k3e1,k3e3,k3e1,k3e3,k3e1'  # an architecture of tests/spaces_for_tests.py's toy space


def recipe(**overrides):
  t = default.get_train_config()
  t.update(overrides)
  return t


# --------------------------------------------------------------------------------------------
# Recipe pieces.


def test_cosine_schedule_with_warmup_and_linear_scaling():
  t = recipe(learning_rate=0.1, batch_size=1024, warmup_epochs=2.0, schedule='cosine')
  schedule = retrain.make_schedule(t, steps_per_epoch=10, total_steps=120)
  peak = 0.1 * 1024 / 256
  assert retrain.peak_learning_rate(t) == pytest.approx(peak)
  assert float(schedule(0)) == pytest.approx(peak / 20)
  assert float(schedule(10)) == pytest.approx(peak * 10.5 / 20, rel=0.06)
  assert float(schedule(20)) == pytest.approx(peak)
  assert float(schedule(70)) == pytest.approx(peak / 2, rel=1e-4)  # half way down the cosine
  assert float(schedule(120)) == pytest.approx(0.0, abs=1e-7)
  unscaled = recipe(learning_rate=0.025, batch_size=96, lr_scaling='none')
  assert retrain.peak_learning_rate(unscaled) == 0.025


def test_exponential_schedule_is_tf_staircase_after_warmup():
  t = recipe(learning_rate=0.016, batch_size=256, schedule='exponential', warmup_epochs=5.0,
             decay_rate=0.97, decay_epochs=2.4)
  schedule = retrain.make_schedule(t, steps_per_epoch=10, total_steps=1000)
  assert float(schedule(50)) == pytest.approx(0.016)
  assert float(schedule(50 + 23)) == pytest.approx(0.016)  # within the first 2.4 epochs
  assert float(schedule(50 + 24)) == pytest.approx(0.016 * 0.97)
  assert float(schedule(50 + 240)) == pytest.approx(0.016 * 0.97 ** 10)


def test_weight_decay_only_on_kernels_and_tf_rmsprop():
  params = {'Conv_0': {'kernel': jnp.ones((3, 3, 1, 2))}, 'BatchNorm_0': {'scale': jnp.ones(2),
                                                                          'bias': jnp.ones(2)}}
  assert retrain.decay_mask(params) == {'Conv_0': {'kernel': True},
                                        'BatchNorm_0': {'scale': False, 'bias': False}}
  t = recipe(optimizer='sgd', momentum=0.0, weight_decay=0.5)
  tx = retrain.make_optimizer(t, 1.0)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  assert float(updates['Conv_0']['kernel'][0, 0, 0, 0]) == pytest.approx(-0.5)
  assert float(jnp.abs(updates['BatchNorm_0']['scale']).max()) == 0.0

  # TensorFlow's RMSProp: mean square starts at 1, eps inside the square root, momentum.
  t = recipe(optimizer='rmsprop', momentum=0.9, weight_decay=0.0, rmsprop_decay=0.9,
             rmsprop_epsilon=1e-3)
  tx = retrain.make_optimizer(t, 0.1)
  w = {'w': jnp.array([1.0])}
  state = tx.init(w)
  updates, state = tx.update({'w': jnp.array([2.0])}, state, w)
  ms = 0.9 * 1.0 + 0.1 * 4.0
  assert float(updates['w'][0]) == pytest.approx(-0.1 * 2.0 / np.sqrt(ms + 1e-3), rel=1e-5)


def test_adamw_decays_kernels_apart_from_the_adaptive_step():
  params = {'Conv_0': {'kernel': jnp.full((1, 1, 1, 1), 2.0)},
            'BatchNorm_0': {'scale': jnp.full((1,), 2.0)}}
  grads = {'Conv_0': {'kernel': jnp.full((1, 1, 1, 1), 0.3)},
           'BatchNorm_0': {'scale': jnp.full((1,), 0.3)}}
  tx = retrain.make_optimizer(recipe(optimizer='adamw', weight_decay=0.1), 0.01)
  updates, _ = tx.update(grads, tx.init(params), params)
  # First Adam step: bias-corrected m / sqrt(v) = sign(g); the decay lr * wd * w only on kernels.
  assert float(updates['Conv_0']['kernel'].ravel()[0]) == pytest.approx(
      -0.01 * (1.0 + 0.1 * 2.0), rel=1e-4)
  assert float(updates['BatchNorm_0']['scale'][0]) == pytest.approx(-0.01, rel=1e-4)


def test_baseline_budget_is_the_targets_set_or_the_architecture_own_cost():
  space = spaces.get_space('fbnet', resolution=224)
  ops = arch_lib.preset('hournas_a').ops
  targets = ml_collections.ConfigDict({'params': 4.8e6, 'flops': 300e6})
  assert baseline.baseline_budget(space, targets, ops) == {'params': 4.8e6, 'flops': 300e6}
  only_flops = ml_collections.ConfigDict({'params': 0.0, 'flops': 300e6})
  assert baseline.baseline_budget(space, only_flops, ops) == {'flops': 300e6}
  # Without targets the budget is the given architecture's own cost, and random architectures
  # drawn for it lie within 5% of that cost.
  no_targets = ml_collections.ConfigDict({'params': 0.0, 'flops': 0.0})
  own = baseline.baseline_budget(space, no_targets, ops)
  tables = costs.cost_tables(space)
  assert own == dict(zip(('params', 'flops'), map(float, tables.cost(
      arch_lib.Architecture('fbnet', ops).indices(space)))))
  drawn = population.random_architectures(space, own, 3, seed=0)
  for arch in drawn:
    params, flops = tables.cost(arch_lib.Architecture('fbnet', arch).indices(space))
    assert abs(params - own['params']) <= 0.05 * own['params']
    assert abs(flops - own['flops']) <= 0.05 * own['flops']


# --------------------------------------------------------------------------------------------
# Runs on digits.


@pytest.fixture
def toy_space(monkeypatch):
  """Registers tests/spaces_for_tests.py's 5-SuperBlock space as 'toy': few XLA compiles."""
  monkeypatch.setitem(spaces.SPACE_TABLES, 'toy', TOY_TABLE)


def digits_config(**train_overrides):
  config = quickstart.get_config()
  config.mode = 'train'
  config.space, config.width, config.ops = 'toy', 1.0, ''
  config.random_baseline = False
  config.checkpoint_every_steps = 2
  config.log_every_steps = 1
  config.tensorboard = False
  config.train.update(dict(arch=OPS, steps=4, batch_size=16, ema_decay=0.99, dropout_rate=0.2,
                           **train_overrides))
  return config


def test_resumed_retraining_equals_uninterrupted(tmp_path, toy_space):
  config = digits_config()
  workdir = tmp_path / 'run'
  reference = train.train_and_evaluate(config, str(workdir))['train']
  assert reference['evaluated'] == 'ema' and reference['examples'] == 360
  checkpoints = workdir / 'train' / 'checkpoints'
  assert sorted(os.listdir(checkpoints)) == ['2', '4']
  # As if killed after step 2's checkpoint: the later checkpoint and the results never existed.
  shutil.rmtree(checkpoints / '4')
  (workdir / 'train' / 'results.json').unlink()
  resumed = train.train_and_evaluate(config, str(workdir))['train']
  assert resumed['loss'] == pytest.approx(reference['loss'], rel=1e-6)
  assert resumed['top1'] == reference['top1']
  assert json.loads((workdir / 'train' / 'results.json').read_text())['loss'] == resumed['loss']


def test_eval_counts_every_example_once_whatever_the_batch(tmp_path, toy_space):
  config = digits_config(eval_batch_size=360)
  workdir = str(tmp_path / 'run')
  whole = train.train_and_evaluate(config, workdir)['train']
  config.mode = 'eval'
  config.train.eval_batch_size = 100  # 4 batches, the last one 60 real + 40 padding
  padded = train.train_and_evaluate(config, workdir)['train']
  assert padded['examples'] == whole['examples'] == 360
  assert padded['top1'] == pytest.approx(whole['top1'])
  assert padded['loss'] == pytest.approx(whole['loss'], rel=1e-5)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch,
                                                                 toy_space):
  original_init = retrain.Retrainer.__init__

  def init_with_poisoned_steps(self, *args, **kwargs):
    original_init(self, *args, **kwargs)
    step_fn = self.train_step

    def poisoned(state, batch):  # from the third step on, the weights and the loss are NaN
      bad = int(state['step']) >= 2
      state, metrics = step_fn(state, batch)
      if bad:
        state = {**state, 'params': jax.tree.map(lambda x: x * jnp.nan, state['params'])}
        metrics = {**metrics, 'loss': metrics['loss'] * jnp.nan}
      return state, metrics

    self.train_step = poisoned

  monkeypatch.setattr(retrain.Retrainer, '__init__', init_with_poisoned_steps)
  workdir = tmp_path / 'run'
  with pytest.raises(retrain.TrainingError) as error:
    train.train_and_evaluate(digits_config(), str(workdir))
  message = str(error.value)
  assert 'non-finite by step 3' in message and 'last good checkpoint (step 2)' in message
  assert '\n' not in message and isinstance(error.value, errors.UserError)
  assert sorted(os.listdir(workdir / 'train' / 'checkpoints')) == ['2']
  assert not (workdir / 'train' / 'results.json').exists()


def test_bfloat16_retraining_keeps_float32_weights_and_learns(tmp_path, toy_space):
  """train.precision='bfloat16': the same recipe in mixed precision trains, saves float32
  weights, and evaluates to what the saved model evaluates to; a precision that does not
  exist is one config error."""
  config = digits_config(precision='bfloat16')
  results = train.train_and_evaluate(config, str(tmp_path / 'run'))['train']
  assert 0.0 <= results['top1'] <= 1.0 and np.isfinite(results['loss'])
  setup = setup_lib.resolve_setup(config, str(tmp_path / 'run'))
  trainer, state, meta = retrain.load_model(setup, str(tmp_path / 'run' / 'train'))
  assert meta['train']['precision'] == 'bfloat16' and trainer.net.dtype == jnp.bfloat16
  # Gray digits: the space (and so its costs) has a 1-channel stem, saved and loaded alike.
  assert setup.space.in_channels == trainer.space.in_channels == 1
  assert {x.dtype for x in jax.tree.leaves(state['params'])} == {jnp.dtype(jnp.float32)}
  evaluated = trainer.evaluate(state, retrain.eval_batches(setup, 120))
  assert evaluated['top1'] == pytest.approx(results['top1'])
  config.train.precision = 'float16'
  with pytest.raises(setup_lib.ConfigError, match="train.precision must be one of float32, "
                                              "bfloat16, got 'float16'"):
    train.train_and_evaluate(config, str(tmp_path / 'other'))
