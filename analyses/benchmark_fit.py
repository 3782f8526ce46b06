"""How fast does the LCD fit run: per SVI step, and a whole fit from AnnData to posterior?

For each number of genes d (every gene perturbed once, ``--cells`` cells per condition, counts or
Gaussian values from ``lcd_bayes.sim.linear.simulate``) and each likelihood, this measures:

* ``step``: compile time of the jitted SVI chunk and the time per SVI step after it, from a
  short fit (``--step-fit-steps`` steps, no refinement): (fit time - compile time) / steps run
  after the first chunk;
* ``fit`` (``--whole-fit-up-to``): the whole default fit (SVI to its own stop, the default
  refinement, the posterior draws), ``--repeats`` times with different fit seeds; the median
  time, steps, and the recovery AUROC of the edges.

With ``--host-devices N`` JAX sees N CPU devices (``--xla_force_host_platform_device_count``)
and every measurement is made with ``[fit] devices`` 1 and N: data-parallel SVI against one
device. Peak resident memory of the process is recorded at the end.

Writes ``results/benchmark_fit.json`` (or --out). Run, e.g.:
``uv run python analyses/benchmark_fit.py --genes 15 --cells 150 --likelihoods nb gaussian --repeats 3``.
Timings on a shared 2-core machine are noisy: compare ratios and medians, not single runs.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the CLI: BLAS threads fight XLA's
if "--host-devices" in sys.argv:  # JAX reads the device count when it starts
    count = sys.argv[sys.argv.index("--host-devices") + 1]
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}"

import jax
import numpy as np

from lcd_bayes.analysis.recovery import recovery_against_truth
from lcd_bayes.config import load_config
from lcd_bayes.files import write_json
from lcd_bayes.run import fit
from lcd_bayes.sim.linear import LIBRARY_SIZE_KEY, simulate, truth_from_uns


def step_time(adata, config, likelihood: str, steps: int) -> dict:
    """Compile time and seconds per SVI step of a short fit without refinement."""
    short = config.replace(fit={"steps": steps, "min_steps": steps, "refine": "none", "num_posterior_samples": 10})
    run = fit(adata, config=short, likelihood=likelihood, size_factor_key=LIBRARY_SIZE_KEY, progress=False)
    timed_steps = run.fit.losses.size - short.fit.steps_per_chunk
    return {"init_seconds": run.fit.init_seconds, "compile_seconds": run.fit.compile_seconds,
            "step_seconds": (run.fit.seconds - run.fit.init_seconds - run.fit.compile_seconds) / timed_steps,
            "batch_size": run.config.fit.batch_size, "guide": run.config.fit.resolved_guide(adata.n_vars)}


def whole_fit(adata, config, likelihood: str, seed: int) -> dict:
    """The default fit, timed from the AnnData to the posterior, and its recovery."""
    start = time.perf_counter()
    run = fit(adata, config=config, likelihood=likelihood, seed=seed, size_factor_key=LIBRARY_SIZE_KEY,
              progress=False)
    seconds = time.perf_counter() - start
    attrs = run.posterior["posterior"].attrs
    recovery = recovery_against_truth(run.posterior, truth_from_uns(adata)["effect"])
    return {"seconds": seconds, "svi_seconds": run.fit.seconds, "steps": int(run.fit.losses.size),
            "converged": bool(run.fit.converged), "refine": run.config.fit.refine,
            "refine_seconds": float(attrs.get("laplace_seconds", attrs.get("nuts_seconds", 0.0))),
            "auroc": recovery["auroc"]}


def median_of(rows: list[dict]) -> dict:
    return {f"median_{key}": float(np.median([row[key] for row in rows]))
            for key in rows[0] if isinstance(rows[0][key], (int, float)) and not isinstance(rows[0][key], bool)}


def main(args):
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "jax": jax.__version__,
                           "devices": [str(d) for d in jax.devices()]},
               "args": vars(args), "runs": []}
    config = load_config(args.config)
    device_counts = [1, args.host_devices] if args.host_devices else [0]
    for n_genes in args.genes:
        for likelihood in args.likelihoods:
            adata = simulate(n_genes, cells_per_condition=args.cells,
                             likelihood="gaussian" if likelihood == "gaussian" else "nb", seed=args.seed)
            for devices in device_counts:
                setting = config.replace(fit={"devices": devices})
                entry = {"genes": n_genes, "likelihood": likelihood, "cells": adata.n_obs, "devices": devices,
                         **step_time(adata, setting, likelihood, args.step_fit_steps)}
                print(f"d={n_genes} {likelihood} {adata.n_obs} cells, devices={devices or 'all'}: compile "
                      f"{entry['compile_seconds']:.1f} s, {1e3 * entry['step_seconds']:.1f} ms per step "
                      f"(batch {entry['batch_size']}, {entry['guide']} guide)", flush=True)
                if n_genes <= args.whole_fit_up_to:
                    fits = [whole_fit(adata, setting, likelihood, seed) for seed in range(args.repeats)]
                    entry.update(fits=fits, **median_of(fits))
                    print(f"  whole fit, median of {len(fits)}: {entry['median_seconds']:.1f} s "
                          f"(SVI {entry['median_svi_seconds']:.1f} s, {entry['median_steps']:.0f} steps; "
                          f"{fits[0]['refine']} {entry['median_refine_seconds']:.1f} s), "
                          f"AUROC {entry['median_auroc']:.3f}", flush=True)
                results["runs"].append(entry)
    results["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out = write_json(args.out, results)
    print(f"peak memory {results['peak_rss_gib']:.1f} GiB; wrote {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--genes", type=int, nargs="+", default=[15, 100])
    parser.add_argument("--cells", type=int, default=150, help="cells per condition")
    parser.add_argument("--likelihoods", nargs="+", default=["nb", "gaussian"])
    parser.add_argument("--config", default=None, help="shipped name or TOML (default: lcd_linear)")
    parser.add_argument("--step-fit-steps", type=int, default=300, help="steps of the short fit that times a step")
    parser.add_argument("--whole-fit-up-to", type=int, default=100, help="time whole fits up to this many genes")
    parser.add_argument("--repeats", type=int, default=3, help="whole fits per setting (fit seeds 0, 1, ...)")
    parser.add_argument("--host-devices", type=int, default=0,
                        help="make JAX see this many CPU devices and compare [fit] devices 1 and this")
    parser.add_argument("--seed", type=int, default=0, help="data seed")
    parser.add_argument("--out", default="results/benchmark_fit.json")
    main(parser.parse_args())
