"""benchmarks/search_quality.py: bad input gets one line and exit status 2 before any work."""

import pathlib
import subprocess
import sys

import pytest

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
