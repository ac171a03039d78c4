"""benchmarks/supernet_ranking.py: recipe names, bad input, and the tiny mode end to end on the
toy space (a SuperNet under each recipe trains and ranks a tiny population; a rerun reuses
everything)."""

import json

import pytest

from benchmarks import supernet_ranking
from hournas_jax import spaces
from spaces_for_tests import TOY_TABLE


def test_recipe_names():
  assert supernet_ranking.parse_recipe('uniform') == {
      'sampling': 'uniform', 'two_stage': False, 'multiplier': 1, 'sharing': None}
  assert supernet_ranking.parse_recipe('x4') == {
      'sampling': 'distribution', 'two_stage': False, 'multiplier': 4, 'sharing': None}
  assert supernet_ranking.parse_recipe('hournas+sandwich+separate+x2') == {
      'sampling': 'sandwich', 'two_stage': True, 'multiplier': 2, 'sharing': 'none'}
  for bad in ('fair', 'uniform+sandwich', 'x0', 'x2+x4', 'nested+separate'):
    with pytest.raises(ValueError, match='recipe'):
      supernet_ranking.parse_recipe(bad)


@pytest.mark.parametrize('args,message', [
    (['--recipes', 'uniform,fair'], "unknown token 'fair'"),
    (['--recipes', 'uniform,uniform'], 'names a recipe twice'),
    (['--architectures', '1'], '--architectures must be >= 2'),
    (['--targets', '7e3'], '--targets must be PARAMS,FLOPS'),
    (['--set', 'search.weight_sampling=fair'], 'config.search.weight_sampling must be one of'),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
  with pytest.raises(SystemExit) as e:
    supernet_ranking.main(['--out', str(tmp_path / 'out'), *args])
  assert e.value.code == 2
  lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith('error:')]
  assert len(lines) == 1 and message in lines[0], lines


TINY = ['--tiny', '--workers', '1', '--architectures', '3', '--train-seeds', '2',
        '--targets', '7e3,90e3', '--set', 'space=toy', '--set', 'width=1.0', '--set', 'ops=',
        '--recipes', 'distribution,uniform+x2,strict_fair+separate,hournas+sandwich']
# Every weight sampling, the steps multiplier, separate weights and the two-stage SuperNet.


def test_tiny_mode_trains_and_ranks_under_each_recipe(tmp_path, capsys, monkeypatch):
  monkeypatch.setitem(spaces.SPACE_TABLES, 'toy', TOY_TABLE)
  out = tmp_path / 'out'
  supernet_ranking.main(['--out', str(out), *TINY])
  last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  keys = ('kendall_tau', 'spearman', 'regret_top1', 'recipe', 'supernet_steps', 'wall_s')
  assert all(k in last for k in keys) and last['recipe'] == 'distribution'
  assert list(last['recipes']) == ['distribution', 'uniform+x2', 'strict_fair+separate',
                                   'hournas+sandwich']
  for name, r in last['recipes'].items():
    assert all(k in r for k in keys), name
    assert len(r['inherited_top1']) == 3 and all(0 <= a <= 1 for a in r['inherited_top1'])
    assert r['regret_top1'] >= 0
    # Every recipe trains the search's weight steps (4 + 4 in tiny mode), x2 twice as many.
    assert r['supernet_steps'] == (16 if 'x2' in name else 8), name
  assert last['recipes']['strict_fair+separate']['weight_sharing'] == 'none'
  assert last['recipes']['hournas+sandwich']['weight_sampling'] == 'sandwich'
  assert last['population']['architectures'] == 3
  assert {'seed_std', 'spread', 'seed_tau'} <= set(last['noise'])
  # A rerun trains nothing: the population and every recipe's result are reused.
  supernet_ranking.main(['--out', str(out), *TINY])
  printed = capsys.readouterr().out
  assert printed.count('done earlier') == 4 and 'training 0' not in printed
  again = json.loads(printed.strip().splitlines()[-1])
  assert again['recipes'] == last['recipes']
  # Scores from another evaluation (here: a stored D_val pass of another length) are not
  # reused: the stored SuperNet is scored again, not trained again, and scores alike.
  path = out / 'recipes' / 'distribution' / 'result.json'
  stored = json.loads(path.read_text())
  stored['evaluation']['batches'] += 1
  path.write_text(json.dumps(stored))
  supernet_ranking.main(['--out', str(out), *TINY])
  printed = capsys.readouterr().out
  assert printed.count('done earlier') == 3
  assert '1 of 1 searches done; running 0' in printed
  third = json.loads(printed.strip().splitlines()[-1])
  assert third['recipes']['distribution']['inherited_top1'] == (
      last['recipes']['distribution']['inherited_top1'])
  rescored = json.loads(path.read_text())['evaluation']
  assert rescored['batches'] == stored['evaluation']['batches'] - 1
