"""The in-memory API: fit, edges (also into adata.varp), predict, figures on given axes, save/load."""
import subprocess
import sys

import arviz as az
import matplotlib
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from matplotlib.figure import Figure

import lcd_bayes as lb

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def screen():
    return lb.simulate(4, cells_per_condition=40, likelihood="gaussian", seed=0)


@pytest.fixture(scope="module")
def run(screen):
    return lb.fit(screen.copy(), likelihood="gaussian", steps=200, refine="none", seed=0, progress=False)


def test_fit_returns_a_run_in_memory(run):
    assert isinstance(run, lb.Run) and run.folder is None
    assert run.genes == ["G0", "G1", "G2", "G3"]
    assert run.conditions[0] == "ctrl" and len(run.conditions) == 5
    assert run.losses.shape == (200,) and np.all(np.isfinite(run.losses))
    assert run.posterior["posterior"]["interaction"].dims == ("chain", "draw", "source", "target")
    assert "4 genes" in repr(run)
    assert list(run.ppc["condition"]) == run.conditions  # the posterior predictive check, in memory


@pytest.mark.filterwarnings("ignore:Estimated shape parameter of Pareto")  # a 200-step fit of 200 cells
def test_posterior_holds_each_cells_log_likelihood_for_loo(run):
    log_lik = run.posterior["log_likelihood"]["y"]
    assert log_lik.dims == ("chain", "draw", "cell")
    assert log_lik.sizes["cell"] == 200 and log_lik.sizes["draw"] == run.posterior["posterior"].sizes["draw"]
    assert np.all(np.isfinite(log_lik.values))
    # Draws differ: the pointwise values carry the posterior's spread, not one fixed value.
    assert float(log_lik.std("draw").median()) > 0
    loo = az.loo(run.posterior)
    assert np.isfinite(float(loo.elpd)) and float(loo.p) > 0
    # Gaussian cells of 4 genes: a few nats each, never thousands (no wild draw).
    assert -30 < float(log_lik.mean()) < 0


def test_edges_are_a_sorted_table_and_land_in_varp(run, screen):
    adata = screen.copy()
    table = run.edges(adata=adata)
    assert list(table.columns) == ["source", "target", "mean", "sd", "hdi_low", "hdi_high", "prob_edge",
                                   "prob_positive", "prob_negative"]
    assert len(table) == 4 * 3  # every ordered pair of distinct genes
    assert np.all(np.diff(table["prob_edge"].to_numpy()) <= 0)
    assert np.all(table["hdi_low"] <= table["mean"]) and np.all(table["mean"] <= table["hdi_high"])
    pd.testing.assert_frame_equal(table, lb.edges(run))

    # adata.varp: rows are sources, columns targets, in adata.var_names order.
    prob = adata.varp["lcd_bayes_prob_edge"]
    mean = adata.varp["lcd_bayes_mean"]
    assert prob.shape == (adata.n_vars, adata.n_vars)
    row = table.iloc[0]
    i, j = adata.var_names.get_loc(row["source"]), adata.var_names.get_loc(row["target"])
    assert prob[i, j] == pytest.approx(row["prob_edge"]) and mean[i, j] == pytest.approx(row["mean"])
    assert np.all(np.isnan(np.diag(prob)))
    assert adata.uns["lcd_bayes_edges"]["tau"] == pytest.approx(table.attrs["tau"])

    # Another threshold changes the probabilities, not the effects.
    strict = run.edges(tau=10 * table.attrs["tau"])
    merged = table.merge(strict, on=["source", "target"], suffixes=("", "_strict"))
    np.testing.assert_allclose(merged["mean"], merged["mean_strict"])
    assert np.all(merged["prob_edge_strict"] <= merged["prob_edge"] + 1e-12)


def test_edges_refuse_an_anndata_without_the_modelled_genes(run, screen):
    with pytest.raises(ValueError, match="not in adata.var_names"):
        run.edges(adata=screen[:, :2].copy())


def test_predict_in_memory_is_reproducible(run):
    cells = run.predict(["G0+G1", "G2"], n_cells=15, seed=1)
    assert cells.shape == (30, 4)
    assert list(cells.obs["condition"].unique()) == ["G0+G1", "G2"]
    assert cells.varm["expected_mean"].shape == (4, 2)
    again = lb.predict(run, "G0+G1,G2", n_cells=15, seed=1)
    np.testing.assert_array_equal(np.asarray(cells.X), np.asarray(again.X))


def test_figures_draw_into_the_given_axes(run):
    for draw in (lb.pl.elbo, lb.pl.edge_heatmap, lb.pl.forest, lb.pl.network):
        ax = Figure().add_subplot()
        assert draw(run, ax=ax) is ax
        assert ax.has_data() or ax.texts or ax.images, draw.__name__


def test_save_and_load_give_the_same_run(run, tmp_path):
    table = run.edges()
    folder = run.save(tmp_path / "run")
    assert run.folder == folder
    for name in ("config.toml", "data.json", "posterior.nc", "elbo.csv", "summary.txt", "clipr.nc", "edges.csv",
                 "ppc.csv", "ppc.png"):
        assert (folder / name).exists(), name
    loaded = lb.load(folder)
    assert loaded.config == run.config and loaded.genes == run.genes
    xr.testing.assert_allclose(loaded.posterior["posterior"]["interaction"],
                               run.posterior["posterior"]["interaction"], rtol=1e-6)
    pd.testing.assert_frame_equal(loaded.edges(), table)
    pd.testing.assert_frame_equal(loaded.ppc, run.ppc)
    assert loaded.posterior["log_likelihood"]["y"].shape == run.posterior["log_likelihood"]["y"].shape
    np.testing.assert_array_equal(
        np.asarray(loaded.predict("G0+G1", n_cells=5, seed=2).X),
        np.asarray(run.predict("G0+G1", n_cells=5, seed=2).X))
    with pytest.raises(FileExistsError, match="already holds a finished fit"):
        run.save(folder)


def test_load_says_what_to_do_with_an_unfinished_folder(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "checkpoint.npz").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="resume it by running the same"):
        lb.load(tmp_path / "half")
    with pytest.raises(FileNotFoundError, match="no such run folder"):
        lb.load(tmp_path / "absent")


def test_importing_the_package_loads_no_jax():
    # `lcd-bayes --help` imports the package: the API loads on first use.
    code = "import sys, lcd_bayes; assert 'jax' not in sys.modules; print(sorted(lcd_bayes.__all__))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "fit" in out.stdout
