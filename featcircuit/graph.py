"""The circuit graph: feature-to-feature edges within and across layers, its pruning, exports and rendering.

A :class:`CircuitGraph` wraps a ``networkx.DiGraph``. Node ids (``parse_node`` reads them):

- ``resid{L}/{i}``, ``mlp{L}/{j}``: dictionary features at layer ``L`` (any ``L >= 0``);
- ``resid{L}/err``, ``mlp{L}/err``: the dictionaries' error nodes;
- ``emb``: the token embeddings; ``out``: the metric (a task's logit difference, or a loss/logit).

In *prompt mode* every id carries the token position it is at, ``@{t}`` (``resid1/37@5``,
``mlp0/err@3``, ``emb@5``, ``out@11``); in *corpus mode* none does (edges summed over tokens).
Edges go up the stream, ``emb -> resid0 -> mlp0 -> resid1 -> mlp1 -> ... -> out``, and never back
in position. A one-layer graph (``resid{L} -> mlp{L}``, optionally ``-> out``) is the special case
that :meth:`CircuitGraph.from_edges` builds; :meth:`CircuitGraph.from_nodes_edges` builds any graph
and checks it against the spec (node and edge attributes, ``meta``). The graph is saved as versioned
JSON (the lossless format: JSON -> graph -> JSON is identical; version-1 files still load), exported
to GraphML and DOT, and rendered to SVG/PNG with the system ``dot``.

Pruning rules (the same in :meth:`CircuitGraph.from_edges` and :meth:`CircuitGraph.prune`):

1. drop edges with ``abs_weight < edge_threshold``;
2. drop nodes that have an ``effect`` with ``|effect| < node_threshold``, with their edges
   (a node without an effect is never dropped by this rule; ``out`` nodes are never dropped);
3. keep the ``top_n`` remaining edges by ``abs_weight`` (ties broken by node order);
4. keep only the nodes that touch a surviving edge, plus the ``out`` nodes.
"""

from __future__ import annotations

import functools
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
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Sequence

import graphviz
import networkx as nx
import numpy as np

from featcircuit.errors import UserError
from featcircuit.io import _UMASK, atomic_write_text
from featcircuit.stats import DENSE_FREQ, is_dense

log = logging.getLogger(__name__)

SCHEMA = "featcircuit.graph"
VERSION = 2  # 2: several layers, emb nodes, positions (prompt mode), token/activation/influence
READ_VERSIONS = (1, 2)
SITES = ("resid", "mlp", "out", "emb")
FEATURE_SITES = ("resid", "mlp")
MODES = ("prompt", "corpus")
# all optional (None when unknown); activation: the code value (mean over tokens in corpus mode);
# influence: share of the total influence on out, in [0, 1]; effect: attribution estimate on the metric
NODE_FLOAT_KEYS = ("freq", "mean_act", "max_act", "effect", "label_f1", "activation", "influence")
NODE_NEW_KEYS = ("label_f1", "position", "token", "activation", "influence")  # missing from older files
NODE_KEYS = ("site", "layer", "feature", "position", "label", "token") + NODE_FLOAT_KEYS
EDGE_KEYS = ("weight", "abs_weight", "count", "behav_weight", "delta")
META_KEYS = ("model", "layers", "mode", "prompt", "prompt_tokens", "metric", "task")
POS_COLOR, NEG_COLOR, ZERO_COLOR = "#1f77b4", "#d62728", "#7f7f7f"
RENDER_FORMATS = ("svg", "png", "pdf")
MAX_LABEL = 4096  # characters; graphviz fails on labels over 16k, and ours are a line or two
MAX_GRAPH_BYTES = 256 << 20
INFLUENCE_TOL = 1e-6  # influence is a share in [0, 1]; allow float round-off at the ends
ABS_TOL = 1e-4  # abs_weight (sum of |terms|) >= |weight| (|sum|) up to float32 summation-order error
_OUT_RANK = 1 << 40  # above every layer's rank
_ID_RE = re.compile(r"(?:(resid|mlp)(0|[1-9][0-9]{0,8})/(0|[1-9][0-9]{0,11}|err)|(emb|out))"
                    r"(?:@(0|[1-9][0-9]{0,11}))?")
_ID_HELP = ("resid{L}/{i}, mlp{L}/{j}, resid{L}/err, mlp{L}/err, emb or out, "
            "each optionally @{position}")


class NodeRef(NamedTuple):
    """A parsed node id: feature is -1 for error, ``emb`` and ``out`` nodes; layer is -1 for emb/out."""

    site: str
    layer: int
    feature: int
    position: int | None


def _check_int(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise UserError(f"bad {name} {_short(value)}; expected an integer >= {low}")
    return int(value)


def node_id(site: str, layer: int, feature: int | str, position: int | None = None) -> str:
    """Node id of a feature (``feature`` >= 0), error node (``"err"`` or -1), ``emb`` or ``out``.

    ``position`` (prompt mode) appends ``@{position}``; layer and feature are ignored for emb/out.
    """
    suffix = "" if position is None else f"@{_check_int(position, 'position', 0)}"
    if site in ("out", "emb"):
        return site + suffix
    if site not in FEATURE_SITES:
        raise UserError(f"bad node site {site!r}; expected one of {', '.join(SITES)}")
    layer = _check_int(layer, "layer", 0)
    if feature == "err" or (not isinstance(feature, bool) and feature == -1):
        return f"{site}{layer}/err{suffix}"
    if isinstance(feature, bool) or not isinstance(feature, (int, np.integer)) or feature < 0:
        raise UserError(f"bad feature {_short(feature)}; expected an integer >= 0, -1 or 'err'")
    return f"{site}{layer}/{int(feature)}{suffix}"


def parse_node(nid: str) -> NodeRef:
    """Parse a node id into a :class:`NodeRef`; a one-line UserError names a bad id."""
    if not isinstance(nid, str):
        raise UserError(f"bad node id {_short(nid)}; expected {_ID_HELP}")
    return _parse_str(nid)


@functools.lru_cache(maxsize=1 << 18)  # sorting and checking a big graph parses each id many times
def _parse_str(nid: str) -> NodeRef:
    m = _ID_RE.fullmatch(nid)
    if m is None:
        raise UserError(f"bad node id {_short(nid)}; expected {_ID_HELP}")
    pos = None if m.group(5) is None else int(m.group(5))
    if m.group(4):
        return NodeRef(m.group(4), -1, -1, pos)
    feat = m.group(3)
    return NodeRef(m.group(1), int(m.group(2)), -1 if feat == "err" else int(feat), pos)


def parse_node_id(nid: str) -> tuple[str, int, int | str]:
    """Split a node id into ``(site, layer, feature)``; feature is an int or ``"err"``; emb/out are -1, -1.

    The position of a prompt-mode id is dropped; :func:`parse_node` keeps it.
    """
    ref = parse_node(nid)
    if ref.site in FEATURE_SITES and ref.feature < 0:
        return ref.site, ref.layer, "err"
    return ref.site, ref.layer, ref.feature


def _rank(ref: NodeRef) -> int:
    """Height in the stream: emb 0, resid{L} 2L+1, mlp{L} 2L+2, out on top."""
    if ref.site == "emb":
        return 0
    if ref.site == "out":
        return _OUT_RANK
    return 2 * ref.layer + (1 if ref.site == "resid" else 2)


@functools.lru_cache(maxsize=1 << 18)
def _node_key(nid: str) -> tuple[int, int, int]:
    """Canonical order: up the stream (emb, resid0, mlp0, resid1, ..., out), then position, then
    feature (err first)."""
    ref = parse_node(nid)
    return _rank(ref), -1 if ref.position is None else ref.position, ref.feature


def _edge_problem(u: str, v: str) -> str | None:
    """Why ``u -> v`` cannot be a circuit edge, or None."""
    a, b = parse_node(u), parse_node(v)
    if _rank(a) >= _rank(b):
        return ("goes down or sideways; edges go up the stream: emb -> resid0 -> mlp0 -> resid1 "
                "-> mlp1 -> ... -> out")
    if (a.position is None) != (b.position is None):
        return "joins a node with a position to one without; a graph is all prompt mode or all corpus"
    if a.position is not None and b.position is not None and a.position > b.position:
        return (f"goes back from position {a.position} to {b.position}; a causal model reads only "
                "earlier positions")
    return None


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


def _given_float(x: Any) -> float | None:
    """A float from a number, numpy or torch scalar (None for None, NaN, inf); TypeError otherwise."""
    if isinstance(x, (bool, str, bytes)):
        raise TypeError(f"not a number: {x!r}")
    return _opt_float(x)  # float() raises TypeError/ValueError for anything else


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
    ref = parse_node(nid)
    stats = dict(stats or {})
    unknown = set(stats) - set(NODE_FLOAT_KEYS) - {"label"}
    if unknown:
        raise ValueError(f"node_stats[{nid!r}] has unknown keys {sorted(unknown)}; "
                         f"expected {', '.join(NODE_FLOAT_KEYS)}, label")
    label = label if label is not None else stats.get("label")
    return {"site": ref.site, "layer": ref.layer, "feature": ref.feature, "position": ref.position,
            "label": str(label) if label is not None else nid, "token": None,
            **{k: _opt_float(stats.get(k)) for k in NODE_FLOAT_KEYS}}


def _check_node(nid: str, attrs: Mapping[str, Any], where: str) -> None:
    """Raise a one-line UserError (``where`` first) if ``attrs`` disagree with the id or the spec."""
    ref = parse_node(nid)
    got = tuple(attrs.get(k) for k in ("site", "layer", "feature", "position"))
    if got != tuple(ref):
        def show(t: Sequence[Any]) -> str:
            return f"{t[0]!r}/{t[1]}/{t[2]}" + ("" if t[3] is None else f"@{t[3]}")

        keys = "site/layer/feature" + ("" if got[3] is None and ref.position is None else "@position")
        raise UserError(f"{where} has {keys} {show(got)}; its id says {show(ref)}")
    if len(attrs["label"]) > MAX_LABEL:
        raise UserError(f"{where} has a label of {len(attrs['label']):,} characters; "
                        f"at most {MAX_LABEL:,} accepted")
    if attrs.get("token") is not None and (ref.position is None or ref.site not in ("emb", "out")):
        raise UserError(f"{where} has token {_short(attrs['token'])}; only emb and out nodes of a "
                        "prompt-mode graph (id ending in @{position}) carry a token")
    inf = attrs.get("influence")
    if inf is not None and not -INFLUENCE_TOL <= inf <= 1 + INFLUENCE_TOL:
        raise UserError(f"{where} has influence {inf!r}; expected a share of the influence on out, "
                        "in [0, 1]")


def _check_influence(g: nx.DiGraph, where: str) -> None:
    total = sum(d["influence"] for _, d in g.nodes(data=True) if d.get("influence") is not None)
    if total > 1 + INFLUENCE_TOL:  # shares of one total; cumulative values would sum past 1
        raise UserError(f"{where}: node influences sum to {total:.6g}; expected each node's share of "
                        "the total influence on out, together at most 1")


def _check_meta_keys(meta: Mapping[str, Any], where: str) -> str:
    """Check the required meta keys (model, metric, mode); return the mode."""
    for key, kind in (("model", "a string"), ("metric", "a string"), ("mode", f"one of {', '.join(MODES)}")):
        if key not in meta:
            raise UserError(f"{where}: meta is missing key {key!r}; expected {kind}")
        if not isinstance(meta[key], str):
            raise UserError(f"{where}: meta key {key!r} is {_short(meta[key])}; expected {kind}")
    if meta["mode"] not in MODES:
        raise UserError(f"{where}: meta mode {_short(meta['mode'])}; expected one of {', '.join(MODES)}")
    return meta["mode"]


def _check_meta(meta: dict[str, Any], g: nx.DiGraph, where: str, strict: bool) -> None:
    """Check ``meta`` against the nodes (and fill defaults) in place; UserError starting with ``where``.

    ``strict`` (from_nodes_edges) requires model, mode and metric; a graph without ``mode`` (a
    one-layer graph from :meth:`CircuitGraph.from_edges`, or a version-1 file) is only checked for
    positions being all there or all absent.
    """
    refs = {n: parse_node(n) for n in g.nodes}
    with_pos = sorted((n for n, r in refs.items() if r.position is not None), key=_node_key)
    without = sorted((n for n, r in refs.items() if r.position is None), key=_node_key)
    if not strict and "mode" not in meta:
        if with_pos and without:
            raise UserError(f"{where}: node {with_pos[0]!r} has a position and {without[0]!r} has "
                            "none; a graph is all prompt mode or all corpus")
        return
    mode = _check_meta_keys(meta, where)
    node_layers = sorted({r.layer for r in refs.values() if r.layer >= 0})
    meta.setdefault("layers", node_layers)
    if isinstance(meta["layers"], (tuple, range)):
        meta["layers"] = list(meta["layers"])
    layers = meta["layers"]
    if not isinstance(layers, list) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                               for x in layers):
        raise UserError(f"{where}: meta layers is {_short(layers)}; expected a list of integers >= 0")
    missing = sorted(set(node_layers) - set(layers))
    if missing:
        raise UserError(f"{where}: nodes at layer {missing[0]} but meta layers is {layers}")
    meta.setdefault("prompt", "")
    meta.setdefault("prompt_tokens", [])
    meta.setdefault("task", None)
    if not isinstance(meta["prompt"], str):
        raise UserError(f"{where}: meta prompt is {_short(meta['prompt'])}; expected a string")
    toks = meta["prompt_tokens"]
    if not isinstance(toks, list) or not all(isinstance(t, str) for t in toks):
        raise UserError(f"{where}: meta prompt_tokens is {_short(toks)}; expected a list of strings")
    if meta["task"] is not None and not isinstance(meta["task"], str):
        raise UserError(f"{where}: meta task is {_short(meta['task'])}; expected a string or null")
    if mode == "corpus":
        if with_pos:
            raise UserError(f"{where}: node {with_pos[0]!r} has a position in a corpus-mode graph; "
                            "corpus-mode ids have no @{position}")
        return
    if without:
        raise UserError(f"{where}: node {without[0]!r} has no position in a prompt-mode graph; "
                        "expected an id ending in @{position}")
    if not toks:
        raise UserError(f"{where}: a prompt-mode graph needs meta prompt_tokens (the prompt, tokenized)")
    for n in with_pos:
        pos, d = int(refs[n].position), g.nodes[n]  # type: ignore[arg-type]  # with_pos: not None
        if pos >= len(toks):
            raise UserError(f"{where}: node {n!r} is at position {pos}, past the prompt's "
                            f"{len(toks)} tokens")
        if refs[n].site in ("emb", "out"):
            if d.get("token") is None:
                d["token"] = toks[pos]
            elif d["token"] != toks[pos]:
                raise UserError(f"{where}: node {n!r} has token {_short(d['token'])} but prompt "
                                f"token {pos} is {_short(toks[pos])}")


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
               if d.get("site") != "out" and d.get("effect") is not None
               and abs(d["effect"]) < node_threshold}
    edges = sorted(((u, v, d) for u, v, d in g.edges(data=True)
                    if d["abs_weight"] >= edge_threshold and u not in dropped and v not in dropped),
                   key=lambda e: _edge_key(*e))
    if top_n is not None:
        edges = edges[:top_n]
    keep = {n for u, v, _ in edges for n in (u, v)} | {n for n, d in g.nodes(data=True)
                                                       if d.get("site") == "out"}
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

    @classmethod
    def from_nodes_edges(cls, nodes: Mapping[str, Mapping[str, Any]],
                         edges: Iterable[tuple[str, str, Mapping[str, Any]]],
                         meta: Mapping[str, Any]) -> CircuitGraph:
        """Build a graph of any layers from node attributes and edges, checked against the spec.

        ``nodes``: ``{id: attrs}`` with attrs among :data:`NODE_KEYS` (site/layer/feature/position
        are read from the id and, when given, must agree with it; label defaults to the id; emb/out
        tokens default to the prompt token at their position). ``edges``: ``(source, target,
        attrs)`` with ``weight`` and, in corpus mode, ``abs_weight`` (>= |weight|) and ``count``
        (a prompt-mode edge is one term: they default to ``|weight|`` and 1), optional
        ``behav_weight`` and ``delta``. ``meta``: ``model``, ``mode`` (prompt|corpus) and ``metric``
        required; ``layers`` (default: the nodes' layers), ``prompt``, ``prompt_tokens`` (needed in
        prompt mode), ``task`` and anything else JSON-able. Nodes are kept as given (no pruning:
        :meth:`prune` does that). Anything off is a one-line UserError.
        """
        if not isinstance(nodes, Mapping):
            raise UserError(f"nodes is {_short(nodes)}; expected a mapping from node id to attributes")
        meta = dict(meta or {})
        _check_meta_keys(meta, "graph")
        g = nx.DiGraph()
        for nid in sorted(nodes, key=lambda n: _node_key(n) if isinstance(n, str) else ()):
            given = nodes[nid]
            ref = parse_node(nid)
            where = f"node {nid!r}"
            if not isinstance(given, Mapping):
                raise UserError(f"{where} has attributes {_short(given)}; expected a mapping")
            unknown = sorted(set(given) - set(NODE_KEYS))
            if unknown:
                raise UserError(f"{where} has unknown attribute {unknown[0]!r}; expected "
                                f"{', '.join(NODE_KEYS)}")
            attrs: dict[str, Any] = {"site": ref.site, "layer": ref.layer, "feature": ref.feature,
                                     "position": ref.position}
            for k in ("site", "layer", "feature", "position"):
                if k in given:
                    attrs[k] = given[k] if k != "feature" or given[k] != "err" else -1
            label, token = given.get("label"), given.get("token")
            for key, value in (("label", label), ("token", token)):
                if value is not None and not isinstance(value, str):
                    raise UserError(f"{where} has {key} {_short(value)}; expected a string or None")
            attrs["label"] = nid if label is None else label
            attrs["token"] = token
            for k in NODE_FLOAT_KEYS:
                try:
                    attrs[k] = _given_float(given.get(k))  # NaN means unknown, as in from_edges
                except (TypeError, ValueError):
                    raise UserError(f"{where} has {k} {_short(given[k])}; "
                                    "expected a number or None") from None
            _check_node(nid, attrs, where)
            g.add_node(nid, **(attrs | ref._asdict()))  # plain ints from the id, not numpy ones
        prompt_mode = meta.get("mode") == "prompt"
        rows: list[tuple[str, str, dict[str, Any]]] = []
        seen: set[tuple[str, str]] = set()
        for i, e in enumerate(edges):
            if not (isinstance(e, (tuple, list)) and len(e) == 3
                    and (type(e[2]) is dict or isinstance(e[2], Mapping))):  # dict first: fast
                raise UserError(f"edge {i} is {_short(e)}; expected (source, target, attributes)")
            u, v, given = e
            where = f"edge {i} ({u} -> {v})"
            for end in (u, v):
                parse_node(end)
                if end not in g:
                    raise UserError(f"{where} refers to node {end!r}, not in nodes")
            problem = _edge_problem(u, v)
            if problem:
                raise UserError(f"{where} {problem}")
            if (u, v) in seen:
                raise UserError(f"{where} is a duplicate edge")
            seen.add((u, v))
            unknown = sorted(set(given) - set(EDGE_KEYS))
            if unknown:
                raise UserError(f"{where} has unknown attribute {unknown[0]!r}; expected "
                                f"{', '.join(EDGE_KEYS)}")
            if "weight" not in given or (not prompt_mode and not {"abs_weight", "count"} <= set(given)):
                need = "weight" if prompt_mode else "weight, abs_weight and count"
                raise UserError(f"{where} lacks {need} (corpus-mode edges sum terms over tokens: "
                                "abs_weight and count cannot be inferred)")
            try:
                w = _given_float(given["weight"])
                aw = _given_float(given.get("abs_weight", abs(w) if w is not None else None))
            except (TypeError, ValueError):
                w = aw = None
            if w is None or aw is None:
                raise UserError(f"{where} has weight {_short(given['weight'])} or abs_weight "
                                f"{_short(given.get('abs_weight'))}; expected finite numbers")
            # abs_weight sums |terms|, so it is at least |weight|, the |sum| (up to round-off)
            if aw < abs(w) * (1 - ABS_TOL):
                raise UserError(f"{where} has abs_weight {aw!r} < |weight| {abs(w)!r}; abs_weight sums "
                                "the |terms| that weight sums")
            c = given.get("count", 1)
            if isinstance(c, bool) or not float(c).is_integer() or c < 0:
                raise UserError(f"{where} has count {_short(c)}; expected an integer >= 0")
            rows.append((u, v, {"weight": w, "abs_weight": aw, "count": int(c),
                                "behav_weight": _opt_float(given.get("behav_weight")),
                                "delta": _opt_float(given.get("delta"))}))
        for u, v, d in sorted(rows, key=lambda r: _edge_key(*r)):
            g.add_edge(u, v, **d)
        _check_meta(meta, g, "graph", strict=True)
        _check_influence(g, "graph")
        return cls(g, meta)

    @property
    def mode(self) -> str:
        """``"prompt"`` (node ids carry positions) or ``"corpus"``."""
        if self.meta.get("mode") in MODES:
            return self.meta["mode"]
        return "prompt" if any(d.get("position") is not None for _, d in self.g.nodes(data=True)) \
            else "corpus"

    @property
    def layers(self) -> list[int]:
        """The model layers of the graph's feature and error nodes, ascending."""
        return sorted({int(d["layer"]) for _, d in self.g.nodes(data=True) if d["layer"] >= 0})

    def prune(self, node_threshold: float = 0.0, edge_threshold: float = 0.0,
              top_n: int | None = None) -> CircuitGraph:
        """A new graph pruned with the same rules as :meth:`from_edges`."""
        return CircuitGraph(_prune(self.g, node_threshold, edge_threshold, top_n), self.meta)

    # ---- JSON --------------------------------------------------------------------------------

    def sorted_nodes(self) -> list[str]:
        """Node ids in canonical order: up the stream (emb, resid0, mlp0, resid1, ..., out), then
        position, then feature (err first)."""
        return sorted(self.g.nodes, key=_node_key)

    def sorted_edges(self) -> list[tuple[str, str, dict[str, Any]]]:
        """Edges ``(source, target, attrs)`` by descending abs_weight, then source and target order."""
        return sorted(self.g.edges(data=True), key=lambda e: _edge_key(*e))

    def to_json(self) -> dict[str, Any]:
        """The graph as a JSON-able dict in the versioned schema, in deterministic order."""
        nodes = []
        for n in self.sorted_nodes():
            d = self.g.nodes[n]
            pos, tok = d.get("position"), d.get("token")
            nodes.append({"id": n, "site": str(d["site"]), "layer": int(d["layer"]),
                          "feature": int(d["feature"]), "position": None if pos is None else int(pos),
                          "token": None if tok is None else str(tok), "label": str(d["label"]),
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
        if d["version"] not in READ_VERSIONS or isinstance(d["version"], bool):
            raise UserError(f"{source} has schema version {_short(d['version'])}; this featcircuit "
                            f"reads version {' or '.join(map(str, READ_VERSIONS))}")
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
                  "float?": v is None or (num and math.isfinite(v)),
                  "str?": v is None or isinstance(v, str),
                  "int?": v is None or (num and isinstance(v, int) and v >= 0)}[kind]
            if not ok:
                want = {"str": "a string", "int": "an integer", "float": "a finite number",
                        "float?": "a finite number or null", "str?": "a string or null",
                        "int?": "an integer >= 0 or null"}[kind]
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
                parse_node(nid)
            except UserError:
                raise UserError(f"{source}: {where} has a bad id; expected {_ID_HELP}") from None
            opt = {"position": "int?", "token": "str?"}  # absent from version-1 files
            attrs = {"site": get(nd, "site", where, "str"), "layer": get(nd, "layer", where, "int"),
                     "feature": get(nd, "feature", where, "int"),
                     "position": get(nd, "position", where, "int?") if "position" in nd else None,
                     "label": get(nd, "label", where, "str"),
                     "token": get(nd, "token", where, "str?") if "token" in nd else None,
                     **{k: get(nd, k, where, opt.get(k, "float?")) if k in nd or k not in NODE_NEW_KEYS
                        else None for k in NODE_FLOAT_KEYS}}
            if nid in g:
                raise UserError(f"{source}: {where} is a duplicate node id")
            _check_node(nid, attrs, f"{source}: {where}")
            g.add_node(nid, **attrs)
        for i, ed in enumerate(d["edges"]):
            u, v = get(ed, "source", f"edge {i}", "str"), get(ed, "target", f"edge {i}", "str")
            where = f"edge {i} ({u} -> {v})"
            for end in (u, v):
                if end not in g:
                    raise UserError(f"{source}: {where} refers to node {end!r}, not in 'nodes'")
            if g.has_edge(u, v):
                raise UserError(f"{source}: {where} is a duplicate edge")
            problem = _edge_problem(u, v)
            if problem:
                raise UserError(f"{source}: {where} is not a circuit edge: it {problem}")
            w = get(ed, "weight", where, "float")
            aw = nonneg(get(ed, "abs_weight", where, "float"), "abs_weight", where)
            if aw < abs(w) * (1 - ABS_TOL):
                raise UserError(f"{source}: {where} has abs_weight {aw!r} < |weight| {abs(w)!r}; "
                                "abs_weight sums the |terms| that weight sums")
            g.add_edge(u, v, weight=w, abs_weight=aw,
                       count=nonneg(get(ed, "count", where, "int"), "count", where),
                       behav_weight=get(ed, "behav_weight", where, "float?"),
                       delta=get(ed, "delta", where, "float?"))
        meta = dict(d["meta"])
        _check_meta(meta, g, source, strict=False)
        _check_influence(g, source)
        return cls(g, meta)

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
            if "token" in attrs:
                attrs["token"] = _xml_text(str(attrs["token"]))
            h.add_node(n, **attrs)
        for u, v, d in self.sorted_edges():
            h.add_edge(u, v, **{k: x for k, x in d.items() if k in EDGE_KEYS and x is not None})
        path = Path(path)
        with _atomic_target(path) as tmp:
            nx.write_graphml(h, str(tmp))
        return path

    # ---- DOT and rendering -------------------------------------------------------------------

    def _layered(self) -> bool:
        """Whether to draw the cross-layer layout (site column, spine, positions) rather than the
        one-layer layout of :meth:`from_edges` graphs."""
        return ("mode" in self.meta or len(self.layers) > 1
                or any(d.get("site") == "emb" or d.get("position") is not None
                       for _, d in self.g.nodes(data=True)))

    def _title(self) -> str:
        parts = []
        for k in ("model", "task", "metric", "layer", "layers", "mode"):
            v = self.meta.get(k)
            if v is None or v == "":
                continue
            if k == "layers" and isinstance(v, list) and v and v == list(range(v[0], v[-1] + 1)):
                v = str(v[0]) if len(v) == 1 else f"{v[0]}-{v[-1]}"  # contiguous: "0-3"
            parts.append(f"{k}={v}")
        title = " ".join(parts)
        toks = self.meta.get("prompt_tokens")
        if self.mode == "prompt" and isinstance(toks, list) and toks:
            # the position legend: node ids end in @{position}; this maps positions to tokens
            shown = [f"{i}:{json.dumps(str(t), ensure_ascii=False)}" for i, t in enumerate(toks[:64])]
            lines = ["  ".join(shown[i:i + 10]) for i in range(0, len(shown), 10)]
            title += "\npositions: " + "\n".join(lines) + ("  …" if len(toks) > 64 else "")
        return title

    def _node_text(self, n: str, d: Mapping[str, Any]) -> tuple[str, str]:
        """The node's drawn label and tooltip."""
        label = str(d.get("label", n))
        text = n if label == n else f"{n}\n{label}"
        if d.get("site") == "out" and label == n and self.meta.get("metric"):
            text += f"\n{self.meta['metric']}"
        if d.get("token") is not None:
            text += f"\ntoken {json.dumps(d['token'], ensure_ascii=False)}"
        values = "  ".join(f"{name} {d[k]:.3g}" for k, name in (("activation", "act"), ("influence", "infl"))
                           if d.get(k) is not None)
        if values:
            text += f"\n{values}"
        if d.get("label_f1") is not None and "[F1 " not in label:
            text += f"\nF1 {d['label_f1']:.2f}"
        dense = is_dense(d.get("freq"))
        if dense:
            text += f"\nDENSE: {d['freq']:.0%} of tokens"
        stats = "  ".join(f"{k}={_fmt(d.get(k))}" for k in NODE_FLOAT_KEYS if d.get(k) is not None)
        tip = ((n if label == n else f"{n}: {label}") + (f"\n{stats}" if stats else "")
               + (f"\ndense: active on more than {DENSE_FREQ:.0%} of tokens" if dense else ""))
        return text, tip

    def to_dot(self) -> str:
        """DOT source: one rank per site, bottom to top emb, resid0, mlp0, resid1, ..., out; edges
        coloured by sign.

        Pen width follows the measured effect ``|delta|`` when any edge has one (else ``|weight|``);
        error nodes are grey triangles; dense nodes (freq > DENSE_FREQ) get a red dashed border and a
        ``DENSE`` line; a node shows its id, label, activation/influence and ``label_f1``. A
        cross-layer or prompt-mode graph also gets a column naming each rank, joined by invisible
        edges that hold the ranks in stream order, and in prompt mode its nodes are ordered by
        position within each rank, with a position -> token legend under the title.
        """
        layered = self._layered()
        title = self._title()
        dot = graphviz.Digraph(name="circuit")
        dot.attr(rankdir="BT", nodesep="0.25", ranksep="0.9")
        if title:
            dot.attr(label=_dot_text(title), labelloc="t", fontname="Helvetica")
        dot.attr("node", fontname="Helvetica", fontsize="10")
        dot.attr("edge", arrowsize="0.6")
        rows: dict[int, list[str]] = {}
        for n in self.sorted_nodes():  # by rank, then position, then feature
            rows.setdefault(_node_key(n)[0], []).append(n)
        fill = {"resid": "#e8f0fe", "mlp": "#fdebd0", "out": "#e0e0e0", "emb": "#e6f4ea"}
        prompt = self.mode == "prompt"
        spine = []
        for ids in rows.values():
            first = self.g.nodes[ids[0]]
            site, layer = first["site"], first["layer"]
            name = f"{site}{max(layer, 0)}" if site != "emb" else "emb"
            with dot.subgraph(name=f"row_{name}") as sub:
                sub.attr(rank="same")
                for n in ids:
                    d = self.g.nodes[n]
                    text, tip = self._node_text(n, d)
                    if site == "out":
                        shape, style = "doubleoctagon", "filled"
                    elif site == "emb":
                        shape, style = "house", "filled"
                    elif d.get("feature", 0) < 0:
                        shape, style = "triangle", "filled"
                    else:
                        shape, style = "box", "rounded,filled"
                    color = "#dddddd" if shape == "triangle" else fill.get(site, "white")
                    dense = is_dense(d.get("freq"))
                    flag = {"color": NEG_COLOR, "penwidth": "3", "style": style + ",dashed"} if dense else {}
                    sub.node(n, label=_dot_text(text), tooltip=_dot_text(tip), shape=shape,
                             **({"style": style} | flag), fillcolor=color)
                if layered:
                    # the rank's name on the left; in prompt mode, flat invisible edges keep the
                    # rank's nodes left to right in position order
                    head = f"_rank_{name if site != 'out' else 'out'}"
                    sub.node(head, label=_dot_text("out" if site == "out" else name), shape="plaintext",
                             fontcolor="#555555", fontsize="12")
                    chain = [head] + (ids if prompt else ids[:1])
                    for a, b in zip(chain, chain[1:]):
                        sub.edge(a, b, style="invis")
                    spine.append(head)
        for a, b in zip(spine, spine[1:]):
            dot.edge(a, b, style="invis")  # holds the ranks in stream order even where no edge does
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
        if not layered and "out" in self.g and self.g.in_degree("out") == 0 and len(rows) > 1:
            below = [ids for rank, ids in rows.items() if rank != _OUT_RANK]
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
