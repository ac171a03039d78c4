"""Stand-ins for latency measurements in tests: fake clocks and load readings, runtimes that
make up their samples or drive a fake clock, and a protocol of few repeats."""

import os

import jax
import numpy as np

from hournas_jax import latency
from spaces_for_tests import toy_space

RES = 8  # the toy space at 8 px: stem 4x4, layers down to 1x1


class FakeClock:
  """A clock that moves only when told: the timer and the machine's clocks of a test."""

  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def quiet_machine(clock=None, load=0.2, cpu_rate=1.0):
  """Injected load readings: `load` average on 2 cores, `cpu_rate` of a core while timing."""
  clock = clock or FakeClock()
  return latency.Machine(load=lambda: load, cpu=lambda: clock.now * cpu_rate, wall=clock,
                         cores=2)


class CountingRuntime(latency.Runtime):
  """Returns made-up samples (distinct per input shape and call) and counts the calls; its
  machine reads as quiet."""

  def __init__(self, protocol, **kw):
    super().__init__(protocol, machine=quiet_machine(), **kw)
    self.calls = 0

  def samples(self, apply_fn, variables, shape, seed=0):
    self.calls += 1
    base = 0.01 * self.calls + 1e-4 * int(np.prod(shape))
    return base + np.array([0.0, 1.0, 2.0, 3.0, 4.0]) * 1e-5


class SlowFirstRuntime(CountingRuntime):
  """The first measurement of each block runs twice as slow as the later ones (a burst of load
  from elsewhere); `medians` keeps each block's medians in call order."""

  def __init__(self, protocol, **kw):
    super().__init__(protocol, **kw)
    self.medians = {}

  def samples(self, apply_fn, variables, shape, seed=0):
    self.calls += 1
    leaves = tuple(np.shape(x) for x in jax.tree_util.tree_leaves(variables))
    block = (tuple(shape), leaves)
    ms = 0.01 + 1e-6 * sum(int(np.prod(l)) for l in leaves) + 1e-4 * int(np.prod(shape))
    ms *= 1 if block in self.medians else 2
    self.medians.setdefault(block, []).append(ms)
    return ms + np.array([-2.0, -1.0, 0.0, 1.0, 2.0]) * 1e-6


class ScriptedRuntime(latency.Runtime):
  """Each run advances a fake clock (the timer and the machine's) by the next of
  durations(shape) ms; nothing is compiled."""

  def __init__(self, protocol, durations, load=0.2, cpu_rate=1.0, **kw):
    self.clock = FakeClock()
    super().__init__(protocol, self.clock, machine=quiet_machine(self.clock, load, cpu_rate),
                     **kw)
    self.durations = durations

  def prepare(self, apply_fn, variables, shape, seed=0):
    durations = self.durations(tuple(shape))

    def run():
      self.clock.now += next(durations) / 1e3
    return run


def constant(ms):
  while True:
    yield ms


def protocol(**kw):
  return latency.Protocol(**{'runtime': 'xla_cpu', 'threads': 1, 'warmup': 0, 'repeats': 3,
                             'calibration': 0, 'passes': 1, **kw})


def fake_table(path, space=None, channels=3, **kw):
  runtime = CountingRuntime(protocol(**kw))
  table = latency.build_table(space or toy_space(RES), protocol(**kw), str(path),
                              channels=channels, runtime=runtime, log=open(os.devnull, 'w'))
  return table, runtime
