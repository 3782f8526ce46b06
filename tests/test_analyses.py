"""Smoke tests of the ``analyses/`` scripts at tiny sizes: each runs its ``__main__`` in this process
(``runpy``, with its command line in ``sys.argv``) and its written results are checked. They guard
the scripts against API changes; the numbers themselves mean nothing at these sizes. Those that fit
a model are in the slow tier."""
from __future__ import annotations

import json
import math
import runpy
import sys
from pathlib import Path

import pytest

ANALYSES = Path(__file__).resolve().parents[1] / "analyses"

# A fit as small as the scripts allow: few steps, few draws, a short stationary recursion, no
# refinement unless a test asks for it (the Laplace step dominates a tiny fit's time) and no
# posterior predictive check (whose verdict on such a fit means nothing).
TINY_CONFIG = """\
[model]
n_doublings = 12

[fit]
steps = 60
min_steps = 60
steps_per_chunk = 20
checkpoint_every = 20
num_posterior_samples = 20
refine = "{refine}"
ppc = false
"""
# Fits this short leave some drift draws at the stability limit, and the scripts let lcd_bayes say so.
AT_STABILITY_LIMIT = "ignore:.*posterior drift draws sat at the stability limit:lcd_bayes.diagnostics.LcdBayesWarning"


def run_script(name: str, *args: str, cwd: Path, monkeypatch) -> None:
    """``python analyses/<name>.py <args>`` in this process, from ``cwd``."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [str(ANALYSES / f"{name}.py"), *args])
    runpy.run_path(str(ANALYSES / f"{name}.py"), run_name="__main__")


def tiny_config(folder: Path, refine: str = "none") -> str:
    path = folder / "tiny.toml"
    path.write_text(TINY_CONFIG.format(refine=refine))
    return str(path)


def finite(*values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def test_scripts_have_smoke_tests():
    """Every script in analyses/ has a test here."""
    tested = {name.removeprefix("test_") for name in globals() if name.startswith("test_")}
    assert {path.stem for path in ANALYSES.glob("*.py")} <= tested


def test_benchmark_startup(tmp_path, monkeypatch):
    run_script("benchmark_startup", "--repeats", "1", "--out", "out.json", cwd=tmp_path, monkeypatch=monkeypatch)
    rows = json.loads((tmp_path / "out.json").read_text())
    assert rows["--help"]["exit_code"] == 0 and rows["fit: bad setting"]["exit_code"] == 2
    assert "learning_rate" in rows["fit: bad setting"]["last_line"]
    assert all(finite(row["median_seconds"]) for row in rows.values())


def test_benchmark_clipr(tmp_path, monkeypatch):
    run_script("benchmark_clipr", "--genes", "6", "--draws", "4", "--chunk-size", "2", "--out", "out.json",
               cwd=tmp_path, monkeypatch=monkeypatch)
    (row,) = json.loads((tmp_path / "out.json").read_text())
    assert row["genes"] == 6 and row["draws"] == 4
    assert finite(row["clipr_seconds"], row["summary_seconds"], row["peak_rss_gib"]) and row["peak_rss_gib"] > 0


@pytest.mark.slow
def test_benchmark_fit(tmp_path, monkeypatch):
    run_script("benchmark_fit", "--genes", "8", "--cells", "10", "--likelihoods", "gaussian", "--config",
               tiny_config(tmp_path), "--step-fit-steps", "40", "--whole-fit-up-to", "8", "--repeats", "1",
               "--out", "out.json", cwd=tmp_path, monkeypatch=monkeypatch)
    results = json.loads((tmp_path / "out.json").read_text())
    (entry,) = results["runs"]
    assert entry["genes"] == 8 and entry["likelihood"] == "gaussian" and entry["cells"] == 90
    assert finite(entry["compile_seconds"], entry["step_seconds"], entry["median_seconds"], entry["median_auroc"])
    assert entry["step_seconds"] > 0 and len(entry["fits"]) == 1 and 0 <= entry["median_auroc"] <= 1


@pytest.mark.slow
@pytest.mark.filterwarnings(AT_STABILITY_LIMIT)
def test_benchmark_predict(tmp_path, monkeypatch):
    run_script("benchmark_predict", "--genes", "16", "--cells", "5", "--fit-steps", "20", "--repeats", "1",
               "--config", tiny_config(tmp_path), "--run", "run", "--out", "out.json", cwd=tmp_path,
               monkeypatch=monkeypatch)
    (row,) = json.loads((tmp_path / "out.json").read_text())
    assert row["genes"] == 16 and row["conditions"] == 10 and row["cells_per_condition"] == 5
    assert finite(row["first_call_seconds"], row["median_seconds"]) and row["median_seconds"] > 0
    assert (tmp_path / "run" / "config.toml").exists()


@pytest.mark.slow
def test_predict_combinations(tmp_path, monkeypatch):
    run_script("predict_combinations", "--simulated", "linear", "--steps", "40", "--config", tiny_config(tmp_path),
               "--out", "results/pc.json", cwd=tmp_path, monkeypatch=monkeypatch)
    results = json.loads((tmp_path / "results" / "pc.json").read_text())
    setting = results["simulated_linear"]
    assert len(setting["folds"]) == 2
    methods = set(setting["mean"])
    assert "lcd_tiny" in methods and len(methods) >= 2
    for scores in setting["mean"].values():
        assert finite(scores["energy_distance"], scores["rmse_mean"])
    assert (tmp_path / "results" / "pc.png").stat().st_size > 0
    assert (tmp_path / "results" / "pc" / "linear_fold0" / "lcd_tiny").is_dir()


@pytest.mark.slow
def test_gasperini(tmp_path, monkeypatch):
    """On a small simulated screen laid out as the Gasperini file is (counts, ``is_tss_target``,
    ``control``, co-infections and ``untracked`` cells to leave out)."""
    import numpy as np

    from lcd_bayes.sim.linear import simulate

    adata = simulate(5, cells_per_condition=30, likelihood="nb", link="exp", seed=1)
    labels = adata.obs["condition"].astype(str).replace({"ctrl": "control"}).to_numpy()
    labels[:3], labels[3:5] = "untracked", "G0+G1"
    adata.obs["condition"] = labels
    adata.obs["batch"] = np.where(np.arange(adata.n_obs) % 2, "b1", "b2")
    adata.var["is_tss_target"] = np.arange(adata.n_vars) < 3
    adata.write_h5ad(tmp_path / "screen.h5ad")
    run_script("gasperini", "--data", str(tmp_path / "screen.h5ad"), "--genes", "5", "--held-out", "G0",
               "--batch-key", "batch", "--config", tiny_config(tmp_path), "--out", "out.json", cwd=tmp_path,
               monkeypatch=monkeypatch)
    results = json.loads((tmp_path / "out.json").read_text())
    assert results["all"]["batches"]["batch_scale_sd"] > 0
    assert results["cells"] == adata.n_obs - 5 and results["targets"] == ["G0", "G1", "G2"]
    assert set(results["all"]["knockdowns"]) == {"G0", "G1", "G2"}
    assert all(0 <= k["prob_negative"] <= 1 for k in results["all"]["knockdowns"].values())
    (prediction,) = results["held_out"]["prediction"].values()
    assert finite(prediction["predicted_mean"], prediction["observed_mean"], *prediction["interval_90"])


@pytest.mark.slow
def test_recovery(tmp_path, monkeypatch):
    run_script("recovery", "--genes", "8", "--fractions", "1.0", "--likelihoods", "gaussian", "--cells", "10",
               "--config", tiny_config(tmp_path, refine="laplace"), "--out", "out.json", cwd=tmp_path,
               monkeypatch=monkeypatch)
    (row,) = json.loads((tmp_path / "out.json").read_text())
    assert row["genes"] == 8 and row["likelihood"] == "gaussian" and row["perturbed_fraction"] == 1.0
    assert row["refine"] == "laplace" and row["inference"].startswith("SVI + Laplace")
    assert finite(row["auroc_prob_edge"], row["auroc_abs_mean"], row["coverage90_all"], row["edge_slope"])
    assert 0 <= row["coverage50_all"] <= row["coverage90_all"] <= 1
    assert (tmp_path / "out.png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.filterwarnings(AT_STABILITY_LIMIT)
def test_batches(tmp_path, monkeypatch):
    run_script("batches", "--genes", "5", "--cells", "20", "--likelihood", "gaussian", "--seed", "0",
               "--config", tiny_config(tmp_path), "--out", "out.json", cwd=tmp_path, monkeypatch=monkeypatch)
    rows = json.loads((tmp_path / "out.json").read_text())
    assert [row["arm"] for row in rows] == ["batch-free", "modelled", "ignored"]
    assert [row["batches"] for row in rows] == [1, 3, 3]
    assert finite(rows[1]["batch_mean_shift_corr"], rows[1]["batch_technical_corr"], rows[0]["coverage90_edges"])
    assert (tmp_path / "out.png").stat().st_size > 0


@pytest.mark.slow
def test_recovery_on_the_independent_simulator(tmp_path, monkeypatch):
    run_script("recovery", "--simulator", "independent", "--genes", "6", "--fractions", "1.0", "--likelihoods",
               "nb", "--cells", "20", "--config", tiny_config(tmp_path), "--out", "out.json", cwd=tmp_path,
               monkeypatch=monkeypatch)
    (row,) = json.loads((tmp_path / "out.json").read_text())
    assert row["simulator"] == "independent" and row["genes"] == 6 and row["finite"]
    assert row["library"] == "latent"  # a 6-gene matrix's totals: the libraries are integrated out
    assert finite(row["auroc_prob_edge"], row["coverage90_edges"])


@pytest.mark.slow
@pytest.mark.filterwarnings(AT_STABILITY_LIMIT)
def test_recovery_drift(tmp_path, monkeypatch):
    run_script("recovery_drift", "--genes", "8", "--cells", "10", "--likelihoods", "gaussian", "--fractions", "1.0",
               "--out", "out.json", cwd=tmp_path, monkeypatch=monkeypatch)
    (row,) = json.loads((tmp_path / "out.json").read_text())
    assert row["genes"] == 8 and row["likelihood"] == "gaussian" and row["steps"] > 0
    assert finite(row["auroc"], row["seconds"]) and 0 <= row["auroc"] <= 1


@pytest.mark.slow
@pytest.mark.filterwarnings(AT_STABILITY_LIMIT)
def test_interactions(tmp_path, monkeypatch):
    config = tmp_path / "tiny_nonlinear.toml"
    config.write_text(TINY_CONFIG.format(refine="none").replace("[model]\n", '[model]\ndrift = "nonlinear"\n'
                                                                 "sim_particles = 8\n"))
    run_script("interactions", "--seeds", "0", "--genes", "6", "--doubles", "6", "--cells", "30", "--config",
               str(config), "--out", "results/gi.json", cwd=tmp_path, monkeypatch=monkeypatch)
    results = json.loads((tmp_path / "results" / "gi.json").read_text())
    held_out = results["simulated"]["seed0"]["held_out"]
    assert held_out["n_doubles"] == 3 and 0 <= held_out["coverage90_magnitude"] <= 1
    assert sum(held_out["truth_types"].values()) == 3
    assert (tmp_path / "results" / "gi" / "simulated_seed0.csv").exists()
    assert (tmp_path / "results" / "gi" / "simulated_seed0.png").stat().st_size > 0
