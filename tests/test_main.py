"""main.py: the command line, the one-line errors for bad input, and train + eval end to end
under TFDS's mock ImageNet. (The digits run end to end, search included, is in
test_multidevice.py, where the same run on 1 and 4 devices is compared.)"""

import os
import pathlib
import subprocess
import sys

import pytest
import tensorflow_datasets as tfds

from hournas_jax import setup as setup_lib
from hournas_jax import checkpoint, costs, data, errors, spaces, train
from spaces_for_tests import TOY_TABLE, tiny_config

REPO_ROOT = pathlib.Path(__file__).parent.parent
TESTDATA = pathlib.Path(__file__).parent / 'testdata'
TOY_OPS = 'k3e1,k3e3,k3e1,k3e3,k3e1'


@pytest.fixture(autouse=True)
def toy_space(monkeypatch):
  """Registers tests/spaces_for_tests.py's 5-SuperBlock space as 'toy': few XLA compiles."""
  monkeypatch.setitem(spaces.SPACE_TABLES, 'toy', TOY_TABLE)


def run_main(args, workdir=None, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  command = [sys.executable, 'main.py'] + list(args)
  if workdir is not None:
    command.append(f'--workdir={workdir}')
  return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout)


def one_error_line(result):
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith('error: ') and 'Traceback' not in result.stderr
  return lines[0]


# --------------------------------------------------------------------------------------------
# The command line.


@pytest.mark.parametrize('args,expected', [
    (['--config.search.num_proposal=16'],
     "unknown config field 'search.num_proposal' (config.search has no 'num_proposal'); "
     'did you mean search.num_proposals?'),
    (['--config.serch.num_proposals=16'], "unknown config field 'serch'"),
    (['--config.search.num_proposals=many'], 'error: flag --config.search.num_proposals=many'),
    (['--config.targets.flops=400e6', 'extra'], 'unexpected arguments: extra'),
])
def test_bad_flags_are_one_line_errors(tmp_path, args, expected):
  result = run_main(['--config=configs/quickstart.py'] + args, tmp_path)
  assert result.returncode == 2
  assert expected in one_error_line(result)


def test_missing_workdir_and_config_file_are_one_line_errors(tmp_path):
  result = run_main(['--config=configs/quickstart.py'])
  assert result.returncode == 2 and '--workdir' in one_error_line(result)
  result = run_main(['--config=configs/nothing.py'], tmp_path)
  assert result.returncode == 2
  assert "config file 'configs/nothing.py' not found" in one_error_line(result)
  result = run_main(['--config=configs/fbnet.py:z'], tmp_path)
  assert result.returncode == 2 and "unknown fbnet variant 'z'" in one_error_line(result)


def test_missing_dataset_is_a_reported_error(tmp_path):
  config = tiny_config(dataset='imagenet2012', channels=0, data_dir=str(tmp_path / 'tfds'))
  with pytest.raises(data.DataError) as error:
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert 'imagenet2012 is not prepared' in str(error.value)
  assert 'downloads/manual' in str(error.value) and '\n' not in str(error.value)
  assert isinstance(error.value, errors.UserError)


# What TensorFlow's C++ side prints at start-up when left alone.
TF_START_UP = ('oneDNN', 'TF-TRT', 'cuda', 'absl::InitializeLog', 'This TensorFlow binary')


def test_a_run_that_imports_tensorflow_is_quiet(tmp_path):
  """An image folder loads TensorFlow (tf.data) before finding this one empty: the run's output
  is its one error line, none of TF's start-up lines."""
  (tmp_path / 'images').mkdir()
  env = {k: v for k, v in os.environ.items() if k != 'TF_CPP_MIN_LOG_LEVEL'}  # main.py's own
  result = subprocess.run(
      [sys.executable, 'main.py', '--config=configs/quickstart.py', '--config.dataset=folder',
       f'--config.data_dir={tmp_path / "images"}', f'--workdir={tmp_path / "run"}'],
      cwd=REPO_ROOT, env={**env, 'JAX_PLATFORMS': 'cpu'}, capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 1 and 'no class folders' in one_error_line(result)
  assert not [m for m in TF_START_UP if m in result.stdout + result.stderr], result.stderr


def test_config_variants_and_overrides():
  from configs import efficientnet, fbnet, fbnet_enlarged, mnasnet  # pylint: disable=g-import-not-at-top
  assert (fbnet.get_config().targets.params, fbnet.get_config().targets.flops) == (4.8e6, 300e6)
  b = fbnet.get_config('b')
  assert (b.targets.params, b.targets.flops) == (5.5e6, 400e6)
  assert fbnet_enlarged.get_config('d').space == 'fbnet_enlarged'
  m, e = mnasnet.get_config(), efficientnet.get_config()
  assert (m.targets.params, m.targets.flops) == (3.9e6, 312e6)
  assert (e.targets.params, e.targets.flops) == (5.3e6, 390e6)
  for config in (fbnet.get_config(), m, e):
    s = config.search
    assert (s.vital_epochs, s.nonvital_epochs, s.num_proposals) == (1.0, 1.0, 8)
    assert (s.tau0, s.tau_decay, s.weight_lr, s.arch_lr, s.alpha) == (5.0, 0.9999, 0.1, 0.01, 1.0)
    train.validate_config(config)
  assert m.train.optimizer == e.train.optimizer == 'rmsprop' and e.train.ema_decay == 0.9999
  assert fbnet.get_config().train.schedule == 'cosine'


# --------------------------------------------------------------------------------------------
# Errors raised by train_and_evaluate, each one line and of a type main.py reports.


@pytest.mark.parametrize('overrides,error,match', [
    ({'mode': 'serch'}, setup_lib.ConfigError, 'config.mode must be one of'),
    ({'targets.params': 1e9}, costs.TargetError, 'outside what space'),
    ({'mode': 'train', 'train.arch': 'hournas_z'}, spaces.SpaceError, 'neither a preset'),
    ({'mode': 'train', 'train.arch': 'hournas_a'}, spaces.SpaceError, 'belongs to space'),
    ({'mode': 'train', 'train.arch': ''}, setup_lib.ConfigError, 'no searched architecture'),
    ({'mode': 'eval'}, checkpoint.CheckpointError, 'no trained model'),
    ({'space': 'resnet'}, spaces.SpaceError, 'unknown search space'),
    ({'train.batch_size': 4000}, data.DataError, 'fewer than one batch'),
])
def test_bad_input_raises_a_reported_error(tmp_path, overrides, error, match):
  with pytest.raises(error, match=match) as raised:
    config = tiny_config(**overrides)
    if overrides.get('train.batch_size'):
      config.mode, config.train.arch = 'train', TOY_OPS
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert isinstance(raised.value, errors.UserError)
  assert '\n' not in str(raised.value)


def test_workdir_that_is_a_file_is_refused(tmp_path):
  a_file = tmp_path / 'file'
  a_file.write_text('')
  with pytest.raises(checkpoint.WorkdirError, match='is a file'):
    train.train_and_evaluate(tiny_config(), str(a_file))


# --------------------------------------------------------------------------------------------
# End to end.


def test_train_and_eval_on_mock_imagenet(tmp_path):
  config = tiny_config(mode='train', dataset='imagenet2012', channels=0, image_size=16,
                       data_dir=str(TESTDATA))
  config.train.arch = TOY_OPS
  config.train.steps = 3
  config.train.batch_size = 4
  config.train.eval_batch_size = 4
  workdir = str(tmp_path / 'run')
  with tfds.testing.mock_data(num_examples=10, data_dir=str(TESTDATA)):
    summary = train.train_and_evaluate(config, workdir)
    config.mode = 'eval'
    evaluated = train.train_and_evaluate(config, workdir)
  # The 10 validation examples in 3 batches of 4, the last one padded: each counted once.
  assert summary['train']['examples'] == 10 and summary['train']['steps'] == 3
  assert evaluated['train']['top1'] == pytest.approx(summary['train']['top1'])
  assert evaluated['train']['ops'] == TOY_OPS.split(',')


def test_non_finite_search_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  from hournas_jax import search  # pylint: disable=g-import-not-at-top

  def fake_step(self, state, tr_batch, val_batch=None):
    """Counts the step like the real one; its loss turns NaN at the third step."""
    counters = {**state.counters}
    counters['step'] += 1
    counters['tr_step'] += 1
    loss = float('nan') if counters['step'] >= 3 else 2.3
    return state.replace(counters=counters), {'loss': loss, 'accuracy': 0.1, 'tau': 5.0}

  monkeypatch.setattr(search.Searcher, 'train_step', fake_step)
  workdir = tmp_path / 'run'
  with pytest.raises(search.SearchError) as error:
    train.train_and_evaluate(tiny_config(), str(workdir))
  message = str(error.value)
  assert 'non-finite at step 3' in message and 'last good checkpoint (step 2)' in message
  assert '\n' not in message and isinstance(error.value, errors.UserError)
  assert sorted(os.listdir(workdir / 'search' / 'checkpoints')) == ['2']
  assert not (workdir / 'arch.json').exists()
