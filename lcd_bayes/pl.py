"""Figures of a run: ELBO trace, edge-probability heatmap, forest plot, causal network, the
posterior predictive check, predicted time courses and the interaction types of doubles.

Each figure draws into a matplotlib ``Axes`` and returns it: ``elbo(run, ax=ax)``,
``edge_heatmap(run, ax=ax)``, ``forest(run, ax=ax)``, ``network(run, ax=ax)``, ``ppc(run, ax=ax)``
and ``ppc_correlations(run, ax=ax)`` take a run (``lcd_bayes.Run``, or anything with its
``losses``, ``clipr`` and ``ppc``) or a run folder, and draw into a new pyplot figure when ``ax``
is None. ``trajectories(prediction, ax=ax)`` takes a prediction made with ``times`` (or its
trajectory table), ``interactions(table, ax=ax)`` a table from ``Run.interactions`` (or a run folder
holding ``interactions.csv``). The ``plot_*`` functions underneath take the arrays themselves. ``report_run``
writes the edge figures of a folder as PNGs, ``save_ppc`` the check's, ``save_trajectories`` the
time courses', ``save_interactions`` the interaction types', each on its own
``matplotlib.figure.Figure`` (no pyplot state, so any backend, Agg included, works).
"""
from __future__ import annotations

from pathlib import Path

import arviz as az
import matplotlib
import numpy as np
import pandas as pd
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch

from .analysis.clipr import load_clipr, summary_at, summary_to_table
from .analysis.interactions import BUFFERING, SYNERGY
from .analysis.interactions import TYPES as INTERACTION_TYPES
from .analysis.ppc import GROUP as PPC_GROUP
from .analysis.ppc import MIN_TOP_DE_CORRELATION, ppc_table
from .analysis.predict import trajectory_table
from .files import atomic_write
from .io.run_folder import load_run, require_finished

MAX_TICK_LABELS = 60  # beyond this many genes, tick labels overlap into a black bar
POSITIVE, NEGATIVE = "tab:red", "tab:blue"
FIGSIZE = {"elbo": (7, 4), "network": (7, 7), "ppc": (5, 5), "trajectories": (6, 4)}
TYPE_COLOURS = {"additive": "0.75", "synergistic": "tab:red", "buffering": "tab:blue", "epistatic": "tab:purple",
                "neomorphic": "tab:orange"}
MAX_TRAJECTORIES = 8  # genes drawn per condition by default: more lines than colours blur together


def _axes(ax: Axes | None, figsize: tuple[float, float]) -> Axes:
    """``ax``, or the axes of a new pyplot figure (shown inline in a notebook)."""
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize, layout="constrained")[1]


def _heatmap_size(n_genes: int) -> tuple[float, float]:
    size = min(12.0, 4.0 + 0.25 * n_genes)
    return size + 1.5, size


def _forest_size(n_rows: int) -> tuple[float, float]:
    return 8.0, 1.0 + 0.35 * n_rows


def plot_elbo(elbo: np.ndarray, *, ax: Axes | None = None) -> Axes:
    """ELBO trace, shape (steps,): ``-ELBO`` on a log scale when it stays positive, else the ELBO
    on a linear scale clipped to its settled range; a running mean smooths minibatch noise."""
    elbo = np.asarray(elbo, float)
    steps = np.arange(elbo.size)
    window = max(1, elbo.size // 50)
    smooth = pd.Series(elbo).rolling(window, min_periods=1).mean().to_numpy()
    ax = _axes(ax, FIGSIZE["elbo"])
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
    return ax


def plot_edge_heatmap(summary: xr.Dataset, *, ax: Axes | None = None) -> Axes:
    """Edge probability signed by the posterior mean effect, source (rows) x target (columns).

    ``summary`` is CLIPR's (source, target) edge summary (``edge_summary``).
    """
    summary = summary.transpose("source", "target")
    signed = (summary["prob_edge"] * np.sign(summary["mean"])).values
    sources = summary["source"].values.astype(str)
    targets = summary["target"].values.astype(str)
    ax = _axes(ax, _heatmap_size(len(targets)))
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
    ax.figure.colorbar(image, ax=ax, shrink=0.8, label="signed edge probability")
    return ax


def plot_forest(effects: xr.Dataset, table: pd.DataFrame, *, top: int = 20, hdi_prob: float = 0.9,
                ax: Axes | None = None) -> Axes:
    """Forest plot of the ``top`` first edges of ``table``: posterior mean (dot), 50% HDI (thick)
    and ``hdi_prob`` HDI (thin) of each effect, the first edge on top.

    Parameters
    ----------
    effects : xarray.Dataset
        CLIPR draws, ``effect`` with dims (chain, draw, source, target).
    table : pandas.DataFrame
        Edge table (``edge_table``), most probable edges first.
    """
    rows = table.head(top)
    ax = _axes(ax, _forest_size(len(rows)))
    # Vectorized selection of (source, target) pairs onto one "edge" dim, one forest row each.
    pairs = {"source": xr.DataArray(rows["source"].to_numpy(), dims="edge"),
             "target": xr.DataArray(rows["target"].to_numpy(), dims="edge")}
    draws = effects["effect"].sel(pairs).transpose("chain", "draw", "edge")
    position = np.arange(len(rows))[::-1]  # (edges,): the most probable edge on top
    for prob, width in ((hdi_prob, 1.2), (0.5, 3.5)):
        interval = az.hdi(draws, prob=prob)
        ax.hlines(position, interval.sel(ci_bound="lower").values, interval.sel(ci_bound="upper").values,
                  color="k", lw=width)
    ax.plot(draws.mean(("chain", "draw")).values, position, "o", color="white", mec="k", ms=5, zorder=3)
    ax.axvline(0.0, color="0.6", lw=0.8, ls="--", zorder=0)
    ax.set_yticks(position, [f"{s} → {t}" for s, t in zip(rows["source"], rows["target"])])
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_xlabel("effect of source on target (CLIPR)")
    ax.set_title(f"Strongest edges: posterior mean, 50% and {hdi_prob:.0%} HDI")
    return ax


def plot_network(table: pd.DataFrame, genes: list[str], *, prob_threshold: float = 0.9,
                 ax: Axes | None = None) -> Axes:
    """Causal network of the edges with ``prob_edge >= prob_threshold``: genes on a circle,
    arrows source -> target, red for activation and blue for repression, width by ``|mean|``."""
    edges = table[table["prob_edge"] >= prob_threshold]
    shown = list(genes)
    if len(shown) > MAX_TICK_LABELS:  # many genes: only those with an edge, or the circle is a blur
        involved = set(edges["source"]) | set(edges["target"])
        shown = [g for g in genes if g in involved]
    angle = 2 * np.pi * np.arange(len(shown)) / max(len(shown), 1)
    position = {g: (np.cos(a), np.sin(a)) for g, a in zip(shown, angle)}

    ax = _axes(ax, FIGSIZE["network"])
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
    return ax


def plot_ppc(table: pd.DataFrame, *, ax: Axes | None = None) -> Axes:
    """Predicted against observed mean shift from control, every gene of every perturbed training
    condition (grey; each condition's top-DE genes red): a fit that reproduces its data lies on the
    diagonal, a collapsed one on the horizontal line at 0.

    ``table`` is a posterior predictive check (``lcd_bayes.analysis.ppc``) with its
    ``attrs["mean_shifts"]``.
    """
    shifts = table.attrs["mean_shifts"]
    observed, predicted = np.asarray(shifts.observed), np.asarray(shifts.predicted)
    top = np.zeros(observed.shape, dtype=bool)
    if observed.size:
        np.put_along_axis(top, np.asarray(shifts.top_de), True, axis=1)
    ax = _axes(ax, FIGSIZE["ppc"])
    ax.scatter(observed[~top], predicted[~top], s=5, color="0.6", lw=0, label="genes")
    ax.scatter(observed[top], predicted[top], s=8, color=POSITIVE, lw=0, label="top-DE genes of each condition")
    values = np.concatenate([observed.ravel(), predicted.ravel()])
    values = values[np.isfinite(values)]
    low, high = (values.min(), values.max()) if values.size else (-1.0, 1.0)
    pad = 0.05 * (high - low) or 0.1
    limits = (low - pad, high + pad)
    ax.plot(limits, limits, color="k", lw=0.8, ls="--")
    ax.axhline(0.0, color="0.6", lw=0.8, ls=":")  # where a fit that predicts no effect lies
    ax.set_xlim(limits), ax.set_ylim(limits)  # one scale on both axes: the diagonal is "reproduced"
    ax.set_xlabel("observed mean shift from control")
    ax.set_ylabel("predicted mean shift from control")
    median = table.attrs["aggregate"]["median"].get("pearson_delta_top_de", float("nan"))
    ax.set_title(f"Posterior predictive check: {observed.shape[0]} perturbed training conditions\n"
                 f"median correlation of the top-DE shifts {median:.2f}")
    ax.legend(frameon=False, fontsize=8, loc="upper left")
    return ax


def plot_ppc_correlations(table: pd.DataFrame, *, ax: Axes | None = None) -> Axes:
    """Per perturbed training condition, the correlation of predicted and observed top-DE shifts
    (black) beside that of two halves of the observed cells (open grey: what the data reproduce
    of themselves), with the warning's threshold (dashed)."""
    rows = table[table["pearson_delta_top_de"].notna() | table["split_half_top_de"].notna()]  # not the control
    position = np.arange(len(rows))[::-1]  # the first condition on top
    ax = _axes(ax, _forest_size(len(rows)))
    ax.plot(rows["split_half_top_de"], position, "o", mfc="none", mec="0.5", ms=5, label="observed halves")
    ax.plot(rows["pearson_delta_top_de"], position, "o", color="k", ms=4, label="predicted vs observed")
    ax.axvline(MIN_TOP_DE_CORRELATION, color=NEGATIVE, lw=0.8, ls="--", label="warning threshold")
    if len(rows) <= MAX_TICK_LABELS:
        ax.set_yticks(position, rows["condition"].astype(str))
    ax.set_xlim(-1.05, 1.05)
    ax.set_xlabel("Pearson correlation of the top-DE mean shifts")
    ax.set_title("Per training condition")
    ax.legend(frameon=False, fontsize=8, loc="best")
    return ax


def _ppc_of(run) -> pd.DataFrame:
    """The posterior predictive check of a run or run folder (its ``ppc`` group)."""
    if isinstance(run, (str, Path)):
        tree = load_run(run)[0]
        table = ppc_table(tree[PPC_GROUP]) if PPC_GROUP in tree.children else None
    else:
        table = run.ppc
    if table is None:
        raise ValueError("this run holds no posterior predictive check: it was fitted with [fit] ppc = false, or "
                         "before lcd-bayes made one; lcd_bayes.analysis.ppc.posterior_predictive_check makes it "
                         "from the training data")
    return table


def ppc(run, *, ax: Axes | None = None) -> Axes:
    """Predicted against observed mean shifts of a run's training conditions (``plot_ppc``)."""
    return plot_ppc(_ppc_of(run), ax=ax)


def ppc_correlations(run, *, ax: Axes | None = None) -> Axes:
    """Each training condition's top-DE shift correlation of a run (``plot_ppc_correlations``)."""
    return plot_ppc_correlations(_ppc_of(run), ax=ax)


def save_ppc(run, path: str | Path) -> Path:
    """Write the posterior predictive check's figure: ``plot_ppc`` and ``plot_ppc_correlations``
    side by side. ``run`` is a run, a run folder or the check's table itself."""
    table = run if isinstance(run, pd.DataFrame) else _ppc_of(run)
    width, height = FIGSIZE["ppc"]
    height = min(max(height, _forest_size(len(table))[1]), 3 * height)  # many conditions: no labels, a strip
    figure = Figure(figsize=(2 * width + 1, height), layout="constrained")
    left, right = figure.subplots(1, 2)
    plot_ppc(table, ax=left)
    plot_ppc_correlations(table, ax=right)
    with atomic_write(path) as tmp:
        figure.savefig(tmp, dpi=120)
    return Path(path)


def plot_trajectories(table: pd.DataFrame, *, condition: str | None = None, genes=None,
                      ax: Axes | None = None) -> Axes:
    """One condition's predicted mean trajectory per gene: the posterior median of the expected
    expression against the time since the perturbation switched on, with its 90% band.

    ``table``: a trajectory table (``lcd_bayes.analysis.predict.trajectory_table``). ``condition``
    defaults to the first one in it; ``genes`` to the ``MAX_TRAJECTORIES`` that move most between
    the first and the last time.
    """
    condition = str(table["condition"].iloc[0]) if condition is None else condition
    rows = table[table["condition"] == condition]
    if rows.empty:
        raise ValueError(f"condition {condition!r} is not in the trajectory table (it holds "
                         f"{', '.join(map(repr, table['condition'].unique()))})")
    by_gene = {gene: part.sort_values("time") for gene, part in rows.groupby("gene", sort=False)}
    if genes is None:
        moved = {gene: abs(part["q50"].iloc[-1] - part["q50"].iloc[0]) for gene, part in by_gene.items()}
        genes = sorted(moved, key=moved.get, reverse=True)[:MAX_TRAJECTORIES]
    missing = [gene for gene in genes if gene not in by_gene]
    if missing:
        raise ValueError(f"genes {missing[:5]} are not in the trajectory table")
    ax = _axes(ax, FIGSIZE["trajectories"])
    for gene in genes:
        part = by_gene[gene]
        line, = ax.plot(part["time"], part["q50"], "o-", ms=3, lw=1.2, label=str(gene))
        ax.fill_between(part["time"], part["q05"], part["q95"], color=line.get_color(), alpha=0.2, lw=0)
    ax.set_xlabel("time since the perturbation switched on (model units)")
    ax.set_ylabel("expected expression (median, 90% interval)")
    ax.set_title(f"{condition}: predicted time course")
    ax.legend(frameon=False, fontsize=8, loc="best", ncol=2 if len(genes) > 4 else 1)
    return ax


def trajectories(prediction, *, condition: str | None = None, genes=None, ax: Axes | None = None) -> Axes:
    """The predicted time course of one condition per gene (``plot_trajectories``); ``prediction``
    is an AnnData from ``predict(..., times=...)`` or its trajectory table."""
    table = prediction if isinstance(prediction, pd.DataFrame) else trajectory_table(prediction)
    return plot_trajectories(table, condition=condition, genes=genes, ax=ax)


def save_trajectories(prediction, path: str | Path) -> Path:
    """Write the time courses of every condition of a prediction made with ``times`` (or of its
    trajectory table), one panel per condition, as a PNG."""
    table = prediction if isinstance(prediction, pd.DataFrame) else trajectory_table(prediction)
    conditions = list(dict.fromkeys(table["condition"]))
    width, height = FIGSIZE["trajectories"]
    figure = Figure(figsize=(width, height * len(conditions)), layout="constrained")
    for condition, ax in zip(conditions, np.atleast_1d(figure.subplots(len(conditions), 1, squeeze=False)[:, 0])):
        plot_trajectories(table, condition=condition, ax=ax)
    figure.savefig(path, dpi=120)
    return Path(path)


def plot_interaction_types(table: pd.DataFrame, *, ax: Axes | None = None) -> Axes:
    """Each double's posterior probability of each interaction type, as one stacked bar per
    double; where the table has the observed decomposition, its type is written at the bar's end.

    ``table``: an interaction table (``lcd_bayes.analysis.interactions.interaction_table``)."""
    ax = _axes(ax, _forest_size(len(table)))
    rows = np.arange(len(table))[::-1]
    left = np.zeros(len(table))
    for kind in INTERACTION_TYPES:
        width = table[f"prob_{kind}"].fillna(0).to_numpy()
        ax.barh(rows, width, left=left, color=TYPE_COLOURS[kind], label=kind, height=0.7)
        left += width
    if "observed_type" in table:
        for row, observed in zip(rows, table["observed_type"]):
            if isinstance(observed, str):
                ax.text(1.02, row, f"observed: {observed}", va="center", fontsize=8)
    ax.set_yticks(rows, table["double"])
    ax.set_xlim(0, 1.45 if "observed_type" in table else 1)
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1])
    ax.set_xlabel("posterior probability of the interaction type")
    ax.legend(frameon=False, fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(INTERACTION_TYPES))
    return ax


def plot_interaction_magnitudes(table: pd.DataFrame, *, ax: Axes | None = None) -> Axes:
    """Each double's magnitude ``sqrt(c_A^2 + c_B^2)`` relative to an additive double's
    ``sqrt(2)``: posterior median with its 90% interval, the observed value as a cross where the table
    has it, and the synergy and buffering thresholds as dashed lines (log scale)."""
    ax = _axes(ax, _forest_size(len(table)))
    rows = np.arange(len(table))[::-1]
    additive = np.sqrt(2.0)
    median, low, high = (table[c].to_numpy() / additive for c in ("magnitude", "magnitude_low", "magnitude_high"))
    ax.hlines(rows, low, high, color="0.3", lw=2)
    ax.plot(median, rows, "o", color="0.1", ms=5, label="posterior median, 90% interval")
    if "observed_magnitude" in table:
        ax.plot(table["observed_magnitude"].to_numpy() / additive, rows, "x", color="tab:green", ms=7, mew=2,
                label="observed")
    ax.axvline(1.0, color="0.6", lw=1)
    for threshold, kind in ((SYNERGY, "synergistic"), (BUFFERING, "buffering")):
        ax.axvline(threshold, color=TYPE_COLOURS[kind], lw=1, ls="--")
    ax.set_xscale("log")
    ticks = [0.25, 0.5, BUFFERING, 1.0, SYNERGY, 2.0, 4.0]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    observed = table["observed_magnitude"].to_numpy() / additive if "observed_magnitude" in table else []
    values = np.concatenate([low, high, observed, [BUFFERING, SYNERGY]]).astype(float)
    values = values[np.isfinite(values) & (values > 0)]
    ax.set_xlim(values.min() / 1.1, values.max() * 1.1)
    ax.set_yticks(rows, table["double"])
    ax.set_xlabel("magnitude / sqrt(2)  (1: additive)")
    ax.legend(frameon=False, fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2)
    return ax


def interactions(table, *, ax: Axes | None = None) -> Axes:
    """The interaction types (``plot_interaction_types``) of a table from ``Run.interactions``,
    or of a run folder's ``interactions.csv`` (written by ``lcd-bayes interactions``)."""
    if isinstance(table, (str, Path)):
        path = Path(table) / "interactions.csv"
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: run `lcd-bayes interactions {table}` first")
        table = pd.read_csv(path)
    return plot_interaction_types(table, ax=ax)


def save_interactions(table: pd.DataFrame, path: str | Path) -> Path:
    """Write the type probabilities and the magnitudes of every double side by side as a PNG."""
    figure = Figure(figsize=(13.0, 1.5 + 0.35 * len(table)), layout="constrained")
    left, right = figure.subplots(1, 2, sharey=True)
    plot_interaction_types(table, ax=left)
    plot_interaction_magnitudes(table, ax=right)
    with atomic_write(path) as tmp:
        figure.savefig(tmp, dpi=120)
    return Path(path)


def _clipr_of(run) -> xr.DataTree:
    """The CLIPR tree (``posterior``: effect draws, ``edges``: summary) of a run or run folder."""
    return load_clipr(run) if isinstance(run, (str, Path)) else run.clipr


def elbo(run, *, ax: Axes | None = None) -> Axes:
    """The ELBO trace (``plot_elbo``) of a run (its ``losses``, the negative ELBO per step) or a
    run folder (``elbo.csv``)."""
    if isinstance(run, (str, Path)):
        require_finished(run)
        values = pd.read_csv(Path(run) / "elbo.csv")["elbo"].to_numpy()
    else:
        values = -np.asarray(run.losses)
    return plot_elbo(values, ax=ax)


def edge_heatmap(run, *, tau: float | None = None, hdi_prob: float | None = None, ax: Axes | None = None) -> Axes:
    """Signed edge probabilities of a run or run folder, source x target (``plot_edge_heatmap``);
    ``tau`` defaults to CLIPR's (``lcd_bayes.analysis.clipr.default_tau``)."""
    return plot_edge_heatmap(summary_at(_clipr_of(run), tau=tau, hdi_prob=hdi_prob), ax=ax)


def forest(run, *, top: int = 20, hdi_prob: float | None = None, ax: Axes | None = None) -> Axes:
    """The ``top`` most probable edges of a run or run folder with their intervals (``plot_forest``)."""
    clipr = _clipr_of(run)
    summary = summary_at(clipr, hdi_prob=hdi_prob)
    return plot_forest(clipr["posterior"].to_dataset(), summary_to_table(summary), top=top,
                       hdi_prob=summary.attrs.get("hdi_prob", 0.9), ax=ax)


def network(run, *, prob_threshold: float = 0.9, tau: float | None = None, ax: Axes | None = None) -> Axes:
    """The causal network of a run or run folder: edges with ``prob_edge >= prob_threshold``
    (``plot_network``)."""
    summary = summary_at(_clipr_of(run), tau=tau)
    return plot_network(summary_to_table(summary), [str(g) for g in summary["source"].values],
                        prob_threshold=prob_threshold, ax=ax)


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
    genes = [str(g) for g in summary["source"].values]
    figures = {
        "edge_heatmap.png": (_heatmap_size(len(genes)), lambda ax: plot_edge_heatmap(summary, ax=ax)),
        "forest.png": (_forest_size(min(top, len(table))), lambda ax: plot_forest(
            effects, table, top=top, hdi_prob=summary.attrs.get("hdi_prob", 0.9), ax=ax)),
        "network.png": (FIGSIZE["network"], lambda ax: plot_network(table, genes, prob_threshold=prob_threshold,
                                                                     ax=ax)),
    }
    if (folder / "elbo.csv").exists():
        figures = {"elbo.png": (FIGSIZE["elbo"], lambda ax: elbo(folder, ax=ax)), **figures}
    written = []
    for name, (size, draw) in figures.items():
        figure = Figure(figsize=size, layout="constrained")
        draw(figure.add_subplot())
        with atomic_write(folder / name) as tmp:
            figure.savefig(tmp, dpi=120)
        written.append(folder / name)
    return written
