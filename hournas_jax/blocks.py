"""The building blocks of every space, as Flax linen modules.

Modules are frozen dataclasses, so a block is hashable by its configuration: the single-path
engine compiles one program per distinct (block, input shape) and reuses it across layers.
Convolutions pad symmetrically by k // 2 (PyTorch style), so a stride-s layer maps H to
ceil(H / s), as the cost tables assume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import zlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hournas_jax import op_kinds, spaces

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


# Residual branches start switched off: the last BatchNorm of an inverted residual that adds
# its input starts with scale 0, so every residual block is the identity at initialisation
# (Goyal et al. 2017, "zero-init residual"), and the signal reaches the classifier through the
# shortcuts from the first step. The narrow networks of the CPU-sized spaces otherwise sit on
# the initial loss plateau for a seed-dependent while. Quickstart recipe, random architectures
# x 3 seeds: at 40 epochs seed std 3.92 -> 0.90 points, mean top-1 92.0% -> 96.9%; cut to 5
# epochs, mean 55.3% -> 71.8% and the lowest run 38.1% -> 59.4% (README, Search quality).
ZERO_INIT_RESIDUAL = True
# The BatchNorm that follows an inverted residual's projection (its third).
PROJECTION_BATCHNORM = 'BatchNorm_2'


def _bn(train: bool, name=None, dtype=None, zero_scale: bool = False):
  # dtype: the output's (bfloat16 under mixed precision); the statistics are reduced in
  # float32 and kept in float32 whatever it is.
  scale_init = nn.initializers.zeros_init() if zero_scale else nn.initializers.ones_init()
  return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                      dtype=dtype, scale_init=scale_init, name=name)


def compute_dtype(precision: str):
  """The activations' dtype of a precision setting: None (float32 throughout, no casts) for
  'float32', bfloat16 for 'bfloat16' (parameters, BatchNorm statistics and optimizer states
  stay float32; convolutions and matmuls run in bfloat16)."""
  if precision not in PRECISIONS:
    raise ValueError(f'precision must be one of {", ".join(PRECISIONS)}, got {precision!r}')
  return None if precision == 'float32' else jnp.bfloat16


PRECISIONS = ('float32', 'bfloat16')


def depthwise_shifted(x, kernel, stride: int):
  """A depthwise k x k conv (SAME padding by k // 2) as k * k shifted multiply-adds.

  Equal to `lax.conv_general_dilated` with feature_group_count = channels, but on XLA:CPU its
  forward and backward are 5-20x faster (a depthwise conv's gradient takes a slow generic path
  there; measured in docs/cpu-performance.md), and everything here is elementwise.
  x [N, H, W, C], kernel [k, k, 1, C].
  """
  k = kernel.shape[0]
  pad = k // 2
  n, h, w, c = x.shape
  out_h, out_w = -(-h // stride), -(-w // stride)
  padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out = None
  for i in range(k):
    for j in range(k):
      window = jax.lax.slice(padded, (0, i, j, 0),
                             (n, i + stride * (out_h - 1) + 1, j + stride * (out_w - 1) + 1, c),
                             (1, stride, stride, 1))
      term = window * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


DEPTHWISE_IMPLS = ('auto', 'conv', 'shift')
_depthwise_default = ['auto']


@contextlib.contextmanager
def depthwise_implementation(impl: str):
  """Within the block, convs traced with depthwise_impl='auto' use `impl`. For analyses that
  need XLA's own convolution (its cost analysis skips padding taps; shifted multiply-adds
  count every tap); the numbers computed are the same either way."""
  if impl not in DEPTHWISE_IMPLS:
    raise ValueError(f'depthwise implementation must be one of {DEPTHWISE_IMPLS}, got {impl!r}')
  _depthwise_default.append(impl)
  try:
    yield
  finally:
    _depthwise_default.pop()


def resolve_depthwise(impl: str) -> str:
  """'auto' is 'shift' on the CPU and 'conv' (cuDNN, the TPU's conv units) elsewhere."""
  if impl == 'auto':
    impl = _depthwise_default[-1]
  if impl == 'auto':
    return 'shift' if jax.default_backend() == 'cpu' else 'conv'
  if impl not in DEPTHWISE_IMPLS:
    raise ValueError(f'depthwise_impl must be one of {DEPTHWISE_IMPLS}, got {impl!r}')
  return impl


class Conv(nn.Module):
  """A k x k conv with PyTorch-style padding (k // 2 on each side), HWIO kernel.

  Named `Conv` with `kernel`/`bias` parameters, so variables are laid out exactly as
  `flax.linen.Conv`'s (Conv_0, Conv_1, ...). Depthwise convs run as shifted multiply-adds
  where that is faster (see `depthwise_shifted`).
  """
  features: int
  kernel: int
  stride: int = 1
  groups: int = 1
  use_bias: bool = False
  depthwise_impl: str = 'auto'
  frozen: bool = False  # the kernel keeps its initial value: no gradient reaches it

  @nn.compact
  def __call__(self, x):
    cin = x.shape[-1]
    kernel = self.param('kernel', _conv_init,
                        (self.kernel, self.kernel, cin // self.groups, self.features))
    if self.frozen:
      kernel = jax.lax.stop_gradient(kernel)
    y = conv2d(x, kernel, self.stride, self.groups, self.depthwise_impl)
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros_init(), (self.features,)).astype(y.dtype)
    return y


def conv2d(x, kernel, stride: int = 1, groups: int = 1, depthwise_impl: str = 'auto'):
  """x [N, H, W, C] conv kernel [k, k, C / groups, O], padding k // 2 on each side."""
  kernel = kernel.astype(x.dtype)
  k, cin, features = kernel.shape[0], x.shape[-1], kernel.shape[-1]
  if k == 1 and stride == 1 and groups == 1:
    # A matmul over the channels: the same numbers, and 3-4x faster than XLA:CPU's 1x1 conv
    # (forward and backward); on accelerators both lower to the same matrix units.
    return jnp.einsum('...c,cd->...d', x, kernel[0, 0])
  if groups == cin == features and k > 1 and resolve_depthwise(depthwise_impl) == 'shift':
    return depthwise_shifted(x, kernel, stride)
  pad = k // 2
  return jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=groups)


def _conv(features, kernel, stride=1, groups=1, bias=False, name=None, frozen=False):
  return Conv(features, kernel, stride, groups, bias, name=name, frozen=frozen)


def channel_shuffle(x, groups: int):
  """ShuffleNet's shuffle, so grouped 1x1 convs exchange information (FBNet's g2 ops)."""
  n, h, w, c = x.shape
  return x.reshape(n, h, w, groups, c // groups).swapaxes(3, 4).reshape(n, h, w, c)


class ConvBN(nn.Module):
  """k x k conv + BN + activation: the stem (where mixed precision casts the images)."""
  out_channels: int
  kernel: int
  stride: int
  act: str
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = True):
    if self.dtype is not None:
      x = x.astype(self.dtype)
    x = _conv(self.out_channels, self.kernel, self.stride)(x)
    return activation(self.act)(_bn(train, dtype=self.dtype)(x))


class SepConv(nn.Module):
  """MnasNet's first layer: depthwise k x k + BN + act, pointwise 1x1 + BN, no residual."""
  in_channels: int
  out_channels: int
  kernel: int
  stride: int
  act: str
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = _conv(self.in_channels, self.kernel, self.stride, groups=self.in_channels)(x)
    x = activation(self.act)(_bn(train, dtype=self.dtype)(x))
    return _bn(train, dtype=self.dtype)(_conv(self.out_channels, 1)(x))


class InvertedResidual(nn.Module):
  """1x1 expansion (grouped + shuffle for g2), k x k depthwise, optional SE, 1x1 projection.

  The residual is added when the block keeps its input's shape and `shortcut` is set.
  frozen_kernels: every conv kernel stays at its random initial value (BatchNorms and SE biases
  still train): a decoy twin of the op (`decoys.py`), which costs what the op costs but cannot
  learn features; shortcut=False makes the twin that cannot fall back to the identity.
  """
  in_channels: int
  out_channels: int
  kernel: int
  expansion: int
  groups: int
  stride: int
  se_channels: int  # 0: no squeeze-and-excitation
  act: str
  dtype: Any = None
  frozen_kernels: bool = False
  shortcut: bool = True

  @nn.compact
  def __call__(self, x, train: bool = True, kernels=None):
    """kernels: None, or the layer's shared kernels (`SharedKernels`): this op then runs on
    their nested slices (`nested_kernels`) and only owns its BatchNorms and SE."""
    act = activation(self.act)
    mid = self.in_channels * self.expansion
    frozen = self.frozen_kernels
    if kernels is None:
      expand = lambda h: _conv(mid, 1, groups=self.groups, frozen=frozen)(h)
      depthwise = lambda h: _conv(mid, self.kernel, self.stride, groups=mid, frozen=frozen)(h)
      project = lambda h: _conv(self.out_channels, 1, groups=self.groups, frozen=frozen)(h)
    else:
      if self.groups > 1 or frozen:
        raise ValueError('grouped ops and decoys keep their own weights; they cannot share '
                         'kernels')
      sliced = nested_kernels(kernels, self.kernel, mid)
      expand = lambda h: conv2d(h, sliced['expand'])
      depthwise = lambda h: conv2d(h, sliced['depthwise'], self.stride, groups=mid)
      project = lambda h: conv2d(h, sliced['project'])
    bn = lambda: _bn(train, dtype=self.dtype)
    h = act(bn()(expand(x)))
    if self.groups > 1:
      h = channel_shuffle(h, self.groups)
    h = act(bn()(depthwise(h)))
    if self.se_channels:
      s = jnp.mean(h, axis=(1, 2), keepdims=True)
      s = act(_conv(self.se_channels, 1, bias=True, frozen=frozen)(s))
      h = h * nn.sigmoid(_conv(mid, 1, bias=True, frozen=frozen)(s))
    residual = self.shortcut and self.stride == 1 and self.in_channels == self.out_channels
    h = _bn(train, dtype=self.dtype, zero_scale=residual and ZERO_INIT_RESIDUAL)(project(h))
    return h + x if residual else h


class _Kernel(nn.Module):
  """One conv kernel as a parameter named 'kernel' (so `initial_value` knows its rule)."""
  shape: tuple[int, ...]

  @nn.compact
  def __call__(self):
    return self.param('kernel', _conv_init, self.shape)


class SharedKernels(nn.Module):
  """The conv kernels a layer's candidates share (weight sharing, search.weight_sharing).

  One inverted residual at the layer's largest kernel and expansion; a candidate (k, e) uses
  the centre k x k of the depthwise kernel and the first in_channels * e channels of all three
  (`nested_kernels`), as superkernel and once-for-all SuperNets do, so every candidate of the
  layer computes features that mean the same thing to the next layer.
  """
  in_channels: int
  out_channels: int
  kernel: int
  expansion: int

  @nn.compact
  def __call__(self):
    mid = self.in_channels * self.expansion
    return {'expand': _Kernel((1, 1, self.in_channels, mid), name='expand')(),
            'depthwise': _Kernel((self.kernel, self.kernel, 1, mid), name='depthwise')(),
            'project': _Kernel((1, 1, mid, self.out_channels), name='project')()}


def nested_kernels(kernels, kernel: int, mid: int):
  """The slices of `SharedKernels` that a candidate with kernel size `kernel` and `mid`
  expanded channels uses: the centre of the depthwise kernel, the first `mid` channels."""
  full = kernels['depthwise'].shape[0]
  start = (full - kernel) // 2
  return {'expand': kernels['expand'][..., :mid],
          'depthwise': kernels['depthwise'][start:start + kernel, start:start + kernel, :, :mid],
          'project': kernels['project'][:, :, :mid, :]}


def shares_kernels(op: spaces.OpSpec) -> bool:
  """Ops that take part in weight sharing (`op_kinds.py`): ungrouped inverted residuals."""
  return op_kinds.kind(op).shares_kernels(op)


def shared_kernels(space: spaces.SearchSpace, layer: spaces.LayerSpec, ops: tuple[str, ...],
                   name: str | None = None) -> SharedKernels | None:
  """The `SharedKernels` of a layer holding `ops`, or None when none of them shares.

  Sized by every candidate the space allows in the layer, not only those held: a vital layer
  fixed to one op after stage 1 keeps the kernels stage 1 trained, at their shape.
  """
  if not any(shares_kernels(space.ops[o]) for o in ops):
    return None
  sharing = [space.ops[o] for o in layer.ops if shares_kernels(space.ops[o])]
  return SharedKernels(layer.in_channels, layer.out_channels,
                       max(o.kernel for o in sharing), max(o.expansion for o in sharing),
                       name=name)


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
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = activation(self.act)(_bn(train, dtype=self.dtype)(_conv(self.out_channels, 1)(x)))
    x = jnp.mean(x, axis=(1, 2))
    if self.dropout_rate:
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    logits = nn.Dense(self.num_classes, kernel_init=_dense_init, dtype=self.dtype)(x)
    return logits.astype(jnp.float32)  # the loss and its gradient in float32


# The Flax module classes that op kinds name (`op_kinds.OpKind.module`), by class name.
MODULES = {m.__name__: m for m in (Skip, ConvBN, SepConv, InvertedResidual, Head)}


def make_block(space: spaces.SearchSpace, layer: spaces.LayerSpec, op_name: str,
               dropout_rate: float = 0.0, name: str | None = None,
               dtype=None) -> nn.Module:
  """The module of `op_name` placed in `layer` (`op_kinds.py`); dtype: the activations'
  (`compute_dtype`)."""
  op = space.ops[op_name]
  kind = op_kinds.kind(op)
  module = MODULES[kind.module]
  args = kind.args(space, layer, op, dropout_rate)
  if 'dtype' in {f.name for f in dataclasses.fields(module)}:  # skip has no activations to cast
    args['dtype'] = dtype
  return module(**args, name=name)


def has_shortcut(space: spaces.SearchSpace, layer: spaces.LayerSpec, op_name: str) -> bool:
  """Whether `op_name` placed in `layer` adds its input to its output: the residual of an
  inverted residual that keeps its shape, and `skip`, which is nothing but the shortcut."""
  op = space.ops[op_name]
  return op_kinds.kind(op).shortcut(layer)


def zero_scale_batchnorm(space: spaces.SearchSpace, layer: spaces.LayerSpec,
                         op_name: str) -> str | None:
  """The name of the BatchNorm of `op_name` placed in `layer` whose scale starts at 0
  (`ZERO_INIT_RESIDUAL`), or None: the projection's BatchNorm of an inverted residual that
  adds its input."""
  op = space.ops[op_name]
  if (ZERO_INIT_RESIDUAL and MODULES[op_kinds.kind(op).module] is InvertedResidual
      and has_shortcut(space, layer, op_name)):
    return PROJECTION_BATCHNORM
  return None


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
