"""The HTML report of a discovered circuit: one self-contained file that works offline (DESIGN §9).

1. *Cards*: every feature node of the graph gets a feature card
   (:func:`featcircuit.cards.analyze_features`: one cached pass per dictionary, plus the
   token-removal reruns) headed by its label and held-out F1 when scored labels are given
   (:mod:`featcircuit.labels`), a ``DENSE`` badge above 10% of tokens, and for each of its edges
   the evidence of :func:`featcircuit.evidence.edge_evidence` (mean per co-activation, top
   contexts shaded by e_ij, the tokens carrying the edge); error nodes list their edges too, and
   ``out`` gets a short explanatory card.
2. *Circuit*: the graph's DOT source rendered to SVG by the system ``dot`` (stdin to stdout) and
   inlined; without ``dot`` the page says so and the node table stays the way in.
3. *Page*: the circuit beside a card panel (click a node, or a row of the node table, to open
   its card; ``#resid2/5`` in the URL opens one too), the dictionary-quality tables, the search,
   validation and faithfulness results (``faithfulness.png`` inlined as base64 when present) and
   the edge table. CSS and JS are inline; nothing is fetched, no server is needed.
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
5. *Browser* (:func:`browser`, :func:`screenshot_report`): headless Chromium through selenium
   (optional: ``pip install selenium`` and Debian's ``chromium chromium-driver``), for the tests
   and the screenshots in ``docs/``.
"""

from __future__ import annotations

import base64
import html
import json
import math
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from .errors import UserError
from .cards import analyze_features
from .contexts import show_token
from .lens import LENS_RULE
from .io import atomic_write_text
from .exports import attribution_graph, neuronpedia_feature

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


# ---- 1. cards --------------------------------------------------------------------------------


def graph_cards(model, pair, tokens, layer: int, graph, *, removal: bool = True,
                cache_dir=None, progress: bool = False,
                labels: Mapping[str, Mapping[int, Mapping]] | None = None, **card_kw) -> dict[str, dict]:
    """``{node id: card}`` for every feature node of ``graph`` (``labels``: ``{site: {feature: label}}``)."""
    want: dict[str, list[int]] = {"resid": [], "mlp": []}
    for n in graph.sorted_nodes():
        d = graph.g.nodes[n]
        if d.get("site") in want and int(d.get("feature", -1)) >= 0:
            want[d["site"]].append(int(d["feature"]))
    cards = {}
    for site, feats in want.items():
        for c in analyze_features(model, pair, tokens, layer, site, feats, removal=removal,
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

_CSS = """
*{box-sizing:border-box}
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;
  color:#222;background:#fafafa}
header{padding:10px 18px;background:#24292f;color:#fff}
header h1{font-size:18px;margin:0}
header p{margin:2px 0 0;color:#cbd2d9;font-size:12px}
main{padding:12px 18px}
h2{font-size:16px;margin:22px 0 8px;border-bottom:1px solid #ddd;padding-bottom:3px}
h3{font-size:14px;margin:14px 0 6px}
.top{display:flex;gap:14px;align-items:flex-start}
#graph{flex:0 1 auto;max-width:60%;min-width:240px;overflow:auto;background:#fff;
  border:1px solid #ddd;border-radius:6px;padding:6px;max-height:88vh}
#graph svg{display:block}
#graph g.node{cursor:pointer}
#graph g.node:hover path,#graph g.node:hover polygon{stroke-width:2.5}
#graph g.node.sel path,#graph g.node.sel polygon{stroke:#ff7f0e;stroke-width:3.5}
#panel{flex:1 1 40%;min-width:380px;max-height:88vh;overflow:auto;background:#fff;
  border:1px solid #ddd;border-radius:6px;padding:10px 12px;position:sticky;top:8px}
#panel .hint{color:#777}
.card{display:none}
.card.open{display:block}
.card h3:first-child{margin-top:0}
.close{float:right;cursor:pointer;border:1px solid #ccc;background:#f6f6f6;border-radius:4px;
  padding:0 7px}
.meta{color:#555;font-size:12px}
table{border-collapse:collapse;font-size:12.5px;margin:4px 0 8px}
th,td{border-bottom:1px solid #eee;padding:2px 7px;text-align:left;vertical-align:top}
th{background:#f3f3f3}
td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.click{cursor:pointer}
tr.click:hover{background:#eef4ff}
.ctx{font:12px/1.5 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;white-space:pre-wrap;
  word-break:break-all}
.ctx span{border-radius:2px}
.ctx .hit{outline:2px solid #d62728;font-weight:bold}
.note{background:#fff8e1;border:1px solid #f0d98c;padding:6px 10px;border-radius:4px}
.dense{display:inline-block;background:#d62728;color:#fff;font-size:11px;font-weight:bold;
  border-radius:3px;padding:0 5px;margin-left:4px}
.score{font-size:12.5px;margin:2px 0 6px}
.ev{border-left:3px solid #ccc;padding-left:8px;margin:6px 0 10px}
.bar{display:inline-block;height:9px;vertical-align:middle}
.pos{background:#1f77b4}.neg{background:#d62728}
img.plot{max-width:720px;width:100%;border:1px solid #ddd;background:#fff}
"""

_JS = """
(function () {
  'use strict';
  var cards = {};
  document.querySelectorAll('.card').forEach(function (c) { cards[c.getAttribute('data-node')] = c; });
  var svgNodes = {};
  document.querySelectorAll('#graph g.node').forEach(function (g) {
    var t = g.querySelector('title');
    if (!t) { return; }
    var id = t.textContent.trim();
    svgNodes[id] = g;
    g.addEventListener('click', function (ev) { ev.preventDefault(); openCard(id); });
  });
  function openCard(id) {
    var c = cards[id];
    if (!c) { return false; }
    Object.keys(cards).forEach(function (k) { cards[k].classList.remove('open'); });
    Object.keys(svgNodes).forEach(function (k) { svgNodes[k].classList.remove('sel'); });
    c.classList.add('open');
    if (svgNodes[id]) { svgNodes[id].classList.add('sel'); }
    document.getElementById('hint').style.display = 'none';
    document.getElementById('panel').scrollTop = 0;
    if (decodeURIComponent(location.hash.slice(1)) !== id) {
      history.replaceState(null, '', '#' + encodeURIComponent(id));
    }
    return true;
  }
  document.querySelectorAll('[data-open]').forEach(function (el) {
    el.addEventListener('click', function (ev) {
      ev.preventDefault();
      openCard(el.getAttribute('data-open'));
    });
  });
  document.querySelectorAll('.close').forEach(function (b) {
    b.addEventListener('click', function () {
      Object.keys(cards).forEach(function (k) { cards[k].classList.remove('open'); });
      Object.keys(svgNodes).forEach(function (k) { svgNodes[k].classList.remove('sel'); });
      document.getElementById('hint').style.display = '';
    });
  });
  window.featcircuitOpen = openCard;
  function fromHash() {
    if (location.hash.length > 1) { openCard(decodeURIComponent(location.hash.slice(1))); }
  }
  window.addEventListener('hashchange', fromHash);
  fromHash();
})();
"""

e = html.escape


def _num(x: Any, fmt: str = ".4g") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return e(str(x))
    return format(x, fmt) if isinstance(x, float) else f"{x:,}"


def _table(head: list[str], rows: list[list[Any]], numeric: set[int] | None = None,
           row_attrs: list[str] | None = None) -> str:
    numeric = numeric if numeric is not None else set()
    out = ["<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>"]
    for k, r in enumerate(rows):
        attrs = row_attrs[k] if row_attrs else ""
        cells = "".join(f'<td class="n">{_num(v)}</td>' if i in numeric else f"<td>{v}</td>"
                        for i, v in enumerate(r))
        out.append(f"<tr{attrs}>{cells}</tr>")
    return "".join(out) + "</table>"


def _ctx_html(tokens: list[str], values: list[float], hit: int | None, vmax: float,
              signed: bool = False) -> str:
    spans = []
    for i, (t, v) in enumerate(zip(tokens, values)):
        a = min(1.0, abs(v) / vmax) if vmax > 0 else 0.0
        rgb = ("31,119,180" if v < 0 else "214,39,40") if signed else "255,127,14"
        style = f' style="background:rgba({rgb},{a * 0.75:.3f})"' if a > 0 else ""
        cls = ' class="hit"' if i == hit else ""
        spans.append(f'<span{cls}{style} title="{e(repr(t))}: {v:.4g}">{e(show_token(t))}</span>')
    return '<div class="ctx">' + "".join(spans) + "</div>"


def _example_html(ex: dict, vmax: float) -> str:
    return _ctx_html(ex["tokens"], ex["values"], ex["index"], vmax)


def _hist_svg(edges: list[float], counts: list[int], w: int = 340, h: int = 70,
              color: str = "#ff7f0e") -> str:
    n = len(counts)
    peak = max(counts) if counts and max(counts) > 0 else 1
    bw = w / max(1, n)
    bars = "".join(
        f'<rect x="{i * bw:.1f}" y="{h - h * c / peak:.1f}" width="{max(bw - 1, 1):.1f}" '
        f'height="{h * c / peak:.1f}" fill="{color}">'
        f'<title>{edges[i]:.3g}–{edges[i + 1]:.3g}: {c}</title></rect>'
        for i, c in enumerate(counts))
    lo, hi = (edges[0], edges[-1]) if edges else (0, 0)
    return (f'<svg class="hist" width="{w}" height="{h + 14}" viewBox="0 0 {w} {h + 14}">{bars}'
            f'<text x="0" y="{h + 12}" font-size="10">{lo:.3g}</text>'
            f'<text x="{w}" y="{h + 12}" font-size="10" text-anchor="end">{hi:.3g}</text></svg>')


def _edges_of(graph, nid: str, evidence: Mapping | None = None) -> str:
    def lab(n: str) -> str:
        text = str(graph.g.nodes[n].get("label", n))
        return "" if text == n else text

    rows, attrs, ev_parts = [], [], []
    for u, v, d in graph.sorted_edges():
        if nid in (u, v):
            other = v if u == nid else u
            dense = _dense_badge(graph.g.nodes[other].get("freq"))
            rows.append(["→" if u == nid else "←",
                         f"{e(other)}{dense} <span class='meta'>{e(lab(other))}</span>", d["weight"],
                         d["weight"] / d["count"] if d.get("count") else None, d.get("count"),
                         d.get("delta")])
            attrs.append(f' class="click" data-open="{e(other)}"')
            ev = (evidence or {}).get((u, v))
            if ev is not None:
                ev_parts.append(_evidence_html(ev))
    if not rows:
        return ""
    out = "<h3>Edges in the circuit</h3>" + _table(["", "node", "weight", "mean per co-activation", "count",
                                                    "Δ (search)"], rows, {2, 3, 4, 5}, attrs)
    if ev_parts:
        out += ("<h3>Edge evidence</h3><p class='meta'>for each edge, the contexts where its per-token "
                "weight e<sub>ij</sub>(t) is largest (in the direction of its sign; one per document, no "
                "near-identical contexts), shaded by e<sub>ij</sub> at each token; and the current tokens "
                "that carry the most of Σ<sub>t</sub> e<sub>ij</sub>(t)</p>" + "".join(ev_parts))
    return out


def _dense_badge(freq) -> str:
    from .stats import DENSE_FREQ, is_dense

    return (f"<span class='dense' title='active on more than {DENSE_FREQ:.0%} of tokens'>DENSE "
            f"{float(freq):.0%}</span>" if is_dense(freq) else "")


def _evidence_html(ev: Mapping) -> str:
    """One edge's evidence: mean per co-activation, the tokens that carry it, the top contexts."""
    toks = ", ".join(f"<code>{e(repr(t['token']))}</code> {t['share']:+.0%}"
                     for t in ev.get("top_tokens", [])[:6])
    head = (f"<p><b>{e(ev['source'])} → {e(ev['target'])}</b>: Σ e = {_num(ev['sum'])} over "
            f"{ev['count']:,} co-activations; <b>mean per co-activation {_num(ev.get('mean'))}</b>; "
            f"max |e| {_num(ev.get('max_abs'))}</p>"
            + (f"<p class='meta'>share of Σ|e| by current token: {toks}</p>" if toks else ""))
    top = ev.get("top") or []
    vmax = max([abs(v) for x in top for v in x["values"]] or [1.0]) or 1.0
    rows = [[x["edge"], x.get("a"), x.get("f"),
             _ctx_html(x["tokens"], x["values"], x["index"], vmax, signed=True)] for x in top]
    table = _table(["e_ij", "a_i", "f_j", "context (e_ij per token)"], rows, {0, 1, 2}) if rows else ""
    return f"<div class='ev' data-edge='{e(ev['source'])}->{e(ev['target'])}'>{head}{table}</div>"


def _score_html(card: Mapping) -> str:
    sc = card.get("label_score")
    if not sc:
        return ("<p class='score'>label: <b>" + e(card["label"]) + "</b> <span class='meta'>(unscored: the "
                "dominant token of the top activations)</span></p>")
    if sc.get("f1") is None:
        return (f"<p class='score'>label: <b>{e(card['label'])}</b> <span class='meta'>(no score: the "
                f"feature never fires on the held-out tokens)</span></p>")
    return (f"<p class='score'>label: <b>{e(card['label'])}</b> — held-out <b>F1 {sc['f1']:.2f}</b> "
            f"(precision {sc['precision']:.2f}, recall {sc['recall']:.2f}; {sc['n_fire']:,} firing tokens, "
            f"fires = activation &gt; {sc.get('threshold', 0):.3g}; the rule “every token” scores "
            f"F1 {sc.get('base_f1', 0):.2f}; training F1 {_num(sc.get('train_f1'), '.2f')})</p>")


def card_html(card: dict, graph=None, evidence: Mapping | None = None) -> str:
    """A feature card as an HTML ``<section>`` (hidden until opened); ``evidence`` by (source, target)."""
    nid, vmax = card["id"], card["max_act"]
    node = graph.g.nodes[nid] if graph is not None and nid in graph.g else {}
    parts = [f'<section class="card" data-node="{e(nid)}"><button class="close" title="close">×</button>',
             f"<h3>{e(nid)} <span class='meta'>{e(card['label'])}</span>{_dense_badge(card['freq'])}</h3>",
             _score_html(card),
             f"<p class='meta'>active on {card['n_active']:,} of {card['n_tokens']:,} tokens "
             f"(freq {card['freq']:.3%}{', dense' if card.get('dense') else ''}); "
             f"mean {card['mean_act']:.3g}, "
             f"max {vmax:.3g}; hook <code>{e(card['hook'])}</code>"
             + (f"; node effect {_num(node.get('effect'))}" if node.get("effect") is not None else "")
             + "</p>"]
    parts.append(_edges_of(graph, nid, evidence) if graph is not None else "")
    parts.append(f"<h3>Top activations</h3><p class='meta'>one per document, no near-identical contexts "
                 f"({card.get('n_docs', '?')} documents hold activations)</p>")
    if card["top"]:
        parts.append(_table(["act", "context (activating token outlined)"],
                            [[ex["act"], _example_html(ex, vmax)] for ex in card["top"]], {0}))
    else:
        parts.append("<p class='note'>never active on the analysed tokens</p>")
    if card.get("quantiles"):
        parts.append(f"<h3>Across the quantiles</h3><p class='meta'>the activations cut into "
                     f"{len(card['quantiles'])} groups of equal size; one example from each</p>")
        parts.append(_table(["quantiles", "count", "range", "act", "context"],
                            [[f"{q['q_lo']:.0%}–{q['q_hi']:.0%}", q["count"],
                              f"{_num(q['lo'], '.3g')}–{_num(q['hi'], '.3g')}",
                              q["example"]["act"] if q["example"] else None,
                              _example_html(q["example"], vmax) if q["example"] else "–"]
                             for q in reversed(card["quantiles"])], {1, 3}))
    if card["bins"]:
        parts.append("<h3>Across the range: one example per activation bin</h3>")
        parts.append(_table(["bin", "count", "act", "context"],
                            [[f"({b['lo']:.3g}, {b['hi']:.3g}]", b["count"],
                              b["example"]["act"] if b["example"] else None,
                              _example_html(b["example"], vmax) if b["example"] else "–"]
                             for b in reversed(card["bins"])], {1, 2}))
    lens = card["lens"]
    parts.append(f"<h3>Logit lens</h3><p class='meta'>{lens['n_shown']:,} of {lens['n_vocab']:,} tokens "
                 f"shown; {e(LENS_RULE)}</p>")
    m = max([abs(x["value"]) for x in lens["top"] + lens["bottom"]] or [1.0]) or 1.0
    rows = [[f"<code>{e(repr(a['token']))}</code>", a["value"],
             f"<span class='bar pos' style='width:{60 * abs(a['value']) / m:.0f}px'></span>",
             f"<code>{e(repr(b['token']))}</code>", b["value"],
             f"<span class='bar neg' style='width:{60 * abs(b['value']) / m:.0f}px'></span>"]
            for a, b in zip(lens["top"], lens["bottom"])]
    parts.append(_table(["promotes", "", "", "suppresses", "", ""], rows, {1, 4}))
    rem = card.get("removal")
    if rem:
        parts.append(f"<h3>Token removal</h3><p class='meta'>top example (seq {rem['seq']}, "
                     f"pos {rem['pos']}, activation {rem['act']:.3g}): each of the "
                     f"{len(rem['effects'])} earlier tokens dropped in turn; blue = activation falls "
                     "without it, red = rises</p>")
        if rem["effects"]:
            eff = rem["effects"]
            dm = max(abs(x["delta"]) for x in eff) or 1.0
            toks = [x["token"] for x in eff] + [rem["token"]]
            vals = [x["delta"] for x in eff] + [0.0]
            parts.append(_ctx_html(toks, vals, len(toks) - 1, dm, signed=True))
            big = sorted(eff, key=lambda x: -abs(x["delta"]))[:6]
            parts.append(_table(["token", "offset", "Δ activation"],
                                [[f"<code>{e(repr(x['token']))}</code>", x["pos"] - rem["pos"], x["delta"]]
                                 for x in big], {1, 2}))
    h = card["histogram"]
    parts.append(f"<h3>Activation density</h3><p class='meta'>counts of nonzero activations per bin of "
                 f"(0, max]; frequency {card['freq']:.3%}</p>" + _hist_svg(h["edges"], h["counts"]))
    parts.append("</section>")
    return "".join(parts)


def _plain_card(nid: str, title: str, text: str, extra: str = "") -> str:
    return (f'<section class="card" data-node="{e(nid)}"><button class="close" title="close">×</button>'
            f"<h3>{e(nid)} <span class='meta'>{e(title)}</span></h3><p>{e(text)}</p>{extra}</section>")


def _quality_html(quality: Mapping | None) -> str:
    if not quality:
        return "<p class='note'>no quality results</p>"
    out = []
    sites = quality.get("sites") or {}
    if sites:
        keys = ["l0", "variance_explained", "cos_sim", "dead_frac", "dense_frac", "rel_error_norm",
                "n_tokens"]
        out.append(_table(["site"] + keys, [[e(k)] + [s.get(x) for x in keys] for k, s in sites.items()],
                          set(range(1, len(keys) + 1))))
    down = quality.get("downstream") or {}
    if down:
        out.append(f"<p class='meta'>next-token CE clean {_num(down.get('ce_clean'))} nats/token over "
                   f"{_num(down.get('n_tokens'))} tokens; spliced = the dictionary's reconstruction in "
                   "place of the activation</p>")
        keys = ["ce_spliced", "kl_spliced", "ce_zero", "ce_mean", "recovered_vs_zero", "recovered_vs_mean"]
        rows = [[w] + [down[w].get(k) for k in keys] for w in ("resid", "mlp", "both") if w in down]
        out.append(_table(["spliced"] + keys, rows, set(range(1, len(keys) + 1))))
    return "".join(out)


def _glance_html(quality: Mapping | None, search: Mapping | None) -> str:
    rows = []
    for k, st in ((quality or {}).get("sites") or {}).items():
        down = ((quality or {}).get("downstream") or {}).get(k) or {}
        rows.append([e(k), st.get("l0"), st.get("variance_explained"), down.get("recovered_vs_zero")])
    out = ""
    if rows:
        head = ["dictionary", "L0", "variance explained", "CE recovered (vs zero)"]
        out += "<h3>At a glance</h3>" + _table(head, rows, {1, 2, 3})
    c = ((search or {}).get("faithfulness") or {}).get("circuit") or {}
    s = (search or {}).get("search") or {}
    if c:
        out += (f"<p class='meta'>ablation search kept {_num(s.get('n_kept'))} of "
                f"{_num(s.get('n_candidates'))} candidate edges; that circuit's faithfulness "
                f"{_num(c.get('faithfulness'))}</p>")
    return out


def _search_html(search: Mapping | None, out_dir: Path) -> str:
    out = []
    if search:
        s = search.get("search") or {}
        if s:
            keys = ["n_candidates", "n_kept", "passes", "seconds", "tau", "ablation"]
            row = [s.get(k) if k != "ablation" else e(str(s.get(k))) for k in keys]
            out.append("<h3>Ablation search</h3>" + _table(keys, [row], set(range(len(keys))) - {5}))
        v = search.get("validation") or {}
        if v:
            out.append("<h3>Single-edge validation</h3><p class='meta'>each candidate edge ablated alone: "
                       "measured change against attribution's estimate</p>"
                       + _table(["pearson", "spearman", "n_disagree", "n_edges"],
                                [[v.get("pearson"), v.get("spearman"), v.get("n_disagree"),
                                  len(v.get("edges") or [])]], {0, 1, 2, 3}))
        f = search.get("faithfulness") or {}
        if f:
            c = f.get("circuit") or {}
            out.append("<h3>Faithfulness</h3>"
                       f"<p class='meta'>circuit of {_num(c.get('size'))} edges: faithfulness "
                       f"{_num(c.get('faithfulness'))}, completeness {_num(c.get('completeness'))} on held-out "
                       "tokens (∅ = every feature edge of the layer ablated)</p>")
            curves = f.get("curves") or {}
            sizes = f.get("sizes") or []
            if curves and sizes:
                names = list(curves)
                rows = []
                for k, size in enumerate(sizes):
                    rows.append([size] + [curves[n][k].get("faithfulness") if k < len(curves[n]) else None
                                          for n in names])
                out.append(_table(["edges kept"] + [f"faithfulness ({n} order)" for n in names], rows,
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
            card_parts.append(_plain_card(n, "output", "The model's next-token loss (or the metric)."))
        elif int(d.get("feature", 0)) < 0:
            card_parts.append(_plain_card(
                n, "reconstruction error", f"The part of the {d.get('site')} activation the dictionary "
                "does not reconstruct (activation − reconstruction); not a feature.",
                _edges_of(graph, n, ev_by)))
        else:
            card_parts.append(_plain_card(n, str(d.get("label", n)), "No card was computed for this node."))
    graph_html = svg if svg else (
        "<p class='note'>graphviz <code>dot</code> was not found, so the circuit is not drawn here: "
        "install graphviz (e.g. <code>apt-get install graphviz</code>) and re-run, or open a node "
        "from the node table below.</p>")
    st = {"resid": None, "mlp": None} | dict(stats or {})
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
        rows.append([f"<a href='#{e(n)}'>{e(n)}</a>{_dense_badge(freq)}", e(str(d.get("label", n))), f1, freq,
                     d.get("max_act"), d.get("effect"), graph.g.in_degree(n) + graph.g.out_degree(n)])
        attrs.append(f' class="click" data-open="{e(n)}"')
    node_table = _table(["node", "label", "label F1 (held-out)", "freq", "max act", "effect", "edges"], rows,
                        {2, 3, 4, 5, 6}, attrs)
    def lab(n: str) -> str:
        text = str(graph.g.nodes[n].get("label", n))
        return "" if text == n else e(text)

    def toks(u: str, v: str) -> str:
        ev = ev_by.get((u, v))
        if not ev:
            return "–"
        return ", ".join(f"<code>{e(repr(t['token']))}</code> {t['share']:+.0%}"
                         for t in ev["top_tokens"][:4])

    edge_rows = [[f"{e(u)}{_dense_badge(graph.g.nodes[u].get('freq'))} <span class='meta'>{lab(u)}</span>",
                  f"{e(v)}{_dense_badge(graph.g.nodes[v].get('freq'))} <span class='meta'>{lab(v)}</span>",
                  d["weight"], d["weight"] / d["count"] if d["count"] else None, d.get("behav_weight"),
                  d.get("delta"), d["count"], toks(u, v)]
                 for u, v, d in graph.sorted_edges()]
    edge_table = _table(["source", "target", "weight", "mean per co-activation", "behav. weight",
                         "Δ (search)", "count", "tokens carrying the edge"], edge_rows, {2, 3, 4, 5, 6})
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{e(title)}</title><style>{_CSS}</style></head>
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
</main><script>{_JS}</script></body></html>
"""


# ---- the entry point -------------------------------------------------------------------------


def write_report(out_dir: str | Path, *, model, pair, tokens, layer: int, graph, quality: Mapping | None,
                 search: Mapping | None = None, stats: Mapping | None = None,
                 cards: Mapping[str, dict] | None = None, removal: bool = True, cache_dir=None,
                 progress: bool = False, labels: Mapping[str, Mapping[int, Mapping]] | None = None,
                 evidence: Sequence[Mapping] | None = None) -> Path:
    """Write ``report.html``, ``features.json`` and ``attribution_graph.json``; returns the HTML's path.

    ``labels``: scored labels ``{site: {feature: label}}`` (:func:`featcircuit.labels.label_pair`)
    for the cards; ``evidence``: :func:`featcircuit.evidence.edge_evidence` of the graph's edges,
    shown in the cards and the edge table and also written to ``edge_evidence.json``.
    """
    from .models import model_name

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cards is None:
        cards = graph_cards(model, pair, tokens, layer, graph, removal=removal, cache_dir=cache_dir,
                            progress=progress, labels=labels)
    svg = render_svg(graph)
    page = report_html(graph=graph, cards=cards, quality=quality, search=search, svg=svg, out_dir=out,
                       stats=stats, evidence=evidence)
    if evidence is not None:
        from .evidence import save_evidence

        save_evidence(evidence, out / "edge_evidence.json")
    name = model_name(model) if model is not None else str(graph.meta.get("model", "model"))
    atomic_write_text(out / "features.json", json.dumps(
        {"modelId": name, "layer": layer, "source": "featcircuit",
         "features": [neuronpedia_feature(c, name) for c in cards.values()]}, ensure_ascii=False))
    atomic_write_text(out / "attribution_graph.json", json.dumps(attribution_graph(graph, cards, evidence),
                                                                 indent=1))
    return atomic_write_text(out / "report.html", page)


# ---- 5. browser ------------------------------------------------------------------------------


@contextmanager
def browser(width: int = 1600, height: int = 1000) -> Iterator[Any]:
    """A headless Chromium selenium driver (browser log enabled); needs selenium, chromium, chromedriver."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        raise UserError("selenium is not installed: pip install selenium") from None
    if not Path(CHROMIUM).exists() or not Path(CHROMEDRIVER).exists():
        raise UserError(f"{CHROMIUM} or {CHROMEDRIVER} is missing: apt-get install chromium chromium-driver")
    with tempfile.TemporaryDirectory(prefix="featcircuit-chromium-") as profile:
        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--window-size={width},{height}"):
            opts.add_argument(a)
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
        try:
            driver.set_window_size(width, height)
            yield driver
        finally:
            driver.quit()


def click_node(driver, node: str) -> None:
    """Click the SVG node ``node`` of an open report (falls back to its node-table row without an SVG)."""
    from selenium.webdriver.common.by import By

    for g in driver.find_elements(By.CSS_SELECTOR, "#graph g.node"):
        t = g.find_element(By.TAG_NAME, "title")
        if t.get_attribute("textContent").strip() == node:
            driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", g)
            target = (g.find_elements(By.CSS_SELECTOR, "text")
                      or g.find_elements(By.CSS_SELECTOR, "path, polygon"))
            (target or [g])[0].click()  # a real click where a user would: on the node's label
            return
    for row in driver.find_elements(By.CSS_SELECTOR, "tr[data-open]"):
        if row.get_attribute("data-open") == node:
            driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", row)
            row.click()
            return
    raise UserError(f"node {node!r} is not in the report")


def screenshot_report(html_path: str | Path, png: str | Path, *, node: str | None = None,
                      width: int = 1600, height: int = 1000) -> list[dict]:
    """Open a report in headless Chromium, optionally click ``node``, save a PNG; returns the browser log."""
    with browser(width, height) as driver:
        driver.get(Path(html_path).resolve().as_uri())
        if node is not None:
            from selenium.webdriver.common.action_chains import ActionChains
            from selenium.webdriver.common.by import By

            click_node(driver, node)
            driver.execute_script("window.scrollTo(0, 0);")
            # park the pointer on the header, so no node is drawn in its hover state
            ActionChains(driver).move_to_element(driver.find_element(By.TAG_NAME, "header")).perform()
        Path(png).parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(png))
        return driver.get_log("browser")
