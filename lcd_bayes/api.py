"""The Python API: fit a screen in memory, read its causal edges, predict conditions, save and load.

    import lcd_bayes as lb
    run = lb.fit(adata)                      # or lb.fit("screen.h5ad", out="runs/screen")
    run.edges().head()                       # CLIPR edges, most probable first
    cells = run.predict(["G1+G2", "G3"])     # AnnData of predicted cells
    lb.pl.forest(run)                        # figures take a run (or a run folder) and ``ax=``
    run.save("runs/screen"); run = lb.load("runs/screen")

The command line (``lcd_bayes.cli``) is a thin layer over the same functions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import xarray as xr

from .analysis.clipr import clipr_posterior, summary_at, summary_to_table
from .calibration import calibration_check, write_calibration
from .analysis.interactions import interactions as interaction_types
from .analysis.predict import DEFAULT_CELL_DRAWS, predict_posterior
from .config import RunConfig
from .analysis.evaluation import evaluate
from .analysis.ppc import GROUP as PPC_GROUP
from .analysis.ppc import ppc_table
from .files import atomic_write
from .io.run_folder import data_record, load_datatree, load_run, read_h5ad, save_datatree, start_run_folder, write_run
from .pl import save_interactions
from .run import fit as fit_to_folder
from .run import write_ppc
from .sim.linear import simulate

__all__ = ["Run", "fit", "load", "edges", "predict", "simulate", "evaluate"]

EDGE_KEYS = ("prob_edge", "mean")  # what ``Run.edges(adata=...)`` writes to ``adata.varp``


@dataclass
class Run:
    """A fitted screen: its posterior and how it was made.

    ``posterior`` is the fit's ArviZ DataTree (groups ``posterior``, ``constant_data``, ``svi``,
    ``ppc`` and, after a Laplace refinement, ``guide_posterior``), ``config`` the settings used and
    ``record`` how the data were read (genes, conditions, labels). ``folder`` is where the run
    lives on disk, if anywhere.
    """

    posterior: xr.DataTree
    config: RunConfig
    record: dict
    folder: Path | None = None
    _clipr: xr.DataTree | None = field(default=None, repr=False)

    @property
    def genes(self) -> list[str]:
        return list(self.record["genes"])

    @property
    def conditions(self) -> list[str]:
        return list(self.record["conditions"])

    @property
    def batches(self) -> list[str] | None:
        """The batch names of ``obs[batch_key]`` the run was fitted with; None without batches (no
        ``batch_key``, one batch, or a run folder written before batches were recorded)."""
        batches = self.record.get("batches")
        return None if batches is None else list(batches)

    @property
    def losses(self) -> np.ndarray:
        """The negative ELBO at every SVI step."""
        return self.posterior["svi"]["loss"].values if "svi" in self.posterior.children else np.zeros(0)

    @property
    def clipr(self) -> xr.DataTree:
        """CLIPR on the posterior with the default settings (``posterior``: the ``effect`` draws,
        ``edges``: their summary), computed on first use and kept; a run folder's ``clipr.nc`` is
        read if it is there, and written (with ``edges.csv``) if not."""
        if self._clipr is None:
            stored = self.folder / "clipr.nc" if self.folder is not None else None
            if stored is not None and stored.exists():
                self._clipr = load_datatree(stored)
            else:
                self._clipr, table = clipr_posterior(self.posterior, self.config)
                if stored is not None:
                    save_datatree(self._clipr, stored)
                    with atomic_write(self.folder / "edges.csv") as tmp:
                        table.to_csv(tmp, index=False)
        return self._clipr

    @property
    def ppc(self) -> pd.DataFrame | None:
        """The posterior predictive check made after the fit (``lcd_bayes.analysis.ppc``): one row
        per training condition, how well the posterior reproduces its cells (``ppc.csv`` of the run
        folder); the medians over perturbed conditions in ``attrs["aggregate"]``. None for a run
        fitted with ``[fit] ppc = false``."""
        return ppc_table(self.posterior[PPC_GROUP]) if PPC_GROUP in self.posterior.children else None

    def edges(self, *, tau: float | None = None, hdi_prob: float | None = None,
              adata: anndata.AnnData | None = None) -> pd.DataFrame:
        """Every ordered gene pair's causal effect (CLIPR): ``source, target, mean, sd, hdi_low,
        hdi_high, prob_edge, prob_positive, prob_negative``, most probable edges first.

        ``prob_edge`` is the posterior probability that ``|effect| > tau`` (``tau``: CLIPR's
        default, in ``table.attrs``); the HDI holds ``hdi_prob`` (0.9) of the posterior. With
        ``adata``, the (source, target) matrices of ``prob_edge`` and the posterior mean effect are
        also written to ``adata.varp["lcd_bayes_prob_edge"]`` and ``adata.varp["lcd_bayes_mean"]``
        (rows: source gene, columns: target gene; NaN for pairs outside the modelled genes, which
        must all be in ``adata.var_names``), with the settings in ``adata.uns["lcd_bayes_edges"]``.
        """
        summary = summary_at(self.clipr, tau=tau, hdi_prob=hdi_prob)
        if adata is not None:
            _write_varp(adata, summary)
        return summary_to_table(summary)

    def predict(self, perturbations, *, n_cells: int = 100, n_draws: int = DEFAULT_CELL_DRAWS,
                seed: int = 0, times=None, batch: str | None = None) -> anndata.AnnData:
        """Predicted cells of each condition in ``perturbations`` (``"A+B,C"`` or a list of
        labels: combinations of trained labels, or single perturbations of modelled genes), with
        per-gene expected expression and its 90% interval in ``varm``
        (``lcd_bayes.analysis.predict.predict_posterior``). ``times`` (``"0.1,1,5"`` or
        numbers): cells at those times after the perturbation switches on in control cells
        (``obs["time"]``), and the mean trajectory's table in ``uns["lcd_bayes"]["trajectories"]``.
        ``batch``: of a run fitted with a batch key, the batch to predict; by default the cells'
        batches are drawn in proportion to the training cells' (``obs["batch"]``)."""
        name = str(self.folder.resolve()) if self.folder is not None else "in memory"
        return predict_posterior(self.posterior, self.config, self.record, perturbations, n_cells=n_cells,
                                 n_draws=n_draws, seed=seed, run_name=name, times=times, batch=batch)

    def calibrate(self, replicates: int = 3, *, seed: int = 0, progress: bool = True) -> pd.DataFrame:
        """How often CLIPR's 50% / 90% intervals hold the truth on ``replicates`` screens drawn from
        this fit's posterior, each refitted with its settings (``lcd_bayes.calibration``; one fit
        per replicate). One row per screen, the means in ``attrs["mean"]``; a run folder gets
        ``calibration.csv``."""
        table = calibration_check(self.posterior, self.config, self.record, replicates=replicates, seed=seed,
                                  progress=progress)
        if self.folder is not None:
            write_calibration(self.folder, table)
        return table

    def interactions(self, doubles=None, *, observed: anndata.AnnData | str | Path | None = None,
                     seed: int = 0) -> pd.DataFrame:
        """Each double's genetic-interaction type with its posterior probability
        (``lcd_bayes.analysis.interactions``: Norman et al. 2019's decomposition of the double's
        shift on its singles'): one row per double of ``doubles`` (``"A+B,C+D"`` or a list; None:
        every double in training), with each score's posterior median and 90% interval, ``prob_<type>`` for
        additive, synergistic, buffering, epistatic and neomorphic, the most probable ``type`` and
        the ``dominant`` single of an epistatic double. ``observed`` (AnnData or .h5ad path with the
        double's, its singles' and control cells) adds the observed decomposition. A run folder gets
        ``interactions.csv`` and ``interactions.png``."""
        if isinstance(observed, (str, Path)):
            observed = read_h5ad(observed)
        table = interaction_types(self.posterior, self.config, self.record, doubles, observed=observed, seed=seed)
        if self.folder is not None:
            with atomic_write(self.folder / "interactions.csv") as tmp:
                table.to_csv(tmp, index=False)
            save_interactions(table, self.folder / "interactions.png")
        return table

    def save(self, folder: str | Path) -> Path:
        """Write the run folder (``config.toml``, ``data.json``, ``posterior.nc``, ``elbo.csv``,
        ``summary.txt``, ``ppc.csv`` with ``ppc.png``, and ``clipr.nc`` with ``edges.csv`` once
        CLIPR has run) and return it; ``lb.load(folder)`` reads it back. Refuses a folder that
        already holds a finished fit."""
        folder = Path(folder)
        start_run_folder(folder, self.config, self.record)
        write_ppc(folder, self.posterior)
        if self._clipr is not None:
            save_datatree(self._clipr, folder / "clipr.nc")
            with atomic_write(folder / "edges.csv") as tmp:
                self.edges().to_csv(tmp, index=False)
        write_run(folder, self.posterior)  # posterior.nc last: it marks the run finished
        self.folder = folder
        return folder

    def __repr__(self) -> str:
        attrs = self.posterior["posterior"].attrs
        where = f", folder={str(self.folder)!r}" if self.folder is not None else ""
        return (f"Run({len(self.genes)} genes, {len(self.conditions)} conditions, {attrs.get('n_cells', '?')} cells, "
                f"{self.config.model.likelihood} likelihood, {self.config.model.drift} drift, "
                f"{attrs.get('inference', 'SVI')}{where})")


def _write_varp(adata: anndata.AnnData, summary: xr.Dataset) -> None:
    genes = [str(g) for g in summary["source"].values]
    missing = [g for g in genes if g not in adata.var_names]
    if missing:
        raise ValueError(f"{len(missing)} modelled genes are not in adata.var_names (e.g. {missing[:3]}); pass the "
                         "AnnData the run was fitted on, or one that holds every modelled gene")
    index = adata.var_names.get_indexer(genes)
    for key in EDGE_KEYS:
        matrix = np.full((adata.n_vars, adata.n_vars), np.nan)
        matrix[np.ix_(index, index)] = summary[key].transpose("source", "target").values
        adata.varp[f"lcd_bayes_{key}"] = matrix
    adata.uns["lcd_bayes_edges"] = {"genes": genes, "tau": float(summary.attrs["tau"]),
                                    "hdi_prob": float(summary.attrs["hdi_prob"]), "rows": "source", "columns": "target"}


def fit(adata: anndata.AnnData | str | Path, out: str | Path | None = None, **settings) -> Run:
    """Fit the latent causal diffusion to a screen and return the ``Run``.

    ``adata`` is an AnnData (raw counts in ``X`` or ``layer``, the perturbation labels in
    ``obs["condition"]``, control cells labelled ``"ctrl"``, combinations ``"A+B"``) or a path
    to ``.h5ad``. With ``out`` the run folder is written as the fit goes (an interrupted fit
    resumes from its checkpoint when called again). ``settings`` are ``lcd_bayes.run.fit``'s:
    ``config`` (a shipped configuration's name, a TOML file or a ``RunConfig``),
    ``perturbation_key``, ``control``, ``sep``, ``targets``, ``likelihood`` ("nb", "poisson",
    "gaussian"), ``layer``, ``genes``, ``n_top_genes``, ``gene_ranking`` ("response",
    "variance", "dispersion"), ``predict_targets`` (conditions to predict, whose targets join the
    ``n_top_genes`` panel first), ``total_counts_key``, ``size_factor_key``, ``batch_key`` (the obs
    column of each cell's batch: lane, replicate, donor), ``steps``, ``seed``,
    ``refine`` ("auto", "laplace", "nuts", "none"), ``restart`` (discard an unfinished fit in ``out``),
    ``progress``. With ``n_top_genes`` pass the
    training cells only: the panel is ranked on every cell given.
    """
    fitted = fit_to_folder(adata, out, **settings)
    return Run(fitted.posterior, fitted.config, data_record(fitted.data), fitted.folder)


def load(folder: str | Path) -> Run:
    """The ``Run`` saved in a run folder (by ``lcd-bayes fit``, ``fit(..., out=)`` or ``Run.save``)."""
    tree, config, record = load_run(folder)
    return Run(tree, config, record, Path(folder))


def _as_run(run: Run | str | Path) -> Run:
    return run if isinstance(run, Run) else load(run)


def edges(run: Run | str | Path, **options) -> pd.DataFrame:
    """``Run.edges`` of a run or run folder."""
    return _as_run(run).edges(**options)


def predict(run: Run | str | Path, perturbations, **options) -> anndata.AnnData:
    """``Run.predict`` of a run or run folder."""
    return _as_run(run).predict(perturbations, **options)
