"""The 'tflite' format: conversion (float32, float16, int8 quantization) and the interpreter.

`to_tflite` converts any apply_fn(variables, x) at batch 1 through `jax2tf` and the TFLite
converter, builtin ops only (TFLITE_BUILTINS; no Flex or custom ops): 'float32', 'float16'
(float16 weights, float32 compute) or 'int8' (full-integer post-training quantization, int8
inputs and outputs, calibrated on a representative dataset). Depthwise convs are traced as
convolutions (DEPTHWISE_CONV_2D), not as the shifted multiply-adds XLA:CPU prefers
(blocks.depthwise_shifted). `run_tflite` and `tflite_latency_ms` run a flatbuffer with
ai_edge_litert when it is installed, else tf.lite. TensorFlow is imported only when needed.
"""

from __future__ import annotations

import collections
import warnings
from typing import Callable, Sequence

import jax
import numpy as np

from hournas_jax import tf_env
from hournas_jax.export import base, inference, model as model_lib

PRECISIONS = ('float32', 'float16', 'int8')
# int8 calibration inputs drawn at random when an export is given none.
RANDOM_CALIBRATION_EXAMPLES = 100


def tflite_file(precision: str) -> str:
  """The file name of a TFLite model of `precision`."""
  return f'model_{precision}.tflite'


def _tf():
  tf_env.quiet()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf


# --------------------------------------------------------------------------------------------
# Conversion.


def _representative_samples(representative, shape):
  """Batch-1 float32 arrays of `shape` from an array of samples (N, H, W, C), one sample
  (H, W, C), an iterable of either, or a callable returning such an iterable."""
  if callable(representative):
    representative = representative()
  if isinstance(representative, (np.ndarray, jax.Array)):
    representative = [representative]
  for item in representative:
    item = np.asarray(item, np.float32)
    if item.ndim == len(shape) - 1:
      item = item[None]
    if item.ndim != len(shape) or item.shape[1:] != tuple(shape[1:]):
      raise base.ExportError(f'representative samples must have shape {tuple(shape[1:])} '
                             f'(with or without a batch dimension), got {item.shape}')
    for row in item:
      yield row[None]


def to_tflite(apply_fn: Callable, variables, input_shape: Sequence[int], *,
              precision: str = 'float32', representative=None, fold: bool = True) -> bytes:
  """A TFLite flatbuffer of x -> apply_fn(variables, x), inference mode, builtin ops only.

  Args:
    apply_fn: any function of (variables, x [1, H, W, C]) made of Flax modules or plain JAX,
      e.g. `lambda v, x: net.apply(v, x, train=False)` or a single block's apply.
    variables: its variables.
    input_shape: the input's shape at batch 1, (1, H, W, C); (H, W, C) gets batch 1.
    precision: 'float32'; 'float16' (float16 weights, float32 compute); 'int8' (full-integer
      post-training quantization: int8 weights, activations, input and output; `run_tflite`
      quantizes and dequantizes).
    representative: for 'int8', calibration inputs: an array of samples [N, H, W, C], an
      iterable of arrays, or a callable returning one (e.g. batches of the training data).
    fold: fold BatchNorm into the preceding convs first (`fold_batchnorm`).

  Returns:
    The flatbuffer's bytes.

  Raises:
    ExportError: a precision is unknown, int8 lacks representative data, or the converter
      cannot express the function in builtin ops.
  """
  if precision not in PRECISIONS:
    raise base.ExportError(f'unknown TFLite precision {precision!r}; one of '
                           f'{", ".join(PRECISIONS)}')
  if precision == 'int8' and representative is None:
    raise base.ExportError('int8 quantization needs representative inputs (calibration data)')
  shape = base.batch_shape(input_shape)
  tf = _tf()
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  fn = inference.inference_function(apply_fn, variables, fold=fold, for_tflite=True)
  converted = jax2tf.convert(fn, with_gradient=False, native_serialization_platforms=('cpu',))
  tf_fn = tf.function(converted, autograph=False,
                      input_signature=[tf.TensorSpec(shape, tf.float32, name='input')])
  converter = tf.lite.TFLiteConverter.from_concrete_functions(
      [tf_fn.get_concrete_function()], tf_fn)
  converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
  if precision == 'float16':
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_types = [tf.float16]
  elif precision == 'int8':
    samples = list(_representative_samples(representative, shape))
    if not samples:
      raise base.ExportError('int8 quantization needs representative inputs; none were given')
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([s] for s in samples)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
  try:
    with warnings.catch_warnings():
      # int8 inputs: "Statistics for quantized inputs were expected" (they come from the
      # representative data).
      warnings.filterwarnings('ignore', message='Statistics for quantized inputs')
      blob = bytes(converter.convert())
  except Exception as e:  # pylint: disable=broad-except
    first = next((l for l in str(e).splitlines() if 'error' in l.lower()), str(e)[:300])
    raise base.ExportError(f'the TFLite converter failed ({precision}, builtin ops only): '
                           f'{first.strip()}') from e
  nonbuiltin = [op for op in tflite_ops(blob) if not is_builtin(op)]
  if nonbuiltin:
    raise base.ExportError(f'the TFLite model needs non-builtin ops: {", ".join(nonbuiltin)}')
  return blob


def tflite_ops(blob: bytes) -> collections.Counter:
  """Operator name -> count in a TFLite flatbuffer, read from the flatbuffer itself (no
  runtime): builtin names ('CONV_2D'), 'CUSTOM:<code>' for custom and Flex ops."""
  from tensorflow.lite.python import schema_py_generated as schema  # pylint: disable=g-import-not-at-top
  model = schema.ModelT.InitFromPackedBuf(bytearray(blob), 0)
  names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith('_')}
  codes = []
  for code in model.operatorCodes:
    builtin = max(int(code.builtinCode), int(code.deprecatedBuiltinCode))
    if builtin == schema.BuiltinOperator.CUSTOM or code.customCode:
      custom = code.customCode
      codes.append(f'CUSTOM:{custom.decode() if isinstance(custom, bytes) else custom}')
    else:
      codes.append(names.get(builtin, f'BUILTIN_{builtin}'))
  counts = collections.Counter()
  for subgraph in model.subgraphs:
    for op in subgraph.operators or []:
      counts[codes[op.opcodeIndex]] += 1
  return counts


def is_builtin(op_name: str) -> bool:
  """Whether a `tflite_ops` name is a builtin op (not custom, Flex or unknown)."""
  return not (op_name.startswith('CUSTOM') or op_name.startswith('Flex')
              or op_name.startswith('BUILTIN_'))


# --------------------------------------------------------------------------------------------
# Running.


def tflite_runtime() -> str:
  """The interpreter `run_tflite` uses: ai_edge_litert when installed, else tf.lite."""
  try:
    import ai_edge_litert  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
    from importlib import metadata  # pylint: disable=g-import-not-at-top
    return f'ai_edge_litert {metadata.version("ai-edge-litert")}'
  except ImportError:
    return f'tf.lite {_tf().__version__}'
  except Exception:  # pylint: disable=broad-except
    return 'ai_edge_litert'


def tflite_interpreter(blob: bytes, threads: int):
  """A TFLite interpreter of the flatbuffer `blob` on `threads` threads, its tensors allocated:
  the one `run_tflite` and `tflite_latency_ms` use (ai_edge_litert when installed, else
  tf.lite; see `tflite_runtime`), with its default delegate (XNNPACK for float models)."""
  try:
    from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top
  except ImportError:
    Interpreter = _tf().lite.Interpreter  # pylint: disable=invalid-name
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # tf.lite.Interpreter's deprecation notice
    interpreter = Interpreter(model_content=bytes(blob), num_threads=int(threads))
  interpreter.allocate_tensors()
  return interpreter


def _quantize(x: np.ndarray, detail) -> np.ndarray:
  dtype = detail['dtype']
  if not np.issubdtype(dtype, np.integer):
    return x.astype(dtype)
  scale, zero = detail['quantization']
  info = np.iinfo(dtype)
  return np.clip(np.round(x / scale + zero), info.min, info.max).astype(dtype)


def _dequantize(y: np.ndarray, detail) -> np.ndarray:
  if not np.issubdtype(y.dtype, np.integer):
    return y.astype(np.float32)
  scale, zero = detail['quantization']
  return ((y.astype(np.float32) - zero) * scale).astype(np.float32)


def run_tflite(blob: bytes, x, *, threads: int = 1) -> np.ndarray:
  """The TFLite model's outputs, one model batch at a time (one sample for `to_tflite`'s).

  Args:
    blob: the flatbuffer.
    x: inputs [N, H, W, C]; int8 models get them quantized.
    threads: the interpreter's threads.

  Returns:
    float32 outputs [N, ...] ([N, classes] for a network), int8 ones dequantized.
  """
  interpreter = tflite_interpreter(blob, threads)
  (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
  x = np.asarray(x, np.float32)
  model_batch = int(inp['shape'][0])
  chunks = [x] if model_batch == x.shape[0] else [x[i:i + model_batch]
                                                  for i in range(0, x.shape[0], model_batch)]
  outputs = []
  for chunk in chunks:
    if chunk.shape != tuple(inp['shape']):
      raise base.ExportError(f'the TFLite model takes inputs of shape {tuple(inp["shape"])}, '
                             f'got {chunk.shape}')
    interpreter.set_tensor(inp['index'], _quantize(chunk, inp))
    interpreter.invoke()
    outputs.append(_dequantize(interpreter.get_tensor(out['index']), out))
  return np.concatenate(outputs)


def tflite_latency_ms(blob: bytes, *, threads: int = 1, warmup: int = 10,
                      repeats: int = 50) -> float:
  """Median ms of one invoke (the model's batch, 1 for `to_tflite`'s) on `threads` threads,
  after `warmup` invokes, with the runtime's default delegate (XNNPACK for float models)."""
  interpreter = tflite_interpreter(blob, threads)
  (inp,) = interpreter.get_input_details()
  x = np.random.default_rng(0).standard_normal(inp['shape']).astype(np.float32)
  interpreter.set_tensor(inp['index'], _quantize(x, inp))
  return base.median_ms(interpreter.invoke, warmup, repeats)


# --------------------------------------------------------------------------------------------
# The format's entry.


def _convert(job: base.Job, precision: str) -> bytes:
  representative = job.representative
  if precision == 'int8' and representative is None:
    representative = model_lib.random_inputs(
        job.model.image_shape, RANDOM_CALIBRATION_EXAMPLES, model_lib.CALIBRATION_SEED)
  return to_tflite(job.model.apply_fn, job.model.variables, job.model.image_shape,
                   precision=precision, representative=representative)


FORMAT = base.Format(
    name='tflite', filename=tflite_file, convert=_convert,
    run=lambda blob, x, threads: run_tflite(blob, x, threads=threads),
    latency_ms=lambda blob, job: base.per_thread_ms(tflite_latency_ms, blob, job),
    runtime=tflite_runtime,
    extras=lambda blob, job, outputs: {'ops': dict(sorted(tflite_ops(blob).items())),
                                       'batch': 1},
    precisions=None)
