"""Splicing: run the model with a site's activation replaced (by a reconstruction, zero, mean…).

The BOS position is never touched: dictionaries are trained without it, and its activations
are outliers that every evaluation in the literature leaves clean.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Replace = Callable[[Tensor], Tensor]


def replace_hook(fn: Replace, skip_bos: bool = True):
    """A forward hook that replaces the activation ``a [batch, pos, d]`` by ``fn(a)``."""
    def hook(act: Tensor, hook=None) -> Tensor:
        if not skip_bos:
            return fn(act)
        out = act.clone()
        out[:, 1:] = fn(act[:, 1:])
        return out
    return hook


def reconstruct_with(d) -> Replace:
    """Replace by the dictionary's reconstruction ``decode(encode(a))``."""
    return lambda a: d.decode(d.encode(a))


def zero_ablate() -> Replace:
    """Replace by zeros."""
    return torch.zeros_like


def mean_ablate(mean: Tensor) -> Replace:
    """Replace by a fixed mean vector."""
    return lambda a: mean.to(a.dtype).expand_as(a)


def run_spliced(model, tokens: Tensor, replacements: dict[str, Replace]) -> Tensor:
    """Logits of ``model`` on ``tokens`` with each hook's activation replaced."""
    hooks = [(h, replace_hook(fn)) for h, fn in replacements.items()]
    return model.run_with_hooks(tokens, fwd_hooks=hooks)
