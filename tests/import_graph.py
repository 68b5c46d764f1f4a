"""The import graph of the raceguard package, read from the source with ``ast``.

Every import statement counts, including those inside functions (a lazy import is still an arrow
between two modules). ``python tests/import_graph.py`` (with raceguard importable) prints the circles and the lines per
top-level package; tests/test_layout.py asserts there are none.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from raceguard.engine.lockgraph import _strongly_connected_components

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "raceguard"


def module_files(package_dir: Path = PACKAGE_DIR) -> dict[str, tuple[Path, bool]]:
    """``{dotted module name: (path, is_package)}``; the bootstrap directory is not a package."""
    out = {}
    for path in package_dir.rglob("*.py"):
        if "bootstrap" in path.relative_to(package_dir).parts:
            continue
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        out[".".join(parts)] = (path, is_package)
    return out


def imports_of(module: str, path: Path, is_package: bool, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``module`` imports (``from X import name`` counts ``X.name``
    when that is a module, else ``X``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != module:
                found.add(target)
    return found


def import_graph(package_dir: Path = PACKAGE_DIR) -> dict[str, set[str]]:
    files = module_files(package_dir)
    known = set(files)
    return {m: imports_of(m, path, is_pkg, known) for m, (path, is_pkg) in files.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (the engine's Tarjan, which
    works on any graph)."""
    nodes = sorted(graph)
    components = _strongly_connected_components(nodes, {m: tuple(sorted(graph[m])) for m in nodes})
    return sorted(sorted(c) for c in components if len(c) > 1)


def lines_per_package(package_dir: Path = PACKAGE_DIR) -> dict[str, int]:
    """Lines of Python per top-level subpackage (modules directly in raceguard/ count as ``raceguard``)."""
    counts: dict[str, int] = {}
    for path in package_dir.rglob("*.py"):
        parts = path.relative_to(package_dir).parts
        key = parts[0] if len(parts) > 1 else "raceguard"
        counts[key] = counts.get(key, 0) + len(path.read_text().splitlines())
    return counts


if __name__ == "__main__":
    found = circles(import_graph())
    for component in found:
        print(f"{len(component)} modules: {' <-> '.join(component)}")
    total = sum(lines_per_package().values())
    for name, count in sorted(lines_per_package().items(), key=lambda kv: -kv[1]):
        print(f"{count:6d} {100 * count / total:4.1f}%  {name}")
    sys.exit(1 if found else 0)
