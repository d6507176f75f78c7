"""Scoring a circuit the way the field does (DESIGN §6): end points, curves and areas.

For a scope S (every edge of an :class:`~featcircuit.ablation.AblationContext`) and a circuit
C ⊂ S, with m the behaviour's metric:

1. ``m(M)``: nothing ablated (the model itself); ``m(∅)``: every edge of S ablated;
   ``m(C)``: the edges of C kept, every other edge of S ablated;
2. **faithfulness** ``F(C) = (m(C) − m(∅)) / (m(M) − m(∅))``; **completeness** (SFC's) is
   ``F(S ∖ C)``, near 0 when C holds the mechanism;
3. **curves**: F and completeness of the top-s edges of an order, for s at fractions of |S|
   (half-decades, 0.1% … 100%) and at the found circuit's size;
4. MIB's areas: **CPR** = area under F against log10(fraction of S), over [0.1%, 100%],
   divided by that range (1.0 = faithful at every size); **CMD** = the same area of |1 − F|
   (0 = perfect).
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence

import numpy as np

from .ablation import AblationContext, Config, Edge

FRACTIONS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)


def end_points(ctx: AblationContext, circuit: list[Edge]) -> dict:
    """``m(M)``, ``m(∅)``, ``m(C)``, ``m(S∖C)``, faithfulness and completeness of ``circuit``."""
    m_c, m_comp = ctx.values([Config.keeping(circuit), Config.removing(circuit)])
    gap = ctx.gap
    f = (m_c - ctx.m_empty) / gap if gap != 0 else None
    comp = (m_comp - ctx.m_empty) / gap if gap != 0 else None
    return {"size": len(circuit), "m_full": ctx.m_full, "m_empty": ctx.m_empty, "m_circuit": m_c,
            "m_complement": m_comp, "faithfulness": f, "completeness": comp,
            "note": None if gap != 0 else "m(M) = m(∅): the scope does not move the metric, so "
                                          "faithfulness is undefined"}


def _areas(fracs: list[float], fs: list[float | None]) -> tuple[float | None, float | None]:
    pts = [(math.log10(x), y) for x, y in zip(fracs, fs) if y is not None]
    if len(pts) < 2:
        return None, None
    span = pts[-1][0] - pts[0][0]
    cpr = sum((b[0] - a[0]) * (a[1] + b[1]) / 2 for a, b in zip(pts, pts[1:])) / span
    cmd = sum((b[0] - a[0]) * (abs(1 - a[1]) + abs(1 - b[1])) / 2 for a, b in zip(pts, pts[1:])) / span
    return cpr, cmd


def curves(ctx: AblationContext, orders: dict[str, list[Edge]], extra_sizes: Sequence[int] = (),
           fractions: tuple[float, ...] = FRACTIONS) -> dict:
    """Faithfulness and completeness of each order's top-s edges, with CPR and CMD per order.

    Every order is completed to the whole scope (edges it does not name follow in scope order),
    so the sizes mean the same for every order.
    """
    scope = ctx.scope()
    n = len(scope)
    frac_sizes = [max(1, round(f * n)) for f in fractions]
    sizes = sorted(set(frac_sizes) | {s for s in extra_sizes if 0 < s <= n})
    out: dict = {"scope_size": n, "fractions": list(fractions), "sizes": sizes, "orders": {}}
    in_scope = set(scope)
    top = max((s for s in sizes if s < n), default=0)  # the whole scope is Config.full/empty
    for name, order in orders.items():
        def rest(order=order):  # runs only if the order names fewer than `top` scope edges
            seen = set(order)
            yield from (e for e in scope if e not in seen)

        full = list(itertools.islice(itertools.chain((e for e in order if e in in_scope), rest()), top))
        arr = np.asarray(full, dtype=np.int64).reshape(-1, 2)  # once: each size's config reads a prefix
        cfgs = []
        for s in sizes:
            kept = arr[:s]
            cfgs += [Config.full() if s == n else Config.keeping(kept),
                     Config.empty() if s == n else Config.removing(kept)]
        vals = ctx.values(cfgs)
        pts = []
        for k, s in enumerate(sizes):
            f = (vals[2 * k] - ctx.m_empty) / ctx.gap if ctx.gap != 0 else None
            c = (vals[2 * k + 1] - ctx.m_empty) / ctx.gap if ctx.gap != 0 else None
            pts.append({"size": s, "fraction": s / n, "faithfulness": f, "completeness": c})
        by_size = {p["size"]: p["faithfulness"] for p in pts}
        cpr, cmd = _areas(list(fractions), [by_size[s] for s in frac_sizes])
        out["orders"][name] = {"points": pts, "cpr": cpr, "cmd": cmd}
    return out


def random_order(scope: list[Edge], seed: int) -> list[Edge]:
    """A seeded random permutation of the scope (the baseline every order must beat)."""
    r = list(scope)
    random.Random(seed).shuffle(r)
    return r


def plot_curves(res: dict, path, circuit: dict | None = None, title: str = "") -> None:
    """Faithfulness and completeness against circuit size, one line per order, as a PNG."""
    # the object API with the Agg canvas: no pyplot (its import and global figure state cost ~1 s)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for name, o in res["orders"].items():
        pts = [p for p in o["points"] if p["faithfulness"] is not None]
        lab = f"{name} (CPR {o['cpr']:.2f}, CMD {o['cmd']:.2f})" if o["cpr"] is not None else name
        axes[0].plot([p["size"] for p in pts], [p["faithfulness"] for p in pts], marker="o", ms=3, label=lab)
        axes[1].plot([p["size"] for p in pts], [p["completeness"] for p in pts], marker="o", ms=3, label=name)
    titles = ("faithfulness F(C) (∅ = whole scope ablated)", "completeness F(S∖C) (lower is better)")
    for ax, t in zip(axes, titles):
        ax.set_xscale("log")
        ax.set_xlabel(f"edges kept (scope |S| = {res['scope_size']:,})")
        ax.set_title(t, fontsize=10)
        ax.axhline(1, color="grey", lw=0.5)
        ax.axhline(0, color="grey", lw=0.5)
    if circuit is not None and circuit.get("faithfulness") is not None:
        axes[0].scatter([max(circuit["size"], 1)], [circuit["faithfulness"]], color="black", zorder=5,
                        label="found circuit")
        axes[1].scatter([max(circuit["size"], 1)], [circuit["completeness"]], color="black", zorder=5)
    axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
