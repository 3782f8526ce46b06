"""Genetic-interaction types of doubles (``lcd-bayes interactions``) against a known truth, and on
the Norman 2019 doubles.

* **simulated** (one screen per ``--seeds``): the nonlinear simulator (saturating regulation, so
  doubles are non-additive in the latent state), ``--genes`` genes, every gene perturbed once,
  ``--doubles`` random doubles, NB counts with the simulator's library sizes given. The model
  (``lcd_nonlinear`` config) is trained on control, every single and half of the doubles; the other
  half is predicted. Each double's truth is the same decomposition on the simulator's latent
  condition means, z-scored by its control sd; scored: Spearman correlation of the posterior-mean
  magnitude (and fit) with the truth's over the held-out doubles (the issue's criterion) and over
  the training doubles, the 90% intervals' coverage of the truth's magnitude, and how often the
  most probable type is the truth's. The observed decomposition of the same cells is scored the
  same way, as a reference for what the data themselves say.
* **norman19** (``--data perturbench_devel.h5ad``): the Norman et al. 2019 subset, the five doubles
  whose singles are present held out as in ``analyses/predict_combinations.py``, ``--norman-genes``
  genes (targets first, then the most responsive on training cells), the ``lcd_nonlinear`` config.
  Every double gets its table row: predicted type probabilities and the observed decomposition.

Writes ``results/interactions.json`` and, per setting, ``results/interactions/<setting>.csv`` and
``.png``; run folders under ``results/interactions/runs/``.
Run: ``uv run python analyses/interactions.py --seeds 0 1 2 --data ../shared/data/perturbench_devel.h5ad``.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the CLI: BLAS threads fight XLA's
os.environ.setdefault("MPLBACKEND", "Agg")

import anndata
import numpy as np
from scipy.stats import spearmanr

import lcd_bayes as lb
from lcd_bayes.analysis.interactions import TYPES, classify, decompose, format_interactions
from lcd_bayes.analysis.splits import combination_splits, split_anndata
from lcd_bayes.files import write_json
from lcd_bayes.pl import save_interactions
from lcd_bayes.sim.linear import LIBRARY_SIZE_KEY, simulate, truth_from_uns



def fitted(train, folder: Path, args, **kwargs) -> lb.Run:
    """The run in ``folder``, fitted first unless a finished fit is already there."""
    if not (folder / "posterior.nc").exists():
        start = time.perf_counter()
        lb.fit(train, out=folder, config=args.config, progress=False, steps=args.steps, **kwargs)
        print(f"  fit {time.perf_counter() - start:.0f} s", flush=True)
    return lb.load(folder)


def truth_columns(table, truth: dict) -> None:
    """The decomposition of each double on the simulator's latent condition means."""
    row = {label: i for i, label in enumerate(truth["conditions"])}
    z = (truth["condition_mean"] - truth["condition_mean"][0]) / np.sqrt(np.diag(truth["covariance"]))
    index = np.array([[row[a], row[b], row[q]] for q, a, b in zip(table["double"], table["first"], table["second"])])
    targets = [np.isin(truth["genes"], truth["targets"][a] + truth["targets"][b])
               for a, b in zip(table["first"], table["second"])]
    scores = {k: np.asarray(v) for k, v in decompose(z[index[:, 0]], z[index[:, 1]], z[index[:, 2]],
                                                     ~np.array(targets)).items()}
    kind, _ = classify(scores)
    table["truth_magnitude"], table["truth_fit"] = scores["magnitude"], scores["fit"]
    table["truth_type"] = [TYPES[k] for k in kind]


def scores(table, mask) -> dict:
    part = table[mask]
    within = (part["magnitude_low"] <= part["truth_magnitude"]) & (part["truth_magnitude"] <= part["magnitude_high"])
    return {
        "n_doubles": int(mask.sum()),
        "spearman_magnitude": float(spearmanr(part["magnitude"], part["truth_magnitude"])[0]),
        "spearman_fit": float(spearmanr(part["fit"], part["truth_fit"])[0]),
        "spearman_magnitude_observed": float(spearmanr(part["observed_magnitude"], part["truth_magnitude"])[0]),
        "coverage90_magnitude": float(within.mean()),
        "type_agreement": float((part["type"] == part["truth_type"]).mean()),
        "type_agreement_observed": float((part["observed_type"] == part["truth_type"]).mean()),
        "truth_types": part["truth_type"].value_counts().to_dict(),
    }


def simulated(args, root: Path, seed: int) -> dict:
    adata = simulate(args.genes, n_doubles=args.doubles, cells_per_condition=args.cells, likelihood="nb",
                     drift="nonlinear", seed=seed)
    truth = truth_from_uns(adata)
    truth["genes"] = np.asarray(adata.var_names)
    doubles = [q for q in truth["conditions"] if "+" in q]
    held_out = set(np.random.default_rng(seed).choice(doubles, len(doubles) // 2, replace=False))
    train = adata[~adata.obs["condition"].isin(held_out)].copy()
    print(f"simulated seed {seed}: {len(doubles)} doubles, {len(held_out)} held out", flush=True)
    run = fitted(train, root / "runs" / f"simulated_seed{seed}", args, size_factor_key=LIBRARY_SIZE_KEY, seed=seed)
    table = run.interactions(doubles, observed=adata, seed=seed)
    truth_columns(table, truth)
    table.to_csv(root / f"simulated_seed{seed}.csv", index=False)
    save_interactions(table, root / f"simulated_seed{seed}.png")
    result = {"held_out": scores(table, ~table["in_training"]), "training": scores(table, table["in_training"])}
    print(f"  held out: Spearman magnitude {result['held_out']['spearman_magnitude']:.2f} "
          f"(observed {result['held_out']['spearman_magnitude_observed']:.2f}), coverage "
          f"{result['held_out']['coverage90_magnitude']:.2f}", flush=True)
    return result


def norman(args, root: Path) -> dict:
    adata = anndata.read_h5ad(args.data)
    adata = adata[adata.obs["dataset"] == "norman19"].copy()
    (split,) = combination_splits(adata.obs["condition"], control="control", n_folds=1, train_double_fraction=1.0)
    train, _ = split_anndata(adata, split, control="control")
    print(f"norman19: test {', '.join(split.test)}", flush=True)
    run = fitted(train, root / "runs" / "norman19", args, perturbation_key="condition", control="control",
                 total_counts_key="ncounts", n_top_genes=args.norman_genes, predict_targets=list(split.test),
                 seed=0)
    doubles = sorted({q for q in adata.obs["condition"].astype(str) if "+" in q})
    table = run.interactions(doubles, observed=adata)
    table.to_csv(root / "norman19.csv", index=False)
    save_interactions(table, root / "norman19.png")
    print(format_interactions(table), flush=True)
    columns = ["double", "in_training", "type", *(f"prob_{t}" for t in TYPES), "magnitude", "magnitude_low",
               "magnitude_high", "fit", "dominant", "observed_type", "observed_magnitude", "observed_fit"]
    return {"test_doubles": list(split.test), "n_genes": len(run.genes), "table": table[columns].to_dict(orient="records")}


def main(args):
    root = Path(args.out).with_suffix("")
    root.mkdir(parents=True, exist_ok=True)
    results = {"simulated": {f"seed{seed}": simulated(args, root, seed) for seed in args.seeds}}
    if results["simulated"]:
        held = [r["held_out"]["spearman_magnitude"] for r in results["simulated"].values()]
        results["simulated"]["held_out_spearman_magnitude"] = {"per_seed": held, "mean": float(np.mean(held))}
    if args.data:
        results["norman19"] = norman(args, root)
    out = write_json(args.out, {"settings": vars(args), **results})
    print(f"wrote {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="simulated screens (none: skip)")
    parser.add_argument("--genes", type=int, default=20)
    parser.add_argument("--doubles", type=int, default=40, help="doubles per simulated screen, half held out")
    parser.add_argument("--cells", type=int, default=200, help="cells per simulated condition")
    parser.add_argument("--config", default="lcd_nonlinear", help="model configuration (shipped name or TOML)")
    parser.add_argument("--data", default=None, help="perturbench_devel.h5ad (the Norman 2019 subset)")
    parser.add_argument("--norman-genes", type=int, default=100)
    parser.add_argument("--steps", type=int, default=None, help="SVI steps (default: the configuration's)")
    parser.add_argument("--out", default="results/interactions.json")
    main(parser.parse_args())
