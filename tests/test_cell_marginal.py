"""The per-cell states are integrated out inside the program: each cell's ``log p(y_i | globals)``
enters as an importance-weighted bound with draws from ``conditional_proposal``.

Checked against a quadrature of the exact marginal on a 2-gene system without interactions (the
stationary covariance is then diagonal, so the integral is a product of 1-D integrals, inside one
over the log library when that is latent), and the proposal against the closed-form product of the
state law and the encoder's pseudo-likelihood.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.handlers import seed, substitute, trace
from scipy.special import gammaln, logsumexp

from lcd_bayes.config import ModelConfig
from lcd_bayes.model.program import (
    CellBatch,
    Drift,
    Structure,
    conditional_proposal,
    count_distribution,
    lcd_model,
    rate_free_log_likelihood,
    rate_log_likelihood,
)

N_GENES = 2
DECAY = np.array([2.0, 0.5])  # stationary variances 1/(2 D): 0.25 and 1
BASAL_RELATIVE = np.array([0.3, -0.4])  # stationary means b_rel (R = 0)
GENE_SCALE = np.array([8.0, 3.0])
CONCENTRATION = np.array([4.0, 20.0])
COUNTS = np.array([[0.0, 3.0], [12.0, 1.0], [5.0, 9.0]], dtype=np.float32)
SIZE_FACTOR = np.array([1.0, 1.3, 0.7], dtype=np.float32)

GLOBALS = {
    "interaction_scale": jnp.asarray(0.1), "interaction_slab": jnp.asarray(1.0),
    "interaction_local": jnp.ones((N_GENES, N_GENES)), "interaction_raw": jnp.zeros((N_GENES, N_GENES)),
    "log_decay": jnp.log(jnp.asarray(DECAY)), "basal_relative": jnp.asarray(BASAL_RELATIVE),
    "gene_scale": jnp.asarray(GENE_SCALE), "concentration": jnp.asarray(CONCENTRATION),
}


def _structure() -> Structure:
    # Control cells only: no perturbation labels, so no shift sites.
    return Structure(design=np.zeros((1, 0), np.float32), targets=np.zeros((0, N_GENES), np.float32),
                     gene_scale_center=np.log(GENE_SCALE).astype(np.float32), n_cells=len(COUNTS))


def _cells() -> CellBatch:
    return CellBatch(jnp.asarray(COUNTS), jnp.asarray(SIZE_FACTOR), jnp.zeros(len(COUNTS), jnp.int32))


LIBRARY_SD = 0.4  # of the latent log library sizes


def _bound(particles: int, key, library: str = "observed") -> np.ndarray:
    """Per-cell log-marginal estimate the program adds to the ELBO."""
    # Near the continuous-time law; _exact's link (the softplus, or with a latent library the exp,
    # along which the library and the state add, so that moving the proposal with it is exact).
    config = ModelConfig(dt=0.001, n_doublings=18, link="softplus" if library == "observed" else "exp",
                         library=library)
    model = functools.partial(lcd_model, structure=_structure(), config=config, cell_particles=particles)
    # A weak pseudo-likelihood keeps the proposal near the state law, which covers each cell's
    # posterior, so that 4096 draws suffice for the estimate to be near exact.
    encoder = {"encoder_precision": jnp.full(N_GENES, 0.5), "encoder_hidden_out": jnp.zeros((64, N_GENES)),
               "library_encoder_sd": jnp.asarray(0.5), "library_sd": jnp.asarray(LIBRARY_SD)}
    model_trace = trace(seed(substitute(model, data={**GLOBALS, **encoder}), key)).get_trace(_cells())
    return np.asarray(model_trace["y"]["fn"].log_factor)


def _exact(library: str = "observed") -> np.ndarray:
    """log p(y_i) = sum_g log int N(x; b_g, 1/(2 D_g)) NB(y_ig; s_i softplus(x) u_g, phi_g) dx; with a
    latent library log int N(l; 0, LIBRARY_SD^2) prod_g int N(x; ...) NB(y_ig; e^l exp(x) u_g, phi_g) dx dl."""
    x = np.linspace(-12.0, 12.0, 8001)
    step = x[1] - x[0]
    if library == "observed":
        log_sizes, log_library_weight = np.log(SIZE_FACTOR)[:, None], np.zeros((len(COUNTS), 1))
    else:
        grid = np.linspace(-6 * LIBRARY_SD, 6 * LIBRARY_SD, 241)
        log_sizes = np.broadcast_to(grid, (len(COUNTS), grid.size))
        log_library_weight = (-0.5 * (grid / LIBRARY_SD) ** 2 - np.log(LIBRARY_SD * np.sqrt(2 * np.pi))
                              + np.log(grid[1] - grid[0]))[None, :] + np.zeros((len(COUNTS), 1))
    rate_of_state = np.logaddexp(0.0, x) if library == "observed" else np.exp(x)
    out = log_library_weight.copy()  # (cells, library grid)
    for g in range(N_GENES):
        var = 1.0 / (2.0 * DECAY[g])
        log_state = -0.5 * (x - BASAL_RELATIVE[g]) ** 2 / var - 0.5 * np.log(2 * np.pi * var)
        for i, y in enumerate(COUNTS[:, g]):
            mean = np.exp(log_sizes[i])[:, None] * rate_of_state[None, :] * GENE_SCALE[g] + 1e-6
            phi = CONCENTRATION[g]
            log_nb = (gammaln(y + phi) - gammaln(phi) - gammaln(y + 1)
                      + phi * np.log(phi / (phi + mean)) + y * np.log(mean / (phi + mean)))
            out[i] += logsumexp(log_state + log_nb, axis=-1) + np.log(step)
    return logsumexp(out, axis=-1)


@pytest.mark.slow  # thousands of importance draws per cell: ~20 s
def test_importance_bound_tends_to_the_exact_cell_marginal():
    exact = _exact()
    keys = jax.random.split(jax.random.PRNGKey(0), 64)
    averages = {k: np.mean([_bound(k, key) for key in keys[:16 if k > 64 else 64]], axis=0) for k in (1, 16, 4096)}
    # A lower bound on average, tighter with more particles, and close to exact with many.
    # (Measured: the 4096-draw estimate within 0.003 nats of the quadrature; 1 draw 0.06-0.29 below.)
    assert np.all(averages[1] < averages[16]) and np.all(averages[16] < exact + 0.03)
    assert np.all(averages[1] < exact - 0.03)
    np.testing.assert_allclose(averages[4096], exact, atol=0.02)


@pytest.mark.slow  # thousands of importance draws per cell: ~20 s
def test_importance_bound_integrates_a_latent_library_out():
    """With ``library = "latent"`` each cell's library is drawn with its state, and the bound tends
    to the marginal over both."""
    exact = _exact("latent")
    keys = jax.random.split(jax.random.PRNGKey(3), 64)
    averages = {k: np.mean([_bound(k, key, "latent") for key in keys[:16 if k > 64 else 64]], axis=0)
                for k in (1, 4096)}
    assert np.all(averages[1] < exact - 0.03)
    np.testing.assert_allclose(averages[4096], exact, atol=0.02)


def _proposal(covariance, means, precision_values, condition=None):
    drift = Drift(jnp.zeros((2, 2)), jnp.zeros((0, 2)), jnp.zeros(2), means, covariance)
    cells, structure = _cells(), _structure()
    if condition is not None:
        cells = cells._replace(condition=condition)
        structure = structure._replace(design=np.zeros((means.shape[0], 0), np.float32))

    def proposal():
        with numpyro.plate("cells", len(COUNTS)) as idx:
            return conditional_proposal(cells, idx, structure, ModelConfig(), 8, drift, jnp.linalg.cholesky(covariance))

    fixed = {"encoder_precision": precision_values, "encoder_linear": jnp.zeros((2, 2)),
             "encoder_condition_offset": jnp.zeros((means.shape[0], 2)), "encoder_hidden_out": jnp.zeros((8, 2))}
    return seed(substitute(proposal, data=fixed), 0)()


def _expected_law(covariance, mean, precision_values, moved=0.0):
    """The product of N(x; mean, covariance) and N(guess - moved; x, P^-1), normalized: mean and
    covariance (``moved``: per cell)."""
    # With the encoder's corrections at zero its pseudo-observation is each cell's crude guess.
    normalized = (COUNTS + 0.5) / (SIZE_FACTOR[:, None] * GENE_SCALE)
    guess = np.log(normalized) if ModelConfig().link == "exp" else np.log(np.expm1(normalized))  # the inverse link
    guess = guess - np.reshape(moved, (-1, 1))
    expected_cov = np.linalg.inv(np.linalg.inv(covariance) + np.diag(precision_values))
    expected_mean = (expected_cov @ (np.linalg.inv(covariance) @ mean[:, None]
                                     + (np.asarray(precision_values)[:, None] * guess.T))).T
    return guess, expected_mean, expected_cov


def test_conditional_proposal_is_the_state_law_times_the_pseudo_likelihood():
    covariance = jnp.array([[0.5, 0.2], [0.2, 0.4]])
    means = jnp.array([[0.3, -1.0]])
    precision_values = jnp.array([3.0, 0.5])
    q = _proposal(covariance, means, precision_values)
    guess, expected_mean, expected_cov = _expected_law(np.asarray(covariance), np.asarray(means[0]), precision_values)
    np.testing.assert_allclose(q.pseudo_location, guess, rtol=1e-5)
    np.testing.assert_allclose(q.factor.T @ q.factor, expected_cov, rtol=1e-4)  # shared by the cells
    np.testing.assert_allclose(q.mean(), expected_mean, rtol=1e-4, atol=1e-5)
    # Its draws have that law (moments of 200k draws).
    draws = np.asarray(q.sample(jax.random.PRNGKey(1), 200_000))
    np.testing.assert_allclose(draws.mean(axis=0), expected_mean, atol=0.01)
    np.testing.assert_allclose(np.cov(draws[:, 1].T), expected_cov, atol=0.01)
    # log N(x; mu, Sigma) - log q(x), computed without any density, equals the densities' difference.
    x = draws[:5]
    state = dist.MultivariateNormal(means[0], covariance).log_prob(x)
    proposal = dist.MultivariateNormal(jnp.asarray(expected_mean), jnp.asarray(expected_cov)).log_prob(x)
    np.testing.assert_allclose(q.log_density_ratio(jnp.asarray(x)), state - proposal, rtol=1e-4, atol=1e-4)


def test_conditional_proposal_with_a_law_per_condition():
    """The nonlinear drift's laws differ by condition: each cell takes its own condition's."""
    covariances = jnp.array([[[0.5, 0.2], [0.2, 0.4]], [[1.5, -0.3], [-0.3, 0.2]]])
    means = jnp.array([[0.3, -1.0], [1.0, 0.5]])
    precision_values = jnp.array([1.0, 4.0])
    condition = jnp.array([1, 0, 1], jnp.int32)
    q = _proposal(covariances, means, precision_values, condition)
    draws = q.sample(jax.random.PRNGKey(2), 3)
    for cell, c in enumerate(np.asarray(condition)):
        _, expected_mean, expected_cov = _expected_law(np.asarray(covariances[c]), np.asarray(means[c]), precision_values)
        np.testing.assert_allclose(q.factor[cell].T @ q.factor[cell], expected_cov, rtol=1e-4)
        state = dist.MultivariateNormal(means[c], covariances[c]).log_prob(draws[:, cell])
        proposal = dist.MultivariateNormal(jnp.asarray(expected_mean[cell]), jnp.asarray(expected_cov)).log_prob(draws[:, cell])
        np.testing.assert_allclose(q.log_density_ratio(draws)[:, cell], state - proposal, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("per_condition", [False, True])
def test_moved_proposal_is_the_proposal_of_the_moved_pseudo_observation(per_condition):
    """A latent library moves each cell's pseudo-observation by its draw; ``moved`` gives, per
    draw, the same law as the proposal built from the moved pseudo-observation."""
    covariances = jnp.array([[[0.5, 0.2], [0.2, 0.4]], [[1.5, -0.3], [-0.3, 0.2]]])
    means = jnp.array([[0.3, -1.0], [1.0, 0.5]])
    precision_values = jnp.array([2.0, 0.7])
    condition = jnp.array([1, 0, 1], jnp.int32) if per_condition else jnp.zeros(3, jnp.int32)
    q = _proposal(covariances if per_condition else covariances[0], means if per_condition else means[:1],
                  precision_values, condition if per_condition else None)
    shifts = np.array([[0.4, -0.2, 1.1], [-0.7, 0.0, 0.3]], np.float32)  # (draws, cells)
    moved = q.moved(jnp.asarray(shifts))
    draws = moved.sample(jax.random.PRNGKey(4), 2)  # one draw per shift
    for row, shift in enumerate(shifts):
        for cell, c in enumerate(np.asarray(condition)):
            _, expected_mean, expected_cov = _expected_law(np.asarray(covariances[c]), np.asarray(means[c]),
                                                           precision_values, shift)
            np.testing.assert_allclose(moved.mean()[row, cell], expected_mean[cell], rtol=1e-4, atol=1e-5)
            state = dist.MultivariateNormal(means[c], covariances[c]).log_prob(draws[row, cell])
            proposal = dist.MultivariateNormal(jnp.asarray(expected_mean[cell]), jnp.asarray(expected_cov)).log_prob(
                draws[row, cell])
            np.testing.assert_allclose(moved.log_density_ratio(draws)[row, cell], state - proposal, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("likelihood", ["nb", "poisson", "zip"])
def test_count_log_likelihood_splits_into_rate_and_rate_free_parts(likelihood):
    rate = jnp.asarray(np.random.default_rng(0).gamma(2.0, 3.0, size=(4, *COUNTS.shape)), jnp.float32)
    noise = {"nb": jnp.asarray(CONCENTRATION, jnp.float32), "zip": jnp.array([0.1, 0.3])}.get(likelihood)
    counts = jnp.asarray(COUNTS)
    expected = count_distribution(likelihood, rate, noise).to_event(1).log_prob(counts)
    split = rate_log_likelihood(likelihood, counts, rate, noise) + rate_free_log_likelihood(likelihood, counts, noise)
    np.testing.assert_allclose(split, expected, rtol=1e-5, atol=1e-4)


def test_nb_log_likelihood_stays_accurate_at_large_concentrations_in_float32():
    """A guide's draw of a weakly determined concentration can reach 1e6 and beyond; there the
    float32 log-likelihood and its gradient must still be those of the (Poisson-like) NB."""
    counts = np.array([0.0, 3.0, 40.0])
    rate = np.array([0.2, 2.5, 35.0])

    def float32_model(log_noise):
        noise = jnp.exp(jnp.full(3, log_noise, jnp.float32))
        y, mu = jnp.asarray(counts[None], jnp.float32), jnp.asarray(rate[None], jnp.float32)
        return jnp.sum(rate_log_likelihood("nb", y, mu, noise) + rate_free_log_likelihood("nb", y, noise))

    def float64_reference(log_noise):  # the textbook NB2, exact enough in float64 up to phi ~ 1e6
        phi = np.exp(log_noise)
        return float(np.sum(gammaln(counts + phi) - gammaln(phi) - gammaln(counts + 1) + phi * np.log(phi)
                            + counts * np.log(rate) - (phi + counts) * np.log(phi + rate)))

    for log_noise in (2.0, np.log(1e6)):
        step = 1e-3
        slope = (float64_reference(log_noise + step) - float64_reference(log_noise - step)) / (2 * step)
        np.testing.assert_allclose(float(float32_model(log_noise)), float64_reference(log_noise), rtol=1e-5, atol=1e-3)
        np.testing.assert_allclose(float(jax.grad(float32_model)(jnp.float32(log_noise))), slope, rtol=1e-2, atol=1e-4)
    # At phi = 1e12 the NB is the Poisson to ~mu^2 / phi, and its slope in log phi vanishes.
    poisson = float(np.sum(counts * np.log(rate) - rate - gammaln(counts + 1)))
    np.testing.assert_allclose(float(float32_model(np.log(1e12))), poisson, atol=1e-3)
    assert abs(float(jax.grad(float32_model)(jnp.float32(np.log(1e12))))) < 1e-3
