"""Single-path SuperNet steps: each step computes only the sampled op of every layer.

Why not one compiled program with `lax.switch` per layer: on XLA:CPU the gradient of a conv
inside a conditional takes a slow path (docs/cpu-performance.md: 10x the fixed
network, slower than computing every candidate). Here each sampled candidate runs as its own
compiled program, cached per (block configuration, input shape) -- blocks are hashable linen
modules, so the 4 same-shaped layers of a stage share programs -- and Python chains them:

  forward:  x_{l+1} = block_l(x_l), keeping every layer's input and output;
  head:     loss, d loss / d x and the head's update in one program;
  backward: for l = L..1, one program recomputes block_l's forward inside `jax.vjp` and returns
            d loss / d x_l together with the SGD update of that candidate's weights.

A multi-path step (`train_multi`: the strict-fair and sandwich recipes of
search.weight_sampling) runs the same chain for each path with gradient programs that do not
update, sums the paths' gradients per weight part, then updates each part once.

Only the sampled candidates' variables and optimizer states are touched. Under `jit` with
batch-sharded inputs every program is data-parallel over the device mesh, BatchNorm statistics
included (they are reduced over the global batch). Gradients for the architecture come from the
straight-through gate of Eqn 3: the sampled op's output is scaled by A[l, o] (1 in value), so
d loss / d A[l, o] = <d loss / d y_l, y_l>, computed from the stored outputs.

Programs are many (the 9-op FBNet space: ~300, `benchmarks/supernet_step.py`), and XLA:CPU
keeps tens of memory mappings per program: an engine installs `compiles.MapGuard`, which stops
with one line naming vm.max_map_count and the remedies before a compile would cross it.
"""

from __future__ import annotations

import functools
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hournas_jax import blocks, compiles, optim
from hournas_jax.engines import base


def _apply_train(candidate, params, stats, x):
  return candidate.apply(params, stats, x, train=True)


def _forward(candidate, params, stats, x):
  return _apply_train(candidate, params, stats, x)


def _forward_eval(candidate, params, stats, x):
  return candidate.apply(params, stats, x, train=False)


def _backward_update(hyper, candidate, need_input_grad, params, stats, opt_state, x, gy, lr):
  """d loss / d x and the SGD step of this candidate, recomputing its forward."""
  f = lambda p, x: _apply_train(candidate, p, stats, x)[0]
  if need_input_grad:
    _, vjp = jax.vjp(f, params, x)
    gp, gx = vjp(gy)
  else:  # the stem: its input is the image, no gradient needed
    _, vjp = jax.vjp(lambda p: f(p, x), params)
    (gp,), gx = vjp(gy), None
  params, opt_state = optim.sgd_update_parts(optim.weight_direction(*hyper), params, opt_state,
                                             gp, lr)
  return gx, params, opt_state


def _backward_input(candidate, params, stats, x, gy):
  """d loss / d x only (architecture steps leave the weights alone)."""
  _, vjp = jax.vjp(lambda x: _apply_train(candidate, params, stats, x)[0], x)
  return vjp(gy)[0]


def _head(hyper, smoothing, update, candidate, params, stats, opt_state, x, labels, lr):
  def loss_fn(p, x):
    logits, new_stats = _apply_train(candidate, p, stats, x)
    return optim.cross_entropy(logits, labels, smoothing), (logits, new_stats)
  (loss, (logits, new_stats)), (gp, gx) = jax.value_and_grad(
      loss_fn, argnums=(0, 1), has_aux=True)(params, x)
  if update:
    params, opt_state = optim.sgd_update_parts(optim.weight_direction(*hyper), params,
                                               opt_state, gp, lr)
  return base.step_metrics(loss, logits, labels), gx, params, opt_state, new_stats


def _backward_grads(candidate, need_input_grad, params, stats, x, gy):
  """d loss / d x and d loss / d params of this candidate, recomputing its forward, without an
  update (a multi-path step sums its paths' gradients first)."""
  f = lambda p, x: _apply_train(candidate, p, stats, x)[0]
  if need_input_grad:
    _, vjp = jax.vjp(f, params, x)
    gp, gx = vjp(gy)
  else:
    _, vjp = jax.vjp(lambda p: f(p, x), params)
    (gp,), gx = vjp(gy), None
  return gx, gp


def _head_grads(smoothing, candidate, params, stats, x, labels, soft):
  """The head's part of a multi-path step: metrics on the labels, d loss / d x, d loss /
  d params, new statistics and the predicted probabilities (a teacher's soft targets). The
  loss is the cross-entropy with the labels, or with `soft` [B, classes] when given (in-place
  distillation from a teacher path)."""
  def loss_fn(p, x):
    logits, new_stats = _apply_train(candidate, p, stats, x)
    if soft is None:
      return optim.cross_entropy(logits, labels, smoothing), (logits, new_stats)
    return optax.softmax_cross_entropy(logits, soft).mean(), (logits, new_stats)
  (loss, (logits, new_stats)), (gp, gx) = jax.value_and_grad(
      loss_fn, argnums=(0, 1), has_aux=True)(params, x)
  if soft is not None:
    loss = optim.cross_entropy(logits, labels, smoothing)
  probs = jax.lax.stop_gradient(jax.nn.softmax(logits.astype(jnp.float32), axis=-1))
  return base.step_metrics(loss, logits, labels), gx, gp, new_stats, probs


def _apply_update(hyper, params, opt_state, grads, lr):
  return optim.sgd_update(optim.weight_direction(*hyper), params, opt_state, grads, lr)


# One cache of compiled programs per process, keyed by (candidate, shapes, hyper-parameters):
# every engine -- both stages of a search, a test's many engines -- reuses what another
# compiled.
_fwd = jax.jit(_forward, static_argnums=0)
_fwd_eval = jax.jit(_forward_eval, static_argnums=0)
_bwd_update = jax.jit(_backward_update, static_argnums=(0, 1, 2))
_bwd_input = jax.jit(_backward_input, static_argnums=0)
_head_step = jax.jit(_head, static_argnums=(0, 1, 2, 3))
# The multi-path steps' (search.weight_sampling): gradients without updates, summed, then one
# update of each weight part; still one program per block configuration and kind.
_bwd_grads = jax.jit(_backward_grads, static_argnums=(0, 1))
_head_grad = jax.jit(_head_grads, static_argnums=(0, 1))
_update = jax.jit(_apply_update, static_argnums=0)
_add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))


@jax.jit
def _gate_grad(gy, y):
  return jnp.vdot(gy, y)


def _take(tree, layer, keys):
  """{key: tree[layer][key]}: the part of a {layer: {op or 'shared': ...}} tree a candidate
  uses."""
  return {k: tree[layer][k] for k in keys if k in tree[layer]}


def _put(tree, layer, part):
  """Writes a candidate's part back into a tree copied by `_copy`."""
  tree[layer].update(part)


def _copy(tree):
  return {k: dict(v) for k, v in tree.items()}


class SinglePathEngine(base.SuperNetEngine):
  """Trains a SuperNet one sampled path at a time (the engine interface, `base.Engine`).

  The path-level methods (`train_path`, `path_gates`, `recalibrate`, `logits`) take the path
  as {layer: op}.
  """

  runs = 'path'

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self._candidates = {(l.name, op): self.net.candidate(l, op)
                        for l, ops_ in self.chain for op in ops_}
    self._bwd_update = functools.partial(_bwd_update, self.hyper)
    self._head_update = functools.partial(_head_step, self.hyper, self.label_smoothing, True)
    self._head_loss = functools.partial(_head_step, self.hyper, self.label_smoothing, False)
    compiles.install_map_guard()

  def _path_ops(self, path: Mapping[str, str]):
    return [(l.name, ops[0] if len(ops) == 1 else path[l.name]) for l, ops in self.chain]

  def _run_forward(self, state, images, path):
    """Forward through every layer but the head; returns the chain, inputs and new stats."""
    params, stats = state['params'], state['batch_stats']
    new_stats = _copy(stats)
    chain = self._path_ops(path)
    inputs, x = [], images
    for name, op in chain[:-1]:
      inputs.append(x)
      if op == 'skip':
        continue
      c = self._candidates[name, op]
      x, s = _fwd(c, _take(params, name, c.param_keys), _take(stats, name, (op,)), x)
      _put(new_stats, name, s)
    return chain, inputs, x, new_stats

  # ----- The engine interface (base.Engine).

  def train_step(self, state, batch, choice: base.Choice, lr):
    """One SGD step of the chosen path's weights. Returns (state, metrics)."""
    return self.train_path(state, batch['image'], batch['label'], choice.path(self.space), lr)

  def arch_grads(self, state, batch, choice: base.Choice):
    """(state with new BatchNorm statistics, metrics, d loss / d A [L, O]): only the sampled
    entries of A are non-zero. A layer with a single candidate (an op subset can leave one,
    e.g. no skip where the shape changes) has no gate: its op is not a choice, so its gradient
    is zero."""
    num_ops = len(self.space.op_names)
    if not choice.layers:
      return *self.path_loss(state, batch, choice), jnp.zeros((0, num_ops))
    state, metrics, gates = self.path_gates(state, batch['image'], batch['label'],
                                            choice.path(self.space))
    idx = np.asarray(choice.idx)
    grad_a = jnp.stack([jax.nn.one_hot(idx[i], num_ops) * gates.get(n, 0.0)
                        for i, n in enumerate(choice.layers)])
    return state, metrics, grad_a

  def path_loss(self, state, batch, choice: base.Choice):
    """Loss of the chosen path, forward only (the score-function architecture gradient).

    As `arch_grads` without the backward pass through the blocks: weights are not updated,
    BatchNorm running statistics are, the same way. Returns (state, metrics).
    """
    _, _, _, new_stats, metrics, _ = self._path_head(state, batch['image'], batch['label'],
                                                     choice.path(self.space))
    return {**state, 'batch_stats': new_stats}, metrics

  # ----- Paths as {layer: op}.

  def train_path(self, state, images, labels, path: Mapping[str, str], lr):
    """One SGD step of the sampled path's weights. Returns (state, metrics)."""
    chain, inputs, x, new_stats = self._run_forward(state, images, path)
    stats = state['batch_stats']
    params, opt = _copy(state['params']), _copy(state['opt_state'])
    name, op = chain[-1]
    c = self._candidates[name, op]
    metrics, gy, p, o, s = self._head_update(
        c, _take(params, name, c.param_keys), _take(stats, name, (op,)),
        _take(opt, name, c.param_keys), x, labels, lr)
    _put(params, name, p), _put(opt, name, o), _put(new_stats, name, s)
    for i in range(len(chain) - 2, -1, -1):
      name, op = chain[i]
      if op == 'skip':
        continue
      c = self._candidates[name, op]
      gy, p, o = self._bwd_update(
          c, i > 0, _take(params, name, c.param_keys), _take(stats, name, (op,)),
          _take(opt, name, c.param_keys), inputs[i], gy, lr)
      _put(params, name, p), _put(opt, name, o)
    return {'params': params, 'batch_stats': new_stats, 'opt_state': opt}, metrics

  def train_paths(self, state, batch, choices: Sequence[base.Choice], lr, distill=False):
    """See `base.SuperNetEngine.train_paths`."""
    return self.train_multi(state, batch['image'], batch['label'],
                            [c.path(self.space) for c in choices], lr, distill)

  def train_multi(self, state, images, labels, paths: Sequence[Mapping[str, str]], lr,
                  distill: bool = False):
    """One SGD step of the weights `paths` run, from their summed gradients on one batch.

    Every path runs forward and backward on the weights before the step; a weight part used by
    several paths (the stem, the head, shared kernels, a candidate taken twice) gets the sum of
    their gradients, as FairNAS and BigNAS accumulate before one optimizer step. BatchNorm
    running statistics are updated path after path. With `distill`, paths after the first
    learn from the first one's predicted probabilities instead of the labels.

    Returns:
      (state, the paths' mean loss on the labels and mean accuracy, before the step).
    """
    if not paths:
      raise ValueError('train_multi needs at least one path')
    params, stats = state['params'], state['batch_stats']
    grads = {}  # {(layer, op or 'shared'): the gradient summed over the paths}

    def accumulate(name, gp):
      for key, g in gp.items():
        grads[name, key] = g if (name, key) not in grads else _add(grads[name, key], g)

    losses, accuracies, soft = [], [], None
    for k, path in enumerate(paths):
      chain, inputs, x, stats = self._run_forward({'params': params, 'batch_stats': stats},
                                                  images, path)
      name, op = chain[-1]
      c = self._candidates[name, op]
      metrics, gy, gp, s, probs = _head_grad(
          self.label_smoothing, c, _take(params, name, c.param_keys), _take(stats, name, (op,)),
          x, labels, soft)
      _put(stats, name, s)
      accumulate(name, gp)
      losses.append(metrics['loss'])
      accuracies.append(metrics['accuracy'])
      if distill and k == 0:
        soft = probs
      for i in range(len(chain) - 2, -1, -1):
        name, op = chain[i]
        if op == 'skip':
          continue
        c = self._candidates[name, op]
        gy, gp = _bwd_grads(c, i > 0, _take(params, name, c.param_keys),
                            _take(stats, name, (op,)), inputs[i], gy)
        accumulate(name, gp)
    new_params, opt = _copy(params), _copy(state['opt_state'])
    for (name, key), g in grads.items():
      new_params[name][key], opt[name][key] = _update(self.hyper, params[name][key],
                                                      opt[name][key], g, lr)
    metrics = {'loss': jnp.mean(jnp.stack(losses)), 'accuracy': jnp.mean(jnp.stack(accuracies))}
    return {'params': new_params, 'batch_stats': stats, 'opt_state': opt}, metrics

  def _path_head(self, state, images, labels, path: Mapping[str, str]):
    """The sampled path's forward and its head's loss, weights untouched: (chain, inputs to
    each block, the head's input, BatchNorm statistics updated along the path, metrics,
    d loss / d head input)."""
    chain, inputs, x, new_stats = self._run_forward(state, images, path)
    name, op = chain[-1]
    c = self._candidates[name, op]
    metrics, gy, _, _, s = self._head_loss(
        c, _take(state['params'], name, c.param_keys), _take(state['batch_stats'], name, (op,)),
        _take(state['opt_state'], name, c.param_keys), x, labels, 0.0)
    _put(new_stats, name, s)
    return chain, inputs, x, new_stats, metrics, gy

  def path_gates(self, state, images, labels, path: Mapping[str, str]):
    """Loss of the sampled path and d loss / d A[l, o_l] for every choice layer.

    Weights are not updated; BatchNorm running statistics are (the layers run in training
    mode, as in PyTorch implementations). Returns (state, metrics, {layer: gate gradient}).
    """
    chain, inputs, x, new_stats, metrics, gy = self._path_head(state, images, labels, path)
    params, stats = state['params'], state['batch_stats']
    outputs = inputs[1:] + [x]
    gates = {}
    first_choice = min((i for i, (n, _) in enumerate(chain) if n in self.choice_layers),
                       default=len(chain))
    for i in range(len(chain) - 2, first_choice - 1, -1):
      name, op = chain[i]
      if name in self.choice_layers:
        gates[name] = _gate_grad(gy, outputs[i])
      if op != 'skip' and i > first_choice:
        c = self._candidates[name, op]
        gy = _bwd_input(c, _take(params, name, c.param_keys), _take(stats, name, (op,)),
                        inputs[i], gy)
    state = {**state, 'batch_stats': new_stats}
    return state, metrics, gates

  def recalibrate(self, state, batches, path: Mapping[str, str]):
    """The state with the path's BatchNorm running statistics set to their average over
    `batches` (images, training mode), the rest untouched.

    Weights inherited from a SuperNet carry running statistics mixed over every path that
    trained them; evaluating one path needs its own. In training mode BatchNorm normalises with
    the batch's statistics, so one forward pass per batch gives every layer's at once: each
    pass's update new = m * old + (1 - m) * batch is solved for `batch`, then averaged.
    """
    params, stats = state['params'], state['batch_stats']
    momentum = blocks.BN_MOMENTUM
    sums, count = None, 0
    for images in batches:
      batch_stats, x = {}, images
      for name, op in self._path_ops(path):
        if op == 'skip':
          continue
        c = self._candidates[name, op]
        old = _take(stats, name, (op,))
        x, new = _fwd(c, _take(params, name, c.param_keys), old, x)
        batch_stats[name] = jax.tree.map(lambda n, o: (n - momentum * o) / (1 - momentum),
                                         new, old)
      sums = batch_stats if sums is None else jax.tree.map(jnp.add, sums, batch_stats)
      count += 1
    if not count:
      raise ValueError('recalibrate needs at least one batch')
    new_stats = _copy(stats)
    for name, part in sums.items():
      _put(new_stats, name, jax.tree.map(lambda v: v / count, part))
    return {**state, 'batch_stats': new_stats}

  def logits(self, state, images, path: Mapping[str, str]):
    """Inference (running BatchNorm statistics) of a path."""
    params, stats = state['params'], state['batch_stats']
    x = images
    for name, op in self._path_ops(path):
      if op != 'skip':
        c = self._candidates[name, op]
        x = _fwd_eval(c, _take(params, name, c.param_keys), _take(stats, name, (op,)), x)
    return x
