"""The stationary solver: discrete Lyapunov by doubling, against simulation and the continuous limit."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg as sl

from lcd_bayes.dynamics.stationary import (
    effective_drift, excess_abscissa, log_spectral_radius_bound, stationary_law, stationary_means, transition_matrix,
)


def stable_drift(d, seed):
    rng = np.random.default_rng(seed)
    weights = rng.normal(0, 1.0, (d, d)) * (rng.random((d, d)) < 0.5)
    np.fill_diagonal(weights, 0)
    shift = max(np.linalg.eigvals(weights).real.max(), 0) + 1.0
    return (weights - shift * np.eye(d)).astype(np.float32)


def test_doubling_solves_the_discrete_lyapunov_equation():
    drift = stable_drift(6, 0)
    dt = 0.05
    law = stationary_law(jnp.asarray(drift), dt=dt, sigma=1.3, n_doublings=14)
    expected = sl.solve_discrete_lyapunov(np.eye(6) + dt * drift.astype(np.float64), 1.3**2 * dt * np.eye(6))
    np.testing.assert_allclose(law.covariance, expected, rtol=2e-3, atol=1e-5)
    assert float(law.projection) == 1.0  # a stable drift is left untouched


def test_doubling_matches_long_euler_maruyama_simulation():
    """Covariance and means of many long Euler–Maruyama chains agree within Monte Carlo error."""
    d, dt, n_chains, n_steps = 3, 0.05, 20000, 600  # 30 time units: ~30 relaxation times
    drift = stable_drift(d, 1)
    offset = np.array([1.0, -0.5, 2.0], np.float32)
    transition = transition_matrix(jnp.asarray(drift), dt)

    def step(x, key):
        noise = jax.random.normal(key, x.shape)
        return x @ transition.T + dt * offset + jnp.sqrt(dt) * noise, None

    keys = jax.random.split(jax.random.PRNGKey(0), n_steps)
    states, _ = jax.lax.scan(step, jnp.zeros((n_chains, d)), keys)
    states = np.asarray(states, np.float64)

    law = stationary_law(jnp.asarray(drift), dt=dt)
    covariance = np.asarray(law.covariance, np.float64)
    # Monte Carlo sd of a sample covariance entry: sqrt((S_jj S_kk + S_jk^2) / n)
    mc_sd = np.sqrt((np.outer(np.diag(covariance), np.diag(covariance)) + covariance**2) / n_chains)
    assert np.all(np.abs(np.cov(states.T) - covariance) < 4.5 * mc_sd)
    mean = np.asarray(stationary_means(jnp.asarray(drift), jnp.asarray(offset)[None]))[0]
    mean_sd = np.sqrt(np.diag(covariance) / n_chains)
    assert np.all(np.abs(states.mean(0) - mean) < 4.5 * mean_sd)


def test_discrete_law_tends_to_continuous_lyapunov_as_dt_shrinks():
    drift = stable_drift(5, 2)
    continuous = sl.solve_continuous_lyapunov(drift.astype(np.float64), -np.eye(5))
    errors = []
    for dt in (0.1, 0.03, 0.01, 0.003):
        n_doublings = int(np.ceil(np.log2(40.0 / dt)))  # ~40 time units of relaxation
        law = stationary_law(jnp.asarray(drift), dt=dt, n_doublings=n_doublings)
        errors.append(np.abs(np.asarray(law.covariance) - continuous).max() / np.abs(continuous).max())
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.01


def test_trapezoidal_law_is_the_continuous_one_for_any_step():
    """The Cayley-transformed chain's stationary covariance solves the SDE's continuous Lyapunov
    equation exactly, whatever dt (Euler's error grows with dt), and its effective drift is A."""
    drift = stable_drift(5, 2)
    continuous = sl.solve_continuous_lyapunov(drift.astype(np.float64), -(1.3**2) * np.eye(5))
    for dt in (0.01, 0.1, 0.5):
        n_doublings = int(np.ceil(np.log2(60.0 / dt)))
        law = stationary_law(jnp.asarray(drift), dt=dt, sigma=1.3, n_doublings=n_doublings, scheme="trapezoidal")
        np.testing.assert_allclose(law.covariance, continuous, rtol=1e-3, atol=1e-4 * np.abs(continuous).max())
        np.testing.assert_allclose(effective_drift(law, "trapezoidal"), drift, atol=1e-3)
        euler = stationary_law(jnp.asarray(drift), dt=dt, sigma=1.3, n_doublings=n_doublings)
        assert np.abs(np.asarray(euler.covariance) - continuous).max() > 5e-3 * np.abs(continuous).max()


@pytest.mark.parametrize("unstable_eigenvalue", [3.0, 200.0, 5000.0])
def test_trapezoidal_projection_keeps_an_unstable_drift_finite(unstable_eigenvalue):
    """Also at 2 / dt = 200, where I - dt A / 2 would be singular without the step cap."""
    drift = np.diag(np.array([unstable_eigenvalue, -1.0, -2.0, -3.0], np.float32))
    drift[1, 0], drift[2, 1] = 0.5, -0.7

    def penalized(a):
        law = stationary_law(a, dt=0.01, scheme="trapezoidal")
        return law.covariance.sum() + excess_abscissa(law) + effective_drift(law, "trapezoidal").sum(), law

    (value, law), grad = jax.value_and_grad(penalized, has_aux=True)(jnp.asarray(drift))
    assert float(law.log_spectral_radius) > 0 and float(law.projection) < 1.0
    assert float(excess_abscissa(law)) > 0
    assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))
    assert np.all(np.linalg.eigvalsh(np.asarray(law.covariance, np.float64)) > 0)


def test_spectral_radius_bound_is_tight_and_from_above():
    drift = stable_drift(8, 3)
    transition = np.eye(8) + 0.02 * drift
    true_log_radius = np.log(np.abs(np.linalg.eigvals(transition)).max())
    bound = float(log_spectral_radius_bound(jnp.asarray(transition, jnp.float32), 16))
    assert bound >= true_log_radius - 1e-6
    assert bound - true_log_radius < 1e-4


def test_unstable_drift_is_projected_not_silent():
    drift = stable_drift(4, 4) + 3.0 * np.eye(4, dtype=np.float32)  # eigenvalues with positive real part
    law = stationary_law(jnp.asarray(drift), dt=0.01, max_spectral_radius=0.9999)
    assert float(law.log_spectral_radius) > 0  # detected: no stationary state
    assert float(law.projection) < 1.0  # prevented: the law comes from the projected transition
    assert np.all(np.isfinite(np.asarray(law.covariance)))
    projected_radius = np.abs(np.linalg.eigvals(np.asarray(law.transition))).max()
    assert projected_radius <= 0.9999 + 1e-5


def test_gradients_are_finite_even_for_unstable_drift():
    drift = jnp.asarray(stable_drift(4, 5) + 3.0 * np.eye(4, dtype=np.float32))
    grad = jax.grad(lambda a: stationary_law(a, dt=0.01).covariance.sum() - jnp.log(stationary_law(a, dt=0.01).projection))(drift)
    assert np.all(np.isfinite(np.asarray(grad)))


def test_unknown_scheme_is_refused_with_the_choices():
    from lcd_bayes.config import ModelConfig

    with pytest.raises(ValueError, match="euler"):
        ModelConfig(scheme="runge_kutta")
    with pytest.raises(ValueError, match="trapezoidal"):
        transition_matrix(jnp.eye(2), 0.01, "runge_kutta")
