"""A feature card of the report as HTML: what a reader sees on clicking a node (DESIGN §9).

A card (:func:`card_html`, from a card dict of :func:`featcircuit.cards.analyze_features`) shows,
top to bottom: the label and its held-out F1 (:func:`score_html`), activity and the ``DENSE``
badge; the node's edges in the circuit with each edge's evidence (:func:`edges_html`,
:func:`evidence_html`); the top activations; one example per quantile and per activation bin;
the logit lens; token removal; the activation density. Error nodes and the output get a
:func:`plain_card`. Cards are hidden until the page's script opens one.
"""

from __future__ import annotations

from collections.abc import Mapping
from html import escape as e

from .htmlbits import context_html, dense_badge, fmt_num, hist_svg, html_table
from .lens import LENS_RULE


def _example_html(ex: dict, vmax: float) -> str:
    return context_html(ex["tokens"], ex["values"], ex["index"], vmax)


def edges_html(graph, nid: str, evidence: Mapping | None = None) -> str:
    """The edges of node ``nid`` as a clickable table, then the evidence of each (``evidence`` by edge)."""
    def lab(n: str) -> str:
        text = str(graph.g.nodes[n].get("label", n))
        return "" if text == n else text

    rows, attrs, ev_parts = [], [], []
    for u, v, d in graph.sorted_edges():
        if nid in (u, v):
            other = v if u == nid else u
            dense = dense_badge(graph.g.nodes[other].get("freq"))
            rows.append(["→" if u == nid else "←",
                         f"{e(other)}{dense} <span class='meta'>{e(lab(other))}</span>", d["weight"],
                         d["weight"] / d["count"] if d.get("count") else None, d.get("count"),
                         d.get("delta")])
            attrs.append(f' class="click" data-open="{e(other)}"')
            ev = (evidence or {}).get((u, v))
            if ev is not None:
                ev_parts.append(evidence_html(ev))
    if not rows:
        return ""
    head = ["", "node", "weight", "mean per co-activation", "count", "Δ (search)"]
    out = "<h3>Edges in the circuit</h3>" + html_table(head, rows, {2, 3, 4, 5}, attrs)
    if ev_parts:
        out += ("<h3>Edge evidence</h3><p class='meta'>for each edge, the contexts where its per-token "
                "weight e<sub>ij</sub>(t) is largest (in the direction of its sign; one per document, no "
                "near-identical contexts), shaded by e<sub>ij</sub> at each token; and the current tokens "
                "that carry the most of Σ<sub>t</sub> e<sub>ij</sub>(t)</p>" + "".join(ev_parts))
    return out


def evidence_html(ev: Mapping) -> str:
    """One edge's evidence: mean per co-activation, the tokens that carry it, the top contexts."""
    toks = ", ".join(f"<code>{e(repr(t['token']))}</code> {t['share']:+.0%}"
                     for t in ev.get("top_tokens", [])[:6])
    head = (f"<p><b>{e(ev['source'])} → {e(ev['target'])}</b>: Σ e = {fmt_num(ev['sum'])} over "
            f"{ev['count']:,} co-activations; <b>mean per co-activation {fmt_num(ev.get('mean'))}</b>; "
            f"max |e| {fmt_num(ev.get('max_abs'))}</p>"
            + (f"<p class='meta'>share of Σ|e| by current token: {toks}</p>" if toks else ""))
    top = ev.get("top") or []
    vmax = max([abs(v) for x in top for v in x["values"]] or [1.0]) or 1.0
    rows = [[x["edge"], x.get("a"), x.get("f"),
             context_html(x["tokens"], x["values"], x["index"], vmax, signed=True)] for x in top]
    table = html_table(["e_ij", "a_i", "f_j", "context (e_ij per token)"], rows, {0, 1, 2}) if rows else ""
    return f"<div class='ev' data-edge='{e(ev['source'])}->{e(ev['target'])}'>{head}{table}</div>"


def score_html(card: Mapping) -> str:
    """The card's label line: its held-out F1 and how it was scored, or why it has none."""
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
            f"F1 {sc.get('base_f1', 0):.2f}; training F1 {fmt_num(sc.get('train_f1'), '.2f')})</p>")


def card_html(card: dict, graph=None, evidence: Mapping | None = None) -> str:
    """A feature card as an HTML ``<section>`` (hidden until opened); ``evidence`` by (source, target)."""
    nid, vmax = card["id"], card["max_act"]
    node = graph.g.nodes[nid] if graph is not None and nid in graph.g else {}
    parts = [f'<section class="card" data-node="{e(nid)}"><button class="close" title="close">×</button>',
             f"<h3>{e(nid)} <span class='meta'>{e(card['label'])}</span>{dense_badge(card['freq'])}</h3>",
             score_html(card),
             f"<p class='meta'>active on {card['n_active']:,} of {card['n_tokens']:,} tokens "
             f"(freq {card['freq']:.3%}{', dense' if card.get('dense') else ''}); "
             f"mean {card['mean_act']:.3g}, "
             f"max {vmax:.3g}; hook <code>{e(card['hook'])}</code>"
             + (f"; node effect {fmt_num(node.get('effect'))}" if node.get("effect") is not None else "")
             + "</p>"]
    parts.append(edges_html(graph, nid, evidence) if graph is not None else "")
    parts.append(f"<h3>Top activations</h3><p class='meta'>one per document, no near-identical contexts "
                 f"({card.get('n_docs', '?')} documents hold activations)</p>")
    if card["top"]:
        parts.append(html_table(["act", "context (activating token outlined)"],
                                [[ex["act"], _example_html(ex, vmax)] for ex in card["top"]], {0}))
    else:
        parts.append("<p class='note'>never active on the analysed tokens</p>")
    if card.get("quantiles"):
        parts.append(f"<h3>Across the quantiles</h3><p class='meta'>the activations cut into "
                     f"{len(card['quantiles'])} groups of equal size; one example from each</p>")
        parts.append(html_table(["quantiles", "count", "range", "act", "context"],
                                [[f"{q['q_lo']:.0%}–{q['q_hi']:.0%}", q["count"],
                                  f"{fmt_num(q['lo'], '.3g')}–{fmt_num(q['hi'], '.3g')}",
                                  q["example"]["act"] if q["example"] else None,
                                  _example_html(q["example"], vmax) if q["example"] else "–"]
                                 for q in reversed(card["quantiles"])], {1, 3}))
    if card["bins"]:
        parts.append("<h3>Across the range: one example per activation bin</h3>")
        parts.append(html_table(["bin", "count", "act", "context"],
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
    parts.append(html_table(["promotes", "", "", "suppresses", "", ""], rows, {1, 4}))
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
            parts.append(context_html(toks, vals, len(toks) - 1, dm, signed=True))
            big = sorted(eff, key=lambda x: -abs(x["delta"]))[:6]
            rows = [[f"<code>{e(repr(x['token']))}</code>", x["pos"] - rem["pos"], x["delta"]] for x in big]
            parts.append(html_table(["token", "offset", "Δ activation"], rows, {1, 2}))
    h = card["histogram"]
    parts.append(f"<h3>Activation density</h3><p class='meta'>counts of nonzero activations per bin of "
                 f"(0, max]; frequency {card['freq']:.3%}</p>" + hist_svg(h["edges"], h["counts"]))
    parts.append("</section>")
    return "".join(parts)


def plain_card(nid: str, title: str, text: str, extra: str = "") -> str:
    """A card of a node without feature statistics (an error node, the output): a title and a text."""
    return (f'<section class="card" data-node="{e(nid)}"><button class="close" title="close">×</button>'
            f"<h3>{e(nid)} <span class='meta'>{e(title)}</span></h3><p>{e(text)}</p>{extra}</section>")
