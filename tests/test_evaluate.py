"""Evaluation metrics against closed forms, and the AnnData comparison end to end."""
import json
import math

import anndata
import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm

from lcd_bayes.analysis.evaluation import (default_length_scales, energy_distance, evaluate, evaluate_files,
                                           mmd_rbf, pearson_delta, rmse, top_de_genes, write_evaluation)
from lcd_bayes.io.expression import UNS_KEY, expression, prediction_anndata
from lcd_bayes.io.screen import DataError


# ----------------------------------------------------------------------------- array metrics

def test_identical_samples_are_at_distance_zero():
    x = np.random.default_rng(0).normal(size=(300, 25)) + 50.0  # far from 0: cancellation-prone
    assert energy_distance(x, x.copy()) == pytest.approx(0.0, abs=1e-10)
    assert np.allclose(mmd_rbf(x, x.copy(), [0.5, 2.0, 8.0]), 0.0, atol=1e-10)
    # Subsampling draws the same cells from both sides when they are the same sample.
    assert energy_distance(x, x.copy(), max_cells=50) == pytest.approx(0.0, abs=1e-10)


def test_energy_distance_matches_gaussian_closed_form():
    # X ~ N(0,1), Y ~ N(d,1): X - Y ~ N(-d, 2), and for Z ~ N(mu, s^2)
    # E|Z| = 2 s phi(mu/s) + mu (2 Phi(mu/s) - 1); X - X' ~ N(0, 2) gives E|X-X'| = 2/sqrt(pi).
    n, d = 3000, 1.0
    s = math.sqrt(2.0)
    e_xy = 2 * s * norm.pdf(d / s) + d * (2 * norm.cdf(d / s) - 1)
    e_xx = 2 / math.sqrt(math.pi)
    assert 2 * s * norm.pdf(0.0) == pytest.approx(e_xx)
    # The V-statistic counts the n zero self-distances: E[V] = ED + (1/n + 1/m) E|X-X'|.
    expected = 2 * e_xy - 2 * e_xx + 2 / n * e_xx
    rng = np.random.default_rng(1)
    value = energy_distance(rng.normal(0, 1, n), rng.normal(d, 1, n), max_cells=None)
    assert value == pytest.approx(expected, abs=0.1)  # Monte-Carlo sd ~ 0.03 at n = 3000
    same = energy_distance(rng.normal(0, 1, n), rng.normal(0, 1, n), max_cells=None)
    assert abs(same - 2 / n * e_xx) < 0.02 < value / 10


def test_mmd_rbf_matches_gaussian_closed_form():
    def e_k(m1, s1, m2, s2, l):  # E exp(-(X-Y)^2 / 2l^2) for independent Gaussians
        v = l**2 + s1**2 + s2**2
        return l / np.sqrt(v) * np.exp(-(m1 - m2) ** 2 / (2 * v))

    n, m2, s2 = 2000, 0.7, 1.5
    scales = np.array([0.5, 1.0, 2.0, 4.0])
    exact = e_k(0, 1, 0, 1, scales) + e_k(m2, s2, m2, s2, scales) - 2 * e_k(0, 1, m2, s2, scales)
    # The V-statistic keeps the i = j pairs, where k = 1.
    expected = exact + (1 - e_k(0, 1, 0, 1, scales)) / n + (1 - e_k(m2, s2, m2, s2, scales)) / n
    rng = np.random.default_rng(2)
    value = mmd_rbf(rng.normal(0, 1, n), rng.normal(m2, s2, n), scales, max_cells=None)
    assert value.shape == (4,)
    np.testing.assert_allclose(value, expected, atol=0.02)  # Monte-Carlo sd <= 0.008


def test_subsampling_and_length_scales():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(400, 5)), rng.normal(size=(300, 5)) + 1.0
    assert energy_distance(x, y, max_cells=100, seed=4) == energy_distance(x, y, max_cells=100, seed=4)
    assert energy_distance(x, y, max_cells=100) == pytest.approx(energy_distance(x, y, max_cells=None), abs=0.3)
    pool = np.concatenate([x, y])
    upper = np.triu_indices(len(pool), 1)
    median = np.median(np.linalg.norm(pool[:, None] - pool[None], axis=-1)[upper])
    np.testing.assert_allclose(default_length_scales(x, y, max_cells=None), median * np.array([0.5, 1, 2, 4]))
    np.testing.assert_allclose(default_length_scales(np.ones((5, 3))), [0.5, 1, 2, 4])


def test_pearson_rmse_top_de_against_numpy():
    rng = np.random.default_rng(5)
    pred, obs = rng.normal(size=40), rng.normal(size=40)
    assert pearson_delta(pred, obs) == pytest.approx(np.corrcoef(pred, obs)[0, 1])
    mask = np.abs(obs) > 0.5
    assert pearson_delta(pred, obs, mask) == pytest.approx(np.corrcoef(pred[mask], obs[mask])[0, 1])
    assert pearson_delta(pred, obs, np.flatnonzero(mask)) == pytest.approx(pearson_delta(pred, obs, mask))
    assert math.isnan(pearson_delta(np.full(40, 3.0), obs))
    assert math.isnan(pearson_delta(pred[:1], obs[:1]))
    with_nan = pred.copy()
    with_nan[0] = np.nan
    assert pearson_delta(with_nan, obs) == pytest.approx(np.corrcoef(pred[1:], obs[1:])[0, 1])
    assert rmse(pred, obs) == pytest.approx(np.sqrt(np.mean((pred - obs) ** 2)))
    shift = np.array([0.1, -3.0, 2.0, 0.0, -0.5])
    np.testing.assert_array_equal(top_de_genes(shift, 3), [1, 2, 4])
    np.testing.assert_array_equal(top_de_genes(obs, 20), np.argsort(-np.abs(obs))[:20])
    assert len(top_de_genes(shift, 99)) == 5


# ----------------------------------------------------------------------------- AnnData

CONDITIONS = ("ctrl", "A", "B", "A+B")


def _observed(cells=30, genes=12, seed=0):
    """Poisson counts; A raises gene 0, B lowers gene 1, A+B does both."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(5, 30, genes)
    rates, labels = [], []
    for q in CONDITIONS:
        rate = base.copy()
        if "A" in q:
            rate[0] *= 4
        if "B" in q:
            rate[1] /= 4
        rates.append(np.tile(rate, (cells, 1)))
        labels += [q] * cells
    obs = pd.DataFrame({"condition": pd.Categorical(labels)}, index=[f"c{i}" for i in range(len(labels))])
    return anndata.AnnData(rng.poisson(np.concatenate(rates)).astype(np.float32), obs=obs,
                           var=pd.DataFrame(index=[f"g{j}" for j in range(genes)]))


def _copy_as_prediction(observed, relabel=None):
    pred = observed.copy()
    if relabel:
        pred.obs["condition"] = pd.Categorical(pred.obs["condition"].astype(str).replace(relabel))
    pred.uns[UNS_KEY] = {"space": "counts", "method": "copy", "perturbation_key": "condition",
                         "control": "ctrl", "sep": "+"}
    return pred


def test_exact_copy_scores_perfectly_and_beats_no_change():
    observed = _observed()
    table, aggregate = evaluate(_copy_as_prediction(observed), observed, n_top_de=3)
    assert list(table["condition"]) == ["A", "B", "A+B"]
    assert (table["n_pred_cells"] == 30).all() and (table["n_obs_cells"] == 30).all()
    np.testing.assert_allclose(table["energy_distance"], 0.0, atol=1e-10)
    np.testing.assert_allclose(table["mmd"], 0.0, atol=1e-10)
    np.testing.assert_allclose(table[["pearson_delta_all", "pearson_delta_top_de"]], 1.0)
    np.testing.assert_allclose(table[["rmse_mean", "rmse_mean_top_de"]], 0.0, atol=1e-12)
    scale_columns = [c for c in table if c.startswith("mmd_l")]
    assert len(scale_columns) == 4 == len(aggregate["length_scales"])
    assert aggregate["n_conditions"] == 3 and aggregate["n_genes"] == 12
    assert aggregate["mean"]["energy_distance"] == pytest.approx(0.0, abs=1e-10)
    assert aggregate["settings"]["method"] == "copy"

    # "No change": the observed control cells (already log1p-normalized) as every condition.
    z = expression(observed, observed.var_names)
    control = z[(observed.obs["condition"] == "ctrl").to_numpy()]
    labels = np.repeat(["A", "B", "B+A"], len(control))
    flat = prediction_anndata(np.tile(control, (3, 1)), labels, observed.var_names, space="log1p_normalized",
                              method="no_change", perturbation_key="condition", control="ctrl", sep="+")
    worse, _ = evaluate(flat, observed, length_scales=aggregate["length_scales"], n_top_de=3)
    assert (worse["energy_distance"].to_numpy() > 0.5).all()
    assert (worse["mmd"].to_numpy() > 0.05).all()
    assert (worse["rmse_mean_top_de"].to_numpy() > 0.3).all()
    # Its predicted shift is exactly 0: the correlation is undefined, not an error.
    assert worse[["pearson_delta_all", "pearson_delta_top_de"]].isna().all().all()


def test_labels_match_whatever_the_order_of_their_parts():
    observed = _observed()
    table, _ = evaluate(_copy_as_prediction(observed, {"A+B": "B+A"}), observed)
    assert "A+B" in set(table["condition"])
    np.testing.assert_allclose(table["energy_distance"], 0.0, atol=1e-10)


def test_input_errors_say_what_is_wrong():
    observed = _observed(cells=10)
    pred = _copy_as_prediction(observed)
    with pytest.raises(DataError, match=r"no cells of 1 predicted condition.*'A\+B'"):
        evaluate(pred, observed[(observed.obs["condition"] != "A+B").to_numpy()].copy())
    with pytest.raises(DataError, match="no control cells.*control="):
        evaluate(pred, observed[(observed.obs["condition"] != "ctrl").to_numpy()].copy())
    with pytest.raises(DataError, match="observed lacks 1 of the compared genes"):
        evaluate(pred, observed[:, observed.var_names[1:]].copy())
    with pytest.raises(DataError, match="no cells outside the control"):
        evaluate(pred[(pred.obs["condition"] == "ctrl").to_numpy()].copy(), observed)
    with pytest.raises(DataError, match="no column 'perturbation'"):
        evaluate(pred, observed, perturbation_key="perturbation")


def test_outputs_are_written(tmp_path):
    observed = _observed(cells=15)
    pred = _copy_as_prediction(observed, {"A": "ctrl+A"})
    pred_path, observed_path = tmp_path / "pred.h5ad", tmp_path / "observed.h5ad"
    pred.write_h5ad(pred_path)
    observed.write_h5ad(observed_path)
    table, aggregate, out_dir = evaluate_files(pred_path, observed_path, n_top_de=4)
    assert out_dir == tmp_path / "pred_evaluation"
    assert {p.name for p in out_dir.iterdir()} == {"metrics.csv", "metrics.json", "mean_shift.png"}
    assert (out_dir / "mean_shift.png").stat().st_size > 1000
    csv = pd.read_csv(out_dir / "metrics.csv")
    assert list(csv["condition"]) == list(table["condition"]) == ["A", "B", "A+B"]
    written = json.loads((out_dir / "metrics.json").read_text())
    assert len(written["per_condition"]) == 3 and written["aggregate"]["n_conditions"] == 3

    # nan metrics become JSON nulls; a table without mean shifts gets no figure.
    table.loc[0, "pearson_delta_all"] = np.nan
    other = write_evaluation(pd.DataFrame(table.to_dict()), aggregate, tmp_path / "other")
    assert set(other) == {"metrics.csv", "metrics.json"}
    assert json.loads(other["metrics.json"].read_text())["per_condition"][0]["pearson_delta_all"] is None
    with pytest.raises(FileNotFoundError, match="observed file not found"):
        evaluate_files(pred_path, tmp_path / "missing.h5ad")
