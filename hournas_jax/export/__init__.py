"""Export of a fixed-architecture network for deployment, each export checked where it is made.

Formats (config.export.formats, or --formats of `python -m hournas_jax.tools.export`), one
entry each in the table `FORMATS`:
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

Modules: `base` (ExportError, Model, the Format entry, comparison and timing), `inference`
(BatchNorm folding, the inference function), `model` (the network, its inputs and reference
logits), `jax_format`, `tflite`, `onnx_format` (one per format), `report` (the format table and
the loop that makes, checks and reports each file), `mode` (config.export and the 'export'
mode). This package re-exports what callers use.
"""

from hournas_jax.export.base import EXTRAS_HINT, ExportError, Format, Job, Model, compare
from hournas_jax.export.inference import (fold_batchnorm, folded_batchnorm, has_batchnorm,
                                          inference_function)
from hournas_jax.export.jax_format import (JAX_FILE, export_jax, jax_export_latency_ms,
                                           run_jax_export)
from hournas_jax.export.mode import (Settings, check_config, load_workdir_model,
                                     parse_threads, run)
from hournas_jax.export.model import (CALIBRATION_SEED, batchnorm_statistics, network_model,
                                      random_inputs, reference_logits)
from hournas_jax.export.onnx_format import (ONNX_FILE, onnx_latency_ms, require_onnx, run_onnx,
                                            to_onnx)
from hournas_jax.export.report import FORMATS, REPORT_FILE, export_model, parse_list, require
from hournas_jax.export.tflite import (PRECISIONS, is_builtin, run_tflite, tflite_file,
                                       tflite_interpreter, tflite_latency_ms, tflite_ops,
                                       tflite_runtime, to_tflite)
