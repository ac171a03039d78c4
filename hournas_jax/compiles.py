"""Counting the programs XLA builds, and a guard before XLA:CPU runs out of memory mappings.

`CompileLog` records, while entered, every program JAX hands to XLA: its name, the shapes and
the shardings of its inputs (from JAX's lowering log) and the backend compile time (from the
`jax.monitoring` event JAX records around each backend compile, a load from the persistent
compilation cache included). A program lowered twice for the same input shapes with another
placement of its inputs is the signature of a state that was not on the mesh the way the
programs' own outputs are: the first step compiles every program once for the initial state
and once more for the state the first step returns. `recompiled()` lists those.

`MapGuard` watches the process's memory mappings as programs are compiled. XLA:CPU keeps tens of
mappings per compiled program (the 9-op FBNet single-path engine: ~22,000 after its ~300
programs, `benchmarks/supernet_step.py`), and the kernel refuses new ones past
vm.max_map_count (65530 by default): the next compile then aborts the process. The guard reads
/proc/self/maps every `every` new programs and raises `MapLimitError` (one line, with the
remedy) while enough mappings are left for the programs until its next look.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading

import jax
from jax._src import dispatch

from hournas_jax import errors

# Recorded by JAX around each backend compile (dispatch.BACKEND_COMPILE_EVENT): a scalar with
# the start time when it begins, a duration when it ends; both carry the program's name.
COMPILE_EVENT = dispatch.BACKEND_COMPILE_EVENT
# The logger whose DEBUG record "Compiling NAME with global shapes and types AVALS. Argument
# mapping: SHARDINGS." JAX writes when it lowers a program for XLA.
_LOWERING_LOGGER = 'jax._src.interpreters.pxla'
MAPS_FILE = '/proc/self/maps'
MAX_MAP_COUNT_FILE = '/proc/sys/vm/max_map_count'


@dataclasses.dataclass(frozen=True)
class Program:
  """One lowering: the program's name, its input shapes and dtypes, its input shardings."""
  name: str
  avals: str
  shardings: str


class CompileLog:
  """Records the programs built while entered (see the module's docstring).

  Usage:
    with CompileLog() as log:
      step(...)
    log.count, log.seconds, log.recompiled()

  Several logs may be entered at once (nested, or in threads); each sees every program.
  """

  def __init__(self):
    self.count = 0           # backend compiles (persistent-cache loads included)
    self.seconds = 0.0       # their total duration
    self.names = collections.Counter()  # {program name: backend compiles}
    self.programs: list[Program] = []   # the lowerings, in order
    self._lock = threading.Lock()
    self._filter = None
    self._level = None

  # ----- Listeners.

  def _on_duration(self, event: str, duration: float, **kwargs) -> None:
    if event != COMPILE_EVENT:
      return
    with self._lock:
      self.count += 1
      self.seconds += float(duration)
      self.names[kwargs.get('fun_name', '?')] += 1

  def _on_record(self, record: logging.LogRecord) -> bool:
    """A logger filter: notes a lowering record, and lets through only the records the
    logger's own level would have let through before the log was entered."""
    if isinstance(record.msg, str) and record.msg.startswith('Compiling %s with global shapes'):
      name, avals, shardings = record.args
      with self._lock:
        self.programs.append(Program(str(name), str(avals), str(shardings)))
    return record.levelno >= self._level

  def __enter__(self) -> 'CompileLog':
    jax.monitoring.register_event_duration_secs_listener(self._on_duration)
    logger = logging.getLogger(_LOWERING_LOGGER)
    # The lowering record is written at DEBUG (WARNING with jax_log_compiles): the logger must
    # let DEBUG through to reach the filter, which then drops what it let through for us, so
    # the handlers above see what they saw before.
    self._level = logger.getEffectiveLevel()
    self._filter = self._on_record
    logger.addFilter(self._filter)
    _LEVELS.enter(logger)
    return self

  def __exit__(self, *exc) -> None:
    logger = logging.getLogger(_LOWERING_LOGGER)
    logger.removeFilter(self._filter)
    _LEVELS.exit(logger)
    jax.monitoring.unregister_event_duration_listener(self._on_duration)

  # ----- Results.

  def recompiled(self) -> dict[tuple[str, str], list[str]]:
    """{(name, input shapes): [input shardings, ...]} of every program lowered for the same
    input shapes with more than one placement of its inputs (the same name and shapes with
    different static arguments share a placement, so they are not listed)."""
    placements = collections.defaultdict(list)
    for p in self.programs:
      if p.shardings not in placements[p.name, p.avals]:
        placements[p.name, p.avals].append(p.shardings)
    return {k: v for k, v in placements.items() if len(v) > 1}

  def summary(self) -> str:
    """'N programs in S s' and the most compiled names."""
    top = ', '.join(f'{n} x{c}' for n, c in self.names.most_common(5))
    return f'{self.count} programs compiled in {self.seconds:.1f} s ({top})'


class _LoggerLevels:
  """Lowers a logger to DEBUG while at least one CompileLog is entered, then restores it."""

  def __init__(self):
    self._lock = threading.Lock()
    self._depth = collections.Counter()
    self._saved = {}

  def enter(self, logger: logging.Logger) -> None:
    with self._lock:
      if not self._depth[logger.name]:
        self._saved[logger.name] = logger.level
        logger.setLevel(logging.DEBUG)
      self._depth[logger.name] += 1

  def exit(self, logger: logging.Logger) -> None:
    with self._lock:
      self._depth[logger.name] -= 1
      if not self._depth[logger.name]:
        logger.setLevel(self._saved.pop(logger.name))


_LEVELS = _LoggerLevels()


# --------------------------------------------------------------------------------------------
# Memory mappings.


class MapLimitError(errors.UserError, RuntimeError):
  """The process would exceed the kernel's limit on memory mappings (vm.max_map_count)."""


def map_count() -> int | None:
  """The number of memory mappings of this process (lines of /proc/self/maps); None where
  there is no such file."""
  try:
    with open(MAPS_FILE, 'rb') as f:
      return sum(1 for _ in f)
  except OSError:
    return None


def max_map_count() -> int | None:
  """The kernel's limit on a process's memory mappings (vm.max_map_count); None where it is not
  readable (not Linux)."""
  try:
    with open(MAX_MAP_COUNT_FILE) as f:
      return int(f.read().strip())
  except (OSError, ValueError):
    return None


class MapGuard:
  """Raises `MapLimitError` before a compile when the next `every` programs could cross
  vm.max_map_count.

  Looks at /proc/self/maps every `every` compiles (a read of a few MB at most, against compiles
  of a few hundred ms each), estimates the mappings one program adds from the growth since it
  was installed (at least `per_program`), and refuses the compile that starts while fewer than
  `margin` x `every` programs' worth are left. Install it once per process with `install`;
  a no-op where there is no /proc (not Linux).
  """

  def __init__(self, every: int = 16, per_program: float = 64.0, margin: float = 2.0,
               limit: int | None = None, read_maps=map_count):
    self.every = int(every)
    self.per_program = float(per_program)
    self.margin = float(margin)
    self.limit = max_map_count() if limit is None else int(limit)
    self.read_maps = read_maps
    self.compiles = 0
    self._start = None  # (compiles, mappings) at the first look
    self.last = None    # mappings at the last look

  def _on_scalar(self, event: str, value, **kwargs) -> None:  # pylint: disable=unused-argument
    if event != COMPILE_EVENT:
      return
    self.compiles += 1
    if self.compiles % self.every != 1 and self.every > 1:
      return
    self.check()

  def check(self) -> None:
    """Reads the mappings now; raises MapLimitError when too few are left."""
    if not self.limit:
      return
    maps = self.read_maps()
    if maps is None:
      return
    self.last = maps
    if self._start is None:
      self._start = (self.compiles, maps)
    done, first = self.compiles - self._start[0], self._start[1]
    per_program = max(self.per_program, (maps - first) / done if done > 0 else 0.0)
    if maps + self.margin * self.every * per_program < self.limit:
      return
    raise MapLimitError(
        f'this process holds {maps} memory mappings after {self.compiles} compiled programs '
        f'(about {per_program:.0f} each on XLA:CPU), close to the kernel\'s limit '
        f'vm.max_map_count={self.limit}; past it the next compile would crash. Raise the limit '
        '(sudo sysctl -w vm.max_map_count=262144), or compile fewer programs: '
        "config.search.engine='switch' (one program per step) or fewer ops (config.ops)")

  def install(self) -> 'MapGuard':
    jax.monitoring.register_scalar_listener(self._on_scalar)
    return self

  def uninstall(self) -> None:
    jax.monitoring.unregister_scalar_listener(self._on_scalar)


_GUARD: MapGuard | None = None
_GUARD_LOCK = threading.Lock()


def install_map_guard() -> MapGuard | None:
  """The process's MapGuard, installed on first call; None where the limit is unknown."""
  global _GUARD
  with _GUARD_LOCK:
    if _GUARD is None and max_map_count():
      _GUARD = MapGuard().install()
  return _GUARD
