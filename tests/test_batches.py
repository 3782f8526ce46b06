"""Batches (``batch_key``): per-batch technical and biological effects in the program, in
predictions for a batch or averaged over them, and a fit that recovers them."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest
from numpyro.handlers import seed, substitute, trace
from numpyro.infer.util import log_density

import lcd_bayes as lb
from lcd_bayes.analysis.predict import predict_posterior
from lcd_bayes.config import RunConfig
from lcd_bayes.dynamics.stationary import stationary_means
from lcd_bayes.inference.posterior import Coords, to_datatree
from lcd_bayes.io.run_folder import data_record
from lcd_bayes.io.screen import DataError, load_perturbation_data
from lcd_bayes.model.program import CellBatch, Structure, drift_prior, lcd_model
from lcd_bayes.sim.linear import LIBRARY_SIZE_KEY, simulate, truth_from_uns

BATCHES = dict(n_batches=3, batch_scale_sd=0.5, batch_basal_sd=0.8)


def structure(n_genes=3, n_batches=3, n_cells=6):
    return Structure(np.array([[0.0], [1.0]], np.float32), np.eye(1, n_genes, dtype=np.float32),
                     np.zeros(n_genes, np.float32), n_cells, n_batches)


def test_a_batch_moves_the_means_through_the_network():
    """A batch's basal-drift shift D beta_b moves its cells' means by -A^{-1} D beta_b, as a perturbation's
    shift does; the program records both per batch."""
    config = RunConfig().model
    sites = trace(seed(drift_prior, 0)).get_trace(structure(), config)
    drift = sites["drift"]["value"]
    decay = jnp.exp(sites["log_decay"]["value"])
    basal = sites["batch_basal_drift"]["value"]
    assert basal.shape == (3, 3) and sites["batch_basal_relative"]["value"].shape == (3, 3)  # (genes, batches) drawn
    np.testing.assert_allclose(basal, decay * sites["batch_basal_relative"]["value"].T, rtol=1e-6)
    np.testing.assert_allclose(sites["batch_mean_shift"]["value"], stationary_means(drift, basal), rtol=1e-5)
    plain = trace(seed(drift_prior, 0)).get_trace(structure(n_batches=1), config)
    assert "batch_mean_shift" not in plain and "batch_basal_sd" not in plain


def test_the_cells_batches_reach_the_likelihood():
    """With the batch effects set to what made the data, the cells' own batch labels explain them better
    than shuffled labels, for continuous values (offsets) and counts (gene scales)."""
    rng = np.random.default_rng(0)
    n_cells, n_genes = 60, 3
    batch = np.repeat(np.arange(3), n_cells // 3).astype(np.int32)
    offset = np.array([[-2.0, 0.0, 2.0], [1.5, -1.5, 0.0], [0.0, 2.0, -2.0]], np.float32)  # (batches, genes)
    for likelihood in ("gaussian", "nb"):
        config = RunConfig().model.__class__(likelihood=likelihood)
        if likelihood == "gaussian":
            values = offset[batch] + 0.3 * rng.standard_normal((n_cells, n_genes))
            fixed = {"batch_offset": offset.T, "noise_sd": np.full(n_genes, 0.5, np.float32)}
        else:
            values = rng.poisson(10.0 * np.exp(offset[batch]))
            # Cells' states pinned near 0 (fast self-decay, no basal drift, no effects): the counts'
            # differences between batches are the batches' gene scales alone.
            fixed = {"batch_log_scale": offset.T, "gene_scale": np.full(n_genes, 10.0, np.float32),
                     "log_decay": np.full(n_genes, np.log(50.0), np.float32),
                     "basal_relative": np.zeros(n_genes, np.float32),
                     "interaction_raw": np.zeros((n_genes, n_genes), np.float32)}
        cells = CellBatch(jnp.asarray(values, jnp.float32), jnp.ones(n_cells), jnp.zeros(n_cells, jnp.int32),
                          jnp.asarray(batch))
        model = substitute(seed(lcd_model, 1), data=fixed)
        start = trace(model).get_trace(cells, structure(n_cells=n_cells), config)
        params = {name: site["value"] for name, site in start.items() if site["type"] == "sample" and not site["is_observed"]}
        params.update(fixed)

        def log_joint(labels):
            shuffled = cells._replace(batch=jnp.asarray(labels))
            return float(log_density(seed(lcd_model, 1), (shuffled, structure(n_cells=n_cells), config), {}, params)[0])

        assert log_joint(batch) > log_joint(np.roll(batch, n_cells // 3)) + 50.0, likelihood


def test_nonlinear_drift_refuses_batches():
    config = RunConfig().replace(model={"drift": "nonlinear"}).model
    with pytest.raises(ValueError, match="linear drift only"):
        trace(seed(drift_prior, 0)).get_trace(structure(), config)


def batched_truth(likelihood: str, cells: int):
    """A batched screen and a posterior whose every draw is its truth (as tests/test_transient.py)."""
    adata = simulate(4, n_perturbed=2, cells_per_condition=cells, likelihood=likelihood, link="exp", noise_sd=0.05, shift_range=(0.5, 1.5),
                     seed=3, **BATCHES)
    gaussian = likelihood == "gaussian"
    data = load_perturbation_data(adata, continuous=gaussian, batch_key="batch",
                                  size_factor_key=None if gaussian else LIBRARY_SIZE_KEY)
    truth = truth_from_uns(adata)
    shift = truth["shift"][[truth["perturbations"].index(p) for p in data.perturbations]]
    draws = {"drift": truth["drift"], "basal_drift": truth["basal_drift"], "self_decay": truth["decay"], "shift": shift,
             "stationary_sd": np.sqrt(np.diag(truth["covariance"])), "batch_mean_shift": truth["batch_mean_shift"],
             "batch_basal_drift": truth["batch_basal_shift"]}
    if gaussian:
        draws.update(noise_sd=np.full(4, 0.05), batch_offset=truth["batch_log_scale"])
    else:
        draws.update(gene_scale=truth["gene_scale"], concentration=truth["concentration"],
                     batch_log_scale=truth["batch_log_scale"])
    draws = {name: np.repeat(np.asarray(value, np.float32)[None], 2, axis=0) for name, value in draws.items()}
    tree = to_datatree(draws, Coords(data.genes, data.conditions, data.perturbations, data.batches))
    config = RunConfig().replace(model={"likelihood": likelihood})
    return adata, data, tree, config, data_record(data)


def test_predicted_cells_of_a_batch_are_its_simulated_cells():
    """Predicted for a named batch, a condition's cells have that batch's simulated mean (continuous
    values: the stationary mean moved by the batch's network response and its offset)."""
    adata, data, tree, config, record = batched_truth("gaussian", cells=600)
    truth = truth_from_uns(adata)
    conditions = ["ctrl", *data.perturbations]
    for b, name in enumerate(data.batches):
        pred = predict_posterior(tree, config, record, conditions, n_cells=600, n_draws=2, seed=b, batch=name)
        assert set(pred.obs["batch"]) == {name}
        expected = truth["condition_mean"] + truth["batch_mean_shift"][b] + truth["batch_log_scale"][b]
        np.testing.assert_allclose(pred.varm["expected_mean"].T, expected, rtol=1e-4, atol=1e-4)
        for q, condition in enumerate(conditions):
            simulated = np.asarray(adata.X)[(adata.obs["condition"] == condition).to_numpy()
                                            & (adata.obs["batch"] == name).to_numpy()]
            predicted = np.asarray(pred.X)[(pred.obs["condition"] == condition).to_numpy()]
            error = np.sqrt(simulated.var(axis=0) / len(simulated) + predicted.var(axis=0) / len(predicted))
            assert np.all(np.abs(predicted.mean(axis=0) - simulated.mean(axis=0)) < 5 * error), (name, condition)


def test_default_prediction_mixes_the_batches_as_the_screen_does():
    """Without a batch, cells come from the batches in proportion to the training cells and the
    expected counts are the batches' expected counts averaged with those weights."""
    adata, data, tree, config, record = batched_truth("nb", cells=30)
    weights = np.asarray(record["cells_per_batch"]) / data.n_cells
    pred = predict_posterior(tree, config, record, "G0,G2", n_cells=3000, n_draws=2, seed=0)
    shares = pred.obs["batch"].value_counts(normalize=True).reindex(list(data.batches)).to_numpy()
    np.testing.assert_allclose(shares, weights, atol=0.02)
    per_batch = np.stack([predict_posterior(tree, config, record, "G0,G2", n_cells=2, n_draws=2, batch=name)
                          .varm["expected_mean"] for name in data.batches])
    np.testing.assert_allclose(pred.varm["expected_mean"], np.einsum("b,bgq->gq", weights, per_batch), rtol=1e-4)
    # The cells follow their batch's gene scales: per batch, their mean counts match its expected ones.
    for b, name in enumerate(data.batches):
        cells = np.asarray(pred.X)[(pred.obs["batch"] == name).to_numpy() & (pred.obs["condition"] == "G0").to_numpy()]
        ratio = cells.mean(axis=0) / per_batch[b][:, 0]
        np.testing.assert_allclose(ratio, 1.0, atol=0.25)


def test_asking_for_a_batch_the_run_does_not_have():
    _, data, tree, config, record = batched_truth("gaussian", cells=5)
    with pytest.raises(DataError, match="did you mean 'batch1'"):
        predict_posterior(tree, config, record, "G0", n_cells=2, n_draws=2, batch="batch_1")
    plain = {key: value for key, value in record.items() if key not in ("batches", "batch_key", "cells_per_batch")}
    with pytest.raises(DataError, match="fitted without batches"):
        predict_posterior(tree, config, plain, "G0", n_cells=2, n_draws=2, batch="batch1")


@pytest.mark.slow
def test_a_fit_with_batches_recovers_them_and_predicts_per_batch(tmp_path):
    """End to end on a small continuous screen: the batch effects' posterior means follow the
    simulated ones (between batches), and a loaded run predicts a named batch."""
    adata = simulate(5, cells_per_condition=80, likelihood="gaussian", noise_sd=0.1, seed=4, **BATCHES)
    config = RunConfig().replace(model={"likelihood": "gaussian"}, fit={"steps": 1500, "refine": "none", "ppc": False})
    run = lb.fit(adata, tmp_path / "run", config=config, batch_key="batch", progress=False)
    posterior = run.posterior["posterior"]
    assert list(posterior["batch_mean_shift"].coords["batch"].values) == ["batch0", "batch1", "batch2"]
    truth = truth_from_uns(adata)
    fitted = (posterior["batch_mean_shift"] + posterior["batch_offset"]).mean(("chain", "draw")).values
    simulated = truth["batch_mean_shift"] + truth["batch_log_scale"]
    centre = lambda a: a - a.mean(axis=0)  # noqa: E731  (the levels trade off against the basal drift)
    assert np.corrcoef(centre(fitted).ravel(), centre(simulated).ravel())[0, 1] > 0.9
    loaded = lb.load(tmp_path / "run")
    assert loaded.batches == ["batch0", "batch1", "batch2"]
    pred = loaded.predict("G0", n_cells=20, batch="batch2")
    assert set(pred.obs["batch"]) == {"batch2"} and pred.uns["lcd_bayes"]["batch"] == "batch2"
