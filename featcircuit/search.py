"""ACDC-style search over the resid(L) → mlp(L) feature edges of a behaviour (DESIGN §6).

Two stages, as EAP's authors recommend, both on the search's own tokens:

1. **rank** every edge of the scope by a linear estimate of what ablating it alone does to the
   metric — attribution patching per edge, ``est_ij(t) = −coef_i(t)·(∂f_j/∂x·r_i)(t)·∂m/∂f_j(t)``
   with ``coef = a − b`` the code minus its ablation value — summed as ``Σ_t |est|`` ("abs") or
   ``|Σ_t est|`` ("net"); the best-ranked ``n`` are the candidates (error edges too when errors
   are ablated). Each run measures both statistics' Spearman correlation with the single-edge
   ablation Δ on a sample, and ``rank_by="auto"`` takes the better one;
2. **prune**: start from the candidates alone (every other edge of the scope ablated); visit
   targets from least to most important and their edges in increasing importance; ablate the
   edge as well and measure ``Δ = D(H′) − D(H)`` with ``D = |m(H) − m(M)|`` (the task metric, or
   KL for a corpus); remove the edge when ``Δ < τ`` and carry the removal on. τ is relative to
   ``|m(M) − m(∅)|`` unless given as absolute.

Batching: a chain of B configurations ``H−e₁, H−e₁−e₂, …`` runs in one forward, each edge
assumed removed unless its estimate says it matters (|est| ≥ τ); the chain restarts after the
first decision that differs, so decisions equal the one-forward-per-edge search exactly. Whether
chains pay is measured on the spot, on the search's own first configurations: the time of its
first chain of B against that of its first single-edge configuration, times the decisions that
chain settles (up to and including its first misprediction; the configurations after it are
thrown away). On a CPU, where a pass costs in proportion to its rows, the search runs one edge per
pass. A search that picked chains goes over to one edge per pass when its last four chains settled
fewer decisions each, on average, than a chain's pass costs in single passes (mispredictions come
more often among the later, more important edges).
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .ablation import ERR, AblationContext, Config, Edge, Scorer
from .attribution import grad_rows, node_effects
from .errors import UserError

# ---- stage 1: ranking --------------------------------------------------------------------


@dataclass
class EdgeRanking:
    """Per-edge estimates over the scope: ``abs = Σ_t |est|``, ``net = Σ_t est`` (metric units)."""

    edges: list[Edge]
    abs: Tensor  # [E] float64
    net: Tensor  # [E] float64
    count: Tensor  # [E] co-occurrence count
    _orders: dict[str, list[Edge]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def order(self, by: str) -> list[Edge]:
        """Edges by decreasing ``|by|`` (ties by (dst, src)); sorted once per statistic."""
        import numpy as np

        if by not in self._orders:  # a search asks for each order several times, over 10⁵ edges
            v = (self.abs if by == "abs" else self.net.abs()).detach().double().cpu().numpy()
            e = np.array(self.edges, dtype=np.int64).reshape(-1, 2)
            idx = np.lexsort((e[:, 0], e[:, 1], -v))  # last key first: |by| down, then dst, then src
            self._orders[by] = [self.edges[k] for k in idx.tolist()]
        return list(self._orders[by])

    def stat(self, by: str) -> dict[Edge, float]:
        """``{edge: |statistic|}``."""
        v = self.abs if by == "abs" else self.net.abs()
        return dict(zip(self.edges, v.tolist()))


def metric_grad(ctx: AblationContext) -> Tensor:
    """``∂m/∂f [N, d_M]`` at the clean run (one backward through the spliced model).

    KL has zero gradient at the clean run, so a corpus uses the next-token loss's gradient.
    """
    from .attribution import default_metric

    if ctx.task is not None:
        metric = ctx.task.metric
    elif ctx.user_metric is not None:
        metric = ctx.user_metric
    else:
        n = ctx.tokens[:, 1:].numel()
        metric = lambda lg, t: default_metric(lg, t) / n  # noqa: E731
    eff = node_effects(ctx.rep, ctx.tokens, metric=metric, keep_tensors=True)
    return eff["grad_f"].to(ctx.x.device)


@torch.no_grad()
def rank_edges(ctx: AblationContext, grad_f: Tensor | None = None, chunk_elems: int = 2**24) -> EdgeRanking:
    """Attribution-patching estimates of every scope edge's single-ablation effect on the metric."""
    grad_f = metric_grad(ctx) if grad_f is None else grad_f
    M = ctx.pair.mlp
    d_m, d_r = M.W_dec.shape[0], ctx.coef.shape[1]
    k = max(1, int(ctx.mask.sum(-1).max()))
    vals, f_idx = (ctx.f.abs() * ctx.mask).topk(k, dim=-1)
    on = vals > 0
    acc_abs = torch.zeros(d_m, d_r + 1, dtype=torch.float64, device=ctx.x.device)
    acc_net = torch.zeros_like(acc_abs)
    s_max = max(1, int((ctx.coef != 0).sum(-1).max()))
    sparse = s_max * 4 < d_r
    if sparse:
        cv_abs, coef_idx = ctx.coef.abs().topk(s_max, dim=-1)
        coef_vals = ctx.coef.gather(1, coef_idx) * (cv_abs > 0)
    T = max(1, chunk_elems // (k * ((s_max if sparse else d_r) + 1) * (8 if sparse else 1)))
    for s in range(0, len(ctx.x), T):
        sl = slice(s, s + T)
        xs, idx = ctx.x[sl], f_idx[sl]
        if hasattr(M, "enc_cols"):
            w = M.enc_cols(ctx.parts.hidden(xs), idx)
        else:
            w = M.W_enc.T[idx]  # [T, k, d_mlp]
        g = grad_rows(ctx.parts, xs, w) * on[sl][..., None]  # ∂f_j/∂x  [T, k, d]
        gm = grad_f[sl].gather(1, idx) * on[sl]  # ∂m/∂f_j  [T, k]
        err = (g * ctx.err_coef[sl][:, None, :]).sum(-1)  # [T, k]
        flat = idx.flatten()
        if sparse:  # only the nonzero coefficients (patch, zero): [T, k, s] instead of [T, k, d_R]
            cv, ci = coef_vals[sl], coef_idx[sl]
            feat = (g @ ctx.W_R[ci].transpose(1, 2)) * cv[:, None, :]  # [T, k, s]
            est = -feat * gm[..., None]
            cols = ci[:, None, :].expand_as(est)
            keys = flat[:, None] * (d_r + 1) + cols.flatten(0, 1)
            acc_abs.view(-1).index_add_(0, keys.flatten(), est.abs().flatten().double())
            acc_net.view(-1).index_add_(0, keys.flatten(), est.flatten().double())
        else:
            feat = (g @ ctx.W_R.T) * ctx.coef[sl][:, None, :]  # coef_i·∂f_j/∂x·r_i  [T, k, d_R]
            est = -feat * gm[..., None]
            acc_abs[:, :d_r].index_add_(0, flat, est.abs().flatten(0, 1).double())
            acc_net[:, :d_r].index_add_(0, flat, est.flatten(0, 1).double())
        e_err = (-err * gm).flatten().double()
        acc_abs[:, d_r].index_add_(0, flat, e_err.abs())
        acc_net[:, d_r].index_add_(0, flat, e_err)
    cnt = ctx.scope_counts()
    if cnt.shape[1] == d_r:
        cnt = torch.cat([cnt, torch.zeros_like(cnt[:, :1])], 1)
    jj, ii = torch.nonzero(cnt, as_tuple=True)
    edges = list(zip(torch.where(ii == d_r, ERR, ii).tolist(), jj.tolist()))
    return EdgeRanking(edges, acc_abs[jj, ii].cpu(), acc_net[jj, ii].cpu(), cnt[jj, ii].long().cpu())


def single_edge_deltas(ctx: AblationContext, edges: list[Edge]) -> list[float]:
    """``D`` with each edge ablated alone from the full model (batched)."""
    return ctx.distance([Config.removing([e]) for e in edges])


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman rank correlation (average ranks not needed: ties are rare in float data)."""
    if len(x) < 3:
        return None
    rx = torch.tensor(x, dtype=torch.float64).argsort().argsort().double()
    ry = torch.tensor(y, dtype=torch.float64).argsort().argsort().double()
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(torch.corrcoef(torch.stack([rx, ry]))[0, 1])


def compare_statistics(ctx: AblationContext, ranking: EdgeRanking, n_sample: int = 64, pool: int = 512,
                       seed: int = 0) -> dict:
    """Spearman of each statistic with the measured single-edge Δ, on a sample of top edges."""
    top = list(dict.fromkeys(ranking.order("abs")[:pool] + ranking.order("net")[:pool]))
    rng = random.Random(seed)
    sample = sorted(rng.sample(top, min(n_sample, len(top))), key=lambda e: (e[1], e[0]))
    measured = single_edge_deltas(ctx, sample)
    out = {"n_sample": len(sample), "pool": len(top), "edges": [list(e) for e in sample], "measured": measured}
    for by in ("abs", "net"):
        s = ranking.stat(by)
        out[f"spearman_{by}"] = spearman([s[e] for e in sample], measured)
    return out


# ---- stage 2: pruning --------------------------------------------------------------------


def visit_order(candidates: list[Edge], stat: dict[Edge, float]) -> list[Edge]:
    """Targets by increasing importance (sum of the statistic), their edges by increasing statistic."""
    imp: dict[int, float] = {}
    for e in candidates:
        imp[e[1]] = imp.get(e[1], 0.0) + stat.get(e, 0.0)
    return sorted(candidates, key=lambda e: (imp[e[1]], e[1], stat.get(e, 0.0), e[0]))


@dataclass
class SearchResult:
    """Kept edges with their measured Δ, every visit in order, and the pass accounting."""

    visited: list[dict]
    tau: float
    passes: int
    seconds: float
    d_candidates: float
    d_final: float
    batch: int
    meta: dict = field(default_factory=dict)

    @property
    def kept(self) -> list[Edge]:
        return [(v["src"], v["dst"]) for v in self.visited if v["kept"]]

    def to_dict(self) -> dict:
        """JSON-able summary."""
        return {"tau": self.tau, "passes": self.passes, "seconds": self.seconds,
                "d_candidates": self.d_candidates, "d_final": self.d_final, "batch": self.batch,
                "n_candidates": len(self.visited), "n_kept": len(self.kept), "visited": self.visited,
                **self.meta}


def _chain(H: Config, order: list[Edge], pred_keep: list[bool], pos: int,
           batch: int) -> tuple[list[Config], list[int | None]]:
    """The search's next chain from visit ``pos``: up to ``batch`` configurations, each the
    current circuit without the next edge and without every earlier edge of the chain that is
    predicted removed; ``bases[n]`` is the index of the configuration ``configs[n]`` extends
    (None: ``H`` itself)."""
    configs: list[Config] = []
    bases: list[int | None] = []
    base_cfg, base_idx = H, None
    for k in range(pos, min(pos + batch, len(order))):
        i, j = order[k]
        configs.append(base_cfg.without(i, j))
        bases.append(base_idx)
        if not pred_keep[k]:  # assumed removed: the next edges are tested without it
            base_cfg, base_idx = configs[-1], len(configs) - 1
    return configs, bases


def _decisions(ds: list[float], d_H: float, bases: list[int | None], pred_keep: list[bool],
               tau: float):
    """``(n, delta, keep)`` for each configuration of a chain up to its first misprediction
    (inclusive): after it, the chain's later configurations assumed the other decision."""
    for n in range(len(ds)):
        delta = ds[n] - (d_H if bases[n] is None else ds[bases[n]])
        keep = not delta < tau
        yield n, delta, keep
        if keep != pred_keep[n]:
            return


def choose_batch(ctx: Scorer, candidates: list[Edge], *, tau: float, stat: dict[Edge, float],
                 want: int = 8) -> tuple[int, dict]:
    """Configurations per pass: B when a chain's pass costs under 60% of one single pass per
    decision it settles.

    The probes are the search's own first passes over ``candidates``: one configuration (the
    candidates without the first edge visited) against the first chain of B (see
    :func:`_chain`), scored through ``ctx.values`` with an empty value cache, so a probe pass
    carries the rows, restarts and metric that a search pass does. The chain settles the
    decisions up to and including its first misprediction (:func:`_decisions`); a chain of 8
    that settles 2 must cost under 0.6 × 2 single passes. After a warm-up chain the timings
    alternate single, chain, single, and the chain is set against the faster single: other work
    on the machine only slows a pass down, so a busy spell tips the choice to one configuration
    per pass (the safe one) rather than to chains. The probe's passes are not counted (the
    candidates' own configuration, which the search scores first anyway, is).
    """
    order = visit_order(candidates, stat)
    H = Config.keeping(candidates)
    single, _ = _chain(H, order, [False] * len(order), 0, 1)
    pred = [stat.get(e, 0.0) >= tau for e in order]
    chain, bases = _chain(H, order, pred, 0, want)
    if len(chain) < 2:  # nothing to chain
        return 1, {}
    (d_H,) = ctx.distance([H])
    p0, cache = ctx.passes, ctx._values

    def score(configs: list[Config]) -> None:
        ctx._values = {}  # a fresh cache: every probe configuration is scored again
        ctx.values(configs)

    def timed(configs: list[Config]) -> float:
        t0 = time.perf_counter()
        score(configs)
        return time.perf_counter() - t0

    n = len(chain)
    try:
        score(chain)  # warm-up (and any per-target caches the search will reuse)
        ds = ctx.distance(chain)
        s1 = timed(single)
        tb = timed(chain) if s1 * n < 30 else float("inf")  # never spend long on the probe
        t1 = min(s1, timed(single))
    finally:
        ctx._values, ctx.passes = cache, p0
    settled = sum(1 for _ in _decisions(ds, d_H, bases, pred, tau))
    ratio = tb / t1 if t1 > 0 else float("inf")  # a chain's pass in single passes
    return (want if ratio < 0.6 * settled else 1), {"t_single_pass": t1, f"t_pass_of_{n}": tb,
                                                      "chain_pass_in_single_passes": ratio,
                                                      "probe_chain_settles": settled}


def search_circuit(ctx: AblationContext, candidates: list[Edge], *, tau: float, stat: dict[Edge, float],
                   batch: int | None = None, progress: bool = True) -> SearchResult:
    """Prune ``candidates`` (see the module docstring); ``tau`` in the metric's own units."""
    if not candidates:
        raise UserError("no candidate edges to search: raise --candidates")
    t0 = time.time()
    p0 = ctx.passes
    timing: dict = {}
    if batch is None:
        batch, timing = choose_batch(ctx, candidates, tau=tau, stat=stat)
    order = visit_order(candidates, stat)
    H = Config.keeping(candidates)
    (d_H,) = ctx.distance([H])
    d_start = d_H
    pred_keep = [stat.get(e, 0.0) >= tau for e in order] if batch > 1 else [False] * len(order)
    visited: list[dict] = []
    pos = 0
    # a chain's pass costs `ratio` single passes (both timed warm by the probe, which alone sets
    # it: then chains are watched); a chain that settles fewer decisions than that loses time
    ratio = timing.get("chain_pass_in_single_passes") if batch > 1 else None
    recent: deque[int] = deque(maxlen=4)  # decisions settled by each of the last chains
    picked = batch
    bar = tqdm(total=len(order), desc="ablation search", disable=not progress)
    while pos < len(order):
        configs, bases = _chain(H, order, pred_keep, pos, batch)
        ds = ctx.distance(configs)
        start = pos  # (_decisions binds the chain's d_H now; the loop below moves d_H on)
        for n, delta, keep in _decisions(ds, d_H, bases, pred_keep[start:start + len(configs)], tau):
            i, j = order[start + n]
            visited.append({"src": i, "dst": j, "estimate": stat.get((i, j), 0.0), "delta": delta,
                            "kept": keep, "visit": start + n})
            pos = start + n + 1
            bar.update(1)
            if not keep:
                H, d_H = configs[n], ds[n]
        if len(configs) > 1 and ratio is not None:
            recent.append(pos - start)
            if len(recent) == recent.maxlen and sum(recent) < ratio * len(recent):
                # the last chains settled fewer decisions than their passes cost single passes:
                # one edge per pass from here (the decisions do not depend on it). Chains were
                # picked with a margin (0.6) and are left at break-even, so noise does not flip it
                batch, timing = 1, {**timing, "one_per_pass_from_visit": pos}
    bar.close()
    return SearchResult(visited, tau, ctx.passes - p0, round(time.time() - t0, 2), d_start, d_H, picked,
                        {"batch_timing": timing})


def relative_tau(ctx: AblationContext, tau: float) -> float:
    """τ in metric units from a fraction of ``|m(M) − m(∅)|``."""
    if not math.isfinite(tau) or tau < 0:
        raise UserError(f"tau {tau} must be a finite number >= 0")
    return tau * abs(ctx.gap)
