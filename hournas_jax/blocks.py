"""The building blocks of every space, as Flax linen modules.

Modules are frozen dataclasses, so a block is hashable by its configuration: the single-path
engine compiles one program per distinct (block, input shape) and reuses it across layers.
Convolutions pad symmetrically by k // 2 (PyTorch style), so a stride-s layer maps H to
ceil(H / s), as the cost tables assume.
"""

from __future__ import annotations

import zlib

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from hournas_jax import costs, spaces

# BatchNorm as in PyTorch's mobile networks: running statistics move 10% a step.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
# He initialisation over fan-out for convs and N(0, 0.01) for the classifier, as PyTorch's
# mobile networks do. `initial_value` draws the same distributions with numpy (see there).
_CONV_GAIN = 2.0
_DENSE_STD = 0.01
_conv_init = nn.initializers.variance_scaling(_CONV_GAIN, 'fan_out', 'normal')
_dense_init = nn.initializers.normal(_DENSE_STD)


def activation(name: str):
  return {'relu': nn.relu, 'swish': nn.swish}[name]


def _bn(train: bool, name=None):
  return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                      name=name)


def _conv(features, kernel, stride=1, groups=1, bias=False, name=None):
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), feature_group_count=groups, use_bias=bias,
                 kernel_init=_conv_init, name=name)


def channel_shuffle(x, groups: int):
  """ShuffleNet's shuffle, so grouped 1x1 convs exchange information (FBNet's g2 ops)."""
  n, h, w, c = x.shape
  return x.reshape(n, h, w, groups, c // groups).swapaxes(3, 4).reshape(n, h, w, c)


class ConvBN(nn.Module):
  """k x k conv + BN + activation: the stem."""
  out_channels: int
  kernel: int
  stride: int
  act: str

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = _conv(self.out_channels, self.kernel, self.stride)(x)
    return activation(self.act)(_bn(train)(x))


class SepConv(nn.Module):
  """MnasNet's first layer: depthwise k x k + BN + act, pointwise 1x1 + BN, no residual."""
  in_channels: int
  out_channels: int
  kernel: int
  stride: int
  act: str

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = _conv(self.in_channels, self.kernel, self.stride, groups=self.in_channels)(x)
    x = activation(self.act)(_bn(train)(x))
    return _bn(train)(_conv(self.out_channels, 1)(x))


class InvertedResidual(nn.Module):
  """1x1 expansion (grouped + shuffle for g2), k x k depthwise, optional SE, 1x1 projection.

  The residual is added when the block keeps its input's shape.
  """
  in_channels: int
  out_channels: int
  kernel: int
  expansion: int
  groups: int
  stride: int
  se_channels: int  # 0: no squeeze-and-excitation
  act: str

  @nn.compact
  def __call__(self, x, train: bool = True):
    act = activation(self.act)
    mid = self.in_channels * self.expansion
    h = act(_bn(train)(_conv(mid, 1, groups=self.groups)(x)))
    if self.groups > 1:
      h = channel_shuffle(h, self.groups)
    h = act(_bn(train)(_conv(mid, self.kernel, self.stride, groups=mid)(h)))
    if self.se_channels:
      s = jnp.mean(h, axis=(1, 2), keepdims=True)
      s = act(_conv(self.se_channels, 1, bias=True)(s))
      h = h * nn.sigmoid(_conv(mid, 1, bias=True)(s))
    h = _bn(train)(_conv(self.out_channels, 1, groups=self.groups)(h))
    if self.stride == 1 and self.in_channels == self.out_channels:
      h = h + x
    return h


class Skip(nn.Module):
  """The identity op of a SuperBlock that keeps its shape."""

  @nn.compact
  def __call__(self, x, train: bool = True):
    return x


class Head(nn.Module):
  """1x1 conv + BN + act, global average pooling, dropout, classifier."""
  out_channels: int
  num_classes: int
  act: str
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = activation(self.act)(_bn(train)(_conv(self.out_channels, 1)(x)))
    x = jnp.mean(x, axis=(1, 2))
    if self.dropout_rate:
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes, kernel_init=_dense_init)(x)


def make_block(space: spaces.SearchSpace, layer: spaces.LayerSpec, op_name: str,
               dropout_rate: float = 0.0, name: str | None = None) -> nn.Module:
  """The module of `op_name` placed in `layer`."""
  op = space.ops[op_name]
  act = space.activation
  if op.kind == 'skip':
    return Skip(name=name)
  if op.kind == 'conv':
    return ConvBN(layer.out_channels, op.kernel, layer.stride, act, name=name)
  if op.kind == 'sep':
    return SepConv(layer.in_channels, layer.out_channels, op.kernel, layer.stride, act,
                   name=name)
  if op.kind == 'head':
    return Head(layer.out_channels, space.num_classes, act, dropout_rate, name=name)
  se = costs.se_channels(layer.in_channels, space.se_ratio) if op.se else 0
  return InvertedResidual(layer.in_channels, layer.out_channels, op.kernel, op.expansion,
                          op.groups, layer.stride, se, act, name=name)


def initial_value(seed: int, path: str, shape, dtype):
  """The initial value of one variable, named by its path in the variables tree.

  Matches the modules' initialisers: conv kernels (rank 4, HWIO) N(0, 2 / fan_out) with
  fan_out = kh * kw * O, classifier kernels (rank 2) N(0, 0.01^2), BatchNorm scales and running
  variances 1, biases and running means 0. Each variable gets its own stream, seeded by (seed,
  path), so values do not depend on the order of initialisation.
  """
  name = path.rsplit("'", 2)[-2] if "'" in path else path
  if name in ('scale', 'var'):
    return np.ones(shape, dtype)
  if name in ('bias', 'mean'):
    return np.zeros(shape, dtype)
  rng = np.random.default_rng([seed, zlib.crc32(path.encode())])
  if name == 'kernel' and len(shape) == 4:
    std = np.sqrt(_CONV_GAIN / (shape[0] * shape[1] * shape[3]))
  elif name == 'kernel' and len(shape) == 2:
    std = _DENSE_STD
  else:
    raise ValueError(f'no initial value rule for variable {path} of shape {shape}')
  return (rng.standard_normal(shape) * std).astype(dtype)
