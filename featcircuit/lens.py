"""The logit lens of a dictionary feature (DESIGN §8).

1. A feature's direction in the residual stream: ``W_dec[i]`` for resid features,
   ``W_dec[j] @ W_out`` for MLP features (:func:`feature_directions`).
2. Through the final norm's gain (centred first for LayerNorm) and ``W_U`` (:func:`unembed`).
3. Tokens the lens never shows (rule :data:`LENS_RULE`, :func:`lens_mask`): special tokens and
   vocabulary rows past the tokenizer, tokens that never occur in the analysed data, and
   unembedding-norm outliers (``‖W_U[:, t]‖ > median + 6·1.4826·MAD`` over the remaining tokens).
4. The top tokens of many features at once, in chunks (:func:`lens_top_ids`).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .errors import UserError
from .sites import SITES

LENS_MAD = 6.0
LENS_RULE = ("hidden from the logit lens: special tokens, vocabulary rows past the tokenizer, tokens "
             "never seen in the analysed data, and unembedding-norm outliers "
             f"(norm > median + {LENS_MAD:g}·1.4826·MAD)")


def feature_directions(rep, site: str, features: Sequence[int] | None = None) -> Tensor:
    """Residual directions ``[n, d_model]`` of a one-layer replacement's features: ``W_dec``
    (resid) or ``W_dec @ W_out`` (mlp)."""
    from .replacement import one_layer

    if site not in SITES:
        raise UserError(f"unknown site {site!r}: use resid or mlp")
    rep = one_layer(rep, "feature_directions")
    d = rep.pair.resid if site == "resid" else rep.pair.mlp
    W = d.W_dec.detach() if features is None else d.W_dec.detach()[torch.as_tensor(list(features),
                                                                                     dtype=torch.long)]
    W = W.float()
    if site == "mlp":
        W_out = rep.mlp_parts.W_out.float()
        W = W.to(W_out.device) @ W_out
    return W


def _final_norm(model):
    ln = getattr(model, "ln_final", None)
    return getattr(ln, "original_component", ln)


@torch.no_grad()
def unembed(model, directions: Tensor) -> Tensor:
    """Logit-lens values ``[n, d_vocab]``: directions through the final norm's gain and ``W_U``.

    LayerNorm centres its input, so the direction is centred first (RMSNorm does not); the
    norm's scale is left out (it only rescales every value of a token position alike).
    """
    W_U = model.W_U.detach().float()
    d = directions.float().to(W_U.device)
    ln = _final_norm(model)
    if ln is not None:
        norm_type = str(model.cfg.normalization_type).upper()
        rms = "rms" in type(ln).__name__.lower() or norm_type.startswith("RMS")
        if not rms:
            d = d - d.mean(-1, keepdim=True)
        w = getattr(ln, "weight", None)
        if w is not None:
            d = d * w.detach().float().to(d.device)
    return d @ W_U


@torch.no_grad()
def lens_mask(model, counts: Tensor | None = None, mad_k: float = LENS_MAD) -> Tensor:
    """Tokens ``[d_vocab]`` the logit lens may show (rule :data:`LENS_RULE`)."""
    W_U = model.W_U.detach().float()
    d_vocab = W_U.shape[1]
    ok = torch.ones(d_vocab, dtype=torch.bool)
    tok = getattr(model, "tokenizer", None)
    if tok is not None:
        ok[len(tok):] = False
        for t in getattr(tok, "all_special_ids", []) or []:
            if 0 <= t < d_vocab:
                ok[t] = False
    if counts is not None:
        ok &= counts[:d_vocab].cpu() > 0
    norms = W_U.norm(dim=0).cpu()
    if ok.sum() > 2:
        med = norms[ok].median()
        mad = (norms[ok] - med).abs().median()
        ok &= norms <= med + mad_k * 1.4826 * mad + 1e-6
    if not ok.any():  # nothing left (tiny data): fall back to every real token
        ok = torch.ones(d_vocab, dtype=torch.bool)
    return ok


@torch.no_grad()
def lens_top_ids(model, directions: Tensor, mask: Tensor, n: int, chunk: int = 512) -> Tensor:
    """Token ids ``[len(directions), n]`` with the largest logit-lens values among ``mask``."""
    out = []
    for s in range(0, len(directions), chunk):
        v = unembed(model, directions[s:s + chunk]).cpu()
        v[:, ~mask] = -torch.inf
        out.append(v.topk(min(n, int(mask.sum())), dim=1).indices)
    return torch.cat(out) if out else torch.zeros(0, n, dtype=torch.long)
