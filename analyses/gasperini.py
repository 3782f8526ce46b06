"""A real CRISPRi screen end to end: does the fit find the knockdowns, and predict unseen ones?

Data: the K562 CRISPRi subset of Gasperini et al. 2019 (raw UMI counts, 366 genes; ten promoter
(TSS) guide groups whose targets are in the matrix, 18 candidate enhancers, non-targeting
controls). Cells kept: ``control`` (non-targeting guides only) and cells with exactly one tracked
guide group. Left out: ``untracked`` cells (they carry guides of the full library that were not
kept upstream, so they are neither clean controls nor known perturbations) and co-infected cells
(random combinations of at most 8 cells each). Library sizes: each cell's total over all 366
genes of the file (there is no whole-transcriptome total), of which ``--genes`` are modelled (the
TSS targets first, then the most responsive genes).

1. **Knockdowns.** One fit on every kept cell; for each TSS target, the posterior probability that
   its on-target shift is negative (nine are visibly knocked down in their cells; LARP1 is not).
2. **Unseen knockdowns.** A second fit without the cells of two knocked-down targets
   (``--held-out``), whose genes stay in the panel; each is predicted as an unseen single
   perturbation of a modelled gene (the hierarchical on-target prior plus the learned network), and
   the predicted change of its target gene is compared with the held-out cells': the sign, at
   least half the size, and the observed mean inside the 90% interval of the expected expression.
3. The posterior predictive check of each fit (``ppc.csv`` in its run folder).
4. With ``--batch-key batch``: both fits model the two sequencing batches (a technical gene scale
   and a basal-drift shift per batch, pooled); the record adds the batch effects' spreads and
   sizes, and predictions average over the batches.

Writes ``results/gasperini.json``. Run:
``uv run python analyses/gasperini.py --data PATH/gasperini2019_k562_subset.h5ad [--genes 100]
[--batch-key batch] [--skip-held-out]``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the CLI: BLAS threads fight XLA's
os.environ.setdefault("MPLBACKEND", "Agg")

import anndata
import numpy as np

from lcd_bayes.analysis.predict import predict
from lcd_bayes.analysis.ppc import ppc_table
from lcd_bayes.files import write_json
from lcd_bayes.run import fit

CONTROL = "control"
KEY = "condition"


def single_guide_cells(adata: anndata.AnnData) -> anndata.AnnData:
    """Control cells and cells with exactly one tracked guide group."""
    labels = adata.obs[KEY].astype(str)
    return adata[~labels.str.contains("+", regex=False) & (labels != "untracked")].copy()


def knockdowns(run, targets: list[str]) -> dict:
    """Posterior mean of each target's on-target shift (relative to its self-decay: latent units, the
    log-fold change the shift alone would cause) and the probability that it is negative."""
    posterior = run.posterior["posterior"]
    shift = posterior["shift"] / posterior["self_decay"]
    out = {}
    for gene in targets:
        draws = shift.sel(perturbation=gene, gene=gene).values.ravel()
        out[gene] = {"mean_relative_shift": float(draws.mean()), "prob_negative": float((draws < 0).mean())}
    return out


def observed_fold(adata: anndata.AnnData, gene: str, condition: str, size_factor: np.ndarray) -> tuple[float, float]:
    """Mean of counts / size factor of ``gene`` in ``condition`` and in the control cells."""
    labels = adata.obs[KEY].astype(str).to_numpy()
    values = np.asarray(adata[:, gene].X.todense() if hasattr(adata.X, "todense") else adata[:, gene].X).ravel()
    normalized = values / size_factor
    return float(normalized[labels == condition].mean()), float(normalized[labels == CONTROL].mean())


def unseen(run_folder: Path, adata: anndata.AnnData, held_out: list[str], seed: int) -> dict:
    """Predict each held-out target as an unseen perturbation; compare its target gene's change."""
    predicted = predict(run_folder, [CONTROL, *held_out], n_cells=200, seed=seed)
    conditions = predicted.uns["lcd_bayes"]["conditions"]
    genes = list(predicted.var_names)
    totals = np.asarray(adata.X.sum(axis=1)).ravel()
    size_factor = totals / np.median(totals)
    # The expected expression is at the control cells' mean library size; so is the observed one.
    mean_size = float(np.mean(size_factor[adata.obs[KEY].astype(str).to_numpy() == CONTROL]))
    out = {}
    for gene in held_out:
        g, q, c = genes.index(gene), conditions.index(gene), conditions.index(CONTROL)
        expected = predicted.varm["expected_mean"][g]
        low, high = predicted.varm["expected_low"][g, q], predicted.varm["expected_high"][g, q]
        observed, control = observed_fold(adata, gene, gene, size_factor)
        observed, control = observed * mean_size, control * mean_size
        predicted_change, observed_change = expected[q] - expected[c], observed - control
        out[gene] = {
            "control_mean": control, "observed_mean": observed, "predicted_mean": float(expected[q]),
            "interval_90": [float(low), float(high)],
            "same_sign": bool(np.sign(predicted_change) == np.sign(observed_change)),
            "size_ratio": float(predicted_change / observed_change),
            "observed_inside_90": bool(low <= observed <= high),
        }
    return out


def batch_summary(posterior) -> dict | None:
    """The fitted batch effects' spreads, and the median over genes of the between-batch range of
    each (posterior means): the technical log gene scale and the latent mean shift."""
    if "batch_mean_shift" not in posterior:
        return None

    def spread(name):
        mean = posterior[name].mean(("chain", "draw"))
        return float((mean.max("batch") - mean.min("batch")).median())

    return {"batch_scale_sd": float(posterior["batch_scale_sd"].median()),
            "batch_basal_sd": float(posterior["batch_basal_sd"].median()),
            "log_scale_range_median": spread("batch_log_scale"), "mean_shift_range_median": spread("batch_mean_shift")}


def main(args):
    root = Path(args.runs)
    adata = single_guide_cells(anndata.read_h5ad(args.data))
    targets = [str(g) for g in adata.var_names[adata.var["is_tss_target"].to_numpy(bool)]]
    results = {"settings": vars(args), "cells": int(adata.n_obs), "targets": targets}
    settings = dict(config=args.config, perturbation_key=KEY, control=CONTROL, n_top_genes=args.genes, seed=args.seed,
                    batch_key=args.batch_key, progress=False)

    folder = root / "all"
    shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    run = fit(adata, folder, **settings)
    results["all"] = {"seconds": time.perf_counter() - start, "knockdowns": knockdowns(run, targets),
                      "ppc": ppc_table(run.posterior["ppc"]).attrs["aggregate"] if "ppc" in run.posterior.children else None,
                      "skipped_steps": int(run.posterior["posterior"].attrs.get("skipped_steps", 0)),
                      "self_decay_median": float(run.posterior["posterior"]["self_decay"].median()),
                      "batches": batch_summary(run.posterior["posterior"])}
    print(json.dumps(results["all"], default=float), flush=True)
    if args.skip_held_out:
        print(f"wrote {write_json(args.out, results)}")
        return

    training = adata[~adata.obs[KEY].astype(str).isin(args.held_out)].copy()
    folder = root / "held_out"
    shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    # The held-out targets stay in the panel (predict_targets), though none of their cells are seen.
    fit(training, folder, predict_targets=list(args.held_out), **settings)
    results["held_out"] = {"seconds": time.perf_counter() - start, "conditions": list(args.held_out),
                           "prediction": unseen(folder, adata, list(args.held_out), args.seed)}
    print(json.dumps(results["held_out"], default=float), flush=True)

    out = write_json(args.out, results)
    print(f"wrote {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="gasperini2019_k562_subset.h5ad")
    parser.add_argument("--genes", type=int, default=100, help="modelled genes (the TSS targets first)")
    parser.add_argument("--held-out", nargs="+", default=["COX4I1", "DIMT1"],
                        help="knocked-down TSS targets predicted as unseen perturbations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default=None, help="model configuration (default: lcd_linear)")
    parser.add_argument("--batch-key", default=None, help="obs column of the batches to model (the file's: batch)")
    parser.add_argument("--skip-held-out", action="store_true", help="fit on every kept cell only (step 1)")
    parser.add_argument("--runs", default="results/gasperini_runs", help="folder of the two run folders")
    parser.add_argument("--out", default="results/gasperini.json")
    main(parser.parse_args())
