"""The final choice by inherited accuracy (config.search.final_selection='inherited'): the
candidates it scores, the one it keeps, what arch.json records, and the config it needs."""

import json

import jax
import numpy as np
import pytest

from hournas_jax import costs, final_selection, search_phase, spaces, train
from hournas_jax import setup as setup_lib
from spaces_for_tests import TOY_TABLE, tiny_config


@pytest.fixture(autouse=True)
def toy_space(monkeypatch):
  monkeypatch.setitem(spaces.SPACE_TABLES, 'toy', TOY_TABLE)


def searched(tmp_path, **overrides):
  """(setup, searcher, final state) of a finished tiny search on the toy space."""
  # A params target alone: 14 of the toy space's 108 architectures lie within 5% of it.
  config = tiny_config(**{'retrain_after_search': False, 'search.final_selection': 'inherited',
                          'search.final_candidates': 6, 'targets.flops': 0.0, **overrides})
  train.train_and_evaluate(config, str(tmp_path))
  setup = setup_lib.resolve_setup(config, str(tmp_path))
  searcher, state = search_phase.load_search_state(setup)
  return setup, searcher, state


def test_candidates_are_distinct_within_the_targets_and_start_from_the_mode(tmp_path):
  setup, searcher, state = searched(tmp_path)
  candidates = searcher.candidates(state, 6)
  assert 2 <= len(candidates) <= 6
  assert candidates[0] == searcher.architecture(state)
  assert len({c.ops for c in candidates}) == len(candidates)
  tables = costs.cost_tables(setup.space)
  target = setup.config.targets.params
  for c in candidates:
    params, _ = tables.cost(c.indices(setup.space))
    assert abs(params - target) <= costs.TOLERANCE * target, c.ops
  # The vital layers are fixed by stage 1: every candidate keeps them.
  for c in candidates:
    for layer, op in state.vital_ops.items():
      assert dict(zip(setup.space.searchable_names, c.ops))[layer] == op


def test_the_result_is_the_best_scoring_candidate_and_arch_json_says_so(tmp_path, capsys):
  setup, _, _ = searched(tmp_path)
  result = json.loads((tmp_path / 'arch.json').read_text())
  record = result['final_selection']
  scores = [c['inherited_top1'] for c in record['candidates']]
  assert all(0.0 <= s <= 1.0 for s in scores)
  assert record['chosen'] == int(np.argmax(scores))
  chosen = record['candidates'][record['chosen']]['ops']
  assert [result['ops'][n] for n in setup.space.searchable_names] == chosen
  # The costs reported are the chosen architecture's.
  indices = [setup.space.op_names.index(o) for o in chosen]
  assert (result['params'], result['flops']) == pytest.approx(
      costs.cost_tables(setup.space).cost(indices))
  assert 'final choice by inherited accuracy: candidate' in capsys.readouterr().out


def test_a_path_with_broken_weights_is_not_chosen(tmp_path):
  # The SuperNet decides: scrambling the weights of the chosen architecture's op in a layer
  # where the candidates differ breaks every candidate that takes it, and the choice moves
  # away from them. (A SuperNet of a few steps is at chance everywhere: this one trains long
  # enough to tell; each op owns its weights, so the others keep theirs.)
  setup, searcher, state = searched(tmp_path, **{'search.vital_steps': 40,
                                                 'search.nonvital_steps': 40,
                                                 'search.batch_size': 32,
                                                 'search.weight_sharing': 'none'})
  names = setup.space.searchable_names
  _, record = search_phase.final_choice(setup, searcher, state)
  candidates = [dict(zip(names, c['ops'])) for c in record['candidates']]
  chosen = candidates[record['chosen']]
  assert record['candidates'][record['chosen']]['inherited_top1'] > 0.5
  layer = next(n for n in names if chosen[n] != 'skip' and any(c[n] != chosen[n]
                                                                for c in candidates))
  weights = dict(state.weights)
  weights['params'] = dict(weights['params'])
  weights['params'][layer] = dict(weights['params'][layer])
  rng = np.random.default_rng(0)
  weights['params'][layer][chosen[layer]] = jax.tree.map(
      lambda x: 10 * rng.normal(size=x.shape).astype(x.dtype),
      weights['params'][layer][chosen[layer]])
  _, broken = search_phase.final_choice(setup, searcher, state.replace(weights=weights))
  assert dict(zip(names, broken['candidates'][broken['chosen']]['ops']))[layer] != chosen[layer]


def test_best_prefers_the_more_probable_among_ties():
  scored = [final_selection.Scored(None, 0.5), final_selection.Scored(None, 0.7),
            final_selection.Scored(None, 0.7)]
  assert final_selection.best(scored) == 1
  with pytest.raises(ValueError, match='no candidate'):
    final_selection.best([])


@pytest.mark.parametrize('overrides, message', [
    ({'search.final_selection': 'best'}, 'final_selection must be one of mode, inherited'),
    ({'search.final_candidates': 0}, 'final_candidates must be an integer >= 1'),
    ({'search.final_selection': 'inherited', 'search.engine': 'switch'},
     "final_selection 'inherited' evaluates paths with the 'single_path' engine"),
])
def test_bad_final_selection_settings_are_refused_in_one_line(overrides, message):
  with pytest.raises(ValueError, match=message):
    train.validate_config(tiny_config(**overrides))
