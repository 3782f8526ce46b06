"""Predict cells of perturbation conditions from a fitted run's posterior.

A requested condition ``q`` is a set of labels. Each label is either a perturbation seen in
training (its posterior shift ``c_p``) or a modelled gene never perturbed in training, whose
on-target shift comes from the hierarchical prior's posterior predictive:

    c_new = D_g (shift_mean + shift_sd z) e_g,      z ~ N(0, 1), one z per draw and label

For every posterior draw ``s`` the condition's stationary law is

    mu_sq = -A_s^{-1} (b_s + sum_{p in q} c_sp),    Sigma_s (shared by all conditions)

and a predicted cell is ``x ~ N(mu_sq, Sigma_s)``, a library size ``s ~ LogNormal`` with the
control cells' moments (with ``[model] library = "latent"`` the fitted ``LogNormal(0, library_sd)``),
and counts ``y ~ NB(s link(x) u_s, phi_s)`` (or the run's likelihood).
Cells cycle over a random subset of draws, so the spread of predicted cells carries the
posterior's uncertainty as well as the cell-to-cell noise.

Nonlinear runs (``[model] drift = "nonlinear"``): each draw's requested conditions get their
stationary law from the model's own solver (``dynamics.nonlinear.stationary_law_nonlinear``: fixed
point, linear-noise approximation, particles, moment matching; ``PREDICT_PARTICLES`` particles),
and a predicted cell is ``x ~ N(mu_sq, Sigma_sq)`` with a covariance per condition.

Per-gene expected expression, ``E[y_g] = E[s] u_g E[link(x_g)]`` (Gauss-Hermite over
``x_g ~ N(mu_g, Sigma_gg)``), is summarized over all draws: posterior mean and a 90% interval.

Batches (a run fitted with a batch key): a batch ``b`` moves every latent mean by its
``-A^{-1} D beta_b`` (at every time of a time course too: the control's state it starts from moves
alike) and scales each gene's counts by ``exp(tau_bg)`` (continuous values: adds ``tau_bg``). A
prediction for a named batch uses its effects; by default each predicted cell is drawn from a batch
in proportion to the training cells per batch, and the expression summaries average the batches
with those weights (the screen's own mixture of batches).

Time courses (``times``): cells at the control's stationary law when the condition's shift
switches on at ``t = 0`` are ``N(m_sq(t), Sigma_s)`` at time ``t`` for the linear drift, with
``m_sq(t) = mu_sq + exp(A_s t) (mu_s0 - mu_sq)`` (``dynamics.transient``). For the nonlinear drift
``PREDICT_PARTICLES`` particles drawn from each draw's control law run forward under the shift
(Euler–Maruyama, the fit's ``sim_dt``), and their mean and (shrunk) covariance at time ``t`` make
the law. Each (condition, time) is then predicted as a stationary condition with that law, and
the expected expression's 5/50/95% posterior quantiles per (condition, time, gene) form the
trajectory table.
"""
from __future__ import annotations

import difflib
import functools
import math
from pathlib import Path
from typing import NamedTuple

import anndata
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pandas as pd

from ..diagnostics import DataError
from ..dynamics.nonlinear import PARAM_NAMES as NONLINEAR_PARAMS
from ..dynamics.nonlinear import from_posterior, nonlinear_drift, shrink_toward, stationary_law_nonlinear
from ..dynamics.stationary import stationary_law, stationary_means
from ..dynamics.transient import relaxing_means, relaxing_particles
from ..inference.posterior import stacked_draws
from ..io.expression import canonical_label, label_parts, prediction_anndata
from ..io.run_folder import load_run
from ..io.screen import has_empty_part
from ..model.program import count_distribution, link

DEFAULT_CELL_DRAWS = 100  # posterior draws the predicted cells cycle over
INTERVAL = 0.9
_HERMITE_NODES = 32
# Particles per condition of a nonlinear run's stationary law (more than a fit's SVI steps use:
# prediction solves each draw once, and the spread of predicted cells should not carry much
# Monte Carlo noise).
PREDICT_PARTICLES = 64


class Request(NamedTuple):
    """Requested conditions in terms of the run's perturbations."""

    # Labels as asked ("G12+G11" stays so, not the canonical "G11+G12"), so that the predicted cells
    # join the user's own tables; a condition asked twice in different spellings keeps the first.
    conditions: tuple[str, ...]
    design: np.ndarray  # (conditions, training perturbations) 0/1
    new_design: np.ndarray  # (conditions, new labels) 0/1
    new_targets: np.ndarray  # (new labels, genes) 0/1: the gene each new label targets
    new_labels: tuple[str, ...]


def parse_request(perturbations, record: dict, *, has_target_law: bool) -> Request:
    """Check each requested label against what the run can predict and build design rows.

    ``perturbations`` is a comma-separated string (``"A+B,C"``) or a list of labels.
    """
    control, sep = record["control"], record["sep"]
    if isinstance(perturbations, str):
        perturbations = perturbations.split(",")
    requested = [str(label).strip() for label in perturbations if str(label).strip()]
    if not requested:
        raise DataError('no conditions requested; pass labels such as "A+B,C" (combinations joined '
                        f"by {sep!r}, conditions separated by commas)")
    malformed = [label for label in requested if has_empty_part(label, sep)]
    if malformed:
        raise DataError(
            f"labels {', '.join(map(repr, malformed))} have an empty part when split on {sep!r} (e.g. "
            f"'A{sep}{sep}B' or a leading/trailing {sep!r}), which fit refuses in training data too; fix the "
            "labels.")
    known = list(record["perturbations"])
    genes = list(record["genes"])
    conditions, canonical_seen, parts_of = [], set(), []
    for label in requested:
        canonical = canonical_label(label, control, sep)
        if canonical not in canonical_seen:
            canonical_seen.add(canonical)
            conditions.append(label)
            parts_of.append(label_parts(label, control, sep))

    new_labels = sorted({p for parts in parts_of for p in parts if p not in known})
    unknown = [p for p in new_labels if p not in genes]
    if unknown:
        hints = []
        for p in unknown[:5]:
            by_lower = {name.lower(): name for name in known + genes}  # case slips are the usual typo
            close = [by_lower[m] for m in difflib.get_close_matches(p.lower(), list(by_lower), n=3)]
            hints.append(f"{p!r}" + (f" (did you mean {', '.join(map(repr, close))}?)" if close else ""))
        raise DataError(
            f"the run cannot know the effect of {', '.join(hints)}: not a perturbation seen in training "
            f"({len(known)} labels, e.g. {', '.join(map(repr, known[:6]))}) and not a modelled gene, so "
            "no on-target shift is defined. Predict combinations of trained labels, or single "
            "perturbations of modelled genes."
        )
    if new_labels and not has_target_law:
        raise DataError(
            f"{', '.join(map(repr, new_labels))} were never perturbed in training, and no training label "
            "targeted a modelled gene, so the run has no on-target shift law to predict them from. "
            "Predict conditions built from the trained labels only."
        )
    design = np.array([[p in parts for p in known] for parts in parts_of], dtype=np.float32).reshape(len(conditions), len(known))
    new_design = np.array([[p in parts for p in new_labels] for parts in parts_of],
                          dtype=np.float32).reshape(len(conditions), len(new_labels))
    new_targets = np.array([[g == p for g in genes] for p in new_labels], dtype=np.float32).reshape(len(new_labels), len(genes))
    return Request(tuple(conditions), design, new_design, new_targets, tuple(new_labels))


def parse_times(times) -> np.ndarray:
    """Times after the switch, from ``"0.1,0.5,1"`` or a sequence of numbers; each finite and
    ``>= 0`` (in the model's time unit), duplicates dropped, order kept."""
    items = times.split(",") if isinstance(times, str) else list(np.atleast_1d(np.asarray(times, dtype=object)))
    items = [item.strip() if isinstance(item, str) else item for item in items]
    items = [item for item in items if not (isinstance(item, str) and not item)]
    if not items:
        raise DataError('no times given; pass times after the switch such as "0.1,0.5,1,5" (model time units)')
    values = []
    for item in items:
        try:
            value = float(item)
        except (TypeError, ValueError):
            raise DataError(f"time {item!r} is not a number; pass times such as \"0.1,0.5,1,5\"") from None
        if not math.isfinite(value) or value < 0:
            raise DataError(f"time {item!r} must be a finite number >= 0: times count from the moment the "
                            "perturbation switches on (t = 0 is the control's stationary state)")
        values.append(value)
    return np.array(list(dict.fromkeys(values)))  # float64: the times as given label cells and table rows


def condition_offsets(draws: dict, request: Request, key: jax.Array) -> jax.Array:
    """``b + sum_p c_p`` for every draw and requested condition, shape (draws, conditions, genes)."""
    offsets = draws["basal_drift"][:, None, :] + jnp.einsum("qp,spg->sqg", request.design, draws["shift"])
    if request.new_labels:
        z = jax.random.normal(key, (draws["basal_drift"].shape[0], len(request.new_labels)))
        on_target = draws["shift_mean"][:, None] + draws["shift_sd"][:, None] * z  # (draws, new labels)
        new_shift = draws["self_decay"][:, None, :] * on_target[..., None] * request.new_targets
        offsets = offsets + jnp.einsum("ql,slg->sqg", request.new_design, new_shift)
    return offsets


def expected_link(mean: jax.Array, sd: jax.Array, link_name: str) -> jax.Array:
    """``E[link(x)]`` for ``x ~ N(mean, sd^2)``, elementwise, by Gauss-Hermite quadrature."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(_HERMITE_NODES)
    weights = jnp.asarray(weights / weights.sum(), dtype=mean.dtype)
    values = link(mean[..., None] + sd[..., None] * jnp.asarray(nodes, dtype=mean.dtype), link_name)
    return values @ weights


def _observe(key, likelihood: str, rate, draws_noise):
    """Counts given their rates, from the program's own count distribution."""
    return count_distribution(likelihood, rate, draws_noise).sample(key)


class BatchEffects(NamedTuple):
    """What a cell's batch adds to its prediction, per posterior draw, and which batches the
    predicted cells come from. A run without batches has one batch of no effect."""

    mean_shift: jax.Array  # (draws, batches, genes) latent mean shift (gaussian: with the value offset)
    log_scale: jax.Array  # (draws, batches, genes) log gene scale (0 for continuous values)
    weights: jax.Array  # (batches,) probability that a predicted cell is from each batch
    names: tuple[str, ...] | None  # None: the run has no batches


def batch_effects(posterior, record: dict, batch: str | None, model) -> BatchEffects:
    """The batch effects of ``posterior``'s draws: of ``batch`` alone, or (None) of every batch
    weighted by its share of the training cells."""
    names = record.get("batches")
    if names is None:
        if batch is not None:
            raise DataError(f"batch {batch!r} was asked for, but this run was fitted without batches; predict "
                            "without a batch (CLI: drop --batch), or refit with a batch key (--batch-key)")
        zeros = jnp.zeros((posterior.sizes["chain"] * posterior.sizes["draw"], 1, posterior.sizes["gene"]))
        return BatchEffects(zeros, zeros, jnp.ones(1), None)
    if batch is None:
        weights = np.asarray(record["cells_per_batch"], dtype=np.float64)
    elif str(batch) in names:
        weights = (np.asarray(names) == str(batch)).astype(np.float64)
    else:
        close = difflib.get_close_matches(str(batch), names, n=3)
        raise DataError(f"batch {batch!r} is not a batch of this run ({len(names)} batches from obs"
                        f"[{record.get('batch_key')!r}]: {', '.join(map(repr, names[:8]))}"
                        + (f"; did you mean {', '.join(map(repr, close))}?" if close else "")
                        + "); leave it out to average over the batches")
    mean_shift = stacked_draws(posterior["batch_mean_shift"])
    if model.likelihood == "gaussian":
        mean_shift = mean_shift + stacked_draws(posterior["batch_offset"])
        log_scale = np.zeros_like(mean_shift)
    else:
        log_scale = stacked_draws(posterior["batch_log_scale"])
    return BatchEffects(jnp.asarray(mean_shift), jnp.asarray(log_scale), jnp.asarray(weights / weights.sum(),
                                                                                      jnp.float32), tuple(names))


def predict(run: str | Path, perturbations, *, n_cells: int = 100, n_draws: int = DEFAULT_CELL_DRAWS,
            seed: int = 0, times=None, batch: str | None = None) -> anndata.AnnData:
    """``predict_posterior`` on a run folder written by ``lcd-bayes fit``."""
    tree, config, record = load_run(run)
    return predict_posterior(tree, config, record, perturbations, n_cells=n_cells, n_draws=n_draws, seed=seed,
                             run_name=str(Path(run).resolve()), times=times, batch=batch)


def predict_posterior(tree, config, record: dict, perturbations, *, n_cells: int = 100,
                      n_draws: int = DEFAULT_CELL_DRAWS, seed: int = 0, run_name: str = "in memory",
                      summaries: bool = True, times=None, batch: str | None = None) -> anndata.AnnData:
    """Predicted cells of each requested condition, with per-gene posterior expression summaries.

    Parameters
    ----------
    tree, config, record : a fit's posterior DataTree, ``RunConfig`` and data record (what a run
        folder holds; ``lcd_bayes.io.run_folder.load_run``).
    perturbations : ``"A+B,C"`` or a list of labels; the control label predicts control cells.
    n_cells : cells per condition.
    n_draws : posterior draws the cells cycle over (all draws enter the expression summaries; a
        Laplace-refined run's trajectory table is summarized over its refined draws).
    seed : random seed; the same seed gives the same cells.
    summaries : False leaves out the expected-expression summaries (``varm``, or the trajectory
        table), whose Gauss-Hermite nodes take draws x conditions x genes x 32 floats: cells alone
        for many conditions.
    times : None (the stationary state), or times after the condition's shift switches on in cells
        at the control's stationary state (``"0.1,1,5"`` or numbers >= 0, model time units; a
        nonlinear run's times are rounded to its ``sim_dt``): ``n_cells`` cells per condition and time.
    batch : for a run fitted with batches, the batch to predict cells of; None (default) draws
        each cell's batch in proportion to the training cells per batch (``obs["batch"]``) and
        averages the summaries over the batches with the same weights.

    Returns
    -------
    AnnData (conditions x n_cells, genes): counts in ``X`` (values on the training scale for a
    gaussian run), ``obs[perturbation_key]``, ``obs["size_factor"]``, ``obs["draw"]``;
    ``varm["expected_mean"]``, ``varm["expected_low"]``, ``varm["expected_high"]`` (genes x
    conditions, order in ``uns["lcd_bayes"]["conditions"]``). With ``times``: conditions x times x
    n_cells cells with ``obs["time"]``, and instead of ``varm`` the trajectory table
    ``uns["lcd_bayes"]["trajectories"]`` (``trajectory_table``).
    """
    if int(n_cells) < 1:
        raise ValueError(f"n_cells (CLI --cells) must be a positive number of cells per condition, not {n_cells}")
    if int(n_draws) < 1:
        raise ValueError(f"n_draws (CLI --draws) must be a positive number of posterior draws, not {n_draws}")
    # A Laplace-refined run keeps the guide's draws too: its Laplace draws are for the effects'
    # intervals, and cells predicted from them were about twice as far off (docs/evaluation.md).
    source = "guide_posterior" if "guide_posterior" in tree.children else "posterior"
    posterior = tree[source]
    model = config.model
    request = parse_request(perturbations, record, has_target_law="shift_mean" in posterior)
    nonlinear = model.drift == "nonlinear"
    if times is not None:
        times = parse_times(times)
    draws = posterior_draws(posterior, model)
    n_samples = draws["drift"].shape[0]
    batches = batch_effects(posterior, record, batch, model)

    key_shift, key_draws, key_cells = jax.random.split(jax.random.PRNGKey(seed), 3)
    offsets = condition_offsets(draws, request, key_shift)
    library = (record.get("control_size_factor_log_mean", 0.0), record.get("control_size_factor_log_sd",
                                                                            record.get("mean_size_factor_log_sd", 0.0)))
    if model.library == "latent":  # the fitted law of the log library sizes, not the panel totals'
        library = (0.0, float(np.median(stacked_draws(posterior["library_sd"]))))
    # Every (condition, time) of a time course becomes one condition of the stationary code below.
    covariances = None
    if times is None:
        means, sds = latent_moments(draws, offsets, key_shift, model)  # (draws, conditions, genes)
    else:
        means, sds, covariances = _trajectory_moments(draws, offsets, key_shift, times, model)
    if summaries and times is None:
        expected = _expected_expression(means, sds, draws, model, library, batches)
        low, high = np.quantile(np.asarray(expected), [(1 - INTERVAL) / 2, (1 + INTERVAL) / 2], axis=0)
    elif summaries:
        # The trajectory's intervals come from the refined draws, the cells from the guide's. The
        # guide's intervals were far too narrow here: on a 5-gene Gaussian screen its 90% bands held
        # the simulated mean trajectory at 44-76% of (gene, time) points per perturbation (24% at
        # t = 0.05, where the relaxation rates matter most), the Laplace draws' at 96-100%.
        refined = {name: jnp.asarray(stacked_draws(tree["posterior"][name])) for name in draws}
        expected = _expected_trajectories(refined, request, key_shift, times, model, library,
                                          batch_effects(tree["posterior"], record, batch, model))
        table = _trajectory_summary(np.asarray(expected), request.conditions, times, record["genes"])

    used = np.asarray(jax.random.choice(key_draws, n_samples, (min(int(n_draws), n_samples),), replace=False))
    if covariances is not None:
        values, size_factor, draw_index, cell_batch = _sample_cells(key_cells, means, draws, used, model, library,
                                                                    int(n_cells), batches, covariances=covariances)
    elif nonlinear:
        values, size_factor, draw_index, cell_batch = _sample_cells(
            key_cells, means, draws, used, model, library, int(n_cells), batches,
            law=(_nonlinear_params(draws), offsets, _law_keys(key_shift, n_samples)))
    else:
        values, size_factor, draw_index, cell_batch = _sample_cells(key_cells, means, draws, used, model, library,
                                                                    int(n_cells), batches)
    n_times = 1 if times is None else times.size
    labels = np.repeat(np.array(request.conditions), n_times * int(n_cells))
    adata = prediction_anndata(
        values.reshape(-1, values.shape[-1]), labels, record["genes"],
        space="log1p_normalized" if model.likelihood == "gaussian" else "counts", method="lcd",
        perturbation_key=record["perturbation_key"], control=record["control"], sep=record["sep"],
        uns={"run": run_name, "conditions": list(request.conditions),
             "new_labels": list(request.new_labels), "n_draws": int(used.size), "draws_from": source,
             "interval": INTERVAL, "seed": int(seed), "batch": "all" if batch is None else str(batch)},
    )
    adata.obs["size_factor"] = size_factor.reshape(-1)
    adata.obs["draw"] = draw_index.reshape(-1)
    if batches.names is not None:
        adata.obs["batch"] = pd.Categorical.from_codes(cell_batch.reshape(-1), categories=list(batches.names))
    if times is not None:
        adata.obs["time"] = np.tile(np.repeat(times, int(n_cells)), len(request.conditions))
        adata.uns["lcd_bayes"]["times"] = times
        if summaries:
            adata.uns["lcd_bayes"]["trajectories"] = table
            adata.uns["lcd_bayes"]["trajectories_from"] = "posterior"
    elif summaries:
        adata.varm["expected_mean"] = np.asarray(expected.mean(axis=0)).T
        adata.varm["expected_low"] = low.T
        adata.varm["expected_high"] = high.T
    return adata


def posterior_draws(posterior, model) -> dict[str, jax.Array]:
    """The draws prediction needs, stacked over chains: (draws, ...) per variable."""
    names = ["drift", "basal_drift", "shift", "self_decay", "stationary_sd"]
    names += list(NONLINEAR_PARAMS) if model.drift == "nonlinear" else []
    names += [n for n in ("shift_mean", "shift_sd", "gene_scale", "concentration", "gate", "noise_sd") if n in posterior]
    return {name: jnp.asarray(stacked_draws(posterior[name])) for name in dict.fromkeys(names)}


def _law_keys(key: jax.Array, n_draws: int) -> jax.Array:
    # One noise key per draw of a nonlinear run, shared by its conditions (their differences then
    # carry less Monte Carlo noise) and by the summaries and the cells (the same law for both).
    return jax.random.split(jax.random.fold_in(key, 1), n_draws)


def latent_moments(draws: dict, offsets: jax.Array, key: jax.Array, model) -> tuple[jax.Array, jax.Array]:
    """Stationary latent means and sds, (draws, conditions, genes), of the conditions whose drift
    offsets are ``offsets`` (``condition_offsets``): closed form for the linear drift, the model's
    particle solver for the nonlinear one (``key`` seeds its noise)."""
    if model.drift == "nonlinear":
        return _nonlinear_moments(_nonlinear_params(draws), offsets, _law_keys(key, offsets.shape[0]), model=model)
    means = jax.vmap(stationary_means)(draws["drift"], offsets)
    return means, jnp.broadcast_to(draws["stationary_sd"][:, None, :], means.shape)


def _expected_expression(means, sds, draws, model, library, batches: BatchEffects) -> jax.Array:
    """``E[y_g]`` per draw and condition at the control cells' library sizes, averaged over the
    ``batches`` with their weights; ``sds`` (draws, conditions, genes) the latent sd of each
    condition."""
    shifted = means[:, None] + batches.mean_shift[:, :, None, :]  # (draws, batches, conditions, genes)
    if model.likelihood == "gaussian":
        per_batch = shifted
    else:
        mean_size_factor = math.exp(library[0] + 0.5 * library[1] ** 2)
        scale = draws["gene_scale"][:, None, None, :] * jnp.exp(batches.log_scale)[:, :, None, :]
        per_batch = mean_size_factor * scale * expected_link(shifted, sds[:, None], model.link)
    return jnp.einsum("b,sbqg->sqg", batches.weights.astype(per_batch.dtype), per_batch)


@jax.jit
def _trajectory_means(drifts, basal, means, times):
    """Means (draws, conditions x times, genes), conditions outer, of cells at each time after the
    switch, starting from the control's stationary mean ``-A^{-1} b`` of the same draw."""

    def one_draw(args):
        drift, start_offset, targets = args
        start = stationary_means(drift, start_offset[None])[0]
        return jnp.swapaxes(relaxing_means(drift, start, targets, times), 0, 1).reshape(-1, targets.shape[-1])

    return jax.lax.map(one_draw, (drifts, basal, means), batch_size=16)


def _trajectory_moments(draws: dict, offsets, key, times: np.ndarray, model):
    """Means and sds (draws, conditions x times, genes), conditions outer, of cells at each time
    after the switch, and their covariances (draws, conditions x times, genes, genes) for the
    nonlinear drift (None for the linear one, whose law at time t differs from the stationary
    one only in its mean: ``dynamics.transient``)."""
    if model.drift == "nonlinear":
        means, covariances = _nonlinear_trajectories(_nonlinear_params(draws), offsets, draws["basal_drift"],
                                                     _law_keys(key, offsets.shape[0]), tuple(times), model=model)
        return means, jnp.sqrt(jnp.diagonal(covariances, axis1=-2, axis2=-1)), covariances
    means, _ = latent_moments(draws, offsets, key, model)
    means = _trajectory_means(draws["drift"], draws["basal_drift"], means, jnp.asarray(times, means.dtype))
    return means, jnp.broadcast_to(draws["stationary_sd"][:, None, :], means.shape), None


def _expected_trajectories(draws, request: Request, key, times: np.ndarray, model, library,
                           batches: BatchEffects) -> jax.Array:
    """``E[y_g]`` (draws, conditions x times, genes) along the time course of a run's draws."""
    means, sds, _ = _trajectory_moments(draws, condition_offsets(draws, request, key), key, times, model)
    return _expected_expression(means, sds, draws, model, library, batches)


@functools.partial(jax.jit, static_argnames=("times", "model"))
def _nonlinear_trajectories(params, offsets, basal, keys, times: tuple, *, model):
    """Means (draws, conditions x times, genes), conditions outer, and covariances of a nonlinear
    run's cells at each time after the switch: ``PREDICT_PARTICLES`` particles drawn from the
    draw's control law, run forward under each condition's shift (``dynamics.transient``), their
    covariance shrunk toward the control's as the stationary law's is toward its LNA."""
    settings = model.simulation_settings(PREDICT_PARTICLES)

    def one_draw(args):
        draw_params, offset, control_offset, key = args
        control = _nonlinear_law(draw_params, control_offset[None], key, model)
        start_key, run_key = jax.random.split(jax.random.fold_in(key, 2))
        eps = jax.random.normal(start_key, (PREDICT_PARTICLES, offset.shape[-1]), offset.dtype)
        start = control.means[0] + eps @ jnp.linalg.cholesky(control.covariances[0]).T
        means, covariances = relaxing_particles(nonlinear_drift, draw_params, start, offset, np.asarray(times), run_key,
                                                dt=settings.dt, sigma=settings.sigma)
        d = offset.shape[-1]
        shrink = jax.vmap(lambda c: shrink_toward(c, control.covariances[0], PREDICT_PARTICLES, PREDICT_PARTICLES)[0])
        return means.reshape(-1, d), shrink(covariances.reshape(-1, d, d))

    return jax.lax.map(one_draw, (params, offsets, basal, keys), batch_size=4)


def _trajectory_summary(expected: np.ndarray, conditions, times: np.ndarray, genes) -> pd.DataFrame:
    """Posterior mean and 5/50/95% quantiles of the expected expression (draws, conditions x times,
    genes), one row per (condition, time, gene)."""
    n_genes = expected.shape[-1]
    q05, q50, q95 = np.quantile(expected, [(1 - INTERVAL) / 2, 0.5, (1 + INTERVAL) / 2], axis=0)
    return pd.DataFrame({
        "condition": np.repeat(np.array(conditions, dtype=object), times.size * n_genes),
        "time": np.tile(np.repeat(times, n_genes), len(conditions)),
        "gene": np.tile(np.asarray(genes, dtype=object), len(conditions) * times.size),
        "mean": expected.mean(axis=0).reshape(-1), "q05": q05.reshape(-1), "q50": q50.reshape(-1),
        "q95": q95.reshape(-1),
    })


def trajectory_table(adata: anndata.AnnData) -> pd.DataFrame:
    """The trajectory table of a prediction made with ``times``: one row per (condition, time,
    gene), the expected expression's posterior ``mean`` and ``q05``, ``q50``, ``q95``."""
    info = adata.uns.get("lcd_bayes", {})
    if "trajectories" not in info:
        raise DataError("this prediction has no trajectory table: predict with times (--times 0.1,1,5) and "
                        "summaries on")
    return info["trajectories"]


def _nonlinear_params(draws: dict) -> dict:
    """The drift parameters of every draw in model orientation (R as (target, source)); the basal
    drift is zero because ``condition_offsets`` already adds it to each condition's shift."""
    params = from_posterior({name: draws[name] for name in NONLINEAR_PARAMS})
    return {**params, "basal_drift": jnp.zeros_like(draws["basal_drift"])}


def _nonlinear_law(params, offsets, key, model):
    return stationary_law_nonlinear(params, offsets, key, model.simulation_settings(PREDICT_PARTICLES),
                                    n_doublings=model.lna_doublings, max_spectral_radius=model.max_spectral_radius)


@functools.partial(jax.jit, static_argnames=("model",))
def _nonlinear_moments(params, offsets, keys, *, model):
    """Means and sds (draws, conditions, genes) of every draw's requested conditions."""

    def one_draw(args):
        law = _nonlinear_law(*args, model)
        return law.means, jnp.sqrt(jnp.diagonal(law.covariances, axis1=-2, axis2=-1))

    return jax.lax.map(one_draw, (params, offsets, keys), batch_size=4)


def _sample_cells(key, means, draws, used: np.ndarray, model, library, n_cells: int, batches: BatchEffects, law=None,
                  covariances=None):
    """Cells per condition cycling over the ``used`` draws, each from a batch drawn with the
    ``batches`` weights; returns values, size factors, draws and batch indices.
    ``law``: for a nonlinear run, (params, offsets, keys) of every draw, to re-solve the used
    draws' per-condition covariances (identical keys: identical laws); ``covariances``: instead,
    every draw's per-condition covariance (draws, conditions, genes, genes), given."""
    per_draw = -(-n_cells // used.size)  # ceil: cells each used draw contributes per condition
    noise_name = {"nb": "concentration", "zip": "gate", "gaussian": "noise_sd"}.get(model.likelihood)
    n_genes = means.shape[-1]
    noise = draws[noise_name][used] if noise_name else jnp.zeros((used.size, n_genes))
    scale = draws["gene_scale"][used] if "gene_scale" in draws else jnp.ones((used.size, n_genes))
    keys = jax.random.split(key, used.size)
    observation = (scale, noise, batches.mean_shift[used], batches.log_scale[used])
    fixed = (jnp.asarray(library, dtype=means.dtype), batches.weights)
    if covariances is not None:
        values, size_factor, batch = _cells_of_factors(keys, means[used], jnp.linalg.cholesky(covariances[used]),
                                                       observation, fixed, model=model, per_draw=per_draw)
    elif law is None:
        values, size_factor, batch = _cells_of_draws(keys, means[used], draws["drift"][used], observation, fixed,
                                                     model=model, per_draw=per_draw)
    else:
        params, offsets, law_keys = jax.tree_util.tree_map(lambda a: a[used], law)
        values, size_factor, batch = _nonlinear_cells_of_draws(keys, params, offsets, law_keys, observation, fixed,
                                                               model=model, per_draw=per_draw)
    # (draws, conditions, per_draw, ...) -> (conditions, draws * per_draw, ...), the first n_cells.
    values = jnp.moveaxis(values, 0, 1).reshape(means.shape[1], -1, n_genes)[:, :n_cells]
    size_factor, batch = (jnp.moveaxis(a, 0, 1).reshape(means.shape[1], -1)[:, :n_cells] for a in (size_factor, batch))
    draw_index = np.broadcast_to(np.repeat(used, per_draw)[None, :n_cells], size_factor.shape)
    return np.asarray(values), np.asarray(size_factor), np.asarray(draw_index), np.asarray(batch)


# The ``_cells_of_*`` functions take, per draw, ``observation`` = (gene scale, noise parameter,
# batch mean shifts, batch log scales) and, shared, ``fixed`` = (library log mean and sd, batch
# weights); jitted once per shape.


@functools.partial(jax.jit, static_argnames=("model", "per_draw"))
def _cells_of_draws(keys, means, drifts, observation, fixed, *, model, per_draw: int):
    """``per_draw`` cells per condition for each draw: latent states from the draw's stationary
    law, library sizes like the control's, counts from the likelihood."""

    def one_draw(args):
        mean, drift, draw_observation, draw_key = args
        law = stationary_law(drift, dt=model.dt, sigma=model.sigma, n_doublings=model.n_doublings,
                             max_spectral_radius=model.max_spectral_radius, scheme=model.scheme)
        tril = jnp.linalg.cholesky(law.covariance)
        return _cells_of_law(draw_key, mean, tril, draw_observation, fixed, model, per_draw)

    return jax.lax.map(one_draw, (means, drifts, observation, keys), batch_size=16)


@functools.partial(jax.jit, static_argnames=("model", "per_draw"))
def _nonlinear_cells_of_draws(keys, params, offsets, law_keys, observation, fixed, *, model, per_draw: int):
    """As ``_cells_of_draws`` for a nonlinear run: one covariance per condition and draw."""

    def one_draw(args):
        draw_params, offset, law_key, draw_observation, draw_key = args
        law = _nonlinear_law(draw_params, offset, law_key, model)
        tril = jnp.linalg.cholesky(law.covariances)  # (conditions, genes, genes)
        return _cells_of_law(draw_key, law.means, tril, draw_observation, fixed, model, per_draw)

    return jax.lax.map(one_draw, (params, offsets, law_keys, observation, keys), batch_size=4)


@functools.partial(jax.jit, static_argnames=("model", "per_draw"))
def _cells_of_factors(keys, means, trils, observation, fixed, *, model, per_draw: int):
    """As ``_cells_of_draws`` with each draw's per-condition covariance factors given."""

    def one_draw(args):
        mean, tril, draw_observation, draw_key = args
        return _cells_of_law(draw_key, mean, tril, draw_observation, fixed, model, per_draw)

    return jax.lax.map(one_draw, (means, trils, observation, keys), batch_size=16)


def _cells_of_law(draw_key, mean, tril, observation, fixed, model, per_draw: int):
    """``per_draw`` cells per condition from ``N(mean_q, tril tril^T)``, ``tril`` shared (genes,
    genes) or per condition (conditions, genes, genes), each moved by its batch's effects, then
    library sizes and the likelihood. Returns values, size factors and batch indices."""
    scale, noise, batch_shift, batch_log_scale = observation
    library, batch_weights = fixed
    k_x, k_s, k_y = jax.random.split(draw_key, 3)
    eps = jax.random.normal(k_x, (mean.shape[0], per_draw, mean.shape[1]))
    if tril.ndim == 2:
        latent = mean[:, None, :] + eps @ tril.T
    else:
        latent = mean[:, None, :] + jnp.einsum("qij,qcj->qci", tril, eps)
    # Its own key, so that the cells of a run without batches are those they always were.
    batch = jax.random.categorical(jax.random.fold_in(draw_key, 3), jnp.log(batch_weights), shape=latent.shape[:2])
    latent = latent + batch_shift[batch]
    if model.likelihood == "gaussian":
        return latent + noise * jax.random.normal(k_y, latent.shape), jnp.ones(latent.shape[:2]), batch
    size_factor = jnp.exp(library[0] + library[1] * jax.random.normal(k_s, latent.shape[:2]))
    rate = size_factor[..., None] * link(latent, model.link) * scale * jnp.exp(batch_log_scale[batch]) + 1e-6
    return _observe(k_y, model.likelihood, rate, noise).astype(jnp.float32), size_factor, batch
