"""Export of a fixed-architecture network for deployment, each export checked where it is made.

Formats (config.export.formats, or --formats of `python -m hournas_jax.tools.export`):
- 'jax': a serialized `jax.export` artifact (StableHLO with the weights as constants) whose
  batch dimension is symbolic, `model.jax_export`; checked by `jax.export.deserialize(...)
  .call(x)` at two batch sizes. It runs on the platform it was exported on (this one).
- 'tflite': a TFLite flatbuffer at batch 1 through `jax2tf` and the TFLite converter, builtin
  ops only (TFLITE_BUILTINS; no Flex or custom ops), `model_<precision>.tflite`: 'float32',
  'float16' (float16 weights, float32 compute) or 'int8' (full-integer post-training
  quantization, int8 inputs and outputs, calibrated on a representative dataset).
- 'onnx': the float32 TFLite model through tf2onnx, checked with ONNX Runtime, `model.onnx`.
  An optional extra: `pip install -r requirements-export.txt`.

Inference mode throughout: BatchNorm uses its running statistics, folded into the preceding
conv's kernel and a new bias before conversion (`fold_batchnorm`, run by `folded_batchnorm`).
Depthwise convs are traced as convolutions for TFLite (DEPTHWISE_CONV_2D), not as the
shifted multiply-adds XLA:CPU prefers (blocks.depthwise_shifted).

Each export is compared with the JAX model (unfolded, as trained) on real inputs: a batch of
the dataset's eval split for a trained model, random normal inputs for fresh weights; the
max abs difference of the logits, the top-1 agreement and the runtime's median latency at
batch 1 go to <out>/report.json.

    python main.py --config=configs/quickstart.py --workdir=/tmp/q --config.mode=export
    python -m hournas_jax.tools.export --workdir=/tmp/q --formats=jax,tflite,onnx
    python -m hournas_jax.tools.export --arch=hournas_a --out=/tmp/hournas_a \\
        --precision=float32,float16
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import re
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hournas_jax import blocks, errors, logging_utils

FORMATS = ('jax', 'tflite', 'onnx')
PRECISIONS = ('float32', 'float16', 'int8')
JAX_FILE = 'model.jax_export'
ONNX_FILE = 'model.onnx'
REPORT_FILE = 'report.json'
EXTRAS_HINT = 'pip install -r requirements-export.txt'


class ExportError(errors.UserError, ValueError):
  """An export that cannot be made as asked (format, model, converter); the message says why."""


def tflite_file(precision: str) -> str:
  return f'model_{precision}.tflite'


# --------------------------------------------------------------------------------------------
# BatchNorm folding.

_CONV_NAME = re.compile(r'^Conv_(\d+)$')
_BN_NAME = re.compile(r'^BatchNorm_(\d+)$')


def _numbered(names, pattern) -> list[str]:
  found = [(int(m.group(1)), n) for n in names if (m := pattern.match(n))]
  return [n for _, n in sorted(found)]


def has_batchnorm(variables) -> bool:
  """Whether `variables` hold BatchNorm running statistics (something to fold)."""
  return bool(jax.tree.leaves(variables.get('batch_stats', {}))) if isinstance(
      variables, Mapping) else False


def fold_batchnorm(variables, epsilon: float = blocks.BN_EPSILON):
  """Variables with every BatchNorm folded into the conv before it (a pure function).

  In each module scope the BatchNorms (BatchNorm_0, _1, ...) pair in order with the convs that
  have no bias (Conv_i without 'bias'; the squeeze-and-excitation convs have one and are never
  followed by a BatchNorm): the blocks of `blocks.py` call each such conv right before its
  BatchNorm. With s = scale / sqrt(var + epsilon), the conv's kernel becomes kernel * s (over
  its output channels) and it gets the bias `bias - mean * s`; the BatchNorm's params and
  statistics are dropped, so the result has no 'batch_stats'. Apply the result within
  `folded_batchnorm()`, where a BatchNorm without variables is the identity and a bias-free
  conv adds the bias it was given.

  Raises ValueError when a scope's BatchNorms do not pair with its convs (e.g. a weight-sharing
  SuperNet's candidates, whose kernels live in another scope).
  """
  if not has_batchnorm(variables):
    return variables
  params = variables.get('params', {})
  stats = variables['batch_stats']

  def walk(p: Mapping, s: Mapping, path: str):
    bns = _numbered([k for k in p if isinstance(p[k], Mapping)], _BN_NAME)
    convs = [k for k in _numbered([k for k in p if isinstance(p[k], Mapping)], _CONV_NAME)
             if 'kernel' in p[k] and 'bias' not in p[k]]
    if len(bns) != len(convs):
      raise ValueError(f'cannot fold the BatchNorms at {path or "/"}: {len(bns)} BatchNorms '
                       f'and {len(convs)} bias-free convs ({", ".join(convs) or "none"})')
    pairs = dict(zip(convs, bns))
    out = {}
    for key, value in p.items():
      if key in bns:
        continue
      if key in pairs:
        bn = pairs[key]
        if bn not in s or 'mean' not in s[bn] or 'var' not in s[bn]:
          raise ValueError(f'no running statistics for {path}/{bn}')
        kernel = jnp.asarray(value['kernel'])
        mean, var = jnp.asarray(s[bn]['mean']), jnp.asarray(s[bn]['var'])
        scale = jnp.asarray(p[bn].get('scale', jnp.ones_like(mean)))
        bias = jnp.asarray(p[bn].get('bias', jnp.zeros_like(mean)))
        if kernel.shape[-1] != mean.shape[-1]:
          raise ValueError(f'cannot fold {path}/{bn} ({mean.shape[-1]} channels) into '
                           f'{path}/{key} ({kernel.shape[-1]} output channels)')
        factor = scale * jax.lax.rsqrt(var + epsilon)
        out[key] = {**value, 'kernel': (kernel * factor).astype(kernel.dtype),
                    'bias': (bias - mean * factor).astype(kernel.dtype)}
      elif isinstance(value, Mapping):
        out[key] = walk(value, s.get(key, {}) if isinstance(s, Mapping) else {},
                        f'{path}/{key}')
      else:
        out[key] = value
    return out

  folded = {k: v for k, v in variables.items() if k not in ('params', 'batch_stats')}
  folded['params'] = walk(params, stats, '')
  return folded


def _interceptor(lax_convs: bool):
  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != '__call__':
      return next_fun(*args, **kwargs)
    if isinstance(module, nn.BatchNorm) and not module.has_variable('batch_stats', 'mean'):
      return args[0]  # folded into the conv before it
    if lax_convs and isinstance(module, blocks.Conv) and module.has_variable('params', 'kernel'):
      return _lax_conv(module, args[0])
    if getattr(module, 'use_bias', None) is False and module.has_variable('params', 'bias'):
      y = next_fun(*args, **kwargs)
      return y + module.get_variable('params', 'bias').astype(y.dtype)
    return next_fun(*args, **kwargs)

  return intercept


def _lax_conv(module: blocks.Conv, x):
  """`blocks.Conv` as one lax.conv_general_dilated, 1x1 and depthwise convs included."""
  kernel = module.get_variable('params', 'kernel').astype(x.dtype)
  pad = module.kernel // 2
  y = jax.lax.conv_general_dilated(
      x, kernel, (module.stride, module.stride), ((pad, pad), (pad, pad)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=module.groups)
  if module.has_variable('params', 'bias'):
    y = y + module.get_variable('params', 'bias').astype(y.dtype)
  return y


@contextlib.contextmanager
def folded_batchnorm(lax_convs: bool = False):
  """Within the block, Flax modules run on `fold_batchnorm`'s variables: a BatchNorm whose
  statistics were folded away is the identity, and a conv (use_bias=False) with a folded bias
  adds it. Modules with their own variables run as usual, so this is harmless elsewhere.

  lax_convs: every `blocks.Conv` runs as one convolution, not as the matmul (1x1) or shifted
  multiply-adds (depthwise) `blocks.conv2d` picks for XLA:CPU: what the TFLite converter maps
  to CONV_2D / DEPTHWISE_CONV_2D (its legalization of a 4-D matmul over 1x1 feature maps
  fails: "'tfl.batch_matmul' op found invalid output rank").
  """
  with nn.intercept_methods(_interceptor(lax_convs)):
    yield


def inference_function(apply_fn: Callable, variables, *, fold: bool = True,
                       for_tflite: bool = False) -> Callable:
  """x -> apply_fn(variables, x) with the variables baked in (constants once traced), BatchNorm
  folded when `fold` and the variables have any; `for_tflite`: convs as convolutions (see
  `folded_batchnorm`)."""
  if fold and has_batchnorm(variables):
    variables = fold_batchnorm(variables)
  variables = jax.tree.map(jnp.asarray, variables)
  depthwise = 'conv' if for_tflite else 'auto'

  def fn(x):
    with folded_batchnorm(lax_convs=for_tflite), blocks.depthwise_implementation(depthwise):
      return apply_fn(variables, x)

  return fn


def _batch_shape(input_shape: Sequence[int], batch: int = 1) -> tuple[int, ...]:
  """input_shape with its batch dimension: (H, W, C) gets `batch` in front; a 4-D shape is
  taken as it is."""
  shape = tuple(int(d) for d in input_shape)
  return (batch, *shape) if len(shape) == 3 else shape


# --------------------------------------------------------------------------------------------
# jax.export.


def export_jax(apply_fn: Callable, variables, input_shape: Sequence[int], *,
               fold: bool = True) -> bytes:
  """The serialized `jax.export` artifact of x -> apply_fn(variables, x), its batch
  dimension symbolic ('b'); input_shape is (H, W, C) (a batch dimension given is replaced)."""
  shape = tuple(int(d) for d in input_shape)[-3:]
  fn = inference_function(apply_fn, variables, fold=fold)
  (b,) = jax.export.symbolic_shape('b')
  spec = jax.ShapeDtypeStruct((b, *shape), jnp.float32)
  exported = jax.export.export(jax.jit(fn))(spec)
  return bytes(exported.serialize())


def run_jax_export(blob: bytes, x) -> np.ndarray:
  exported = jax.export.deserialize(bytearray(blob))
  return np.asarray(exported.call(jnp.asarray(x, jnp.float32)))


def jax_export_latency_ms(blob: bytes, input_shape: Sequence[int], *, warmup: int = 10,
                          repeats: int = 50) -> float:
  """Median ms of one call at batch 1 of the deserialized artifact (compiled once)."""
  exported = jax.export.deserialize(bytearray(blob))
  call = jax.jit(exported.call)
  x = jnp.asarray(np.random.default_rng(0).standard_normal(_batch_shape(input_shape[-3:])),
                  jnp.float32)
  return _median_ms(lambda: call(x).block_until_ready(), warmup, repeats)


def _median_ms(fn: Callable[[], Any], warmup: int, repeats: int) -> float:
  for _ in range(max(0, int(warmup))):
    fn()
  times = []
  for _ in range(max(1, int(repeats))):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


# --------------------------------------------------------------------------------------------
# TFLite.


def _tf():
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf


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
      raise ExportError(f'representative samples must have shape {tuple(shape[1:])} (with or '
                        f'without a batch dimension), got {item.shape}')
    for row in item:
      yield row[None]


def to_tflite(apply_fn: Callable, variables, input_shape: Sequence[int], *,
              precision: str = 'float32', representative=None, fold: bool = True) -> bytes:
  """A TFLite flatbuffer of x -> apply_fn(variables, x), inference mode, builtin ops only.

  apply_fn: any function of (variables, x) made of Flax modules or plain JAX, e.g.
    `lambda v, x: net.apply(v, x, train=False)` or a single block's apply.
  input_shape: the input's shape at batch 1, (1, H, W, C); (H, W, C) gets batch 1.
  precision: 'float32'; 'float16' (float16 weights, float32 compute); 'int8' (full-integer
    post-training quantization: int8 weights, activations, input and output; `run_tflite`
    quantizes and dequantizes).
  representative: for 'int8', calibration inputs: an array of samples (N, H, W, C), an iterable
    of arrays, or a callable returning one (e.g. batches of the training data).
  fold: fold BatchNorm into the preceding convs first (`fold_batchnorm`).
  Raises ExportError when a precision is unknown, int8 lacks representative data, or the
  converter cannot express the function in builtin ops.
  """
  if precision not in PRECISIONS:
    raise ExportError(f'unknown TFLite precision {precision!r}; one of {", ".join(PRECISIONS)}')
  if precision == 'int8' and representative is None:
    raise ExportError('int8 quantization needs representative inputs (calibration data)')
  shape = _batch_shape(input_shape)
  tf = _tf()
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  fn = inference_function(apply_fn, variables, fold=fold, for_tflite=True)
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
      raise ExportError('int8 quantization needs representative inputs; none were given')
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
    raise ExportError(f'the TFLite converter failed ({precision}, builtin ops only): '
                      f'{first.strip()}') from e
  nonbuiltin = [op for op in tflite_ops(blob) if not is_builtin(op)]
  if nonbuiltin:
    raise ExportError(f'the TFLite model needs non-builtin ops: {", ".join(nonbuiltin)}')
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
      custom = code.customCode.decode() if isinstance(code.customCode, bytes) else code.customCode
      codes.append(f'CUSTOM:{custom}')
    else:
      codes.append(names.get(builtin, f'BUILTIN_{builtin}'))
  counts = collections.Counter()
  for subgraph in model.subgraphs:
    for op in subgraph.operators or []:
      counts[codes[op.opcodeIndex]] += 1
  return counts


def is_builtin(op_name: str) -> bool:
  return not (op_name.startswith('CUSTOM') or op_name.startswith('Flex')
              or op_name.startswith('BUILTIN_'))


def tflite_runtime() -> str:
  """The interpreter `run_tflite` uses: ai_edge_litert when installed, else tf.lite."""
  try:
    import ai_edge_litert  # pylint: disable=g-import-not-at-top,unused-import
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
  """The TFLite model's float32 outputs for inputs x (N, H, W, C), one sample at a time when
  the model's batch is 1; int8 models get quantized inputs and give dequantized outputs."""
  interpreter = tflite_interpreter(blob, threads)
  (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
  x = np.asarray(x, np.float32)
  model_batch = int(inp['shape'][0])
  chunks = [x] if model_batch == x.shape[0] else [x[i:i + model_batch]
                                                  for i in range(0, x.shape[0], model_batch)]
  outputs = []
  for chunk in chunks:
    if chunk.shape != tuple(inp['shape']):
      raise ExportError(f'the TFLite model takes inputs of shape {tuple(inp["shape"])}, got '
                        f'{chunk.shape}')
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
  return _median_ms(interpreter.invoke, warmup, repeats)


# --------------------------------------------------------------------------------------------
# ONNX (optional: requirements-export.txt).


def require_onnx():
  """(tf2onnx, onnxruntime), imported; ExportError with the install hint when either is
  missing (call it before slow work when ONNX is asked for)."""
  try:
    import onnxruntime  # pylint: disable=g-import-not-at-top
    import tf2onnx  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ExportError(f'ONNX export needs tf2onnx and onnxruntime ({e.name} is missing): '
                      f'{EXTRAS_HINT}') from None
  return tf2onnx, onnxruntime


def to_onnx(tflite_blob: bytes, *, opset: int | None = None) -> bytes:
  """An ONNX model of a float32 TFLite model (tf2onnx's TFLite front end)."""
  tf2onnx, _ = require_onnx()
  import tf2onnx.convert  # pylint: disable=g-import-not-at-top,redefined-outer-name
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'model.tflite')
    with open(path, 'wb') as f:
      f.write(tflite_blob)
    try:
      with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.simplefilter('ignore')  # tf2onnx reads the model with tf.lite.Interpreter
        proto, _ = tf2onnx.convert.from_tflite(path, opset=opset)
    except Exception as e:  # pylint: disable=broad-except
      raise ExportError(f'tf2onnx could not convert the TFLite model: {e}') from e
  return proto.SerializeToString()


def _onnx_session(blob: bytes, threads: int):
  _, ort = require_onnx()
  options = ort.SessionOptions()
  options.intra_op_num_threads = int(threads)
  options.inter_op_num_threads = 1
  return ort.InferenceSession(blob, options, providers=['CPUExecutionProvider'])


def run_onnx(blob: bytes, x, *, threads: int = 1) -> np.ndarray:
  session = _onnx_session(blob, threads)
  inp = session.get_inputs()[0]
  x = np.asarray(x, np.float32)
  batch = inp.shape[0] if isinstance(inp.shape[0], int) else x.shape[0]
  return np.concatenate([session.run(None, {inp.name: x[i:i + batch]})[0]
                         for i in range(0, x.shape[0], batch)])


def onnx_latency_ms(blob: bytes, *, threads: int = 1, warmup: int = 10,
                    repeats: int = 50) -> float:
  session = _onnx_session(blob, threads)
  inp = session.get_inputs()[0]
  shape = [d if isinstance(d, int) else 1 for d in inp.shape]
  feed = {inp.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
  return _median_ms(lambda: session.run(None, feed), warmup, repeats)


# --------------------------------------------------------------------------------------------
# Export of a model, with checks and a report.


@dataclasses.dataclass
class Model:
  """What an export needs: inference apply, variables, input (H, W, C) and a description."""
  apply_fn: Callable  # (variables, x) -> logits, inference mode
  variables: Any
  image_shape: tuple[int, int, int]
  info: dict


def network_model(space, ops: Sequence[str], variables=None, *,
                  image_shape: Sequence[int] | None = None, seed: int = 0,
                  calibration=None, info: Mapping | None = None) -> Model:
  """The fixed network of `ops` in `space` on inputs image_shape (H, W, C; default the space's
  resolution, 3 channels); fresh weights (`SuperNet.init_all(seed)`) unless `variables`.

  calibration: inputs (N, H, W, C) whose batch statistics become the BatchNorms' running
  statistics (`batchnorm_statistics`). Fresh weights need it to mean anything in inference
  mode: with the initial statistics (mean 0, variance 1) no layer is normalized, the
  activations shrink layer by layer and every input gets nearly the same logits (~1e-8 for
  HourNAS-A), so neither differences nor top-1 agreement would say much.
  """
  from hournas_jax import supernet  # pylint: disable=g-import-not-at-top
  net = supernet.SuperNet(space, supernet.fixed_layer_ops(space, tuple(ops)))
  image_shape = tuple(int(d) for d in (image_shape or (space.resolution, space.resolution, 3)))
  if variables is None:
    variables = net.init_all(int(seed), image_shape)
  variables = {k: v for k, v in variables.items() if k in ('params', 'batch_stats')}
  description = {'space': space.name, 'width': space.width, 'num_classes': space.num_classes,
                 'stem_stride': space.stem_stride, 'ops': list(ops), **(info or {})}
  if calibration is not None:
    variables = batchnorm_statistics(net, variables, calibration)
    description['batchnorm_statistics'] = f'of {len(calibration)} calibration inputs'
  return Model(lambda v, x: net.apply(v, x, train=False), variables, image_shape, description)


def batchnorm_statistics(module, variables, x, momentum: float = blocks.BN_MOMENTUM):
  """`variables` with every BatchNorm's running statistics set to the batch statistics of its
  input in one training-mode pass over x (as each BatchNorm sees it, the layers before it
  normalized by their own batch statistics): inference on x then equals training mode on x."""
  # Training mode ignores the running statistics and moves them to momentum * old +
  # (1 - momentum) * batch: from old = 0 that is the batch's, scaled, at full precision.
  zeros = jax.tree.map(jnp.zeros_like, variables['batch_stats'])
  _, updated = module.apply({**variables, 'batch_stats': zeros}, jnp.asarray(x, jnp.float32),
                            train=True, mutable=['batch_stats'])
  stats = jax.tree.map(lambda new: new / (1.0 - momentum), updated['batch_stats'])
  stats = jax.tree_util.tree_map_with_path(
      lambda path, v: jnp.maximum(v, 0.0) if jax.tree_util.keystr(path).endswith("'var']")
      else v, stats)
  return {**variables, 'batch_stats': jax.tree.map(np.asarray, stats)}


CALIBRATION_SEED = 1  # random calibration inputs; the compared ones are drawn with seed 0


def random_inputs(image_shape: Sequence[int], count: int, seed: int) -> np.ndarray:
  """count standard normal inputs (the datasets' inputs are standardized the same way)."""
  return np.random.default_rng(seed).standard_normal(
      (int(count), *image_shape)).astype(np.float32)


def compare(reference, output) -> dict:
  """max abs difference of the logits, the reference's largest |logit| and top-1 agreement."""
  reference = np.asarray(reference, np.float32)
  output = np.asarray(output, np.float32)
  return {'max_abs_diff': float(np.max(np.abs(output - reference))),
          'max_abs_logit': float(np.max(np.abs(reference))),
          'top1_agreement': float(np.mean(np.argmax(output, -1) == np.argmax(reference, -1)))}


def reference_logits(model: Model, x, batch_size: int = 64) -> np.ndarray:
  apply = jax.jit(model.apply_fn)
  return np.concatenate([np.asarray(apply(model.variables, jnp.asarray(x[i:i + batch_size])))
                         for i in range(0, len(x), batch_size)])


def parse_list(text, allowed: Sequence[str], field: str) -> list[str]:
  items = [t.strip() for t in str(text).split(',') if t.strip()]
  unknown = [t for t in items if t not in allowed]
  if unknown or not items:
    raise ExportError(f'{field} must be a comma-separated list of {", ".join(allowed)}, got '
                      f'{text!r}')
  return list(dict.fromkeys(items))


def parse_threads(text, field: str = 'threads') -> list[int]:
  try:
    threads = [int(t) for t in str(text).split(',') if t.strip()]
  except ValueError:
    threads = []
  if not threads or min(threads) < 1:
    raise ExportError(f'{field} must be comma-separated thread counts >= 1, got {text!r}')
  return list(dict.fromkeys(threads))


def export_model(model: Model, out_dir: str, *, formats: Sequence[str] = ('jax', 'tflite'),
                 precisions: Sequence[str] = ('float32',), inputs=None,
                 inputs_source: str = 'random', representative=None,
                 threads: Sequence[int] = (1,), warmup: int = 10, repeats: int = 50,
                 examples: int = 16) -> dict:
  """Writes each format to out_dir, loads it in its runtime, compares it with the JAX model on
  `inputs` (N, H, W, C; random normal when None) and measures its latency at batch 1; writes
  and returns <out_dir>/report.json."""
  formats = parse_list(','.join(formats), FORMATS, 'formats')
  precisions = parse_list(','.join(precisions), PRECISIONS, 'precisions')
  threads = [int(t) for t in threads]
  if inputs is None:
    inputs = random_inputs(model.image_shape, max(2, int(examples)), seed=0)
    inputs_source = 'random normal'
  inputs = np.asarray(inputs, np.float32)
  if inputs.shape[1:] != tuple(model.image_shape):
    raise ExportError(f'comparison inputs have shape {inputs.shape[1:]}, the model takes '
                      f'{tuple(model.image_shape)}')
  if 'int8' in precisions and 'tflite' in formats and representative is None:
    representative = random_inputs(model.image_shape, 100, seed=CALIBRATION_SEED)
  os.makedirs(out_dir, exist_ok=True)
  reference = reference_logits(model, inputs)
  latency = {'batch': 1, 'warmup': int(warmup), 'repeats': int(repeats),
             'statistic': 'median'}
  entries = []

  def record(entry, path, blob, outputs, ms):
    entry.update(path=os.path.abspath(path), bytes=len(blob), **compare(reference, outputs),
                 examples=int(len(inputs)), latency_ms=ms)
    entries.append(entry)
    shown = ', '.join(f'{v:.3g} ms ({k} threads)' if k.isdigit() else f'{v:.3g} ms ({k})'
                      for k, v in ms.items())
    logging_utils.info(
        f'[export] {entry["format"]}{" " + entry["precision"] if "precision" in entry else ""}: '
        f'{path} ({len(blob) / 1e6:.2f} MB); max |diff| {entry["max_abs_diff"]:.3g} '
        f'(largest |logit| {entry["max_abs_logit"]:.3g}), top-1 agreement '
        f'{100 * entry["top1_agreement"]:.1f}% on {len(inputs)} inputs; latency at batch 1: '
        f'{shown}')

  if 'jax' in formats:
    start = time.perf_counter()
    blob = export_jax(model.apply_fn, model.variables, model.image_shape)
    seconds = time.perf_counter() - start
    path = os.path.join(out_dir, JAX_FILE)
    _write(path, blob)
    with open(path, 'rb') as f:
      loaded = f.read()
    # The symbolic batch: one sample and all of them, through the same artifact.
    outputs = run_jax_export(loaded, inputs)
    per_size = {'1': compare(reference[:1], run_jax_export(loaded, inputs[:1]))['max_abs_diff'],
                str(len(inputs)): compare(reference, outputs)['max_abs_diff']}
    ms = {f'xla {jax.default_backend()}': jax_export_latency_ms(
        loaded, model.image_shape, warmup=warmup, repeats=repeats)}
    record({'format': 'jax', 'runtime': f'jax.export {jax.__version__} '
            f'({jax.default_backend()}, its default threads)', 'symbolic_batch': True,
            'batch_sizes_checked': per_size, 'export_seconds': round(seconds, 2)},
           path, loaded, outputs, ms)

  float32_tflite = None
  if 'tflite' in formats:
    for precision in precisions:
      start = time.perf_counter()
      blob = to_tflite(model.apply_fn, model.variables, model.image_shape, precision=precision,
                       representative=representative)
      seconds = time.perf_counter() - start
      path = os.path.join(out_dir, tflite_file(precision))
      _write(path, blob)
      with open(path, 'rb') as f:
        loaded = f.read()
      if precision == 'float32':
        float32_tflite = loaded
      outputs = run_tflite(loaded, inputs, threads=threads[0])
      ms = {str(t): tflite_latency_ms(loaded, threads=t, warmup=warmup, repeats=repeats)
            for t in threads}
      record({'format': 'tflite', 'precision': precision, 'runtime': tflite_runtime(),
              'ops': dict(sorted(tflite_ops(loaded).items())), 'batch': 1,
              'export_seconds': round(seconds, 2)}, path, loaded, outputs, ms)

  if 'onnx' in formats:
    require_onnx()
    if float32_tflite is None:
      float32_tflite = to_tflite(model.apply_fn, model.variables, model.image_shape)
    start = time.perf_counter()
    blob = to_onnx(float32_tflite)
    seconds = time.perf_counter() - start
    path = os.path.join(out_dir, ONNX_FILE)
    _write(path, blob)
    with open(path, 'rb') as f:
      loaded = f.read()
    import onnxruntime  # pylint: disable=g-import-not-at-top
    outputs = run_onnx(loaded, inputs, threads=threads[0])
    ms = {str(t): onnx_latency_ms(loaded, threads=t, warmup=warmup, repeats=repeats)
          for t in threads}
    record({'format': 'onnx', 'precision': 'float32', 'runtime':
            f'onnxruntime {onnxruntime.__version__} (CPUExecutionProvider)', 'batch': 1,
            'via': 'float32 TFLite model, tf2onnx', 'export_seconds': round(seconds, 2)},
           path, loaded, outputs, ms)

  report = {'model': {**model.info, 'image_shape': list(model.image_shape)},
            'inputs': {'source': inputs_source, 'count': int(len(inputs))},
            'latency': latency, 'exports': entries}
  report['exports'] = _kept_entries(os.path.join(out_dir, REPORT_FILE), report) + entries
  if jax.process_index() == 0:
    from hournas_jax import checkpoint  # pylint: disable=g-import-not-at-top
    checkpoint.atomic_write_json(os.path.join(out_dir, REPORT_FILE), report)
  logging_utils.info(f'[export] report written to {os.path.join(out_dir, REPORT_FILE)}')
  return report


def _entry_key(entry) -> tuple:
  return entry.get('format'), entry.get('precision')


def _kept_entries(path: str, report) -> list:
  """The entries of an earlier report in the same folder, of the same model, inputs and latency
  settings, for the formats this export did not make again (so that exporting one more format
  adds to the report), whose files are still there."""
  try:
    with open(path) as f:
      old = json.load(f)
  except (OSError, ValueError):
    return []
  if not isinstance(old, dict) or any(old.get(k) != json.loads(json.dumps(report[k]))
                                      for k in ('model', 'inputs', 'latency')):
    return []
  made = {_entry_key(e) for e in report['exports']}
  return [e for e in old.get('exports', []) if isinstance(e, dict) and _entry_key(e) not in made
          and os.path.exists(str(e.get('path')))]


def _write(path: str, blob: bytes) -> None:
  tmp = f'{path}.tmp'
  with open(tmp, 'wb') as f:
    f.write(blob)
  os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# The 'export' mode.


def load_workdir_model(setup, calibration_examples: int = 100) -> tuple[Model, bool]:
  """(model, trained): the trained model of <workdir>/train when there is one, else the
  architecture of config.train.arch (or the workdir's arch.json) with fresh weights and
  BatchNorm statistics of `calibration_examples` random inputs."""
  from hournas_jax import arch as arch_lib  # pylint: disable=g-import-not-at-top
  from hournas_jax import checkpoint, mesh as mesh_lib, retrain, train  # pylint: disable=g-import-not-at-top
  config = setup.config
  run_dir = os.path.join(setup.workdir, 'train')
  checkpoints = retrain.RunPaths(run_dir).checkpoints
  trained = False
  if os.path.isdir(checkpoints):
    with checkpoint.Checkpointer(checkpoints, keep=config.keep_checkpoints) as ckpt:
      trained = ckpt.latest_step() is not None
  if trained:
    trainer, state, meta = retrain.load_model(setup, run_dir)
    train.check_model_data(setup, meta, run_dir)
    step = int(mesh_lib.to_host(state['step']))
    variables = mesh_lib.to_host(trainer.eval_variables(state))
    model = network_model(trainer.space, meta['ops'], variables,
                          image_shape=meta['image_shape'], info={
        'source': 'trained', 'run_dir': os.path.abspath(run_dir), 'step': step,
        'total_steps': int(meta['total_steps']), 'dataset': meta.get('dataset'),
        'weights': 'ema' if trainer.ema_decay else 'weights'})
    logging_utils.info(f'[export] the trained model of {run_dir} (step {step} of '
                       f'{meta["total_steps"]}): {",".join(meta["ops"])}')
    if config.train.arch and list(arch_lib.resolve(config.train.arch, setup.space).ops) != list(
        meta['ops']):
      logging_utils.info(f'[export] note: config.train.arch={config.train.arch!r} is not the '
                         'trained architecture; exporting the trained one')
    return model, True
  spec = config.train.arch
  if spec:
    ops = arch_lib.resolve(spec, setup.space).ops
  elif os.path.exists(os.path.join(setup.workdir, 'arch.json')):
    spec = os.path.join(setup.workdir, 'arch.json')
    ops = arch_lib.load(spec, setup.space).ops
  else:
    raise ExportError(f'nothing to export in {setup.workdir}: no trained model in {run_dir} '
                      'and no architecture (set --config.train.arch to a preset, a JSON file '
                      'or comma-separated ops, or train one first)')
  logging_utils.info(f'[export] no trained model in {run_dir}: exporting architecture {spec} '
                     f'with FRESH (untrained) weights, seed {config.seed}, BatchNorm statistics '
                     f'of {calibration_examples} random inputs')
  calibration = random_inputs(setup.image_shape, calibration_examples, CALIBRATION_SEED)
  return network_model(setup.space, ops, image_shape=setup.image_shape, seed=config.seed,
                       calibration=calibration, info={
                           'source': 'fresh weights', 'arch': spec,
                           'seed': int(config.seed)}), False


def _dataset_inputs(setup, split: str, count: int) -> np.ndarray:
  batches = setup.batches(split, count, seed=0, train=False, on_mesh=False)
  batch = next(iter(batches))
  images = np.asarray(batch['image'], np.float32)
  if 'mask' in batch:
    images = images[np.asarray(batch['mask']) > 0]
  return images


def export_settings(ecfg) -> dict:
  """The export fields of a config (config.export), checked."""
  def get(key, default):
    return ecfg.get(key, default) if ecfg is not None else default
  examples = int(get('examples', 32))
  warmup, repeats = int(get('warmup', 10)), int(get('repeats', 50))
  calibration = int(get('calibration_examples', 100))
  if examples < 2 or warmup < 0 or repeats < 1 or calibration < 1:
    raise ExportError('config.export.examples must be >= 2, calibration_examples and repeats '
                      '>= 1, warmup >= 0')
  return {'formats': parse_list(get('formats', 'jax,tflite'), FORMATS, 'config.export.formats'),
          'precisions': parse_list(get('tflite_precision', 'float32'), PRECISIONS,
                                   'config.export.tflite_precision'),
          'threads': parse_threads(get('threads', '1'), 'config.export.threads'),
          'warmup': warmup, 'repeats': repeats, 'examples': examples,
          'calibration_examples': calibration}


def run(setup) -> dict:
  """The 'export' mode: exports the workdir's model to <workdir>/export (see the module doc)."""
  settings = export_settings(setup.config.get('export'))
  if 'onnx' in settings['formats']:
    require_onnx()  # before any slow work
  model, trained = load_workdir_model(setup, settings['calibration_examples'])
  inputs, source, representative = None, 'random normal', None
  if trained:
    inputs = _dataset_inputs(setup, 'eval', settings['examples'])
    source = f'{setup.dataset} eval split, first {len(inputs)} examples'
    if 'int8' in settings['precisions'] and 'tflite' in settings['formats']:
      representative = _dataset_inputs(setup, 'train', settings['calibration_examples'])
  else:  # the inputs the fresh weights' BatchNorm statistics come from
    representative = random_inputs(model.image_shape, settings['calibration_examples'],
                                   CALIBRATION_SEED)
  return export_model(model, os.path.join(setup.workdir, 'export'),
                      formats=settings['formats'], precisions=settings['precisions'],
                      inputs=inputs, inputs_source=source, representative=representative,
                      threads=settings['threads'], warmup=settings['warmup'],
                      repeats=settings['repeats'], examples=settings['examples'])
