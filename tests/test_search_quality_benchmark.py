"""benchmarks/search_quality.py: bad input gets one line and exit status 2 before any work; the
learned-minus-prior figure and the uniform baseline's summary."""

import pathlib
import subprocess
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent.parent / 'benchmarks'))
import search_quality  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO_ROOT = pathlib.Path(__file__).parent.parent


@pytest.mark.parametrize('args,message', [
    (['--ablations', 'no_vital,gumbel_softmax'], "unknown ablation 'no_vital'"),
    (['--variants', 'faster'], "unknown variant 'faster'"),
    (['--random', '1'], '--random >= 2'),
    (['--targets', '120e3'], '--targets must be PARAMS,FLOPS'),
    (['--steps-scale', '0'], '--steps-scale must be positive'),
    (['--set', 'search.no_such_field=1'], "the config has no field 'search.no_such_field'"),
    (['--set', 'search.weight_lr=fast'], 'search.weight_lr takes a float'),
    (['--config', 'configs/no_such.py'], 'no such config file'),
    (['--set', 'search.schedule=weekly'], 'config.search.schedule must be one of'),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
  run = subprocess.run([sys.executable, 'benchmarks/search_quality.py', '--out',
                        str(tmp_path / 'out'), *args], cwd=REPO_ROOT, capture_output=True,
                       text=True, timeout=300)
  assert run.returncode == 2, run.stderr
  lines = [l for l in run.stderr.splitlines() if l.startswith('error:')]
  assert len(lines) == 1 and message in lines[0], run.stderr
  assert not (tmp_path / 'out').exists()  # nothing written


def test_learned_minus_prior_is_the_difference_of_means_with_welch_standard_error():
  # Hand-computed: means 0.85 and 0.65, variances 0.005 each over 2 searches each.
  d = search_quality.difference([0.9, 0.8], [0.7, 0.6])
  assert d['difference'] == pytest.approx(0.2)
  assert d['se'] == pytest.approx(0.005 ** 0.5)
  assert d['ratio'] == pytest.approx(0.2 / 0.005 ** 0.5)
  # One search on a side: no standard error.
  one = search_quality.difference([0.9], [0.7, 0.6])
  assert one['difference'] == pytest.approx(0.25) and one['se'] != one['se']


def test_the_uniform_row_keeps_the_best_one_op_network():
  archs = [('k3e3',) * 3, ('k3e1',) * 3]
  by_arch = {('k3e3',) * 3: (0.8, 0.01), ('k3e1',) * 3: (0.85, 0.02)}
  u = search_quality.uniform_summary(archs, by_arch, [0.7, 0.8, 0.9, 0.82])
  assert u['architecture'] == 'k3e1' and u['top1'] == 0.85
  assert u['tried'] == {'k3e3': 0.8, 'k3e1': 0.85} and u['percentile'] == 75.0
  assert search_quality.uniform_summary([], {}, [0.7])['top1'] is None


METHOD_CHANGES = {**search_quality.ABLATIONS, **search_quality.VARIANTS,
                  **search_quality.CONTROLS}


@pytest.mark.parametrize('name', sorted(METHOD_CHANGES))
def test_every_method_is_a_valid_search_config(name):
  """Each ablation, variant and control, applied to the benchmark's config."""
  from configs import search_quality as config_lib  # pylint: disable=g-import-not-at-top
  from hournas_jax import search  # pylint: disable=g-import-not-at-top
  config = config_lib.get_config()
  METHOD_CHANGES[name](config.search)
  search.check_config(config.search)
