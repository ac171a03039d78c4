"""Step time of the single-path SuperNet against the fixed network and all-candidates steps, and
what its programs cost to build.

FBNet space (22 SuperBlocks, 9 ops, 1984-channel head), 32x32 input, batch 64, one SGD step
(forward, backward, update), as in docs/cpu-performance.md. The state starts replicated over
the device mesh and batches are split over it, as in a search (--unplaced: from the host state
the engine makes, as before issue #19, to show what the placement saves). Timings are medians
over steps whose programs are already compiled. The persistent compilation cache is off, so
every program is compiled here.

Compiles: `first_step_s` is the first single-path step of a fresh process (its programs
compiled); `repeat_compiles` the programs compiled again by a second step on the same path (0
when the state's placement is the one the programs return); `compiles` every program the
single-path part compiled; `recompiled` the programs compiled for a second placement of the
same inputs. Then every candidate of the engine runs a weight step and an architecture step,
so that the engine holds every program a search can ask for: `programs`, the process's memory
mappings afterwards (`maps`, lines of /proc/self/maps) against the kernel's `max_map_count`,
the peak RSS after the single-path part (`single_path_rss_mb`) and at the end (`peak_rss_mb`,
the fixed and all-candidates networks included). The last line is JSON with all of these.

    python benchmarks/supernet_step.py [--steps 10] [--batch 64] [--resolution 32]
        [--ops k3_e1,k3_e3,skip] [--skip-all-ops] [--unplaced]
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
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from hournas_jax import compiles, mesh as mesh_lib, spaces, supernet  # noqa: E402
from hournas_jax.engines import all_candidates, base, single_path  # noqa: E402


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
  p.add_argument('--ops', default='', help='comma-separated op subset (default: every op)')
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--batch', type=int, default=64)
  p.add_argument('--resolution', type=int, default=32)
  p.add_argument('--fixed-archs', type=int, default=3)
  p.add_argument('--skip-all-ops', action='store_true')
  p.add_argument('--unplaced', action='store_true',
                 help='start from the host state the engine makes (no mesh placement)')
  args = p.parse_args()
  # Cold: every program is compiled in this process (first_step_s would otherwise measure
  # reads from a cache an earlier run filled).
  jax.config.update('jax_enable_compilation_cache', False)

  space = spaces.get_space(args.space, resolution=args.resolution,
                           ops=tuple(args.ops.split(',')) if args.ops else None)
  names = space.searchable_names
  mesh = mesh_lib.make_mesh()
  place = (lambda tree: tree) if args.unplaced else (lambda tree: mesh_lib.replicate(tree, mesh))
  rng = np.random.default_rng(0)
  data_sharding = NamedSharding(mesh, PartitionSpec(mesh_lib.DATA_AXIS))
  batch = {'image': rng.standard_normal((args.batch, args.resolution, args.resolution, 3),
                                        np.float32),
           'label': rng.integers(0, space.num_classes, args.batch).astype(np.int32)}
  batch = jax.tree.map(lambda x: jax.device_put(x, data_sharding), batch)
  shape = (args.resolution, args.resolution, 3)
  random_path = lambda: {n: space.searchable_layers[i].ops[
      rng.integers(len(space.searchable_layers[i].ops))] for i, n in enumerate(names)}
  guard = compiles.install_map_guard()

  # Single path.
  engine = single_path.SinglePathEngine(space, supernet.layer_ops(space))
  log = compiles.CompileLog().__enter__()
  init_t = time.perf_counter()
  state = place(engine.init(0, shape))
  init_s = time.perf_counter() - init_t
  step = lambda state, path: engine.train_step(state, batch, base.Choice.from_path(space, path),
                                               0.1)
  grads = lambda state, path: engine.arch_grads(state, batch, base.Choice.from_path(space, path))
  first_path = random_path()
  before = log.count
  (state, _), first_step_s = _timed(lambda: step(state, first_path))
  first_step_compiles = log.count - before
  before = log.count
  (state, _), second_step_s = _timed(lambda: step(state, first_path))
  repeat_compiles = log.count - before
  print(f'init {init_s:.1f} s; first single-path step {first_step_s:.1f} s '
        f'({first_step_compiles} programs compiled); the same path again {second_step_s:.1f} s '
        f'({repeat_compiles} compiled)')
  # Compile every candidate once: op j at every layer that has it, a weight step and an
  # architecture step (then random paths only hit compiled programs).
  warm_t = time.perf_counter()
  for op in space.op_names:
    path = {l.name: (op if op in l.ops else l.ops[0]) for l in space.searchable_layers}
    state, _ = step(state, path)
    state, _, _ = grads(state, path)
  _block(state)
  programs = log.count
  maps, max_maps = compiles.map_count(), compiles.max_map_count()
  print(f'compiling every candidate: {time.perf_counter() - warm_t:.1f} s; {programs} programs '
        f'in all, {maps} memory mappings (vm.max_map_count {max_maps})')
  paths, single = [], []
  for _ in range(args.steps):
    path = random_path()
    paths.append(path)
    (state, _), dt = _timed(lambda: step(state, path))
    single.append(dt)
  single_ms = 1000 * statistics.median(single)
  log.__exit__(None, None, None)
  single_path_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  recompiled = log.recompiled()
  print(f'single path, random path each step: median {single_ms:.0f} ms over {args.steps}; '
        f'{log.summary()}; {len(recompiled)} compiled again for another placement')

  # Fixed networks of some of the same paths.
  fixed, ratios = [], []
  for i, path in enumerate(paths[:args.fixed_archs]):
    ops = [path[n] for n in names]
    fixed_engine = all_candidates.AllCandidatesEngine(space, supernet.fixed_layer_ops(space, ops))
    fstate = place(fixed_engine.init(0, shape))
    no_choice = base.Choice.none(space)
    (fstate, _), c = _timed(lambda: fixed_engine.train_step(fstate, batch, no_choice, 0.1))
    times = []
    for _ in range(5):
      (fstate, _), dt = _timed(lambda: fixed_engine.train_step(fstate, batch, no_choice, 0.1))
      times.append(dt)
    fixed.append(statistics.median(times))
    ratios.append(single[i] / fixed[-1])
    print(f'fixed network {i}: {1000 * fixed[-1]:.0f} ms (compile {c:.1f} s); same path single: '
          f'{1000 * single[i]:.0f} ms, ratio {ratios[-1]:.2f}')
  fixed_ms = 1000 * statistics.median(fixed) if fixed else None

  all_ops_ms = None
  if not args.skip_all_ops:
    all_engine = all_candidates.AllCandidatesEngine(space, supernet.layer_ops(space))
    astate = place(all_engine.init(0, shape))
    mask = space.op_mask()
    uniform = base.Choice(space.searchable_names, np.zeros(len(mask), np.int32),
                          np.asarray(mask / mask.sum(-1, keepdims=True), np.float32))
    (astate, _), c = _timed(lambda: all_engine.train_step(astate, batch, uniform, 0.1))
    times = []
    for _ in range(3):
      (astate, _), dt = _timed(lambda: all_engine.train_step(astate, batch, uniform, 0.1))
      times.append(dt)
    all_ops_ms = 1000 * statistics.median(times)
    print(f'all candidates (Gumbel-softmax) step: {all_ops_ms:.0f} ms (compile {c:.1f} s)')

  peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  if fixed_ms:
    print(f'single / fixed: {single_ms / fixed_ms:.2f} (bar <= 1.5); per-architecture ratios '
          f'{", ".join(f"{r:.2f}" for r in ratios)}')
  if all_ops_ms:
    print(f'all-ops / single: {all_ops_ms / single_ms:.1f}x (bar >= 4)')
  print(f'first step {first_step_s:.1f} s (bar <= 60); peak RSS {peak_rss_mb:.0f} MB; '
        f'{jax.device_count()} {jax.default_backend()} device(s)'
        + (f'; map guard looked {guard.last} mappings' if guard and guard.last else ''))
  ratio = lambda a, b: a and b and round(a / b, 3)
  print(json.dumps({'single_path_ms': round(single_ms, 1),
                    'fixed_ms': fixed_ms and round(fixed_ms, 1),
                    'all_ops_ms': all_ops_ms and round(all_ops_ms, 1),
                    'first_step_s': round(first_step_s, 2), 'compile_s': round(first_step_s, 1),
                    'first_step_compiles': first_step_compiles,
                    'repeat_compiles': repeat_compiles, 'compiles': log.count,
                    'recompiled': len(recompiled), 'compile_total_s': round(log.seconds, 1),
                    'programs': programs, 'maps': maps, 'max_map_count': max_maps,
                    'single_path_rss_mb': round(single_path_rss_mb),
                    'peak_rss_mb': round(peak_rss_mb), 'placed': not args.unplaced,
                    'single_over_fixed': ratio(single_ms, fixed_ms),
                    'all_ops_over_single': ratio(all_ops_ms, single_ms)}))


if __name__ == '__main__':
  main()
