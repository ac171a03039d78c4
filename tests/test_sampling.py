"""Gumbel-Max sampling with the straight-through estimator (Eqn 3) and the temperature, in both
readings of where tau acts ('logits' and 'relaxed')."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hournas_jax import sampling

THETA = jnp.array([[2.0, 0.0, -1.0, 0.5], [0.0, 0.0, 0.0, 0.0], [1.0, -2.0, 3.0, 0.0]])
MASK = jnp.array([[True, True, True, True], [True, True, False, True], [True, True, True, False]])


def _softmax(logits, mask):
  """Masked softmax in numpy, written out: the reference the samplers are checked against."""
  logits = np.where(mask, np.asarray(logits, np.float64), -np.inf)
  e = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def _frequencies(theta, tau, mask, tau_mode='logits', n=40000):
  keys = jax.random.split(jax.random.key(0), n)
  idx, _ = jax.jit(jax.vmap(lambda k: sampling.gumbel_max(k, theta, tau, mask, tau_mode)))(keys)
  return np.stack([np.bincount(np.asarray(idx[:, l]), minlength=theta.shape[1]) / n
                   for l in range(theta.shape[0])])


def test_sampling_frequencies_follow_softmax_of_theta_over_tau():
  for tau in (1.0, 2.5):
    freq = _frequencies(THETA, tau, MASK)
    # 40,000 samples: the standard error of a frequency is at most 0.0025; 4 sigma.
    np.testing.assert_allclose(freq, _softmax(np.asarray(THETA) / tau, MASK), atol=0.01)
    assert freq[1, 2] == 0 and freq[2, 3] == 0  # masked ops are never sampled
  np.testing.assert_allclose(sampling.probabilities(THETA, 2.5, MASK),
                             _softmax(np.asarray(THETA) / 2.5, MASK), atol=1e-6)


def test_relaxed_samples_ignore_tau():
  """FBNet's literal reading: argmax(theta + g) comes from softmax(theta) at any tau."""
  for tau in (0.3, 5.0):
    freq = _frequencies(THETA, tau, MASK, 'relaxed')
    np.testing.assert_allclose(freq, _softmax(THETA, MASK), atol=0.01)
    assert freq[1, 2] == 0 and freq[2, 3] == 0
    np.testing.assert_allclose(sampling.probabilities(THETA, tau, MASK, 'relaxed'),
                               _softmax(THETA, MASK), atol=1e-6)
  # The same noise gives the same sample at every tau.
  key = jax.random.key(5)
  first = sampling.gumbel_max(key, THETA, 0.1, MASK, 'relaxed')[0]
  np.testing.assert_array_equal(first, sampling.gumbel_max(key, THETA, 7.0, MASK, 'relaxed')[0])


def test_lower_temperature_sharpens():
  entropy = lambda p: -np.sum(np.where(p > 0, p * np.log(np.maximum(p, 1e-30)), 0), axis=-1)
  hot = np.asarray(sampling.probabilities(THETA, 5.0, MASK))
  cold = np.asarray(sampling.probabilities(THETA, 0.5, MASK))
  assert np.all(entropy(cold)[[0, 2]] < entropy(hot)[[0, 2]])
  assert np.isclose(sampling.temperature(0), 5.0)
  assert np.isclose(sampling.temperature(10000), 5.0 * 0.9999 ** 10000)
  assert np.isclose(sampling.temperature(3, tau0=2.0, decay=0.5), 0.25)


@pytest.mark.parametrize('tau_mode', ['logits', 'relaxed'])
def test_straight_through_value_and_gradient(tau_mode):
  """The value is the one-hot sample; the gradient of <A, c> is that of <softmax(r), c> with
  r = theta / tau + g ('logits') or (theta + g) / tau ('relaxed'):
  d/d theta_j = soft_j * (c_j - <soft, c>) / tau, written out here in numpy."""
  key, tau = jax.random.key(3), 2.0
  c = np.arange(12.0).reshape(3, 4)
  idx, a = sampling.gumbel_max(key, THETA, tau, MASK, tau_mode)
  np.testing.assert_allclose(a, jax.nn.one_hot(idx, 4), atol=1e-6)
  grad = np.asarray(jax.grad(
      lambda t: jnp.sum(sampling.gumbel_max(key, t, tau, MASK, tau_mode)[1] * c))(THETA))

  g = np.asarray(sampling.gumbel_noise(key, THETA.shape))  # the noise gumbel_max draws
  theta, mask = np.asarray(THETA, np.float64), np.asarray(MASK)
  relaxed = theta / tau + g if tau_mode == 'logits' else (theta + g) / tau
  sample_logits = theta / tau + g if tau_mode == 'logits' else theta + g
  np.testing.assert_array_equal(idx, np.argmax(np.where(mask, sample_logits, -np.inf), -1))
  soft = _softmax(relaxed, mask)
  expected = soft * (c - np.sum(soft * c, axis=-1, keepdims=True)) / tau
  np.testing.assert_allclose(grad, np.where(mask, expected, 0.0), rtol=1e-4, atol=1e-6)
  assert np.all(grad[~mask] == 0)  # masked ops get no gradient


def test_the_readings_agree_at_tau_one_and_unknown_ones_are_refused():
  key = jax.random.key(8)
  for tau_mode in sampling.TAU_MODES:
    assert sampling.sampling_tau(1.0, tau_mode) == 1.0
  one = [sampling.gumbel_max(key, THETA, 1.0, MASK, m) for m in sampling.TAU_MODES]
  np.testing.assert_array_equal(one[0][0], one[1][0])
  with pytest.raises(ValueError, match='tau_mode must be one of'):
    sampling.gumbel_max(key, THETA, 1.0, MASK, 'theta')


def test_gumbel_softmax_is_fbnets_relaxation_and_argmax():
  key, tau = jax.random.key(1), 0.7
  w = np.asarray(sampling.gumbel_softmax(key, THETA, tau, MASK))
  g = np.asarray(sampling.gumbel_noise(key, THETA.shape))
  np.testing.assert_allclose(w, _softmax((np.asarray(THETA) + g) / tau, MASK), rtol=1e-5,
                             atol=1e-7)
  assert float(w[1, 2]) == 0.0
  np.testing.assert_array_equal(sampling.argmax_ops(THETA, MASK), [0, 0, 2])
