"""Stationary law by particle simulation: exact linear laws, pathwise gradients, diagnostics."""
from functools import lru_cache, partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcd_bayes.analysis.clipr import linear_drift
from lcd_bayes.config import SimulationSettings
from lcd_bayes.dynamics.fixed_point import fixed_point
from lcd_bayes.dynamics.particles import check_stationary, simulate_stationary
from lcd_bayes.dynamics.stationary import stationary_law, stationary_means
from lcd_bayes.sim.linear import random_linear_system

DT = 0.02
# 10 time units of burn-in for a slowest rate of 1 (margin): start bias ~ 5e-5 of the offset.
SETTINGS = SimulationSettings(dt=DT, n_burn_in=500, n_sample=1000, thin=5, n_particles=64)
N_SHIFTS, N_REPLICATES = 3, 12


def linear_params(seed=0):
    system = random_linear_system(5, expected_degree=2.0, rng=seed)
    return {"drift": jnp.asarray(system.drift, jnp.float32),
            "basal_drift": jnp.asarray(system.basal_drift, jnp.float32)}


@lru_cache(maxsize=None)
def simulator(drift_fn, settings):
    """One compiled simulator per drift and settings, shared by the tests (compiling dominates)."""
    return jax.jit(partial(simulate_stationary, drift_fn, settings=settings))


@pytest.fixture(scope="module", params=["gaussian", "rademacher"])
def replicated_linear_run(request):
    """Three shifts, each simulated as 12 independent conditions (independent noise)."""
    params = linear_params()
    shifts = np.random.default_rng(1).normal(0.0, 1.0, (N_SHIFTS, 5)).astype(np.float32)
    conditions = jnp.asarray(np.repeat(shifts, N_REPLICATES, axis=0))
    settings = SETTINGS._replace(noise=request.param)
    law = simulator(linear_drift, settings)(params, conditions, jax.random.key(0))
    return params, shifts, settings, jax.tree.map(np.asarray, law)


def test_linear_moments_match_exact_discrete_law_within_monte_carlo_error(replicated_linear_run):
    """Means and covariances agree with the discrete Lyapunov solution to < 5 standard errors.

    Both noises have unit covariance, which is all the linear chain's stationary moments see.
    """
    params, shifts, settings, law = replicated_linear_run
    exact_cov = np.asarray(stationary_law(params["drift"], dt=DT, sigma=settings.sigma).covariance)
    exact_means = np.asarray(stationary_means(params["drift"], params["basal_drift"] + shifts))
    exact_means = np.repeat(exact_means, N_REPLICATES, axis=0)

    # Means, one condition at a time, against the simulator's own standard error (the spread of
    # independent particles' time averages, so autocorrelation is accounted for).
    z = (law.means - exact_means) / law.mean_se
    assert np.abs(z).max() < 5.0, np.abs(z).max()
    # ... and that standard error is calibrated: it matches the spread between replicates.
    replicate_sd = law.means.reshape(N_SHIFTS, N_REPLICATES, 5).std(axis=1, ddof=1)
    typical_se = law.mean_se.reshape(N_SHIFTS, N_REPLICATES, 5).mean(axis=1)
    assert 0.75 < np.mean(replicate_sd / typical_se) < 1.33

    # Covariance: shared by every condition, so all 36 conditions are independent replicates;
    # the standard error of their average comes from their spread.
    n = len(law.covariances)
    average = law.covariances.mean(axis=0)
    standard_error = law.covariances.std(axis=0, ddof=1) / np.sqrt(n)
    z_cov = (average - exact_cov) / standard_error
    assert np.abs(z_cov).max() < 5.0, np.abs(z_cov).max()
    # Not vacuous: the standard errors are a few percent of the covariance scale at most.
    assert standard_error.max() < 0.03 * np.abs(exact_cov).max()

    report = check_stationary(law, settings=settings)
    assert report and report.ok, report.message
    assert np.all(law.n_diverged == 0)


def test_pathwise_gradient_matches_finite_differences_with_common_random_numbers():
    params = linear_params()
    shifts = jnp.asarray(np.random.default_rng(2).normal(0.0, 1.0, (2, 5)), jnp.float32)
    settings = SimulationSettings(dt=0.05, n_burn_in=120, n_sample=200, thin=10, n_particles=32)

    def losses(p):
        """Summed means, and summed log variances (the covariance of a linear chain has no b)."""
        law = simulate_stationary(linear_drift, p, shifts, jax.random.key(3), settings)
        log_variances = jnp.log(jnp.diagonal(law.covariances, axis1=-2, axis2=-1))
        return jnp.stack([law.means.sum(), log_variances.sum()])

    # One compiled function gives both the values (for finite differences) and the pathwise
    # gradients of both losses: compiling dominates this test's time.
    jacobian_and_value = jax.jit(jax.jacrev(lambda p: (losses(p), losses(p)), has_aux=True))
    jacobian, _ = jacobian_and_value(params)

    def forward(p):
        return jacobian_and_value(p)[1]

    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(jacobian))
    eps = 1e-2  # float32: round-off ~1e-6 of the losses, i.e. ~1e-4 in the quotient
    for name, index in [("basal_drift", (0,)), ("basal_drift", (3,)), ("drift", (1, 1)),
                        ("drift", (0, 2)), ("drift", (4, 3))]:
        def moved(step):
            return {**params, name: params[name].at[index].add(step)}
        numeric = np.asarray((forward(moved(eps)) - forward(moved(-eps))) / (2 * eps))
        analytic = np.asarray(jacobian[name][(slice(None), *index)])
        np.testing.assert_allclose(analytic, numeric, rtol=0.03, atol=1e-3,
                                   err_msg=f"{name}{index}")

    # With common random numbers d x_t / d b = -(I - F^t) A^{-1} exactly, so after 6 time units
    # of burn-in the gradient of the summed means is -A^{-T} 1 per condition up to ~e^-6.
    expected = -2 * np.linalg.solve(np.asarray(params["drift"]).T, np.ones(5))
    np.testing.assert_allclose(jacobian["basal_drift"][0], expected, rtol=0.01, atol=1e-3)
    np.testing.assert_allclose(jacobian["basal_drift"][1], 0.0, atol=1e-3)


def test_checkpoint_segments_do_not_change_the_simulation():
    """Remat segments (ragged or not) only regroup the same steps: the results are identical.

    ``jax.checkpoint`` itself leaves values and gradients unchanged; what is ours is the cutting
    of the step indices, hence of the noise, into segments, which the forward pass exercises.
    """
    params = linear_params()
    shifts = jnp.ones((2, 5), jnp.float32)
    laws = []
    for segment in (0, 60):  # ~sqrt(n) (ragged for the 23 burn-in steps); one plain scan
        settings = SimulationSettings(dt=0.05, n_burn_in=23, n_sample=60, thin=2, n_particles=8,
                                      checkpoint_segment=segment)
        laws.append(simulator(linear_drift, settings)(params, shifts, jax.random.key(0)))
    for law in laws[1:]:
        np.testing.assert_allclose(law.means, laws[0].means, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(law.covariances, laws[0].covariances, rtol=1e-6, atol=1e-6)


def test_check_flags_insufficient_burn_in():
    """(That adequate burn-in passes is asserted on the replicated linear runs above.)"""
    params = linear_params()
    shifts = jnp.asarray(np.random.default_rng(1).normal(0.0, 1.0, (N_SHIFTS, 5)), jnp.float32)
    exact = stationary_means(params["drift"], params["basal_drift"] + shifts)
    # No burn-in and one time unit of window: far from everything the slowest rate (1) relaxes.
    short = SimulationSettings(dt=DT, n_burn_in=0, n_sample=50, thin=5, n_particles=256)
    simulate = simulator(linear_drift, short)
    # Far from the mean: the mean is still relaxing in the window.
    far = simulate(params, shifts, jax.random.key(1), x0=exact + 20.0)
    report = check_stationary(far, settings=short)
    assert not report.ok and not report
    ok, message = report
    assert not ok and "n_burn_in" in message and "burn-in" in message and "mean" in message
    # At the exact mean the mean does not move, but the spread of a common start still grows
    # (variance 1 - e^-2t): the mean-square half-window test catches what the mean test cannot.
    at_mean = simulate(params, shifts, jax.random.key(1), x0=exact)
    report = check_stationary(at_mean, settings=short)
    assert not report.ok and "mean square" in report.message and "n_burn_in" in report.message
    assert np.abs(np.asarray(at_mean.drift_z)).max() < report.tolerance


def test_divergence_is_detected_and_reported():
    stiff = {"drift": -300.0 * jnp.eye(3), "basal_drift": jnp.ones(3)}  # dt |lambda| = 3 > 2
    settings = SimulationSettings(dt=0.01, n_burn_in=200, n_sample=100, thin=5, n_particles=16)
    law = simulator(linear_drift, settings)(stiff, jnp.zeros((2, 3)), jax.random.key(0))
    assert np.all(np.asarray(law.n_diverged) == 16)
    report = check_stationary(law, settings=settings)
    assert not report.ok
    assert "diverged" in report.message and "decrease dt" in report.message
    with pytest.raises(RuntimeError, match="decrease dt"):
        report.raise_if_failed()

    # A drift within the step's stability (dt |lambda| = 0.5) is fine, with the same settings.
    gentle = {"drift": -50.0 * jnp.eye(3), "basal_drift": jnp.ones(3)}
    law = simulator(linear_drift, settings)(gentle, jnp.zeros((2, 3)), jax.random.key(0))
    assert np.all(np.asarray(law.n_diverged) == 0)
    assert check_stationary(law).ok and np.all(np.isfinite(np.asarray(law.means)))


def tanh_drift(params, x, shift):
    """``f(x; c) = -x + W tanh(x) + b + c``."""
    return -x + params["weights"] @ jnp.tanh(x) + params["basal_drift"] + shift


def test_nonlinear_drift_small_noise_sits_at_the_fixed_point():
    rng = np.random.default_rng(4)
    weights = rng.normal(0.0, 1.0, (4, 4))
    weights *= 0.5 / np.linalg.norm(weights, 2)  # contraction: slowest rate >= 0.5
    params = {"weights": jnp.asarray(weights, jnp.float32),
              "basal_drift": jnp.asarray(rng.normal(0.0, 1.0, 4), jnp.float32)}
    shifts = jnp.asarray(rng.normal(0.0, 1.0, (3, 4)), jnp.float32)
    sigma = 0.05
    # 20 time units of burn-in from 0 at rate >= 0.5: start bias < e^-10.
    settings = SimulationSettings(dt=0.05, n_burn_in=400, n_sample=400, thin=4, n_particles=64,
                                  sigma=sigma)
    law = simulator(tanh_drift, settings)(params, shifts, jax.random.key(5))
    law = jax.tree.map(np.asarray, law)
    assert np.all(np.isfinite(law.means)) and np.all(np.isfinite(law.covariances))
    report = check_stationary(law, settings=settings)
    assert report.ok, report.message

    points = jax.vmap(lambda c: fixed_point(tanh_drift, params, c))(shifts)
    assert float(points.residual.max()) < 1e-4
    # E f(x) = 0 at stationarity: the mean leaves x* by ~ J^-1 W tanh''(x*) var / 2, at most
    # 2 * 0.5 * 0.39 * sigma^2 here, so sigma^2 bounds that bias; the rest is Monte Carlo.
    tolerance = 5 * law.mean_se + sigma**2
    assert np.all(np.abs(law.means - np.asarray(points.x)) < tolerance)

    # The variances are those of the chain linearized at x* (nonlinear corrections O(sigma^2)),
    # within Monte Carlo error: sqrt(2 / n_eff) relative for a near-Gaussian variance, with the
    # mean's effective sample size as n_eff (x^2 decorrelates at least as fast as x).
    @jax.jit
    @jax.vmap
    def linearized_variances(point, shift):
        jacobian = jax.jacfwd(tanh_drift, argnums=1)(params, point, shift)
        return jnp.diag(stationary_law(jacobian, dt=settings.dt, sigma=sigma).covariance)

    linear = np.asarray(linearized_variances(points.x, shifts))
    simulated = np.diagonal(law.covariances, axis1=-2, axis2=-1)
    z = (simulated - linear) / (linear * np.sqrt(2.0 / law.effective_samples))
    assert np.abs(z).max() < 5.0, z


def test_settings_are_validated():
    with pytest.raises(ValueError, match="multiple of thin"):
        SimulationSettings(n_sample=100, thin=30).validate()
    with pytest.raises(ValueError, match="noise"):
        SimulationSettings(noise="uniform").validate()
    with pytest.raises(ValueError, match="conditions, genes"):
        simulate_stationary(linear_drift, linear_params(), jnp.zeros(5), jax.random.key(0))
