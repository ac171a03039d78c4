"""main.py end to end on digits, on 1 device and on 4 devices, which must agree.

JAX fixes the device count at start-up, so main.py runs in two subprocesses side by side (4 CPU
devices via XLA_FLAGS): search (both stages), retraining of the found architecture (and, on
1 device, its comparison with random ones of the same budget), then 'eval' mode on the 1-device
workdir.

Both run main.py with tests/spaces_for_tests.py's 5-SuperBlock toy space registered (few
compiles). The runs are kept to 2 steps per phase: networks this small, with BatchNorm over
8-16 images, are numerically chaotic (reordering the images of a batch on one
device moves the loss by ~1% by the third step), so agreement is checked tightly where float
rounding cannot have grown yet. The search takes no architecture step here (val_every is larger
than the run): at initialisation the architecture gradients are ~1e-7, at the level of rounding,
and Adam turns their signs into full steps. Architecture steps, resume and the kill -9 restart
are in test_checkpoint.py.
"""

import glob
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import pytest
import tensorflow as tf

from configs import quickstart
from hournas_jax import arch as arch_lib
from hournas_jax import checkpoint, costs, spaces, train
from spaces_for_tests import TOY_MAIN, TOY_TABLE

REPO_ROOT = pathlib.Path(__file__).parent.parent
XLA_CACHE = os.path.join(tempfile.gettempdir(), 'hournas_jax_test_xla_cache')

# The 5 SuperBlocks of tests/spaces_for_tests.py's toy space, registered by TOY_MAIN.
ARGS = [
    '--config=configs/quickstart.py',
    '--config.space=toy', '--config.width=1.0', '--config.ops=',
    '--config.targets.params=7e3', '--config.targets.flops=90e3',
    '--config.search.vital_steps=1', '--config.search.nonvital_steps=1',
    '--config.search.batch_size=8', '--config.search.val_every=1000',
    '--config.proposal_samples=100', '--config.log_every_steps=1',
    '--config.train.steps=2', '--config.train.batch_size=16',
    '--config.random_baseline=false',
    f'--config.compilation_cache_dir={XLA_CACHE}',
]


def run_config():
  """ARGS as a config (for in-process calls on the same workdir)."""
  config = quickstart.get_config()
  config.space, config.width, config.ops = 'toy', 1.0, ''
  config.targets.params, config.targets.flops = 7e3, 90e3
  config.search.update(dict(vital_steps=1, nonvital_steps=1, batch_size=8, val_every=1000))
  config.train.update(dict(steps=2, batch_size=16))
  config.proposal_samples, config.log_every_steps = 100, 1
  return config


def scalars(directory):
  """{(tag, step): value} of the TensorBoard event files in `directory` (CRCs checked)."""
  out = {}
  for path in glob.glob(os.path.join(directory, 'events.out.tfevents.*')):
    for record in tf.data.TFRecordDataset(path):
      event = tf.compat.v1.Event.FromString(record.numpy())
      for value in event.summary.value:
        out[value.tag, event.step] = value.simple_value
  return out


def run(args, workdir, devices=1, wait=True):
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  process = subprocess.Popen([sys.executable, '-c', TOY_MAIN] + args + [f'--workdir={workdir}'],
                             cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  if not wait:
    return process
  stdout, stderr = process.communicate(timeout=400)
  assert process.returncode == 0, stderr
  return stdout


def test_digits_end_to_end_same_on_1_and_4_devices(tmp_path, monkeypatch):
  one, four = tmp_path / 'devices1', tmp_path / 'devices4'
  # The random baseline runs on 1 device only: the 4-device run compiles everything afresh.
  baseline = ['--config.random_baseline=true', '--config.baseline.architectures=2',
              '--config.baseline.seeds=2', '--config.baseline.workers=1']
  processes = {1: run(ARGS + baseline, one, 1, wait=False),
               4: run(ARGS, four, 4, wait=False)}
  stdout = {}
  for devices, process in processes.items():
    out, err = process.communicate(timeout=400)
    assert process.returncode == 0, err
    stdout[devices] = out
  assert 'on 4 device(s)' in stdout[4] and 'on 1 device(s)' in stdout[1]

  # What a user sees: progress lines, the architecture, the comparison with random ones.
  progress = [l for l in stdout[1].splitlines() if l.startswith('[search/nonvital] step')]
  assert progress and all(s in progress[-1] for s in ('step 2/2', 'img/s', 'loss', 'tau', 'ETA'))
  assert '[train] eval: top-1' in stdout[1]
  assert 'searched vs 2 random architectures of the same budget' in stdout[1]
  assert 'training noise' in stdout[1] and 'percentile' in stdout[1]

  # The files of a search.
  config = json.loads((one / 'config.json').read_text())
  assert config['mode'] == 'search' and config['search']['num_proposals'] == 8
  assert config['resolved']['image_shape'] == [16, 16, 1] and config['resolved']['devices'] == 1
  monkeypatch.setitem(spaces.SPACE_TABLES, 'toy', TOY_TABLE)
  space = spaces.get_space('toy', resolution=16, num_classes=10, in_channels=1)  # gray digits
  found = json.loads((one / 'arch.json').read_text())
  architecture = arch_lib.Architecture.from_dict(found, space)
  assert set(found['vital_ops']) == {'layer2_1', 'layer3_1'}
  assert sum(found['pi']) == pytest.approx(1.0, abs=1e-5)
  summary = (one / 'summary.txt').read_text()
  assert ','.join(architecture.ops) in summary and 'target params' in summary
  for name in ('theta.png', 'pi.png', 'proposals.png'):
    assert (one / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  trained = json.loads((one / 'train' / 'results.json').read_text())
  assert trained['ops'] == list(architecture.ops) and trained['examples'] == 360
  assert 0.0 <= trained['top1'] <= trained['top5'] <= 1.0
  comparison = json.loads((one / 'comparison.json').read_text())
  searched = comparison['searched']
  assert searched['ops'] == list(architecture.ops) and len(searched['top1_seeds']) == 2
  assert searched['top1'] == pytest.approx(sum(searched['top1_seeds']) / 2)
  tables = costs.cost_tables(space)
  for ops in comparison['random']['architectures']:  # random ones have the same budget
    params, flops = tables.cost([space.op_names.index(o) for o in ops])
    assert abs(params - 7e3) <= 350 and abs(flops - 90e3) <= 4500
  assert comparison['of'] == 3 and 1 <= comparison['rank'] <= 3
  stored = [json.loads(line) for line in
            (one / 'baseline' / 'population.jsonl').read_text().splitlines()]
  assert len(stored) == 6 and {r['tag'] for r in stored} == {'searched', 'random'}
  assert {'search/loss', 'search/tau', 'search/images_per_sec'} <= {
      tag for tag, _ in scalars(one / 'tensorboard' / 'search')}
  assert {'train/loss', 'train/learning_rate', 'eval/top1'} <= {
      tag for tag, _ in scalars(one / 'tensorboard' / 'train')}

  # 1 and 4 devices: the same architectures, losses and evaluations.
  found4 = json.loads((four / 'arch.json').read_text())
  assert (found4['ops'], found4['vital_ops']) == (found['ops'], found['vital_ops'])
  for phase, tags in (('search', {'search/loss', 'search/accuracy'}),
                      ('train', {'train/loss', 'train/accuracy', 'eval/loss', 'eval/top1'})):
    s1, s4 = scalars(one / 'tensorboard' / phase), scalars(four / 'tensorboard' / phase)
    keys = [k for k in s1 if k[0] in tags]
    assert len(keys) >= 4 and set(keys) <= set(s4), phase
    for key in keys:
      assert s4[key] == pytest.approx(s1[key], rel=1e-4, abs=1e-5), (phase, key)
  r1 = json.loads((one / 'train' / 'results.json').read_text())
  r4 = json.loads((four / 'train' / 'results.json').read_text())
  assert r4['ops'] == r1['ops'] and r4['loss'] == pytest.approx(r1['loss'], rel=1e-4)

  # 'eval' loads the saved models and gets the same numbers.
  run(ARGS + ['--config.mode=eval'], one)
  evaluated = json.loads((one / 'eval_results.json').read_text())
  assert set(evaluated) == {'train'}
  assert evaluated['train']['top1'] == pytest.approx(trained['top1'])
  assert evaluated['train']['loss'] == pytest.approx(trained['loss'], rel=1e-5)

  # Masking the saved model (mode 'masking'): the same accuracies on 4 devices as on 1.
  masking = ARGS + ['--config.mode=masking', '--config.train.arch=',
                    '--config.analysis.mask_draws=2']
  masked = {}
  for devices in (1, 4):
    run(masking, one, devices)
    masked[devices] = json.loads((one / 'masking.json').read_text())
  assert masked[1]['reference_top1'] == pytest.approx(trained['top1'])
  assert masked[1]['examples'] == masked[4]['examples'] == 360
  for r1, r4 in zip(masked[1]['blocks'], masked[4]['blocks'], strict=True):
    for p in ('0.3', '0.6', '1'):  # one image's argmax may flip on float rounding
      assert r4['top1'][p]['draws'] == pytest.approx(r1['top1'][p]['draws'], abs=1.01 / 360)

  # The workdir refuses a search of another config.
  config = run_config()
  config.search.num_proposals = 4
  with pytest.raises(checkpoint.WorkdirError, match='search.num_proposals: 8 there, 4 now'):
    train.train_and_evaluate(config, str(one))


def test_the_switch_engine_searches_the_same_on_1_and_4_devices(tmp_path):
  """The device-resident engine (search.engine='switch'), one program per step over the mesh:
  the 1- and 4-device searches agree, and agree with the chained engine on 1 device."""
  args = ARGS + ['--config.retrain_after_search=false']
  runs = {('switch', 1): run(args + ['--config.search.engine=switch'], tmp_path / 's1', 1,
                             wait=False),
          ('switch', 4): run(args + ['--config.search.engine=switch'], tmp_path / 's4', 4,
                             wait=False)}
  for process in runs.values():
    _, err = process.communicate(timeout=400)
    assert process.returncode == 0, err
  run(args, tmp_path / 'chained', 1)
  found = {key: json.loads((tmp_path / name / 'arch.json').read_text())
           for key, name in ((('switch', 1), 's1'), (('switch', 4), 's4'),
                             (('single_path', 1), 'chained'))}
  assert found['switch', 1]['ops'] == found['switch', 4]['ops'] == found['single_path', 1]['ops']
  losses = {key: scalars(tmp_path / name / 'tensorboard' / 'search')
            for key, name in ((('switch', 1), 's1'), (('switch', 4), 's4'),
                              (('single_path', 1), 'chained'))}
  keys = [k for k in losses['switch', 1] if k[0] in ('search/loss', 'search/accuracy')]
  assert len(keys) >= 4
  for key in keys:
    for other in (('switch', 4), ('single_path', 1)):
      assert losses[other][key] == pytest.approx(losses['switch', 1][key], rel=1e-4,
                                                 abs=1e-5), (other, key)
