"""One place per op kind: which module a candidate of the kind is and with what arguments, what
it costs, whether its output adds its input, and whether it takes part in weight sharing.

An op's kind (`spaces.OpSpec.kind`) picks its entry in `KINDS`; a new kind of candidate is one
new entry here (and its Flax module in `blocks.py`). `costs.op_cost`, `blocks.make_block`,
`blocks.has_shortcut` and `blocks.shares_kernels` all read this table.

The table is data: it names each kind's module class and computes its constructor's arguments,
and `blocks.make_block` resolves the name to the class. `blocks` imports this module, so this
module never imports `blocks`.

Costs are (params, multiply-adds) for one image: parameters are every trainable value of the
kind's module (conv kernels, BatchNorm scales and biases, SE and classifier biases);
multiply-adds count convolutions and fully connected layers, the FBNet/MnasNet convention.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from hournas_jax import spaces


def se_channels(in_channels: int, se_ratio: float) -> int:
  """Squeeze-and-excitation width: a fraction of the block's input channels (MnasNet, EffNet)."""
  return max(1, int(in_channels * se_ratio))


@dataclasses.dataclass(frozen=True)
class OpKind:
  """What a kind of candidate is.

  cost(layer, op, space) -> (params, multiply-adds); module: the name of its Flax module class
  in `blocks.py`; args(space, layer, op, dropout_rate) -> that class's keyword arguments other
  than `name` and `dtype` (which `blocks.make_block` passes: the activations' dtype, None =
  float32, to modules that have the field); shortcut(layer): its output is input + residual;
  shares_kernels(op): it slices a layer's shared kernels under search.weight_sharing='nested'.
  """
  cost: Callable[[spaces.LayerSpec, spaces.OpSpec, spaces.SearchSpace], tuple[int, int]]
  module: str
  args: Callable[[spaces.SearchSpace, spaces.LayerSpec, spaces.OpSpec, float], dict[str, Any]]
  shortcut: Callable[[spaces.LayerSpec], bool] = lambda layer: False
  shares_kernels: Callable[[spaces.OpSpec], bool] = lambda op: False


# ----- skip: the identity of a SuperBlock that keeps its shape.

def _skip_cost(layer, op, space):  # pylint: disable=unused-argument
  return 0, 0


def _skip_args(space, layer, op, dropout_rate):  # pylint: disable=unused-argument
  return {}


# ----- conv: the stem, k x k conv + BatchNorm + activation.

def _conv_cost(layer, op, space):  # pylint: disable=unused-argument
  k, cin, cout = op.kernel, layer.in_channels, layer.out_channels
  return k * k * cin * cout + 2 * cout, k * k * cin * cout * layer.out_resolution ** 2


def _conv_args(space, layer, op, dropout_rate):  # pylint: disable=unused-argument
  return dict(out_channels=layer.out_channels, kernel=op.kernel, stride=layer.stride,
              act=space.activation)


# ----- sep: depthwise k x k + BN + act, pointwise 1x1 + BN.

def _sep_cost(layer, op, space):  # pylint: disable=unused-argument
  k, cin, cout = op.kernel, layer.in_channels, layer.out_channels
  hw_out = layer.out_resolution ** 2
  params = k * k * cin + 2 * cin + cin * cout + 2 * cout
  return params, k * k * cin * hw_out + cin * cout * hw_out


def _sep_args(space, layer, op, dropout_rate):  # pylint: disable=unused-argument
  return dict(in_channels=layer.in_channels, out_channels=layer.out_channels, kernel=op.kernel,
              stride=layer.stride, act=space.activation)


# ----- head: 1x1 conv + BN + act, global pool, (dropout,) classifier with bias.

def _head_cost(layer, op, space):  # pylint: disable=unused-argument
  cin, cout, classes = layer.in_channels, layer.out_channels, space.num_classes
  params = cin * cout + 2 * cout + cout * classes + classes
  return params, cin * cout * layer.in_resolution ** 2 + cout * classes


def _head_args(space, layer, op, dropout_rate):  # pylint: disable=unused-argument
  return dict(out_channels=layer.out_channels, num_classes=space.num_classes,
              act=space.activation, dropout_rate=dropout_rate)


# ----- ir: inverted residual, 1x1 expansion (grouped for g2), depthwise k x k, optional SE,
# 1x1 projection; the residual where the layer keeps its shape.

def _ir_cost(layer, op, space):
  cin, cout = layer.in_channels, layer.out_channels
  hw_in, hw_out = layer.in_resolution ** 2, layer.out_resolution ** 2
  mid, g, k = cin * op.expansion, op.groups, op.kernel
  params = cin * mid // g + 2 * mid  # 1x1 expansion + BN
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


def _ir_args(space, layer, op, dropout_rate):  # pylint: disable=unused-argument
  se = se_channels(layer.in_channels, space.se_ratio) if op.se else 0
  return dict(in_channels=layer.in_channels, out_channels=layer.out_channels, kernel=op.kernel,
              expansion=op.expansion, groups=op.groups, stride=layer.stride, se_channels=se,
              act=space.activation)


# ----- ir_decoy: an inverted residual whose conv kernels never leave their random initial values
# (`decoys.py`): the cost, the module and the shortcut of 'ir', so the cost model cannot tell it
# from its real twin; it shares no kernels, so weight sharing cannot hand it the real op's.

def _ir_decoy_args(space, layer, op, dropout_rate):
  return {**_ir_args(space, layer, op, dropout_rate), 'frozen_kernels': True}


# ----- ir_decoy_noshortcut: the same without the shortcut, so in a layer that keeps its shape it
# cannot act as a skip; the cost model does not count the shortcut's addition, so it still costs
# exactly what 'ir' costs.

def _ir_decoy_noshortcut_args(space, layer, op, dropout_rate):
  return {**_ir_decoy_args(space, layer, op, dropout_rate), 'shortcut': False}


KINDS = {
    'skip': OpKind(_skip_cost, 'Skip', _skip_args, shortcut=lambda layer: True),
    'conv': OpKind(_conv_cost, 'ConvBN', _conv_args),
    'sep': OpKind(_sep_cost, 'SepConv', _sep_args),
    'head': OpKind(_head_cost, 'Head', _head_args),
    # A grouped 1x1 conv is not a slice of a dense one, so g2 ops keep their own weights.
    'ir': OpKind(_ir_cost, 'InvertedResidual', _ir_args,
                 shortcut=lambda layer: layer.keeps_shape,
                 shares_kernels=lambda op: op.groups == 1),
    'ir_decoy': OpKind(_ir_cost, 'InvertedResidual', _ir_decoy_args,
                       shortcut=lambda layer: layer.keeps_shape),
    'ir_decoy_noshortcut': OpKind(_ir_cost, 'InvertedResidual', _ir_decoy_noshortcut_args),
}


def kind(op: spaces.OpSpec) -> OpKind:
  if op.kind not in KINDS:
    raise spaces.SpaceError(f'op {op.name!r} has kind {op.kind!r}; known kinds: '
                            f'{", ".join(KINDS)}')
  return KINDS[op.kind]
