"""The input-independent view of resid → MLP links, to set beside the data-based edges (DESIGN §5).

1. **virtual weights** ``V_ji = w_jᵀ diag(σ'(h̄)) W_inᵀ diag(γ/s̄) P r_i``: the MLP linearised at
   the mean pre-activation ``h̄`` and the mean LayerNorm scale ``s̄`` (``P`` removes the mean,
   which LayerNorm does for every input);
2. **sufficiency**: set the residual to ``a_i^max·r_i + x̄`` (``a_i^max`` the feature's largest
   activation on the data, ``x̄`` the mean residual) and read which MLP features fire;
3. **agreement** with the data: rank correlation of virtual weights and data edge weights over
   the edges seen on data, and how many of the top data edges the sufficiency test reproduces.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .attribution import EdgeTable, act_derivative, ln_stats
from .sites import MLPParts


@torch.no_grad()
def virtual_weights(parts: MLPParts, pair, x_mean_stats: tuple[Tensor, Tensor]) -> Tensor:
    """``[d_M, d_R]`` virtual weights at mean pre-activation ``h̄`` and mean LN scale ``1/s̄``."""
    h_bar, inv_s_bar = x_mean_stats
    R, M = pair.resid, pair.mlp
    r = R.W_dec - (0 if parts.rms else R.W_dec.mean(-1, keepdim=True))  # P r_i
    if parts.ln_weight is not None:
        r = r * parts.ln_weight
    u = (r * inv_s_bar) @ parts.W_in  # [d_R, d_mlp]
    u = u * act_derivative(parts, h_bar)
    return (u @ M.W_enc).T  # [d_M, d_R]


@torch.no_grad()
def mean_stats(parts: MLPParts, x: Tensor) -> tuple[Tensor, Tensor]:
    """(mean MLP pre-activation h̄ [d_mlp], mean inverse LN scale 1/s̄) over residual vectors ``x``."""
    h = parts.ln(x) @ parts.W_in + parts.b_in
    _, inv = ln_stats(parts, x)
    return h.mean(0), inv.mean()


@torch.no_grad()
def mean_slope_weights(parts: MLPParts, pair, x: Tensor) -> Tensor:
    """Virtual weights with the *mean slope* ``E[σ'(h)]`` in place of ``σ'(h̄)`` (a variant).

    GELU's slope at the mean pre-activation is often tiny or negative while the slope where the
    neuron actually fires is near 1; averaging the slope keeps that information.
    """
    h = parts.ln(x) @ parts.W_in + parts.b_in
    _, inv = ln_stats(parts, x)
    R, M = pair.resid, pair.mlp
    r = R.W_dec - (0 if parts.rms else R.W_dec.mean(-1, keepdim=True))
    if parts.ln_weight is not None:
        r = r * parts.ln_weight
    u = (r * inv.mean()) @ parts.W_in * act_derivative(parts, h).mean(0)
    return (u @ M.W_enc).T


@torch.no_grad()
def sufficiency(parts: MLPParts, pair, a_max: Tensor, x_mean: Tensor,
                features: Tensor | None = None) -> Tensor:
    """MLP codes ``[n, d_M]`` when the residual is ``a_i^max·r_i + x̄`` for each resid feature i."""
    R, M = pair.resid, pair.mlp
    idx = torch.arange(R.W_dec.shape[0]) if features is None else features
    x = a_max[idx, None] * R.W_dec[idx] + x_mean
    return M.encode(parts.hidden(x))


def compare(table: EdgeTable, vw: Tensor, suff: Tensor, top: int = 20,
            vw_slope: Tensor | None = None) -> dict:
    """Where the weight-based view agrees with the data-based edges.

    Data weights are summed over tokens (``Σ_t a_i ∂f_j/∂a_i``); virtual weights are per unit of
    ``a_i``, so they are compared by sign and by rank over the edges seen on data.
    """
    feat = table.src >= 0
    w = table.weight[feat]
    rank = lambda t: t.argsort().argsort().double()  # noqa: E731

    def rho(m: Tensor) -> float:
        v = m[table.dst[feat], table.src[feat]].double()
        return float(torch.corrcoef(torch.stack([rank(w), rank(v)]))[0, 1]) if len(w) > 1 else float("nan")

    t = table.top(top)
    rows = []
    for i, j, wt in zip(t.src.tolist(), t.dst.tolist(), t.weight.tolist()):
        row = {"src": i, "dst": j, "data_weight": wt, "virtual_weight": float(vw[j, i]),
               "fires_alone": bool(suff[i, j] > 0), "sufficiency_act": float(suff[i, j])}
        if vw_slope is not None:
            row["virtual_weight_mean_slope"] = float(vw_slope[j, i])
        rows.append(row)
    n = max(1, len(rows))
    out = {"spearman_data_vs_virtual": rho(vw), "top_edges": rows,
           "top_sign_agreement": sum((r["data_weight"] > 0) == (r["virtual_weight"] > 0) for r in rows) / n,
           "top_fire_alone": sum(r["fires_alone"] for r in rows) / n}
    if vw_slope is not None:
        out["spearman_data_vs_mean_slope"] = rho(vw_slope)
        out["top_sign_agreement_mean_slope"] = sum(
            (r["data_weight"] > 0) == (r["virtual_weight_mean_slope"] > 0) for r in rows) / n
    return out
