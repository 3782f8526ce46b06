"""Correctness of inference: on a tiny problem (4 genes) SVI's posterior agrees with NUTS.

Both samplers run on the *same* NumPyro program, ``lcd_model`` with the gaussian likelihood (the
per-cell state integrated out), the same data and the same model configuration; NUTS is the
reference. The quantities compared are the ones users read off a fit: the off-diagonal
``interaction`` entries (direct effects), ``self_decay`` and ``stationary_mean``.

Cost. The regularized-horseshoe prior on the interactions gives the posterior a narrow curved
ridge (the global ``interaction_scale`` and the slab trade off against the local scales and raw
weights of all twelve effects), so NUTS adapts a step size of ~0.003 and runs every trajectory to
the maximum tree depth: 1023 leapfrog steps per draw at ~0.14 ms each on CPU, whatever the number
of cells. A short single chain (100 warmup + 100 draws, ~40 s) is what fits the time budget; the
tolerances below allow for its Monte Carlo error, measured against a long chain. (It relies on
conftest's OPENBLAS_NUM_THREADS=1: with threaded OpenBLAS on a busy machine jaxlib's tiny LAPACK
calls, e.g. the likelihood's triangular solve, took ~9 ms instead of ~0.02 ms, 100x slower NUTS.)
"""
from __future__ import annotations

import functools
import time

import jax
import numpy as np
import pytest
from numpyro.infer import MCMC, NUTS
from numpyro.infer.initialization import init_to_median

from lcd_bayes.config import RunConfig
from lcd_bayes.inference.posterior import derive_globals, draw_globals
from lcd_bayes.inference.refine import refine_with_laplace, refine_with_nuts
from lcd_bayes.inference.svi import fit_svi, program
from lcd_bayes.io.screen import load_perturbation_data
from lcd_bayes.model.program import CellBatch, as_jax, lcd_model
from lcd_bayes.run import structure_of
from lcd_bayes.sim.linear import simulate, truth_from_uns

pytestmark = pytest.mark.slow

N_GENES = 4
CELLS_PER_CONDITION = 100
DATA_SEED = 0
# The same model for both fits. A coarser stationary solver than the default keeps NUTS cheap:
# 2**12 steps of dt = 0.02 cover 82 time units, far beyond the slowest relaxation (rate ~1).
MODEL = {"likelihood": "gaussian", "dt": 0.02, "n_doublings": 12}
# SVI: mean-field and row-block guides (the svi fixture runs both), full batch (batch_size > cells), a fixed number of steps.
# min_steps = steps switches off fit_svi's early convergence stop: on this problem it fired at
# 2750 steps with the loss at 1168 against 1042 after 5000 steps (at 2100 steps with the default
# final_lr_fraction), while the loss still fell ~10 per 500 steps: too early for the posterior to
# agree with NUTS. The lower final learning rate steadies the stationary means, which the data
# pin to ~0.05.
FIT = {
    "steps": 5000, "min_steps": 5000, "learning_rate": 0.05, "final_lr_fraction": 0.01,
    "batch_size": 10**6, "guide": "mean_field", "seed": 0, "num_posterior_samples": 1000,
}
NUTS_WARMUP, NUTS_SAMPLES, NUTS_SEED = 100, 100, 0


# --- the problem and the two posteriors ------------------------------------------------------------

@pytest.fixture(scope="module")
def problem():
    adata = simulate(N_GENES, cells_per_condition=CELLS_PER_CONDITION, likelihood="gaussian", seed=DATA_SEED)
    data = load_perturbation_data(adata, continuous=True)
    config = RunConfig().replace(model=MODEL, fit=FIT)
    structure = structure_of(data, config)
    cells = CellBatch(data.counts, data.size_factor, data.condition)
    assert data.n_genes == N_GENES and data.targets.sum() == N_GENES  # every gene perturbed once
    return {"truth": truth_from_uns(adata), "data": data, "config": config, "structure": structure,
            "cells": cells}


@pytest.fixture(scope="module")
def nuts(problem):
    model = functools.partial(lcd_model, structure=problem["structure"], config=problem["config"].model)
    cells = as_jax(problem["cells"])
    mcmc = MCMC(NUTS(model, init_strategy=init_to_median), num_warmup=NUTS_WARMUP,
                num_samples=NUTS_SAMPLES, num_chains=1, progress_bar=False)
    start = time.perf_counter()
    mcmc.run(jax.random.PRNGKey(NUTS_SEED), cells, extra_fields=("diverging", "num_steps"))
    samples = {k: np.asarray(v) for k, v in mcmc.get_samples().items()}  # deterministic sites too
    extra = {k: np.asarray(v) for k, v in mcmc.get_extra_fields().items()}
    print(f"NUTS: {time.perf_counter() - start:.1f} s, {int(extra['diverging'].sum())} divergences, "
          f"{extra['num_steps'].mean():.0f} leapfrog steps per draw")
    return samples, extra


@pytest.fixture(scope="module", params=["mean_field", "row_block"])
def svi(problem, request):
    config = problem["config"].replace(fit={"guide": request.param})
    start = time.perf_counter()
    result, inference = fit_svi(problem["cells"], problem["structure"], config, progress=False)
    draws = draw_globals(inference.guide, result.params, problem["structure"], config.model,
                         num_samples=config.fit.num_posterior_samples, seed_value=config.fit.seed + 1)
    print(f"SVI: {time.perf_counter() - start:.1f} s, {result.losses.size} steps, "
          f"final loss {result.losses[-200:].mean():.1f}")
    return result, draws


@pytest.fixture(scope="module")
def row_block_fit(problem):
    config = problem["config"].replace(fit={"guide": "row_block"})
    result, inference = fit_svi(problem["cells"], problem["structure"], config, progress=False)
    return config, result, inference


@pytest.fixture(scope="module")
def refined(problem, row_block_fit):
    """The row-block fit, refined by a NUTS chain whitened by it (``[fit] refine = "nuts"``), with
    its own chain key so that it is not a copy of the reference chain."""
    config, result, inference = row_block_fit
    refinement = refine_with_nuts(program(problem["structure"], config, minibatch=False), inference.guide,
                                  result.params, problem["cells"], num_warmup=200, num_samples=400,
                                  max_tree_depth=8, seed_value=7, progress=False)
    print(f"refinement: {refinement.seconds:.1f} s, {refinement.divergences} divergences, "
          f"{refinement.mean_tree_size:.0f} leapfrog steps per draw")
    return derive_globals(refinement.latent, problem["structure"], config.model)


@pytest.fixture(scope="module")
def laplace(problem, row_block_fit):
    """The row-block fit, refined by the Laplace approximation at its mean (``[fit] refine = "laplace"``)."""
    config, result, inference = row_block_fit
    refinement = refine_with_laplace(program(problem["structure"], config, minibatch=False), inference.guide,
                                     result.params, problem["cells"], num_samples=1000,
                                     curvature_floor=config.fit.refine_curvature_floor, hessian_batch=16,
                                     seed_value=7, progress=False)
    print(f"Laplace: {refinement.seconds:.1f} s, {refinement.n_negative} negative curvatures, "
          f"{refinement.n_floored} at the floor, gradient norm {refinement.gradient_norm:.2f}")
    return derive_globals(refinement.latent, problem["structure"], config.model)


def _quantities(drift: np.ndarray, stationary_mean: np.ndarray) -> dict[str, np.ndarray]:
    """Per-draw quantities users read off a fit, flattened: from the drift A (draws, target, source)."""
    off_diagonal = ~np.eye(drift.shape[-1], dtype=bool)
    interaction = np.swapaxes(drift, 1, 2)  # (draws, source, target): effect of source on target
    return {
        "interaction": interaction[:, off_diagonal],
        "self_decay": -np.diagonal(drift, axis1=1, axis2=2),
        "stationary_mean": stationary_mean.reshape(len(stationary_mean), -1),
    }


# Tolerances, in units of the NUTS posterior sd of each entry: every |mean_SVI - mean_NUTS| / sd_NUTS
# at most max_abs_z and their median at most median_abs_z; every sd_SVI / sd_NUTS inside sd_ratio and
# their median inside median_sd_ratio. What was measured (this data set and model configuration):
# * SVI (mean-field, 4000-10000 steps, seeds 0-2) against a long NUTS chain (1000 warmup + 2000
#   draws, 3% divergent, ESS 400-1100 for the drift entries):
#     interaction, self_decay: |z| <= 0.58, sd ratio 0.44-0.79 (median 0.54-0.64). Mean-field SVI
#       finds the posterior means but underestimates the sds by ~40%, as mean-field does; a
#       low-rank guide narrows that only a little (rank 10: 0.49-0.78, full rank: 0.58-0.85).
#     stationary_mean: |z| <= 1.9, sd ratio 0.46-3.6 (median ~2.1). The data pin the condition
#       means to ~0.05 through tight correlations among drift, basal and shift parameters that a
#       factorized guide cannot hold, so its means of the perturbed conditions are 2-3x too
#       uncertain (and their location moves with the optimizer's last steps).
# * This test's short chain against the long one: |z| <= 0.37, sd ratio 0.70-1.79 (NUTS keys
#   0-2). Row 0 of the drift has a heavy tail (1% quantile of A[0, 0]: -9.7, median -5.9); a
#   short chain that visits it (key 2) inflates those sds 1.8x, one that does not shrinks them.
# * This test's configuration (NUTS keys 0-2 x SVI seeds 0-2): interaction and self_decay
#   |z| <= 0.83 (median <= 0.51), sd ratio 0.28-0.90 (median 0.55-0.76); stationary_mean
#   |z| <= 1.20 (median <= 0.42), sd ratio 0.42-3.30 (median 2.0-2.2). With the seeds below:
#   interaction and self_decay |z| <= 0.37 (median <= 0.29), sd ratio 0.44-0.83; stationary_mean
#   |z| <= 0.84 (median 0.38), sd ratio 0.51-3.30.
# * The row-block guide (one full covariance per row of R), same seeds: interaction |z| <= 0.47
#   (median 0.26), sd ratio 0.48-0.89 (median 0.68, mean-field 0.63); self_decay sd ratio median
#   0.72; stationary_mean |z| <= 0.41, sd ratio 0.51-2.96.
# The bounds add a margin to these (other platforms' floating point gives other chains), and
# still reject: SVI run for only 50 or 500 steps (interaction |z| 11 and 9.5), SVI stopped by
# fit_svi's early convergence check (at 2750 steps; interaction |z| 1.45, median 0.84,
# stationary_mean |z| 4.2), SVI of the model with sigma = 1.2 instead of 1 (|z| 5.1), and a
# transposed drift (|z| 30).
TOLERANCES = {
    "interaction": {"max_abs_z": 1.25, "median_abs_z": 0.75, "sd_ratio": (0.2, 1.3), "median_sd_ratio": (0.4, 1.0)},
    "self_decay": {"max_abs_z": 1.25, "median_abs_z": 0.75, "sd_ratio": (0.2, 1.3), "median_sd_ratio": (0.4, 1.0)},
    "stationary_mean": {"max_abs_z": 3.0, "median_abs_z": 1.0, "sd_ratio": (0.25, 4.5), "median_sd_ratio": (0.5, 3.0)},
}


def compare(reference: dict[str, np.ndarray], approx: dict[str, np.ndarray]) -> tuple[dict, list[str]]:
    """Per quantity: standardized mean differences and sd ratios, and the tolerances they break."""
    report, failures = {}, []
    for name, tol in TOLERANCES.items():
        sd = reference[name].std(0)
        z = (approx[name].mean(0) - reference[name].mean(0)) / sd
        ratio = approx[name].std(0) / sd
        report[name] = (z, ratio)
        abs_z = np.abs(z)
        checks = {
            f"max |z| <= {tol['max_abs_z']}": abs_z.max() <= tol["max_abs_z"],
            f"median |z| <= {tol['median_abs_z']}": np.median(abs_z) <= tol["median_abs_z"],
            f"sd ratios in {tol['sd_ratio']}": np.all((ratio >= tol["sd_ratio"][0]) & (ratio <= tol["sd_ratio"][1])),
            f"median sd ratio in {tol['median_sd_ratio']}":
                tol["median_sd_ratio"][0] <= np.median(ratio) <= tol["median_sd_ratio"][1],
        }
        for what, ok in checks.items():
            if not ok:
                failures.append(f"{name}: {what} fails; z = {np.round(z, 2)}, sd ratio = {np.round(ratio, 2)}")
    return report, failures


# --- tests -----------------------------------------------------------------------------------------

def test_nuts_reference_is_sane(problem, nuts):
    samples, extra = nuts
    truth = problem["truth"]
    n_draws = samples["drift"].shape[0]
    assert n_draws == NUTS_SAMPLES
    assert np.all(np.isfinite(samples["drift"])) and np.all(np.isfinite(samples["stationary_mean"]))
    # The long chain diverged on 3% of its draws (the horseshoe's funnel), this one on none.
    assert extra["diverging"].sum() <= 0.1 * n_draws, "NUTS diverged often: the reference is unreliable"
    # Every draw has a stationary state (none was projected onto the stable set).
    assert np.all(samples["log_spectral_radius"] < np.log(problem["config"].model.max_spectral_radius))

    # The posterior covers the simulated truth. The drift's overall scale is seen only through the
    # covariance (and the model discretizes the simulator's SDE), so it is loose: the posterior
    # mean sits up to 1.5 sd (2.1 sd with NUTS key 1) from the truth, 20-30% larger in magnitude.
    mean, sd = samples["drift"].mean(0), samples["drift"].std(0)
    z = (mean - truth["drift"]) / sd
    assert np.all(np.abs(z) < 3.0), f"NUTS drift mean vs truth, in posterior sd:\n{np.round(z, 2)}"
    off_diagonal = ~np.eye(N_GENES, dtype=bool)
    assert np.all(np.sign(mean[off_diagonal]) == np.sign(truth["drift"][off_diagonal]))
    # The condition means are pinned by 100 cells each (standard error ~0.035).
    np.testing.assert_allclose(samples["stationary_mean"].mean(0), truth["condition_mean"], atol=0.2)


def test_svi_posterior_agrees_with_nuts(nuts, svi):
    samples, _ = nuts
    result, draws = svi
    assert result.losses.size == FIT["steps"] and np.all(np.isfinite(result.losses))
    reference = _quantities(samples["drift"], samples["stationary_mean"])
    approx = _quantities(draws["drift"], draws["stationary_mean"])
    # draw_globals' own interaction and self_decay are the drift's, in the documented orientation.
    np.testing.assert_allclose(approx["interaction"], draws["interaction"][:, ~np.eye(N_GENES, dtype=bool)])
    np.testing.assert_allclose(approx["self_decay"], draws["self_decay"], rtol=1e-5)

    report, failures = compare(reference, approx)
    for name, (z, ratio) in report.items():
        print(f"{name:16s} |mean diff|/sd_NUTS max {np.abs(z).max():.2f} median {np.median(np.abs(z)):.2f}; "
              f"sd_SVI/sd_NUTS in [{ratio.min():.2f}, {ratio.max():.2f}] median {np.median(ratio):.2f}")
    assert not failures, "SVI disagrees with NUTS:\n" + "\n".join(failures)


# The NUTS refinement must give NUTS's own widths (up to the short chains' Monte Carlo error). The
# Laplace approximation (centred by a damped Newton step from the guide's mean) is a local one, and
# conservative on this 4-gene problem, where the horseshoe's funnels are least pinned by data: its
# widths depend on where SVI stopped (which curvatures are negative and floored). Medians of the sd
# ratios (interaction / self_decay), key 7, SVI seeds 0, 1, 2: 1.61 / 1.51, 1.85 / 1.87,
# 1.42 / 1.27 (commit 4318483; an earlier rounding of the same seed-0 fit gave 1.40 / 1.37); means
# a median 0.11-0.37 sds off. On 20 genes its intervals are slightly narrower than NUTS's
# (docs/inference.md). What is asserted is that it never falls back toward the guide's widths
# (median 0.68-0.80), nor inflates them past the widest measured by a margin.
@pytest.mark.parametrize("refinement, median_sd_ratio", [("refined", (0.8, 1.25)), ("laplace", (0.95, 2.2))])
def test_refined_posterior_has_the_widths_of_nuts(nuts, refinement, median_sd_ratio, request):
    """The guide's effect sds are 0.48-0.89 of NUTS's (median 0.68); after a refinement (the NUTS
    chain whitened by the guide, or the Laplace approximation at the guide's mean) they must be
    NUTS's, within ``median_sd_ratio``."""
    samples, _ = nuts
    refined = request.getfixturevalue(refinement)
    reference = _quantities(samples["drift"], samples["stationary_mean"])
    approx = _quantities(refined["drift"], refined["stationary_mean"])
    for name in ("interaction", "self_decay"):
        sd = reference[name].std(0)
        z = (approx[name].mean(0) - reference[name].mean(0)) / sd
        ratio = approx[name].std(0) / sd
        print(f"{name:16s} |z| max {np.abs(z).max():.2f} median {np.median(np.abs(z)):.2f}; "
              f"sd ratio [{ratio.min():.2f}, {ratio.max():.2f}] median {np.median(ratio):.2f}")
        assert np.median(np.abs(z)) <= 0.5, f"{name}: refined means off NUTS's by |z| {np.round(z, 2)}"
        low, high = median_sd_ratio
        assert low <= np.median(ratio) <= high, f"{name}: refined / NUTS sd ratios {np.round(ratio, 2)}"
