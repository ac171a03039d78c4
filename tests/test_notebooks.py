"""The notebooks, run top to bottom in a python3 kernel (nbclient) at a tiny scale, each in a
temporary workdir: only the cell tagged `parameters` is replaced, as papermill would. And the
search history (<workdir>/search/history.jsonl) the walkthrough plots."""

import json
import pathlib

import nbclient
import nbformat
import numpy as np
import pytest

from configs import quickstart
from hournas_jax import setup as setup_lib
from hournas_jax import analysis, search, spaces, train, vital
from spaces_for_tests import TOY_TABLE

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ('quickstart.ipynb', 'walkthrough.ipynb')


def execute(name: str, parameters: str, monkeypatch) -> dict:
  """Runs notebooks/<name> with its parameters cell replaced, from notebooks/ (where Jupyter
  starts a kernel for it); returns its cells by id. A cell that raises fails the test
  (nbclient's CellExecutionError, with the cell's traceback)."""
  nb = nbformat.read(REPO / 'notebooks' / name, as_version=4)
  tagged = [c for c in nb.cells if 'parameters' in c.metadata.get('tags', [])]
  assert len(tagged) == 1, f'{name} needs exactly one cell tagged parameters'
  tagged[0].source = parameters
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')  # the kernel inherits the environment
  nbclient.NotebookClient(nb, kernel_name='python3', timeout=600,
                          resources={'metadata': {'path': str(REPO / 'notebooks')}}).execute()
  return {c.id: c for c in nb.cells}


def text(cell) -> str:
  return ''.join(o.get('text', '') for o in cell.outputs if o.output_type == 'stream')


def pngs(cell) -> int:
  return sum('image/png' in o.get('data', {}) for o in cell.outputs
             if o.output_type == 'display_data')


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_notebooks_are_saved_valid_and_without_outputs(name):
  nb = nbformat.read(REPO / 'notebooks' / name, as_version=4)
  nbformat.validate(nb)
  assert nb.nbformat == 4
  for cell in nb.cells:
    if cell.cell_type == 'code':
      assert cell.outputs == [] and cell.execution_count is None, cell.id


def test_walkthrough_runs_top_to_bottom(tmp_path, monkeypatch):
  workdir = tmp_path / 'walkthrough'
  cells = execute('walkthrough.ipynb', f"""
WORKDIR = {str(workdir)!r}
SEARCH_EPOCHS = 0.3
TRAIN_EPOCHS = 1.0
LOG_EVERY_STEPS = 4
PROPOSAL_SAMPLES = 200
MASK_DRAWS = 1
""", monkeypatch)
  for path in ('arch.json', 'summary.txt', 'theta.png', 'pi.png', 'proposals.png',
               'train/results.json', 'search/history.jsonl', 'history.png', 'masking.json',
               'masking.png'):
    assert (workdir / path).is_file(), path
  arch = json.loads((workdir / 'arch.json').read_text())

  assert 'retrained from scratch: test top-1' in text(cells['search'])
  space = setup_lib.resolve_setup(quickstart.get_config(), str(tmp_path / 'unused')).space
  names = vital.vital_layers(space)
  assert f'vital blocks of fbnet_shallow: {", ".join(names)}' in text(cells['vital'])
  assert ', '.join(f'{n}={arch["ops"][n]}' for n in names) in text(cells['vital'])
  assert '8 proposals fitted' in text(cells['proposals']) and pngs(cells['proposals']) == 1
  history = (workdir / 'search' / 'history.jsonl').read_text().splitlines()
  assert f'{len(history)} records, steps 0 to {arch["steps"]["step"]}' in text(cells['history'])
  assert pngs(cells['history']) == 1 and pngs(cells['theta']) == 1
  assert f'params: {arch["params"]:,} (target 120,000' in text(cells['costs'])
  assert pngs(cells['costs']) == 1
  masking = json.loads((workdir / 'masking.json').read_text())
  assert masking['ops'] == [arch['ops'][n] for n in space.searchable_names]
  assert set(masking['mean_drop']['vital']) == {'0.3', '0.6', '1'}
  shown = text(cells['masking'])
  for p, drop in masking['mean_drop']['vital'].items():
    assert f'p = {p:<4} vital blocks {100 * drop:5.1f}' in shown
  assert pngs(cells['masking']) == 1


def test_quickstart_runs_top_to_bottom(tmp_path, monkeypatch):
  workdir = tmp_path / 'quickstart'
  cells = execute('quickstart.ipynb', f"""
WORKDIR = {str(workdir)!r}
OVERRIDES = ['--config.search.vital_epochs=0.3', '--config.search.nonvital_epochs=0.3',
             '--config.train.epochs=1', '--config.baseline.architectures=2',
             '--config.baseline.seeds=1', '--config.baseline.workers=1',
             '--config.proposal_samples=200']
""", monkeypatch)
  for path in ('arch.json', 'summary.txt', 'theta.png', 'pi.png', 'proposals.png',
               'train/results.json', 'comparison.json', 'eval_results.json'):
    assert (workdir / path).is_file(), path
  arch = json.loads((workdir / 'arch.json').read_text())
  assert f'vital ops: {arch["vital_ops"]}' in text(cells['summary'])
  assert pngs(cells['plots']) == 3
  comparison = json.loads((workdir / 'comparison.json').read_text())
  assert comparison['seeds'] == 1 and len(comparison['random']['top1']) == 2
  assert 'searched vs 2 random architectures of the same budget' in text(cells['comparison'])
  evaluated = json.loads((workdir / 'eval_results.json').read_text())
  trained = json.loads((workdir / 'train' / 'results.json').read_text())
  assert evaluated['train']['top1'] == pytest.approx(trained['top1'])


# --------------------------------------------------------------------------------------------
# The search history.


@pytest.fixture
def toy_space(monkeypatch):
  monkeypatch.setitem(spaces.SPACE_TABLES, 'toy', TOY_TABLE)


def history_config():
  config = quickstart.get_config()
  config.space, config.width, config.ops = 'toy', 1.0, ''
  config.targets.params, config.targets.flops = 7e3, 90e3
  s = config.search
  s.vital_steps = s.nonvital_steps = 8
  s.batch_size = 8
  s.num_proposals = 3
  config.retrain_after_search = False
  config.random_baseline = False
  config.proposal_samples = 0
  config.log_every_steps = 3
  config.checkpoint_every_steps = 5
  config.tensorboard = False
  return config


def read_history(workdir) -> list[dict]:
  with open(workdir / 'search' / 'history.jsonl') as f:
    return [json.loads(line) for line in f]


def softmax(x):
  e = np.exp(np.asarray(x, np.float64) - np.max(x))
  return e / e.sum()


def test_the_search_history_and_its_resume(toy_space, tmp_path, monkeypatch):
  config = history_config()
  result = train.train_and_evaluate(config, str(tmp_path / 'reference'))['search']
  history = read_history(tmp_path / 'reference')
  # A line at the start, at every progress line (every 3 steps), at the end of each stage, and
  # where stage 2 starts from; the 8 vital steps are steps 1-8, the non-vital ones 9-16.
  assert [(r['step'], r['stage']) for r in history] == [
      (0, 'vital'), (3, 'vital'), (6, 'vital'), (8, 'vital'), (8, 'nonvital'),
      (9, 'nonvital'), (12, 'nonvital'), (15, 'nonvital'), (16, 'nonvital')]
  space = setup_lib.resolve_setup(config, str(tmp_path / 'unused')).space
  vital_names = list(vital.vital_layers(space))
  others = [n for n in space.searchable_names if n not in vital_names]
  for r in history:
    assert r['tau'] == pytest.approx(5.0 * 0.995 ** r['step'])
    assert list(r['probabilities']) == (vital_names if r['stage'] == 'vital' else others)
    for layer, p in r['probabilities'].items():
      assert set(p) == set(space.layer(layer).ops)
      assert sum(p.values()) == pytest.approx(1.0, abs=1e-5)
    if r['stage'] == 'nonvital':
      assert sum(r['pi']) == pytest.approx(1.0, abs=1e-5)
      assert r['proposal'] == int(np.argmax(r['pi']))
    else:
      assert 'pi' not in r
  # Stage 2 starts with pi uniform, and the history ends where the result does: its pi, and
  # stage 1's last theta_vital as sampled at that step's tau.
  assert history[4]['pi'] == pytest.approx([1 / 3] * 3)
  assert history[-1]['pi'] == pytest.approx(result['pi'], abs=1e-6)
  assert history[-1]['proposal'] == result['proposal']
  end_of_vital = history[3]
  for layer, theta in zip(vital_names, result['theta_vital']):
    ops = [space.op_names.index(o) for o in end_of_vital['probabilities'][layer]]
    expected = softmax(np.asarray(theta)[ops] / end_of_vital['tau'])
    assert list(end_of_vital['probabilities'][layer].values()) == pytest.approx(expected,
                                                                               abs=1e-5)
  picture = tmp_path / 'history.png'
  analysis.plot_search_history(str(picture), history, result['ops'])
  assert picture.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

  # Killed during step 8 with the latest checkpoint at step 5, and step 6's line half written:
  # the resumed run drops what came after step 5 and writes the uninterrupted run's history.
  real_step, calls = search.Searcher.train_step, []

  def stopping_step(self, state, tr_batch=None, val_batch=None):
    if len(calls) == 7:
      raise KeyboardInterrupt
    calls.append(1)
    return real_step(self, state, tr_batch, val_batch)

  monkeypatch.setattr(search.Searcher, 'train_step', stopping_step)
  run = tmp_path / 'run'
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, str(run))
  path = run / 'search' / 'history.jsonl'
  lines = path.read_text().splitlines(keepends=True)
  assert [json.loads(line)['step'] for line in lines] == [0, 3, 6]
  path.write_text(''.join(lines[:2]) + lines[2][:20])  # as if killed while writing step 6's
  monkeypatch.setattr(search.Searcher, 'train_step', real_step)
  train.train_and_evaluate(config, str(run))
  resumed = read_history(run)
  assert [(r['step'], r['stage']) for r in resumed] == [(r['step'], r['stage'])
                                                        for r in history]
  for got, want in zip(resumed, history):
    assert got.get('pi') == (None if 'pi' not in want else pytest.approx(want['pi'], abs=1e-6))
    for layer, p in want['probabilities'].items():
      assert got['probabilities'][layer] == pytest.approx(p, abs=1e-6)
