"""CLIPR: exact on linear drifts, a true fixed point on nonlinear ones, posterior summaries that
ArviZ reads as they are, and the run-folder outputs."""
import json

import arviz as az
import arviz_plots as azp
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import xarray as xr

from lcd_bayes.analysis.clipr import (
    clipr_effects, clipr_run, edge_table, initial_response, limit_response, linear_drift,
    posterior_effects, single_perturbations,
)
from lcd_bayes.dynamics.fixed_point import fixed_point
from lcd_bayes.io.run_folder import load_datatree
from lcd_bayes.sim.linear import random_linear_system

COLUMNS = ["source", "target", "mean", "sd", "hdi_low", "hdi_high", "prob_edge", "prob_positive", "prob_negative"]


def linear_system(d=5, seed=0):
    system = random_linear_system(d, expected_degree=3.0, rng=seed)
    params = {"drift": jnp.asarray(system.drift, jnp.float32),
              "basal_drift": jnp.asarray(system.basal_drift, jnp.float32)}
    return system, params


def on_target_shifts(d, seed=1):
    rng = np.random.default_rng(seed)
    return np.diag(rng.choice([-1.0, 1.0], d) * rng.uniform(5, 15, d)).astype(np.float32)


def test_newton_on_a_linear_drift_is_the_exact_stationary_mean():
    system, params = linear_system()
    shift = jnp.asarray(on_target_shifts(5)[2])
    exact = np.linalg.solve(system.drift, -(system.basal_drift + np.asarray(shift)))
    result = jax.jit(lambda p, c: fixed_point(linear_drift, p, c, jnp.full(5, 3.0)))(params, shift)
    np.testing.assert_allclose(result.x, exact, rtol=1e-5, atol=1e-5)
    assert int(result.iterations) <= 2  # one exact step, at most one more to see it has converged
    np.testing.assert_allclose(limit_response(linear_drift, params, shift), exact, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(initial_response(linear_drift, params, shift), system.basal_drift + shift, rtol=1e-6)


def test_newton_finds_a_fixed_point_of_a_nonlinear_drift():
    _, params = linear_system()

    def cubic(p, x, shift):
        return linear_drift(p, x, shift) - 0.1 * x**3

    shift = jnp.asarray(on_target_shifts(5)[0])
    result = fixed_point(cubic, params, shift)
    assert np.all(np.isfinite(result.x)) and float(result.residual) < 1e-4
    np.testing.assert_allclose(cubic(params, result.x, shift), 0.0, atol=1e-4)
    assert not np.allclose(result.x, limit_response(linear_drift, params, shift), atol=1e-2)
    effect = clipr_effects(cubic, params, jnp.asarray(on_target_shifts(5)))
    assert effect.shape == (5, 5) and np.all(np.isfinite(effect)) and np.all(np.diag(effect) == 0)


def test_clipr_of_a_linear_drift_is_its_effect_matrix():
    system, params = linear_system()
    effect = clipr_effects(linear_drift, params, jnp.asarray(on_target_shifts(5)), ridge=1e-9)
    # Orientation: E[j, k] = A[k, j], the direct effect of gene j on gene k.
    np.testing.assert_allclose(effect, system.effect, atol=1e-4)
    assert np.all(np.diag(effect) == 0)


def posterior_tree(n_draws=12, d=5, seed=0):
    """A hand-built posterior of linear drifts in the layout of ``posterior.nc``."""
    rng = np.random.default_rng(seed)
    genes = [f"G{i}" for i in range(d)]
    base = random_linear_system(d, expected_degree=3.0, rng=seed)
    drift = base.drift + 0.1 * rng.normal(size=(n_draws, d, d)) * (1 - np.eye(d))
    basal = base.basal_drift + 0.1 * rng.normal(size=(n_draws, d))
    shift = on_target_shifts(d)[None] * rng.uniform(0.8, 1.2, size=(n_draws, 1, 1))
    # A label seen only in a combination is no CLIPR response.
    labels = genes + ["drug"]
    shift = np.concatenate([shift, rng.normal(size=(n_draws, 1, d))], axis=1)
    design = np.vstack([np.zeros(d + 1), np.eye(d + 1)[:d], np.eye(d + 1)[0] + np.eye(d + 1)[d]])
    conditions = ["ctrl"] + genes + ["G0+drug"]
    posterior = xr.Dataset(
        {"drift": (("chain", "draw", "target", "source"), drift[None]),
         "basal_drift": (("chain", "draw", "gene"), basal[None]),
         "shift": (("chain", "draw", "perturbation", "gene"), shift[None])},
        coords={"chain": [0], "draw": np.arange(n_draws), "gene": genes, "source": genes, "target": genes,
                "perturbation": labels},
    )
    constant = xr.Dataset({"design": (("condition", "perturbation"), design)},
                          coords={"condition": conditions, "perturbation": labels})
    return xr.DataTree.from_dict({"posterior": posterior, "constant_data": constant})


def test_posterior_effects_keeps_sample_dims_and_matches_the_drift():
    tree = posterior_tree()
    assert single_perturbations(tree) == [f"G{i}" for i in range(5)]
    effects = posterior_effects(tree, ridge=1e-9, chunk_size=5)  # 12 draws: chunks of 5, 5, 2
    assert effects["effect"].dims == ("chain", "draw", "source", "target")
    assert effects.sizes == {"chain": 1, "draw": 12, "source": 5, "target": 5, "gene": 5}
    assert list(effects["source"].values) == [f"G{i}" for i in range(5)]
    interaction = tree["posterior"]["drift"].transpose("chain", "draw", "source", "target").values * (1 - np.eye(5))
    np.testing.assert_allclose(effects["effect"].values, interaction, atol=2e-4)
    np.testing.assert_allclose(effects["effect"].mean(("chain", "draw")), interaction.mean((0, 1)), atol=1e-4)
    np.testing.assert_allclose(
        effects["self_decay"].values, -np.diagonal(tree["posterior"]["drift"].values, axis1=-2, axis2=-1), atol=2e-4
    )


def test_synthetic_probes_recover_the_drift_when_few_genes_were_perturbed():
    """With 2 of 5 genes perturbed the trained responses cannot span the genes: CLIPR then probes
    the fitted drift with one-unit shifts on the 3 untargeted genes and recovers every effect,
    where the trained responses alone give the ridge's minimum-norm answer."""
    full = posterior_tree()
    posterior = full["posterior"].to_dataset().sel(perturbation=["G0", "G1"])
    drift = posterior["drift"].values
    posterior["self_decay"] = (("chain", "draw", "gene"), -np.diagonal(drift, axis1=-2, axis2=-1))
    targets = np.eye(5)[:2]
    constant = xr.Dataset({"design": (("condition", "perturbation"), np.vstack([np.zeros(2), np.eye(2)])),
                           "targets": (("perturbation", "gene"), targets)},
                          coords={"condition": ["ctrl", "G0", "G1"], "perturbation": ["G0", "G1"],
                                  "gene": [f"G{i}" for i in range(5)]})
    tree = xr.DataTree.from_dict({"posterior": posterior, "constant_data": constant})
    interaction = posterior["drift"].transpose("chain", "draw", "source", "target").values * (1 - np.eye(5))

    probed = posterior_effects(tree, ridge=1e-9)
    np.testing.assert_allclose(probed["effect"].values, interaction, atol=5e-4)
    assert json.loads(probed.attrs["responses"]) == ["control", "G0", "G1", "synthetic:G2", "synthetic:G3",
                                                     "synthetic:G4"]
    trained_only = posterior_effects(tree, ridge=1e-9, synthetic=False)
    assert np.abs(trained_only["effect"].values - interaction).max() > 0.5


def hand_built_effects(n_draws=200, d=4, seed=0):
    """Zero-mean noise everywhere but one clear positive and one clear negative edge."""
    rng = np.random.default_rng(seed)
    draws = 0.1 * rng.normal(size=(1, n_draws, d, d))
    draws[..., 0, 1] += 2.0
    draws[..., 2, 3] -= 1.0
    draws *= 1 - np.eye(d)
    genes = ["A", "B", "C", "D"]
    return xr.Dataset({"effect": (("chain", "draw", "source", "target"), draws)},
                      coords={"chain": [0], "draw": np.arange(n_draws), "source": genes, "target": genes})


def test_edge_table_probabilities_and_order():
    effects = hand_built_effects()
    table = edge_table(effects, tau=0.5, hdi_prob=0.9)
    assert list(table.columns) == COLUMNS and len(table) == 12
    assert not (table["source"] == table["target"]).any()
    assert table.loc[0, ["source", "target"]].tolist() == ["A", "B"]  # ties at P = 1 broken by |mean|
    assert table.loc[1, ["source", "target"]].tolist() == ["C", "D"]
    assert table.loc[0, "prob_edge"] == 1 and table.loc[0, "prob_positive"] == 1 and table.loc[0, "prob_negative"] == 0
    assert table.loc[1, "prob_negative"] == 1 and table.loc[1, "mean"] < 0
    assert table["prob_edge"].iloc[2:].max() < 0.01
    assert np.all(np.diff(table["prob_edge"]) <= 0)
    np.testing.assert_allclose(table["prob_edge"], table["prob_positive"] + table["prob_negative"])
    first = effects["effect"].values[0, :, 0, 1]
    assert table.loc[0, "hdi_low"] < np.quantile(first, 0.5) < table.loc[0, "hdi_high"]
    assert np.mean((first >= table.loc[0, "hdi_low"]) & (first <= table.loc[0, "hdi_high"])) == pytest.approx(0.9, abs=0.02)
    # Without tau, a tenth of the largest mean effect (there is no self-decay to scale by).
    assert edge_table(effects).attrs["tau"] == pytest.approx(0.2, rel=0.05)


def test_arviz_reads_the_clipr_tree_without_sample_dims():
    effects = hand_built_effects()
    tree = xr.DataTree.from_dict({"posterior": effects})
    summary = az.summary(tree, kind="stats")
    assert "effect[A, B]" in summary.index and summary.loc["effect[A, B]", "mean"] == pytest.approx(2.0, abs=0.05)
    interval = az.hdi(tree, prob=0.9)["effect"]
    assert set(interval.dims) == {"source", "target", "ci_bound"}
    collection = azp.plot_forest(tree, var_names=["effect"], coords={"source": ["A"]}, combined=True)
    plt.close(collection.viz["figure"].item())


def test_clipr_run_writes_the_effects_and_the_edge_table(tiny_run):
    tree, table = clipr_run(tiny_run)
    assert (tiny_run / "clipr.nc").exists() and (tiny_run / "edges.csv").exists()
    written = pd.read_csv(tiny_run / "edges.csv")
    assert list(written.columns) == COLUMNS and len(written) == 12
    pd.testing.assert_frame_equal(written, table, check_dtype=False, check_like=False)
    saved = xr.open_datatree(tiny_run / "clipr.nc", engine="h5netcdf")
    assert saved["posterior"]["effect"].dims == ("chain", "draw", "source", "target")
    assert saved["posterior"].sizes["draw"] == 30
    assert {"tau", "hdi_prob", "ridge"} <= set(saved["edges"].attrs)
    # ArviZ's defaults find the draws in the tree as written (no sample_dims, no group).
    assert "effect[G0, G1]" in az.summary(tree, kind="stats").index
    assert az.hdi(tree)["effect"].sizes == {"source": 4, "target": 4, "ci_bound": 2}
    plt.close(azp.plot_forest(tree, var_names=["self_decay"]).viz["figure"].item())
    # The fit's drift is linear: CLIPR gives back its interaction draw by draw.
    posterior = load_datatree(tiny_run / "posterior.nc")["posterior"]  # interaction is derived on read
    np.testing.assert_allclose(saved["posterior"]["effect"].values, posterior["interaction"].values,
                               atol=2e-3 * float(np.abs(posterior["interaction"]).max()) + 1e-4)
    saved.close()
