"""Whole-network programs: a fixed architecture, or every candidate at once.

- Fixed network: `SuperNet` with one op per layer (`supernet.fixed_layer_ops`), compiled as one
  program. Retraining and evaluation of a searched architecture use it.
- All candidates: each SuperBlock outputs the sum of its candidates weighted by FBNet's
  Gumbel-softmax (the HourNAS-I / FBNet ablation). Every candidate's weights move every step.

State has the layout of `singlepath.SinglePathEngine` ({layer: {op: tree}}), so one checkpoint
format serves both.
"""

from __future__ import annotations

import jax

from hournas_jax import optim, spaces, supernet


class WholeNetEngine:

  def __init__(self, space: spaces.SearchSpace, ops, *, momentum: float = 0.9,
               weight_decay: float = 4e-5, nesterov: bool = False,
               label_smoothing: float = 0.0, dropout_rate: float = 0.0,
               weight_sharing: bool = False):
    self.space = space
    self.net = supernet.SuperNet(space, tuple(ops), dropout_rate=dropout_rate,
                                 weight_sharing=bool(weight_sharing))
    self.choice_layers = tuple(l.name for l, o in self.net.active_layers if len(o) > 1)
    self.direction = optim.weight_direction(momentum, weight_decay, nesterov)
    self.label_smoothing = label_smoothing
    self.train_step = jax.jit(self._train_step)
    self.arch_grads = jax.jit(self._arch_grads)
    self.logits = jax.jit(self._logits)

  def init(self, seed: int, image_shape) -> dict:
    return optim.init_train_state(self.net, self.direction, seed, image_shape)

  def state_shapes(self, image_shape) -> dict:
    """The state's structure as jax.ShapeDtypeStruct leaves, without computing it."""
    return optim.train_state_shapes(self.net, self.direction, image_shape)

  def _loss(self, params, stats, images, labels, weights, rng):
    logits, updated = self.net.apply(
        {'params': params, 'batch_stats': stats}, images, weights=weights, train=True,
        mutable=['batch_stats'], rngs={'dropout': rng} if rng is not None else None)
    loss = optim.cross_entropy(logits, labels, self.label_smoothing)
    metrics = {'loss': loss, 'accuracy': optim.correct_topk(logits, labels) / labels.shape[0]}
    return loss, (metrics, updated['batch_stats'])

  def _train_step(self, state, images, labels, lr, weights=None, rng=None):
    """One SGD step. weights: {layer: [n ops]} for all-ops mode, None for a fixed network."""
    grads, (metrics, stats) = jax.grad(self._loss, has_aux=True)(
        state['params'], state['batch_stats'], images, labels, weights, rng)
    params, opt = {}, {}
    for layer in state['params']:
      params[layer], opt[layer] = optim.sgd_update_parts(
          self.direction, state['params'][layer], state['opt_state'][layer], grads[layer], lr)
    return {'params': params, 'batch_stats': stats, 'opt_state': opt}, metrics

  def _arch_grads(self, state, images, labels, weights):
    """d loss / d weights for every choice layer (weights stay; BN statistics move)."""
    loss_w = lambda w: self._loss(state['params'], state['batch_stats'], images, labels, w,
                                  None)
    grads, (metrics, stats) = jax.grad(loss_w, has_aux=True)(weights)
    return {**state, 'batch_stats': stats}, metrics, grads

  def _logits(self, state, images, weights=None):
    return self.net.apply({'params': state['params'], 'batch_stats': state['batch_stats']},
                          images, weights=weights, train=False)

