"""Validation of the searched edges: every candidate alone, and faithfulness curves (DESIGN §6).

1. each candidate edge is ablated alone (path-specifically, as in the search) and the measured
   change of the metric is set against attribution's linear estimate of the same change —
   Pearson and Spearman correlation, and the edges that disagree in sign or by more than 3×;
2. circuits of growing size are kept (everything else among the candidates ablated) and
   ablated (everything else kept), for three orders — attribution, search, random — giving
   faithfulness and completeness curves, saved as JSON and a PNG plot.
"""

from __future__ import annotations

import math
import random

import torch
from torch import Tensor

from .attribution import EdgeTable, Metric, grad_rows, node_effects
from .search import AblationContext, Config, SearchResult, _with


def _pearson(x: list[float], y: list[float]) -> float:
    a, b = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def _spearman(x: list[float], y: list[float]) -> float:
    rank = lambda v: torch.tensor(v, dtype=torch.float64).argsort().argsort().double()  # noqa: E731
    return _pearson(rank(x).tolist(), rank(y).tolist())


def predicted_effects(ctx: AblationContext, candidates: EdgeTable, metric: Metric) -> list[float]:
    """Attribution's linear estimate of Δm for ablating each candidate edge alone.

    ``−Σ_t (a_i − base_i)·∂f_j/∂a_i·∂m/∂f_j``: exact to first order for zero and mean ablation.
    """
    eff = node_effects(ctx.model, ctx.pair, ctx.tokens, layer=ctx.layer, metric=metric, keep_tensors=True)
    gf = eff["grad_f"]  # [N, d_M]
    R, M = ctx.pair.resid, ctx.pair.mlp
    out = []
    by_j: dict[int, Tensor] = {}
    with torch.no_grad():
        for i, j in zip(candidates.src.tolist(), candidates.dst.tolist()):
            if j not in by_j:
                jj = torch.full((len(ctx.x), 1), j, dtype=torch.long, device=ctx.x.device)
                cols = (M.enc_cols(ctx.parts.hidden(ctx.x), jj) if hasattr(M, "enc_cols")
                        else M.W_enc[:, j].expand(len(ctx.x), 1, -1))
                g = grad_rows(ctx.parts, ctx.x, cols)[:, 0]
                by_j[j] = g * (ctx.f[:, j] != 0)[:, None]  # ∂f_j/∂x  [N, d]
            dfa = by_j[j] @ R.W_dec[i]  # ∂f_j/∂a_i  [N]
            out.append(float(-((ctx.a[:, i] - ctx.base[i]) * dfa * gf[:, j]).sum()))
    return out


def mean_ce(logits: Tensor, tokens: Tensor) -> Tensor:
    """Mean next-token cross-entropy (nats/token)."""
    from .attribution import default_metric

    return default_metric(logits, tokens) / tokens[:, 1:].numel()


def validate_edges(ctx: AblationContext, candidates: EdgeTable, metric: Metric | None = None) -> dict:
    """Each candidate ablated alone: measured Δm vs attribution's estimate, with correlations."""
    metric = metric or mean_ce
    pairs = list(zip(candidates.src.tolist(), candidates.dst.tolist()))
    base, *single = ctx.score([{}] + [_with({}, i, j) for i, j in pairs], metric=metric)
    measured = [s - base for s in single]
    predicted = predicted_effects(ctx, candidates, metric)
    rows, disagree = [], []
    for (i, j), m, p in zip(pairs, measured, predicted):
        row = {"src": i, "dst": j, "measured": m, "predicted": p}
        rows.append(row)
        ratio = abs(m) / abs(p) if p != 0 else math.inf
        if (m > 0) != (p > 0) or ratio > 3 or ratio < 1 / 3:
            disagree.append(row)
    return {"metric_full": base, "edges": rows, "pearson": _pearson(measured, predicted),
            "spearman": _spearman(measured, predicted), "disagree": disagree,
            "n_disagree": len(disagree)}


def faithfulness_curves(ctx: AblationContext, candidates: EdgeTable, result: SearchResult,
                        sizes: list[int] | None = None, seed: int = 0) -> dict:
    """Faithfulness and completeness against circuit size for attribution, search and random orders.

    faithfulness(C) = (D(C) − D(∅)) / (D(full) − D(∅)) with D measured as ``−KL`` (higher is
    better), so it is 1 − KL(C)/KL(∅) (KL(full) = 0); completeness(C) = KL(full ∖ C) / KL(∅): the
    share of the candidates' whole effect that is lost when only C is ablated. Both run from 0
    (empty circuit) to 1 (all candidates).
    """
    edges = list(zip(candidates.src.tolist(), candidates.dst.tolist()))
    n = len(edges)
    by_attr = [edges[k] for k in candidates.order().tolist()]
    vis = sorted(result.visited, key=lambda v: (not v["kept"], -v["delta"]))
    by_search = [(v["src"], v["dst"]) for v in vis]
    rnd = edges[:]
    random.Random(seed).shuffle(rnd)
    sizes = sorted({s for s in (sizes or [0, 1, 2, 5, 10, 20, 50, 100, 200, 500, n]) if s <= n})
    orders = {"attribution": by_attr, "search": by_search, "random": rnd}

    def ablate(es) -> Config:
        c: Config = {}
        for i, j in es:
            c = _with(c, i, j)
        return c

    configs = [{}, ablate(edges)]
    for o in orders.values():
        for s in sizes:
            configs.append(ablate(o[s:]))  # keep the first s, ablate the rest
            configs.append(ablate(o[:s]))  # the complement: ablate the circuit
    d = ctx.score(configs, kl=True)
    d_full, d_empty = d[0], d[1]
    gap = d_empty - d_full
    norm = lambda v: (d_empty - v) / gap if gap > 0 else float("nan")  # noqa: E731
    lost = lambda v: (v - d_full) / gap if gap > 0 else float("nan")  # noqa: E731
    curves, k = {}, 2
    for name in orders:
        pts = []
        for s in sizes:
            pts.append({"size": s, "kl": d[k], "faithfulness": norm(d[k]),
                        "kl_complement": d[k + 1], "completeness": lost(d[k + 1])})
            k += 2
        curves[name] = pts
    n_kept = len(result.kept)
    kept_cfg = ablate([(v["src"], v["dst"]) for v in result.visited if not v["kept"]])
    (d_circ,) = ctx.score([kept_cfg], kl=True)
    return {"sizes": sizes, "curves": curves, "kl_full": d_full, "kl_empty": d_empty,
            "circuit": {"size": n_kept, "kl": d_circ, "faithfulness": norm(d_circ)}}


def plot_curves(curves: dict, path) -> None:
    """Faithfulness and completeness against size, one line per order, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, pts in curves["curves"].items():
        s = [max(p["size"], 0.5) for p in pts]
        axes[0].plot(s, [p["faithfulness"] for p in pts], marker="o", label=name)
        axes[1].plot(s, [p["completeness"] for p in pts], marker="o", label=name)
    for ax, t in zip(axes, ("faithfulness (only the circuit kept)", "completeness (effect lost when the circuit is ablated)")):
        ax.set_xscale("log")
        ax.set_xlabel("edges in circuit")
        ax.set_title(t)
        ax.axhline(1, color="grey", lw=0.5)
        ax.axhline(0, color="grey", lw=0.5)
        ax.legend()
    c = curves["circuit"]
    axes[0].scatter([max(c["size"], 0.5)], [c["faithfulness"]], color="black", zorder=5, label="found circuit")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


