"""Scores of causal recovery against a known effect matrix (of a simulated screen, docs/model.md
"The simulators"), of a posterior's effects and of its credible intervals."""
from __future__ import annotations

import arviz as az
import numpy as np
import xarray as xr
from scipy.stats import rankdata


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum (Mann–Whitney) identity; ties count half."""
    labels = np.asarray(labels, bool).ravel()
    scores = np.asarray(scores, float).ravel()
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auprc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision: mean of the precision at each true positive, scores sorted descending."""
    labels = np.asarray(labels, bool).ravel()
    order = np.argsort(-np.asarray(scores, float).ravel(), kind="stable")
    hits = labels[order]
    if hits.sum() == 0:
        return float("nan")
    precision = np.cumsum(hits) / np.arange(1, hits.size + 1)
    return float(precision[hits].mean())


def off_diagonal(matrix: np.ndarray) -> np.ndarray:
    """Entries of a (genes, genes) matrix off its diagonal, flattened."""
    matrix = np.asarray(matrix)
    return matrix[~np.eye(matrix.shape[-1], dtype=bool)]


def edge_recovery(true_effect: np.ndarray, score: np.ndarray, signed_estimate: np.ndarray | None = None) -> dict:
    """AUROC/AUPRC of ``score`` (larger = more likely an edge) against the nonzero true effects,
    and the sign accuracy of ``signed_estimate`` on the true edges."""
    truth = off_diagonal(true_effect)
    is_edge = truth != 0
    result = {"auroc": auroc(is_edge, off_diagonal(score)), "auprc": auprc(is_edge, off_diagonal(score)),
              "n_edges": int(is_edge.sum())}
    if signed_estimate is not None:
        estimate = off_diagonal(signed_estimate)
        result["sign_accuracy"] = float(np.mean(np.sign(estimate[is_edge]) == np.sign(truth[is_edge])))
    return result


def interval_coverage(effect, truth: np.ndarray, prob: float, mask: np.ndarray) -> float:
    """Fraction of the true effects ``truth[source, target]`` selected by ``mask`` inside the
    ``prob`` HDI of the posterior ``effect`` (an xarray with dims chain, draw, source, target)."""
    interval = az.hdi(effect, prob=prob).transpose("source", "target", "ci_bound").values
    inside = (interval[..., 0] <= truth) & (truth <= interval[..., 1])
    return float(inside[mask].mean())


def recovery_against_truth(tree: xr.DataTree, true_effect: np.ndarray) -> dict:
    """AUROC/AUPRC of |posterior mean| against the true edges, and sign accuracy."""
    mean = tree["posterior"]["interaction"].mean(("chain", "draw")).transpose("source", "target").values
    return edge_recovery(true_effect, np.abs(mean), mean)
