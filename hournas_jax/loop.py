"""The step loop the search and retraining share.

Each phase supplies its step; the loop owns the rest of the cycle: the finiteness check, metric
averaging, the progress line and TensorBoard scalars, the checkpoint cadence and the "last good
checkpoint" message, and preemption.

Preemption: cloud accelerators are taken back with SIGTERM. While the loop runs, SIGTERM does
not kill the process; at the end of the step in flight the loop saves a checkpoint of that step,
waits until it is written, and raises `Preempted` (main.py: one line, exit status 143). A rerun
of the same command continues from that checkpoint and ends as an uninterrupted run would. In a
multi-process run the processes agree at each progress line (an all-gather of the request), so
they stop at the same step.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
from typing import Any, Callable, Mapping

import jax
import numpy as np

from hournas_jax import errors
from hournas_jax import logging_utils

PREEMPTED_EXIT = 128 + signal.SIGTERM
# Metrics shown as their latest value on a progress line, not as the mean since the last one.
LATEST = ('tau', 'lr', 'learning_rate')
# Metrics that must stay finite (the loss of a weight step and of an architecture step).
LOSSES = ('loss', 'val_loss')


class Preempted(errors.UserError):
  """The run was asked to stop (SIGTERM); a checkpoint of the step it stopped at is saved."""
  exit_code = PREEMPTED_EXIT


class StopSignal:
  """While entered, SIGTERM sets `received` instead of ending the process.

  Signal handlers can only be set from the main thread; elsewhere (a run inside a worker
  thread) SIGTERM keeps its default action.
  """

  def __init__(self, signals=(signal.SIGTERM,)):
    self.signals = tuple(signals)
    self.received = None
    self._previous = {}

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.received = signum

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in self.signals:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}


@dataclasses.dataclass
class Loop:
  """How a phase's steps are run and reported."""
  phase: str                     # 'search' or 'train': progress lines, scalars, messages
  total: int                     # the step the phase ends at
  batch_size: int                # images per step (the progress line's rate)
  log_every: int
  checkpoint_every: int
  directory: str                 # where the checkpoints go (for the messages)
  error: type[Exception]         # raised when a loss becomes non-finite
  hint: str                      # what to try then, e.g. 'try a lower config.train.learning_rate'


StepFn = Callable[[Any], tuple[Any, Mapping[str, Any], bool]]


def run(loop: Loop, state, step: int, last_good: int | None, *, step_fn: StepFn,
        writer: logging_utils.SummaryWriter, save_fn: Callable[[int, Any], None],
        wait_fn: Callable[[], None] = lambda: None,
        finite_fn: Callable[[Any], bool] | None = None,
        on_log: Callable[[int, Any], None] | None = None,
        after_step: Callable[[int, Any, bool], None] | None = None):
  """Runs steps from `step` until `loop.total`; returns the state.

  step_fn(state) -> (state, metrics, boundary): one step. metrics maps names to numbers or
    scalar arrays (arrays are averaged on the device and read at progress lines); a string
    value 'stage' labels the progress line. boundary: the phase changes at this step (a search
    stage ends), so it is logged and checkpointed.
  writer: the phase's TensorBoard writer.
  save_fn(step, state): starts writing a checkpoint; wait_fn(): waits until it is written.
  finite_fn(state): whether the state's weights are finite, checked before each save (with the
    losses since the last check).
  on_log(step, state): after each progress line. after_step(step, state, boundary): anything
    else a step needs (weight snapshots, evaluations, messages).
  """
  progress = logging_utils.Progress(loop.phase, loop.total, step, loop.batch_size)
  sums, counts = {}, {}  # since the last progress line
  losses = {}  # sums of the losses since the last finiteness check
  with StopSignal() as stop:
    while step < loop.total:
      state, metrics, boundary = step_fn(state)
      step += 1
      label = metrics.get('stage')
      numbers = {k: v for k, v in metrics.items()
                 if not isinstance(v, (str, bool)) and v is not None}
      on_host = all(isinstance(v, (int, float)) for v in numbers.values())
      for key, value in numbers.items():
        if key in LATEST:
          sums[key], counts[key] = value, 1
        else:
          sums[key] = sums[key] + value if key in sums else value
          counts[key] = counts.get(key, 0) + 1
        if key in LOSSES:
          losses[key] = losses[key] + value if key in losses else value
      log_now = step % loop.log_every == 0 or boundary or step == loop.total
      stop_now = _stop_requested(stop, log_now)
      save_now = (step % loop.checkpoint_every == 0 or boundary or step == loop.total
                  or stop_now)
      if on_host or log_now or save_now:
        # Host values are checked every step (they cost nothing), device ones when read anyway.
        _check_finite(loop, losses, step, last_good, 'at' if on_host else 'by')
        losses = {}
      if log_now:
        shown = {k: float(v) / counts[k] for k, v in _to_host(sums).items()}
        sums, counts = {}, {}
        rates = progress.line(step, shown, label)
        writer.scalars(step, {**{f'{loop.phase}/{k}': v for k, v in shown.items()},
                              f'{loop.phase}/images_per_sec': rates['images_per_sec']})
        if on_log:
          on_log(step, state)
      if save_now:
        if finite_fn is not None and not finite_fn(state):
          _check_finite(loop, {'loss': float('nan')}, step, last_good, 'by')
        save_fn(step, state)
        last_good = step
      if after_step:
        after_step(step, state, boundary)
      if stop_now and step < loop.total:
        wait_fn()
        raise Preempted(f'{loop.phase}: stopped by signal {_signal_name(stop.received)} at step '
                        f'{step} of {loop.total}; its checkpoint is saved in {loop.directory}: '
                        'rerun the same command to continue from it')
  return state


def _to_host(tree):
  from hournas_jax import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  return mesh_lib.to_host(tree)


def _check_finite(loop: Loop, losses: Mapping[str, Any], step: int, last_good, when: str):
  for key, value in _to_host(dict(losses)).items():
    if not math.isfinite(float(value)):
      kept = (f'the last good checkpoint (step {last_good}) is kept in {loop.directory}'
              if last_good is not None else 'no checkpoint had been written yet')
      raise loop.error(f'{loop.phase}: the {key.replace("_", " ")} became non-finite {when} '
                       f'step {step}; stopped, {kept}; {loop.hint}')


def _stop_requested(stop: StopSignal, log_now: bool) -> bool:
  """Whether to stop after this step. With several processes, they decide together at
  progress lines only (an all-gather), so that every one stops at the same step."""
  if jax.process_count() == 1:
    return stop.received is not None
  if not log_now:
    return False
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  flags = multihost_utils.process_allgather(np.int32(stop.received is not None))
  if np.any(flags) and stop.received is None:
    stop.received = signal.SIGTERM  # another process was asked
  return bool(np.any(flags))


def _signal_name(signum) -> str:
  try:
    return signal.Signals(signum).name
  except (TypeError, ValueError):
    return str(signum)

