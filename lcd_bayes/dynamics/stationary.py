"""Stationary law of the discretized linear SDE ``dx = (A x + b + c) dt + sigma dW``.

With step ``dt`` the chain

    x' = F x + B (dt (b + c) + sigma sqrt(dt) eps)

has, when the spectral radius of ``F`` is below one, the Gaussian stationary law
``N(mu, Sigma)`` with ``mu = -A^{-1} (b + c)`` and ``Sigma = F Sigma F^T + Q`` (discrete
Lyapunov equation), for either scheme:

* ``"euler"`` (Euler–Maruyama): ``F = I + dt A``, ``B = I``, ``Q = sigma^2 dt I``. Its ``Sigma``
  differs from the SDE's by ``O(dt A)``: for a decay ``D`` the variance is ``1 / (1 - dt D / 2)``
  times too large.
* ``"trapezoidal"`` (Crank–Nicolson): ``F = (I - dt A / 2)^{-1} (I + dt A / 2)``,
  ``B = (I - dt A / 2)^{-1}``, so ``Q = sigma^2 dt B B^T = (sigma^2 dt / 4) (F + I) (F + I)^T``.
  ``F`` is the Cayley transform of ``A``, which maps the continuous Lyapunov equation
  ``A Sigma + Sigma A^T + sigma^2 I = 0`` onto this discrete one: ``Sigma`` is the SDE's own
  stationary covariance for every ``dt`` (and every stable ``A`` gives a stable ``F``). For a
  draw with a huge ``A`` the step shrinks below ``dt`` (``step_time``) so that ``I - dt A / 2``
  stays invertible; the covariance is the same.

Shift interventions change only ``c``, so ``Sigma`` is shared by every condition: one solve per
drift, not one per condition.

``Sigma = sum_t F^t Q (F^t)^T`` is summed by squared Smith doubling: after ``k`` doublings
``S_k`` holds the first ``2^k`` terms, using ``P_k = F^(2^k)``:

    S_{k+1} = S_k + P_k S_k P_k^T,        P_{k+1} = P_k P_k.

We carry ``P_k`` as a unit-norm matrix ``G_k`` times ``exp(l_k)`` so it never overflows; then
``l_K / 2^K`` is Gelfand's bound on ``log rho(F)`` from above, differentiable, and tells us
whether the chain has a stationary state at all.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ..config import SCHEMES


class StationaryLaw(NamedTuple):
    """Gaussian stationary law shared by all conditions of one drift draw."""

    covariance: jax.Array  # (genes, genes) Sigma
    log_spectral_radius: jax.Array  # () upper bound on log rho(F) of the drift as given
    projection: jax.Array  # () factor r <= 1 applied to F to keep it stable (1 = untouched)
    transition: jax.Array  # (genes, genes) F actually used (r F)
    step: jax.Array  # () time one step of F spans (``step_time``)


def step_time(drift_matrix: jax.Array, dt: float, scheme: str = "euler") -> jax.Array:
    """The time ``tau`` one step spans: ``dt`` (Euler); trapezoidal, ``dt`` capped at ``1 / b``
    with ``b = sqrt(||A||_1 ||A||_inf) >= ||A||_2``, so that ``||tau A / 2|| <= 1/2`` keeps
    ``I - tau A / 2`` well conditioned and ``F`` away from ``-I`` for any draw, stable or not.
    (Uncapped, a wild draw in the early steps of a 100-gene fit made that solve singular and the
    loss infinite at step 508.) Any ``tau`` gives the SDE's covariance; a cap only shortens the
    ``2^n_doublings``-step horizon of draws with ``b > 1 / dt``."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if scheme == "euler":
        return jnp.asarray(dt, drift_matrix.dtype)
    magnitude = jnp.abs(drift_matrix)
    bound = jnp.sqrt(jnp.max(jnp.sum(magnitude, axis=0)) * jnp.max(jnp.sum(magnitude, axis=1)))
    return jnp.minimum(dt, 1.0 / jnp.maximum(bound, 1e-30))


def transition_matrix(drift_matrix: jax.Array, dt: float, scheme: str = "euler") -> jax.Array:
    """``F`` of one step, shape (genes, genes): ``I + dt A`` (Euler) or the Cayley transform
    ``(I - tau A / 2)^{-1} (I + tau A / 2)`` with ``tau = step_time(A, dt)`` (trapezoidal)."""
    return _transition(drift_matrix, step_time(drift_matrix, dt, scheme), scheme)


def _transition(drift_matrix: jax.Array, step: jax.Array, scheme: str) -> jax.Array:
    """``F`` for a step of time ``step`` already chosen by ``step_time``."""
    eye = jnp.eye(drift_matrix.shape[-1], dtype=drift_matrix.dtype)
    if scheme == "euler":
        return eye + step * drift_matrix
    half = 0.5 * step * drift_matrix
    return jnp.linalg.solve(eye - half, eye + half)


def noise_covariance(transition: jax.Array, step, sigma: float, scheme: str) -> jax.Array:
    """``Q``, the covariance of one step's noise. The trapezoidal one is written with ``F`` alone
    (``(I - tau A / 2)^{-1} = (F + I) / 2``) so that it stays exact for a projected ``r F``."""
    eye = jnp.eye(transition.shape[-1], dtype=transition.dtype)
    if scheme == "euler":
        return (sigma**2 * step) * eye
    half_sum = transition + eye
    return (0.25 * sigma**2 * step) * (half_sum @ half_sum.T)


def _normalized_squarings(transition: jax.Array, n_doublings: int):
    """Unit-norm factors ``G_k`` and log norms ``l_k`` with ``F^(2^k) = exp(l_k) G_k``, k < K,
    and the final ``l_K``."""

    def square(carry, _):
        unit, log_norm = carry
        squared = unit @ unit
        norm = jnp.linalg.norm(squared)
        return (squared / norm, 2.0 * log_norm + jnp.log(norm)), (unit, log_norm)

    norm = jnp.linalg.norm(transition)
    (_, final_log_norm), (units, log_norms) = jax.lax.scan(
        square, (transition / norm, jnp.log(norm)), None, length=n_doublings
    )
    return units, log_norms, final_log_norm


def log_spectral_radius_bound(transition: jax.Array, n_doublings: int = 16) -> jax.Array:
    """``log ||F^(2^K)||_F / 2^K >= log rho(F)``; tight for large ``K`` (Gelfand's formula)."""
    _, _, final_log_norm = _normalized_squarings(transition, n_doublings)
    return final_log_norm / 2.0**n_doublings


def stationary_law(
    drift_matrix: jax.Array,
    *,
    dt: float,
    sigma: float = 1.0,
    n_doublings: int = 16,
    max_spectral_radius: float = 0.9999,
    scheme: str = "euler",
) -> StationaryLaw:
    """Stationary covariance of the discretized SDE by squared Smith doubling.

    A drift whose ``F`` has spectral radius above ``max_spectral_radius`` has no stationary
    state; rather than return numbers that mean nothing, ``F`` is scaled by ``r < 1`` onto the
    stable set (``projection`` reports ``r``, the caller penalizes it). For a stable drift
    ``r = 1`` exactly and the result is the exact discrete stationary covariance.
    """
    step = step_time(drift_matrix, dt, scheme)
    transition = _transition(drift_matrix, step, scheme)
    units, log_norms, final_log_norm = _normalized_squarings(transition, n_doublings)
    log_radius = final_log_norm / 2.0**n_doublings
    log_projection = -jax.nn.relu(log_radius - jnp.log(max_spectral_radius))
    # (rF)^(2^k) = r^(2^k) F^(2^k): the projection rescales the stored powers, no new products.
    powers = 2.0 ** jnp.arange(n_doublings, dtype=drift_matrix.dtype)
    log_scales = log_norms + powers * log_projection

    def double(partial_sum, unit_and_scale):
        unit, log_scale = unit_and_scale
        return partial_sum + jnp.exp(2.0 * log_scale) * (unit @ partial_sum @ unit.T), None

    projection = jnp.exp(log_projection)
    noise = noise_covariance(projection * transition, step, sigma, scheme)
    covariance, _ = jax.lax.scan(double, noise, (units, log_scales))
    covariance = 0.5 * (covariance + covariance.T)  # symmetric up to round-off; make it exact
    return StationaryLaw(covariance, log_radius, projection, projection * transition, step)


def effective_drift(law: StationaryLaw, scheme: str = "euler") -> jax.Array:
    """The drift matrix whose stationary law ``law`` is: ``A = (F - I) / tau`` (Euler) or the
    inverse Cayley transform ``A = (2 / tau) (F + I)^{-1} (F - I)`` (trapezoidal)."""
    eye = jnp.eye(law.transition.shape[-1], dtype=law.transition.dtype)
    if scheme == "euler":
        return (law.transition - eye) / law.step
    return (2.0 / law.step) * jnp.linalg.solve(law.transition + eye, law.transition - eye)


def excess_abscissa(law: StationaryLaw) -> jax.Array:
    """How far beyond the stability limit the drift's spectral abscissa was, in rate units:
    ``-log r / tau`` (0 for a draw left untouched)."""
    return -jnp.log(law.projection) / law.step


def stationary_means(drift_matrix: jax.Array, offsets: jax.Array) -> jax.Array:
    """``mu_q = -A^{-1} (b + c_q)`` for every row of ``offsets`` (conditions, genes); one LU."""
    return -jnp.linalg.solve(drift_matrix, offsets.T).T
