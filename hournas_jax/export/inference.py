"""The inference function every format is made from: BatchNorm folded, weights baked in.

`fold_batchnorm` folds each BatchNorm's running statistics into the conv before it (a pure
function of the variables); `folded_batchnorm` runs Flax modules on such variables, and, for
TFLite, every conv as one convolution; `inference_function` puts both together.
"""

from __future__ import annotations

import contextlib
import re
from typing import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from hournas_jax import blocks

_CONV_NAME = re.compile(r'^Conv_(\d+)$')
_BN_NAME = re.compile(r'^BatchNorm_(\d+)$')


def _numbered(names, pattern) -> list[str]:
  found = [(int(m.group(1)), n) for n in names if (m := pattern.match(n))]
  return [n for _, n in sorted(found)]


def has_batchnorm(variables) -> bool:
  """Whether `variables` hold BatchNorm running statistics (something to fold)."""
  return bool(jax.tree.leaves(variables.get('batch_stats', {}))) if isinstance(
      variables, Mapping) else False


def fold_batchnorm(variables, epsilon: float = blocks.BN_EPSILON):
  """Variables with every BatchNorm folded into the conv before it (a pure function).

  In each module scope the BatchNorms (BatchNorm_0, _1, ...) pair in order with the convs that
  have no bias (Conv_i without 'bias'; the squeeze-and-excitation convs have one and are never
  followed by a BatchNorm): the blocks of `blocks.py` call each such conv right before its
  BatchNorm. With s = scale / sqrt(var + epsilon), the conv's kernel becomes kernel * s (over
  its output channels) and it gets the bias `bias - mean * s`; the BatchNorm's params and
  statistics are dropped, so the result has no 'batch_stats'. Apply the result within
  `folded_batchnorm()`, where a BatchNorm without variables is the identity and a bias-free
  conv adds the bias it was given.

  Args:
    variables: Flax variables {'params': ..., 'batch_stats': ...}; returned as they are when
      they hold no BatchNorm statistics.
    epsilon: the BatchNorms' epsilon.

  Returns:
    The folded variables: 'params' (kernels [..., C_out] scaled, new biases [C_out]) and any
    collection other than 'batch_stats'.

  Raises:
    ValueError: a scope's BatchNorms do not pair with its convs (e.g. a weight-sharing
      SuperNet's candidates, whose kernels live in another scope).
  """
  if not has_batchnorm(variables):
    return variables
  params = variables.get('params', {})
  stats = variables['batch_stats']

  def walk(p: Mapping, s: Mapping, path: str):
    bns = _numbered([k for k in p if isinstance(p[k], Mapping)], _BN_NAME)
    convs = [k for k in _numbered([k for k in p if isinstance(p[k], Mapping)], _CONV_NAME)
             if 'kernel' in p[k] and 'bias' not in p[k]]
    if len(bns) != len(convs):
      raise ValueError(f'cannot fold the BatchNorms at {path or "/"}: {len(bns)} BatchNorms '
                       f'and {len(convs)} bias-free convs ({", ".join(convs) or "none"})')
    pairs = dict(zip(convs, bns))
    out = {}
    for key, value in p.items():
      if key in bns:
        continue
      if key in pairs:
        out[key] = _folded_conv(value, p[pairs[key]], s.get(pairs[key]),
                                f'{path}/{pairs[key]}', f'{path}/{key}', epsilon)
      elif isinstance(value, Mapping):
        out[key] = walk(value, s.get(key, {}) if isinstance(s, Mapping) else {},
                        f'{path}/{key}')
      else:
        out[key] = value
    return out

  folded = {k: v for k, v in variables.items() if k not in ('params', 'batch_stats')}
  folded['params'] = walk(params, stats, '')
  return folded


def _folded_conv(conv: Mapping, bn_params: Mapping, bn_stats, bn_path: str, conv_path: str,
                 epsilon: float) -> dict:
  """A conv's params with the BatchNorm after it folded in (see `fold_batchnorm`)."""
  if not isinstance(bn_stats, Mapping) or 'mean' not in bn_stats or 'var' not in bn_stats:
    raise ValueError(f'no running statistics for {bn_path}')
  kernel = jnp.asarray(conv['kernel'])
  mean, var = jnp.asarray(bn_stats['mean']), jnp.asarray(bn_stats['var'])
  scale = jnp.asarray(bn_params.get('scale', jnp.ones_like(mean)))
  bias = jnp.asarray(bn_params.get('bias', jnp.zeros_like(mean)))
  if kernel.shape[-1] != mean.shape[-1]:
    raise ValueError(f'cannot fold {bn_path} ({mean.shape[-1]} channels) into '
                     f'{conv_path} ({kernel.shape[-1]} output channels)')
  factor = scale * jax.lax.rsqrt(var + epsilon)
  return {**conv, 'kernel': (kernel * factor).astype(kernel.dtype),
          'bias': (bias - mean * factor).astype(kernel.dtype)}


def _interceptor(lax_convs: bool):
  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != '__call__':
      return next_fun(*args, **kwargs)
    if isinstance(module, nn.BatchNorm) and not module.has_variable('batch_stats', 'mean'):
      return args[0]  # folded into the conv before it
    if lax_convs and isinstance(module, blocks.Conv) and module.has_variable('params', 'kernel'):
      return _lax_conv(module, args[0])
    if getattr(module, 'use_bias', None) is False and module.has_variable('params', 'bias'):
      y = next_fun(*args, **kwargs)
      return y + module.get_variable('params', 'bias').astype(y.dtype)
    return next_fun(*args, **kwargs)

  return intercept


def _lax_conv(module: blocks.Conv, x):
  """`blocks.Conv` as one lax.conv_general_dilated, 1x1 and depthwise convs included."""
  kernel = module.get_variable('params', 'kernel').astype(x.dtype)
  pad = module.kernel // 2
  y = jax.lax.conv_general_dilated(
      x, kernel, (module.stride, module.stride), ((pad, pad), (pad, pad)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=module.groups)
  if module.has_variable('params', 'bias'):
    y = y + module.get_variable('params', 'bias').astype(y.dtype)
  return y


@contextlib.contextmanager
def folded_batchnorm(lax_convs: bool = False):
  """Within the block, Flax modules run on `fold_batchnorm`'s variables.

  A BatchNorm whose statistics were folded away is the identity, and a conv (use_bias=False)
  with a folded bias adds it. Modules with their own variables run as usual, so this is
  harmless elsewhere.

  Args:
    lax_convs: every `blocks.Conv` runs as one convolution, not as the matmul (1x1) or shifted
      multiply-adds (depthwise) `blocks.conv2d` picks for XLA:CPU: what the TFLite converter
      maps to CONV_2D / DEPTHWISE_CONV_2D (its legalization of a 4-D matmul over 1x1 feature
      maps fails: "'tfl.batch_matmul' op found invalid output rank").

  Yields:
    Nothing; the interception holds until the block ends.
  """
  with nn.intercept_methods(_interceptor(lax_convs)):
    yield


def inference_function(apply_fn: Callable, variables, *, fold: bool = True,
                       for_tflite: bool = False) -> Callable:
  """x -> apply_fn(variables, x) with the variables baked in (constants once traced).

  Args:
    apply_fn: (variables, x [N, H, W, C]) -> logits [N, classes] (or a block's output), in
      inference mode.
    variables: its variables.
    fold: fold BatchNorm into the preceding convs first (when the variables have any).
    for_tflite: convs as convolutions (see `folded_batchnorm`), depthwise ones included.

  Returns:
    fn(x [N, H, W, C]) -> apply_fn's output for x.
  """
  if fold and has_batchnorm(variables):
    variables = fold_batchnorm(variables)
  variables = jax.tree.map(jnp.asarray, variables)
  depthwise = 'conv' if for_tflite else 'auto'

  def fn(x):
    with folded_batchnorm(lax_convs=for_tflite), blocks.depthwise_implementation(depthwise):
      return apply_fn(variables, x)

  return fn
