"""How long does ``predict`` take at d = 100 genes?

Fits a short run on a simulated 100-gene NB screen (prediction cost depends on the shapes, not on
how well the fit converged: genes, posterior draws, conditions and cells), then times
``lcd_bayes.analysis.predict.predict`` for 10 conditions (8 doubles and 2 singles) at 100 and 1,000
cells per condition: the first call (including JAX compilation) and the median of repeated calls.

Writes ``results/benchmark_predict.json``.
Run: ``uv run python analyses/benchmark_predict.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the CLI: BLAS threads fight XLA's

from lcd_bayes.analysis.predict import predict
from lcd_bayes.files import write_json
from lcd_bayes.run import fit
from lcd_bayes.sim.linear import LIBRARY_SIZE_KEY, simulate


def main(args):
    folder = Path(args.run)
    if folder.exists():
        shutil.rmtree(folder)
    adata = simulate(args.genes, cells_per_condition=50, likelihood="nb", seed=0)
    fit(adata, folder, config=args.config, steps=args.fit_steps, size_factor_key=LIBRARY_SIZE_KEY, progress=False)
    genes = list(adata.var_names)
    conditions = [f"{genes[2 * i]}+{genes[2 * i + 1]}" for i in range(8)] + genes[-2:]
    rows = []
    for n_cells in args.cells:
        start = time.perf_counter()
        predict(folder, conditions, n_cells=n_cells, seed=0)
        first = time.perf_counter() - start
        repeats = []
        for seed in range(1, args.repeats + 1):
            start = time.perf_counter()
            predict(folder, conditions, n_cells=n_cells, seed=seed)
            repeats.append(time.perf_counter() - start)
        row = {"genes": args.genes, "conditions": len(conditions), "cells_per_condition": n_cells,
               "first_call_seconds": first, "median_seconds": statistics.median(repeats), "repeats": args.repeats}
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = write_json(args.out, rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--genes", type=int, default=100)
    parser.add_argument("--cells", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--fit-steps", type=int, default=300)
    parser.add_argument("--config", default=None,
                        help="model configuration of the fit, a shipped name or a TOML file (default: lcd_linear); "
                             "its [fit] num_posterior_samples is the number of draws predict uses")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--run", default="results/benchmark_predict_run")
    parser.add_argument("--out", default="results/benchmark_predict.json")
    main(parser.parse_args())
