"""What every export format shares: the error, the model and job types, the `Format` entry.

A `Format` says how one format is made, run and timed; `report.export_model` drives every entry
of its table the same way. `compare` and `median_ms` are the measurements all formats report.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from hournas_jax import errors

EXTRAS_HINT = 'pip install -r requirements-export.txt'


class ExportError(errors.UserError, ValueError):
  """An export that cannot be made as asked (format, model, converter); the message says why."""


@dataclasses.dataclass
class Model:
  """What an export needs: inference apply, variables, input (H, W, C) and a description."""
  apply_fn: Callable  # (variables, x [N, H, W, C]) -> logits [N, classes], inference mode
  variables: Any
  image_shape: tuple[int, int, int]
  info: dict


@dataclasses.dataclass
class Job:
  """One `export_model` call, as the formats' callbacks see it."""
  model: Model
  inputs: np.ndarray  # [N, H, W, C] float32, what every export is compared on
  reference: np.ndarray  # [N, classes]: the JAX model's logits of `inputs`
  representative: Any  # int8 calibration inputs (None: random ones)
  threads: Sequence[int]  # latency thread counts; the first also runs the comparison
  warmup: int
  repeats: int
  # (format, precision) -> the bytes of each file made so far, as read back from disk.
  made: dict = dataclasses.field(default_factory=dict)


class Format(NamedTuple):
  """One export format: how its file is named, made, run and timed.

  Attributes:
    name: the name in config.export.formats and in the report.
    filename: precision -> the file's name in the output folder.
    convert: (job, precision) -> the file's bytes.
    run: (blob, x [N, H, W, C], threads) -> float32 logits [N, classes] of the loaded file.
    latency_ms: (blob, job) -> {runtime setting: median ms of one call at batch 1}.
    runtime: () -> the runtime's name and version, as the report gives it.
    extras: (blob, job, outputs [N, classes]) -> the format's own report fields.
    precisions: the precisions made: None for the requested TFLite precisions, (None,) for one
      file without a precision.
    require: () -> None, raising ExportError when an optional package is missing (called
      before any slow work); None when nothing is optional.
  """
  name: str
  filename: Callable[[str | None], str]
  convert: Callable[[Job, str | None], bytes]
  run: Callable[[bytes, np.ndarray, int], np.ndarray]
  latency_ms: Callable[[bytes, Job], dict]
  runtime: Callable[[], str]
  extras: Callable[[bytes, Job, np.ndarray], dict]
  precisions: tuple | None = (None,)
  require: Callable[[], Any] | None = None


def compare(reference, output) -> dict:
  """How far an export's logits are from the JAX model's.

  Args:
    reference: the JAX model's logits, [N, classes].
    output: the export's logits, [N, classes].

  Returns:
    {'max_abs_diff', 'max_abs_logit' (the reference's largest |logit|), 'top1_agreement'}.
  """
  reference = np.asarray(reference, np.float32)
  output = np.asarray(output, np.float32)
  return {'max_abs_diff': float(np.max(np.abs(output - reference))),
          'max_abs_logit': float(np.max(np.abs(reference))),
          'top1_agreement': float(np.mean(np.argmax(output, -1) == np.argmax(reference, -1)))}


def median_ms(fn: Callable[[], Any], warmup: int, repeats: int) -> float:
  """The median time of a call.

  Args:
    fn: () -> anything; the call timed (it must block until its work is done).
    warmup: calls before timing.
    repeats: timed calls (at least one).

  Returns:
    The median milliseconds of the timed calls.
  """
  for _ in range(max(0, int(warmup))):
    fn()
  times = []
  for _ in range(max(1, int(repeats))):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def per_thread_ms(latency: Callable[..., float], blob: bytes, job: Job) -> dict:
  """{str(threads): latency(blob, threads=, warmup=, repeats=)} over the job's thread counts."""
  return {str(t): latency(blob, threads=t, warmup=job.warmup, repeats=job.repeats)
          for t in job.threads}


def batch_shape(input_shape: Sequence[int], batch: int = 1) -> tuple[int, ...]:
  """input_shape with its batch dimension: (H, W, C) gets `batch` in front; a 4-D shape is
  taken as it is."""
  shape = tuple(int(d) for d in input_shape)
  return (batch, *shape) if len(shape) == 3 else shape
