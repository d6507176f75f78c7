"""Tests for featcircuit.graph: construction, pruning, JSON/GraphML/DOT exports and rendering."""

from __future__ import annotations

import json
import logging
import math
import re
import shlex
import shutil
import subprocess
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


# ---- cross-layer graphs (several layers, emb/out, prompt-mode positions) ---------------------

PROMPT = ["The", " cat", " sat", " on"]


def cross_nodes() -> dict:
    return {"emb@0": {}, "emb@1": {}, "resid0/3@0": {"activation": 1.5, "influence": 0.3, "label": "the"},
            "resid0/err@1": {}, "mlp0/7@1": {"activation": 0.5}, "mlp0/2@0": {},
            "resid1/2@2": {"influence": 0.6, "effect": 0.3}, "mlp1/err@3": {}, "out@3": {}}


def cross_edges() -> list:
    return [("emb@0", "resid0/3@0", {"weight": 1.0}), ("emb@1", "resid0/err@1", {"weight": -0.2}),
            ("resid0/3@0", "mlp0/7@1", {"weight": 0.3, "delta": 0.01}),
            ("resid0/err@1", "mlp0/7@1", {"weight": 0.1}), ("resid0/3@0", "mlp0/2@0", {"weight": 0.2}),
            ("mlp0/7@1", "resid1/2@2", {"weight": -0.7, "delta": -0.05}),
            ("mlp0/2@0", "resid1/2@2", {"weight": 0.4, "delta": 0.02}),
            ("resid1/2@2", "out@3", {"weight": 2.0, "delta": 0.08}),
            ("mlp1/err@3", "out@3", {"weight": 0.05})]


def cross_meta(**kw) -> dict:
    return {"model": "toy", "mode": "prompt", "metric": "logit_diff", "prompt": "The cat sat on",
            "prompt_tokens": PROMPT, **kw}


def cross_graph() -> CircuitGraph:
    return CircuitGraph.from_nodes_edges(cross_nodes(), cross_edges(), cross_meta())


def test_cross_layer_ids_parse_and_round_trip():
    from featcircuit.graph import NodeRef, parse_node

    cases = {"resid1/37@5": ("resid", 1, 37, 5), "mlp0/err@3": ("mlp", 0, -1, 3), "emb@5": ("emb", -1, -1, 5),
             "out@11": ("out", -1, -1, 11), "emb": ("emb", -1, -1, None), "out": ("out", -1, -1, None),
             "resid12/0": ("resid", 12, 0, None)}
    for nid, want in cases.items():
        ref = parse_node(nid)
        assert ref == NodeRef(*want)
        assert node_id(ref.site, ref.layer, ref.feature, ref.position) == nid
    assert parse_node_id("mlp0/err@3") == ("mlp", 0, "err") and parse_node_id("emb@2") == ("emb", -1, -1)
    for bad in ["resid1/37@", "resid1/37@05", "resid1/37@-1", "emb/3", "emb3", "logit@2", "out@2@3",
                "resid1/37 @5", "mlp/3@1"]:
        with pytest.raises(UserError, match="expected resid") as exc:
            parse_node(bad)
        assert "\n" not in str(exc.value) and repr(bad) in str(exc.value)
    with pytest.raises(UserError, match="bad position -1"):
        node_id("resid", 1, 3, -1)


def test_from_nodes_edges_builds_and_round_trips(tmp_path):
    cg = cross_graph()
    assert cg.mode == "prompt" and cg.layers == [0, 1]
    assert cg.meta["layers"] == [0, 1] and cg.meta["task"] is None  # defaults filled in
    n = cg.g.nodes
    assert n["emb@1"]["token"] == " cat" and n["out@3"]["token"] == " on"  # prompt tokens filled in
    assert n["resid0/3@0"]["token"] is None and n["resid0/3@0"]["position"] == 0
    assert n["mlp0/7@1"] | {} == {**n["mlp0/7@1"], "site": "mlp", "layer": 0, "feature": 7, "position": 1}
    e = cg.g.edges["emb@0", "resid0/3@0"]
    assert e == {"weight": 1.0, "abs_weight": 1.0, "count": 1, "behav_weight": None, "delta": None}
    # canonical order: up the stream, then position, then feature
    assert cg.sorted_nodes() == ["emb@0", "emb@1", "resid0/3@0", "resid0/err@1", "mlp0/2@0", "mlp0/7@1",
                                 "resid1/2@2", "mlp1/err@3", "out@3"]
    d1 = cg.to_json()
    assert d1["version"] == 2
    text = json.dumps(d1, indent=1)
    assert CircuitGraph.from_json(json.loads(text)).to_json() == d1
    p1, p2 = tmp_path / "g.json", tmp_path / "g2.json"
    cg.save_json(p1)
    CircuitGraph.load_json(p1).save_json(p2)
    assert p1.read_bytes() == p2.read_bytes()
    # GraphML keeps positions and tokens (None ones left out)
    h = nx.read_graphml(cg.save_graphml(tmp_path / "g.graphml"))
    assert h.nodes["resid1/2@2"]["position"] == 2 and h.nodes["emb@1"]["token"] == " cat"
    assert "position" not in nx.read_graphml(build().save_graphml(tmp_path / "one.graphml")).nodes["mlp3/0"]
    # pruning keeps the out node and drops isolated ones, as for one-layer graphs
    pruned = cg.prune(top_n=2)
    assert set(pruned.g.edges) == {("resid1/2@2", "out@3"), ("emb@0", "resid0/3@0")}
    assert "out@3" in pruned.g and pruned.mode == "prompt"


def test_corpus_mode_cross_layer_graph():
    nodes = {"resid0/1": {}, "mlp0/2": {}, "resid1/err": {}, "out": {}}
    edges = [("resid0/1", "mlp0/2", {"weight": 2.0, "abs_weight": 3.0, "count": 7}),
             ("mlp0/2", "resid1/err", {"weight": -1.0, "abs_weight": 1.0, "count": 2}),
             ("resid1/err", "out", {"weight": 0.5, "abs_weight": 0.5, "count": 2})]
    cg = CircuitGraph.from_nodes_edges(nodes, edges, {"model": "m", "mode": "corpus", "metric": "loss"})
    assert cg.mode == "corpus" and cg.g.edges["resid0/1", "mlp0/2"]["abs_weight"] == 3.0
    assert CircuitGraph.from_json(cg.to_json()).to_json() == cg.to_json()


@pytest.mark.parametrize("nodes, edges, meta, message", [
    ({**cross_nodes(), "resid1/x@2": {}}, None, None, "bad node id 'resid1/x@2'"),
    (None, [("mlp0/7@1", "resid0/3@0", {"weight": 1.0})], None, "goes down or sideways"),
    (None, [("resid0/3@0", "resid0/err@1", {"weight": 1.0})], None, "goes down or sideways"),
    ({**cross_nodes(), "resid0/3@2": {}}, [("resid0/3@2", "mlp0/7@1", {"weight": 1.0})], None,
     "goes back from position 2 to 1"),
    (None, [("emb@0", "resid0/9@0", {"weight": 1.0})], None, "refers to node 'resid0/9@0', not in nodes"),
    (None, [("emb@0", "resid0/3@0", {"weight": 1.0})] * 2, None, "duplicate edge"),
    (None, [("emb@0", "resid0/3@0", {"weight": 1.0, "abs_weight": 0.5})], None, "abs_weight 0.5 < |weight|"),
    (None, [("emb@0", "resid0/3@0", {"weight": float("nan")})], None, "expected finite numbers"),
    (None, [("emb@0", "resid0/3@0", {"weight": "1"})], None, "weight '1' or abs_weight"),
    (None, [("emb@0", "resid0/3@0", {"weight": 1.0, "count": -1})], None, "count -1"),
    (None, [("emb@0", "out@3")], None, "expected (source, target, attributes)"),
    (None, [("emb@0", "resid0/3@0", {"wieght": 1.0})], None, "unknown attribute 'wieght'"),
    ({**cross_nodes(), "resid0/3@0": {"position": 4}}, None, None,
     "has site/layer/feature@position 'resid'/0/3@4; its id says 'resid'/0/3@0"),
    ({**cross_nodes(), "resid0/3@0": {"influence": 1.5}}, None, None, "influence 1.5"),
    ({**cross_nodes(), "resid0/3@0": {"influence": 0.6}}, None, None, "node influences sum to 1.2"),
    ({**cross_nodes(), "resid0/3@0": {"activation": "big"}}, None, None, "activation 'big'"),
    ({**cross_nodes(), "resid0/3@0": {"colour": "red"}}, None, None, "unknown attribute 'colour'"),
    ({**cross_nodes(), "resid0/3@0": {"token": "x"}}, None, None, "only emb and out nodes"),
    ({**cross_nodes(), "emb@0": {"token": "A"}}, None, None, "has token 'A' but prompt token 0 is 'The'"),
    ({**cross_nodes(), "resid0/4": {}}, None, None, "'resid0/4' has no position in a prompt-mode graph"),
    ({**cross_nodes(), "resid0/4@9": {}}, None, None, "is at position 9, past the prompt's 4 tokens"),
    (None, None, {"mode": "prompts"}, "meta mode 'prompts'"),
    (None, None, {"metric": None}, "meta key 'metric' is None"),
    (None, None, {"layers": [0]}, "nodes at layer 1 but meta layers is [0]"),
    (None, None, {"prompt_tokens": []}, "needs meta prompt_tokens"),
])
def test_from_nodes_edges_rejects_what_breaks_the_spec(nodes, edges, meta, message):
    m = cross_meta()
    m.update(meta or {})
    with pytest.raises(UserError) as exc:
        CircuitGraph.from_nodes_edges(nodes or cross_nodes(), edges or cross_edges(), m)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_from_nodes_edges_mode_rules():
    nodes = {"resid0/1": {}, "mlp0/2": {}}
    edge = [("resid0/1", "mlp0/2", {"weight": 2.0})]
    with pytest.raises(UserError, match="lacks weight, abs_weight and count"):
        CircuitGraph.from_nodes_edges(nodes, edge, {"model": "m", "mode": "corpus", "metric": "x"})
    with pytest.raises(UserError, match="has no position in a prompt-mode graph"):
        CircuitGraph.from_nodes_edges(nodes, [], cross_meta())
    with pytest.raises(UserError, match="has a position in a corpus-mode graph"):
        CircuitGraph.from_nodes_edges({"emb@0": {}}, [], {"model": "m", "mode": "corpus", "metric": "x"})
    with pytest.raises(UserError, match="missing key 'mode'"):
        CircuitGraph.from_nodes_edges(nodes, [], {"model": "m", "metric": "x"})


def test_from_json_checks_cross_layer_files():
    d = cross_graph().to_json()
    bad = json.loads(json.dumps(d))
    first = bad["edges"][0]
    first["source"], first["target"] = first["target"], first["source"]
    with pytest.raises(UserError, match="is not a circuit edge: it goes down"):
        CircuitGraph.from_json(bad)
    bad = json.loads(json.dumps(d))
    bad["nodes"][0]["position"] = 3
    with pytest.raises(UserError, match="its id says 'emb'/-1/-1@0"):
        CircuitGraph.from_json(bad)
    bad = json.loads(json.dumps(d))  # a file without meta mode is only checked for mixed positions
    del bad["meta"]["mode"]
    bad["nodes"].append({**bad["nodes"][2], "id": "resid0/3", "position": None})
    with pytest.raises(UserError, match="has a position and 'resid0/3' has none"):
        CircuitGraph.from_json(bad)
    bad = json.loads(json.dumps(d))
    bad["nodes"][2]["influence"] = 0.9  # resid0/3@0; resid1/2@2 holds 0.6
    with pytest.raises(UserError, match="node influences sum to 1.5"):
        CircuitGraph.from_json(bad)
    bad = json.loads(json.dumps(d))
    bad["meta"]["prompt_tokens"] = PROMPT[:2]
    with pytest.raises(UserError, match="past the prompt's 2 tokens"):
        CircuitGraph.from_json(bad)


def test_version_1_files_still_load():
    # a graph file exactly as version 1 wrote it (before positions, tokens, activation, influence)
    v1 = {"schema": "featcircuit.graph", "version": 1, "meta": {"model": "toy", "layer": 3},
          "nodes": [{"id": "resid3/0", "site": "resid", "layer": 3, "feature": 0, "label": "a", "freq": 0.5,
                     "mean_act": 1.0, "max_act": 2.0, "effect": None, "label_f1": 0.5, "dense": True},
                    {"id": "mlp3/err", "site": "mlp", "layer": 3, "feature": -1, "label": "mlp3/err",
                     "freq": None, "mean_act": None, "max_act": None, "effect": None, "dense": False},
                    {"id": "out", "site": "out", "layer": -1, "feature": -1, "label": "out", "freq": None,
                     "mean_act": None, "max_act": None, "effect": 0.0, "dense": False}],
          "edges": [{"source": "resid3/0", "target": "mlp3/err", "weight": -1.0, "abs_weight": 2.0,
                     "count": 3, "behav_weight": None, "delta": 0.5}]}
    cg = CircuitGraph.from_json(v1)
    assert cg.mode == "corpus" and cg.layers == [3]
    assert cg.g.nodes["resid3/0"]["position"] is None and cg.g.nodes["resid3/0"]["activation"] is None
    assert cg.g.nodes["resid3/0"]["label_f1"] == 0.5 and cg.g.nodes["mlp3/err"]["label_f1"] is None
    d2 = cg.to_json()
    assert d2["version"] == 2 and CircuitGraph.from_json(d2).to_json() == d2
    for n1, n2 in zip(v1["nodes"], d2["nodes"]):  # nothing lost: v2 adds keys, all None here
        assert {k: n2[k] for k in n1} == n1 and n2["label_f1"] == n1.get("label_f1")
        assert all(n2[k] is None for k in ("position", "token", "activation", "influence"))
    assert d2["edges"] == v1["edges"]


def _plain_layout(src: str) -> dict[str, tuple[float, float]]:
    """Node centres from ``dot -Tplain`` (y grows upwards)."""
    proc = subprocess.run([shutil.which("dot"), "-Tplain"], input=src, capture_output=True, text=True,
                          check=True)
    pos = {}
    for line in proc.stdout.splitlines():
        parts = shlex.split(line)
        if parts and parts[0] == "node":
            pos[parts[1]] = (float(parts[2]), float(parts[3]))
    return pos


def _rank_names(src: str) -> list[str]:
    return re.findall(r"subgraph row_(\w+) \{", src)


def test_dot_ranks_go_up_the_stream():
    # an edge from emb straight to mlp0 and from resid0 straight to out: without the rank spine dot
    # would put mlp0 level with resid0
    nodes = {"emb@0": {}, "resid0/1@0": {}, "mlp0/2@0": {}, "out@0": {}}
    edges = [("emb@0", "resid0/1@0", {"weight": 1.0}), ("emb@0", "mlp0/2@0", {"weight": 1.0}),
             ("resid0/1@0", "out@0", {"weight": 1.0}), ("mlp0/2@0", "out@0", {"weight": 1.0})]
    cg = CircuitGraph.from_nodes_edges(nodes, edges, cross_meta(prompt_tokens=["x"]))
    src = cg.to_dot()
    assert "rankdir=BT" in src and _rank_names(src) == ["emb", "resid0", "mlp0", "out0"]
    assert re.findall(r"(_rank_\w+) -> (_rank_\w+) \[style=invis\]", src) == [
        ("_rank_emb", "_rank_resid0"), ("_rank_resid0", "_rank_mlp0"), ("_rank_mlp0", "_rank_out")]
    if shutil.which("dot") is None:
        pytest.skip("graphviz `dot` is not installed")
    y = {n: xy[1] for n, xy in _plain_layout(src).items()}
    assert y["emb@0"] < y["resid0/1@0"] < y["mlp0/2@0"] < y["out@0"]
    # the bigger graph: every rank strictly above the one before, positions left to right
    src = cross_graph().to_dot()
    assert _rank_names(src) == ["emb", "resid0", "mlp0", "resid1", "mlp1", "out0"]
    layout = _plain_layout(src)
    heights = [layout[f"_rank_{r}"][1] for r in ("emb", "resid0", "mlp0", "resid1", "mlp1", "out")]
    assert heights == sorted(heights) and len(set(heights)) == 6
    for n in cross_graph().g.nodes:
        site = n.split("/")[0].split("@")[0]
        assert layout[n][1] == layout[f"_rank_{site}"][1]  # each node sits in its site's rank
    assert layout["emb@0"][0] < layout["emb@1"][0]
    assert layout["resid0/3@0"][0] < layout["resid0/err@1"][0]
    assert layout["mlp0/2@0"][0] < layout["mlp0/7@1"][0]
    # crossing edges: dot would swap one rank to uncross them; the position order holds instead
    nodes = {"resid0/1@0": {}, "resid0/2@1": {}, "mlp0/3@1": {}, "mlp0/4@3": {}, "out@3": {}}
    edges = [("resid0/1@0", "mlp0/4@3", {"weight": 1.0}), ("resid0/2@1", "mlp0/3@1", {"weight": 1.0}),
             ("mlp0/3@1", "out@3", {"weight": 1.0}), ("mlp0/4@3", "out@3", {"weight": 1.0})]
    x = {n: xy[0] for n, xy in _plain_layout(CircuitGraph.from_nodes_edges(
        nodes, edges, cross_meta(prompt_tokens=list("abcd"))).to_dot()).items()}
    assert x["resid0/1@0"] < x["resid0/2@1"] and x["mlp0/3@1"] < x["mlp0/4@3"]


def _cross_dot_edges(src: str) -> dict[tuple[str, str], str]:
    return {(m[1], m[2]): m[3] for m in re.finditer(r'^\s*"([^"]+)" -> "([^"]+)" \[(.*)\]$', src, re.M)}


def test_dot_pen_width_grows_with_abs_delta_and_colour_is_the_sign():
    cg = cross_graph()
    edges = _cross_dot_edges(cg.to_dot())
    width = {e: float(re.search(r"penwidth=([\d.]+)", a)[1]) for e, a in edges.items() if "penwidth" in a}
    measured = {(u, v): abs(d["delta"]) for u, v, d in cg.g.edges(data=True) if d["delta"] is not None}
    order = sorted(measured, key=measured.get)
    assert [width[e] for e in order] == sorted(width[e] for e in order)
    assert len({width[e] for e in order}) == len(order)  # strictly: |Δ| values all differ
    assert width[order[-1]] == 5.0
    assert all(width[e] == 0.5 for e in set(cg.g.edges) - set(measured))  # unmeasured: thinnest
    for (u, v), d in cg.g.edges.items():
        assert f'color="{POS_COLOR if d["weight"] > 0 else NEG_COLOR}"' in edges[u, v]
    # without any delta, pen width follows |weight|
    plain = CircuitGraph.from_nodes_edges(cross_nodes(), [(u, v, {"weight": d["weight"]})
                                                          for u, v, d in cross_edges()], cross_meta())
    w2 = {e: float(re.search(r"penwidth=([\d.]+)", a)[1]) for e, a in _cross_dot_edges(plain.to_dot()).items()
          if "penwidth" in a}
    by_w = sorted(plain.g.edges, key=lambda e: abs(plain.g.edges[e]["weight"]))
    assert [w2[e] for e in by_w] == sorted(w2.values()) and w2[by_w[-1]] == 5.0


def test_dot_node_text_error_nodes_and_legend():
    src = cross_graph().to_dot()
    nodes = {m[1]: m[2] for m in re.finditer(r'^\s*"([^"]+)" \[(.*?)\]$', src, re.M)}
    assert 'label="resid0/3@0\\nthe\\nact 1.5  infl 0.3"' in nodes["resid0/3@0"]
    assert "infl 0.6" in nodes["resid1/2@2"]
    for err in ("resid0/err@1", "mlp1/err@3"):
        assert "shape=triangle" in nodes[err] and 'fillcolor="#dddddd"' in nodes[err]
    assert "shape=house" in nodes["emb@0"] and 'token \\"The\\"' in nodes["emb@0"]
    assert "shape=doubleoctagon" in nodes["out@3"] and "logit_diff" in nodes["out@3"]
    title = re.search(r'^\s*fontname=Helvetica label="(.*)" labelloc=t$', src, re.M)[1]
    assert "metric=logit_diff" in title and "layers=0-1" in title and "mode=prompt" in title
    assert 'positions: 0:\\"The\\"  1:\\" cat\\"  2:\\" sat\\"  3:\\" on\\"' in title


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz `dot` is not installed")
def test_render_cross_layer_svg_with_awkward_tokens(tmp_path):
    tokens = ['say "hi"', "\\", "\n<b>&amp;", "bell\x07"]  # quotes, backslash, newline, HTML, control
    cg = CircuitGraph.from_nodes_edges(cross_nodes(), cross_edges(), cross_meta(prompt_tokens=tokens))
    out = cg.render(tmp_path / "x.svg")
    root = ET.parse(out).getroot()
    titles = {t.text for t in root.iter("{http://www.w3.org/2000/svg}title")}
    assert set(cg.g.nodes) <= titles
    texts = " ".join(t.text or "" for t in root.iter("{http://www.w3.org/2000/svg}text"))
    assert 'token "say \\"hi\\""' in texts and '"\\n<b>&amp;"' in texts  # shown escaped, literally
    h = nx.read_graphml(cg.save_graphml(tmp_path / "x.graphml"))
    assert h.nodes["out@3"]["token"] == "bell\ufffd" and h.nodes["emb@0"]["token"] == 'say "hi"'
