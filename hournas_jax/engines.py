"""SuperNet engines: how a search step trains the network, behind one interface.

An engine trains the SuperNet of one stage (its `layer_ops`) and answers, for a sampled choice
of ops:

    Engine(space, layer_ops, *, momentum, weight_decay, weight_sharing, dtype)
    init(seed, image_shape) -> weights            {'params', 'batch_stats', 'opt_state'}
    state_shapes(image_shape) -> abstract weights (for restoring a checkpoint)
    train_step(weights, batch, choice, lr) -> (weights, metrics)     a step on D_tr
    arch_grads(weights, batch, choice) -> (weights, metrics, d loss / d A [L, O])   on D_val
    path_loss(weights, batch, choice) -> (weights, metrics)          D_val loss, forward only

`batch` is {'image', 'label'}; `choice` a `Choice`: the stage's choice layers, the sampled op
index of each [L] and the sample A [L, O] (the straight-through one-hot of Gumbel-Max, or the
relaxed Gumbel-softmax weights). d loss / d A has the layout of A, with the space's op order.
The searcher never asks which engine it holds; engines are found by name (config
search.engine), and `runs` says which samples an engine can train: 'path' engines run the
sampled op of each layer (Gumbel-Max), 'all' engines every candidate weighted by A.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hournas_jax import spaces


@dataclasses.dataclass(frozen=True)
class Choice:
  """The ops a step trains: layer names [L], op indices [L] and the sample A [L, O]."""
  layers: tuple[str, ...]
  idx: Any
  a: Any

  @classmethod
  def from_path(cls, space: spaces.SearchSpace, path: Mapping[str, str]) -> 'Choice':
    """The one-hot choice of `path` {layer: op} (layers in network order)."""
    layers = tuple(n for n in space.searchable_names if n in path)
    idx = jnp.asarray([space.op_names.index(path[n]) for n in layers], jnp.int32)
    return cls(layers, idx, jax.nn.one_hot(idx, len(space.op_names)))

  @classmethod
  def none(cls, space: spaces.SearchSpace) -> 'Choice':
    """No choice: a fixed network."""
    return cls((), jnp.zeros((0,), jnp.int32), jnp.zeros((0, len(space.op_names))))

  def path(self, space: spaces.SearchSpace) -> dict[str, str]:
    """{layer: op name} (reads the indices back to the host)."""
    idx = np.asarray(self.idx)
    return {n: space.op_names[int(i)] for n, i in zip(self.layers, idx)}


def _single_path():
  from hournas_jax import singlepath  # pylint: disable=g-import-not-at-top
  return singlepath.SinglePathEngine


def _all_candidates():
  from hournas_jax import wholenet  # pylint: disable=g-import-not-at-top
  return wholenet.WholeNetEngine


def _switch():
  from hournas_jax import switchnet  # pylint: disable=g-import-not-at-top
  return switchnet.SwitchEngine


# name -> a function returning the engine class (imported on use, so that a registry entry
# never imports a module a run does not need). 'single_path' chains one program per sampled
# block from Python (fast on XLA:CPU); 'switch' is one device-resident program per step with a
# lax.switch per layer (for accelerators); 'all_candidates' runs every candidate.
ENGINES = {'single_path': _single_path, 'switch': _switch, 'all_candidates': _all_candidates}
# The engine each sampler gets when config search.engine is '' (the sampler decides what runs).
DEFAULT_ENGINE = {'gumbel_max': 'single_path', 'gumbel_softmax': 'all_candidates'}
# What each sampler's samples need an engine to run.
SAMPLER_RUNS = {'gumbel_max': 'path', 'gumbel_softmax': 'all'}


def engine_class(name: str, sampler: str):
  """The engine class called `name` ('' = the sampler's default); raises ValueError with the
  allowed names when there is none or it cannot train the sampler's samples."""
  name = name or DEFAULT_ENGINE[sampler]
  if name not in ENGINES:
    raise ValueError(f'search.engine must be one of {", ".join(ENGINES)} (or \'\' for the '
                     f'sampler\'s default), got {name!r}')
  cls = ENGINES[name]()
  if cls.runs != SAMPLER_RUNS[sampler]:
    fitting = [n for n, f in ENGINES.items() if f().runs == SAMPLER_RUNS[sampler]]
    raise ValueError(f'search.engine {name!r} runs {cls.runs} candidates, but sampler '
                     f'{sampler!r} needs an engine that runs {SAMPLER_RUNS[sampler]}: use one '
                     f'of {", ".join(fitting)}')
  return cls


def columns(space: spaces.SearchSpace, layers: Sequence[str]) -> dict[str, np.ndarray]:
  """{layer: the columns of A (space op order) of the layer's own candidates, in its order}."""
  return {n: np.array([space.op_names.index(o) for o in space.layer(n).ops]) for n in layers}
