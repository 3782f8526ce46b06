"""The refinements of a fitted guide (``[fit] refine = "nuts"`` or ``"laplace"``,
lcd_bayes.inference.refine).

On conjugate toy models the exact posterior is known: the NUTS draws must find it even from a
guide that is too narrow and off-centre (the guide only whitens the chain), through a constrained
(positive) site as well as a real one; the Laplace draws must have the exact covariance of a
Gaussian posterior from a guide with the right mean but too narrow and uncorrelated. On a small
screen the refined posterior must be wider than the guide's, which is what the refinements are for
(docs/inference.md).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer.autoguide import AutoDiagonalNormal, AutoMultivariateNormal
from numpyro.infer.initialization import init_to_value

from lcd_bayes.cli import _print_fit
from lcd_bayes.config import RunConfig
from lcd_bayes.diagnostics import LcdBayesWarning
from lcd_bayes.inference import refine
from lcd_bayes.run import fit
from lcd_bayes.sim.linear import LIBRARY_SIZE_KEY, simulate, truth_from_uns


class ToyData(NamedTuple):
    y_mean: jnp.ndarray  # y ~ N(x, 1), x ~ N(0, 1)
    y_precision: jnp.ndarray  # y ~ N(0, 1 / sqrt(lam)), lam ~ Gamma(2, 2)


def toy_model(data: ToyData):
    x = numpyro.sample("x", dist.Normal(0.0, 1.0))
    lam = numpyro.sample("lam", dist.Gamma(2.0, 2.0))
    with numpyro.plate("obs", data.y_mean.shape[0]):
        numpyro.sample("y_mean", dist.Normal(x, 1.0), obs=data.y_mean)
        numpyro.sample("y_precision", dist.Normal(0.0, 1.0 / jnp.sqrt(lam)), obs=data.y_precision)


@pytest.fixture(scope="module")
def toy():
    rng = np.random.default_rng(0)
    n = 40
    data = ToyData(jnp.asarray(rng.normal(0.7, 1.0, n), jnp.float32), jnp.asarray(rng.normal(0.0, 0.5, n), jnp.float32))
    # A deliberately poor "fit": means off by several posterior sds, scales 4x too small and
    # correlated (so that the whitening's orientation matters).
    guide = AutoMultivariateNormal(toy_model, init_loc_fn=init_to_value(values={"x": 0.0, "lam": 1.0}))
    params = {"auto_loc": jnp.array([0.0, 0.0]), "auto_scale_tril": jnp.array([[0.04, 0.0], [0.03, 0.02]])}
    numpyro.handlers.seed(guide, 0)(data)  # set up the guide's prototype
    return data, guide, params


def test_refined_draws_recover_the_exact_posterior(toy):
    data, guide, params = toy
    n = data.y_mean.shape[0]
    result = refine.refine_with_nuts(toy_model, guide, params, data, num_warmup=300, num_samples=2000,
                                     max_tree_depth=6, seed_value=0, progress=False)
    x, lam = result.latent["x"], result.latent["lam"]
    assert x.shape == (2000,) and lam.shape == (2000,) and np.all(lam > 0)
    # x | y ~ N(sum y / (n + 1), 1 / (n + 1)); lam | y ~ Gamma(2 + n / 2, 2 + sum y^2 / 2).
    x_mean, x_sd = float(data.y_mean.sum()) / (n + 1), 1.0 / np.sqrt(n + 1)
    shape, rate = 2.0 + n / 2, 2.0 + float((data.y_precision**2).sum()) / 2
    lam_mean, lam_sd = shape / rate, np.sqrt(shape) / rate
    assert abs(x.mean() - x_mean) < 0.1 * x_sd * 3 and abs(x.std() / x_sd - 1) < 0.15
    assert abs(lam.mean() - lam_mean) < 0.1 * lam_sd * 3 and abs(lam.std() / lam_sd - 1) < 0.15
    assert result.divergences == 0


def test_too_many_latent_dimensions_is_refused_with_a_remedy(toy, monkeypatch):
    data, guide, params = toy
    monkeypatch.setattr(refine, "MAX_LATENT_DIM", 1)
    with pytest.raises(ValueError, match=r'refine = "none".*--n-top-genes'):
        refine.refine_with_nuts(toy_model, guide, params, data, num_warmup=10, num_samples=10,
                                max_tree_depth=3, seed_value=0, progress=False)


def test_fit_refuses_a_model_too_large_to_refine_before_fitting(monkeypatch, tmp_path):
    monkeypatch.setattr(refine, "MAX_LATENT_DIM", 10)
    adata = simulate(4, cells_per_condition=20, likelihood="gaussian", seed=0)
    with pytest.raises(ValueError, match=r"at most 10 latent dimensions.*this model has \d+"):
        fit(adata, tmp_path / "run", config=RunConfig().replace(model={"likelihood": "gaussian"}), refine="nuts",
            size_factor_key=LIBRARY_SIZE_KEY, progress=False)
    assert not (tmp_path / "run").exists()  # nothing written, no SVI spent


def test_default_refinement_falls_back_to_the_guide_with_a_warning_when_too_large(monkeypatch, tmp_path, capsys):
    """``refine = "auto"`` (the default) is the Laplace refinement where the model fits the dense
    whitening; on a larger model the fit still runs, keeps the guide's draws, and says so."""
    monkeypatch.setattr(refine, "MAX_LATENT_DIM", 10)
    adata = simulate(4, cells_per_condition=20, likelihood="gaussian", seed=0)
    config = RunConfig().replace(model={"likelihood": "gaussian", "n_doublings": 12},
                                 fit={"steps": 40, "min_steps": 40, "steps_per_chunk": 20, "num_posterior_samples": 20})
    assert config.fit.refine == "auto"
    with pytest.warns(LcdBayesWarning, match=r"latent dimensions, more than the 10 .*too narrow.*--n-top-genes"):
        run = fit(adata, tmp_path / "run", config=config, size_factor_key=LIBRARY_SIZE_KEY, progress=False)
    posterior = run.posterior["posterior"]
    assert posterior.attrs["inference"] == "SVI" and "more than the 10" in posterior.attrs["refinement_skipped"]
    assert 'refine = "none"' in (tmp_path / "run" / "config.toml").read_text()  # what made the draws
    _print_fit(run)
    assert "credible intervals: this model has" in capsys.readouterr().out


def test_unknown_refinement_is_rejected():
    with pytest.raises(ValueError, match="refine must be one of"):
        RunConfig().replace(fit={"refine": "hmc"})


@pytest.mark.slow  # 1500 SVI steps and a NUTS chain: ~20 s
def test_refined_fit_says_how_it_was_made_and_covers_the_truth():
    """A 4-gene screen fitted with the refinement: the chain's diagnostics are in the posterior's
    attributes and its draws cover the simulated drift. (That its sds match an independent NUTS
    chain's, where the guide's do not, is tests/test_inference.py's slow test.)"""
    adata = simulate(4, cells_per_condition=100, likelihood="gaussian", seed=0)
    config = RunConfig().replace(model={"likelihood": "gaussian"},
                                 fit={"steps": 1500, "min_steps": 1500, "num_posterior_samples": 200, "refine_warmup": 150})
    run = fit(adata, config=config, refine="nuts", size_factor_key=LIBRARY_SIZE_KEY, progress=False)
    posterior = run.posterior["posterior"]
    assert posterior.attrs["inference"].startswith("SVI + NUTS") and posterior.attrs["nuts_mean_tree_size"] >= 1
    assert 'refine = "nuts"' in posterior.attrs["config"]
    assert posterior["drift"].sizes["draw"] == 200
    # The chain's per-draw statistics, as ArviZ reads them.
    stats = run.posterior["sample_stats"]
    assert stats["diverging"].dims == ("chain", "draw") and stats["diverging"].sizes["draw"] == 200
    assert int(stats["diverging"].sum()) == posterior.attrs["nuts_divergences"]
    assert np.all(stats["tree_size"] >= 1)
    truth = truth_from_uns(adata)["drift"]
    z = ((posterior["drift"].mean(("chain", "draw")) - truth) / posterior["drift"].std(("chain", "draw"))).values
    assert np.all(np.abs(z) < 3.0), f"refined drift mean vs truth, in posterior sds:\n{np.round(z, 2)}"


def test_a_failed_chain_is_discarded_for_the_guide_with_a_warning(monkeypatch):
    """A chain that diverges on most draws has left the fitted region (it happened on a half-perturbed
    screen): the run must keep the guide's draws and say so, not return the chain's."""
    import lcd_bayes.run as run_module

    def failing_chain(model, guide, params, cells, *, num_samples, **kwargs):
        return refine.Refinement(latent={}, divergences=num_samples // 2, mean_tree_size=255.0, seconds=1.0)

    monkeypatch.setattr(run_module, "refine_with_nuts", failing_chain)
    assert_guide_kept_after_failure("nuts", "NUTS refinement failed: 20 of 40 draws diverged", "nuts_refinement")


def assert_guide_kept_after_failure(refinement: str, warning: str, attribute: str):
    """A 4-gene fit whose (patched) refinement fails: it warns, keeps the guide's finite draws and
    records why in ``attribute``."""
    adata = simulate(4, cells_per_condition=50, likelihood="gaussian", seed=0)
    config = RunConfig().replace(model={"likelihood": "gaussian"}, fit={"steps": 200, "num_posterior_samples": 40})
    with pytest.warns(LcdBayesWarning, match=warning):
        run = fit(adata, config=config, refine=refinement, size_factor_key=LIBRARY_SIZE_KEY, progress=False)
    posterior = run.posterior["posterior"]
    assert posterior.attrs["inference"] == "SVI" and posterior.attrs[attribute].startswith("failed")
    assert posterior["drift"].sizes["draw"] == 40 and np.all(np.isfinite(posterior["drift"].values))


class RegressionData(NamedTuple):
    t: jnp.ndarray
    y: jnp.ndarray  # y ~ N(w0 + w1 t, 0.5^2), w ~ N(0, I)


def regression_model(data: RegressionData):
    w = numpyro.sample("w", dist.Normal(jnp.zeros(2), 1.0).to_event(1))
    with numpyro.plate("obs", data.t.shape[0]):
        numpyro.sample("y", dist.Normal(w[0] + w[1] * data.t, 0.5), obs=data.y)


def test_laplace_draws_have_the_exact_covariance_of_a_gaussian_posterior():
    """A Gaussian posterior has the same curvature everywhere, so the Laplace refinement of a
    mean-field guide with the right mean, sds 3x too small and no correlation (the guide's failure
    on the drift, in miniature) must return the exact posterior covariance."""
    rng = np.random.default_rng(1)
    t = rng.normal(2.0, 1.0, 30)  # off-centre: intercept and slope strongly anti-correlated
    data = RegressionData(jnp.asarray(t, jnp.float32), jnp.asarray(0.5 + 0.8 * t + rng.normal(0, 0.5, 30), jnp.float32))
    design = np.column_stack([np.ones(30), t])
    covariance = np.linalg.inv(np.eye(2) + design.T @ design / 0.25)
    mean = covariance @ design.T @ np.asarray(data.y, np.float64) / 0.25
    guide = AutoDiagonalNormal(regression_model)
    numpyro.handlers.seed(guide, 0)(data)
    params = {"auto_loc": jnp.asarray(mean, jnp.float32),
              "auto_scale": jnp.asarray(np.sqrt(np.diag(covariance)) / 3, jnp.float32)}
    result = refine.refine_with_laplace(regression_model, guide, params, data, num_samples=8000,
                                        curvature_floor=0.01, hessian_batch=1, seed_value=0, progress=False)
    w = result.latent["w"]
    assert w.shape == (8000, 2)
    np.testing.assert_allclose(w.mean(0), mean, atol=4 * np.sqrt(np.diag(covariance).max() / 8000))
    np.testing.assert_allclose(w.std(0), np.sqrt(np.diag(covariance)), rtol=0.05)
    exact_correlation = covariance[0, 1] / np.sqrt(covariance[0, 0] * covariance[1, 1])
    assert exact_correlation < -0.8
    assert abs(np.corrcoef(w.T)[0, 1] - exact_correlation) < 0.02
    # In the guide's whitened coordinates the posterior is wider than the guide along the
    # correlated direction (curvature below 1); none negative, none at the floor.
    assert result.n_negative == 0 and result.n_floored == 0 and result.eigenvalues.min() < 0.2


def test_laplace_draws_are_centred_on_the_posterior_when_the_guide_mean_is_off():
    """The guide's mean is biased (on 20 genes by ~0.5 posterior sds on the true edges). For a
    Gaussian posterior the Newton step from it is exact: the draws must be centred on the exact
    posterior mean even when the guide's mean sits 3 guide sds away."""
    rng = np.random.default_rng(2)
    t = rng.normal(2.0, 1.0, 30)
    data = RegressionData(jnp.asarray(t, jnp.float32), jnp.asarray(0.5 + 0.8 * t + rng.normal(0, 0.5, 30), jnp.float32))
    design = np.column_stack([np.ones(30), t])
    covariance = np.linalg.inv(np.eye(2) + design.T @ design / 0.25)
    mean = covariance @ design.T @ np.asarray(data.y, np.float64) / 0.25
    sd = np.sqrt(np.diag(covariance))
    guide = AutoDiagonalNormal(regression_model)
    numpyro.handlers.seed(guide, 0)(data)
    params = {"auto_loc": jnp.asarray(mean + 3 * sd / 2, jnp.float32), "auto_scale": jnp.asarray(sd / 2, jnp.float32)}
    result = refine.refine_with_laplace(regression_model, guide, params, data, num_samples=8000,
                                        curvature_floor=0.01, hessian_batch=1, seed_value=0, progress=False)
    assert result.step_length == 1.0 and result.potential_drop > 0
    np.testing.assert_allclose(result.latent["w"].mean(0), mean, atol=4 * sd.max() / np.sqrt(8000))
    np.testing.assert_allclose(result.latent["w"].std(0), sd, rtol=0.05)


def test_centring_step_backtracks_and_skips_wrongly_curved_directions():
    # A pseudo-Huber valley at e = 3: from 0 the Newton step (to e = 30) overshoots and raises U;
    # halved three times (to 3.75) it lowers U.
    def huber(eps):
        return jnp.sqrt(1.0 + (eps[0] - 3.0) ** 2)

    origin = jnp.zeros(1)
    hessian = jax.hessian(huber)(origin)
    eigenvalues, eigenvectors = jnp.linalg.eigh(hessian)
    step, fraction, drop = refine.centring_step(huber, jax.grad(huber)(origin), eigenvalues, eigenvectors,
                                                jnp.full(1, 0.01))
    assert fraction == 0.125 and drop > 0
    np.testing.assert_allclose(step, [3.75], rtol=1e-4)

    # A mode at e0 = 1 and a direction e1 curved the wrong way: only e0 is stepped along.
    def saddle(eps):
        return 0.5 * (eps[0] - 1.0) ** 2 - 0.05 * eps[1] ** 2 + 0.2 * eps[1]

    origin = jnp.zeros(2)
    eigenvalues, eigenvectors = jnp.linalg.eigh(jax.hessian(saddle)(origin))
    step, fraction, _ = refine.centring_step(saddle, jax.grad(saddle)(origin), eigenvalues, eigenvectors,
                                             jnp.full(2, 0.01))
    assert fraction == 1.0
    np.testing.assert_allclose(step, [1.0, 0.0], atol=1e-6)


class NoData(NamedTuple):
    unused: jnp.ndarray


def ridge_model(data: NoData):
    """a ~ N(0, 2^2) and a likelihood term curving slightly the wrong way at a = pi."""
    a = numpyro.sample("a", dist.Normal(0.0, 2.0))
    numpyro.factor("bump", -(1.01 / 4) * (1 - jnp.cos(a)))


def test_laplace_draws_are_never_wider_than_the_prior():
    """Where the posterior curves the wrong way at the guide's mean (as the horseshoe's funnels, or
    an NB self-decay against its concentration, do), the curvature's magnitude says nothing about
    the spread: the draws must then take the prior's width (sd 2), not the floor's cap (10x the
    guide's 0.5 = 5; a 20-gene NB fit with that cap drew a self-decay over a several-hundred-fold
    range)."""
    data = NoData(jnp.zeros(1))
    guide = AutoDiagonalNormal(ridge_model)
    numpyro.handlers.seed(guide, 0)(data)
    params = {"auto_loc": jnp.array([np.pi], jnp.float32), "auto_scale": jnp.array([0.5], jnp.float32)}
    result = refine.refine_with_laplace(ridge_model, guide, params, data, num_samples=8000, curvature_floor=0.01,
                                        hessian_batch=1, seed_value=0, progress=False)
    assert result.n_negative == 1 and result.n_floored == 1
    np.testing.assert_allclose(result.latent["a"].std(), 2.0, rtol=0.05)


def test_laplace_scales_take_the_curvature_magnitude_and_cap_the_widening():
    scales = np.asarray(refine.laplace_scales(jnp.array([-4.0, -1e-6, 1e-6, 0.25, 1.0, 4.0]), 0.01))
    # Negative curvature (a funnel seen from off its mode) counts by its magnitude; flat directions
    # widen at most 1 / sqrt(floor) = 10x; the rest as 1 / sqrt(h).
    np.testing.assert_allclose(scales, [0.5, 10.0, 10.0, 2.0, 1.0, 0.5], rtol=1e-6)


def test_laplace_refined_fit_is_wider_than_the_guide_and_says_how_it_was_made(capsys):
    """On a 4-gene screen the Laplace refinement must widen the guide's intervals on the direct
    effects (the guide's are too narrow, docs/inference.md) and still cover the simulated drift; the
    run's attributes say what was done. (That its sds match NUTS's is tests/test_inference.py's slow
    test.)"""
    adata = simulate(4, cells_per_condition=100, likelihood="gaussian", seed=0)
    config = RunConfig().replace(model={"likelihood": "gaussian"},
                                 fit={"steps": 1500, "min_steps": 1500, "num_posterior_samples": 400})
    guide_only = fit(adata, config=config, refine="none", size_factor_key=LIBRARY_SIZE_KEY, progress=False)
    _print_fit(guide_only)  # the CLI's summary names the refinements that would calibrate it
    assert "the guide's, too narrow to be calibrated; `--refine laplace` (the default)" in capsys.readouterr().out
    run = fit(adata, config=config, refine="laplace", size_factor_key=LIBRARY_SIZE_KEY, progress=False)
    posterior = run.posterior["posterior"]
    assert posterior.attrs["inference"].startswith("SVI + Laplace")
    assert posterior.attrs["laplace_median_widening"] > 1 and posterior.attrs["laplace_seconds"] > 0
    assert 0 <= posterior.attrs["laplace_newton_step"] <= 1 and posterior.attrs["laplace_potential_drop"] >= 0
    assert 'refine = "laplace"' in posterior.attrs["config"]
    assert posterior["drift"].sizes["draw"] == 400
    # The guide's draws are kept beside the Laplace ones (for predictions): exactly the guide-only fit's.
    np.testing.assert_array_equal(run.posterior["guide_posterior"]["drift"].values,
                                  guide_only.posterior["posterior"]["drift"].values)
    assert "guide_posterior" not in guide_only.posterior.children
    off = ~np.eye(4, dtype=bool)
    ratio = (posterior["drift"].std(("chain", "draw")).values / guide_only.posterior["posterior"]["drift"].std(("chain", "draw")).values)[off]
    assert np.median(ratio) > 1.2, f"Laplace / guide sd of the effects: {np.round(ratio, 2)}"
    truth = truth_from_uns(adata)["drift"]
    z = ((posterior["drift"].mean(("chain", "draw")) - truth) / posterior["drift"].std(("chain", "draw"))).values
    assert np.all(np.abs(z) < 3.0), f"Laplace drift mean vs truth, in posterior sds:\n{np.round(z, 2)}"


def test_bad_laplace_settings_are_refused():
    with pytest.raises(ValueError, match="refine_curvature_floor must be in"):
        RunConfig().replace(fit={"refine_curvature_floor": 0.0})
    with pytest.raises(ValueError, match="refine_hessian_batch must be a positive integer"):
        RunConfig().replace(fit={"refine_hessian_batch": 0})


def test_a_failed_laplace_step_keeps_the_guide_with_a_warning(monkeypatch):
    """A non-finite Hessian must not lose the fit: the run keeps the guide's draws and says why."""
    import lcd_bayes.run as run_module

    def failing_laplace(*args, **kwargs):
        raise FloatingPointError("the Hessian of the posterior at the guide's mean is not finite")

    monkeypatch.setattr(run_module, "refine_with_laplace", failing_laplace)
    assert_guide_kept_after_failure("laplace", "Laplace refinement failed", "laplace_refinement")
