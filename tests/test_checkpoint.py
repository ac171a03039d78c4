"""Checkpoints and the workdir: atomic files, orbax save/restore, half-written and corrupt steps,
config fingerprints, and a search killed with SIGKILL and restarted with the same command."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import quickstart
from hournas_jax import checkpoint, spaces, train
from spaces_for_tests import TOY_MAIN, TOY_TABLE

REPO_ROOT = pathlib.Path(__file__).parent.parent
# Shared by every test that runs main.py in a subprocess: XLA's persistent compilation cache
# (keyed by the program, so never stale) saves most of the compile time of the later runs.
XLA_CACHE = os.path.join(tempfile.gettempdir(), 'hournas_jax_test_xla_cache')

# A search that is as small as it gets: the 5 SuperBlocks of tests/spaces_for_tests.py's toy
# space (registered by TOY_MAIN), 3 + 3 steps with architecture steps.
TINY_SEARCH = [
    '--config=configs/quickstart.py',
    '--config.space=toy', '--config.width=1.0', '--config.ops=',
    '--config.targets.params=7e3', '--config.targets.flops=90e3',
    '--config.search.vital_steps=3', '--config.search.nonvital_steps=3',
    '--config.search.batch_size=8', '--config.search.val_every=2',
    '--config.proposal_samples=100', '--config.log_every_steps=1',
    '--config.checkpoint_every_steps=2', '--config.keep_checkpoints=10',
    f'--config.compilation_cache_dir={XLA_CACHE}',
]


def start_main(args, workdir, slow=False, **kwargs):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.Popen([sys.executable, '-c', TOY_MAIN] + (['SLOW'] if slow else [])
                          + list(args) + [f'--workdir={workdir}'], cwd=REPO_ROOT, env=env,
                          text=True, **kwargs)


def run_main(args, workdir, timeout=300):
  process = start_main(args, workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  stdout, stderr = process.communicate(timeout=timeout)
  return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def finalized_steps(directory):
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


# --------------------------------------------------------------------------------------------
# Atomic files and the workdir.


def test_atomic_write_never_leaves_half_a_file(tmp_path, monkeypatch):
  path = tmp_path / 'result.json'
  checkpoint.atomic_write_json(str(path), {'a': 1, 'x': np.float32(0.5), 't': (1, 2)})
  assert json.loads(path.read_text()) == {'a': 1, 'x': 0.5, 't': [1, 2]}

  def broken_replace(src, dst):
    raise OSError('disk full')

  monkeypatch.setattr(os, 'replace', broken_replace)
  with pytest.raises(OSError):
    checkpoint.atomic_write_text(str(path), 'new contents')
  monkeypatch.undo()
  # The old file survives whole and no temporary file is left behind.
  assert json.loads(path.read_text())['a'] == 1
  assert os.listdir(tmp_path) == ['result.json']


def test_prepare_workdir_refuses_files_and_unwritable_paths(tmp_path):
  a_file = tmp_path / 'file'
  a_file.write_text('x')
  with pytest.raises(checkpoint.WorkdirError, match='is a file'):
    checkpoint.prepare_workdir(str(a_file))
  with pytest.raises(checkpoint.WorkdirError, match='not writable'):
    checkpoint.prepare_workdir(str(a_file / 'below'))
  created = checkpoint.prepare_workdir(str(tmp_path / 'new' / 'dir'))
  assert os.path.isdir(created)


def test_fingerprint_refuses_a_run_of_another_config(tmp_path):
  workdir = str(tmp_path)
  checkpoint.check_fingerprint(workdir, 'search', {'space': 'fbnet', 'search.num_proposals': 8})
  checkpoint.check_fingerprint(workdir, 'search', {'space': 'fbnet', 'search.num_proposals': 8})
  checkpoint.check_fingerprint(workdir, 'train', {'train.epochs': 3.0})
  with pytest.raises(checkpoint.WorkdirError) as error:
    checkpoint.check_fingerprint(workdir, 'search',
                                 {'space': 'fbnet', 'search.num_proposals': 16})
  message = str(error.value)
  assert 'search.num_proposals: 8 there, 16 now' in message and '\n' not in message
  stored = json.loads((tmp_path / 'fingerprint.json').read_text())
  assert stored == {'search': {'space': 'fbnet', 'search.num_proposals': 8},
                    'train': {'train.epochs': 3.0}}
  # A field added to the fingerprint later matches a workdir written before it existed when
  # the current value is the one the older code behaved as, and only then.
  added = {'search.schedule': 'interleaved'}
  checkpoint.check_fingerprint(workdir, 'search', {'space': 'fbnet', 'search.num_proposals': 8,
                                                   'search.schedule': 'interleaved'},
                               implicit=added)
  with pytest.raises(checkpoint.WorkdirError, match="search.schedule: 'interleaved' there, "
                                                    "'epoch' now"):
    checkpoint.check_fingerprint(workdir, 'search', {'space': 'fbnet',
                                                     'search.num_proposals': 8,
                                                     'search.schedule': 'epoch'},
                                 implicit=added)


# --------------------------------------------------------------------------------------------
# Orbax checkpoints.


def example_state(value=1.0):
  tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9))
  params = {'layer': {'op': {'kernel': jnp.full((2, 3), value)}, 'skip': {}}}
  return {'params': params, 'opt_state': tx.init(params), 'key': jnp.array([1, 2], jnp.uint32),
          'counters': {'step': 7, 'tr_step': 7, 'val_step': 1}, 'seed': 3,
          'meta': {'stage': 'nonvital', 'vital_ops': {'layer2_1': 'k3e6'}, 'empty': {}}}


def abstract_of(state):
  arrays, _ = checkpoint.split_state(state)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), arrays)


def test_split_and_merge_keep_arrays_and_json_apart():
  state = example_state()
  arrays, other = checkpoint.split_state(state)
  assert set(arrays) == {'params', 'opt_state', 'key'}
  assert other == {'counters': state['counters'], 'seed': 3, 'meta': state['meta']}
  merged = checkpoint.merge_state(arrays, other)
  assert jax.tree.structure(merged) == jax.tree.structure(state)


def test_checkpointer_round_trip_ignores_unfinished_steps(tmp_path):
  directory = str(tmp_path / 'ckpt')
  with checkpoint.Checkpointer(directory, keep=3) as ckpt:
    ckpt.save(1, example_state(1.0))
    ckpt.save(2, example_state(2.0))
  # What a process killed mid-save leaves: orbax's temporary directory, never a step.
  half = tmp_path / 'ckpt' / '9.orbax-checkpoint-tmp-1234'
  (half / 'state').mkdir(parents=True)
  (half / 'state' / 'garbage').write_bytes(b'\x00' * 10)
  with checkpoint.Checkpointer(directory, keep=3) as ckpt:
    assert ckpt.latest_step() == 2 and ckpt.all_steps() == [1, 2]
    seen = {}

    def template(other):
      seen.update(other)
      return abstract_of(example_state())

    restored = ckpt.restore(2, template)
  assert seen['meta'] == example_state()['meta']  # the template sees the JSON part first
  np.testing.assert_array_equal(restored['params']['layer']['op']['kernel'], 2.0)
  assert restored['counters'] == {'step': 7, 'tr_step': 7, 'val_step': 1}
  assert restored['seed'] == 3 and restored['meta']['vital_ops'] == {'layer2_1': 'k3e6'}
  assert jax.tree.structure(restored['opt_state']) == jax.tree.structure(
      example_state()['opt_state'])


def test_template_may_describe_json_counters_as_arrays(tmp_path):
  """Search templates give counters as int32 structs; they were saved (and return) as JSON."""
  directory = str(tmp_path / 'ckpt')
  with checkpoint.Checkpointer(directory) as ckpt:
    ckpt.save(5, example_state())
    template = {**abstract_of(example_state()),
                'counters': {'step': jax.ShapeDtypeStruct((), jnp.int32)},
                'seed': jax.ShapeDtypeStruct((), jnp.int32)}
    restored = ckpt.restore(5, lambda other: template)
  assert restored['counters']['step'] == 7 and restored['seed'] == 3


def test_corrupt_checkpoint_is_a_one_line_error_and_is_kept(tmp_path):
  directory = str(tmp_path / 'ckpt')
  with checkpoint.Checkpointer(directory) as ckpt:
    ckpt.save(3, example_state())
  step_dir = tmp_path / 'ckpt' / '3'
  for path in (step_dir / 'state').rglob('*'):
    if path.is_file():
      path.write_bytes(b'not a checkpoint')
  before = sorted(str(p) for p in step_dir.rglob('*'))
  with checkpoint.Checkpointer(directory) as ckpt:
    with pytest.raises(checkpoint.CheckpointError) as error:
      ckpt.restore(3, lambda other: abstract_of(example_state()))
  message = str(error.value)
  assert '\n' not in message and str(step_dir) in message and 'left in place' in message
  assert sorted(str(p) for p in step_dir.rglob('*')) == before


# --------------------------------------------------------------------------------------------
# A search killed with SIGKILL and restarted with the same command.

def test_search_killed_and_restarted_ends_as_uninterrupted_run(tmp_path, monkeypatch):
  args = TINY_SEARCH + ['--config.retrain_after_search=false']
  # The uninterrupted reference runs alongside the run that gets killed (2 cores).
  reference = start_main(args, tmp_path / 'reference', stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
  workdir = tmp_path / 'killed'
  checkpoints = workdir / 'search' / 'checkpoints'
  process = start_main(args, workdir, slow=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 300
    while not finalized_steps(checkpoints) and process.poll() is None:
      assert time.time() < deadline, 'no checkpoint was written'
      time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
  finally:
    process.wait()
    _, reference_err = reference.communicate(timeout=300)
  assert reference.returncode == 0, reference_err
  expected = json.loads((tmp_path / 'reference' / 'arch.json').read_text())
  assert process.returncode == -signal.SIGKILL, 'the run ended before it could be killed'
  assert not (workdir / 'arch.json').exists()
  assert finalized_steps(checkpoints)

  resumed = run_main(args, workdir)
  assert resumed.returncode == 0, resumed.stderr
  assert 'resuming from the checkpoint of step' in resumed.stdout
  result = json.loads((workdir / 'arch.json').read_text())
  assert result['ops'] == expected['ops']
  assert result['pi'] == pytest.approx(expected['pi'], abs=1e-6)
  for layer, probs in expected['probabilities'].items():
    assert result['probabilities'][layer] == pytest.approx(probs, abs=1e-6)

  # The finished run's last checkpoint, corrupted: a one-line error, and it is not deleted.
  last = checkpoints / str(finalized_steps(checkpoints)[-1])
  for path in (last / 'state').rglob('*'):
    if path.is_file():
      path.write_bytes(b'garbage')
  (workdir / 'arch.json').unlink()
  monkeypatch.setitem(spaces.SPACE_TABLES, 'toy', TOY_TABLE)
  with pytest.raises(checkpoint.CheckpointError) as error:
    train.train_and_evaluate(tiny_search_config(), str(workdir))
  assert str(last) in str(error.value) and '\n' not in str(error.value)
  assert isinstance(error.value, train.user_errors())
  assert last.is_dir() and not (workdir / 'arch.json').exists()


def tiny_search_config():
  """TINY_SEARCH as a config, for in-process calls on the same workdir."""
  config = quickstart.get_config()
  config.space, config.width, config.ops = 'toy', 1.0, ''
  config.targets.params, config.targets.flops = 7e3, 90e3
  config.search.update(dict(vital_steps=3, nonvital_steps=3, batch_size=8, val_every=2))
  config.proposal_samples, config.log_every_steps = 100, 1
  config.checkpoint_every_steps, config.keep_checkpoints = 2, 10
  config.retrain_after_search = False
  return config
