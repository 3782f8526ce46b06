"""The package's layers import one way (docs/README.md, "Code layout"), without cycles."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lcd_bayes"
# What each layer may import besides itself (the package root re-exports the API).
ALLOWED = {
    "config": set(),
    "io": {"config"},
    "dynamics": {"config"},
    "model": {"dynamics", "config"},
    "inference": {"model", "dynamics", "config"},
    "sim": {"dynamics", "io", "config"},
    "analysis": {"inference", "model", "dynamics", "io", "config"},
    "pl": {"analysis", "inference", "model", "dynamics", "io", "config"},
    "run": {"pl", "analysis", "sim", "inference", "model", "dynamics", "io", "config"},
    "calibration": {"run", "pl", "analysis", "sim", "inference", "model", "dynamics", "io", "config"},
    "api": {"calibration", "run", "pl", "analysis", "sim", "inference", "model", "dynamics", "io", "config"},
    "cli": {"api", "calibration", "run", "pl", "analysis", "sim", "inference", "model", "dynamics", "io", "config"},
}


# The package's warning category may be raised, and its atomic writes made, anywhere.
for allowed in ALLOWED.values():
    allowed |= {"diagnostics", "files"}
ALLOWED["diagnostics"] = set()
ALLOWED["files"] = set()


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports, anywhere in the file (lazy imports included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names if alias.name.split(".")[0] == "lcd_bayes"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            if base.split(".")[0] != "lcd_bayes":
                continue
            for alias in node.names:
                out.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return out


def layer(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else None  # None: the package root


def test_layers_import_downward_only():
    known = modules()
    wrong = []
    for name, path in known.items():
        own = layer(name)
        for target in imports(name, path, known):
            other = layer(target)
            if own is not None and other is not None and other != own and other not in ALLOWED[own]:
                wrong.append(f"{name} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    known = modules()
    graph = {name: imports(name, path, known) & set(known) for name, path in known.items()}
    state: dict[str, int] = {}

    def visit(name, trail):
        state[name] = 1
        for target in graph[name]:
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*trail, name, target]))
            if target not in state:
                visit(target, [*trail, name])
        state[name] = 2

    for name in graph:
        if name not in state:
            visit(name, [])
