"""The spine: a model and its dictionaries at every site of a run of layers (DESIGN §2, §12).

:class:`Replacement` holds the model, the resid/mlp dictionary pair of each chosen layer and the
order of the sites (``resid L0, mlp L0, resid L0+1, …, mlp Lmax``). :meth:`Replacement.trace`
runs **one** forward over the tokens and keeps, per site, the activation, its codes and its
error, and, per block, the attention pattern and the LayerNorm scale the block's attention read
— the quantities the cross-layer edges freeze (circuit-tracer's convention).

Between adjacent sites the residual stream moves linearly once attention patterns and LN scales
are frozen at the clean run (biases drop out of every difference):

- parallel blocks (GPT-NeoX): ``Δx_{L+1} = Δx_L + A_L(Δx_L) + Δz_L·W_out``;
- sequential blocks (GPT-2): ``Δy = Δx_L + Δz_L·W_out``, ``Δx_{L+1} = Δy + A_{L+1}(Δy)``

with ``A_L(Δx)(t) = Σ_h Σ_s P_h(t,s)·LN1ᶠ(Δx(s))·W_V^h·W_O^h`` and ``LN1ᶠ(v) = (v − mean v)/σ(s)·γ``.
For the last chosen layer only the part before the next block's attention enters (``x_{Lmax+1}``
is what block Lmax+1, or the final LayerNorm, reads). BOS is never decomposed: its codes are 0
and its activation (less the decoder bias) is the error node, as dictionaries are trained
without it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .adapters import as_pair
from .errors import UserError
from .sites import MLPParts, Site, check_layer, is_parallel, mlp_parts, pair_sites

SiteKey = tuple[str, int]  # ("resid" | "mlp", layer)


@dataclass
class Trace:
    """One clean forward: per site activations, codes, errors; per block frozen attention."""

    tokens: Tensor  # [n, ctx]
    acts: dict[SiteKey, Tensor]  # [n, ctx, d_site]
    codes: dict[SiteKey, Tensor]  # [n, ctx, m_site] (BOS row 0)
    errors: dict[SiteKey, Tensor]  # [n, ctx, d_site]: act − decode(codes) (BOS: act − b_dec)
    pattern: dict[int, Tensor]  # layer -> [n, H, ctx, ctx]
    ln_scale: dict[int, Tensor]  # layer -> [n, ctx, 1] (the scale LN1 divided by)
    logits: Tensor  # [n, ctx, vocab]
    embed: Tensor  # [n, ctx, d] what resid_pre(0) receives (token (+ position) embedding)
    extra: dict = field(default_factory=dict)


class Replacement:
    """The model and its dictionary pair at each of a contiguous run of layers.

    ``Replacement(model, {2: pair})`` is the one-layer case every resid→mlp computation takes
    (attribution, ablation, statistics, labels, evaluation, the report); a multi-layer one gives
    its layers' views with :meth:`at`. Dictionaries may be any modules with ``encode``/``decode``.
    """

    def __init__(self, model, pairs: Mapping[int, object], layers: Sequence[int] | None = None):
        layers = sorted(pairs) if layers is None else sorted(int(x) for x in layers)
        if not layers:
            raise UserError("no layers chosen: give --layers such as 0-3 or 2")
        for L in layers:
            check_layer(model, L)
        if layers != list(range(layers[0], layers[-1] + 1)):
            raise UserError(f"layers {layers} are not contiguous: cross-layer edges join adjacent "
                            f"layers, e.g. --layers {layers[0]}-{layers[-1]}")
        missing = [L for L in layers if L not in pairs]
        if missing:
            raise UserError(f"no dictionary pair for layer(s) {missing}")
        self.model = model
        self.layers = layers
        self.parallel = is_parallel(model)
        self.pairs = {}
        self.hooks: dict[SiteKey, str] = {}
        self.site_of: dict[SiteKey, Site] = {}
        for L in layers:
            r, m = pair_sites(model, L)
            self.pairs[L] = as_pair(pairs[L], r.width, m.width)
            for kind, s, d in (("resid", r, self.pairs[L].resid), ("mlp", m, self.pairs[L].mlp)):
                d_in = getattr(getattr(d, "cfg", None), "d_in", None) or d.W_dec.shape[-1]
                if d_in != s.width:
                    raise UserError(f"the {kind} dictionary of layer {L} takes width {d_in} but {s.hook} "
                                    f"has width {s.width}")
                self.hooks[(kind, L)], self.site_of[(kind, L)] = s.hook, s
        self._parts: dict[int, MLPParts] | None = None  # read when first needed (see parts)
        self.sites: list[SiteKey] = [s for L in layers for s in (("resid", L), ("mlp", L))]
        self.n_forward = 0  # forward passes over tokens (for the one-pass accounting)

    # ---- the one-layer view (resid(L) → mlp(L): attribution, ablation, stats, labels, report) --

    @property
    def parts(self) -> dict[int, MLPParts]:
        """Each layer's MLP weights and input norm, read on first use: statistics, cards and labels
        never need them, so a model whose MLP attribution does not support (a gated MLP, another
        nonlinearity) still has them."""
        if self._parts is None:
            self._parts = {L: mlp_parts(self.model, L) for L in self.layers}
        return self._parts

    def check_mlps(self) -> None:
        """Read every chosen layer's MLP weights now: a UserError before any pass for an MLP that
        attribution does not support (the one-layer statistics and labels never need them)."""
        self.parts  # noqa: B018 -- reading them is the check

    @property
    def layer(self) -> int:
        """The one chosen layer; a UserError when this replacement holds several (use :meth:`at`)."""
        if len(self.layers) != 1:
            raise UserError(f"this is a one-layer computation but the Replacement holds layers "
                            f"{self.layers[0]}-{self.layers[-1]}: pass rep.at(L) for one of them")
        return self.layers[0]

    @property
    def pair(self):
        """The one layer's (resid, mlp) dictionary pair, attribution-ready (any encode/decode module)."""
        return self.pairs[self.layer]

    @property
    def resid_site(self) -> Site:
        """The residual site the one layer's MLP reads."""
        return self.site_of[("resid", self.layer)]

    @property
    def mlp_site(self) -> Site:
        """The one layer's mid-MLP site."""
        return self.site_of[("mlp", self.layer)]

    @property
    def mlp_parts(self) -> MLPParts:
        """The one layer's MLP weights and input norm."""
        return self.parts[self.layer]

    def site(self, kind: str) -> Site:
        """The one layer's ``resid`` or ``mlp`` site; a UserError naming the two for anything else."""
        if kind not in ("resid", "mlp"):
            raise UserError(f"unknown site {kind!r}: use resid or mlp")
        return self.site_of[(kind, self.layer)]

    def at(self, layer: int) -> Replacement:
        """The one-layer replacement of ``layer`` (shares the model and the dictionaries)."""
        if layer not in self.pairs:
            raise UserError(f"layer {layer} is not in this Replacement (layers {self.layers})")
        return Replacement(self.model, {layer: self.pairs[layer]})

    # ---- dictionaries ----------------------------------------------------------------------

    def dictionary(self, site: SiteKey):
        """The dictionary at a site."""
        kind, L = site
        p = self.pairs[L]
        return p.resid if kind == "resid" else p.mlp

    def width(self, site: SiteKey) -> int:
        """Number of features of the site's dictionary."""
        return int(self.dictionary(site).W_dec.shape[0])

    def decoder(self, site: SiteKey) -> Tensor:
        """Decoder rows ``[m, d_site]``."""
        return self.dictionary(site).W_dec

    def parents(self, site: SiteKey) -> list[SiteKey]:
        """The sites with edges into ``site`` inside the chosen layers."""
        kind, L = site
        if kind == "mlp":
            return [("resid", L)]
        if L == self.layers[0]:
            return []
        return [("resid", L - 1), ("mlp", L - 1)]

    # ---- the one forward -------------------------------------------------------------------

    def attn_layers(self) -> list[int]:
        """Blocks whose attention lies between sites (or between the last site and the output)."""
        if self.parallel:
            return list(self.layers)
        out = [L + 1 for L in self.layers[:-1]]
        return ([0] if self.layers[0] == 0 else []) + out

    @torch.no_grad()
    def trace(self, tokens: Tensor, batch_size: int = 64) -> Trace:
        """Activations, codes, errors, attention patterns and LN scales from one forward pass."""
        model = self.model
        dev = next(model.parameters()).device
        tokens = tokens.to(dev)
        names = dict(self.hooks)
        for L in self.attn_layers():
            names[("pattern", L)] = f"blocks.{L}.attn.hook_pattern"
            names[("scale", L)] = f"blocks.{L}.ln1.hook_scale"
        names[("embed", -1)] = "blocks.0.hook_resid_pre"
        parts: dict = {k: [] for k in names}
        logits = []
        for s in range(0, len(tokens), batch_size):
            cache: dict = {}
            hooks = [(h, _grab(cache, k)) for k, h in names.items()]
            logits.append(model.run_with_hooks(tokens[s:s + batch_size], fwd_hooks=hooks))
            for k in names:
                parts[k].append(cache[k])
        self.n_forward += 1
        cat = {k: torch.cat(v) for k, v in parts.items()}
        acts, codes, errors = {}, {}, {}
        for site in self.sites:
            a = cat[site]
            d = self.dictionary(site)
            c = torch.zeros(*a.shape[:2], self.width(site), dtype=a.dtype, device=a.device)
            c[:, 1:] = d.encode(a[:, 1:].flatten(0, 1)).view(a.shape[0], a.shape[1] - 1, -1)
            e = a - _decode(d, c)  # at BOS (codes 0): a − b_dec, so decode + error = a everywhere
            acts[site], codes[site], errors[site] = a, c, e
        return Trace(tokens, acts, codes, errors,
                     {L: cat[("pattern", L)] for L in self.attn_layers()},
                     {L: cat[("scale", L)] for L in self.attn_layers()},
                     torch.cat(logits), cat[("embed", -1)])

    # ---- frozen linear maps between sites -------------------------------------------------

    def _ln1(self, L: int):
        m = self.model
        ln = m.blocks[L].ln1
        ln = getattr(ln, "original_component", ln)
        rms = "rms" in type(ln).__name__.lower() or m.cfg.normalization_type == "RMS"
        return getattr(ln, "weight", None), rms

    def attn_frozen(self, L: int, P: Tensor, sigma: Tensor, dx: Tensor) -> Tensor:
        """``A_L(Δx)``: block L's attention output change with pattern ``P`` and LN scale frozen.

        ``dx [..., ctx, d]``, ``P [..., H, ctx, ctx]`` and ``sigma [..., ctx, 1]`` broadcast.
        """
        m = self.model
        gamma, rms = self._ln1(L)
        v = dx if rms else dx - dx.mean(-1, keepdim=True)
        v = v / sigma
        if gamma is not None:
            v = v * gamma
        vh = torch.einsum("...sd,hde->...hse", v, m.W_V[L])
        zh = P @ vh  # [..., H, t, e]
        return torch.einsum("...hte,hed->...td", zh, m.W_O[L])

    def attn_frozen_T(self, L: int, P: Tensor, sigma: Tensor, g: Tensor) -> Tensor:
        """The transpose of :meth:`attn_frozen`: pull a cotangent ``g [..., ctx, d]`` back."""
        m = self.model
        gamma, rms = self._ln1(L)
        gz = torch.einsum("...td,hed->...hte", g, m.W_O[L])
        gv = P.transpose(-1, -2) @ gz  # [..., H, s, e]
        u = torch.einsum("...hse,hde->...sd", gv, m.W_V[L])
        if gamma is not None:
            u = u * gamma
        u = u / sigma
        return u if rms else u - u.mean(-1, keepdim=True)

    def frozen(self, tr: Trace, L: int, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(pattern, LN scale) of block L's attention, for all sequences or the given ones."""
        P, s = tr.pattern[L], tr.ln_scale[L]
        return (P, s) if rows is None else (P[rows], s[rows])

    def step(self, L: int, tr: Trace, dx: Tensor, dzo: Tensor | None, rows: Tensor | None = None) -> Tensor:
        """``Δx_{L+1}`` (or the residual after the last chosen layer) from ``Δx_L`` and ``Δz_L·W_out``.

        ``dx [..., ctx, d]`` over the trace's sequences (or the sequences ``rows``); ``dzo`` is the
        MLP output change ``Δz_L·W_out`` (None: no change).
        """
        if self.parallel:
            out = dx + self.attn_frozen(L, *self.frozen(tr, L, rows), dx)
            return out if dzo is None else out + dzo
        y = dx if dzo is None else dx + dzo
        if L == self.layers[-1]:
            return y
        return y + self.attn_frozen(L + 1, *self.frozen(tr, L + 1, rows), y)

    def step_T(self, L: int, tr: Trace, g: Tensor, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Transpose of :meth:`step`: cotangents on ``(Δx_L, Δz_L·W_out)`` from one on ``Δx_{L+1}``."""
        if self.parallel:
            return g + self.attn_frozen_T(L, *self.frozen(tr, L, rows), g), g
        gy = g if L == self.layers[-1] else g + self.attn_frozen_T(L + 1, *self.frozen(tr, L + 1, rows), g)
        return gy, gy

    def embed_step_T(self, tr: Trace, g: Tensor, rows: Tensor | None = None) -> Tensor:
        """Cotangent on the embedding from one on resid(0) (attention 0 frozen when sequential)."""
        return g if self.parallel else g + self.attn_frozen_T(0, *self.frozen(tr, 0, rows), g)


def _grab(cache: dict, key):
    def hook(act: Tensor, hook=None) -> Tensor:
        cache[key] = act.detach()
        return act
    return hook


def _decode(d, codes: Tensor) -> Tensor:
    """Decode ``[n, ctx, m]`` codes with any dictionary module."""
    n, c, m = codes.shape
    return d.decode(codes.reshape(n * c, m)).view(n, c, -1)


def one_layer(rep, who: str) -> Replacement:
    """``rep`` if it is a one-layer :class:`Replacement`; a TypeError saying how to make one if not."""
    if not isinstance(rep, Replacement):
        raise TypeError(f"{who} takes a Replacement (fc.Replacement(model, {{layer: pair}})), "
                        f"got {type(rep).__name__}")
    rep.layer  # noqa: B018 -- raises the one-layer UserError for a multi-layer replacement
    return rep


def check_index(rep: Replacement, index, who: str) -> None:
    """A UserError unless ``index`` (a FeatureIndex) was built from ``rep``'s layer and site hook."""
    hook = rep.site(index.site).hook
    if index.layer != rep.layer or index.hook != hook:
        raise UserError(f"{who}: the feature index is of {index.site} layer {index.layer} ({index.hook}) but "
                        f"the Replacement is layer {rep.layer} ({hook})")
