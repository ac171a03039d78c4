"""Plots and the text summary of a search result, and the block-importance pictures.

- theta.png: the op probabilities of every searchable layer as a heat map (layers x ops), the
  chosen op of each layer outlined, vital layers marked;
- pi.png: the proposal sampler pi as bars;
- proposals.png: Figure 3 of the paper, architectures sampled from the final space proposals,
  params against FLOPs, with the targets.
Every file is written to a temporary name and renamed, so a PNG is never half written.
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from hournas_jax import checkpoint, costs, proposals, spaces, vital


def new_figure(nrows: int = 1, ncols: int = 1, *, figsize, **subplots):
  """(figure, axes) drawn without pyplot: no global backend switch and no global figure list,
  so plotting here leaves a notebook's inline plots alone and never needs a display."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=figsize)
  return fig, fig.subplots(nrows, ncols, **subplots)


def rectangle(*args, **kwargs):
  from matplotlib.patches import Rectangle  # pylint: disable=g-import-not-at-top
  return Rectangle(*args, **kwargs)


def colormap(name: str):
  import matplotlib  # pylint: disable=g-import-not-at-top
  return matplotlib.colormaps[name]


def _save(fig, path: str) -> None:
  tmp = f'{path}.tmp.png'
  fig.savefig(tmp, dpi=110, bbox_inches='tight')
  os.replace(tmp, path)


def plot_theta(path: str, probabilities: Mapping[str, Mapping[str, float]],
               op_names: Sequence[str], chosen: Mapping[str, str] | None = None,
               vital: Sequence[str] = ()) -> None:
  layers = list(probabilities)
  grid = np.full((len(layers), len(op_names)), np.nan)
  for i, layer in enumerate(layers):
    for j, op in enumerate(op_names):
      if op in probabilities[layer]:
        grid[i, j] = probabilities[layer][op]
  fig, ax = new_figure(figsize=(1.0 + 0.6 * len(op_names), 1.0 + 0.3 * len(layers)))
  image = ax.imshow(np.ma.masked_invalid(grid), cmap='viridis', vmin=0.0, vmax=1.0,
                    aspect='auto')
  ax.set_xticks(range(len(op_names)), op_names, rotation=45, ha='right')
  ax.set_yticks(range(len(layers)),
                [f'{l} *' if l in vital else l for l in layers])
  for i, layer in enumerate(layers):
    if chosen and layer in chosen and chosen[layer] in op_names:
      j = list(op_names).index(chosen[layer])
      ax.add_patch(rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor='red', lw=1.5))
  ax.set_title('op probabilities per layer (red: chosen, *: vital)')
  fig.colorbar(image, ax=ax, fraction=0.04)
  _save(fig, path)


def plot_pi(path: str, pi: Sequence[float]) -> None:
  pi = np.asarray(pi, dtype=float).reshape(-1)
  fig, ax = new_figure(figsize=(1.5 + 0.5 * len(pi), 3))
  ax.bar(np.arange(len(pi)), pi, color='tab:blue')
  ax.set_xticks(range(len(pi)), [str(i) for i in range(len(pi))])
  ax.set_xlabel('space proposal')
  ax.set_ylabel('probability')
  ax.set_ylim(0, max(1e-6, float(pi.max()) * 1.15) if pi.size else 1)
  ax.set_title('proposal sampler pi')
  _save(fig, path)


def plot_proposals(path: str, params: np.ndarray, flops: np.ndarray,
                   targets: Mapping[str, float] | None = None,
                   chosen: tuple[float, float] | None = None) -> None:
  fig, ax = new_figure(figsize=(5, 4))
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


def layer_probabilities(space: spaces.SearchSpace, result: Mapping) -> dict:
  """{layer: {op: p}} for every searchable layer that has a distribution: the result's
  probabilities (each stage's at the tau it ended with); results written before those held the
  vital layers have them from theta_vital at tau = 1."""
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
  latency = result.get('latency_ms')
  lines += ['', f'total: {_millions(params)} params, {_millions(flops)} FLOPs (multiply-adds)'
            + (f', {latency:.4f} ms predicted latency' if latency is not None else '')]
  targets = result.get('targets') or {}
  for key, value, shown in (('params', params, _millions), ('flops', flops, _millions),
                            ('latency_ms', latency, lambda ms: f'{ms:.4f} ms')):
    target = targets.get(key)
    if target and value is not None:
      deviation = (value - target) / target
      off = (f'  ** more than {100 * costs.TOLERANCE:.0f}% off the target **'
             if abs(deviation) > costs.TOLERANCE else '')
      lines.append(f'target {key}: {shown(target)} (deviation {100 * deviation:+.1f}%){off}')
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


# --------------------------------------------------------------------------------------------
# Block importance (importance.py): Figure 2, Figure 4, Figure 5 of the paper.

_VITAL_COLOR, _NON_VITAL_COLOR = 'tab:red', 'tab:green'


def _mark_vital_ticks(ax, labels: Sequence[str], vital_flags: Sequence[bool]) -> None:
  ax.set_xticks(range(len(labels)), labels, rotation=60, ha='right', fontsize=8)
  for tick, is_vital in zip(ax.get_xticklabels(), vital_flags):
    tick.set_color(_VITAL_COLOR if is_vital else _NON_VITAL_COLOR)


def plot_masking(path: str, summary: Mapping) -> None:
  """Accuracy with one block's output channels masked at a time (Figure 2): one line per p
  (mean over draws, std as a band), vital blocks marked in red, the unmasked accuracy and
  chance as horizontal lines."""
  rows = summary['blocks']
  x = np.arange(len(rows))
  fig, ax = new_figure(figsize=(2.0 + 0.45 * len(rows), 3.8))
  probabilities = summary['probabilities']
  # Blues, darker for larger p (red and green mark vital and non-vital blocks).
  colors = colormap('Blues')(np.linspace(0.45, 0.95, len(probabilities)))
  for p, color in zip(probabilities, colors):
    key = f'{p:g}'
    mean = np.array([r['top1'][key]['mean'] for r in rows])
    std = np.array([r['top1'][key]['std'] for r in rows])
    ax.plot(x, 100 * mean, marker='o', ms=4, color=color, label=f'p = {key}')
    ax.fill_between(x, 100 * (mean - std), 100 * (mean + std), color=color, alpha=0.15, lw=0)
  ax.axhline(100 * summary['reference_top1'], color='k', ls='--', lw=1, label='no mask')
  ax.axhline(100 * summary['chance']['majority_class'], color='gray', ls=':', lw=1,
             label='chance (majority class)')
  for i, r in enumerate(rows):
    if r['vital']:
      ax.axvspan(i - 0.4, i + 0.4, color=_VITAL_COLOR, alpha=0.08, lw=0)
  _mark_vital_ticks(ax, [r['block'] for r in rows], [r['vital'] for r in rows])
  ax.set_ylabel('top-1 accuracy (%)')
  ax.set_ylim(0, 100)
  ax.set_title('accuracy with one block masked, M(y, p) (red: vital blocks)')
  ax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.01, 1.0))
  _save(fig, path)


def plot_sensitivity(path: str, summary: Mapping) -> None:
  """Per backbone, the mean accuracy over each block's ops with its std as an error bar, and
  the std itself as bars (Figure 4(b)-(g)); vital blocks red, non-vital green."""
  backbones = list(summary)
  fig, axes = new_figure(2, len(backbones), figsize=(1.0 + 3.6 * len(backbones), 5.6),
                           squeeze=False, sharey='row')  # backbones compare on one scale
  for col, backbone in enumerate(backbones):
    rows = summary[backbone]['blocks']
    x = np.arange(len(rows))
    colors = [_VITAL_COLOR if r['vital'] else _NON_VITAL_COLOR for r in rows]
    mean = np.array([r['mean'] for r in rows])
    std = np.array([r['std'] for r in rows])
    top, bottom = axes[0][col], axes[1][col]
    top.errorbar(x, 100 * mean, yerr=100 * np.nan_to_num(std), fmt='none', ecolor='gray',
                 lw=1, capsize=2)
    top.scatter(x, 100 * mean, c=colors, s=18, zorder=3)
    top.set_title(f'backbone {backbone}', fontsize=9)
    top.set_xticks([])
    bottom.bar(x, 100 * np.nan_to_num(std), color=colors)
    _mark_vital_ticks(bottom, [r['block'] for r in rows], [r['vital'] for r in rows])
    unfinished = sum(r['models'] - r['finished'] for r in rows)
    if unfinished:
      bottom.set_title(f'{unfinished} models not trained yet', fontsize=7)
    if col == 0:
      top.set_ylabel('mean top-1 over ops (%)')
      bottom.set_ylabel('std of top-1 over ops (%)')
  fig.suptitle('block sensitivity: one block enumerated, the others fixed (red: vital)')
  fig.tight_layout()
  _save(fig, path)


def plot_saturation(path: str, epochs: Sequence[float], curves: Sequence[Mapping]) -> None:
  """C_t of Eqn 7 per layer over epochs (Figure 5): vital layers in reds and solid, the others
  in greens and dashed, each named in the legend."""
  fig, ax = new_figure(figsize=(7.5, 4))
  vital_rows = [c for c in curves if c['vital']]
  other_rows = [c for c in curves if not c['vital']]
  for rows, cmap, style in ((vital_rows, colormap('Reds'), '-'),
                            (other_rows, colormap('Greens'), '--')):
    for c, color in zip(rows, cmap(np.linspace(0.45, 0.95, max(len(rows), 1)))):
      ax.plot(epochs, c['curve'], color=color, ls=style, lw=1.2,
              label=f'{c["layer"]} ({c["op"]})' + (' *' if c['vital'] else ''))
  ax.set_xlabel('epoch')
  ax.set_ylabel('saturation C_t = 1 - D(w_t, w_T) / D(w_0, w_T)')
  ax.set_ylim(-0.05, 1.05)
  ax.set_title('weight saturation per layer (Eqn 7; red, solid, *: vital)')
  ax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.01, 1.0))
  _save(fig, path)


def plot_search_history(path: str, history: Sequence[Mapping],
                        chosen: Mapping[str, str] | None = None) -> None:
  """How theta and pi moved during a search, from the lines of <workdir>/search/history.jsonl:
  per stage, the probability the search samples each layer's op with against the step (stage 1:
  theta_vital; stage 2: the proposal with the highest pi at that step), and pi of every
  proposal in stage 2. The op followed per layer is `chosen`'s (e.g. the result's ops), else the
  stage's last most probable one."""
  vital_records = [r for r in history if r['stage'] == 'vital']
  nonvital_records = [r for r in history if r['stage'] == 'nonvital']
  panels = []  # (title, records, what)
  if vital_records and vital_records[-1]['probabilities']:
    panels.append(('stage 1: theta_vital', vital_records, 'theta'))
  if nonvital_records and 'pi' in nonvital_records[-1]:
    panels.append(('stage 2: pi over the space proposals', nonvital_records, 'pi'))
  if nonvital_records and nonvital_records[-1]['probabilities']:
    panels.append(('stage 2: the proposal with the highest pi', nonvital_records, 'theta'))
  if not panels:
    raise ValueError('the search history has no distributions to plot')
  fig, axes = new_figure(1, len(panels), figsize=(4.6 * len(panels), 3.4), squeeze=False)
  for ax, (title, records, kind) in zip(axes[0], panels):
    steps = [r['step'] for r in records]
    if kind == 'pi':
      pi = np.array([r['pi'] for r in records])
      final = int(np.argmax(pi[-1]))
      for k in range(pi.shape[1]):
        ax.plot(steps, pi[:, k], lw=2.0 if k == final else 1.0,
                color='tab:red' if k == final else 'tab:gray', alpha=1.0 if k == final else 0.5,
                label=f'proposal {k} (highest at the end)' if k == final else None)
      ax.set_ylabel('pi (softmax)')
    else:
      last = records[-1]['probabilities']
      for layer in last:
        op = (chosen or {}).get(layer)
        if op not in last[layer]:
          op = max(last[layer], key=last[layer].get)
        ax.plot(steps, [r['probabilities'].get(layer, {}).get(op, np.nan) for r in records],
                marker='.', ms=3, lw=1.2, label=f'{layer}: {op}')
      ax.set_ylabel("p(op) at the step's tau")
      ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel('search step')
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(0.0, -0.18), ncol=2, frameon=False)
  _save(fig, path)


def plot_figure3(path, thetas, mask, tables, offset, targets, active, final_tau, key,
                 samples, space_name, taus=(5.0, 2.0, 1.0, 0.2)):
  """Figure 3: sampled architectures' params (M) against FLOPs (M) at falling temperatures:
  `taus` and the final tau of the optimisation (marked), one panel each."""
  taus = sorted({float(t) for t in taus if not math.isclose(t, final_tau, rel_tol=0.01)}
                | {final_tau}, reverse=True)
  m = thetas.shape[0]
  fig, axes = new_figure(1, len(taus), figsize=(4 * len(taus), 4), sharex=True,
                                  sharey=True)
  for ax, tau in zip(np.atleast_1d(axes), taus):
    _, idx = proposals.sample_two_level(key, thetas, jnp.zeros(m), tau, jnp.asarray(mask),
                                        n=samples)
    c = costs.architecture_costs(np.asarray(idx), tables, offset) / 1e6
    share = proposals.within_targets(c * 1e6, targets, active).mean()
    ax.scatter(c[:, 0], c[:, 1], s=2, alpha=0.3, color='tab:blue', rasterized=True)
    if active[0]:
      ax.axvline(targets[0] / 1e6, color='tab:red', ls='--', lw=1)
    if active[1]:
      ax.axhline(targets[1] / 1e6, color='tab:red', ls='--', lw=1)
    if active.all():  # the +-5% box around the targets
      lo, hi = (1 - costs.TOLERANCE) * targets / 1e6, (1 + costs.TOLERANCE) * targets / 1e6
      ax.add_patch(rectangle((lo[0], lo[1]), hi[0] - lo[0], hi[1] - lo[1],
                                      fill=False, edgecolor='tab:red', lw=1))
    final = ' (final)' if tau == final_tau else ''
    ax.set_title(f'tau = {tau:.3g}{final}: {share:.1%} within 5%')
    ax.set_xlabel('params (M)')
  np.atleast_1d(axes)[0].set_ylabel('FLOPs (M)')
  fig.suptitle(f'{samples} architectures sampled from {m} space proposals ({space_name})')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
