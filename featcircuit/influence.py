"""Which cross-layer edges matter: attribution-patching estimates and circuit-tracer influence.

1. **Estimates** (as the one-layer ranking, :func:`featcircuit.search.rank_edges`): with
   ``g_v = ∂m/∂code_v`` the metric's total derivative at every active target (one backward
   through the replacement — masks held, attention and LN1 frozen inside the layers, the real
   model after), ablating edge u→v alone moves m by about ``est = −Σ J_uv·c_u·g_v`` over the
   (target token, source token) pairs; ``abs = Σ|est|``, ``net = Σ est``.
2. **Influence** (circuit-tracer's pruning): the feature graph with weights ``W_uv = Σ|e_uv|``
   (errors and the embedding included), each target's incoming weights normalised to sum to 1;
   the metric node has influence 1 and a node's influence is ``Σ_v infl(v)·Â_vu`` (the sum over
   paths of products of normalised weights); an edge's influence is ``infl(v)·Â_vu``. Pruning
   keeps the smallest set of nodes (then edges) holding a chosen share of the total.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .adapters import held_code, reads_pre_acts
from .crossablation import CrossContext
from .edges import ERR, edges_into_out
from .restart import run_tail
from .search import EdgeRanking


def code_grads(cx: CrossContext) -> dict[int, Tensor]:
    """``∂m/∂code`` at every site's active rows (site index → ``[R]``), one backward pass."""
    rep, tr = cx.rep, cx.tr
    leaves = {si: torch.zeros(len(cx.rows[si][0]), dtype=tr.logits.dtype, requires_grad=True)
              for si in cx.rows}
    with torch.enable_grad():
        dcode: dict[int, Tensor] = {}
        for si in range(1, len(cx.sites)):
            site = cx.sites[si]
            E = cx.entries[si]
            n, t, k = cx.rows[si]
            dc = torch.zeros_like(E.c)
            for psi, d in dcode.items():
                sel = torch.nonzero((E.src_si == psi) & E.feat).flatten()  # errors never change
                if len(sel):
                    dc = dc.index_put((sel,), d[E.n[sel], E.s[sel], E.src[sel]], accumulate=True)
            code = tr.codes[site][n, t, k]
            if site[0] == "resid":
                new = torch.relu(code.index_add(0, E.row, E.J * dc))
            else:
                L = site[1]
                D = rep.decoder(("resid", L))
                x = tr.acts[("resid", L)][n, t].index_add(0, E.row, dc[:, None] * D[E.src.clamp_min(0)])
                M = rep.dictionary(site)
                z = rep.parts[L].hidden(x)
                z0 = None if reads_pre_acts(M) else tr.acts[site][n, t]  # a module's clean input
                new = held_code(M, z, k, z0, code.detach())
            delta = new - code.detach() + leaves[si]
            dcode[si] = torch.zeros_like(tr.codes[site]).index_put((n, t, k), delta)
        L = cx.layer
        ri, mi = cx.si[("resid", L)], cx.si[("mlp", L)]
        dx = dcode[ri] @ rep.decoder(("resid", L)) if ri in dcode else torch.zeros_like(tr.acts[("resid", L)])
        dzo = dcode[mi] @ rep.decoder(("mlp", L)) @ rep.parts[L].W_out
        dxo = rep.step(L, tr, dx, dzo)
        if cx._tail is not None:
            logits = run_tail(cx._tail, dxo[None], cx.task is not None)
        else:
            logits = cx.model.run_with_hooks(cx.tokens, fwd_hooks=[(
                f"blocks.{L}.hook_resid_post", lambda a, hook=None: a + dxo)])
        cx._metric_fn()(logits).backward()
    cx.passes += 1
    return {si: v.grad.detach() if v.grad is not None else torch.zeros_like(v) for si, v in leaves.items()}


def rank_cross_edges(cx: CrossContext, grads: dict[int, Tensor] | None = None) -> EdgeRanking:
    """Attribution-patching estimates of every scope edge's single-ablation effect."""
    grads = code_grads(cx) if grads is None else grads
    n_e = len(cx.edge_keys)
    acc_abs = torch.zeros(n_e, dtype=torch.float64)
    acc_net = torch.zeros(n_e, dtype=torch.float64)
    for si, E in cx.entries.items():
        est = (-(E.J * E.c) * grads[si][E.row]).double()
        acc_abs.index_add_(0, E.edge, est.abs())
        acc_net.index_add_(0, E.edge, est)
    return EdgeRanking(cx.scope(), acc_abs, acc_net, cx.edge_count.clone())


@dataclass
class Influence:
    """Feature-graph influence on the metric: per node (gid; out = −1) and per scope edge."""

    node: dict[int, float]  # gid → influence (sources outside the scope omitted: emb, kept errors)
    edge: Tensor  # [E scope edges] influence
    out_edges: dict[int, float]  # last-site gid → influence of its edge into the metric
    total_in: dict[int, float]  # target gid → Σ|e| over all its sources (errors, emb included)


@torch.no_grad()
def influence(cx: CrossContext) -> Influence:
    """circuit-tracer's influence of every node and scope edge on the metric (exact coefficients)."""
    G = cx.n_ids  # features, then the error nodes (sources in the scope when errors are ablated)
    # |e| per scope edge and every target's total |incoming| (errors and embedding included)
    w_edge = torch.zeros(len(cx.edge_keys), dtype=torch.float64)
    for si, E in cx.entries.items():
        w_edge.index_add_(0, E.edge, (E.J * E.c).abs().double())
    total = cx.in_abs  # Σ|e| into each target over all its sources, errors and embedding included
    out_w: dict[int, float] = {}
    out_total = 0.0
    for ch in edges_into_out(cx.rep, cx.tr, cx.co, cx.g_out):
        out_total += float(ch.value.abs().sum())
        feat = ch.src != ERR
        for u, v in zip(ch.src[feat].tolist(), ch.value[feat].abs().tolist()):
            gid = cx.gid(ch.src_site, u)
            out_w[gid] = out_w.get(gid, 0.0) + v
    node = torch.zeros(G, dtype=torch.float64)
    out_edges = {}
    for gid, w in out_w.items():
        out_edges[gid] = w / out_total if out_total else 0.0
        node[gid] += out_edges[gid]
    # back through the sites in reverse order: edges into site S raise their sources' influence
    order = torch.argsort(cx.edge_dst, descending=True, stable=True)
    edge_infl = torch.zeros_like(w_edge)
    for si in range(len(cx.sites) - 1, 0, -1):
        lo, hi = cx.offset[si], cx.offset[si] + cx.rep.width(cx.sites[si])
        sel = order[(cx.edge_dst[order] >= lo) & (cx.edge_dst[order] < hi)]
        if len(sel) == 0:
            continue
        dst, src = cx.edge_dst[sel], cx.edge_src[sel]
        share = torch.where(total[dst] > 0, w_edge[sel] / total[dst], torch.zeros_like(w_edge[sel]))
        edge_infl[sel] = node[dst] * share
        node.index_add_(0, src, edge_infl[sel])
    nz = torch.nonzero(node).flatten()
    return Influence({int(g): float(node[g]) for g in nz}, edge_infl, out_edges,
                     {int(g): float(total[g]) for g in torch.nonzero(total).flatten()})


def prune_by_influence(cx: CrossContext, inf: Influence, node_share: float = 0.8,
                       edge_share: float = 0.98) -> tuple[set[int], Tensor]:
    """(kept node gids, kept scope-edge mask): the fewest nodes holding ``node_share`` of the
    total node influence, then among the edges joining kept nodes the fewest holding
    ``edge_share`` of their influence (circuit-tracer's two thresholds)."""
    nodes = sorted(inf.node.items(), key=lambda kv: (-kv[1], kv[0]))
    tot = sum(v for _, v in nodes)
    keep: set[int] = set()
    acc = 0.0
    for g, v in nodes:
        if acc >= node_share * tot:
            break
        keep.add(g)
        acc += v
    kept_nodes = torch.zeros(cx.n_ids, dtype=torch.bool)
    if keep:
        kept_nodes[torch.tensor(sorted(keep))] = True
    vals = inf.edge * (kept_nodes[cx.edge_src] & kept_nodes[cx.edge_dst])
    order = torch.argsort(vals, descending=True, stable=True)
    cum = torch.cumsum(vals[order], 0)
    n_keep = int((cum < edge_share * float(vals.sum())).sum()) + 1 if float(vals.sum()) > 0 else 0
    mask = torch.zeros(len(vals), dtype=torch.bool)
    mask[order[:n_keep]] = True
    return keep, mask & (vals > 0)
