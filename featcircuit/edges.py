"""Edges between adjacent sites across layers, per position (DESIGN §5, §12).

Every edge is ``coef_u(s) · ∂pre_v(t)/∂u(s)``: the source's coefficient (its code ``a``, or
``a − b`` against an ablation value ``b``; for an error node its error vector, for the embedding
the embedding vector) times the derivative of the target's pre-activation along the source's
direction, with attention patterns and LayerNorm scales frozen at the clean run:

- ``resid(L) → mlp(L)``: exact through LN2 and the nonlinearity (§5, same position);
- ``resid(L) → resid(L+1)`` (skip + frozen attention, across positions) and
  ``mlp(L) → resid(L+1)`` (``W_out``; through attention L+1 in sequential blocks): linear;
- ``emb → resid(0)`` and ``resid/mlp(Lmax) → out``: ``out`` is the metric, whose gradient at
  the residual after the last chosen layer comes from one backward through the real model.

Targets are the active features of a site (TopK/ReLU: ``∂code/∂pre = 1`` on the active set).
Each target row ``(sequence, t, feature)`` is pulled back to its source site as a cotangent
``[ctx, d]`` by the transposed frozen maps, then read by the active source directions at each
position — no backward pass per feature.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .attribution import grad_rows
from .replacement import Replacement, SiteKey, Trace

ERR = -1
EMB: SiteKey = ("emb", -1)
OUT: SiteKey = ("out", -1)


@dataclass
class Coefs:
    """What each source node carries: ``c = a − b`` per site, error and embedding vectors."""

    codes: dict[SiteKey, Tensor]  # [n, ctx, m]
    errors: dict[SiteKey, Tensor]  # [n, ctx, d_site]
    embed: Tensor  # [n, ctx, d]
    _nz: dict = field(default_factory=dict)

    def carries(self, site: SiteKey) -> Tensor:
        """``[n, ctx]``: positions where the site carries anything (a nonzero code or error coefficient)."""
        key = ("carries", site)
        if key not in self._nz:
            self._nz[key] = (self.codes[site] != 0).any(-1) | (self.errors[site] != 0).any(-1)
        return self._nz[key]

    def reach(self, site: SiteKey) -> Tensor:
        """``[n, ctx]``: positions t where some source position s ≤ t of the site carries anything."""
        key = ("reach", site)
        if key not in self._nz:
            self._nz[key] = torch.cummax(self.carries(site).to(torch.int8), dim=1).values.bool()
        return self._nz[key]

    def sources(self, site: SiteKey) -> tuple[Tensor, Tensor]:
        """Per (n, s): indices and values of the site's nonzero coefficients (cached)."""
        if site not in self._nz:
            self._nz[site] = _sources(self.codes[site])
        return self._nz[site]


def coefficients(tr: Trace, base: Trace | None = None, means: bool = False) -> Coefs:
    """``a − b``: exact attribution (``base`` None: b = 0), patching (``base`` = the corrupt
    trace) or mean ablation (``means``: b = the mean code/error over non-BOS tokens)."""
    if base is None and not means:
        return Coefs(dict(tr.codes), dict(tr.errors), tr.embed)
    if means:
        mean = lambda t: t[:, 1:].flatten(0, 1).mean(0)  # noqa: E731
        c = {s: tr.codes[s] - mean(tr.codes[s]) for s in tr.codes}
        e = {s: tr.errors[s] - mean(tr.errors[s]) for s in tr.errors}
        for t in list(c.values()) + list(e.values()):
            t[:, 0] = 0  # BOS is never ablated
        return Coefs(c, e, torch.zeros_like(tr.embed))
    assert base is not None
    return Coefs({s: tr.codes[s] - base.codes[s] for s in tr.codes},
                 {s: tr.errors[s] - base.errors[s] for s in tr.errors}, tr.embed - base.embed)


@dataclass
class EdgeChunk:
    """Edges of one chunk in long form (one row per (target row, source position, source))."""

    src_site: SiteKey
    dst_site: SiteKey
    seq: Tensor  # [E] sequence
    t: Tensor  # [E] target position
    dst: Tensor  # [E] target feature (0 for out)
    s: Tensor  # [E] source position
    src: Tensor  # [E] source feature (ERR for the error node, 0 for the embedding)
    value: Tensor  # [E]


def _sources(coef: Tensor) -> tuple[Tensor, Tensor]:
    """Per (n, s): indices and values of the nonzero coefficients, padded with zeros."""
    k = max(1, int((coef != 0).sum(-1).max()))
    vals, idx = coef.abs().topk(k, dim=-1)
    return idx, coef.gather(-1, idx) * (vals > 0)


def active_rows(tr: Trace, site: SiteKey) -> tuple[Tensor, Tensor, Tensor]:
    """(sequence, position, feature) of every active code at a site (BOS excluded)."""
    n, t, k = torch.nonzero(tr.codes[site] != 0, as_tuple=True)
    return n, t, k


def _read(rep: Replacement, tr: Trace, co: Coefs, src: SiteKey, dst: SiteKey, n: Tensor, t: Tensor,
          k: Tensor, g: Tensor, dir_map: Callable[[Tensor], Tensor] | None = None,
          same_pos: bool = False) -> Iterator[EdgeChunk]:
    """Edges from the sources of site ``src`` given per-row cotangents ``g [R, ctx, d]``.

    ``same_pos``: ``g [R, d]`` lives at the target's own position only (the position-wise map).
    """
    D = rep.decoder(src)
    D = D if dir_map is None else dir_map(D)
    err = co.errors[src]
    if dir_map is not None:
        err = dir_map(err)
    idx, val = co.sources(src)  # [N, ctx, K]
    if same_pos:
        ii, vv = idx[n, t], val[n, t]  # [R, K]
        e = torch.einsum("rd,rkd->rk", g, D[ii]) * vv
        keep = e != 0
        rr = torch.arange(len(n), device=g.device)[:, None].expand_as(e)
        yield EdgeChunk(src, dst, n[rr[keep]], t[rr[keep]], k[rr[keep]], t[rr[keep]], ii[keep], e[keep])
        ev = (g * err[n, t]).sum(-1)
        keep = ev != 0
        yield EdgeChunk(src, dst, n[keep], t[keep], k[keep], t[keep], torch.full_like(t[keep], ERR), ev[keep])
        return
    # only source positions where the cotangent is nonzero (causal attention: s ≤ t) and the source
    # carries something (patching: nothing before the first corrupted token)
    live = (g.abs().sum(-1) != 0) & co.carries(src)[n]  # [R, ctx]
    r_i, s_i = torch.nonzero(live, as_tuple=True)
    ii, vv = idx[n[r_i], s_i], val[n[r_i], s_i]  # [P, K]
    e = torch.einsum("pd,pkd->pk", g[r_i, s_i], D[ii]) * vv
    keep = e != 0
    pp = torch.arange(len(r_i), device=g.device)[:, None].expand_as(e)[keep]
    rows = r_i[pp]
    yield EdgeChunk(src, dst, n[rows], t[rows], k[rows], s_i[pp], ii[keep], e[keep])
    ev = (g[r_i, s_i] * err[n[r_i], s_i]).sum(-1)
    keep = ev != 0
    rows = r_i[keep]
    yield EdgeChunk(src, dst, n[rows], t[rows], k[rows], s_i[keep], torch.full_like(rows, ERR), ev[keep])


def encoder_cols(d, x: Tensor, k: Tensor) -> Tensor:
    """``∂code_k/∂x`` at the rows ``x [R, d]`` for features ``k [R]`` (active, mask held)."""
    if hasattr(d, "enc_cols"):  # any module: the encoder's own gradient
        return d.enc_cols(x, k[:, None])[:, 0]
    return d.W_enc.T[k]


def edges_into(rep: Replacement, tr: Trace, co: Coefs, dst: SiteKey, chunk: int = 256) -> Iterator[EdgeChunk]:
    """Every edge into the active features of site ``dst`` from its adjacent sources."""
    kind, L = dst
    n_all, t_all, k_all = active_rows(tr, dst)
    # rows that no source reaches carry no edge (patching: targets before the corrupted token)
    srcs = ([("resid", L)] if kind == "mlp" else [] if L == rep.layers[0]
            else [("resid", L - 1), ("mlp", L - 1)])
    if srcs:
        near = co.carries if kind == "mlp" else co.reach
        ok = torch.zeros_like(n_all, dtype=torch.bool)
        for sk in srcs:
            ok |= near(sk)[n_all, t_all]
        n_all, t_all, k_all = n_all[ok], t_all[ok], k_all[ok]
    ctx = tr.tokens.shape[1]
    d_model = tr.acts[("resid", L)].shape[-1]
    chunk = chunk * 16 if kind == "mlp" else chunk  # position-wise rows are 16× cheaper
    for c0 in range(0, len(n_all), chunk):
        n, t, k = n_all[c0:c0 + chunk], t_all[c0:c0 + chunk], k_all[c0:c0 + chunk]
        R = len(n)
        if kind == "mlp":  # exact, same position: rows ∂f_k/∂x at (n, t)
            parts = rep.parts[L]
            x = tr.acts[("resid", L)][n, t]
            M = rep.dictionary(dst)
            w = M.enc_cols(parts.hidden(x), k[:, None])[:, 0] if hasattr(M, "enc_cols") else M.W_enc.T[k]
            rows = grad_rows(parts, x, w[:, None, :])[:, 0]  # [R, d]
            yield from _read(rep, tr, co, ("resid", L), dst, n, t, k, rows, same_pos=True)
            continue
        cot = torch.zeros(R, ctx, d_model, dtype=tr.acts[dst].dtype, device=tr.acts[dst].device)
        cot[torch.arange(R), t] = encoder_cols(rep.dictionary(dst), tr.acts[dst][n, t], k)
        if L == rep.layers[0]:
            if L == 0:  # emb → resid(0)
                g = rep.embed_step_T(tr, cot, rows=n)
                ev = (g * co.embed[n]).sum(-1)
                keep = ev != 0
                rr = torch.arange(R, device=g.device)[:, None].expand_as(ev)
                pp = torch.arange(ctx, device=g.device)[None, :].expand_as(ev)
                yield EdgeChunk(EMB, dst, n[rr[keep]], t[rr[keep]], k[rr[keep]], pp[keep],
                                torch.zeros_like(pp[keep]), ev[keep])
            continue
        gx, gzo = rep.step_T(L - 1, tr, cot, rows=n)
        yield from _read(rep, tr, co, ("resid", L - 1), dst, n, t, k, gx)
        W_out = rep.parts[L - 1].W_out
        yield from _read(rep, tr, co, ("mlp", L - 1), dst, n, t, k, gzo, lambda D: D @ W_out)


def edges_into_out(rep: Replacement, tr: Trace, co: Coefs, g_out: Tensor) -> Iterator[EdgeChunk]:
    """Edges from the last chosen layer's sites into the metric, given ``∂m/∂x_out [n, ctx, d]``."""
    L = rep.layers[-1]
    n_seq, ctx = tr.tokens.shape
    gx, gzo = rep.step_T(L, tr, g_out)
    n = torch.arange(n_seq, device=g_out.device)
    z = torch.zeros_like(n)
    W_out = rep.parts[L].W_out
    yield from _read(rep, tr, co, ("resid", L), OUT, n, z + ctx - 1, z, gx)
    yield from _read(rep, tr, co, ("mlp", L), OUT, n, z + ctx - 1, z, gzo, lambda D: D @ W_out)


def all_edges(rep: Replacement, tr: Trace, co: Coefs, g_out: Tensor | None) -> Iterator[EdgeChunk]:
    """Edges into every site of the chosen layers (and into the metric when ``g_out`` is given)."""
    for site in rep.sites:
        yield from edges_into(rep, tr, co, site)
    if g_out is not None:
        yield from edges_into_out(rep, tr, co, g_out)


def out_grad(model, layer: int, tokens: Tensor, tail, metric: Callable[[Tensor], Tensor], d: int) -> Tensor:
    """``∂m/∂x_out [n, ctx, d]`` at the residual after block ``layer``, through the real model.

    ``tail`` is :func:`featcircuit.restart.capture_tail`'s restart (None: a full forward with
    a hook at ``blocks.{layer}.hook_resid_post``).
    """
    from .restart import run_tail

    p = next(model.parameters())
    delta = torch.zeros(1, *tokens.shape, d, dtype=p.dtype, device=p.device, requires_grad=True)
    with torch.enable_grad():
        if tail is not None:
            logits = run_tail(tail, delta, False)
        else:
            def hook(act, hook=None):
                return act + delta[0]
            logits = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.hook_resid_post", hook)])
        metric(logits).backward()
    assert delta.grad is not None
    return delta.grad[0].detach()
