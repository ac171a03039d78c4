"""Export of a model in every requested format, each checked where it is made; report.json.

`FORMATS` is the table of formats (`base.Format` entries); `export_model` runs one loop over
it: convert, write, read back, run on the compared inputs, time at batch 1, record. The report
(<out>/report.json) keeps the entries of an earlier export in the same folder for formats not
made again.
"""

from __future__ import annotations

import json
import os
import time
from typing import Sequence

import jax
import numpy as np

from hournas_jax import checkpoint, logging_utils
from hournas_jax.export import base, jax_format, model as model_lib, onnx_format, tflite

# Format name -> entry, in the order they are made (ONNX reuses the float32 TFLite model).
FORMATS = {f.name: f for f in (jax_format.FORMAT, tflite.FORMAT, onnx_format.FORMAT)}
REPORT_FILE = 'report.json'


def parse_list(text, allowed: Sequence[str], field: str) -> list[str]:
  """The distinct names of a comma-separated list, each one of `allowed`; ExportError naming
  `field` otherwise."""
  items = [t.strip() for t in str(text).split(',') if t.strip()]
  unknown = [t for t in items if t not in allowed]
  if unknown or not items:
    raise base.ExportError(f'{field} must be a comma-separated list of {", ".join(allowed)}, '
                           f'got {text!r}')
  return list(dict.fromkeys(items))


def require(formats: Sequence[str]) -> None:
  """Raises ExportError when a format's optional packages are missing (before slow work)."""
  for name in formats:
    if FORMATS[name].require is not None:
      FORMATS[name].require()


def export_model(model: base.Model, out_dir: str, *, formats: Sequence[str] = ('jax', 'tflite'),
                 precisions: Sequence[str] = ('float32',), inputs=None,
                 inputs_source: str = 'random', representative=None,
                 threads: Sequence[int] = (1,), warmup: int = 10, repeats: int = 50,
                 examples: int = 16) -> dict:
  """Writes each format to out_dir and checks it against the JAX model.

  Each file is loaded in its runtime, compared with the JAX model on `inputs` and timed at
  batch 1; the report is written to <out_dir>/report.json.

  Args:
    model: what to export.
    out_dir: the output folder (created).
    formats: names of `FORMATS`, made in the table's order.
    precisions: TFLite precisions (`tflite.PRECISIONS`).
    inputs: inputs compared with the JAX model, [N, H, W, C]; None: `examples` random normal
      ones.
    inputs_source: what `inputs` are, for the report.
    representative: int8 calibration inputs [N, H, W, C] (None: random normal ones).
    threads: thread counts the latency is measured with; the first runs the comparison.
    warmup: runs before timing.
    repeats: timed runs (the median is reported).
    examples: the number of random inputs when `inputs` is None.

  Returns:
    The report: 'model', 'inputs', 'latency' (the timing settings) and 'exports' (one entry
    per file).
  """
  asked = parse_list(','.join(formats), FORMATS, 'formats')
  formats = [name for name in FORMATS if name in asked]
  precisions = parse_list(','.join(precisions), tflite.PRECISIONS, 'precisions')
  require(formats)
  if inputs is None:
    inputs = model_lib.random_inputs(model.image_shape, max(2, int(examples)), seed=0)
    inputs_source = 'random normal'
  inputs = np.asarray(inputs, np.float32)
  if inputs.shape[1:] != tuple(model.image_shape):
    raise base.ExportError(f'comparison inputs have shape {inputs.shape[1:]}, the model takes '
                           f'{tuple(model.image_shape)}')
  os.makedirs(out_dir, exist_ok=True)
  job = base.Job(model=model, inputs=inputs, reference=model_lib.reference_logits(model, inputs),
                 representative=representative, threads=[int(t) for t in threads],
                 warmup=int(warmup), repeats=int(repeats))
  entries = [_export_one(FORMATS[name], precision, job, out_dir)
             for name in formats
             for precision in (FORMATS[name].precisions or precisions)]
  report = {'model': {**model.info, 'image_shape': list(model.image_shape)},
            'inputs': {'source': inputs_source, 'count': int(len(inputs))},
            'latency': {'batch': 1, 'warmup': int(warmup), 'repeats': int(repeats),
                        'statistic': 'median'},
            'exports': entries}
  path = os.path.join(out_dir, REPORT_FILE)
  report['exports'] = _kept_entries(path, report) + entries
  if jax.process_index() == 0:
    checkpoint.atomic_write_json(path, report)
  logging_utils.info(f'[export] report written to {path}')
  return report


def _export_one(fmt: base.Format, precision: str | None, job: base.Job, out_dir: str) -> dict:
  """Convert, write, read back, run, time: the report entry of one file."""
  start = time.perf_counter()
  blob = fmt.convert(job, precision)
  seconds = time.perf_counter() - start
  path = os.path.join(out_dir, fmt.filename(precision))
  _write(path, blob)
  with open(path, 'rb') as f:
    blob = f.read()  # what is checked is the file, not the converter's bytes
  job.made[(fmt.name, precision)] = blob
  outputs = fmt.run(blob, job.inputs, job.threads[0])
  entry = {'format': fmt.name, **({'precision': precision} if precision else {}),
           'runtime': fmt.runtime(), **fmt.extras(blob, job, outputs),
           'export_seconds': round(seconds, 2), 'path': os.path.abspath(path),
           'bytes': len(blob), **base.compare(job.reference, outputs),
           'examples': int(len(job.inputs)), 'latency_ms': fmt.latency_ms(blob, job)}
  shown = ', '.join(f'{v:.3g} ms ({k} threads)' if k.isdigit() else f'{v:.3g} ms ({k})'
                    for k, v in entry['latency_ms'].items())
  logging_utils.info(
      f'[export] {fmt.name}{" " + precision if precision else ""}: {path} '
      f'({len(blob) / 1e6:.2f} MB); max |diff| {entry["max_abs_diff"]:.3g} (largest |logit| '
      f'{entry["max_abs_logit"]:.3g}), top-1 agreement {100 * entry["top1_agreement"]:.1f}% on '
      f'{len(job.inputs)} inputs; latency at batch 1: {shown}')
  return entry


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
