"""The import graph of the four packages, read with `ast` (every import, inside functions and
under TYPE_CHECKING too): no cycle, and each package imports only what its layer may."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("search_spaces", "models", "serving", "studies")
# package -> top-level names it must never import
FORBIDDEN = {
    "models": {"optuna", "mlflow", "studies", "serving", "search_spaces"},
    "search_spaces": {"studies", "models", "serving", "mlflow", "keras", "tensorflow"},
    "serving": {"studies", "optuna"},
}


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported module, line) for every import in the file; `from pkg import sub` names the submodule."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub if sub in known else base, node.lineno))
    return found


def graph() -> tuple[dict[str, Path], dict[str, list[tuple[str, int]]]]:
    known = modules()
    return known, {name: imports(name, path, known) for name, path in known.items()}


def is_command(path: Path) -> bool:
    tree = ast.parse(path.read_text())
    return any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges.get(v, ()):
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_anywhere():
    known, found = graph()
    edges = {name: {target for target, _ in targets if target in known} for name, targets in found.items()}
    assert cycles(edges) == []


def test_every_import_of_ours_names_a_module_that_exists():
    """An import left behind by a move (e.g. inside a function, unseen until it runs) fails here."""
    known, found = graph()
    wrong = [f"{name}:{line} imports {target}" for name, targets in found.items() for target, line in targets
             if target.split(".")[0] in PACKAGES and target not in known]
    assert wrong == []


def test_each_layer_imports_only_what_it_may():
    _, found = graph()
    wrong = [f"{name}:{line} imports {target}" for name, targets in found.items() for target, line in targets
             if target.split(".")[0] in FORBIDDEN.get(name.split(".")[0], ())]
    assert wrong == []


def test_nothing_imports_a_command():
    known, found = graph()
    commands = {name for name, path in known.items() if is_command(path)}
    assert {"studies.run", "studies.select", "studies.replay", "studies.compare", "studies.dashboard",
            "serving.batch.__main__", "serving.__main__"} <= commands
    wrong = [f"{name}:{line} imports the command {target}" for name, targets in found.items() for target, line in targets
             if target in commands and target != name]
    assert wrong == []


def test_no_two_modules_share_a_name():
    """A module's own name says its role: no `report`/`reports`, no two `registry` modules."""
    known = modules()
    leaves: dict[str, list[str]] = {}
    for name, path in known.items():
        if path.name not in ("__init__.py", "__main__.py"):  # a package's own entry points
            leaves.setdefault(name.rpartition(".")[2].lstrip("_"), []).append(name)
    shared = {leaf: names for leaf, names in leaves.items() if len(names) > 1}
    assert shared == {}


def test_the_checker_sees_a_cycle_and_a_wrong_direction(tmp_path):
    """The rules above can fail: a two-module loop is found, a forbidden import is named."""
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from studies.run import main\n")
    assert imports("models.m", path, {"studies.run": path}) == [("studies.run", 2)]
