"""Bad input is refused up front with a one-line message naming the file, key, gene or cell and the
fix, and input the model can use is read the same whatever its storage (issue 23)."""
import dataclasses
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from lcd_bayes.analysis.evaluation import evaluate
from lcd_bayes.analysis.predict import predict
from lcd_bayes.cli import main
from lcd_bayes.config import FIT_RULES, MODEL_RULES, FitConfig, ModelConfig, RunConfig, load_config
from lcd_bayes.diagnostics import LcdBayesWarning
from lcd_bayes.io.expression import prediction_anndata
from lcd_bayes.io.screen import DataError, load_perturbation_data
from lcd_bayes.run import structure_of

GENES = ["A", "B", "G2", "G3", "G4"]
LABELS = ["ctrl", "A", "B", "A+B"]


def screen(counts=None, labels=LABELS, cells_per_label=6, seed=0) -> ad.AnnData:
    """Poisson counts (mean 8) of 5 genes, 6 cells per label, no layers; 'A' and 'B' are perturbed."""
    n_cells = len(labels) * cells_per_label
    if counts is None:
        counts = np.random.default_rng(seed).poisson(8.0, size=(n_cells, len(GENES))).astype(np.float32) + 1
    obs = pd.DataFrame({"condition": np.repeat(labels, cells_per_label)}, index=[f"cell{i}" for i in range(n_cells)])
    return ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=GENES))


# --------------------------------------------------------------------------- configuration


def test_every_model_and_fit_setting_has_a_rule():
    assert set(MODEL_RULES) == {f.name for f in dataclasses.fields(ModelConfig)}
    assert set(FIT_RULES) == {f.name for f in dataclasses.fields(FitConfig)}


@pytest.mark.parametrize("line, message", [
    ("[fit]\nlearning_rate = -0.1", r"\[fit\] learning_rate must be a positive number, got -0.1"),
    ("[fit]\nnum_posterior_samples = 0", r"\[fit\] num_posterior_samples must be an integer >= 2, got 0"),
    ("[fit]\ncheckpoint_every = 0", r"\[fit\] checkpoint_every must be a positive integer, got 0"),
    ("[fit]\nbatch_size = -1", r"\[fit\] batch_size must be an integer >= 0 \(0: automatic\), got -1"),
    ("[fit]\nsteps = 100.5", r"\[fit\] steps must be an integer"),
    ('[model]\nsigma = "1"', r"\[model\] sigma must be a positive number, got '1'"),
    ("[model]\npool_decay = 1", r"\[model\] pool_decay must be true or false, got 1"),
    ("[model]\ndt = 1.5", r"\[model\] dt must be in \(0, 1\), got 1.5"),
    ("fit = 3", r"fit must be a table"),
    ("[fit]\nlearning_rate = ", r"is not valid TOML"),
])
def test_config_values_are_checked_when_the_file_is_read(tmp_path, line, message):
    path = tmp_path / "bad.toml"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=message) as error:
        load_config(path)
    assert str(error.value).startswith(f"config file {path}: ") or f"config file {path} is not valid TOML" in str(
        error.value)


def test_numbers_are_stored_as_toml_writes_them():
    config = RunConfig.from_dict({"fit": {"learning_rate": 1, "seed": np.int64(3)}})
    assert config.fit.learning_rate == 1.0 and isinstance(config.fit.learning_rate, float)
    assert "seed = 3\n" in config.to_toml() and RunConfig.from_dict({"fit": {"learning_rate": 1.0, "seed": 3}}) == config
    with pytest.raises(ValueError, match=r"\[fit\] steps must be an integer >= 0 \(0: automatic\), got -5"):
        RunConfig().replace(fit={"steps": -5})  # the API's settings go through the same rules


def test_fit_refuses_a_bad_config_before_reading_any_data(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text("[fit]\nnum_posterior_samples = 0\n")
    run = tmp_path / "run"
    assert main(["fit", str(tmp_path / "never_read.h5ad"), "--out", str(run), "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert str(config) in err and "[fit] num_posterior_samples" in err and len(err.strip().splitlines()) == 1
    assert not run.exists()


# --------------------------------------------------------------------------- counts


def test_a_gene_without_counts_is_left_out_with_a_warning():
    adata = screen()
    adata.X[:, GENES.index("B")] = 0  # a perturbed gene never observed: its label keeps off-target shifts
    with pytest.warns(LcdBayesWarning, match=r"left out of the model \(1 of the 5 selected\): 'B'\. Labels that "
                                             r"targeted them \('B'\)"):
        data = load_perturbation_data(adata)
    assert data.genes == ("A", "G2", "G3", "G4") and data.counts.shape == (24, 4)
    np.testing.assert_array_equal(data.targets, [[1, 0, 0, 0], [0, 0, 0, 0]])  # rows: labels A, B
    np.testing.assert_array_equal(data.counts, np.delete(adata.X, GENES.index("B"), axis=1))


def test_too_few_genes_with_counts_is_an_error_naming_the_fix():
    adata = screen()
    adata.X[:, 1:] = 0
    with pytest.raises(DataError, match=r"only 1 genes with any counts .* needs at least 2; read a file with more"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LcdBayesWarning)
            load_perturbation_data(adata)


@pytest.mark.parametrize("storage", [np.asarray, sp.csr_matrix])
def test_an_implausible_count_is_refused_naming_the_cell_and_gene(storage):
    counts = screen().X.copy()
    counts[7, GENES.index("G3")] = 1e12
    with pytest.raises(DataError, match=r"adata.X has an implausible count 1e\+12 of gene 'G3' in cell 'cell7': "
                                        r"more than 100x both the rest of that cell's library .*"
                                        r"isin\(\['cell7'\]\)"):
        load_perturbation_data(screen(storage(counts)))


def test_large_counts_of_real_screens_are_accepted():
    """Either half of the rule alone happens in real data and is accepted: a count far above its gene's
    range in a cell with a large library (a marker gene of a rare cell), and a cell whose library is
    almost all one gene at that gene's usual level."""
    counts = screen().X.copy()
    counts[3] = [1, 1, 1, 1, 3000]  # 750x the rest of the cell, at a level the gene has in other cells
    counts[4:8, 4] = 2500
    counts[9] = [4000, 3000, 5000, 2000, 5]  # G4 normal; A is 400x its 99th percentile in other cells
    counts[10, 0] = 20000  # the same gene even higher in another cell with a large library
    data = load_perturbation_data(screen(counts))
    assert data.counts[10, 0] == 20000


@pytest.mark.parametrize("storage", [np.asfortranarray, sp.csr_matrix, sp.csc_matrix,
                                     lambda x: x.astype(np.int64)])
def test_dense_and_sparse_storage_give_the_same_arrays(storage):
    """Bit for bit, so that the fit (starting from the gene means, structure_of) is the same."""
    adata = screen(np.random.default_rng(1).poisson(30.0, size=(24, 5)).astype(np.float32))
    reference = load_perturbation_data(adata)
    other = load_perturbation_data(screen(storage(adata.X.copy())))
    assert other.counts.flags.c_contiguous and other.counts.dtype == np.float32
    for name in ("counts", "size_factor"):
        assert getattr(other, name).tobytes() == getattr(reference, name).tobytes(), name
    assert (structure_of(other, RunConfig()).gene_scale_center.tobytes()
            == structure_of(reference, RunConfig()).gene_scale_center.tobytes())


def test_a_file_without_cells_says_so():
    with pytest.raises(DataError, match=r"^the data hold no cells \(0 cells x 5 genes\)"):
        load_perturbation_data(screen()[:0])


def test_messages_suggest_what_a_command_line_user_can_do():
    adata = screen()
    few_cells = adata[(adata.obs.condition != "B") | (adata.obs_names == "cell12")]
    with pytest.raises(DataError, match=r"Drop their cells before fitting") as error:
        load_perturbation_data(few_cells)
    assert "min_cells_per_condition" not in str(error.value)
    with pytest.raises(DataError, match=r"needs at least 2") as error:
        load_perturbation_data(adata, genes=["A"])
    assert "min_genes" not in str(error.value)


def test_evaluate_does_not_offer_a_continuous_model(tmp_path):
    observed = screen()
    observed.X[0, 0] = -1.0  # scaled values: evaluate compares counts or log1p-normalized values only
    pred = prediction_anndata(observed.X[6:12].clip(0), ["A"] * 6, GENES, space="counts", method="test",
                              perturbation_key="condition", control="ctrl", sep="+")
    with pytest.raises(DataError, match="negative values") as error:
        evaluate(pred, observed)
    assert "continuous" not in str(error.value) and "--layer" in str(error.value)


def test_a_file_that_is_not_h5ad_is_a_message(tmp_path, capsys):
    table = tmp_path / "counts.h5ad"
    table.write_text("cell,A,B\ncell0,1,2\n")
    assert main(["fit", str(table), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"{table} could not be read" in err and "expected an .h5ad file" in err
    assert main(["evaluate", str(table), str(table), "--out", str(tmp_path / "eval")]) == 2
    assert "expected an .h5ad file" in capsys.readouterr().err


# --------------------------------------------------------------------------- prediction


def test_predict_keeps_the_labels_as_asked(tiny_run):
    pred = predict(tiny_run, "G1+G0, G3,G0+G1", n_cells=3, n_draws=2, seed=0)
    assert pred.uns["lcd_bayes"]["conditions"] == ["G1+G0", "G3"]  # "G0+G1" is the same condition
    assert list(pred.obs["condition"].unique()) == ["G1+G0", "G3"]


def test_predict_refuses_what_fit_refuses(tiny_run, capsys):
    with pytest.raises(DataError, match=r"labels 'G0\+' have an empty part"):
        predict(tiny_run, "G0+")
    assert main(["predict", str(tiny_run), "--perturbations", "G0", "--draws", "0"]) == 2
    assert "n_draws (CLI --draws) must be a positive number" in capsys.readouterr().err
