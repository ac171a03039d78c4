"""Tests for how latency tables are measured (hournas_jax.latency): samples of several runs,
retries of wide measurements, the load figures and the busy-machine flag (under a real load
made by the test, and under injected readings), the correction by whole networks, tables
without the new fields, and benchmarks/latency_table.py's figures and bad input."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

from hournas_jax import latency
from latency_fakes import (RES, CountingRuntime, FakeClock, ScriptedRuntime, constant,
                           protocol)
from spaces_for_tests import toy_space

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_a_sample_times_enough_runs_to_span_min_sample_ms():
  clock = FakeClock()

  def run():  # a 0.01 ms network: far below what one reading of a timer can be trusted with
    clock.now += 1e-5
  n = latency.inner_runs(run, clock, 5.0)
  assert 500 <= n <= 1200
  assert latency.inner_runs(run, clock, 0.0) == 1
  assert latency.inner_runs(run, clock, 1e9, limit=64) == 64
  np.testing.assert_allclose(latency.time_runs(run, 2, 4, clock, n), 0.01)
  # Through a runtime: each sample of the protocol is the mean of enough runs.
  runtime = ScriptedRuntime(protocol(repeats=4, min_sample_ms=5.0), lambda shape: constant(0.01))
  np.testing.assert_allclose(runtime.time(runtime.prepare(None, None, (1,))), 0.01)
  assert runtime.last_timing['inner'] >= 500


def test_a_wide_measurement_is_timed_again_and_the_narrowest_kept():
  script = [1, 1, 1, 1, 3] + [1, 1, 1, 1, 4] + [1, 1, 1.01, 1, 1]  # ms, three attempts
  runtime = ScriptedRuntime(protocol(repeats=5, min_sample_ms=0), lambda shape: iter(script))
  samples = runtime.time(runtime.prepare(None, None, (1,)))
  np.testing.assert_allclose(samples, script[10:])
  assert runtime.last_timing['attempts'] == 3 and runtime.last_timing['spread'] < 0.01
  # Retries spent: the attempt of least spread is kept.
  runtime = ScriptedRuntime(protocol(repeats=5, min_sample_ms=0), lambda shape: iter(script),
                            retries=1)
  np.testing.assert_allclose(runtime.time(runtime.prepare(None, None, (1,))), script[:5])
  assert runtime.last_timing['attempts'] == 2 and runtime.last_timing['spread'] > 1


def test_a_table_marks_measurements_that_stay_wide_on_a_quiet_machine(tmp_path):
  stem = (1, RES, RES, 3)

  def durations(shape):  # the stem's samples alternate 1 and 2 ms whatever the retries
    return iter(np.tile([1.0, 2.0], 1000)) if shape == stem else constant(0.5)
  runtime = ScriptedRuntime(protocol(repeats=4, min_sample_ms=0), durations)
  path = tmp_path / 't.json'
  table = latency.build_table(toy_space(RES), protocol(repeats=4, min_sample_ms=0), str(path),
                              runtime=runtime, log=open(os.devnull, 'w'))
  quality = table['quality']
  assert list(quality['wide']) == ['stem/conv3'] and quality['wide']['stem/conv3'] > 0.1
  (session,) = quality['sessions']
  assert session['retried'] == 1 and session['busy'] is None and quality['busy'] is False
  assert session['load_average'] == {'mean': 0.2, 'max': 0.2}
  assert session['cpu_share'] == {'median': 1.0, 'min': 1.0}
  lines = latency.quality_lines(table)
  assert any('1 measurements stayed wider than spread 10% after 2 retries' in l for l in lines)
  assert not any('busy' in l for l in lines)
  assert latency.latency_tables(str(path), toy_space(RES)).wide == ('stem/conv3',)


@pytest.mark.parametrize('load, cpu_rate, reason', [
    (5.0, 1.0, 'load average 5.0 on 2 cores'),
    (0.2, 0.5, 'the timed runs got 50% of a core'),
])
def test_injected_load_readings_flag_a_busy_machine(tmp_path, load, cpu_rate, reason):
  runtime = ScriptedRuntime(protocol(min_sample_ms=0), lambda shape: constant(0.5), load,
                            cpu_rate)
  path = tmp_path / 't.json'
  table = latency.build_table(toy_space(RES), protocol(min_sample_ms=0), str(path),
                              runtime=runtime, log=open(os.devnull, 'w'))
  assert table['quality']['busy'] is True
  assert reason in table['quality']['sessions'][0]['busy']
  (warning,) = [l for l in latency.quality_lines(table) if l.startswith('warning:')]
  assert 'busy machine' in warning and reason in warning
  assert latency.latency_tables(str(path), toy_space(RES)).busy
  # Resumed later on a quiet machine, the table still says part of it was taken under load.
  data = json.loads(path.read_text())
  del data['latency_ms']['head']
  path.write_text(json.dumps(data))
  quiet = ScriptedRuntime(protocol(min_sample_ms=0), lambda shape: constant(0.5))
  table = latency.build_table(toy_space(RES), protocol(min_sample_ms=0), str(path),
                              runtime=quiet, log=open(os.devnull, 'w'))
  assert [bool(s['busy']) for s in table['quality']['sessions']] == [True, False]
  assert table['quality']['busy'] is True


def test_the_load_is_the_run_queue_now_or_the_load_average_where_there_is_none(
    tmp_path, monkeypatch):
  monkeypatch.setattr(os, 'getloadavg', lambda: (2.5, 2.0, 1.5))
  stat = tmp_path / 'stat'
  stat.write_text('cpu  1 2 3 4\nprocs_running 7\nprocs_blocked 0\n')
  assert latency.runnable_processes(str(stat)) == 7.0
  stat.write_text('cpu  1 2 3 4\n')
  assert latency.runnable_processes(str(stat)) == 2.5
  assert latency.runnable_processes(str(tmp_path / 'absent')) == 2.5


class SpinRuntime(latency.Runtime):
  """Times a few microseconds of pure-Python work for every measurement, with real clocks."""

  def samples(self, apply_fn, variables, shape, seed=0):
    return self.time(lambda: sum(range(200)))


def test_a_table_built_under_real_load_says_so(tmp_path):
  # This thread and two busy loops share one core: the timed runs get at most about a third of
  # it, whatever else the machine runs and however many cores it has.
  core = min(os.sched_getaffinity(0))
  before = os.sched_getaffinity(0)
  hog = ('import os, time\n'
         f'os.sched_setaffinity(0, {{{core}}})\n'
         'end = time.time() + 60\n'  # a bound, should the test die before stopping them
         'while time.time() < end: pass\n')
  hogs = [subprocess.Popen([sys.executable, '-c', hog]) for _ in range(2)]
  try:
    os.sched_setaffinity(0, {core})
    time.sleep(0.3)  # the loops start
    runtime = SpinRuntime(protocol(repeats=5, min_sample_ms=2.0), retries=0)
    table = latency.build_table(toy_space(RES), protocol(repeats=5, min_sample_ms=2.0),
                                str(tmp_path / 't.json'), runtime=runtime,
                                log=open(os.devnull, 'w'))
  finally:
    os.sched_setaffinity(0, before)
    for h in hogs:
      h.kill()
      h.wait()
  (session,) = table['quality']['sessions']
  assert session['cpu_share']['median'] < latency.BUSY_CPU_SHARE
  assert table['quality']['busy'] is True and 'of a core' in session['busy']
  # The load is read as it is (not damped over a minute): the two loops and this process,
  # all running or waiting for a CPU whenever it is read.
  assert session['load_average']['mean'] >= 3
  assert 'load average' in session['busy']
  assert any(l.startswith('warning: figures taken on a busy machine')
             for l in latency.quality_lines(table))


class BiasedRuntime(CountingRuntime):
  """Blocks take 1e-4 ms per input value and the call 0.001 ms; whole networks run 15% slower
  than the sum of their blocks (the overhead once), as at 224 px."""

  def samples(self, apply_fn, variables, shape, seed=0):
    self.calls += 1
    return np.full(3, 0.001 + 1e-4 * int(np.prod(shape)))

  def overhead_samples(self, shape):
    self.calls += 1
    return np.full(3, 0.001)

  def network_samples(self, space, ops, channels=3):
    self.calls += 1
    layer_ops = dict(zip(space.searchable_names, ops))
    blocks = sum(1e-4 * int(np.prod(latency.input_shape(space, l, channels)))
                 for l in space.layers if layer_ops.get(l.name) != 'skip')
    return np.full(3, 1.15 * (blocks + 0.001))


def test_the_correction_from_whole_networks_removes_their_bias(tmp_path):
  space = toy_space(RES)
  path = tmp_path / 't.json'
  runtime = BiasedRuntime(protocol(calibration=3))
  table = latency.build_table(space, protocol(calibration=3), str(path), runtime=runtime,
                              log=open(os.devnull, 'w'))
  networks = table['calibration']['networks']
  assert len(networks) == 3 and runtime.calls == 1 + 2 + 10 + 3
  assert table['calibration']['scale']['net'] == pytest.approx(1.15)
  corrected = latency.latency_tables(str(path), space)
  uncorrected = latency.latency_tables(str(path), space, correct=False)
  assert corrected.scale == pytest.approx(1.15) and corrected.calibration_networks == 3
  assert uncorrected.scale == 1.0
  # Any network (these are not the calibration ones) is now predicted as it measures.
  for ops in latency.random_archs(space, 5, seed=0):
    measured = BiasedRuntime(protocol()).network_samples(space, ops)[0]
    assert latency.predict_ms(corrected, ops) == pytest.approx(measured)
    assert latency.predict_ms(uncorrected, ops) == pytest.approx(measured / 1.15)
  assert corrected.bounds() == pytest.approx(tuple(1.15 * b for b in uncorrected.bounds()))
  assert any('correction from 3 whole networks' in l for l in latency.quality_lines(table))
  # Resumed: the networks are not measured again; a rerun asking for another count is refused.
  runtime = BiasedRuntime(protocol(calibration=3))
  latency.build_table(space, protocol(calibration=3), str(path), runtime=runtime,
                      log=open(os.devnull, 'w'))
  assert runtime.calls == 0
  with pytest.raises(latency.LatencyError, match='calibration_networks'):
    latency.build_table(space, protocol(calibration=4), str(path),
                        runtime=BiasedRuntime(protocol(calibration=4)),
                        log=open(os.devnull, 'w'))


def test_a_table_without_the_new_fields_predicts_as_before(tmp_path):
  space = toy_space(RES)
  path = tmp_path / 't.json'
  latency.build_table(space, protocol(calibration=2), str(path),
                      runtime=BiasedRuntime(protocol(calibration=2)), log=open(os.devnull, 'w'))
  old = json.loads(path.read_text())
  for key in ('calibration', 'quality'):
    del old[key]
  ops = ('k3e3', 'k3e1', 'skip', 'k3e3', 'k3e1')
  table = latency.latency_tables(old, space)
  assert table.scale == 1.0 and not table.busy and table.wide == ()
  lat, over = old['latency_ms'], old['overhead_ms']['median']
  entries = [lat['stem']['conv3'], lat['head']['head']] + [
      lat[n][o] for n, o in zip(space.searchable_names, ops) if o != 'skip']
  assert latency.predict_ms(table, ops) == pytest.approx(sum(e - over for e in entries) + over)
  assert latency.quality_lines(old) == []


def _benchmark():
  spec = importlib.util.spec_from_file_location(
      'latency_table_benchmark', REPO_ROOT / 'benchmarks' / 'latency_table.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize('argv, message', [
    (['--runtimes', 'tflite,onnx'], 'unknown onnx'),
    (['--max-spread', '0'], '--max-spread > 0'),
    (['--space', 'nope'], 'nope'),
])
def test_benchmark_bad_input_is_one_line(tmp_path, capsys, argv, message):
  assert _benchmark().main(argv + ['--tables-dir', str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and err.count('\n') == 1 and message in err
  assert os.listdir(tmp_path) == []


def test_benchmark_errors_and_rank_correlation():
  bench = _benchmark()
  out = bench.errors_pct([1.1, 2.2, 2.9], [1.0, 2.0, 3.0])
  assert out['mean_abs_pct'] == pytest.approx((10 + 10 + 10 / 3) / 3)
  assert out['mean_signed_pct'] == pytest.approx((10 + 10 - 10 / 3) / 3)
  assert out['spearman'] == pytest.approx(1.0)
  assert bench.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
