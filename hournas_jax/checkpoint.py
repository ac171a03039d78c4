"""Checkpoints, the workdir (its lock and fingerprint) and atomic result files.

A checkpoint is one orbax step directory with two items:
- 'state': the arrays of the run's state (weights, BatchNorm statistics, optimizer states,
  architecture parameters, RNG keys, ...), a pytree restored against an abstract template;
- 'meta': what is not an array (the search stage, vital ops, counters, the model's
  description) as JSON. The template of 'state' can depend on it (the search state's pytree
  changes between stages), so 'meta' is read first (`read_meta`).

Orbax writes a step into a temporary directory and renames it when complete, so a run killed
mid-save leaves only a `<step>.orbax-checkpoint-tmp-*` directory that is never listed or loaded,
and a write that fails (a full disk, a lost permission) leaves the steps before it as they were;
the failure is reported as a CheckpointError naming the step a rerun continues from. A step that
exists but cannot be read is reported the same way (one line) and left in place: nothing is
ever deleted here except old complete steps beyond `keep`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np

from hournas_jax import errors


class CheckpointError(errors.UserError, RuntimeError):
  """A checkpoint that cannot be written, or exists but cannot be restored."""


class WorkdirError(errors.UserError, RuntimeError):
  """A workdir that cannot be used: a file, unwritable, in use, or holding another config's
  run."""


# --------------------------------------------------------------------------------------------
# Atomic files.


def atomic_write_text(path: str, text: str) -> None:
  """Writes via a temporary file in the same directory and os.replace: readers see either the
  old file or the complete new one, never half of it."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=f'.{os.path.basename(path)}.', suffix='.tmp', dir=directory)
  try:
    with os.fdopen(fd, 'w') as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def atomic_write_json(path: str, obj: Any) -> None:
  atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default)
                    + '\n')


def _json_default(x):
  if isinstance(x, (np.generic,)):
    return x.item()
  if isinstance(x, (np.ndarray, jax.Array)):
    return np.asarray(x).tolist()
  if isinstance(x, tuple):
    return list(x)
  raise TypeError(f'{type(x).__name__} is not JSON serializable')


def read_json(path: str):
  with open(path) as f:
    return json.load(f)


# --------------------------------------------------------------------------------------------
# The workdir.


def prepare_workdir(workdir: str) -> str:
  """Creates the workdir and checks it is a writable directory; returns its absolute path."""
  if not workdir:
    raise WorkdirError('--workdir must name a directory')
  path = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f'workdir {path} is a file, not a directory')
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
      pass
  except OSError as e:
    raise WorkdirError(f'workdir {path} is not writable: {e.strerror or e}') from None
  return path


LOCK_FILE = '.lock'


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Holds the workdir for one run: a second run started in it meanwhile is refused.

  An advisory `flock` on <workdir>/.lock, which the kernel releases when the holder's process
  ends in any way (a killed run never leaves the workdir stuck); the file names the holder.
  Process 0 of a multi-process run holds it for all of them.
  """
  if jax.process_index() != 0:
    yield
    return
  path = os.path.join(workdir, LOCK_FILE)
  f = open(path, 'a+')  # pylint: disable=consider-using-with
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    f.seek(0)
    holder = ' '.join(f.read().split()) or 'a process that did not say which'
    f.close()
    raise WorkdirError(f'workdir {workdir} is in use by another run ({holder}); wait for it to '
                       'end, or use another --workdir') from None
  try:
    f.seek(0)
    f.truncate()
    f.write(f'pid {os.getpid()}, started {time.strftime("%Y-%m-%d %H:%M:%S")}\n')
    f.flush()
    yield
  finally:
    fcntl.flock(f, fcntl.LOCK_UN)
    f.close()


FINGERPRINT_FILE = 'fingerprint.json'


def check_fingerprint(workdir: str, section: str, values: Mapping[str, Any],
                      implicit: Mapping[str, Any] | None = None) -> None:
  """Refuses a workdir whose `section` run was made with other values of the fields that matter.

  The fingerprint file holds one dict per section ('search', 'train', ...), written the first
  time that section runs in the workdir. `implicit` gives fields added to the fingerprint after
  a workdir may have been written, with the value the code that wrote it behaved as: a
  fingerprint without such a field matches that value.
  """
  path = os.path.join(workdir, FINGERPRINT_FILE)
  values = json.loads(json.dumps(dict(values), default=_json_default))
  stored = {}
  if os.path.exists(path):
    try:
      stored = read_json(path)
    except (OSError, ValueError) as e:
      raise WorkdirError(f'cannot read {path}: {e}') from None
  old = stored.get(section)
  if old is None:
    if jax.process_index() == 0:
      atomic_write_json(path, {**stored, section: values})
    return
  implicit = json.loads(json.dumps(dict(implicit or {}), default=_json_default))
  old = {**{k: v for k, v in implicit.items() if k in values}, **old}
  diffs = [f'{key}: {old.get(key, "<unset>")!r} there, {values.get(key, "<unset>")!r} now'
           for key in sorted(set(old) | set(values)) if old.get(key) != values.get(key)]
  if diffs:
    shown = '; '.join(diffs[:4]) + (f'; and {len(diffs) - 4} more' if len(diffs) > 4 else '')
    raise WorkdirError(f'workdir {workdir} holds a {section} run of another config ({shown}); '
                       'rerun with that config to continue it, or use a new --workdir')


def _one_line(e: BaseException, limit: int = 240) -> str:
  text = ' '.join(str(e).split()) or type(e).__name__
  return text if len(text) <= limit else text[:limit - 3] + '...'


class Checkpointer:
  """An orbax CheckpointManager for one run's state in `directory`."""

  def __init__(self, directory: str, keep: int = 2):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    self._ocp = ocp
    self.directory = directory
    options = ocp.CheckpointManagerOptions(max_to_keep=max(1, keep), create=True)
    self._manager = ocp.CheckpointManager(directory, options=options,
                                          item_names=('state', 'meta'))
    self._pending = None  # the step being written in the background
    self._written = self._manager.latest_step()  # the latest step known complete

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, arrays, meta: Mapping[str, Any]) -> None:
    """Saves `arrays` (a pytree) and `meta` (JSON-able) as `step`; returns before the write
    ends (the next `save`, `wait` or `close` reports a failed one)."""
    self._check_pending()
    ocp = self._ocp
    try:
      self._manager.save(int(step), args=ocp.args.Composite(
          state=ocp.args.StandardSave(arrays if arrays is not None else {}),
          meta=ocp.args.JsonSave(json.loads(json.dumps(dict(meta), default=_json_default)))),
                         force=True)
    except Exception as e:  # pylint: disable=broad-except
      self._failed(int(step), e)
    self._pending = int(step)

  def _check_pending(self) -> None:
    """Waits for the write in flight; a failed one is a CheckpointError."""
    if self._pending is None:
      return
    step, self._pending = self._pending, None
    try:
      self._manager.wait_until_finished()
      self._manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      self._failed(step, e)
    self._written = step

  def _failed(self, step: int, e: BaseException):
    self._pending = None
    kept = (f'the checkpoint of step {self._written} is intact and a rerun of the same command '
            'continues from it' if self._written is not None else
            'no earlier checkpoint exists, so a rerun starts over')
    if jax.process_count() > 1 and not isinstance(e, OSError):
      # Every process takes part in a save; a collective that fails means a peer is gone.
      raise CheckpointError(
          f'process {jax.process_index()} of {jax.process_count()}: writing the checkpoint of '
          f'step {step} failed, most likely because another process stopped '
          f'({type(e).__name__}: {_one_line(e, 160)}); restart every process with the same '
          f'command: {kept}') from None
    raise CheckpointError(f'writing the checkpoint of step {step} in {self.directory} failed '
                          f'({type(e).__name__}: {_one_line(e)}); {kept}') from None

  def read_meta(self, step: int) -> dict:
    """The JSON side of the step (what the template of its arrays may depend on)."""
    ocp = self._ocp
    try:
      return self._manager.restore(
          step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta'] or {}
    except Exception as e:  # pylint: disable=broad-except
      raise self._unreadable(step, e) from None

  def restore(self, step: int, template_fn: Callable[[dict], Any]) -> tuple[Any, dict]:
    """(arrays, meta) saved as `step`.

    template_fn(meta) -> an abstract (ShapeDtypeStruct, with shardings) pytree of the arrays.
    """
    meta = self.read_meta(step)
    template = template_fn(meta)
    ocp = self._ocp
    try:
      arrays = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(template if template is not None else {})))['state']
    except (CheckpointError, WorkdirError):
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise self._unreadable(step, e) from None
    return arrays, meta

  def _unreadable(self, step: int, e: BaseException) -> CheckpointError:
    where = os.path.join(self.directory, str(step))
    return CheckpointError(
        f'checkpoint {where} cannot be restored ({type(e).__name__}: {_one_line(e)}); it was '
        'left in place: move that step directory away to resume from an earlier one, or use '
        'a new --workdir')

  def wait(self) -> None:
    self._check_pending()

  def close(self) -> None:
    try:
      self._check_pending()
    finally:
      self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    if exc[0] is None:
      self.close()
    else:  # already failing: close without masking that error by a second one
      try:
        self.close()
      except CheckpointError:
        pass
