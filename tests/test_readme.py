"""The README's notebook example runs as written, and the README stays a short user guide."""
import re
from pathlib import Path

import matplotlib
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_example() -> str:
    section = README.read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_is_a_short_user_guide():
    assert len(README.read_text().splitlines()) <= 250


@pytest.mark.slow
def test_python_api_example_runs_as_written(tmp_path, monkeypatch):
    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)  # it saves to runs/sim
    namespace = {}
    exec(compile(python_example(), str(README), "exec"), namespace)
    run, edges, cells = namespace["run"], namespace["edges"], namespace["cells"]
    assert (tmp_path / "runs" / "sim" / "posterior.nc").exists()
    assert run.folder == Path("runs/sim") and len(edges) == 8 * 7
    assert cells.n_obs == 400 and namespace["adata"].varp["lcd_bayes_prob_edge"].shape == (8, 8)
