"""Test configuration: force the CPU, float32, and fixed seeds (CI has no accelerator)."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("MPLBACKEND", "Agg")
# The tests' matrices are tiny: one BLAS thread avoids oversubscribing the 2 cores, which made
# LAPACK calls (Cholesky, QR) hundreds of times slower under load.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def perturbench_path():
    """The real development dataset beside the repo; tests using it skip cleanly without it."""
    path = SHARED_DATA / "perturbench_devel.h5ad"
    if not path.exists():
        pytest.skip(f"development data not found at {path}")
    return path


@pytest.fixture(scope="session")
def _tiny_gaussian_run_once(tmp_path_factory):
    """One tiny finished fit (4 genes, gaussian), made once per session."""
    from lcd_bayes.config import RunConfig
    from lcd_bayes.run import fit
    from lcd_bayes.sim.linear import simulate

    config = RunConfig().replace(
        fit={"steps": 60, "steps_per_chunk": 20, "checkpoint_every": 20, "num_posterior_samples": 30,
             "min_steps": 60, "batch_size": 64},
        model={"n_doublings": 12},
    )
    folder = tmp_path_factory.mktemp("tiny") / "run"
    fit(simulate(4, cells_per_condition=20, likelihood="gaussian", seed=0), folder, config=config,
        likelihood="gaussian", progress=False)
    return folder


@pytest.fixture(scope="module")
def tiny_run(_tiny_gaussian_run_once, tmp_path_factory):
    """A private copy of the tiny finished run folder, for tests that write into it."""
    import shutil

    return Path(shutil.copytree(_tiny_gaussian_run_once, tmp_path_factory.mktemp("copy") / "run"))
