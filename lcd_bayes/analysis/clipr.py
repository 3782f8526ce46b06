"""CLIPR: causal linearization via perturbation responses, on posterior drift draws (docs/clipr.md).

For one drift ``f(x; c)`` (``c`` the shift of a condition) and every response ``p`` (control,
``c = 0``, and each single perturbation seen in training):

    l_p = fixed point of dx = f(x; c_p) dt          limit response
    v_p = f(0; c_p)                                 initial response
    A_hat = -V L^T (L L^T + lambda I)^{-1}          L = [l_p], V = [v_p], genes x responses
    E = A_hat^T without its diagonal                E[j, k]: effect of gene j on gene k

For a linear drift ``f(x; c) = A x + b + c`` we have ``A L = -V`` exactly, so ``A_hat -> A`` as
``lambda -> 0`` whenever the limit responses span the gene space; for a nonlinear drift ``A_hat``
is the best linear drift through its responses. Applied to every posterior draw (``lax.map`` over
chunks of vmapped draws) this gives a posterior over ``E``: means, HDIs and edge probabilities.

A drift is a function ``drift_fn(params, x, shift) -> (genes,)`` of one draw's parameters
(a pytree), one state ``x`` (genes,) and one shift (genes,); batching is left to ``jax.vmap``.
"""
from __future__ import annotations

import json
import warnings
from functools import partial
from pathlib import Path
from typing import Callable, NamedTuple

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import xarray as xr

from ..diagnostics import LcdBayesWarning
from ..dynamics.fixed_point import fixed_point
from ..dynamics.nonlinear import PARAM_NAMES as NONLINEAR_PARAMS
from ..dynamics.nonlinear import posterior_drift
from ..inference.posterior import stacked_draws
from ..files import atomic_write
from ..io.run_folder import load_datatree, load_run, require_finished, save_datatree

DriftFn = Callable[[object, jax.Array, jax.Array], jax.Array]

# Tikhonov ridge, relative to the mean squared singular value of L (trace(L L^T) / genes). A
# direction of the responses with squared singular value s is shrunk by s / (s + lambda), so
# 1e-6 biases A_hat by under 1% down to s = 1e-4 of the mean (on the simulator's systems, CLIPR
# of a linear draw matches A to ~1e-3 at d = 100, against ~0.1 at 1e-4), while directions the
# perturbations do not reach (s ~ 0, fewer responses than genes) get the minimum-norm answer,
# A_hat ~ 0, instead of float32 round-off amplified by 1 / s.
DEFAULT_RIDGE = 1e-6
# An edge is an effect of at least a tenth of the typical self-decay (median over genes and
# draws of -diag(A_hat)): at steady state a unit change of the source then moves the target by
# ~0.1 latent units (sigma = 1), and the threshold follows the fit's time scale, to which the
# effects are tied (W = D R), instead of a number that means nothing without units.
DEFAULT_TAU_FRACTION = 0.1
LINEAR_PARAMS = ("drift", "basal_drift")


def linear_drift(params: dict, x: jax.Array, shift: jax.Array) -> jax.Array:
    """``f(x; c) = A x + b + c`` with ``params = {"drift": A (target, source), "basal_drift": b}``."""
    return params["drift"] @ x + params["basal_drift"] + shift


def initial_response(drift_fn: DriftFn, params, shift: jax.Array) -> jax.Array:
    """``v = f(0; c)``, the drift felt at the origin under the shift, shape (genes,)."""
    return drift_fn(params, jnp.zeros_like(shift), shift)


def limit_response(drift_fn: DriftFn, params, shift: jax.Array, x0: jax.Array | None = None,
                   **newton) -> jax.Array:
    """Fixed point ``l`` of the noise-free dynamics ``dx = f(x; shift) dt``, shape (genes,).

    ``-A^{-1}(b + c)`` for a linear drift (exact, one Newton step); see ``fixed_point`` for the
    general solve and its options.
    """
    return fixed_point(drift_fn, params, shift, x0, **newton).x


def ridge_solve(responses: jax.Array, initial: jax.Array, ridge: float) -> jax.Array:
    """``E = A_hat^T = -(L L^T + lambda I)^{-1} L V^T`` from row-stacked responses.

    Solved as the least-squares problem ``[L^T; sqrt(lambda) I] E = [-V^T; 0]`` by QR, whose error
    grows with the condition number of ``L`` rather than its square (float32 throughout).

    Parameters
    ----------
    responses : jax.Array, shape (responses, genes)
        Limit responses ``l_p`` as rows (``L^T``).
    initial : jax.Array, shape (responses, genes)
        Initial responses ``v_p`` as rows (``V^T``).
    ridge : float
        ``lambda`` relative to ``trace(L L^T) / genes``.

    Returns
    -------
    jax.Array, shape (genes, genes)
        ``A_hat^T`` (source, target), diagonal included.
    """
    n_genes = responses.shape[-1]
    strength = ridge * jnp.sum(responses**2) / n_genes
    design = jnp.concatenate([responses, jnp.sqrt(strength) * jnp.eye(n_genes, dtype=responses.dtype)])
    target = jnp.concatenate([-initial, jnp.zeros((n_genes, n_genes), responses.dtype)])
    q, r = jnp.linalg.qr(design)
    return jax.scipy.linalg.solve_triangular(r, q.T @ target, lower=False)


class CliprDraw(NamedTuple):
    """CLIPR of one drift draw."""

    effect: jax.Array  # (source, target) A_hat^T with zero diagonal
    self_decay: jax.Array  # (genes,) -diag(A_hat)
    residual: jax.Array  # () max |f(l_p; p)| over responses: ~0 when every fixed point was found


def clipr_draw(drift_fn: DriftFn, params, shifts: jax.Array, *, ridge: float = DEFAULT_RIDGE,
               x0: jax.Array | None = None, **newton) -> CliprDraw:
    """CLIPR of one drift draw with its diagnostics; see ``clipr_effects``."""
    n_genes = shifts.shape[-1]
    all_shifts = jnp.concatenate([jnp.zeros((1, n_genes), shifts.dtype), shifts])  # control first
    control = fixed_point(drift_fn, params, all_shifts[0], x0, **newton)
    # A perturbation experiment starts from the unperturbed steady state and relaxes from there.
    perturbed = jax.vmap(lambda c: fixed_point(drift_fn, params, c, control.x, **newton))(shifts)
    responses = jnp.concatenate([control.x[None], perturbed.x])
    initial = jax.vmap(partial(initial_response, drift_fn, params))(all_shifts)
    linearized = ridge_solve(responses, initial, ridge)
    residual = jnp.maximum(control.residual, jnp.max(perturbed.residual, initial=0.0))
    off_diagonal = 1.0 - jnp.eye(n_genes, dtype=linearized.dtype)
    return CliprDraw(linearized * off_diagonal, -jnp.diag(linearized), residual)


def clipr_effects(drift_fn: DriftFn, params, shifts: jax.Array, *, ridge: float = DEFAULT_RIDGE,
                  x0: jax.Array | None = None, **newton) -> jax.Array:
    """Causal effect matrix of one drift draw by CLIPR.

    Parameters
    ----------
    drift_fn : callable
        ``drift_fn(params, x, shift) -> (genes,)``, e.g. ``linear_drift``.
    params : pytree
        The draw's drift parameters.
    shifts : jax.Array, shape (perturbations, genes)
        Shift ``c_p`` of every single perturbation seen in training; control (``c = 0``) is
        added as the first response.
    ridge : float
        Tikhonov ``lambda`` relative to ``trace(L L^T) / genes`` (see ``DEFAULT_RIDGE``).
    x0 : jax.Array, shape (genes,), optional
        Where the control fixed point is sought from (zeros by default).

    Returns
    -------
    jax.Array, shape (genes, genes)
        ``E[j, k]``, the effect of source gene ``j`` on target gene ``k``; zero diagonal.
    """
    return clipr_draw(drift_fn, params, shifts, ridge=ridge, x0=x0, **newton).effect


@partial(jax.jit, static_argnames=("drift_fn", "chunk_size"))
def _clipr_draws(params, shifts, ridge, *, drift_fn, chunk_size):
    def one(draw):
        return clipr_draw(drift_fn, *draw, ridge=ridge)

    # lax.map over chunks of vmapped draws: memory bounded by chunk_size draws at a time.
    return jax.lax.map(one, (params, shifts), batch_size=chunk_size)


def single_perturbations(tree: xr.DataTree) -> list[str]:
    """Labels seen alone in some training condition (all labels if the design is not stored)."""
    labels = [str(p) for p in tree["posterior"]["perturbation"].values]
    if "constant_data" not in tree.children or "design" not in tree["constant_data"]:
        return labels
    design = tree["constant_data"]["design"].transpose("condition", "perturbation")
    singles = design.values[design.values.sum(axis=1) == 1].any(axis=0)
    return [str(p) for p, seen in zip(design["perturbation"].values, singles) if seen]


def untargeted_genes(tree: xr.DataTree, labels: list[str]) -> list[str]:
    """Modelled genes that none of ``labels`` targets (by the run's stored on-target mask)."""
    genes = [str(g) for g in tree["posterior"]["gene"].values]
    if "constant_data" not in tree.children or "targets" not in tree["constant_data"] or not labels:
        return genes if not labels else []
    targets = tree["constant_data"]["targets"].sel(perturbation=labels).transpose("perturbation", "gene")
    hit = targets.values.any(axis=0)
    return [g for g, h in zip(targets["gene"].values, hit) if not h]


def synthetic_shifts(self_decay: np.ndarray, genes: list[str], untargeted: list[str]) -> np.ndarray:
    """A shift of one latent unit, ``D_g e_g``, on each untargeted gene ``g``, per draw.

    The fitted drift is a causal model: it can be intervened on any modelled gene, perturbed in
    training or not. Without these, responses to fewer perturbations than genes leave directions
    of ``L`` empty and the ridge answers there with ``A_hat ~ 0`` (the minimum-norm solution).
    One latent unit (``D_g`` in drift units) keeps the probe within the range the fit has seen.

    Returns
    -------
    np.ndarray, shape (draws, len(untargeted), genes)
    """
    index = [genes.index(g) for g in untargeted]
    shifts = np.zeros((self_decay.shape[0], len(index), len(genes)), np.float32)
    shifts[:, np.arange(len(index)), index] = self_decay[:, index]
    return shifts


def posterior_effects(tree: xr.DataTree, *, ridge: float = DEFAULT_RIDGE, chunk_size: int = 16,
                      drift_fn: DriftFn = linear_drift, param_names: tuple[str, ...] = LINEAR_PARAMS,
                      perturbations: list[str] | None = None, synthetic: bool = True) -> xr.Dataset:
    """CLIPR applied to every posterior draw.

    Parameters
    ----------
    tree : xarray.DataTree
        A fit's posterior: ``posterior`` with dims (chain, draw, ...) holding ``shift``
        (perturbation, gene) and the variables in ``param_names``.
    ridge : float
        Relative Tikhonov ``lambda`` (see ``DEFAULT_RIDGE``).
    chunk_size : int
        Draws vmapped together; memory grows with it (a few ``genes x genes`` arrays per draw).
    drift_fn, param_names
        The drift and the posterior variables that are its ``params`` dict (the linear drift by
        default).
    perturbations : list of str, optional
        Labels used as responses; by default those seen alone in training.
    synthetic : bool
        Add a synthetic one-latent-unit shift on every gene no used label targets
        (``synthetic_shifts``), so the responses span the genes even when fewer genes were
        perturbed than modelled. With ``False``, CLIPR uses the trained perturbations only.

    Returns
    -------
    xarray.Dataset
        ``effect`` (chain, draw, source, target) and ``self_decay`` (chain, draw, gene), with
        ArviZ's sample dims so ``az.summary`` and ``arviz_plots`` need no ``sample_dims``.
    """
    posterior = tree["posterior"].to_dataset()
    labels = single_perturbations(tree) if perturbations is None else list(perturbations)
    n_chains, n_draws = posterior.sizes["chain"], posterior.sizes["draw"]

    params = {name: stacked_draws(posterior[name]) for name in param_names}
    shifts = stacked_draws(posterior["shift"].sel(perturbation=labels).transpose(..., "perturbation", "gene"))
    genes = [str(g) for g in posterior["gene"].values]
    probes = untargeted_genes(tree, labels) if synthetic else []
    if probes:
        self_decay = stacked_draws(posterior["self_decay"]) if "self_decay" in posterior else np.ones((len(shifts), len(genes)))
        shifts = np.concatenate([shifts, synthetic_shifts(self_decay, genes, probes)], axis=1)
    result = _clipr_draws(params, shifts, jnp.float32(ridge), drift_fn=drift_fn, chunk_size=chunk_size)
    n_genes = len(genes)
    residual = np.asarray(result.residual)
    scale = np.abs(shifts).max(initial=0.0) + np.abs(params.get("basal_drift", np.zeros(1))).max() + 1.0
    if not np.all(residual <= 1e-3 * scale):
        warnings.warn(
            f"{np.mean(~(residual <= 1e-3 * scale)):.1%} of drift draws have a limit response that is not a "
            "fixed point (Newton did not converge); their CLIPR effects are unreliable", LcdBayesWarning, stacklevel=2,
        )
    sample_coords = {"chain": posterior["chain"].values, "draw": posterior["draw"].values}
    return xr.Dataset(
        {
            "effect": (("chain", "draw", "source", "target"),
                       np.asarray(result.effect).reshape(n_chains, n_draws, n_genes, n_genes)),
            "self_decay": (("chain", "draw", "gene"), np.asarray(result.self_decay).reshape(n_chains, n_draws, n_genes)),
        },
        coords={**sample_coords, "source": genes, "target": genes, "gene": genes},
        attrs={"method": "CLIPR", "ridge": float(ridge), "responses": json.dumps(["control", *labels, *(f"synthetic:{g}" for g in probes)]),
               "max_limit_residual": float(residual.max(initial=0.0))},
    )


def default_tau(effects: xr.Dataset) -> float:
    """``DEFAULT_TAU_FRACTION`` times the posterior median self-decay (median over genes), or, when
    ``effects`` has no ``self_decay``, times the largest absolute posterior mean effect."""
    if "self_decay" in effects:
        return float(DEFAULT_TAU_FRACTION * np.median(effects["self_decay"].values))
    mean = effects["effect"].mean(("chain", "draw"))
    return float(DEFAULT_TAU_FRACTION * np.abs(mean.values).max())


def _as_effects(effects) -> xr.Dataset:
    if isinstance(effects, xr.DataTree):
        return effects["posterior"].to_dataset()
    if isinstance(effects, xr.DataArray):
        return effects.to_dataset(name="effect")
    return effects


def _check_summary_args(tau: float | None, hdi_prob: float) -> None:
    if not 0 < hdi_prob < 1:
        raise ValueError(f"hdi_prob must be in (0, 1), got {hdi_prob}")
    if tau is not None and not tau >= 0:
        raise ValueError(f"tau must be a non-negative effect size, got {tau}")


def edge_summary(effects, *, tau: float | None = None, hdi_prob: float = 0.9) -> xr.Dataset:
    """Posterior summary of every effect, as (source, target) arrays (NaN on the diagonal).

    Parameters
    ----------
    effects : xarray.Dataset, DataArray or DataTree
        ``effect`` draws with dims (chain, draw, source, target), as from ``posterior_effects``.
    tau : float, optional
        Effect size that counts as an edge (``default_tau`` if not given).
    hdi_prob : float
        Probability mass of the highest-density interval.

    Returns
    -------
    xarray.Dataset
        ``mean, sd, hdi_low, hdi_high, prob_edge, prob_positive, prob_negative`` over
        (source, target); ``tau`` and ``hdi_prob`` in its attrs.
    """
    _check_summary_args(tau, hdi_prob)
    effects = _as_effects(effects)
    tau = default_tau(effects) if tau is None else float(tau)
    effect = effects["effect"].transpose("chain", "draw", "source", "target")
    sample = ("chain", "draw")
    interval = az.hdi(effect, prob=hdi_prob)
    summary = xr.Dataset({
        "mean": effect.mean(sample), "sd": effect.std(sample),
        "hdi_low": interval.sel(ci_bound="lower", drop=True), "hdi_high": interval.sel(ci_bound="upper", drop=True),
        "prob_edge": (np.abs(effect) > tau).mean(sample),
        "prob_positive": (effect > tau).mean(sample), "prob_negative": (effect < -tau).mean(sample),
    })
    # An effect of a gene on itself is not an edge: the diagonal is the self-decay, not E.
    off_diagonal = xr.DataArray(~np.eye(effect.sizes["source"], dtype=bool), dims=("source", "target"))
    summary = summary.where(off_diagonal).transpose("source", "target")
    summary.attrs.update(tau=tau, hdi_prob=float(hdi_prob))
    return summary


def edge_table(effects, *, tau: float | None = None, hdi_prob: float = 0.9) -> pd.DataFrame:
    """One row per ordered gene pair (source != target), most probable edges first.

    Columns ``source, target, mean, sd, hdi_low, hdi_high, prob_edge, prob_positive,
    prob_negative``: ``prob_edge = P(|E| > tau)``, ``prob_positive = P(E > tau)``,
    ``prob_negative = P(E < -tau)``. Sorted by ``prob_edge`` descending, ties by ``|mean|``.
    ``effects`` and the arguments are as for ``edge_summary``; a summary Dataset from it is
    accepted as it is. ``tau`` and ``hdi_prob`` are in ``table.attrs``.
    """
    if isinstance(effects, xr.Dataset) and "prob_edge" in effects:
        summary = effects
    else:
        summary = edge_summary(effects, tau=tau, hdi_prob=hdi_prob)
    return summary_to_table(summary)


def summary_at(clipr: xr.DataTree, *, tau: float | None = None, hdi_prob: float | None = None) -> xr.Dataset:
    """The edge summary of a CLIPR tree (``clipr_posterior``): the stored one, or one recomputed
    from its effect draws at another ``tau`` or ``hdi_prob``."""
    summary = clipr["edges"].to_dataset()
    if tau is None and (hdi_prob is None or hdi_prob == summary.attrs.get("hdi_prob")):
        return summary
    return edge_summary(clipr["posterior"].to_dataset(), tau=tau,
                        hdi_prob=summary.attrs.get("hdi_prob", 0.9) if hdi_prob is None else hdi_prob)


def summary_to_table(summary: xr.Dataset) -> pd.DataFrame:
    """The (source, target) summary from ``edge_summary`` as the sorted long table."""
    table = summary.transpose("source", "target").to_dataframe().reset_index()
    table = table[table["source"] != table["target"]]
    order = np.lexsort((-table["mean"].abs().to_numpy(), -table["prob_edge"].to_numpy()))
    columns = ["source", "target", "mean", "sd", "hdi_low", "hdi_high", "prob_edge", "prob_positive", "prob_negative"]
    table = table.iloc[order][columns].reset_index(drop=True)
    table.attrs.update(summary.attrs)
    return table


def run_drift(model_config) -> tuple[DriftFn, tuple[str, ...]]:
    """The drift function of a run's posterior and the variables that are its ``params``."""
    if model_config.drift == "nonlinear":
        return posterior_drift, NONLINEAR_PARAMS  # reads relative_interaction as stored (source, target)
    return linear_drift, LINEAR_PARAMS


def clipr_run(folder: str | Path, *, ridge: float | None = None, tau: float | None = None,
              hdi_prob: float = 0.9, chunk_size: int = 16, synthetic: bool = True) -> tuple[xr.DataTree, pd.DataFrame]:
    """CLIPR on a run folder's posterior; writes ``RUN/clipr.nc`` and ``RUN/edges.csv``.

    ``clipr.nc`` is a DataTree with ``posterior`` (the ``effect`` and ``self_decay`` draws, dims
    (chain, draw, ...)) and ``edges`` (the (source, target) summary of ``edge_summary``).
    ``ridge`` defaults to ``DEFAULT_RIDGE``, ``tau`` to ``default_tau``; ``synthetic`` adds
    one-unit probes on untargeted genes (see ``posterior_effects``).

    Returns
    -------
    (xarray.DataTree, pandas.DataFrame)
        The tree written to ``clipr.nc`` and the edge table written to ``edges.csv``.
    """
    folder = Path(folder)
    tree, config, _record = load_run(folder)
    result, table = clipr_posterior(tree, config, ridge=ridge, tau=tau, hdi_prob=hdi_prob,
                                    chunk_size=chunk_size, synthetic=synthetic)
    save_datatree(result, folder / "clipr.nc")
    with atomic_write(folder / "edges.csv") as tmp:
        table.to_csv(tmp, index=False)
    return result, table


def clipr_posterior(tree: xr.DataTree, config, *, ridge: float | None = None, tau: float | None = None,
                    hdi_prob: float = 0.9, chunk_size: int = 16,
                    synthetic: bool = True) -> tuple[xr.DataTree, pd.DataFrame]:
    """CLIPR on a fit's posterior ``tree`` (its ``RunConfig`` says which drift), in memory: the
    tree ``clipr_run`` writes and its edge table."""
    _check_summary_args(tau, hdi_prob)
    drift_fn, param_names = run_drift(config.model)
    ridge = DEFAULT_RIDGE if ridge is None else float(ridge)
    effects = posterior_effects(tree, ridge=ridge, chunk_size=chunk_size, synthetic=synthetic,
                                drift_fn=drift_fn, param_names=param_names)
    summary = edge_summary(effects, tau=tau, hdi_prob=hdi_prob)
    summary.attrs["ridge"] = ridge
    return xr.DataTree.from_dict({"posterior": effects, "edges": summary}), summary_to_table(summary)


def load_clipr(folder: str | Path) -> xr.DataTree:
    """``RUN/clipr.nc``, computed first with the defaults if the run has none."""
    path = Path(folder) / "clipr.nc"
    if not path.exists():
        return clipr_run(folder)[0]
    require_finished(folder)  # a clipr.nc beside an unfinished fit is not of its result
    return load_datatree(path, todo="delete it and run `lcd-bayes clipr` again")


def format_edges(table: pd.DataFrame, n: int = 10) -> str:
    """The first ``n`` rows of an edge table as text, for the command line."""
    prob = table.attrs.get("hdi_prob", 0.9)
    tau = table.attrs.get("tau", float("nan"))
    lines = [f"Most probable causal edges (CLIPR; P(|E| > {tau:.3g}), posterior mean, {prob:.0%} HDI):"]
    for row in table.head(n).itertuples():
        lines.append(f"  {row.source:>10} -> {row.target:<10} P={row.prob_edge:4.2f}  {row.mean:+7.2f}  "
                     f"[{row.hdi_low:+.2f}, {row.hdi_high:+.2f}]")
    return "\n".join(lines)
