"""The TopK encoder's weight gradient at the cost of the picked codes only.

A TopK dictionary's loss reads k pre-activations per row (and the AuxK picks of dead latents),
so the gradient of the pre-activations ``G [B, d_sae]`` has at most ``k + k_aux`` nonzeros per
row. Autograd still forms it densely and pays the full ``x^T @ G`` product for ``W_enc``'s
gradient, ``2·B·d_in·d_sae`` FLOPs, as much as the encoder's forward. :func:`selected_pre` gives
the picked pre-activations their gradients from the picks alone:

- ``∂W_enc = (x − b_dec)^T @ G`` as a sparse product, ``2·B·(k + k_aux)·d_in`` FLOPs;
- ``∂b_enc = Σ_rows G``;  ``∂b_dec = −W_enc @ ∂b_enc``;  ``∂x = G @ W_enc^T`` (sparse) when needed.

The values are the dense pre-activations the caller already computed without a graph; only the
backward differs (the same gradient up to float rounding). :func:`use_sparse_grad` turns it on
for wide dictionaries on a CPU, where it is measured to pay (``benchmarks/bench_sparse_grad.py``
times both in one run); below :data:`MIN_WIDTH`, and on CUDA, where no GPU has timed it against
autocast's bf16 matmul, the dense path is kept — bit for bit the trainer the built-in model's
cached default pairs (1,024 features) came from.
"""

from __future__ import annotations

import torch
from torch import Tensor

MIN_WIDTH = 4096
"""Narrowest dictionary trained with the sparse encoder gradient when :data:`SPARSE_GRAD` is None."""

SPARSE_GRAD: bool | None = None
"""Force the sparse encoder gradient on (True) or off (False); None: on a CPU from :data:`MIN_WIDTH`."""


def use_sparse_grad(d, device: torch.device | str = "cpu") -> bool:
    """Whether a TopK dictionary ``d`` trains with :func:`selected_pre` on ``device``."""
    if d.cfg.architecture != "topk":
        return False
    if SPARSE_GRAD is not None:
        return SPARSE_GRAD
    return d.cfg.d_sae >= MIN_WIDTH and torch.device(device).type == "cpu"


class _Selected(torch.autograd.Function):
    """``pre[b, idx[b, s]]`` given its values; backward through the picks only."""

    @staticmethod
    def forward(ctx, values, x, W_enc, b_enc, b_dec, idx):
        ctx.save_for_backward(x, W_enc, b_dec, idx)
        return values.clone()

    @staticmethod
    def backward(ctx, g):
        x, W_enc, b_dec, idx = ctx.saved_tensors
        B, s = idx.shape
        d_sae = W_enc.shape[1]
        g = g.to(W_enc.dtype)
        flat_i, flat_g = idx.reshape(-1), g.reshape(-1)
        rows = torch.arange(B, device=idx.device).repeat_interleave(s)
        gx = gw = gb = gbd = None
        if ctx.needs_input_grad[2]:  # ∂W_enc[:, j] = Σ_b (x_b − b_dec)·G[b, j]: G^T as a sparse [d_sae, B]
            Gt = torch.sparse_coo_tensor(torch.stack([flat_i, rows]), flat_g, (d_sae, B),
                                         check_invariants=False)
            gw = torch.sparse.mm(Gt, (x - b_dec).to(W_enc.dtype)).T
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            col = torch.zeros(d_sae, dtype=W_enc.dtype, device=W_enc.device).index_add_(0, flat_i, flat_g)
            gb = col if ctx.needs_input_grad[3] else None
            gbd = -(W_enc @ col) if ctx.needs_input_grad[4] else None
        if ctx.needs_input_grad[1]:
            G = torch.sparse_coo_tensor(torch.stack([rows, flat_i]), flat_g, (B, d_sae),
                                        check_invariants=False)
            gx = torch.sparse.mm(G, W_enc.T.contiguous()).to(x.dtype)
        return None, gx, gw, gb, gbd, None


def selected_pre(d, x: Tensor, idx: Tensor, pre: Tensor) -> Tensor:
    """``pre.gather(-1, idx)`` of a 2-D batch, differentiable in ``d``'s encoder and ``x`` sparsely.

    ``pre`` must be ``d.pre_acts(x)``, computed without a graph.
    """
    if x.ndim != 2 or idx.ndim != 2:
        raise ValueError(f"selected_pre takes a [B, d_in] batch and [B, s] picks, got {tuple(x.shape)} "
                         f"and {tuple(idx.shape)}")
    return _Selected.apply(pre.detach().gather(-1, idx), x, d.W_enc, d.b_enc, d.b_dec, idx)
