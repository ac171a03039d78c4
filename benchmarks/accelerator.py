"""What a HourNAS ImageNet search costs on the device at hand (an H100/H200 GPU; a CPU works too).

One run measures, on `jax.devices()[0]`:

1. Each SuperNet engine that runs Gumbel-Max paths (`engines.ENGINES` entries with
   `runs == 'path'`: 'single_path', 'switch', ...), in each precision of --precisions: the full
   search iteration of `search.Searcher.train_step` (sample a path, weight step, and an
   architecture step every `val_every`-th iteration) in the non-vital stage -- the larger
   SuperNet, every searchable layer -- on the FBNet space at 224x224, 1000 classes, global
   batch 256, synthetic data already on the device (one batch reused). Reported: compile time
   (the first iteration, and until every candidate's programs are compiled), the steady-state
   iteration time (median over --steps, with `jax.block_until_ready` on the state: iterations
   with a weight step only, and those with an architecture step too), images/s (D_tr and D_val
   images over a cycle of `val_every` iterations), host time per iteration (CPU time of the
   Python thread that dispatches: Python, tracing-cache lookups and launches; the wall time of
   the call before the final block is shown too, but `Searcher.train_step` reads the loss back,
   so that one includes waiting for the device), and peak device memory
   (`memory_stats()['peak_bytes_in_use']`, the process's peak so far; None on a CPU).
   A precision is run when the search config has a `precision` field or the engine's
   constructor takes `dtype` / `precision`; otherwise it is reported null with the reason.
   'single_path' chains its iteration from Python (the sampler, each sampled block's programs,
   the architecture update); 'switch' is fusable, so the searcher runs each of its iterations
   as one program (`fused_iteration`); `programs_compiled` counts what each compiled, and
   `auto_engine` is what search.engine='auto' picks here (these figures should confirm it).
2. The fixed network of HourNAS-A (`engines.all_candidates.AllCandidatesEngine` over
   `supernet.fixed_layer_ops(space, hournas_a)`, `engines.Choice.none`): one SGD step at the
   same batch, the reference; search / fixed is the iteration time over the fixed step.
3. The all-candidates search iteration ('all_candidates' engine, sampler gumbel_softmax): every
   candidate of every layer runs; where the batch does not fit in device memory, half of it is
   tried, and so on (the batch used is reported).
4. The input pipeline: --pipeline-images synthetic JPEGs of ImageNet's typical size (about
   500x375, quality 90, smooth gradients plus noise: ~100 KB each, ImageNet's mean) written as
   TFRecords of a TFDS `imagenet2012` (a builder with its features, train and validation
   splits) in a temporary directory, then read by the project's own ImageNet training path,
   `hournas_jax.data.make_batches('imagenet2012', 'search_train', ...)` (shuffle, decode and
   random-resized crop, flip, normalize, batch), in a child process pinned to one core and in
   one pinned to every core of this process's affinity. Reported: images/s and images/s per
   core.
5. `projected_search_minutes`: the paper's two-stage ImageNet search, one epoch per stage
   (1,281,167 images a stage: 80% D_tr weight steps, 20% D_val architecture steps), at
   min(the best engine's images/s, the pipeline's all-core images/s). Stage 1 trains the smaller
   S_vital; it is counted at the non-vital rate (an upper bound on its time).

Order: the float32 engines and fixed network, the pipeline, the other precisions, the
all-candidates ablation; with --budget-s, what has not started when the budget is spent is
skipped (benchmarks/accelerator.sh passes what is left of its 8 minutes). The search state is
put on the device (committed) before the first step, as the batch is, so each program compiles
once.

Prints readable lines; the last line is JSON (keys listed in the README section "Accelerator
benchmark"). Anything that cannot run (an engine, a precision, memory, no TensorFlow) is null
with a reason in `notes`; the run itself does not fail.

    python benchmarks/accelerator.py                    # defaults: the paper's sizes
    python benchmarks/accelerator.py --tiny             # CPU-sized, a few minutes
    python benchmarks/accelerator.py --engines switch --precisions float32 --skip-pipeline
"""

from __future__ import annotations

import argparse
import gc
import inspect
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

IMAGENET_TRAIN_IMAGES = 1_281_167
SEARCH_STAGES = 2
REFERENCE_PRESET = 'hournas_a'
PIPELINE_DATASET = 'imagenet2012'
MB = 1024 * 1024
# --tiny's candidate ops: few programs to compile on a 2-core CPU (the full space's layers and
# shapes; its search paths are lighter than the fixed HourNAS-A, so search / fixed < 1 there).
TINY_OPS = 'k3e1,skip'
TINY_BUDGET_S = 270.0


# --------------------------------------------------------------------------------------------
# Arguments.


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--space', default=None, help="search space (default fbnet)")
  p.add_argument('--width', type=float, default=None, help='channel multiplier (default 1.0)')
  p.add_argument('--ops', default=None,
                 help="comma-separated subset of the space's candidate ops ('' = all, the "
                      'default; --tiny keeps k3e1 and skip)')
  p.add_argument('--image-size', type=int, default=None, help='input resolution (default 224)')
  p.add_argument('--classes', type=int, default=None, help='classes (default 1000)')
  p.add_argument('--batch', type=int, default=None, help='global batch (default 256)')
  p.add_argument('--steps', type=int, default=None,
                 help='timed search iterations per engine, rounded up to a multiple of '
                      'val_every (default 20)')
  p.add_argument('--fixed-steps', type=int, default=None,
                 help='timed steps of the fixed network (default: --steps)')
  p.add_argument('--engines', default='',
                 help="comma-separated path engines ('' = every registered engine with "
                      "runs == 'path')")
  p.add_argument('--precisions', default='float32,bfloat16')
  p.add_argument('--skip-fixed', action='store_true')
  p.add_argument('--skip-all-candidates', action='store_true')
  p.add_argument('--skip-pipeline', action='store_true')
  p.add_argument('--pipeline-images', type=int, default=None,
                 help='synthetic JPEGs written (default 512)')
  p.add_argument('--pipeline-jpeg-size', default=None,
                 help='HxW around which JPEG sizes vary (default 375x500)')
  p.add_argument('--pipeline-batch', type=int, default=None,
                 help='batch of the pipeline measurement (default min(--batch, 64): several '
                      'batches per epoch of the few images written)')
  p.add_argument('--pipeline-seconds', type=float, default=None,
                 help='timed reading per measurement, after one warm-up epoch (default 12)')
  p.add_argument('--budget-s', type=float, default=None,
                 help='> 0: skip the measurements not yet started once this many seconds '
                      'have passed (each is reported null, "skipped: time budget"); default '
                      'none (--tiny: 270)')
  p.add_argument('--fast-compile', action='store_true',
                 help='jax_disable_most_optimizations: faster compiles, slower steps (for '
                      'smoke runs only; --tiny sets it)')
  p.add_argument('--tiny', action='store_true',
                 help=f'CPU-sized: fbnet width 0.25 with ops {TINY_OPS} at 32 px, batch 8, '
                      f'4 iterations, 32 small JPEGs, fast compile, a {TINY_BUDGET_S:.0f} s '
                      'budget')
  # Internal: the input-pipeline child processes.
  p.add_argument('--pipeline-worker', choices=('write', 'read'), help=argparse.SUPPRESS)
  p.add_argument('--data-dir', help=argparse.SUPPRESS)
  p.add_argument('--cores', type=int, default=0, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  defaults = dict(space='fbnet', width=1.0, ops='', budget_s=0.0, image_size=224, classes=1000,
                  batch=256, steps=20, pipeline_images=512, pipeline_jpeg_size='375x500',
                  pipeline_seconds=12.0)
  if args.tiny:
    defaults.update(width=0.25, ops=TINY_OPS, budget_s=TINY_BUDGET_S, image_size=32, batch=8,
                    steps=4, pipeline_images=32, pipeline_jpeg_size='120x160',
                    pipeline_seconds=3.0)
    args.fast_compile = True
  for key, value in defaults.items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  if args.fixed_steps is None:
    args.fixed_steps = args.steps
  if args.pipeline_batch is None:
    args.pipeline_batch = min(args.batch, 64)
  for key in ('image_size', 'classes', 'batch', 'steps', 'fixed_steps', 'pipeline_images',
              'pipeline_batch'):
    if getattr(args, key) < 1:
      p.error(f'--{key.replace("_", "-")} must be >= 1')
  try:
    h, w = (int(v) for v in args.pipeline_jpeg_size.lower().split('x'))
    args.jpeg_hw = (h, w)
  except ValueError:
    p.error(f'--pipeline-jpeg-size must be HxW, got {args.pipeline_jpeg_size!r}')
  args.precision_list = [s.strip() for s in args.precisions.split(',') if s.strip()]
  unknown = [s for s in args.precision_list if s not in ('float32', 'bfloat16', 'float16')]
  if unknown:
    p.error(f'unknown precision(s) {", ".join(unknown)}: float32, bfloat16, float16')
  return args


def _reason(e: BaseException, limit: int = 400) -> str:
  """A one-line description of an exception: its first line, with runs of a repeated prefix
  ('Error dispatching computation: ' x 20 before the cause) shown once, and the cause kept
  when it has to be shortened."""
  lines = str(e).strip().splitlines()
  parts = []
  for part in (lines[0] if lines else '').split(': '):
    if not parts or part != parts[-1]:
      parts.append(part)
  text = f'{type(e).__name__}: ' + ': '.join(parts)
  return text if len(text) <= limit else f'{text[:limit // 2]} ... {text[-limit // 2:]}'


def _out_of_memory(e: BaseException) -> bool:
  text = str(e)
  return 'RESOURCE_EXHAUSTED' in text or 'out of memory' in text.lower()


def _round(x, digits=1):
  return None if x is None else round(float(x), digits)


# --------------------------------------------------------------------------------------------
# Device measurements.


class Bench:
  """The JAX side: the space, a batch on the device, the search config, the timings."""

  def __init__(self, args, notes: dict):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from hournas_jax import arch as arch_lib, costs, spaces  # pylint: disable=g-import-not-at-top
    self.jax, self.jnp, self.np = jax, jnp, np
    self.args, self.notes = args, notes
    self.start = time.perf_counter()
    self.device = jax.devices()[0]
    ops = tuple(o.strip() for o in args.ops.split(',') if o.strip()) or None
    make = lambda ops: spaces.get_space(args.space, resolution=args.image_size,
                                        num_classes=args.classes, width=args.width, ops=ops)
    self.space = make(ops)
    self.shape = (args.image_size, args.image_size, 3)
    # The fixed reference network: HourNAS-A where the space is FBNet's, else k3e3 (or each
    # layer's first op) everywhere; in the space with all its ops (--ops only narrows the
    # search).
    self.full_space = make(None)
    try:
      self.reference_ops = arch_lib.resolve(REFERENCE_PRESET, self.full_space).ops
      self.reference_name = REFERENCE_PRESET
    except Exception:  # pylint: disable=broad-except
      op = 'k3e3' if 'k3e3' in self.full_space.op_names else None
      self.reference_ops = tuple(op if op in l.ops else l.ops[0]
                                 for l in self.full_space.searchable_layers)
      self.reference_name = f'{op or "first op"} everywhere'
      notes['reference'] = (f'preset {REFERENCE_PRESET} is not of space {self.space.name}; the '
                            f'fixed network is {self.reference_name}')
    # The search targets: the reference's cost (HourNAS-A: the paper's 4.8M params / 300M
    # FLOPs), or, where the searched ops cannot reach it, the middle of what they reach.
    full_tables = costs.cost_tables(self.full_space)
    reference = np.array(full_tables.cost(
        [self.full_space.op_names.index(o) for o in self.reference_ops]), np.float64)
    tables = costs.cost_tables(self.space)
    low, high = costs.reachable_range(tables.stacked(), tables.mask, tables.fixed())
    targets = np.where((low <= reference) & (reference <= high), reference, (low + high) / 2)
    self.targets = {'params': float(targets[0]), 'flops': float(targets[1]), 'latency_ms': 0.0}
    self.reference_cost = reference
    self.tables = tables
    self.batches = {}

  # ----- Helpers.

  def over_budget(self) -> bool:
    return bool(self.args.budget_s) and time.perf_counter() - self.start > self.args.budget_s

  def batch(self, size: int):
    if size not in self.batches:
      rng = self.np.random.default_rng(0)
      images = rng.standard_normal((size, *self.shape)).astype(self.np.float32)
      labels = rng.integers(0, self.space.num_classes, size).astype(self.np.int32)
      self.batches[size] = {'image': self.jax.device_put(images, self.device),
                            'label': self.jax.device_put(labels, self.device)}
    return self.batches[size]

  def block(self, tree):
    self.jax.block_until_ready(tree)

  def peak_mb(self):
    try:
      stats = self.device.memory_stats()
    except Exception:  # pylint: disable=broad-except
      stats = None
    if not stats or 'peak_bytes_in_use' not in stats:
      return None
    return stats['peak_bytes_in_use'] / MB

  def release(self):
    gc.collect()

  # ----- Precisions.

  def compute_dtype(self, precision: str):
    """The engines' `dtype` argument of a precision (None: float32 throughout)."""
    from hournas_jax import blocks  # pylint: disable=g-import-not-at-top
    if hasattr(blocks, 'compute_dtype'):
      return blocks.compute_dtype(precision)
    return None if precision == 'float32' else getattr(self.jnp, precision)

  def precision_route(self, engine_cls, precision: str):
    """(how, value, reason): how a precision reaches the engine: ('config', value) through a
    search config field `precision`, ('kwarg', (name, value)) through the engine constructor,
    ('default', None) for float32 where neither exists, or (None, None, reason)."""
    from configs import default as default_lib  # pylint: disable=g-import-not-at-top
    if 'precision' in default_lib.get_search_config():
      return 'config', precision, ''
    params = inspect.signature(engine_cls.__init__).parameters
    if 'precision' in params:
      return 'kwarg', ('precision', precision), ''
    if 'dtype' in params:
      return 'kwarg', ('dtype', self.compute_dtype(precision)), ''
    if precision == 'float32':
      return 'default', None, ''
    return None, None, (f'unsupported: the search config has no "precision" field and '
                        f'{engine_cls.__name__} takes no dtype')

  # ----- The search iteration.

  def search_cfg(self, engine: str, sampler: str):
    from configs import default as default_lib  # pylint: disable=g-import-not-at-top
    cfg = default_lib.get_search_config()
    cfg.vital_priority = False  # one non-vital stage over every searchable layer
    cfg.engine = engine
    cfg.sampler = sampler
    return cfg

  def measure_search(self, engine: str, sampler: str, precision: str, batch_size: int):
    """Times `Searcher.train_step` in the non-vital stage. Returns a dict of figures."""
    from hournas_jax import compiles, engines, search  # pylint: disable=g-import-not-at-top
    jax, jnp, np = self.jax, self.jnp, self.np
    engine_cls = engines.ENGINES[engine]
    how, value, reason = self.precision_route(engine_cls, precision)
    if how is None:
      return {'unsupported': reason}
    cfg = self.search_cfg(engine, sampler)
    factory = None
    if how == 'config':
      cfg.precision = value
    elif how == 'kwarg':
      factory = lambda layer_ops: engine_cls(
          self.space, layer_ops, momentum=float(cfg.momentum),
          weight_decay=float(cfg.weight_decay), **{value[0]: value[1]})
    searcher = search.Searcher(self.space, cfg, self.targets, self.shape, vital_steps=0,
                               nonvital_steps=10 ** 9, tables=self.tables,
                               engine_factory=factory)
    k = searcher.schedule.val_every
    batch = self.batch(batch_size)

    def iterate(state):
      needs_tr, needs_val = searcher.batches_needed(state)
      state, _ = searcher.train_step(state, batch if needs_tr else None,
                                     batch if needs_val else None)
      return state, needs_val

    log = compiles.CompileLog().__enter__()
    t = time.perf_counter()
    state = searcher.init(0)
    # Committed to the device, as the batch is: a program's inputs then keep one placement,
    # and each compiles once (uncommitted initial arrays would compile every program a second
    # time, when its inputs first come out of a step).
    state = state.replace(**self.jax.device_put(state.arrays(), self.device))
    self.block(state.arrays())
    init_s = time.perf_counter() - t
    t = time.perf_counter()
    state, _ = iterate(state)
    self.block(state.arrays())
    first_s = time.perf_counter() - t
    # Compile every candidate's programs: op j at every layer that has it, a weight step and
    # an architecture step each (random paths then only hit compiled programs). A fusable
    # engine runs each iteration as one program of the searcher's, whatever the path: its
    # iterations compile it.
    t = time.perf_counter()
    stage = searcher.stage_of(state)
    if engine_cls.runs == 'path' and not engine_cls.fusable:
      weights = state.weights
      for op in self.space.op_names:
        idx = np.array([self.space.op_names.index(op if op in self.space.layer(n).ops
                                                  else self.space.layer(n).ops[0])
                        for n in stage.layers], np.int32)
        choice = engines.Choice(stage.layers, jnp.asarray(idx),
                                jax.nn.one_hot(idx, len(self.space.op_names)))
        weights, _ = stage.engine.train_step(weights, batch, choice, 0.01)
        weights, _, _ = stage.engine.arch_grads(weights, batch, choice)
      state = state.replace(weights=weights)
    while state.step % k or state.step < k:  # one cycle: the architecture update compiles
      state, _ = iterate(state)
    self.block(state.arrays())
    warm_s = time.perf_counter() - t
    log.__exit__(None, None, None)

    steps = -(-self.args.steps // k) * k
    weight_only, with_arch, host, call = [], [], [], []
    for _ in range(steps):
      t, c = time.perf_counter(), time.thread_time()
      state, had_val = iterate(state)
      t_call, c_call = time.perf_counter(), time.thread_time()
      self.block(state.arrays())
      dt = time.perf_counter() - t
      (with_arch if had_val else weight_only).append(dt)
      host.append(c_call - c)
      call.append(t_call - t)
    step_s = statistics.median(weight_only) if weight_only else None
    arch_s = statistics.median(with_arch) if with_arch else None
    # A cycle: k - 1 weight-only iterations and one with the architecture step; k D_tr
    # batches and one D_val batch.
    cycle_s = (k - 1) * (step_s or 0.0) + (arch_s if arch_s is not None else step_s)
    img_s = (k + 1) * batch_size / cycle_s
    out = {'img_s': img_s, 'step_ms': 1e3 * step_s if step_s else None,
           'arch_step_ms': 1e3 * arch_s if arch_s else None,
           'host_ms': 1e3 * statistics.median(host), 'call_ms': 1e3 * statistics.median(call),
           'compile_s': first_s + warm_s, 'first_step_s': first_s, 'init_s': init_s,
           'steps': steps, 'val_every': k, 'batch': batch_size, 'peak_mb': self.peak_mb(),
           'precision_route': how, 'programs': log.count,
           # Programs dispatched by one iteration: the fused one, or the chain of the sampler,
           # every sampled block's programs and the architecture update.
           'fused': bool(engine_cls.fusable)}
    return out

  def measure_fixed(self, precision: str):
    """One SGD step of the reference architecture's fixed network (the whole-network engine)."""
    from hournas_jax import engines, supernet  # pylint: disable=g-import-not-at-top
    engine = engines.ENGINES['all_candidates'](
        self.full_space, supernet.fixed_layer_ops(self.full_space, self.reference_ops),
        dtype=self.compute_dtype(precision))
    batch = self.batch(self.args.batch)
    no_choice = engines.Choice.none(self.full_space)
    state = self.jax.device_put(engine.init(0, self.shape), self.device)
    t = time.perf_counter()
    state, _ = engine.train_step(state, batch, no_choice, 0.01)
    self.block(state)
    compile_s = time.perf_counter() - t
    times, host, call = [], [], []
    for _ in range(self.args.fixed_steps):
      t, c = time.perf_counter(), time.thread_time()
      state, metrics = engine.train_step(state, batch, no_choice, 0.01)
      call.append(time.perf_counter() - t)
      host.append(time.thread_time() - c)
      self.block((state, metrics))
      times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    out = {'img_s': self.args.batch / step_s, 'step_ms': 1e3 * step_s, 'compile_s': compile_s,
           'first_step_s': compile_s, 'host_ms': 1e3 * statistics.median(host),
           'call_ms': 1e3 * statistics.median(call), 'peak_mb': self.peak_mb()}
    return out


# --------------------------------------------------------------------------------------------
# The input pipeline (child processes: TensorFlow never shares a process with the device run).


def _synthetic_jpeg(rng, height: int, width: int) -> bytes:
  """A photo-like JPEG: smooth colour gradients, blotchy mid-frequency texture and fine noise
  (about 100 KB at 500x375, quality 90, as ImageNet's mean file)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  y, x = np.mgrid[0:height, 0:width].astype(np.float32)
  image = np.empty((height, width, 3), np.float32)
  for c in range(3):
    fy, fx, phase = rng.uniform(0.5, 4, 2), rng.uniform(0.5, 4, 2), rng.uniform(0, 6.3, 2)
    image[..., c] = (128 + 60 * np.sin(2 * np.pi * fy[0] * y / height + phase[0])
                     * np.cos(2 * np.pi * fx[0] * x / width + phase[1])
                     + 30 * np.sin(2 * np.pi * (fy[1] * y / height + fx[1] * x / width)))
  blotches = rng.normal(0, 25, (height // 8 + 1, width // 8 + 1, 3)).astype(np.float32)
  image += np.repeat(np.repeat(blotches, 8, 0), 8, 1)[:height, :width]
  image += rng.normal(0, 18, image.shape).astype(np.float32)
  pixels = np.clip(image, 0, 255).astype(np.uint8)
  return tf.io.encode_jpeg(pixels, quality=90).numpy()


def _write_worker(args) -> dict:
  """Writes the synthetic imagenet2012 (TFDS format) into args.data_dir."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  # TensorFlow through the data package first: it hides the accelerators from TensorFlow.
  from hournas_jax.data import tf_batches  # noqa: F401  pylint: disable=unused-import
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.datasets.imagenet2012 import (  # pylint: disable=g-import-not-at-top
      imagenet2012_dataset_builder as imagenet_builder, imagenet_common)

  n_train = args.pipeline_images
  n_val = max(1, n_train // 8)
  height, width = args.jpeg_hw
  sizes = []

  def examples(seed: int, count: int):
    rng = np.random.default_rng(seed)
    for i in range(count):
      # ImageNet's photos: mostly landscape 4:3, some portrait, sizes varying around the mean.
      scale = rng.uniform(0.8, 1.2)
      h, w = max(8, int(height * scale)), max(8, int(width * scale))
      if rng.random() < 0.25:
        h, w = w, h
      data = _synthetic_jpeg(rng, h, w)
      sizes.append(len(data))
      yield f'{seed}_{i}', {'image': io.BytesIO(data), 'label': int(rng.integers(1000)),
                            'file_name': f'synthetic_{seed}_{i}.JPEG'}

  # The builder writes a dataset that TFDS's own imagenet2012 builder reads back: the same
  # name, version and features; only the examples differ. It is not registered, so the real
  # builder stays the one `tfds.builder('imagenet2012')` gives.
  with tfds.core.registered.skip_registration():
    class SyntheticImagenet(imagenet_builder.Builder):  # pylint: disable=unused-variable
      name = PIPELINE_DATASET

      def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(encoding_format='jpeg'),
                'label': tfds.features.ClassLabel(names_file=imagenet_common.label_names_file()),
                'file_name': tfds.features.Text(),
            }),
            supervised_keys=('image', 'label'))

      def _split_generators(self, dl_manager):
        del dl_manager
        return {'train': examples(0, n_train), 'validation': examples(1, n_val)}

  t = time.perf_counter()
  builder = SyntheticImagenet(data_dir=args.data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=os.path.join(args.data_dir, 'manual')))
  return {'write_s': time.perf_counter() - t, 'images': n_train + n_val,
          'mean_jpeg_kb': sum(sizes) / len(sizes) / 1e3}


def _read_worker(args) -> dict:
  """Times hournas_jax.data.make_batches('imagenet2012', 'search_train') on args.cores cores."""
  cpus = sorted(os.sched_getaffinity(0))
  cores = min(args.cores or len(cpus), len(cpus))
  os.sched_setaffinity(0, cpus[:cores])  # before TensorFlow sizes its thread pools
  from hournas_jax import data  # pylint: disable=g-import-not-at-top
  batch = args.pipeline_batch
  info = data.dataset_info(PIPELINE_DATASET, args.data_dir)
  per_epoch = data.steps_per_epoch(PIPELINE_DATASET, 'search_train', batch,
                                   data_dir=args.data_dir)
  batches = data.make_batches(PIPELINE_DATASET, 'search_train', batch_size=batch,
                              image_size=args.image_size, seed=0, data_dir=args.data_dir)
  t = time.perf_counter()
  for _ in range(per_epoch):  # warm-up: the first epoch (tracing, thread pools, autotuning)
    first = next(batches)
  warmup_s = time.perf_counter() - t
  assert first['image'].shape == (batch, args.image_size, args.image_size, 3), first['image'].shape
  count, t = 0, time.perf_counter()
  while True:
    for _ in range(per_epoch):  # whole epochs: each rebuilds the pipeline, as a long run does
      next(batches)
      count += batch
    elapsed = time.perf_counter() - t
    if elapsed >= args.pipeline_seconds:
      break
  return {'cores': cores, 'img_s': count / elapsed, 'images': count, 'seconds': elapsed,
          'warmup_s': warmup_s, 'steps_per_epoch': per_epoch,
          'search_train_images': info['splits']['search_train']}


def _child(args, worker: str, data_dir: str, cores: int = 0, timeout: float = 900) -> dict:
  """Runs this script as a pipeline worker; its last stdout line is its JSON."""
  argv = [sys.executable, os.path.abspath(__file__), '--pipeline-worker', worker,
          '--data-dir', data_dir, '--cores', str(cores),
          '--image-size', str(args.image_size), '--batch', str(args.batch),
          '--pipeline-batch', str(args.pipeline_batch),
          '--pipeline-images', str(args.pipeline_images),
          '--pipeline-jpeg-size', f'{args.jpeg_hw[0]}x{args.jpeg_hw[1]}',
          '--pipeline-seconds', str(args.pipeline_seconds)]
  # The children never touch an accelerator: TensorFlow is CPU-only here, and JAX (imported by
  # the data package) must not take device memory the parent holds.
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'CUDA_VISIBLE_DEVICES': '',
         'TF_CPP_MIN_LOG_LEVEL': '2'}
  run = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                       cwd=ROOT, check=False)
  lines = run.stdout.strip().splitlines()
  if run.returncode or not lines:
    tail = (run.stderr.strip().splitlines() or ['no output'])[-1]
    raise RuntimeError(f'pipeline {worker} worker failed (exit {run.returncode}): {tail}')
  return json.loads(lines[-1])


def measure_pipeline(args, notes: dict) -> dict:
  cpus = len(os.sched_getaffinity(0))
  data_dir = tempfile.mkdtemp(prefix='hournas_accelerator_')
  out = {}
  try:
    written = _child(args, 'write', data_dir)
    out['write'] = written
    print(f'pipeline: wrote {written["images"]} synthetic JPEGs (mean '
          f'{written["mean_jpeg_kb"]:.0f} KB, ~{args.jpeg_hw[1]}x{args.jpeg_hw[0]}) as TFDS '
          f'{PIPELINE_DATASET} in {written["write_s"]:.1f} s', flush=True)
    for cores in sorted({1, cpus}):
      r = _child(args, 'read', data_dir, cores)
      out[cores] = r
      print(f'pipeline: make_batches({PIPELINE_DATASET!r}, "search_train"), {cores} core(s): '
            f'{r["img_s"]:.0f} images/s ({r["img_s"] / cores:.0f} per core; '
            f'{r["images"]} images in {r["seconds"]:.1f} s after a {r["warmup_s"]:.1f} s '
            f'warm-up epoch)', flush=True)
  except Exception as e:  # pylint: disable=broad-except
    notes['pipeline'] = _reason(e)
    print(f'pipeline: not measured ({_reason(e)})', flush=True)
  finally:
    shutil.rmtree(data_dir, ignore_errors=True)
  out['cpus'] = cpus
  return out


# --------------------------------------------------------------------------------------------
# The run.


def _path_engines(requested: str, notes: dict) -> list[str]:
  from hournas_jax import engines  # pylint: disable=g-import-not-at-top
  names = []
  for name, engine_cls in engines.ENGINES.items():
    if engine_cls.runs == 'path':
      names.append(name)
  if requested:
    wanted = [n.strip() for n in requested.split(',') if n.strip()]
    for n in wanted:
      if n not in names:
        notes[n] = (f'not a path engine of engines.ENGINES (path engines: '
                    f'{", ".join(names) or "none"})')
    names = [n for n in names if n in wanted]
  return names


def _describe_device() -> tuple[str, str, int]:
  import jax  # pylint: disable=g-import-not-at-top
  d = jax.devices()[0]
  kind = getattr(d, 'device_kind', '') or d.platform
  return f'{kind} ({d.platform}, {jax.device_count()} device(s))', d.platform, jax.device_count()


def run(args) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  if args.fast_compile:
    jax.config.update('jax_disable_most_optimizations', True)
  total = time.perf_counter()
  notes = {}
  device, backend, count = _describe_device()
  print(f'device: {device}; jax {jax.__version__}; {len(os.sched_getaffinity(0))} CPU core(s)'
        + ('; fast compile (jax_disable_most_optimizations): steps are slower than a real run'
           if args.fast_compile else ''), flush=True)
  bench = Bench(args, notes)
  space = bench.space
  print(f'space {space.name} width {args.width} at {args.image_size} px, {space.num_classes} '
        f'classes, batch {args.batch}, {len(space.searchable_names)} searchable layers x '
        f'{len(space.op_names)} ops; fixed reference {bench.reference_name} '
        f'({bench.reference_cost[0] / 1e6:.2f}M params, {bench.reference_cost[1] / 1e6:.1f}M '
        f'FLOPs); search targets {bench.targets["params"] / 1e6:.2f}M params, '
        f'{bench.targets["flops"] / 1e6:.1f}M FLOPs', flush=True)
  names = _path_engines(args.engines, notes)
  results = {}  # 'name/precision' -> figures
  out_of_memory = set()  # the keys whose last attempt ran out of device memory

  def attempt(key, fn):
    if bench.over_budget():
      results[key] = None
      notes[key] = 'skipped: time budget'
      print(f'{key}: skipped (time budget)', flush=True)
      return None
    t = time.perf_counter()
    try:
      r = fn()
    except Exception as e:  # pylint: disable=broad-except
      r = {'error': _reason(e)}
      if _out_of_memory(e):
        out_of_memory.add(key)
    bench.release()
    if 'unsupported' in r or 'error' in r:
      notes[key] = r.get('unsupported') or r['error']
      print(f'{key}: {notes[key]}', flush=True)
      results[key] = None
      return None
    r['wall_s'] = time.perf_counter() - t
    results[key] = r
    return r

  def search_line(key, r):
    arch = f', with architecture step {r["arch_step_ms"]:.1f} ms' if r['arch_step_ms'] else ''
    peak = (f', peak device memory so far {r["peak_mb"]:.0f} MB' if r['peak_mb'] is not None
            else '')
    step = f'{r["step_ms"]:.1f} ms' if r['step_ms'] else 'n/a'
    print(f'{key}: {r["img_s"]:.1f} images/s; iteration {step}{arch} '
          f'(median of {r["steps"]}, batch {r["batch"]}); host {r["host_ms"]:.1f} ms/iteration '
          f'(call returns after {r["call_ms"]:.1f} ms); compile {r["compile_s"]:.1f} s '
          f'(first iteration {r["first_step_s"]:.1f} s){peak}', flush=True)

  def path_engine(name, precision):
    key = f'{name}/{precision}'
    r = attempt(key, lambda: bench.measure_search(name, 'gumbel_max', precision, args.batch))
    if r:
      search_line(key, r)

  def fixed(precision):
    key = f'fixed/{precision}'
    r = attempt(key, lambda: bench.measure_fixed(precision))
    if r:
      print(f'{key} ({bench.reference_name}): {r["img_s"]:.1f} images/s; step '
            f'{r["step_ms"]:.1f} ms (median of {args.fixed_steps}); host {r["host_ms"]:.1f} ms; '
            f'compile {r["compile_s"]:.1f} s', flush=True)

  def all_candidates():
    key = 'all_candidates/float32'
    size, last_error = args.batch, None
    while True:
      r = attempt(key, lambda: bench.measure_search('all_candidates', 'gumbel_softmax',
                                                    'float32', size))
      if r or key not in out_of_memory or size == 1:
        break
      out_of_memory.discard(key)
      last_error = notes.pop(key)
      print(f'{key}: batch {size} does not fit; trying {size // 2}', flush=True)
      size //= 2
    if r:
      if size != args.batch:
        notes[key] = f'batch {args.batch} does not fit in device memory ({last_error}); ' \
                     f'measured at batch {size}'
      search_line(key, r)

  # In the order of what the projection needs, should a time budget cut the run short:
  # float32, the pipeline, the other precisions, and last the all-candidates ablation (the
  # largest memory; an out-of-memory there cannot disturb the others).
  first = 'float32' if 'float32' in args.precision_list else None
  for precision in [p for p in args.precision_list if p == first]:
    for name in names:
      path_engine(name, precision)
    if not args.skip_fixed:
      fixed(precision)
  pipeline = {}
  if not args.skip_pipeline:
    if bench.over_budget():
      notes['pipeline'] = 'skipped: time budget'
      print('pipeline: skipped (time budget)', flush=True)
    else:
      pipeline = measure_pipeline(args, notes)
  for precision in [p for p in args.precision_list if p != first]:
    for name in names:
      path_engine(name, precision)
    if not args.skip_fixed:
      fixed(precision)
  if not args.skip_all_candidates:
    all_candidates()

  return summarize(args, bench, names, results, pipeline, notes, device, backend, count,
                   time.perf_counter() - total)


def summarize(args, bench, names, results, pipeline, notes, device, backend, count, wall_s):
  from hournas_jax import engines  # pylint: disable=g-import-not-at-top

  def nested(field, digits=1, keys=None):
    out = {}
    for key, r in results.items():
      name, precision = key.split('/')
      if keys is not None and name not in keys:
        continue
      out.setdefault(name, {})[precision] = _round(r and r.get(field), digits)
    return out

  engines_img_s = nested('img_s', keys=names)
  fixed = {p: _round(r and r['img_s']) for k, r in results.items()
           for n, p in [k.split('/')] if n == 'fixed'}
  fixed_step = {k.split('/')[1]: r and r['step_ms'] for k, r in results.items()
                if k.startswith('fixed/')}
  over_fixed = {}
  for name in names:
    for precision in args.precision_list:
      r = results.get(f'{name}/{precision}')
      f = fixed_step.get(precision)  # the fixed network in the same precision
      if r and f and r['step_ms']:
        over_fixed.setdefault(name, {})[precision] = round(r['step_ms'] / f, 2)
  all_c = results.get('all_candidates/float32')
  best = max(((r['img_s'], k) for k, r in results.items()
              if r and k.split('/')[0] in names), default=(None, None))
  cpus = pipeline.get('cpus', len(os.sched_getaffinity(0)))
  single = pipeline.get(1)
  many = pipeline.get(cpus) if cpus in pipeline else None
  pipeline_img_s = many['img_s'] if many else None
  bound, projected = None, None
  if best[0]:
    rate = best[0]
    bound = 'device'
    if pipeline_img_s is not None and pipeline_img_s < rate:
      rate, bound = pipeline_img_s, 'input pipeline'
    projected = SEARCH_STAGES * IMAGENET_TRAIN_IMAGES / rate / 60
  peaks = [r['peak_mb'] for r in results.values() if r and r.get('peak_mb') is not None]
  if not peaks:
    notes.setdefault('peak_device_mb', f'the {backend} device reports no memory statistics')
  out = {
      'device': device, 'backend': backend, 'device_count': count,
      'sizes': {'space': bench.space.name, 'ops': list(bench.space.op_names),
                'width': args.width, 'image_size': args.image_size,
                'classes': bench.space.num_classes, 'batch': args.batch,
                'steps': max([r['steps'] for k, r in results.items()
                              if r and 'steps' in r] or [args.steps]),
                'fixed_steps': args.fixed_steps,
                'val_every': next((r['val_every'] for r in results.values()
                                   if r and 'val_every' in r), None),
                'pipeline_images': None if args.skip_pipeline else args.pipeline_images,
                'pipeline_jpeg_hw': None if args.skip_pipeline else list(args.jpeg_hw),
                'pipeline_batch': None if args.skip_pipeline else args.pipeline_batch,
                'fast_compile': bool(args.fast_compile)},
      'engines': engines_img_s,
      'step_ms': nested('step_ms', keys=names),
      'arch_step_ms': nested('arch_step_ms', keys=names),
      'search_over_fixed': over_fixed,
      'best_engine': best[1],
      'fixed_img_s': fixed.get('float32'),
      'fixed_img_s_by_precision': fixed,
      'fixed_arch': bench.reference_name,
      'all_candidates_img_s': _round(all_c and all_c['img_s']),
      'all_candidates_batch': all_c and all_c['batch'],
      'pipeline_img_s': _round(pipeline_img_s),
      'pipeline_cores': many and many['cores'],
      'pipeline_img_s_single_core': _round(single and single['img_s']),
      'pipeline_img_s_per_core': _round(many and many['img_s'] / many['cores']),
      'pipeline_mean_jpeg_kb': _round(pipeline.get('write', {}).get('mean_jpeg_kb')),
      'cores_to_feed_best_engine': (round(best[0] / single['img_s'], 1)
                                    if best[0] and single else None),
      'peak_device_mb': _round(max(peaks)) if peaks else None,
      'compile_s': nested('compile_s'),
      'first_step_s': nested('first_step_s'),
      'programs_compiled': nested('programs', 0),
      'fused_iteration': {n: bool(getattr(engines.ENGINES[n], 'fusable', False)) for n in names},
      'auto_engine': engines.auto_engine('gumbel_max'),
      'host_ms_per_step': nested('host_ms', 2),
      'call_ms_per_step': nested('call_ms', 2),
      'projected_search_minutes': _round(projected),
      'projection_bound': bound,
      'notes': notes,
      'wall_s': round(wall_s, 1),
  }
  if best[0]:
    print(f'best engine {best[1]}: {best[0]:.1f} images/s', flush=True)
  for name, per in over_fixed.items():
    for precision, ratio in per.items():
      print(f'{name}/{precision} iteration / fixed {REFERENCE_PRESET} step: {ratio:.2f}',
            flush=True)
  if all_c and best[0]:
    print(f'all candidates: {all_c["img_s"]:.1f} images/s at batch {all_c["batch"]} '
          f'({best[0] / all_c["img_s"]:.1f}x slower than {best[1]})', flush=True)
  if projected is not None:
    print(f'projected search ({SEARCH_STAGES} stages x 1 epoch of {IMAGENET_TRAIN_IMAGES:,} '
          f'images; stage 1 at the non-vital rate): {projected:.1f} min, bound by the {bound}'
          + ('' if pipeline_img_s is not None else ' (pipeline not measured)'), flush=True)
  for key, note in notes.items():
    print(f'note: {key}: {note}', flush=True)
  print(f'total {wall_s:.0f} s', flush=True)
  return out


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.pipeline_worker:
    worker = _write_worker if args.pipeline_worker == 'write' else _read_worker
    out = worker(args)
    print(json.dumps(out), flush=True)
    return out
  out = run(args)
  print(json.dumps(out), flush=True)
  return out


if __name__ == '__main__':
  main()
