"""Calibration score: the fraction of true effects inside the posterior's credible intervals."""
import numpy as np
import xarray as xr

from lcd_bayes.analysis.recovery import interval_coverage


def test_interval_coverage_counts_the_true_effects_inside_the_hdi_of_the_selected_pairs():
    draws = np.random.default_rng(0).standard_normal((1, 4000, 3, 3))  # every pair's posterior: N(0, 1)
    effect = xr.DataArray(draws, dims=("chain", "draw", "source", "target"))
    truth = np.array([[0.0, 0.2, 3.0],
                      [0.5, 0.0, 1.0],
                      [-0.3, -2.0, 0.0]])
    off = ~np.eye(3, dtype=bool)
    # 50% HDI of N(0, 1) is about +-0.67: 0.2, 0.5, -0.3 inside; 3.0, 1.0, -2.0 outside.
    assert interval_coverage(effect, truth, 0.5, off) == 0.5
    # 90% HDI is about +-1.64: only 3.0 and -2.0 outside.
    assert np.isclose(interval_coverage(effect, truth, 0.9, off), 4 / 6)
    assert interval_coverage(effect, truth, 0.9, off & (np.abs(truth) > 1.5)) == 0.0
