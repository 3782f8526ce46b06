"""The fit end to end on tiny problems: run folder, reproducibility, resume, failures."""
import dataclasses
import json

import numpy as np
import pytest
import xarray as xr

import lcd_bayes.fit as fit_module
from lcd_bayes.config import FitConfig, RunConfig
from lcd_bayes.fit import FitError
from lcd_bayes.run import fit, load_run
from lcd_bayes.simulate import simulate

# The SVI loop's plumbing (no refinement: the default one is tested in test_cli and test_recovery).
TINY = RunConfig().replace(
    fit={"steps": 120, "steps_per_chunk": 20, "checkpoint_every": 20, "num_posterior_samples": 50,
         "min_steps": 120, "batch_size": 64, "refine": "none"},
    model={"n_doublings": 12},
)


@pytest.fixture(scope="module")
def tiny_counts():
    return simulate(5, cells_per_condition=30, likelihood="nb", seed=3)


def test_run_folder_holds_a_readable_posterior(tiny_counts, tmp_path):
    run = fit(tiny_counts, tmp_path / "run", config=TINY, progress=False)
    folder = tmp_path / "run"
    for name in ("config.toml", "data.json", "elbo.csv", "posterior.nc", "params.pkl", "summary.txt"):
        assert (folder / name).exists(), name
    assert not (folder / "checkpoint.pkl").exists()  # removed once the fit is complete

    tree = xr.open_datatree(folder / "posterior.nc", engine="h5netcdf")
    posterior = tree["posterior"]
    genes = [f"G{i}" for i in range(5)]
    assert posterior["interaction"].dims == ("chain", "draw", "source", "target")
    assert list(posterior["source"].values) == genes and list(posterior["target"].values) == genes
    assert posterior["shift"].dims == ("chain", "draw", "perturbation", "gene")
    assert list(posterior["perturbation"].values) == genes
    assert posterior.sizes["draw"] == 50
    assert posterior["stationary_mean"].sizes["condition"] == 6
    # The direct effect of j on k is A[k, j]: one orientation everywhere.
    interaction = posterior["interaction"].values[0, 0]
    drift = posterior["drift"].values[0, 0]
    np.testing.assert_allclose(interaction[1, 3], drift[3, 1])
    assert np.all(np.diag(interaction) == 0)
    assert tree["svi"]["loss"].size == 120
    tree.close()

    loaded, config, record = load_run(folder)
    assert config == TINY
    assert record["conditions"][0] == "ctrl" and record["genes"] == genes
    assert run.posterior["posterior"]["interaction"].shape == loaded["posterior"]["interaction"].shape


def test_same_seed_same_result_and_other_seed_differs(tiny_counts):
    first = fit(tiny_counts, config=TINY, progress=False)
    again = fit(tiny_counts, config=TINY, progress=False)
    other = fit(tiny_counts, config=TINY, seed=1, progress=False)
    np.testing.assert_array_equal(first.fit.losses, again.fit.losses)
    a = first.posterior["posterior"]["interaction"].values
    np.testing.assert_array_equal(a, again.posterior["posterior"]["interaction"].values)
    assert not np.array_equal(a, other.posterior["posterior"]["interaction"].values)


def test_interrupted_fit_resumes_to_the_same_result(tiny_counts, tmp_path, monkeypatch):
    uninterrupted = fit(tiny_counts, config=TINY, progress=False)

    class InterruptAfterTwoChunks(fit_module.tqdm):
        updates = 0

        def update(self, n=1):
            super().update(n)
            InterruptAfterTwoChunks.updates += 1
            if InterruptAfterTwoChunks.updates == 2:
                raise KeyboardInterrupt

    monkeypatch.setattr(fit_module, "tqdm", InterruptAfterTwoChunks)
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_counts, tmp_path / "run", config=TINY, progress=False)
    assert (tmp_path / "run" / "checkpoint.pkl").exists()
    assert not (tmp_path / "run" / "posterior.nc").exists()

    resumed = fit(tiny_counts, tmp_path / "run", config=TINY, progress=False)
    np.testing.assert_allclose(resumed.fit.losses, uninterrupted.fit.losses, rtol=1e-6)
    np.testing.assert_allclose(
        resumed.posterior["posterior"]["interaction"].values,
        uninterrupted.posterior["posterior"]["interaction"].values, rtol=1e-5, atol=1e-6,
    )


def test_checkpoint_of_other_settings_is_refused(tiny_counts, tmp_path, monkeypatch):
    class InterruptAtOnce(fit_module.tqdm):
        def update(self, n=1):
            raise KeyboardInterrupt

    monkeypatch.setattr(fit_module, "tqdm", InterruptAtOnce)
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_counts, tmp_path / "run", config=TINY, progress=False)
    monkeypatch.undo()
    with pytest.raises(FitError, match="other data or settings"):
        fit(tiny_counts, tmp_path / "run", config=TINY, seed=7, progress=False)


def test_finished_run_is_not_overwritten(tiny_counts, tmp_path):
    fit(tiny_counts, tmp_path / "run", config=TINY, progress=False)
    with pytest.raises(FileExistsError, match="already holds a finished fit"):
        fit(tiny_counts, tmp_path / "run", config=TINY, progress=False)


def test_non_finite_elbo_stops_with_a_clear_message(tiny_counts, tmp_path):
    explosive = TINY.replace(fit={"learning_rate": 1e12, "clip_norm": 1e30, "warmup_steps": 1})
    with pytest.raises(FitError, match="non-finite"):
        fit(tiny_counts, tmp_path / "run", config=explosive, progress=False)
    assert (tmp_path / "run" / "checkpoint.pkl").exists()  # the last finite state is kept


def test_convergence_check_stops_early_on_a_flat_elbo():
    rng = np.random.default_rng(0)
    flat = 1000 + rng.normal(0, 1, 1000)
    falling = np.linspace(2000, 1000, 1000) + rng.normal(0, 1, 1000)
    spiky = flat.copy()
    spiky[-5:] = 1e7  # a few stray steps must not end (or prolong) the fit
    assert fit_module.has_converged(flat, window=200, tol=1e-3)
    assert fit_module.has_converged(spiky, window=200, tol=1e-3)
    assert not fit_module.has_converged(falling, window=200, tol=1e-3)
    assert not fit_module.has_converged(flat[:300], window=200, tol=1e-3)  # too short to judge


def test_a_flat_elbo_ends_the_fit_only_once_the_learning_rate_has_annealed():
    flat = 1000 + np.random.default_rng(0).normal(0, 1, 1500)
    settings = FitConfig(min_steps=1000, convergence_window=200, convergence_tol=1e-3)
    # At step 1500 of 6000 the cosine schedule is still near its peak: keep going.
    assert not fit_module.may_stop_early(flat, dataclasses.replace(settings, steps=6000))
    # At step 1500 of 1600 it has decayed to a few percent of the peak: stop.
    assert fit_module.may_stop_early(flat, dataclasses.replace(settings, steps=1600))
    assert not fit_module.may_stop_early(flat, dataclasses.replace(settings, steps=1600, min_steps=1550))


@pytest.mark.parametrize("likelihood", ["zip", "poisson", "gaussian"])
def test_every_likelihood_fits(likelihood):
    adata = simulate(4, cells_per_condition=20, likelihood="gaussian" if likelihood == "gaussian" else "nb", seed=1)
    run = fit(adata, config=TINY.replace(fit={"steps": 40, "min_steps": 40}), likelihood=likelihood, progress=False)
    assert np.all(np.isfinite(run.fit.losses))
    assert run.config.model.likelihood == likelihood
    noise = {"zip": "gate", "poisson": "gene_scale", "gaussian": "noise_sd"}[likelihood]
    assert noise in run.posterior["posterior"]


def test_shipped_config_is_the_default():
    from lcd_bayes.config import load_config

    assert load_config("models/lcd_linear.toml") == RunConfig()


def test_stability_warning_names_the_remedy_of_the_scheme():
    from lcd_bayes.run import _warn_unstable

    at_limit = np.zeros(10)  # log spectral radius 0: every draw projected
    with pytest.warns(UserWarning, match="100.0% of posterior drift draws.*max_spectral_radius closer to 1"):
        _warn_unstable(at_limit, RunConfig())
    with pytest.warns(UserWarning, match=r"smaller \[model\] dt"):
        _warn_unstable(at_limit, RunConfig().replace(model={"scheme": "euler"}))
