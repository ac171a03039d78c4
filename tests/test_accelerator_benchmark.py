"""benchmarks/accelerator.py: its smallest run end to end, and the input-pipeline measurement.

Timings are figures, not assertions: the tests check that every documented key of the JSON
line is there, with numbers where a CPU can measure them and null with a reason where not.
"""

import importlib.util
import json
import math
import pathlib

REPO_ROOT = pathlib.Path(__file__).parent.parent


def _benchmark():
  spec = importlib.util.spec_from_file_location('accelerator_benchmark',
                                                REPO_ROOT / 'benchmarks' / 'accelerator.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _number(x):
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


# The smallest configuration: the 12-layer FBNet at 16 px, one path engine, one candidate op
# besides skip, a few steps; a precision no engine has (float16) is asked for too, and must
# come back null with a reason.
SMALLEST = ['--tiny', '--skip-pipeline', '--skip-all-candidates', '--engines', 'single_path',
            '--space', 'fbnet_shallow', '--image-size', '16', '--ops', 'k3e1,skip',
            '--precisions', 'float32,float16', '--steps', '4', '--fixed-steps', '2',
            '--budget-s', '0']

KEYS = ('engines', 'fixed_img_s', 'all_candidates_img_s', 'pipeline_img_s_per_core',
        'peak_device_mb', 'compile_s', 'host_ms_per_step', 'projected_search_minutes', 'device',
        'sizes', 'step_ms', 'arch_step_ms', 'search_over_fixed', 'notes', 'programs_compiled',
        'fused_iteration', 'auto_engine')


def test_smallest_run_reports_every_key(capsys):
  out = _benchmark().main(SMALLEST)
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert json.loads(last) == json.loads(json.dumps(out))  # the last line is the JSON
  missing = [k for k in KEYS if k not in out]
  assert not missing, missing

  assert _number(out['engines']['single_path']['float32'])
  assert out['engines']['single_path']['float16'] is None
  assert 'single_path/float16' in out['notes']
  assert _number(out['fixed_img_s'])
  for key in ('step_ms', 'arch_step_ms', 'compile_s', 'host_ms_per_step', 'programs_compiled'):
    assert _number(out[key]['single_path']['float32']), key
  # The chained engine runs an iteration as several programs; 'auto' picks it on a CPU.
  assert out['fused_iteration'] == {'single_path': False}
  assert out['auto_engine'] == 'single_path'
  assert _number(out['compile_s']['fixed']['float32'])
  assert _number(out['search_over_fixed']['single_path']['float32'])
  assert _number(out['projected_search_minutes'])
  assert out['projection_bound'] == 'device'  # the pipeline was not measured
  assert out['best_engine'] == 'single_path/float32'
  assert out['all_candidates_img_s'] is None and out['pipeline_img_s_per_core'] is None
  # A CPU has no memory statistics: null, and the notes say why.
  assert out['peak_device_mb'] is None and 'peak_device_mb' in out['notes']
  sizes = out['sizes']
  assert (sizes['space'], sizes['image_size'], sizes['batch']) == ('fbnet_shallow', 16, 8)
  assert sizes['ops'] == ['k3e1', 'skip'] and sizes['steps'] == 4
  assert isinstance(out['device'], str) and out['device']


def test_pipeline_reads_synthetic_imagenet_with_the_project_path():
  bench = _benchmark()
  args = bench.parse_args(['--tiny', '--pipeline-images', '16', '--pipeline-seconds', '0.5'])
  notes = {}
  out = bench.measure_pipeline(args, notes)
  assert not notes, notes
  assert out['write']['images'] == 16 + 2  # train and validation
  assert _number(out['write']['mean_jpeg_kb'])
  assert _number(out[1]['img_s']) and out[1]['cores'] == 1
  cpus = out['cpus']
  assert _number(out[cpus]['img_s']) and out[cpus]['cores'] == cpus
  # search_train: the first 80% of the 16 training images, in batches of 8.
  assert out[1]['search_train_images'] == 13 and out[1]['steps_per_epoch'] == 1
