"""The HTML report of a discovered circuit: one self-contained file that works offline (DESIGN §9).

1. *Cards*: every feature node of the graph gets a feature card
   (:func:`featcircuit.cards.analyze_features`: one cached pass per dictionary, plus the
   token-removal reruns) headed by its label and held-out F1 when scored labels are given
   (:mod:`featcircuit.labels`), a ``DENSE`` badge above 10% of tokens, and for each of its edges
   the evidence of :func:`featcircuit.evidence.edge_evidence` (mean per co-activation, top
   contexts shaded by e_ij, the tokens carrying the edge); error nodes list their edges too, and
   ``out`` gets a short explanatory card. A card's HTML is :mod:`featcircuit.card_html`.
2. *Circuit*: the graph's DOT source rendered to SVG by the system ``dot`` (stdin to stdout) and
   inlined; without ``dot`` the page says so and the node table stays the way in.
3. *Page*: the circuit beside a card panel (click a node, or a row of the node table, to open
   its card; ``#resid2/5`` in the URL opens one too), the dictionary-quality tables, the search,
   validation and faithfulness results (``faithfulness.png`` inlined as base64 when present) and
   the edge table. The page's CSS and JS are the package files ``report_assets/report.css`` and
   ``report.js``, inlined; nothing is fetched, no server is needed.
4. *Exports* beside it: ``features.json`` (cards in the field names of Neuronpedia's feature
   dashboards: ``activations`` with ``tokens``/``values``/``maxValue``/``maxValueTokenIndex``/
   ``binMin``/``binMax``/``binContains``, ``pos_str``/``pos_values``, ``neg_str``/``neg_values``,
   ``frac_nonzero``, ``freq_hist_data_bar_*``, ``logits_hist_data_bar_*``) and
   ``attribution_graph.json`` (``metadata``, ``qParams``, ``nodes`` with ``node_id``/``feature``/
   ``layer``/``ctx_idx``/``feature_type``/``clerp``, ``links`` with ``source``/``target``/``weight``,
   as in circuit-tracer / Neuronpedia attribution graphs; edges are summed over token positions,
   so every node has ``ctx_idx`` 0; nodes also carry ``dense`` and ``label_f1``, links
   ``mean_per_coactivation`` and, with evidence, ``top_tokens`` and ``evidence``), and
   ``edge_evidence.json`` when evidence is given.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from functools import cache
from html import escape as e
from importlib.resources import files
from pathlib import Path
from typing import Any

from .card_html import card_html, edges_html, plain_card
from .cards import analyze_features
from .errors import UserError
from .exports import attribution_graph, neuronpedia_feature
from .htmlbits import dense_badge, fmt_num, html_table
from .io import atomic_write_text

# ---- 1. cards --------------------------------------------------------------------------------


def graph_cards(rep, tokens, graph, *, removal: bool = True,
                cache_dir=None, progress: bool = False,
                labels: Mapping[str, Mapping[int, Mapping]] | None = None, **card_kw) -> dict[str, dict]:
    """``{node id: card}`` for every feature node of ``graph``, the one-layer graph of ``rep``
    (``labels``: ``{site: {feature: label}}``)."""
    want: dict[str, list[int]] = {"resid": [], "mlp": []}
    for n in graph.sorted_nodes():
        d = graph.g.nodes[n]
        if d.get("site") in want and int(d.get("feature", -1)) >= 0:
            want[d["site"]].append(int(d["feature"]))
    cards = {}
    for site, feats in want.items():
        for c in analyze_features(rep, tokens, site, feats, removal=removal,
                                  cache_dir=cache_dir, progress=progress,
                                  labels=(labels or {}).get(site), **card_kw):
            cards[c["id"]] = c
    return cards


# ---- 2. circuit ------------------------------------------------------------------------------


def render_svg(graph, rankdir: str | None = "auto") -> str | None:
    """The graph as an inline ``<svg>`` element from the system ``dot``; None when ``dot`` is absent.

    ``rankdir="auto"`` lays a graph with more than 6 nodes in a row out left to right (resid
    column, then mlp column), so a wide circuit stays legible beside the card panel.
    """
    exe = shutil.which("dot")
    if exe is None:
        return None
    src = graph.to_dot()
    if rankdir == "auto":
        rows: dict[str, int] = {}
        for n in graph.g.nodes:
            site = graph.g.nodes[n].get("site", "")
            rows[site] = rows.get(site, 0) + 1
        rankdir = "LR" if max(rows.values(), default=0) > 6 else None
    if rankdir:
        src = src.replace("rankdir=BT", f"rankdir={rankdir}", 1)
    proc = subprocess.run([exe, "-Tsvg"], input=src, capture_output=True, text=True,
                          encoding="utf-8", errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"`dot -Tsvg` failed with exit code {proc.returncode}: "
                           f"{' '.join(proc.stderr.split())[-300:]}")
    svg = proc.stdout
    start = svg.find("<svg")
    return svg[start:] if start >= 0 else None


# ---- 3. page ---------------------------------------------------------------------------------


@cache
def _asset(name: str) -> str:
    """A file of ``featcircuit/report_assets`` (package data, so it ships in the wheel)."""
    return files("featcircuit").joinpath("report_assets").joinpath(name).read_text(encoding="utf-8")


def _quality_html(quality: Mapping | None) -> str:
    if not quality:
        return "<p class='note'>no quality results</p>"
    out = []
    sites = quality.get("sites") or {}
    if sites:
        keys = ["l0", "variance_explained", "cos_sim", "dead_frac", "dense_frac", "rel_error_norm",
                "n_tokens"]
        out.append(html_table(["site"] + keys, [[e(k)] + [s.get(x) for x in keys] for k, s in sites.items()],
                              set(range(1, len(keys) + 1))))
    down = quality.get("downstream") or {}
    if down:
        out.append(f"<p class='meta'>next-token CE clean {fmt_num(down.get('ce_clean'))} nats/token over "
                   f"{fmt_num(down.get('n_tokens'))} tokens; spliced = the dictionary's reconstruction in "
                   "place of the activation</p>")
        keys = ["ce_spliced", "kl_spliced", "ce_zero", "ce_mean", "recovered_vs_zero", "recovered_vs_mean"]
        rows = [[w] + [down[w].get(k) for k in keys] for w in ("resid", "mlp", "both") if w in down]
        out.append(html_table(["spliced"] + keys, rows, set(range(1, len(keys) + 1))))
    return "".join(out)


def _glance_html(quality: Mapping | None, search: Mapping | None) -> str:
    rows = []
    for k, st in ((quality or {}).get("sites") or {}).items():
        down = ((quality or {}).get("downstream") or {}).get(k) or {}
        rows.append([e(k), st.get("l0"), st.get("variance_explained"), down.get("recovered_vs_zero")])
    out = ""
    if rows:
        head = ["dictionary", "L0", "variance explained", "CE recovered (vs zero)"]
        out += "<h3>At a glance</h3>" + html_table(head, rows, {1, 2, 3})
    c = ((search or {}).get("faithfulness") or {}).get("circuit") or {}
    s = (search or {}).get("search") or {}
    if c:
        out += (f"<p class='meta'>ablation search kept {fmt_num(s.get('n_kept'))} of "
                f"{fmt_num(s.get('n_candidates'))} candidate edges; that circuit's faithfulness "
                f"{fmt_num(c.get('faithfulness'))}</p>")
    return out


def _search_html(search: Mapping | None, out_dir: Path) -> str:
    out = []
    if search:
        s = search.get("search") or {}
        if s:
            keys = ["n_candidates", "n_kept", "passes", "seconds", "tau", "ablation"]
            row = [s.get(k) if k != "ablation" else e(str(s.get(k))) for k in keys]
            out.append("<h3>Ablation search</h3>" + html_table(keys, [row], set(range(len(keys))) - {5}))
        v = search.get("validation") or {}
        if v:
            out.append("<h3>Single-edge validation</h3><p class='meta'>each candidate edge ablated alone: "
                       "measured change against attribution's estimate</p>"
                       + html_table(["pearson", "spearman", "n_disagree", "n_edges"],
                                    [[v.get("pearson"), v.get("spearman"), v.get("n_disagree"),
                                      len(v.get("edges") or [])]], {0, 1, 2, 3}))
        f = search.get("faithfulness") or {}
        if f:
            c = f.get("circuit") or {}
            out.append("<h3>Faithfulness</h3>"
                       f"<p class='meta'>circuit of {fmt_num(c.get('size'))} edges: faithfulness "
                       f"{fmt_num(c.get('faithfulness'))}, completeness {fmt_num(c.get('completeness'))} "
                       "on held-out "
                       "tokens (∅ = every feature edge of the layer ablated)</p>")
            curves = f.get("curves") or {}
            sizes = f.get("sizes") or []
            if curves and sizes:
                names = list(curves)
                rows = []
                for k, size in enumerate(sizes):
                    rows.append([size] + [curves[n][k].get("faithfulness") if k < len(curves[n]) else None
                                          for n in names])
                out.append(html_table(["edges kept"] + [f"faithfulness ({n} order)" for n in names], rows,
                                      set(range(len(names) + 1))))
    png = out_dir / "faithfulness.png"
    if png.is_file():
        b64 = base64.b64encode(png.read_bytes()).decode("ascii")
        out.append(f'<img class="plot" alt="faithfulness curves" src="data:image/png;base64,{b64}">')
    return "".join(out) or "<p class='note'>no search was run (discover --search none)</p>"


def report_html(*, graph, cards: Mapping[str, dict], quality: Mapping | None, search: Mapping | None,
                svg: str | None, out_dir: Path, stats: Mapping | None = None,
                evidence: Sequence[Mapping] | None = None) -> str:
    """The whole report page as one HTML string (``evidence``: :func:`featcircuit.evidence.edge_evidence`)."""
    ev_by = {(x["source"], x["target"]): x for x in evidence or []}
    meta = graph.meta
    title = f"featcircuit: {meta.get('model', '?')} layer {meta.get('layer', '?')}"
    info = ", ".join(f"{k} {meta[k]}" for k in ("tokens", "metric", "search", "tau", "ablation", "ln",
                                               "edge_rank") if k in meta)
    nodes = graph.sorted_nodes()
    card_parts = []
    for n in nodes:
        d = graph.g.nodes[n]
        if n in cards:
            card_parts.append(card_html(cards[n], graph, ev_by))
        elif n == "out":
            card_parts.append(plain_card(n, "output", "The model's next-token loss (or the metric)."))
        elif int(d.get("feature", 0)) < 0:
            card_parts.append(plain_card(
                n, "reconstruction error", f"The part of the {d.get('site')} activation the dictionary "
                "does not reconstruct (activation − reconstruction); not a feature.",
                edges_html(graph, n, ev_by)))
        else:
            card_parts.append(plain_card(n, str(d.get("label", n)), "No card was computed for this node."))
    graph_html = svg if svg else (
        "<p class='note'>graphviz <code>dot</code> was not found, so the circuit is not drawn here: "
        "install graphviz (e.g. <code>apt-get install graphviz</code>) and re-run, or open a node "
        "from the node table below.</p>")
    st: dict[str, Any] = {"resid": None, "mlp": None} | dict(stats or {})
    rows, attrs = [], []
    for n in nodes:
        d = graph.g.nodes[n]
        c = cards.get(n)
        if c:
            freq = c["freq"]
        elif st.get(d.get("site")) is not None and d.get("feature", -1) >= 0:
            freq = float(st[d["site"]].freq[d["feature"]])
        else:
            freq = d.get("freq")
        sc = (c or {}).get("label_score") or {}
        f1 = sc.get("f1") if sc else d.get("label_f1")
        rows.append([f"<a href='#{e(n)}'>{e(n)}</a>{dense_badge(freq)}", e(str(d.get("label", n))), f1, freq,
                     d.get("max_act"), d.get("effect"), graph.g.in_degree(n) + graph.g.out_degree(n)])
        attrs.append(f' class="click" data-open="{e(n)}"')
    node_table = html_table(["node", "label", "label F1 (held-out)", "freq", "max act", "effect", "edges"],
                            rows, {2, 3, 4, 5, 6}, attrs)

    def lab(n: str) -> str:
        text = str(graph.g.nodes[n].get("label", n))
        return "" if text == n else e(text)

    def toks(u: str, v: str) -> str:
        ev = ev_by.get((u, v))
        if not ev:
            return "–"
        return ", ".join(f"<code>{e(repr(t['token']))}</code> {t['share']:+.0%}"
                         for t in ev["top_tokens"][:4])

    edge_rows = [[f"{e(u)}{dense_badge(graph.g.nodes[u].get('freq'))} <span class='meta'>{lab(u)}</span>",
                  f"{e(v)}{dense_badge(graph.g.nodes[v].get('freq'))} <span class='meta'>{lab(v)}</span>",
                  d["weight"], d["weight"] / d["count"] if d["count"] else None, d.get("behav_weight"),
                  d.get("delta"), d["count"], toks(u, v)]
                 for u, v, d in graph.sorted_edges()]
    edge_table = html_table(["source", "target", "weight", "mean per co-activation", "behav. weight",
                             "Δ (search)", "count", "tokens carrying the edge"], edge_rows, {2, 3, 4, 5, 6})
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{e(title)}</title><style>\n{_asset("report.css")}</style></head>
<body><header><h1>{e(title)}</h1><p>{e(info)} · {graph.g.number_of_nodes()} nodes,
{graph.g.number_of_edges()} edges · click a node to open its feature card</p></header>
<main>
<div class="top"><div id="graph">{graph_html}</div>
<div id="panel"><div id="hint"><p class="hint">Click a node of the circuit (or a row of the node table)
to see its feature card: top-activating contexts, one example per activation bin, logit lens,
token-removal effects and the activation density.</p>{_glance_html(quality, search)}</div>
{''.join(card_parts)}</div></div>
<h2>Nodes</h2>{node_table}
<h2>Dictionary quality (held-out)</h2>{_quality_html(quality)}
<h2>Search, validation and faithfulness</h2>{_search_html(search, out_dir)}
<h2>Edges</h2>{edge_table}
<p class="meta">exports beside this file: features.json (Neuronpedia feature-dashboard fields),
attribution_graph.json (nodes/links), graph.json (featcircuit schema)</p>
</main><script>\n{_asset("report.js")}</script></body></html>
"""


# ---- the entry point -------------------------------------------------------------------------


def write_report(out_dir: str | Path, *, rep, tokens, graph, quality: Mapping | None,
                 search: Mapping | None = None, stats: Mapping | None = None,
                 cards: Mapping[str, dict] | None = None, removal: bool = True, cache_dir=None,
                 progress: bool = False, labels: Mapping[str, Mapping[int, Mapping]] | None = None,
                 evidence: Sequence[Mapping] | None = None) -> Path:
    """Write ``report.html``, ``features.json`` and ``attribution_graph.json`` of ``graph``, the
    circuit of the one-layer :class:`~featcircuit.replacement.Replacement` ``rep``; returns the
    HTML's path. ``rep`` may be None when ``cards`` are given (the model's name and the layer are
    then read from ``graph.meta``).

    ``labels``: scored labels ``{site: {feature: label}}`` (:func:`featcircuit.labels.label_pair`)
    for the cards; ``evidence``: :func:`featcircuit.evidence.edge_evidence` of the graph's edges,
    shown in the cards and the edge table and also written to ``edge_evidence.json``.
    """
    from .models import model_name
    from .replacement import one_layer

    if rep is not None:
        rep = one_layer(rep, "write_report")
    elif cards is None:
        raise UserError("write_report without a Replacement needs the cards (graph_cards) to show")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cards is None:
        cards = graph_cards(rep, tokens, graph, removal=removal, cache_dir=cache_dir,
                            progress=progress, labels=labels)
    svg = render_svg(graph)
    page = report_html(graph=graph, cards=cards, quality=quality, search=search, svg=svg, out_dir=out,
                       stats=stats, evidence=evidence)
    if evidence is not None:
        from .evidence import save_evidence

        save_evidence(evidence, out / "edge_evidence.json")
    name = model_name(rep.model) if rep is not None else str(graph.meta.get("model", "model"))
    layer = rep.layer if rep is not None else graph.meta.get("layer")
    atomic_write_text(out / "features.json", json.dumps(
        {"modelId": name, "layer": layer, "source": "featcircuit",
         "features": [neuronpedia_feature(c, name) for c in cards.values()]}, ensure_ascii=False))
    atomic_write_text(out / "attribution_graph.json", json.dumps(attribution_graph(graph, cards, evidence),
                                                                 indent=1))
    return atomic_write_text(out / "report.html", page)

