"""Baseline predictions of perturbed cells, in the same layout as the model's predictions.

Every baseline works on library-normalized log1p expression ``z`` (`expression.expression`) and
predicts a condition ``q`` as control cells moved by one mean shift:

    z_hat_iq = z_{c(i)} + delta_q,       c(i) a resampled training control cell

so the prediction keeps the control's cell-to-cell spread and only its mean moves. The baselines
differ in ``delta_q``:

* ``no_change``:  ``delta_q = 0``.
* ``additive``:   ``delta_q = sum_{p in q} (mean_p - mean_ctrl)``, from single-perturbation cells.
* ``linear``:     ``delta_q = sum_{p in q} beta_p``, ``beta`` fitted by ridge least squares to the
  observed shifts of every training condition (singles and combinations).

Shifts are added on the log scale without clipping: a predicted value may fall slightly below 0
where negative shifts add up, so that each prediction's mean is exactly control mean + delta_q.
"""
from __future__ import annotations

import anndata
import numpy as np
import scipy.sparse as sp

from ..config import BASELINES
from ..diagnostics import DataError
from ..io.expression import canonical_label, expression, label_parts, prediction_anndata
from ..io.screen import few
from .splits import cell_conditions



def _membership(conditions, perturbations, control: str, sep: str) -> np.ndarray:
    """0/1 design matrix: row ``c``, column ``p`` is 1 when perturbation ``p`` is part of ``c``."""
    column = {p: j for j, p in enumerate(perturbations)}
    design = np.zeros((len(conditions), len(perturbations)))
    for row, condition in enumerate(conditions):
        design[row, [column[p] for p in label_parts(condition, control, sep)]] = 1.0
    return design


def _ridge_effects(design: np.ndarray, shifts: np.ndarray, ridge: float) -> np.ndarray:
    """Per-perturbation effects ``beta`` minimizing ``||shifts - design beta||^2 + lam ||beta||^2``.

    ``lam = ridge * mean_p (number of training conditions containing p)``: the penalty is relative
    to the data each effect rests on, so with only singles (design = I) every effect is the
    observed shift shrunk by ``1 / (1 + ridge)``, however many conditions there are. Solved as
    the augmented least-squares problem, which stays defined at ``ridge=0`` (minimum norm).
    """
    n_perturbations = design.shape[1]
    lam = ridge * float(np.mean(np.sum(design, axis=0)))
    augmented = np.vstack([design, np.sqrt(lam) * np.eye(n_perturbations)])
    targets = np.vstack([shifts, np.zeros((n_perturbations, shifts.shape[1]))])
    beta, *_ = np.linalg.lstsq(augmented, targets, rcond=None)
    return beta


def _control_draws(n_control: int, n_conditions: int, n_cells: int, rng) -> np.ndarray:
    """Indices of the control cells behind each predicted cell, shape (conditions, n_cells).

    Balanced resampling: each control cell is used ``n_cells // n_control`` times, and a random
    subset without replacement fills the rest. Plain sampling with replacement would add noise to
    the predicted means; with ``n_cells = n_control`` this uses every control cell exactly once.
    """
    copies, rest = divmod(n_cells, n_control)
    every = np.tile(np.arange(n_control), (n_conditions, copies))
    subset = rng.permuted(np.tile(np.arange(n_control), (n_conditions, 1)), axis=1)[:, :rest]
    return np.concatenate([every, subset], axis=1)


def predict_baseline(train: anndata.AnnData, conditions, *, method: str, n_cells: int | None = None,
                     genes=None, perturbation_key: str = "condition", control: str = "ctrl",
                     sep: str = "+", layer: str | None = None, total_counts_key: str | None = None,
                     ridge: float = 1e-2, seed: int = 0) -> anndata.AnnData:
    """Predict cells of ``conditions`` from ``train`` with a baseline.

    Parameters
    ----------
    train : AnnData
        Training cells (counts, or log1p-normalized with `total_counts_key`); must hold control
        cells.
    conditions : iterable of str
        Conditions to predict; canonicalized (``"B+A"`` -> ``"A+B"``, ``"A+ctrl"`` -> ``"A"``) and
        deduplicated. The control may be requested (its prediction is control cells).
    method : {"no_change", "additive", "linear"}
        See the module docstring.
    n_cells : int, optional
        Predicted cells per condition; default the number of training control cells.
    genes : sequence of str, optional
        Gene panel of the prediction; default all of ``train.var_names``.
    perturbation_key, control, sep : str
        Label column of ``train.obs``, control label and combination separator.
    layer, total_counts_key : str, optional
        Passed to `expression.expression`.
    ridge : float
        Ridge penalty of ``linear``, relative to how many conditions each perturbation appears in
        (``ridge=1e-2`` shrinks an effect seen once by 1%).
    seed : int
        Seed of the control-cell resampling.

    Returns
    -------
    AnnData
        ``len(conditions) * n_cells`` cells on the log1p-normalized scale, laid out by
        `expression.prediction_anndata` with ``method`` as the method name.

    Raises
    ------
    ValueError
        Unknown `method`, or invalid `n_cells` / `ridge`.
    DataError
        No condition requested, no training control cells, or a requested perturbation the method
        cannot predict (``additive``: no single-perturbation cells; ``linear``: in no training
        condition).
    """
    if method not in BASELINES:
        raise ValueError(f"unknown baseline method {method!r}; choose one of {BASELINES}")
    if not np.isfinite(ridge) or ridge < 0:
        raise ValueError(f"ridge must be a finite number >= 0, not {ridge!r}")
    if n_cells is not None and (isinstance(n_cells, bool) or not isinstance(n_cells, (int, np.integer))
                                or n_cells < 1):
        raise ValueError(f"n_cells must be a positive integer, not {n_cells!r}")
    if isinstance(conditions, str):
        conditions = [conditions]
    # Each condition keeps the label it was asked by (the first spelling of it), as in
    # lcd_bayes.analysis.predict, so that the user's own tables join on it.
    first_spelling = {}
    for label in conditions:
        first_spelling.setdefault(canonical_label(label, control, sep), str(label))
    requested = list(first_spelling.values())
    if not requested:
        raise DataError("no conditions to predict; pass at least one condition label.")

    genes = [str(g) for g in (train.var_names if genes is None else genes)]
    z = expression(train, genes, layer=layer, total_counts_key=total_counts_key, where="train").astype(np.float64)
    condition = cell_conditions(train, perturbation_key, control, sep, where="train")
    observed, cell_index = np.unique(condition, return_inverse=True)
    observed = [str(c) for c in observed]
    if control not in observed:
        raise DataError(
            f"train has no control cells labelled {control!r} in obs[{perturbation_key!r}] (conditions: "
            f"{few(observed)}); pass control= naming the unperturbed cells' label."
        )

    # Condition means as one sparse averaging matrix times z; shifts are relative to the control.
    sizes = np.bincount(cell_index, minlength=len(observed))
    averaging = sp.csr_matrix((1.0 / sizes[cell_index], (cell_index, np.arange(z.shape[0]))),
                              shape=(len(observed), z.shape[0]))
    means = averaging @ z
    shift = dict(zip(observed, means - means[observed.index(control)]))
    perturbed = [c for c in observed if c != control]

    wanted = sorted({p for q in requested for p in label_parts(q, control, sep)})
    if method == "no_change" or not wanted:
        perturbations, effects = wanted, np.zeros((len(wanted), len(genes)))
    elif method == "additive":
        lacking = [p for p in wanted if p not in shift]
        if lacking:
            raise DataError(
                f"additive needs single-perturbation cells of every part; train has none for "
                f"{few(lacking)}. Use method='linear' to borrow from combinations, or drop those conditions."
            )
        perturbations, effects = wanted, np.stack([shift[p] for p in wanted])
    else:
        perturbations = sorted({p for c in perturbed for p in label_parts(c, control, sep)})
        unseen = sorted(set(wanted) - set(perturbations))
        if unseen:
            raise DataError(
                f"linear cannot predict perturbations absent from every training condition: {few(unseen)}."
            )
        design = _membership(perturbed, perturbations, control, sep)
        effects = _ridge_effects(design, np.stack([shift[c] for c in perturbed]), ridge)

    # delta_q = sum_{p in q} effect_p, as (requested x perturbations) @ (perturbations x genes).
    delta = _membership(requested, perturbations, control, sep) @ effects if perturbations else (
        np.zeros((len(requested), len(genes))))

    control_cells = z[cell_index == observed.index(control)]
    n_cells = control_cells.shape[0] if n_cells is None else n_cells
    draws = _control_draws(control_cells.shape[0], len(requested), int(n_cells), np.random.default_rng(seed))
    values = (control_cells[draws] + delta[:, None, :]).reshape(-1, len(genes))
    labels = np.repeat(requested, n_cells)
    return prediction_anndata(values, labels, genes, space="log1p_normalized", method=method,
                              perturbation_key=perturbation_key, control=control, sep=sep,
                              uns={"n_cells": int(n_cells), "seed": int(seed), "ridge": float(ridge)})
