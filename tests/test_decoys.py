"""Decoy twins (hournas_jax/decoys.py): equal cost, frozen kernels, the config option, and
benchmarks/decoys.py's smallest run."""

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hournas_jax import blocks, costs, decoys, engines, errors, spaces, supernet, train
from hournas_jax.engines import single_path
from spaces_for_tests import TOY_TABLE, tiny_config, toy_space

REPO_ROOT = pathlib.Path(__file__).parent.parent
RES = 16
SPACE = decoys.with_decoys(toy_space(RES), ('k3e1', 'k3e3'))


def _num_params(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def _kernels(tree):
  """{path: array} of the conv kernels in a variables tree."""
  return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)
          if 'kernel' in jax.tree_util.keystr(p)}


def test_twins_sit_beside_their_real_ops():
  assert SPACE.op_names == ('k3e1', 'k3e1_decoy', 'k3e3', 'k3e3_decoy', 'skip')
  for layer, plain in zip(SPACE.searchable_layers, toy_space(RES).searchable_layers):
    assert [o for o in layer.ops if not o.endswith('_decoy')] == list(plain.ops)
    assert {'k3e1_decoy', 'k3e3_decoy'} <= set(layer.ops)
  assert decoys.split(SPACE.op_names) == (('k3e1', 'k3e3', 'skip'), ('k3e1', 'k3e3'))
  assert decoys.with_decoys(toy_space(RES), ()) == toy_space(RES)


def test_each_flavour_of_twin_has_its_own_name_and_rebuilds_from_it():
  space = decoys.with_decoys(toy_space(RES), ('k3e3',), 'frozen_no_shortcut')
  assert space.op_names == ('k3e1', 'k3e3', 'k3e3_decoy_noshortcut', 'skip')
  assert decoys.split(space.op_names) == (('k3e1', 'k3e3', 'skip'), ('k3e3',))
  assert decoys.flavour_of(space.op_names) == 'frozen_no_shortcut'
  assert decoys.flavour_of(SPACE.op_names) == decoys.flavour_of(('k3e3',)) == 'frozen'
  assert decoys.real_of('k3e3_decoy_noshortcut') == decoys.real_of('k3e3_decoy') == 'k3e3'
  assert decoys.is_decoy(space, 'k3e3_decoy_noshortcut') and not decoys.is_decoy(space, 'k3e3')
  with pytest.raises(spaces.SpaceError, match='decoy_kind must be one of frozen, '
                     'frozen_no_shortcut; got'):
    decoys.with_decoys(toy_space(RES), ('k3e3',), 'noisy')


@pytest.mark.parametrize('flavour', sorted(decoys.FLAVOURS))
def test_a_twin_costs_exactly_its_real_op(flavour):
  space = decoys.with_decoys(toy_space(RES), ('k3e1', 'k3e3'), flavour)
  tables = costs.cost_tables(space)
  plain = costs.cost_tables(toy_space(RES))
  for real in ('k3e1', 'k3e3'):
    twin = decoys.twin_name(real, flavour)
    r, d = space.op_names.index(real), space.op_names.index(twin)
    np.testing.assert_array_equal(tables.params[:, d], tables.params[:, r])
    np.testing.assert_array_equal(tables.flops[:, d], tables.flops[:, r])
    np.testing.assert_array_equal(tables.mask[:, d], tables.mask[:, r])
    np.testing.assert_array_equal(tables.params[:, r], plain.params[:, plain.op_names.index(real)])
    # The built networks: every layer at the real op, and every layer at its decoy.
    nets = {}
    for op in (real, twin):
      ops = [op] * len(space.searchable_names)
      net = supernet.SuperNet(space, supernet.fixed_layer_ops(space, ops))
      nets[op] = net.variable_shapes((RES, RES, 3))
      assert _num_params(nets[op]['params']) == tables.cost(
          [space.op_names.index(op)] * len(ops))[0]
    shapes = lambda v: [x.shape for x in jax.tree_util.tree_leaves(v)]
    assert shapes(nets[real]) == shapes(nets[twin])


def test_only_the_no_shortcut_twin_cannot_act_as_a_skip():
  """In a layer that keeps its shape, with its branch switched off (every BatchNorm scale and
  bias 0), a frozen twin passes its input on as a skip would; the no-shortcut twin outputs 0."""
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, RES, RES, 8)), jnp.float32)
  outputs = {}
  for flavour in decoys.FLAVOURS:
    space = decoys.with_decoys(toy_space(RES), ('k3e3',), flavour)
    layer = next(l for l in space.searchable_layers if l.keeps_shape)
    twin = decoys.twin_name('k3e3', flavour)
    block = blocks.make_block(space, layer, twin)
    x_layer = x[..., :layer.in_channels]
    variables = block.init(jax.random.PRNGKey(0), x_layer, train=False)
    off = jax.tree_util.tree_map_with_path(
        lambda p, v: jnp.zeros_like(v) if jax.tree_util.keystr(p).endswith(
            ("['scale']", "['bias']")) and v.ndim == 1 else v, variables)
    outputs[flavour] = (np.asarray(block.apply(off, x_layer, train=False)), x_layer,
                        blocks.has_shortcut(space, layer, twin))
  y, x_layer, shortcut = outputs['frozen']
  np.testing.assert_allclose(y, x_layer, atol=1e-6)
  assert shortcut
  y, _, shortcut = outputs['frozen_no_shortcut']
  np.testing.assert_allclose(y, 0.0, atol=1e-6)
  assert not shortcut


def test_decoys_keep_their_own_weights_under_weight_sharing():
  """Nested sharing: the real ops share one set of kernels, sized by them alone; each decoy
  owns its kernels."""
  shapes = single_path.SinglePathEngine(SPACE, supernet.layer_ops(SPACE),
                                        weight_sharing=True).state_shapes((RES, RES, 3))
  plain_space = toy_space(RES)
  plain = single_path.SinglePathEngine(plain_space, supernet.layer_ops(plain_space),
                                       weight_sharing=True).state_shapes((RES, RES, 3))
  for layer in SPACE.searchable_layers:
    held = shapes['params'][layer.name]
    assert jax.tree.map(lambda x: x.shape, held['shared']) == jax.tree.map(
        lambda x: x.shape, plain['params'][layer.name]['shared'])
    assert not _kernels(held['k3e3']) and _kernels(held['k3e3_decoy'])


@pytest.mark.parametrize('weight_decay', [0.0, 4e-5])
def test_a_decoys_kernels_do_not_learn(weight_decay):
  """One search step through real ops and decoys: the real ops' (shared) kernels move, the
  decoys' stay at their initial values (only rescaled by weight decay, which the BatchNorm after
  every conv cancels), while the decoys' BatchNorms train."""
  engine = single_path.SinglePathEngine(SPACE, supernet.layer_ops(SPACE), weight_sharing=True,
                                        weight_decay=weight_decay)
  state = engine.init(0, (RES, RES, 3))
  path = dict(zip(SPACE.searchable_names,
                  ('k3e3_decoy', 'k3e3', 'k3e1_decoy', 'k3e1', 'k3e3_decoy')))
  rng = np.random.default_rng(0)
  batch = {'image': jnp.asarray(rng.standard_normal((8, RES, RES, 3)), jnp.float32),
           'label': jnp.asarray(rng.integers(0, 10, 8), jnp.int32)}
  after, _ = engine.train_step(state, batch, engines.Choice.from_path(SPACE, path), 0.5)
  for layer, op in path.items():
    before_p, after_p = state['params'][layer], after['params'][layer]
    if op.endswith('_decoy'):
      kernels0, kernels1 = _kernels(before_p[op]), _kernels(after_p[op])
      assert len(kernels0) == 3
      for name, k0 in kernels0.items():
        k0, k1 = np.asarray(k0), np.asarray(kernels1[name])
        scale = float(np.sum(k0 * k1) / np.sum(k0 * k0))
        np.testing.assert_allclose(k1, scale * k0, rtol=1e-6, atol=1e-9)
        assert scale == 1.0 if weight_decay == 0 else 0.99 < scale < 1.0
      bn0 = [np.asarray(x) for x in jax.tree_util.tree_leaves(before_p[op])
             if x.ndim == 1]
      bn1 = [np.asarray(x) for x in jax.tree_util.tree_leaves(after_p[op]) if x.ndim == 1]
      assert any(not np.array_equal(a, b) for a, b in zip(bn0, bn1))
    else:
      for name, k0 in _kernels(before_p['shared']).items():
        assert not np.allclose(k0, _kernels(after_p['shared'])[name]), (layer, name)


def test_a_bad_decoy_name_is_one_line_naming_the_allowed_ops(tmp_path, monkeypatch):
  monkeypatch.setitem(spaces.SPACE_TABLES, 'toy', TOY_TABLE)
  for bad in ('k5e3', 'skip', 'k3e3_decoy', 'k3e3,k3e3'):
    with pytest.raises(spaces.SpaceError) as raised:
      train.train_and_evaluate(tiny_config(decoys=bad), str(tmp_path / 'run'))
    message = str(raised.value)
    assert isinstance(raised.value, errors.UserError) and '\n' not in message
    assert message.startswith('decoys must name') and '(k3e1, k3e3)' in message, message


@pytest.mark.parametrize('flavour', sorted(decoys.FLAVOURS))
def test_an_all_decoy_network_trains_and_evaluates(tmp_path, monkeypatch, flavour):
  """`train.arch` may name a decoy; eval mode rebuilds the space with its twins, of the
  flavour the trained network's names say."""
  monkeypatch.setitem(spaces.SPACE_TABLES, 'toy', TOY_TABLE)
  workdir = str(tmp_path / 'run')
  twin = decoys.twin_name('k3e3', flavour)
  trained = train.train_and_evaluate(
      tiny_config(mode='train', decoys='k3e3', decoy_kind=flavour, **{'train.arch': twin}),
      workdir)
  assert trained['train']['ops'] == [twin] * 5
  evaluated = train.train_and_evaluate(tiny_config(mode='eval', decoys='k3e3'), workdir)
  assert evaluated['train']['ops'] == trained['train']['ops']
  assert evaluated['train']['top1'] == trained['train']['top1']


def _benchmark():
  spec = importlib.util.spec_from_file_location('decoys_benchmark',
                                                REPO_ROOT / 'benchmarks' / 'decoys.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


KEYS = ('decoy_pick_rate', 'decoy_pick_rate_vital', 'decoy_pick_rate_nonvital', 'decoy_mass',
        'all_real_top1', 'all_decoy_top1', 'layers_counted', 'architectures', 'search_wall_s',
        'decoy_cost_top1', 'decoy_cost_top1_vital', 'decoy_cost_top1_nonvital',
        'decoy_cost_top1_vital_se')


def test_benchmark_tiny_run_prints_the_json_keys_and_resumes(tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(spaces.SPACE_TABLES, 'toy', TOY_TABLE)
  monkeypatch.chdir(REPO_ROOT)
  args = ['--tiny', '--config', 'configs/quickstart.py', '--decoys', 'k3e3', '--seeds', '1',
          '--train-seeds', '1', '--workers', '1', '--out', str(tmp_path / 'out'),
          '--targets', '7e3,90e3', '--set', 'space=toy', '--set', 'width=1.0', '--set', 'ops=']
  benchmark = _benchmark()
  first = benchmark.main(args)
  last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert set(KEYS) <= set(last)
  assert set(last['all_real_top1']) == set(last['all_decoy_top1']) == {'k3e3'}
  assert len(last['architectures']) == 1
  counted = last['layers_counted_vital'] + last['layers_counted_nonvital']
  assert last['layers_counted'] == counted <= 5
  # The cost splits into the vital layers' decoys and the others'.
  (row,) = last['decoy_cost_standalone_top1']
  assert last['decoy_cost_top1_vital'] == pytest.approx(row['vital_real'] - row['searched'])
  assert last['decoy_cost_top1'] == pytest.approx(
      last['decoy_cost_top1_vital'] + last['decoy_cost_top1_nonvital'])
  # A rerun reuses the finished searches and trainings.
  again = benchmark.main(args)
  assert again['search_wall_s'] == first['search_wall_s']
  assert again['all_decoy_top1'] == first['all_decoy_top1']


def test_cost_variants_make_the_decoys_real_by_stage():
  space = decoys.with_decoys(toy_space(RES), ('k3e3',))
  ops = ('k3e3_decoy', 'k3e3', 'k3e1', 'k3e3_decoy', 'skip')
  variants = _benchmark().cost_variants(space, ops, {'layer2_1', 'layer3_1'})
  assert variants == {'searched': ops,
                      # layer3_1 is vital: its decoy is made real; layer1_1's is not.
                      'vital_real': ('k3e3_decoy', 'k3e3', 'k3e1', 'k3e3', 'skip'),
                      'all_real': ('k3e3', 'k3e3', 'k3e1', 'k3e3', 'skip')}


def test_pick_rate_counts_only_layers_on_a_twin_pair():
  space = decoys.with_decoys(toy_space(RES), ('k3e3',))
  ops = ('k3e3_decoy', 'k3e3', 'k3e1', 'k3e3_decoy', 'skip')
  result = {'ops': dict(zip(space.searchable_names, ops)),
            'probabilities': {n: {'k3e3': 0.25, 'k3e3_decoy': 0.25, 'k3e1': 0.5}
                              for n in space.searchable_names}}
  rates = _benchmark().pick_rates(space, [result], {'layer2_1', 'layer3_1'})
  # Counted: layer1_1 (decoy), layer2_1 (real, vital), layer3_1 (decoy, vital).
  assert (rates['layers_counted_vital'], rates['layers_counted_nonvital']) == (2, 1)
  assert (rates['decoy_pick_rate_vital'], rates['decoy_pick_rate_nonvital']) == (0.5, 1.0)
  assert rates['decoy_pick_rate'] == pytest.approx(2 / 3)
  assert rates['decoy_mass'] == 0.5
