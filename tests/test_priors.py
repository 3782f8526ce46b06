"""The regularized horseshoe's shrunk local scale: the textbook value, and finite gradients at the
extremes of the local scale that a Gaussian guide on its log reaches in float32."""
import jax
import jax.numpy as jnp
import numpy as np

from lcd_bayes.model.program import slab_shrunk_local


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


def test_pooled_self_decays_share_a_drawn_location_and_spread():
    """``pool_decay``: kappa_g ~ Normal(m, s) with m and s drawn once for all genes; without it each
    gene has the fixed Normal(log median, log sd). ``pool_concentration`` does the same for the NB
    concentrations."""
    from numpyro.handlers import seed, trace

    from lcd_bayes.config import ModelConfig
    from lcd_bayes.model.program import CellBatch, Structure, lcd_model

    # control and one label targeting gene 0 of 3; five cells
    structure = Structure(np.array([[0.0], [1.0]]), np.array([[1.0, 0.0, 0.0]]), np.zeros(3, np.float32), 5)
    cells = CellBatch(jnp.ones((5, 3)), jnp.ones(5), jnp.array([0, 0, 1, 1, 1]))

    def sites(**model):
        return trace(seed(lcd_model, 0)).get_trace(cells, structure, ModelConfig(**model))

    pooled = sites(pool_decay=True, pool_concentration=True)
    law = pooled["log_decay"]["fn"]
    np.testing.assert_allclose(law.loc, pooled["decay_location"]["value"])
    np.testing.assert_allclose(law.scale, pooled["decay_spread"]["value"])
    concentration = pooled["concentration"]["fn"].base_dist
    np.testing.assert_allclose(concentration.loc, pooled["concentration_location"]["value"])
    np.testing.assert_allclose(concentration.scale, pooled["concentration_spread"]["value"])

    independent = sites()  # the default
    assert "decay_location" not in independent and "concentration_location" not in independent
    np.testing.assert_allclose(independent["log_decay"]["fn"].loc, np.log(2.0))
    np.testing.assert_allclose(independent["log_decay"]["fn"].scale, 1.5)
