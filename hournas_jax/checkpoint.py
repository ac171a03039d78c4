"""Checkpoints, the workdir and atomic result files.

A checkpoint is one orbax step directory with two items:
- 'state': every array of the run's state (weights, BatchNorm statistics, optimizer states,
  architecture parameters, RNG keys, ...), restored against an abstract template;
- 'meta': every non-array leaf (python ints, floats, strings: the search stage, vital ops,
  counters, ...) as JSON. The template of 'state' can depend on it (the search state's pytree
  changes between stages), so 'meta' is read first.

Orbax writes a step into a temporary directory and renames it when complete, so a run killed
mid-save leaves only a `<step>.orbax-checkpoint-tmp-*` directory that is never listed or loaded.
A step that exists but cannot be read is reported as a CheckpointError (one line) and left in
place: nothing is ever deleted here except old complete steps beyond `keep`.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable, Mapping

import jax
import numpy as np

class CheckpointError(RuntimeError):
  """A checkpoint that exists but cannot be restored."""


class WorkdirError(RuntimeError):
  """A workdir that cannot be used: a file, unwritable, or holding another config's run."""


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


# --------------------------------------------------------------------------------------------
# Splitting a state into arrays and JSON.


def _is_json_value(x) -> bool:
  if isinstance(x, (bool, int, float, str, type(None))) and not isinstance(x, np.generic):
    return True
  if type(x) in (list, tuple):  # plain sequences, not NamedTuples (optax states)
    return all(_is_json_value(v) for v in x)
  return False


JSON_KEYS = ('meta',)  # top-level entries that are JSON as a whole (the search state's meta)


def split_state(tree, json_keys=JSON_KEYS) -> tuple[Any, Any]:
  """(arrays, json): the state as nested dicts of array subtrees, and of JSON values.

  Dicts are walked; python scalars, strings and plain lists of them go to the JSON side, and so
  do the top-level `json_keys` entries whole; every other subtree (arrays, optax NamedTuple
  states, empty dicts) stays on the array side.
  """
  if isinstance(tree, Mapping) and json_keys:
    forced = {k: tree[k] for k in json_keys if k in tree}
    arrays, other = split_state({k: v for k, v in tree.items() if k not in forced}, ())
    if forced:
      other = {**(other or {}), **forced}
    return arrays, other
  if isinstance(tree, Mapping):
    arrays, other = {}, {}
    for key, value in tree.items():
      a, o = split_state(value, ())
      if a is not None:
        arrays[key] = a
      if o is not None:
        other[key] = o
    if not tree:
      return {}, None
    return (arrays or None), (other or None)
  if _is_json_value(tree):
    return None, tree
  return tree, None


def merge_state(arrays, other):
  if arrays is None:
    return other
  if other is None:
    return arrays
  out = dict(arrays)
  for key, value in other.items():
    out[key] = merge_state(arrays.get(key), value) if key in arrays else value
  return out


def _without(template, other):
  """`template` less every entry saved on the JSON side (`other`): a template may describe a
  python int (a counter) as an array, but it was saved, and comes back, as JSON."""
  if not isinstance(template, Mapping) or not isinstance(other, Mapping):
    return template
  out = {}
  for key, value in template.items():
    if key not in other:
      out[key] = value
    elif isinstance(value, Mapping) and isinstance(other[key], Mapping):
      rest = _without(value, other[key])
      if rest:
        out[key] = rest
  return out


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

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state) -> None:
    """Saves `state` (arrays and JSON-able leaves) as `step`; returns before the write ends."""
    arrays, other = split_state(state)
    ocp = self._ocp
    self._manager.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(arrays if arrays is not None else {}),
        meta=ocp.args.JsonSave(json.loads(json.dumps(other or {}, default=_json_default)))),
                       force=True)

  def restore(self, step: int, template_fn: Callable[[dict], Any]):
    """The state saved as `step`.

    template_fn(json_part) -> an abstract (ShapeDtypeStruct, with shardings) pytree of the
    state; only its array leaves are used.
    """
    ocp = self._ocp
    where = os.path.join(self.directory, str(step))
    try:
      other = self._manager.restore(
          step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta'] or {}
      template, _ = split_state(_without(template_fn(other), other))
      arrays = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(template if template is not None else {})))['state']
    except (CheckpointError, WorkdirError):
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(
          f'checkpoint {where} cannot be restored ({type(e).__name__}: {_one_line(e)}); it was '
          'left in place: move that step directory away to resume from an earlier one, or use '
          'a new --workdir') from None
    return merge_state(arrays, other)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
