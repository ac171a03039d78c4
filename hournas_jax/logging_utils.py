"""What a user sees while a run goes: a progress line, and scalars for TensorBoard.

The progress line (stdout, every `log_every_steps`):
    [search/vital] step 120/500 (24%) | 153 img/s | loss 1.234 | acc 0.457 | tau 4.941 | ETA 3m12s

TensorBoard: scalar summaries are written as standard event files
(`<workdir>/tensorboard/<phase>/events.out.tfevents.*`). The writer below produces the same
records tf.summary does (TFRecord framing with masked CRC32C around `Event` protos holding
`Summary.Value.simple_value`), in plain Python: importing TensorFlow costs ~10 s of start-up on a
2-core machine, which the digits runs (no TF at all) should not pay.
"""

from __future__ import annotations

import math
import os
import socket
import struct
import sys
import time
from typing import Mapping

import jax

# --------------------------------------------------------------------------------------------
# Progress line.


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds) or seconds < 0:
    return '?'
  seconds = int(round(seconds))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  if h:
    return f'{h}h{m:02d}m'
  if m:
    return f'{m}m{s:02d}s'
  return f'{s}s'


def _fmt(value) -> str:
  if isinstance(value, str):
    return value
  value = float(value)
  if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
    return f'{value:.3e}'
  return f'{value:.4g}' if abs(value) >= 100 else f'{value:.3f}'


class Progress:
  """Throughput and ETA of one phase, printed as one line per call to `line`."""

  def __init__(self, phase: str, total_steps: int, start_step: int, images_per_step: int,
               stream=None):
    self.phase = phase
    self.total = total_steps
    self.images_per_step = images_per_step
    self.stream = stream or sys.stdout
    self._start_step = start_step
    self._start_time = time.time()
    self._last_step = start_step
    self._last_time = self._start_time

  def rates(self, step: int) -> tuple[float, float]:
    """(images/s since the previous line, ETA in seconds from the phase's average speed)."""
    now = time.time()
    interval = max(now - self._last_time, 1e-9)
    ips = (step - self._last_step) * self.images_per_step / interval
    done = step - self._start_step
    elapsed = now - self._start_time
    eta = (self.total - step) * elapsed / done if done > 0 else float('nan')
    self._last_step, self._last_time = step, now
    return ips, eta

  def line(self, step: int, metrics: Mapping[str, float], stage: str | None = None) -> dict:
    ips, eta = self.rates(step)
    name = f'{self.phase}/{stage}' if stage else self.phase
    pct = 100.0 * step / self.total if self.total else 100.0
    parts = [f'[{name}] step {step}/{self.total} ({pct:.0f}%)', f'{ips:.0f} img/s']
    for key, label in (('loss', 'loss'), ('accuracy', 'acc'), ('val_loss', 'val loss'),
                       ('tau', 'tau'), ('learning_rate', 'lr'), ('lr', 'lr')):
      if key in metrics:
        parts.append(f'{label} {_fmt(metrics[key])}')
    parts.append(f'ETA {format_duration(eta)}')
    if jax.process_index() == 0:
      print(' | '.join(parts), file=self.stream, flush=True)
    return {'images_per_sec': ips, 'eta_sec': eta}


def info(message: str) -> None:
  """A status line for the user (process 0 only)."""
  if jax.process_index() == 0:
    print(message, flush=True)


# --------------------------------------------------------------------------------------------
# TensorBoard event files without TensorFlow.


def _make_crc32c_table():
  table = []
  for i in range(256):
    crc = i
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return table


_CRC32C_TABLE = _make_crc32c_table()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  n &= (1 << 64) - 1
  out = bytearray()
  while True:
    byte = n & 0x7F
    n >>= 7
    if n:
      out.append(byte | 0x80)
    else:
      out.append(byte)
      return bytes(out)


def _field(number: int, wire_type: int) -> bytes:
  return _varint((number << 3) | wire_type)


def _length_delimited(number: int, payload: bytes) -> bytes:
  return _field(number, 2) + _varint(len(payload)) + payload


def encode_event(wall_time: float, step: int = 0, *, file_version: str | None = None,
                 scalars: Mapping[str, float] | None = None) -> bytes:
  """An `Event` proto: wall_time (1, double), step (2, int64), file_version (3, string),
  summary (5, Summary{value (1): Value{tag (1, string), simple_value (2, float)}})."""
  out = _field(1, 1) + struct.pack('<d', wall_time) + _field(2, 0) + _varint(int(step))
  if file_version is not None:
    out += _length_delimited(3, file_version.encode())
  if scalars:
    values = b''
    for tag, value in scalars.items():
      value_proto = (_length_delimited(1, tag.encode()) + _field(2, 5)
                     + struct.pack('<f', float(value)))
      values += _length_delimited(1, value_proto)
    out += _length_delimited(5, values)
  return out


def frame_record(data: bytes) -> bytes:
  """TFRecord framing: length, masked CRC of the length, data, masked CRC of the data."""
  header = struct.pack('<Q', len(data))
  return (header + struct.pack('<I', _masked_crc(header)) + data
          + struct.pack('<I', _masked_crc(data)))


class SummaryWriter:
  """Appends scalar summaries to a TensorBoard event file (process 0 only; others no-op)."""

  def __init__(self, logdir: str, enabled: bool = True):
    self.logdir = logdir
    self._file = None
    if enabled and jax.process_index() == 0:
      os.makedirs(logdir, exist_ok=True)
      name = (f'events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}'
              '.hournas')
      self.path = os.path.join(logdir, name)
      self._file = open(self.path, 'ab')
      self._file.write(frame_record(encode_event(time.time(), 0,
                                                 file_version='brain.Event:2')))
      self._file.flush()

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    if self._file is None:
      return
    finite = {k: float(v) for k, v in values.items()
              if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if finite:
      self._file.write(frame_record(encode_event(time.time(), step, scalars=finite)))
      self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
