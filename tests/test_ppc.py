"""The posterior predictive check: a correct posterior passes it, a collapsed one warns, and every fit
leaves it in the run folder (ppc.csv, ppc.png), in ``Run.ppc`` and in the command's summary."""
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

import lcd_bayes as lb
from lcd_bayes.analysis.ppc import (MIN_TOP_DE_CORRELATION, format_ppc, posterior_predictive_check, ppc_dataset,
                                    ppc_table)
from lcd_bayes.cli import _print_fit
from lcd_bayes.config import RunConfig
from lcd_bayes.diagnostics import LcdBayesWarning
from lcd_bayes.inference.posterior import Coords, to_datatree
from lcd_bayes.io.run_folder import data_record
from lcd_bayes.io.screen import load_perturbation_data
from lcd_bayes.sim.linear import LIBRARY_SIZE_KEY, simulate, truth_from_uns

COLUMNS = ["condition", "n_obs_cells", "n_pred_cells", "pearson_delta_all", "pearson_delta_top_de",
           "shift_ratio_top_de", "split_half_top_de", "rmse_mean", "variance_ratio", "zero_fraction_pred",
           "zero_fraction_obs"]


@pytest.fixture(scope="module")
def screen():
    """Twelve genes, each perturbed once, NB counts through the default link; read as a fit reads them."""
    adata = simulate(12, cells_per_condition=150, likelihood="nb", link=RunConfig().model.link, seed=0)
    return adata, load_perturbation_data(adata, size_factor_key=LIBRARY_SIZE_KEY)


def truth_posterior(adata, data, *, collapsed: bool = False, n_draws: int = 10):
    """A posterior whose every draw is the simulation's truth: what a perfect fit would hold. With
    ``collapsed``, every shift is 0, so each condition is predicted like the control: a fit that took
    the perturbations' effects for noise."""
    truth = truth_from_uns(adata)
    shift = truth["shift"][[truth["perturbations"].index(p) for p in data.perturbations]]  # in the data's order
    draws = {"drift": truth["drift"], "basal_drift": truth["basal_drift"], "self_decay": truth["decay"],
             "shift": 0.0 * shift if collapsed else shift,
             "stationary_sd": np.sqrt(np.diag(truth["covariance"])), "gene_scale": truth["gene_scale"],
             "concentration": truth["concentration"]}
    draws = {name: np.repeat(np.asarray(value, np.float32)[None], n_draws, axis=0) for name, value in draws.items()}
    return to_datatree(draws, Coords(data.genes, data.conditions, data.perturbations))


def check(screen, **options):
    adata, data = screen
    return posterior_predictive_check(truth_posterior(adata, data, **options), RunConfig(), data_record(data), data)


def test_the_true_posterior_reproduces_its_training_data(screen):
    table = check(screen)  # warnings are errors here: a correct posterior must not warn
    assert list(table.columns) == COLUMNS and list(table["condition"]) == list(screen[1].conditions)
    control, perturbed = table.iloc[0], table.iloc[1:]
    assert control["condition"] == "ctrl" and np.isnan(control["pearson_delta_top_de"])
    assert (table["n_pred_cells"] == 150).all() and (table["n_obs_cells"] == 150).all()
    median = table.attrs["aggregate"]["median"]
    assert median["pearson_delta_top_de"] > 0.9 and median["pearson_delta_all"] > 0.9
    # Each condition does at least about as well as half of its cells predict the other half (a
    # weakly perturbed one, whose halves agree at 0.45, scores 0.58).
    assert (perturbed["pearson_delta_top_de"] > perturbed["split_half_top_de"] - 0.1).all()
    assert 0.7 < median["shift_ratio_top_de"] < 1.3 and 0.7 < median["variance_ratio"] < 1.4
    assert 0.7 < control["variance_ratio"] < 1.4
    assert (abs(table["zero_fraction_pred"] - table["zero_fraction_obs"]) < 0.03).all()


def test_a_collapsed_posterior_warns_and_scores_low(screen):
    with pytest.warns(LcdBayesWarning, match="does not reproduce its own training conditions.*size-factor-key"):
        table = check(screen, collapsed=True)
    median = table.attrs["aggregate"]["median"]
    assert median["pearson_delta_top_de"] < MIN_TOP_DE_CORRELATION < median["split_half_top_de"]
    assert median["shift_ratio_top_de"] < 0.3  # its shifts are Monte Carlo noise
    # The control itself is still reproduced: what failed is the perturbations' effects.
    assert 0.7 < table.iloc[0]["variance_ratio"] < 1.4


def test_the_check_survives_the_posterior_group_and_says_it_in_one_line(screen):
    table = check(screen)
    again = ppc_table(ppc_dataset(table, "ctrl"))
    pd.testing.assert_frame_equal(again, table)
    np.testing.assert_array_equal(again.attrs["mean_shifts"].top_de, table.attrs["mean_shifts"].top_de)
    np.testing.assert_allclose(again.attrs["mean_shifts"].predicted, table.attrs["mean_shifts"].predicted)
    line = format_ppc(table)
    assert line.startswith("posterior predictive check:") and "\n" not in line and "zeros" in line
    ax = lb.pl.plot_ppc(table, ax=Figure().add_subplot())
    assert ax.collections and f"{table.attrs['aggregate']['median']['pearson_delta_top_de']:.2f}" in ax.get_title()


def test_every_fit_leaves_its_check_in_the_run_folder(tiny_run, capsys):
    assert (tiny_run / "ppc.csv").exists() and (tiny_run / "ppc.png").stat().st_size > 0
    run = lb.load(tiny_run)
    stored = pd.read_csv(tiny_run / "ppc.csv")
    assert list(stored.columns) == COLUMNS and len(stored) == len(run.conditions)
    table = run.ppc
    pd.testing.assert_frame_equal(table, stored, check_dtype=False)
    assert table["zero_fraction_obs"].isna().all()  # a Gaussian run: no counts, no zeros to compare
    assert run.posterior["posterior"].attrs["ppc_seconds"] > 0
    for draw in (lb.pl.ppc, lb.pl.ppc_correlations):
        ax = Figure().add_subplot()
        assert draw(run, ax=ax) is ax and ax.has_data()
    assert lb.pl.ppc(tiny_run, ax=Figure().add_subplot()).has_data()  # from the folder too
    _print_fit(run)
    assert "posterior predictive check: predicted vs observed top-20 mean shifts r = " in capsys.readouterr().out


def test_the_data_must_be_the_runs(screen):
    adata, data = screen
    with pytest.raises(ValueError, match="genes are not the run's"):
        posterior_predictive_check(truth_posterior(adata, data), RunConfig(), data_record(data),
                                   data._replace(genes=tuple(reversed(data.genes))))


def test_the_switch_is_a_boolean_of_the_fit_section():
    assert RunConfig().fit.ppc is True and "ppc = true" in RunConfig().to_toml()
    assert RunConfig.from_dict({"fit": {"ppc": False}}).fit.ppc is False
    with pytest.raises(ValueError, match="ppc must be true or false"):
        RunConfig.from_dict({"fit": {"ppc": "no"}})


@pytest.mark.slow
def test_a_real_screen_is_reproduced_and_its_collapse_is_caught(perturbench_path):
    """Norman et al. 2019 (CRISPRa): control and four singles, 20 genes. The default fit reproduces
    the training conditions; the same posterior with its shifts removed (a fit that took the
    perturbations' effects for noise, as the softplus link's did on this screen) warns."""
    import anndata

    from lcd_bayes.analysis.ppc import ppc_table
    from lcd_bayes.run import fit

    adata = anndata.read_h5ad(perturbench_path)
    keep = adata.obs["condition"].isin(["control", "KLF1", "MAPK1", "FOXO4", "IER5L"]).to_numpy()
    adata = adata[(adata.obs["dataset"] == "norman19").to_numpy() & keep].copy()
    run = fit(adata, perturbation_key="condition", control="control", total_counts_key="ncounts",
              n_top_genes=20, seed=0, refine="none", progress=False)
    median = ppc_table(run.posterior["ppc"]).attrs["aggregate"]["median"]
    # Measured (seed 0): 0.78, the data's own split-half agreement 0.79; a fit cannot be held to do
    # better than the halves of its own conditions agree with each other.
    assert median["pearson_delta_top_de"] > 0.6 and median["pearson_delta_top_de"] > 0.8 * median["split_half_top_de"]

    posterior = run.posterior["posterior"].to_dataset()
    collapsed = run.posterior.copy()
    collapsed["posterior"] = posterior.assign(shift=0.0 * posterior["shift"])
    if "guide_posterior" in collapsed.children:
        del collapsed["guide_posterior"]
    with pytest.warns(LcdBayesWarning, match="does not reproduce its own training conditions"):
        posterior_predictive_check(collapsed, run.config, data_record(run.data), run.data)
