"""The device-resident single-path engine: one compiled program per step, `lax.switch` per layer.

Each SuperBlock with several candidates becomes a `lax.switch` over them, selected by the
sampled op index, which stays on the device: a search step neither reads the path back to the
host nor dispatches one program per layer, and XLA sees the whole network (fusion across
layers, one backward pass). The step's result is what `single_path.SinglePathEngine` computes
from the same weights, batch and path (tests check it): only the sampled candidates' weights,
momenta and BatchNorm statistics change, because the other branches of a switch get zero
gradients and their updates are masked out, and d loss / d A[l, o] is the gradient of a gate
(1 in value) on the sampled op's output, <d loss / d y_l, y_l>.

Its steps are pure functions of arrays (`step_function`; the engine is `fusable`), so the
searcher traces them together with the stage's sampler and architecture update: a search
iteration -- sample, weight step and, when due, sample, architecture gradient and Adam update --
is one dispatched program (`search.Searcher._fused_program`). The methods of the engine
interface compile each step alone, for callers that take one step at a time.

Why it is not the default on a CPU: XLA:CPU takes a slow path for the gradient of a
convolution inside a conditional (docs/cpu-performance.md), so there the chained engine is
faster; on accelerators the conditional costs little and the host round trips it removes are
what the chained engine loses (benchmarks/accelerator.py measures both).
"""

from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from hournas_jax import optim, supernet
from hournas_jax.engines import base


class SwitchEngine(base.SuperNetEngine):
  """The engine interface (`base.Engine`) for Gumbel-Max paths, one program per step."""

  runs = 'path'
  fusable = True

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self._candidates = {l.name: tuple(self.net.candidate(l, op) for op in o)
                        for l, o in self.chain}
    # Global op index (space.op_names) -> position among the layer's candidates.
    self._position = {}
    for l, o in self.chain:
      if len(o) > 1:  # choice layers; stem, head and fixed layers hold ops outside op_names
        table = np.zeros(len(self.space.op_names), np.int32)
        for i, op in enumerate(o):
          table[self.space.op_names.index(op)] = i
        self._position[l.name] = table
    self._programs = {}

  # ----- The engine interface (base.Engine).

  def train_step(self, state, batch, choice: base.Choice, lr):
    """One SGD step of the chosen path's weights. Returns (state, metrics on the device)."""
    return self._program('train', choice.layers)(state, batch['image'], batch['label'],
                                                 choice.idx, lr)

  def arch_grads(self, state, batch, choice: base.Choice):
    """(state with new BatchNorm statistics, metrics, d loss / d A [L, O]); weights stay."""
    return self._program('grads', choice.layers)(state, batch['image'], batch['label'],
                                                 choice.idx)

  def path_loss(self, state, batch, choice: base.Choice):
    """(state with new BatchNorm statistics, metrics) of the chosen path, forward only."""
    return self._program('loss', choice.layers)(state, batch['image'], batch['label'],
                                                choice.idx)

  # ----- Programs.

  def step_function(self, kind: str, layers):
    """See `base.SuperNetEngine.step_function`: the searcher fuses these with the sampling and
    the architecture update into one program per iteration."""
    fn = {'train': self._train_step, 'grads': self._arch_grads, 'loss': self._path_loss}[kind]
    return functools.partial(fn, tuple(layers))

  def _program(self, kind: str, layers: tuple[str, ...]):
    """The jitted program of `kind` for choices over `layers` (compiled once per stage)."""
    key = (kind, tuple(layers))
    if key not in self._programs:
      self._programs[key] = jax.jit(self.step_function(kind, layers))
    return self._programs[key]

  def _branches(self, layer: str, idx, layers):
    """The position of the layer's sampled candidate (a traced int32)."""
    where = layers.index(layer) if layer in layers else None
    if where is None:
      raise ValueError(f'layer {layer} holds several candidates but is not among the choice '
                       f'layers {layers}')
    return jnp.asarray(self._position[layer])[idx[where]]

  def _forward(self, layers, params, stats, images, idx, gates=None):
    """(logits, new batch_stats): the path idx picks, in training mode (BatchNorm normalises
    with the batch's statistics and updates the running ones of the sampled candidates).
    gates: {layer: scalar} multiplying the output of each choice layer."""
    x, new_stats = images, dict(stats)
    for layer, ops in self.chain:
      name = layer.name
      branches = [self._branch(c) for c in self._candidates[name]]
      operands = (params.get(name, {}), stats.get(name, {}), x)
      if len(ops) == 1:
        y, layer_stats = branches[0](operands)
      else:
        y, layer_stats = jax.lax.switch(self._branches(name, idx, layers), branches, operands)
        if gates is not None:
          y = y * gates[name]
      if name in stats:
        new_stats[name] = layer_stats
      x = y
    return x, new_stats

  @staticmethod
  def _branch(c: supernet.Candidate):
    def run(operands):
      params, stats, x = operands
      if c.op == 'skip':
        return x, stats
      y, updated = c.apply({k: params[k] for k in c.param_keys}, {c.op: stats.get(c.op, {})},
                           x, train=True)
      return y, {**stats, **updated}
    return run

  def _active(self, layers, idx) -> Mapping[str, Mapping[str, jax.Array]]:
    """{layer: {key: whether the sampled candidate uses that part}} (op and shared kernels)."""
    out = {}
    for layer, ops in self.chain:
      name = layer.name
      cands = self._candidates[name]
      here = None if len(ops) == 1 else self._branches(name, idx, layers)
      parts = {}
      for i, c in enumerate(cands):
        for key in c.param_keys:
          used = jnp.bool_(True) if here is None else here == i
          parts[key] = used if key not in parts else parts[key] | used
      out[name] = parts
    return out

  def _train_step(self, layers, state, images, labels, idx, lr):
    def loss_fn(params):
      logits, stats = self._forward(layers, params, state['batch_stats'], images, idx)
      loss = optim.cross_entropy(logits, labels, self.label_smoothing)
      return loss, (logits, stats)
    (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
    active = self._active(layers, idx)
    params, opt = {}, {}
    for name, parts in state['params'].items():
      params[name], opt[name] = {}, {}
      for key, p in parts.items():
        new_p, new_o = optim.sgd_update(self.direction, p, state['opt_state'][name][key],
                                        grads[name][key], lr)
        on = active[name].get(key, jnp.bool_(False))
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(on, a, b), new, old)
        params[name][key] = keep(new_p, p)
        opt[name][key] = keep(new_o, state['opt_state'][name][key])
    new_state = {'params': params, 'batch_stats': stats, 'opt_state': opt}
    return new_state, base.step_metrics(loss, logits, labels)

  def _arch_grads(self, layers, state, images, labels, idx):
    gates = {n: jnp.ones((), jnp.float32) for n in self.choice_layers}

    def loss_fn(gates):
      logits, stats = self._forward(layers, state['params'], state['batch_stats'], images, idx,
                                    gates)
      loss = optim.cross_entropy(logits, labels, self.label_smoothing)
      return loss, (logits, stats)
    (loss, (logits, stats)), gate_grads = jax.value_and_grad(loss_fn, has_aux=True)(gates)
    num_ops = len(self.space.op_names)
    # A layer of the choice with a single candidate has no gate: its op is not a choice.
    rows = [jax.nn.one_hot(idx[i], num_ops) * gate_grads.get(n, 0.0)
            for i, n in enumerate(layers)]
    grad_a = jnp.stack(rows) if rows else jnp.zeros((0, num_ops))
    return ({**state, 'batch_stats': stats}, base.step_metrics(loss, logits, labels), grad_a)

  def _path_loss(self, layers, state, images, labels, idx):
    logits, stats = self._forward(layers, state['params'], state['batch_stats'], images, idx)
    loss = optim.cross_entropy(logits, labels, self.label_smoothing)
    return {**state, 'batch_stats': stats}, base.step_metrics(loss, logits, labels)
