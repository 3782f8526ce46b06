"""Fit from AnnData to a run folder: the user-facing layer over data, model, fit and posterior.

What a run folder holds, and how it is written and read back (``load_run``), is
``lcd_bayes.io.run_folder``'s.
"""
from __future__ import annotations

import dataclasses
import hashlib
import sys
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import anndata
import numpy as np
import xarray as xr

from . import pl
from .analysis.ppc import GROUP as PPC_GROUP
from .analysis.ppc import posterior_predictive_check, ppc_dataset, ppc_table
from .config import RunConfig
from .diagnostics import FitError, LcdBayesWarning
from .dynamics.nonlinear import check_fitted_stationarity
from .inference.posterior import Coords, derive_globals, pointwise_log_likelihood, sample_guide, to_datatree
from .inference.refine import refine_with_laplace, refine_with_nuts, resolve_refinement
from .files import atomic_write, pause_point
from .inference.svi import MAX_SKIPPED_FRACTION, FitResult, checkpoint_fingerprint, fit_svi, program
from .io.fit_inputs import FitInputs, fit_inputs
from .io.run_folder import CHECKPOINT, changed_settings, data_record, discard_unfinished, start_run_folder, write_run
from .io.screen import PerturbationData, summarize
from .model.program import CellBatch, Structure, link


class FittedRun(NamedTuple):
    """A finished fit: the posterior and what produced it."""

    posterior: xr.DataTree
    data: PerturbationData
    config: RunConfig
    fit: FitResult
    folder: Path | None


def structure_of(data: PerturbationData, config: RunConfig) -> Structure:
    """Static model inputs; the gene-scale prior is centred where x = 0 meets the mean expression."""
    if data.is_counts:
        mean_normalized = (data.counts / data.size_factor[:, None]).mean(axis=0) + 1e-3
        center = np.log(mean_normalized) - np.log(np.asarray(link(np.float32(0.0), config.model.link)))
    else:
        center = np.zeros(data.n_genes)
    return Structure(data.design, data.targets, center.astype(np.float32), data.n_cells, data.n_batches)


def library_summary(data: PerturbationData, library: str) -> str:
    """One line on where the cells' library sizes come from (``library`` resolved)."""
    source = ("an obs column" if data.library_genes is None
              else f"each cell's total over the matrix's {data.library_genes} genes")
    if library == "latent":
        return f"library sizes: latent, integrated out per cell (started from {source}; [model] library)"
    return f"library sizes: from {source}"


def _fingerprint(data: PerturbationData, config: RunConfig) -> str:
    """What a checkpoint must match to be resumed: the settings and every array the fit sees (the
    size factors too: other library sizes are other data; and the cells' batches, when there are)."""
    digest = hashlib.sha256(config.to_toml().encode())
    arrays = (data.counts, data.size_factor, data.condition, data.design, data.targets)
    for array in arrays + (() if data.batch is None else (data.batch,)):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def fit(
    adata: anndata.AnnData | str | Path | FitInputs,
    out: str | Path | None = None,
    *,
    config: RunConfig | str | Path | None = None,
    perturbation_key: str | None = None,
    control: str | None = None,
    sep: str | None = None,
    targets: dict | str | Path | None = None,
    likelihood: str | None = None,
    layer: str | None = None,
    steps: int | None = None,
    seed: int | None = None,
    genes: list[str] | None = None,
    n_top_genes: int | None = None,
    gene_ranking: str | None = None,
    predict_targets: list[str] | str | None = None,
    total_counts_key: str | None = None,
    size_factor_key: str | None = None,
    batch_key: str | None = None,
    refine: str | None = None,
    restart: bool = False,
    progress: bool = True,
) -> FittedRun:
    """Fit a latent causal diffusion to a perturbation screen and return its posterior.

    ``adata`` is an AnnData or a path to ``.h5ad`` (or the ``FitInputs`` that
    ``lcd_bayes.io.fit_inputs.fit_inputs`` read with these arguments: the command line reads them
    before loading the model, so that bad input is refused in about a second). With ``out`` the run folder is written
    (and an interrupted fit into the same folder resumes from its checkpoint). ``config`` is a
    ``RunConfig``, a TOML file (a run's ``config.toml`` repeats that run) or a shipped
    configuration's name (``lcd_linear``, the default, or ``lcd_nonlinear``). Arguments left as
    ``None`` take the configuration's values: ``perturbation_key``, ``control``, ``sep``,
    ``targets``, ``layer``, ``genes``, ``n_top_genes``, ``gene_ranking``, ``predict_targets``,
    ``total_counts_key``, ``size_factor_key`` and ``batch_key`` its ``[data]`` section (defaults
    ``"condition"``, ``"ctrl"``, ``"+"``, ranking ``"response"``, the rest unset; see
    ``lcd_bayes.io.screen.load_perturbation_data``), the others ``[model]`` and ``[fit]``.
    ``batch_key`` names the obs column of each cell's batch (10x lane, replicate, donor): the model
    then fits batch effects, pooled across batches. With
    ``n_top_genes`` pass the training cells only: the panel is ranked on every cell of ``adata``;
    ``predict_targets`` (``"A+B,C"`` or a list) names the conditions to predict, whose targets
    join the panel first. The settings used are recorded in the returned (and written) configuration.
    ``refine="laplace"`` replaces the guide's draws by the Laplace approximation near the guide's
    mean, ``refine="nuts"`` by a NUTS chain on the same program, both in the coordinates the fitted
    guide whitens (``lcd_bayes.inference.refine``): slower, but their intervals are calibrated where
    the guide's are too narrow. The default (``"auto"``, from the configuration) is ``"laplace"`` up
    to ~40 genes and the guide's draws beyond, with a warning; ``refine="none"`` keeps the guide's
    draws. An unfinished fit in ``out`` of other data or settings is refused before anything is
    written, unless ``restart`` discards it; a finished one is always refused.
    """
    reading_arguments = {
        "perturbation_key": perturbation_key, "control": control, "sep": sep, "targets": targets,
        "likelihood": likelihood, "layer": layer, "steps": steps, "seed": seed, "genes": genes,
        "n_top_genes": n_top_genes, "gene_ranking": gene_ranking, "predict_targets": predict_targets,
        "total_counts_key": total_counts_key, "size_factor_key": size_factor_key, "batch_key": batch_key,
        "refine": refine,
    }
    if isinstance(adata, FitInputs):
        inputs = adata
        given = {name: value for name, value in reading_arguments.items() if value is not None}
        if out is not None or config is not None or given:
            raise ValueError(f"fit(FitInputs, ...) takes its settings from the inputs; pass none of out, config, "
                             f"{', '.join(given) or 'the reading arguments'}")
    else:
        inputs = fit_inputs(adata, out, config=config, **reading_arguments)
    run_config, data, folder = inputs.config, inputs.screen, inputs.folder
    if progress:
        print(summarize(data), flush=True)
    run_config = run_config.replace(fit=dataclasses.asdict(run_config.fit.resolved(run_config.model.likelihood,
                                                                                   data.n_cells)),
                                    model={"library": run_config.model.resolved_library(data.library_genes)})
    if progress and data.is_counts:
        print(library_summary(data, run_config.model.library), flush=True)
    structure = structure_of(data, run_config)
    cells = CellBatch(data.counts, data.size_factor, data.condition, data.batch)
    # Resolved before fitting: a model too large for an explicit refinement is refused before any
    # fitting is spent, and the run's config.toml names the refinement that made its draws.
    refinement, fallback = resolve_refinement(run_config.fit.refine, program(structure, run_config), cells)
    run_config = run_config.replace(fit={"refine": refinement})
    if fallback is not None:
        warnings.warn(fallback, LcdBayesWarning, stacklevel=2)
    fingerprint = _fingerprint(data, run_config)
    if folder is not None:
        _claim(folder, run_config, fingerprint, restart)
        start_run_folder(folder, run_config, data_record(data))

    result, inference = fit_svi(
        cells, structure, run_config, checkpoint_path=folder / CHECKPOINT if folder else None,
        fingerprint=fingerprint, progress=progress,
    )
    try:
        return _finish(result, inference, data, structure, cells, run_config, fallback, folder, progress)
    except KeyboardInterrupt:
        if folder is not None:
            print(f"interrupted after SVI, whose result is saved in {folder / CHECKPOINT}; run the same command "
                  "again to resume from there", file=sys.stderr, flush=True)
        raise


def _claim(folder: Path, config: RunConfig, fingerprint: str, restart: bool) -> None:
    """Make ``folder`` this fit's before writing into it: an unfinished fit there of other data or
    settings is refused, with what differs and what to do, or with ``restart`` discarded."""
    if restart:
        discard_unfinished(folder)
        return
    stored = checkpoint_fingerprint(folder / CHECKPOINT)
    if stored is None or stored == fingerprint:
        return
    changed = changed_settings(folder, config)
    differs = (f"its config.toml differs in {', '.join(changed)}" if changed
               else "its settings are these, so the data differ")
    raise FitError(
        f"{folder} holds an unfinished fit of other data or settings ({differs}). Resume it with the command "
        f"that started it (`--config {folder / 'config.toml'}` repeats its settings), start this fit afresh in "
        "its place with --restart (`fit(..., restart=True)`), or write this fit to a new --out folder.")


def _finish(result: FitResult, inference, data: PerturbationData, structure: Structure, cells: CellBatch,
            run_config: RunConfig, fallback: str | None, folder: Path | None, progress: bool) -> FittedRun:
    """After SVI: the refinement, the posterior's draws and its check, written to ``folder``."""
    latent, attrs = None, {} if fallback is None else {"refinement_skipped": fallback}
    if result.skipped_steps > MAX_SKIPPED_FRACTION * result.losses.size:
        warnings.warn(
            f"{result.skipped_steps} of {result.losses.size} SVI steps had a non-finite ELBO or gradient and were "
            "skipped: the guide reaches draws where the program overflows, which biases the fit. Check the PPC, "
            "and try more [fit] cell_particles or a lower [fit] learning_rate.", LcdBayesWarning, stacklevel=3)
    sample_stats = None
    pause_point("refinement")
    if run_config.fit.refine == "nuts":
        latent, attrs, sample_stats = _refined_draws(inference, result, structure, cells, run_config, progress)
    elif run_config.fit.refine == "laplace":
        latent, attrs = _laplace_draws(inference, result, structure, cells, run_config, progress)
    attrs["skipped_steps"] = result.skipped_steps  # after the refinement, whose attrs replace these
    draws = None if latent is None else derive_globals(latent, structure, run_config.model)
    # Laplace draws are calibrated for the effects but not for the sites predictions also need
    # (noise scales, concentrations): held-out doubles were predicted about twice as far off from
    # them as from the guide's (docs/evaluation.md, "Which draws"). So the guide's draws are kept
    # beside them, and lcd_bayes.analysis.predict samples cells from those; a NUTS chain's draws
    # serve every use.
    guide_draws = None
    if draws is None or run_config.fit.refine == "laplace":
        guide_latent = sample_guide(inference.guide, result.params, num_samples=run_config.fit.num_posterior_samples,
                                    seed_value=run_config.fit.seed + 1)
        guide_draws = derive_globals(guide_latent, structure, run_config.model)
    if draws is None:  # the guide's posterior (also when the refinement failed)
        draws, guide_draws, latent = guide_draws, None, guide_latent
    # The cells' log-likelihood is of the draws predictions use: the guide's beside Laplace draws,
    # whose tails in the noise sites put single draws tens of thousands of nats below the rest.
    predictive_latent = guide_latent if guide_draws is not None else latent
    _warn_unstable(draws["log_spectral_radius"], run_config)
    if run_config.model.drift == "nonlinear":
        report = check_fitted_stationarity(draws, data.design, run_config.model, seed=run_config.fit.seed)
        attrs["stationarity"] = report.message
        if not report:
            warnings.warn(f"the simulated stationary law of a posterior draw is {report.message}", LcdBayesWarning,
                          stacklevel=3)
    cell_log_likelihood = None
    if run_config.fit.log_likelihood:
        size = data.n_cells * data.n_genes * run_config.fit.cell_particles
        if size <= LOG_LIKELIHOOD_MAX_SIZE:
            cell_log_likelihood = pointwise_log_likelihood(program(structure, run_config, minibatch=False),
                                                           result.params, predictive_latent, cells)
        else:
            attrs["log_likelihood"] = (f"not computed: cells x genes x cell_particles = {size:.3g} floats per draw, "
                                       f"more than {LOG_LIKELIHOOD_MAX_SIZE:.0e}")
    tree = to_datatree(
        draws, Coords(data.genes, data.conditions, data.perturbations, data.batches), losses=result.losses,
        attrs={"config": run_config.to_toml(), "converged": int(result.converged),
               "fit_seconds": result.seconds, "compile_seconds": result.compile_seconds, "n_cells": data.n_cells,
               **attrs},
        constant_data={"design": (("condition", "perturbation"), data.design),
                       "targets": (("perturbation", "gene"), data.targets)},
        guide_draws=guide_draws, cell_log_likelihood=cell_log_likelihood,
    )
    if sample_stats is not None:
        tree["sample_stats"] = xr.DataTree(sample_stats)
    if run_config.fit.ppc:
        # Before any edge is read: does the posterior reproduce the conditions it was fitted to?
        # (It warns when not: a collapsed fit, its effects taken for noise, must not pass silently.)
        start = time.perf_counter()
        table = posterior_predictive_check(tree, run_config, data_record(data), data, seed=run_config.fit.seed)
        tree[PPC_GROUP] = xr.DataTree(ppc_dataset(table, data.control))
        tree["posterior"].attrs["ppc_seconds"] = time.perf_counter() - start
    if folder is not None:
        write_ppc(folder, tree)
        write_run(folder, tree)  # posterior.nc last: it marks the run finished
    return FittedRun(tree, data, run_config, result, folder)


def write_ppc(folder: Path, tree: xr.DataTree) -> list[Path]:
    """Write the posterior predictive check of ``tree`` (its ``ppc`` group) into a run folder:
    ``ppc.csv`` (one row per training condition) and ``ppc.png`` (``pl.save_ppc``); nothing
    when the fit made none. Returns the files written."""
    if PPC_GROUP not in tree.children:
        return []
    table = ppc_table(tree[PPC_GROUP])
    with atomic_write(folder / "ppc.csv") as tmp:
        table.to_csv(tmp, index=False)
    return [folder / "ppc.csv", pl.save_ppc(table, folder / "ppc.png")]


# The pointwise log-likelihood evaluates one draw on every cell at once: above this many floats
# (cells x genes x cell_particles, ~400 MB) it is not computed.
LOG_LIKELIHOOD_MAX_SIZE = 10**8


# Above this fraction of divergent draws the refining chain is discarded (the calibrated 20-gene
# chains had 0.6-4.8%; a failed one 40%).
REFINE_MAX_DIVERGENT = 0.2


def _refined_draws(inference, result: FitResult, structure: Structure, cells: CellBatch, config: RunConfig,
                   progress: bool) -> tuple[dict | None, dict, xr.Dataset | None]:
    """Posterior draws (of the latent sites) from NUTS on the full-data program, whitened by the
    fitted guide, the chain's diagnostics for the DataTree's attributes and its per-draw ``sample_stats``
    (``sample_stats_of``); no draws (nor statistics) if the chain failed."""
    fit = config.fit
    if progress:
        print(f"refining the posterior with NUTS ({fit.refine_warmup} warmup + {fit.num_posterior_samples} draws)",
              flush=True)
    refinement = refine_with_nuts(
        program(structure, config, minibatch=False), inference.guide, result.params,
        cells, num_warmup=fit.refine_warmup,
        num_samples=fit.num_posterior_samples, max_tree_depth=fit.refine_max_tree_depth,
        seed_value=fit.seed + 1, progress=progress,
    )
    divergent = refinement.divergences / fit.num_posterior_samples
    if divergent > REFINE_MAX_DIVERGENT:
        # The chain left the region the fit found (seen on a 20-gene screen with half the genes
        # perturbed: 40% divergent, every draw at the stability limit, condition means off by 6):
        # its draws would be worse than the guide's.
        warnings.warn(
            f"the NUTS refinement failed: {refinement.divergences} of {fit.num_posterior_samples} draws diverged, "
            "so the chain left the posterior region the fit found (typically toward drifts at the stability "
            "limit, as in screens with few perturbed genes). The posterior keeps the guide's draws, whose "
            "intervals are too narrow (docs/inference.md).", LcdBayesWarning, stacklevel=4)
        return None, {"nuts_refinement": f"failed: {refinement.divergences} of {fit.num_posterior_samples} "
                                          "draws diverged; the guide's draws are kept"}, None
    if divergent > 0.05:
        warnings.warn(
            f"{refinement.divergences} of {fit.num_posterior_samples} NUTS draws diverged: the chain may "
            "miss part of the posterior; compare with a longer chain ([fit] refine_warmup) before trusting "
            "the tails", LcdBayesWarning, stacklevel=4)
    attrs = {"inference": "SVI + NUTS (guide-preconditioned)", "nuts_divergences": refinement.divergences,
             "nuts_mean_tree_size": refinement.mean_tree_size, "nuts_seconds": refinement.seconds}
    return refinement.latent, attrs, sample_stats_of(refinement, fit.refine_max_tree_depth)


def sample_stats_of(refinement, max_tree_depth: int) -> xr.Dataset | None:
    """ArviZ's ``sample_stats`` group of a NUTS refinement, dims (chain, draw) with one chain:
    ``diverging`` (bool), ``tree_size`` (leapfrog steps of the draw's trajectory) and
    ``reached_max_treedepth`` (the trajectory stopped at ``2**max_tree_depth - 1`` steps), which
    ``arviz.diagnose`` reads. None when the refinement carries no per-draw ``diverging`` and
    ``num_steps`` arrays, each of shape (draws,)."""
    diverging, num_steps = getattr(refinement, "diverging", None), getattr(refinement, "num_steps", None)
    if diverging is None or num_steps is None:
        return None
    diverging, num_steps = np.asarray(diverging, bool)[None], np.asarray(num_steps, np.int64)[None]
    return xr.Dataset(
        {"diverging": (("chain", "draw"), diverging), "tree_size": (("chain", "draw"), num_steps),
         "reached_max_treedepth": (("chain", "draw"), num_steps >= 2**max_tree_depth - 1)},
        coords={"chain": [0], "draw": np.arange(diverging.shape[1])},
        attrs={"inference_library": "numpyro", "max_tree_depth": int(max_tree_depth)},
    )


def _laplace_draws(inference, result: FitResult, structure: Structure, cells: CellBatch, config: RunConfig,
                   progress: bool) -> tuple[dict | None, dict]:
    """Posterior draws (of the latent sites) from the Laplace approximation at the guide's mean
    (whitened by the guide),
    and its diagnostics for the DataTree's attributes; no draws if its Hessian was not finite."""
    fit = config.fit
    if progress:
        print("refining the posterior: Laplace approximation at the guide's mean", flush=True)
    try:
        laplace = refine_with_laplace(
            program(structure, config, minibatch=False), inference.guide, result.params, cells,
            num_samples=fit.num_posterior_samples, curvature_floor=fit.refine_curvature_floor,
            hessian_batch=fit.refine_hessian_batch, seed_value=fit.seed + 1, progress=progress,
        )
    except FloatingPointError as error:  # keep the fit: the guide's draws, and say why
        warnings.warn(f"the Laplace refinement failed ({error}); the posterior keeps the guide's draws, whose "
                      "intervals are too narrow (docs/inference.md)", LcdBayesWarning, stacklevel=4)
        return None, {"laplace_refinement": f"failed: {error}; the guide's draws are kept"}
    attrs = {"inference": "SVI + Laplace (at the guide's mean, guide-whitened)",
             "laplace_seconds": laplace.seconds, "laplace_gradient_norm": laplace.gradient_norm,
             "laplace_negative_curvature": laplace.n_negative, "laplace_capped": laplace.n_floored,
             "laplace_median_widening": float(np.median(laplace.widening)),
             "laplace_newton_step": laplace.step_length, "laplace_potential_drop": laplace.potential_drop}
    return laplace.latent, attrs


def _warn_unstable(log_radius: np.ndarray, config: RunConfig) -> None:
    unstable = float(np.mean(log_radius >= np.log(config.model.max_spectral_radius) - 1e-7))
    if unstable > 0:
        warnings.warn(
            f"{unstable:.1%} of posterior drift draws sat at the stability limit (their stationary law "
            "was computed from the drift projected onto the stable set); interpret them with care "
            "and consider more [fit] steps"
            # Euler chains also hit the limit through fast genes (self-decay > 2 / dt); the
            # trapezoidal one only through modes slower than -log(max_spectral_radius) / dt.
            + (" or a smaller [model] dt" if config.model.scheme == "euler" else
               f" or, if genes truly relax this slowly, a [model] max_spectral_radius closer to 1 "
               f"(now {config.model.max_spectral_radius})"),
            LcdBayesWarning,
            stacklevel=4,
        )
