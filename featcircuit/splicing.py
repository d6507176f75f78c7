"""Splicing: run the model with a site's activation replaced (by a reconstruction, zero, mean…).

The BOS position is never touched: dictionaries are trained without it, and its activations
are outliers that every evaluation in the literature leaves clean.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import Tensor

Replace = Callable[[Tensor], Tensor]
_MID = re.compile(r"blocks\.(\d+)\.hook_resid_mid")


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


def site_hooks(hook_name: str, fn: Callable[[Tensor], Tensor]) -> list[tuple[str, Callable]]:
    """Forward hooks that replace the activation at ``hook_name`` by ``fn(act)`` for everything
    downstream.

    A TransformerBridge's ``blocks.L.hook_resid_mid`` (sequential blocks) is an alias of the
    MLP's LayerNorm input: editing it changes what the MLP reads but not the residual stream
    the next block receives. The mid residual is ``resid_pre + attn_out``, so it is replaced by
    editing the attention output instead.
    """
    m = _MID.fullmatch(hook_name)
    if m is None:
        return [(hook_name, lambda act, hook=None: fn(act))]
    L = m.group(1)
    seen: dict = {}

    def grab(act: Tensor, hook=None) -> Tensor:
        seen["pre"] = act
        return act

    def edit(act: Tensor, hook=None) -> Tensor:
        return fn(seen["pre"] + act) - seen["pre"]

    return [(f"blocks.{L}.hook_resid_pre", grab), (f"blocks.{L}.hook_attn_out", edit)]


def run_spliced(model, tokens: Tensor, replacements: dict[str, Replace]) -> Tensor:
    """Logits of ``model`` on ``tokens`` with each hook's activation replaced (BOS kept)."""
    hooks = [h for name, fn in replacements.items() for h in site_hooks(name, replace_hook(fn))]
    return model.run_with_hooks(tokens, fwd_hooks=hooks)
