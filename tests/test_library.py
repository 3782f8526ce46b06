"""Library sizes: observed, or integrated out per cell when they are only a small panel's totals.

On a panel of a few dozen genes each cell's total moves with its perturbation and its own state;
dividing by it puts compositional effects into every gene. ``[model] library = "auto"`` integrates
the library out there (``docs/model.md``, "Library sizes").
"""
import numpy as np
import pytest

from lcd_bayes.config import LATENT_LIBRARY_MAX_GENES, ModelConfig, RunConfig, load_config
from lcd_bayes.io.screen import load_perturbation_data
from lcd_bayes.run import fit, library_summary
from lcd_bayes.sim.linear import LIBRARY_SIZE_KEY, simulate

TINY = RunConfig().replace(
    fit={"steps": 60, "steps_per_chunk": 20, "num_posterior_samples": 20, "min_steps": 60, "batch_size": 64,
         "refine": "none", "ppc": False, "log_likelihood": False},
    model={"n_doublings": 12},
)


def test_auto_integrates_out_only_a_small_panels_totals():
    auto = ModelConfig()
    assert auto.resolved_library(12) == "latent"
    assert auto.resolved_library(LATENT_LIBRARY_MAX_GENES) == "latent"
    assert auto.resolved_library(LATENT_LIBRARY_MAX_GENES + 1) == "observed"  # a transcriptome's totals
    assert auto.resolved_library(None) == "observed"  # library sizes given in an obs column
    assert ModelConfig(likelihood="gaussian").resolved_library(12) == "observed"
    assert ModelConfig(library="observed").resolved_library(12) == "observed"
    assert ModelConfig(library="latent").resolved_library(None) == "latent"
    with pytest.raises(ValueError, match=r"\[model\] library must be one of"):
        ModelConfig(library="estimated")


def test_the_screen_says_how_many_genes_its_size_factors_summed():
    adata = simulate(5, cells_per_condition=20, likelihood="nb", seed=0)
    panel = load_perturbation_data(adata, genes=list(adata.var_names[:3]))
    assert panel.library_genes == 5
    told = load_perturbation_data(adata, size_factor_key=LIBRARY_SIZE_KEY)
    assert told.library_genes is None
    # What the fit prints about them.
    assert library_summary(panel, "latent") == ("library sizes: latent, integrated out per cell (started from each "
                                                 "cell's total over the matrix's 5 genes; [model] library)")
    assert library_summary(told, "observed") == "library sizes: from an obs column"


@pytest.mark.slow  # two small fits and a prediction: ~40 s
def test_a_small_panel_fit_integrates_the_libraries_out_and_predicts_with_them(tmp_path):
    adata = simulate(4, cells_per_condition=30, likelihood="nb", seed=2)
    run = fit(adata, tmp_path / "run", config=TINY, progress=False)
    assert run.config.model.library == "latent"
    assert load_config(tmp_path / "run" / "config.toml").model.library == "latent"  # repeats the fit
    library_sd = run.posterior["posterior"]["library_sd"].values
    assert np.all(np.isfinite(library_sd)) and np.all(library_sd > 0)

    from lcd_bayes.analysis.predict import predict

    cells = predict(tmp_path / "run", ["G0"], n_cells=400, n_draws=20, seed=0)
    spread = np.std(np.log(cells.obs["size_factor"].to_numpy()))
    assert spread == pytest.approx(float(np.median(library_sd)), rel=0.2)

    told = fit(adata, tmp_path / "told", config=TINY, size_factor_key=LIBRARY_SIZE_KEY, progress=False)
    assert told.config.model.library == "observed" and "library_sd" not in told.posterior["posterior"]
