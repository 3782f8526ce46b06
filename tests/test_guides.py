"""The row-block guide: its layout (row k of every site in block k) and its use by the fit."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcd_bayes.config import ROW_BLOCK_MAX_GENES, FitConfig, RunConfig
from lcd_bayes.inference.guides import RowTransform
from lcd_bayes.inference.svi import build_inference
from lcd_bayes.io.screen import load_perturbation_data
from lcd_bayes.model.program import CellBatch
from lcd_bayes.run import structure_of
from lcd_bayes.sim.linear import simulate


def test_row_transform_puts_row_k_of_every_site_in_block_k():
    raw = np.arange(12.0).reshape(3, 4)
    local = 100 + np.arange(12.0).reshape(3, 4)
    flat = jnp.concatenate([raw.ravel(), local.ravel()])  # numpyro's flat layout: site by site
    transform = RowTransform((4, 4), 3)
    blocks = transform._inverse(flat)
    np.testing.assert_array_equal(blocks, np.concatenate([raw, local], axis=1))
    np.testing.assert_array_equal(transform(blocks), flat)
    batched = jnp.stack([blocks, blocks + 1])
    assert transform(batched).shape == (2, 24)
    assert transform.inverse_shape((24,)) == (3, 8) and transform.forward_shape((5, 3, 8)) == (5, 24)
    # Sites of other widths (a per-gene vector: one column) join their row's block.
    decay = 200 + np.arange(3.0)
    mixed = RowTransform((1, 4), 3)
    flat = jnp.concatenate([decay, raw.ravel()])
    np.testing.assert_array_equal(mixed._inverse(flat), np.concatenate([decay[:, None], raw], axis=1))
    np.testing.assert_array_equal(mixed(mixed._inverse(flat)), flat)


def test_row_block_guide_scores_its_own_draws_exactly_when_blocks_are_ill_conditioned():
    """The ELBO needs log q of q's own draw. A strongly correlated block (small diagonal, large
    off-diagonal Cholesky entries, as a 100-gene fit reached) must not go through a float32
    triangular solve, which returned log q = -1e35 and made the fit non-finite."""
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer.util import log_density
    from lcd_bayes.inference.guides import AutoRowBlockNormal

    rows, columns = 3, 30

    def model():
        with numpyro.plate("rows", rows, dim=-1):
            numpyro.sample("w", dist.Normal(jnp.zeros((rows, columns)), 1.0).to_event(1))

    guide = AutoRowBlockNormal(model, batch_ndim=1, prefix="row_block")
    params = numpyro.handlers.trace(numpyro.handlers.seed(guide, 0)).get_trace()
    params = {name: site["value"] for name, site in params.items() if site["type"] == "param"}
    rng = np.random.default_rng(0)
    tril = np.tril(rng.uniform(-2.3, 2.3, (rows, columns, columns)), -1) + 0.01 * np.eye(columns)
    params["row_block_scale_tril"] = jnp.asarray(tril, jnp.float32)
    log_q, draw = log_density(numpyro.handlers.seed(guide, 1), (), {}, params)  # as the ELBO scores it
    eps = draw["_row_block_latent"]["intermediates"][0][0]  # the standard-normal draw behind loc + L eps
    expected = float(np.sum(-0.5 * np.asarray(eps) ** 2 - 0.5 * np.log(2 * np.pi)) - rows * columns * np.log(0.01))
    assert np.isfinite(float(log_q))
    np.testing.assert_allclose(float(log_q), expected, rtol=1e-5)


def test_auto_guide_is_row_block_for_small_panels_and_mean_field_beyond():
    fit = FitConfig()
    assert fit.guide == "auto"
    assert fit.resolved_guide(20) == "row_block"
    assert fit.resolved_guide(ROW_BLOCK_MAX_GENES + 1) == "mean_field"
    assert FitConfig(guide="low_rank").resolved_guide(5) == "low_rank"
    with pytest.raises(ValueError, match="guide must be one of"):
        FitConfig(guide="full")


def test_row_block_guide_couples_entries_of_a_row_only():
    adata = simulate(4, cells_per_condition=30, likelihood="gaussian", seed=0)
    data = load_perturbation_data(adata, continuous=True)
    config = RunConfig().replace(model={"likelihood": "gaussian"}, fit={"guide": "row_block"})
    structure = structure_of(data, config)
    cells = CellBatch(*(jnp.asarray(a) for a in (data.counts, data.size_factor, data.condition)))
    inference = build_inference(structure, config)
    state = inference.svi.init(jax.random.PRNGKey(0), cells)
    params = inference.svi.get_params(state)
    # One block per row: (log local 4, raw 4, gene k's log decay, basal drift, log noise sd).
    assert params["row_block_scale_tril"].shape == (4, 11, 11)
    # Correlate columns 2 and 3 of row 1 in both sites (block entries 2, 3 and 6, 7), and gene 1's
    # decay with raw[1, 2], and check the draws: same row correlated, other rows not, sites back
    # in their (target, source) layout.
    tril = np.array(params["row_block_scale_tril"])
    tril[1] = np.eye(11)
    tril[1, 3, 2] = tril[1, 7, 6] = tril[1, 8, 6] = 1.0
    params = {**params, "row_block_scale_tril": jnp.asarray(tril)}
    draws = inference.guide.sample_posterior(jax.random.PRNGKey(1), params, sample_shape=(4000,))
    raw = np.asarray(draws["interaction_raw"])
    assert raw.shape == (4000, 4, 4) and draws["log_decay"].shape == (4000, 4)
    assert np.corrcoef(raw[:, 1, 2], raw[:, 1, 3])[0, 1] > 0.6
    assert abs(np.corrcoef(raw[:, 0, 2], raw[:, 0, 3])[0, 1]) < 0.1
    assert abs(np.corrcoef(raw[:, 1, 2], raw[:, 2, 2])[0, 1]) < 0.1
    log_decay = np.asarray(draws["log_decay"])
    assert np.corrcoef(log_decay[:, 1], raw[:, 1, 2])[0, 1] > 0.6
    assert abs(np.corrcoef(log_decay[:, 2], raw[:, 1, 2])[0, 1]) < 0.1
    log_local = np.log(np.asarray(draws["interaction_local"]))
    assert np.corrcoef(log_local[:, 1, 2], log_local[:, 1, 3])[0, 1] > 0.6
