"""Compare predicted cells with observed held-out cells, condition by condition.

Both sides are put on library-normalized log1p expression over the predicted genes
(:func:`lcd_bayes.io.expression.expression`), and every comparison is made on that scale.
For each predicted condition ``q`` (observed cells ``Y``, predicted cells ``X``):

    energy distance   2 E|X-Y| - E|X-X'| - E|Y-Y'|              (V-statistic, Euclidean)
    MMD^2             E k(X,X') + E k(Y,Y') - 2 E k(X,Y),         k(a,b) = exp(-|a-b|^2 / 2l^2)
    mean shift        delta_q = mean(cells of q) - mean(observed control cells)
    pearson_delta     corr(delta_q^pred, delta_q^obs)            (all genes, and top-DE genes)
    rmse_mean         RMSE(mean X, mean Y)                        (all genes, and top-DE genes)

The control reference of the mean shifts is the observed control for both sides, so a
prediction is never rewarded for predicting its own control.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..diagnostics import DataError
from ..io.expression import UNS_KEY, canonical_label, expression, label_parts
from ..io.run_folder import read_h5ad
from ..io.screen import few

__all__ = [
    "MeanShifts",
    "default_length_scales",
    "energy_distance",
    "evaluate",
    "evaluate_files",
    "mmd_rbf",
    "pearson_delta",
    "plot_mean_shifts",
    "rmse",
    "top_de_genes",
    "write_evaluation",
]

DEFAULT_MAX_CELLS = 1000
# The median heuristic's bandwidth, with a scale below and two above it: a single bandwidth can
# miss differences that live at a finer or coarser scale than the typical cell-to-cell distance.
LENGTH_SCALE_FACTORS = (0.5, 1.0, 2.0, 4.0)
# Entries of one block of a pairwise matrix (float64): bounds memory whatever the sample sizes.
_BLOCK_ENTRIES = 2_000_000
# A squared distance this small relative to |a|^2 + |b|^2 lost most of its digits to
# cancellation in |a|^2 + |b|^2 - 2ab; such pairs (duplicates, near-duplicates) are recomputed.
_REFINE_RELATIVE = 1e-6
_METRICS = ("energy_distance", "mmd", "pearson_delta_all", "pearson_delta_top_de", "rmse_mean",
            "rmse_mean_top_de")


# ---------------------------------------------------------------------------------------------
# Metrics on arrays (rows = cells, columns = genes)
# ---------------------------------------------------------------------------------------------

def _cells(x, name: str) -> np.ndarray:
    """float64 cells x genes; a 1-D array is one gene."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (cells, genes) array, got shape {x.shape}")
    return x


def _subsample(x: np.ndarray, max_cells: int | None, seed: int) -> np.ndarray:
    # Each side draws from its own generator seeded with the same seed, so two identical samples
    # keep identical subsamples (and a distance of exactly 0).
    if max_cells is None or x.shape[0] <= max_cells:
        return x
    index = np.sort(np.random.default_rng(seed).choice(x.shape[0], size=int(max_cells), replace=False))
    return x[index]


def _pair_samples(x, y, max_cells, seed):
    x, y = _cells(x, "x"), _cells(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same genes (columns): {x.shape[1]} != {y.shape[1]}")
    x, y = _subsample(x, max_cells, seed), _subsample(y, max_cells, seed)
    # Distances do not move with a common shift; centring keeps |a|^2 small, and with it the
    # cancellation error of the |a|^2 + |b|^2 - 2ab expansion.
    center = np.concatenate([x, y]).mean(axis=0)
    return x - center, y - center


def _sq_dists_block(a, b, sq_a, sq_b) -> np.ndarray:
    """Squared Euclidean distances between rows of a and b, clipped at 0, small ones exact."""
    d2 = sq_a[:, None] + sq_b[None, :] - 2.0 * (a @ b.T)
    np.maximum(d2, 0.0, out=d2)
    rows, cols = np.nonzero(d2 <= _REFINE_RELATIVE * (sq_a[:, None] + sq_b[None, :]))
    step = max(1, _BLOCK_ENTRIES // a.shape[1])
    for start in range(0, rows.size, step):
        r, c = rows[start:start + step], cols[start:start + step]
        diff = a[r] - b[c]
        d2[r, c] = np.einsum("ij,ij->i", diff, diff)
    return d2


def _pair_means(a: np.ndarray, b: np.ndarray, functions) -> np.ndarray:
    """``mean over all pairs (i, j) of f(|a_i - b_j|^2)`` for each f, in row blocks."""
    sq_a, sq_b = np.einsum("ij,ij->i", a, a), np.einsum("ij,ij->i", b, b)
    totals = np.zeros(len(functions))
    rows = max(1, _BLOCK_ENTRIES // b.shape[0])
    for start in range(0, a.shape[0], rows):
        d2 = _sq_dists_block(a[start:start + rows], b, sq_a[start:start + rows], sq_b)
        totals += [f(d2).sum() for f in functions]
    return totals / (a.shape[0] * b.shape[0])


def _rbf(length_scale: float):
    return lambda d2: np.exp(d2 / (-2.0 * length_scale**2))


def _two_sample(x, y, functions) -> np.ndarray:
    """``E f(X,X') + E f(Y,Y') - 2 E f(X,Y)`` for each f (V-statistics: i = j pairs included)."""
    return _pair_means(x, x, functions) + _pair_means(y, y, functions) - 2.0 * _pair_means(x, y, functions)


def _check_length_scales(length_scales) -> np.ndarray:
    scales = np.atleast_1d(np.asarray(length_scales, dtype=np.float64))
    if scales.ndim != 1 or scales.size == 0 or not np.all(np.isfinite(scales) & (scales > 0)):
        raise ValueError(f"length_scales must be positive finite numbers, got {length_scales!r}")
    return scales


def energy_distance(x, y, *, max_cells: int | None = DEFAULT_MAX_CELLS, seed: int = 0) -> float:
    """Energy distance ``2 E|X-Y| - E|X-X'| - E|Y-Y'|`` between two samples of cells.

    Parameters
    ----------
    x, y : array, shape (cells, genes)
        The two samples (a 1-D array is one gene).
    max_cells : int or None
        Each side larger than this is subsampled (without replacement) to ``max_cells`` cells,
        keeping the cost at ``O(max_cells^2 genes)``; None uses every cell. The subsample is
        fixed by ``seed`` and is the same for both sides when they have the same cells.
    seed : int
        Seed of the subsampling.

    Returns
    -------
    float
        The V-statistic (every pair, ``i = j`` included), clipped at 0 against rounding;
        exactly 0 when x and y are the same sample.
    """
    x, y = _pair_samples(x, y, max_cells, seed)
    return max(0.0, -float(_two_sample(x, y, [np.sqrt])[0]))


def mmd_rbf(x, y, length_scales, *, max_cells: int | None = DEFAULT_MAX_CELLS, seed: int = 0) -> np.ndarray:
    """Squared maximum mean discrepancy with the RBF kernel, one value per length scale.

    ``MMD^2 = E k(X,X') + E k(Y,Y') - 2 E k(X,Y)`` with ``k(a,b) = exp(-|a-b|^2 / (2 l^2))``, as
    the biased V-statistic (clipped at 0 against rounding; exactly 0 for identical samples).
    ``max_cells`` and ``seed`` subsample as in :func:`energy_distance`.

    Returns
    -------
    np.ndarray, shape (len(length_scales),)
    """
    scales = _check_length_scales(length_scales)
    x, y = _pair_samples(x, y, max_cells, seed)
    return np.maximum(_two_sample(x, y, [_rbf(s) for s in scales]), 0.0)


def default_length_scales(x, y=None, *, max_cells: int | None = DEFAULT_MAX_CELLS, seed: int = 0) -> np.ndarray:
    """RBF length scales from the median heuristic: ``m * (0.5, 1, 2, 4)``.

    ``m`` is the median Euclidean distance between distinct cells of the pooled sample (x and
    y stacked; ``max_cells`` cells drawn from the pool when it is larger). The median sets the
    kernel to the typical cell-to-cell distance; the other factors cover finer and coarser
    differences. A degenerate pool (all cells equal) falls back to ``m = 1``.
    """
    pool = _cells(x, "x") if y is None else np.concatenate([_cells(x, "x"), _cells(y, "y")])
    pool = _subsample(pool, max_cells, seed)
    pool = pool - pool.mean(axis=0)
    if pool.shape[0] < 2:
        median = 0.0
    else:
        sq = np.einsum("ij,ij->i", pool, pool)
        upper = np.triu_indices(pool.shape[0], k=1)
        median = float(np.median(np.sqrt(_sq_dists_block(pool, pool, sq, sq)[upper])))
    if not median > 0:
        median = 1.0
    return median * np.asarray(LENGTH_SCALE_FACTORS)


def pearson_delta(pred_shift, obs_shift, genes_mask=None) -> float:
    """Pearson correlation of predicted and observed mean shifts (vs control) across genes.

    ``genes_mask`` (boolean mask or gene indices) restricts the genes; genes where either side
    is not finite are left out. Returns nan when fewer than 2 genes remain or either side is
    constant (the correlation is undefined then).
    """
    pred, obs = np.asarray(pred_shift, dtype=np.float64).ravel(), np.asarray(obs_shift, dtype=np.float64).ravel()
    if pred.shape != obs.shape:
        raise ValueError(f"shifts differ in length: {pred.size} != {obs.size}")
    if genes_mask is not None:
        pred, obs = pred[genes_mask], obs[genes_mask]
    finite = np.isfinite(pred) & np.isfinite(obs)
    if finite.sum() < 2:
        return float("nan")
    pred, obs = pred[finite] - pred[finite].mean(), obs[finite] - obs[finite].mean()
    norm = math.sqrt(float(pred @ pred) * float(obs @ obs))
    if not norm > 0:
        return float("nan")
    return float(np.clip(pred @ obs / norm, -1.0, 1.0))


def top_de_genes(obs_shift, n: int = 20) -> np.ndarray:
    """Indices of the ``n`` genes with the largest absolute observed mean shift vs control.

    The DE ranking is by ``|mean(condition) - mean(control)|`` of normalized log1p expression,
    like GEARS' "top-20 DE genes" but with no test statistic. Ties keep gene order; non-finite
    shifts rank last.
    """
    magnitude = np.abs(np.asarray(obs_shift, dtype=np.float64).ravel())
    magnitude[~np.isfinite(magnitude)] = -np.inf
    return np.argsort(-magnitude, kind="stable")[: max(0, int(n))]


def rmse(a, b) -> float:
    """Root mean squared difference ``sqrt(mean((a - b)^2))``; nan for empty inputs."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} != {b.shape}")
    return float(np.sqrt(np.mean((a - b) ** 2))) if a.size else float("nan")


# ---------------------------------------------------------------------------------------------
# AnnData comparison
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)  # compared by identity: pd.concat compares tables' attrs with ==
class MeanShifts:
    """Per-condition mean shifts vs the observed control, kept with the table for the figure.

    Attributes
    ----------
    genes : list of str, length genes
    conditions : list of str, length conditions
    predicted, observed : np.ndarray, shape (conditions, genes)
    top_de : np.ndarray of int, shape (conditions, n_top_de)
        Indices of each condition's top-DE genes (by observed shift).
    """

    genes: list
    conditions: list
    predicted: np.ndarray
    observed: np.ndarray
    top_de: np.ndarray


def _settings(pred: anndata.AnnData, perturbation_key, control, sep) -> dict:
    info = pred.uns.get(UNS_KEY)
    info = info if isinstance(info, dict) else {}
    return {
        "perturbation_key": perturbation_key if perturbation_key is not None else str(info.get("perturbation_key", "condition")),
        "control": control if control is not None else str(info.get("control", "ctrl")),
        "sep": sep if sep is not None else str(info.get("sep", "+")),
        "method": None if info.get("method") is None else str(info.get("method")),
    }


def _canonical_labels(adata: anndata.AnnData, key: str, control: str, sep: str, where: str) -> np.ndarray:
    if key not in adata.obs:
        raise DataError(f"{where}.obs has no column {key!r} (columns: {few(list(adata.obs.columns))}); "
                        "pass perturbation_key= (CLI --perturbation-key) to name the condition column.")
    raw = adata.obs[key].astype(str).to_numpy()
    unique, inverse = np.unique(raw, return_inverse=True)
    return np.asarray([canonical_label(u, control, sep) for u in unique], dtype=object)[inverse]


def evaluate(pred: anndata.AnnData, observed: anndata.AnnData, *, perturbation_key: str | None = None,
             control: str | None = None, sep: str | None = None, layer: str | None = None,
             total_counts_key: str | None = None, n_top_de: int = 20, length_scales=None,
             max_cells: int | None = DEFAULT_MAX_CELLS, seed: int = 0) -> tuple[pd.DataFrame, dict]:
    """Score predicted cells against observed cells, one row per predicted condition.

    Parameters
    ----------
    pred : AnnData
        Predicted cells (see :func:`lcd_bayes.io.expression.prediction_anndata`); its genes
        (``var_names``) are the genes compared, its ``uns["lcd_bayes"]["space"]`` its scale.
    observed : AnnData
        Observed cells, including control cells and cells of every predicted condition.
    perturbation_key, control, sep : str, optional
        Condition column (in both files), control label and combination separator; default to
        ``pred.uns["lcd_bayes"]``, else ``"condition"``, ``"ctrl"``, ``"+"``. Labels match
        whatever the order of their parts ("B+A" is "A+B").
    layer, total_counts_key : str, optional
        Where the observed file keeps counts, or its library sizes when it holds log1p-normalized
        values (see :func:`lcd_bayes.io.expression.expression`); the prediction is read as it is.
    n_top_de : int
        Genes in each condition's top-DE set (:func:`top_de_genes`).
    length_scales : sequence of float, optional
        RBF length scales of the MMD. Default: :func:`default_length_scales` of the observed
        cells (at most 1000 of them, drawn with ``seed``), so that they depend on the observed
        file only and the MMDs of different predictions of one held-out set are comparable.
    max_cells, seed : int
        Subsampling of each side of the distance metrics (:func:`energy_distance`).

    Returns
    -------
    table : pandas.DataFrame
        One row per predicted non-control condition: ``condition, n_pred_cells, n_obs_cells,
        energy_distance, mmd`` (mean over length scales), ``mmd_l<scale>`` per scale,
        ``pearson_delta_all, pearson_delta_top_de, rmse_mean, rmse_mean_top_de``.
        ``table.attrs["mean_shifts"]`` holds the :class:`MeanShifts` that the figure draws.
    aggregate : dict
        ``n_conditions, n_genes, length_scales, mean, median`` (per metric, over conditions,
        ignoring nan) and ``settings``.
    """
    settings = _settings(pred, perturbation_key, control, sep)
    key, control, sep = settings["perturbation_key"], settings["control"], settings["sep"]
    genes = [str(g) for g in pred.var_names]
    if not genes:
        raise DataError("the prediction has no genes (pred.var_names is empty).")
    pred_labels = _canonical_labels(pred, key, control, sep, "predicted")
    obs_labels = _canonical_labels(observed, key, control, sep, "observed")

    conditions = sorted({str(q) for q in pred_labels if q != control},
                        key=lambda q: (len(label_parts(q, control, sep)), q))
    if not conditions:
        raise DataError(f"the prediction has no cells outside the control {control!r} (its "
                        f"{key!r} labels: {few(sorted(set(pred_labels)))}); nothing to evaluate.")
    observed_conditions = sorted(set(obs_labels))
    missing = [q for q in conditions if q not in observed_conditions]
    if missing:
        raise DataError(f"observed has no cells of {len(missing)} predicted condition(s): {few(missing)}; "
                        f"observed {key!r} has {few(observed_conditions)}. Evaluate on held-out cells of "
                        "the predicted conditions (or check perturbation_key=, control=, sep=: CLI "
                        "--perturbation-key, --control).")
    is_control = obs_labels == control
    if not is_control.any():
        raise DataError(f"observed has no control cells labelled {control!r} in {key!r} (it has "
                        f"{few(observed_conditions)}); include control cells, or pass control= (CLI --control) "
                        "to name them.")

    x_pred = expression(pred, genes, where="predicted")
    x_obs = expression(observed, genes, layer=layer, total_counts_key=total_counts_key, where="observed")
    given_scales = length_scales is not None
    scales = (_check_length_scales(length_scales) if given_scales
              # the median needs every pair at once: never pool more than the default cell count
              else default_length_scales(x_obs, max_cells=min(max_cells or DEFAULT_MAX_CELLS, DEFAULT_MAX_CELLS),
                                         seed=seed))
    kernels = [_rbf(s) for s in scales]
    scale_columns = [f"mmd_l{s:.4g}" for s in scales]
    if len(set(scale_columns)) < len(scale_columns):
        raise ValueError(f"length_scales must be distinct (to 4 significant digits): {list(scales)}")

    control_mean = x_obs[is_control].mean(axis=0, dtype=np.float64)
    rows, shift_pred, shift_obs, top_sets = [], [], [], []
    for q in conditions:
        xp, xo = x_pred[pred_labels == q], x_obs[obs_labels == q]
        mean_p, mean_o = xp.mean(axis=0, dtype=np.float64), xo.mean(axis=0, dtype=np.float64)
        delta_p, delta_o = mean_p - control_mean, mean_o - control_mean
        top = top_de_genes(delta_o, n_top_de)
        a, b = _pair_samples(xp, xo, max_cells, seed)
        # One pass over the pairs serves both distances.
        two = _two_sample(a, b, [np.sqrt, *kernels])
        mmds = np.maximum(two[1:], 0.0)
        rows.append({
            "condition": q, "n_pred_cells": int(xp.shape[0]), "n_obs_cells": int(xo.shape[0]),
            "energy_distance": max(0.0, -float(two[0])), "mmd": float(mmds.mean()),
            **{col: float(v) for col, v in zip(scale_columns, mmds)},
            "pearson_delta_all": pearson_delta(delta_p, delta_o),
            "pearson_delta_top_de": pearson_delta(delta_p, delta_o, top),
            "rmse_mean": rmse(mean_p, mean_o), "rmse_mean_top_de": rmse(mean_p[top], mean_o[top]),
        })
        shift_pred.append(delta_p), shift_obs.append(delta_o), top_sets.append(top)

    table = pd.DataFrame(rows)
    table.attrs["mean_shifts"] = MeanShifts(genes, list(conditions), np.asarray(shift_pred),
                                            np.asarray(shift_obs), np.asarray(top_sets, dtype=int))
    metrics = [*_METRICS, *scale_columns]
    aggregate = {
        "n_conditions": len(conditions),
        "n_genes": len(genes),
        "length_scales": [float(s) for s in scales],
        "mean": {m: _nan_stat(np.nanmean, table[m]) for m in metrics},
        "median": {m: _nan_stat(np.nanmedian, table[m]) for m in metrics},
        "settings": {**settings, "layer": layer, "total_counts_key": total_counts_key,
                     "n_top_de": int(n_top_de), "max_cells": max_cells, "seed": int(seed),
                     "length_scales": "given" if given_scales else "median heuristic x (0.5, 1, 2, 4) of observed cells",
                     "control_reference": "observed control cells"},
    }
    return table, aggregate


def _nan_stat(stat, values) -> float:
    values = np.asarray(values, dtype=np.float64)
    return float(stat(values)) if np.isfinite(values).any() else float("nan")


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------

def plot_mean_shifts(predicted, observed, conditions, *, top_de=None, pearson=None,
                     max_panels: int = 12) -> Figure:
    """Predicted vs observed mean shift per gene, one panel per condition (the first ``max_panels``).

    Parameters
    ----------
    predicted, observed : array, shape (conditions, genes)
        Mean shifts vs control.
    conditions : sequence of str
        Panel titles.
    top_de : array of int, shape (conditions, n), optional
        Genes highlighted in each panel.
    pearson : sequence of float, optional
        Correlations shown in the titles (computed from the shifts when omitted).
    """
    predicted, observed = np.atleast_2d(predicted), np.atleast_2d(observed)
    n = min(len(conditions), max_panels)
    ncols = min(4, max(n, 1))
    nrows = max(1, math.ceil(n / ncols))
    fig = Figure(figsize=(3.0 * ncols, 2.9 * nrows + 0.4), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for i, ax in enumerate(axes.ravel()):
        if i >= n:
            ax.set_visible(False)
            continue
        obs, pred = observed[i], predicted[i]
        r = pearson[i] if pearson is not None else pearson_delta(pred, obs)
        ax.scatter(obs, pred, s=6, color="0.6", lw=0, label="genes")
        if top_de is not None and len(top_de[i]):
            ax.scatter(obs[top_de[i]], pred[top_de[i]], s=12, color="tab:red", lw=0, label="top DE")
        finite = np.concatenate([obs, pred])
        finite = finite[np.isfinite(finite)]
        low, high = (finite.min(), finite.max()) if finite.size else (-1.0, 1.0)
        pad = 0.05 * (high - low) or 0.1
        limits = (low - pad, high + pad)
        ax.plot(limits, limits, color="k", lw=0.8, ls="--")
        ax.set_xlim(limits), ax.set_ylim(limits)  # same scale on both axes: the diagonal is "exact"
        ax.set_title(f"{conditions[i]}  (r = {r:.2f})", fontsize=9)
        if i % ncols == 0:
            ax.set_ylabel("predicted shift")
        if i >= n - ncols:
            ax.set_xlabel("observed shift")
        ax.tick_params(labelsize=7)
    if n:
        axes[0, 0].legend(fontsize=7, loc="upper left", frameon=False)
    shown = "" if n == len(conditions) else f" (first {n} of {len(conditions)} conditions)"
    fig.suptitle(f"Mean shift vs observed control, log1p-normalized{shown}", fontsize=10)
    return fig


def _json_ready(value):
    """JSON has no nan: nan becomes null, numpy scalars plain numbers."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def write_evaluation(table: pd.DataFrame, aggregate: dict, out_dir) -> dict[str, Path]:
    """Write ``metrics.csv`` (per condition), ``metrics.json`` (``{"per_condition": [...],
    "aggregate": {...}}``) and, when the table carries its mean shifts (as :func:`evaluate`'s
    does), ``mean_shift.png``. Returns the written paths by name."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"metrics.csv": out_dir / "metrics.csv", "metrics.json": out_dir / "metrics.json"}
    table.to_csv(paths["metrics.csv"], index=False)
    payload = {"per_condition": _json_ready(table.to_dict(orient="records")), "aggregate": _json_ready(aggregate)}
    paths["metrics.json"].write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    shifts = table.attrs.get("mean_shifts")
    if isinstance(shifts, MeanShifts):
        pearson = dict(zip(table["condition"], table["pearson_delta_all"])) if "pearson_delta_all" in table else {}
        fig = plot_mean_shifts(shifts.predicted, shifts.observed, shifts.conditions, top_de=shifts.top_de,
                               pearson=[pearson.get(q, float("nan")) for q in shifts.conditions])
        paths["mean_shift.png"] = out_dir / "mean_shift.png"
        fig.savefig(paths["mean_shift.png"], dpi=120)
    return paths


def evaluate_files(pred_path, observed_path, out_dir=None, **kwargs) -> tuple[pd.DataFrame, dict, Path]:
    """Read two .h5ad files, :func:`evaluate` them (``kwargs`` pass through) and write the outputs
    to ``out_dir`` (default ``<pred stem>_evaluation/`` beside the prediction)."""
    pred_path, observed_path = Path(pred_path), Path(observed_path)
    for path, what in ((pred_path, "prediction"), (observed_path, "observed")):
        if not path.is_file():
            raise FileNotFoundError(f"{what} file not found: {path} (expected an .h5ad file)")
    table, aggregate = evaluate(read_h5ad(pred_path), read_h5ad(observed_path), **kwargs)
    out_dir = Path(out_dir) if out_dir is not None else pred_path.with_name(f"{pred_path.stem}_evaluation")
    aggregate["settings"].update(pred_path=str(pred_path), observed_path=str(observed_path))
    write_evaluation(table, aggregate, out_dir)
    return table, aggregate, out_dir
