"""Plain-text summaries of a posterior: the strongest direct effects with credible intervals
(recovery scores against known effects are ``analysis.recovery``'s)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr


def interaction_table(tree: xr.DataTree, *, prob: float = 0.9) -> pd.DataFrame:
    """One row per ordered gene pair: posterior mean, sd and central ``prob`` interval of the
    direct effect of ``source`` on ``target`` read from the drift, strongest first."""
    draws = tree["posterior"]["interaction"].stack(sample=("chain", "draw")).transpose("sample", ...).values
    genes = tree["posterior"]["source"].values.astype(str)
    low, high = np.quantile(draws, [(1 - prob) / 2, (1 + prob) / 2], axis=0)
    source, target = np.meshgrid(genes, genes, indexing="ij")
    off = ~np.eye(len(genes), dtype=bool)
    table = pd.DataFrame({
        "source": source[off], "target": target[off], "mean": draws.mean(0)[off], "sd": draws.std(0)[off],
        "low": low[off], "high": high[off],
    })
    table["excludes_zero"] = (table["low"] > 0) | (table["high"] < 0)
    return table.reindex(table["mean"].abs().sort_values(ascending=False).index).reset_index(drop=True)


def format_top_edges(table: pd.DataFrame, n: int = 10, prob: float = 0.9) -> str:
    lines = [f"Strongest direct effects (posterior mean, {prob:.0%} credible interval):"]
    for row in table.head(n).itertuples():
        mark = "" if row.excludes_zero else "  (interval includes 0)"
        lines.append(f"  {row.source:>10} -> {row.target:<10} {row.mean:+7.2f}  [{row.low:+.2f}, {row.high:+.2f}]{mark}")
    return "\n".join(lines)
