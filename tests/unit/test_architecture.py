"""The module map in docs/architecture.md is the import graph: no circles, the core free of Celery."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "orchestrator"
#: Modules that must run without Celery, kombu or billiard's pool (billiard's exception type is allowed:
#: policy catches the soft limit a prefork child raises).
NO_CELERY = {
    "registry",
    "store",
    "plan",
    "policy",
    "batches",
    "breaker",
    "breaker_storage",
    "models",
    "views",
    "database",
    "notifications",
    "settings",
    "hosts",
    "deadline",
    "errors",
    "clock",
    "runners",
    "rescue",
}


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(modules of this package it imports, third-party top-level names it imports)."""
    name = _module(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    own: set[str] = set()
    other: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
            module = ".".join([*base, node.module] if node.module else base)
            own.update(
                {f"{module}.{a.name}".strip(".") for a in node.names} if node.module is None else {module}
            )
        elif isinstance(node, ast.ImportFrom) and node.module:
            other.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            other.update(a.name.split(".")[0] for a in node.names)
    return {m for m in own if m and m != name}, other


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        if path.name != "__main__.py" and _module(path):
            graph[_module(path)] = _imports(path)[0]
    return graph


def _documented() -> dict[str, set[str]]:
    table = (ROOT / "docs" / "architecture.md").read_text()
    rows = re.findall(r"^\| `([\w.]+)` \| [^\n]*? \| ([^|\n]*) \|$", table, flags=re.M)
    return {
        m: set() if deps.strip() == "nothing" else {d.strip() for d in deps.split(",")} for m, deps in rows
    }


def test_every_module_is_on_the_map_with_what_it_imports() -> None:
    documented = _documented()
    for module, imports in _graph().items():
        if module == "cli":
            continue  # the package re-exports cli.commands.main
        assert module in documented, f"{module} is missing from docs/architecture.md"
        if "anything above" in " ".join(documented[module]):
            continue
        assert imports <= documented[module], f"{module} imports {sorted(imports - documented[module])}"


def test_the_import_graph_has_no_circle() -> None:
    graph = _graph()
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import circle: {' -> '.join((*path, module))}"
        if module in done:
            return
        for dep in graph.get(module, ()):
            visit(dep, (*path, module))
        done.add(module)

    for module in graph:
        visit(module, ())


def test_the_core_runs_without_celery() -> None:
    for module in NO_CELERY:
        _, third_party = _imports(PACKAGE / f"{module}.py")
        assert not third_party & {"celery", "kombu"}, f"{module} imports {third_party & {'celery', 'kombu'}}"
