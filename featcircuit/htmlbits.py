"""The small HTML pieces of the report page and its feature cards (DESIGN §9).

Numbers and tables (:func:`fmt_num`, :func:`html_table`), token contexts shaded by a value per
token (:func:`context_html`), histograms as inline SVG (:func:`hist_svg`) and the ``DENSE`` badge
(:func:`dense_badge`). Every text that comes from data is escaped here or by the caller.
"""

from __future__ import annotations

import math
from html import escape as e
from typing import Any

from .contexts import show_token
from .stats import DENSE_FREQ, is_dense


def fmt_num(x: Any, fmt: str = ".4g") -> str:
    """A number for a table cell: ``fmt`` for floats, thousands separators for ints, – for none/nan."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return e(str(x))
    return format(x, fmt) if isinstance(x, float) else f"{x:,}"


def html_table(head: list[str], rows: list[list[Any]], numeric: set[int] | None = None,
               row_attrs: list[str] | None = None) -> str:
    """A ``<table>``: ``head`` escaped, cells as given (HTML) except ``numeric`` columns (:func:`fmt_num`)."""
    numeric = numeric if numeric is not None else set()
    out = ["<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>"]
    for k, r in enumerate(rows):
        attrs = row_attrs[k] if row_attrs else ""
        cells = "".join(f'<td class="n">{fmt_num(v)}</td>' if i in numeric else f"<td>{v}</td>"
                        for i, v in enumerate(r))
        out.append(f"<tr{attrs}>{cells}</tr>")
    return "".join(out) + "</table>"


def context_html(tokens: list[str], values: list[float], hit: int | None, vmax: float,
                 signed: bool = False) -> str:
    """Tokens shaded by ``|value| / vmax`` (orange, or red/blue by sign), token ``hit`` outlined."""
    spans = []
    for i, (t, v) in enumerate(zip(tokens, values)):
        a = min(1.0, abs(v) / vmax) if vmax > 0 else 0.0
        rgb = ("31,119,180" if v < 0 else "214,39,40") if signed else "255,127,14"
        style = f' style="background:rgba({rgb},{a * 0.75:.3f})"' if a > 0 else ""
        cls = ' class="hit"' if i == hit else ""
        spans.append(f'<span{cls}{style} title="{e(repr(t))}: {v:.4g}">{e(show_token(t))}</span>')
    return '<div class="ctx">' + "".join(spans) + "</div>"


def hist_svg(edges: list[float], counts: list[int], w: int = 340, h: int = 70,
             color: str = "#ff7f0e") -> str:
    """A bar chart of ``counts`` over bins with ``edges`` as an inline ``<svg>``."""
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


def dense_badge(freq) -> str:
    """A red ``DENSE`` badge when ``freq`` is above :data:`~featcircuit.stats.DENSE_FREQ`; else nothing."""
    return (f"<span class='dense' title='active on more than {DENSE_FREQ:.0%} of tokens'>DENSE "
            f"{float(freq):.0%}</span>" if is_dense(freq) else "")
