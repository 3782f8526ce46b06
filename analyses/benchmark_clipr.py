"""Memory and time of CLIPR on many genes: is the posterior over effects usable at 1,000 genes?

For d in {100, 300, 1000} this builds a posterior of ``--draws`` linear drift draws (a sparse random
stable drift per draw, every gene perturbed once, as a fit would store it), runs
``clipr.posterior_effects`` (chunked over draws) and ``edge_summary``, each d in a fresh
subprocess, and records wall time and the peak resident memory of the process. It also states the
sizes the run folder's files would have at that d.

Writes ``results/benchmark_clipr.json``. Run: ``uv run python analyses/benchmark_clipr.py``.
Timings on a shared 2-core machine are noisy: compare ratios, not single runs.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from lcd_bayes.files import write_json

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the CLI: BLAS threads fight XLA's


def posterior_tree(n_genes: int, n_draws: int, seed: int):
    """A DataTree shaped like a fitted run's posterior (only what CLIPR reads)."""
    import numpy as np
    import xarray as xr

    rng = np.random.default_rng(seed)
    genes = [f"g{i}" for i in range(n_genes)]
    mask = rng.random((n_genes, n_genes)) < 10 / n_genes
    np.fill_diagonal(mask, False)
    base = mask * rng.uniform(0.1, 0.3, (n_genes, n_genes)) * rng.choice([-1, 1], (n_genes, n_genes))
    decay = 2.0 + np.abs(base).sum(axis=1)  # diagonally dominant: stable
    drift = base[None] * (1 + 0.1 * rng.standard_normal((n_draws, n_genes, n_genes))) - np.diag(decay)[None]
    shift = np.zeros((n_draws, n_genes, n_genes), np.float32)
    shift[:, np.arange(n_genes), np.arange(n_genes)] = 5 * decay
    dims = ("chain", "draw")
    posterior = xr.Dataset(
        {
            "drift": (dims + ("target", "source"), drift[None].astype(np.float32)),
            "basal_drift": (dims + ("gene",), np.zeros((1, n_draws, n_genes), np.float32)),
            "shift": (dims + ("perturbation", "gene"), shift[None]),
            "self_decay": (dims + ("gene",), np.broadcast_to(decay, (1, n_draws, n_genes)).astype(np.float32)),
        },
        coords={"chain": [0], "draw": np.arange(n_draws), "gene": genes, "source": genes, "target": genes,
                "perturbation": genes},
    )
    constant = xr.Dataset({"targets": (("perturbation", "gene"), np.eye(n_genes, dtype=np.int8))},
                          coords={"perturbation": genes, "gene": genes})
    return xr.DataTree.from_dict({"posterior": posterior, "constant_data": constant})


def measure(n_genes: int, n_draws: int, chunk_size: int, seed: int) -> dict:
    from lcd_bayes.analysis.clipr import edge_summary, posterior_effects

    tree = posterior_tree(n_genes, n_draws, seed)
    start = time.perf_counter()
    effects = posterior_effects(tree, chunk_size=chunk_size)
    clipr_seconds = time.perf_counter() - start
    start = time.perf_counter()
    summary = edge_summary(effects)
    summary_seconds = time.perf_counter() - start
    assert bool(summary["prob_edge"].notnull().sum() == n_genes * (n_genes - 1))
    gib = 1024.0**3
    per_array = n_draws * n_genes**2 * 4 / gib  # one float32 (draws, genes, genes) array
    return {
        "genes": n_genes, "draws": n_draws, "chunk_size": chunk_size,
        "clipr_seconds": clipr_seconds, "summary_seconds": summary_seconds,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        "effect_array_gib": per_array,
    }


def main(args):
    if args.one is not None:  # child process: one measurement, JSON on stdout
        print(json.dumps(measure(args.one, args.draws, args.chunk_size, args.seed)))
        return
    rows = []
    for n_genes in args.genes:
        out = subprocess.run([sys.executable, __file__, "--one", str(n_genes), "--draws", str(args.draws),
                              "--chunk-size", str(args.chunk_size), "--seed", str(args.seed)],
                             capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(json.dumps(row), flush=True)
    path = write_json(args.out, rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--genes", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="results/benchmark_clipr.json")
    main(parser.parse_args())
