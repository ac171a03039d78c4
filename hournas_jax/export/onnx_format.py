"""The 'onnx' format: the float32 TFLite model through tf2onnx, run with ONNX Runtime.

`model.onnx`. An optional extra (tf2onnx, onnxruntime): `pip install -r
requirements-export.txt`; `require_onnx` says so in one line before any slow work.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import warnings

import numpy as np

from hournas_jax.export import base, tflite

ONNX_FILE = 'model.onnx'


def require_onnx():
  """(tf2onnx, onnxruntime), imported.

  Returns:
    The two modules.

  Raises:
    ExportError: either is missing, with the install hint (call this before slow work when
      ONNX is asked for).
  """
  try:
    import onnxruntime  # pylint: disable=g-import-not-at-top
    import tf2onnx  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise base.ExportError(f'ONNX export needs tf2onnx and onnxruntime ({e.name} is missing): '
                           f'{base.EXTRAS_HINT}') from None
  return tf2onnx, onnxruntime


def to_onnx(tflite_blob: bytes, *, opset: int | None = None) -> bytes:
  """An ONNX model of a float32 TFLite model (tf2onnx's TFLite front end)."""
  require_onnx()
  import tf2onnx.convert  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'model.tflite')
    with open(path, 'wb') as f:
      f.write(tflite_blob)
    try:
      with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.simplefilter('ignore')  # tf2onnx reads the model with tf.lite.Interpreter
        proto, _ = tf2onnx.convert.from_tflite(path, opset=opset)
    except Exception as e:  # pylint: disable=broad-except
      raise base.ExportError(f'tf2onnx could not convert the TFLite model: {e}') from e
  return proto.SerializeToString()


def _onnx_session(blob: bytes, threads: int):
  _, ort = require_onnx()
  options = ort.SessionOptions()
  options.intra_op_num_threads = int(threads)
  options.inter_op_num_threads = 1
  return ort.InferenceSession(blob, options, providers=['CPUExecutionProvider'])


def run_onnx(blob: bytes, x, *, threads: int = 1) -> np.ndarray:
  """The ONNX model's outputs, one model batch at a time.

  Args:
    blob: the serialized ONNX model.
    x: inputs [N, H, W, C].
    threads: ONNX Runtime's intra-op threads.

  Returns:
    Outputs [N, ...] ([N, classes] for a network).
  """
  session = _onnx_session(blob, threads)
  inp = session.get_inputs()[0]
  x = np.asarray(x, np.float32)
  batch = inp.shape[0] if isinstance(inp.shape[0], int) else x.shape[0]
  return np.concatenate([session.run(None, {inp.name: x[i:i + batch]})[0]
                         for i in range(0, x.shape[0], batch)])


def onnx_latency_ms(blob: bytes, *, threads: int = 1, warmup: int = 10,
                    repeats: int = 50) -> float:
  """Median ms of one run at the model's batch (1 where it is symbolic) on `threads` threads."""
  session = _onnx_session(blob, threads)
  inp = session.get_inputs()[0]
  shape = [d if isinstance(d, int) else 1 for d in inp.shape]
  feed = {inp.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
  return base.median_ms(lambda: session.run(None, feed), warmup, repeats)


def _convert(job: base.Job, precision: str) -> bytes:
  del precision  # float32 only
  source = job.made.get(('tflite', 'float32'))
  if source is None:  # the float32 TFLite model was not asked for
    source = tflite.to_tflite(job.model.apply_fn, job.model.variables, job.model.image_shape)
  return to_onnx(source)


FORMAT = base.Format(
    name='onnx', filename=lambda precision: ONNX_FILE, convert=_convert,
    run=lambda blob, x, threads: run_onnx(blob, x, threads=threads),
    latency_ms=lambda blob, job: base.per_thread_ms(onnx_latency_ms, blob, job),
    runtime=lambda: f'onnxruntime {require_onnx()[1].__version__} (CPUExecutionProvider)',
    extras=lambda blob, job, outputs: {'batch': 1, 'via': 'float32 TFLite model, tf2onnx'},
    precisions=('float32',), require=require_onnx)
