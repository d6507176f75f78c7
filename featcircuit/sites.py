"""Sites: which hook a (layer, site) pair is, and the MLP weights that read it (DESIGN §3).

``resid`` of layer L is the residual vector the MLP of block L actually reads:
``blocks.L.hook_resid_pre`` when attention and MLP run in parallel (GPT-NeoX/Pythia, GPT-J),
``blocks.L.hook_resid_mid`` when they run in sequence (GPT-2, Llama). ``mlp`` of layer L is
``blocks.L.mlp.hook_post``, the MLP's hidden activation after the nonlinearity. Which case a
model is in is read from its config, never from its name.

Two more named sites hold a block's outputs, for dictionaries trained and evaluated there (as the
seed work did on GPT-2 and Pythia): ``attn_out`` (``blocks.L.hook_attn_out``, what attention adds
to the residual) and ``mlp_out`` (``blocks.L.hook_mlp_out``, what the MLP adds), both d_model wide.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from .errors import UserError

SITES = ("resid", "mlp")
OUT_SITES = ("attn_out", "mlp_out")
NAMED_SITES = SITES + OUT_SITES
_LAYERS_HELP = "use all, a range such as 0-3, or a list such as 1,3"
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")


@dataclass(frozen=True)
class Site:
    """A place in the model: its short name, layer, TransformerLens hook name and width."""

    name: str
    layer: int
    hook: str
    width: int


def n_layers(model) -> int:
    """Number of transformer blocks."""
    return int(model.cfg.n_layers)


def is_parallel(model) -> bool:
    """True when attention and MLP read the same residual (GPT-NeoX/Pythia style blocks)."""
    cfg = model.cfg
    if getattr(cfg, "parallel_attn_mlp", False) or getattr(cfg, "use_parallel_residual", False):
        return True
    hf = getattr(getattr(model, "original_model", None), "config", None)
    return bool(getattr(hf, "use_parallel_residual", False) or getattr(hf, "parallel_attn", False))


def check_layer(model, layer: int) -> int:
    """``layer`` if it names a block of ``model``; a UserError naming the valid range if not."""
    n = n_layers(model)
    if not isinstance(layer, int) or not 0 <= layer < n:
        raise UserError(f"layer {layer} is out of range: this model has layers 0..{n - 1}")
    return layer


def parse_layers(model, spec: str | int, flag: str = "--layers") -> list[int]:
    """The sorted layers a spec names: ``all``, a range ``0-3``, a list ``1,3`` (or ``0-1,3``).

    ``model`` is a loaded model or its layer count. A bad spec or a layer outside the model is a
    one-line UserError naming ``flag``, the bad value and the valid range.
    """
    n = model if isinstance(model, int) else n_layers(model)
    if isinstance(spec, bool):
        raise UserError(f"{flag} {spec!r} is not a layer spec: {_LAYERS_HELP} (layers 0..{n - 1})")
    if isinstance(spec, int):
        spec = str(spec)
    text = str(spec).strip()
    if text.lower() == "all":
        return list(range(n))
    out: set[int] = set()
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\d{1,6})\s*(?:-\s*(\d{1,6})\s*)?", item)
        if not m:
            raise UserError(f"{flag} {text!r} is not a layer spec: {_LAYERS_HELP} (layers 0..{n - 1})")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise UserError(f"{flag} {text!r}: the range {lo}-{hi} runs backwards; write {hi}-{lo}")
        if hi >= n:
            raise UserError(f"{flag} {text!r}: layer {hi} is out of range: this model has layers "
                            f"0..{n - 1}")
        out.update(range(lo, hi + 1))
    return sorted(out)


def hook_layer(hook: str) -> int | None:
    """The block index a hook name lives in (``blocks.3.…`` → 3), None for embed/unembed hooks."""
    m = _BLOCK_RE.match(hook)
    return int(m.group(1)) if m else None


def resolve_site(model, layer: int, site: str) -> Site:
    """The :class:`Site` for a named site (``resid``, ``mlp``, ``attn_out``, ``mlp_out``) of ``layer``,
    or for a raw hook name."""
    d_model, d_mlp = int(model.cfg.d_model), int(model.cfg.d_mlp)
    if site == "resid":
        check_layer(model, layer)
        hook = f"blocks.{layer}.hook_resid_pre" if is_parallel(model) else f"blocks.{layer}.hook_resid_mid"
        return Site("resid", layer, hook, d_model)
    if site == "mlp":
        check_layer(model, layer)
        return Site("mlp", layer, f"blocks.{layer}.mlp.hook_post", d_mlp)
    if site in OUT_SITES:
        check_layer(model, layer)
        hook = f"blocks.{layer}.hook_{site}"
        if hook not in model.hook_dict:
            raise UserError(f"site {site!r}: this model has no hook {hook!r}")
        return Site(site, layer, hook, d_model)
    hooks = set(model.hook_dict.keys())
    if site not in hooks:
        raise UserError(f"unknown site {site!r}: use {', '.join(map(repr, NAMED_SITES))} or a hook name "
                        "such as "
                        f"'blocks.0.hook_resid_post' ({len(hooks)} hooks: `featcircuit model info`)")
    hl = hook_layer(site)
    width = d_mlp if site.endswith(("mlp.hook_post", "mlp.hook_pre")) else d_model
    return Site(site, hl if hl is not None else -1, site, width)


def pair_sites(model, layer: int) -> tuple[Site, Site]:
    """The (resid, mlp) sites of ``layer``: the residual the MLP reads and its hidden activation."""
    return resolve_site(model, layer, "resid"), resolve_site(model, layer, "mlp")


_ACTS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": lambda h: torch.nn.functional.gelu(h),
    "gelu_new": lambda h: torch.nn.functional.gelu(h, approximate="tanh"),
    "gelu_pytorch_tanh": lambda h: torch.nn.functional.gelu(h, approximate="tanh"),
    "gelu_fast": lambda h: torch.nn.functional.gelu(h, approximate="tanh"),
    "relu": torch.relu,
    "silu": torch.nn.functional.silu,
}


class MLPParts(NamedTuple):
    """The pieces of block L's MLP: ``out = act(ln(x) @ W_in + b_in) @ W_out + b_out``."""

    ln_weight: Tensor | None  # [d_model]
    ln_bias: Tensor | None  # [d_model]
    ln_eps: float
    rms: bool  # RMSNorm (no centring, no bias) instead of LayerNorm
    W_in: Tensor  # [d_model, d_mlp]
    b_in: Tensor  # [d_mlp]
    act_name: str
    W_out: Tensor  # [d_mlp, d_model]
    b_out: Tensor  # [d_model]

    def ln(self, x: Tensor) -> Tensor:
        """The MLP's input normalisation applied to residual vectors ``x [..., d_model]``."""
        if not self.rms:
            x = x - x.mean(-1, keepdim=True)
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.ln_eps)
        if self.ln_weight is not None:
            y = y * self.ln_weight
        if self.ln_bias is not None:
            y = y + self.ln_bias
        return y

    def act(self, h: Tensor) -> Tensor:
        """The MLP nonlinearity."""
        return _ACTS[self.act_name](h)

    def hidden(self, x: Tensor) -> Tensor:
        """Mid-MLP activation ``z = act(ln(x) W_in + b_in)`` from the residual ``x``."""
        return self.act(self.ln(x) @ self.W_in + self.b_in)

    def out(self, z: Tensor) -> Tensor:
        """MLP output from the mid-MLP activation ``z``."""
        return z @ self.W_out + self.b_out


def mlp_parts(model, layer: int) -> MLPParts:
    """The weights of block ``layer``'s MLP and its input norm, detached, as the model uses them."""
    check_layer(model, layer)
    act = str(model.cfg.act_fn)
    if act not in _ACTS:
        raise UserError(f"MLP activation {act!r} is not supported for attribution; supported: "
                        f"{', '.join(sorted(_ACTS))}")
    if getattr(model, "W_gate", None) is not None:
        raise UserError("gated MLPs (W_gate) are not supported for attribution yet")
    ln = model.blocks[layer].ln2
    ln = getattr(ln, "original_component", ln)
    rms = "rms" in type(ln).__name__.lower() or model.cfg.normalization_type == "RMS"
    eps = getattr(ln, "eps", None) or getattr(ln, "variance_epsilon", None) or 1e-5
    weight = getattr(ln, "weight", None)
    bias = getattr(ln, "bias", None)
    det = lambda t: None if t is None else t.detach()  # noqa: E731
    return MLPParts(det(weight), det(bias), float(eps), rms, model.W_in[layer].detach(),
                    model.b_in[layer].detach(), act, model.W_out[layer].detach(),
                    model.b_out[layer].detach())


def site_table(model) -> list[dict]:
    """One row per layer: resid and mlp hooks with widths (for ``featcircuit model info``)."""
    rows = []
    for layer in range(n_layers(model)):
        r, m = pair_sites(model, layer)
        rows.append({"layer": layer, "resid": r.hook, "d_resid": r.width, "mlp": m.hook,
                     "d_mlp": m.width})
    return rows


