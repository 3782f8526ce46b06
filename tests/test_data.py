"""Tests of the data layer on tiny synthetic AnnData, plus one check on the real development data."""
import json
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from lcd_bayes.diagnostics import LcdBayesWarning
from lcd_bayes.io.screen import (
    DataError,
    PerturbationData,
    load_perturbation_data,
    read_targets,
    summarize,
)

GENES = ["A", "B", "G2", "G3", "G4", "G5"]
LABELS = ["ctrl", "A", "B", "A+B"]


def make_adata(labels=LABELS, cells_per_label=5, seed=0, **obs_columns) -> ad.AnnData:
    """4 conditions x 5 cells x 6 genes of integer counts; genes 'A' and 'B' are perturbed."""
    rng = np.random.default_rng(seed)
    n_cells = len(labels) * cells_per_label
    counts = rng.poisson(5.0, size=(n_cells, len(GENES))).astype(np.float32)
    counts[:, 0] += 1  # every cell has a count, so no cell has zero total
    obs = pd.DataFrame(
        {"condition": np.repeat(labels, cells_per_label), **obs_columns},
        index=[f"cell{i}" for i in range(n_cells)],
    )
    return ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=GENES))


def lognormalize(counts: np.ndarray, target_sum: float = 1e4) -> tuple[np.ndarray, np.ndarray]:
    totals = counts.sum(axis=1)
    return np.log1p(counts / totals[:, None] * target_sum).astype(np.float32), totals


# --------------------------------------------------------------------------- success paths


def test_shapes_and_types():
    data = load_perturbation_data(make_adata())
    assert isinstance(data, PerturbationData)
    assert data.counts.shape == (20, 6) and data.counts.dtype == np.float32
    assert data.size_factor.shape == (20,) and data.size_factor.dtype == np.float32
    assert data.condition.shape == (20,) and data.condition.dtype == np.int32
    assert (data.n_cells, data.n_genes, data.n_conditions, data.n_perturbations) == (20, 6, 4, 2)
    assert data.design.shape == (4, 2) and data.targets.shape == (2, 6)
    assert data.genes == tuple(GENES)
    assert data.is_counts and data.control == "ctrl" and data.sep == "+"
    assert data.perturbation_key == "condition"


def test_control_first_and_design_rows():
    data = load_perturbation_data(make_adata())
    assert data.conditions == ("ctrl", "A", "B", "A+B")
    assert data.perturbations == ("A", "B")
    np.testing.assert_array_equal(data.design, [[0, 0], [1, 0], [0, 1], [1, 1]])
    # Cells keep their labels: the first five cells are control.
    assert np.all(data.condition[:5] == 0)
    assert np.all(np.array(data.conditions)[data.condition[15:]] == "A+B")


def test_combination_order_is_canonical():
    adata = make_adata(labels=["ctrl", "A", "B", "B+A", "A+B"])
    data = load_perturbation_data(adata)
    assert data.conditions == ("ctrl", "A", "B", "A+B")
    assert np.sum(data.condition == 3) == 10


def test_gears_ctrl_parts_are_dropped():
    data = load_perturbation_data(make_adata(labels=["ctrl", "A+ctrl", "ctrl+B", "A+B"]))
    assert data.conditions == ("ctrl", "A", "B", "A+B")
    np.testing.assert_array_equal(data.design[1], [1, 0])


def test_default_targets_by_gene_name():
    data = load_perturbation_data(make_adata())
    expected = np.zeros((2, 6), dtype=np.float32)
    expected[0, GENES.index("A")] = 1
    expected[1, GENES.index("B")] = 1
    np.testing.assert_array_equal(data.targets, expected)


def test_targets_json_overrides_named_labels(tmp_path):
    path = tmp_path / "targets.json"
    path.write_text(json.dumps({"A": ["G2", "G3"]}))
    assert read_targets(path) == {"A": ["G2", "G3"]}
    data = load_perturbation_data(make_adata(), targets=path)
    np.testing.assert_array_equal(data.targets[0], [0, 0, 1, 1, 0, 0])
    np.testing.assert_array_equal(data.targets[1], [0, 1, 0, 0, 0, 0])  # default kept for B


def test_read_targets_accepts_string_value_and_rejects_bad_json(tmp_path):
    good = tmp_path / "good.json"
    good.write_text('{"A": "G2"}')
    assert read_targets(good) == {"A": ["G2"]}
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        read_targets(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"A": [1, 2]}')
    with pytest.raises(DataError, match="gene name or a list of gene names"):
        read_targets(wrong)


def test_label_without_modelled_target_keeps_zero_row():
    adata = make_adata(labels=["ctrl", "A", "sgX", "A+sgX"])
    data = load_perturbation_data(adata)
    assert data.perturbations == ("A", "sgX")
    assert data.targets[1].sum() == 0


def test_target_in_var_names_but_not_modelled_warns():
    with pytest.warns(LcdBayesWarning, match="not among the modelled genes"):
        data = load_perturbation_data(make_adata(), targets={"A": ["G5"]}, genes=["A", "B", "G2"])
    assert data.targets[0].sum() == 0


def test_layer_selection_and_counts_layer_default():
    adata = make_adata()
    raw = adata.X.copy()
    adata.layers["counts"] = raw
    adata.layers["other"] = raw * 2
    adata.X = np.log1p(raw)
    np.testing.assert_array_equal(load_perturbation_data(adata).counts, raw)
    np.testing.assert_array_equal(load_perturbation_data(adata, layer="other").counts, raw * 2)


def test_sparse_matrix_matches_dense():
    adata = make_adata()
    dense = load_perturbation_data(adata, genes=["G3", "A"])
    adata.X = sp.csr_matrix(adata.X)
    sparse = load_perturbation_data(adata, genes=["G3", "A"])
    assert isinstance(sparse.counts, np.ndarray)
    np.testing.assert_array_equal(sparse.counts, dense.counts)
    np.testing.assert_allclose(sparse.size_factor, dense.size_factor)
    assert sparse.genes == ("G3", "A")


def test_size_factors_use_all_genes():
    adata = make_adata()
    totals = adata.X.sum(axis=1)
    data = load_perturbation_data(adata, genes=["A", "B"])
    np.testing.assert_allclose(data.size_factor, totals / np.median(totals), rtol=1e-6)


def test_n_top_genes_counts_the_perturbed_genes_in_the_panel():
    adata = make_adata()
    adata.X[:, GENES.index("A")] = 3.0  # zero variance: only kept because it is perturbed
    adata.X[:, GENES.index("G5")] = np.arange(adata.n_obs) * 10.0  # clearly the most variable
    # The targets take 2 of the 3 places; the most variable gene the third.
    data = load_perturbation_data(adata, n_top_genes=3, gene_ranking="variance")
    assert data.genes == ("A", "B", "G5")
    # Fewer places than targets: the panel keeps its size and says which target it left out.
    # A, which does not vary, ranks below B and is the one left out.
    with pytest.warns(LcdBayesWarning, match="1 targets are left out: A"):
        data = load_perturbation_data(adata, n_top_genes=1, gene_ranking="variance", min_genes=1)
    assert data.genes == ("B",)


def test_continuous_values_used_as_they_are():
    adata = make_adata()
    adata.X = np.random.default_rng(1).normal(size=adata.shape).astype(np.float32)
    data = load_perturbation_data(adata, continuous=True)
    assert not data.is_counts
    np.testing.assert_array_equal(data.counts, adata.X)
    np.testing.assert_array_equal(data.size_factor, 1.0)


@pytest.mark.parametrize("sparse", [False, True])
def test_explicit_lognorm_conversion_recovers_counts(sparse):
    adata = make_adata()
    counts = adata.X.copy()
    lognorm, totals = lognormalize(counts)
    adata.X = sp.csr_matrix(lognorm) if sparse else lognorm
    adata.obs["ncounts"] = totals
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # exact conversion: no "far from whole numbers" warning
        data = load_perturbation_data(adata, total_counts_key="ncounts")
    np.testing.assert_array_equal(data.counts, counts)
    np.testing.assert_allclose(data.size_factor, totals / np.median(totals), rtol=1e-6)


def test_lognorm_conversion_warns_when_far_from_integers():
    adata = make_adata()
    lognorm, totals = lognormalize(adata.X)
    adata.X = lognorm
    adata.obs["ncounts"] = totals * 1.37  # wrong library sizes
    with pytest.warns(LcdBayesWarning, match="within 0.05 of a whole number"):
        load_perturbation_data(adata, total_counts_key="ncounts")


def test_summarize():
    text = summarize(load_perturbation_data(make_adata()))
    assert "20 cells x 6 genes" in text
    assert "2 singles, 1 doubles" in text
    assert "2 of 2 labels have a modelled target ('A', 'B')" in text and "off-target" not in text
    text = summarize(load_perturbation_data(make_adata(labels=["ctrl", "A", "sgX", "A+sgX"])))
    assert "1 of 2 labels have a modelled target ('A'); the other 1 are modelled through off-target shifts" in text


# --------------------------------------------------------------------------- errors


def test_missing_perturbation_key():
    with pytest.raises(DataError, match="not a column of adata.obs.*condition"):
        load_perturbation_data(make_adata(), perturbation_key="guide")


def test_no_control_cells_suggests_control_label():
    with pytest.raises(DataError, match="no cells have the control label.*control='non-targeting'"):
        load_perturbation_data(make_adata(labels=["non-targeting", "A", "B", "A+B"]))


def test_unknown_target_gene_has_close_match():
    with pytest.raises(DataError, match=r"(?s)not in adata.var_names.*did you mean 'G2'"):
        load_perturbation_data(make_adata(), targets={"A": ["G22"]})


def test_targets_key_not_a_label():
    with pytest.raises(DataError, match="not perturbation labels in the data"):
        load_perturbation_data(make_adata(), targets={"C": ["G2"]})


def test_non_integer_counts():
    adata = make_adata()
    adata.X[0, 0] += 0.5
    with pytest.raises(DataError, match="non-integer values"):
        load_perturbation_data(adata)


def test_negative_counts():
    adata = make_adata()
    adata.X[0, 0] = -1
    with pytest.raises(DataError, match="negative values"):
        load_perturbation_data(adata)


def test_nan_counts():
    adata = make_adata()
    adata.X[0, 0] = np.nan
    with pytest.raises(DataError, match="1 NaN or infinite"):
        load_perturbation_data(adata)


def test_nan_continuous_values_counted():
    adata = make_adata()
    adata.X[:2, 0] = np.inf
    with pytest.raises(DataError, match="2 NaN or infinite"):
        load_perturbation_data(adata, continuous=True)


def test_lognormalized_data_passed_as_counts():
    adata = make_adata()
    adata.X, adata.obs["total_counts"] = lognormalize(adata.X)
    with pytest.raises(DataError, match="look log-normalized") as info:
        load_perturbation_data(adata)
    message = str(info.value)
    assert "layer=" in message and "total_counts_key='total_counts'" in message
    assert "--total-counts-key" in message and "continuous=True" in message


def test_single_cell_condition():
    adata = make_adata()
    adata = adata[(adata.obs.condition != "B") | (adata.obs_names == "cell10")]
    with pytest.raises(DataError, match=r"fewer than 2 cells: 'B' \(1 cells\).*isin\(\['B'\]\)"):
        load_perturbation_data(adata)


def test_empty_combination_part():
    with pytest.raises(DataError, match="empty part"):
        load_perturbation_data(make_adata(labels=["ctrl", "A", "B", "A++B"]))


def test_too_few_genes():
    with pytest.raises(DataError, match=r"needs at least 2; list more genes \(genes=, or \[data\] genes"):
        load_perturbation_data(make_adata(), genes=["A"])


def test_unknown_gene_in_genes():
    with pytest.raises(DataError, match=r"not in adata.var_names: 'G9'"):
        load_perturbation_data(make_adata(), genes=["A", "G9"])


def test_bad_layer_lists_available_layers():
    adata = make_adata()
    adata.layers["raw"] = adata.X.copy()
    with pytest.raises(DataError, match=r"layer 'counts' is not in adata.layers \(available layers: 'raw'\)"):
        load_perturbation_data(adata, layer="counts")


def test_zero_total_cell():
    adata = make_adata()
    adata.X[3] = 0
    with pytest.raises(DataError, match="filter_cells"):
        load_perturbation_data(adata)


def test_bad_total_counts_key():
    adata = make_adata()
    adata.X, _ = lognormalize(adata.X)
    with pytest.raises(DataError, match="total_counts_key 'ncounts' is not a column"):
        load_perturbation_data(adata, total_counts_key="ncounts")


# --------------------------------------------------------------------------- real data


def test_real_norman19(perturbench_path):
    adata = ad.read_h5ad(perturbench_path)
    with pytest.raises(DataError, match="look log-normalized"):
        load_perturbation_data(adata)
    norman = adata[adata.obs.dataset == "norman19"]
    # Genes of the shared HVG set that norman19 never expresses are left out, with a warning.
    with pytest.warns(LcdBayesWarning, match=r"zero counts in every cell are left out of the model \(250 of the 500"):
        data = load_perturbation_data(norman, control="control", total_counts_key="ncounts")
    assert data.n_cells == 3375 and data.n_genes == 250
    assert data.conditions[0] == "control"
    assert data.n_conditions == 34
    assert np.all(data.counts == np.round(data.counts)) and data.counts.min() >= 0


# --------------------------------------------------------------------------- more edge cases


def test_integer_dtype_counts():
    adata = make_adata()
    adata.X = adata.X.astype(np.int64)
    assert load_perturbation_data(adata).counts.dtype == np.float32


def test_sparse_lognormalized_detected():
    adata = make_adata()
    lognorm, _ = lognormalize(adata.X)
    adata.X = sp.csr_matrix(lognorm)
    with pytest.raises(DataError, match="look log-normalized"):
        load_perturbation_data(adata)


def test_missing_label():
    adata = make_adata()
    adata.obs["condition"] = adata.obs["condition"].astype(object)
    adata.obs.iloc[7, 0] = np.nan
    with pytest.raises(DataError, match="1 cells with a missing label"):
        load_perturbation_data(adata)


def test_conflicting_options():
    with pytest.raises(DataError, match="not both"):
        load_perturbation_data(make_adata(), genes=["A", "B"], n_top_genes=2)
    with pytest.raises(DataError, match="one or the other"):
        load_perturbation_data(make_adata(), continuous=True, total_counts_key="n")


def test_size_factors_from_an_obs_column_of_library_sizes():
    import anndata

    rng = np.random.default_rng(0)
    adata = anndata.AnnData(rng.poisson(5, (12, 4)).astype(np.float32))
    adata.var_names = ["A", "B", "C", "D"]
    adata.obs["condition"] = ["ctrl"] * 4 + ["A"] * 4 + ["B"] * 4
    adata.obs["library"] = np.linspace(1000, 3000, 12)
    data = load_perturbation_data(adata, size_factor_key="library")
    np.testing.assert_allclose(data.size_factor, adata.obs["library"] / np.median(adata.obs["library"]), rtol=1e-6)
    with pytest.raises(DataError, match="not a column"):
        load_perturbation_data(adata, size_factor_key="libsize")
    adata.obs.loc[adata.obs_names[0], "library"] = 0.0
    with pytest.raises(DataError, match="positive number for every cell"):
        load_perturbation_data(adata, size_factor_key="library")


def test_batches_read_as_sorted_names_and_codes():
    # Lanes written as numbers are names: "10" sorts before "2".
    lanes = np.array(["2", "10", "2", "7"] * 5)
    adata = make_adata(lane=lanes.astype(int))
    data = load_perturbation_data(adata, batch_key="lane")
    assert data.batches == ("10", "2", "7") and data.n_batches == 3 and data.batch_key == "lane"
    assert data.batch.dtype == np.int32 and data.batch.shape == (20,)
    np.testing.assert_array_equal(np.asarray(data.batches)[data.batch], lanes)
    assert "3 batches from obs['lane']: cells per batch 5-10" in summarize(data)
    unbatched = load_perturbation_data(adata)
    assert (unbatched.batch, unbatched.batches, unbatched.batch_key, unbatched.n_batches) == (None, None, None, 1)
    assert "batches" not in summarize(unbatched)


def test_missing_batch_column_suggests_a_close_name():
    adata = make_adata(batch=["b1", "b2"] * 10)
    with pytest.raises(DataError, match=r"batch_key 'Batch' is not a column of adata.obs \(did you mean 'batch'\?\)"):
        load_perturbation_data(adata, batch_key="Batch")


def test_cells_without_a_batch_are_an_error():
    batches = np.array(["b1", "b2"] * 10, dtype=object)
    batches[3], batches[8] = None, np.nan
    adata = make_adata(batch=batches)
    with pytest.raises(DataError, match=r"obs\['batch'\] has 2 cells without a batch \(e.g. 'cell3', 'cell8'\)"):
        load_perturbation_data(adata, batch_key="batch")


def test_one_batch_warns_and_fits_none():
    adata = make_adata(batch=["lane1"] * 20)
    with pytest.warns(LcdBayesWarning, match="one batch: no batch effects are fitted"):
        data = load_perturbation_data(adata, batch_key="batch")
    assert (data.batch, data.batches, data.n_batches) == (None, None, 1)
