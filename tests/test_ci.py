"""How the tests run: CI runs the README's test command, and lcd_bayes's own warnings are errors."""
import ast
import re
import warnings
from pathlib import Path

import pytest

from lcd_bayes.diagnostics import LcdBayesWarning

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command_fast_tier_first():
    quick_start = re.search(r"## Quick start.*?```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    setup, tests = quick_start.strip().splitlines()
    assert "lcd-bayes demo" in setup
    assert tests in (ROOT / ".ci" / "run").read_text().splitlines()
    fast, slow = tests.split(" && ")
    assert '-m "not slow"' in fast and "-m slow" in slow and "--durations=15" in fast and "--durations=15" in slow


def test_our_warnings_are_errors_in_the_tests():
    with pytest.raises(LcdBayesWarning, match="raised"):
        warnings.warn("raised", LcdBayesWarning)


def test_every_warning_of_the_package_is_an_lcd_bayes_warning():
    """Each ``warnings.warn`` call in lcd_bayes passes ``LcdBayesWarning`` as its category."""
    untagged = []
    for path in (ROOT / "lcd_bayes").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("warnings.warn", "warn"):
                category = node.args[1] if len(node.args) > 1 else next(
                    (k.value for k in node.keywords if k.arg == "category"), None)
                if category is None or ast.unparse(category) != "LcdBayesWarning":
                    untagged.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not untagged, untagged
