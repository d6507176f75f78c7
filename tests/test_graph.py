"""Tests for featcircuit.graph: construction, pruning, JSON/GraphML/DOT exports and rendering."""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import xml.etree.ElementTree as ET

import graphviz
import networkx as nx
import numpy as np
import pytest
import torch

from featcircuit import graph as graph_mod
from featcircuit.errors import UserError
from featcircuit.graph import (
    NEG_COLOR,
    POS_COLOR,
    CircuitGraph,
    _dot_text,
    format_table,
    node_id,
    parse_node_id,
)

TRICKY = {
    "resid3/0": 'say "hi" <b>&amp;</b> \\',       # quotes, HTML-looking, entity, trailing backslash
    "resid3/1": '"',
    "resid3/2": "line one\nline two",
    "mlp3/0": "literal \\n not a break",
    "mlp3/1": "é 😀 日本 ∑",
}

# Hand-built case: (src, dst, weight, abs_weight, count); -1 is the error node.
EDGES = [(0, 0, 1.0, 1.0, 5), (1, 0, -0.8, 0.8, 4), (0, 1, 0.5, 0.5, 3), (-1, -1, -0.3, 0.3, 2),
         (2, 1, 0.05, 0.05, 1)]
E = {"e0": ("resid3/0", "mlp3/0"), "e1": ("resid3/1", "mlp3/0"), "e2": ("resid3/0", "mlp3/1"),
     "e3": ("resid3/err", "mlp3/err"), "e4": ("resid3/2", "mlp3/1")}
STATS = {"mlp3/1": {"effect": 0.01, "freq": 0.25}, "resid3/1": {"effect": -2.0},
         "resid3/0": {"effect": None, "mean_act": 1.5, "max_act": float("nan")}, "out": {"effect": 0.0}}


def build(**kw) -> CircuitGraph:
    src, dst, w, aw, c = (list(x) for x in zip(*EDGES))
    kw.setdefault("node_stats", STATS)
    return CircuitGraph.from_edges(3, src, dst, w, aw, c, labels=TRICKY, meta={"model": "toy"}, **kw)


def edge_names(cg: CircuitGraph) -> set[str]:
    inv = {v: k for k, v in E.items()}
    return {inv[(u, v)] for u, v in cg.g.edges}


def test_node_ids_round_trip():
    for nid in ["resid0/0", "mlp12/345", "resid3/err", "mlp3/err", "out"]:
        assert node_id(*parse_node_id(nid)) == nid
    assert parse_node_id("mlp2/45") == ("mlp", 2, 45)
    assert parse_node_id("resid2/err") == ("resid", 2, "err")
    assert node_id("mlp", 2, -1) == "mlp2/err"
    for bad in ["mlp2/-1", "attn2/3", "mlp02/3", "mlp2/", "mlp2/3 ", "", "out2"]:
        with pytest.raises(UserError, match="expected resid"):
            parse_node_id(bad)
    with pytest.raises(UserError, match="-2"):
        node_id("mlp", 2, -2)


@pytest.mark.parametrize("kw, expected", [
    ({}, {"e0", "e1", "e2", "e3", "e4"}),
    ({"edge_threshold": 0.1}, {"e0", "e1", "e2", "e3"}),
    ({"edge_threshold": 0.5}, {"e0", "e1", "e2"}),           # abs_weight == threshold is kept
    ({"top_n": 2}, {"e0", "e1"}),
    ({"top_n": 0}, set()),
    ({"node_threshold": 0.1}, {"e0", "e1", "e3"}),           # mlp3/1 (effect 0.01) goes, with e2, e4
    ({"node_threshold": 0.1, "top_n": 3}, {"e0", "e1", "e3"}),  # node rule applies before top_n
    ({"node_threshold": 3.0}, {"e0", "e3"}),  # resid3/1 and mlp3/1 go; nodes without effect stay
    ({"edge_threshold": 0.4, "top_n": 10}, {"e0", "e1", "e2"}),
])
def test_pruning_keeps_expected_edges(kw, expected):
    cg = build(**kw)
    assert edge_names(cg) == expected
    endpoints = {n for u, v in cg.g.edges for n in (u, v)}
    assert set(cg.g.nodes) == endpoints | {"out"}  # no isolated nodes except out
    # re-pruning the unpruned graph (as from a saved file) gives the same result
    assert build().prune(**kw).to_json() == cg.to_json()


def test_prune_rejects_bad_thresholds():
    with pytest.raises(UserError, match="edge_threshold"):
        build().prune(edge_threshold=-1)
    with pytest.raises(UserError, match="top_n"):
        build().prune(top_n=-3)


def test_attributes_and_array_types():
    cg = build()
    n = cg.g.nodes
    assert n["resid3/0"]["label"] == TRICKY["resid3/0"]
    assert n["resid3/err"]["label"] == "resid3/err" and n["resid3/err"]["feature"] == -1
    assert n["resid3/0"]["max_act"] is None and n["resid3/0"]["mean_act"] == 1.5  # NaN -> None
    assert n["mlp3/1"]["freq"] == 0.25 and n["mlp3/1"]["site"] == "mlp" and n["mlp3/1"]["layer"] == 3
    assert cg.g.edges["resid3/1", "mlp3/0"] == {"weight": -0.8, "abs_weight": 0.8, "count": 4,
                                                "behav_weight": None, "delta": None}
    assert cg.meta == {"model": "toy", "layer": 3}
    # lists, numpy arrays and torch tensors (float32 and bfloat16) give the same graph
    src, dst, w, aw, c = (list(x) for x in zip(*EDGES))
    ref = CircuitGraph.from_edges(3, src, dst, np.float32(w).tolist(), np.float32(aw).tolist(), c)
    for conv in (np.array, lambda x: np.array(x, dtype=np.float32), torch.tensor):
        got = CircuitGraph.from_edges(3, conv(src), conv(dst), np.float32(w) if conv is np.array
                                      else conv(w), conv(np.float32(aw)), conv(c))
        assert got.to_json() == ref.to_json()
    bf = CircuitGraph.from_edges(3, torch.tensor(src), torch.tensor(dst),
                                 torch.tensor(w, dtype=torch.bfloat16), torch.tensor(aw), c)
    assert bf.g.edges["resid3/0", "mlp3/0"]["weight"] == 1.0
    with pytest.raises(ValueError, match="length"):
        CircuitGraph.from_edges(3, src, dst[:-1], w, aw, c)


def tricky_graph() -> CircuitGraph:
    src, dst, w, aw, c = (list(x) for x in zip(*EDGES))
    w[0] = 0.1 + 0.2                    # floats that need all 17 digits
    aw[0] = 0.30000000000000004
    w[2] = float(torch.tensor(1 / 3, dtype=torch.float32))
    return CircuitGraph.from_edges(3, src, dst, w, aw, c, behav_weight=[1e-300, None, float("nan"),
                                   -2.5, 0.0], delta=torch.tensor([0.125, float("nan"), 1.0, 2.0, 3.0]),
                                   node_stats=STATS, labels=TRICKY,
                                   meta={"model": 'gpt "x"\n', "prompt": ["é", None, 1.5]})


def test_json_round_trip_identical(tmp_path):
    cg = tricky_graph()
    d1 = cg.to_json()
    text1 = json.dumps(d1, indent=1)
    assert "NaN" not in text1 and "Infinity" not in text1
    d2 = CircuitGraph.from_json(json.loads(text1)).to_json()
    assert d2 == d1 and json.dumps(d2, indent=1) == text1
    assert [n["id"] for n in d1["nodes"]] == ["resid3/err", "resid3/0", "resid3/1", "resid3/2",
                                              "mlp3/err", "mlp3/0", "mlp3/1", "out"]
    assert [e["abs_weight"] for e in d1["edges"]] == sorted((e["abs_weight"] for e in d1["edges"]),
                                                            reverse=True)
    by_edge = {(e["source"], e["target"]): e for e in d1["edges"]}
    assert by_edge["resid3/0", "mlp3/0"]["weight"] == 0.1 + 0.2
    assert by_edge["resid3/0", "mlp3/1"]["weight"] == float(np.float32(1 / 3))
    assert by_edge["resid3/0", "mlp3/0"]["behav_weight"] == 1e-300
    assert by_edge["resid3/1", "mlp3/0"]["delta"] is None       # NaN tensor entry -> None
    assert by_edge["resid3/0", "mlp3/1"]["behav_weight"] is None
    # file round trip: save -> load -> save gives identical bytes
    p1, p2 = tmp_path / "a" / "graph.json", tmp_path / "graph2.json"
    cg.save_json(p1)
    loaded = CircuitGraph.load_json(p1)
    loaded.save_json(p2)
    assert p1.read_bytes() == p2.read_bytes()
    assert loaded.g.nodes["mlp3/1"]["label"] == TRICKY["mlp3/1"]
    assert loaded.meta == {"model": 'gpt "x"\n', "prompt": ["é", None, 1.5], "layer": 3}
    assert json.loads(p1.read_text())["schema"] == "featcircuit.graph"
    assert [p.name for p in p1.parent.iterdir()] == ["graph.json"]  # no temp files left


def _good() -> dict:
    return build(top_n=3).to_json()


def _drop(d, *path):
    obj = d
    for k in path[:-1]:
        obj = obj[k]
    del obj[path[-1]]
    return d


def _set(d, value, *path):
    obj = d
    for k in path[:-1]:
        obj = obj[k]
    obj[path[-1]] = value
    return d


@pytest.mark.parametrize("mutate, message", [
    (lambda d: _set(d, 7, "version"), "has schema version 7; this featcircuit reads version 1"),
    (lambda d: _set(d, "other.graph", "schema"), "has schema 'other.graph'; this featcircuit reads"),
    (lambda d: _drop(d, "schema"), "missing key 'schema'"),
    (lambda d: _drop(d, "nodes"), "missing key 'nodes'"),
    (lambda d: _set(d, {}, "edges"), "key 'edges' is {}; expected a JSON list"),
    (lambda d: _drop(d, "nodes", 1, "feature"), "node 1 ('resid3/1') is missing key 'feature'"),
    (lambda d: _drop(d, "edges", 0, "weight"), "edge 0 (resid3/0 -> mlp3/0) is missing key 'weight'"),
    (lambda d: _drop(d, "edges", 2, "source"), "edge 2 is missing key 'source'"),
    (lambda d: _set(d, "big", "edges", 0, "weight"), "key 'weight' is 'big'; expected a finite number"),
    (lambda d: _set(d, float("nan"), "edges", 1, "abs_weight"), "expected a finite number"),
    (lambda d: _set(d, 1.5, "edges", 1, "count"), "key 'count' is 1.5; expected an integer"),
    (lambda d: _set(d, "mlp9/9", "edges", 0, "target"), "refers to node 'mlp9/9', not in 'nodes'"),
    (lambda d: _set(d, "mlp3/x\ny", "nodes", 0, "id"), "has a bad id"),
    (lambda d: _set(d, 4, "nodes", 1, "layer"), "'resid'/4/1; its id says 'resid'/3/1"),
    (lambda d: _set(d, d["nodes"][1], "nodes", 2), "duplicate node id"),
    (lambda d: [1, 2], "expected a JSON object"),
])
def test_from_json_rejects_bad_input(mutate, message):
    with pytest.raises(UserError) as exc:
        CircuitGraph.from_json(mutate(_good()))
    msg = str(exc.value)
    assert message in msg and "\n" not in msg and msg.startswith("graph.json")


def test_load_json_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(UserError, match=re.escape(f"graph file {missing} not found")):
        CircuitGraph.load_json(missing)
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "featcircuit.graph", ')
    with pytest.raises(UserError, match=re.escape(f"{bad} is not valid JSON")):
        CircuitGraph.load_json(bad)
    future = tmp_path / "future.json"
    future.write_text(json.dumps(_set(_good(), 7, "version")))
    with pytest.raises(UserError, match=re.escape(
            f"{future} has schema version 7; this featcircuit reads version 1")):
        CircuitGraph.load_json(future)


def test_graphml_round_trip(tmp_path):
    cg = tricky_graph()
    cg.g.nodes["resid3/1"]["label"] = "bell\x07 tab\t"  # XML 1.0 cannot hold \x07
    path = cg.save_graphml(tmp_path / "c.graphml")
    h = nx.read_graphml(path)
    assert isinstance(h, nx.DiGraph)
    assert set(h.nodes) == set(cg.g.nodes)
    assert set(h.edges) == set(cg.g.edges)
    for u, v, d in cg.g.edges(data=True):
        hd = h.edges[u, v]
        assert hd["weight"] == d["weight"] and hd["abs_weight"] == d["abs_weight"]
        assert hd["count"] == d["count"]
        assert ("delta" in hd) == (d["delta"] is not None)  # None attributes are left out
    for n, d in cg.g.nodes(data=True):
        want = d["label"].replace("\x07", "\ufffd")
        assert h.nodes[n]["label"] == want and h.nodes[n]["feature"] == d["feature"]
        for k in ("freq", "mean_act", "max_act", "effect"):
            assert h.nodes[n].get(k) == d[k]  # None attributes are left out
    assert json.loads(h.graph["meta_json"]) == cg.meta
    assert [p.name for p in tmp_path.iterdir()] == ["c.graphml"]


def test_dot_text_escaping():
    quote = graphviz.quoting.quote
    assert quote(_dot_text("<b>x</b>")) == '"<b>x</b>"'  # not an HTML label
    assert quote(_dot_text('a"b\\c\nd&amp;\x01')) == '"a\\"b\\\\c\\nd&#38;amp; "'
    assert quote(_dot_text("\\")) == '"\\\\"'


def _dot_edges(src: str) -> dict[tuple[str, str], str]:
    return {(m[1], m[2]): m[3] for m in re.finditer(r'^\s*"?([\w/]+)"? -> "?([\w/]+)"? \[(.*)\]$',
                                                    src, re.M)}


def test_dot_colours_widths_and_layout():
    cg = build()
    src = cg.to_dot()
    assert "rankdir=BT" in src
    edges = _dot_edges(src)
    weights = {(u, v): d["weight"] for u, v, d in cg.g.edges(data=True)}
    assert set(weights) <= set(edges)
    widths = {}
    for e, w in weights.items():
        attrs = edges[e]
        assert f'color="{POS_COLOR if w > 0 else NEG_COLOR}"' in attrs
        widths[e] = float(re.search(r"penwidth=([\d.]+)", attrs)[1])
    order = sorted(weights, key=lambda e: abs(weights[e]))
    assert [widths[e] for e in order] == sorted(widths.values())
    assert widths[order[-1]] == 5.0 and widths[order[0]] == pytest.approx(0.5 + 4.5 * 0.05)
    # resid nodes share one rank=same row, the mlp nodes another; out has its own row on top
    rows = re.findall(r"subgraph (\w+) \{\s*rank=same\s*(.*?)\n\t\}", src, re.S)
    members = {name: set(re.findall(r'^\s*"?([\w/]+)"? \[', body, re.M)) for name, body in rows}
    assert members == {"row_resid3": {"resid3/err", "resid3/0", "resid3/1", "resid3/2"},
                       "row_mlp3": {"mlp3/err", "mlp3/0", "mlp3/1"}, "row_out0": {"out"}}
    assert re.search(r'"resid3/err" \[[^\]]*shape=triangle', src)
    assert re.search(r'"mlp3/0" \[[^\]]*shape=box style="rounded,filled"', src)


def _dot_nodes(src: str) -> dict[str, str]:
    return {m[1]: m[2] for m in re.finditer(r'^\s*"([\w/]+)" \[(.*?)\]$', src, re.M | re.S)}


def test_dot_flags_dense_nodes_shows_label_f1_and_widths_follow_delta():
    stats = {k: dict(v) for k, v in STATS.items()}
    stats["mlp3/0"] = {"freq": 0.05, "label_f1": 0.734}
    cg = build(node_stats=stats, delta=[0.002, None, -0.008, 0.004, None])
    src = cg.to_dot()
    nodes = _dot_nodes(src)
    # mlp3/1 is active on 25% of tokens: dense, flagged in its text and its border; mlp3/0 (5%) is not
    assert "DENSE: 25% of tokens" in nodes["mlp3/1"] and "dashed" in nodes["mlp3/1"]
    assert f'color="{NEG_COLOR}"' in nodes["mlp3/1"]
    assert "DENSE" not in nodes["mlp3/0"] and "dashed" not in nodes["mlp3/0"]
    assert "F1 0.73" in nodes["mlp3/0"]
    assert all("shape=triangle" in nodes[n] for n in ("resid3/err", "mlp3/err"))
    # pen width by |delta| where the search measured one: e2 (|Δ| 0.008) widest, then e3, e0
    edges = _dot_edges(src)
    width = {k: float(re.search(r"penwidth=([\d.]+)", edges[E[k]])[1]) for k in E}
    assert width["e2"] == 5.0 and width["e3"] == pytest.approx(0.5 + 4.5 * 0.5)
    assert width["e0"] == pytest.approx(0.5 + 4.5 * 0.25) and width["e1"] == width["e4"] == 0.5
    # the JSON carries label_f1 and the derived dense flag; a file without label_f1 still loads
    d = cg.to_json()
    node = {n["id"]: n for n in d["nodes"]}
    assert node["mlp3/0"]["label_f1"] == 0.734 and node["mlp3/1"]["dense"] is True
    assert node["mlp3/0"]["dense"] is False
    assert CircuitGraph.from_json(d).to_json() == d
    for n in d["nodes"]:
        del n["label_f1"]
    assert CircuitGraph.from_json(d).g.nodes["mlp3/0"]["label_f1"] is None


def test_table_rows_of_the_layer_flag_dense_ends():
    from featcircuit.attribution import EdgeTable
    from featcircuit.graph import table_rows

    w = torch.tensor([3.0, -2.0, 1.0], dtype=torch.float64)
    table = EdgeTable(2, 3, 2, torch.tensor([0, -1, 2]), torch.tensor([1, 1, 0]), w, w.abs(),
                      torch.tensor([4, 2, 1]), w.abs(), 10)
    freq = {"resid": [0.5, 0.0, 0.01], "mlp": [0.02, 0.2]}
    rows = table_rows(table, 2, 10, freq=freq, labels={"mlp2/1": "x"})
    assert [(r["source"], r["target"], r["dense"]) for r in rows] == [
        ("resid2/0", "mlp2/1", "both"), ("resid2/err", "mlp2/1", "target"), ("resid2/2", "mlp2/0", "")]
    assert rows[0]["mean_per_coact"] == pytest.approx(0.75) and rows[0]["target_label"] == "x"
    assert "both" in format_table(rows)


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz `dot` is not installed")
def test_render_svg_and_png_with_real_dot(tmp_path):
    cg = build()
    out = cg.render(tmp_path / "circuit.svg")
    assert out == tmp_path / "circuit.svg"
    assert (tmp_path / "circuit.dot").read_text(encoding="utf-8") == cg.to_dot()
    root = ET.parse(out).getroot()  # valid XML
    ns = "{http://www.w3.org/2000/svg}"
    titles = {t.text for t in root.iter(f"{ns}title")}
    texts = [t.text for t in root.iter(f"{ns}text")]
    assert set(cg.g.nodes) <= titles
    for n in cg.g.nodes:
        assert n in texts
    for label in TRICKY.values():  # every label shows literally; "\n" in a label is a line break
        for line in label.split("\n"):
            assert line in texts, (line, texts)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["circuit.dot", "circuit.svg"]
    png = cg.render(tmp_path / "sub" / "c.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(UserError, match="format 'jpg'"):
        cg.render(tmp_path / "c.jpg")


def test_render_without_dot_writes_dot_and_returns_none(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    cg = build()
    with caplog.at_level(logging.WARNING, logger=graph_mod.__name__):
        assert cg.render(tmp_path / "circuit.svg") is None
    dot_path = tmp_path / "circuit.dot"
    assert dot_path.read_text(encoding="utf-8") == cg.to_dot()
    assert not (tmp_path / "circuit.svg").exists()
    msg = caplog.text
    assert f"graphviz `dot` not found: wrote {dot_path}" in msg
    assert f"dot -Tsvg {dot_path} -o {tmp_path / 'circuit.svg'}" in msg
    assert "apt-get install graphviz" in msg


def test_top_edges_and_table():
    cg = build()
    rows = cg.top_edges(2)
    assert [(r["source"], r["target"]) for r in rows] == [E["e0"], E["e1"]]
    assert rows[0]["source_label"] == TRICKY["resid3/0"] and rows[1]["weight"] == -0.8
    assert set(rows[0]) == {"source", "target", "source_label", "target_label", "weight",
                            "abs_weight", "count", "delta", "dense"}
    lines = format_table(rows).splitlines()
    assert len(lines) == 4 and lines[0].split() == list(rows[0])
    end = lines[0].index("weight") + len("weight")  # numeric columns are right-aligned
    assert lines[2][:end].endswith("1") and lines[3][:end].endswith("-0.8")
    start = lines[0].index("source_label")          # text columns are left-aligned
    assert lines[3][start:].startswith('"')
    assert len(cg.top_edges(100)) == cg.g.number_of_edges()
    assert format_table([]) == "(no rows)"
    assert all(math.isfinite(r["abs_weight"]) for r in cg.top_edges(10))
