"""What a user sees while a run goes: a progress line, and scalars for TensorBoard.

The progress line (stdout, every `log_every_steps`):
    [search/vital] step 120/500 (24%) | 153 img/s | loss 1.234 | acc 0.457 | tau 4.941 | ETA 3m12s

TensorBoard: scalar summaries are written as standard event files
(`<workdir>/tensorboard/<phase>/events.out.tfevents.*`) by tensorboardX, the records tf.summary
writes: importing TensorFlow costs ~10 s of start-up on a 2-core machine, which the digits runs
(no TF at all) should not pay.
"""

from __future__ import annotations

import itertools
import math
import numbers
import os
import sys
import time
from typing import Mapping

import jax

# --------------------------------------------------------------------------------------------
# Progress line.


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds) or seconds < 0:
    return '?'
  seconds = int(round(seconds))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  if h:
    return f'{h}h{m:02d}m'
  if m:
    return f'{m}m{s:02d}s'
  return f'{s}s'


def _fmt(value) -> str:
  if isinstance(value, str):
    return value
  value = float(value)
  if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
    return f'{value:.3e}'
  return f'{value:.4g}' if abs(value) >= 100 else f'{value:.3f}'


class Progress:
  """Throughput and ETA of one phase, printed as one line per call to `line`."""

  def __init__(self, phase: str, total_steps: int, start_step: int, images_per_step: int,
               stream=None):
    self.phase = phase
    self.total = total_steps
    self.images_per_step = images_per_step
    self.stream = stream or sys.stdout
    self._start_step = start_step
    self._start_time = time.time()
    self._last_step = start_step
    self._last_time = self._start_time

  def rates(self, step: int) -> tuple[float, float]:
    """(images/s since the previous line, ETA in seconds from the phase's average speed)."""
    now = time.time()
    interval = max(now - self._last_time, 1e-9)
    ips = (step - self._last_step) * self.images_per_step / interval
    done = step - self._start_step
    elapsed = now - self._start_time
    eta = (self.total - step) * elapsed / done if done > 0 else float('nan')
    self._last_step, self._last_time = step, now
    return ips, eta

  def line(self, step: int, metrics: Mapping[str, float], stage: str | None = None) -> dict:
    ips, eta = self.rates(step)
    name = f'{self.phase}/{stage}' if stage else self.phase
    pct = 100.0 * step / self.total if self.total else 100.0
    parts = [f'[{name}] step {step}/{self.total} ({pct:.0f}%)', f'{ips:.0f} img/s']
    for key, label in (('loss', 'loss'), ('accuracy', 'acc'), ('val_loss', 'val loss'),
                       ('tau', 'tau'), ('learning_rate', 'lr'), ('lr', 'lr')):
      if key in metrics:
        parts.append(f'{label} {_fmt(metrics[key])}')
    parts.append(f'ETA {format_duration(eta)}')
    if jax.process_index() == 0:
      print(' | '.join(parts), file=self.stream, flush=True)
    return {'images_per_sec': ips, 'eta_sec': eta}


def info(message: str) -> None:
  """A status line for the user (process 0 only)."""
  if jax.process_index() == 0:
    print(message, flush=True)


# --------------------------------------------------------------------------------------------
# TensorBoard event files, written by tensorboardX (no TensorFlow).

# Numbers a writer sequences so that two writers of one process on one directory in the same
# second get different files (tensorboardX opens them for writing, not appending).
_WRITER_COUNT = itertools.count()


class SummaryWriter:
  """Writes scalar summaries to a new TensorBoard event file (process 0 only; others no-op).

  Each `scalars` call is on disk when it returns, so TensorBoard follows a run live and a killed
  run keeps every scalar it logged. That is why this uses tensorboardX's synchronous
  `EventsWriter` rather than its `SummaryWriter`, which writes from a background thread and
  flushes every two minutes.
  """

  def __init__(self, logdir: str, enabled: bool = True):
    """Opens a new event file in `logdir` (created if missing).

    Args:
      logdir: the directory of the event files, `<workdir>/tensorboard/<phase>`.
      enabled: False (config.tensorboard) makes every method a no-op and writes nothing.
    """
    self.logdir = logdir
    self._events = None
    if enabled and jax.process_index() == 0:
      # Imported here: importing tensorboardX takes ~0.3 s, which runs without TensorBoard
      # (and every module importing this one for its progress line) should not pay.
      from tensorboardX import event_file_writer  # pylint: disable=g-import-not-at-top
      os.makedirs(logdir, exist_ok=True)
      self._events = event_file_writer.EventsWriter(
          os.path.join(logdir, 'events'),
          filename_suffix=f'.{os.getpid()}.{next(_WRITER_COUNT)}.hournas')
      self.flush()

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    """Writes the numbers of `values` (tag -> value) as one event at `step`, then flushes.

    Args:
      step: the global step the values belong to.
      values: tag -> value; values that are not real numbers (strings, booleans) are skipped.
    """
    if self._events is None:
      return
    from tensorboardX.proto import event_pb2, summary_pb2  # pylint: disable=g-import-not-at-top
    summary_values = [summary_pb2.Summary.Value(tag=tag, simple_value=float(value))
                      for tag, value in values.items()
                      if isinstance(value, numbers.Real) and not isinstance(value, bool)]
    if summary_values:
      self._events.write_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                               summary=summary_pb2.Summary(value=summary_values)))
      self.flush()

  def flush(self) -> None:
    """Writes what is buffered to disk."""
    if self._events is not None:
      self._events.flush()

  def close(self) -> None:
    """Flushes and closes the event file; later calls do nothing."""
    if self._events is not None:
      self._events.close()
      self._events = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
