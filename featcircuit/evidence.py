"""Edge evidence: the contexts behind a resid → MLP feature edge (DESIGN §8).

An edge's weight is a sum over tokens, ``Σ_t e_ij(t)``; a researcher trusts it once they see
the tokens it comes from.

1. One pass over ``tokens`` in batches: harvest the MLP input, and per chunk compute every
   ``e_ij(t)`` of the active pairs with :func:`featcircuit.attribution.batch_edges` (the same
   closed form as :func:`~featcircuit.attribution.attribute_edges`).
2. Keep the entries of the requested edges only (flattened pair key ``j·(d_R+1) + i``, the
   residual error as ``i = d_R``), with their flat token position, ``a_i`` and ``f_j``.
3. Per edge: the sum, the sum of ``|e|``, the co-activation count and the **mean edge per
   co-activation** (sum / count); the ``k`` contexts where ``e_ij(t)`` is largest in the
   direction of the edge's sign, distinct by document and context
   (:func:`featcircuit.contexts.distinct_top`); and the current tokens that carry the most
   of ``Σ_t e_ij(t)`` (``top_tokens``: their share of the sum and their count).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .contexts import distinct_top, doc_ids, example, tok_str
from .errors import UserError


def _edge_id(layer: int, i: int, j: int) -> tuple[str, str]:
    return (f"resid{layer}/err" if i < 0 else f"resid{layer}/{i}"), f"mlp{layer}/{j}"


@torch.no_grad()
def edge_evidence(rep, tokens: Tensor, edges: Iterable[tuple[int, int]], k: int = 5, *,
                  ln: str = "exact", batch_size: int = 16, per_doc: int = 1, n_tokens_shown: int = 8,
                  left: int = 24, right: int = 4, progress: bool = False) -> list[dict]:
    """Evidence for each ``(i, j)`` in ``edges`` (resid feature i, -1 for the error → MLP feature j)
    of a one-layer :class:`~featcircuit.replacement.Replacement`.

    Returns one dict per edge, in the given order: ``source``, ``target`` (node ids), ``src``,
    ``dst``, ``sum``, ``sum_abs``, ``count``, ``mean`` (per co-activation), ``max_abs``, ``top``
    (examples whose ``values`` are ``e_ij`` at each token of the window, with ``edge``, ``a``, ``f``
    at the marked token) and ``top_tokens``.
    """
    from .activations import harvest
    from .attribution import batch_edges
    from .replacement import one_layer

    edges = [(int(i), int(j)) for i, j in edges]
    if k < 0:
        raise UserError(f"bad k {k!r}: use the number of contexts per edge (>= 0)")
    rep = one_layer(rep, "edge_evidence")
    model, layer, r_site = rep.model, rep.layer, rep.resid_site
    R, M = rep.pair.resid, rep.pair.mlp
    d_r, d_m = R.W_dec.shape[0], M.W_dec.shape[0]
    for i, j in edges:
        if not (-1 <= i < d_r and 0 <= j < d_m):
            raise UserError(f"unknown edge resid:{i} -> mlp:{j}: resid features are -1 (error) or "
                            f"0..{d_r - 1}, mlp features 0..{d_m - 1}")
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise UserError(f"edge evidence needs a [n_seq, n_ctx >= 2] token tensor, got {tuple(tokens.shape)}")
    parts = rep.mlp_parts
    device = parts.W_in.device
    keyof = lambda i, j: j * (d_r + 1) + (d_r if i < 0 else i)  # noqa: E731
    want = torch.tensor(sorted({keyof(i, j) for i, j in edges}), dtype=torch.long, device=device)
    n_ctx = tokens.shape[1]
    got_key, got_pos, got_e, got_a, got_f = [], [], [], [], []
    # only tokens where some wanted edge has both ends active carry evidence: the closed form (the
    # costly part) runs on those rows alone
    src_ids = torch.tensor([i for i, _ in edges], dtype=torch.long, device=device)
    dst_ids = torch.tensor([j for _, j in edges], dtype=torch.long, device=device)
    for s in tqdm(range(0, len(tokens), batch_size), desc="edge evidence", disable=not progress):
        b = tokens[s:s + batch_size].to(device)
        x = harvest(model, b, [r_site.hook], batch_size=len(b), progress=False)[r_site.hook]
        x = x[:, 1:].reshape(-1, r_site.width).to(device)
        flat = ((torch.arange(len(b))[:, None] + s) * n_ctx + torch.arange(1, n_ctx)[None, :]).flatten()
        if len(edges):
            a_on = R.encode(x)[:, src_ids.clamp_min(0)] != 0
            a_on |= (src_ids < 0)[None, :]  # the error node is present at every token
            on = (a_on & (M.encode(parts.hidden(x))[:, dst_ids] != 0)).any(1)
            rows = torch.nonzero(on).flatten()
            x, flat = x[rows], flat[rows.cpu()]
        for c in range(0, len(x), 1024):
            a_vals, a_idx, f_vals, f_idx, e, _ = batch_edges(parts, R, M, x[c:c + 1024], ln=ln)
            src_idx = torch.cat([a_idx, torch.full_like(a_idx[:, :1], d_r)], 1)
            src_val = torch.cat([a_vals, torch.full_like(a_vals[:, :1], float("nan"))], 1)
            src_on = torch.cat([a_vals != 0, torch.ones_like(a_vals[:, :1], dtype=torch.bool)], 1)
            keys = f_idx[:, :, None] * (d_r + 1) + src_idx[:, None, :]
            m = (f_vals != 0)[:, :, None] & src_on[:, None, :] & torch.isin(keys, want)
            t, jj, ii = torch.nonzero(m, as_tuple=True)
            got_key.append(keys[t, jj, ii].cpu())
            got_pos.append(flat[c:c + 1024][t.cpu()])
            got_e.append(e[t, jj, ii].double().cpu())
            got_a.append(src_val[t, ii].double().cpu())
            got_f.append(f_vals[t, jj].double().cpu())
    cat = lambda xs, dt: torch.cat(xs) if xs else torch.zeros(0, dtype=dt)  # noqa: E731
    key, pos = cat(got_key, torch.long), cat(got_pos, torch.long)
    ev, av, fv = cat(got_e, torch.float64), cat(got_a, torch.float64), cat(got_f, torch.float64)
    tokens = tokens.long().cpu()
    tok = getattr(model, "tokenizer", None)
    docs = doc_ids(tokens, getattr(tok, "bos_token_id", None) if tok is not None else None)
    flat_tokens = tokens.reshape(-1)
    out = []
    for i, j in edges:
        sel = torch.nonzero(key == keyof(i, j)).flatten()
        p, e, a, f = pos[sel], ev[sel], av[sel], fv[sel]
        total = float(e.sum())
        sign = -1.0 if total < 0 else 1.0
        vals_at = dict(zip(p.tolist(), e.tolist()))
        top = []
        for r in distinct_top(p, sign * e, tokens, docs, k, per_doc=per_doc):
            ex = example(tokens, vals_at, int(p[r]), tok, left, right)
            ex.update(act=float(e[r]), edge=float(e[r]), a=None if a[r].isnan() else float(a[r]),
                      f=float(f[r]))
            top.append(ex)
        ids = flat_tokens[p]
        per_tok: dict[int, list[float]] = {}
        for t_id, val in zip(ids.tolist(), e.tolist()):
            acc = per_tok.setdefault(int(t_id), [0.0, 0])
            acc[0] += val
            acc[1] += 1
        denom = float(e.abs().sum()) or 1.0
        tt = sorted(per_tok.items(), key=lambda kv: (-abs(kv[1][0]), kv[0]))[:n_tokens_shown]
        u, v = _edge_id(layer, i, j)
        out.append({"source": u, "target": v, "src": i, "dst": j, "sum": total,
                    "sum_abs": float(e.abs().sum()), "count": len(e),
                    "mean": total / len(e) if len(e) else None,
                    "max_abs": float(e.abs().max()) if len(e) else 0.0, "top": top,
                    "top_tokens": [{"id": t_id, "token": tok_str(tok, t_id), "sum": s_, "count": int(c_),
                                    "share": s_ / denom} for t_id, (s_, c_) in tt]})
    return out


def graph_edges(graph) -> list[tuple[int, int]]:
    """``(i, j)`` of every edge of a :class:`~featcircuit.graph.CircuitGraph` (error source as -1)."""
    out = []
    for u, v, _ in graph.sorted_edges():
        du, dv = graph.g.nodes[u], graph.g.nodes[v]
        if du.get("site") == "resid" and dv.get("site") == "mlp":
            out.append((int(du["feature"]), int(dv["feature"])))
    return out


def evidence_by_edge(evidence: Sequence[dict]) -> dict[tuple[str, str], dict]:
    """``{(source, target): evidence}`` of an :func:`edge_evidence` list."""
    return {(x["source"], x["target"]): x for x in evidence}


def save_evidence(evidence: Sequence[Mapping], path: str | Path) -> Path:
    """Write the evidence list as JSON atomically."""
    import json

    from .io import atomic_write_text

    return atomic_write_text(path, json.dumps({"schema": "featcircuit.edge_evidence", "version": 1,
                                               "edges": list(evidence)}, ensure_ascii=False))
