"""Fixed points of a drift ``f(x; c) = 0`` by damped Newton, shared by CLIPR (limit responses)
and the nonlinear model (the centre of each condition's linear-noise approximation).

``fixed_point`` is a ``lax.while_loop``, which reverse-mode AD cannot go through;
``differentiable_fixed_point`` gives the same point with the implicit-function gradient
``dx*/dtheta = -J^{-1} df/dtheta`` so that SVI can differentiate the fixed point of a draw.

The simulator solves its own systems in numpy float64 (``sim.nonlinear.fixed_point_float64``),
for a truth that does not depend on this solver's float32 tolerance.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

DriftFn = Callable[[object, jax.Array, jax.Array], jax.Array]


class FixedPoint(NamedTuple):
    """Result of the Newton solve for one fixed point."""

    x: jax.Array  # (genes,) the fixed point found
    residual: jax.Array  # () max |f(x)|, ~0 at a true fixed point
    iterations: jax.Array  # () Newton steps taken


def fixed_point(drift_fn: DriftFn, params, shift: jax.Array, x0: jax.Array | None = None, *,
                max_iter: int = 50, rtol: float = 1e-6, n_halvings: int = 12) -> FixedPoint:
    """Solve ``f(x; shift) = 0`` by damped Newton iterations from ``x0``.

    Each step solves ``J dx = -f`` with ``J = jacfwd(f)`` and takes the longest of the steps
    ``2^-k dx`` that decreases ``|f|^2`` enough (Armijo), so that a strongly nonlinear drift does
    not overshoot. One full Newton step is exact for a linear drift: it goes through this same
    path and stops after the step that lands on ``-A^{-1}(b + c)``. Under ``jax.vmap`` over
    shifts the Jacobian of a linear drift does not depend on the shift, so JAX computes and
    factorizes it once for all of them.

    Parameters
    ----------
    drift_fn : callable
        ``drift_fn(params, x, shift) -> (genes,)``.
    params : pytree
        One draw's drift parameters.
    shift : jax.Array, shape (genes,)
    x0 : jax.Array, shape (genes,), optional
        Starting state (zeros by default); for a drift with several fixed points, the one found
        is the one Newton reaches from here (the caller starts perturbations from control).
    max_iter : int
        Newton steps at most.
    rtol : float
        Stop when the step is below ``rtol * (1 + max|x|)`` or ``max|f|`` below ``rtol`` times
        its starting value.
    n_halvings : int
        Step lengths tried per iteration, ``1, 1/2, ..., 2^-(n_halvings-1)``.

    Returns
    -------
    FixedPoint
        ``x`` (genes,), ``residual`` ``max|f(x)|`` and the number of iterations.
    """
    def residual_fn(x):
        return drift_fn(params, x, shift)

    x0 = jnp.zeros_like(shift) if x0 is None else jnp.asarray(x0, shift.dtype)
    lengths = 0.5 ** jnp.arange(n_halvings, dtype=shift.dtype)
    f0 = residual_fn(x0)
    target = rtol * jnp.max(jnp.abs(f0))

    def step(state):
        x, fx, it, _ = state
        direction = -jnp.linalg.solve(jax.jacfwd(residual_fn)(x), fx)
        candidates = x + lengths[:, None] * direction
        f_candidates = jax.vmap(residual_fn)(candidates)
        merit = jnp.sum(f_candidates**2, axis=-1)
        # Newton is a descent direction of |f|^2 with slope -2|f|^2; ask for a fraction of it.
        decreases = merit <= (1.0 - 1e-4 * lengths) * jnp.sum(fx**2)
        pick = jnp.where(jnp.any(decreases), jnp.argmax(decreases), n_halvings - 1)
        x_new, f_new = candidates[pick], f_candidates[pick]
        small_step = lengths[pick] * jnp.max(jnp.abs(direction)) <= rtol * (1.0 + jnp.max(jnp.abs(x_new)))
        done = small_step | (jnp.max(jnp.abs(f_new)) <= target) | ~jnp.all(jnp.isfinite(x_new))
        return x_new, f_new, it + 1, done

    def keep_going(state):
        _, _, it, done = state
        return (it < max_iter) & ~done

    x, fx, it, _ = jax.lax.while_loop(keep_going, step, (x0, f0, jnp.int32(0), jnp.max(jnp.abs(f0)) == 0))
    return FixedPoint(x, jnp.max(jnp.abs(fx)), it)


def differentiable_fixed_point(drift_fn: DriftFn, params, shift: jax.Array, x0: jax.Array | None = None,
                               **newton) -> FixedPoint:
    """``fixed_point`` whose ``x`` carries the implicit-function gradient in ``params`` and ``shift``.

    The Newton solve runs without gradients; one more Newton step from its answer,
    ``x = x* - J^{-1} f(x*; theta)`` with ``J`` held fixed, changes the value by at most the
    residual but has exactly ``dx/dtheta = -J^{-1} df/dtheta``, the derivative of the fixed point
    (implicit function theorem), at the cost of one ``d x d`` solve.
    """
    found = fixed_point(drift_fn, jax.lax.stop_gradient(params), jax.lax.stop_gradient(shift),
                        None if x0 is None else jax.lax.stop_gradient(x0), **newton)
    anchor = jax.lax.stop_gradient(found.x)
    jacobian = jax.lax.stop_gradient(jax.jacfwd(lambda x: drift_fn(params, x, shift))(anchor))
    x = anchor - jnp.linalg.solve(jacobian, drift_fn(params, anchor, shift))
    return FixedPoint(x, found.residual, found.iterations)
