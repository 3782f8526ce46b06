"""Recovery of known causal edges from simulated screens (design section 7 protocol, d = 20,
every gene perturbed once, 200 cells per condition), with the shipped default model."""
import pytest

from lcd_bayes.run import fit
from lcd_bayes.simulate import simulate, truth_from_uns
from lcd_bayes.summary import recovery_against_truth


# Measured with the default model: gaussian AUROC 1.00 (seed 0); nb 0.868 (seed 0) and 0.879
# (seed 1), with 6000 or 12000 steps, full batch, a low-rank or a per-cell-scaled local guide
# alike. The target for nb counts is 0.90 and is NOT reached yet; this bound guards what is.
@pytest.mark.slow
@pytest.mark.parametrize("likelihood, threshold", [("gaussian", 0.95), ("nb", 0.85)])
def test_posterior_drift_ranks_true_edges(likelihood, threshold):
    adata = simulate(20, cells_per_condition=200, likelihood=likelihood, seed=0)
    run = fit(adata, likelihood=likelihood, seed=0, progress=False)
    scores = recovery_against_truth(run.posterior, truth_from_uns(adata)["effect"])
    assert scores["auroc"] >= threshold, scores
    assert scores["sign_accuracy"] >= 0.9, scores
