"""Losses and the weight optimiser shared by the single-path and whole-network engines.

The weights' SGD is split into a direction (optax: weight decay, then momentum) and a learning
rate passed in at every step, so the schedule lives outside the compiled programs and the
optimizer state of each candidate is a separate sub-tree: a candidate that was not sampled in a
step keeps its weights and momentum exactly (no decay or momentum drift), as PyTorch's
implementations do by skipping parameters that got no gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax


def weight_direction(momentum: float = 0.9, weight_decay: float = 4e-5, nesterov: bool = False):
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.trace(decay=momentum, nesterov=nesterov))


def sgd_update(direction: optax.GradientTransformation, params, opt_state, grads, lr):
  updates, opt_state = direction.update(grads, opt_state, params)
  params = jax.tree.map(lambda p, u: p - lr * u, params, updates)
  return params, opt_state


def sgd_update_parts(direction, params, opt_state, grads, lr):
  """`sgd_update` of every part of a {key: tree} dict (a candidate's op and shared kernels),
  each with its own optimizer state, as `init_candidate_states` lays them out."""
  new_params, new_state = {}, {}
  for key in params:
    new_params[key], new_state[key] = sgd_update(direction, params[key], opt_state[key],
                                                 grads[key], lr)
  return new_params, new_state


def candidate_state_shapes(direction, params):
  """The structure of `init_candidate_states` as jax.ShapeDtypeStruct leaves."""
  return jax.eval_shape(lambda params: {layer: {op: direction.init(p) for op, p in ops.items()}
                                        for layer, ops in params.items()}, params)


def init_candidate_states(direction, params):
  """Optimizer state per candidate: {layer: {op: state}}, mirroring the variables.

  The weight direction's state (momentum) starts at zero; building it with numpy from the
  shapes avoids one eager device op per leaf (thousands in a SuperNet).
  """
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                      candidate_state_shapes(direction, params))


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
  num_classes = logits.shape[-1]
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets).mean()


def correct_topk(logits, labels, k: int = 1):
  """Number of examples whose label is among the k highest logits."""
  topk = jax.lax.top_k(logits, k)[1]
  return jnp.sum(jnp.any(topk == labels[:, None], axis=-1))


def init_train_state(net, direction, seed: int, image_shape) -> dict:
  """{'params', 'batch_stats', 'opt_state'} of a SuperNet, each {layer: {op: tree}}."""
  variables = net.init_all(seed, image_shape)
  params = variables['params']
  return {'params': params, 'batch_stats': variables['batch_stats'],
          'opt_state': init_candidate_states(direction, params)}


def train_state_shapes(net, direction, image_shape) -> dict:
  """The structure of `init_train_state` as jax.ShapeDtypeStruct leaves."""
  variables = net.variable_shapes(image_shape)
  params = variables['params']
  return {'params': params, 'batch_stats': variables['batch_stats'],
          'opt_state': candidate_state_shapes(direction, params)}
