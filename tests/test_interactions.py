"""Genetic-interaction types of doubles (lcd_bayes.analysis.interactions)."""
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from scipy.stats import spearmanr

import lcd_bayes as lb
from lcd_bayes.analysis.interactions import (TYPES, _doubles, _kept_genes, classify, decompose,
                                             observed_scores)
from lcd_bayes.cli import main
from lcd_bayes.config import RunConfig
from lcd_bayes.diagnostics import DataError
from lcd_bayes.run import fit
from lcd_bayes.sim.linear import simulate, truth_from_uns


def _singles(n_genes=50, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=n_genes), rng.normal(size=n_genes), rng


def _type(double, first, second):
    scores = decompose(first, second, double, np.ones(first.shape, bool))
    kind, dominant = classify({k: np.asarray(v) for k, v in scores.items()})
    return TYPES[int(kind)], int(dominant), scores


@pytest.mark.parametrize("make, expected", [
    (lambda a, b, rng: a + b, "additive"),
    (lambda a, b, rng: 2.0 * (a + b), "synergistic"),
    (lambda a, b, rng: 0.5 * (a + b), "buffering"),
    (lambda a, b, rng: a + 0.1 * b, "epistatic"),
    (lambda a, b, rng: rng.normal(size=a.size), "neomorphic"),
    (lambda a, b, rng: -(a + b), "neomorphic"),  # against both singles: not explained by them
])
def test_each_type_from_a_double_built_to_be_it(make, expected):
    first, second, rng = _singles()
    kind, dominant, scores = _type(make(first, second, rng), first, second)
    assert kind == expected
    assert (dominant == 0) == (expected == "epistatic")


def test_the_coefficients_are_norman_s_decomposition():
    first, second, rng = _singles()
    double = 1.3 * first + 0.6 * second + 0.05 * rng.normal(size=first.size)
    scores = decompose(first, second, double, np.ones(first.size, bool))
    np.testing.assert_allclose([scores["c_first"], scores["c_second"]], [1.3, 0.6], atol=0.03)
    np.testing.assert_allclose(scores["magnitude"], np.hypot(1.3, 0.6), atol=0.03)
    assert scores["fit"] > 0.99
    # The other single dominates when the roles swap; scaling every shift changes nothing.
    assert _type(0.1 * first + second, first, second)[1] == 1
    scaled = decompose(3 * first, 3 * second, 3 * double, np.ones(first.size, bool))
    np.testing.assert_allclose(scaled["magnitude"], scores["magnitude"], rtol=1e-5)


def test_left_out_genes_do_not_count_and_collinear_singles_are_undefined():
    first, second, _ = _singles()
    double = first + second
    double_with_target = double.copy()
    double_with_target[0] = 100.0  # the target gene's own shift: the perturbation, not a response
    keep = np.ones(first.size, bool)
    keep[0] = False
    np.testing.assert_allclose(decompose(first, second, double_with_target, keep)["c_first"], 1.0, rtol=1e-5)
    undefined = decompose(first, 2 * first, double, np.ones(first.size, bool))
    assert np.isnan(undefined["c_first"])
    assert classify({k: np.asarray(v) for k, v in undefined.items()})[0] == -1


def test_observed_scores_track_the_simulators_latent_truth():
    """Scored from counts (log1p, z-scored on the control cells) as a user's observed doubles are,
    the nonlinear simulator's doubles keep the order of their latent fit to the singles."""
    adata = simulate(12, n_doubles=15, cells_per_condition=300, drift="nonlinear", seed=1)
    truth = truth_from_uns(adata)
    record = {"perturbation_key": "condition", "control": "ctrl", "sep": "+", "genes": list(adata.var_names),
              "conditions": truth["conditions"], "targets": truth["targets"]}
    pairs = _doubles(None, record)
    keep = _kept_genes(pairs, record)
    seen = observed_scores(adata, record, pairs, keep)
    row = {label: i for i, label in enumerate(truth["conditions"])}
    z = (truth["condition_mean"] - truth["condition_mean"][0]) / np.sqrt(np.diag(truth["covariance"]))
    index = np.array([[row[first], row[second], row[label]] for label, first, second in pairs])
    latent = decompose(z[index[:, 0]], z[index[:, 1]], z[index[:, 2]], keep)
    assert spearmanr(latent["fit"], seen["observed_fit"])[0] > 0.5
    assert np.all(np.isin(seen["observed_type"], TYPES))


@pytest.fixture(scope="module")
def screen_with_doubles():
    return simulate(6, n_doubles=2, cells_per_condition=20, likelihood="gaussian", seed=0)


@pytest.fixture(scope="module")
def linear_run(tmp_path_factory, screen_with_doubles):
    """A tiny linear fit on the screen's control and singles (6 genes: a double of two targets
    leaves four responding genes to decompose)."""
    config = RunConfig().replace(
        fit={"steps": 60, "steps_per_chunk": 20, "checkpoint_every": 20, "num_posterior_samples": 30,
             "min_steps": 60, "batch_size": 64, "ppc": False},  # 60 steps do not reproduce the data
        model={"n_doublings": 12})
    singles = screen_with_doubles[~screen_with_doubles.obs["condition"].str.contains("+", regex=False)].copy()
    folder = tmp_path_factory.mktemp("interactions") / "run"
    fit(singles, folder, config=config, likelihood="gaussian", progress=False)
    return folder


def test_a_linear_run_calls_its_doubles_additive(linear_run, screen_with_doubles):
    """The linear drift adds the singles' latent shifts: every draw is additive, and the table
    says so with probability one; the observed columns come from the given cells."""
    doubles = [q for q in screen_with_doubles.obs["condition"].unique() if "+" in q]
    run = lb.load(linear_run)
    table = run.interactions(doubles + ["G5+G0"], observed=screen_with_doubles)
    assert list(table["double"]) == doubles + ["G5+G0"]
    assert np.all(table["prob_additive"] == 1.0) and np.all(table["type"] == "additive")
    np.testing.assert_allclose(table[["c_first", "c_second"]], 1.0, atol=1e-3)
    np.testing.assert_allclose(table[[f"prob_{t}" for t in TYPES]].sum(axis=1), 1.0)
    assert not table["in_training"].any()
    assert np.all(np.isfinite(table.loc[:1, "observed_magnitude"]))  # observed in the given cells
    assert np.isnan(table.loc[2, "observed_magnitude"]) and table.loc[2, "n_observed_cells"] == 0
    written = pd.read_csv(linear_run / "interactions.csv")
    assert list(written["double"]) == list(table["double"])
    assert (linear_run / "interactions.png").stat().st_size > 0
    ax = Figure().subplots()
    assert lb.pl.interactions(linear_run, ax=ax) is ax and len(ax.patches) == len(TYPES) * len(table)


def test_plotting_a_folder_without_a_table_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="lcd-bayes interactions"):
        lb.pl.interactions(tmp_path)


def test_too_few_responding_genes_leave_the_type_undefined(tiny_run):
    """4 genes: a double of two of them leaves two genes, which two coefficients fit exactly."""
    table = lb.load(tiny_run).interactions("G0+G1")
    assert table.loc[0, "n_draws"] == 0 and table.loc[0, "type"] is None
    assert np.isnan(table.loc[0, "prob_additive"])


def test_cli_interactions(linear_run, screen_with_doubles, tmp_path, capsys):
    data = tmp_path / "screen.h5ad"
    screen_with_doubles.write_h5ad(data)
    assert main(["interactions", str(linear_run), "--doubles", "G0+G1", "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert "G0+G1" in out and "additive" in out and "lcd_nonlinear" in out
    assert main(["interactions", str(linear_run)]) == 2  # trained on singles only: name the doubles
    assert "--doubles" in capsys.readouterr().err
    assert main(["interactions", str(linear_run), "--doubles", "G0"]) == 2
    assert "not a double" in capsys.readouterr().err


def test_requests_that_are_not_doubles_are_refused():
    record = {"control": "ctrl", "sep": "+", "conditions": ["ctrl", "A", "B"]}
    with pytest.raises(DataError, match="not a double"):
        _doubles("A+B+C", record)
    with pytest.raises(DataError, match="no doubles"):
        _doubles(" , ", record)
    assert _doubles("B+A,A+B", record) == [("B+A", "A", "B")]


def test_the_magnitude_panel_shows_every_observed_value():
    from lcd_bayes.pl import plot_interaction_magnitudes

    table = pd.DataFrame({"double": ["A+B", "C+D"], "magnitude": [1.4, 1.5], "magnitude_low": [1.3, 1.35],
                          "magnitude_high": [1.5, 1.6], "observed_magnitude": [0.6, np.nan]})
    ax = plot_interaction_magnitudes(table, ax=Figure().subplots())
    low, high = ax.get_xlim()
    assert low < 0.6 / np.sqrt(2) and high > 1.6 / np.sqrt(2)
