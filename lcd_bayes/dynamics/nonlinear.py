"""The nonlinear drift family and its stationary law per condition (docs/model.md, "Nonlinear drift").

Drift, in the linear model's relative form (``D = diag(exp(kappa))``):

    f(x; c) = D (-x + s * tanh(R x / s + h)) + b + c,      u = R x / s + h  (per target gene)

``R`` (target, source) is the sparse input layer (regularized horseshoe, zero diagonal; ``R[k, j]``
is the effect of gene j on gene k's input, the orientation of the linear ``A``), ``s > 0`` a
per-gene saturation in latent units (regulation moves gene k by at most ``s_k``), ``h`` a per-gene
input offset (where gene k sits on its sigmoid), ``b = D b_rel`` and ``c = D c_rel`` as in the
linear model. As ``s -> infinity`` with ``h = 0``, ``s tanh(R x / s) -> R x`` and ``f`` is the
linear drift ``D (R - I) x + b + c``. It is the family of ``lcd_bayes.sim.nonlinear``
(``W = D R``, ``S = D s``, ``h_sim = D s h``). Its Jacobian is ``J(x) = D (-I + diag(sech^2 u) R)``:
the diagonal is ``-D`` everywhere, so ``self_decay`` is read off any Jacobian.

Stationary law of condition q (``stationary_law_nonlinear``), for the likelihood:

1. ``m_q``: the deterministic fixed point, damped Newton (``fixed_point.fixed_point``) from the
   unperturbed fixed point, with the implicit-function gradient.
2. ``C_LNA_q``: the linear-noise approximation, the exact stationary covariance of the
   Euler–Maruyama chain linearized at ``m_q`` (``F_q = I + dt J_q``, ``stationary.stationary_law``,
   vmapped over conditions). A fixed point whose ``F_q`` is not stable is projected and reported
   (``projection < 1``), exactly as the linear model does with its single ``F``.
3. Particles: ``P`` per condition start from ``N(m_q, C_LNA_q)`` (already near stationarity, so the
   burn-in only has to absorb the nonlinear correction) and run ``simulate_stationary``.
4. Moment matching to a Gaussian ``N(mu_q, C_q)``: ``mu_q`` = the particle mean; ``C_q`` = the
   particle covariance ``S_q`` shrunk toward ``C_LNA_q``, ``C_q = (1 - lambda_q) S_q + lambda_q
   C_LNA_q``, with the Ledoit–Wolf intensity for a given target,

       lambda_q = sum_ij Var(S_ij) / sum_ij (S_ij - C_LNA_ij)^2,    clipped to [lambda_min, 1],

   ``Var(S_ij) ~ (S_ii S_jj + S_ij^2) / n_eff`` (Wishart) with ``n_eff`` the median effective number
   of recorded states per gene (autocorrelation included). Why: ``P * records`` states are fewer
   than or comparable to the genes, so ``S_q`` alone is singular or badly conditioned; the LNA is
   exact for a linear drift and a good first order otherwise. ``E (S - T)^2 = Var(S) + bias^2``,
   so ``lambda`` estimates ``Var / (Var + bias^2)``: the target takes over where the particles only
   add noise (linear limit: ``lambda ~ 1``) and the particles where the LNA is visibly biased
   (saturated genes). ``lambda_min = d / (d + n_states)`` keeps ``C_q`` well conditioned. The
   intensity carries no gradient (a weight, as in Ledoit–Wolf).

A condition whose particles diverge (not finite) falls back to the LNA moments and is counted in
``n_diverged``; the model penalizes it. With ``dt D_k < 2`` the chain cannot diverge: the tanh term
is bounded, so each gene is a contracting linear recursion plus a bounded input.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..config import SimulationSettings
from .fixed_point import differentiable_fixed_point, fixed_point
from .particles import SimulatedLaw, StationarityReport, check_stationary, simulate_stationary
from .stationary import stationary_law

# Parameter names of one drift draw, as stored in the posterior (``relative_interaction`` there is
# (source, target), transposed from the model's R; see ``posterior_drift``).
PARAM_NAMES = ("self_decay", "relative_interaction", "saturation", "input_offset", "basal_drift")


def nonlinear_drift(params: dict, x: jax.Array, shift: jax.Array) -> jax.Array:
    """``f(x; c) = D (-x + s tanh(R x / s + h)) + b + c`` for one state, shape (genes,).

    ``params``: ``self_decay`` D, ``relative_interaction`` R (target, source), ``saturation`` s,
    ``input_offset`` h, ``basal_drift`` b (all (genes,) but R).
    """
    saturation = params["saturation"]
    regulatory_input = params["relative_interaction"] @ x / saturation + params["input_offset"]
    regulation = saturation * jnp.tanh(regulatory_input)
    return params["self_decay"] * (regulation - x) + params["basal_drift"] + shift


def from_posterior(params: dict) -> dict:
    """Drift parameters as stored in ``posterior.nc`` (``relative_interaction`` (source, target),
    draws in leading dims or not) -> the model's orientation (target, source)."""
    return {**params, "relative_interaction": jnp.swapaxes(jnp.asarray(params["relative_interaction"]), -1, -2)}


def posterior_drift(params: dict, x: jax.Array, shift: jax.Array) -> jax.Array:
    """``nonlinear_drift`` of one draw as stored in ``posterior.nc`` (see ``from_posterior``).
    The ``drift_fn`` CLIPR uses on run folders."""
    return nonlinear_drift(from_posterior(params), x, shift)


def drift_jacobian(params: dict, x: jax.Array) -> jax.Array:
    """``J(x) = D (-I + diag(sech^2 u) R)``, (target, source); closed form, O(d^2)."""
    saturation = params["saturation"]
    slope = 1.0 - jnp.tanh(params["relative_interaction"] @ x / saturation + params["input_offset"]) ** 2
    eye = jnp.eye(x.shape[-1], dtype=x.dtype)
    return params["self_decay"][:, None] * (slope[:, None] * params["relative_interaction"] - eye)


class NonlinearLaw(NamedTuple):
    """Moment-matched stationary law of every condition, with what went into it."""

    means: jax.Array  # (conditions, genes) mu_q, particle means
    covariances: jax.Array  # (conditions, genes, genes) C_q, shrunk particle covariances
    fixed_points: jax.Array  # (conditions, genes) m_q
    lna_covariances: jax.Array  # (conditions, genes, genes) C_LNA_q (of the projected F_q if unstable)
    control_jacobian: jax.Array  # (genes, genes) J at the unperturbed fixed point (shift 0)
    log_spectral_radius: jax.Array  # (conditions,) bound on log rho(F_q) at the fixed point
    projection: jax.Array  # (conditions,) 1, or the factor that made F_q stable
    residual: jax.Array  # (conditions,) max |f(m_q)| of the Newton solve
    shrinkage: jax.Array  # (conditions,) lambda_q, weight of the LNA in C_q
    mean_se: jax.Array  # (conditions, genes) Monte Carlo s.e. of mu_q
    n_diverged: jax.Array  # (conditions,) particles that went non-finite
    simulation: SimulatedLaw  # the particle run itself, with its stationarity diagnostics


def lna_start(key: jax.Array, fixed_points: jax.Array, covariances: jax.Array, n_particles: int) -> jax.Array:
    """Particles ``m_q + chol(C_q) eps``, shape (conditions, particles, genes); reparameterized."""
    tril = jnp.linalg.cholesky(covariances)
    eps = jax.random.normal(key, (fixed_points.shape[0], n_particles, fixed_points.shape[1]), fixed_points.dtype)
    return fixed_points[:, None, :] + jnp.einsum("qij,qpj->qpi", tril, eps)


def shrink_toward(sample: jax.Array, target: jax.Array, n_effective: jax.Array, n_states: int) -> tuple:
    """Ledoit–Wolf shrinkage of one (genes, genes) sample covariance toward ``target``; see the
    module docstring. Returns the shrunk covariance and the intensity (no gradient)."""
    d = sample.shape[-1]
    variances = jnp.diagonal(sample)
    noise = jnp.sum(jnp.outer(variances, variances) + sample**2) / n_effective
    discrepancy = jnp.sum((sample - target) ** 2)
    floor = d / (d + n_states)
    intensity = jax.lax.stop_gradient(jnp.clip(noise / jnp.maximum(discrepancy, 1e-30), floor, 1.0))
    return (1.0 - intensity) * sample + intensity * target, intensity


def stationary_law_nonlinear(
    params: dict,
    shifts: jax.Array,
    key: jax.Array,
    settings: SimulationSettings,
    *,
    n_doublings: int = 12,
    max_spectral_radius: float = 0.9999,
) -> NonlinearLaw:
    """Stationary law of ``dx = nonlinear_drift(params, x, c_q) dt + sigma dW`` per condition.

    Parameters
    ----------
    params : dict
        One draw's drift parameters in model orientation (see ``nonlinear_drift``).
    shifts : (conditions, genes)
        ``c_q`` of every condition (the basal drift is in ``params``).
    key : PRNG key
        Particle starts and noise; a fixed key gives a smooth function of ``params``.
    settings : SimulationSettings
        Step (also the LNA's ``dt``), burn-in, window, particles, noise.
    n_doublings, max_spectral_radius
        Of the LNA's Smith doubling (``stationary.stationary_law``).
    """
    zero = jnp.zeros(shifts.shape[-1], shifts.dtype)
    unperturbed = fixed_point(nonlinear_drift, jax.lax.stop_gradient(params), zero)
    # Perturbed systems relax from the unperturbed steady state (as in CLIPR): Newton starts there.
    solve = jax.vmap(lambda c: differentiable_fixed_point(nonlinear_drift, params, c, unperturbed.x))
    found = solve(jnp.concatenate([zero[None], shifts]))
    control_point, points = found.x[0], found.x[1:]
    jacobians = jax.vmap(drift_jacobian, (None, 0))(params, points)
    lna = jax.vmap(lambda jac: stationary_law(jac, dt=settings.dt, sigma=settings.sigma, n_doublings=n_doublings,
                                              max_spectral_radius=max_spectral_radius))(jacobians)

    start_key, noise_key = jax.random.split(key)
    x0 = lna_start(start_key, points, lna.covariance, settings.n_particles)
    particles = simulate_stationary(nonlinear_drift, params, shifts, noise_key, settings, x0=x0)

    n_states = settings.n_particles * settings.n_recorded
    n_effective = jnp.median(particles.effective_samples, axis=-1)
    n_effective = jnp.clip(jnp.nan_to_num(n_effective, nan=1.0), 1.0, float(n_states))
    # A condition with diverged particles keeps its LNA moments (its sums are inf/nan). The where
    # selects finite values only; sanitize first so no nan reaches the shrinkage arithmetic.
    finite = (particles.n_diverged == 0) & jnp.all(jnp.isfinite(particles.covariances), axis=(-2, -1)) \
        & jnp.all(jnp.isfinite(particles.means), axis=-1)
    sample = jnp.where(finite[:, None, None], particles.covariances, lna.covariance)
    covariances, intensity = jax.vmap(shrink_toward, (0, 0, 0, None))(sample, lna.covariance, n_effective, n_states)
    means = jnp.where(finite[:, None], particles.means, points)
    return NonlinearLaw(
        means=means,
        covariances=0.5 * (covariances + jnp.swapaxes(covariances, -1, -2)),
        fixed_points=points,
        lna_covariances=lna.covariance,
        control_jacobian=drift_jacobian(params, control_point),
        log_spectral_radius=lna.log_spectral_radius,
        projection=lna.projection,
        residual=found.residual[1:],
        shrinkage=jnp.where(finite, intensity, 1.0),
        mean_se=particles.mean_se,
        n_diverged=particles.n_diverged,
        simulation=particles,
    )


# Particles for the after-fit stationarity check: enough for the window-halves test to have power.
CHECK_PARTICLES = 64


def check_fitted_stationarity(draws: dict, design: np.ndarray, model_config, *, draw: int = 0,
                              seed: int = 0) -> StationarityReport:
    """Has the configured chain (``sim_burn_in``, ``sim_steps``, ``sim_dt``) reached stationarity
    for a fitted posterior draw? Inside SVI no check can stop a step, so this runs after the fit:
    one posterior draw (``draws`` as stored by ``inference.posterior.draw_globals``), every training
    condition, ``CHECK_PARTICLES`` particles from the LNA start, and ``check_stationary`` on them
    (window halves compared in mean and mean square; divergence). A failure means the likelihood
    saw moments that were still relaxing: raise ``sim_burn_in`` or lower ``sim_dt``.
    """
    params = from_posterior({name: jnp.asarray(draws[name][draw]) for name in PARAM_NAMES})
    shifts = jnp.asarray(design, jnp.float32) @ jnp.asarray(draws["shift"][draw])
    settings = model_config.simulation_settings(max(CHECK_PARTICLES, model_config.sim_particles))
    law = jax.jit(stationary_law_nonlinear, static_argnames=("settings", "n_doublings", "max_spectral_radius"))(
        params, shifts, jax.random.PRNGKey(seed), settings=settings, n_doublings=model_config.lna_doublings,
        max_spectral_radius=model_config.max_spectral_radius,
    )
    return check_stationary(jax.device_get(law.simulation), settings=settings)
