"""The search driver (search_phase.run) with Algorithm 1's 'epoch' schedule, on digits and the
toy space: the batches it feeds, the counters it ends with, and a run stopped in the middle of
an architecture pass that resumes to the uninterrupted result."""

import json

import pytest

from configs import quickstart
from hournas_jax import arch as arch_lib
from hournas_jax import search_phase
from hournas_jax import setup as setup_lib
from hournas_jax import costs, data, search, spaces, train
from spaces_for_tests import TOY_TABLE


@pytest.fixture(autouse=True)
def toy_space(monkeypatch):
  monkeypatch.setitem(spaces.SPACE_TABLES, 'toy', TOY_TABLE)


def epoch_config():
  config = quickstart.get_config()
  config.space, config.width, config.ops = 'toy', 1.0, ''
  config.targets.params, config.targets.flops = 7e3, 90e3
  s = config.search
  s.schedule = 'epoch'
  s.vital_steps = s.nonvital_steps = 8
  s.batch_size = 8
  config.retrain_after_search = False
  config.proposal_samples = 100
  config.checkpoint_every_steps = 3
  config.log_every_steps = 5
  config.tensorboard = False
  return config


def test_epoch_schedule_through_the_driver_resumes_exactly(tmp_path, monkeypatch, capsys):
  config = epoch_config()
  tr = data.steps_per_epoch('digits', 'search_train', 8)
  val = data.steps_per_epoch('digits', 'search_val', 8)
  arch_steps = max(1, round(8 * val / tr))  # a partial epoch's share of D_val (2 here)
  assert arch_steps == 2
  reference = train.train_and_evaluate(config, str(tmp_path / 'reference'))['search']
  iterations = 2 * (8 + arch_steps)
  assert reference['steps'] == {'step': iterations, 'tr_step': 16, 'val_step': 2 * arch_steps,
                                'stage_step': 0}

  # Killed before its 10th iteration: the latest checkpoint (step 9) is in the middle of the
  # vital stage's architecture pass.
  real_step, calls = search.Searcher.train_step, []

  def stopping_step(self, state, tr_batch=None, val_batch=None):
    if len(calls) == 9:
      raise KeyboardInterrupt
    calls.append((tr_batch is not None, val_batch is not None))
    return real_step(self, state, tr_batch, val_batch)

  monkeypatch.setattr(search.Searcher, 'train_step', stopping_step)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert calls == [(True, False)] * 8 + [(False, True)]
  monkeypatch.setattr(search.Searcher, 'train_step', real_step)
  capsys.readouterr()
  resumed = train.train_and_evaluate(config, str(tmp_path / 'run'))['search']
  assert 'resuming from the checkpoint of step 9 (stage vital)' in capsys.readouterr().out
  assert resumed['steps'] == reference['steps']
  assert resumed['vital_ops'] == reference['vital_ops'] and resumed['ops'] == reference['ops']
  assert resumed['pi'] == pytest.approx(reference['pi'], abs=1e-6)
  for layer, probs in reference['probabilities'].items():
    assert resumed['probabilities'][layer] == pytest.approx(probs, abs=1e-6)


def test_a_result_more_than_5_percent_off_its_targets_is_warned_about(tmp_path, capsys):
  config = epoch_config()
  config.proposal_samples = 0
  setup = setup_lib.resolve_setup(config, str(tmp_path))
  ops = ('k3e3', 'k3e3', 'k3e1', 'k3e3', 'skip')
  params, flops = costs.cost_tables(setup.space).cost([setup.space.op_names.index(o)
                                                       for o in ops])
  result = {'space': 'toy', 'ops': dict(zip(setup.space.searchable_names, ops)),
            'params': params, 'flops': flops,
            'targets': {'params': params / 1.1, 'flops': float(flops)},
            'deviation': {'params': 0.1, 'flops': 0.0}, 'pi': [1.0]}

  class FinishedSearch:
    def architecture(self, state):
      return arch_lib.Architecture('toy', ops)

    def result(self, state, architecture):
      assert architecture.ops == ops
      return result

  search_phase._write_search_result(setup, FinishedSearch(), None)
  out = capsys.readouterr().out
  assert '[search] warning: the architecture is more than 5% off its targets (params +10.0%)' in out
  assert json.loads((tmp_path / 'arch.json').read_text())['deviation'] == result['deviation']
  assert 'more than 5% off the target' in (tmp_path / 'summary.txt').read_text()
