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

from hournas_jax import checkpoint, errors, spaces, train
from spaces_for_tests import TOY_MAIN, TOY_TABLE, tiny_config

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


def start_with_reference(args, workdir, **kwargs):
  """(reference, process, workdir): an uninterrupted run of `args` in <workdir>/../reference
  and, alongside it (2 cores), a slowed-down run in `workdir` for a test to interrupt."""
  reference = start_main(args, workdir.parent / 'reference', stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
  return reference, start_main(args, workdir, slow=True, **kwargs), workdir


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


def example_arrays(value=1.0):
  tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9))
  params = {'layer': {'op': {'kernel': jnp.full((2, 3), value)}, 'skip': {}}}
  return {'params': params, 'opt_state': tx.init(params), 'key': jnp.array([1, 2], jnp.uint32)}


EXAMPLE_META = {'counters': {'step': 7, 'tr_step': 7, 'val_step': 1}, 'seed': 3,
                'meta': {'stage': 'nonvital', 'vital_ops': {'layer2_1': 'k3e6'}, 'empty': {}}}


def abstract_of(arrays):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), arrays)


def test_checkpointer_round_trip_ignores_unfinished_steps(tmp_path):
  directory = str(tmp_path / 'ckpt')
  with checkpoint.Checkpointer(directory, keep=3) as ckpt:
    ckpt.save(1, example_arrays(1.0), EXAMPLE_META)
    ckpt.save(2, example_arrays(2.0), EXAMPLE_META)
  # What a process killed mid-save leaves: orbax's temporary directory, never a step.
  half = tmp_path / 'ckpt' / '9.orbax-checkpoint-tmp-1234'
  (half / 'state').mkdir(parents=True)
  (half / 'state' / 'garbage').write_bytes(b'\x00' * 10)
  with checkpoint.Checkpointer(directory, keep=3) as ckpt:
    assert ckpt.latest_step() == 2 and ckpt.all_steps() == [1, 2]
    seen = {}

    def template(meta):
      seen.update(meta)
      return abstract_of(example_arrays())

    restored, meta = ckpt.restore(2, template)
  assert seen == meta == EXAMPLE_META  # the template sees the JSON part first
  np.testing.assert_array_equal(restored['params']['layer']['op']['kernel'], 2.0)
  assert jax.tree.structure(restored) == jax.tree.structure(example_arrays())


def test_a_failed_checkpoint_write_keeps_the_previous_one_and_says_so(tmp_path, monkeypatch):
  """A disk that fills up during a save: the run stops with one line naming the step a rerun
  continues from, and that step still loads."""
  directory = str(tmp_path / 'ckpt')
  ckpt = checkpoint.Checkpointer(directory)
  ckpt.save(1, example_arrays(1.0), EXAMPLE_META)
  ckpt.wait()

  def disk_full(*args, **kwargs):
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(ckpt._manager, 'save', disk_full)  # pylint: disable=protected-access
  with pytest.raises(checkpoint.CheckpointError) as error:
    ckpt.save(2, example_arrays(2.0), EXAMPLE_META)
  message = str(error.value)
  assert '\n' not in message and isinstance(error.value, errors.UserError)
  assert 'step 2' in message and 'No space left on device' in message
  assert 'checkpoint of step 1 is intact' in message
  monkeypatch.undo()
  ckpt.close()
  with checkpoint.Checkpointer(directory) as again:
    assert again.latest_step() == 1
    restored, _ = again.restore(1, lambda meta: abstract_of(example_arrays()))
  np.testing.assert_array_equal(restored['params']['layer']['op']['kernel'], 1.0)


def test_a_write_that_fails_in_the_background_is_reported_at_the_next_save(tmp_path,
                                                                           monkeypatch):
  directory = str(tmp_path / 'ckpt')
  with checkpoint.Checkpointer(directory) as ckpt:
    ckpt.save(4, example_arrays(), EXAMPLE_META)

    def lost_permission():
      raise PermissionError(13, 'Permission denied')

    monkeypatch.setattr(ckpt._manager, 'check_for_errors', lost_permission)  # pylint: disable=protected-access
    with pytest.raises(checkpoint.CheckpointError, match='writing the checkpoint of step 4 .* '
                                                         'Permission denied.*no earlier'):
      ckpt.save(6, example_arrays(), EXAMPLE_META)
    monkeypatch.undo()


def test_a_second_run_in_the_same_workdir_is_refused_until_the_first_ends(tmp_path):
  workdir = checkpoint.prepare_workdir(str(tmp_path / 'run'))
  with checkpoint.workdir_lock(workdir):
    with pytest.raises(checkpoint.WorkdirError) as error:
      with checkpoint.workdir_lock(workdir):
        pass
    message = str(error.value)
    assert 'in use by another run' in message and f'pid {os.getpid()}' in message
    assert '\n' not in message
  with checkpoint.workdir_lock(workdir):  # released when the first run ended
    pass


def test_the_lock_of_a_killed_run_does_not_stay(tmp_path):
  """The lock is the process's: a run killed with SIGKILL leaves the file, not the lock."""
  workdir = checkpoint.prepare_workdir(str(tmp_path / 'run'))
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys, time; sys.path.insert(0, "."); '
       'from hournas_jax import checkpoint\n'
       f'with checkpoint.workdir_lock({workdir!r}):\n  print("locked", flush=True); '
       'time.sleep(600)'], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'locked'
    with pytest.raises(checkpoint.WorkdirError, match=f'pid {holder.pid}'):
      with checkpoint.workdir_lock(workdir):
        pass
  finally:
    holder.kill()
    holder.wait()
  assert (pathlib.Path(workdir) / checkpoint.LOCK_FILE).exists()
  with checkpoint.workdir_lock(workdir):
    pass


def test_corrupt_checkpoint_is_a_one_line_error_and_is_kept(tmp_path):
  directory = str(tmp_path / 'ckpt')
  with checkpoint.Checkpointer(directory) as ckpt:
    ckpt.save(3, example_arrays(), EXAMPLE_META)
  step_dir = tmp_path / 'ckpt' / '3'
  for path in (step_dir / 'state').rglob('*'):
    if path.is_file():
      path.write_bytes(b'not a checkpoint')
  before = sorted(str(p) for p in step_dir.rglob('*'))
  with checkpoint.Checkpointer(directory) as ckpt:
    with pytest.raises(checkpoint.CheckpointError) as error:
      ckpt.restore(3, lambda meta: abstract_of(example_arrays()))
  message = str(error.value)
  assert '\n' not in message and str(step_dir) in message and 'left in place' in message
  assert sorted(str(p) for p in step_dir.rglob('*')) == before


# --------------------------------------------------------------------------------------------
# A search killed with SIGKILL and restarted with the same command.

def test_search_killed_and_restarted_ends_as_uninterrupted_run(tmp_path, monkeypatch):
  args = TINY_SEARCH + ['--config.retrain_after_search=false']
  reference, process, workdir = start_with_reference(args, tmp_path / 'killed',
                                                     stdout=subprocess.DEVNULL,
                                                     stderr=subprocess.DEVNULL)
  checkpoints = workdir / 'search' / 'checkpoints'
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
  assert isinstance(error.value, errors.UserError)
  assert last.is_dir() and not (workdir / 'arch.json').exists()


def test_sigterm_saves_the_current_step_and_the_rerun_ends_as_uninterrupted(tmp_path):
  """A preempted machine: SIGTERM stops the search after the step in flight with a checkpoint
  of that step, one line and exit status 143, within seconds. Meanwhile a second run in the
  same workdir is refused. The rerun continues and ends as the uninterrupted run."""
  args = TINY_SEARCH + ['--config.retrain_after_search=false',
                        '--config.checkpoint_every_steps=100']
  reference, process, workdir = start_with_reference(args, tmp_path / 'preempted',
                                                     stdout=subprocess.PIPE,
                                                     stderr=subprocess.PIPE)
  checkpoints = workdir / 'search' / 'checkpoints'
  try:
    deadline = time.time() + 300
    while process.poll() is None:  # until the search steps (its progress lines) begin
      assert time.time() < deadline, 'the search never started'
      line = process.stdout.readline()
      if line.startswith('[search/vital] step 1/'):
        break
    second = run_main(args, workdir)
    assert second.returncode == 1
    assert second.stderr.strip().splitlines()[-1].startswith('error: workdir ')
    assert 'in use by another run' in second.stderr
    sent = time.time()
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    stopped_after = time.time() - sent
  finally:
    if process.poll() is None:
      process.kill()
      process.wait()
    _, reference_err = reference.communicate(timeout=300)
  assert reference.returncode == 0, reference_err
  assert process.returncode == 128 + signal.SIGTERM, err
  assert stopped_after < 30
  message = err.strip().splitlines()[-1]
  assert message.startswith('error: search: stopped by signal SIGTERM at step ')
  step = int(message.split('at step ')[1].split()[0])
  assert 'rerun the same command' in message
  # The cadence (100 steps) saves only the stage boundary (step 3): the last one is SIGTERM's.
  assert finalized_steps(checkpoints)[-1] == step and set(finalized_steps(checkpoints)) <= {3, step}
  assert not (workdir / 'arch.json').exists()

  resumed = run_main(args, workdir)
  assert resumed.returncode == 0, resumed.stderr
  assert f'resuming from the checkpoint of step {step}' in resumed.stdout
  expected = json.loads((tmp_path / 'reference' / 'arch.json').read_text())
  result = json.loads((workdir / 'arch.json').read_text())
  assert result['ops'] == expected['ops']
  assert result['pi'] == pytest.approx(expected['pi'], abs=1e-6)


def tiny_search_config():
  """TINY_SEARCH as a config, for in-process calls on the same workdir."""
  return tiny_config(keep_checkpoints=10, retrain_after_search=False)
