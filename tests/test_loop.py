"""The shared step loop (hournas_jax/loop.py), with a stand-in step: cadence, averaging,
finiteness, and SIGTERM."""

import os
import signal

import jax.numpy as jnp
import numpy as np
import pytest

from hournas_jax import errors, logging_utils, loop


class Diverged(errors.UserError):
  pass


def _spec(tmp_path, total=10, log_every=4, checkpoint_every=3):
  return loop.Loop(phase='train', total=total, batch_size=8, log_every=log_every,
                   checkpoint_every=checkpoint_every, directory=str(tmp_path / 'ckpt'),
                   error=Diverged, hint='try a lower rate')


def _run(tmp_path, step_fn, state=0, start=0, last_good=None, tensorboard=False, **kwargs):
  saved, logged, after = [], [], []
  spec = _spec(tmp_path, **{k: kwargs.pop(k) for k in ('total', 'log_every', 'checkpoint_every')
                            if k in kwargs})
  with logging_utils.SummaryWriter(str(tmp_path / 'tb'), enabled=tensorboard) as writer:
    out = loop.run(spec, state, start, last_good, step_fn=step_fn, writer=writer,
                   save_fn=lambda step, state: saved.append((step, state)),
                   on_log=lambda step, state: logged.append(step),
                   after_step=lambda step, state, boundary: after.append((step, boundary)),
                   **kwargs)
  return out, saved, logged, after


def test_cadence_boundaries_and_the_last_step(tmp_path, capsys):
  def step_fn(state):
    return state + 1, {'loss': 1.0, 'stage': 'a'}, state + 1 == 5  # a boundary at step 5
  out, saved, logged, after = _run(tmp_path, step_fn, state=2, start=2)
  assert out == 10
  assert [s for s, _ in saved] == [3, 5, 6, 9, 10]  # every 3, the boundary and the end
  assert logged == [4, 5, 8, 10]  # every 4, the boundary and the end
  assert after == [(s, s == 5) for s in range(3, 11)]
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].startswith('[train/a] step 4/10 (40%)')


def test_progress_lines_average_device_metrics_and_show_the_latest_rate(tmp_path, capsys):
  def step_fn(state):
    step = state + 1
    return step, {'loss': jnp.float32(step), 'learning_rate': jnp.float32(0.1 * step)}, False
  _run(tmp_path, step_fn, total=4, log_every=4)
  line = capsys.readouterr().out.strip()
  assert '| loss 2.500 |' in line and '| lr 0.400 |' in line  # mean of 1..4; the latest rate


@pytest.mark.parametrize('on_device', [False, True])
def test_a_non_finite_loss_stops_and_names_the_last_good_checkpoint(tmp_path, on_device):
  def step_fn(state):
    step = state + 1
    loss = float('nan') if step == 5 else 1.0
    return step, {'loss': jnp.float32(loss) if on_device else loss}, False
  with pytest.raises(Diverged) as error:
    _run(tmp_path, step_fn, total=10, log_every=4, checkpoint_every=3)
  message = str(error.value)
  # Host numbers are checked every step; device ones when they are read (step 6: a save).
  where = 'by step 6' if on_device else 'at step 5'
  assert f'the loss became non-finite {where}' in message
  assert 'last good checkpoint (step 3)' in message and 'try a lower rate' in message


def test_weights_that_are_not_finite_are_never_saved(tmp_path):
  def step_fn(state):
    return state + 1, {'loss': jnp.float32(1.0)}, False
  with pytest.raises(Diverged, match='by step 6.*last good checkpoint \\(step 3\\)'):
    _run(tmp_path, step_fn, total=10, log_every=100, checkpoint_every=3,
         finite_fn=lambda state: state < 6)


def test_sigterm_saves_the_step_in_flight_and_stops(tmp_path):
  waited = []

  def step_fn(state):
    step = state + 1
    if step == 5:
      os.kill(os.getpid(), signal.SIGTERM)  # arrives during the step
    return step, {'loss': 1.0}, False
  previous = signal.getsignal(signal.SIGTERM)
  with pytest.raises(loop.Preempted) as error:
    _run(tmp_path, step_fn, total=10, checkpoint_every=100, log_every=100,
         wait_fn=lambda: waited.append(True))
  assert signal.getsignal(signal.SIGTERM) == previous  # the handler is the caller's again
  message = str(error.value)
  assert message.startswith('train: stopped by signal SIGTERM at step 5 of 10')
  assert str(tmp_path / 'ckpt') in message and 'rerun the same command' in message
  assert error.value.exit_code == 143 and waited == [True]


def test_sigterm_during_the_last_step_lets_the_phase_finish(tmp_path):
  def step_fn(state):
    if state + 1 == 4:
      os.kill(os.getpid(), signal.SIGTERM)
    return state + 1, {'loss': 1.0}, False
  out, saved, _, _ = _run(tmp_path, step_fn, total=4, checkpoint_every=100, log_every=100)
  assert out == 4 and [s for s, _ in saved] == [4]


# --------------------------------------------------------------------------------------------
# TensorBoard event files, read back by TensorFlow's own reader (which checks the record CRCs).


def _events(path):
  """The `Event` protos of one event file."""
  # Imported here: only these tests need TensorFlow, and its import costs seconds.
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return list(tf.compat.v1.train.summary_iterator(str(path)))


def _scalars(path):
  """[(step, tag, value)] of one event file, in the order written."""
  return [(event.step, value.tag, value.simple_value) for event in _events(path)
          for value in event.summary.value]


def test_summary_writer_scalars_are_on_disk_at_once_and_read_back(tmp_path):
  logdir = tmp_path / 'tb'
  with logging_utils.SummaryWriter(str(logdir)) as writer, \
      logging_utils.SummaryWriter(str(logdir)) as other:
    writer.scalars(3, {'train/loss': 1.5, 'train/accuracy': np.float32(0.25), 'stage': 'a',
                       'done': True})  # only real numbers are written
    paths = sorted(logdir.glob('events.out.tfevents.*'))
    assert len(paths) == 2  # two writers of one process in the same second: two files
    path = next(p for p in paths if _scalars(p))
    assert _scalars(path) == [(3, 'train/loss', 1.5), (3, 'train/accuracy', 0.25)]  # flushed
    writer.scalars(7, {'train/loss': 0.75})
    writer.scalars(8, {'stage': 'b'})  # nothing to write
    other.flush()
  writer.scalars(9, {'train/loss': 0.5})  # closed: ignored
  events = _events(path)
  assert events[0].file_version == 'brain.Event:2'
  assert _scalars(path) == [(3, 'train/loss', 1.5), (3, 'train/accuracy', 0.25),
                            (7, 'train/loss', 0.75)]
  assert len(events) == 3


def test_a_disabled_summary_writer_writes_nothing(tmp_path):
  with logging_utils.SummaryWriter(str(tmp_path / 'tb'), enabled=False) as writer:
    writer.scalars(1, {'train/loss': 1.0})
    writer.flush()
  assert not (tmp_path / 'tb').exists()


def test_the_loop_writes_its_averaged_metrics_and_rate_at_each_log_step(tmp_path):
  def step_fn(state):
    step = state + 1
    return step, {'loss': jnp.float32(step), 'accuracy': 0.5}, False
  _run(tmp_path, step_fn, total=4, log_every=2, tensorboard=True)
  (path,) = (tmp_path / 'tb').glob('events.out.tfevents.*')
  scalars = {(step, tag): value for step, tag, value in _scalars(path)}
  assert {tag for _, tag in scalars} == {'train/loss', 'train/accuracy', 'train/images_per_sec'}
  assert {step for step, _ in scalars} == {2, 4}
  assert scalars[2, 'train/loss'] == 1.5 and scalars[4, 'train/loss'] == 3.5  # means of 1,2; 3,4
  assert scalars[4, 'train/accuracy'] == 0.5 and scalars[4, 'train/images_per_sec'] > 0
