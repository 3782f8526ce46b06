"""What a fit reads before any model code runs: its settings, its run folder, its screen.

Everything here is free of JAX, numpyro and ArviZ, whose imports take seconds: the command line
reads a fit's inputs first, so that a bad setting, an unusable ``--out`` or bad data are refused
in about a second, and loads the model only for inputs that can be fitted.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import anndata

from ..config import RunConfig, load_config
from .run_folder import check_out_folder, read_h5ad
from .screen import PerturbationData, load_perturbation_data, read_targets


class FitInputs(NamedTuple):
    """A fit's settings (before the fit resolves its automatic ones), the AnnData, the screen read
    from it, and the run folder (None: in memory)."""

    config: RunConfig
    adata: anndata.AnnData
    screen: PerturbationData
    folder: Path | None


def read_screen(adata: anndata.AnnData, config: RunConfig) -> PerturbationData:
    """The screen as ``config``'s ``[data]`` section (and its likelihood) reads it: what a run's
    ``config.toml`` repeats, the gene panel included."""
    reading = config.data
    return load_perturbation_data(
        adata, perturbation_key=reading.perturbation_key, control=reading.control, sep=reading.sep,
        layer=reading.layer, targets=reading.target_map(),
        genes=None if reading.genes is None else list(reading.genes), n_top_genes=reading.n_top_genes,
        gene_ranking=reading.gene_ranking,
        predict_targets=None if reading.predict_targets is None else list(reading.predict_targets),
        continuous=config.model.likelihood == "gaussian",
        total_counts_key=reading.total_counts_key, size_factor_key=reading.size_factor_key,
        batch_key=reading.batch_key,
    )


def fit_inputs(
    adata: anndata.AnnData | str | Path,
    out: str | Path | None = None,
    *,
    config: RunConfig | str | Path | None = None,
    likelihood: str | None = None,
    steps: int | None = None,
    seed: int | None = None,
    refine: str | None = None,
    targets: dict | str | Path | None = None,
    **reading,
) -> FitInputs:
    """Check ``out`` (writes nothing), make the settings (``config`` with the arguments given,
    ``reading`` being ``[data]`` keys such as ``perturbation_key`` or ``n_top_genes``), and read the
    screen; ``lcd_bayes.run.fit`` documents the arguments."""
    folder = Path(out) if out is not None else None
    if folder is not None:
        check_out_folder(folder)
    settings = config if isinstance(config, RunConfig) else load_config(config)
    if isinstance(targets, (str, Path)):
        targets = read_targets(targets)  # recorded by content, so that config.toml needs no other file
    settings = settings.replace(model={"likelihood": likelihood}, fit={"steps": steps, "seed": seed, "refine": refine},
                                data={"targets": targets, **reading})
    if isinstance(adata, (str, Path)):
        adata = read_h5ad(adata)
    return FitInputs(settings, adata, read_screen(adata, settings), folder)
