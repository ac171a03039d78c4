"""Tests for latency lookup tables (hournas_jax.latency): the table's format and coverage,
resuming and refusing, alignment with the cost tables, predictions, the CLI
(hournas_jax.tools.latency), the TFLite runtime on one block (skipped only without TensorFlow or
hournas_jax.export) and a search with a latency target. The timing loop, the load figures and
the correction are in test_latency_quality.py. No thresholds on real timings: timings are
figures for benchmarks/latency_table.py."""

import json
import os

import numpy as np
import pytest

from hournas_jax import arch, costs, errors, latency, spaces
from hournas_jax.tools import latency as latency_tool
from latency_fakes import SlowFirstRuntime, RES, CountingRuntime, fake_table, protocol
from spaces_for_tests import TOY_TABLE, tiny_config, toy_space


def test_real_xla_table_has_the_documented_format(tmp_path):
  space = toy_space(RES)
  path = tmp_path / 'table.json'
  table = latency.build_table(space, protocol(repeats=2, min_sample_ms=1.0, calibration=1,
                                              passes=2), str(path), log=open(os.devnull, 'w'))
  assert json.loads(path.read_text()) == table
  assert os.listdir(tmp_path) == ['table.json']  # no temporary file left
  assert table['format'] == latency.TABLE_FORMAT
  assert table['space'] == {'name': 'toy', 'width': 1.0, 'image_size': RES, 'num_classes': 10,
                            'stem_stride': 2, 'channels': 3}
  assert table['runtime'] == 'xla_cpu'
  p = table['protocol']
  assert (p['warmup'], p['repeats'], p['batch'], p['dtype'], p['statistic'], p['threads']) == (
      0, 2, 1, 'float32', 'median', 1)
  for key in ('cpu_model', 'cpu_cores', 'jax', 'platform'):
    assert table['device'][key]
  assert table['created'] and table['updated']
  assert table['overhead_ms']['median'] > 0
  # Every (layer, op) of the space, stem and head included, with median <= p90 and p10.
  assert set(table['latency_ms']) == {l.name for l in space.layers}
  for layer in space.layers:
    assert set(table['latency_ms'][layer.name]) == set(layer.ops)
    assert table['layers'][layer.name]['input_shape'] == list(
        latency.input_shape(space, layer))
    for op in layer.ops:
      med = table['latency_ms'][layer.name][op]
      lo, hi = table['p10_ms'][layer.name][op], table['p90_ms'][layer.name][op]
      if op == 'skip':
        assert med == lo == hi == 0.0
      else:
        assert 0 < lo <= med <= hi
  assert table['layers']['stem']['input_shape'] == [1, RES, RES, 3]
  assert table['layers']['layer3_2']['input_shape'] == [1, 1, 1, 24]
  # One whole network measured for the correction, every layer's op named.
  (network,) = table['calibration']['networks']
  assert list(network['layers']) == [l.name for l in space.layers]
  assert 0 < network['p10'] <= network['median'] <= network['p90']
  assert set(table['calibration']['scale']) == {'net', 'plain'}
  # Two passes over the 12 distinct blocks (stem, head, 2 ops x 5 layers), each entry's lower
  # median kept.
  assert p['passes'].startswith('2 passes')
  assert all(n == 2 for ops in table['passes'].values() for n in ops.values())
  # The load and spread figures of the build; a toy block runs well under 1 ms, so each
  # sample timed several runs.
  (session,) = table['quality']['sessions']
  assert session['measurements'] == 1 + 2 * (2 + 10) + 1
  assert session['runs_per_sample'][1] > 1
  assert 0 < session['cpu_share']['median'] and session['cores'] == os.cpu_count()
  assert isinstance(table['quality']['busy'], bool)


def test_resume_skips_measured_entries(tmp_path):
  path = tmp_path / 't.json'
  table, runtime = fake_table(path)
  assert runtime.calls == 1 + 2 + 2 * 5  # overhead, stem, head, 2 ops (and skip) x 5 layers
  _, runtime = fake_table(path)
  assert runtime.calls == 0
  # Entries removed (an interrupted run) are the only ones measured again.
  data = json.loads(path.read_text())
  del data['latency_ms']['layer1_1']['k3e3']
  del data['latency_ms']['head']
  path.write_text(json.dumps(data))
  table, runtime = fake_table(path)
  assert runtime.calls == 2
  assert set(table['latency_ms']['layer1_1']) == {'k3e1', 'k3e3', 'skip'}
  assert set(table['latency_ms']['head']) == {'head'}


def test_a_later_pass_replaces_a_slowed_measurement_and_resumes(tmp_path):
  path = tmp_path / 't.json'
  runtime = SlowFirstRuntime(protocol(passes=2))
  table = latency.build_table(toy_space(RES), protocol(passes=2), str(path), runtime=runtime,
                              log=open(os.devnull, 'w'))
  assert runtime.calls == 1 + 2 * (2 + 2 * 5)  # overhead once, the 12 distinct blocks twice
  # Each block's first measurement ran twice as slow; the table holds its second, for every
  # layer alike (a stage's later layers share their first layer's measurements).
  twice = [m for m in runtime.medians.values() if len(m) == 2]  # all but the overhead
  assert len(twice) == 12 and all(m[0] == 2 * m[1] for m in twice)
  kept = {ms for layer, ops in table['latency_ms'].items() for op, ms in ops.items()
          if op != 'skip'}
  assert kept == {m[1] for m in twice}
  assert all(n == 2 for ops in table['passes'].values() for n in ops.values())
  one_pass = latency.build_table(toy_space(RES), protocol(passes=1), str(tmp_path / '1.json'),
                                 runtime=SlowFirstRuntime(protocol(passes=1)),
                                 log=open(os.devnull, 'w'))
  assert one_pass['latency_ms']['layer1_1']['k3e1'] == 2 * table['latency_ms']['layer1_1'][
      'k3e1']
  # A build cut short in its second pass measures the entries it had not reached, once.
  data = json.loads(path.read_text())
  data['passes']['layer1_1']['k3e3'] = 1
  path.write_text(json.dumps(data))
  runtime = SlowFirstRuntime(protocol(passes=2))
  again = latency.build_table(toy_space(RES), protocol(passes=2), str(path), runtime=runtime,
                              log=open(os.devnull, 'w'))
  assert runtime.calls == 1
  assert again['passes']['layer1_1']['k3e3'] == 2
  # Slowed (this runtime's first call), so the table's lower figure stays.
  assert again['latency_ms']['layer1_1']['k3e3'] == table['latency_ms']['layer1_1']['k3e3']


def test_same_blocks_on_same_shapes_measure_once(tmp_path):
  # layer2_2 and layer2_3 are the same blocks on the same input shape.
  space = spaces.from_table('toy', {**TOY_TABLE, 'stages': ((8, 1, 1), (16, 3, 2))}, RES)
  path = tmp_path / 't.json'
  table, runtime = fake_table(path, space=space)
  assert runtime.calls == 3 + 2 * 3  # overhead, stem, head; 2 ops x layer1_1, 2_1, 2_2
  assert table['latency_ms']['layer2_3'] == table['latency_ms']['layer2_2']
  # An entry that is the same block as one still in the table is copied, not measured.
  data = json.loads(path.read_text())
  del data['latency_ms']['layer2_2']['k3e1']
  path.write_text(json.dumps(data))
  table, runtime = fake_table(path, space=space)
  assert runtime.calls == 0
  assert table['latency_ms']['layer2_2']['k3e1'] == table['latency_ms']['layer2_3']['k3e1']


def test_op_subset_then_the_rest(tmp_path):
  path = tmp_path / 't.json'
  space = toy_space(RES)
  runtime = CountingRuntime(protocol())
  table = latency.build_table(space, protocol(), str(path), ops=('k3e1', 'skip'),
                              runtime=runtime, log=open(os.devnull, 'w'))
  assert 'k3e3' not in table['latency_ms']['layer1_1']
  assert runtime.calls == 1 + 2 + 5
  with pytest.raises(latency.LatencyError, match='layer1_1/k3e3'):
    latency.load_table(str(path), space)
  latency.load_table(str(path), toy_space(RES, ops=('k3e1', 'skip')))  # enough for the subset
  _, runtime = fake_table(path)
  assert runtime.calls == 5


@pytest.mark.parametrize('change', [{'repeats': 4}, {'threads': 2}, {'runtime': 'tflite'}])
def test_refuses_a_table_of_another_protocol(tmp_path, change, monkeypatch):
  path = tmp_path / 't.json'
  fake_table(path)
  before = path.read_text()
  monkeypatch.setattr(latency.timing, 'device_info', lambda runtime: {'cpu_model': 'same'})
  fake_table(tmp_path / 'u.json')
  with pytest.raises(latency.LatencyError, match='measured another way') as e:
    fake_table(tmp_path / 'u.json', **change)
  assert '\n' not in str(e.value) and '--overwrite' in str(e.value)
  assert path.read_text() == before


def test_refuses_another_device_or_space_and_overwrite_starts_again(tmp_path, monkeypatch):
  path = tmp_path / 't.json'
  fake_table(path)
  with pytest.raises(latency.LatencyError, match='measured another way'):
    fake_table(path, space=toy_space(RES, num_classes=5))
  real = latency.device_info
  monkeypatch.setattr(latency.timing, 'device_info',
                      lambda runtime: {**real(runtime), 'cpu_model': 'Another CPU'})
  with pytest.raises(latency.LatencyError, match='cpu_model'):
    fake_table(path)
  runtime = CountingRuntime(protocol())
  table = latency.build_table(toy_space(RES), protocol(), str(path), overwrite=True,
                              runtime=runtime, log=open(os.devnull, 'w'))
  assert table['device']['cpu_model'] == 'Another CPU'
  assert runtime.calls == 13


def test_load_table_aligns_with_cost_tables(tmp_path):
  path = tmp_path / 't.json'
  table, _ = fake_table(path)
  space = toy_space(RES)
  ct = costs.cost_tables(space)
  lat = latency.load_table(str(path), space, RES, 10, overhead=False)
  assert lat.shape == ct.params.shape == (5, 3)
  lt = latency.latency_tables(str(path), space, overhead=False)
  assert lt.layer_names == ct.layer_names and lt.op_names == ct.op_names
  assert (lt.mask == ct.mask).all()
  for i, name in enumerate(ct.layer_names):
    for j, op in enumerate(ct.op_names):
      want = table['latency_ms'][name].get(op, 0.0) if ct.mask[i, j] else 0.0
      assert lat[i, j] == want
  assert (lat[~ct.mask] == 0).all()
  assert lt.fixed_ms == pytest.approx(table['latency_ms']['stem']['conv3']
                                      + table['latency_ms']['head']['head'])
  # With the overhead counted once: every measured entry less it, the overhead in fixed_ms.
  over = table['overhead_ms']['median']
  net = latency.latency_tables(table, space)
  assert net.overhead_ms == over
  np.testing.assert_allclose(net.latency, np.where(lat > 0, lat - over, 0.0))
  assert net.fixed_ms == pytest.approx(lt.fixed_ms - 2 * over + over)


@pytest.mark.parametrize('space_kw, match', [
    (dict(resolution=16), 'image_size'),
    (dict(num_classes=5), 'num_classes'),
    (dict(width=2.0), 'width'),
])
def test_load_table_rejects_a_table_of_another_space(tmp_path, space_kw, match):
  path = tmp_path / 't.json'
  fake_table(path)
  kw = {'resolution': RES, 'num_classes': 10, 'width': 1.0, **space_kw}
  other = spaces.from_table('toy', TOY_TABLE, kw['resolution'], kw['num_classes'], kw['width'])
  with pytest.raises(latency.LatencyError, match=match) as e:
    latency.load_table(str(path), other)
  assert isinstance(e.value, errors.UserError) and isinstance(e.value, ValueError)
  assert 'python -m hournas_jax.tools.latency' in str(e.value)


def test_load_table_rejects_other_names_sizes_and_bad_files(tmp_path):
  path = tmp_path / 't.json'
  fake_table(path)
  space = toy_space(RES)
  renamed = spaces.from_table('toy2', TOY_TABLE, RES, 10)
  with pytest.raises(latency.LatencyError, match='name'):
    latency.load_table(str(path), renamed)
  with pytest.raises(latency.LatencyError, match='image size 16'):
    latency.load_table(str(path), space, 16, 10)
  with pytest.raises(latency.LatencyError, match='stem_stride'):
    latency.load_table(str(path), spaces.from_table('toy', TOY_TABLE, RES, stem_stride=1))
  with pytest.raises(latency.LatencyError, match='channels'):
    latency.load_table(str(path), space, channels=1)
  data = json.loads(path.read_text())
  del data['latency_ms']['layer2_1']['k3e1']
  with pytest.raises(latency.LatencyError, match='lacks layer2_1/k3e1'):
    latency.load_table(data, space)
  with pytest.raises(latency.LatencyError, match='cannot read'):
    latency.load_table(str(tmp_path / 'none.json'), space)
  (tmp_path / 'bad.json').write_text('{')
  with pytest.raises(latency.LatencyError, match='not valid JSON'):
    latency.load_table(str(tmp_path / 'bad.json'), space)
  (tmp_path / 'other.json').write_text('{"ops": {}}')
  with pytest.raises(latency.LatencyError, match='not a latency table'):
    latency.load_table(str(tmp_path / 'other.json'), space)


def test_predict_ms_is_the_sum_of_the_chosen_entries(tmp_path):
  path = tmp_path / 't.json'
  table, _ = fake_table(path)
  space = toy_space(RES)
  ops = ('k3e3', 'k3e1', 'skip', 'k3e3', 'k3e1')
  a = arch.Architecture('toy', ops).validate(space)
  lat = table['latency_ms']
  entries = sum(lat[n][o] for n, o in zip(space.searchable_names, ops))
  fixed = lat['stem']['conv3'] + lat['head']['head']
  plain = latency.latency_tables(str(path), space, overhead=False)
  assert latency.predict_ms(plain, a) == pytest.approx(fixed + entries)
  assert latency.predict_ms(plain, ops) == latency.predict_ms(plain, a.indices(space))
  over = table['overhead_ms']['median']
  net = latency.latency_tables(str(path), space)
  measured_calls = 2 + sum(o != 'skip' for o in ops)  # stem, head and the non-skip ops
  assert latency.predict_ms(net, a) == pytest.approx(
      fixed + entries - measured_calls * over + over)
  idx = a.indices(space)
  assert latency.predict_ms(net, a) == pytest.approx(
      net.fixed_ms + latency.load_table(str(path), space)[np.arange(5), idx].sum())
  with pytest.raises(latency.LatencyError, match='layer2_1/skip'):
    latency.predict_ms(net, ('k3e1', 'skip', 'skip', 'k3e1', 'k3e1'))
  with pytest.raises(latency.LatencyError, match='5 searchable layers'):
    latency.predict_ms(net, ('k3e1',))


def test_cli_builds_resumes_and_refuses_in_one_line(tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(spaces.SPACE_TABLES, 'toy', TOY_TABLE)
  out = str(tmp_path / 't.json')
  monkeypatch.setattr(latency, 'Runtime', CountingRuntime)
  argv = ['--space', 'toy', '--image-size', str(RES), '--runtime', 'xla_cpu', '--threads', '0',
          '--warmup', '0', '--calibration', '1', '--repeats', '2', '--out', out]
  assert latency_tool.main(argv) == 0
  captured = capsys.readouterr()
  assert '[1/' in captured.err and 'ETA' in captured.err
  assert 'entries' in captured.out and 'measured under load average 0.2' in captured.out
  assert 'warning' not in captured.out
  table = json.loads(open(out).read())
  assert table['protocol']['threads'] == len(os.sched_getaffinity(0))
  assert latency_tool.main(argv) == 0
  assert '0 entries to fill' in capsys.readouterr().err
  assert latency_tool.main(argv[:-4] + ['--repeats', '3', '--out', out]) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and err.count('\n') == 1 and 'repeats' in err
  assert latency_tool.main(argv[:-4] + ['--repeats', '3', '--out', out, '--overwrite']) == 0
  assert latency_tool.main(argv + ['--precision', 'float16']) == 2
  assert latency_tool.main(argv + ['--ops', 'k9e9']) == 2
  assert 'ops must be a subset' in capsys.readouterr().err
  assert latency_tool.main(argv + ['--max-spread', '0']) == 2
  assert capsys.readouterr().err.count('\n') == 1
  assert latency_tool.main(argv + ['--passes', '0']) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and '--passes >= 1' in err
  # The table holds how many passes measured it, and a table of one pass is not resumed as two.
  assert table['protocol']['passes'].startswith('2 passes')
  assert latency_tool.main(argv[:-4] + ['--repeats', '3', '--out', out, '--passes', '1']) == 2
  assert 'passes' in capsys.readouterr().err


def test_tflite_runtime_measures_one_block():
  pytest.importorskip('tensorflow')
  try:
    from hournas_jax import export
  except ImportError:
    pytest.skip('hournas_jax/export.py (to_tflite) has not landed')
  del export
  space = toy_space(RES)
  runtime = latency.Runtime(latency.Protocol('tflite', 1, 1, 3))
  layer = space.layer('layer2_1')
  samples = runtime.block_samples(space, layer, 'k3e3')
  assert samples.shape == (3,) and (samples > 0).all()
  assert (runtime.overhead_samples(latency.OVERHEAD_SHAPE) > 0).all()
  info = latency.device_info('tflite')
  assert info['tensorflow'] and 'platform' not in info


def test_a_search_with_a_latency_target_reads_the_table_of_its_config(tmp_path, monkeypatch):
  """config.targets.latency_ms with config.targets.latency_table: the search loads the table
  for its own space and input (a table of another input is refused in one line), and its
  result reports the predicted latency against the target."""
  from hournas_jax import train  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(spaces.SPACE_TABLES, 'toy', TOY_TABLE)
  config = tiny_config(retrain_after_search=False, proposal_samples=0)  # digits, 16 px, gray
  config.search.num_proposals = 2
  space = toy_space(16)
  gray, wrong = tmp_path / 'gray.json', tmp_path / 'rgb.json'
  table, _ = fake_table(gray, space, channels=1)
  fake_table(wrong, space)  # measured on 3-channel input
  lo, hi = latency.latency_tables(table, space, channels=1).bounds()
  config.targets.params, config.targets.flops = 0.0, 0.0
  config.targets.latency_ms = (lo + hi) / 2

  config.targets.latency_table = ''
  with pytest.raises(errors.UserError, match='needs config.targets.latency_table'):
    train.train_and_evaluate(config, str(tmp_path / 'none'))
  config.targets.latency_table = str(wrong)
  with pytest.raises(latency.LatencyError, match='another space') as error:
    train.train_and_evaluate(config, str(tmp_path / 'wrong'))
  assert '\n' not in str(error.value) and isinstance(error.value, errors.UserError)

  config.targets.latency_table = str(gray)
  result = train.train_and_evaluate(config, str(tmp_path / 'run'))['search']
  assert result['targets'] == {'params': None, 'flops': None,
                               'latency_ms': config.targets.latency_ms}
  chosen = [space.op_names.index(result['ops'][n]) for n in space.searchable_names]
  predicted = latency.predict_ms(latency.latency_tables(table, space, channels=1), chosen)
  assert result['latency_ms'] == pytest.approx(predicted)
  assert result['deviation']['latency_ms'] == pytest.approx(
      predicted / config.targets.latency_ms - 1)
  assert 'target latency_ms' in (tmp_path / 'run' / 'summary.txt').read_text()
