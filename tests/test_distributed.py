"""Runs over several JAX processes (jax.distributed, CPU collectives over gloo), started by the
tests on localhost: the settings and their errors, a search and a retraining on 2 processes
against 1, a 2-process run stopped and restarted, and a process that dies under the other."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from configs import default
from hournas_jax import mesh as mesh_lib
from spaces_for_tests import TOY_MAIN

REPO_ROOT = pathlib.Path(__file__).parent.parent
XLA_CACHE = os.path.join(tempfile.gettempdir(), 'hournas_jax_test_xla_cache')

# A search with architecture steps in both stages and a short retraining, on the toy space
# (tests/spaces_for_tests.py); batches of 16 are split 8 + 8 over 2 processes.
RUN = [
    '--config=configs/quickstart.py',
    '--config.space=toy', '--config.width=1.0', '--config.ops=',
    '--config.targets.params=7e3', '--config.targets.flops=90e3',
    '--config.search.vital_steps=4', '--config.search.nonvital_steps=6',
    '--config.search.batch_size=16', '--config.search.val_every=2',
    '--config.proposal_samples=100', '--config.log_every_steps=2',
    '--config.checkpoint_every_steps=2', '--config.keep_checkpoints=10',
    '--config.train.steps=6', '--config.train.batch_size=16',
    '--config.random_baseline=false', '--config.tensorboard=false',
    f'--config.compilation_cache_dir={XLA_CACHE}',
]
TIMEOUT_S = 400


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def start(args, workdir, *, processes=1, process_id=0, port=0, slow=False, extra_env=None):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  for name in (mesh_lib.ENV_COORDINATOR, mesh_lib.ENV_NUM_PROCESSES, mesh_lib.ENV_PROCESS_ID):
    env.pop(name, None)
  if processes > 1:
    env.update({mesh_lib.ENV_COORDINATOR: f'127.0.0.1:{port}',
                mesh_lib.ENV_NUM_PROCESSES: str(processes),
                mesh_lib.ENV_PROCESS_ID: str(process_id)})
  env.update(extra_env or {})
  return subprocess.Popen([sys.executable, '-c', TOY_MAIN] + (['SLOW'] if slow else [])
                          + list(args) + [f'--workdir={workdir}'], cwd=REPO_ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def start_group(args, workdir, processes=2, **kwargs):
  port = free_port()
  return [start(args, workdir, processes=processes, process_id=i, port=port, **kwargs)
          for i in range(processes)]


def finish(process):
  try:
    out, err = process.communicate(timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired:
    process.kill()
    out, err = process.communicate()
    pytest.fail(f'a process did not end within {TIMEOUT_S} s:\n{err[-2000:]}')
  return process.returncode, out, err


def results(workdir):
  return (json.loads((workdir / 'arch.json').read_text()),
          json.loads((workdir / 'train' / 'results.json').read_text()))


# --------------------------------------------------------------------------------------------
# Settings.


def settings(environ=None, **fields):
  d = default.get_distributed_config()
  d.update(fields)
  return mesh_lib.distributed_settings(d, environ or {})


def test_settings_from_the_config_or_the_environment():
  assert settings() is None  # one process
  assert settings(auto_detect=True) == {}  # JAX asks the cluster
  expected = {'coordinator_address': '10.0.0.1:1234', 'num_processes': 4, 'process_id': 3}
  assert settings(coordinator_address='10.0.0.1:1234', num_processes=4, process_id=3) == expected
  assert settings({'JAX_COORDINATOR_ADDRESS': '10.0.0.1:1234', 'JAX_NUM_PROCESSES': '4',
                   'JAX_PROCESS_ID': '3'}) == expected
  # A config field wins over the environment.
  assert settings({'JAX_COORDINATOR_ADDRESS': '10.0.0.1:1234', 'JAX_NUM_PROCESSES': '4',
                   'JAX_PROCESS_ID': '3'}, process_id=0)['process_id'] == 0


@pytest.mark.parametrize('environ,fields,match', [
    ({'JAX_NUM_PROCESSES': '2'}, {}, 'missing the coordinator address .* and the process id'),
    ({}, {'coordinator_address': 'localhost', 'num_processes': 2, 'process_id': 0},
     "'localhost' must be HOST:PORT"),
    ({}, {'coordinator_address': 'h:1', 'num_processes': 2, 'process_id': 2},
     r'process id must be in \[0, 2\) for 2 processes, got 2'),
    ({'JAX_COORDINATOR_ADDRESS': 'h:1', 'JAX_NUM_PROCESSES': 'two', 'JAX_PROCESS_ID': '0'}, {},
     'must be integers'),
])
def test_wrong_or_partial_settings_are_refused(environ, fields, match):
  with pytest.raises(mesh_lib.DistributedError, match=match):
    settings(environ, **fields)


def test_main_reports_bad_settings_and_an_absent_coordinator_in_one_line(tmp_path):
  process = start(RUN, tmp_path / 'a', extra_env={'JAX_NUM_PROCESSES': '2'})
  code, _, err = finish(process)
  lines = err.strip().splitlines()
  assert code == 1 and len(lines) == 1, err[-2000:]
  assert lines[0].startswith('error: a multi-process run needs all three settings; missing')
  # Process 1 of 2 with no process 0 anywhere: it gives up after the timeout it was given.
  begin = time.time()
  process = start(RUN + ['--config.distributed.initialization_timeout_s=5'], tmp_path / 'b',
                  processes=2, process_id=1, port=free_port())
  code, _, err = finish(process)
  assert code == 1 and time.time() - begin < 60
  lines = err.strip().splitlines()
  assert lines[-1].startswith('error: could not start the multi-process run: nothing answered '
                              'at the coordinator address 127.0.0.1:'), err[-2000:]
  assert 'within 5 s' in lines[-1]


# --------------------------------------------------------------------------------------------
# 2 processes against 1.


@pytest.fixture(scope='module')
def one_process(tmp_path_factory):
  """The reference: RUN on one process (global batch 16)."""
  workdir = tmp_path_factory.mktemp('one_process')
  code, out, err = finish(start(RUN, workdir))
  assert code == 0, err
  return workdir, out


def test_two_processes_end_where_one_ends(one_process, tmp_path):
  reference, _ = one_process
  workdir = tmp_path / 'two'
  begin = time.time()
  outputs = [finish(p) for p in start_group(RUN, workdir)]
  for code, _, err in outputs:
    assert code == 0, err[-3000:]
  two_s = time.time() - begin
  (_, out0, _), (_, out1, _) = outputs
  assert 'on 2 device(s) (cpu) in 2 process(es)' in out0
  assert '[search' not in out1 and '[train' not in out1, 'process 1 prints nothing'
  arch1, trained1 = results(reference)
  arch2, trained2 = results(workdir)
  assert arch2['ops'] == arch1['ops'] and arch2['vital_ops'] == arch1['vital_ops']
  assert arch2['pi'] == pytest.approx(arch1['pi'], abs=1e-4)
  assert trained2['top1'] == pytest.approx(trained1['top1'], abs=1.01 / 360)
  assert trained2['loss'] == pytest.approx(trained1['loss'], rel=1e-3)
  assert trained2['examples'] == trained1['examples'] == 360
  config = json.loads((workdir / 'config.json').read_text())['resolved']
  assert (config['processes'], config['devices']) == (2, 2)
  print(f'2 processes: {two_s:.0f} s')

  # A resumed run must have the same number of processes.
  code, _, err = finish(start(RUN, workdir))
  assert code == 1 and 'processes: 2 there, 1 now' in err.strip().splitlines()[-1]


def test_two_processes_stopped_and_restarted_end_as_uninterrupted(one_process, tmp_path):
  reference, _ = one_process
  workdir = tmp_path / 'restarted'
  checkpoints = workdir / 'search' / 'checkpoints'
  group = start_group(RUN, workdir, slow=True)
  deadline = time.time() + TIMEOUT_S
  # Stopped in stage 2, after the checkpoint of step 6, as a preempted job is.
  while not (checkpoints / '6').is_dir() and all(p.poll() is None for p in group):
    assert time.time() < deadline, 'no checkpoint was written'
    time.sleep(0.05)
  for p in group:
    p.send_signal(signal.SIGKILL)
  for p in group:
    p.communicate()
  assert all(p.returncode == -signal.SIGKILL for p in group), 'the run ended before its stop'
  assert not (workdir / 'arch.json').exists()

  outputs = [finish(p) for p in start_group(RUN, workdir)]
  for code, _, err in outputs:
    assert code == 0, err[-3000:]
  assert 'resuming from the checkpoint of step' in outputs[0][1]
  arch1, trained1 = results(reference)
  arch2, trained2 = results(workdir)
  assert arch2['ops'] == arch1['ops'] and arch2['pi'] == pytest.approx(arch1['pi'], abs=1e-4)
  assert trained2['loss'] == pytest.approx(trained1['loss'], rel=1e-3)


def test_a_process_that_dies_stops_the_other(tmp_path):
  args = RUN + ['--config.mode=train', '--config.train.arch=k3e1,k3e3,k3e1,k3e3,k3e1',
                '--config.train.steps=100000', '--config.log_every_steps=20',
                '--config.distributed.heartbeat_timeout_s=10']
  group = start_group(args, tmp_path)
  # Let it train a while (process 0's first progress line), then kill process 1.
  deadline = time.time() + TIMEOUT_S
  line = ''
  while '[train] step' not in line:
    assert time.time() < deadline and group[0].poll() is None, 'training did not start'
    line = group[0].stdout.readline()
  group[1].send_signal(signal.SIGKILL)
  begin = time.time()
  code, _, err = finish(group[0])
  group[1].communicate()
  assert code != 0 and time.time() - begin < 120
  assert 'another process stopped' in err or 'another task died' in err, err[-2000:]
