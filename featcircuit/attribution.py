"""Exact activation × gradient edges from residual features to MLP features (DESIGN §5).

For resid feature i → MLP feature j at token t::

    e_ij(t) = a_i · (∂f_j/∂x · r_i),   ∂f_j/∂x = 1[j active] · w_jᵀ diag(σ'(h)) W_inᵀ J_LN(x)

1. per batch of tokens, encode the residual ``x`` (codes ``a``) and the mid-MLP ``z = σ(h)``
   (codes ``f``), each as its active features only (padded to the batch's largest L0);
2. the rows ``∂f_j/∂x`` for the active ``j``: gather encoder columns ``w_j``, scale by
   ``σ'(h)``, multiply by ``W_inᵀ`` and apply the LayerNorm Jacobian's transpose (exact, or
   with the scale frozen) — ``[T, k_out, d]``, no backward pass;
3. ``[T, k_out, d] @ [T, d, k_in]`` against the active decoder rows gives all edges of the
   batch; the residual error ``ε_R`` is one more source row;
4. scatter-add into accumulators indexed by the flattened pair ``j·(m_R+1) + i``: sum, sum of
   ``|e|``, co-activation count, max ``|e|``; with a metric, also ``Σ e_ij·∂m/∂f_j``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .errors import UserError
from .replacement import Replacement, one_layer
from .sites import MLPParts

Metric = Callable[[Tensor, Tensor], Tensor]
ERR = -1  # feature index of a site's error node


@dataclass
class EdgeTable:
    """Aggregated edges of one layer: one row per (resid feature, MLP feature) that co-occur.

    ``src`` is a resid feature (``-1`` = the residual error ``ε_R``), ``dst`` an MLP feature.
    """

    layer: int
    d_resid: int
    d_mlp: int
    src: Tensor  # [E] long
    dst: Tensor  # [E] long
    weight: Tensor  # [E] Σ_t e_ij(t)
    abs_weight: Tensor  # [E] Σ_t |e_ij(t)|
    count: Tensor  # [E] tokens where both are active
    max_abs: Tensor  # [E] max_t |e_ij(t)|
    n_tokens: int
    behav_weight: Tensor | None = None  # [E] Σ_t e_ij(t)·∂m/∂f_j(t)
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.src)

    def order(self, by: str = "abs_weight") -> Tensor:
        """Row indices sorted by decreasing ``|by|`` (ties broken by (dst, src))."""
        v = getattr(self, by)
        if v is None:
            raise UserError(f"edge table has no {by!r}: run attribution with a metric")
        key = np.lexsort((self.src.numpy(), self.dst.numpy(), -v.abs().double().numpy()))
        return torch.from_numpy(key)

    def select(self, rows: Tensor) -> EdgeTable:
        """A table of the given rows only."""
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return EdgeTable(self.layer, self.d_resid, self.d_mlp, self.src[rows], self.dst[rows],
                         self.weight[rows], self.abs_weight[rows], self.count[rows],
                         self.max_abs[rows], self.n_tokens, pick(self.behav_weight), dict(self.meta))

    def top(self, n: int, by: str = "abs_weight", features_only: bool = True) -> EdgeTable:
        """The ``n`` edges of largest ``|by|`` (error sources excluded unless asked)."""
        rows = self.order(by)
        if features_only:
            rows = rows[self.src[rows] >= 0]
        return self.select(rows[:n])

    def for_target(self, j: int) -> EdgeTable:
        """Every edge into MLP feature ``j``, strongest first."""
        if not 0 <= j < self.d_mlp:
            raise UserError(f"unknown target feature mlp:{j}: the MLP dictionary has features 0..{self.d_mlp - 1}")
        t = self.select(torch.nonzero(self.dst == j).flatten())
        return t.select(t.order())

    def to_dense(self, stat: str = "weight") -> Tensor:
        """``[d_mlp, d_resid + 1]`` matrix of one statistic (last column: the error node)."""
        if self.d_mlp * (self.d_resid + 1) > 2**28:
            raise UserError(f"to_dense would allocate {self.d_mlp}×{self.d_resid + 1} entries; use the sparse table")
        out = torch.zeros(self.d_mlp, self.d_resid + 1, dtype=torch.float64)
        src = torch.where(self.src < 0, self.d_resid, self.src)
        out[self.dst, src] = getattr(self, stat).double()
        return out

    def to_dict(self) -> dict:
        """Plain JSON-able dict (lists), the inverse of :meth:`from_dict`."""
        d = {"layer": self.layer, "d_resid": self.d_resid, "d_mlp": self.d_mlp,
             "n_tokens": self.n_tokens, "meta": self.meta}
        for k in ("src", "dst", "count"):
            d[k] = getattr(self, k).tolist()
        for k in ("weight", "abs_weight", "max_abs", "behav_weight"):
            v = getattr(self, k)
            d[k] = None if v is None else v.double().tolist()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> EdgeTable:
        """Rebuild a table written by :meth:`to_dict`."""
        f = lambda k: None if d.get(k) is None else torch.tensor(d[k], dtype=torch.float64)  # noqa: E731
        return cls(d["layer"], d["d_resid"], d["d_mlp"], torch.tensor(d["src"], dtype=torch.long),
                   torch.tensor(d["dst"], dtype=torch.long), f("weight"), f("abs_weight"),
                   torch.tensor(d["count"], dtype=torch.long), f("max_abs"), d["n_tokens"],
                   f("behav_weight"), d.get("meta", {}))


# ---- the closed form ---------------------------------------------------------------------


def act_derivative(parts: MLPParts, h: Tensor) -> Tensor:
    """σ'(h) elementwise, by one cheap autograd call on the activation alone."""
    with torch.enable_grad():
        hh = h.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(parts.act(hh).sum(), hh)
    return g


def ln_stats(parts: MLPParts, x: Tensor) -> tuple[Tensor, Tensor]:
    """(normalised x̂ [..., d], 1/scale [..., 1]) of the MLP's input norm."""
    xc = x if parts.rms else x - x.mean(-1, keepdim=True)
    inv = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + parts.ln_eps)
    return xc * inv, inv


def grad_rows(parts: MLPParts, x: Tensor, w_cols: Tensor, ln: str = "exact") -> Tensor:
    """``∂pre_j/∂x`` for given encoder columns: ``x [T, d]``, ``w_cols [T, k, d_mlp]`` → ``[T, k, d]``.

    The caller multiplies by the activity mask ``1[j active]``.
    """
    h = parts.ln(x) @ parts.W_in + parts.b_in  # [T, d_mlp]
    g = (w_cols * act_derivative(parts, h)[:, None, :]) @ parts.W_in.T  # ∂pre/∂(LN output) [T, k, d]
    if parts.ln_weight is not None:
        g = g * parts.ln_weight
    xhat, inv = ln_stats(parts, x)
    g = g * inv[:, None, :]
    d = x.shape[-1]
    if not parts.rms:
        g = g - g.mean(-1, keepdim=True)  # centring is linear: kept in both modes
    if ln == "exact":  # the scale's dependence on x: −x̂ (x̂·g)/d
        g = g - xhat[:, None, :] * (g * xhat[:, None, :]).sum(-1, keepdim=True) / d
    elif ln != "frozen":
        raise UserError(f"unknown ln mode {ln!r}: use 'exact' or 'frozen'")
    return g


def _active(codes: Tensor) -> tuple[Tensor, Tensor]:
    """(values, indices) of the nonzero codes per row, padded with zeros to the batch max L0."""
    k = max(1, int((codes != 0).sum(-1).max()))
    vals, idx = codes.abs().topk(k, dim=-1, sorted=False)
    return codes.gather(-1, idx) * (vals > 0), idx


class _Accumulator:
    """Scatter-add accumulators over flattened (dst, src) pair indices, dense or sparse."""

    def __init__(self, n_pairs: int, with_behav: bool, device, dense: bool | None = None):
        self.n_pairs = n_pairs
        self.dense = n_pairs <= 2**24 if dense is None else dense
        self.names = ["weight", "abs_weight", "count", "max_abs"] + (["behav_weight"] if with_behav else [])
        if self.dense:
            self.acc = {k: torch.zeros(n_pairs, dtype=torch.float64, device=device) for k in self.names}
        else:
            self.keys = torch.empty(0, dtype=torch.long, device=device)
            self.acc = {k: torch.empty(0, dtype=torch.float64, device=device) for k in self.names}

    def add(self, keys: Tensor, e: Tensor, behav: Tensor | None) -> None:
        vals = {"weight": e.double(), "abs_weight": e.abs().double(), "count": torch.ones_like(e, dtype=torch.float64),
                "max_abs": e.abs().double()}
        if behav is not None:
            vals["behav_weight"] = behav.double()
        if not self.dense:
            keys = torch.cat([self.keys, keys])
            vals = {k: torch.cat([self.acc[k], vals[k]]) for k in self.names}
            self.keys, inv = torch.unique(keys, return_inverse=True)
            self.acc = {k: torch.zeros(len(self.keys), dtype=torch.float64, device=keys.device)
                        for k in self.names}
            keys = inv
        for k in self.names:
            if k == "max_abs":
                self.acc[k].scatter_reduce_(0, keys, vals[k], reduce="amax")
            else:
                self.acc[k].index_add_(0, keys, vals[k])

    def result(self) -> tuple[Tensor, dict[str, Tensor]]:
        if self.dense:
            keys = torch.nonzero(self.acc["count"]).flatten()
            return keys.cpu(), {k: v[keys].cpu() for k, v in self.acc.items()}
        return self.keys.cpu(), {k: v.cpu() for k, v in self.acc.items()}


def batch_edges(parts: MLPParts, resid_dict, mlp_dict, x: Tensor, *, ln: str = "exact",
                grad_f: Tensor | None = None):
    """Edges of one batch of residual vectors ``x [T, d]``.

    Returns (a_vals [T,k_in], a_idx, f_vals [T,k_out], f_idx, e [T, k_out, k_in+1]) where the
    last source column is the residual error ``ε_R``; with ``grad_f [T, d_sae_M]`` (∂m/∂f) also
    the behavioural edges ``e·∂m/∂f_j`` of the same shape.
    """
    a = resid_dict.encode(x)
    err = x - resid_dict.decode(a)
    z = parts.hidden(x)
    f = mlp_dict.encode(z)
    a_vals, a_idx = _active(a)
    f_vals, f_idx = _active(f)
    if hasattr(mlp_dict, "enc_cols"):  # any module: ∂f_j/∂z by vjp on its encode()
        w_cols = mlp_dict.enc_cols(z, f_idx)
    else:  # affine encoder: ∂f_j/∂z = w_j for an active feature
        w_cols = mlp_dict.W_enc.T[f_idx]  # [T, k_out, d_mlp]
    g = grad_rows(parts, x, w_cols, ln) * (f_vals != 0)[..., None]  # ∂f_j/∂x, zero if inactive
    src = torch.cat([resid_dict.W_dec[a_idx] * a_vals[..., None], err[:, None, :]], 1)  # [T, k_in+1, d]
    e = g @ src.transpose(1, 2)  # [T, k_out, k_in+1]
    behav = None if grad_f is None else e * grad_f.gather(-1, f_idx)[..., None]
    return a_vals, a_idx, f_vals, f_idx, e, behav


def _chunk_size(parts: MLPParts, R, M, x: Tensor, budget: int = 2**24) -> int:
    """Tokens per closed-form chunk so that the ``[T, k_out, d_mlp]`` rows stay within ``budget``.

    TopK dictionaries have k_out = k; dense (ReLU) ones can have hundreds of active features.
    """
    k_out = int((M.encode(parts.hidden(x[:4096])) != 0).sum(-1).max()) if len(x) else 1
    k_in = int((R.encode(x[:4096]) != 0).sum(-1).max()) if len(x) else 1
    per_token = max(k_out, 1) * (parts.W_in.shape[1] + parts.W_in.shape[0]) + max(k_in, 1) * parts.W_in.shape[0]
    return max(8, min(4096, budget // per_token))


def default_metric(logits: Tensor, tokens: Tensor) -> Tensor:
    """Summed next-token cross-entropy (nats) of ``logits`` on ``tokens``."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).to(torch.promote_types(logits.dtype, torch.float32)),
        tokens[:, 1:].reshape(-1), reduction="sum")


def attribute_edges(rep: Replacement, tokens: Tensor, *, ln: str = "exact",
                    batch_size: int = 16, metric: Metric | None = None, dense: bool | None = None,
                    progress: bool = True) -> EdgeTable:
    """Exact a×grad edges of ``rep``'s layer aggregated over ``tokens [n, n_ctx]`` (BOS excluded).

    With ``metric`` (``metric(logits, tokens) -> scalar``), one backward pass per batch through
    the spliced model adds behavioural weights ``Σ_t e_ij(t)·∂m/∂f_j(t)``.
    """
    from .activations import harvest

    rep = one_layer(rep, "attribute_edges")
    model, layer, r_site, m_site = rep.model, rep.layer, rep.resid_site, rep.mlp_site
    parts = rep.mlp_parts
    device = parts.W_in.device
    R, M = rep.pair.resid, rep.pair.mlp
    d_r, d_m = R.W_dec.shape[0], M.W_dec.shape[0]
    acc = _Accumulator(d_m * (d_r + 1), metric is not None, device, dense)
    n_tok, chunk = 0, None
    for i in tqdm(range(0, len(tokens), batch_size), desc="attribute", disable=not progress):
        b = tokens[i:i + batch_size].to(device)
        if metric is None:
            x = harvest(model, b, [r_site.hook], batch_size=len(b), progress=False)[r_site.hook]
            x, grad_f = x[:, 1:].reshape(-1, r_site.width).to(device), None
        else:
            eff = node_effects(rep, b, metric=metric, keep_tensors=True)
            x, grad_f = eff["x"], eff["grad_f"]
        with torch.no_grad():
            if chunk is None:  # sized once, from the first batch: not an extra encode per batch
                chunk = _chunk_size(parts, R, M, x)
            for s in range(0, len(x), chunk):  # bounded memory per chunk of tokens
                xs = x[s:s + chunk]
                gf = None if grad_f is None else grad_f[s:s + chunk]
                a_vals, a_idx, f_vals, f_idx, e, behav = batch_edges(parts, R, M, xs, ln=ln, grad_f=gf)
                src_idx = torch.cat([a_idx, torch.full_like(a_idx[:, :1], d_r)], 1)  # error = d_r
                src_on = torch.cat([a_vals != 0, torch.ones_like(a_vals[:, :1], dtype=torch.bool)], 1)
                mask = (f_vals != 0)[:, :, None] & src_on[:, None, :]
                keys = (f_idx[:, :, None] * (d_r + 1) + src_idx[:, None, :])[mask]
                acc.add(keys, e[mask], None if behav is None else behav[mask])
        n_tok += len(x)
    keys, vals = acc.result()
    dst, src = keys // (d_r + 1), keys % (d_r + 1)
    src = torch.where(src == d_r, ERR, src)
    return EdgeTable(layer, d_r, d_m, src, dst, vals["weight"], vals["abs_weight"],
                     vals["count"].long(), vals["max_abs"], n_tok, vals.get("behav_weight"),
                     {"ln": ln, "hook_resid": r_site.hook, "hook_mlp": m_site.hook})


# ---- behavioural attribution -------------------------------------------------------------


def node_effects(rep: Replacement, tokens: Tensor, *, metric: Metric | None = None,
                 baseline: str = "zero", corrupt: Tensor | None = None, means: dict | None = None,
                 keep_tensors: bool = False) -> dict:
    """Node effects ``(a − a_base)·∂m/∂a`` and ``(f − f_base)·∂m/∂f`` from one backward pass.

    Both dictionaries are spliced in at ``rep``'s layer with their errors ``ε_R``, ``ε_M`` held as
    separate nodes, so the logits equal the clean model's. Returns per-feature effects summed
    over tokens (``resid [d_R]``, ``mlp [d_M]``, ``resid_err``, ``mlp_err`` scalars), the metric,
    and with ``keep_tensors`` the per-token ``x``, ``a``, ``f``, ``grad_a``, ``grad_f``.
    BOS positions are left clean and excluded.
    """
    metric = metric or default_metric
    rep = one_layer(rep, "node_effects")
    model, r_site, m_site = rep.model, rep.resid_site, rep.mlp_site
    R, M = rep.pair.resid, rep.pair.mlp
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    st: dict[str, Tensor] = {}

    def resid_hook(act: Tensor, hook=None) -> Tensor:
        x = act[:, 1:]
        a = R.encode(x.detach()).detach().requires_grad_(True)
        e = (x - R.decode(a)).detach().requires_grad_(True)
        st.update(x=x.detach(), a=a, err_r=e)
        return torch.cat([act[:, :1], R.decode(a) + e], 1)

    def mlp_hook(act: Tensor, hook=None) -> Tensor:
        z = act[:, 1:]
        f = M.encode(z)
        f.retain_grad()
        e = (z - M.decode(f)).detach().requires_grad_(True)
        st.update(f=f, err_m=e)
        return torch.cat([act[:, :1], M.decode(f) + e], 1)

    with torch.enable_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=[(r_site.hook, resid_hook), (m_site.hook, mlp_hook)])
        m = metric(logits, tokens)
        if m.ndim != 0:
            raise UserError(f"the metric must return a scalar tensor, got shape {tuple(m.shape)}")
        m.backward()
    a, f = st["a"].detach(), st["f"].detach()
    ga, gf = st["a"].grad, st["f"].grad
    if baseline == "zero":
        a_base, f_base = 0.0, 0.0
    elif baseline == "mean":
        if means is None:
            raise UserError("baseline 'mean' needs means={'resid': [d_R], 'mlp': [d_M]} of the codes")
        a_base, f_base = means["resid"], means["mlp"]
    elif baseline == "corrupt":
        if corrupt is None or corrupt.shape != tokens.shape:
            raise UserError("baseline 'corrupt' needs corrupt tokens of the same shape as the clean ones")
        c = _codes_on(rep, corrupt)
        a_base, f_base = c["a"], c["f"]
    else:
        raise UserError(f"unknown baseline {baseline!r}: use zero, mean or corrupt")
    out = {
        "metric": float(m.detach()),
        "resid": ((a - a_base) * ga).flatten(0, 1).sum(0),
        "mlp": ((f - f_base) * gf).flatten(0, 1).sum(0),
        "resid_err": float((st["err_r"].detach() * st["err_r"].grad).sum()),
        "mlp_err": float((st["err_m"].detach() * st["err_m"].grad).sum()),
        "logits": logits.detach(),
    }
    if keep_tensors:
        flat = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731
        out.update(x=flat(st["x"]), a=flat(a), f=flat(f), grad_a=flat(ga), grad_f=flat(gf))
    return out


@torch.no_grad()
def _codes_on(rep: Replacement, tokens: Tensor) -> dict[str, Tensor]:
    from .activations import harvest

    r, m, pair = rep.resid_site, rep.mlp_site, rep.pair
    acts = harvest(rep.model, tokens, [r.hook, m.hook], batch_size=len(tokens), progress=False)
    dev = pair.resid.W_dec.device
    return {"a": pair.resid.encode(acts[r.hook][:, 1:].to(dev)), "f": pair.mlp.encode(acts[m.hook][:, 1:].to(dev))}
