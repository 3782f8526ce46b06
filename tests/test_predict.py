"""Prediction of unseen conditions from a fitted run, against held-out cells and baselines."""
import warnings

import numpy as np
import pytest

from lcd_bayes.analysis.baselines import predict_baseline
from lcd_bayes.analysis.evaluation import evaluate
from lcd_bayes.analysis.predict import predict
from lcd_bayes.analysis.splits import combination_splits, split_anndata
from lcd_bayes.cli import main
from lcd_bayes.config import RunConfig
from lcd_bayes.diagnostics import LcdBayesWarning
from lcd_bayes.io.screen import DataError
from lcd_bayes.run import fit
from lcd_bayes.sim.linear import LIBRARY_SIZE_KEY, simulate

N_GENES = 6


@pytest.fixture(scope="module")
def screen():
    """Six genes, five perturbed once, three doubles; NB counts."""
    return simulate(N_GENES, n_perturbed=5, n_doubles=3, cells_per_condition=80, likelihood="nb", seed=4)


@pytest.fixture(scope="module")
def held_out(screen, tmp_path_factory):
    """Fit on control + singles; the doubles are held out."""
    (split,) = combination_splits(screen.obs["condition"], control="ctrl", train_double_fraction=0.0)
    train, test = split_anndata(screen, split, control="ctrl")
    config = RunConfig().replace(fit={"steps": 1500, "num_posterior_samples": 100, "ppc": False})
    folder = tmp_path_factory.mktemp("predict") / "run"
    with warnings.catch_warnings():
        # This short fit leaves ~2% of the drift draws at the stability limit and says so; the tests
        # here are about prediction from whatever posterior the run holds, not about that.
        warnings.filterwarnings("ignore", ".*posterior drift draws sat at the stability limit", LcdBayesWarning)
        fit(train, folder, config=config, size_factor_key=LIBRARY_SIZE_KEY, progress=False)
    return folder, split, train, test


def test_prediction_layout_and_reproducibility(held_out):
    folder, split, _, _ = held_out
    asked = ",".join(split.test) + ",ctrl"
    pred = predict(folder, asked, n_cells=30, n_draws=10, seed=1)
    conditions = list(split.test) + ["ctrl"]
    assert pred.shape == (30 * len(conditions), N_GENES)
    assert pred.uns["lcd_bayes"]["conditions"] == conditions
    # The run was Laplace-refined (the default): cells come from the guide's draws kept beside.
    assert pred.uns["lcd_bayes"]["draws_from"] == "guide_posterior"
    assert pred.obs["condition"].value_counts().to_dict() == {c: 30 for c in conditions}
    counts = np.asarray(pred.X)
    assert (counts >= 0).all() and np.array_equal(counts, np.round(counts))
    for name in ("expected_mean", "expected_low", "expected_high"):
        assert pred.varm[name].shape == (N_GENES, len(conditions))
    assert (pred.varm["expected_low"] <= pred.varm["expected_mean"]).all()
    assert (pred.varm["expected_mean"] <= pred.varm["expected_high"]).all()
    assert set(pred.obs["draw"]) <= set(range(100)) and pred.obs["draw"].nunique() == 10
    again = predict(folder, asked, n_cells=30, n_draws=10, seed=1)
    assert np.array_equal(np.asarray(again.X), counts)


def test_held_out_doubles_beat_no_change(held_out):
    """The fitted model's doubles are closer to the held-out cells than control cells are."""
    folder, split, train, test = held_out
    lcd = predict(folder, list(split.test), n_cells=80, seed=0)
    no_change = predict_baseline(train, list(split.test), method="no_change", n_cells=80, seed=0)
    lcd_table, _ = evaluate(lcd, test)
    base_table, _ = evaluate(no_change, test)
    lcd_energy = lcd_table.set_index("condition")["energy_distance"]
    base_energy = base_table.set_index("condition")["energy_distance"]
    assert (lcd_energy < base_energy).all(), (lcd_energy, base_energy)
    assert lcd_energy.mean() < 0.5 * base_energy.mean()


def test_never_perturbed_gene_from_the_target_law(held_out, screen):
    """A modelled gene never perturbed in training gets a shift from the hierarchical prior: its own
    expression moves with a wider interval than a trained single's target."""
    folder, _, _, _ = held_out
    perturbed = {c for c in screen.obs["condition"].unique() if "+" not in c and c != "ctrl"}
    (new_gene,) = sorted({f"G{g}" for g in range(N_GENES)} - perturbed)
    trained = sorted(perturbed)[0]
    pred = predict(folder, [new_gene, trained], n_cells=5, seed=0)
    assert pred.uns["lcd_bayes"]["new_labels"] == [new_gene]
    genes = list(pred.var_names)
    width = pred.varm["expected_high"] - pred.varm["expected_low"]
    relative_new = width[genes.index(new_gene), 0] / pred.varm["expected_mean"][genes.index(new_gene), 0]
    relative_trained = width[genes.index(trained), 1] / pred.varm["expected_mean"][genes.index(trained), 1]
    assert relative_new > 2 * relative_trained


def test_labels_the_model_cannot_know(held_out):
    folder, _, _, _ = held_out
    with pytest.raises(DataError, match="cannot know the effect of 'NOTAGENE'"):
        predict(folder, "G0+NOTAGENE")
    with pytest.raises(DataError, match="did you mean 'G1'"):
        predict(folder, "g1")
    with pytest.raises(DataError, match="no conditions requested"):
        predict(folder, " , ")
    with pytest.raises(ValueError, match="n_cells"):
        predict(folder, "G0", n_cells=0)


def test_cli_predict_and_evaluate(held_out, tmp_path, capsys):
    folder, split, _, test = held_out
    out = tmp_path / "pred.h5ad"
    assert main(["predict", str(folder), "--perturbations", split.test[0], "--cells", "20", "--out", str(out)]) == 0
    assert out.exists() and "20 cells" in capsys.readouterr().out
    observed = tmp_path / "observed.h5ad"
    test.write_h5ad(observed)
    assert main(["evaluate", str(out), str(observed), "--out", str(tmp_path / "eval")]) == 0
    assert (tmp_path / "eval" / "metrics.json").exists()
    assert main(["predict", str(folder), "--perturbations", "NOPE"]) == 2
    assert "cannot know" in capsys.readouterr().err
