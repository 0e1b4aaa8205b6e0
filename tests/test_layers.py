"""The package's house: layers that import only downward, no import circle (imports inside functions counted), no
private name taken from another module, no module over 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ackd_search"
# Bottom to top. A module may import its own layer (no circle) and those below it, never one above.
LAYERS = [
    ("core", ["ackd_search.errors", "ackd_search.files", "ackd_search.notices", "ackd_search.models",
              "ackd_search.config", "ackd_search.data", "ackd_search.distill"]),
    ("train", ["ackd_search.training"]),
    ("search", ["ackd_search.searching"]),
    ("view", ["ackd_search.view"]),
    ("backends", ["ackd_search.backends"]),
    ("api", ["ackd_search.api"]),
    ("cli", ["ackd_search.cli"]),
]
# Inside the core the order above holds too: each of its packages imports only those before it.


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def owner(name: str, known: dict[str, Path]) -> str | None:
    """The module of the package that `name` (a module or a module's attribute) belongs to."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str, path: Path, known: dict[str, Path]) -> list[tuple[str, str, int]]:
    """(imported module, imported name or '', line) for every import in the file, at any depth."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, "", node.lineno) for alias in node.names if alias.name.startswith("ackd_search")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            if not base.startswith("ackd_search"):
                continue
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.append((target if target in known else base, alias.name, node.lineno))
    return found


def rank(module: str) -> tuple[int, int]:
    for index, (_, prefixes) in enumerate(LAYERS):
        for sub, prefix in enumerate(prefixes):
            if module == prefix or module.startswith(prefix + "."):
                return index, (sub if index == 0 else 0)
    return -1, 0  # the package's face: its version, read by all, and the API it re-exports


def test_every_import_goes_down_or_sideways_and_names_no_private_member() -> None:
    known = modules()
    problems = []
    for module, path in known.items():
        for target, name, line in imports(module, path, known):
            target_module = owner(target, known)
            if target_module is None or target_module == module:
                continue
            if rank(target_module) > rank(module) and module != "ackd_search" and target_module != "ackd_search":
                problems.append(f"{path.name}:{line} {module} imports {target_module}, a higher layer")
            if name.startswith("_") and not name.startswith("__"):
                problems.append(f"{path.name}:{line} {module} imports the private name {target_module}.{name}")
    assert problems == []


def test_no_import_circle_even_through_imports_inside_functions() -> None:
    known = modules()
    faces = {m for m, p in known.items() if p.name == "__init__.py"}  # a package's face re-exports: not a room
    graph = {m: set() for m in known if m not in faces}
    for module in graph:
        for target, _, _ in imports(module, known[module], known):
            target_module = owner(target, known)
            if target_module in graph and target_module != module:
                graph[module].add(target_module)
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_no_module_is_over_400_lines() -> None:
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := p.read_text().count("\n")) > 400}
    assert long == {}


def test_the_walk_sees_imports_inside_functions(tmp_path: Path) -> None:
    """The checker itself: an import placed inside a function, to dodge a circle, is still an edge."""
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from ackd_search.cli import main\n    return main\n")
    found = imports("ackd_search.training.m", path, {**modules(), "ackd_search.training.m": path})
    assert ("ackd_search.cli.main", "main", 2) in found or ("ackd_search.cli", "main", 2) in found
    assert rank("ackd_search.cli") > rank("ackd_search.training.loop")
