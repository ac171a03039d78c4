"""Export: BatchNorm folding, jax.export with a symbolic batch, TFLite (builtin ops only), the
'export' mode and its report, and one-line errors. Tiny networks (the toy space at 8 and 16 px)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default, quickstart
from hournas_jax import blocks, errors, export, spaces, train
from hournas_jax.tools import export as export_tool
from spaces_for_tests import TOY_TABLE, toy_space

OPS = ('k3e1', 'k3e3', 'k3e1', 'k3e3', 'k3e1')  # an architecture of the toy space
SE_OPS = ('k3e3se', 'k5e1se', 'k5e3se', 'k3e1se', 'k3e3se')


def _perturbed(variables, seed=1):
  """Variables whose BatchNorms do something: random statistics, scales and biases."""
  rng = np.random.default_rng(seed)

  def perturb(path, a):
    name = jax.tree_util.keystr(path)
    if 'BatchNorm' not in name:
      return a
    if "'var'" in name or "'scale'" in name:
      return rng.uniform(0.5, 2.0, a.shape).astype(np.float32)
    return rng.normal(0.0, 0.5, a.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(perturb, variables)


@pytest.fixture(scope='module')
def model():
  # At 8 px the last stage runs on 1x1 feature maps, which the converter once failed on.
  space = toy_space(resolution=8)
  m = export.network_model(space, OPS, image_shape=(8, 8, 3), seed=0)
  m.variables = _perturbed(m.variables)
  return m


@pytest.fixture(scope='module')
def inputs():
  return np.random.default_rng(0).standard_normal((8, 8, 8, 3)).astype(np.float32)


@pytest.fixture(scope='module')
def tflite_float32(model):
  return export.to_tflite(model.apply_fn, model.variables, (1, 8, 8, 3))


def _relative(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


# --------------------------------------------------------------------------------------------
# BatchNorm folding.


def test_folding_drops_batchnorm_and_equals_the_unfolded_model(model, inputs):
  folded = export.fold_batchnorm(model.variables)
  assert 'batch_stats' not in folded
  flat = jax.tree_util.tree_flatten_with_path(folded)[0]
  assert not any('BatchNorm' in jax.tree_util.keystr(p) for p, _ in flat)
  block = folded['params']['layer2_1']['k3e3']
  assert set(block) == {'Conv_0', 'Conv_1', 'Conv_2'}
  assert all(set(block[c]) == {'kernel', 'bias'} for c in block)
  # A pure function: the input is unchanged.
  assert 'BatchNorm_0' in model.variables['params']['layer2_1']['k3e3']
  reference = model.apply_fn(model.variables, inputs)
  with export.folded_batchnorm():
    out = model.apply_fn(folded, inputs)
  assert _relative(out, reference) < 1e-5
  # Without the interceptor, unfolded variables still run as before inside it.
  with export.folded_batchnorm():
    same = model.apply_fn(model.variables, inputs)
  np.testing.assert_array_equal(same, reference)


def test_folding_pairs_around_squeeze_excitation_and_in_single_blocks():
  space = spaces.get_space('mnasnet', resolution=32, num_classes=10, width=0.25)
  layer = space.searchable_layers[1]
  block = blocks.make_block(space, layer, 'k5e3se')
  x = np.random.default_rng(2).standard_normal(
      (2, layer.in_resolution, layer.in_resolution, layer.in_channels)).astype(np.float32)
  variables = _perturbed(block.init(jax.random.key(0), x, train=False), seed=3)
  # SE convs have biases and no BatchNorm: Conv_0/1/4 fold into BatchNorm_0/1/2.
  folded = export.fold_batchnorm(variables)['params']
  assert set(folded) == {'Conv_0', 'Conv_1', 'Conv_2', 'Conv_3', 'Conv_4'}
  np.testing.assert_array_equal(folded['Conv_2']['bias'], variables['params']['Conv_2']['bias'])
  apply_fn = lambda v, x: block.apply(v, x, train=False)
  reference = apply_fn(variables, x)
  out = export.inference_function(apply_fn, variables)(x)
  assert _relative(out, reference) < 1e-5


def test_folding_refuses_batchnorms_it_cannot_pair():
  variables = {'params': {'BatchNorm_0': {'scale': jnp.ones(4), 'bias': jnp.zeros(4)}},
               'batch_stats': {'BatchNorm_0': {'mean': jnp.zeros(4), 'var': jnp.ones(4)}}}
  with pytest.raises(ValueError, match='cannot fold'):
    export.fold_batchnorm(variables)
  plain = {'params': {'Dense_0': {'kernel': jnp.ones((2, 2))}}}
  assert export.fold_batchnorm(plain) is plain


def test_batchnorm_statistics_of_calibration_inputs_make_inference_equal_training_mode(inputs):
  from hournas_jax import supernet  # pylint: disable=g-import-not-at-top
  space = toy_space(resolution=8)
  net = supernet.SuperNet(space, supernet.fixed_layer_ops(space, OPS))
  variables = net.init_all(0, (8, 8, 3))
  calibrated = export.batchnorm_statistics(net, variables, inputs)
  train_mode, _ = net.apply(variables, inputs, train=True, mutable=['batch_stats'])
  inference = net.apply(calibrated, inputs, train=False)
  assert _relative(inference, train_mode) < 1e-4
  # Fresh statistics leave the logits tiny and alike; calibrated ones spread them out.
  fresh = net.apply(variables, inputs, train=False)
  assert np.abs(inference).max() > 10 * np.abs(fresh).max()


# --------------------------------------------------------------------------------------------
# jax.export and TFLite.


def test_jax_export_round_trip_at_two_batch_sizes(model, inputs):
  blob = export.export_jax(model.apply_fn, model.variables, model.image_shape)
  reference = model.apply_fn(model.variables, inputs)
  for n in (1, 5, 8):
    out = export.run_jax_export(blob, inputs[:n])
    assert out.shape == (n, 10)
    assert _relative(out, reference[:n]) < 1e-5


def test_tflite_float32_round_trip_builtin_ops_only(model, inputs, tflite_float32):
  ops = export.tflite_ops(tflite_float32)
  assert ops and all(export.is_builtin(op) for op in ops)
  # Folded BatchNorm and conv-traced depthwise convs: no BatchNorm arithmetic left over.
  assert ops['DEPTHWISE_CONV_2D'] == 5 and ops['CONV_2D'] == 1 + 2 * 5 + 1  # stem, blocks, head
  assert not {'MUL', 'RSQRT', 'SUB', 'BATCH_MATMUL', 'SLICE'} & set(ops)
  reference = np.asarray(model.apply_fn(model.variables, inputs))
  out = export.run_tflite(tflite_float32, inputs)
  assert out.shape == reference.shape
  assert _relative(out, reference) < 1e-4
  assert export.compare(reference, out)['top1_agreement'] == 1.0
  assert export.tflite_latency_ms(tflite_float32, threads=1, warmup=1, repeats=3) > 0


def test_tflite_runs_without_ai_edge_litert(monkeypatch, model, inputs, tflite_float32):
  import sys  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(sys.modules, 'ai_edge_litert', None)
  monkeypatch.setitem(sys.modules, 'ai_edge_litert.interpreter', None)
  assert export.tflite_runtime().startswith('tf.lite')
  out = export.run_tflite(tflite_float32, inputs[:2])
  assert _relative(out, model.apply_fn(model.variables, inputs[:2])) < 1e-4


def test_tflite_of_a_single_block_and_quantized_precisions(inputs):
  space = toy_space(resolution=16)
  layer = space.layer('layer2_1')
  block = blocks.make_block(space, layer, 'k3e3')
  x = np.random.default_rng(4).standard_normal((16, 8, 8, 8)).astype(np.float32)
  variables = _perturbed(block.init(jax.random.key(0), x[:1], train=False))
  apply_fn = lambda v, h: block.apply(v, h, train=False)
  reference = np.asarray(apply_fn(variables, x))
  half = export.to_tflite(apply_fn, variables, (8, 8, 8), precision='float16')
  assert 'DEQUANTIZE' in export.tflite_ops(half)
  assert _relative(export.run_tflite(half, x), reference) < 1e-2
  int8 = export.to_tflite(apply_fn, variables, (8, 8, 8), precision='int8', representative=x)
  assert all(export.is_builtin(op) for op in export.tflite_ops(int8))
  assert _relative(export.run_tflite(int8, x), reference) < 0.1


def test_bad_inputs_raise_export_error(model):
  assert issubclass(export.ExportError, errors.UserError)
  assert issubclass(export.ExportError, ValueError)
  with pytest.raises(export.ExportError, match='precision'):
    export.to_tflite(model.apply_fn, model.variables, (8, 8, 3), precision='int4')
  with pytest.raises(export.ExportError, match='representative'):
    export.to_tflite(model.apply_fn, model.variables, (8, 8, 3), precision='int8')
  with pytest.raises(export.ExportError, match='formats'):
    export.parse_list('jax,coreml', export.FORMATS, 'formats')
  with pytest.raises(export.ExportError, match='thread'):
    export.parse_threads('0')


def test_missing_onnx_converter_is_one_clear_error(monkeypatch, model, tmp_path):
  import sys  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(sys.modules, 'tf2onnx', None)
  with pytest.raises(export.ExportError, match='requirements-export.txt'):
    export.to_onnx(b'')
  # Before any format is made.
  with pytest.raises(export.ExportError, match='requirements-export.txt'):
    export.export_model(model, str(tmp_path / 'out'), formats=('jax', 'onnx'))
  assert not (tmp_path / 'out').exists()


def test_every_format_is_one_entry_of_the_table():
  assert list(export.FORMATS) == ['jax', 'tflite', 'onnx']  # the order they are made in
  for name, fmt in export.FORMATS.items():
    assert isinstance(fmt, export.Format) and fmt.name == name
  assert export.FORMATS['jax'].filename(None) == 'model.jax_export'
  assert export.FORMATS['tflite'].filename('int8') == 'model_int8.tflite'
  assert export.FORMATS['tflite'].precisions is None  # the requested ones
  assert export.FORMATS['onnx'].precisions == ('float32',)


def test_config_section_is_checked_in_one_place():
  settings = export.check_config(default.get_config().export)
  assert settings.formats == ['jax', 'tflite'] and settings.threads == [1]
  for field, value, message in (
      ('formats', 'jax,coreml', 'config.export.formats must be'),
      ('tflite_precision', 'int4', 'config.export.tflite_precision must be'),
      ('threads', '1,0', 'config.export.threads must be'),
      ('examples', 1, 'config.export.examples must be'),
      ('repeats', 0, 'repeats >= 1')):
    ecfg = default.get_config().export
    ecfg[field] = value
    with pytest.raises(export.ExportError, match=message):
      export.check_config(ecfg)


def test_onnx_round_trip_when_installed(model, inputs, tflite_float32):
  pytest.importorskip('tf2onnx')
  pytest.importorskip('onnxruntime')
  blob = export.to_onnx(tflite_float32)
  out = export.run_onnx(blob, inputs)
  reference = model.apply_fn(model.variables, inputs)
  assert _relative(out, reference) < 1e-4
  assert export.onnx_latency_ms(blob, warmup=1, repeats=3) > 0


# --------------------------------------------------------------------------------------------
# The 'export' mode.


@pytest.fixture
def toy_registered(monkeypatch):
  monkeypatch.setitem(spaces.SPACE_TABLES, 'toy', TOY_TABLE)


def _config(mode, **export_fields):
  config = quickstart.get_config()
  config.mode = mode
  config.space, config.width, config.ops = 'toy', 1.0, ''
  config.random_baseline = False
  config.tensorboard = False
  config.log_every_steps = 1
  config.checkpoint_every_steps = 2
  config.train.update(dict(arch=','.join(OPS), steps=2, batch_size=16))
  config.export.update(dict(examples=4, warmup=1, repeats=2, **export_fields))
  return config


def test_export_mode_writes_files_and_report_for_a_trained_model(tmp_path, toy_registered):
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(_config('train'), workdir)
  report = train.train_and_evaluate(_config('export', tflite_precision='float32,int8',
                                            calibration_examples=8, threads='1,2'), workdir)
  out = os.path.join(workdir, 'export')
  assert sorted(os.listdir(out)) == ['model.jax_export', 'model_float32.tflite',
                                     'model_int8.tflite', 'report.json']
  assert json.loads(open(os.path.join(out, 'report.json')).read()) == json.loads(
      json.dumps(report))
  assert report['model']['source'] == 'trained' and report['model']['step'] == 2
  assert report['inputs']['source'].startswith('digits eval split')
  assert report['model']['image_shape'] == [16, 16, 1]
  by_name = {(e['format'], e.get('precision')): e for e in report['exports']}
  assert set(by_name) == {('jax', None), ('tflite', 'float32'), ('tflite', 'int8')}
  for entry in report['exports']:
    assert entry['bytes'] == os.path.getsize(entry['path'])
    assert set(entry) >= {'format', 'path', 'bytes', 'max_abs_diff', 'top1_agreement',
                          'latency_ms'}
  scale = by_name[('jax', None)]['max_abs_logit']
  assert by_name[('jax', None)]['max_abs_diff'] < 1e-4 * scale
  assert set(by_name[('jax', None)]['batch_sizes_checked']) == {'1', '4'}
  assert by_name[('tflite', 'float32')]['max_abs_diff'] < 1e-4 * scale
  assert by_name[('tflite', 'float32')]['top1_agreement'] == 1.0
  assert set(by_name[('tflite', 'float32')]['latency_ms']) == {'1', '2'}
  assert by_name[('tflite', 'int8')]['top1_agreement'] >= 0.5
  # python -m hournas_jax.tools.export on the workdir (its config.json); exporting one format
  # again replaces its entry and keeps the others.
  assert export_tool.main(['--workdir', workdir, '--formats', 'jax', '--examples', '4',
                           '--warmup', '1', '--repeats', '2']) == 0
  again = json.loads(open(os.path.join(out, 'report.json')).read())
  assert [(e['format'], e.get('precision')) for e in again['exports']] == [
      ('tflite', 'float32'), ('tflite', 'int8'), ('jax', None)]


def test_export_mode_without_a_model_uses_the_arch_with_fresh_weights(tmp_path, toy_registered,
                                                                     capsys):
  workdir = str(tmp_path / 'fresh')
  report = train.train_and_evaluate(_config('export', formats='tflite'), workdir)
  assert 'FRESH' in capsys.readouterr().out
  assert report['model']['source'] == 'fresh weights'
  assert report['model']['batchnorm_statistics'] == 'of 100 calibration inputs'
  assert report['inputs']['source'] == 'random normal'
  assert os.listdir(os.path.join(workdir, 'export')) and [
      e['format'] for e in report['exports']] == ['tflite']
  config = _config('export')
  config.train.arch = ''
  with pytest.raises(export.ExportError, match='nothing to export'):
    train.train_and_evaluate(config, str(tmp_path / 'empty'))
  with pytest.raises(export.ExportError, match='formats'):
    train.train_and_evaluate(_config('export', formats='jax,coreml'), workdir)


def test_module_cli_errors_are_one_line(capsys, tmp_path):
  assert export_tool.main(['--arch', 'hournas_a']) == 1
  assert capsys.readouterr().err.strip() == 'error: give --workdir, or --arch and --out'
  assert export_tool.main(['--workdir', str(tmp_path)]) == 1
  assert 'no config.json' in capsys.readouterr().err
  assert export_tool.main(['--arch', 'nope', '--out', str(tmp_path), '--space', 'fbnet',
                           '--image_size', '32']) == 1
  assert capsys.readouterr().err.startswith('error: architecture')


def test_main_reports_a_bad_export_setting_as_one_line(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  result = subprocess.run(
      [sys.executable, 'main.py', '--config=configs/quickstart.py', f'--workdir={tmp_path}',
       '--config.mode=export', '--config.export.formats=jax,coreml'],
      capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith(
      "error: config.export.formats must be a comma-separated list of jax, tflite, onnx")
  assert 'Traceback' not in result.stderr
