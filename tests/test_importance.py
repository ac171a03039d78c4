"""Block importance: channel masking, the sensitivity grid and saturation curves, alone and as
main.py modes on the toy space (tests/spaces_for_tests.py) over the 8x8 digits."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import analysis_masking, analysis_saturation, analysis_sensitivity
from hournas_jax import setup as setup_lib
from hournas_jax import snapshots as snapshots_lib
from hournas_jax import errors, importance, population, retrain, spaces, supernet, train
from spaces_for_tests import TOY_TABLE, switch_on_residual_branches, toy_space

REPO_ROOT = pathlib.Path(__file__).parent.parent
TOY_ARCH = 'k3e3,k3e3,k3e3,k3e3,k3e3'  # every non-vital block has a residual branch


@pytest.fixture(autouse=True)
def registered_toy_space(monkeypatch):
  monkeypatch.setitem(spaces.SPACE_TABLES, 'toy', TOY_TABLE)


def toy_config(module, **overrides):
  """An analysis config on the toy space at 8x8 digits."""
  config = module.get_config()
  config.space, config.width, config.ops = 'toy', 1.0, ''
  config.image_size = 8
  config.train.arch = TOY_ARCH
  config.train.batch_size = 64
  config.train.epochs = 0.0
  config.train.steps = 6
  config.tensorboard = False
  config.log_every_steps = 50
  config.checkpoint_every_steps = 50
  config.update_from_flattened_dict(overrides)
  return config


# --------------------------------------------------------------------------------------------
# Channel masking: the math.


def test_channel_mask_keeps_or_zeroes_each_channel_with_probability_p():
  rng = np.random.default_rng(0)
  assert np.all(importance.channel_mask(rng, 64, 0.0) == 1.0)
  assert np.all(importance.channel_mask(rng, 64, 1.0) == 0.0)
  draws = np.stack([importance.channel_mask(rng, 64, 0.3) for _ in range(200)])
  assert set(np.unique(draws)) == {0.0, 1.0}
  assert abs((1 - draws.mean()) - 0.3) < 0.02


def test_mask_plan_draws_are_reproducible_and_independent_of_the_other_blocks():
  space = toy_space(8)
  one = importance.mask_plan(space, ['layer2_1'], [0.5], 3, seed=7)
  both = importance.mask_plan(space, ['layer1_1', 'layer2_1'], [0.3, 0.5], 3, seed=7)
  assert len(one) == 3 and len(both) == 12
  again = [d for d in both if d.block == 'layer2_1' and d.p == 0.5]
  for a, b in zip(one, again):
    np.testing.assert_array_equal(a.mask, b.mask)
  assert one[0].mask.shape == (space.layer('layer2_1').out_channels,)
  assert not all(np.array_equal(one[0].mask, d.mask) for d in one[1:])  # draws differ


def _fixed_net(space, ops):
  """A fixed network at its initial weights, the classifier scaled up so that logits are of
  order 1 (at N(0, 0.01^2) they are too small for the comparisons to mean anything) and the
  residual branches switched on (at scale 0 masking them would change nothing)."""
  net = supernet.SuperNet(space, supernet.fixed_layer_ops(space, ops))
  variables = net.init_all(3, (8, 8, 1))
  switch_on_residual_branches(variables['params'])
  variables = jax.tree_util.tree_map_with_path(
      lambda path, v: v * 300.0 if 'Dense' in jax.tree_util.keystr(path) else v, variables)
  return net, jax.tree.map(jnp.asarray, variables)


def test_a_fully_masked_block_with_a_shortcut_is_the_identity():
  space = toy_space(8)
  ops = ('k3e3', 'k3e3', 'k3e1', 'k3e3', 'k3e1')
  net, variables = _fixed_net(space, ops)
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
  plain = net.apply(variables, x, train=False)
  ones = {l.name: jnp.ones(l.out_channels) for l in space.layers if l.name != 'head'}
  np.testing.assert_allclose(net.apply(variables, x, train=False, channel_masks=ones), plain,
                             rtol=1e-6, atol=1e-6)
  # layer1_1 keeps its shape: masking all of it leaves the network that skips it.
  zero = {'layer1_1': jnp.zeros(space.layer('layer1_1').out_channels)}
  masked = net.apply(variables, x, train=False, channel_masks=zero)
  skip_net = supernet.SuperNet(space, supernet.fixed_layer_ops(space, ('skip',) + ops[1:]))
  skip_variables = {k: {n: v for n, v in tree.items() if n != 'layer1_1'}
                    for k, tree in variables.items()}
  np.testing.assert_allclose(masked, skip_net.apply(skip_variables, x, train=False),
                             rtol=1e-4, atol=1e-4)
  assert float(jnp.abs(plain).max()) > 0.1
  assert float(jnp.abs(masked - plain).max()) > 1e-2


def test_a_fully_masked_vital_block_cuts_the_input_off():
  space = toy_space(8)
  net, variables = _fixed_net(space, ('k3e3',) * 5)
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
  for block in ('stem', 'layer2_1', 'layer3_1'):
    zero = {block: jnp.zeros(space.layer(block).out_channels)}
    logits = net.apply(variables, x, train=False, channel_masks=zero)
    np.testing.assert_allclose(logits, jnp.broadcast_to(logits[:1], logits.shape), atol=1e-4)
  plain = net.apply(variables, x, train=False)
  assert float(jnp.abs(plain - plain[:1]).max()) > 1e-2  # unmasked, the inputs matter


def test_maskable_and_vital_blocks_and_name_errors():
  space = toy_space(8)
  assert importance.maskable_blocks(space) == ('stem', 'layer1_1', 'layer2_1', 'layer2_2',
                                               'layer3_1', 'layer3_2')
  assert importance.vital_blocks(space) == ('stem', 'layer2_1', 'layer3_1', 'head')
  assert importance.parse_names('', ('a', 'b'), 'block') == ('a', 'b')
  assert importance.parse_names(' b, a ', ('a', 'b'), 'block') == ('b', 'a')
  with pytest.raises(importance.AnalysisError, match="unknown block 'head'; allowed: a, b"):
    importance.parse_names('a,head', ('a', 'b'), 'block')
  with pytest.raises(importance.AnalysisError, match='twice'):
    importance.parse_names('a,a', ('a', 'b'), 'block')
  assert importance.parse_probabilities('0, 0.5,1') == (0.0, 0.5, 1.0)
  for bad in ('1.5', '-0.1', 'half', '', 'nan'):
    with pytest.raises(importance.AnalysisError, match=r'in \[0, 1\]'):
      importance.parse_probabilities(bad)


# --------------------------------------------------------------------------------------------
# Channel masking on a trained network, as main.py's 'masking' mode.


@pytest.fixture(scope='module')
def masked_run(tmp_path_factory):
  """The toy network trained to a high accuracy on the digits, then masked."""
  with pytest.MonkeyPatch.context() as monkeypatch:
    monkeypatch.setitem(spaces.SPACE_TABLES, 'toy', TOY_TABLE)
    workdir = str(tmp_path_factory.mktemp('masking'))
    config = toy_config(analysis_masking, **{
        'train.steps': 240, 'train.learning_rate': 0.8,
        'analysis.mask_probabilities': '0,0.5,1', 'analysis.mask_draws': 3})
    summary = train.train_and_evaluate(config, workdir)
  return workdir, summary


def test_masking_mode_on_a_trained_network(masked_run):
  workdir, summary = masked_run
  assert json.load(open(os.path.join(workdir, 'masking.json'))) == json.loads(
      json.dumps(summary))
  assert os.path.getsize(os.path.join(workdir, 'masking.png')) > 0
  reference = summary['reference_top1']
  assert reference > 0.8, 'the toy network should have learnt the digits'
  assert reference == pytest.approx(json.load(
      open(os.path.join(workdir, 'train', 'results.json')))['top1'])
  rows = {r['block']: r for r in summary['blocks']}
  assert list(rows) == ['stem', 'layer1_1', 'layer2_1', 'layer2_2', 'layer3_1', 'layer3_2']
  majority = summary['chance']['majority_class']
  assert 0.09 < majority < 0.12 and summary['examples'] == 360
  for name, row in rows.items():
    # p = 0 changes nothing.
    assert row['top1']['0']['draws'] == [reference] * 3
    if row['vital']:
      # A vital block at p = 1 cuts every path: one prediction for every image, i.e. chance.
      assert row['top1']['1']['mean'] <= majority + 1e-9, name
      assert not row['shortcut']
    else:
      # Its shortcut keeps the path alive: above chance. How far above depends on how much
      # of the signal the block carries in so shallow a network (40-90% here), which moves
      # with the XLA build, so only the margin over chance is asserted.
      assert row['shortcut']
      assert row['top1']['1']['mean'] > majority + 0.03, name
  drops = summary['mean_drop']
  assert drops['vital']['1'] > drops['non_vital']['1'] + 0.3
  assert drops['vital']['0'] == pytest.approx(0.0, abs=1e-12)
  assert drops['non_vital']['0'] == pytest.approx(0.0, abs=1e-12)


def test_masking_reuses_the_model_of_a_workdir(masked_run, tmp_path):
  workdir, first = masked_run
  config = toy_config(analysis_masking, **{'train.arch': '', 'train.steps': 240,
                                           'train.learning_rate': 0.8,
                                           'analysis.blocks': 'layer2_2',
                                           'analysis.mask_probabilities': '1',
                                           'analysis.mask_draws': 3})
  summary = train.train_and_evaluate(config, workdir)  # nothing to train: the model is there
  assert summary['reference_top1'] == first['reference_top1']
  assert [r['block'] for r in summary['blocks']] == ['layer2_2']
  assert summary['blocks'][0]['top1']['1'] == first['blocks'][3]['top1']['1']
  # Another architecture than the workdir's model is refused, not silently analysed.
  config.train.arch = 'k3e1,k3e1,k3e1,k3e1,k3e1'
  with pytest.raises(importance.AnalysisError, match='config.train.arch asks for'):
    train.train_and_evaluate(config, workdir)


@pytest.mark.parametrize('overrides,error,match', [
    ({'train.arch': ''}, importance.AnalysisError, 'no trained model in'),
    ({'analysis.blocks': 'layer9_9'}, importance.AnalysisError,
     "unknown block in config.analysis.blocks 'layer9_9'; allowed: stem, layer1_1"),
    ({'analysis.blocks': 'head'}, importance.AnalysisError, 'the head is not masked'),
    ({'analysis.mask_probabilities': '0.3,1.2'}, setup_lib.ConfigError, r'in \[0, 1\]'),
    ({'analysis.mask_draws': 0}, setup_lib.ConfigError, 'mask_draws'),
])
def test_bad_masking_input_is_a_reported_error(tmp_path, overrides, error, match):
  with pytest.raises(error, match=match) as raised:
    train.train_and_evaluate(toy_config(analysis_masking, **overrides), str(tmp_path))
  assert isinstance(raised.value, errors.UserError)
  assert '\n' not in str(raised.value)
  assert not os.path.exists(tmp_path / 'train'), 'nothing trained for a bad request'


def test_main_reports_a_bad_probability_in_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, 'main.py', '--config=configs/analysis_masking.py',
       f'--workdir={tmp_path}', '--config.analysis.mask_probabilities=0.3,1.5'],
      cwd=REPO_ROOT, env=dict(os.environ, JAX_PLATFORMS='cpu'), capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 1
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: config.analysis.mask probabilities')
  assert '[0, 1]' in lines[0]


# --------------------------------------------------------------------------------------------
# Block sensitivity.


def test_sensitivity_grid_enumerates_one_block_at_a_time():
  space = toy_space(8)
  grid = importance.sensitivity_grid(space, ['k3e1', 'k3e3'], space.searchable_names,
                                     ['k3e1', 'k3e3', 'skip'])
  # skip only where the shape is kept (3 of 5 blocks): 2 backbones x (3 x 3 + 2 x 2).
  assert len(grid) == 2 * (3 * 3 + 2 * 2)
  for model in grid:
    changed = [n for n, o in zip(space.searchable_names, model.ops) if o != model.backbone]
    assert changed == ([] if model.op == model.backbone else [model.block])
    assert model.ops[space.searchable_names.index(model.block)] == model.op
  assert not any(m.op == 'skip' and m.block in ('layer2_1', 'layer3_1') for m in grid)
  with pytest.raises(importance.AnalysisError, match="backbone op 'skip' is not allowed at "
                                                     'layer2_1, layer3_1'):
    importance.sensitivity_grid(space, ['skip'], ['layer1_1'], ['k3e1'])


def test_sensitivity_summary_is_mean_and_std_over_a_blocks_ops():
  space = toy_space(8)
  grid = importance.sensitivity_grid(space, ['k3e1'], ['layer1_1', 'layer2_1'],
                                     ['k3e1', 'k3e3', 'skip'])
  # layer1_1: its 3 ops; layer2_1: the backbone network (k3e1, also layer1_1's first), not
  # k3e3 yet.
  assert grid[3].ops == grid[0].ops
  accuracy = {grid[0].ops: 0.5, grid[1].ops: 0.7, grid[2].ops: 0.9}
  summary = importance.summarize_sensitivity(space, grid, accuracy)['k3e1']
  first, second = summary['blocks']
  assert (first['block'], first['vital'], first['finished'], first['models']) == (
      'layer1_1', False, 3, 3)
  assert first['mean'] == pytest.approx(0.7) and first['std'] == pytest.approx(0.2)
  assert (second['vital'], second['finished'], second['models']) == (True, 1, 2)
  assert second['top1'] == {'k3e1': 0.5} and np.isnan(second['std'])
  assert summary['mean_std']['non_vital'] == pytest.approx(0.2)
  assert np.isnan(summary['mean_std']['vital'])


def test_an_interrupted_sensitivity_grid_resumes_without_training_anything_twice(
    tmp_path, monkeypatch):
  calls = []
  real = population.train_member

  def counting(setup, ops, seed):
    if len(calls) == 2 and not getattr(counting, 'interrupted', False):
      counting.interrupted = True
      raise KeyboardInterrupt  # the run is stopped while the 3rd network trains
    calls.append(tuple(ops))
    return real(setup, ops, seed)

  monkeypatch.setattr(population, 'train_member', counting)
  overrides = {'train.steps': 2, 'analysis.backbones': 'k3e1',
               'analysis.blocks': 'layer1_1,layer2_1', 'analysis.candidate_ops': 'k3e3,skip',
               'analysis.workers': 1}
  workdir = str(tmp_path)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(toy_config(analysis_sensitivity, **overrides), workdir)
  partial = json.load(open(tmp_path / 'sensitivity.json'))
  assert partial['finished'] == 2 and not partial['complete']
  assert os.path.getsize(tmp_path / 'sensitivity.png') > 0
  summary = train.train_and_evaluate(toy_config(analysis_sensitivity, **overrides), workdir)
  # layer1_1: k3e3, skip; layer2_1: k3e3 (no skip where the shape changes).
  assert len(calls) == len(set(calls)) == 3
  assert summary['finished'] == summary['models'] == 3 and summary['complete']
  assert os.path.getsize(tmp_path / 'sensitivity.png') > 0
  rows = summary['backbones']['k3e1']['blocks']
  assert [(r['block'], r['vital'], sorted(r['top1'])) for r in rows] == [
      ('layer1_1', False, ['k3e3', 'skip']), ('layer2_1', True, ['k3e3'])]
  # A wider slice trains only the models it adds.
  overrides['analysis.candidate_ops'] = 'k3e3,skip,k3e1'
  train.train_and_evaluate(toy_config(analysis_sensitivity, **overrides), workdir)
  assert len(calls) == len(set(calls)) == 4  # the backbone itself, the one new network


# --------------------------------------------------------------------------------------------
# Saturation.


def test_saturation_is_zero_at_the_start_and_one_at_the_end():
  rng = np.random.default_rng(0)
  w0, w_t = rng.normal(size=50), rng.normal(size=50)
  snapshots = [{'a': w0 + (w_t - w0) * t / 4, 'b': w0} for t in range(5)]
  curves = importance.saturation(snapshots)
  assert list(curves) == ['a']  # b never moved: no curve
  np.testing.assert_allclose(curves['a'], [0.0, 0.25, 0.5, 0.75, 1.0], atol=1e-12)
  assert importance.epochs_to_reach([0, 1, 2, 3, 4], curves['a'], 0.6) == pytest.approx(2.4)
  assert np.isnan(importance.epochs_to_reach([0, 1], [0.0, 0.5], 0.9))
  with pytest.raises(importance.AnalysisError, match='at least 2'):
    importance.saturation(snapshots[:1])


def test_layer_weights_take_the_kernels_of_each_layer():
  params = {'stem': {'conv3': {'Conv_0': {'kernel': np.ones((3, 3, 1, 2))},
                               'BatchNorm_0': {'scale': np.ones(2), 'bias': np.zeros(2)}}},
            'layer1_1': {}}
  weights = importance.layer_weights(params)
  assert list(weights) == ['stem'] and weights['stem'].shape == (18,)


def test_saturation_mode_keeps_snapshots_and_draws_the_curves(tmp_path):
  config = toy_config(analysis_saturation, **{'train.steps': 0, 'train.epochs': 3.0})
  summary = train.train_and_evaluate(config, str(tmp_path))
  run_dir = tmp_path / 'train'
  snapshots = snapshots_lib.load(str(run_dir / 'snapshots'))
  steps_per_epoch = 1437 // 64
  assert [s for s, _ in snapshots] == [0, steps_per_epoch, 2 * steps_per_epoch,
                                      3 * steps_per_epoch]
  assert summary['epochs'] == [0.0, 1.0, 2.0, 3.0]
  # The last snapshot is the trained model.
  trainer, state, _ = retrain.load_model(setup_lib.resolve_setup(config, str(tmp_path)),
                                         str(run_dir))
  last = jax.tree.map(np.asarray, state['params'])
  jax.tree.map(np.testing.assert_array_equal, snapshots[-1][1], last)
  layers = {r['layer']: r for r in summary['layers']}
  assert list(layers) == ['stem', 'layer1_1', 'layer2_1', 'layer2_2', 'layer3_1', 'layer3_2',
                          'head']
  for row in layers.values():
    assert row['curve'][0] == 0.0 and row['curve'][-1] == 1.0
    assert row['vital'] == (row['layer'] in ('stem', 'layer2_1', 'layer3_1', 'head'))
  assert os.path.getsize(tmp_path / 'saturation.png') > 0
  assert json.load(open(tmp_path / 'saturation.json'))['groups'].keys() == {'vital',
                                                                           'non_vital'}


def test_saturation_without_snapshots_is_a_reported_error(tmp_path):
  config = toy_config(analysis_saturation, **{'train.snapshot_every_epochs': 0.0})
  with pytest.raises(importance.AnalysisError, match='snapshot_every_epochs'):
    train.train_and_evaluate(config, str(tmp_path))
  config.mode = 'train'
  train.train_and_evaluate(config, str(tmp_path))  # a training that kept none
  config.mode = 'saturation'
  config.train.snapshot_every_epochs = 1.0
  with pytest.raises(importance.AnalysisError, match='no complete set of weight snapshots'):
    train.train_and_evaluate(config, str(tmp_path))
