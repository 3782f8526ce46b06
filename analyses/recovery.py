"""How well do CLIPR's posterior edges recover known causal effects, and are they calibrated?

For simulated linear systems (docs/model.md, "The simulators": d genes, a fraction of them
perturbed, 200 cells per condition, Gaussian or NB observations) this fits the default model, runs
CLIPR on every posterior draw and scores against the true effect matrix:

* AUROC and AUPRC of ``prob_edge`` and of ``|mean|``,
* sign accuracy of the posterior mean on the true edges,
* calibration: the fraction of true effects (all ordered pairs, the true edges alone and the
  absent edges alone) inside the 50% and 90% highest-density intervals.

With ``--simulator independent`` the screens come from the tests' second simulator
(``tests/independent_screen.py``: another graph generator, effect and noise scales, no softplus,
every gene knocked down, library sizes the fit is not told), which checks that the defaults are
not tuned to our own simulator; ``gaussian`` observes the state with measurement noise, ``nb``
draws Poisson-log-normal counts.

Writes ``results/recovery.json`` and ``results/recovery.png``.
Run: ``uv run python analyses/recovery.py [--genes 20 100] [--fractions 0.3 0.5 1.0] [--seed 0 1 2]
[--set fit.steps=12000] [--sim-link exp] [--library-sizes panel] [--simulator independent] [--keep DIR]``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
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
from lcd_bayes.run import fit
from lcd_bayes.sim.graphs import effect_matrix
from lcd_bayes.sim.linear import LIBRARY_SIZE_KEY, simulate, truth_from_uns


def screen(args, genes: int, likelihood: str, fraction: float, seed: int):
    """The simulated screen, its true effects (source, target) and how the fit reads it."""
    if args.simulator == "independent":
        if fraction != 1.0:
            raise SystemExit("--simulator independent knocks down every gene: use --fractions 1.0")
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from independent_screen import independent_screen

        adata = independent_screen(genes, cells_per_condition=args.cells, seed=seed,
                                   observation="gaussian" if likelihood == "gaussian" else "counts")
        reading = {"perturbation_key": "perturbation", "control": "control"}
        return adata, effect_matrix(adata.uns["independent_truth"]["drift"]), reading
    adata = simulate(genes, n_perturbed=fraction, cells_per_condition=args.cells, likelihood=likelihood,
                     link=args.sim_link, seed=seed)
    reading = {"size_factor_key": LIBRARY_SIZE_KEY if args.library_sizes == "given" else None}
    return adata, truth_from_uns(adata)["effect"], reading


def score(folder: Path, truth: np.ndarray) -> dict:
    tree, _table = clipr_run(folder)
    return clipr_scores(tree, truth)


def refinement_record(attrs) -> dict:
    """How the posterior was refined, from the run's attributes (docs/inference.md, refinements)."""
    keys = ("inference", "refinement_skipped", "laplace_seconds", "laplace_newton_step", "laplace_potential_drop",
            "laplace_capped", "nuts_seconds", "nuts_divergences", "nuts_mean_tree_size")
    return {key: getattr(attrs[key], "item", lambda: attrs[key])() for key in keys if key in attrs}


def plot(rows: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for likelihood, marker in (("gaussian", "o"), ("nb", "s")):
        for genes in sorted({r["genes"] for r in rows}):
            sel = [r for r in rows if r["likelihood"] == likelihood and r["genes"] == genes]
            fractions = [r["perturbed_fraction"] for r in sel]
            label = f"{likelihood}, d={genes}"
            axes[0].plot(fractions, [r["auroc_prob_edge"] for r in sel], marker=marker, label=label)
            line, = axes[1].plot(fractions, [r["coverage90_all"] for r in sel], marker=marker, label=f"{label}, all pairs")
            axes[1].plot(fractions, [r["coverage90_edges"] for r in sel], marker=marker, linestyle="--",
                         color=line.get_color(), label=f"{label}, true edges")
    axes[0].set(xlabel="fraction of genes perturbed", ylabel="AUROC of prob_edge", ylim=(0.4, 1.02))
    axes[1].axhspan(0.8, 0.97, color="0.9", label="target 80-97%")
    axes[1].set(xlabel="fraction of genes perturbed", ylabel="coverage by the 90% HDI", ylim=(0, 1))
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def overrides(assignments: list[str]) -> dict:
    """``["fit.steps=12000", "model.interaction_global_scale=0.3"]`` -> ``RunConfig.replace`` sections."""
    sections: dict = {}
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        section, dot, name = key.partition(".")
        if not (sep and dot):
            raise SystemExit(f"--set takes SECTION.KEY=VALUE (e.g. fit.steps=12000), got {assignment!r}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value  # a bare string such as guide=mean_field
        sections.setdefault(section, {})[name] = parsed
    return sections


def seed_means(rows: list[dict]) -> list[dict]:
    """One row per setting with every score averaged over the data seeds (a single simulated
    screen's coverage varies by about +-0.06 from seed to seed)."""
    settings = sorted({(r["genes"], r["likelihood"], r["perturbed_fraction"]) for r in rows})
    means = []
    for genes, likelihood, fraction in settings:
        group = [r for r in rows if (r["genes"], r["likelihood"], r["perturbed_fraction"]) == (genes, likelihood, fraction)]
        numeric = [k for k, v in group[0].items() if isinstance(v, float) and all(r.get(k) is not None for r in group)]
        means.append({"genes": genes, "likelihood": likelihood, "perturbed_fraction": fraction,
                      "seeds": [r["seed"] for r in group], **{k: float(np.mean([r[k] for r in group])) for k in numeric}})
    return means


def main(args):
    config = load_config(args.config).replace(fit={"guide": args.guide}).replace(**overrides(args.set))
    rows = []
    for genes in args.genes:
        for likelihood in args.likelihoods:
            for fraction in args.fractions:
                for seed in args.seed:
                    adata, truth, reading = screen(args, genes, likelihood, fraction, seed)
                    start = time.perf_counter()
                    with tempfile.TemporaryDirectory() as tmp:
                        folder = Path(args.keep or tmp) / f"run_d{genes}_{likelihood}_{fraction}_seed{seed}"
                        run = fit(adata, folder, config=config, likelihood=likelihood, seed=seed, progress=False,
                                  **reading)
                        row = {"simulator": args.simulator, "genes": genes, "likelihood": likelihood, "perturbed_fraction": fraction,
                               "seed": seed, "sim_link": args.sim_link, "link": run.config.model.link,
                               "library_sizes": "not told" if args.simulator == "independent" else args.library_sizes,
                               "library": run.config.model.library, "guide": config.fit.resolved_guide(genes), "refine": run.config.fit.refine,
                               "steps": int(run.fit.losses.size), "skipped_steps": int(run.fit.skipped_steps),
                               "finite": bool(np.isfinite(run.fit.losses).all()),
                               "overrides": args.set, "final_loss": float(np.median(run.fit.losses[-200:])),
                               **score(folder, truth), **refinement_record(run.posterior["posterior"].attrs),
                               "seconds": time.perf_counter() - start}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    means = seed_means(rows)
    if len(args.seed) > 1:
        for row in means:
            print("mean over seeds:", json.dumps(row), flush=True)
    out = write_json(args.out, rows)
    plot(means, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--genes", type=int, nargs="+", default=[20, 100])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.3, 0.5, 1.0])
    parser.add_argument("--likelihoods", nargs="+", default=["gaussian", "nb"])
    parser.add_argument("--cells", type=int, default=200)
    parser.add_argument("--seed", type=int, nargs="+", default=[0],
                        help="data (and fit) seeds; with several, the scores are also averaged over them")
    parser.add_argument("--config", default=None,
                        help="model configuration, a shipped name or a TOML file (default: lcd_linear)")
    parser.add_argument("--guide", default=None, help="override [fit] guide: mean_field | low_rank | row_block")
    parser.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE",
                        help="override the model TOML, e.g. --set fit.steps=12000 model.interaction_global_scale=0.3")
    parser.add_argument("--sim-link", choices=("softplus", "exp"), default="softplus",
                        help="the simulator's count link (count likelihoods); the fit's is [model] link")
    parser.add_argument("--library-sizes", choices=("given", "panel"), default="given",
                        help="given: the fit is told the simulated library sizes; panel: it estimates them "
                             "from the panel's totals, as for a real screen without whole-transcriptome totals")
    parser.add_argument("--simulator", choices=("ours", "independent"), default="ours",
                        help="ours: lcd_bayes.sim.linear; independent: the tests' second simulator "
                             "(tests/independent_screen.py, every gene knocked down, library sizes not told)")
    parser.add_argument("--out", default="results/recovery.json")
    parser.add_argument("--keep", default=None, metavar="DIR",
                        help="keep each fitted run folder under DIR (to inspect the posterior), not in a temporary one")
    main(parser.parse_args())
