"""Step time of the single-path SuperNet against the fixed network and all-candidates steps.

FBNet space (22 SuperBlocks, 9 ops, 1984-channel head), 32x32 input, batch 64, one SGD step
(forward, backward, update), as in docs/cpu-performance.md. Prints figures and
ratios; the last line is JSON with single_path_ms, fixed_ms, all_ops_ms, compile_s,
peak_rss_mb. Timings are medians over steps whose programs are already compiled.

    python benchmarks/supernet_step.py [--steps 10] [--batch 64] [--resolution 32]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from hournas_jax import engines, spaces, supernet, singlepath, wholenet  # noqa: E402


def _block(tree):
  jax.block_until_ready(jax.tree.leaves(tree))


def _timed(fn):
  t = time.perf_counter()
  out = fn()
  _block(out)
  return out, time.perf_counter() - t


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--space', default='fbnet')
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--batch', type=int, default=64)
  p.add_argument('--resolution', type=int, default=32)
  p.add_argument('--fixed-archs', type=int, default=3)
  p.add_argument('--skip-all-ops', action='store_true')
  args = p.parse_args()

  space = spaces.get_space(args.space, resolution=args.resolution)
  names = space.searchable_names
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.standard_normal((args.batch, args.resolution, args.resolution, 3)),
                       jnp.float32)
  labels = jnp.asarray(rng.integers(0, space.num_classes, args.batch), jnp.int32)
  shape = (args.resolution, args.resolution, 3)
  random_path = lambda: {n: space.searchable_layers[i].ops[
      rng.integers(len(space.searchable_layers[i].ops))] for i, n in enumerate(names)}

  # Single path.
  engine = singlepath.SinglePathEngine(space, supernet.layer_ops(space))
  init_t = time.perf_counter()
  state = engine.init(0, shape)
  init_s = time.perf_counter() - init_t
  batch = {'image': images, 'label': labels}
  step = lambda state, path: engine.train_step(state, batch,
                                               engines.Choice.from_path(space, path), 0.1)
  (state, _), compile_s = _timed(lambda: step(state, random_path()))
  print(f'init {init_s:.1f} s; first single-path step (compile included) {compile_s:.1f} s')
  # Compile every candidate once: op j at every layer that has it (then random paths only hit
  # compiled programs).
  warm_t = time.perf_counter()
  for op in space.op_names:
    path = {l.name: (op if op in l.ops else l.ops[0]) for l in space.searchable_layers}
    state, _ = step(state, path)
  _block(state)
  print(f'compiling every candidate: {time.perf_counter() - warm_t:.1f} s')
  paths, single = [], []
  for _ in range(args.steps):
    path = random_path()
    paths.append(path)
    (state, _), dt = _timed(lambda: step(state, path))
    single.append(dt)
  single_ms = 1000 * statistics.median(single)
  print(f'single path, random path each step: median {single_ms:.0f} ms over {args.steps}')

  # Fixed networks of some of the same paths.
  fixed, ratios = [], []
  for i, path in enumerate(paths[:args.fixed_archs]):
    ops = [path[n] for n in names]
    fixed_engine = wholenet.WholeNetEngine(space, supernet.fixed_layer_ops(space, ops))
    fstate = fixed_engine.init(0, shape)
    no_choice = engines.Choice.none(space)
    (fstate, _), c = _timed(lambda: fixed_engine.train_step(fstate, batch, no_choice, 0.1))
    times = []
    for _ in range(5):
      (fstate, _), dt = _timed(lambda: fixed_engine.train_step(fstate, batch, no_choice, 0.1))
      times.append(dt)
    fixed.append(statistics.median(times))
    ratios.append(single[i] / fixed[-1])
    print(f'fixed network {i}: {1000 * fixed[-1]:.0f} ms (compile {c:.1f} s); same path single: '
          f'{1000 * single[i]:.0f} ms, ratio {ratios[-1]:.2f}')
  fixed_ms = 1000 * statistics.median(fixed)

  all_ops_ms = None
  if not args.skip_all_ops:
    all_engine = wholenet.WholeNetEngine(space, supernet.layer_ops(space))
    astate = all_engine.init(0, shape)
    mask = space.op_mask()
    uniform = engines.Choice(space.searchable_names, jnp.zeros(len(mask), jnp.int32),
                             jnp.asarray(mask / mask.sum(-1, keepdims=True), jnp.float32))
    (astate, _), c = _timed(lambda: all_engine.train_step(astate, batch, uniform, 0.1))
    times = []
    for _ in range(3):
      (astate, _), dt = _timed(lambda: all_engine.train_step(astate, batch, uniform, 0.1))
      times.append(dt)
    all_ops_ms = 1000 * statistics.median(times)
    print(f'all candidates (Gumbel-softmax) step: {all_ops_ms:.0f} ms (compile {c:.1f} s)')

  peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(f'single / fixed: {single_ms / fixed_ms:.2f} (bar <= 1.5); per-architecture ratios '
        f'{", ".join(f"{r:.2f}" for r in ratios)}')
  if all_ops_ms:
    print(f'all-ops / single: {all_ops_ms / single_ms:.1f}x (bar >= 4)')
  print(f'first step {compile_s:.1f} s (bar <= 60); peak RSS {peak_rss_mb:.0f} MB; '
        f'{jax.device_count()} {jax.default_backend()} device(s)')
  print(json.dumps({'single_path_ms': round(single_ms, 1), 'fixed_ms': round(fixed_ms, 1),
                    'all_ops_ms': all_ops_ms and round(all_ops_ms, 1),
                    'compile_s': round(compile_s, 1), 'peak_rss_mb': round(peak_rss_mb),
                    'single_over_fixed': round(single_ms / fixed_ms, 3),
                    'all_ops_over_single': all_ops_ms and round(all_ops_ms / single_ms, 2)}))


if __name__ == '__main__':
  main()
