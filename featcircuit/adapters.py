"""Any module with ``encode``/``decode`` as a dictionary the attribution code can use.

Attribution needs decoder rows ``r_i`` and, for active MLP features, the encoder's gradient
``∂f_j/∂z``. Our :class:`~featcircuit.dictionary.Dictionary` has them as weights; for any other
module (a SAELens SAE, a dictionary_learning AutoEncoder, your own) the decoder is read off by
decoding the basis vectors (it must be affine, as every sparse dictionary's is), and encoder
gradients come from ``torch.func.vjp`` on ``encode``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .dictionary import Dictionary, Pair


class ModuleDictionary(torch.nn.Module):
    """Wraps ``module`` (with ``encode(x) -> codes`` and ``decode(codes) -> x``) for attribution."""

    W_dec: Tensor  # buffers (register_buffer below), declared for the type checker
    b_dec: Tensor

    def __init__(self, module, d_in: int):
        super().__init__()
        self.module = module
        p = next(iter(module.parameters()), None)
        dev = p.device if p is not None else torch.device("cpu")
        dt = p.dtype if p is not None and p.is_floating_point() else torch.float32
        with torch.no_grad():
            try:
                d_sae = module.encode(torch.zeros(1, d_in, device=dev, dtype=dt)).shape[-1]
            except torch.cuda.OutOfMemoryError:
                raise
            except RuntimeError as e:  # a module for another width fails in its first matmul
                from .errors import UserError

                raise UserError(f"the dictionary {type(module).__name__} cannot encode vectors of width "
                                f"{d_in}, the width of its site: {str(e).splitlines()[0]}") from e
            b = module.decode(torch.zeros(1, d_sae, device=dev, dtype=dt))[0]
            W = module.decode(torch.eye(d_sae, device=dev, dtype=dt)) - b
        self.register_buffer("W_dec", W)  # [d_sae, d_in]
        self.register_buffer("b_dec", b)

    def encode(self, x: Tensor) -> Tensor:
        """The wrapped module's codes."""
        return self.module.encode(x)

    def decode(self, codes: Tensor) -> Tensor:
        """The wrapped module's reconstruction."""
        return self.module.decode(codes)

    def enc_cols(self, z: Tensor, idx: Tensor) -> Tensor:
        """``∂f_j/∂z`` for the features ``idx [T, k]`` of each row: ``[T, k, d_in]``."""
        with torch.enable_grad():
            vjp = torch.func.vjp(self.module.encode, z.detach())[1]
            cols = []
            for s in range(idx.shape[1]):
                cot = torch.zeros(z.shape[0], self.W_dec.shape[0], device=z.device, dtype=z.dtype)
                cot.scatter_(1, idx[:, s:s + 1], 1.0)
                cols.append(vjp(cot)[0])
        return torch.stack(cols, 1)


def reads_pre_acts(M) -> bool:
    """Whether dictionary ``M`` has its own affine pre-activation (a featcircuit Dictionary)."""
    return hasattr(M, "pre_acts") and hasattr(M, "W_enc")


def held_code(M, z: Tensor, k: Tensor, z0: Tensor | None, f0: Tensor, enc_t: Tensor | None = None) -> Tensor:
    """Feature ``k[r]``'s code at input ``z[r]`` with its clean mask held (``[n]``).

    The clean TopK/ReLU mask is kept and the code re-read through the feature's pre-activation.
    A featcircuit Dictionary reads its own affine pre-activation (``z0`` unused, may be None);
    any other module is linearised at its clean input ``z0[r]`` (clean code ``f0[r]``):
    ``f0 + ∂f_k/∂z·(z − z0)``, which is the same number whenever the module's active codes are
    affine in z, as a sparse dictionary's are. ``enc_t``: ``W_enc.T`` made contiguous once by a
    caller that calls often (its rows gather 3× faster than the transposed view's).
    """
    if reads_pre_acts(M):
        w = M.W_enc.T[k] if enc_t is None else enc_t.index_select(0, k)
        return torch.relu(((z - M.b_dec) * w).sum(-1) + M.b_enc[k])
    if z0 is None:
        raise ValueError("held_code: a module without its own pre-activation needs its clean input z0")
    cols = M.enc_cols(z0, k[:, None])[:, 0]  # ∂f_k/∂z at the clean input, one vjp
    return torch.relu(f0 + ((z - z0) * cols).sum(-1))


def as_dictionary(d, d_in: int):
    """``d`` itself if it is a featcircuit Dictionary, else a :class:`ModuleDictionary` around it."""
    if isinstance(d, (Dictionary, ModuleDictionary)):
        return d
    if not (hasattr(d, "encode") and hasattr(d, "decode")):
        from .errors import UserError

        raise UserError(f"a dictionary must have encode() and decode(); got {type(d).__name__}")
    return ModuleDictionary(d, d_in)


def as_pair(pair, d_resid: int, d_mlp: int) -> Pair:
    """A :class:`Pair` of attribution-ready dictionaries from any (resid, mlp) pair of modules."""
    resid, mlp = pair
    if isinstance(pair, Pair) and isinstance(resid, (Dictionary, ModuleDictionary)) \
            and isinstance(mlp, (Dictionary, ModuleDictionary)):
        return pair  # already ready: keep the object (and anything cached on it)
    return Pair(as_dictionary(resid, d_resid), as_dictionary(mlp, d_mlp))
