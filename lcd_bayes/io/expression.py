"""Expression on a common scale, and the AnnData layout every prediction shares.

Predictions (the model's, and each baseline's) and observed screens are compared on
library-normalized log1p expression over one gene panel:

    z_cg = log1p(target_sum * y_cg / sum_g' y_cg')      (sum over the compared genes only)

so that the model's panel counts and a real screen's counts, whose libraries cover different
gene sets, meet on the same scale.

A prediction is an AnnData whose ``obs[perturbation_key]`` names each cell's condition and whose
``X`` holds either counts or values already on the z scale; ``uns["lcd_bayes"]`` says which
(``space``), and which method, perturbation key, control label and separator produced it.
"""
from __future__ import annotations

import anndata
import numpy as np
import pandas as pd

from ..diagnostics import DataError
from .screen import as_matrix, convert_lognorm, few, label_parts, validate_counts

UNS_KEY = "lcd_bayes"
SPACES = ("counts", "log1p_normalized")
TARGET_SUM = 1e4


def canonical_label(label: str, control: str, sep: str) -> str:
    parts = label_parts(label, control, sep)
    return sep.join(parts) if parts else control


def normalize_log1p(counts: np.ndarray, target_sum: float = TARGET_SUM) -> np.ndarray:
    """``log1p(target_sum * counts / row total)``; cells with no counts on the panel stay at 0."""
    counts = np.asarray(counts, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    scaled = np.divide(counts * target_sum, totals, out=np.zeros_like(counts), where=totals > 0)
    return np.log1p(scaled).astype(np.float32)


def space_of(adata: anndata.AnnData) -> str | None:
    """``"counts"`` or ``"log1p_normalized"`` when the AnnData says so (predictions do), else None."""
    space = adata.uns.get(UNS_KEY, {}).get("space") if isinstance(adata.uns.get(UNS_KEY), dict) else None
    return str(space) if space is not None else None


def expression(adata: anndata.AnnData, genes, *, layer: str | None = None,
               total_counts_key: str | None = None, target_sum: float = TARGET_SUM,
               where: str = "adata") -> np.ndarray:
    """Library-normalized log1p expression of ``genes`` (cells x genes, float32).

    A prediction already on that scale is returned as it is. Counts are normalized over
    ``genes``. log1p-normalized data must name its total-counts column (``total_counts_key``):
    it is converted back to counts first, so that both sides of a comparison are normalized
    over the same genes.
    """
    genes = [str(g) for g in genes]
    missing = [g for g in genes if g not in adata.var_names]
    if missing:
        raise DataError(
            f"{where} lacks {len(missing)} of the compared genes (e.g. {few(missing)}); both files "
            "must measure the predicted genes (compare on the genes the model was fitted to)."
        )
    subset = adata[:, genes]
    if layer is not None and layer not in subset.layers:
        raise DataError(f"layer {layer!r} is not in {where}.layers (available: {few(list(subset.layers))})")
    matrix = as_matrix(subset.layers[layer] if layer is not None else subset.X)
    if space_of(adata) == "log1p_normalized":
        values = matrix.toarray() if hasattr(matrix, "toarray") else np.asarray(matrix)
        return values.astype(np.float32)
    if total_counts_key is not None:
        # Convert with the library sizes over all genes: X was normalized over the whole library.
        full = as_matrix(adata.layers[layer] if layer is not None else adata.X)
        counts, _ = convert_lognorm(adata, full, where, total_counts_key, target_sum)
        index = adata.var_names.get_indexer(genes)
        matrix = counts[:, index]
    else:
        # Values can only be compared as counts or log1p-normalized here (no continuous option). A
        # prediction's counts are scored however wild, not refused as corrupted data would be.
        validate_counts(subset, matrix, where, continuous_option=None, plausible=space_of(adata) is None)
    values = matrix.toarray() if hasattr(matrix, "toarray") else np.asarray(matrix)
    return normalize_log1p(values, target_sum)


def prediction_anndata(values: np.ndarray, labels, genes, *, space: str, method: str,
                       perturbation_key: str, control: str, sep: str, uns: dict | None = None) -> anndata.AnnData:
    """Wrap predicted cells (rows of ``values``, labelled by ``labels``) in the shared layout."""
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, not {space!r}")
    labels = np.asarray([str(label) for label in labels])
    obs = pd.DataFrame({perturbation_key: pd.Categorical(labels)},
                       index=[f"cell_{i}" for i in range(labels.size)])
    adata = anndata.AnnData(np.asarray(values, dtype=np.float32), obs=obs,
                            var=pd.DataFrame(index=[str(g) for g in genes]))
    adata.uns[UNS_KEY] = {"space": space, "method": method, "perturbation_key": perturbation_key,
                          "control": control, "sep": sep, **(uns or {})}
    return adata
