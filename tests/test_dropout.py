"""The 16-bit-threshold dropout against its defining statistics."""

import jax
import jax.numpy as jnp
import numpy as np

from flaxpals.model.dropout import Dropout, keep_mask


def test_keep_rate_and_expectation():
    keep, p = keep_mask(jax.random.key(0), 0.1, (64, 257))  # odd last axis on purpose
    assert keep.shape == (64, 257)
    assert p == 1 - 6554 / 65536
    n = keep.size
    # Binomial: the empirical keep rate lies within 4 standard deviations of p.
    assert abs(float(keep.mean()) - p) < 4 * np.sqrt(p * (1 - p) / n)
    x = jnp.ones((256, 512))
    y = Dropout(0.1).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    kept = np.asarray(y) != 0
    np.testing.assert_allclose(np.asarray(y)[kept], 1 / p, rtol=1e-6)
    assert abs(float(y.mean()) - 1.0) < 4 * np.sqrt((1 - p) / p / x.size)


def test_masks_differ_by_key_and_rate_zero_is_identity():
    a, _ = keep_mask(jax.random.key(0), 0.5, (1000,))
    b, _ = keep_mask(jax.random.key(1), 0.5, (1000,))
    assert (a != b).any()
    x = jnp.arange(10.0)
    np.testing.assert_array_equal(
        Dropout(0.0).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)}), x)
