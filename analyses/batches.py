"""Do batch effects cost causal recovery, and does modelling them (``--batch-key``) win it back?

For each data seed, three fits of the default model on simulated linear screens of the same size
(``lcd_bayes.sim.linear.simulate``: ``--genes`` genes, ``--fraction`` of them perturbed,
``--cells`` cells per condition):

* ``batch-free``: a screen without batches;
* ``modelled``: the same system with its cells spread over ``--batches`` batches, each with a
  technical effect (log gene scale, sd ``--scale-sd``) and a biological one (basal-drift shift,
  sd ``--basal-sd`` in latent units), fitted with ``batch_key="batch"``;
* ``ignored``: the same batched screen fitted without the batch key.

Each fit's CLIPR effects are scored against the true effects (AUROC of ``prob_edge``, coverage of
the 50% / 90% HDIs of the true edges and of all pairs), and for ``modelled`` the posterior-mean
batch effects against the simulated ones (correlation of the between-batch differences, which the
hierarchical prior identifies; their overall level trades off against the basal drift and gene
scale).

Writes ``results/batches.json`` and ``results/batches.png``.
Run: ``uv run python analyses/batches.py [--genes 15] [--seed 0 1 2] [--likelihood nb] [--config TOML]``.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the CLI: BLAS threads fight XLA's
os.environ.setdefault("MPLBACKEND", "Agg")

import matplotlib.pyplot as plt
import numpy as np

from lcd_bayes.analysis.clipr import clipr_run
from lcd_bayes.analysis.recovery import clipr_scores
from lcd_bayes.config import load_config
from lcd_bayes.files import write_json
from lcd_bayes.inference.posterior import stacked_draws
from lcd_bayes.run import fit
from lcd_bayes.sim.linear import LIBRARY_SIZE_KEY, simulate, truth_from_uns

ARMS = ("batch-free", "modelled", "ignored")
SCORES = ("auroc_prob_edge", "coverage50_edges", "coverage90_edges", "coverage50_all", "coverage90_all")


def screens(args, seed: int):
    """The batch-free screen and the batched one: the same system, design and cells' states."""
    common = dict(n_perturbed=args.fraction, cells_per_condition=args.cells, likelihood=args.likelihood, seed=seed)
    plain = simulate(args.genes, **common)
    batched = simulate(args.genes, n_batches=args.batches, batch_scale_sd=args.scale_sd,
                       batch_basal_sd=args.basal_sd, **common)
    return plain, batched


def between_batch_correlation(estimate: np.ndarray, truth: np.ndarray) -> float:
    """Correlation of (batches, genes) effects after removing each gene's mean over the batches."""
    centre = lambda a: np.asarray(a) - np.asarray(a).mean(axis=0, keepdims=True)  # noqa: E731
    return float(np.corrcoef(centre(estimate).ravel(), centre(truth).ravel())[0, 1])


def batch_recovery(posterior, truth: dict, likelihood: str) -> dict:
    """How well the posterior-mean batch effects match the simulated ones."""
    technical = "batch_offset" if likelihood == "gaussian" else "batch_log_scale"
    mean_shift = stacked_draws(posterior["batch_mean_shift"]).mean(axis=0)
    log_scale = stacked_draws(posterior[technical]).mean(axis=0)
    return {"batch_mean_shift_corr": between_batch_correlation(mean_shift, truth["batch_mean_shift"]),
            "batch_technical_corr": between_batch_correlation(log_scale, truth["batch_log_scale"])}


def plot(rows: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, score, label in zip(axes, ("auroc_prob_edge", "coverage50_edges", "coverage90_edges"),
                                ("AUROC of prob_edge", "true edges in the 50% HDI", "true edges in the 90% HDI")):
        for x, arm in enumerate(ARMS):
            values = [r[score] for r in rows if r["arm"] == arm]
            ax.scatter(np.full(len(values), x), values, color=f"C{x}", alpha=0.8)
            ax.hlines(np.median(values), x - 0.25, x + 0.25, color=f"C{x}")
        nominal = {"coverage50_edges": 0.5, "coverage90_edges": 0.9}.get(score)
        if nominal is not None:
            ax.axhline(nominal, color="0.6", linestyle="--", linewidth=0.8)
        ax.set_xticks(range(len(ARMS)), ARMS)
        ax.set(ylabel=label, ylim=(0, 1.02))
    fig.suptitle("Causal recovery with and without batch effects (dots: seeds, bars: medians)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args):
    config = load_config(args.config)
    rows = []
    for seed in args.seed:
        plain, batched = screens(args, seed)
        truth = truth_from_uns(batched)
        for arm, adata, batch_key in (("batch-free", plain, None), ("modelled", batched, "batch"),
                                      ("ignored", batched, None)):
            start = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                folder = Path(args.keep or tmp) / f"{arm}_seed{seed}"
                run = fit(adata, folder, config=config, likelihood=args.likelihood, seed=seed, progress=False, batch_key=batch_key,
                          size_factor_key=None if args.likelihood == "gaussian" else LIBRARY_SIZE_KEY)
                tree, _table = clipr_run(folder)
                row = {"arm": arm, "seed": seed, "genes": args.genes, "likelihood": args.likelihood,
                       "batches": args.batches if arm != "batch-free" else 1, "scale_sd": args.scale_sd,
                       "basal_sd": args.basal_sd, "refine": run.config.fit.refine,
                       "steps": int(run.fit.losses.size), **clipr_scores(tree, truth["effect"])}
                if batch_key is not None:
                    row.update(batch_recovery(run.posterior["posterior"], truth, args.likelihood))
                row["seconds"] = time.perf_counter() - start
            rows.append(row)
            print(json.dumps(row), flush=True)
    for arm in ARMS:
        group = [r for r in rows if r["arm"] == arm]
        print(arm, "medians:", json.dumps({s: float(np.median([r[s] for r in group])) for s in SCORES}), flush=True)
    out = write_json(args.out, rows)
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--genes", type=int, default=15)
    parser.add_argument("--fraction", type=float, default=1.0, help="fraction of the genes perturbed")
    parser.add_argument("--cells", type=int, default=150, help="cells per condition")
    parser.add_argument("--likelihood", choices=("nb", "gaussian"), default="nb")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--scale-sd", type=float, default=0.3, help="technical: sd of the per-batch log gene scale")
    parser.add_argument("--basal-sd", type=float, default=0.5, help="biological: sd of the basal-drift shift")
    parser.add_argument("--seed", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--config", default=None, help="model configuration (default: lcd_linear)")
    parser.add_argument("--out", default="results/batches.json")
    parser.add_argument("--keep", default=None, metavar="DIR", help="keep the run folders under DIR")
    main(parser.parse_args())
