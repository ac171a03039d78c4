"""The lint the project keeps (pyproject.toml's [tool.ruff]): pyflakes and pycodestyle over the
repository, so CI fails on an unused import, an undefined name or a line over 100 columns."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_finds_nothing():
  result = subprocess.run([sys.executable, '-m', 'ruff', 'check', '--no-cache',
                           '--output-format', 'concise', ROOT], capture_output=True, text=True,
                          cwd=ROOT, check=False)
  assert result.returncode == 0, result.stdout + result.stderr
