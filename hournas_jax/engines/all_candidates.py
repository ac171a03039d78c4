"""Whole-network programs: every candidate at once (the HourNAS-I / FBNet ablation), or a fixed
network.

Each SuperBlock outputs the sum of its candidates weighted by the relaxed sample A (FBNet's
Gumbel-softmax weights), so every candidate's weights move every step. With one op per layer
(`supernet.fixed_layer_ops`) and `base.Choice.none` it is the fixed network, compiled as one
program (the reference of `benchmarks/supernet_step.py`; retraining has its own recipe in
`retrain.py`).

State has the layout of every engine (`base.EngineState`, {layer: {op: tree}}), so one
checkpoint format serves them all.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hournas_jax import optim
from hournas_jax.engines import base


class AllCandidatesEngine(base.SuperNetEngine):
  """The engine interface (`base.Engine`) over every candidate, weighted by A."""

  runs = 'all'

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self._train = jax.jit(self._train_step)
    self._grads = jax.jit(self._arch_grads)
    self._loss_only = jax.jit(self._path_loss)
    self.logits = jax.jit(self._logits)

  # ----- The engine interface (base.Engine).

  def train_step(self, state, batch, choice: base.Choice, lr):
    """One SGD step of every candidate. Returns (state, metrics)."""
    return self._train(state, batch['image'], batch['label'], lr, self._relaxed(choice))

  def arch_grads(self, state, batch, choice: base.Choice):
    """(state with new BatchNorm statistics, metrics, d loss / d A [L, O]); weights stay."""
    state, metrics, grads = self._grads(state, batch['image'], batch['label'],
                                        self._relaxed(choice))
    cols = base.columns(self.space, choice.layers)
    num_ops = len(self.space.op_names)
    grad_a = jnp.stack([jnp.zeros(num_ops).at[jnp.asarray(cols[n])].set(grads[n])
                        for n in choice.layers]) if choice.layers else jnp.zeros((0, num_ops))
    return state, metrics, grad_a

  def path_loss(self, state, batch, choice: base.Choice):
    """(state with new BatchNorm statistics, metrics) of the weighted network, forward only."""
    return self._loss_only(state, batch['image'], batch['label'], self._relaxed(choice))

  def _relaxed(self, choice: base.Choice):
    """{layer: weights over the layer's candidates, in its own op order} from A [L, O]; None
    for a fixed network."""
    if not choice.layers:
      return None
    cols = base.columns(self.space, choice.layers)
    return {n: choice.a[i, jnp.asarray(cols[n])] for i, n in enumerate(choice.layers)}

  # ----- Programs.

  def _loss(self, params, stats, images, labels, weights):
    logits, updated = self.net.apply(
        {'params': params, 'batch_stats': stats}, images, weights=weights, train=True,
        mutable=['batch_stats'])
    loss = optim.cross_entropy(logits, labels, self.label_smoothing)
    return loss, (base.step_metrics(loss, logits, labels), updated['batch_stats'])

  def _train_step(self, state, images, labels, lr, weights):
    grads, (metrics, stats) = jax.grad(self._loss, has_aux=True)(
        state['params'], state['batch_stats'], images, labels, weights)
    params, opt = {}, {}
    for layer in state['params']:
      params[layer], opt[layer] = optim.sgd_update_parts(
          self.direction, state['params'][layer], state['opt_state'][layer], grads[layer], lr)
    return {'params': params, 'batch_stats': stats, 'opt_state': opt}, metrics

  def _arch_grads(self, state, images, labels, weights):
    loss_w = lambda w: self._loss(state['params'], state['batch_stats'], images, labels, w)
    grads, (metrics, stats) = jax.grad(loss_w, has_aux=True)(weights)
    return {**state, 'batch_stats': stats}, metrics, grads

  def _path_loss(self, state, images, labels, weights):
    _, (metrics, stats) = self._loss(state['params'], state['batch_stats'], images, labels,
                                     weights)
    return {**state, 'batch_stats': stats}, metrics

  def _logits(self, state, images, weights=None):
    return self.net.apply({'params': state['params'], 'batch_stats': state['batch_stats']},
                          images, weights=weights, train=False)
