"""Plots and the text summary of a search result (matplotlib, Agg backend, no display).

- theta.png: the op probabilities of every searchable layer as a heat map (layers x ops), the
  chosen op of each layer outlined, vital layers marked;
- pi.png: the proposal sampler pi as bars;
- proposals.png: Figure 3 of the paper, architectures sampled from the final space proposals,
  params against FLOPs, with the targets.
Every file is written to a temporary name and renamed, so a PNG is never half written.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np

from hournas_jax import checkpoint, costs, proposals, spaces, vital


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _save(fig, path: str) -> None:
  tmp = f'{path}.tmp.png'
  fig.savefig(tmp, dpi=110, bbox_inches='tight')
  os.replace(tmp, path)


def plot_theta(path: str, probabilities: Mapping[str, Mapping[str, float]],
               op_names: Sequence[str], chosen: Mapping[str, str] | None = None,
               vital: Sequence[str] = ()) -> None:
  plt = _pyplot()
  layers = list(probabilities)
  grid = np.full((len(layers), len(op_names)), np.nan)
  for i, layer in enumerate(layers):
    for j, op in enumerate(op_names):
      if op in probabilities[layer]:
        grid[i, j] = probabilities[layer][op]
  fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(op_names), 1.0 + 0.3 * len(layers)))
  image = ax.imshow(np.ma.masked_invalid(grid), cmap='viridis', vmin=0.0, vmax=1.0,
                    aspect='auto')
  ax.set_xticks(range(len(op_names)), op_names, rotation=45, ha='right')
  ax.set_yticks(range(len(layers)),
                [f'{l} *' if l in vital else l for l in layers])
  for i, layer in enumerate(layers):
    if chosen and layer in chosen and chosen[layer] in op_names:
      j = list(op_names).index(chosen[layer])
      ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor='red', lw=1.5))
  ax.set_title('op probabilities per layer (red: chosen, *: vital)')
  fig.colorbar(image, ax=ax, fraction=0.04)
  _save(fig, path)
  plt.close(fig)


def plot_pi(path: str, pi: Sequence[float]) -> None:
  plt = _pyplot()
  pi = np.asarray(pi, dtype=float).reshape(-1)
  fig, ax = plt.subplots(figsize=(1.5 + 0.5 * len(pi), 3))
  ax.bar(np.arange(len(pi)), pi, color='tab:blue')
  ax.set_xticks(range(len(pi)), [str(i) for i in range(len(pi))])
  ax.set_xlabel('space proposal')
  ax.set_ylabel('probability')
  ax.set_ylim(0, max(1e-6, float(pi.max()) * 1.15) if pi.size else 1)
  ax.set_title('proposal sampler pi')
  _save(fig, path)
  plt.close(fig)


def plot_proposals(path: str, params: np.ndarray, flops: np.ndarray,
                   targets: Mapping[str, float] | None = None,
                   chosen: tuple[float, float] | None = None) -> None:
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5, 4))
  ax.scatter(np.asarray(params) / 1e6, np.asarray(flops) / 1e6, s=4, alpha=0.3,
             label=f'{len(params)} sampled architectures')
  targets = targets or {}
  if targets.get('params'):
    ax.axvline(targets['params'] / 1e6, color='k', ls='--', lw=1, label='params target')
  if targets.get('flops'):
    ax.axhline(targets['flops'] / 1e6, color='gray', ls='--', lw=1, label='FLOPs target')
  if chosen is not None:
    ax.scatter([chosen[0] / 1e6], [chosen[1] / 1e6], marker='*', s=120, color='red',
               label='searched architecture')
  ax.set_xlabel('params (M)')
  ax.set_ylabel('FLOPs (M multiply-adds)')
  ax.set_title('architectures sampled from the space proposals')
  ax.legend(fontsize=7, loc='best')
  _save(fig, path)
  plt.close(fig)


def layer_probabilities(space: spaces.SearchSpace, result: Mapping) -> dict:
  """{layer: {op: p}} for every searchable layer that has a distribution: the vital layers'
  from theta_vital (stage 1, at tau = 1) and the others' from the result's probabilities."""
  probs = dict(result.get('probabilities') or {})
  theta_vital = result.get('theta_vital')
  if theta_vital is not None:
    rows = np.asarray(theta_vital, dtype=float)
    # theta_vital has a row per vital layer the search chose (the supernet-fixed ones are not
    # searched); results from before supernet_fixed have one for every vital layer.
    names = [n for n in vital.vital_layers(space) if n not in space.supernet_fixed]
    if len(rows) != len(names):
      names = list(vital.vital_layers(space))
    for name, row in zip(names, rows):
      if name in probs:
        continue
      allowed = [j for j, op in enumerate(space.op_names) if op in space.layer(name).ops]
      logits = row[allowed] - row[allowed].max()
      p = np.exp(logits) / np.exp(logits).sum()
      probs[name] = {space.op_names[j]: float(q) for j, q in zip(allowed, p)}
  return {n: probs[n] for n in space.searchable_names if n in probs}


def _millions(x) -> str:
  return f'{x / 1e6:.3f}M'


def summary_text(space: spaces.SearchSpace, result: Mapping) -> str:
  """A readable table of the searched architecture, its costs against the targets, pi."""
  ops_map = result['ops']
  ops = [ops_map[name] for name in space.searchable_names]
  vital_set = set(result.get('vital_ops') or ())
  fixed_set = set(result.get('fixed_ops') or ())  # held at one op by the SuperNet
  probabilities = layer_probabilities(space, result)
  rows = costs.layer_costs(space, ops)
  lines = [f'HourNAS search result: space {space.name} (width {space.width}, resolution '
           f'{space.resolution}, {space.num_classes} classes)', '',
           f'{"layer":<11} {"op":<8} {"in":>5} {"out":>5} {"s":>2} {"res":>4} '
           f'{"params":>10} {"FLOPs":>12} {"p(op)":>6}  vital']
  for row in rows:
    p = probabilities.get(row['layer'], {}).get(row['op'])
    mark = 'yes' if row['layer'] in vital_set else 'fixed' if row['layer'] in fixed_set else ''
    lines.append(f'{row["layer"]:<11} {row["op"]:<8} {row["in_channels"]:>5} '
                 f'{row["out_channels"]:>5} {row["stride"]:>2} {row["resolution"]:>4} '
                 f'{row["params"]:>10,} {row["flops"]:>12,} '
                 f'{"" if p is None else f"{p:.2f}":>6}  '
                 f'{mark}')
  params = sum(r['params'] for r in rows)
  flops = sum(r['flops'] for r in rows)
  lines += ['', f'total: {_millions(params)} params, {_millions(flops)} FLOPs (multiply-adds)']
  targets = result.get('targets') or {}
  for key, value in ((('params', params)), ('flops', flops)):
    target = targets.get(key)
    if target:
      deviation = (value - target) / target
      off = (f'  ** more than {100 * proposals.TOLERANCE:.0f}% off the target **'
             if abs(deviation) > proposals.TOLERANCE else '')
      lines.append(f'target {key}: {_millions(target)} (deviation {100 * deviation:+.1f}%){off}')
  pi = result.get('pi')
  if pi is not None:
    lines.append('pi: ' + ' '.join(f'{float(x):.3f}' for x in np.asarray(pi).reshape(-1)))
  lines.append('ops: ' + ','.join(ops))
  return '\n'.join(lines) + '\n'


def write_search_report(workdir: str, space: spaces.SearchSpace, result: Mapping,
                        proposal_samples: tuple[np.ndarray, np.ndarray] | None) -> list[str]:
  """summary.txt and the three plots; returns the paths written."""
  written = []
  path = os.path.join(workdir, 'summary.txt')
  checkpoint.atomic_write_text(path, summary_text(space, result))
  written.append(path)
  probabilities = layer_probabilities(space, result)
  if probabilities:
    path = os.path.join(workdir, 'theta.png')
    plot_theta(path, probabilities, space.op_names, result.get('ops'),
               list(result.get('vital_ops') or ()))
    written.append(path)
  if result.get('pi') is not None:
    path = os.path.join(workdir, 'pi.png')
    plot_pi(path, result['pi'])
    written.append(path)
  if proposal_samples is not None:
    path = os.path.join(workdir, 'proposals.png')
    chosen = (result.get('params'), result.get('flops'))
    plot_proposals(path, proposal_samples[0], proposal_samples[1], result.get('targets'),
                   chosen if None not in chosen else None)
    written.append(path)
  return written
