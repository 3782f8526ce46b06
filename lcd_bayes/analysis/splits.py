"""Train/test splits for predicting combinations of perturbations.

A combination ``A+B`` can be predicted from the singles ``A`` and ``B`` only when both were seen.
Every split therefore trains on the control and all single perturbations, and tests on held-out
combinations whose singles all occur in the data (the *eligible* combinations). The remaining
combinations, those of other folds and those with an unseen single, may join the training set in
a chosen fraction, which measures how much seeing other combinations helps.

Labels are compared canonically (`expression.canonical_label`): ``"B+A"`` is ``"A+B"``, and the
GEARS-style ``"A+ctrl"`` is the single ``"A"``.
"""
from __future__ import annotations

from typing import NamedTuple

import anndata
import numpy as np
import pandas as pd

from ..diagnostics import DataError
from ..io.expression import canonical_label, label_parts
from ..io.screen import few


class Split(NamedTuple):
    """One train/test split of conditions (canonical labels).

    Attributes
    ----------
    train : tuple of str
        The control first, then every single perturbation, then the training combinations.
    test : tuple of str
        The held-out combinations, sorted.
    fold : int
        Index of this split among the folds of `combination_splits`.
    """

    train: tuple[str, ...]
    test: tuple[str, ...]
    fold: int = 0


def _canonical_conditions(labels, control: str, sep: str) -> list[str]:
    """Sorted distinct canonical conditions of per-cell or per-condition labels."""
    if isinstance(labels, str):
        labels = [labels]
    values = labels.to_numpy() if hasattr(labels, "to_numpy") else np.asarray(list(labels), dtype=object)
    values = np.asarray(values, dtype=object).ravel()
    missing = pd.isna(values)
    if missing.any():
        raise DataError(f"labels include {int(missing.sum())} missing values; every cell needs a label.")
    # Canonicalize the distinct strings only: per-cell label arrays are long, their vocabulary short.
    distinct = np.unique(values.astype(str))
    blank = [label for label in distinct if not label.strip()]
    if blank:
        raise DataError(f"labels include blank values ({few(blank)}); label unperturbed cells {control!r}.")
    return sorted({canonical_label(label, control, sep) for label in distinct})


def cell_conditions(adata: anndata.AnnData, perturbation_key: str, control: str, sep: str,
                    where: str = "adata") -> np.ndarray:
    """Canonical condition label of every cell of ``adata`` (object array, shape (cells,))."""
    if perturbation_key not in adata.obs.columns:
        raise DataError(
            f"perturbation_key {perturbation_key!r} is not a column of {where}.obs (columns: "
            f"{few(adata.obs.columns, 20)}); pass the column that holds each cell's perturbation label."
        )
    column = adata.obs[perturbation_key]
    if column.isna().any():
        raise DataError(
            f"{where}.obs[{perturbation_key!r}] has {int(column.isna().sum())} cells with a missing "
            f"label; label unperturbed cells {control!r} or drop them."
        )
    distinct, inverse = np.unique(column.astype(str).to_numpy(), return_inverse=True)
    canonical = np.array([canonical_label(label, control, sep) for label in distinct], dtype=object)
    return canonical[inverse]


def combination_splits(labels, *, control: str = "ctrl", sep: str = "+", n_folds: int = 1,
                       train_double_fraction: float = 1.0, seed: int = 0) -> list[Split]:
    """Splits that test held-out combinations whose single perturbations were all seen.

    Parameters
    ----------
    labels : iterable of str
        Per-cell or per-condition labels (e.g. ``adata.obs["condition"]``); duplicates and
        equivalent spellings (``"B+A"``, ``"A+ctrl"``) collapse to one canonical condition.
    control : str
        Label of unperturbed cells; it must occur.
    sep : str
        Separator of the parts of a combination.
    n_folds : int
        The eligible combinations are shuffled by `seed` and cut into `n_folds` near-equal folds;
        fold ``k`` tests its combinations. ``n_folds=1`` tests every eligible combination at once.
    train_double_fraction : float in [0, 1]
        Fraction of the other combinations (eligible ones of other folds, and those with an
        unseen single) added to training: ``round(train_double_fraction * n)`` of the ``n``
        candidates (Python's ``round``, halves to even), drawn by `seed`. With one seed, a larger
        fraction trains on a superset of a smaller fraction's combinations.
    seed : int
        Seed of `numpy.random.default_rng` for the fold assignment and the training combinations.

    Returns
    -------
    list of Split
        One per fold, in fold order.

    Raises
    ------
    DataError
        No control, no eligible combination, or more folds than eligible combinations.
    ValueError
        `n_folds` < 1 or `train_double_fraction` outside [0, 1].
    """
    if isinstance(n_folds, bool) or not isinstance(n_folds, (int, np.integer)) or n_folds < 1:
        raise ValueError(f"n_folds must be a positive integer, not {n_folds!r}")
    fraction = float(train_double_fraction)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"train_double_fraction must lie in [0, 1], not {train_double_fraction!r}")

    conditions = _canonical_conditions(labels, control, sep)
    if control not in conditions:
        raise DataError(
            f"no control condition {control!r} among the labels (conditions: {few(conditions)}); "
            "pass control= naming the unperturbed cells' label."
        )
    parts = {condition: label_parts(condition, control, sep) for condition in conditions}
    singles = [c for c in conditions if len(parts[c]) == 1]
    combos = [c for c in conditions if len(parts[c]) >= 2]
    seen = set(singles)
    eligible = [c for c in combos if seen.issuperset(parts[c])]
    if not eligible:
        if not combos:
            raise DataError(
                f"the labels hold no combination (a label joining perturbations with {sep!r}); "
                f"conditions: {few(conditions)}. Check sep=."
            )
        unseen = sorted({p for c in combos for p in parts[c]} - seen)
        raise DataError(
            f"no combination has all its single perturbations in the data, so none can be tested. "
            f"Combinations: {few(combos)}; singles without cells of their own: {few(unseen)}."
        )
    if n_folds > len(eligible):
        raise DataError(
            f"n_folds={n_folds} exceeds the {len(eligible)} combinations whose singles are all present "
            f"({few(eligible)}); use n_folds <= {len(eligible)}."
        )

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(eligible))
    splits = []
    for fold, members in enumerate(np.array_split(order, n_folds)):
        test = sorted(eligible[i] for i in members)
        held_out = set(test)
        candidates = [c for c in combos if c not in held_out]
        # Permute all candidates then take a prefix, so the draw does not depend on the fraction.
        chosen = rng.permutation(len(candidates))[: round(fraction * len(candidates))]
        train_combos = sorted(candidates[i] for i in chosen)
        splits.append(Split(train=(control, *singles, *train_combos), test=tuple(test), fold=fold))
    return splits


def split_anndata(adata: anndata.AnnData, split: Split, *, perturbation_key: str = "condition",
                  control: str = "ctrl", sep: str = "+") -> tuple[anndata.AnnData, anndata.AnnData]:
    """Cells of a split's training and test conditions.

    Returns
    -------
    train : AnnData
        Copy of the cells of ``split.train``.
    test : AnnData
        Copy of the cells of ``split.test`` and of the control: evaluation measures predicted
        effects against a control reference, so the control cells appear on both sides.

    Raises
    ------
    DataError
        A condition of the split has no cells in ``adata`` (the split came from other data, or
        `control` / `sep` differ from those that made it).
    """
    condition = cell_conditions(adata, perturbation_key, control, sep)
    train_labels = {canonical_label(c, control, sep) for c in split.train}
    test_labels = {canonical_label(c, control, sep) for c in split.test}
    absent = sorted((train_labels | test_labels | {control}) - set(condition))
    if absent:
        raise DataError(
            f"{len(absent)} conditions of the split have no cells in adata (e.g. {few(absent)}); "
            "make the split from the same data with the same control= and sep=."
        )
    train = np.isin(condition, list(train_labels))
    test = np.isin(condition, list(test_labels | {control}))
    return adata[train].copy(), adata[test].copy()
