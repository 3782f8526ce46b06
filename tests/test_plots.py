"""The run report: every figure is written, from a run folder that has no CLIPR result yet."""
import numpy as np
import pytest

from lcd_bayes.config import RunConfig
from lcd_bayes.plots import plot_elbo, report_run
from lcd_bayes.run import fit
from lcd_bayes.simulate import simulate

TINY = RunConfig().replace(
    fit={"steps": 60, "steps_per_chunk": 20, "checkpoint_every": 20, "num_posterior_samples": 30,
         "min_steps": 60, "batch_size": 64},
    model={"n_doublings": 12},
)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report") / "run"
    adata = simulate(4, cells_per_condition=20, likelihood="gaussian", seed=0)
    fit(adata, folder, config=TINY, likelihood="gaussian", progress=False)
    return folder


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
        fig = plot_elbo(elbo)
        assert fig.axes[0].get_yscale() == ("log" if elbo[-1] < 0 else "linear")
