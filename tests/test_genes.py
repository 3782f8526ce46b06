"""The n_top_genes panel (lcd_bayes.io.genes): requested targets, then trained targets, then the
genes ranked on the given cells; never more than N genes; sparse and dense alike."""
from contextlib import nullcontext

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from lcd_bayes.diagnostics import LcdBayesWarning
from lcd_bayes.io.genes import gene_scores, select_genes
from lcd_bayes.io.screen import DataError, load_perturbation_data

CELLS = 40  # per condition


def screen(labels, genes, seed=0, effects=None, noisy=(), cells=CELLS) -> ad.AnnData:
    """Poisson(5) counts; ``effects`` {(label, gene): fold} multiplies a gene's mean in a
    condition; ``noisy`` genes are gamma-Poisson with shape 0.3 (same mean, far more variance)."""
    rng = np.random.default_rng(seed)
    condition = np.repeat(labels, cells)
    mean = np.full((condition.size, len(genes)), 5.0)
    for (label, gene), fold in (effects or {}).items():
        mean[condition == label, genes.index(gene)] *= fold
    for gene in noisy:
        mean[:, genes.index(gene)] *= rng.gamma(0.3, 1 / 0.3, size=condition.size)
    counts = rng.poisson(mean).astype(np.float32)
    counts[:, -1] += 1  # no cell with zero total
    obs = pd.DataFrame({"condition": condition}, index=[f"c{i}" for i in range(condition.size)])
    return ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=genes))


GENES = ["A", "B", "C", "G1", "G2", "G3", "G4", "G5"]


def test_requested_targets_come_before_trained_targets_before_ranked_genes():
    adata = screen(["ctrl", "A", "B"], GENES, effects={("A", "G4"): 6.0, ("B", "G2"): 3.0})

    def load(n):
        return load_perturbation_data(adata, n_top_genes=n, predict_targets=["C"]).genes

    # C has no cells: it is here only because it will be predicted.
    assert load(3) == ("A", "B", "C")
    assert load(4) == ("A", "B", "C", "G4")  # then the strongest responder
    assert load(5) == ("A", "B", "C", "G2", "G4")
    # One place short of the targets: the requested target stays, a trained one goes.
    with pytest.warns(LcdBayesWarning, match=r"holds only 2 of the 3 target genes.*1 targets are left out"):
        assert "C" in load(2)


def test_targets_beyond_the_panel_are_dropped_in_priority_order_with_a_warning():
    counts = np.random.default_rng(0).poisson(5.0, size=(60, 6)).astype(np.float32)
    condition = np.repeat([0, 1, 2], 20)
    counts[condition == 1, 3] *= 4  # of the trained targets, g3 responds
    names = [f"g{i}" for i in range(6)]
    # Requested targets first; of the trained ones, the best ranked gets the one place left.
    with pytest.warns(LcdBayesWarning, match=r"only 3 of the 5 target genes.*2 targets are left out: g[12], g[12]\."):
        chosen = select_genes(counts, 3, condition=condition, size_factor=np.ones(60), requested=[5, 4],
                              trained=[1, 2, 3, 4], names=names)
    np.testing.assert_array_equal(chosen, [3, 4, 5])
    with pytest.warns(LcdBayesWarning, match="4 targets are left out"):
        assert select_genes(counts, 1, condition=condition, requested=[5, 4], trained=[1, 2, 3]).size == 1


def test_the_panel_never_exceeds_n_genes():
    rng = np.random.default_rng(1)
    counts = rng.poisson(3.0, size=(90, 12)).astype(np.float32)
    condition = np.repeat([0, 1, 2], 30)
    for ranking in ("response", "variance", "dispersion"):
        for n in range(1, 15):
            with pytest.warns(LcdBayesWarning) if n < 3 else nullcontext():
                chosen = select_genes(counts, n, condition=condition, size_factor=np.ones(90), requested=[7],
                                      trained=[2, 7, 9], ranking=ranking)
            assert len(chosen) == min(n, 12)
            assert np.all(np.diff(chosen) > 0)  # distinct, in column order whatever the ranking
            assert 7 in chosen and (n < 3 or {2, 9} <= set(chosen.tolist()))


def test_response_finds_a_one_condition_responder_where_variance_prefers_a_noisy_gene():
    genes = ["R", "N", "G1", "G2", "G3"]
    labels = ["ctrl", "sgA", "sgB", "sgC", "sgD"]  # no label is a gene: nothing is a target
    adata = screen(labels, genes, seed=2, effects={("sgB", "R"): 4.0}, noisy=["N"])
    by = {ranking: load_perturbation_data(adata, n_top_genes=1, gene_ranking=ranking, min_genes=1).genes
          for ranking in ("response", "variance")}
    assert by == {"response": ("R",), "variance": ("N",)}


def test_response_discounts_conditions_with_few_cells():
    # A 2-cell condition's large chance shift must not beat a clear shift measured on 40 cells.
    rng = np.random.default_rng(3)
    values = rng.normal(size=(122, 2))
    condition = np.repeat([0, 1, 2], [80, 40, 2])
    values[condition == 1, 0] += 1.0  # gene 0: a clear 1 sd shift in 40 cells
    values[condition == 2, 1] += 1.5  # gene 1: 1.5 sd in 2 cells, within noise
    score = gene_scores(values, condition, ranking="response")
    assert score[0] > score[1]


def test_ranking_uses_exactly_the_cells_given():
    adata = screen(["ctrl", "sgA", "sgB", "held"], GENES, seed=4, effects={("held", "G3"): 8.0,
                                                                          ("sgA", "G1"): 2.0})
    training = adata[adata.obs["condition"] != "held"].copy()

    def pick(data):
        return load_perturbation_data(data, n_top_genes=1, min_genes=1).genes

    assert pick(adata) == ("G3",)  # the held-out condition's responder, when its cells are given
    assert pick(training) == ("G1",)  # and never when they are not
    # The control cells count too: a gene that varies only among them is the most variable.
    control = (training.obs["condition"] == "ctrl").to_numpy()
    training.X[control, GENES.index("G5")] = np.arange(control.sum()) * 3.0
    assert load_perturbation_data(training, n_top_genes=1, min_genes=1, gene_ranking="variance").genes == ("G5",)


@pytest.mark.parametrize("ranking", ["response", "variance", "dispersion"])
def test_sparse_and_dense_select_the_same_genes(ranking):
    rng = np.random.default_rng(5)
    dense = (rng.poisson(0.7, size=(150, 40)) * rng.poisson(2.0, size=(1, 40))).astype(np.float32)
    dense[:, 0] += 1
    condition = np.repeat(np.arange(5), 30)
    size_factor = dense.sum(axis=1) / np.median(dense.sum(axis=1))
    np.testing.assert_allclose(gene_scores(sp.csr_matrix(dense), condition, size_factor=size_factor, ranking=ranking),
                               gene_scores(dense, condition, size_factor=size_factor, ranking=ranking), rtol=1e-9)
    kwargs = dict(condition=condition, size_factor=size_factor, trained=[3], ranking=ranking)
    np.testing.assert_array_equal(select_genes(sp.csr_matrix(dense), 10, **kwargs), select_genes(dense, 10, **kwargs))
    # And through the loader, whose sparse input stays sparse until the panel is chosen.
    adata = screen(["ctrl", "A", "B", "sgX"], GENES, seed=6, effects={("sgX", "G4"): 3.0}, noisy=["G2"])
    sparse = adata.copy()
    sparse.X = sp.csr_matrix(adata.X)
    assert (load_perturbation_data(sparse, n_top_genes=4, gene_ranking=ranking).genes
            == load_perturbation_data(adata, n_top_genes=4, gene_ranking=ranking).genes)


def test_predict_targets_resolve_like_the_training_labels():
    adata = screen(["ctrl", "A", "B"], GENES)
    # A label without cells may be named in the targets mapping, and combinations split into labels.
    data = load_perturbation_data(adata, n_top_genes=4, predict_targets="A+sgC,G5",
                                  targets={"sgC": ["C"]})
    assert {"A", "B", "C", "G5"} == set(data.genes)
    assert data.perturbations == ("A", "B")  # labels to predict are not training labels
    with pytest.raises(DataError, match=r"(?s)predict_targets names 1 labels.*'G55'.*did you mean 'G5'"):
        load_perturbation_data(adata, n_top_genes=4, predict_targets=["A+G55"])
    with pytest.raises(DataError, match="predict_targets must be a list of condition labels"):
        load_perturbation_data(adata, predict_targets=[1, 2])
    # With an explicit gene list, a target to predict that is not in it is said.
    with pytest.warns(LcdBayesWarning, match=r"G5 \(G5\)"):
        load_perturbation_data(adata, genes=["A", "B", "G1"], predict_targets=["G5"])


def test_rankings_that_cannot_apply_are_errors():
    adata = screen(["ctrl", "A"], GENES)
    with pytest.raises(DataError, match="gene_ranking must be one of"):
        load_perturbation_data(adata, n_top_genes=3, gene_ranking="hvg")
    values = adata.copy()
    values.X = np.log1p(values.X)
    with pytest.raises(DataError, match='"dispersion" ranks counts'):
        load_perturbation_data(values, n_top_genes=3, gene_ranking="dispersion", continuous=True)
    control_only = screen(["ctrl"], GENES)
    with pytest.raises(DataError, match="control cells only"):
        load_perturbation_data(control_only, n_top_genes=3)
    assert load_perturbation_data(control_only, n_top_genes=3, gene_ranking="variance").n_genes == 3


def test_dispersion_compares_genes_of_similar_mean():
    # Two expression levels; at each, one gene is overdispersed. The variance of log1p follows the
    # level (every ordinary gene at 0.3 varies more than every one at 30); within bins of the mean
    # the two overdispersed genes stand out.
    rng = np.random.default_rng(7)
    mean = np.array([0.3] * 8 + [30.0] * 8)
    counts = rng.poisson(mean, size=(400, 16)).astype(np.float64)
    counts[:, 0] = rng.poisson(0.3 * rng.gamma(0.1, 10.0, size=400))
    counts[:, 8] = rng.poisson(30.0 * rng.gamma(2.0, 0.5, size=400))
    condition = np.zeros(400, dtype=int)
    variance = gene_scores(counts, condition, size_factor=np.ones(400), ranking="variance")
    assert variance[1:8].min() > variance[9:].max()
    dispersion = gene_scores(counts, condition, size_factor=np.ones(400), ranking="dispersion")
    assert set(np.argsort(-dispersion)[:2]) == {0, 8}
    assert dispersion[[0, 8]].min() > dispersion[[*range(1, 8), *range(9, 16)]].max() + 1
