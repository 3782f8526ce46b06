"""Transient response of the linear SDE after a shift switches on at ``t = 0``.

Cells sit at the control's stationary law ``N(m_0, Sigma)`` when the shift ``c`` of a condition
switches on; from then on they follow ``dx = (A x + b + c) dt + sigma dW``, an Ornstein–Uhlenbeck
process whose law stays Gaussian, with

    m(t) = m_inf + exp(A t) (m_0 - m_inf),                         m_inf = -A^{-1} (b + c)
    S(t) = S_inf + exp(A t) (S_0 - S_inf) exp(A t)^T

(the mean solves ``m' = A m + b + c``; the covariance ``S' = A S + S A^T + sigma^2 I``, whose fixed
point is ``S_inf``). A shift moves only the mean, so ``S_0 = S_inf = Sigma`` and the covariance never
changes: cells at time ``t`` are ``N(m(t), Sigma)``, the stationary law's covariance with a mean
that relaxes from the control's to the condition's.

A nonlinear drift ``f(x; c)`` has no closed form: ``relaxing_particles`` starts particles drawn
from the control's law and runs them forward by Euler–Maruyama under the condition's shift, and
the particles' mean and covariance at each time are the law's. Its covariance changes with time
too (the drift's slope differs from state to state).

Time is in the model's unit, which ``sigma = 1`` fixes (docs/model.md, "Time unit").
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import expm


def relaxing_means(drift_matrix: jax.Array, start: jax.Array, targets: jax.Array, times: jax.Array) -> jax.Array:
    """``m_q(t) = m_q + exp(A t) (m_0 - m_q)`` for every time and condition.

    ``drift_matrix`` (genes, genes) ``A``; ``start`` (genes,) the control's mean ``m_0``; ``targets``
    (conditions, genes) the stationary means ``m_q``; ``times`` (times,). Returns (times,
    conditions, genes). ``exp(0) = I`` gives ``m_0`` at ``t = 0``; for a stable ``A`` the mean tends
    to ``m_q``.
    """
    propagators = jax.vmap(lambda t: expm(t * drift_matrix))(times)  # (times, genes, genes)
    return targets[None] + jnp.einsum("tij,qj->tqi", propagators, start[None, :] - targets)


def relaxing_particles(drift_fn: Callable, params, start: jax.Array, shifts: jax.Array, times: np.ndarray,
                       key: jax.Array, *, dt: float, sigma: float) -> tuple[jax.Array, jax.Array]:
    """Means and covariances at ``times`` of particles that leave ``start`` when each condition's
    shift switches on: ``x' = x + dt f(x; c_q) + sigma sqrt(dt) eps``.

    ``drift_fn(params, x, shift)`` for one state (genes,); ``start`` (particles, genes), the same
    cells for every condition; ``shifts`` (conditions, genes); ``times`` (times,) numbers >= 0 in
    any order, each run to the nearest multiple of ``dt``. The noise of step ``i`` comes from
    ``fold_in(key, i)``, shared by the conditions (their differences carry less Monte Carlo
    noise). Returns means (conditions, times, genes) and covariances (conditions, times, genes,
    genes); a condition whose particles diverged has non-finite moments.
    """
    times = np.asarray(times, dtype=float)
    order = np.argsort(times, kind="stable")
    steps = np.rint(times[order] / dt).astype(np.int32)
    between = jnp.asarray(np.diff(steps, prepend=0))  # steps from one recorded time to the next
    drift = jax.vmap(jax.vmap(drift_fn, (None, 0, None)), (None, 0, 0))  # conditions x particles
    noise_scale = sigma * np.sqrt(dt)

    def step(i, x):
        eps = jax.random.normal(jax.random.fold_in(key, i), x.shape[1:], x.dtype)
        return x + dt * drift(params, x, shifts) + noise_scale * eps[None]

    def record(carry, n_steps):
        x, done = carry
        x = jax.lax.fori_loop(done, done + n_steps, step, x)
        mean = x.mean(axis=1)
        centred = x - mean[:, None, :]
        covariance = jnp.einsum("qpi,qpj->qij", centred, centred) / max(start.shape[0] - 1, 1)
        return (x, done + n_steps), (mean, covariance)

    x0 = jnp.broadcast_to(start, (shifts.shape[0], *start.shape))
    _, (means, covariances) = jax.lax.scan(record, (x0, jnp.int32(0)), between)
    unsort = np.argsort(order)
    return jnp.swapaxes(means[unsort], 0, 1), jnp.swapaxes(covariances[unsort], 0, 1)
