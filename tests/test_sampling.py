"""Gumbel-Max sampling with the straight-through estimator (Eqn 3) and the temperature."""

import jax
import jax.numpy as jnp
import numpy as np

from hournas_jax import sampling

THETA = jnp.array([[2.0, 0.0, -1.0, 0.5], [0.0, 0.0, 0.0, 0.0], [1.0, -2.0, 3.0, 0.0]])
MASK = jnp.array([[True, True, True, True], [True, True, False, True], [True, True, True, False]])


def _frequencies(theta, tau, mask, n=40000):
  keys = jax.random.split(jax.random.key(0), n)
  idx, _ = jax.jit(jax.vmap(lambda k: sampling.gumbel_max(k, theta, tau, mask)))(keys)
  return np.stack([np.bincount(np.asarray(idx[:, l]), minlength=theta.shape[1]) / n
                   for l in range(theta.shape[0])])


def test_sampling_frequencies_follow_softmax():
  for tau in (1.0, 2.5):
    freq = _frequencies(THETA, tau, MASK)
    expected = np.asarray(sampling.probabilities(THETA, tau, MASK))
    # 40,000 samples: the standard error of a frequency is at most 0.0025; 4 sigma.
    np.testing.assert_allclose(freq, expected, atol=0.01)
    assert freq[1, 2] == 0 and freq[2, 3] == 0  # masked ops are never sampled


def test_lower_temperature_sharpens():
  entropy = lambda p: -np.sum(np.where(p > 0, p * np.log(np.maximum(p, 1e-30)), 0), axis=-1)
  hot = np.asarray(sampling.probabilities(THETA, 5.0, MASK))
  cold = np.asarray(sampling.probabilities(THETA, 0.5, MASK))
  assert np.all(entropy(cold)[[0, 2]] < entropy(hot)[[0, 2]])
  assert np.isclose(sampling.temperature(0), 5.0)
  assert np.isclose(sampling.temperature(10000), 5.0 * 0.9999 ** 10000)
  assert np.isclose(sampling.temperature(3, tau0=2.0, decay=0.5), 0.25)


def test_straight_through_value_and_gradient():
  key = jax.random.key(3)
  idx, a = sampling.gumbel_max(key, THETA, 1.0, MASK)
  np.testing.assert_allclose(a, jax.nn.one_hot(idx, 4), atol=1e-6)
  costs = jnp.arange(12.0).reshape(3, 4)

  def loss(theta):
    return jnp.sum(sampling.gumbel_max(key, theta, 2.0, MASK)[1] * costs)
  grad = jax.grad(loss)(THETA)
  # The gradient is that of softmax(theta / tau + g): every allowed logit of each layer gets
  # one, the masked ones none, and each row sums to zero (softmax is shift-invariant).
  assert np.all(np.abs(np.asarray(grad))[np.asarray(MASK)] > 0)
  assert np.all(np.asarray(grad)[~np.asarray(MASK)] == 0)
  np.testing.assert_allclose(grad.sum(axis=-1), 0, atol=1e-5)


def test_gumbel_softmax_and_argmax():
  w = sampling.gumbel_softmax(jax.random.key(1), THETA, 1.0, MASK)
  np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
  assert float(w[1, 2]) == 0.0
  np.testing.assert_array_equal(sampling.argmax_ops(THETA, MASK), [0, 0, 2])
