"""Circuits across layers: search, held-out scoring and the graphs (DESIGN §6, §7, §12).

- :func:`find_cross_circuit`: the tasks issue's procedure (rank → ACDC search on the search half →
  held-out end points, curves against the cheap orders, τ sweep, verdict) with the cross-layer
  scope of :class:`~featcircuit.crossablation.CrossContext`, plus circuit-tracer's influence as
  one more order;
- :func:`circuit_graph`: the found circuit as a :class:`~featcircuit.graph.CircuitGraph` (edges
  summed over the prompts, measured Δ per edge, the readout into ``out`` and the embedding's
  edges drawn for the circuit's nodes);
- :func:`prompt_graph`: one prompt's attribution graph per position (circuit-tracer's form),
  pruned by influence, for the Neuronpedia export.
"""

from __future__ import annotations

import torch

from .circuit import CircuitConfig, _ablation, search_and_score
from .crossablation import CrossContext
from .edges import EMB, ERR, OUT, all_edges, coefficients, edges_into, edges_into_out, out_grad
from .errors import UserError
from .graph import CircuitGraph
from .influence import code_grads, influence, rank_cross_edges
from .replacement import Replacement


def _make(rep: Replacement, abl: str):
    def make(beh, errors):
        if hasattr(beh, "clean"):
            return CrossContext(rep, None, abl, task=beh, errors=errors)
        return CrossContext(rep, beh, abl, errors=errors)
    return make


def find_cross_circuit(rep: Replacement, search_beh, eval_beh, cfg: CircuitConfig, *,
                       keep: dict | None = None, progress: bool = True) -> dict:
    """Search and score a circuit over the edges between adjacent sites of ``rep``'s layers."""
    abl = _ablation(cfg, hasattr(search_beh, "clean"))
    if abl == "mean":
        raise UserError("--ablation mean is not supported across layers: use patch (tasks) or zero")
    L0, L1 = rep.layers[0], rep.layers[-1]
    what = (f"every feature edge between adjacent sites of layers {L0}-{L1} (resid→mlp, resid→resid "
            "through the skip path and frozen attention, mlp→resid) at the token pairs where the source "
            "carries something and the target is active; " +
            ("error nodes kept clean" if cfg.errors == "kept" else
             "each site's error node is a source too (ablated at non-BOS positions)"))

    def infl_order(ctx: CrossContext) -> dict:
        inf = influence(ctx)
        order = torch.argsort(inf.edge, descending=True, stable=True).tolist()
        sc = ctx.scope()
        return {"influence (circuit-tracer)": [sc[k] for k in order]}

    return search_and_score(_make(rep, abl), rank_cross_edges, search_beh, eval_beh, cfg, abl, what,
                            extra_orders=infl_order, keep=keep, progress=progress)


def node_id(cx: CrossContext, gid: int, position: int | None = None) -> str:
    """The graph id of a global id (``resid1/37``, an error node ``resid1/err``; with a position
    ``resid1/37@5``)."""
    site, f = cx.node(gid)
    return _site_nid(site, f, position)


def _site_nid(site, f: int, position: int | None = None) -> str:
    kind, L = site
    if kind == "emb":
        nid = "emb"
    elif kind == "out":
        nid = "out"
    else:
        nid = f"{kind}{L}/{'err' if f == ERR else f}"
    return nid if position is None else f"{nid}@{position}"


@torch.no_grad()
def circuit_graph(cx: CrossContext, circuit: list[tuple[int, int]], deltas: dict, meta: dict) -> CircuitGraph:
    """The circuit's edges (summed over prompts) with their measured Δ, the readout of its
    last-layer nodes into ``out`` and the embedding's edges into its first-layer nodes."""
    w = torch.zeros(len(cx.edge_keys), dtype=torch.float64)
    a = torch.zeros_like(w)
    for E in cx.entries.values():
        e = (E.J * E.c).double()
        w.index_add_(0, E.edge, e)
        a.index_add_(0, E.edge, e.abs())
    pos = {(int(s), int(d)): k for k, (s, d) in enumerate(zip(cx.edge_src.tolist(), cx.edge_dst.tolist()))}
    inf = influence(cx)
    total = sum(inf.node.values()) or 1.0
    grads = code_grads(cx)
    nodes: dict[str, dict] = {}

    def add_node(gid: int) -> str:
        nid = node_id(cx, gid)
        if nid not in nodes:
            site, f = cx.node(gid)
            si = cx.si[site]
            if f == ERR:  # an error node (errors ablated): its mean norm over non-BOS tokens
                nodes[nid] = {"activation": float(cx.tr.errors[site][:, 1:].norm(dim=-1).mean()),
                              "influence": inf.node.get(gid, 0.0) / total, "effect": None}
                return nid
            act = cx.tr.codes[site][..., f]
            on = act != 0
            eff = None
            if si in cx.rows:  # attribution-patching node effect Σ_t c·∂m/∂code
                n, t, k = cx.rows[si]
                sel = k == f
                eff = float((cx.co.codes[site][n[sel], t[sel], f] * grads[si][sel]).sum())
            nodes[nid] = {"activation": float(act[on].mean()) if on.any() else 0.0,
                          "influence": inf.node.get(gid, 0.0) / total, "effect": eff}
        return nid

    edges = []
    for i, j in circuit:  # an edge found on the search half may never co-occur on these prompts
        k = pos.get((i, j))
        ww, aa, cc = (0.0, 0.0, 0) if k is None else (float(w[k]), float(a[k]), int(cx.edge_count[k]))
        edges.append((add_node(i), add_node(j), {"weight": ww, "abs_weight": aa, "count": cc,
                                                 "delta": deltas.get((i, j))}))
    have = set(nodes)
    L_last = cx.layer
    readout: dict[str, list] = {}
    for ch in edges_into_out(cx.rep, cx.tr, cx.co, cx.g_out):
        _sum_into(readout, have, [_site_nid(ch.src_site, u) for u in ch.src.tolist()], ch.value)
    for nid, (s, ab, c) in sorted(readout.items()):
        edges.append((nid, "out", {"weight": s, "abs_weight": ab, "count": c}))
    if readout:
        nodes["out"] = {"label": meta.get("metric", "metric")}
    if cx.rep.layers[0] == 0:
        emb: dict[str, list] = {}
        for ch in edges_into(cx.rep, cx.tr, cx.co, ("resid", 0)):
            if ch.src_site != EMB:
                continue
            _sum_into(emb, have, [f"resid0/{k_}" for k_ in ch.dst.tolist()], ch.value)
        for nid, (s, ab, c) in sorted(emb.items()):
            edges.append(("emb", nid, {"weight": s, "abs_weight": ab, "count": c}))
        if emb:
            nodes["emb"] = {"label": "token embeddings"}
    meta = {"mode": "corpus", "layers": list(cx.rep.layers), **meta}
    meta["readout_note"] = (f"edges into out read the last layer ({L_last}) through its attention (frozen) "
                            "and the real model after it; they are not part of the ablation scope")
    return CircuitGraph.from_nodes_edges(nodes, edges, meta)


def _sum_into(acc: dict[str, list], have: set, nids: list[str], values: torch.Tensor) -> None:
    """Add each value to its node's [Σ e, Σ|e|, count] (nodes of the circuit only)."""
    for nid, v in zip(nids, values.tolist()):
        if nid in have:
            r = acc.setdefault(nid, [0.0, 0.0, 0])
            r[0] += v
            r[1] += abs(v)
            r[2] += 1


@torch.no_grad()
def prompt_graph(rep: Replacement, tokens: torch.Tensor, metric, meta: dict, *, node_share: float = 0.8,
                 edge_share: float = 0.98, max_edges: int = 400) -> CircuitGraph:
    """One prompt's attribution graph (exact a×grad per position), pruned by influence.

    ``tokens [1, ctx]``; ``metric(logits)`` the scalar the graph explains (a logit, or a task's
    logit difference). Nodes are ``site{L}/{f}@t``, errors ``site{L}/err@t``, ``emb@t``, ``out@t``.
    """
    from .restart import capture_tail

    if tokens.shape[0] != 1:
        raise UserError(f"a prompt graph takes one prompt, got {tokens.shape[0]}")
    tr = rep.trace(tokens)
    co = coefficients(tr)
    L = rep.layers[-1]
    tail = capture_tail(rep.model, L, tr.tokens)
    rep.n_forward += 1
    g = out_grad(rep.model, L, tr.tokens, tail, metric, tr.acts[("resid", L)].shape[-1])
    # per-position node graph with |e| weights; influence from out back, normalised per target
    w: dict[tuple[str, str], float] = {}
    for ch in all_edges(rep, tr, co, g):
        for t, k, s, i, v in zip(ch.t.tolist(), ch.dst.tolist(), ch.s.tolist(), ch.src.tolist(),
                                 ch.value.tolist()):
            key = (_site_nid(ch.src_site, i, s), _site_nid(ch.dst_site, k, t) if ch.dst_site != OUT
                   else f"out@{t}")
            w[key] = w.get(key, 0.0) + v
    into: dict[str, float] = {}
    for (u, v), x in w.items():
        into[v] = into.get(v, 0.0) + abs(x)
    order = _topo(rep, w)
    infl = {n: 0.0 for n in order}
    out_id = f"out@{tokens.shape[1] - 1}"
    infl[out_id] = 1.0
    by_dst: dict[str, list] = {}
    for (u, v), x in w.items():
        by_dst.setdefault(v, []).append((u, x))
    edge_inf = {}
    for v in reversed(order):
        if infl.get(v, 0.0) == 0.0 or v not in by_dst:
            continue
        for u, x in by_dst[v]:
            share = infl[v] * abs(x) / into[v] if into[v] else 0.0
            edge_inf[(u, v)] = share
            infl[u] = infl.get(u, 0.0) + share
    # prune: nodes by cumulative share, then edges among them by cumulative share (circuit-tracer)
    feats = sorted(((n, x) for n, x in infl.items() if n != out_id and x > 0), key=lambda kv: -kv[1])
    tot = sum(x for _, x in feats)
    keep, acc = {out_id}, 0.0
    for n, x in feats:
        if acc >= node_share * tot:
            break
        keep.add(n)
        acc += x
    cand = sorted(((e, x) for e, x in edge_inf.items() if e[0] in keep and e[1] in keep),
                  key=lambda kv: -kv[1])
    tot_e = sum(x for _, x in cand)
    kept_edges: list[tuple[str, str]] = []
    acc = 0.0
    for e, x in cand:
        if acc >= edge_share * tot_e or len(kept_edges) >= max_edges:
            break
        kept_edges.append(e)
        acc += x
    used = {n for e in kept_edges for n in e}
    # summed in a fixed order: a set's order follows the per-process string hash, and so would the
    # last bits of every node's share
    tot_n = sum(infl[n] for n in sorted(used) if n != out_id) or 1.0
    toks = [rep.model.tokenizer.decode([int(t)]) for t in tokens[0].tolist()]
    nodes = {}
    for n in used:
        base, _, p = n.partition("@")
        act = None
        if base not in ("emb", "out") and not base.endswith("/err"):
            site = ("resid", None) if base.startswith("resid") else ("mlp", None)
            Lk, f = base[len(site[0]):].split("/")
            act = float(tr.codes[(site[0], int(Lk))][0, int(p), int(f)])
        nodes[n] = {"activation": act, "influence": None if n == out_id else infl[n] / tot_n}
    edges = [(u, v, {"weight": w[(u, v)]}) for u, v in kept_edges]
    meta = {"mode": "prompt", "layers": list(rep.layers), "prompt": "".join(toks), "prompt_tokens": toks,
            **meta}
    return CircuitGraph.from_nodes_edges(nodes, edges, meta)


def _topo(rep: Replacement, w: dict) -> list[str]:
    """Node ids in forward order: emb, then each site in order, then out (by position within)."""
    rank = {"emb": -1}
    for i, (kind, L) in enumerate(rep.sites):
        rank[f"{kind}{L}"] = i
    names = {n for e in w for n in e}

    def key(n: str):
        base, _, p = n.partition("@")
        if base == "out":
            return (len(rep.sites), int(p), n)
        head = base.split("/")[0]
        return (rank[head], int(p), n)
    return sorted(names, key=key)
