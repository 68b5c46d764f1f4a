"""The package layout: no import circle anywhere, no subsystem above a third of the code, and the
dependency rules the packages' docstrings state."""

from __future__ import annotations

import ast

import pytest

from import_graph import PACKAGE_DIR, circles, import_graph, lines_per_package, module_files


def test_no_import_circles():
    assert circles(import_graph()) == []


def test_the_counter_finds_a_circle(tmp_path):
    pkg = tmp_path / "raceguard"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("")
    (pkg / "a" / "x.py").write_text("def f():\n    from . import y\n")  # a lazy import counts
    (pkg / "a" / "y.py").write_text("from ..a.x import f\n")
    (pkg / "b.py").write_text("import raceguard.a.y\n")
    assert circles(import_graph(pkg)) == [["raceguard.a.x", "raceguard.a.y"]]


def test_no_package_above_a_third_of_the_lines():
    counts = lines_per_package()
    total = sum(counts.values())
    assert max(counts.values()) <= total / 3, counts


# Which top-level packages each subsystem may import (the arrows of the data flow; docstrings say why).
ALLOWED = {
    "engine": set(),
    "report": {"config", "version"},
    "capture": {"engine", "report"},
    "sync": {"capture", "engine", "hazards", "report", "schedule"},  # primitives are scheduling points
    "hazards": {"capture", "engine", "report"},
    "cuda": {"capture", "engine", "report"},
    "distributed": {"capture", "engine", "report"},
    "multiprocess": {"capture", "engine", "report"},
}


@pytest.mark.parametrize("subsystem", sorted(ALLOWED))
def test_subsystems_import_only_downstream(subsystem):
    graph = import_graph()
    top = {m.split(".")[1] for m in graph if m.count(".") >= 1}
    offending = set()
    for module, targets in graph.items():
        parts = module.split(".")
        if len(parts) < 2 or parts[1] != subsystem:
            continue
        for target in targets:
            tparts = target.split(".")
            if len(tparts) >= 2 and tparts[1] in top and tparts[1] != subsystem and tparts[1] not in ALLOWED[subsystem]:
                offending.add(f"{module} -> {target}")
    assert not offending, sorted(offending)


def test_every_package_says_what_it_owns():
    for module, (path, is_package) in module_files().items():
        if is_package and module.count(".") == 1:
            doc = ast.get_docstring(ast.parse(path.read_text()))
            assert doc and len(doc) > 40, f"{path} needs a docstring saying what the package owns"


def test_public_import_paths():
    import raceguard
    import raceguard.hypothesis
    import raceguard.pytest_plugin
    import raceguard.report

    assert callable(raceguard.watch) and callable(raceguard.benign) and raceguard.__version__
    assert PACKAGE_DIR.name == "raceguard"
