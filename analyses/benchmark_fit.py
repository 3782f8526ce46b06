"""How fast does the LCD fit run, and how long until it converges?

For d genes in {20, 100, 300} (every gene perturbed once, 200 cells per condition, NB counts from
``lcd_bayes.sim.linear.simulate``, linear or nonlinear as the configuration's drift) this measures,
for each ``--config`` (default: the shipped linear configuration):

* compile time of the jitted SVI chunk,
* SVI step time: median over many timed chunks after compilation (per step),
* time and steps to convergence (the fit's own convergence check, within the config's step
  budget and learning-rate schedule, or --max-steps),
* recovery AUROC of |posterior mean| of the direct effects at the end.

Writes ``results/benchmark_fit.json`` (or --out). Run: ``uv run python analyses/benchmark_fit.py``.
Timings on a shared 2-core machine are noisy: compare ratios and medians, not single runs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the CLI: BLAS threads fight XLA's

import jax
import numpy as np

from lcd_bayes.analysis.recovery import recovery_against_truth
from lcd_bayes.config import load_config
from lcd_bayes.inference.svi import build_inference
from lcd_bayes.io.screen import load_perturbation_data
from lcd_bayes.model.program import CellBatch
from lcd_bayes.run import fit, structure_of
from lcd_bayes.sim.linear import LIBRARY_SIZE_KEY, simulate, truth_from_uns


def step_times(adata, config, n_chunks: int) -> dict:
    """Compile time and the median per-step time of the jitted, scanned SVI step."""
    data = load_perturbation_data(adata, continuous=config.model.likelihood == "gaussian",
                                  size_factor_key=LIBRARY_SIZE_KEY)
    structure = structure_of(data, config)
    svi = build_inference(structure, config).svi
    cells = CellBatch(*(jax.numpy.asarray(a) for a in (data.counts, data.size_factor, data.condition)))
    chunk = config.fit.steps_per_chunk
    run_chunk = jax.jit(lambda s, c: jax.lax.scan(lambda t, _: svi.update(t, c), s, None, length=chunk))
    state = svi.init(jax.random.PRNGKey(0), cells)
    start = time.perf_counter()
    state, losses = run_chunk(state, cells)
    losses.block_until_ready()
    compile_seconds = time.perf_counter() - start
    per_step = []
    for _ in range(n_chunks):
        start = time.perf_counter()
        state, losses = run_chunk(state, cells)
        losses.block_until_ready()
        per_step.append((time.perf_counter() - start) / chunk)
    return {"compile_seconds": compile_seconds, "step_seconds_median": float(np.median(per_step)),
            "step_seconds_iqr": [float(np.quantile(per_step, 0.25)), float(np.quantile(per_step, 0.75))],
            "timed_steps": n_chunks * chunk}


def configurations(args) -> list[tuple[str, object]]:
    """(name, RunConfig) per ``--config``; a nonlinear config once per ``--sim-particles`` value,
    and every config once per ``--cell-particles`` value."""
    out = []
    for path in args.config:
        config = load_config(path)
        if args.likelihood:
            config = config.replace(model={"likelihood": args.likelihood})
        name = Path(path).stem if path else "lcd_linear"
        if config.model.drift == "nonlinear" and args.sim_particles:
            out += [(f"{name}_p{p}", config.replace(model={"sim_particles": p})) for p in args.sim_particles]
        else:
            out.append((name, config))
    if args.cell_particles:
        out = [(f"{name}_k{k}", config.replace(fit={"cell_particles": k}))
               for name, config in out for k in args.cell_particles]
    return out


def main(args):
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "jax": jax.__version__,
                           "device": str(jax.devices()[0])},
               "configs": {}, "runs": []}
    for name, config in configurations(args):
        results["configs"][name] = config.to_dict()
        for n_genes in args.genes:
            # Data from the simulator of the config's own drift family.
            adata = simulate(n_genes, cells_per_condition=args.cells, likelihood=config.model.likelihood
                             if config.model.likelihood != "zip" else "nb", drift=config.model.drift, seed=args.seed)
            entry = {"config": name, "genes": n_genes, "cells": adata.n_obs,
                     "guide": config.fit.resolved_guide(n_genes)}
            entry.update(step_times(adata, config, args.timed_chunks))
            entry["projected_fit_hours"] = entry["step_seconds_median"] * config.fit.steps / 3600
            print(f"{name} d={n_genes}: compile {entry['compile_seconds']:.1f} s, "
                  f"step {1e3 * entry['step_seconds_median']:.1f} ms (median)", flush=True)
            if n_genes <= args.converge_up_to:
                capped = config.replace(fit={"steps": args.max_steps})  # None keeps the config's steps
                start = time.perf_counter()
                run = fit(adata, config=capped, size_factor_key=LIBRARY_SIZE_KEY, progress=False)
                entry.update({
                    # includes compile, the refinement (the default "auto": Laplace up to ~40 genes)
                    # and the posterior draws
                    "fit_seconds": time.perf_counter() - start, "refine": run.config.fit.refine,
                    "fit_steps": int(run.fit.losses.size), "converged": bool(run.fit.converged),
                    **{f"recovery_{k}": v for k, v in
                       recovery_against_truth(run.posterior, truth_from_uns(adata)["effect"]).items()},
                })
                print(f"  fit: {entry['fit_steps']} steps, converged={entry['converged']}, "
                      f"{entry['fit_seconds']:.0f} s (refine {entry['refine']}), "
                      f"AUROC {entry['recovery_auroc']:.3f}", flush=True)
            results["runs"].append(entry)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--genes", type=int, nargs="+", default=[20, 100, 300])
    parser.add_argument("--cells", type=int, default=200, help="cells per condition")
    parser.add_argument("--config", nargs="+", default=[None],
                        help="model configurations to time, shipped names or TOML files (default: lcd_linear), "
                             "e.g. --config lcd_linear lcd_nonlinear")
    parser.add_argument("--sim-particles", type=int, nargs="*", default=None,
                        help="nonlinear configs: time each of these particle counts (the cost driver)")
    parser.add_argument("--cell-particles", type=int, nargs="*", default=None,
                        help="[fit] cell_particles values to compare (importance draws per cell)")
    parser.add_argument("--likelihood", default=None)
    parser.add_argument("--timed-chunks", type=int, default=10)
    parser.add_argument("--max-steps", type=int, default=None, help="step cap (default: the config's)")
    parser.add_argument("--converge-up-to", type=int, default=300, help="time full fits up to this d")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/benchmark_fit.json")
    main(parser.parse_args())
