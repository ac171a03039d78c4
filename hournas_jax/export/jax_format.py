"""The 'jax' format: a serialized `jax.export` artifact with a symbolic batch dimension.

StableHLO with the weights as constants, `model.jax_export`; checked by
`jax.export.deserialize(...).call(x)` at batch 1 and at the batch of compared inputs. It runs
on the platform it was exported on (this one).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hournas_jax.export import base, inference

JAX_FILE = 'model.jax_export'


def export_jax(apply_fn: Callable, variables, input_shape: Sequence[int], *,
               fold: bool = True) -> bytes:
  """The serialized `jax.export` artifact of x -> apply_fn(variables, x).

  Args:
    apply_fn: (variables, x [N, H, W, C]) -> logits [N, classes], inference mode.
    variables: its variables.
    input_shape: (H, W, C); a batch dimension given is replaced by the symbolic one ('b').
    fold: fold BatchNorm into the preceding convs first (`inference.fold_batchnorm`).

  Returns:
    The artifact's bytes; its input is [b, H, W, C] float32 for any b.
  """
  shape = tuple(int(d) for d in input_shape)[-3:]
  fn = inference.inference_function(apply_fn, variables, fold=fold)
  (b,) = jax.export.symbolic_shape('b')
  spec = jax.ShapeDtypeStruct((b, *shape), jnp.float32)
  exported = jax.export.export(jax.jit(fn))(spec)
  return bytes(exported.serialize())


def run_jax_export(blob: bytes, x) -> np.ndarray:
  """The artifact's outputs for x [N, H, W, C] (any N), as numpy ([N, classes] for a model)."""
  exported = jax.export.deserialize(bytearray(blob))
  return np.asarray(exported.call(jnp.asarray(x, jnp.float32)))


def jax_export_latency_ms(blob: bytes, input_shape: Sequence[int], *, warmup: int = 10,
                          repeats: int = 50) -> float:
  """Median ms of one call at batch 1 of the deserialized artifact (compiled once) on inputs
  of input_shape (H, W, C; a batch dimension given is dropped)."""
  exported = jax.export.deserialize(bytearray(blob))
  call = jax.jit(exported.call)
  x = jnp.asarray(np.random.default_rng(0).standard_normal(base.batch_shape(input_shape[-3:])),
                  jnp.float32)
  return base.median_ms(lambda: call(x).block_until_ready(), warmup, repeats)


def _convert(job: base.Job, precision: str | None) -> bytes:
  del precision  # one float32 artifact
  return export_jax(job.model.apply_fn, job.model.variables, job.model.image_shape)


def _run(blob: bytes, x: np.ndarray, threads: int) -> np.ndarray:
  del threads  # XLA uses its own thread pool
  return run_jax_export(blob, x)


def _latency_ms(blob: bytes, job: base.Job) -> dict:
  return {f'xla {jax.default_backend()}': jax_export_latency_ms(
      blob, job.model.image_shape, warmup=job.warmup, repeats=job.repeats)}


def _runtime() -> str:
  return f'jax.export {jax.__version__} ({jax.default_backend()}, its default threads)'


def _extras(blob: bytes, job: base.Job, outputs: np.ndarray) -> dict:
  # The symbolic batch: one sample and all of them, through the same artifact.
  one = run_jax_export(blob, job.inputs[:1])
  return {'symbolic_batch': True, 'batch_sizes_checked': {
      '1': base.compare(job.reference[:1], one)['max_abs_diff'],
      str(len(job.inputs)): base.compare(job.reference, outputs)['max_abs_diff']}}


FORMAT = base.Format(
    name='jax', filename=lambda precision: JAX_FILE, convert=_convert, run=_run,
    latency_ms=_latency_ms, runtime=_runtime, extras=_extras)
