"""The regularized horseshoe's shrunk local scale: the textbook value, and finite gradients at the
extremes of the local scale that a Gaussian guide on its log reaches in float32."""
import jax
import jax.numpy as jnp
import numpy as np

from lcd_bayes.model import slab_shrunk_local


def test_shrunk_local_scale_matches_the_regularized_horseshoe_formula():
    local = jnp.asarray([1e-3, 0.1, 1.0, 10.0, 1e4], jnp.float32)
    scale, slab = 0.05, 2.0
    expected = np.sqrt(slab * np.asarray(local, np.float64) ** 2 / (slab + scale**2 * np.asarray(local, np.float64) ** 2))
    np.testing.assert_allclose(slab_shrunk_local(local, scale, slab), expected, rtol=1e-6)
    # Large local scales saturate at the slab, c / tau.
    np.testing.assert_allclose(slab_shrunk_local(jnp.float32(1e30), scale, slab), np.sqrt(slab) / scale, rtol=1e-6)


def test_shrunk_local_scale_has_finite_gradients_where_the_square_underflows():
    def weight(log_local, log_scale, log_slab):
        return slab_shrunk_local(jnp.exp(log_local), jnp.exp(log_scale), jnp.exp(log_slab))

    for log_local in (np.log(8e-19), -60.0, 0.0, 60.0):  # squares that underflow or overflow float32
        grads = jax.grad(weight, argnums=(0, 1, 2))(jnp.float32(log_local), jnp.log(jnp.float32(0.003)),
                                                   jnp.log(jnp.float32(0.013)))
        assert all(np.isfinite(float(g)) for g in grads), (log_local, grads)
