"""The circuit graph: resid -> MLP feature edges at one layer, its pruning, exports and rendering.

A :class:`CircuitGraph` wraps a ``networkx.DiGraph`` whose nodes are dictionary features
(``resid{L}/{i}``, ``mlp{L}/{j}``), the two error nodes (``resid{L}/err``, ``mlp{L}/err``) and
optionally ``out``. It is saved as versioned JSON (the lossless format: JSON -> graph -> JSON is
identical), exported to GraphML and DOT, and rendered to SVG/PNG with the system ``dot``.

Pruning rules (the same in :meth:`CircuitGraph.from_edges` and :meth:`CircuitGraph.prune`):

1. drop edges with ``abs_weight < edge_threshold``;
2. drop nodes that have an ``effect`` with ``|effect| < node_threshold``, with their edges
   (a node without an effect is never dropped by this rule; ``out`` is never dropped);
3. keep the ``top_n`` remaining edges by ``abs_weight`` (ties broken by node order);
4. keep only the nodes that touch a surviving edge, plus ``out`` when present.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import graphviz
import networkx as nx
import numpy as np

from featcircuit.errors import UserError
from featcircuit.io import _UMASK, atomic_write_text
from featcircuit.stats import DENSE_FREQ, is_dense

log = logging.getLogger(__name__)

SCHEMA = "featcircuit.graph"
VERSION = 1
SITES = ("resid", "mlp", "out")
NODE_FLOAT_KEYS = ("freq", "mean_act", "max_act", "effect", "label_f1")  # all optional (None when unknown)
NODE_NEW_KEYS = ("label_f1",)  # may be missing from files written before they existed
NODE_KEYS = ("site", "layer", "feature", "label") + NODE_FLOAT_KEYS
EDGE_KEYS = ("weight", "abs_weight", "count", "behav_weight", "delta")
POS_COLOR, NEG_COLOR, ZERO_COLOR = "#1f77b4", "#d62728", "#7f7f7f"
RENDER_FORMATS = ("svg", "png", "pdf")
MAX_LABEL = 4096  # characters; graphviz fails on labels over 16k, and ours are a line or two
MAX_GRAPH_BYTES = 256 << 20
_SITE_ORDER = {s: i for i, s in enumerate(SITES)}
_ID_RE = re.compile(r"(resid|mlp)(0|[1-9][0-9]*)/(0|[1-9][0-9]*|err)")
_ID_HELP = "resid{L}/{i}, mlp{L}/{j}, resid{L}/err, mlp{L}/err or out"


def node_id(site: str, layer: int, feature: int | str) -> str:
    """Node id of a feature (``feature`` >= 0) or error node (``"err"`` or -1); ``out`` for site out."""
    if site == "out":
        return "out"
    if site not in ("resid", "mlp"):
        raise UserError(f"bad node site {site!r}; expected one of {', '.join(SITES)}")
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise UserError(f"bad layer {layer!r}; expected an integer >= 0")
    if feature == "err" or feature == -1:
        return f"{site}{layer}/err"
    if isinstance(feature, bool) or not isinstance(feature, int) or feature < 0:
        raise UserError(f"bad feature {feature!r}; expected an integer >= 0, -1 or 'err'")
    return f"{site}{layer}/{feature}"


def parse_node_id(nid: str) -> tuple[str, int, int | str]:
    """Split a node id into ``(site, layer, feature)``; feature is an int or ``"err"``; out is -1, -1."""
    if nid == "out":
        return "out", -1, -1
    m = _ID_RE.fullmatch(nid) if isinstance(nid, str) else None
    if m is None:
        raise UserError(f"bad node id {_short(nid)}; expected {_ID_HELP}")
    feat = m.group(3)
    return m.group(1), int(m.group(2)), feat if feat == "err" else int(feat)


def _node_key(nid: str) -> tuple[int, int, int]:
    site, layer, feature = parse_node_id(nid)
    return _SITE_ORDER[site], layer, -1 if feature == "err" else int(feature)


def _edge_key(u: str, v: str, d: Mapping[str, Any]) -> tuple:
    return (-d["abs_weight"], _node_key(u), _node_key(v))


def _short(value: Any, limit: int = 60) -> str:
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _opt_float(x: Any) -> float | None:
    """A float, or None for None/NaN/inf."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _as_list(x: Any, name: str) -> list:
    """A 1-D list from a list, numpy array or torch tensor (any device or dtype)."""
    if hasattr(x, "detach"):  # torch tensor: bfloat16/cuda do not go through numpy
        x = x.detach().cpu()
        x = x.double() if x.is_floating_point() else x
        if x.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(x.shape)}")
        return x.tolist()
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    return a.tolist()


def _make_node(nid: str, stats: Mapping[str, Any] | None, label: str | None) -> dict[str, Any]:
    site, layer, feature = parse_node_id(nid)
    stats = dict(stats or {})
    unknown = set(stats) - set(NODE_FLOAT_KEYS) - {"label"}
    if unknown:
        raise ValueError(f"node_stats[{nid!r}] has unknown keys {sorted(unknown)}; "
                         f"expected {', '.join(NODE_FLOAT_KEYS)}, label")
    label = label if label is not None else stats.get("label")
    return {"site": site, "layer": layer, "feature": -1 if feature == "err" else feature,
            "label": str(label) if label is not None else nid,
            **{k: _opt_float(stats.get(k)) for k in NODE_FLOAT_KEYS}}


def _check_thresholds(node_threshold: float, edge_threshold: float, top_n: int | None) -> None:
    for name, t in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t >= 0:
            raise UserError(f"bad {name} {t!r}; expected a number >= 0")
    if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 0):
        raise UserError(f"bad top_n {top_n!r}; expected an integer >= 0 or None")


def _prune(g: nx.DiGraph, node_threshold: float, edge_threshold: float,
           top_n: int | None) -> nx.DiGraph:
    """A new graph pruned by the module-docstring rules, nodes and edges in canonical order."""
    _check_thresholds(node_threshold, edge_threshold, top_n)
    dropped = {n for n, d in g.nodes(data=True)
               if n != "out" and d.get("effect") is not None and abs(d["effect"]) < node_threshold}
    edges = sorted(((u, v, d) for u, v, d in g.edges(data=True)
                    if d["abs_weight"] >= edge_threshold and u not in dropped and v not in dropped),
                   key=lambda e: _edge_key(*e))
    if top_n is not None:
        edges = edges[:top_n]
    keep = {n for u, v, _ in edges for n in (u, v)} | ({"out"} & set(g.nodes))
    h = nx.DiGraph()
    for n in sorted(keep, key=_node_key):
        h.add_node(n, **dict(g.nodes[n]))
    for u, v, d in edges:
        h.add_edge(u, v, **dict(d))
    return h


@contextmanager
def _atomic_target(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _dot_text(text: str) -> str:
    """Escape text for a DOT escString: literal backslashes, quotes, ``&``, ``<...>``; newline breaks."""
    out = []
    for ch in text:
        o = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif ch == "&":
            out.append("&#38;")  # dot would otherwise decode entities such as "&amp;"
        elif ch == "\n":
            out.append("\\n")
        elif o < 32 or o == 127:
            out.append(" ")
        elif 0xD800 <= o <= 0xDFFF:
            out.append("\ufffd")
        else:
            out.append(ch)
    return graphviz.nohtml("".join(out))


def _xml_text(text: str) -> str:
    """Replace characters that XML 1.0 cannot hold."""
    return "".join(ch if ch in "\t\n\r" or 0x20 <= ord(ch) <= 0xD7FF or 0xE000 <= ord(ch) <= 0xFFFD
                   or ord(ch) >= 0x10000 else "\ufffd" for ch in text)


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    return f"{x:.4g}" if isinstance(x, float) else str(x)


class CircuitGraph:
    """A circuit: ``g`` (networkx DiGraph with the node/edge attributes above) and JSON-able ``meta``."""

    def __init__(self, g: nx.DiGraph | None = None, meta: Mapping[str, Any] | None = None):
        self.g: nx.DiGraph = g if g is not None else nx.DiGraph()
        try:  # validates and deep-copies
            self.meta: dict[str, Any] = json.loads(json.dumps(dict(meta or {}), allow_nan=False))
        except (TypeError, ValueError) as e:
            raise ValueError(f"graph meta is not JSON-serialisable: {e}") from None

    def __repr__(self) -> str:
        return f"CircuitGraph({self.g.number_of_nodes()} nodes, {self.g.number_of_edges()} edges)"

    # ---- construction and pruning ------------------------------------------------------------

    @classmethod
    def from_edges(cls, layer: int, src: Sequence[int], dst: Sequence[int], weight: Sequence[float],
                   abs_weight: Sequence[float], count: Sequence[int], *,
                   behav_weight: Sequence[float] | None = None, delta: Sequence[float] | None = None,
                   node_stats: Mapping[str, Mapping[str, Any]] | None = None,
                   labels: Mapping[str, str] | None = None, meta: Mapping[str, Any] | None = None,
                   node_threshold: float = 0.0, edge_threshold: float = 0.0,
                   top_n: int | None = None) -> CircuitGraph:
        """Build a pruned graph from parallel edge arrays (src: resid features, dst: mlp; -1 = err)."""
        node_id("resid", layer, 0)  # validates layer
        cols = {"src": src, "dst": dst, "weight": weight, "abs_weight": abs_weight, "count": count,
                "behav_weight": behav_weight, "delta": delta}
        lists = {k: _as_list(v, k) for k, v in cols.items() if v is not None}
        n = len(lists["src"])
        bad = {k: len(v) for k, v in lists.items() if len(v) != n}
        if bad:
            raise ValueError(f"edge arrays differ in length: src has {n}, {bad}")
        meta = dict(meta or {})
        if meta.setdefault("layer", layer) != layer:
            raise ValueError(f"meta layer {meta['layer']!r} differs from layer {layer}")
        node_stats, labels = node_stats or {}, labels or {}
        g = nx.DiGraph()

        def add_node(nid: str) -> None:
            if nid not in g:
                g.add_node(nid, **_make_node(nid, node_stats.get(nid), labels.get(nid)))

        for k in range(n):
            i, j = lists["src"][k], lists["dst"][k]
            if i != int(i) or j != int(j):
                raise ValueError(f"edge {k} has non-integer feature index {i!r} -> {j!r}")
            s, t = node_id("resid", layer, int(i)), node_id("mlp", layer, int(j))
            if g.has_edge(s, t):
                raise ValueError(f"duplicate edge {s} -> {t} (edge {k})")
            w, aw = float(lists["weight"][k]), float(lists["abs_weight"][k])
            if not (math.isfinite(w) and math.isfinite(aw)):
                raise ValueError(f"edge {k} ({s} -> {t}) has non-finite weight {w} or abs_weight {aw}")
            add_node(s)
            add_node(t)
            g.add_edge(s, t, weight=w, abs_weight=aw, count=int(lists["count"][k]),
                       behav_weight=_opt_float(lists["behav_weight"][k]) if "behav_weight" in lists
                       else None,
                       delta=_opt_float(lists["delta"][k]) if "delta" in lists else None)
        if "out" in node_stats:
            add_node("out")
        return cls(_prune(g, node_threshold, edge_threshold, top_n), meta)

    def prune(self, node_threshold: float = 0.0, edge_threshold: float = 0.0,
              top_n: int | None = None) -> CircuitGraph:
        """A new graph pruned with the same rules as :meth:`from_edges`."""
        return CircuitGraph(_prune(self.g, node_threshold, edge_threshold, top_n), self.meta)

    # ---- JSON --------------------------------------------------------------------------------

    def sorted_nodes(self) -> list[str]:
        """Node ids in canonical order: resid < mlp < out, then layer, then feature (err first)."""
        return sorted(self.g.nodes, key=_node_key)

    def sorted_edges(self) -> list[tuple[str, str, dict[str, Any]]]:
        """Edges ``(source, target, attrs)`` by descending abs_weight, then source and target order."""
        return sorted(self.g.edges(data=True), key=lambda e: _edge_key(*e))

    def to_json(self) -> dict[str, Any]:
        """The graph as a JSON-able dict in the versioned schema, in deterministic order."""
        nodes = []
        for n in self.sorted_nodes():
            d = self.g.nodes[n]
            nodes.append({"id": n, "site": str(d["site"]), "layer": int(d["layer"]),
                          "feature": int(d["feature"]), "label": str(d["label"]),
                          **{k: _opt_float(d.get(k)) for k in NODE_FLOAT_KEYS},
                          "dense": is_dense(d.get("freq"))})  # derived from freq; not read back
        edges = [{"source": u, "target": v, "weight": float(d["weight"]),
                  "abs_weight": float(d["abs_weight"]), "count": int(d["count"]),
                  "behav_weight": _opt_float(d.get("behav_weight")),
                  "delta": _opt_float(d.get("delta"))} for u, v, d in self.sorted_edges()]
        return {"schema": SCHEMA, "version": VERSION, "meta": json.loads(json.dumps(self.meta)),
                "nodes": nodes, "edges": edges}

    @classmethod
    def from_json(cls, d: Any, *, source: str = "graph.json") -> CircuitGraph:
        """Graph from :meth:`to_json` output; UserError naming ``source`` for anything malformed."""
        if not isinstance(d, dict):
            raise UserError(f"{source}: expected a JSON object with keys 'schema', 'version', "
                            f"'meta', 'nodes', 'edges'; got {type(d).__name__}")
        if "schema" not in d:
            raise UserError(f"{source}: missing key 'schema'; expected {SCHEMA!r}")
        if d["schema"] != SCHEMA:
            raise UserError(f"{source} has schema {_short(d['schema'])}; "
                            f"this featcircuit reads {SCHEMA!r}")
        if "version" not in d:
            raise UserError(f"{source}: missing key 'version'; expected {VERSION}")
        if d["version"] != VERSION or isinstance(d["version"], bool):
            raise UserError(f"{source} has schema version {_short(d['version'])}; "
                            f"this featcircuit reads version {VERSION}")
        for key, typ in (("meta", dict), ("nodes", list), ("edges", list)):
            if key not in d:
                raise UserError(f"{source}: missing key {key!r}")
            if not isinstance(d[key], typ):
                raise UserError(f"{source}: key {key!r} is {_short(d[key])}; "
                                f"expected a JSON {'object' if typ is dict else 'list'}")

        def get(obj: Any, key: str, where: str, kind: str) -> Any:
            if not isinstance(obj, dict):
                raise UserError(f"{source}: {where} is {_short(obj)}; expected a JSON object")
            if key not in obj:
                raise UserError(f"{source}: {where} is missing key {key!r}")
            v = obj[key]
            num = isinstance(v, (int, float)) and not isinstance(v, bool)
            ok = {"str": isinstance(v, str), "int": num and isinstance(v, int),
                  "float": num and math.isfinite(v),
                  "float?": v is None or (num and math.isfinite(v))}[kind]
            if not ok:
                want = {"str": "a string", "int": "an integer", "float": "a finite number",
                        "float?": "a finite number or null"}[kind]
                raise UserError(f"{source}: {where} key {key!r} is {_short(v)}; expected {want}")
            return float(v) if kind.startswith("float") and v is not None else v

        def nonneg(v: Any, key: str, where: str) -> Any:
            if v < 0:
                raise UserError(f"{source}: {where} key {key!r} is {_short(v)}; expected >= 0")
            return v

        g = nx.DiGraph()
        for i, nd in enumerate(d["nodes"]):
            nid = get(nd, "id", f"node {i}", "str")
            where = f"node {i} ({nid!r})"
            try:
                site, layer, feature = parse_node_id(nid)
            except UserError:
                raise UserError(f"{source}: {where} has a bad id; expected {_ID_HELP}") from None
            attrs = {"site": get(nd, "site", where, "str"), "layer": get(nd, "layer", where, "int"),
                     "feature": get(nd, "feature", where, "int"),
                     "label": get(nd, "label", where, "str"),
                     **{k: get(nd, k, where, "float?") if k in nd or k not in NODE_NEW_KEYS else None
                        for k in NODE_FLOAT_KEYS}}
            want = (site, layer, -1 if feature == "err" else feature)
            if (attrs["site"], attrs["layer"], attrs["feature"]) != want:
                raise UserError(f"{source}: {where} has site/layer/feature "
                                f"{attrs['site']!r}/{attrs['layer']}/{attrs['feature']}; "
                                f"its id says {want[0]!r}/{want[1]}/{want[2]}")
            if nid in g:
                raise UserError(f"{source}: {where} is a duplicate node id")
            if len(attrs["label"]) > MAX_LABEL:
                raise UserError(f"{source}: {where} has a label of {len(attrs['label']):,} "
                                f"characters; at most {MAX_LABEL:,} accepted")
            g.add_node(nid, **attrs)
        for i, ed in enumerate(d["edges"]):
            u, v = get(ed, "source", f"edge {i}", "str"), get(ed, "target", f"edge {i}", "str")
            where = f"edge {i} ({u} -> {v})"
            for end in (u, v):
                if end not in g:
                    raise UserError(f"{source}: {where} refers to node {end!r}, not in 'nodes'")
            if g.has_edge(u, v):
                raise UserError(f"{source}: {where} is a duplicate edge")
            (su, lu, _), (sv, lv, _) = parse_node_id(u), parse_node_id(v)
            # edges go up the rows: resid -> mlp of the same layer, or into out
            if not (_SITE_ORDER[su] < _SITE_ORDER[sv] and (sv == "out" or lu == lv)):
                raise UserError(f"{source}: {where} is not a circuit edge: expected resid{{L}} -> "
                                "mlp{L} (same layer) or an edge into out")
            g.add_edge(u, v, weight=get(ed, "weight", where, "float"),
                       abs_weight=nonneg(get(ed, "abs_weight", where, "float"), "abs_weight", where),
                       count=nonneg(get(ed, "count", where, "int"), "count", where),
                       behav_weight=get(ed, "behav_weight", where, "float?"),
                       delta=get(ed, "delta", where, "float?"))
        return cls(g, d["meta"])

    def save_json(self, path: str | Path) -> Path:
        """Write :meth:`to_json` to ``path`` atomically (ASCII JSON, indent 1)."""
        text = json.dumps(self.to_json(), indent=1, ensure_ascii=True, allow_nan=False)
        return atomic_write_text(path, text + "\n")

    @classmethod
    def load_json(cls, path: str | Path) -> CircuitGraph:
        """Read a graph saved by :meth:`save_json`; UserError naming ``path`` if it cannot."""
        from featcircuit.checks import read_json_file

        path = Path(path)
        # bounded: a regular file of at most MAX_GRAPH_BYTES, nesting depth 16, integers of at
        # most 30 digits, no NaN/Infinity (a device such as /dev/zero is refused before reading)
        d = read_json_file(path, "graph file", max_bytes=MAX_GRAPH_BYTES, max_depth=16)
        return cls.from_json(d, source=str(path))

    # ---- GraphML -----------------------------------------------------------------------------

    def save_graphml(self, path: str | Path) -> Path:
        """Write GraphML atomically; None attributes are left out and ``meta`` is a JSON string."""
        h = nx.DiGraph(schema=SCHEMA, version=VERSION, meta_json=json.dumps(self.meta,
                                                                             sort_keys=True))
        for n in self.sorted_nodes():
            attrs = {k: v for k, v in self.g.nodes[n].items() if k in NODE_KEYS and v is not None}
            attrs["label"] = _xml_text(str(attrs.get("label", n)))
            h.add_node(n, **attrs)
        for u, v, d in self.sorted_edges():
            h.add_edge(u, v, **{k: x for k, x in d.items() if k in EDGE_KEYS and x is not None})
        path = Path(path)
        with _atomic_target(path) as tmp:
            nx.write_graphml(h, str(tmp))
        return path

    # ---- DOT and rendering -------------------------------------------------------------------

    def to_dot(self) -> str:
        """DOT source: resid row under the mlp row, ``out`` on top, edges coloured by sign.

        Pen width follows the measured effect ``|delta|`` when any edge has one (else ``|weight|``);
        error nodes are triangles; dense nodes (freq > DENSE_FREQ) get a red dashed border and a
        ``DENSE`` line; a node's ``label_f1`` is shown under its label.
        """
        title = " ".join(f"{k}={self.meta[k]}" for k in ("model", "layer") if k in self.meta)
        dot = graphviz.Digraph(name="circuit")
        dot.attr(rankdir="BT", nodesep="0.25", ranksep="0.9")
        if title:
            dot.attr(label=_dot_text(title), labelloc="t", fontname="Helvetica")
        dot.attr("node", fontname="Helvetica", fontsize="10")
        dot.attr("edge", arrowsize="0.6")
        rows: dict[tuple[int, int], list[str]] = {}
        for n in self.sorted_nodes():
            rows.setdefault(_node_key(n)[:2], []).append(n)
        fill = {"resid": "#e8f0fe", "mlp": "#fdebd0", "out": "#e0e0e0"}
        for (site_i, layer), ids in rows.items():
            with dot.subgraph(name=f"row_{SITES[site_i]}{max(layer, 0)}") as sub:
                sub.attr(rank="same")
                for n in ids:
                    d = self.g.nodes[n]
                    label = str(d.get("label", n))
                    text = n if label == n else f"{n}\n{label}"
                    if d.get("label_f1") is not None and "[F1 " not in label:
                        text += f"\nF1 {d['label_f1']:.2f}"
                    dense = is_dense(d.get("freq"))
                    if dense:
                        text += f"\nDENSE: {d['freq']:.0%} of tokens"
                    stats = "  ".join(f"{k}={_fmt(d.get(k))}" for k in NODE_FLOAT_KEYS
                                      if d.get(k) is not None)
                    tip = ((n if label == n else f"{n}: {label}") + (f"\n{stats}" if stats else "")
                           + (f"\ndense: active on more than {DENSE_FREQ:.0%} of tokens" if dense else ""))
                    if n == "out":
                        shape, style = "doubleoctagon", "filled"
                    elif d.get("feature", 0) < 0:
                        shape, style = "triangle", "filled"
                    else:
                        shape, style = "box", "rounded,filled"
                    color = "#dddddd" if shape == "triangle" else fill.get(d.get("site"), "white")
                    flag = {"color": NEG_COLOR, "penwidth": "3", "style": style + ",dashed"} if dense else {}
                    sub.node(n, label=_dot_text(text), tooltip=_dot_text(tip), shape=shape,
                             **({"style": style} | flag), fillcolor=color)
        edges = self.sorted_edges()
        # pen width by the measured effect |Δ| when the search measured any edge, else by |weight|
        by_delta = any(d.get("delta") is not None for _, _, d in edges)
        size = (lambda d: abs(d["delta"]) if d.get("delta") is not None else 0.0) if by_delta else \
            (lambda d: abs(d["weight"]))
        wmax = max((size(d) for _, _, d in edges), default=0.0)
        for u, v, d in edges:
            w = d["weight"]
            color = POS_COLOR if w > 0 else NEG_COLOR if w < 0 else ZERO_COLOR
            width = 0.5 + 4.5 * size(d) / wmax if wmax > 0 else 0.5
            tip = (f"{u} -> {v}\nweight={_fmt(w)}  abs_weight={_fmt(d['abs_weight'])}  "
                   f"count={d['count']}  behav_weight={_fmt(d.get('behav_weight'))}  "
                   f"delta={_fmt(d.get('delta'))}")
            dot.edge(u, v, color=color, penwidth=f"{width:.3f}", tooltip=_dot_text(tip))
        if "out" in self.g and self.g.in_degree("out") == 0 and len(rows) > 1:
            below = [ids for key, ids in rows.items() if key[0] != _SITE_ORDER["out"]]
            dot.edge(below[-1][0], "out", style="invis")  # keep out above the top row
        return dot.source

    def save_dot(self, path: str | Path) -> Path:
        """Write :meth:`to_dot` to ``path`` atomically (UTF-8)."""
        path = Path(path)
        with _atomic_target(path) as tmp:
            tmp.write_text(self.to_dot(), encoding="utf-8")
        return path

    def render(self, path: str | Path, format: str | None = None) -> Path | None:
        """Write ``<stem>.dot`` beside ``path`` and render it with system ``dot``; None if no dot."""
        path = Path(path)
        fmt = (format or path.suffix.lstrip(".")).lower()
        if fmt not in RENDER_FORMATS + ("dot",):
            raise UserError(f"cannot render {str(path)!r}: format {fmt!r} is not one of "
                            f"{', '.join(RENDER_FORMATS + ('dot',))}")
        dot_path = path if fmt == "dot" else path.with_suffix(".dot")
        self.save_dot(dot_path)
        if fmt == "dot":
            return dot_path
        exe = shutil.which("dot")
        if exe is None:
            log.warning("graphviz `dot` not found: wrote %s; render it with `dot -T%s %s -o %s` "
                        "(Debian/Ubuntu: apt-get install graphviz)", dot_path, fmt,
                        shlex.quote(str(dot_path)), shlex.quote(str(path)))
            return None
        with _atomic_target(path) as tmp:
            proc = subprocess.run([exe, f"-T{fmt}", str(dot_path), "-o", str(tmp)],
                                  capture_output=True, text=True, errors="replace")
            if proc.returncode != 0:
                err = " ".join(proc.stderr.split())[-300:]
                raise RuntimeError(f"`dot -T{fmt} {dot_path}` failed with exit code "
                                   f"{proc.returncode}: {err}")
        return path

    # ---- summary table -----------------------------------------------------------------------

    def top_edges(self, n: int) -> list[dict[str, Any]]:
        """The ``n`` strongest edges as rows for :func:`format_table`."""
        lab = {k: str(d.get("label", k)) for k, d in self.g.nodes(data=True)}
        dense = {k: is_dense(d.get("freq")) for k, d in self.g.nodes(data=True)}
        return [{"source": u, "target": v, "source_label": lab[u], "target_label": lab[v],
                 "weight": d["weight"], "abs_weight": d["abs_weight"], "count": d["count"],
                 "delta": d.get("delta"), "dense": _dense_ends(dense[u], dense[v])}
                for u, v, d in self.sorted_edges()[:max(n, 0)]]


def _dense_ends(src: bool, dst: bool) -> str:
    return "both" if src and dst else "source" if src else "target" if dst else ""


def table_rows(table, layer: int, n: int, *, by: str = "abs_weight", freq: Mapping[str, Any] | None = None,
               labels: Mapping[str, str] | None = None, features_only: bool = False) -> list[dict[str, Any]]:
    """The ``n`` largest edges of an :class:`~featcircuit.attribution.EdgeTable` as table rows.

    For the layer's top edges (before any search), beside the circuit's own table
    (:meth:`CircuitGraph.top_edges`). ``freq``: ``{"resid": [d_R], "mlp": [d_M]}`` activation
    frequencies (e.g. ``FeatureStats.freq``) for the dense column; ``labels``: by node id.
    """
    labels = labels or {}
    sub = table.top(n, by=by, features_only=features_only)
    rows = []
    for i, j, w, aw, c in zip(sub.src.tolist(), sub.dst.tolist(), sub.weight.tolist(),
                              sub.abs_weight.tolist(), sub.count.tolist()):
        u, v = node_id("resid", layer, i if i >= 0 else "err"), node_id("mlp", layer, j)
        fs = None if freq is None or i < 0 else float(freq["resid"][i])
        fd = None if freq is None else float(freq["mlp"][j])
        rows.append({"source": u, "target": v, "source_label": labels.get(u, ""),
                     "target_label": labels.get(v, ""),
                     "weight": w, "abs_weight": aw, "count": c, "mean_per_coact": w / c if c else None,
                     "dense": _dense_ends(is_dense(fs), is_dense(fd))})
    return rows


def format_table(rows: Sequence[Mapping[str, Any]], max_width: int = 40) -> str:
    """Rows (dicts with the same keys) as an aligned plain-text table; numbers right-aligned."""
    if not rows:
        return "(no rows)"
    cols = list(rows[0].keys())

    def cell(x: Any) -> str:
        s = _fmt(x)
        s = "".join(ch if ch.isprintable() else " " for ch in s.replace("\n", "\\n"))
        return s if len(s) <= max_width else s[: max_width - 1] + "…"

    cells = [[cell(r.get(c)) for c in cols] for r in rows]
    numeric = [all(r.get(c) is None or (isinstance(r.get(c), (int, float))
                                        and not isinstance(r.get(c), bool)) for r in rows)
               for c in cols]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(cols), line(["-" * w for w in widths]), *(line(r) for r in cells)])
