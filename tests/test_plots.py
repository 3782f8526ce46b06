"""The run report: every figure is written, from a run folder that has no CLIPR result yet."""
import numpy as np
import pytest
from matplotlib.figure import Figure

from lcd_bayes.pl import plot_elbo, report_run


def test_report_writes_four_figures_and_computes_clipr_first(tiny_run):
    assert not (tiny_run / "clipr.nc").exists()
    paths = report_run(tiny_run, prob_threshold=0.5, top=5)
    assert [p.name for p in paths] == ["elbo.png", "edge_heatmap.png", "forest.png", "network.png"]
    for path in paths:
        assert path.parent == tiny_run and path.stat().st_size > 1000
    assert (tiny_run / "clipr.nc").exists() and (tiny_run / "edges.csv").exists()
    # A threshold no edge reaches still gives a (labelled, empty) network.
    assert report_run(tiny_run, prob_threshold=1.01)[-1].stat().st_size > 1000


def test_elbo_trace_on_both_signs():
    steps = np.arange(200)
    for elbo in (-1e4 * np.exp(-steps / 30) - 50, 1e4 * (1 - np.exp(-steps / 30)) + 50):
        ax = Figure().add_subplot()
        assert plot_elbo(elbo, ax=ax) is ax
        assert ax.get_yscale() == ("log" if elbo[-1] < 0 else "linear")
