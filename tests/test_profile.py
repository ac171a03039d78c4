"""Tests for the profile CLI (python -m hournas_jax.tools.profile): text and JSON output, vital
layers, every way to give an architecture, and one-line errors with exit code 2."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from hournas_jax import arch, costs, latency, spaces, vital
from hournas_jax.tools import profile

REPO_ROOT = pathlib.Path(__file__).parent.parent


def run_cli(*args):
  return subprocess.run([sys.executable, '-m', 'hournas_jax.tools.profile', *args], cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=60)


def expected_cost(preset, **space_kw):
  a = arch.preset(preset)
  space = spaces.get_space(a.space, **space_kw)
  return costs.cost_tables(space).cost(a.indices(space))


# ----------------------------------------------------------------------------- subprocess


def test_text_output_for_preset():
  r = run_cli('--space', 'fbnet', '--arch', 'hournas_a')
  assert r.returncode == 0, r.stderr
  assert r.stderr == ''
  lines = r.stdout.splitlines()
  assert lines[0].split() == ['layer', 'op', 'in', 'out', 's', 'res', 'params', 'MFLOPs',
                              'vital']
  space = spaces.get_space('fbnet')
  rows = lines[1:-1]
  assert [row.split()[0] for row in rows] == [l.name for l in space.layers]
  by_layer = {row.split()[0]: row.split() for row in rows}
  assert by_layer['layer2_3'][1] == 'skip'
  assert by_layer['layer2_1'][-1] == 'yes' and by_layer['layer2_2'][-1] != 'yes'
  assert by_layer['stem'][-1] == 'yes' and by_layer['head'][-1] == 'yes'
  params, flops = expected_cost('hournas_a')
  assert lines[-1] == (f'total: {params / 1e6:.3f}M params, {flops / 1e6:.1f}M FLOPs '
                       f'(multiply-adds) at 224x224, 1000 classes')
  assert lines[-1].startswith('total: 4.832M params, 288.2M FLOPs')


def test_json_output():
  r = run_cli('--space', 'mnasnet', '--arch', 'hournas_e', '--json')
  assert r.returncode == 0, r.stderr
  out = json.loads(r.stdout)
  assert {'params', 'flops', 'vital', 'layers'} <= set(out)
  assert (out['space'], out['resolution'], out['num_classes']) == ('mnasnet', 224, 1000)
  assert (out['params'], out['flops']) == expected_cost('hournas_e')
  space = spaces.get_space('mnasnet')
  assert out['vital'] == list(vital.vital_layers(space))
  assert out['layers'] == costs.layer_costs(space, arch.preset('hournas_e').ops)


def test_json_small_space_and_comma_list():
  a = arch.preset('hournas_f')
  r = run_cli('--space', 'efficientnet', '--arch', ','.join(a.ops), '--resolution', '32',
              '--width', '0.25', '--classes', '10', '--json')
  assert r.returncode == 0, r.stderr
  out = json.loads(r.stdout)
  assert (out['resolution'], out['num_classes']) == (32, 10)
  assert (out['params'], out['flops']) == expected_cost(
      'hournas_f', resolution=32, width=0.25, num_classes=10)
  assert [row['op'] for row in out['layers'] if row['searchable']] == list(a.ops)


def test_vital_only():
  r = run_cli('--space', 'mnasnet', '--vital')
  assert r.returncode == 0, r.stderr
  assert r.stdout == ('vital SuperBlocks of mnasnet (on every input-to-output path): '
                      'layer2_1, layer3_1, layer4_1, layer5_1, layer6_1, layer7_1; fixed '
                      'layers, vital too: stem, layer1_1, head\n')


def test_json_file_arch(tmp_path):
  a = arch.preset('hournas_c')
  space = spaces.get_space('fbnet_enlarged')
  path = tmp_path / 'c.json'
  arch.save(str(path), a, space, note='from a search')
  r = run_cli('--space', 'fbnet_enlarged', '--arch', str(path), '--json')
  assert r.returncode == 0, r.stderr
  out = json.loads(r.stdout)
  assert (out['params'], out['flops']) == expected_cost('hournas_c')


@pytest.mark.parametrize('args,message', [
    (['--space', 'resnet', '--arch', 'hournas_a'], "unknown search space 'resnet'; allowed:"),
    (['--space', 'fbnet', '--arch', ','.join(('k7e6',) + arch.PRESETS['hournas_a'][1][1:])],
     "unknown op 'k7e6' at layer1_1"),
    (['--space', 'fbnet', '--arch', 'k3e3,k5e6,k3e1'],
     "space 'fbnet' has 22 searchable layers, the architecture lists 3 ops"),
    (['--space', 'fbnet', '--arch', 'hournas_a', '--resolution', '4'],
     'resolution must be an integer from 8 to 1024, got 4'),
    (['--space', 'fbnet', '--arch', 'hournas_a', '--resolution', 'big'],
     "argument --resolution: invalid int value: 'big'"),
    (['--space', 'fbnet', '--arch', 'missing_dir/arch.json'],
     "cannot read architecture file 'missing_dir/arch.json': No such file or directory"),
    (['--space', 'fbnet', '--arch', 'hournas_e'],
     "preset 'hournas_e' belongs to space 'mnasnet', not 'fbnet'"),
    (['--space', 'fbnet', '--arch', 'hournas_a', '--width', '0'], 'width must be a number'),
    (['--space', 'fbnet', '--arch', 'hournas_a', '--classes', '1'], 'num_classes must be'),
    (['--space', 'fbnet'], 'give --arch ARCH'),
    (['--arch', 'hournas_a'], 'the following arguments are required: --space'),
    (['--space', 'fbnet', '--arch', 'hournas_a', '--bogus'], 'unrecognized arguments: --bogus'),
])
def test_bad_input_one_line_exit_2(args, message):
  r = run_cli(*args)
  assert r.returncode == 2
  assert r.stdout == ''
  lines = r.stderr.splitlines()
  assert len(lines) == 1, r.stderr
  assert lines[0].startswith('error: ')
  assert message in lines[0]
  assert 'Traceback' not in r.stderr


@pytest.mark.parametrize('content', [b'{"space": "fbnet", "ops": [', b'', b'\xff\xfe\x00\x81',
                                     b'[1, 2]', b'{"space": "fbnet", "ops": {"layer1_1": 3}}'])
def test_bad_json_file_one_line_exit_2(tmp_path, content):
  path = tmp_path / 'arch.json'
  path.write_bytes(content)
  r = run_cli('--space', 'fbnet', '--arch', str(path))
  assert r.returncode == 2
  lines = r.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), r.stderr
  assert 'Traceback' not in r.stderr


# ----------------------------------------------------------------------------- in process


@pytest.mark.parametrize('preset', sorted(arch.PRESETS))
def test_main_json_every_preset(capsys, preset):
  space_name = arch.PRESETS[preset][0]
  assert profile.main(['--space', space_name, '--arch', preset, '--json']) == 0
  out = json.loads(capsys.readouterr().out)
  assert (out['params'], out['flops']) == expected_cost(preset)
  assert sum(r['params'] for r in out['layers']) == out['params']
  assert sum(r['flops'] for r in out['layers']) == out['flops']


@pytest.mark.parametrize('name', spaces.SPACE_NAMES)
def test_main_vital_json(capsys, name):
  assert profile.main(['--space', name, '--vital', '--json']) == 0
  out = json.loads(capsys.readouterr().out)
  assert out['vital'] == list(vital.vital_layers(spaces.get_space(name)))
  assert 'params' not in out and 'layers' not in out


def test_main_vital_and_arch_prints_table(capsys):
  assert profile.main(['--space', 'fbnet_shallow', '--vital', '--arch',
                       ','.join(['k3e3'] * 12)]) == 0
  out = capsys.readouterr().out
  assert out.splitlines()[-1].endswith('224x224, 100 classes')


def test_main_errors_return_2(capsys, tmp_path):
  assert profile.main(['--space', 'fbnet', '--arch', str(tmp_path / 'none.json')]) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and 'cannot read architecture file' in err
  bad = tmp_path / 'bad.json'
  bad.write_text('not json')
  assert profile.main(['--space', 'fbnet', '--arch', str(bad)]) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and 'is not valid JSON' in err
  with pytest.raises(SystemExit) as e:  # argparse errors exit 2 from the parser
    profile.main(['--space', 'fbnet', '--resolution', 'x'])
  assert e.value.code == 2
  assert capsys.readouterr().err.count('\n') == 1


def test_profile_function():
  space = spaces.get_space('fbnet', resolution=32, num_classes=10, width=0.25)
  a = arch.preset('hournas_b')
  out = profile.profile(space, a)
  assert (out['params'], out['flops']) == costs.cost_tables(space).cost(a.indices(space))
  assert profile.profile(space, None) == {'space': 'fbnet', 'resolution': 32,
                                          'num_classes': 10,
                                          'vital': list(vital.vital_layers(space))}


class _ConstantRuntime(latency.Runtime):
  """Stands in for the measurements: each block 'takes' 0.001 ms per 1,000 input values."""

  def samples(self, apply_fn, variables, shape, seed=0):
    return np.full(5, 1e-6 * float(np.prod(shape)))


def test_a_latency_table_adds_each_layers_latency_and_the_prediction(tmp_path, capsys):
  space = spaces.get_space('fbnet_shallow', 32, 10, 0.25, ops=('k3e1', 'k3e6', 'skip'))
  path = tmp_path / 'table.json'
  protocol = latency.Protocol(runtime='xla_cpu', threads=1, warmup=0, repeats=5)
  measured = latency.build_table(space, protocol, str(path), runtime=_ConstantRuntime(protocol),
                                 log=open(os.devnull, 'w'))
  ops = ['k3e6' if i % 2 else 'k3e1' for i in range(len(space.searchable_names))]
  argv = ['--space', 'fbnet_shallow', '--resolution', '32', '--classes', '10', '--width', '0.25',
          '--ops', 'k3e1,k3e6,skip', '--arch', ','.join(ops), '--latency-table', str(path)]
  assert profile.main(argv + ['--json']) == 0
  result = json.loads(capsys.readouterr().out)
  for row in result['layers']:
    assert row['latency_ms'] == measured['latency_ms'][row['layer']][row['op']]
  table = latency.latency_tables(str(path), space)
  assert result['latency_ms'] == pytest.approx(latency.predict_ms(table, ops))
  assert profile.main(argv) == 0
  assert f'predicted latency: {result["latency_ms"]:.4f} ms (xla_cpu' in capsys.readouterr().out
  # A table of another input (1 channel asked for) is one error line.
  assert profile.main(argv + ['--channels', '1']) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'another space' in err[0]
