"""Command-line tools that run alone (`python -m hournas_jax.tools.NAME --help`):

    profile     params and FLOPs of an architecture per layer; the vital layers of a space
    proposals   space proposals for targets, without a search (Figure 3 with --plot)
    latency     a latency lookup table: every (layer, op) of a space timed on this machine
    export      a network as jax.export / TFLite / ONNX, each checked against JAX; report.json

Each prints one `error: ...` line and exits 2 on bad input (export: 2 for a bad flag, the
error's exit code, 1, for an export that cannot be made, as main.py). What they compute lives
in the library modules (`costs.py`, `vital.py`, `proposals.py`, `latency/`, `export/`);
this package holds argument parsing and printing only.
"""

from __future__ import annotations

import argparse
import math
import sys


class Parser(argparse.ArgumentParser):
  """argparse with one `error:` line and exit status 2 instead of the usage text."""

  def error(self, message):
    sys.stderr.write(f'error: {message}\n')
    sys.exit(2)


def _named(name: str):
  def wrap(fn):
    fn.__name__ = name  # what argparse's "invalid <name> value" message says
    return fn
  return wrap


@_named('positive integer')
def positive_int(text):
  value = int(text)
  if value < 1:
    raise ValueError(text)
  return value


@_named('seed (0 to 2**32 - 1)')
def seed(text):
  value = int(text)
  if not 0 <= value < 2 ** 32:
    raise ValueError(text)
  return value


@_named('decay in (0, 1]')
def decay(text):
  value = float(text)
  if not 0 < value <= 1:
    raise ValueError(text)
  return value


@_named('number')
def finite_float(text):
  value = float(text)
  if not math.isfinite(value):
    raise ValueError(text)
  return value
