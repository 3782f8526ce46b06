"""Figures of a run folder: ELBO trace, edge-probability heatmap, forest plot, causal network.

Every figure is drawn on its own ``matplotlib.figure.Figure`` (no pyplot state, so any backend,
Agg included, works) except the forest plot, which ``arviz_plots`` draws and which is closed
after saving.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import xarray as xr
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch

from .analysis.clipr import load_clipr, summary_to_table

MAX_TICK_LABELS = 60  # beyond this many genes, tick labels overlap into a black bar
POSITIVE, NEGATIVE = "tab:red", "tab:blue"


def plot_elbo(elbo: np.ndarray) -> Figure:
    """ELBO trace, shape (steps,): ``-ELBO`` on a log scale when it stays positive, else the ELBO
    on a linear scale clipped to its settled range; a running mean smooths minibatch noise."""
    elbo = np.asarray(elbo, float)
    steps = np.arange(elbo.size)
    window = max(1, elbo.size // 50)
    smooth = pd.Series(elbo).rolling(window, min_periods=1).mean().to_numpy()
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    sign = -1.0 if np.all(-elbo > 0) else 1.0
    ax.plot(steps, sign * elbo, color="0.6" if window > 1 else "k", lw=0.6, label="per step")
    if window > 1:
        ax.plot(steps, sign * smooth, color="k", lw=1.2, label=f"running mean ({window} steps)")
    if sign < 0:
        ax.set_yscale("log")
        ax.set_ylabel("-ELBO (log scale)")
    else:
        # The first steps' ELBO is orders of magnitude off and would flatten the rest.
        settled = smooth[elbo.size // 10:]
        low, high = np.nanmin(settled), np.nanmax(settled)
        pad = 0.1 * (high - low) + 1e-9 * max(1.0, abs(high))
        ax.set_ylim(low - pad, high + pad)
        ax.set_ylabel("ELBO")
    ax.set_xlabel("SVI step")
    ax.set_title("SVI convergence")
    ax.legend(frameon=False)
    return fig


def plot_edge_heatmap(summary: xr.Dataset) -> Figure:
    """Edge probability signed by the posterior mean effect, source (rows) x target (columns).

    ``summary`` is CLIPR's (source, target) edge summary (``edge_summary``).
    """
    summary = summary.transpose("source", "target")
    signed = (summary["prob_edge"] * np.sign(summary["mean"])).values
    sources = summary["source"].values.astype(str)
    targets = summary["target"].values.astype(str)
    size = min(12.0, 4.0 + 0.25 * len(targets))
    fig = Figure(figsize=(size + 1.5, size), layout="constrained")
    ax = fig.add_subplot()
    # The diagonal (self-decay, no edge) is NaN: grey, apart from a white "no edge" (0).
    colormap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="0.8")
    image = ax.imshow(signed, cmap=colormap, vmin=-1, vmax=1, interpolation="nearest")
    if len(targets) <= MAX_TICK_LABELS:
        ax.set_xticks(np.arange(len(targets)), targets, rotation=90)
        ax.set_yticks(np.arange(len(sources)), sources)
    ax.set_xlabel("target gene")
    ax.set_ylabel("source gene")
    tau = summary.attrs.get("tau", float("nan"))
    ax.set_title(f"CLIPR: P(|E| > {tau:.3g}) x sign of the mean\n(red: activation, blue: repression)")
    fig.colorbar(image, ax=ax, shrink=0.8, label="signed edge probability")
    return fig


def plot_forest(effects: xr.Dataset, table: pd.DataFrame, *, top: int = 20, hdi_prob: float = 0.9):
    """ArviZ forest plot of the ``top`` first edges of ``table``: posterior mean, 50% and
    ``hdi_prob`` HDIs of each effect.

    Parameters
    ----------
    effects : xarray.Dataset
        CLIPR draws, ``effect`` with dims (chain, draw, source, target).
    table : pandas.DataFrame
        Edge table (``edge_table``), most probable edges first.

    Returns
    -------
    matplotlib.figure.Figure
    """
    import arviz_plots as azp

    rows = table.head(top)
    effect = effects["effect"]
    # Vectorized selection of (source, target) pairs onto one "edge" dim, one forest row each.
    pairs = {"source": xr.DataArray(rows["source"].to_numpy(), dims="edge"),
             "target": xr.DataArray(rows["target"].to_numpy(), dims="edge")}
    labels = [f"{s} → {t}" for s, t in zip(rows["source"], rows["target"])]
    draws = effect.sel(pairs).drop_vars(["source", "target"]).assign_coords(edge=labels)
    tree = xr.DataTree.from_dict({"posterior": xr.Dataset({"effect": draws})})
    collection = azp.plot_forest(
        tree, combined=True, point_estimate="mean", ci_kind="hdi", ci_probs=(0.5, hdi_prob),
        labels=["edge"], figure_kwargs={"figsize": (8, 1.0 + 0.35 * len(labels))},
    )
    figure = collection.viz["figure"].item()
    forest = collection.viz["plot"].sel(column="forest").item()
    forest.axvline(0.0, color="0.6", lw=0.8, ls="--", zorder=0)
    forest.set_xlabel("effect of source on target (CLIPR)")
    figure.suptitle(f"Strongest edges: posterior mean, 50% and {hdi_prob:.0%} HDI")
    return figure


def plot_network(table: pd.DataFrame, genes: list[str], *, prob_threshold: float = 0.9) -> Figure:
    """Causal network of the edges with ``prob_edge >= prob_threshold``: genes on a circle,
    arrows source -> target, red for activation and blue for repression, width by ``|mean|``."""
    edges = table[table["prob_edge"] >= prob_threshold]
    shown = list(genes)
    if len(shown) > MAX_TICK_LABELS:  # many genes: only those with an edge, or the circle is a blur
        involved = set(edges["source"]) | set(edges["target"])
        shown = [g for g in genes if g in involved]
    angle = 2 * np.pi * np.arange(len(shown)) / max(len(shown), 1)
    position = {g: (np.cos(a), np.sin(a)) for g, a in zip(shown, angle)}

    fig = Figure(figsize=(7, 7), layout="constrained")
    ax = fig.add_subplot()
    ax.set_aspect("equal")
    ax.set_axis_off()
    ax.set_xlim(-1.35, 1.35)
    ax.set_ylim(-1.35, 1.35)
    largest = edges["mean"].abs().max() if len(edges) else 1.0
    for edge in edges.itertuples():
        width = 0.6 + 3.4 * abs(edge.mean) / largest
        # Curved arrows keep j -> k and k -> j apart.
        ax.add_patch(FancyArrowPatch(
            position[edge.source], position[edge.target], arrowstyle="-|>", mutation_scale=10 + 3 * width,
            connectionstyle="arc3,rad=0.15", lw=width, alpha=0.8, shrinkA=12, shrinkB=12,
            color=POSITIVE if edge.mean > 0 else NEGATIVE,
        ))
    xy = np.array([position[g] for g in shown]).reshape(-1, 2)
    ax.scatter(xy[:, 0], xy[:, 1], s=300, color="white", edgecolor="k", zorder=3)
    for gene, (x, y) in position.items():
        ax.annotate(gene, (1.16 * x, 1.16 * y), ha="center", va="center", fontsize=8)
    tau = table.attrs.get("tau", float("nan"))
    title = f"{len(edges)} edges with P(|E| > {tau:.3g}) >= {prob_threshold:g}"
    if not len(edges):
        ax.text(0, 0, "no edge above the threshold", ha="center", va="center", color="0.4")
    ax.set_title(title + "\nred: activation, blue: repression, width: |mean effect|")
    return fig


def report_run(folder: str | Path, *, prob_threshold: float = 0.9, top: int = 20) -> list[Path]:
    """Write the run's figures as PNGs in its folder (CLIPR is computed first if missing).

    Writes ``elbo.png`` (when ``elbo.csv`` exists), ``edge_heatmap.png``, ``forest.png`` (the
    ``top`` most probable edges) and ``network.png`` (edges with ``prob_edge >=
    prob_threshold``).

    Returns
    -------
    list of pathlib.Path
        The files written.
    """
    folder = Path(folder)
    result = load_clipr(folder)
    effects = result["posterior"].to_dataset()
    summary = result["edges"].to_dataset()
    table = summary_to_table(summary)
    written = []

    def save(figure, name: str) -> None:
        path = folder / name
        figure.savefig(path, dpi=120)
        written.append(path)

    if (folder / "elbo.csv").exists():
        save(plot_elbo(pd.read_csv(folder / "elbo.csv")["elbo"].to_numpy()), "elbo.png")
    save(plot_edge_heatmap(summary), "edge_heatmap.png")
    forest = plot_forest(effects, table, top=top, hdi_prob=summary.attrs.get("hdi_prob", 0.9))
    save(forest, "forest.png")
    plt.close(forest)
    genes = [str(g) for g in summary["source"].values]
    save(plot_network(table, genes, prob_threshold=prob_threshold), "network.png")
    return written
