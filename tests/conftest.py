"""Test-wide JAX settings: the networks are tiny and take a few steps, so XLA's optimisation
passes cost more than they save; results differ only by rounding. The environment
variable carries the setting into the processes tests start (main.py runs, notebook kernels,
population workers), whose configs leave it alone. Compiled programs are dropped after each
test module: XLA:CPU keeps memory mappings for each (about 20 here), and the whole suite in one
process compiles more than 3,000, past what `compiles.MapGuard` allows under the kernel's
vm.max_map_count (65,530)."""

import gc
import os

import jax
import pytest

jax.config.update('jax_disable_most_optimizations', True)
os.environ['JAX_DISABLE_MOST_OPTIMIZATIONS'] = '1'


@pytest.fixture(autouse=True, scope='module')
def _drop_compiled_programs():
  yield
  jax.clear_caches()
  gc.collect()
