"""The package's modules import each other without cycles (also through imports inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

import featcircuit

PACKAGE = Path(featcircuit.__file__).parent


def import_graph(package: Path) -> nx.DiGraph:
    """``module → module`` for every import of a sibling module, at any depth of the file."""
    mods = {p.stem for p in package.glob("*.py")}
    g = nx.DiGraph()
    g.add_nodes_from(mods)
    for p in package.glob("*.py"):
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                parts = (node.module or "").split(".")
                if node.level == 1:  # from .x import y / from . import x
                    targets = [parts[0]] if node.module else [a.name for a in node.names]
                elif parts[0] == package.name:  # from featcircuit.x import y / from featcircuit import x
                    targets = parts[1:2] or [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name.split(".")[1] for a in node.names if a.name.startswith(package.name + ".")]
            g.add_edges_from((p.stem, t) for t in targets if t in mods and t != p.stem and t != "__init__")
    return g


def test_the_checker_sees_a_cycle(tmp_path):
    pkg = tmp_path / "featcircuit"
    pkg.mkdir()
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f():\n    from featcircuit import c\n")
    (pkg / "c.py").write_text("import featcircuit.a\n")
    assert [sorted(c) for c in nx.simple_cycles(import_graph(pkg))] == [["a", "b", "c"]]


def test_no_import_cycles():
    cycles = sorted(sorted(c) for c in nx.simple_cycles(import_graph(PACKAGE)))
    assert cycles == [], f"import cycles: {cycles}"
