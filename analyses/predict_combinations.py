"""Predict held-out double perturbations: LCD (one fit per ``--config``: linear and/or nonlinear
drift) against the no-change, additive and linear baselines.

Two settings:

* **simulated_linear** and **simulated_nonlinear**: 20-gene NB screens, every gene perturbed
  once plus 10 doubles, from the linear simulator (doubles add up in the latent state; through
  the softplus link their counts are mildly non-additive) and from the nonlinear one (saturating
  regulation: genetic interactions, doubles non-additive in the latent state too). Doubles are
  split in two folds; each fold is predicted by a model trained on control, all singles and the
  other fold's doubles.
* **norman19**: the Norman et al. 2019 subset of ``perturbench_devel.h5ad``. Test set: the five
  doubles whose singles are present (KLF1+MAP2K6, KLF1+TGFBR2, MAP2K3+MAP2K6, MAP2K3+SLC38A2,
  MAPK1+TGFBR2); training: every other cell. The model uses a ``--genes``-gene panel chosen on
  the training cells (targets, then the most responsive genes: ``lcd_bayes.io.genes``) and the
  default configuration: nothing is tuned on the test doubles. With ``--norman-batches`` the fit
  models the screen's eight 10x GEM groups (lanes; the suffix of each cell barcode, ``-1`` to
  ``-8``) as batches, and predicts the test doubles in the screen's mixture of lanes.

Every method predicts as many cells per condition as were observed; all are scored by
``lcd_bayes.analysis.evaluation`` (energy distance, MMD, Pearson delta over all and top-20 DE genes,
RMSE of means) on library-normalized log1p expression of the model's genes.

Writes ``results/predict_combinations.json``, ``results/predict_combinations.png`` and, per setting
and method, ``results/predict_combinations/<setting>_<method>/`` (metrics and mean-shift plots).
Run: ``uv run python analyses/predict_combinations.py --data ../shared/data/perturbench_devel.h5ad``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import time
import warnings
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the CLI: BLAS threads fight XLA's
os.environ.setdefault("MPLBACKEND", "Agg")

import anndata
import matplotlib.pyplot as plt
import numpy as np

from lcd_bayes.analysis.baselines import BASELINES, predict_baseline
from lcd_bayes.analysis.evaluation import evaluate, write_evaluation
from lcd_bayes.analysis.predict import predict
from lcd_bayes.analysis.splits import combination_splits, split_anndata
from lcd_bayes.files import write_json
from lcd_bayes.io.run_folder import load_run
from lcd_bayes.run import fit
from lcd_bayes.sim.linear import LIBRARY_SIZE_KEY, simulate

METRICS = ("energy_distance", "mmd", "pearson_delta_all", "pearson_delta_top_de", "rmse_mean", "rmse_mean_top_de")


def method_name(config: str | None) -> str:
    """``lcd_linear`` for the default configuration, else ``lcd_<TOML stem>``."""
    stem = Path(config).stem if config else "lcd_linear"
    return stem if stem.startswith("lcd") else f"lcd_{stem}"


def compare(train, test, folder: Path, out: Path, *, configs: list, fit_kwargs: dict, data_kwargs: dict,
            seed: int) -> dict:
    """Fit LCD on ``train`` (once per config), predict ``test``'s conditions with LCD and every
    baseline, score all."""
    key, control = data_kwargs["perturbation_key"], data_kwargs["control"]
    conditions = sorted(set(test.obs[key].astype(str)) - {control})
    n_cells = int(test.obs[key].astype(str).value_counts()[conditions].max())
    observed_kwargs = {"total_counts_key": data_kwargs.get("total_counts_key")}
    predictions, fit_seconds = {}, {}
    for config in configs:  # one LCD fit per model configuration (linear, nonlinear drift)
        name = method_name(config)
        run_folder = folder.with_name(f"{folder.name}_{name}")
        if run_folder.exists():
            shutil.rmtree(run_folder)  # a fresh fit every time the script runs
        start = time.perf_counter()
        fit(train, run_folder, config=config, seed=seed, progress=False, **data_kwargs, **fit_kwargs)
        fit_seconds[name] = time.perf_counter() - start
        predictions[name] = predict(run_folder, conditions, n_cells=n_cells, seed=seed)
    genes = load_run(run_folder)[2]["genes"]
    for method in BASELINES:
        predictions[method] = predict_baseline(
            train, conditions, method=method, n_cells=n_cells, genes=genes, perturbation_key=key,
            control=control, sep="+", seed=seed, **observed_kwargs,
        )
    results = {"conditions": conditions, "n_genes": len(genes), "fit_seconds": fit_seconds, "methods": {}}
    for method, predicted in predictions.items():
        table, aggregate = evaluate(predicted, test, perturbation_key=key, control=control, seed=seed,
                                    **observed_kwargs)
        write_evaluation(table, aggregate, out / method)
        results["methods"][method] = {
            "mean": {m: aggregate["mean"][m] for m in METRICS},
            "per_condition": table[["condition", *METRICS]].to_dict(orient="records"),
        }
        print(f"  {method:10s} " + "  ".join(f"{m} {aggregate['mean'][m]:.3f}" for m in METRICS), flush=True)
    return results


def simulated(args, root: Path, drift: str) -> dict:
    adata = simulate(20, n_doubles=10, cells_per_condition=200, likelihood="nb", drift=drift, seed=args.seed)
    splits = combination_splits(adata.obs["condition"], control="ctrl", n_folds=2, train_double_fraction=1.0,
                                seed=args.seed)
    folds = []
    for split in splits:
        print(f"simulated {drift}, fold {split.fold}: test {', '.join(split.test)}", flush=True)
        train, test = split_anndata(adata, split, control="ctrl")
        folds.append(compare(
            train, test, root / "runs" / f"{drift}_fold{split.fold}", root / f"{drift}_fold{split.fold}",
            configs=args.config, fit_kwargs={"steps": args.steps}, seed=args.seed,
            data_kwargs={"perturbation_key": "condition", "control": "ctrl", "size_factor_key": LIBRARY_SIZE_KEY},
        ))
    return {"folds": folds, "mean": _pool(folds)}


def norman(args, root: Path) -> dict:
    adata = anndata.read_h5ad(args.data)
    adata = adata[adata.obs["dataset"] == "norman19"].copy()
    (split,) = combination_splits(adata.obs["condition"], control="control", n_folds=1, train_double_fraction=1.0)
    print(f"norman19: test {', '.join(split.test)}", flush=True)
    train, test = split_anndata(adata, split, control="control")
    fit_kwargs = {"steps": args.steps, "n_top_genes": args.genes}
    name = "norman19"
    if args.norman_batches:
        train.obs["gem_group"] = gem_groups(train.obs_names)
        fit_kwargs["batch_key"] = "gem_group"
        name = "norman19_gem_groups"
    result = compare(
        train, test, root / "runs" / name, root / name, configs=args.config, fit_kwargs=fit_kwargs, seed=args.seed,
        data_kwargs={"perturbation_key": "condition", "control": "control", "total_counts_key": "ncounts"},
    )
    return {**result, "mean": {m: r["mean"] for m, r in result["methods"].items()}}


def gem_groups(barcodes) -> np.ndarray:
    """The 10x GEM group (lane) of each cell: its barcode's suffix after the last ``-``."""
    return np.array([str(barcode).rsplit("-", 1)[-1] for barcode in barcodes])


def _pool(folds: list[dict]) -> dict:
    """Mean over every held-out condition of all folds, per method."""
    pooled = {}
    for method in folds[0]["methods"]:
        rows = [row for fold in folds for row in fold["methods"][method]["per_condition"]]
        with warnings.catch_warnings():  # no_change has no Pearson delta (its shift is 0): nan
            warnings.simplefilter("ignore", RuntimeWarning)
            pooled[method] = {m: float(np.nanmean([row[m] for row in rows])) for m in METRICS}
    return pooled


def plot(results: dict, path: Path) -> None:
    settings = list(results)
    fig, axes = plt.subplots(len(settings), len(METRICS), figsize=(3 * len(METRICS), 2.8 * len(settings)),
                             squeeze=False)
    for row, setting in enumerate(settings):
        means = results[setting]["mean"]
        methods = list(means)
        for col, metric in enumerate(METRICS):
            ax = axes[row, col]
            ax.bar(methods, [means[m][metric] for m in methods], color=[f"C{i}" for i in range(len(methods))])
            ax.set_title(f"{setting}: {metric}", fontsize=8)
            ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    fig.suptitle("held-out doubles (lower is better for distances and RMSE, higher for Pearson)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args):
    root = Path(args.out).with_suffix("")
    results = {}
    for drift in args.simulated:
        results[f"simulated_{drift}"] = simulated(args, root, drift)
    if args.data:
        results["norman19"] = norman(args, root)
    out = write_json(args.out, {"settings": vars(args), **results})
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="perturbench_devel.h5ad (the Norman 2019 subset is scored)")
    parser.add_argument("--genes", type=int, default=100, help="genes modelled on norman19 (n_top_genes)")
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--config", nargs="+", default=[None],
                        help="model configurations, shipped names or TOML files, one LCD fit each (default: "
                             "lcd_linear); e.g. --config lcd_linear lcd_nonlinear")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--simulated", nargs="*", default=["linear", "nonlinear"], choices=["linear", "nonlinear"],
                        help="simulated drift families to score (none: only the real data)")
    parser.add_argument("--norman-batches", action="store_true",
                        help="model the Norman screen's 10x GEM groups (barcode suffixes) as batches")
    parser.add_argument("--out", default="results/predict_combinations.json")
    main(parser.parse_args())
