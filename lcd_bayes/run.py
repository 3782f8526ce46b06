"""Fit from AnnData to a run folder: the user-facing layer over data, model, fit and posterior.

A run folder holds everything needed to inspect or reproduce a fit:

    config.toml      the model and fit settings used (``lcd-bayes fit --config`` reads it back)
    data.json        how the data were read: keys, labels, genes, conditions, targets
    elbo.csv         the ELBO at every step
    posterior.nc     ArviZ DataTree: posterior draws, constant data, the SVI trace
    params.pkl       the variational parameters
    summary.txt      the fit's headline numbers
    checkpoint.pkl   only while a fit is unfinished: resume by running the same command
"""
from __future__ import annotations

import hashlib
import json
import pickle
import warnings
from pathlib import Path
from typing import NamedTuple

import anndata
import numpy as np
import pandas as pd
import xarray as xr

from .config import RunConfig, load_config
from .data import PerturbationData, load_perturbation_data, read_targets, summarize
from .drift_nonlinear import check_fitted_stationarity
from .fit import FitResult, fit_svi, program
from .model import CellBatch, Structure, link
from .posterior import Coords, derive_globals, draw_globals, load_datatree, save_datatree, to_datatree
from .refine import refine_with_laplace, refine_with_nuts, resolve_refinement


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
    return Structure(data.design, data.targets, center.astype(np.float32), data.n_cells)


def _fingerprint(data: PerturbationData, config: RunConfig) -> str:
    digest = hashlib.sha256(config.to_toml().encode())
    for array in (data.counts, data.condition, data.design, data.targets):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def fit(
    adata: anndata.AnnData | str | Path,
    out: str | Path | None = None,
    *,
    config: RunConfig | str | Path | None = None,
    perturbation_key: str = "condition",
    control: str = "ctrl",
    sep: str = "+",
    targets: dict | str | Path | None = None,
    likelihood: str | None = None,
    layer: str | None = None,
    steps: int | None = None,
    seed: int | None = None,
    genes: list[str] | None = None,
    n_top_genes: int | None = None,
    total_counts_key: str | None = None,
    size_factor_key: str | None = None,
    refine: str | None = None,
    progress: bool = True,
) -> FittedRun:
    """Fit a latent causal diffusion to a perturbation screen and return its posterior.

    ``adata`` is an AnnData or a path to ``.h5ad``. With ``out`` the run folder is written
    (and an interrupted fit into the same folder resumes from its checkpoint). Arguments left
    as ``None`` take the configuration's values (``models/lcd_linear.toml`` by default).
    ``refine="laplace"`` replaces the guide's draws by the Laplace approximation near the guide's
    mean, ``refine="nuts"`` by a NUTS chain on the same program, both in the coordinates the fitted
    guide whitens (``lcd_bayes.refine``): slower, but their intervals are calibrated where the guide's
    are too narrow. The default (``"auto"``, from the configuration) is ``"laplace"`` up to ~40 genes
    and the guide's draws beyond, with a warning; ``refine="none"`` keeps the guide's draws.
    """
    run_config = config if isinstance(config, RunConfig) else load_config(config)
    run_config = run_config.replace(model={"likelihood": likelihood},
                                    fit={"steps": steps, "seed": seed, "refine": refine})
    if isinstance(adata, (str, Path)):
        adata = read_h5ad(adata)
    if isinstance(targets, (str, Path)):
        targets = read_targets(targets)
    data = load_perturbation_data(
        adata, perturbation_key=perturbation_key, control=control, sep=sep, layer=layer, targets=targets,
        genes=genes, n_top_genes=n_top_genes, continuous=run_config.model.likelihood == "gaussian",
        total_counts_key=total_counts_key, size_factor_key=size_factor_key,
    )
    if progress:
        print(summarize(data), flush=True)
    structure = structure_of(data, run_config)
    cells = CellBatch(data.counts, data.size_factor, data.condition)
    # Resolved before fitting: a model too large for an explicit refinement is refused before any
    # fitting is spent, and the run's config.toml names the refinement that made its draws.
    refinement, fallback = resolve_refinement(run_config.fit.refine, program(structure, run_config), cells)
    run_config = run_config.replace(fit={"refine": refinement})
    if fallback is not None:
        warnings.warn(fallback, stacklevel=2)
    folder = Path(out) if out is not None else None
    if folder is not None:
        if (folder / "posterior.nc").exists():
            raise FileExistsError(
                f"{folder} already holds a finished fit (posterior.nc); write to a new --out folder "
                "or delete the old one"
            )
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.toml").write_text(run_config.to_toml())
        (folder / "data.json").write_text(json.dumps(_data_record(data), indent=1))

    result, inference = fit_svi(
        cells, structure, run_config,
        checkpoint_path=folder / "checkpoint.pkl" if folder else None,
        fingerprint=_fingerprint(data, run_config), progress=progress,
    )
    draws, attrs = None, {} if fallback is None else {"refinement_skipped": fallback}
    if run_config.fit.refine == "nuts":
        draws, attrs = _refined_draws(inference, result, structure, cells, run_config, progress)
    elif run_config.fit.refine == "laplace":
        draws, attrs = _laplace_draws(inference, result, structure, cells, run_config, progress)
    # Laplace draws are calibrated for the effects but not for the sites predictions also need
    # (noise scales, concentrations): held-out doubles were predicted about twice as far off from
    # them as from the guide's (README, prediction). So the guide's draws are kept beside them,
    # and lcd_bayes.predict samples cells from those; a NUTS chain's draws serve every use.
    guide_draws = None
    if draws is None or run_config.fit.refine == "laplace":
        guide_draws = draw_globals(
            inference.guide, result.params, structure, run_config.model,
            num_samples=run_config.fit.num_posterior_samples, seed_value=run_config.fit.seed + 1,
        )
    if draws is None:  # the guide's posterior (also when the refinement failed)
        draws, guide_draws = guide_draws, None
    _warn_unstable(draws["log_spectral_radius"], run_config)
    if run_config.model.drift == "nonlinear":
        report = check_fitted_stationarity(draws, data.design, run_config.model, seed=run_config.fit.seed)
        attrs["stationarity"] = report.message
        if not report:
            warnings.warn(f"the simulated stationary law of a posterior draw is {report.message}", stacklevel=2)
    tree = to_datatree(
        draws, Coords(data.genes, data.conditions, data.perturbations), losses=result.losses,
        attrs={"config": run_config.to_toml(), "converged": int(result.converged),
               "fit_seconds": result.seconds, "n_cells": data.n_cells, **attrs},
        constant_data={"design": (("condition", "perturbation"), data.design),
                       "targets": (("perturbation", "gene"), data.targets)},
        guide_draws=guide_draws,
    )
    if folder is not None:
        _write_run(folder, tree, result)
    return FittedRun(tree, data, run_config, result, folder)


def read_h5ad(path: str | Path) -> anndata.AnnData:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    return anndata.read_h5ad(path)


def _data_record(data: PerturbationData) -> dict:
    control = data.condition == 0
    return {
        "perturbation_key": data.perturbation_key, "control": data.control, "sep": data.sep,
        "is_counts": data.is_counts, "genes": list(data.genes), "conditions": list(data.conditions),
        "perturbations": list(data.perturbations),
        "targets": {p: [g for g, t in zip(data.genes, row) if t] for p, row in zip(data.perturbations, data.targets)},
        "cells_per_condition": np.bincount(data.condition, minlength=data.n_conditions).tolist(),
        "mean_size_factor_log_sd": float(np.std(np.log(data.size_factor))) if data.is_counts else 0.0,
        # Predicted cells draw library sizes like the control cells': log-normal with these moments.
        "control_size_factor_log_mean": float(np.mean(np.log(data.size_factor[control]))) if data.is_counts else 0.0,
        "control_size_factor_log_sd": float(np.std(np.log(data.size_factor[control]))) if data.is_counts else 0.0,
    }


# Above this fraction of divergent draws the refining chain is discarded (the calibrated 20-gene
# chains had 0.6-4.8%; a failed one 40%).
REFINE_MAX_DIVERGENT = 0.2


def _refined_draws(inference, result: FitResult, structure: Structure, cells: CellBatch, config: RunConfig,
                   progress: bool) -> tuple[dict | None, dict]:
    """Posterior draws from NUTS on the full-data program, whitened by the fitted guide, and the
    chain's diagnostics for the DataTree's attributes; no draws if the chain failed."""
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
            "intervals are too narrow (README, calibration).", stacklevel=3)
        return None, {"nuts_refinement": f"failed: {refinement.divergences} of {fit.num_posterior_samples} "
                                          "draws diverged; the guide's draws are kept"}
    if divergent > 0.05:
        warnings.warn(
            f"{refinement.divergences} of {fit.num_posterior_samples} NUTS draws diverged: the chain may "
            "miss part of the posterior; compare with a longer chain ([fit] refine_warmup) before trusting "
            "the tails", stacklevel=3)
    attrs = {"inference": "SVI + NUTS (guide-preconditioned)", "nuts_divergences": refinement.divergences,
             "nuts_mean_tree_size": refinement.mean_tree_size, "nuts_seconds": refinement.seconds}
    return derive_globals(refinement.latent, structure, config.model), attrs


def _laplace_draws(inference, result: FitResult, structure: Structure, cells: CellBatch, config: RunConfig,
                   progress: bool) -> tuple[dict | None, dict]:
    """Posterior draws from the Laplace approximation at the guide's mean (whitened by the guide),
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
                      "intervals are too narrow (README, calibration)", stacklevel=3)
        return None, {"laplace_refinement": f"failed: {error}; the guide's draws are kept"}
    attrs = {"inference": "SVI + Laplace (at the guide's mean, guide-whitened)",
             "laplace_seconds": laplace.seconds, "laplace_gradient_norm": laplace.gradient_norm,
             "laplace_negative_curvature": laplace.n_negative, "laplace_capped": laplace.n_floored,
             "laplace_median_widening": float(np.median(laplace.widening)),
             "laplace_newton_step": laplace.step_length, "laplace_potential_drop": laplace.potential_drop}
    return derive_globals(laplace.latent, structure, config.model), attrs


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
            stacklevel=3,
        )


def _write_run(folder: Path, tree: xr.DataTree, result: FitResult) -> None:
    pd.DataFrame({"step": np.arange(result.losses.size), "elbo": -result.losses}).to_csv(
        folder / "elbo.csv", index=False
    )
    with open(folder / "params.pkl", "wb") as f:
        pickle.dump(result.params, f)
    save_datatree(tree, folder / "posterior.nc")
    (folder / "summary.txt").write_text(
        f"steps: {result.losses.size}\nconverged: {result.converged}\n"
        f"seconds: {result.seconds:.1f} (compile {result.compile_seconds:.1f})\n"
        f"final ELBO (mean of last 100 steps): {-result.losses[-100:].mean():.6g}\n"
    )
    checkpoint = folder / "checkpoint.pkl"
    if checkpoint.exists():
        checkpoint.unlink()  # the fit is complete: params.pkl and posterior.nc supersede it


def load_run(folder: str | Path) -> tuple[xr.DataTree, RunConfig, dict]:
    """The posterior, configuration and data record of a finished run folder."""
    folder = Path(folder)
    if not (folder / "posterior.nc").exists():
        hint = " (an unfinished fit: run the same fit command again to resume)" if (folder / "checkpoint.pkl").exists() else ""
        raise FileNotFoundError(f"{folder} has no posterior.nc{hint}; create it with `lcd-bayes fit`")
    return (load_datatree(folder / "posterior.nc"), load_config(folder / "config.toml"),
            json.loads((folder / "data.json").read_text()))
