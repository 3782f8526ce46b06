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


def clipr_scores(clipr: xr.DataTree, truth: np.ndarray, edges: np.ndarray | None = None) -> dict:
    """CLIPR's effects (``clipr``: the tree of ``clipr_posterior``) scored against the true effects
    ``truth[source, target]``: edge ranking by ``prob_edge`` and ``|mean|``, sign accuracy, and the
    coverage of the 50% / 90% HDIs over all ordered pairs, over ``edges`` (default: the nonzero true
    effects) and over the other pairs; with why intervals miss: the posterior mean's error on the
    edges in posterior sds (median; 0.67 for a calibrated Gaussian posterior) and its least-squares
    slope on the truth (above 1: effects too large)."""
    effect = clipr["posterior"]["effect"]
    mean = effect.mean(("chain", "draw")).transpose("source", "target").values
    sd = effect.std(("chain", "draw")).transpose("source", "target").values
    prob_edge = clipr["edges"]["prob_edge"].transpose("source", "target").fillna(0).values
    off = ~np.eye(truth.shape[0], dtype=bool)
    edges = off & (truth != 0 if edges is None else edges)
    labels = np.where(edges, 1.0, 0.0)  # the edges as scored (all nonzero effects by default)
    by_prob = edge_recovery(labels, prob_edge)
    by_mean = edge_recovery(labels, np.abs(mean))
    signs = np.sign(mean[edges]) == np.sign(truth[edges])

    def over(mask, score):  # nan where no pair is selected
        return score(mask) if mask.any() else float("nan")

    return {
        "auroc_prob_edge": by_prob["auroc"], "auprc_prob_edge": by_prob["auprc"],
        "auroc_abs_mean": by_mean["auroc"], "auprc_abs_mean": by_mean["auprc"],
        "sign_accuracy": over(edges, lambda mask: float(np.mean(signs))), "n_edges": int(edges.sum()),
        "coverage50_all": interval_coverage(effect, truth, 0.5, off), "coverage90_all": interval_coverage(effect, truth, 0.9, off),
        "coverage50_edges": over(edges, lambda mask: interval_coverage(effect, truth, 0.5, mask)),
        "coverage90_edges": over(edges, lambda mask: interval_coverage(effect, truth, 0.9, mask)),
        # Absent edges (true effect 0): a sparse prior's spike at 0 covers them more often than
        # the nominal rate, which lifts the all-pairs numbers above the edges' own.
        "coverage50_absent": over(off & ~edges, lambda mask: interval_coverage(effect, truth, 0.5, mask)),
        "coverage90_absent": over(off & ~edges, lambda mask: interval_coverage(effect, truth, 0.9, mask)),
        "edge_abs_z_median": over(edges, lambda mask: float(np.median(np.abs(mean - truth)[mask] / sd[mask]))),
        "edge_slope": over(edges, lambda mask: float(np.sum(mean[mask] * truth[mask]) / np.sum(truth[mask] ** 2))),
        "tau": float(clipr["edges"].attrs["tau"]) if "tau" in clipr["edges"].attrs else None,
    }
