"""Does a fit's posterior hold the truth as often as it says? A check a user runs on their own fit.

Simulation-based calibration in its cheap form (Cook, Gelman & Rubin 2006; Talts et al. 2018):
each replicate takes one posterior draw as the truth, draws a screen of the run's design from it
(its conditions, genes and targets, about as many cells per condition, through the fitted
generative program, as ``predict`` draws cells), fits that screen with the run's own settings,
and scores the refit's CLIPR intervals against the drawn truth's effects. Where the method is
calibrated for screens like this one, the 50% / 90% intervals hold about 50% / 90% of the true
effects; far fewer means they are too narrow for this screen's size and noise
(docs/inference.md, "What calibrated means here"). Each replicate costs one fit.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import anndata
import numpy as np
import pandas as pd

from .analysis.clipr import DEFAULT_TAU_FRACTION, clipr_posterior
from .analysis.predict import predict_posterior
from .analysis.recovery import clipr_scores
from .config import DataConfig, RunConfig
from .diagnostics import DataError
from .files import atomic_write
from .inference.posterior import stacked_draws
from .io.run_folder import load_run
from .run import fit
from .sim.graphs import effect_matrix

# The obs column of each simulated cell's library size, which ``predict`` writes.
SIMULATED_LIBRARY_KEY = "size_factor"
# ... and of its batch (a run fitted with batches draws each cell's batch as the screen's were).
SIMULATED_BATCH_KEY = "batch"
COLUMNS = ("replicate", "draw", "n_edges", "coverage50_all", "coverage90_all", "coverage50_edges",
           "coverage90_edges", "edge_abs_z_median", "edge_slope", "sign_accuracy")


def replicate_screen(tree, config: RunConfig, record: dict, *, seed: int) -> tuple[anndata.AnnData, int, np.ndarray]:
    """A screen drawn from one posterior draw (chosen by ``seed``): every training condition with
    the median of the training conditions' cell counts; the draw's index and its drift."""
    n_cells = max(int(np.median(record["cells_per_condition"])), 2)
    cells = predict_posterior(tree, config, record, list(record["conditions"]), n_cells=n_cells, n_draws=1,
                              seed=seed, summaries=False)
    draw = int(cells.obs["draw"].iloc[0])
    drift = stacked_draws(tree[cells.uns["lcd_bayes"]["draws_from"]]["drift"])[draw]
    return cells, draw, np.asarray(drift, dtype=float)


def refit_config(config: RunConfig, record: dict, seed: int) -> RunConfig:
    """The run's own settings for a screen drawn from it: the same model and fit, the data read
    as the simulated AnnData holds them (every gene, the run's targets, the simulated library
    sizes where the run's were observed, the batches its cells were drawn in where the run has
    them). No check of its own or cell log-likelihoods."""
    observed = config.model.likelihood != "gaussian" and config.model.library != "latent"
    data = DataConfig(perturbation_key=record["perturbation_key"], control=record["control"], sep=record["sep"],
                      size_factor_key=SIMULATED_LIBRARY_KEY if observed else None,
                      batch_key=SIMULATED_BATCH_KEY if record.get("batches") else None,
                      targets={label: genes for label, genes in record["targets"].items() if genes} or None)
    return dataclasses.replace(config, data=data).replace(fit={"seed": seed, "ppc": False, "log_likelihood": False})


def calibration_check(tree, config: RunConfig, record: dict, *, replicates: int = 3, seed: int = 0,
                      progress: bool = True) -> pd.DataFrame:
    """Coverage of the 50% / 90% intervals of CLIPR's effects on ``replicates`` screens drawn from
    the fit (``tree``, ``config``, ``record``: what a run folder holds, ``io.run_folder.load_run``).

    Returns one row per replicate (``COLUMNS``): the posterior draw taken as the truth, coverage
    over all ordered gene pairs and over the edges (true effects larger than CLIPR's default
    ``tau``, a tenth of the truth's median self-decay), the edges' median ``|z|`` (posterior
    mean's error in posterior sds; 0.67 when calibrated) and slope of the posterior mean on the
    truth (1 when unbiased), and the sign accuracy on the edges. ``attrs["mean"]`` holds the
    means over replicates.
    """
    if int(replicates) < 1:
        raise ValueError(f"replicates (CLI --replicates) must be a positive number of refits, not {replicates}")
    if config.model.drift != "linear":
        raise DataError("the calibration check compares effects with a drawn linear drift; this run's drift is "
                        f"{config.model.drift!r}. Check a linear fit of the same screen instead")
    rows = []
    for replicate in range(int(replicates)):
        cells, draw, drift = replicate_screen(tree, config, record, seed=seed + replicate)
        refit = fit(cells, config=refit_config(config, record, config.fit.seed + 1 + replicate), progress=progress)
        clipr, _ = clipr_posterior(refit.posterior, refit.config)
        truth = effect_matrix(drift)
        tau = DEFAULT_TAU_FRACTION * float(np.median(-np.diag(drift)))
        scores = clipr_scores(clipr, truth, edges=np.abs(truth) > tau)
        rows.append({"replicate": replicate, "draw": draw, **{key: scores[key] for key in COLUMNS[2:]}})
        if progress:
            print(f"replicate {replicate + 1}/{replicates}: true effects inside the 50% / 90% intervals "
                  f"{scores['coverage50_all']:.0%} / {scores['coverage90_all']:.0%} (edges "
                  f"{scores['coverage50_edges']:.0%} / {scores['coverage90_edges']:.0%})", flush=True)
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    table.attrs["mean"] = table.drop(columns=["replicate", "draw"]).mean().to_dict()
    return table


def calibration_run(folder: str | Path, *, replicates: int = 3, seed: int = 0, progress: bool = True) -> pd.DataFrame:
    """``calibration_check`` on a run folder's fit; writes ``RUN/calibration.csv``."""
    tree, config, record = load_run(folder)
    table = calibration_check(tree, config, record, replicates=replicates, seed=seed, progress=progress)
    write_calibration(folder, table)
    return table


def write_calibration(folder: str | Path, table: pd.DataFrame) -> None:
    with atomic_write(Path(folder) / "calibration.csv") as tmp:
        table.to_csv(tmp, index=False)


def format_calibration(table: pd.DataFrame) -> str:
    """A few lines: the mean coverage and what it says."""
    mean = table.attrs.get("mean") or table.drop(columns=["replicate", "draw"]).mean().to_dict()
    low = mean["coverage90_edges"] < 0.8 or mean["coverage50_edges"] < 0.35
    verdict = ("the intervals are too narrow for a screen like this: read the edges' ranking (prob_edge, |mean|), "
               "not their intervals" if low else "the intervals hold about what they claim on screens like this")
    return "\n".join([
        f"Calibration over {len(table)} screens drawn from the fit (targets 50% / 90%):",
        f"  all gene pairs: {mean['coverage50_all']:.0%} / {mean['coverage90_all']:.0%}",
        f"  edges (|effect| > tau): {mean['coverage50_edges']:.0%} / {mean['coverage90_edges']:.0%}; "
        f"median |z| {mean['edge_abs_z_median']:.2f} (0.67 calibrated), slope {mean['edge_slope']:.2f} (1 unbiased)",
        f"  {verdict}",
    ])
