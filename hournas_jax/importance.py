"""Block importance: the math of the three experiments behind the paper's vital-block claim.

- Channel masking (Section 3.1, Figure 2): M(y, p) zeroes each output channel of one block of a
  trained network with probability p; the accuracy with one block masked at a time says how
  much the network depends on it. A block with a shortcut keeps it (its residual branch is
  masked), so a non-vital block at p = 1 is the identity while a vital one cuts every path.
- Block sensitivity (Appendix A, Figure 4, Table 6): every block fixed to one op (a backbone),
  one block at a time enumerated over the candidate ops, each network trained on its own; the
  spread of accuracy over a block's ops says how sensitive the result is to that block.
- Saturation (Appendix B, Eqn 7): C_t = 1 - D(w_t, w_T) / D(w_0, w_T) per layer from weight
  snapshots of one training run, D the Frobenius distance: how early a layer's weights settle.

Everything here is pure (numpy / jitted JAX on arrays passed in); `importance_modes.py` runs
them on a workdir and writes their JSON and pictures.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hournas_jax import blocks, errors, spaces, vital


class AnalysisError(errors.UserError, ValueError):
  """An analysis was asked for with values it cannot use; the message says what is allowed."""


# --------------------------------------------------------------------------------------------
# Channel masking.


def maskable_blocks(space: spaces.SearchSpace) -> tuple[str, ...]:
  """The blocks M(y, p) can mask: the stem and every searchable layer. The head is left out:
  its output is the logits, and zeroing a class's logit measures nothing about features."""
  return tuple(l.name for l in space.layers if l.name != 'head')


def vital_blocks(space: spaces.SearchSpace) -> tuple[str, ...]:
  """The blocks every input-to-output path crosses, the stem and head included."""
  return vital.vital_layers(space, searchable_only=False)


def parse_names(text: str, allowed: Sequence[str], what: str, note: str = '') -> tuple[str, ...]:
  """Comma-separated names, each one of `allowed`; '' = all of them, in their order. `note`
  is added to the message of an unknown name."""
  names = tuple(n.strip() for n in str(text).split(',') if n.strip())
  if not names:
    return tuple(allowed)
  unknown = [n for n in names if n not in allowed]
  if unknown:
    raise AnalysisError(f'unknown {what} {", ".join(map(repr, unknown))}; allowed: '
                        f'{", ".join(allowed)}' + (f' ({note})' if note else ''))
  if len(set(names)) != len(names):
    raise AnalysisError(f'{what} listed twice in {text!r}')
  return names


def parse_probabilities(text: str) -> tuple[float, ...]:
  """Comma-separated masking probabilities, each in [0, 1]."""
  try:
    values = tuple(float(v) for v in str(text).split(',') if v.strip())
  except ValueError:
    raise AnalysisError(f'mask probabilities must be comma-separated numbers in [0, 1], got '
                        f'{text!r}') from None
  if not values or any(not math.isfinite(p) or p < 0 or p > 1 for p in values):
    raise AnalysisError(f'mask probabilities must be comma-separated numbers in [0, 1], got '
                        f'{text!r}')
  return values


def channel_mask(rng: np.random.Generator, channels: int, p: float) -> np.ndarray:
  """M(., p) as a [channels] multiplier: each channel is 0 with probability p, else 1."""
  return (rng.random(channels) >= p).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class MaskDraw:
  block: str
  p: float
  draw: int
  mask: np.ndarray  # [out_channels of block]


def mask_plan(space: spaces.SearchSpace, block_names: Sequence[str],
              probabilities: Sequence[float], draws: int, seed: int) -> list[MaskDraw]:
  """Every (block, p, draw) to evaluate, with its mask. Each draw's mask comes from its own
  stream seeded by (seed, block, p, draw), so adding blocks or draws keeps the others."""
  out = []
  channels = {l.name: l.out_channels for l in space.layers}
  for block in block_names:
    index = list(channels).index(block)
    for p in probabilities:
      for draw in range(draws):
        rng = np.random.default_rng([seed, index, int(round(p * 1e6)), draw])
        out.append(MaskDraw(block, float(p), draw, channel_mask(rng, channels[block], p)))
  return out


@functools.partial(jax.jit, static_argnames=('net', 'num_classes'))
def _masked_counts(net, variables, images, labels, weights, stacked_masks, num_classes):
  """Correct top-1 predictions of the batch under each of K mask sets ({block: [K, C]}) and
  the label histogram, weighted by the batch's valid-example mask (the padding of a last
  batch counts for nothing). The K sets run in one program, one after another (lax.map), so a
  batch is one dispatch, whatever the number of draws."""
  def correct(masks):
    logits = net.apply(variables, images, train=False, channel_masks=masks)
    return jnp.sum((jnp.argmax(logits, -1) == labels).astype(jnp.float32) * weights)

  histogram = jnp.sum(jax.nn.one_hot(labels, num_classes) * weights[:, None], axis=0)
  return jax.lax.map(correct, stacked_masks), histogram


def masked_accuracies(net, variables, batches: Iterable[Mapping], plan: Sequence[MaskDraw],
                      num_classes: int, mesh) -> dict:
  """Top-1 accuracy of the trained fixed network `net` unmasked and under every draw of
  `plan`, in one pass over `batches` (the eval split is read once, whatever its size).

  Every mask set holds a mask for every block in the plan (ones where unmasked); the sets are
  replicated over `mesh` like the weights, batches are split over it. Returns
  {'reference': top1, 'top1': [per draw], 'examples': n, 'label_counts': [num_classes]}.
  """
  from hournas_jax import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  names = sorted({d.block for d in plan})
  channels = {d.block: d.mask.shape[0] for d in plan}
  stacked = {n: np.ones((len(plan) + 1, channels[n]), np.float32) for n in names}
  for i, draw in enumerate(plan, start=1):  # set 0 is the unmasked network
    stacked[draw.block][i] = draw.mask
  stacked = mesh_lib.replicate(stacked, mesh)
  correct, label_counts = None, None
  for batch in batches:
    labels = batch['label']
    weights = batch.get('mask', jnp.ones(labels.shape, jnp.float32))
    counts, histogram = _masked_counts(net, variables, batch['image'], labels, weights, stacked,
                                       num_classes)
    correct = counts if correct is None else correct + counts
    label_counts = histogram if label_counts is None else label_counts + histogram
  if correct is None:
    raise AnalysisError('the eval split yielded no batches')
  correct, label_counts = mesh_lib.to_host((correct, label_counts))
  examples = float(np.sum(label_counts))
  top1 = np.asarray(correct, dtype=float) / max(examples, 1.0)
  return {'reference': float(top1[0]), 'top1': [float(t) for t in top1[1:]],
          'examples': int(round(examples)), 'label_counts': label_counts.tolist()}


def summarize_masking(space: spaces.SearchSpace, ops: Sequence[str], plan: Sequence[MaskDraw],
                      accuracies: Mapping) -> dict:
  """Mean and std over draws per (block, p), vital marks, chance levels, and the mean
  accuracy drop of vital and non-vital blocks per p (the gap Figure 2 shows)."""
  op_of = dict(zip(space.searchable_names, ops))
  layers = {l.name: l for l in space.layers}
  vital_set = set(vital_blocks(space))
  reference = accuracies['reference']
  by_block: dict[str, dict[float, list[float]]] = {}
  for draw, top1 in zip(plan, accuracies['top1']):
    by_block.setdefault(draw.block, {}).setdefault(draw.p, []).append(top1)
  rows = []
  for name, per_p in by_block.items():
    layer = layers[name]
    op = op_of.get(name, layer.ops[0])
    rows.append({
        'block': name, 'op': op, 'vital': name in vital_set,
        'shortcut': blocks.has_shortcut(space, layer, op),
        'top1': {_key(p): {'mean': float(np.mean(v)), 'std': float(np.std(v)),
                           'draws': [float(x) for x in v]} for p, v in per_p.items()}})
  probabilities = sorted({d.p for d in plan})
  drops = {}
  for group, is_vital in (('vital', True), ('non_vital', False)):
    drops[group] = {_key(p): _mean_or_nan([reference - r['top1'][_key(p)]['mean']
                                           for r in rows if r['vital'] == is_vital])
                    for p in probabilities}
  counts = np.asarray(accuracies['label_counts'], dtype=float)
  return {'reference_top1': reference, 'examples': accuracies['examples'],
          'probabilities': probabilities, 'draws': max(d.draw for d in plan) + 1,
          'chance': {'uniform': 1.0 / len(counts),
                     'majority_class': float(counts.max() / max(counts.sum(), 1.0))},
          'mean_drop': drops, 'blocks': rows}


def _key(p: float) -> str:
  return f'{p:g}'


def _mean_or_nan(values: Sequence[float]) -> float:
  return float(np.mean(values)) if len(values) else float('nan')


# --------------------------------------------------------------------------------------------
# Block sensitivity.


@dataclasses.dataclass(frozen=True)
class GridModel:
  """One network of the sensitivity grid: `backbone` everywhere except `op` at `block`."""
  backbone: str
  block: str
  op: str
  ops: tuple[str, ...]


def sensitivity_grid(space: spaces.SearchSpace, backbones: Sequence[str],
                     block_names: Sequence[str], candidate_ops: Sequence[str]) -> list[GridModel]:
  """The slice of Appendix A's grid asked for, in (backbone, block, op) order.

  A backbone op must be allowed at every searchable layer; candidates a block does not allow
  (skip where the shape changes) are left out of that block.
  """
  names = space.searchable_names
  for backbone in backbones:
    refused = [l.name for l in space.searchable_layers if backbone not in l.ops]
    if refused:
      raise AnalysisError(f'backbone op {backbone!r} is not allowed at {", ".join(refused)}; '
                          'a backbone needs an op every searchable layer allows')
  out = []
  for backbone in backbones:
    for block in block_names:
      layer = space.layer(block)
      for op in candidate_ops:
        if op not in layer.ops:
          continue
        ops = tuple(op if n == block else backbone for n in names)
        out.append(GridModel(backbone, block, op, ops))
  return out


def summarize_sensitivity(space: spaces.SearchSpace, grid: Sequence[GridModel],
                          accuracy: Mapping[tuple[str, ...], float]) -> dict:
  """Per backbone and block: mean and std (over the block's ops) of the accuracy of the
  models finished so far (`accuracy`: ops -> top-1, averaged over seeds), and per backbone
  the mean std of vital and of non-vital blocks (Figure 4's comparison)."""
  vital_set = set(vital_blocks(space))
  backbones: dict[str, dict[str, list]] = {}
  for model in grid:
    backbones.setdefault(model.backbone, {}).setdefault(model.block, []).append(model)
  out = {}
  for backbone, per_block in backbones.items():
    rows = []
    for block, models in per_block.items():
      done = {m.op: accuracy[m.ops] for m in models if m.ops in accuracy}
      values = list(done.values())
      rows.append({'block': block, 'vital': block in vital_set, 'finished': len(done),
                   'models': len(models), 'top1': done,
                   'mean': _mean_or_nan(values),
                   'std': float(np.std(values, ddof=1)) if len(values) > 1 else float('nan')})
    stds = {group: [r['std'] for r in rows if r['vital'] == is_vital and math.isfinite(r['std'])]
            for group, is_vital in (('vital', True), ('non_vital', False))}
    out[backbone] = {'blocks': rows,
                     'mean_std': {g: _mean_or_nan(v) for g, v in stds.items()}}
  return out


# --------------------------------------------------------------------------------------------
# Saturation (Eqn 7).


def layer_weights(params: Mapping, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
  """{layer: its conv and dense kernels (rank >= 2) flattened into one vector}, for the
  layers of a fixed network's params tree {layer: {op: ...}} that have any (skip has none).
  BatchNorm scales and biases are left out: Eqn 7 is about the transformations' weights."""
  out = {}
  for name in (names if names is not None else params):
    leaves = [np.asarray(x, dtype=np.float64).reshape(-1)
              for x in jax.tree.leaves(params[name]) if np.ndim(x) >= 2]
    if leaves:
      out[name] = np.concatenate(leaves)
  return out


def saturation(snapshots: Sequence[Mapping[str, np.ndarray]]) -> dict[str, list[float]]:
  """C_t = 1 - ||w_t - w_T|| / ||w_0 - w_T|| per layer for snapshots w_0 ... w_T in training
  order (each {layer: weight vector}); C_0 = 0 and C_T = 1 by construction. A layer whose
  weights did not move (D(w_0, w_T) = 0) has no curve."""
  if len(snapshots) < 2:
    raise AnalysisError(f'saturation needs at least 2 weight snapshots (the first and the '
                        f'last of training), got {len(snapshots)}')
  first, last = snapshots[0], snapshots[-1]
  out = {}
  for name in last:
    total = float(np.linalg.norm(first[name] - last[name]))
    if total == 0.0:
      continue
    out[name] = [1.0 - float(np.linalg.norm(s[name] - last[name])) / total for s in snapshots]
  return out


def epochs_to_reach(epochs: Sequence[float], curve: Sequence[float], level: float) -> float:
  """The first epoch at which `curve` reaches `level`, linearly interpolated between
  snapshots."""
  for i, c in enumerate(curve):
    if c >= level:
      if i == 0:
        return float(epochs[0])
      e0, e1, c0 = epochs[i - 1], epochs[i], curve[i - 1]
      return float(e0 + (e1 - e0) * (level - c0) / (c - c0))
  return float('nan')
