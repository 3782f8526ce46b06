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
