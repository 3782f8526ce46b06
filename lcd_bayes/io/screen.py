"""Data layer: AnnData in, validated numpy arrays out.

Every problem with the input is raised as a :class:`DataError` whose message names the
problem and the fix, before any model computation starts. The loader never guesses about
the scale of the data: counts must be whole numbers, log-normalized data must be converted
explicitly (``total_counts_key=``) and continuous values must be asked for (``continuous=True``).
"""
from __future__ import annotations

import difflib
import json
import os
import warnings
from collections import Counter
from typing import Any, NamedTuple

import numpy as np
import scipy.sparse as sp

from ..config import DEFAULT_GENE_RANKING, GENE_RANKINGS
from ..diagnostics import DataError, LcdBayesWarning
from .genes import select_genes

__all__ = [
    "DataError",
    "PerturbationData",
    "label_parts",
    "load_perturbation_data",
    "read_targets",
    "summarize",
]

# Values of log1p(library-normalized) data stay below this: log1p(1e6) ~ 13.8 even for CPM.
_LOGNORM_MAX = 20.0
# Rows (dense) or stored entries handled per pass, so validation never copies a large matrix.
_BLOCK_ENTRIES = 10_000_000
# A count is implausible, and refused, when it is more than this many times both the rest of its
# cell's library (the cell's total over the other genes of the matrix, + 1) and its gene's 99th
# percentile over the other cells (+ 1). Either alone happens in real screens: in Norman et al.
# 2019 (500 genes, counts from log1p(X) and the library sizes) one cell held 189 counts of a gene
# against 13 for the rest of its panel (14x), and in Gasperini et al. 2019 (366 genes) a count
# reached 68x its gene's 99th percentile; but no count of either screen, nor of McFaline-Figueroa
# et al. 2023, exceeded both by more than 2.6x. A corrupted value (1e12 among counts of tens) exceeds
# both by orders of magnitude, and alone it would set its cell's size factor and move the effects.
IMPLAUSIBLE_RATIO = 100.0
# Labels that usually mean "unperturbed"; used only to suggest a `control=` value.
_CONTROL_NAMES = ("control", "ctrl", "non-targeting", "nontargeting", "non_targeting", "nt", "safe-targeting")
# obs columns that often hold library sizes; used only to suggest a `total_counts_key=` value.
_TOTAL_COUNTS_NAMES = ("total_counts", "n_counts", "ncounts", "nCount_RNA", "nUMI", "umi_count")


class PerturbationData(NamedTuple):
    """Validated arrays of a perturbation screen, ready for the model.

    Attributes
    ----------
    counts : np.ndarray, shape (cells, genes), float32
        Whole-number counts, or the values as given when ``is_counts`` is False.
    size_factor : np.ndarray, shape (cells,), float32
        Library size divided by the median library size; all 1.0 when not counts.
    condition : np.ndarray, shape (cells,), int32
        Index of each cell's condition into ``conditions``.
    conditions : tuple of str, length conditions
        Canonical condition labels (parts sorted, joined by ``sep``); ``conditions[0]`` is
        always the control label.
    perturbations : tuple of str, length perturbations
        Sorted single perturbation labels seen in the non-control conditions.
    design : np.ndarray, shape (conditions, perturbations), float32
        1 where a perturbation label is part of a condition; the control row is all 0.
    targets : np.ndarray, shape (perturbations, genes), float32
        1 where a gene is an on-target gene of a perturbation label.
    genes : tuple of str, length genes
        Modelled genes, in the column order of ``counts``.
    is_counts : bool
        True for counts (negative-binomial likelihood), False for continuous values.
    perturbation_key, control, sep : str
        The obs column, control label and combination separator the data were read with.
    library_genes : int or None
        How many genes' totals made ``size_factor`` (every gene of the source matrix); None when
        the library sizes came from an obs column (``size_factor_key``, ``total_counts_key``) or
        the data are not counts.
    batch : np.ndarray, shape (cells,), int32, or None
        Index of each cell's batch into ``batches``; None when no ``batch_key`` was given.
    batches : tuple of str or None
        Batch names (sorted) from ``obs[batch_key]``.
    batch_key : str or None
        The obs column the batches were read from.
    """

    counts: np.ndarray
    size_factor: np.ndarray
    condition: np.ndarray
    conditions: tuple[str, ...]
    perturbations: tuple[str, ...]
    design: np.ndarray
    targets: np.ndarray
    genes: tuple[str, ...]
    is_counts: bool
    perturbation_key: str
    control: str
    sep: str
    library_genes: int | None = None
    batch: np.ndarray | None = None
    batches: tuple[str, ...] | None = None
    batch_key: str | None = None

    @property
    def n_batches(self) -> int:
        """1 without batches: a screen of one batch has no batch effects to fit."""
        return 1 if self.batches is None else len(self.batches)

    @property
    def n_cells(self) -> int:
        return int(self.counts.shape[0])

    @property
    def n_genes(self) -> int:
        return int(self.counts.shape[1])

    @property
    def n_conditions(self) -> int:
        return len(self.conditions)

    @property
    def n_perturbations(self) -> int:
        return len(self.perturbations)


# --------------------------------------------------------------------------- small helpers


def few(names, limit: int = 8) -> str:
    """Quote up to `limit` names, saying how many were left out."""
    names = [str(n) for n in names]
    shown = ", ".join(repr(n) for n in names[:limit])
    if len(names) > limit:
        shown += f", ... ({len(names) - limit} more)"
    return shown


def has_empty_part(label: str, sep: str) -> bool:
    """Whether a label split on ``sep`` has an empty part ("A++B", "A+", "+A"): a malformed label,
    refused by the loader and by prediction alike."""
    return any(not piece.strip() for piece in str(label).split(sep))


def label_parts(label: str, control: str, sep: str) -> tuple[str, ...]:
    """The single perturbations of a label, sorted; ``()`` for the control ("A+ctrl" is "A")."""
    return tuple(sorted({part.strip() for part in str(label).split(sep) if part.strip() and part.strip() != control}))


def _close(name: str, candidates, n: int = 3) -> str:
    """' (did you mean ...?)' with the closest candidates, or ''."""
    candidates = list(candidates)
    # Case slips (Mt-Co1 vs MT-CO1) score low in difflib, so look for them first.
    matches = [c for c in candidates if c.lower() == name.lower()][:n]
    matches = matches or difflib.get_close_matches(name, candidates, n=n)
    return f" (did you mean {few(matches)}?)" if matches else ""


def _suggestions(names, candidates, describe=repr, limit: int = 5) -> str:
    """One line per name that has a close candidate; names without one add nothing."""
    lines = []
    # difflib is slow against tens of thousands of genes: look at the first few names only.
    for name in list(names)[: 2 * limit]:
        hint = _close(name, candidates)
        if hint:
            lines.append(f"\n  {describe(name)}{hint}")
        if len(lines) == limit:
            break
    return "".join(lines)


def as_matrix(x: Any):
    """Return `x` as a scipy CSR matrix or a numpy array, loading backed data into memory."""
    if sp.issparse(x):
        csr = sp.csr_matrix(x)
        if not csr.has_canonical_format:
            # Duplicate entries would break the entry-wise checks; merge them on a copy.
            csr = csr.copy()
            csr.sum_duplicates()
        return csr
    if hasattr(x, "to_memory"):  # anndata backed sparse dataset
        return as_matrix(x.to_memory())
    return np.asarray(x)


def _row_of_entry(csr: sp.csr_matrix) -> np.ndarray:
    """Row index of every stored entry of a CSR matrix, shape (nnz,)."""
    return np.repeat(np.arange(csr.shape[0]), np.diff(csr.indptr))


def _value_blocks(matrix):
    """Yield 1-D blocks of the stored values (all values when dense, non-zeros when sparse)."""
    if sp.issparse(matrix):
        for start in range(0, matrix.data.size, _BLOCK_ENTRIES):
            yield matrix.data[start : start + _BLOCK_ENTRIES]
        return
    rows = max(1, _BLOCK_ENTRIES // max(1, matrix.shape[1]))
    for start in range(0, matrix.shape[0], rows):
        yield np.asarray(matrix[start : start + rows]).ravel()


class _Stats(NamedTuple):
    n_nonfinite: int
    n_negative: int
    n_nonzero: int
    n_fractional: int  # finite non-zero values that are not whole numbers
    example_fractional: float | None
    max: float  # over finite values; 0.0 when there are none
    min: float


def _value_stats(matrix) -> _Stats:
    """One pass over a matrix collecting what the validation messages need."""
    n_nonfinite = n_negative = n_nonzero = n_fractional = 0
    example = None
    vmax, vmin = 0.0, 0.0
    is_integer_dtype = np.issubdtype(matrix.dtype, np.integer) or matrix.dtype == bool
    for block in _value_blocks(matrix):
        if is_integer_dtype:
            finite = block
        else:
            ok = np.isfinite(block)
            n_nonfinite += int(block.size - ok.sum())
            finite = block[ok]
        if finite.size == 0:
            continue
        vmax = max(vmax, float(finite.max()))
        vmin = min(vmin, float(finite.min()))
        n_negative += int((finite < 0).sum())
        nonzero = finite[finite != 0]
        n_nonzero += nonzero.size
        if not is_integer_dtype:
            fractional = nonzero[nonzero != np.round(nonzero)]
            n_fractional += fractional.size
            if example is None and fractional.size:
                example = float(fractional[0])
    return _Stats(n_nonfinite, n_negative, n_nonzero, n_fractional, example, vmax, vmin)


def _row_totals(matrix) -> np.ndarray:
    """Sum over all columns, shape (rows,), float64."""
    return np.asarray(matrix.sum(axis=1, dtype=np.float64)).ravel()


def _column_sums(matrix) -> np.ndarray:
    """Sum over all rows, shape (columns,), float64."""
    return np.asarray(matrix.sum(axis=0, dtype=np.float64)).ravel()


# --------------------------------------------------------------------------- targets file


def _check_target_mapping(mapping: Any, where: str) -> dict[str, list[str]]:
    """Validate a {label: [gene, ...]} mapping; a string value becomes a one-element list."""
    if not isinstance(mapping, dict):
        raise DataError(
            f"{where} must be a mapping from perturbation label to target genes, e.g. "
            f'{{"KLF1": ["KLF1"], "sgMYC_1": ["MYC"]}}; got {type(mapping).__name__}.'
        )
    clean: dict[str, list[str]] = {}
    for label, genes in mapping.items():
        if isinstance(genes, str):
            genes = [genes]
        if not isinstance(genes, (list, tuple)) or not all(isinstance(g, str) for g in genes):
            raise DataError(
                f"{where}: the targets of {label!r} must be a gene name or a list of gene names, "
                f"got {genes!r}. Write it as {json.dumps({str(label): ['GENE']})}."
            )
        clean[str(label)] = list(genes)
    return clean


def read_targets(path: str | os.PathLike) -> dict[str, list[str]]:
    """Read a JSON file mapping perturbation labels to their on-target genes.

    Parameters
    ----------
    path : str or os.PathLike
        JSON file holding an object ``{"label": ["GENE1", ...], ...}``; a string value
        is read as a one-element list.

    Returns
    -------
    dict of str to list of str
        Target genes of each label named in the file.

    Raises
    ------
    DataError
        When the file is missing, is not valid JSON, or does not have that shape.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            mapping = json.load(handle)
    except FileNotFoundError:
        raise DataError(f"targets file {str(path)!r} does not exist; check the path.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(
            f"targets file {str(path)!r} is not valid JSON ({error}). It must hold an object like "
            f'{{"KLF1": ["KLF1"], "sgMYC_1": ["MYC"]}}.'
        ) from None
    return _check_target_mapping(mapping, f"targets file {str(path)!r}")


# --------------------------------------------------------------------------- loader steps


def _check_arguments(
    adata, perturbation_key, control, sep, genes, n_top_genes, gene_ranking, continuous, total_counts_key,
    target_sum, min_cells_per_condition, min_genes,
) -> None:
    """Reject bad argument combinations before touching the data."""
    if not all(hasattr(adata, name) for name in ("obs", "var_names", "X", "layers")):
        raise DataError(
            f"expected an AnnData object, got {type(adata).__name__}; read the file with "
            "anndata.read_h5ad(path) first."
        )
    for name, value in (("perturbation_key", perturbation_key), ("control", control), ("sep", sep)):
        if not isinstance(value, str) or not value:
            raise DataError(f"{name} must be a non-empty string, got {value!r}.")
    if continuous and total_counts_key is not None:
        raise DataError(
            "continuous=True uses the values as they are, so total_counts_key= (which converts "
            "log-normalized data to counts) does not apply; pass one or the other."
        )
    if genes is not None and n_top_genes is not None:
        raise DataError("pass either genes= (an explicit gene list) or n_top_genes=, not both.")
    if isinstance(genes, str):
        raise DataError(f"genes= must be a list of gene names, got the string {genes!r}; wrap it in a list.")
    if n_top_genes is not None and (
        isinstance(n_top_genes, bool) or not isinstance(n_top_genes, (int, np.integer)) or n_top_genes < 1
    ):
        raise DataError(f"n_top_genes must be a positive integer or None, got {n_top_genes!r}.")
    if gene_ranking not in GENE_RANKINGS:
        raise DataError(f"gene_ranking must be one of {GENE_RANKINGS}, got {gene_ranking!r}.")
    if gene_ranking == "dispersion" and continuous:
        raise DataError(
            'gene_ranking="dispersion" ranks counts (variance over mean of normalized counts); with '
            'continuous values rank by "variance" or "response".'
        )
    if not np.isfinite(target_sum) or target_sum <= 0:
        raise DataError(f"target_sum must be a positive number, got {target_sum!r}.")
    if min_cells_per_condition < 1 or min_genes < 1:
        raise DataError("min_cells_per_condition and min_genes must be at least 1.")


def _layer_names(adata) -> list[str]:
    """Names of the layers; anndata >= 0.12 also lists X under the key None, which is left out."""
    return [str(name) for name in adata.layers.keys() if name is not None]


def _select_source(adata, layer, continuous, total_counts_key) -> tuple[Any, str]:
    """Pick the matrix to read and describe it for messages ('layer "counts"', 'X')."""
    layers = _layer_names(adata)
    if layer is not None:
        if layer not in layers:
            available = few(layers) if layers else "none"
            raise DataError(
                f"layer {layer!r} is not in adata.layers (available layers: {available}). "
                "Pass layer= (CLI --layer) naming one of them, or leave it out to use adata.X."
            )
        return adata.layers[layer], f"layer {layer!r}"
    # A "counts" layer is the scanpy/scvi-tools convention for raw counts kept next to a
    # normalized X; it is the wrong matrix for continuous values or an explicit conversion of X.
    if not continuous and total_counts_key is None and "counts" in adata.layers:
        return adata.layers["counts"], "layer 'counts'"
    return adata.X, "adata.X"


# How to model values as they are, where the caller can (fit); evaluate and the baselines compare
# counts or log1p-normalized values only, so their messages leave this option out.
CONTINUOUS_OPTION = "continuous=True (CLI --likelihood gaussian)"


def _lognorm_hint(adata, continuous_option: str | None) -> str:
    """The ways out when counts look log-normalized, with the user's own names."""
    layers = _layer_names(adata)
    layer_hint = (
        f"pass layer= (CLI --layer) naming a layer that holds raw counts (available layers: {few(layers)})"
        if layers
        else "pass layer= (CLI --layer) naming a layer that holds raw counts (this AnnData has no layers)"
    )
    found = [c for c in adata.obs.columns if str(c) in _TOTAL_COUNTS_NAMES]
    key_hint = f"total_counts_key={str(found[0])!r}" if found else "total_counts_key=<obs column>"
    return (
        f"Either {layer_hint}; or convert explicitly with {key_hint} (CLI --total-counts-key), "
        "naming the obs column of total counts per cell before normalization, which computes "
        "round(expm1(X) * total_counts / target_sum)"
        + (f"; or model the values as they are with {continuous_option}." if continuous_option else ".")
    )


def _implausible_counts(matrix) -> list[tuple[int, int, float, float, float]]:
    """``(cell, gene, count, rest of the cell's library, gene's 99th percentile elsewhere)`` of every
    count above ``IMPLAUSIBLE_RATIO`` times both (see there), largest first."""
    totals = _row_totals(matrix)
    if sp.issparse(matrix):
        rows = _row_of_entry(matrix)
        values = matrix.data.astype(np.float64)
        hit = values > IMPLAUSIBLE_RATIO * (totals[rows] - values + 1)
        cells, genes, counts = rows[hit], matrix.indices[hit], values[hit]
    else:
        found = []
        step = max(1, _BLOCK_ENTRIES // max(1, matrix.shape[1]))
        for start in range(0, matrix.shape[0], step):
            block = np.asarray(matrix[start : start + step], dtype=np.float64)
            r, c = np.nonzero(block > IMPLAUSIBLE_RATIO * (totals[start : start + step, None] - block + 1))
            found.append((r + start, c, block[r, c]))
        cells, genes, counts = (np.concatenate(parts) for parts in zip(*found)) if found else ([], [], [])
    implausible = []
    for gene in np.unique(genes):  # few: a count above 99% of its cell's library is rare in real data
        column = matrix[:, [gene]]
        column = np.asarray(column.toarray() if sp.issparse(column) else column, dtype=np.float64).ravel()
        others = np.delete(column, cells[genes == gene])
        percentile = float(np.quantile(others, 0.99)) if others.size else 0.0
        for cell, count in zip(cells[genes == gene], counts[genes == gene]):
            if count > IMPLAUSIBLE_RATIO * (percentile + 1):
                implausible.append((int(cell), int(gene), float(count), float(totals[cell] - count), percentile))
    return sorted(implausible, key=lambda hit: -hit[2])


def validate_counts(adata, matrix, where: str, continuous_option: str | None = CONTINUOUS_OPTION,
                    plausible: bool = True) -> None:
    """Counts must be finite, non-negative whole numbers and, with ``plausible``, none implausibly
    large (``IMPLAUSIBLE_RATIO``); say which rule failed and why. ``continuous_option`` names how
    the caller models values that are not counts, or None where it cannot."""
    stats = _value_stats(matrix)
    if stats.n_nonfinite:
        raise DataError(
            f"{where} has {stats.n_nonfinite} NaN or infinite values; counts must be finite. "
            "Fix the matrix (e.g. replace NaN by 0 where a gene was not measured) or pass layer= "
            "(CLI --layer) naming a clean counts layer."
        )
    if stats.n_negative:
        raise DataError(
            f"{where} has {stats.n_negative} negative values (minimum {stats.min:.4g}); counts "
            "cannot be negative. "
            + (f"If the data are scaled or centred, pass {continuous_option}; if" if continuous_option
               else "Scaled or centred values cannot be compared here; if")
            + " a layer holds raw counts, pass layer= (CLI --layer)."
        )
    if stats.n_fractional:
        looks_lognorm = stats.max <= _LOGNORM_MAX and (
            stats.n_fractional >= 0.5 * stats.n_nonzero or "log1p" in adata.uns
        )
        if looks_lognorm:
            raise DataError(
                f"{where} does not hold counts: the data look log-normalized ({stats.n_fractional} "
                f"of {stats.n_nonzero} non-zero values are not whole numbers, e.g. "
                f"{stats.example_fractional:.4g}, and the maximum is {stats.max:.3g}). "
                + _lognorm_hint(adata, continuous_option)
            )
        raise DataError(
            f"{where} has {stats.n_fractional} non-integer values (e.g. {stats.example_fractional:.4g}); "
            "counts must be whole numbers. Pass layer= (CLI --layer) naming a layer of raw counts"
            + (f", or {continuous_option} to model the values as they are." if continuous_option else ".")
        )
    implausible = _implausible_counts(matrix) if plausible else []
    if implausible:
        cell, gene, count, rest, percentile = implausible[0]
        cells = list(dict.fromkeys(str(adata.obs_names[hit[0]]) for hit in implausible))
        which = ("an implausible count" if len(implausible) == 1
                 else f"{len(implausible)} implausible counts, the largest")
        raise DataError(
            f"{where} has {which} {count:.6g} of gene {str(adata.var_names[gene])!r} in cell "
            f"{str(adata.obs_names[cell])!r}: more than "
            f"{IMPLAUSIBLE_RATIO:g}x both the rest of that cell's library ({rest:.6g} counts over the other "
            f"genes) and the gene's 99th percentile in the other cells ({percentile:.4g}). A count that large "
            "is a corrupted value (an overflow, a unit or join error), and alone it would set the cell's size "
            f"factor. Correct it, or drop the cell{'s' if len(cells) > 1 else ''}: "
            f"adata = adata[~adata.obs_names.isin({cells[:10]!r})].copy()."
        )


def _validate_continuous(matrix, where: str) -> None:
    stats = _value_stats(matrix)
    if stats.n_nonfinite:
        raise DataError(
            f"{where} has {stats.n_nonfinite} NaN or infinite values; continuous values must be "
            "finite. Impute or drop them (or the affected genes) before loading."
        )


def convert_lognorm(adata, matrix, where: str, total_counts_key: str, target_sum: float):
    """Undo log1p(library normalization): counts = round(expm1(X) * totals / target_sum).

    Returns
    -------
    counts : scipy CSR matrix or np.ndarray, shape (cells, all genes), float32
    totals : np.ndarray, shape (cells,), float64
        The library sizes from ``obs[total_counts_key]``.
    """
    if total_counts_key not in adata.obs.columns:
        raise DataError(
            f"total_counts_key {total_counts_key!r} is not a column of adata.obs (columns: "
            f"{few(adata.obs.columns, 20)}). Pass the column that holds each cell's total counts "
            "before normalization."
        )
    try:
        totals = adata.obs[total_counts_key].to_numpy(dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(
            f"obs[{total_counts_key!r}] must be numeric total counts per cell; it holds "
            f"{adata.obs[total_counts_key].dtype} values."
        ) from None
    bad = ~np.isfinite(totals) | (totals <= 0)
    if bad.any():
        raise DataError(
            f"obs[{total_counts_key!r}] has {int(bad.sum())} cells with missing, infinite, zero or "
            "negative total counts; every cell needs a positive library size. Drop those cells "
            f"(e.g. adata = adata[adata.obs[{total_counts_key!r}] > 0]) or check the column."
        )
    stats = _value_stats(matrix)
    if stats.n_nonfinite or stats.n_negative:
        raise DataError(
            f"{where} has {stats.n_nonfinite} NaN/infinite and {stats.n_negative} negative values, "
            "so it is not log1p-normalized data and cannot be converted to counts."
        )
    if stats.n_nonzero and not stats.n_fractional:
        raise DataError(
            f"{where} already holds whole-number counts; drop total_counts_key= so the counts are "
            "used as they are."
        )
    if stats.max > _LOGNORM_MAX:
        raise DataError(
            f"{where} has values up to {stats.max:.3g}, too large for log1p-normalized data; "
            "total_counts_key= expects X = log1p(counts / total_counts * target_sum)."
        )
    scale = totals / target_sum
    if sp.issparse(matrix):
        # expm1(0) = 0, so only the stored entries change.
        raw = np.expm1(matrix.data.astype(np.float64)) * scale[_row_of_entry(matrix)]
        rounded = np.round(raw)
        counts = sp.csr_matrix(
            (rounded.astype(np.float32), matrix.indices.copy(), matrix.indptr.copy()), shape=matrix.shape
        )
        counts.eliminate_zeros()
        near = np.abs(raw - rounded) <= 0.05
        n_near, n_nonzero = int(near.sum()), raw.size
    else:
        counts = np.empty(matrix.shape, dtype=np.float32)
        n_near = n_nonzero = 0
        rows = max(1, _BLOCK_ENTRIES // max(1, matrix.shape[1]))
        for start in range(0, matrix.shape[0], rows):
            stop = start + rows
            raw = np.expm1(np.asarray(matrix[start:stop], dtype=np.float64)) * scale[start:stop, None]
            rounded = np.round(raw)
            counts[start:stop] = rounded
            nonzero = raw != 0
            n_near += int((np.abs(raw - rounded)[nonzero] <= 0.05).sum())
            n_nonzero += int(nonzero.sum())
    if n_nonzero and n_near < 0.5 * n_nonzero:
        warnings.warn(
            f"converting {where} to counts with total_counts_key={total_counts_key!r} and "
            f"target_sum={target_sum:g}: only {n_near / n_nonzero:.0%} of non-zero values were within "
            "0.05 of a whole number before rounding, so the data may not be "
            "log1p(counts / total_counts * target_sum); check target_sum and the total counts column.",
            LcdBayesWarning,
            stacklevel=3,
        )
    return counts, totals


def _parse_labels(adata, perturbation_key: str, control: str, sep: str, min_cells: int):
    """Parse the perturbation labels into canonical conditions.

    Returns
    -------
    condition : np.ndarray, shape (cells,), int32
    conditions : tuple of str
        Control first, then single perturbations, then combinations, each group sorted.
    parts : list of tuple of str
        Sorted single labels composing each condition (empty for the control).
    """
    if perturbation_key not in adata.obs.columns:
        raise DataError(
            f"perturbation_key {perturbation_key!r} is not a column of adata.obs (columns: "
            f"{few(adata.obs.columns, 20)}). Pass perturbation_key= (CLI --perturbation-key) naming the column "
            "that holds each cell's perturbation label."
        )
    column = adata.obs[perturbation_key]
    missing = column.isna().to_numpy()
    if missing.any():
        raise DataError(
            f"obs[{perturbation_key!r}] has {int(missing.sum())} cells with a missing label; every "
            f"cell needs one. Drop them (adata = adata[adata.obs[{perturbation_key!r}].notna()]) or "
            f"label unperturbed cells {control!r}."
        )
    labels = column.astype(str).to_numpy()
    unique, inverse = np.unique(labels, return_inverse=True)
    sizes = np.bincount(inverse, minlength=unique.size)
    unique = [str(label) for label in unique]  # plain str, so messages do not print np.str_(...)

    empty, bad_parts, parsed = [], [], []
    for label in unique:
        if not label.strip():
            empty.append(label)
            parsed.append(())
            continue
        pieces = [piece.strip() for piece in label.split(sep)]
        if has_empty_part(label, sep):
            bad_parts.append(label)
        # GEARS writes single perturbations as "A+ctrl": a control part means "nothing added".
        parsed.append(tuple(sorted({piece for piece in pieces if piece and piece != control})))
    if empty:
        raise DataError(
            f"obs[{perturbation_key!r}] has {int(sizes[np.isin(unique, empty)].sum())} cells with an "
            f"empty label; label unperturbed cells {control!r} or drop those cells."
        )
    if bad_parts:
        raise DataError(
            f"labels {few(bad_parts)} in obs[{perturbation_key!r}] have an empty part when split on "
            f"sep={sep!r} (e.g. 'A{sep}{sep}B' or a leading/trailing {sep!r}). Fix the labels, or pass "
            "sep= (CLI --sep) if combinations use another separator."
        )

    if not any(len(p) == 0 for p in parsed):
        order = np.argsort(-sizes, kind="stable")[:8]
        common = ", ".join(f"{unique[i]!r} ({sizes[i]} cells)" for i in order)
        lowered = {label.lower(): label for label in unique}
        likely = [lowered[name] for name in _CONTROL_NAMES if name in lowered]
        hint = (
            f" The labels include {few(likely)}, which looks like a control: pass control={likely[0]!r}."
            if likely
            else " Common control labels are 'control', 'ctrl' and 'non-targeting'."
        )
        raise DataError(
            f"no cells have the control label {control!r} in obs[{perturbation_key!r}]; most common "
            f"labels: {common}. Pass control= (CLI --control) naming the label of unperturbed cells."
            + hint
        )

    canonical = sorted({p for p in parsed if p}, key=lambda p: (len(p), p))
    condition_parts = [()] + canonical
    index_of = {p: i for i, p in enumerate(condition_parts)}
    condition = np.array([index_of[p] for p in parsed], dtype=np.int32)[inverse]
    conditions = tuple(control if not p else sep.join(p) for p in condition_parts)

    cells = np.bincount(condition, minlength=len(conditions))
    small = np.flatnonzero(cells < min_cells)
    if small.size:
        named = ", ".join(f"{conditions[i]!r} ({cells[i]} cells)" for i in small[:10])
        too_small = set(small.tolist()) - {0}
        raw = [str(label) for label, p in zip(unique, parsed) if index_of[p] in too_small]
        fix = (
            f"Drop their cells before fitting, e.g. adata = adata[~adata.obs[{perturbation_key!r}]"
            f".isin({raw!r})].copy() (and adata.write_h5ad(...) for the command line)."
            if raw
            else ""
        )
        control_note = " The control needs more cells: every effect is measured against it." if 0 in small else ""
        raise DataError(
            f"{small.size} conditions have fewer than {min_cells} cells: {named}; too few to "
            f"estimate a condition's effect.{control_note} {fix}".rstrip()
        )
    return condition, conditions, condition_parts


def _resolve_genes(var_names: list[str], genes) -> list[int] | None:
    """Column indices of an explicit gene list, or None when no list was given."""
    if genes is None:
        return None
    requested = [str(g) for g in genes]
    duplicated = [g for g, n in Counter(requested).items() if n > 1]
    if duplicated:
        raise DataError(f"genes= lists {few(duplicated)} more than once; list each gene once.")
    position = {g: i for i, g in enumerate(var_names)}
    unknown = [g for g in requested if g not in position]
    if unknown:
        hints = _suggestions(unknown, var_names)
        raise DataError(
            f"{len(unknown)} of the {len(requested)} genes in genes= are not in adata.var_names: "
            f"{few(unknown)}.{hints}\nCheck the spelling and the gene identifier type (symbols vs "
            "Ensembl IDs) of adata.var_names."
        )
    return [position[g] for g in requested]


def _requested_labels(predict_targets, control: str, sep: str) -> list[str]:
    """The single labels of the conditions to predict, in the order given, each once."""
    if predict_targets is None:
        return []
    if isinstance(predict_targets, str):
        predict_targets = predict_targets.split(",")
    if not isinstance(predict_targets, (list, tuple)) or not all(isinstance(c, str) for c in predict_targets):
        raise DataError(
            f'predict_targets must be a list of condition labels such as ["A{sep}B", "C"] (or the string '
            f'"A{sep}B,C"), got {predict_targets!r}.'
        )
    return list(dict.fromkeys(part for label in predict_targets for part in label_parts(label, control, sep)))


def _resolve_target_names(labels, mapping, var_set: set[str], var_names) -> dict[str, list[str]]:
    """Target gene names (in var_names) of each label, trained or to be predicted; defaults
    overridden by `mapping`."""
    unknown_labels = [label for label in mapping if label not in set(labels)]
    if unknown_labels:
        hints = _suggestions(unknown_labels, labels)
        raise DataError(
            f"the targets mapping names {len(unknown_labels)} labels that are not perturbation labels "
            f"in the data (nor labels of predict_targets): {few(unknown_labels)}.{hints}\nPerturbation labels "
            f"in the data include {few(labels)}; remove the others from the mapping."
        )
    missing = [(label, g) for label, genes in mapping.items() for g in genes if g not in var_set]
    if missing:
        listed = few(f"{g} (targets of {label})" for label, g in missing)
        hints = _suggestions([g for _, g in missing], var_names)
        raise DataError(
            f"the targets mapping names {len(missing)} target genes that are not in adata.var_names: "
            f"{listed}.{hints}\nCheck the spelling and gene identifier type, or remove them from the mapping."
        )
    names = {}
    for label in labels:
        if label in mapping:
            names[label] = list(dict.fromkeys(mapping[label]))
        else:
            # By default a label that is a gene name targets that gene (CRISPRi/a, GEARS style).
            names[label] = [label] if label in var_set else []
    return names


def _positive_obs_column(adata, key: str, argument: str) -> np.ndarray:
    """A numeric obs column of positive, finite values per cell, or a DataError saying why not."""
    if key not in adata.obs.columns:
        raise DataError(f"{argument} {key!r} is not a column of adata.obs (columns: {few(list(adata.obs.columns))}).")
    try:
        values = adata.obs[key].to_numpy(dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"obs[{key!r}] must be numeric; it holds {adata.obs[key].dtype} values.") from None
    bad = ~np.isfinite(values) | (values <= 0)
    if bad.any():
        raise DataError(f"obs[{key!r}] has {int(bad.sum())} cells with missing, infinite, zero or negative "
                        f"values; {argument} needs a positive number for every cell.")
    return values


def _read_batches(adata, batch_key) -> tuple[np.ndarray | None, tuple[str, ...] | None]:
    """Each cell's index into the sorted batch names of ``obs[batch_key]``, and those names; both
    None, with a warning, when every cell is in one batch."""
    if not isinstance(batch_key, str) or not batch_key:
        raise DataError(f"batch_key must be the name of an obs column (a non-empty string), got {batch_key!r}.")
    columns = [str(c) for c in adata.obs.columns]
    if batch_key not in columns:
        raise DataError(
            f"batch_key {batch_key!r} is not a column of adata.obs{_close(batch_key, columns)} (columns: "
            f"{few(columns, 20)}). Pass batch_key= (CLI --batch-key) naming the column that holds each cell's "
            "batch (10x lane, replicate, donor), or leave it out to fit without batch effects."
        )
    column = adata.obs[batch_key]
    names = np.asarray(column.astype(str).to_numpy(), dtype=str)
    # A blank name is a batch nobody named: as unusable as a missing one.
    missing = column.isna().to_numpy() | (np.char.strip(names) == "")
    if missing.any():
        raise DataError(
            f"obs[{batch_key!r}] has {int(missing.sum())} cells without a batch (e.g. "
            f"{few(adata.obs_names[missing][:3])}); every cell needs one. Drop them (adata = "
            f"adata[adata.obs[{batch_key!r}].notna()].copy()) or give them a batch name of their own."
        )
    batches, batch = np.unique(names, return_inverse=True)
    if batches.size == 1:
        # One batch has no batch effects to tell from the cells' own variation.
        warnings.warn(
            f"every cell of obs[{batch_key!r}] is in batch {str(batches[0])!r}, so there is one batch: no batch "
            "effects are fitted.",
            LcdBayesWarning,
            stacklevel=3,
        )
        return None, None
    return batch.astype(np.int32), tuple(str(name) for name in batches)


# --------------------------------------------------------------------------- public loader


def load_perturbation_data(
    adata,
    *,
    perturbation_key: str = "condition",
    control: str = "ctrl",
    sep: str = "+",
    layer: str | None = None,
    targets: dict[str, list[str]] | str | os.PathLike | None = None,
    genes=None,
    n_top_genes: int | None = None,
    gene_ranking: str = DEFAULT_GENE_RANKING,
    predict_targets=None,
    continuous: bool = False,
    total_counts_key: str | None = None,
    size_factor_key: str | None = None,
    batch_key: str | None = None,
    target_sum: float = 1e4,
    min_cells_per_condition: int = 2,
    min_genes: int = 2,
) -> PerturbationData:
    """Validate a perturbation screen stored in AnnData and return model-ready arrays.

    Parameters
    ----------
    adata : anndata.AnnData, shape (cells, all genes)
        The screen. Counts are read from ``layer`` if given, else ``layers["counts"]`` if
        present, else ``X``; continuous values from ``layer`` if given, else ``X``. Dense
        and scipy.sparse matrices work; only the modelled genes are densified.
    perturbation_key : str
        obs column with each cell's perturbation label.
    control : str
        Label of unperturbed cells. Label parts equal to it are dropped ("A+ctrl" is "A").
    sep : str
        Separator of combination labels; "A+B" and "B+A" are the same condition.
    layer : str, optional
        Layer to read instead of the default.
    targets : dict or path to JSON, optional
        On-target genes of perturbation labels, ``{"label": ["GENE", ...]}``; overrides the
        default (a label that is a modelled gene targets that gene) for the labels it names.
    genes : list of str, optional
        Genes to model, in this order. Default: all genes (or ``n_top_genes``).
    n_top_genes : int, optional
        Model at most this many genes (``lcd_bayes.io.genes.select_genes``): the targets of
        ``predict_targets``, then those of the labels in the data, then the best genes by
        ``gene_ranking``, computed on the cells of ``adata``. Pass the training cells only:
        held-out cells would choose the panel by their own responses. Targets beyond
        ``n_top_genes`` are left out with a warning (their labels keep off-target shifts).
    gene_ranking : {"response", "variance", "dispersion"}
        How ``n_top_genes`` ranks the genes after the targets: the largest standardized shift of
        any condition against the control (default), the variance of log1p(counts / size factor)
        (of the values when continuous), or scanpy's seurat-flavour normalized dispersion (counts).
    predict_targets : list of str or str, optional
        Conditions you will predict later (``["A+B", "C"]`` or ``"A+B,C"``), which need no
        cells here: the targets of their labels (a gene name, or the ``targets`` mapping) come
        first in the ``n_top_genes`` panel. Labels neither in the data nor resolving to a gene
        of var_names are an error: the run could not predict them.
    continuous : bool
        Use the values as they are (gaussian likelihood); size factors are all 1.
    total_counts_key : str, optional
        Explicit opt-in for log1p(library-normalized) data: obs column of total counts per
        cell; counts are round(expm1(X) * obs[total_counts_key] / target_sum).
    size_factor_key : str, optional
        obs column of library sizes (or size factors) to use instead of the modelled counts'
        totals: when only a small panel of genes is modelled, its totals move with the
        perturbations themselves and would absorb part of their effect.
    batch_key : str, optional
        obs column of each cell's batch (10x lane, replicate, donor); its values are read as
        strings. The model (linear drift) fits a technical scale per batch and gene and a shift of
        the basal drift per batch, pooled across batches. A column holding one value fits no batch effects
        (with a warning).
    target_sum : float
        Normalization total used to make X (scanpy's ``normalize_total(target_sum=...)``).
    min_cells_per_condition : int
        Conditions (control included) with fewer cells are an error.
    min_genes : int
        Fewer modelled genes (with any counts) are an error.

    Returns
    -------
    PerturbationData
        ``batch_key`` as given; ``batch`` (each cell's index into ``batches``, the sorted batch
        names) and ``batches`` when its column holds two or more batches, None otherwise.

    Raises
    ------
    DataError
        For every problem with the input, before any computation on it; counts more than
        ``IMPLAUSIBLE_RATIO`` times both the rest of their cell's library and their gene's 99th
        percentile are refused as corrupted.

    Warns
    -----
    LcdBayesWarning
        When selected genes have zero counts in every cell (they are left out of the model:
        effects into a gene never observed are not data), a target of the mapping or of
        ``predict_targets`` exists but is not among ``genes``, ``n_top_genes`` leaves out
        targets, the log-normalized conversion lands far from whole numbers, or
        ``obs[batch_key]`` holds one batch.

    Notes
    -----
    Size factors are each cell's total over all genes of the source matrix divided by the
    median total. With ``total_counts_key`` the totals are ``obs[total_counts_key]``: the
    library size before normalization, which a gene-subset matrix cannot reconstruct.
    """
    _check_arguments(
        adata, perturbation_key, control, sep, genes, n_top_genes, gene_ranking, continuous, total_counts_key,
        target_sum, min_cells_per_condition, min_genes,
    )
    if adata.n_obs == 0:
        raise DataError(
            f"the data hold no cells (0 cells x {adata.n_vars} genes); check the file, or the filter that "
            "made it."
        )
    requested = _requested_labels(predict_targets, control, sep)
    var_names = [str(g) for g in adata.var_names]
    duplicated = [g for g, n in Counter(var_names).items() if n > 1]
    if duplicated:
        raise DataError(
            f"adata.var_names has duplicated gene names ({few(duplicated)}), so genes cannot be "
            "looked up by name. Run adata.var_names_make_unique() first."
        )
    gene_index = _resolve_genes(var_names, genes)
    if gene_index is not None and len(gene_index) < min_genes:
        raise DataError(
            f"genes= lists {len(gene_index)} genes, but the model needs at least {min_genes}; list more "
            "genes (genes=, or [data] genes in a --config TOML)."
        )
    if len(var_names) < min_genes:
        raise DataError(
            f"adata has {len(var_names)} genes, but the model needs at least {min_genes}; read a file "
            "with more genes."
        )
    raw_matrix, where = _select_source(adata, layer, continuous, total_counts_key)
    matrix = as_matrix(raw_matrix)
    if matrix.ndim != 2 or matrix.shape != (adata.n_obs, len(var_names)):
        raise DataError(f"{where} has shape {matrix.shape}, expected (cells, genes) = {adata.shape}.")

    # The scale of the values comes first: it decides what every later step means.
    totals = None
    if continuous:
        _validate_continuous(matrix, where)
    elif total_counts_key is not None:
        matrix, totals = convert_lognorm(adata, matrix, where, total_counts_key, target_sum)
    else:
        validate_counts(adata, matrix, where)

    condition, conditions, condition_parts = _parse_labels(
        adata, perturbation_key, control, sep, min_cells_per_condition
    )
    batch, batches = (None, None) if batch_key is None else _read_batches(adata, batch_key)
    perturbations = tuple(sorted({label for parts in condition_parts for label in parts}))

    mapping = {}
    if targets is not None:
        mapping = read_targets(targets) if isinstance(targets, (str, os.PathLike)) else (
            _check_target_mapping(targets, "targets=")
        )
    var_set = set(var_names)
    target_names = _resolve_target_names(
        tuple(dict.fromkeys([*perturbations, *requested])), mapping, var_set, var_names
    )
    unpredictable = [label for label in requested if label not in perturbations and not target_names[label]]
    if unpredictable:
        hints = _suggestions(unpredictable, [*perturbations, *var_names])
        raise DataError(
            f"predict_targets names {len(unpredictable)} labels that are neither perturbation labels in the "
            f"data nor genes of adata.var_names (nor in the targets mapping): {few(unpredictable)}.{hints}\n"
            "A run cannot predict a label without cells unless it targets a modelled gene; fix the "
            "spelling or remove them."
        )

    library_genes = None
    if continuous:
        size_factor = np.ones(adata.n_obs)
    else:
        if size_factor_key is not None:
            totals = _positive_obs_column(adata, size_factor_key, "size_factor_key")
        if totals is None:
            totals = _row_totals(matrix)
            library_genes = int(matrix.shape[1])
        empty = np.flatnonzero(totals <= 0)
        if empty.size:
            raise DataError(
                f"{empty.size} cells have zero total counts over all genes (e.g. "
                f"{few(adata.obs_names[empty[:3]])}); they carry no information and break size "
                "factors. Remove them with scanpy.pp.filter_cells(adata, min_counts=1)."
            )
        size_factor = totals / np.median(totals)

    explicit = gene_index is not None
    if gene_index is None:
        if n_top_genes is None:
            gene_index = list(range(len(var_names)))
        else:
            if gene_ranking == "response" and len(conditions) == 1:
                raise DataError(
                    'gene_ranking="response" ranks genes by their shift against the control, but the data '
                    'hold control cells only; pass gene_ranking="variance".'
                )
            position = {g: i for i, g in enumerate(var_names)}

            def columns(labels):
                return [position[g] for label in labels for g in target_names[label]]

            gene_index = select_genes(
                matrix, int(n_top_genes), condition=condition, size_factor=None if continuous else size_factor,
                requested=columns(requested), trained=columns(perturbations), ranking=gene_ranking,
                names=var_names,
            ).tolist()
    # One canonical array, C-ordered float32, whatever the storage (dense C or Fortran order, CSR,
    # CSC, integers): float32 sums depend on the memory order, and a Fortran-ordered copy of the
    # same counts moved a gene's mean in the last place, and so the whole fit.
    selected = matrix[:, gene_index]
    counts = np.ascontiguousarray(selected.toarray() if sp.issparse(selected) else selected, dtype=np.float32)
    if not continuous:
        observed = _column_sums(counts) > 0
        if not observed.all():
            # A gene never observed carries no information about any effect, yet a model that keeps it
            # still fits effects into it (confident edges into a gene of zeros): it is left out.
            silent = [var_names[i] for i, seen in zip(gene_index, observed) if not seen]
            targeted = [label for label in perturbations if set(target_names[label]) & set(silent)]
            warnings.warn(
                f"genes with zero counts in every cell are left out of the model ({len(silent)} of the "
                f"{len(gene_index)} selected): {few(silent)}."
                + (f" Labels that targeted them ({few(targeted)}) are modelled through off-target shifts."
                   if targeted else ""),
                LcdBayesWarning,
                stacklevel=2,
            )
            gene_index = [i for i, seen in zip(gene_index, observed) if seen]
            counts = np.ascontiguousarray(counts[:, observed])
    if len(gene_index) < min_genes:
        fix = ("raise n_top_genes (CLI --n-top-genes)" if n_top_genes is not None else
               "list more genes (genes=, or [data] genes in a --config TOML)" if explicit else
               "read a file with more genes")
        raise DataError(
            f"only {len(gene_index)} genes with any counts were selected, but the model needs at least "
            f"{min_genes}; {fix}."
        )
    modelled = tuple(var_names[i] for i in gene_index)
    column_of = {g: j for j, g in enumerate(modelled)}

    target_matrix = np.zeros((len(perturbations), len(modelled)), dtype=np.float32)
    for row, label in enumerate(perturbations):
        for gene in target_names[label]:
            if gene in column_of:
                target_matrix[row, column_of[gene]] = 1.0
    # Targets named on purpose (a mapping, predict_targets) but left out of an explicit gene list;
    # n_top_genes says itself which targets it left out.
    named = [label for label in target_names if label in mapping or label in requested]
    unmodelled = [f"{g} ({label})" for label in named for g in target_names[label] if g not in column_of]
    if explicit and unmodelled:
        warnings.warn(
            f"{len(unmodelled)} target genes from the targets mapping or predict_targets are in "
            f"adata.var_names but not among the modelled genes, so they are not modelled as targets: "
            f"{few(unmodelled)}. Add them to genes= to model them.",
            LcdBayesWarning,
            stacklevel=2,
        )

    design = np.zeros((len(conditions), len(perturbations)), dtype=np.float32)
    label_column = {label: j for j, label in enumerate(perturbations)}
    for row, parts in enumerate(condition_parts):
        for label in parts:
            design[row, label_column[label]] = 1.0

    return PerturbationData(
        counts=counts,
        size_factor=size_factor.astype(np.float32),
        condition=condition.astype(np.int32),
        conditions=conditions,
        perturbations=perturbations,
        design=design,
        targets=target_matrix,
        genes=modelled,
        is_counts=not continuous,
        perturbation_key=perturbation_key,
        control=control,
        sep=sep,
        library_genes=library_genes,
        batch=batch,
        batches=batches,
        batch_key=batch_key,
    )


def summarize(data: PerturbationData) -> str:
    """A few lines describing loaded data, for logs and the CLI.

    Parameters
    ----------
    data : PerturbationData

    Returns
    -------
    str
        Newline-separated summary without a trailing newline.
    """
    order = data.design.sum(axis=1)[1:].astype(int)
    singles, doubles = int((order == 1).sum()), int((order == 2).sum())
    higher = int((order > 2).sum())
    cells = np.bincount(data.condition, minlength=data.n_conditions)
    targeted = [label for label, row in zip(data.perturbations, data.targets) if row.any()]
    others = data.n_perturbations - len(targeted)
    kind = "counts" if data.is_counts else "continuous values"
    combos = f"{doubles} doubles" + (f", {higher} higher-order" if higher else "")
    lines = [
        f"{data.n_cells} cells x {data.n_genes} genes ({kind})",
        f"{data.n_conditions} conditions: control {data.control!r} ({cells[0]} cells), "
        f"{singles} singles, {combos}; cells per condition {cells.min()}-{cells.max()}",
        f"{data.n_perturbations} perturbation labels from obs[{data.perturbation_key!r}] (sep {data.sep!r})",
        f"{len(targeted)} of {data.n_perturbations} labels have a modelled target"
        + (f" ({few(targeted, 10)})" if targeted else "")
        + (f"; the other {others} are modelled through off-target shifts" if others else ""),
    ]
    if data.batches is not None:
        per_batch = np.bincount(data.batch, minlength=data.n_batches)
        lines.append(f"{data.n_batches} batches from obs[{data.batch_key!r}]: cells per batch "
                     f"{per_batch.min()}-{per_batch.max()}")
    return "\n".join(lines)
