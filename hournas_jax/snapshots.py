"""Weight snapshots of a training run (config.train.snapshot_every_epochs), for the
saturation curves of Eqn 7: every few steps the parameters go to <run_dir>/snapshots as one
.npz file each, written whole or not at all.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from flax import traverse_util

from hournas_jax import mesh as mesh_lib
from hournas_jax import setup as setup_lib


def interval(tcfg, steps_per_epoch: int) -> int:
  """Steps between weight snapshots; 0 = none are kept."""
  every = float(tcfg.snapshot_every_epochs)
  return setup_lib.steps(steps_per_epoch, epochs=every) if every > 0 else 0


def save(directory: str, step: int, params) -> None:
  """The parameters at `step` as <directory>/step_<step>.npz (written whole or not at all)."""
  if jax.process_index() != 0:
    return
  os.makedirs(directory, exist_ok=True)
  flat = traverse_util.flatten_dict(mesh_lib.to_host(params), sep='/')
  path = os.path.join(directory, f'step_{step:09d}.npz')
  tmp = f'{path}.tmp'
  with open(tmp, 'wb') as f:
    np.savez(f, **{k: np.asarray(v) for k, v in flat.items()})
  os.replace(tmp, path)


def load(directory: str) -> list[tuple[int, dict]]:
  """[(step, params tree)] of every snapshot in `directory`, in step order."""
  if not os.path.isdir(directory):
    return []
  out = []
  for name in sorted(os.listdir(directory)):
    if not (name.startswith('step_') and name.endswith('.npz')):
      continue
    with np.load(os.path.join(directory, name)) as arrays:
      flat = {k: arrays[k] for k in arrays.files}
    out.append((int(name[len('step_'):-len('.npz')]),
                traverse_util.unflatten_dict(flat, sep='/')))
  return out
