"""Baseline predictions: their means, their layout, and their errors, on a tiny Poisson screen."""
import anndata
import numpy as np
import pandas as pd
import pytest

from lcd_bayes.analysis.baselines import BASELINES, predict_baseline
from lcd_bayes.io.expression import UNS_KEY, expression
from lcd_bayes.io.screen import DataError

GENES = ["g0", "g1", "g2", "g3", "g4"]
BASE = np.array([20.0, 20.0, 20.0, 40.0, 60.0])
# A raises g0, B raises g1; together they also switch on g2, which neither does alone.
FOLD = {"ctrl": [1, 1, 1, 1, 1], "A": [4, 1, 1, 1, 1], "B": [1, 4, 1, 1, 1], "A+B": [4, 4, 8, 1, 1]}
N = 40


def screen(conditions, key="condition"):
    rng = np.random.default_rng(0)
    labels = np.repeat(conditions, N)
    rates = np.concatenate([np.tile(BASE * FOLD[c], (N, 1)) for c in conditions])
    obs = pd.DataFrame({key: labels}, index=[f"cell{i}" for i in range(labels.size)])
    return anndata.AnnData(rng.poisson(rates).astype(np.float32), obs=obs, var=pd.DataFrame(index=GENES))


def observed_means(adata, key="condition"):
    z = expression(adata, GENES)
    return {c: z[(adata.obs[key] == c).to_numpy()].mean(axis=0) for c in adata.obs[key].unique()}


def predicted_means(prediction, key="condition"):
    return observed_means(prediction, key)


@pytest.fixture(scope="module")
def singles():
    return screen(["ctrl", "A", "B"])


def test_no_change_is_the_control(singles):
    prediction = predict_baseline(singles, ["A", "A+B"], method="no_change")
    control = observed_means(singles)["ctrl"]
    for mean in predicted_means(prediction).values():
        np.testing.assert_allclose(mean, control, atol=1e-5)


def test_additive_sums_single_shifts(singles):
    m = observed_means(singles)
    prediction = predict_baseline(singles, ["B+A", "A+ctrl", "ctrl", "A+B"], method="additive")
    got = predicted_means(prediction)
    assert list(got) == ["B+A", "A+ctrl", "ctrl"]  # as asked: the first spelling of each condition
    np.testing.assert_allclose(got["B+A"], m["ctrl"] + (m["A"] - m["ctrl"]) + (m["B"] - m["ctrl"]), atol=1e-5)
    np.testing.assert_allclose(got["A+ctrl"], m["A"], atol=1e-5)
    np.testing.assert_allclose(got["ctrl"], m["ctrl"], atol=1e-5)


def test_linear_matches_additive_on_singles_and_pools_doubles(singles):
    additive = predicted_means(predict_baseline(singles, ["A+B"], method="additive"))["A+B"]
    exact = predicted_means(predict_baseline(singles, ["A+B"], method="linear", ridge=0.0))["A+B"]
    np.testing.assert_allclose(exact, additive, atol=1e-5)
    shrunk = predicted_means(predict_baseline(singles, ["A+B"], method="linear", ridge=1e-2))["A+B"]
    control = observed_means(singles)["ctrl"]
    np.testing.assert_allclose(shrunk - control, (additive - control) / 1.01, atol=1e-5)

    # With the non-additive double in training, linear moves towards it; additive ignores it.
    doubles = screen(["ctrl", "A", "B", "A+B"])
    truth = observed_means(doubles)["A+B"]
    additive = predicted_means(predict_baseline(doubles, ["A+B"], method="additive"))["A+B"]
    linear = predicted_means(predict_baseline(doubles, ["A+B"], method="linear"))["A+B"]
    assert np.abs(linear - additive).max() > 0.1
    assert np.linalg.norm(linear - truth) < np.linalg.norm(additive - truth)


def test_layout(singles):
    train = singles.copy()
    train.obs = train.obs.rename(columns={"condition": "perturbation"})
    genes = ["g3", "g0"]
    prediction = predict_baseline(train, ["A", "B+A"], method="linear", n_cells=7, genes=genes,
                                  perturbation_key="perturbation", seed=3)
    assert prediction.shape == (14, 2) and list(prediction.var_names) == genes
    assert prediction.obs["perturbation"].value_counts().to_dict() == {"A": 7, "B+A": 7}  # labels as asked
    uns = prediction.uns[UNS_KEY]
    assert uns["space"] == "log1p_normalized" and uns["method"] == "linear"
    assert (uns["perturbation_key"], uns["control"], uns["sep"]) == ("perturbation", "ctrl", "+")
    again = predict_baseline(train, ["A", "B+A"], method="linear", n_cells=7, genes=genes,
                             perturbation_key="perturbation", seed=3)
    np.testing.assert_array_equal(prediction.X, again.X)
    assert predict_baseline(train, ["A"], method="no_change", perturbation_key="perturbation").n_obs == N


def test_errors(singles):
    only_a = singles[singles.obs["condition"] != "B"].copy()
    with pytest.raises(DataError, match="additive.*'B'"):
        predict_baseline(only_a, ["A+B"], method="additive")
    with pytest.raises(DataError, match="linear.*'Z'"):
        predict_baseline(singles, ["A+Z"], method="linear")
    with pytest.raises(ValueError, match="additive"):
        predict_baseline(singles, ["A"], method="mean")
    assert BASELINES == ("no_change", "additive", "linear")
    with pytest.raises(DataError, match="no conditions"):
        predict_baseline(singles, [], method="no_change")
    with pytest.raises(DataError, match="no control"):
        predict_baseline(singles, ["A"], method="additive", control="DMSO")
