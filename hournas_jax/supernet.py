"""The SuperNet: every candidate of every SuperBlock in one Flax module.

Variables are laid out as {layer name: {op name: block variables}}, the stem and head included
(as layers with one op), so a candidate's variables are also exactly those of the stand-alone
block `blocks.make_block(...)`: the single-path engine (`engines/single_path.py`) runs
candidates one at a time on those sub-trees, and a fixed network is the same module with one op
per layer.

`SuperNet.__call__` runs either one op per layer (a path; optionally scaled by the
straight-through gates of the sampled one-hot A, Eqn 3) or, for the Gumbel-softmax ablation and
for initialisation, the weighted sum of every candidate.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hournas_jax import blocks, spaces, vital


def layer_ops(space: spaces.SearchSpace, frozen: Mapping[str, str] | None = None,
              vital_only: bool = False) -> tuple[tuple[str, ...], ...]:
  """The candidates each layer of `space.layers` holds.

  frozen: layer name -> op, for layers fixed to one op (vital blocks after stage 1, or every
    layer of a fixed network). vital_only: drop the non-vital SuperBlocks altogether, which gives
    the minimal SuperNet S_vital of stage 1 (they keep their input's shape, so dropping one is
    the identity path).
  """
  frozen = dict(frozen or {})
  unknown = set(frozen) - set(space.searchable_names)
  if unknown:
    raise spaces.SpaceError(f'cannot freeze unknown layers {sorted(unknown)}')
  keep = set(vital.vital_layers(space)) if vital_only else None
  out = []
  for layer in space.layers:
    if keep is not None and layer.searchable and layer.name not in keep:
      out.append(())
    elif layer.name in frozen:
      if frozen[layer.name] not in layer.ops:
        raise spaces.SpaceError(f'op {frozen[layer.name]!r} is not allowed at {layer.name}; '
                                f'allowed: {", ".join(layer.ops)}')
      out.append((frozen[layer.name],))
    else:
      out.append(layer.ops)
  return tuple(out)


def fixed_layer_ops(space: spaces.SearchSpace, op_names: Sequence[str]):
  """Layer ops of the fixed network of an architecture (one op name per searchable layer)."""
  return layer_ops(space, dict(zip(space.searchable_names, op_names)))


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One op of one layer, as the single-path engine runs it on its own.

  Its variables are the part of its SuperBlock's that the op uses: {op: ...}, plus
  {'shared': ...} when the layer's candidates share kernels. Hashable by configuration, not by
  layer name, so same-shaped layers share compiled programs.
  """
  op: str
  block: nn.Module
  shared: blocks.SharedKernels | None = None

  @property
  def param_keys(self) -> tuple[str, ...]:
    return (self.op,) if self.shared is None else ('shared', self.op)

  def apply(self, params, stats, x, train: bool):
    """(output, new batch_stats {op: ...}) when training, else the output.

    params: {key: tree} for every key of `param_keys`; stats: {op: tree}.
    """
    variables = {'params': params[self.op], 'batch_stats': stats.get(self.op, {})}
    args = [x, train]
    if self.shared is not None:
      args.append(self.shared.apply({'params': params['shared']}))
    if not train:
      return self.block.apply(variables, *args)
    y, updated = self.block.apply(variables, *args, mutable=['batch_stats'])
    return y, {self.op: updated['batch_stats']}


def candidate(space: spaces.SearchSpace, layer: spaces.LayerSpec, ops: tuple[str, ...], op: str,
              weight_sharing: bool = False, dtype=None) -> Candidate:
  """The Candidate of `op` in `layer` of a SuperNet whose layer holds `ops`."""
  block = blocks.make_block(space, layer, op, dtype=dtype)
  shared = None
  if weight_sharing and blocks.shares_kernels(space.ops[op]):
    shared = blocks.shared_kernels(space, layer, ops)
  return Candidate(op, block, shared)


class SuperBlock(nn.Module):
  """One layer's candidates; variables {op name: block variables}, and {'shared': kernels}
  when `weight_sharing` (see `blocks.SharedKernels`)."""
  space: spaces.SearchSpace
  layer: spaces.LayerSpec
  ops: tuple[str, ...]
  dropout_rate: float = 0.0
  weight_sharing: bool = False
  dtype: Any = None

  def candidate(self, op: str) -> nn.Module:
    return blocks.make_block(self.space, self.layer, op, self.dropout_rate, name=op,
                             dtype=self.dtype)

  def _run(self, op: str, x, train: bool, kernels):
    if kernels is not None and blocks.shares_kernels(self.space.ops[op]):
      return self.candidate(op)(x, train, kernels)
    return self.candidate(op)(x, train)

  @nn.compact
  def __call__(self, x, op: str | None = None, weights=None, train: bool = True):
    used = self.ops if op is None else (op,)
    kernels = None
    if self.weight_sharing and any(blocks.shares_kernels(self.space.ops[o]) for o in used):
      kernels = blocks.shared_kernels(self.space, self.layer, self.ops, name='shared')()
    if op is not None:
      return self._run(op, x, train, kernels)
    # Weighted sum of all candidates (weights over self.ops, in order).
    return sum(weights[i] * self._run(o, x, train, kernels) for i, o in enumerate(self.ops))


class SuperNet(nn.Module):
  """The chain of SuperBlocks of `space`, each holding the candidates of `ops` (see layer_ops).

  weight_sharing: the searchable layers' candidates share kernels (`blocks.SharedKernels`).
  dtype: the activations' (`blocks.compute_dtype`: None = float32; bfloat16 = mixed precision)."""
  space: spaces.SearchSpace
  ops: tuple[tuple[str, ...], ...]
  dropout_rate: float = 0.0
  weight_sharing: bool = False
  dtype: Any = None

  @nn.nowrap
  def candidate(self, layer: spaces.LayerSpec, op: str) -> Candidate:
    """How the single-path engine runs `op` of `layer` alone."""
    ops = dict((l.name, o) for l, o in self.active_layers)[layer.name]
    return candidate(self.space, layer, ops, op, self.weight_sharing and layer.searchable,
                     self.dtype)

  @property
  def active_layers(self):
    return tuple((l, o) for l, o in zip(self.space.layers, self.ops) if o)

  @nn.compact
  def __call__(self, x, path: Mapping[str, str] | None = None, gates=None, weights=None,
               train: bool = True, channel_masks=None):
    """Runs a path or the weighted sum of all candidates.

    path: layer name -> op for the searchable layers that hold several candidates (layers with
      one candidate run it). gates: optional layer name -> scalar multiplying that layer's
      output: the straight-through value A[l, o] of the sampled op (1.0 in value).
    weights: layer name -> [len(ops)] weights; when given, every candidate runs (all-ops mode).
    channel_masks: optional layer name -> [out_channels] multipliers of that layer's output
      channels (the masking function M(y, p) of Section 3.1). A block with a shortcut keeps it:
      only its residual branch y - x is masked, so a fully masked non-vital block is the
      identity, as in the paper's Figure 2 (a path, not all-ops mode).
    """
    if channel_masks is not None and weights is not None:
      raise ValueError('channel_masks apply to a path, not to the weighted sum of all ops')
    for layer, ops in self.active_layers:
      block = SuperBlock(self.space, layer, ops,
                         self.dropout_rate if layer.name == 'head' else 0.0,
                         self.weight_sharing and layer.searchable, self.dtype, name=layer.name)
      if weights is not None and len(ops) > 1:
        x = block(x, weights=weights[layer.name], train=train)
      else:
        op = ops[0] if len(ops) == 1 else path[layer.name]
        y = block(x, op=op, train=train)
        if gates is not None and layer.name in gates:
          y = y * gates[layer.name]
        if channel_masks is not None and layer.name in channel_masks:
          mask = channel_masks[layer.name].astype(y.dtype)
          y = x + mask * (y - x) if blocks.has_shortcut(self.space, layer, op) else mask * y
        x = y
    return x

  def init_all(self, seed: int, image_shape) -> dict:
    """Variables of every candidate, without compiling anything.

    Compiling the initialisation of ~200 candidates takes minutes on a CPU (thousands of RNG
    calls in one program), so shapes come from tracing (`jax.eval_shape`) and values from
    `blocks.initial_value`, which draws what the modules' own initialisers would, and the
    BatchNorm scales that start at 0 (`blocks.zero_scale_batchnorm`) are zeroed.
    """
    variables = jax.tree_util.tree_map_with_path(
        lambda path, leaf: blocks.initial_value(seed, jax.tree_util.keystr(path), leaf.shape,
                                                leaf.dtype), self.variable_shapes(image_shape))
    for layer, ops in self.active_layers:
      for op in ops:
        name = blocks.zero_scale_batchnorm(self.space, layer, op)
        if name is not None:
          scale = variables['params'][layer.name][op][name]['scale']
          variables['params'][layer.name][op][name]['scale'] = np.zeros_like(scale)
    return variables

  def variable_shapes(self, image_shape) -> dict:
    """Every candidate's variables as jax.ShapeDtypeStruct leaves (tracing only, cached)."""
    return _variable_shapes(self, tuple(image_shape))


@functools.lru_cache(maxsize=16)
def _variable_shapes(net: SuperNet, image_shape):
  # Tracing ~200 candidates takes seconds; a search asks for the same shapes several times.
  weights = {l.name: jnp.full((len(o),), 1.0 / len(o)) for l, o in net.active_layers}
  return jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1, *image_shape)),
                                         weights=weights, train=False))
