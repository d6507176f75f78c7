"""The Jacobian between a pair's active residual and active MLP codes (DESIGN §14, Farnik et al. 2025).

Per token ``t``, with ``a`` the residual codes, ``f`` the MLP codes of the mid-MLP activation the
model computes from the *true* residual ``x`` (the residual error ``ε_R`` held, TopK masks held)::

    J[t, j, i] = ∂f_j/∂a_i = 1[j active] · w_jᵀ diag(σ'(h)) W_inᵀ J_LN(x) r_i    (i, j active)

— the factor of §5's edge ``e_ij = a_i · J[t, j, i]``, so a sparse J is a sparse edge set.

1. From the true ``x`` (data, no gradient): ``h = LN(x) W_in + b_in``, ``s = σ'(h)``, the norm's
   ``x̂`` and ``1/scale``. ``J_LN(x) r = (1/scale)·γ ⊙ (c(r) − x̂ (x̂·c(r))/d)`` (``c`` centres for
   LayerNorm, is the identity for RMSNorm); "frozen" drops the ``x̂`` term.
2. Source side, once per dictionary rather than per token: ``Q = (γ ⊙ c(R)) W_in`` for the rows
   of ``R`` that are needed (all ``d_R`` rows when that is fewer than ``T·k_in``), gathered to
   ``[T, k_in, d_mlp]``; plus ``coef[t, i] = x̂_t·c(r_i)/d`` and ``v_t = (γ ⊙ x̂_t) W_in``.
3. Target side: the active encoder columns scaled by ``σ'(h)``: ``Ws [T, k_out, d_mlp]``.
4. One batched product: ``J = (1/scale)·(Ws Qᵀ − (Ws v) coefᵀ)``, masked to active pairs.
   Cost per token ``k_out·k_in·d_mlp``; ``[T, d_mlp, d]`` is never formed. Every step is a
   differentiable function of ``R``'s decoder and ``M``'s encoder, so the same code gives the
   training penalty (the LN Jacobian and ``σ'`` are taken at the true ``x``: constants).

Statistics (:class:`JacobianStats`): per token the number of ``|J|`` entries above 0.005, 0.01,
0.02 and 0.04 out of the ``k_out·k_in`` active pairs, and the share of ``Σ|J|`` held by the top
10% of those entries; averaged over tokens. Reported in the units the pair is trained in (each
site scaled to unit mean squared norm): ``J_norm = J · rms(x)/rms(z)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import UserError
from .sites import MLPParts

THRESHOLDS = (0.005, 0.01, 0.02, 0.04)
TOP_FRAC = 0.1


def code_jacobian(parts: MLPParts, x: Tensor, r_dec: Tensor, a_idx: Tensor, m_enc: Tensor,
                  f_idx: Tensor, *, a_on: Tensor | None = None, f_on: Tensor | None = None,
                  ln: str = "exact") -> Tensor:
    """``J[t, j, i] = ∂f_{f_idx[t,j]}/∂a_{a_idx[t,i]}`` at residual ``x [T, d]``: ``[T, k_out, k_in]``.

    ``r_dec [d_R, d]`` is the residual dictionary's decoder, ``m_enc [d_mlp, d_M]`` the MLP
    dictionary's encoder; ``a_on``/``f_on`` (bool, like the index tensors) mark the active slots.
    Differentiable with respect to ``r_dec`` and ``m_enc``.
    """
    if ln not in ("exact", "frozen"):
        raise UserError(f"unknown ln mode {ln!r}: use 'exact' or 'frozen'")
    x = x.detach()
    T, d = x.shape
    with torch.no_grad():
        # 1. constants of the true input
        xc = x if parts.rms else x - x.mean(-1, keepdim=True)
        inv = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + parts.ln_eps)  # [T, 1]
        xhat = xc * inv
        h = parts.ln(x) @ parts.W_in + parts.b_in
        s = _act_derivative(parts, h)  # [T, d_mlp]
    gamma = parts.ln_weight if parts.ln_weight is not None else None
    w_in = parts.W_in if gamma is None else gamma[:, None] * parts.W_in  # diag(γ) W_in [d, d_mlp]

    def centre(r: Tensor) -> Tensor:
        return r if parts.rms else r - r.mean(-1, keepdim=True)

    # 2. source side
    k_in = a_idx.shape[1]
    if T * k_in >= r_dec.shape[0]:
        Q = F.embedding(a_idx, centre(r_dec) @ w_in)  # [T, k_in, d_mlp]
    else:
        Q = centre(F.embedding(a_idx, r_dec)) @ w_in
    # 3. target side: active encoder columns, scaled by σ'(h)
    # the transposed copy makes the gather read contiguous rows (a strided gather is ~5× slower)
    Ws = F.embedding(f_idx, m_enc.T.contiguous()) * s[:, None, :]  # [T, k_out, d_mlp]
    # 4. the product
    J = Ws @ Q.transpose(1, 2)  # [T, k_out, k_in]
    if ln == "exact":
        rc = centre(F.embedding(a_idx, r_dec))  # [T, k_in, d]
        coef = (rc @ xhat[:, :, None])[..., 0] / d  # [T, k_in]
        v = (xhat @ w_in)  # [T, d_mlp]
        y = (Ws @ v[:, :, None])[..., 0]  # [T, k_out]
        J = J - y[:, :, None] * coef[:, None, :]
    J = J * inv[:, :, None]
    if f_on is not None:
        J = J * f_on[:, :, None]
    if a_on is not None:
        J = J * a_on[:, None, :]
    return J


def _act_derivative(parts: MLPParts, h: Tensor) -> Tensor:
    with torch.enable_grad():
        hh = h.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(parts.act(hh).sum(), hh)
    return g


def active_codes(d, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(values, indices, on-mask) of a dictionary's active codes on ``x``, padded to the batch max."""
    if getattr(getattr(d, "cfg", None), "architecture", None) == "topk":
        vals, idx = d.encode_sparse(x)
        return vals, idx, vals != 0
    codes = d.encode(x)
    k = max(1, int((codes != 0).sum(-1).max())) if len(codes) else 1
    mag, idx = codes.abs().topk(k, dim=-1, sorted=False)
    return codes.gather(-1, idx), idx, mag > 0


def _held_active(held: dict, n: int) -> tuple[Tensor, Tensor]:
    """(indices, on-mask) of the first ``n`` rows of codes kept by the training forward."""
    if "idx" in held:  # topk: (acts, idx)
        return held["idx"][:n], held["acts"][:n].detach() > 0
    codes = held["codes"][:n].detach()
    k = max(1, int((codes != 0).sum(-1).max())) if len(codes) else 1
    mag, idx = codes.abs().topk(k, dim=-1, sorted=False)
    return idx, mag > 0


def training_penalty(parts: MLPParts, x: Tensor, resid_dict, mlp_dict, held_resid: dict,
                     held_mlp: dict, ratio: float) -> Tensor:
    """``mean_t Σ|ratio·J_t|`` on raw residual rows ``x [n, d]``, masks from the training forward.

    ``held_*`` are the code dicts :func:`featcircuit.training._loss` keeps (their first ``n``
    rows are ``x``'s); ``ratio = s_M/s_R``, the two sites' input scales, turns the raw-unit J
    into the Jacobian between the codes the dictionaries see during training.
    """
    n = len(x)
    a_idx, a_on = _held_active(held_resid, n)
    f_idx, f_on = _held_active(held_mlp, n)
    J = code_jacobian(parts, x, resid_dict.W_dec, a_idx, mlp_dict.W_enc, f_idx, a_on=a_on, f_on=f_on)
    return J.abs().sum((1, 2)).mean() * ratio


def pair_jacobian(parts: MLPParts, resid_dict, mlp_dict, x: Tensor, *,
                  ln: str = "exact") -> tuple[Tensor, Tensor, Tensor]:
    """(J [T, k_out, k_in], a_on [T, k_in], f_on [T, k_out]) of a saved pair on residual rows ``x``.

    Raw units (codes of the saved dictionaries, which take raw activations).
    """
    for name, d, attr in (("resid", resid_dict, "W_dec"), ("mlp", mlp_dict, "W_enc")):
        if not isinstance(getattr(d, attr, None), Tensor) or (name == "mlp" and hasattr(d, "enc_cols")):
            raise UserError(f"the Jacobian needs the {name} dictionary's {attr} weight (an affine "
                            f"encoder); {type(d).__name__} has none")
    _, a_idx, a_on = active_codes(resid_dict, x)
    _, f_idx, f_on = active_codes(mlp_dict, parts.hidden(x))
    J = code_jacobian(parts, x, resid_dict.W_dec, a_idx, mlp_dict.W_enc, f_idx, a_on=a_on,
                      f_on=f_on, ln=ln)
    return J, a_on, f_on


@dataclass
class JacobianStats:
    """Running per-token statistics of ``|J|``; :meth:`add` batches, :meth:`result` the means."""

    thresholds: tuple[float, ...] = THRESHOLDS
    top_frac: float = TOP_FRAC
    n_tokens: int = 0
    _sums: dict[str, float] = field(default_factory=dict)

    @torch.no_grad()
    def add(self, J: Tensor, a_on: Tensor | None = None, f_on: Tensor | None = None) -> None:
        """Add tokens ``J [T, k_out, k_in]`` (entries outside ``f_on × a_on`` do not count)."""
        T = J.shape[0]
        if T == 0:
            return
        A = J.detach().abs().flatten(1).double()  # [T, k_out·k_in]
        if a_on is None and f_on is None:
            on = torch.ones_like(A, dtype=torch.bool)
        else:
            fo = f_on if f_on is not None else torch.ones(J.shape[:2], dtype=torch.bool, device=J.device)
            ao = a_on if a_on is not None else torch.ones(T, J.shape[2], dtype=torch.bool, device=J.device)
            on = (fo[:, :, None] & ao[:, None, :]).flatten(1)
        A = A * on
        n_on = on.sum(-1)  # active pairs per token
        acc = self._sums
        acc["pairs"] = acc.get("pairs", 0.0) + float(n_on.sum())
        acc["l1"] = acc.get("l1", 0.0) + float(A.sum())
        for th in self.thresholds:
            acc[f"above_{th:g}"] = acc.get(f"above_{th:g}", 0.0) + float((A > th).sum())
        # top share: the ceil(top_frac · n_on) largest entries of each token over its total
        srt = A.sort(-1, descending=True).values
        n_top = torch.ceil(self.top_frac * n_on.double()).long().clamp_min(1)
        keep = torch.arange(A.shape[1], device=A.device)[None, :] < n_top[:, None]
        top = (srt * keep).sum(-1)
        tot = A.sum(-1)
        share = torch.where(tot > 0, top / tot.clamp_min(1e-300), torch.ones_like(tot))
        acc["top_share"] = acc.get("top_share", 0.0) + float(share.sum())
        self.n_tokens += T

    def result(self) -> dict:
        """Means per token: ``above`` {threshold: count}, ``top10_share``, ``l1``, ``pairs``."""
        n = max(self.n_tokens, 1)
        s = self._sums
        return {
            "n_tokens": self.n_tokens,
            "pairs_per_token": s.get("pairs", 0.0) / n,
            "above": {f"{th:g}": s.get(f"above_{th:g}", 0.0) / n for th in self.thresholds},
            f"top{round(self.top_frac * 100)}_share": s.get("top_share", 0.0) / n,
            "l1_per_token": s.get("l1", 0.0) / n,
        }


@torch.no_grad()
def jacobian_stats(parts: MLPParts, resid_dict, mlp_dict, x: Tensor, *, scale: float = 1.0,
                   ln: str = "exact", chunk: int = 512) -> dict:
    """Statistics of ``scale · J`` over residual rows ``x [n, d]`` (see :class:`JacobianStats`).

    ``scale = rms(x)/rms(z)`` reports in the normalised units the pair was trained in.
    """
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise UserError(f"Jacobian scale {scale!r} is invalid: expected a finite number > 0")
    st = JacobianStats()
    for s in range(0, len(x), chunk):
        J, a_on, f_on = pair_jacobian(parts, resid_dict, mlp_dict, x[s:s + chunk], ln=ln)
        st.add(J * scale, a_on, f_on)
    out = st.result()
    out.update(scale=float(scale), ln=ln)
    return out


def rms(x: Tensor) -> float:
    """``sqrt(mean ‖x‖²)`` over rows: the scale training divides a site by."""
    return float(x.double().pow(2).sum(-1).mean().sqrt())


def format_jacobian(st: dict) -> str:
    """One-line summary of a :func:`jacobian_stats` result."""
    above = " ".join(f">{k}: {v:.1f}" for k, v in st["above"].items())
    share = next(v for k, v in st.items() if k.startswith("top") and k.endswith("_share"))
    return (f"Jacobian |J| entries per token (of {st['pairs_per_token']:.0f} active pairs, "
            f"normalised units): {above}; top-10% mass share {share:.3f}; "
            f"‖J‖₁ {st['l1_per_token']:.2f} ({st['n_tokens']:,} tokens)")
