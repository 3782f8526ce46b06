"""Posterior predictive check: does a fit reproduce the conditions it was trained on?

Every training condition ``q`` (the control included) is predicted from the posterior
(:func:`lcd_bayes.analysis.predict.predict_posterior`) and compared with its observed cells on
the scale :mod:`lcd_bayes.analysis.evaluation` uses: library-normalized log1p expression over the
modelled genes for counts, the values as they are for a Gaussian run. With ``X`` the predicted and
``Y`` the observed cells of ``q``, and each side's own control cells ``X_0``, ``Y_0``:

    delta_q^pred = mean(X_q) - mean(X_0),   delta_q^obs = mean(Y_q) - mean(Y_0)
    pearson_delta_all      corr(delta_q^pred, delta_q^obs) over all genes
    pearson_delta_top_de   the same over the 20 genes of largest |delta_q^obs|
    shift_ratio_top_de     rms(delta_q^pred) / rms(delta_q^obs) over those genes (1: right size)
    rmse_mean              RMSE(mean X_q, mean Y_q) over all genes
    variance_ratio         median over genes of var(X_q) / var(Y_q)
    zero_fraction_pred/obs fraction of zero entries (counts only)
    split_half_top_de      pearson_delta_top_de between two random halves of the observed cells
                           (each half's shift from its half of the control): how well the data
                           reproduce themselves

Unlike ``lcd-bayes evaluate`` (held-out cells, whose reference is the observed control for both
sides), each side's shift here is from its own control: the model predicts the training control
too, and a shared observed reference would put the observed control's sampling noise into both
shifts, correlating them even for a fit that predicts no effect at all. How well the control
itself is reproduced is in the control's row (``rmse_mean``, ``variance_ratio``, zero fractions).

A fit that explains the perturbations' effects as cell-to-cell noise predicts every condition like
the control: its shifts are Monte Carlo noise, uncorrelated with the observed ones, and the median
over perturbed conditions of ``pearson_delta_top_de`` falls to about 0. The check warns when, over
the conditions whose response two halves of the observed cells reproduce (``split_half_top_de`` of
at least ``MIN_TOP_DE_CORRELATION``), the median ``pearson_delta_top_de`` is below that threshold:
a condition without a reproducible response cannot tell a correct fit from a collapsed one
(docs/evaluation.md, "Posterior predictive check").
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import scipy.sparse as sp
import xarray as xr

from ..diagnostics import LcdBayesWarning
from ..io.expression import normalize_log1p
from .evaluation import MeanShifts, pearson_delta, top_de_genes
from .predict import predict_posterior

__all__ = ["GROUP", "MAX_CELLS", "MIN_CELLS", "MIN_TOP_DE_CORRELATION", "N_TOP_DE", "posterior_predictive_check", "ppc_aggregate",
           "format_ppc", "ppc_dataset", "ppc_table", "ppc_warning"]

# Predicted cells per condition: as many as the most populous training condition, within these
# bounds. Each predicted mean carries Monte Carlo noise ~ sd / sqrt(cells): more cells than observed
# only lower it (a screen of 10 cells per condition is still predicted with 100). On weak real
# perturbations that noise matters: resampling 100 of a condition's own cells reproduced its
# top-20 shifts at r = 0.92 on average, 1,000 at 0.99 (Norman et al. 2019, 18 singles, 100 genes).
MIN_CELLS, MAX_CELLS = 100, 1000
N_TOP_DE = 20  # genes of each condition's top-DE set, as in ``lcd-bayes evaluate``
# The warning's threshold on the median over perturbed conditions of ``pearson_delta_top_de``: a
# fit that predicts no effect scores about 0 (a collapsed fit of a real screen had 0.13), good fits
# of simulated screens 0.9 or more; 0.5 lies halfway. Real screens hold even a perfect model below 1
# (100 to 260 cells per condition: the top-20 shifts of two halves of the observed cells agreed at a
# median 0.41 in Norman et al. 2019 and 0.13 in McFaline-Figueroa et al. 2023, 20 most variable
# genes of the perturbench development subsets), hence only conditions whose halves agree this well are judged.
MIN_TOP_DE_CORRELATION = 0.5
_PERTURBED_METRICS = ("pearson_delta_all", "pearson_delta_top_de", "shift_ratio_top_de", "split_half_top_de",
                      "rmse_mean", "variance_ratio", "zero_fraction_pred", "zero_fraction_obs")
_CONTROL_METRICS = ("rmse_mean", "variance_ratio", "zero_fraction_pred", "zero_fraction_obs")


def _scale(values: np.ndarray, is_counts: bool) -> np.ndarray:
    """Cells on the evaluation's scale: log1p of library-normalized counts, or the values as they are."""
    return normalize_log1p(values).astype(np.float64) if is_counts else np.asarray(values, dtype=np.float64)


def _group_moments(values: np.ndarray, groups: np.ndarray, n_groups: int):
    """Means, variances (ddof 1) and zero fractions of the cells (rows of ``values``) of each group."""
    n = np.bincount(groups, minlength=n_groups).astype(np.float64)[:, None]
    # Sums over each group's cells as one sparse product: (groups, cells) @ (cells, genes).
    one_hot = sp.csr_matrix((np.ones(groups.size), (groups, np.arange(groups.size))), shape=(n_groups, groups.size))
    mean = one_hot @ values / np.maximum(n, 1)
    variance = one_hot @ (values - mean[groups]) ** 2 / np.maximum(n - 1, 1)
    zero_fraction = (one_hot @ (values == 0).astype(np.float64)).sum(axis=1) / np.maximum(n[:, 0] * values.shape[1], 1)
    return mean, variance, zero_fraction


def _shift_agreement(shift_p: np.ndarray, shift_o: np.ndarray):
    """Per condition (rows): Pearson of the shifts over all genes and over the top-DE genes of
    ``shift_o``, the rms ratio over those genes, and the top-DE genes themselves."""
    top = np.stack([top_de_genes(row, N_TOP_DE) for row in shift_o])
    top_p, top_o = np.take_along_axis(shift_p, top, axis=1), np.take_along_axis(shift_o, top, axis=1)
    every = np.array([pearson_delta(p, o) for p, o in zip(shift_p, shift_o)])
    top_de = np.array([pearson_delta(p, o) for p, o in zip(top_p, top_o)])
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.sqrt(np.mean(top_p**2, axis=1) / np.mean(top_o**2, axis=1))
    return every, top_de, ratio, top


def _split_half_top_de(values: np.ndarray, condition: np.ndarray, n_conditions: int, seed: int) -> np.ndarray:
    """``pearson_delta_top_de`` of one random half of each condition's observed cells against the
    other half, each half's shift from its own half of the control cells."""
    order = np.lexsort((np.random.default_rng(seed).random(condition.size), condition))
    first = np.searchsorted(condition[order], np.arange(n_conditions))  # start of each condition in order
    half = np.empty(condition.size, dtype=int)
    half[order] = (np.arange(condition.size) - first[condition[order]]) % 2
    mean, _, _ = _group_moments(values, 2 * condition + half, 2 * n_conditions)
    shift_a, shift_b = mean[0::2] - mean[0], mean[1::2] - mean[1]
    return _shift_agreement(shift_b, shift_a)[1]


def posterior_predictive_check(tree, config, record: dict, data, *, n_cells: int | None = None,
                               seed: int = 0, warn: bool = True) -> pd.DataFrame:
    """Compare each training condition's predicted cells with its observed cells.

    Parameters
    ----------
    tree, config, record
        The fit's posterior DataTree, ``RunConfig`` and data record (what a run folder holds;
        ``lcd_bayes.io.run_folder.load_run``).
    data
        The training data: a ``lcd_bayes.io.screen.PerturbationData``, or anything with its
        ``counts`` (cells, genes; the values of a Gaussian run), ``condition`` (cells,) indices
        into ``conditions``, and ``conditions`` (``conditions[0]`` the control); its ``genes``,
        where given, must be the record's.
    n_cells
        Predicted cells per condition; default: as many as the most populous training condition
        has, at least ``MIN_CELLS`` and at most ``MAX_CELLS``.
    seed
        Seed of the predicted cells and of the observed cells' split halves.
    warn
        Issue an ``LcdBayesWarning`` when the fit does not reproduce its training conditions
        (``ppc_warning``).

    Returns
    -------
    pandas.DataFrame
        One row per training condition, the control first: ``condition, n_obs_cells,
        n_pred_cells, pearson_delta_all, pearson_delta_top_de, shift_ratio_top_de,
        split_half_top_de, rmse_mean, variance_ratio, zero_fraction_pred, zero_fraction_obs``
        (the shift columns are nan for the control, the zero fractions for a Gaussian run).
        ``table.attrs["aggregate"]`` holds ``ppc_aggregate``, ``table.attrs["mean_shifts"]`` the
        perturbed conditions' shifts (``lcd_bayes.analysis.evaluation.MeanShifts``).
    """
    conditions = [str(q) for q in data.conditions]
    genes = [str(g) for g in record["genes"]]
    if getattr(data, "genes", None) is not None and [str(g) for g in data.genes] != genes:
        raise ValueError("the data's genes are not the run's: pass the training data the run was fitted to")
    if conditions[0] != str(record["control"]):
        raise ValueError(f"the data's first condition is {conditions[0]!r}, not the run's control {record['control']!r}")
    condition = np.asarray(data.condition, dtype=int)
    n_obs = np.bincount(condition, minlength=len(conditions))
    n_pred = int(n_cells) if n_cells is not None else int(np.clip(n_obs.max(), MIN_CELLS, MAX_CELLS))
    is_counts = config.model.likelihood != "gaussian"

    pred = predict_posterior(tree, config, record, conditions, n_cells=n_pred, seed=seed, summaries=False)
    pred_condition = pd.Index(conditions).get_indexer(pred.obs[record["perturbation_key"]].astype(str))
    observed = _scale(np.asarray(data.counts), is_counts)
    mean_p, var_p, zeros_p = _group_moments(_scale(np.asarray(pred.X), is_counts), pred_condition, len(conditions))
    mean_o, var_o, zeros_o = _group_moments(observed, condition, len(conditions))

    shift_p, shift_o = mean_p - mean_p[0], mean_o - mean_o[0]  # each side from its own control
    every, top_de, shift_ratio, top = _shift_agreement(shift_p, shift_o)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(var_o > 0, var_p / var_o, np.nan)  # genes constant in the data say nothing
    defined = np.isfinite(ratio).any(axis=1)
    variance_ratio = np.full(len(conditions), np.nan)
    variance_ratio[defined] = np.nanmedian(ratio[defined], axis=1)

    table = pd.DataFrame({
        "condition": conditions, "n_obs_cells": n_obs, "n_pred_cells": n_pred,
        "pearson_delta_all": every, "pearson_delta_top_de": top_de, "shift_ratio_top_de": shift_ratio,
        "split_half_top_de": _split_half_top_de(observed, condition, len(conditions), seed),
        "rmse_mean": np.sqrt(np.mean((mean_p - mean_o) ** 2, axis=1)),
        "variance_ratio": variance_ratio,
        "zero_fraction_pred": zeros_p if is_counts else np.nan,
        "zero_fraction_obs": zeros_o if is_counts else np.nan,
    })
    # The control has no shift of its own: its row says how well the control itself is reproduced.
    table.loc[0, ["pearson_delta_all", "pearson_delta_top_de", "shift_ratio_top_de", "split_half_top_de"]] = np.nan
    table.attrs["aggregate"] = ppc_aggregate(table, conditions[0])
    table.attrs["mean_shifts"] = MeanShifts(genes, conditions[1:], shift_p[1:], shift_o[1:], top[1:])
    if warn and (message := ppc_warning(table, conditions[0])) is not None:
        warnings.warn(message, LcdBayesWarning, stacklevel=2)
    return table


def ppc_aggregate(table: pd.DataFrame, control: str) -> dict:
    """What a ``posterior_predictive_check`` table says in a few numbers: ``n_conditions`` (the
    perturbed ones), ``median`` (of each metric over them, nan ignored) and ``control`` (the
    control's row)."""
    perturbed = table[table["condition"].astype(str) != str(control)]
    own = table[table["condition"].astype(str) == str(control)]
    median = {m: float(np.nanmedian(perturbed[m])) if np.isfinite(perturbed[m].to_numpy(float)).any()
              else float("nan") for m in _PERTURBED_METRICS if m in table}
    return {"n_conditions": int(len(perturbed)), "median": median,
            "control": {m: float(own[m].iloc[0]) for m in _CONTROL_METRICS if len(own) and m in own}}


def ppc_warning(table: pd.DataFrame, control: str) -> str | None:
    """The warning's message when the fit does not reproduce its training conditions, else None.

    Judged on the conditions whose response the data reproduce themselves (``split_half_top_de``
    of at least ``MIN_TOP_DE_CORRELATION``): the median of their ``pearson_delta_top_de`` must
    reach it too. Conditions without a reproducible response are left out, since there a correct
    fit scores about as low as the halves do: in a CRISPRi screen where most guides target inert
    enhancers (Gasperini et al. 2019), the median over all conditions was 0.26 against the halves'
    0.29 for a fit that found eight of nine knockdowns, and 0.70 over the eight conditions with a
    reproducible response. With no such condition there is nothing to judge."""
    perturbed = table[table["condition"].astype(str) != str(control)]
    reproducible = perturbed[perturbed["split_half_top_de"] >= MIN_TOP_DE_CORRELATION]
    if reproducible.empty:
        return None
    fit = float(np.nanmedian(reproducible["pearson_delta_top_de"]))
    if not fit < MIN_TOP_DE_CORRELATION:
        return None
    return (
        f"the fit does not reproduce its own training conditions: over the {len(reproducible)} conditions whose "
        f"response two halves of the observed cells reproduce (top-{N_TOP_DE} mean-shift correlation >= "
        f"{MIN_TOP_DE_CORRELATION}), its predicted shifts correlate with the observed ones at a median {fit:.2f} "
        "(a fit that predicts no effect scores about 0). "
        "The posterior probably explains the perturbations' effects as cell-to-cell noise: do not trust its edges. "
        "Check the library sizes (give real ones with --size-factor-key when the matrix holds a gene panel), fit "
        "longer ([fit] steps), or try another [model] link; the per-condition table is ppc.csv (Run.ppc). README: "
        "'Posterior predictive check'."
    )


# ---------------------------------------------------------------------------------------------
# Stored with the posterior: the DataTree group ``ppc``
# ---------------------------------------------------------------------------------------------

GROUP = "ppc"  # the posterior DataTree's group that holds the check (posterior.nc)


def ppc_dataset(table: pd.DataFrame, control: str) -> xr.Dataset:
    """The check as the posterior DataTree's ``ppc`` group: each column of ``table`` over
    ``condition``, and the mean shifts ``predicted_shift``, ``observed_shift`` (condition, gene;
    the control's row 0)."""
    shifts = table.attrs["mean_shifts"]
    conditions = list(table["condition"].astype(str))
    zero = np.zeros((1, len(shifts.genes)))
    columns = {name: ("condition", table[name].to_numpy()) for name in table.columns if name != "condition"}
    return xr.Dataset(
        {**columns, "predicted_shift": (("condition", "gene"), np.concatenate([zero, shifts.predicted])),
         "observed_shift": (("condition", "gene"), np.concatenate([zero, shifts.observed]))},
        coords={"condition": conditions, "gene": list(shifts.genes)},
        attrs={"control": str(control), "n_top_de": N_TOP_DE, "min_top_de_correlation": MIN_TOP_DE_CORRELATION},
    )


def ppc_table(group: xr.Dataset | xr.DataTree) -> pd.DataFrame:
    """The table of ``posterior_predictive_check`` back from the ``ppc`` group, with its
    ``attrs["aggregate"]`` and ``attrs["mean_shifts"]``."""
    group = group.to_dataset() if isinstance(group, xr.DataTree) else group
    control = str(group.attrs["control"])
    columns = [name for name in group.data_vars if group[name].dims == ("condition",)]
    table = group[columns].to_dataframe().reset_index()
    table["condition"] = table["condition"].astype(str)
    perturbed = table["condition"] != control
    predicted, observed = group["predicted_shift"].values[perturbed], group["observed_shift"].values[perturbed]
    table.attrs["aggregate"] = ppc_aggregate(table, control)
    table.attrs["mean_shifts"] = MeanShifts([str(g) for g in group["gene"].values], list(table["condition"][perturbed]),
                                            predicted, observed, np.stack([top_de_genes(o, N_TOP_DE) for o in observed])
                                            if len(observed) else np.zeros((0, 0), dtype=int))
    return table


def format_ppc(table: pd.DataFrame) -> str:
    """One line of what the check says (the command's ``fit`` summary)."""
    aggregate = table.attrs.get("aggregate") or ppc_aggregate(table, str(table["condition"].iloc[0]))
    median = aggregate["median"]
    zeros = (f", zeros {median['zero_fraction_pred']:.0%} predicted / {median['zero_fraction_obs']:.0%} observed"
             if np.isfinite(median.get("zero_fraction_obs", np.nan)) else "")
    return (f"posterior predictive check: predicted vs observed top-{N_TOP_DE} mean shifts r = "
            f"{median.get('pearson_delta_top_de', np.nan):.2f} (median of {aggregate['n_conditions']} training "
            f"conditions; two halves of the data {median.get('split_half_top_de', np.nan):.2f}), variance ratio "
            f"{median.get('variance_ratio', np.nan):.2f}{zeros}")
