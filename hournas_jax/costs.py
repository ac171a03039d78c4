"""Parameters and FLOPs of every (layer, op) pair, as tables.

FLOPs are multiply-adds of convolutions and fully connected layers, the convention of FBNet,
MnasNet, EfficientNet and the HourNAS tables. Parameters are every trainable value of the Flax
network built by `blocks.py`: conv kernels, BatchNorm scales and biases, SE and classifier
biases. The cost of an architecture A is sum(A * table), Eqn 4's R_F(A); tests check the tables
against the built network's parameter count and against XLA's own cost analysis.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from hournas_jax import spaces


def se_channels(in_channels: int, se_ratio: float) -> int:
  """Squeeze-and-excitation width: a fraction of the block's input channels (MnasNet, EffNet)."""
  return max(1, int(in_channels * se_ratio))


def op_cost(layer: spaces.LayerSpec, op: spaces.OpSpec, space: spaces.SearchSpace
            ) -> tuple[int, int]:
  """(params, multiply-adds) of `op` placed in `layer`, for one image."""
  cin, cout = layer.in_channels, layer.out_channels
  hw_in = layer.in_resolution ** 2
  hw_out = layer.out_resolution ** 2
  if op.kind == 'skip':
    return 0, 0
  if op.kind == 'conv':  # stem: k x k conv, BatchNorm
    k = op.kernel
    return k * k * cin * cout + 2 * cout, k * k * cin * cout * hw_out
  if op.kind == 'sep':  # depthwise k x k + BN + act, pointwise 1x1 + BN
    k = op.kernel
    params = k * k * cin + 2 * cin + cin * cout + 2 * cout
    return params, k * k * cin * hw_out + cin * cout * hw_out
  if op.kind == 'head':  # 1x1 conv + BN + act, global pool, classifier with bias
    classes = space.num_classes
    params = cin * cout + 2 * cout + cout * classes + classes
    return params, cin * cout * hw_in + cout * classes
  if op.kind == 'ir':
    mid, g, k = cin * op.expansion, op.groups, op.kernel
    params = cin * mid // g + 2 * mid  # 1x1 expansion (grouped for g2) + BN
    flops = cin * mid // g * hw_in
    params += k * k * mid + 2 * mid  # depthwise k x k + BN
    flops += k * k * mid * hw_out
    if op.se:  # two 1x1 convs with bias on the pooled vector
      r = se_channels(cin, space.se_ratio)
      params += mid * r + r + r * mid + mid
      flops += 2 * mid * r
    params += mid * cout // g + 2 * cout  # 1x1 projection + BN
    flops += mid * cout // g * hw_out
    return params, flops
  raise ValueError(f'unknown op kind {op.kind!r}')


@dataclasses.dataclass(frozen=True)
class CostTables:
  """Per-layer, per-op costs of a space's searchable layers, plus the fixed layers' total.

  params/flops: float64 [L, O], columns in `space.op_names`; 0 where the op is not allowed.
  mask: bool [L, O], the allowed ops. fixed_params/fixed_flops: stem, fixed layers and head.
  """
  layer_names: tuple[str, ...]
  op_names: tuple[str, ...]
  params: np.ndarray
  flops: np.ndarray
  mask: np.ndarray
  fixed_params: int
  fixed_flops: int

  def stacked(self) -> np.ndarray:
    """[2, L, O]: params and FLOPs, the resource tables of Eqn 5 in that order."""
    return np.stack([self.params, self.flops])

  def cost(self, op_indices) -> tuple[int, int]:
    """Total (params, FLOPs) of the architecture given as one op index per searchable layer."""
    rows = np.arange(len(self.layer_names))
    idx = np.asarray(op_indices)
    return (int(self.fixed_params + self.params[rows, idx].sum()),
            int(self.fixed_flops + self.flops[rows, idx].sum()))

  def bounds(self) -> tuple[tuple[int, int], tuple[int, int]]:
    """((min params, max params), (min FLOPs, max FLOPs)) over the whole space."""
    out = []
    for table, fixed in ((self.params, self.fixed_params), (self.flops, self.fixed_flops)):
      lo = np.where(self.mask, table, np.inf).min(axis=1).sum()
      hi = np.where(self.mask, table, -np.inf).max(axis=1).sum()
      out.append((int(fixed + lo), int(fixed + hi)))
    return out[0], out[1]


def cost_tables(space: spaces.SearchSpace) -> CostTables:
  layers = space.searchable_layers
  params = np.zeros((len(layers), len(space.op_names)))
  flops = np.zeros_like(params)
  for i, layer in enumerate(layers):
    for j, name in enumerate(space.op_names):
      if name in layer.ops:
        params[i, j], flops[i, j] = op_cost(layer, space.ops[name], space)
  fixed_params = fixed_flops = 0
  for layer in space.layers:
    if not layer.searchable:
      p, f = op_cost(layer, space.ops[layer.ops[0]], space)
      fixed_params += p
      fixed_flops += f
  return CostTables(space.searchable_names, space.op_names, params, flops, space.op_mask(),
                    fixed_params, fixed_flops)


def layer_costs(space: spaces.SearchSpace, op_names) -> list[dict]:
  """Per-layer rows (every layer, fixed ones included) of an architecture given by op names."""
  chosen = dict(zip(space.searchable_names, op_names))
  rows = []
  for layer in space.layers:
    op = chosen.get(layer.name, layer.ops[0])
    p, f = op_cost(layer, space.ops[op], space)
    rows.append(dict(layer=layer.name, op=op, in_channels=layer.in_channels,
                     out_channels=layer.out_channels, stride=layer.stride,
                     resolution=layer.in_resolution, params=p, flops=f,
                     searchable=layer.searchable))
  return rows
