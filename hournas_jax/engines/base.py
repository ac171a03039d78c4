"""The SuperNet engine interface: how a search step trains the network of one stage.

An engine trains the SuperNet of one stage (its `layer_ops`) and answers, for a sampled choice
of ops, the three questions of a search step (`Engine`): a weight step on a D_tr batch, the
architecture gradient d loss / d A on a D_val batch, and the D_val loss alone. The searcher
never asks which engine it holds; engines are found by name (config search.engine, the registry
in `engines/__init__.py`), and `runs` says which samples an engine can train: 'path' engines run
the sampled op of each layer (Gumbel-Max), 'all' engines every candidate weighted by A.

`SuperNetEngine` is what the engines share: the constructor's settings, the SuperNet, the
initial state and its abstract shapes, and the metrics a step reports.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, ClassVar, Mapping, Protocol, Sequence, TypedDict

import jax
import jax.numpy as jnp
import numpy as np

from hournas_jax import optim, spaces, supernet

# {layer: {op or 'shared': tree}}: a SuperNet's variables or optimizer states, by candidate.
CandidateTree = Mapping[str, Mapping[str, Any]]
# {'loss': scalar, 'accuracy': scalar}, on the device.
Metrics = Mapping[str, jax.Array]


class EngineState(TypedDict):
  """The weights an engine trains, a plain dict (a pytree that checkpoints as it is).

  A dict rather than a class because it is saved as `SearchState.arrays()['weights']`: the
  checkpoints of every earlier run hold this nested dict, and the compiled programs take it as
  their argument. Every engine lays it out the same way, so one checkpoint format serves all
  and the state loads into `supernet.SuperNet` for whole-network use.
  """
  params: CandidateTree       # {layer: {op: params}} (+ {layer: {'shared': ...}} when shared)
  batch_stats: CandidateTree  # {layer: {op: BatchNorm running statistics}}
  opt_state: CandidateTree    # {layer: {op: momentum}}, mirroring params


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


def columns(space: spaces.SearchSpace, layers: Sequence[str]) -> dict[str, np.ndarray]:
  """{layer: the columns of A (space op order) of the layer's own candidates, in its order}."""
  return {n: np.array([space.op_names.index(o) for o in space.layer(n).ops]) for n in layers}


def step_metrics(loss, logits, labels) -> dict:
  """The metrics every step reports: the loss and the top-1 accuracy of the batch."""
  return {'loss': loss, 'accuracy': optim.correct_topk(logits, labels) / labels.shape[0]}


class Engine(Protocol):
  """What the searcher asks of an engine (a stand-in needs these and nothing else)."""

  runs: ClassVar[str]  # 'path' (the sampled op of each layer) or 'all' (every candidate)

  def init(self, seed: int, image_shape) -> EngineState:
    """The initial state of the stage's SuperNet.

    Args:
      seed: seeds the initialisation.
      image_shape: (height, width, channels) of one input image.

    Returns:
      The state, every candidate's variables with zero momenta.
    """

  def state_shapes(self, image_shape) -> EngineState:
    """The structure of `init`'s state with jax.ShapeDtypeStruct leaves, without computing it
    (the template a checkpoint is restored against)."""

  def train_step(self, weights: EngineState, batch, choice: Choice,
                 lr) -> tuple[EngineState, Metrics]:
    """One SGD step on a D_tr batch of the weights the choice runs.

    Args:
      weights: the state.
      batch: {'image': [B, H, W, C], 'label': [B]}.
      choice: the stage's choice layers [L], sampled op indices [L] and the sample A [L, O]
        (the straight-through one-hot of Gumbel-Max, or the relaxed Gumbel-softmax weights).
      lr: the learning rate of this step.

    Returns:
      (the updated state, metrics of the batch before the step).
    """

  def arch_grads(self, weights: EngineState, batch,
                 choice: Choice) -> tuple[EngineState, Metrics, jax.Array]:
    """The D_val loss and its gradient with respect to the sample A; weights stay.

    Args:
      weights: the state.
      batch: {'image': [B, H, W, C], 'label': [B]}.
      choice: as for `train_step`.

    Returns:
      (the state with the BatchNorm running statistics the forward pass updated, metrics,
      d loss / d A [L, O] in the layout of choice.a, columns in the space's op order).
    """

  def path_loss(self, weights: EngineState, batch, choice: Choice) -> tuple[EngineState, Metrics]:
    """The D_val loss of the choice, forward only (the score-function gradient needs no more).

    Args:
      weights: the state.
      batch: {'image': [B, H, W, C], 'label': [B]}.
      choice: as for `train_step`.

    Returns:
      (the state with updated BatchNorm running statistics, metrics).
    """


# The candidates of each layer of a SuperNet (`supernet.layer_ops`).
LayerOps = tuple[tuple[str, ...], ...]
# callable(layer_ops) -> engine: builds the engine of a stage's SuperNet.
EngineFactory = Callable[[LayerOps], Engine]


class SuperNetEngine(abc.ABC):
  """The scaffolding every engine shares: the SuperNet of `ops`, its state, its optimizer.

  Args of the constructor: the space, the candidates of each of its layers
  (`supernet.layer_ops`), SGD's momentum, weight decay and Nesterov flag, the label smoothing
  of the loss, whether a layer's candidates share kernels (`blocks.SharedKernels`) and the
  compute dtype of convolutions and matmuls (None: float32).
  """

  runs: ClassVar[str] = ''
  # Whether `step_function` gives the steps as pure functions of arrays, which a searcher may
  # trace, with the sampling and the architecture update, into one program per iteration.
  fusable: ClassVar[bool] = False

  def __init__(self, space: spaces.SearchSpace, ops, *, momentum: float = 0.9,
               weight_decay: float = 4e-5, nesterov: bool = False,
               label_smoothing: float = 0.0, weight_sharing: bool = False, dtype=None):
    self.space = space
    self.net = supernet.SuperNet(space, tuple(ops), weight_sharing=bool(weight_sharing),
                                 dtype=dtype)
    self.chain = self.net.active_layers
    # Layers where a choice is made each step (more than one candidate).
    self.choice_layers = tuple(l.name for l, o in self.chain if len(o) > 1)
    # (momentum, weight decay, nesterov): hashable, a static argument of compiled programs.
    self.hyper = (float(momentum), float(weight_decay), bool(nesterov))
    self.direction = optim.weight_direction(*self.hyper)
    self.label_smoothing = float(label_smoothing)

  def init(self, seed: int, image_shape) -> EngineState:
    """See `Engine.init`."""
    return optim.init_train_state(self.net, self.direction, seed, image_shape)

  def state_shapes(self, image_shape) -> EngineState:
    """See `Engine.state_shapes`."""
    return optim.train_state_shapes(self.net, self.direction, image_shape)

  @abc.abstractmethod
  def train_step(self, weights: EngineState, batch, choice: Choice,
                 lr) -> tuple[EngineState, Metrics]:
    """See `Engine.train_step`."""

  @abc.abstractmethod
  def arch_grads(self, weights: EngineState, batch,
                 choice: Choice) -> tuple[EngineState, Metrics, jax.Array]:
    """See `Engine.arch_grads`."""

  @abc.abstractmethod
  def path_loss(self, weights: EngineState, batch, choice: Choice) -> tuple[EngineState, Metrics]:
    """See `Engine.path_loss`."""

  def train_paths(self, weights: EngineState, batch, choices: Sequence[Choice], lr,
                  distill: bool = False) -> tuple[EngineState, Metrics]:
    """One SGD step of the weights several paths run, their gradients on one D_tr batch summed
    (the multi-path recipes of search.weight_sampling, `weight_sampling.py`).

    Args:
      weights: the state.
      batch: {'image': [B, H, W, C], 'label': [B]}.
      choices: the paths, every one with the stage's choice layers.
      lr: the learning rate of this step.
      distill: the first path learns from the labels and the others from its predictions
        (in-place distillation); otherwise every path learns from the labels.

    Returns:
      (the updated state, the paths' mean loss on the labels and mean accuracy, before the
      step).
    """
    raise NotImplementedError(f'{type(self).__name__} trains one path a step; the multi-path '
                              "weight steps of search.weight_sampling need 'single_path'")

  def step_function(self, kind: str, layers: Sequence[str]) -> Callable:
    """The pure, jittable function of a step, for engines that are `fusable`.

    Args:
      kind: 'train' (as `train_step`), 'grads' (as `arch_grads`) or 'loss' (as `path_loss`).
      layers: the choice's layers [L] (`Choice.layers`).

    Returns:
      fn(weights, images [B, H, W, C], labels [B], idx [L], lr) for 'train', and
      fn(weights, images, labels, idx) for the others, returning what the method returns.
    """
    raise NotImplementedError(f'{type(self).__name__} runs its steps as several programs '
                              'from Python; it has no step function to fuse')
