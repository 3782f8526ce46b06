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

Time is in the model's unit, which ``sigma = 1`` fixes (docs/model.md, "Time unit").
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
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
