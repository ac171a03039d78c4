"""benchmarks/seed_noise.py: the noise figures, bad input, and a tiny run end to end on the toy
space (a rerun reuses the trainings)."""

import json
import os

import numpy as np
import pytest

from benchmarks import seed_noise
from hournas_jax import spaces
from spaces_for_tests import TOY_TABLE

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_noise_figures_of_a_small_population():
  top1 = {('a',): [0.90, 0.92, 0.94], ('b',): [0.50, 0.96, 0.98]}
  figures = seed_noise.seed_noise(top1)
  assert figures['seed_std_mean'] == pytest.approx((2.0 + np.std([50, 96, 98], ddof=1)) / 2)
  assert figures['seed_std_max'] == pytest.approx(np.std([50, 96, 98], ddof=1))
  # The 50% run sits 47 points below the mean of its siblings (96 and 98); 'a' has none > 3.
  assert figures['worst_shortfall'] == pytest.approx(47.0)
  assert figures['failed_runs'] == 1 and figures['runs'] == 6
  assert figures['spread'] == pytest.approx(np.std([92.0, np.mean([50, 96, 98])], ddof=1))
  assert figures['lowest_run'] == pytest.approx(50.0)


def test_one_seed_gives_no_noise_figure():
  with pytest.raises(ValueError, match='at least 2 seeds'):
    seed_noise.seed_noise({('a',): [0.9], ('b',): [0.8, 0.7]})


@pytest.mark.parametrize('args,message', [
    (['--seeds', '1'], '--architectures and --seeds must be >= 2'),
    (['--epochs', '5,x'], '--epochs takes comma-separated numbers'),
    (['--epochs', '0'], '--epochs must be positive'),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
  with pytest.raises(SystemExit) as e:
    seed_noise.main(['--out', str(tmp_path / 'out'), *args])
  assert e.value.code == 2
  lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith('error:')]
  assert len(lines) == 1 and message in lines[0], lines


def test_tiny_run_reports_each_epoch_count_and_resumes(tmp_path, capsys, monkeypatch):
  monkeypatch.setitem(spaces.SPACE_TABLES, 'toy', TOY_TABLE)
  monkeypatch.chdir(REPO_ROOT)
  args = ['--architectures', '2', '--seeds', '2', '--epochs', '0.05,0.1', '--workers', '1',
          '--out', str(tmp_path / 'out'), '--targets', '7e3,90e3', '--set', 'space=toy',
          '--set', 'width=1.0', '--set', 'ops=', '--set', 'train.batch_size=8',
          '--set', 'train.eval_batch_size=64', '--set', 'xla_fast_compile=true']
  first = seed_noise.main(args)
  last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert list(last['by_epochs']) == ['0.05', '0.1'] and len(last['architectures']) == 2
  for figures in last['by_epochs'].values():
    assert len(figures['top1_seeds']) == 2 and all(len(s) == 2 for s in figures['top1_seeds'])
    assert figures['runs'] == 4 and 0 <= figures['seed_std_mean'] <= figures['seed_std_max']
    assert figures['lowest_run'] == pytest.approx(100 * min(min(s) for s in figures['top1_seeds']))
  # Each epoch count is its own recipe in the store: 2 architectures x 2 seeds x 2 lengths.
  with open(tmp_path / 'out' / 'population' / 'population.jsonl') as f:
    assert len(f.read().splitlines()) == 8
  again = seed_noise.main(args)
  assert again['by_epochs'] == first['by_epochs']
  with open(tmp_path / 'out' / 'population' / 'population.jsonl') as f:
    assert len(f.read().splitlines()) == 8
