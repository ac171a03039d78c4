"""Test-wide JAX settings: the networks are tiny, so XLA's optimisation passes cost more than
they save; results are the same with or without them."""

import jax

jax.config.update('jax_disable_most_optimizations', True)
