"""Command line: a thin layer over the Python API (its commands: README.md, "Command line")."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

from .config import BASELINES, GENE_RANKINGS, REFINEMENTS

# JAX runs on a GPU when its CUDA build is installed (`lcd-bayes[gpu]`), else on the CPU;
# JAX_PLATFORMS=cpu forces the CPU.
os.environ.setdefault("MPLBACKEND", "Agg")  # figures go to files: never open a window
# jaxlib's CPU LAPACK calls (Cholesky, solves) go through OpenBLAS, whose threads fight XLA's
# own: on a busy 2-core machine a small solve ran ~100x slower multi-threaded.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _add_simulate(sub):
    p = sub.add_parser(
        "simulate", help="simulate a perturbation screen from a random linear LCD",
        epilog="example: lcd-bayes simulate --genes 20 --perturbations 20 --cells-per-perturbation 200 "
               "--seed 0 --out sim.h5ad",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--genes", type=int, default=20, help="number of genes d")
    p.add_argument("--perturbations", type=int, default=None, help="genes perturbed once (default: all)")
    p.add_argument("--doubles", type=int, default=0, help="random double perturbations of perturbed genes")
    p.add_argument("--cells-per-perturbation", type=int, default=200, help="cells per condition (and control)")
    p.add_argument("--likelihood", choices=("nb", "poisson", "gaussian"), default="nb")
    p.add_argument("--link", choices=("softplus", "exp"), default="softplus",
                   help="expected count = size factor x link(latent) x gene scale (count likelihoods)")
    p.add_argument("--expected-degree", type=float, default=10.0)
    p.add_argument("--drift", choices=("linear", "nonlinear"), default="linear",
                   help="latent drift family: nonlinear saturates regulation, so doubles do not add up")
    p.add_argument("--times", default=None, metavar="0.1,0.5,1,5",
                   help="time course: cells of each condition at these times after its shift "
                        "switched on in control cells (obs['time']), instead of the stationary state")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output .h5ad")
    p.set_defaults(func=_simulate)


def _simulate(args):
    from .analysis.predict import parse_times
    from .sim.linear import simulate

    adata = simulate(
        args.genes, n_perturbed=args.perturbations, n_doubles=args.doubles,
        cells_per_condition=args.cells_per_perturbation, likelihood=args.likelihood,
        link=args.link, expected_degree=args.expected_degree, drift=args.drift, seed=args.seed,
        times=None if args.times is None else parse_times(args.times),
    )
    adata.write_h5ad(args.out)
    print(f"wrote {args.out}: {adata.n_obs} cells x {adata.n_vars} genes, "
          f"{adata.obs['condition'].nunique()} conditions (truth in uns['lcd_truth'])")


def _add_fit(sub):
    p = sub.add_parser(
        "fit", help="fit a latent causal diffusion by SVI and write a run folder",
        epilog="examples:\n  lcd-bayes fit sim.h5ad --out runs/sim\n"
               "  lcd-bayes fit screen.h5ad --out runs/screen --control non-targeting --layer counts "
               "--config lcd_linear --steps 8000",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("data", help="AnnData .h5ad file")
    p.add_argument("--out", required=True, help="run folder (an unfinished fit there resumes)")
    p.add_argument("--config", default=None, metavar="NAME_OR_PATH",
                   help="model configuration: a shipped one by name (lcd_linear, the default; lcd_nonlinear) "
                        "or a TOML file; a run's config.toml repeats that run (options given here override it)")
    p.add_argument("--perturbation-key", default=None,
                   help="obs column with condition labels (default: the config's [data], 'condition')")
    p.add_argument("--control", default=None, help="label of control cells (default: the config's, 'ctrl')")
    p.add_argument("--sep", default=None, help="separator of combination labels (default: the config's, '+')")
    p.add_argument("--targets", default=None, help="JSON mapping label -> list of target genes")
    p.add_argument("--likelihood", choices=("nb", "zip", "poisson", "gaussian"), default=None,
                   help="observation model (default: the config's, nb)")
    p.add_argument("--layer", default=None, help="layer with raw counts (default: layers['counts'] or X)")
    p.add_argument("--steps", type=int, default=None, help="maximum SVI steps (default: the config's)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: the config's, 0)")
    p.add_argument("--n-top-genes", type=int, default=None,
                   help="model at most this many genes: the targets of --predict-targets, then those of the "
                        "training labels, then the best by --gene-ranking on the cells of DATA (pass training "
                        "cells only)")
    p.add_argument("--gene-ranking", choices=GENE_RANKINGS, default=None,
                   help="how --n-top-genes ranks genes after the targets: 'response' (largest standardized shift "
                        "of any condition against the control), 'variance' of log1p-normalized expression, "
                        "'dispersion' (scanpy's seurat flavour); default: the config's, 'response'")
    p.add_argument("--predict-targets", default=None, metavar="A+B,C",
                   help="conditions you will predict (no cells needed): their target genes join the "
                        "--n-top-genes panel first")
    p.add_argument("--total-counts-key", default=None,
                   help="X is log1p-normalized: convert to counts with this obs column of total counts")
    p.add_argument("--size-factor-key", default=None,
                   help="obs column of library sizes for size factors (default: totals of the counts); "
                        "`simulate` writes 'size_factor'")
    p.add_argument("--batch-key", default=None, metavar="COLUMN",
                   help="obs column of each cell's batch (10x lane, replicate, donor): fits a technical scale per "
                        "batch and gene and a shift of the basal drift per batch, pooled across batches "
                        "(default: the config's, none)")
    p.add_argument("--refine", choices=REFINEMENTS, default=None,
                   help="after SVI, replace the guide's too narrow draws: 'laplace' by the Laplace approximation "
                        "near the guide's mean (seconds to minutes at 20 genes; calibrates both likelihoods), "
                        "'nuts' by a NUTS chain whitened by the guide (~2 min at 20 genes with Gaussian data, "
                        "closer still; hours for counts on a CPU), 'none' keeps them; default: the config's "
                        "('auto': laplace up to ~40 genes, none beyond)")
    p.add_argument("--restart", action="store_true",
                   help="discard an unfinished fit in --out (its checkpoint) and start afresh; without it an "
                        "unfinished fit there resumes, and one of other data or settings is refused")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_fit)


def _fit(args):
    from .config import load_config

    # Settings, --out and the data are checked before the model loads, so a refusal takes about a
    # second; the settings are read even before anndata is imported, in a fraction of one.
    config = load_config(args.config)
    from .io.fit_inputs import fit_inputs

    inputs = fit_inputs(
        args.data, args.out, config=config, perturbation_key=args.perturbation_key, control=args.control,
        sep=args.sep, targets=args.targets, likelihood=args.likelihood, layer=args.layer, steps=args.steps,
        seed=args.seed, n_top_genes=args.n_top_genes, gene_ranking=args.gene_ranking,
        predict_targets=args.predict_targets, total_counts_key=args.total_counts_key,
        size_factor_key=args.size_factor_key, batch_key=args.batch_key, refine=args.refine,
    )
    _load_jax()
    from .api import fit

    _print_fit(fit(inputs, restart=args.restart, progress=not args.no_progress))


def _check_run(folder: str) -> None:
    """Refuse a folder without a finished fit before the model loads; then load JAX."""
    from .io.run_folder import require_finished

    require_finished(folder)
    _load_jax()


def _load_jax() -> None:
    """JAX, with the CLI's cache of compiled programs; called once the input has been checked."""
    from .config import use_compilation_cache

    use_compilation_cache()


def _print_fit(run):
    import numpy as np

    from .analysis.ppc import GROUP, format_ppc, ppc_table
    from .analysis.summary import format_top_edges, interaction_table

    attrs = run.posterior["posterior"].attrs
    losses = run.posterior["svi"]["loss"].values
    status = "converged" if attrs.get("converged") else "stopped at the step limit (not converged)"
    skipped = int(attrs.get("skipped_steps", 0))
    print(f"SVI {status} after {losses.size} steps in {attrs['fit_seconds']:.0f} s; "
          f"final ELBO {-np.nanmean(losses[-100:]):.6g}" + (f"; {skipped} non-finite steps skipped" if skipped else ""))
    if "nuts_seconds" in attrs:
        print(f"NUTS refinement: {attrs['nuts_seconds']:.0f} s, {attrs['nuts_divergences']} divergent draws, "
              f"{attrs['nuts_mean_tree_size']:.0f} leapfrog steps per draw")
    if "refinement_skipped" in attrs:
        print(f"credible intervals: {attrs['refinement_skipped']}")
    elif attrs.get("inference") == "SVI":
        print(f"credible intervals: the guide's, too narrow to be calibrated; {_calibrating_refinement(run.config)} "
              "calibrates them (docs/inference.md)")
    if "laplace_seconds" in attrs:
        print(f"Laplace refinement: {attrs['laplace_seconds']:.0f} s; intervals widened by a median "
              f"{attrs['laplace_median_widening']:.2f}x along the guide's directions, "
              f"{attrs['laplace_negative_curvature']} of them curved the wrong way; centred "
              f"{attrs['laplace_newton_step']:g} of a Newton step from the guide's mean")
    ppc = ppc_table(run.posterior[GROUP]) if GROUP in run.posterior.children else None
    if ppc is not None:  # before the edges: whether the fit reproduces its data says whether to read them
        print(format_ppc(ppc))
    print(format_top_edges(interaction_table(run.posterior)))
    if run.folder is not None:
        print(f"run folder: {run.folder} (posterior.nc, elbo.csv, config.toml{', ppc.csv' if ppc is not None else ''})")


def _calibrating_refinement(config) -> str:
    """The refinements measured to calibrate this likelihood at 20 genes (docs/inference.md): the
    default Laplace step for both; a NUTS chain is closer still with Gaussian data, where it costs
    minutes (hours with counts)."""
    if config.model.likelihood == "gaussian":
        return "`--refine laplace` (the default) or the slower, closer `--refine nuts`"
    return "`--refine laplace` (the default)"


def _add_clipr(sub):
    p = sub.add_parser(
        "clipr", help="causal effects with credible intervals by CLIPR on every posterior draw",
        description="Apply CLIPR to every posterior drift draw of a run; writes RUN/clipr.nc "
                    "(effect draws and their summary) and RUN/edges.csv (one row per ordered gene pair).",
        epilog="example: lcd-bayes clipr runs/sim --tau 0.5 --hdi-prob 0.9",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", help="run folder written by `lcd-bayes fit`")
    p.add_argument("--ridge", type=float, default=None,
                   help="Tikhonov ridge relative to trace(L L^T)/genes (default: 1e-6)")
    p.add_argument("--tau", type=float, default=None,
                   help="effect size that counts as an edge (default: 0.1 x the median self-decay)")
    p.add_argument("--hdi-prob", type=float, default=0.9, help="mass of the credible intervals (default: 0.9)")
    p.add_argument("--top", type=int, default=10, help="edges to print (default: 10)")
    p.add_argument("--no-synthetic", action="store_true",
                   help="use only the trained single perturbations as responses (no one-unit probes on "
                        "genes no perturbation targets)")
    p.set_defaults(func=_clipr)


def _clipr(args):
    _check_run(args.run)
    from .analysis.clipr import clipr_run, format_edges

    _, table = clipr_run(args.run, ridge=args.ridge, tau=args.tau, hdi_prob=args.hdi_prob,
                         synthetic=not args.no_synthetic)
    print(format_edges(table, args.top))
    print(f"wrote {Path(args.run) / 'clipr.nc'} and {Path(args.run) / 'edges.csv'} ({len(table)} gene pairs)")


def _add_calibrate(sub):
    p = sub.add_parser(
        "calibrate", help="check a run's intervals on screens drawn from its own posterior (one fit each)",
        description="Draw screens of the run's design from its posterior (one draw as the truth each), fit "
                    "each with the run's settings, and report how often CLIPR's 50% / 90% intervals hold the "
                    "drawn truth's effects. Writes RUN/calibration.csv. Costs one fit per replicate.",
        epilog="example: lcd-bayes calibrate runs/sim --replicates 3",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("run", help="run folder written by `lcd-bayes fit`")
    p.add_argument("--replicates", type=int, default=3, help="screens drawn and fitted")
    p.add_argument("--seed", type=int, default=0, help="which posterior draws and cells")
    p.set_defaults(func=_calibrate)


def _calibrate(args):
    if args.replicates < 1:
        raise ValueError(f"--replicates must be a positive number of refits, not {args.replicates}")
    _check_run(args.run)
    from .calibration import calibration_run, format_calibration

    table = calibration_run(args.run, replicates=args.replicates, seed=args.seed)
    print(format_calibration(table))
    print(f"wrote {Path(args.run) / 'calibration.csv'}")


def _add_interactions(sub):
    p = sub.add_parser(
        "interactions", help="genetic-interaction types of doubles (additive, synergistic, buffering, epistatic, "
                             "neomorphic), each with its posterior probability",
        description="Decompose each double's predicted shift on its singles' (Norman et al. 2019) in every "
                    "posterior draw and report how probable each interaction type is. Writes "
                    "RUN/interactions.csv and RUN/interactions.png. Only the nonlinear drift can predict "
                    "non-additive doubles.",
        epilog='example: lcd-bayes interactions runs/screen --doubles "A+B,C+D" --data screen.h5ad',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("run", help="run folder written by `lcd-bayes fit`")
    p.add_argument("--doubles", default=None,
                   help='doubles, comma-separated: "A+B,C+D" (default: every double in training)')
    p.add_argument("--data", default=None,
                   help=".h5ad with the doubles', their singles' and control cells: adds the observed types")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_interactions)


def _interactions(args):
    _check_run(args.run)
    from .analysis.interactions import format_interactions
    from .api import load

    table = load(args.run).interactions(args.doubles, observed=args.data, seed=args.seed)
    print(format_interactions(table))
    for name in ("interactions.csv", "interactions.png"):
        print(f"wrote {Path(args.run) / name}")


def _add_report(sub):
    p = sub.add_parser(
        "report", help="figures of a run: ELBO trace, edge heatmap, forest plot, network",
        description="Write PNG figures into the run folder (runs `clipr` first if RUN/clipr.nc is missing).",
        epilog="example: lcd-bayes report runs/sim --prob-threshold 0.9 --top 20",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("run", help="run folder written by `lcd-bayes fit`")
    p.add_argument("--prob-threshold", type=float, default=0.9, help="edge probability drawn in the network")
    p.add_argument("--top", type=int, default=20, help="edges in the forest plot")
    p.set_defaults(func=_report)


def _report(args):
    _check_run(args.run)
    from .pl import report_run

    for path in report_run(args.run, prob_threshold=args.prob_threshold, top=args.top):
        print(f"wrote {path}")


def _add_predict(sub):
    p = sub.add_parser(
        "predict", help="predicted cells of perturbation conditions (combinations of trained labels, or "
                        "single perturbations of modelled genes) from a run's posterior",
        epilog='example: lcd-bayes predict runs/sim --perturbations "G1+G2,G3" --cells 500 --out pred.h5ad',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("run", help="run folder written by `lcd-bayes fit`")
    p.add_argument("--perturbations", required=True, help='conditions, comma-separated: "A+B,C"')
    p.add_argument("--cells", type=int, default=100, help="cells per condition")
    p.add_argument("--draws", type=int, default=100, help="posterior draws the cells cycle over")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--times", default=None, metavar="0.1,0.5,1,5",
                   help="time course: cells at these times (model units, >= 0) after the "
                        "perturbation switches on in control cells, and the mean trajectory with 90%% "
                        "intervals in OUT_trajectories.csv and OUT_trajectories.png")
    p.add_argument("--batch", default=None,
                   help="for a run fitted with --batch-key: predict cells of this batch (default: each cell's "
                        "batch drawn in proportion to the training cells')")
    p.add_argument("--out", default=None, help="output .h5ad (default: RUN/predictions.h5ad)")
    p.set_defaults(func=_predict)


def _predict(args):
    from .files import check_writable_folder

    start = time.perf_counter()
    out = Path(args.out) if args.out else Path(args.run) / "predictions.h5ad"
    if out.is_dir():
        raise FileExistsError(f"--out {out} is a folder; name the .h5ad file to write")
    check_writable_folder(out.parent, what=f"--out {out}: its folder")  # before any compute
    _check_run(args.run)
    from .api import load

    adata = load(args.run).predict(args.perturbations, n_cells=args.cells, n_draws=args.draws, seed=args.seed,
                                   times=args.times, batch=args.batch)
    _write_prediction(adata, out, start)
    if args.times is not None:
        from .analysis.predict import trajectory_table
        from .pl import save_trajectories

        table = trajectory_table(adata)
        stem = out.with_suffix("")
        table.to_csv(f"{stem}_trajectories.csv", index=False)
        save_trajectories(table, f"{stem}_trajectories.png")
        print(f"wrote {stem}_trajectories.csv ({len(table)} rows: condition, time, gene, mean, q05, q50, q95) "
              f"and {stem}_trajectories.png")


def _write_prediction(adata, out: Path, start: float) -> None:
    from .files import atomic_write

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out) as tmp:
        adata.write_h5ad(tmp)
    info = adata.uns["lcd_bayes"]
    key = info["perturbation_key"]
    print(f"wrote {out}: {adata.n_obs} cells x {adata.n_vars} genes ({info['space']}), "
          f"{adata.obs[key].nunique()} conditions in obs[{key!r}], by {info['method']}, "
          f"in {time.perf_counter() - start:.1f} s")


def _add_baseline(sub):
    p = sub.add_parser(
        "baseline", help="predicted cells from a baseline (no change, additive, linear) fitted to training data",
        epilog='example: lcd-bayes baseline train.h5ad --method additive --perturbations "A+B" --out additive.h5ad',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("data", help="training AnnData .h5ad")
    p.add_argument("--method", choices=BASELINES, required=True)
    p.add_argument("--perturbations", required=True, help='conditions, comma-separated: "A+B,C"')
    p.add_argument("--cells", type=int, default=None, help="cells per condition (default: as many as control)")
    p.add_argument("--perturbation-key", default="condition")
    p.add_argument("--control", default="ctrl")
    p.add_argument("--sep", default="+")
    p.add_argument("--layer", default=None)
    p.add_argument("--total-counts-key", default=None,
                   help="obs column of library sizes, when X is log1p-normalized instead of counts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output .h5ad")
    p.set_defaults(func=_baseline)


def _baseline(args):
    from .analysis.baselines import predict_baseline
    from .io.run_folder import read_h5ad

    start = time.perf_counter()
    adata = predict_baseline(
        read_h5ad(args.data), args.perturbations.split(","), method=args.method, n_cells=args.cells,
        perturbation_key=args.perturbation_key, control=args.control, sep=args.sep, layer=args.layer,
        total_counts_key=args.total_counts_key, seed=args.seed,
    )
    _write_prediction(adata, Path(args.out), start)


def _add_evaluate(sub):
    p = sub.add_parser(
        "evaluate", help="score predicted cells against observed cells (energy distance, MMD, Pearson delta, RMSE)",
        description="Compare each predicted condition with the observed cells of the same condition on "
                    "library-normalized log1p expression of the predicted genes. Writes metrics.csv "
                    "(per condition), metrics.json (with the aggregate) and mean_shift.png.",
        epilog="example: lcd-bayes evaluate pred.h5ad heldout.h5ad --out pred_evaluation",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("prediction", help="predicted cells (.h5ad from `predict` or `baseline`)")
    p.add_argument("observed", help="observed cells (.h5ad) with the same conditions and control cells")
    p.add_argument("--out", default=None, help="output folder (default: <prediction stem>_evaluation/)")
    p.add_argument("--perturbation-key", default=None, help="default: the prediction's")
    p.add_argument("--control", default=None, help="label of control cells (default: the prediction's)")
    p.add_argument("--layer", default=None, help="layer of the observed file to read")
    p.add_argument("--total-counts-key", default=None,
                   help="obs column of library sizes, when the observed X is log1p-normalized")
    p.add_argument("--top-de", type=int, default=20, help="genes in the top-DE Pearson delta")
    p.add_argument("--seed", type=int, default=0, help="seed of cell subsampling (over 1000 cells)")
    p.set_defaults(func=_evaluate)


def _evaluate(args):
    from .analysis.evaluation import evaluate_files

    table, aggregate, out = evaluate_files(
        args.prediction, args.observed, args.out, perturbation_key=args.perturbation_key,
        control=args.control, layer=args.layer, total_counts_key=args.total_counts_key,
        n_top_de=args.top_de, seed=args.seed,
    )
    columns = ["condition", "energy_distance", "mmd", "pearson_delta_all", "pearson_delta_top_de", "rmse_mean"]
    print(table[[c for c in columns if c in table.columns]].to_string(index=False, float_format="%.3f"))
    means = aggregate["mean"]
    print("mean over conditions: " + ", ".join(f"{k} {means[k]:.3f}" for k in columns[1:] if k in means))
    print(f"wrote {out / 'metrics.csv'}, {out / 'metrics.json'}, {out / 'mean_shift.png'}")


def _add_demo(sub):
    p = sub.add_parser(
        "demo", help="simulate -> fit -> clipr -> report on an embedded default (20 genes, NB counts)",
        epilog="example: lcd-bayes demo --out lcd-demo",
    )
    p.add_argument("--out", default="lcd-demo", help="folder for the simulated data and the run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--refine", choices=REFINEMENTS, default=None,
                   help="how the guide's posterior is refined (default: the config's 'auto', here laplace: "
                        "calibrated intervals, about doubling the time; none: the guide's, too narrow)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_demo)


def _demo(args):
    import shutil

    import numpy as np

    _load_jax()
    from .analysis.clipr import clipr_run
    from .analysis.recovery import interval_coverage, recovery_against_truth
    from .api import fit
    from .config import load_config
    from .pl import report_run
    from .sim.linear import LIBRARY_SIZE_KEY, simulate, truth_from_uns

    start = time.perf_counter()
    out = Path(args.out)
    if (out / "run" / "posterior.nc").exists():
        shutil.rmtree(out / "run")  # the demo always starts afresh
    out.mkdir(parents=True, exist_ok=True)
    adata = simulate(20, cells_per_condition=200, likelihood="nb", seed=args.seed)
    adata.write_h5ad(out / "sim.h5ad")
    print(f"simulated {adata.n_obs} cells x {adata.n_vars} genes, every gene perturbed once "
          f"(NB counts through a softplus link, the simulator's protocol; truth in {out / 'sim.h5ad'})")
    # Fitted with the link the data were drawn through; real screens take the default, exp.
    config = load_config(None).replace(model={"link": "softplus"})
    run = fit(adata, out / "run", config=config, steps=args.steps, seed=args.seed, size_factor_key=LIBRARY_SIZE_KEY,
              refine=args.refine, progress=not args.no_progress)
    _print_fit(run)
    truth = truth_from_uns(adata)["effect"]
    scores = recovery_against_truth(run.posterior, truth)
    print(f"recovery of the {scores['n_edges']} true edges: AUROC {scores['auroc']:.3f}, "
          f"AUPRC {scores['auprc']:.3f}, sign accuracy {scores['sign_accuracy']:.3f}")
    tree, table = clipr_run(out / "run")
    print(f"CLIPR edge table: {out / 'run' / 'edges.csv'} ({len(table)} ordered gene pairs)")
    true_edges = (truth != 0) & ~np.eye(len(truth), dtype=bool)
    coverage = [interval_coverage(tree["posterior"]["effect"], truth, prob, true_edges) for prob in (0.5, 0.9)]
    print(f"the 50% / 90% credible intervals hold {coverage[0]:.0%} / {coverage[1]:.0%} of the true edges' effects")
    figures = report_run(out / "run")
    print("figures: " + ", ".join(str(path) for path in figures))
    print(f"demo finished in {time.perf_counter() - start:.0f} s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lcd-bayes",
        description="Bayesian latent causal diffusions for single-cell perturbation screens.",
        epilog="example: lcd-bayes demo",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_simulate, _add_fit, _add_clipr, _add_calibrate, _add_report, _add_predict, _add_interactions,
                _add_baseline, _add_evaluate, _add_demo):
        add(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (what schedulers send before they kill a job), handled as Ctrl-C: a fit saves its
    checkpoint and stops."""


def _terminate(signum, frame):
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .diagnostics import DataError, FitError
    from .files import UnwritableError

    # Only the main thread may set a handler (main() called from another thread keeps the default).
    handles_sigterm = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if handles_sigterm else None
    try:
        args.func(args)
    except (DataError, FitError, FileNotFoundError, FileExistsError, UnwritableError, ValueError) as error:
        print(f"lcd-bayes {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interruption:
        print("terminated" if isinstance(interruption, Terminated) else "interrupted", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(interruption, Terminated) else signal.SIGINT)
    finally:
        if handles_sigterm:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
