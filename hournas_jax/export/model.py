"""The model an export is made of: a fixed-architecture network, its inputs and reference logits.

`network_model` builds the `Model` of an architecture (trained variables, or fresh weights with
BatchNorm statistics of calibration inputs, `batchnorm_statistics`); `random_inputs` draws the
inputs used when there is no dataset; `reference_logits` are the JAX model's logits every
export is compared with.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hournas_jax import blocks, supernet
from hournas_jax.export import base

CALIBRATION_SEED = 1  # random calibration inputs; the compared ones are drawn with seed 0


def network_model(space, ops: Sequence[str], variables=None, *,
                  image_shape: Sequence[int] | None = None, seed: int = 0,
                  calibration=None, info: Mapping | None = None) -> base.Model:
  """The fixed network of `ops` in `space`.

  Fresh weights need `calibration` to mean anything in inference mode: with the initial
  statistics (mean 0, variance 1) no layer is normalized, the activations shrink layer by
  layer and every input gets nearly the same logits (~1e-8 for HourNAS-A), so neither
  differences nor top-1 agreement would say much.

  Args:
    space: the search space.
    ops: one op per layer of the space.
    variables: trained variables; None: fresh weights (`SuperNet.init_all(seed)`).
    image_shape: the input (H, W, C); default the space's resolution, 3 channels.
    seed: the seed of fresh weights.
    calibration: inputs [N, H, W, C] whose batch statistics become the BatchNorms' running
      statistics (`batchnorm_statistics`); None keeps the variables' own.
    info: fields added to the model's description.

  Returns:
    The Model: inference apply, its variables, image_shape and description.
  """
  net = supernet.SuperNet(space, supernet.fixed_layer_ops(space, tuple(ops)))
  image_shape = tuple(int(d) for d in (image_shape or (space.resolution, space.resolution, 3)))
  if variables is None:
    variables = net.init_all(int(seed), image_shape)
  variables = {k: v for k, v in variables.items() if k in ('params', 'batch_stats')}
  description = {'space': space.name, 'width': space.width, 'num_classes': space.num_classes,
                 'stem_stride': space.stem_stride, 'ops': list(ops), **(info or {})}
  if calibration is not None:
    variables = batchnorm_statistics(net, variables, calibration)
    description['batchnorm_statistics'] = f'of {len(calibration)} calibration inputs'
  return base.Model(lambda v, x: net.apply(v, x, train=False), variables, image_shape,
                    description)


def batchnorm_statistics(module, variables, x, momentum: float = blocks.BN_MOMENTUM):
  """`variables` with every BatchNorm's running statistics set to batch statistics of x.

  One training-mode pass over x, each BatchNorm seeing its input with the layers before it
  normalized by their own batch statistics: inference on x then equals training mode on x.

  Args:
    module: a Flax module whose apply takes (variables, x, train=...).
    variables: its variables, with 'batch_stats'.
    x: inputs [N, H, W, C].
    momentum: the BatchNorms' momentum.

  Returns:
    The variables with new 'batch_stats' (host numpy).
  """
  # Training mode ignores the running statistics and moves them to momentum * old +
  # (1 - momentum) * batch: from old = 0 that is the batch's, scaled, at full precision.
  zeros = jax.tree.map(jnp.zeros_like, variables['batch_stats'])
  _, updated = module.apply({**variables, 'batch_stats': zeros}, jnp.asarray(x, jnp.float32),
                            train=True, mutable=['batch_stats'])
  stats = jax.tree.map(lambda new: new / (1.0 - momentum), updated['batch_stats'])
  stats = jax.tree_util.tree_map_with_path(
      lambda path, v: jnp.maximum(v, 0.0) if jax.tree_util.keystr(path).endswith("'var']")
      else v, stats)
  return {**variables, 'batch_stats': jax.tree.map(np.asarray, stats)}


def random_inputs(image_shape: Sequence[int], count: int, seed: int) -> np.ndarray:
  """count standard normal inputs [count, H, W, C] float32 (the datasets' inputs are
  standardized the same way)."""
  return np.random.default_rng(seed).standard_normal(
      (int(count), *image_shape)).astype(np.float32)


def reference_logits(model: base.Model, x, batch_size: int = 64) -> np.ndarray:
  """The JAX model's logits.

  Args:
    model: the model, as trained (BatchNorm not folded).
    x: inputs [N, H, W, C].
    batch_size: inputs per call.

  Returns:
    Logits [N, classes].
  """
  apply = jax.jit(model.apply_fn)
  return np.concatenate([np.asarray(apply(model.variables, jnp.asarray(x[i:i + batch_size])))
                         for i in range(0, len(x), batch_size)])
