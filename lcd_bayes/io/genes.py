"""Which genes to model when not all of them can be: the targets first, then the most informative.

A panel of at most N genes is filled in this order:

1. the target genes of the conditions the user will predict (``predict_targets``), which need no
   cells: a perturbation of a gene outside the panel has no on-target shift to predict from;
2. the target genes of the training labels: their shifts are the interventions that identify
   the drift (a label whose target is left out is modelled through off-target shifts);
3. the other genes, best first, by a score computed on the cells given. With
   ``z_ig = log1p(y_ig / s_i)`` (counts ``y``, size factors ``s``; the values themselves when
   continuous), ``n_q`` cells, mean ``m_qg`` and pooled sd ``sd_qg`` of condition ``q`` against
   the control ``0``:

   * ``"response"`` (the default): ``max_q |m_qg - m_0g| / sd_qg - 2 sqrt(1/n_q + 1/n_0)``, the
     largest standardized shift of any perturbed condition, less two of its standard errors;
   * ``"variance"``: the variance of ``z_g`` over all cells (highly variable genes);
   * ``"dispersion"`` (counts only): scanpy's ``flavor="seurat"`` highly variable genes, the log
     dispersion ``log(var / mean)`` of ``y / s`` standardized within 20 equal-width bins of
     ``log1p(mean)``, so that genes compete with genes of similar expression.

Within groups 1 and 2 the targets are ordered by the same score, so when they alone exceed N the
ones kept are the most responsive (or variable) and the rest are named in a warning.

The score sees every cell it is given, so pass the training cells only: held-out cells would let
their conditions' responses choose the panel. Conditions to predict are named by label, without
cells.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

from ..config import DEFAULT_GENE_RANKING, GENE_RANKINGS
from ..diagnostics import LcdBayesWarning

__all__ = ["gene_scores", "select_genes"]

# Entries of a dense matrix transformed per pass, so ranking never copies a large matrix whole.
_BLOCK_ENTRIES = 10_000_000
# The response is discounted by this many standard errors of a standardized difference,
# sqrt(1/n_q + 1/n_0): against 300 control cells a 3-cell condition's shift counts 1.2 sds less,
# a 300-cell one's 0.16 less, so the maximum over many small conditions is not won by noise.
_RESPONSE_Z = 2.0
# Pooled variances below this (log1p scale) count as a constant gene, whose shift is then
# compared against this floor rather than divided by zero.
_VARIANCE_FLOOR = 1e-12
_DISPERSION_BINS = 20  # as scanpy's highly_variable_genes(flavor="seurat", n_bins=20)


def _condition_sums(matrix, condition: np.ndarray, size_factor: np.ndarray | None, log: bool):
    """Per-condition cell counts and sums of ``z`` and ``z^2``.

    ``z = log1p(y / s)`` (``log``) or ``y / s``, the values as they are when ``size_factor`` is
    None. Sparse input stays sparse: ``z(0) = 0``, so only stored entries are transformed.

    Returns
    -------
    n : np.ndarray, shape (conditions,)
    sums, squares : np.ndarray, shape (conditions, genes), float64
    """
    n_cells = matrix.shape[0]
    n_conditions = int(condition.max()) + 1
    # (conditions, cells) indicator: one sparse product sums every condition at once.
    groups = sp.csr_matrix((np.ones(n_cells), (condition, np.arange(n_cells))), shape=(n_conditions, n_cells))
    n = np.bincount(condition, minlength=n_conditions).astype(np.float64)

    def transform(values, scale):
        """``z`` of raw values; ``scale``: their size factors (None: the values as they are)."""
        values = np.asarray(values, dtype=np.float64)
        if scale is None:
            return values
        values = values / scale
        return np.log1p(values) if log else values

    if sp.issparse(matrix):
        csr = sp.csr_matrix(matrix)
        row = np.repeat(np.arange(n_cells), np.diff(csr.indptr))  # row of every stored entry
        z = sp.csr_matrix((transform(csr.data, None if size_factor is None else size_factor[row]),
                           csr.indices, csr.indptr), shape=csr.shape)
        sums = (groups @ z).toarray()
        squares = (groups @ z.multiply(z)).toarray()
        return n, sums, squares
    sums = np.empty((n_conditions, matrix.shape[1]))
    squares = np.empty_like(sums)
    columns = max(1, _BLOCK_ENTRIES // max(1, n_cells))
    for start in range(0, matrix.shape[1], columns):
        block = slice(start, start + columns)
        z = transform(matrix[:, block], None if size_factor is None else size_factor[:, None])
        sums[:, block] = groups @ z
        squares[:, block] = groups @ (z * z)
    return n, sums, squares


def _response(n: np.ndarray, sums: np.ndarray, squares: np.ndarray) -> np.ndarray:
    """``max_q |m_q - m_0| / sd_q - z sqrt(1/n_q + 1/n_0)`` per gene; condition 0 is the control.
    Conditions without cells are left out."""
    if n[0] == 0 or not (n[1:] > 0).any():
        raise ValueError('ranking="response" needs control cells and cells of a perturbed condition')
    n_q = np.maximum(n[1:, None], 1)
    mean = sums / np.maximum(n, 1)[:, None]
    # Within-condition sums of squared deviations, then the variance pooled with the control's.
    deviations = np.maximum(squares - sums * mean, 0.0)
    pooled = (deviations[1:] + deviations[0]) / np.maximum(n_q + n[0] - 2, 1)
    standardized = np.abs(mean[1:] - mean[0]) / np.sqrt(np.maximum(pooled, _VARIANCE_FLOOR))
    lower = standardized - _RESPONSE_Z * np.sqrt(1 / n_q + 1 / n[0])
    return np.where(n[1:, None] > 0, lower, -np.inf).max(axis=0)


def _normalized_dispersion(n: float, sums: np.ndarray, squares: np.ndarray) -> np.ndarray:
    """scanpy's seurat-flavour score of normalized counts: ``log(var / mean)`` standardized within
    equal-width bins of ``log1p(mean)``; ``-inf`` for genes with no variance (never expressed)."""
    mean = sums / n
    variance = np.maximum(squares - sums * mean, 0.0) / max(n - 1, 1)
    score = np.full(mean.shape, -np.inf)
    varying = variance > 0
    if not varying.any():
        return score
    log_dispersion = np.log(variance[varying] / mean[varying])
    log_mean = np.log1p(mean[varying])
    edges = np.linspace(log_mean.min(), log_mean.max(), _DISPERSION_BINS + 1)
    bin_of = np.digitize(log_mean, edges[1:-1])  # 0 .. bins - 1, the top edge in the last bin
    count = np.bincount(bin_of, minlength=_DISPERSION_BINS)
    bin_mean = np.bincount(bin_of, log_dispersion, _DISPERSION_BINS) / np.maximum(count, 1)
    bin_square = np.bincount(bin_of, (log_dispersion - bin_mean[bin_of]) ** 2, _DISPERSION_BINS)
    bin_sd = np.sqrt(bin_square / np.maximum(count - 1, 1))
    # A gene alone in its bin (or in a bin of equal dispersions) has no peers to differ from: 0.
    sd = bin_sd[bin_of]
    score[varying] = np.divide(log_dispersion - bin_mean[bin_of], sd, out=np.zeros_like(sd), where=sd > 0)
    return score


def gene_scores(matrix, condition: np.ndarray, *, size_factor: np.ndarray | None = None,
                ranking: str = DEFAULT_GENE_RANKING) -> np.ndarray:
    """Score every gene for the panel (higher is better) on the cells given.

    Parameters
    ----------
    matrix : np.ndarray or scipy.sparse matrix, shape (cells, genes)
        Counts, or continuous values when ``size_factor`` is None.
    condition : np.ndarray of int, shape (cells,)
        Each cell's condition; 0 is the control (``"response"`` compares against it).
    size_factor : np.ndarray, shape (cells,), optional
        Library size over its median; None means the values are used as they are.
    ranking : {"response", "variance", "dispersion"}
        See the module's docstring.

    Returns
    -------
    np.ndarray, shape (genes,), float64
    """
    if ranking not in GENE_RANKINGS:
        raise ValueError(f"ranking must be one of {GENE_RANKINGS}, got {ranking!r}")
    condition = np.asarray(condition, dtype=np.int64)
    if ranking == "dispersion":
        if size_factor is None:
            raise ValueError('ranking="dispersion" ranks counts (var / mean of y / s); continuous values need '
                             '"variance" or "response"')
        n, sums, squares = _condition_sums(matrix, condition, size_factor, log=False)
        return _normalized_dispersion(n.sum(), sums.sum(axis=0), squares.sum(axis=0))
    n, sums, squares = _condition_sums(matrix, condition, size_factor, log=True)
    if ranking == "response":
        return _response(n, sums, squares)
    total, mean = n.sum(), sums.sum(axis=0) / n.sum()
    return np.maximum(squares.sum(axis=0) / total - mean * mean, 0.0)


def select_genes(matrix, n_genes: int, *, condition: np.ndarray, size_factor: np.ndarray | None = None,
                 requested: Sequence[int] = (), trained: Sequence[int] = (),
                 ranking: str = DEFAULT_GENE_RANKING, names: Sequence[str] | None = None) -> np.ndarray:
    """Columns of a panel of at most ``n_genes`` genes: requested targets, trained targets, ranked genes.

    Parameters
    ----------
    matrix, condition, size_factor, ranking
        As :func:`gene_scores`; pass the training cells (control included) only.
    n_genes : int
        Panel size; all genes when the matrix has fewer.
    requested : sequence of int
        Columns of the target genes of the conditions to predict (first priority).
    trained : sequence of int
        Columns of the target genes of the training labels (second priority).
    names : sequence of str, optional
        Gene names, for the warning.

    Returns
    -------
    np.ndarray of int, shape (min(n_genes, genes),)
        Column indices in ascending order, so that column order does not depend on the ranking.

    Warns
    -----
    LcdBayesWarning
        When the targets alone exceed ``n_genes``: those left out are named.
    """
    score = gene_scores(matrix, condition, size_factor=size_factor, ranking=ranking)
    order = np.argsort(-score, kind="stable")  # best first; ties in column order
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)

    def by_rank(columns):
        return sorted({int(c) for c in columns}, key=rank.__getitem__)

    targets = list(dict.fromkeys(by_rank(requested) + by_rank(trained)))  # a requested target stays first
    n_genes = min(int(n_genes), score.size)
    kept, dropped = targets[:n_genes], targets[n_genes:]
    if dropped:
        shown = [names[c] if names is not None else str(c) for c in dropped]
        listed = ", ".join(shown[:8]) + (f", ... ({len(shown) - 8} more)" if len(shown) > 8 else "")
        warnings.warn(
            f"a panel of {n_genes} genes holds only {n_genes} of the {len(targets)} target genes (those of the "
            f"conditions to predict first, then of the training labels, each by the {ranking!r} ranking); "
            f"{len(dropped)} targets are left out: {listed}. Their labels are modelled through off-target "
            "shifts; raise n_top_genes to keep them.",
            LcdBayesWarning,
            stacklevel=3,
        )
    rest = order[~np.isin(order, kept)][: n_genes - len(kept)]
    return np.sort(np.concatenate([np.asarray(kept, dtype=np.int64), rest]))
