"""The latent causal diffusion as one NumPyro program (docs/model.md; linear drift).

    A = D (R - I),  D = diag(exp(kappa))        drift (= W - D with W = D R); A[k, j]: effect of j on k
    c_p = D (on-target shift on T(p) + sparse off-target shift for labels without modelled target)
    mu_q = -A^{-1} (b + sum_{p in q} c_p)       stationary mean of condition q
    Sigma = F Sigma F^T + Q                     stationary covariance of the discretized SDE
                                                (trapezoidal: = the SDE's, A Sigma + Sigma A^T + sigma^2 I = 0)
    x_i ~ N(mu_q(i), Sigma)                     latent state of cell i
    y_ig ~ NB(s_i exp(x_ig) u_g, phi_g)         counts (or ZIP, Poisson; Gaussian integrates x out;
                                                [model] link = "softplus": softplus(x_ig))
    log s_i ~ N(0, library_sd^2)                [model] library = "latent"; else s_i as observed

With batches (``[data] batch_key``), cell i of batch b(i) has a biological and a technical effect,
each per batch and gene and drawn from a shared Normal(0, s) whose spread s is itself drawn (a small
batch borrows strength from the others):

    mu_q,b = -A^{-1} (b + D beta_b + sum_{p in q} c_p)    beta_bg ~ N(0, s_basal^2): basal drift shift
    y_ig ~ NB(s_i exp(x_ig) u_g exp(tau_b(i)g), phi_g)     tau_bg ~ N(0, s_scale^2): gene scale
                                                           (gaussian: y = x + tau_b(i) + noise)

Priors sit in ``drift_prior``, the likelihood in ``lcd_model``, which integrates each cell's state
(and latent library) out by importance sampling from ``conditional_proposal`` (so the guide covers the globals only).
``[model] pool_decay`` and ``pool_concentration`` draw the per-gene kappa_g and log phi_g from a
shared Normal(m, s) whose location and spread are themselves drawn (partial pooling).

With ``[model] drift = "nonlinear"`` the drift is
``D (-x + s tanh(R x / s + h)) + b + c`` and each condition q has its own moment-matched law
``N(mu_q, Sigma_q)`` from particle simulation (``dynamics.nonlinear``); the likelihoods are the same
with ``Sigma_q`` gathered by each cell's condition.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.handlers import substitute

from ..config import ModelConfig
from ..dynamics.nonlinear import stationary_law_nonlinear
from ..dynamics.stationary import effective_drift, excess_abscissa, stationary_law, stationary_means


CONCENTRATION_PRIOR_MEDIAN = 10.0  # of the NB concentration phi_g (LogNormal, log-sd 1.5)


class CellBatch(NamedTuple):
    """Per-cell arrays, passed to the jitted step as arguments (not baked in as constants)."""

    counts: jax.Array  # (cells, genes) counts, or continuous values for the gaussian likelihood
    size_factor: jax.Array  # (cells,)
    condition: jax.Array  # (cells,) int index into conditions
    batch: jax.Array | None = None  # (cells,) int index into the batches; None: one batch


def as_jax(cells):
    """The same per-cell arrays (a ``CellBatch``, or a program's other argument tuple) as JAX
    arrays, indexed by traced cell indices inside jitted code; an absent field stays None."""
    return type(cells)(*(None if a is None else jnp.asarray(a) for a in cells))


class Structure(NamedTuple):
    """Static description of the screen: which labels make each condition and what they target."""

    design: np.ndarray  # (conditions, perturbations) 0/1
    targets: np.ndarray  # (perturbations, genes) 0/1 on-target mask
    gene_scale_center: np.ndarray  # (genes,) log mean normalized expression; centers u_g's prior
    n_cells: int
    n_batches: int = 1  # > 1: per-batch technical and biological effects ([data] batch_key)

    @property
    def n_genes(self) -> int:
        return self.targets.shape[1]


class Drift(NamedTuple):
    """One draw of the drift and its stationary law."""

    drift: jax.Array  # (genes, genes) A actually used (projected onto the stable set if needed);
    #                   nonlinear: the Jacobian at the unperturbed fixed point
    shift: jax.Array  # (perturbations, genes) c_p
    basal_drift: jax.Array  # (genes,) b
    means: jax.Array  # (conditions, genes) mu_q
    covariance: jax.Array  # (genes, genes) Sigma; nonlinear: (conditions, genes, genes) Sigma_q
    batch_means: jax.Array | None = None  # (batches, genes) -A^{-1} D beta_b: each batch's mean shift


def cell_means(drift: Drift, cells: "CellBatch", idx) -> jax.Array:
    """The stationary mean of each cell ``idx``: its condition's, moved by its batch's."""
    means = drift.means[cells.condition[idx]]
    return means if drift.batch_means is None else means + drift.batch_means[cells.batch[idx]]


def batch_effect(name: str, spread_name: str, n_batches: int, n_genes: int, spread_scale: float) -> jax.Array:
    """Per-batch, per-gene effects ``~ Normal(0, s)``, ``s ~ HalfNormal(spread_scale)``, as
    (batches, genes). Sampled gene by gene in the ``genes`` plate, (genes, batches), so that the
    row-block guide puts gene k's batch effects in its block, beside the gene scale and basal
    drift they trade off against. Centered: batches hold hundreds of cells, which pin each effect."""
    spread = numpyro.sample(spread_name, dist.HalfNormal(spread_scale))
    with numpyro.plate("genes", n_genes, dim=-1):
        effect = numpyro.sample(name, dist.Normal(jnp.zeros((n_genes, n_batches)), spread).to_event(1))
    return effect.T


def per_gene(name: str, prior: dist.Distribution):
    """A per-gene parameter, sampled in the ``genes`` plate (the same density as an event of
    length d; the plate lets a batched guide give gene k's parameters one block)."""
    with numpyro.plate("genes", prior.batch_shape[-1], dim=-1):
        return numpyro.sample(name, prior)


def regularized_horseshoe(name: str, shape, global_scale, slab_scale: float, slab_df: float,
                          rows_plate: str | None = None):
    """Sparse weights ``z * tau * lambda_tilde`` (Piironen & Vehtari 2017), non-centered.

    Non-centering keeps the posterior geometry close to Gaussian, which a Gaussian guide can fit;
    the slab bounds the size of the few large weights so that the prior stays proper at scale.
    """
    global_scale = jnp.asarray(global_scale)
    scale = numpyro.sample(f"{name}_scale", dist.HalfCauchy(global_scale).to_event(global_scale.ndim))
    slab = numpyro.sample(
        f"{name}_slab", dist.InverseGamma(0.5 * slab_df, 0.5 * slab_df * slab_scale**2)
    )
    # Rows are a plate (not an event dim) so that a guide can batch over them (the row-block guide).
    with numpyro.plate(rows_plate or f"{name}_rows", shape[0], dim=-1):
        local = numpyro.sample(f"{name}_local", dist.HalfCauchy(jnp.ones(shape)).to_event(len(shape) - 1))
        raw = numpyro.sample(f"{name}_raw", dist.Normal(jnp.zeros(shape), 1.0).to_event(len(shape) - 1))
    if jnp.ndim(scale) == 1:  # one global scale per row (per perturbation label)
        scale = scale[:, None]
    return raw * scale * slab_shrunk_local(local, scale, slab)


def slab_shrunk_local(local, scale, slab):
    """``lambda_tilde = sqrt(c^2 lambda^2 / (c^2 + tau^2 lambda^2))``, written as
    ``lambda / hypot(1, tau lambda / c)``: the same number, but no square root of a vanishing
    argument. (A local scale of 8e-19 squared flushes to 0 in float32, and the root's gradient
    at 0 turned a 100-gene fit's gradients non-finite at step 695.)"""
    return local / jnp.hypot(1.0, scale * local / jnp.sqrt(slab))


def drift_prior(structure: Structure, config: ModelConfig) -> Drift:
    """Priors on the drift, shifts and basal drift; returns the stationary law they imply.

    Effects, shifts and basal drift are drawn relative to each target gene's self-decay
    ``D = diag(exp(kappa))``: ``A = D (R - I)``, ``b = D b_rel``, ``c_p = D c_rel_p`` (the same
    family as ``A = W - D`` with ``W = D R``). Then ``mu_q = -(R - I)^{-1} (b_rel + c_rel_q)`` does
    not depend on ``D``: the mean responses, which the data pin down well, fix the causal
    structure ``R``, while the time scale ``D``, seen only through ``Sigma`` and easily confused
    with count noise, cannot drag the effects into the prior's shrinkage or slab.
    """
    n_perturbations, n_genes = structure.targets.shape
    eye = jnp.eye(n_genes)

    relative_interaction = regularized_horseshoe(
        "interaction", (n_genes, n_genes), config.interaction_global_scale,
        config.interaction_slab_scale, config.interaction_slab_df, rows_plate="genes",  # row k: inputs of gene k
    ) * (1.0 - eye)
    log_decay = per_gene("log_decay", pooled_normal(
        "decay", n_genes, np.log(config.decay_prior_median), config.decay_prior_log_sd,
        config.decay_spread_scale if config.pool_decay else None))
    decay = jnp.exp(log_decay)
    drift = decay[:, None] * (relative_interaction - eye)
    basal = decay * per_gene("basal_relative", dist.Normal(jnp.zeros(n_genes), config.basal_scale))
    shift = decay * (on_target_shift(structure.targets, config) + off_target_shift(structure.targets, config))
    numpyro.deterministic("shift", shift)
    numpyro.deterministic("basal_drift", basal)
    numpyro.deterministic("relative_interaction", relative_interaction)
    if config.drift == "nonlinear":
        return nonlinear_stationary(structure, config, decay, relative_interaction, basal, shift)

    law = stationary_law(
        drift, dt=config.dt, sigma=config.sigma, n_doublings=config.n_doublings,
        max_spectral_radius=config.max_spectral_radius, scheme=config.scheme,
    )
    # A draw without a stationary state was projected onto the stable set (law.projection < 1);
    # the penalty, in nats per cell per unit of spectral abscissa beyond the limit, pushes the
    # posterior away from there so that projected draws stay rare (and are counted after the fit).
    numpyro.factor("stability", -config.stability_penalty * structure.n_cells * excess_abscissa(law))
    numpyro.deterministic("log_spectral_radius", law.log_spectral_radius)

    used_drift = effective_drift(law, config.scheme)
    offsets = basal + jnp.asarray(structure.design) @ shift
    means = stationary_means(used_drift, offsets)
    numpyro.deterministic("drift", used_drift)
    numpyro.deterministic("stationary_mean", means)
    numpyro.deterministic("stationary_covariance", law.covariance)
    batch_means = None
    if structure.n_batches > 1:
        # A batch's shift of the basal drift moves its cells' means through the same network as a
        # perturbation does (the linear drift's covariance does not depend on it).
        batch_basal = decay * batch_effect("batch_basal_relative", "batch_basal_sd", structure.n_batches, n_genes,
                                           config.batch_basal_scale)
        numpyro.deterministic("batch_basal_drift", batch_basal)
        batch_means = numpyro.deterministic("batch_mean_shift", stationary_means(used_drift, batch_basal))
    return Drift(used_drift, shift, basal, means, law.covariance, batch_means)


def nonlinear_stationary(structure: Structure, config: ModelConfig, decay, relative_interaction, basal,
                         shift) -> Drift:
    """Priors of the nonlinear drift's own parameters and its stationary law per condition.

    Saturation ``s`` (latent units; large = linear) and input offset ``h`` per gene; the law is
    ``dynamics.nonlinear.stationary_law_nonlinear`` with fresh particle noise every SVI step.
    """
    n_genes = structure.n_genes
    if structure.n_batches > 1:
        raise ValueError("batch effects ([data] batch_key, --batch-key) are built for the linear drift only; fit "
                         "the nonlinear drift without a batch key, or the linear drift with it")
    saturation = numpyro.sample(
        "saturation",
        dist.LogNormal(jnp.full(n_genes, np.log(config.saturation_prior_median)), config.saturation_prior_log_sd).to_event(1),
    )
    input_offset = numpyro.sample(
        "input_offset", dist.Normal(jnp.zeros(n_genes), config.input_offset_scale).to_event(1)
    )
    params = {"self_decay": decay, "relative_interaction": relative_interaction, "saturation": saturation,
              "input_offset": input_offset, "basal_drift": basal}
    key = numpyro.prng_key()
    key = jax.random.PRNGKey(0) if key is None else key  # unseeded traces (shape inference) only
    law = stationary_law_nonlinear(
        params, jnp.asarray(structure.design) @ shift, key, config.simulation_settings(),
        n_doublings=config.lna_doublings, max_spectral_radius=config.max_spectral_radius,
    )
    # As the linear model: a fixed point whose linearized chain has no stationary state was
    # projected onto the stable set; penalize the worst condition's excess abscissa. Diverged
    # particles (the condition fell back to its LNA) cost as much as a unit of excess.
    excess = jnp.max(-jnp.log(law.projection)) / config.sim_dt
    diverged = jnp.mean(law.n_diverged > 0)
    numpyro.factor("stability", -config.stability_penalty * structure.n_cells * (excess + diverged))
    numpyro.deterministic("log_spectral_radius", jnp.max(law.log_spectral_radius))
    numpyro.deterministic("fixed_point_residual", jnp.max(law.residual))
    numpyro.deterministic("n_diverged", jnp.sum(law.n_diverged))
    numpyro.deterministic("drift", law.control_jacobian)
    numpyro.deterministic("stationary_mean", law.means)
    numpyro.deterministic("stationary_covariance", law.covariances)
    return Drift(law.control_jacobian, shift, basal, law.means, law.covariances)


def pooled_normal(name: str, n_genes: int, center: float, scale: float, spread_scale: float | None):
    """The per-gene law ``Normal(center, scale)``, or with ``spread_scale`` a partially pooled one:
    ``Normal(m, s)`` with ``m ~ Normal(center, scale)`` and ``s ~ HalfNormal(spread_scale)``
    (sites ``{name}_location`` and ``{name}_spread``)."""
    if spread_scale is None:
        return dist.Normal(jnp.full(n_genes, center), scale)
    location = numpyro.sample(f"{name}_location", dist.Normal(center, scale))
    spread = numpyro.sample(f"{name}_spread", dist.HalfNormal(spread_scale))
    return dist.Normal(jnp.full(n_genes, location), spread)


def on_target_shift(targets: np.ndarray, config: ModelConfig) -> jax.Array:
    """Shifts on each label's known target genes, drawn from a shared (hierarchical) law so that a
    target never perturbed in training still has a predictive shift distribution."""
    rows, cols = np.nonzero(targets)
    if rows.size == 0:
        return jnp.zeros(targets.shape)
    mean = numpyro.sample("shift_mean", dist.Normal(0.0, config.shift_mean_scale))
    sd = numpyro.sample("shift_sd", dist.HalfNormal(config.shift_sd_scale))
    raw = numpyro.sample("on_target_raw", dist.Normal(jnp.zeros(rows.size), 1.0).to_event(1))
    return jnp.zeros(targets.shape).at[rows, cols].set(mean + sd * raw)


def off_target_shift(targets: np.ndarray, config: ModelConfig) -> jax.Array:
    """Sparse shifts away from the known targets: for labels with no modelled target, whose whole
    effect must be learned here (a drug, or a gene outside the modelled panel), and with
    ``off_target = "all"`` for every label (with a narrower scale where the target is known)."""
    has_target = targets.sum(axis=1) > 0
    labels = np.arange(targets.shape[0]) if config.off_target == "all" else np.flatnonzero(~has_target)
    if labels.size == 0:
        return jnp.zeros(targets.shape)
    label_scale = np.where(has_target[labels], config.off_target_scale, config.unknown_target_scale)
    shift = regularized_horseshoe(
        "off_target", (labels.size, targets.shape[1]), jnp.asarray(label_scale), config.off_target_slab_scale, 4.0
    )
    return jnp.zeros(targets.shape).at[labels].set(shift * (1.0 - jnp.asarray(targets[labels])))


def link(latent: jax.Array, name: str) -> jax.Array:
    """Expression rate per unit size factor and gene scale."""
    return jax.nn.softplus(latent) if name == "softplus" else jnp.exp(latent)


def inverse_link(rate: jax.Array, name: str) -> jax.Array:
    if name == "softplus":
        return rate + jnp.log(-jnp.expm1(-rate))  # softplus^{-1}, stable for small rates
    return jnp.log(rate)


def lcd_model(cells: CellBatch, structure: Structure, config: ModelConfig, batch_size: int | None = None,
              cell_particles: int = 1, encoder_hidden: int = 64, cell_axis: str | None = None):
    """The generative program. ``batch_size`` subsamples cells (the ELBO is rescaled by the plate).
    ``cell_axis``: inside ``jax.shard_map`` over the cells, the mesh axis: each device then draws
    its own minibatch and importance noise (``cell_key``) from the shared random key.

    The per-cell states x_i are integrated out inside the program, as the gaussian likelihood does
    in closed form: each cell's ``log p(y_i | globals)`` enters as its importance-weighted bound
    (Burda et al. 2016) with ``cell_particles`` draws from ``conditional_proposal``, so the guide
    covers the global parameters only. The bound tends to the exact marginal as the number of
    particles grows; with one particle it is the usual ELBO of a Gaussian cell guide, whose gap
    depends on the globals and biased them (docs/inference.md, "The per-cell states are integrated
    out").
    """
    drift = drift_prior(structure, config)
    n_genes = structure.n_genes
    batches = structure.n_batches > 1

    if config.likelihood == "gaussian":
        noise_sd = per_gene("noise_sd", dist.HalfNormal(jnp.ones(n_genes)))
        # The technical batch effect of continuous values: an offset of the observed values.
        offset = (batch_effect("batch_offset", "batch_scale_sd", structure.n_batches, n_genes, config.batch_scale_scale)
                  if batches else None)
        # y = x + noise with x ~ N(mu_q, Sigma): x integrates out in closed form.
        marginal_tril = jnp.linalg.cholesky(drift.covariance + jnp.diag(noise_sd**2))
        with cell_plate(structure.n_cells, cells.counts.shape[0], batch_size, cell_axis) as idx:
            mean = cell_means(drift, cells, idx)
            if batches:
                mean = mean + offset[cells.batch[idx]]
            # (Arguments inside the cells plate are traced, so numpyro's validation checks nothing
            # there, and under jax.shard_map it fails to run at all.)
            numpyro.sample(
                "y", dist.MultivariateNormal(mean,
                                             scale_tril=condition_factor(marginal_tril, cells.condition[idx]),
                                             validate_args=False),
                obs=cells.counts[idx],
            )
        return

    gene_scale = per_gene("gene_scale", dist.LogNormal(jnp.asarray(structure.gene_scale_center), 1.0))
    batch_log_scale = (batch_effect("batch_log_scale", "batch_scale_sd", structure.n_batches, n_genes,
                                    config.batch_scale_scale) if batches else None)
    noise = observation_noise_prior(config, n_genes)
    latent_library = config.library == "latent"
    if latent_library:
        library_sd = numpyro.sample("library_sd", dist.HalfNormal(config.library_sd_scale))
    latent_tril = jnp.linalg.cholesky(drift.covariance)

    with cell_plate(structure.n_cells, cells.counts.shape[0], batch_size, cell_axis) as idx:
        counts = cells.counts[idx]
        # Centered: x ~ N(mu_q, Sigma) itself is the state law (a non-centered x = mu + L eps
        # reached a higher ELBO on simulated counts but explained the cell-to-cell variance by
        # count noise, inflating the self-decay tenfold).
        proposal = conditional_proposal(cells, idx, structure, config, encoder_hidden, drift, latent_tril)
        key = cell_key(cell_axis)
        size, library_ratio = cells.size_factor[idx], 0.0
        if latent_library:
            # (log s_i, x_i) drawn jointly: log s_i from its own proposal, then x_i given it, the
            # encoder's pseudo-observation moved by the library's difference from the totals', so
            # that the draws follow the posterior's trade of a cell's library against its state.
            key, library_key = jax.random.split(key)
            library = library_proposal(cells, idx, structure, config)
            log_size = library.rsample(library_key, (cell_particles,))  # (particles, cells)
            proposal = proposal.moved(log_size - jnp.log(size))
            library_prior = dist.Normal(0.0, library_sd, validate_args=False)
            library_ratio = library_prior.log_prob(log_size) - library.log_prob(log_size)
            size = jnp.exp(log_size)
        latent = proposal.sample(key, cell_particles)  # (particles, cells, genes), reparameterized
        scale = gene_scale if batch_log_scale is None else gene_scale * jnp.exp(batch_log_scale[cells.batch[idx]])
        rate = size[..., None] * link(latent, config.link) * scale + 1e-6
        # log p(y | x) + log N(x; mu_q, Sigma) - log q(x), with the parts of log p(y | x) that do
        # not depend on x added once per cell instead of once per particle.
        log_weight = (rate_log_likelihood(config.likelihood, counts, rate, noise) + proposal.log_density_ratio(latent)
                      + library_ratio)
        numpyro.factor("y", jax.nn.logsumexp(log_weight, axis=0) - jnp.log(cell_particles)
                       + rate_free_log_likelihood(config.likelihood, counts, noise))


def cell_key(cell_axis: str | None) -> jax.Array:
    """A random key for the cells' own randomness: the model's next key, folded with the
    device's index along ``cell_axis`` (data-parallel SVI) so that devices differ. Unseeded
    traces (shape inference) get a fixed key."""
    key = numpyro.prng_key()
    if key is None:
        return jax.random.PRNGKey(0)
    return key if cell_axis is None else jax.random.fold_in(key, jax.lax.axis_index(cell_axis))


def cell_plate(n_cells: int, n_rows: int, batch_size: int | None, cell_axis: str | None = None) -> numpyro.plate:
    """The plate over the ``n_cells`` cells of the screen, of which the arrays passed in hold
    ``n_rows`` (all of them, or one device's shard in data-parallel SVI); with ``batch_size`` a
    minibatch of those rows, the ELBO rescaled by the plate to all ``n_cells``.

    The minibatch is a window of ``batch_size`` consecutive rows at a uniformly random start,
    wrapping around: every row has the same chance to be in it, so the estimate stays unbiased,
    provided the cells are in random order (``inference.svi.fit_svi`` shuffles them once, seeded).
    It costs a gather; numpyro's own CPU sampler (a sequential Fisher-Yates scan of ``batch_size``
    steps) took half of a 100-gene step, and a sort-based permutation of 100,000 cells 15 ms.
    """
    if batch_size is None or batch_size >= n_rows:
        if n_rows == n_cells:
            return numpyro.plate("cells", n_cells)
        batch_size = n_rows
    start = jax.random.randint(cell_key(cell_axis), (), 0, n_rows)
    window = (start + jnp.arange(batch_size)) % n_rows
    with substitute(data={"cells": window}):
        return numpyro.plate("cells", n_cells, subsample_size=batch_size)


def condition_factor(tril: jax.Array, condition: jax.Array) -> jax.Array:
    """The Cholesky factor for each cell: shared (genes, genes) as is, or per condition
    (conditions, genes, genes) gathered by the cell's condition (nonlinear drift)."""
    return tril if tril.ndim == 2 else tril[condition]


def observation_noise_prior(config: ModelConfig, n_genes: int) -> jax.Array | None:
    """Per-gene noise parameter: NB concentration, or ZIP zero-inflation probability."""
    likelihood = config.likelihood
    if likelihood == "nb":
        log_law = pooled_normal("concentration", n_genes, np.log(CONCENTRATION_PRIOR_MEDIAN), 1.5,
                                config.concentration_spread_scale if config.pool_concentration else None)
        return per_gene("concentration", dist.LogNormal(log_law.loc, log_law.scale))
    if likelihood == "zip":
        return per_gene("gate", dist.Beta(jnp.ones(n_genes), 9.0))
    return None


def count_distribution(likelihood: str, rate: jax.Array, noise: jax.Array | None):
    """``p(y | rate)`` per cell and gene (unvalidated: the arguments are traced arrays)."""
    if likelihood == "nb":
        return dist.NegativeBinomial2(rate, noise, validate_args=False)
    if likelihood == "zip":
        return dist.ZeroInflatedPoisson(noise, rate, validate_args=False)
    return dist.Poisson(rate, validate_args=False)


def rate_log_likelihood(likelihood: str, counts: jax.Array, rate: jax.Array, noise: jax.Array | None) -> jax.Array:
    """The part of ``log p(y_i | rate)`` (summed over genes) that depends on the rate.

    With ``rate_free_log_likelihood`` it adds up to ``count_distribution(...).log_prob``; split so
    that the log-gamma terms, which do not depend on the state, are not evaluated per particle.
    NB2: ``phi log(phi / (phi + mu)) + y log(mu / (phi + mu)) = -phi log1p(mu / phi) - y log1p(phi / mu)``;
    Poisson: ``y log mu - mu``.

    Above ``NB_TEXTBOOK_MAX_CONCENTRATION`` the NB2 terms are written so that none grows with ``phi``: the textbook split, ``y log mu -
    (phi + y) log(phi + mu)`` here and ``phi log phi`` in the other part, holds two terms of size
    ``phi log phi`` that cancel. In float32 at ``phi ~ 1e6`` their difference is lost to rounding;
    a guide whose draws of a weakly determined concentration reach there gets gradients of noise,
    its scale grows, and a 100-gene fit of a real CRISPRi screen went non-finite at step 304.
    """
    if likelihood == "nb":
        small, textbook_noise, stable_noise = nb_regimes(noise)
        textbook = counts * jnp.log(rate) - (textbook_noise + counts) * jnp.log(textbook_noise + rate)
        stable = -(stable_noise * jnp.log1p(rate / stable_noise) + counts * jnp.log1p(stable_noise / rate))
        return jnp.sum(jnp.where(small, textbook, stable), axis=-1)
    if likelihood == "poisson":
        return jnp.sum(counts * jnp.log(rate) - rate, axis=-1)
    return count_distribution(likelihood, rate, noise).to_event(1).log_prob(counts)


# Below this NB concentration the textbook split is exact enough in float32 and is kept (the
# fits measured with it stay bit for bit); above it the split whose terms do not grow with phi.
NB_TEXTBOOK_MAX_CONCENTRATION = 1e4


def nb_regimes(noise: jax.Array):
    """Which concentrations take the textbook NB split, and the concentration each branch sees
    (the other branch's set to a harmless value, so that neither branch's gradient is non-finite)."""
    small = noise < NB_TEXTBOOK_MAX_CONCENTRATION
    return small, jnp.where(small, noise, 1.0), jnp.where(small, NB_TEXTBOOK_MAX_CONCENTRATION, noise)


def rate_free_log_likelihood(likelihood: str, counts: jax.Array, noise: jax.Array | None) -> jax.Array:
    """The rest of ``log p(y_i | rate)``: NB2 ``lgamma(y + phi) - lgamma(phi) - lgamma(y + 1) =
    -log B(phi, y + 1) - log(phi + y)`` (the log-beta function, accurate for a large argument where
    the difference of log-gammas is not); Poisson ``-lgamma(y + 1)``; 0 where
    ``rate_log_likelihood`` holds it all."""
    if likelihood == "nb":
        small, textbook_noise, stable_noise = nb_regimes(noise)
        gammaln = jax.scipy.special.gammaln
        textbook = (gammaln(counts + textbook_noise) - gammaln(textbook_noise) - gammaln(counts + 1.0)
                    + textbook_noise * jnp.log(textbook_noise))
        stable = -(jax.scipy.special.betaln(stable_noise, counts + 1.0) + jnp.log(stable_noise + counts))
        return jnp.sum(jnp.where(small, textbook, stable), axis=-1)
    if likelihood == "poisson":
        return -jnp.sum(jax.scipy.special.gammaln(counts + 1.0), axis=-1)
    return jnp.zeros(counts.shape[:-1])


def crude_latent(counts: jax.Array, size_factor: jax.Array, gene_scale_center: jax.Array, link_name: str):
    """A per-cell guess of x from its counts alone: the inverse link of the normalized counts."""
    normalized = (counts + 0.5) / (size_factor[:, None] * jnp.exp(gene_scale_center))
    return inverse_link(normalized, link_name)


def pseudo_observation(cells: CellBatch, idx, structure: Structure, config: ModelConfig, hidden: int):
    """What the counts of cells ``idx`` alone say about their states: a location per cell.

    An amortized encoder: each cell's crude latent guess, corrected by a linear map plus a small
    MLP and a learned offset per condition, so the cost does not grow with the number of cells
    and minibatches work.
    """
    n_genes, n_conditions = structure.n_genes, structure.design.shape[0]
    init = jax.nn.initializers.normal(0.01)
    weights_in = numpyro.param("encoder_in", lambda key: init(key, (n_genes, hidden)))
    bias_in = numpyro.param("encoder_in_bias", jnp.zeros(hidden))
    weights_hidden = numpyro.param("encoder_hidden_out", lambda key: init(key, (hidden, n_genes)))
    weights_linear = numpyro.param("encoder_linear", jnp.zeros((n_genes, n_genes)))
    condition_offset = numpyro.param("encoder_condition_offset", jnp.zeros((n_conditions, n_genes)))
    guess = crude_latent(cells.counts[idx], cells.size_factor[idx], jnp.asarray(structure.gene_scale_center), config.link)
    hidden_state = jnp.tanh(guess @ weights_in + bias_in)
    correction = guess @ weights_linear + hidden_state @ weights_hidden + condition_offset[cells.condition[idx]]
    if structure.n_batches > 1:  # a batch's technical and biological effects move its cells' guesses alike
        batch_offset = numpyro.param("encoder_batch_offset", jnp.zeros((structure.n_batches, n_genes)))
        correction = correction + batch_offset[cells.batch[idx]]
    return guess + correction


class ConditionalProposal(NamedTuple):
    """``q(x_i | y_i, globals)`` proportional to ``N(x; mu_q, Sigma) N(m_i; x, P^-1)``, the state
    law times the encoder's Gaussian pseudo-likelihood, held so that sampling costs one matrix
    product per draw and ``log N(x; mu_q, Sigma) - log q(x)`` only elementwise work.

    With ``Sigma = L L^T`` and ``M = I + L^T P L = C C^T`` (eigenvalues >= 1, so well conditioned
    however ill-conditioned ``Sigma`` is), ``K = C^-1 L^T`` gives the proposal's covariance
    ``L M^-1 L^T = K^T K`` and its mean ``mu_q + K^T K P r_i`` with ``r_i = m_i - mu_q``; a draw is
    ``x = mu_q + K^T (K P r_i + eps)``. Since ``q(x) = N(x; mu_q, Sigma) N(m_i; x, P^-1) / Z_i``
    with ``Z_i = N(m_i; mu_q, Sigma + P^-1)``, the log density ratio is
    ``log Z_i - log N(m_i; x, P^-1) = -log|C| - quad_i / 2 + sum_g p_g (m_ig - x_g)^2 / 2``, where
    ``quad_i = r_i^T (Sigma + P^-1)^-1 r_i = |N^-1 P^(1/2) r_i|^2`` and ``N N^T = I + P^(1/2)
    Sigma P^(1/2)`` (``|N| = |C|``): a sum of squares, never a difference of large numbers.
    """

    state_mean: jax.Array  # (cells, genes) mu_q of each cell's condition (``moved``: per particle, minus its move)
    whitened_mean: jax.Array  # (cells, genes) K P r_i
    factor: jax.Array  # (genes, genes) K, or per cell (cells, genes, genes) for per-condition laws
    pseudo_location: jax.Array  # (cells, genes) m_i
    pseudo_precision: jax.Array  # (genes,) p
    log_evidence_part: jax.Array  # (cells,) -log|C| - quad_i / 2
    # For ``moved``: the per-cell pieces of the evidence and how the mean and the standardized
    # residual move with the pseudo-observation (K^T K P 1 and N^-1 P^(1/2) 1, per cell or shared).
    log_det: jax.Array  # () or (cells,) log|C|
    standardized: jax.Array  # (cells, genes) N^-1 P^(1/2) r_i
    mean_direction: jax.Array  # (genes,) or (cells, genes)
    standardized_direction: jax.Array  # (genes,) or (cells, genes)

    def sample(self, key: jax.Array, particles: int) -> jax.Array:
        """``(particles, cells, genes)`` draws, reparameterized."""
        # Threefry's non-partitionable variant draws these ~1.7x faster on a CPU, where they were a
        # fifth of a 100-gene step; each device draws its own cells' noise, so nothing is sharded.
        with jax.threefry_partitionable(False):
            eps = jax.random.normal(key, (particles,) + self.whitened_mean.shape, self.whitened_mean.dtype)
        # The mean's product once per cell, not per particle: the gradient of the per-cell part
        # then sums the particles before its product, not after.
        return self.mean() + self.transform(eps)

    def moved(self, shift: jax.Array) -> "ConditionalProposal":
        """The proposal of the pseudo-observation ``m_i - shift_i 1``, for ``shift`` (particles,
        cells): that of a cell whose log library is ``shift_i`` above the one the encoder assumed
        (with the exp link, log library and state add). The result's draws are one per particle
        (``sample(key, particles)`` with the same number). Elementwise work only: ``r_i`` moves by
        ``-shift_i 1``, so the mean ``mu_q + K^T K P r_i`` and ``N^-1 P^(1/2) r_i`` move along the
        fixed directions."""
        shift = shift[..., None]
        standardized = self.standardized - shift * self.standardized_direction
        return self._replace(
            state_mean=self.state_mean - shift * self.mean_direction,
            pseudo_location=self.pseudo_location - shift,
            log_evidence_part=-self.log_det - 0.5 * jnp.sum(standardized**2, axis=-1),
        )

    def mean(self) -> jax.Array:
        """``(cells, genes)`` mean of each cell's proposal."""
        return self.state_mean + self.transform(self.whitened_mean)

    def transform(self, whitened: jax.Array) -> jax.Array:
        """``K^T w`` for whitened vectors ``w`` (..., cells, genes)."""
        if self.factor.ndim == 2:
            return whitened @ self.factor
        return jnp.einsum("...cj,cji->...ci", whitened, self.factor)

    def log_density_ratio(self, latent: jax.Array) -> jax.Array:
        """``log N(x; mu_q, Sigma) - log q(x)`` for draws ``latent`` (..., cells, genes)."""
        misfit = jnp.sum(self.pseudo_precision * (self.pseudo_location - latent) ** 2, axis=-1)
        return self.log_evidence_part + 0.5 * misfit


def conditional_proposal(cells: CellBatch, idx, structure: Structure, config: ModelConfig, hidden: int,
                         drift: Drift, state_tril: jax.Array) -> ConditionalProposal:
    """``q(x_i | y_i, globals)``: the state law ``N(mu_q, Sigma)`` of the current global draw
    times a Gaussian pseudo-likelihood ``N(m_i, P^{-1})`` from the encoder, in closed form.

    Because the proposal moves with the drawn drift (a draw with a larger stationary variance
    widens it), draws of the globals along the count model's weakly identified directions (the
    latent scale against count noise) are not penalized by a cell guide fitted to one of them.
    ``state_tril`` is the Cholesky factor of ``Sigma``, shared (genes, genes) or per condition.
    """
    observed = pseudo_observation(cells, idx, structure, config, hidden)
    pseudo_precision = numpyro.param("encoder_precision", jnp.full(structure.n_genes, 10.0),
                                     constraint=dist.constraints.positive)
    eye = jnp.eye(structure.n_genes, dtype=state_tril.dtype)
    root = jnp.sqrt(pseudo_precision)
    scaled = root[:, None] * state_tril  # P^(1/2) L
    m_tril = jnp.linalg.cholesky(eye + jnp.swapaxes(scaled, -1, -2) @ scaled)  # C
    n_tril = jnp.linalg.cholesky(eye + scaled @ jnp.swapaxes(scaled, -1, -2))  # N
    factor_t = jax.scipy.linalg.solve_triangular(m_tril, jnp.swapaxes(state_tril, -1, -2), lower=True)  # K
    n_inverse = jax.scipy.linalg.solve_triangular(n_tril, jnp.broadcast_to(eye, n_tril.shape), lower=True)
    log_det = jnp.sum(jnp.log(jnp.diagonal(m_tril, axis1=-2, axis2=-1)), axis=-1)

    condition = cells.condition[idx]
    state_mean = cell_means(drift, cells, idx)
    residual = observed - state_mean
    weighted = pseudo_precision * residual
    if state_tril.ndim == 2:
        whitened_mean = weighted @ factor_t.T
        standardized = (root * residual) @ n_inverse.T
        mean_direction = (pseudo_precision @ factor_t.T) @ factor_t
        standardized_direction = root @ n_inverse.T
    else:  # one law per condition: each cell takes its condition's factors
        mean_direction = jnp.einsum("cij,ci->cj", factor_t, jnp.einsum("cij,j->ci", factor_t, pseudo_precision))
        standardized_direction = jnp.einsum("cij,j->ci", n_inverse, root)
        factor_t, n_inverse, log_det = factor_t[condition], n_inverse[condition], log_det[condition]
        mean_direction, standardized_direction = mean_direction[condition], standardized_direction[condition]
        whitened_mean = jnp.einsum("cij,cj->ci", factor_t, weighted)
        standardized = jnp.einsum("cij,cj->ci", n_inverse, root * residual)
    quad = jnp.sum(standardized**2, axis=-1)
    return ConditionalProposal(state_mean, whitened_mean, factor_t, observed, pseudo_precision, -log_det - 0.5 * quad,
                               log_det, standardized, mean_direction, standardized_direction)


def library_proposal(cells: CellBatch, idx, structure: Structure, config: ModelConfig) -> dist.Normal:
    """``q(log s_i | y_i)`` for a latent library: Normal around the log size factor of the cell's
    totals, corrected by a learned linear read-out of its crude latent guess (which genes' counts
    speak for the library rather than the state) and a learned common spread."""
    log_size = jnp.log(cells.size_factor[idx])
    guess = crude_latent(cells.counts[idx], cells.size_factor[idx], jnp.asarray(structure.gene_scale_center), config.link)
    weights = numpyro.param("library_encoder", jnp.zeros(structure.n_genes))
    offset = numpyro.param("library_encoder_offset", jnp.zeros(()))
    spread = numpyro.param("library_encoder_sd", jnp.full((), 0.3), constraint=dist.constraints.positive)
    return dist.Normal(log_size + offset + guess @ weights, spread, validate_args=False)
