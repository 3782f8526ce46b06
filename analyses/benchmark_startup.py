"""How fast does the command line answer when it has nothing to compute: ``--help`` and refusals
of bad input (a missing file, a bad setting, data without the perturbation column, a folder
without a finished fit). Each command runs ``--repeats`` times in a fresh process; the medians
are written to ``results/benchmark_startup.json``. Run: ``uv run python analyses/benchmark_startup.py``.
Timings on a shared machine are noisy: quote medians.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anndata
import numpy as np
import pandas as pd

from lcd_bayes.files import write_json


def commands(folder: Path) -> dict[str, list[str]]:
    """Each case's arguments, with the bad inputs it needs written into ``folder``."""
    cells = pd.DataFrame({"label": ["a"] * 20}, index=[f"c{i}" for i in range(20)])
    anndata.AnnData(np.ones((20, 3), dtype=np.float32), obs=cells).write_h5ad(folder / "no_conditions.h5ad")
    (folder / "bad.toml").write_text("[fit]\nlearning_rate = -0.1\n")
    (folder / "not_a_run").mkdir()
    return {
        "--help": ["--help"],
        "fit --help": ["fit", "--help"],
        "fit: bad setting": ["fit", str(folder / "no_conditions.h5ad"), "--out", str(folder / "run"),
                             "--config", str(folder / "bad.toml")],
        "fit: no such file": ["fit", str(folder / "missing.h5ad"), "--out", str(folder / "run")],
        "fit: bad data": ["fit", str(folder / "no_conditions.h5ad"), "--out", str(folder / "run")],
        "predict: not a run": ["predict", str(folder / "not_a_run"), "--perturbations", "A"],
    }


def main(args) -> None:
    command = [sys.executable, "-m", "lcd_bayes.cli"]  # what the lcd-bayes script runs
    # As on a user's machine, imports read compiled bytecode (pip compiles it on install; Python
    # writes it on first import). Where PYTHONDONTWRITEBYTECODE is set, as on our CI machines,
    # every process compiles every module again: anndata took 2.5 s to import instead of 0.8 s.
    env = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, arguments in commands(Path(tmp)).items():
            seconds = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                done = subprocess.run([*command, *arguments], capture_output=True, text=True, env=env)
                seconds.append(time.perf_counter() - start)
            rows[name] = {"median_seconds": statistics.median(seconds), "seconds": seconds,
                          "exit_code": done.returncode, "last_line": (done.stderr or done.stdout).strip().splitlines()[-1][:160]}
            print(f"{name:22s} {statistics.median(seconds):6.2f} s (exit {done.returncode})", flush=True)
    out = write_json(args.out, rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="results/benchmark_startup.json")
    main(parser.parse_args())
