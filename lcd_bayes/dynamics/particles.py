"""Stationary law of a nonlinear drift by simulation: particle ensembles under Euler–Maruyama.

For a drift ``f(x; c)`` (``c`` the shift of a condition) the chain

    x' = x + dt f(x; c) + sigma sqrt(dt) eps

is run from ``x0`` for ``n_burn_in`` steps by ``n_particles`` independent particles per condition,
then for ``n_sample`` more steps, of which every ``thin``-th state is recorded. The recorded states
of all particles are summarized by moment matching: a mean (genes,) and a covariance
(genes, genes) per condition, the Gaussian the likelihood uses. For a linear drift this is the
Monte Carlo version of ``stationary.stationary_law`` / ``stationary_means`` (the same discrete
chain, so the same ``dt``); for a nonlinear drift there is no closed form.

Differentiability (for SVI). The noise of step ``i`` is drawn from ``fold_in(key, i)``, a function
of the key and the step only: with the key held fixed (common random numbers) every state is a
smooth function of the parameters, and ``jax.grad`` gives the pathwise (reparameterized)
gradient. For a contracting drift the tangent process ``dx_t / dparams`` forgets its start like the
state does, so the gradient of the time averages converges; for an expanding drift it blows up
with the chain, which is then flagged as diverged.

Memory, forward. Nothing of the trajectory is kept: the carry holds the states (conditions,
particles, genes) and running sums over recorded states — ``sum y`` (conditions, genes) and
``sum y y^T`` (conditions, genes, genes) for the moments, and per particle and half of the window
``sum y`` and ``sum y^2`` (2, conditions, particles, genes) for the diagnostics — where
``y = x - K`` is centred on the particle mean ``K`` at the end of burn-in, so that float32 sums
of squares do not cancel catastrophically. That is ``C d^2 + 5 C P d`` numbers whatever the
length of the run (30 conditions, 256 particles, 300 genes: ~57 MB), against ``n_recorded C P d``
(~920 MB for 100 records) to keep the thinned states.

Memory, backward. Reverse-mode AD of a scan stores its carry at every iteration, which over
thousands of steps is thousands of ensembles. Both loops (burn-in steps; records of ``thin``
steps each) are cut into ``~sqrt(n)`` segments of ``~sqrt(n)`` iterations, each segment under
``jax.checkpoint``: the backward pass stores the carry at segment boundaries, then recomputes one
segment at a time storing its ``~sqrt(n)`` carries, and each record is itself checkpointed so
its ``thin`` inner steps are recomputed rather than stored. Memory grows like ``sqrt(n)``
ensembles (2000 steps: 50 segment starts + 40 steps instead of 2000) for about one extra
forward pass of compute. The diagnostics are accumulated under ``stop_gradient`` and carry no
tangents.

Everything runs in ``lax.scan`` and ``vmap``: no Python loops over steps, particles or conditions.
``simulate_stationary`` is jit-friendly (``drift_fn`` and ``settings`` static), and the
host-side ``check_stationary`` turns its diagnostics into a verdict and a message.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy.stats import t as student_t

from ..config import SimulationSettings

DriftFn = Callable[[object, jax.Array, jax.Array], jax.Array]


class SimulatedLaw(NamedTuple):
    """Moment-matched stationary law per condition, with Monte Carlo and stationarity diagnostics.

    ``means`` and ``covariances`` are differentiable in the drift's parameters; the diagnostics
    are not (``stop_gradient``). A condition with diverged particles has non-finite moments.
    """

    means: jax.Array  # (conditions, genes) pooled over recorded states and particles
    covariances: jax.Array  # (conditions, genes, genes) pooled (divisor: number of states)
    mean_se: jax.Array  # (conditions, genes) Monte Carlo s.e. of means: spread of particle averages
    effective_samples: jax.Array  # (conditions, genes) variance / mean_se^2, <= particles x records
    drift_z: jax.Array  # (conditions, genes) paired z of (2nd half - 1st half) particle means
    second_moment_z: jax.Array  # (conditions, genes) same for the mean square about the start ref
    split_rhat: jax.Array  # (conditions, genes) R-hat over 2 x particles half-window chains
    n_diverged: jax.Array  # (conditions,) particles whose final state is not finite
    max_abs_state: jax.Array  # (conditions,) largest finite |x| among the recorded states


def _noise(key: jax.Array, shape: tuple, dtype, kind: str) -> jax.Array:
    """Unit-variance increments: standard normal, or random signs unpacked from 32-bit words."""
    if kind == "gaussian":
        return jax.random.normal(key, shape, dtype)
    n_words = -(-shape[-1] // 32)
    words = jax.random.bits(key, (*shape[:-1], n_words), jnp.uint32)
    bits = (words[..., None] >> jnp.arange(32, dtype=jnp.uint32)) & jnp.uint32(1)
    bits = bits.reshape(*shape[:-1], 32 * n_words)[..., : shape[-1]]
    return 2 * bits.astype(dtype) - 1


def _segment_length(n: int) -> int:
    """A divisor of ``n`` within a factor 2 of ``sqrt(n)`` if there is one (no ragged last
    segment, so the step is compiled once less), else ``ceil(sqrt(n))``."""
    root = math.sqrt(n)
    candidates = range(max(1, math.ceil(root / 2)), math.floor(2 * root) + 1)
    divisors = [k for k in candidates if n % k == 0]
    return min(divisors, key=lambda k: abs(k - root)) if divisors else math.isqrt(n - 1) + 1


def _checkpointed_scan(body, carry, xs: jax.Array, segment: int):
    """``lax.scan(body, carry, xs)[0]`` in ``jax.checkpoint``-ed segments of ``segment`` steps.

    Reverse mode then stores the carry once per segment and, while it recomputes one segment,
    once per step of that segment: ``n / segment + segment`` carries instead of ``n``.
    """
    n = xs.shape[0]
    if n == 0:
        return carry
    segment = min(segment or _segment_length(n), n)

    def run(state, chunk):
        return jax.lax.scan(body, state, chunk)[0], None

    run = jax.checkpoint(run, prevent_cse=False)
    n_full, rest = divmod(n, segment)
    segments = xs[: n_full * segment].reshape(n_full, segment, *xs.shape[1:])
    carry, _ = jax.lax.scan(run, carry, segments)
    if rest:
        carry, _ = run(carry, xs[n_full * segment:])
    return carry


def _ratio(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """``numerator / denominator``, with 0/0 = 0 and x/0 = +-inf (no spread, no evidence)."""
    safe = jnp.where(denominator > 0, denominator, 1.0)
    return jnp.where(denominator > 0, numerator / safe,
                     jnp.where(numerator == 0, 0.0, jnp.sign(numerator) * jnp.inf))


def simulate_stationary(
    drift_fn: DriftFn,
    params,
    shifts: jax.Array,
    key: jax.Array,
    settings: SimulationSettings = SimulationSettings(),
    x0: jax.Array | None = None,
) -> SimulatedLaw:
    """Moment-matched stationary law of ``dx = f(x; c) dt + sigma dW`` for every shift ``c``.

    Parameters
    ----------
    drift_fn : callable
        ``drift_fn(params, x, shift) -> (genes,)`` for one state; batched here by ``jax.vmap``.
    params : pytree
        The drift's parameters; gradients flow to them pathwise.
    shifts : array (conditions, genes)
        One shift per condition.
    key : PRNG key
        Source of all noise; fixed key = common random numbers (smooth in ``params``).
    settings : SimulationSettings
        Step, lengths, particles, noise; static under ``jit``.
    x0 : array (genes,), (conditions, genes) or (conditions, particles, genes), optional
        Start of every particle (default: zeros); a fixed point shortens the mean's transient.

    Returns
    -------
    SimulatedLaw
    """
    settings = settings.validate()
    shifts = jnp.asarray(shifts)
    if shifts.ndim != 2:
        raise ValueError(f"shifts must be (conditions, genes), got shape {shifts.shape}")
    dtype = shifts.dtype if jnp.issubdtype(shifts.dtype, jnp.floating) else jnp.float32
    shifts = shifts.astype(dtype)
    n_conditions, n_genes = shifts.shape
    n_particles, n_recorded, thin = settings.n_particles, settings.n_recorded, settings.thin
    shape = (n_conditions, n_particles, n_genes)
    if x0 is None:
        x = jnp.zeros(shape, dtype)
    else:
        x0 = jnp.asarray(x0, dtype)
        if x0.ndim == 2:
            x0 = x0[:, None, :]
        x = jnp.broadcast_to(x0, shape)

    drift = jax.vmap(jax.vmap(drift_fn, (None, 0, None)), (None, 0, 0))  # conditions, particles
    dt = jnp.asarray(settings.dt, dtype)
    noise_scale = jnp.asarray(settings.sigma * math.sqrt(settings.dt), dtype)

    def step(state, index):
        eps = _noise(jax.random.fold_in(key, index), shape, dtype, settings.noise)
        return state + dt * drift(params, state, shifts) + noise_scale * eps, None

    x = _checkpointed_scan(step, x, jnp.arange(settings.n_burn_in), settings.checkpoint_segment)

    # Centre of the sums: shifts every moment by a constant, so it needs no gradient.
    # Particles that already diverged are left out of it, so the others' diagnostics stay usable.
    finite = jnp.isfinite(x)
    reference = jax.lax.stop_gradient(
        jnp.where(finite, x, 0.0).sum(axis=1) / jnp.maximum(finite.sum(axis=1), 1)
    )  # (conditions, genes)
    first_half = n_recorded // 2

    def record(carry, index):
        state, sum_y, sum_yy, particle_sums, particle_squares, largest = carry
        first = settings.n_burn_in + index * thin
        state, _ = jax.lax.scan(step, state, first + jnp.arange(thin))
        y = state - reference[:, None, :]
        sum_y = sum_y + y.sum(axis=1)
        sum_yy = sum_yy + jnp.einsum("cpi,cpj->cij", y, y)
        y = jax.lax.stop_gradient(y)
        half = (index >= first_half).astype(jnp.int32)
        particle_sums = particle_sums.at[half].add(y)
        particle_squares = particle_squares.at[half].add(y * y)
        finite_abs = jnp.where(jnp.isfinite(y), jnp.abs(jax.lax.stop_gradient(state)), 0.0)
        largest = jnp.maximum(largest, finite_abs.max(axis=(1, 2)))
        return (state, sum_y, sum_yy, particle_sums, particle_squares, largest), None

    carry = (
        x,
        jnp.zeros((n_conditions, n_genes), dtype),
        jnp.zeros((n_conditions, n_genes, n_genes), dtype),
        jnp.zeros((2, *shape), dtype),
        jnp.zeros((2, *shape), dtype),
        jnp.zeros((n_conditions,), dtype),
    )
    record = jax.checkpoint(record, prevent_cse=False)
    x, sum_y, sum_yy, particle_sums, particle_squares, largest = _checkpointed_scan(
        record, carry, jnp.arange(n_recorded), settings.checkpoint_segment
    )

    n_states = n_recorded * n_particles
    centred_mean = sum_y / n_states
    means = reference + centred_mean
    covariances = sum_yy / n_states - centred_mean[:, :, None] * centred_mean[:, None, :]
    covariances = 0.5 * (covariances + jnp.swapaxes(covariances, -1, -2))

    # Diagnostics. Particles are independent chains, so spreads over particles of per-particle
    # time averages give standard errors that already account for autocorrelation in time.
    counts = jnp.array([first_half, n_recorded - first_half], dtype).reshape(2, 1, 1, 1)
    half_means = particle_sums / counts  # (2, conditions, particles, genes)
    half_squares = particle_squares / counts
    root_p = math.sqrt(n_particles)
    particle_means = particle_sums.sum(axis=0) / n_recorded
    mean_se = particle_means.std(axis=1, ddof=1) / root_p
    variances = jax.lax.stop_gradient(jnp.diagonal(covariances, axis1=-2, axis2=-1))
    effective = jnp.clip(_ratio(variances, mean_se**2), 0.0, float(n_states))

    def paired_z(halves):
        difference = halves[1] - halves[0]  # (conditions, particles, genes)
        return _ratio(difference.mean(axis=1), difference.std(axis=1, ddof=1) / root_p)

    drift_z = paired_z(half_means)
    second_moment_z = paired_z(half_squares)

    # Split R-hat: each particle's two halves are two chains of ~n_recorded / 2 states.
    length = 0.5 * n_recorded
    within = (half_squares - half_means**2) * (counts / jnp.maximum(counts - 1, 1))
    within = within.mean(axis=(0, 2))
    chain_means = jnp.concatenate([half_means[0], half_means[1]], axis=1)
    between = chain_means.var(axis=1, ddof=1)
    split_rhat = jnp.sqrt(_ratio((length - 1) / length * within + between, within))

    n_diverged = jnp.sum(~jnp.all(jnp.isfinite(x), axis=-1), axis=-1)
    return SimulatedLaw(means, covariances, mean_se, effective, drift_z, second_moment_z,
                        split_rhat, n_diverged, largest)


def default_tolerance(
    n_tests: int, n_particles: int | None = None, false_alarm: float = 0.01
) -> float:
    """z threshold for ``n_tests`` half-window z-scores: Bonferroni at family-wise ``false_alarm``.

    Each z is a paired t-statistic over the particles, so its tails are Student's t with
    ``n_particles - 1`` degrees of freedom (31 assumed when unknown, conservative for more
    particles); this matters at a few dozen particles and hundreds of tests. Floored at 4.
    """
    dof = 30 if n_particles is None else max(n_particles - 1, 1)
    return max(4.0, float(student_t.isf(false_alarm / (2 * max(n_tests, 1)), dof)))


@dataclass(frozen=True)
class StationarityReport:
    """Verdict of ``check_stationary``: truthy when the check passed; unpacks as (ok, message)."""

    ok: bool
    message: str
    max_drift_z: float
    max_second_moment_z: float
    tolerance: float

    def __bool__(self) -> bool:
        return self.ok

    def __iter__(self):
        return iter((self.ok, self.message))

    def raise_if_failed(self) -> "StationarityReport":
        """Raise ``RuntimeError`` with the message when the check failed; return ``self``."""
        if not self.ok:
            raise RuntimeError(self.message)
        return self


def _worst(z: np.ndarray) -> tuple[float, tuple[int, int]]:
    magnitude = np.where(np.isnan(z), np.inf, np.abs(z))
    where = np.unravel_index(int(np.argmax(magnitude)), magnitude.shape)
    return float(magnitude[where]), (int(where[0]), int(where[1]))


def check_stationary(
    law: SimulatedLaw,
    tol: float | None = None,
    settings: SimulationSettings | None = None,
) -> StationarityReport:
    """Did the particles diverge, or were they still relaxing in the recorded window?

    Host-side (not under ``jit``). Fails when any particle went non-finite (``dt`` too large for
    the drift), or when the mean or the mean square of the particles differs between the first and
    second half of the recorded window by more than ``tol`` standard errors in any gene and
    condition (``tol`` default: ``default_tolerance``, a 1% family-wise false alarm rate). Pass
    the run's ``settings`` for the exact default (it depends on the number of particles) and for
    a message that quotes the current values.
    """
    n_diverged = np.asarray(law.n_diverged)
    means = np.asarray(law.means)
    n_conditions, n_genes = means.shape
    if tol is None:
        particles = settings.n_particles if settings else None
        tol = default_tolerance(2 * n_conditions * n_genes, particles)
    tol = float(tol)
    drift_z, at_drift = _worst(np.asarray(law.drift_z))
    square_z, at_square = _worst(np.asarray(law.second_moment_z))
    rhat = np.asarray(law.split_rhat)
    max_rhat = float(np.nanmax(rhat)) if np.isfinite(rhat).any() else float("nan")

    def report(ok, message):
        return StationarityReport(bool(ok), message, drift_z, square_z, tol)

    now_dt = f" (now {settings.dt})" if settings else ""
    covariances = np.asarray(law.covariances)
    finite = np.isfinite(means).all(axis=1) & np.isfinite(covariances).all(axis=(1, 2))
    if n_diverged.any() or not finite.all():
        bad = np.flatnonzero((n_diverged > 0) | ~finite)
        of = f" of {settings.n_particles}" if settings else ""
        counts = ", ".join(f"{int(n_diverged[c])}{of} in condition {int(c)}" if n_diverged[c]
                           else f"overflowing moments in condition {int(c)}" for c in bad[:5])
        more = f" and {len(bad) - 5} more conditions" if len(bad) > 5 else ""
        return report(False, (
            f"diverged: particles became non-finite ({counts}{more}). The Euler–Maruyama step is "
            f"unstable for this drift: decrease dt{now_dt}; stability needs dt below 2 / (largest "
            f"|eigenvalue| of the drift's Jacobian along the path). Its moments are not usable."))

    window = (f" (now {settings.n_burn_in} steps = {settings.n_burn_in * settings.dt:g} time units)"
              if settings else "")
    if drift_z > tol or square_z > tol:
        which = ("mean" if drift_z >= square_z else "mean square")
        z, (c, g) = (drift_z, at_drift) if drift_z >= square_z else (square_z, at_square)
        return report(False, (
            f"not stationary: the particles' {which} changes between the first and second half of "
            f"the recorded window by {z:.1f} standard errors (condition {c}, gene {g}; tolerance "
            f"{tol:.1f}). They were still relaxing from the start: increase n_burn_in{window}, or "
            f"dt{now_dt} within stability so that burn-in covers more time, or start from a fixed "
            f"point (x0). If burn-in already spans many relaxation times, lengthen the window "
            f"(n_sample)."))

    note = ""
    if max_rhat > 1.1:
        note = (f"; particles mix slowly within the window (max split R-hat {max_rhat:.2f}), "
                f"so the Monte Carlo error rests on the number of particles")
    ess = float(np.nanmin(np.asarray(law.effective_samples)))
    return report(True, (
        f"stationary: max |z| between window halves {drift_z:.1f} for means, {square_z:.1f} for "
        f"mean squares (tolerance {tol:.1f}); max split R-hat {max_rhat:.3f}; min effective "
        f"samples per gene {ess:.0f}{note}."))
