"""ACDC-style ablation search over resid → MLP feature edges (DESIGN §6).

Attribution is a linear estimate; ablation is the ground truth. Given candidate edges (the top
N of an :class:`~featcircuit.attribution.EdgeTable`; every other edge stays in the model):

1. order: MLP targets by increasing importance (the sum of |attribution| over their candidate
   edges), and within a target its edges by increasing |attribution| — the weakest go first;
2. ablate an edge (i → j) *path-specifically*: only MLP feature j sees the residual without
   feature i — ``x − a_i·r_i`` (zero) or ``x − (a_i − ā_i)·r_i`` (mean); j's pre-activation is
   recomputed through LN, ``W_in``, σ and its encoder column, with the clean TopK mask held;
   the MLP is re-decoded with its clean error ``ε_M`` kept, and the rest of the model runs to
   the logits — starting at block L+1 from the clean residual plus ``Δz·W_out``, so the blocks
   before never rerun;
3. measure ``Δ = D(H′) − D(H)``, ``D`` = mean KL(clean ‖ circuit) over next-token
   distributions (or the user's metric); remove the edge when ``Δ < τ`` and carry the removal
   forward;
4. batch speculatively: the next B edges are evaluated in one forward as the chain
   ``H+e₁, H+e₁+e₂, …`` (B copies of the tokens on the batch dimension); decisions are read in
   order and the chain restarts after the first decision that differs from the speculation,
   so the result is exactly that of the one-forward-per-edge search. The speculation uses
   each edge's single-edge Δ (all candidates ablated alone first, also batched): an edge whose
   Δ alone is ≥ τ is assumed kept and left out of the rest of the chain.
"""

from __future__ import annotations

import math
import time

from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .adapters import as_pair
from .attribution import EdgeTable, Metric
from .errors import UserError
from .sites import mlp_parts, pair_sites

Config = dict[int, frozenset]  # MLP feature j -> resid features whose edge into j is ablated


@dataclass
class AblationContext:
    """Clean activations of one token set, and the machinery to score ablated configurations."""

    model: object
    pair: object
    layer: int
    tokens: Tensor
    ablation: str = "zero"
    metric: Metric | None = None
    max_rows: int = 512
    """sequences per forward pass (configurations × contexts)"""
    companion: Metric | None = None
    """a second metric computed on every forward (validation reads it from the cache)"""
    passes: int = 0

    def __post_init__(self) -> None:
        if self.ablation not in ("zero", "mean"):
            raise UserError(f"unknown ablation {self.ablation!r}: use zero or mean")
        from .activations import harvest

        r, m = pair_sites(self.model, self.layer)
        self.pair = as_pair(self.pair, r.width, m.width)
        self.hook_mlp = m.hook
        self.parts = mlp_parts(self.model, self.layer)
        dev = self.parts.W_in.device
        self.tokens = self.tokens.to(dev)
        acts = harvest(self.model, self.tokens, [r.hook, m.hook], batch_size=32, progress=False)
        R, M = self.pair.resid, self.pair.mlp
        with torch.no_grad():
            self.x = acts[r.hook][:, 1:].to(dev).flatten(0, 1)  # [N, d]  (N = n_seq·(n_ctx−1))
            self.z = acts[m.hook][:, 1:].to(dev).flatten(0, 1)  # [N, d_mlp]
            self.a = R.encode(self.x)
            self.f = M.encode(self.z)
            self.base = self.a.mean(0) if self.ablation == "mean" else torch.zeros_like(self.a[0])
            self._tail = self._capture_tail()
            logits = self._forward([torch.zeros_like(self.z)])
            clean_logp = logits[0][:, :-1].log_softmax(-1)
            self.clean_p = clean_logp.exp()
            self.clean_negent = (self.clean_p * clean_logp).sum(-1)  # Σ_v p log p per position
            self.passes = 0
        self._fcache: dict[tuple[int, frozenset], Tensor] = {}
        self._scores: dict[tuple, dict] = {}

    # ---- the ablated MLP ----------------------------------------------------------------

    def f_ablated(self, j: int, removed: frozenset) -> Tensor:
        """MLP feature j's activation [N] when it sees the residual without ``removed`` features."""
        key = (j, removed)
        if key not in self._fcache:
            R, M = self.pair.resid, self.pair.mlp
            idx = torch.tensor(sorted(removed), dtype=torch.long, device=self.x.device)
            coef = self.a[:, idx] - self.base[idx]  # [N, |S|]
            x2 = self.x - coef @ R.W_dec[idx]
            z2 = self.parts.hidden(x2)
            if hasattr(M, "pre_acts"):  # our dictionaries: j's own pre-activation, mask held
                pre = torch.relu((z2 - M.b_dec) @ M.W_enc[:, j] + M.b_enc[j])
            else:  # any module: its encode(), mask held
                pre = M.encode(z2)[:, j]
            self._fcache[key] = pre * (self.f[:, j] != 0)  # the clean TopK mask held
        return self._fcache[key]

    def z_delta(self, config: Config) -> Tensor:
        """Change of the mid-MLP activation [N, d_mlp] under ``config`` (clean error kept)."""
        M = self.pair.mlp
        js = [j for j, s in config.items() if s]
        if not js:
            return torch.zeros_like(self.z)
        df = torch.stack([self.f_ablated(j, config[j]) - self.f[:, j] for j in js], 1)  # [N, J]
        return df @ M.W_dec[js]

    # ---- scoring -------------------------------------------------------------------------

    def _capture_tail(self):
        """The HF blocks after ``layer``, their clean call arguments, and the residual they read.

        An ablation only changes block ``layer``'s MLP output, so the forward can start at block
        ``layer + 1`` from the clean residual plus ``Δz·W_out``: the blocks before never rerun.
        Returns None (and the slower full forward with a hook is used) when the model's blocks
        cannot be driven this way; the check compares the restarted forward with the clean one.
        """
        m = self.model
        try:
            blocks = [m.blocks[l].original_component for l in range(self.layer + 1, m.cfg.n_layers)]
            ln_f, head = m.ln_final.original_component, m.unembed.original_component
            entry = blocks[0] if blocks else ln_f
            cap: dict = {}

            def pre(mod, args, kwargs):
                cap["x"], cap["kwargs"] = args[0], dict(kwargs)

            h = entry.register_forward_pre_hook(pre, with_kwargs=True)
            try:
                with torch.no_grad():
                    clean = m(self.tokens)
            finally:
                h.remove()
            kw = {k: v for k, v in cap["kwargs"].items()
                  if k not in ("layer_past", "past_key_values", "past_key_value", "cache_position")}
            if "use_cache" in kw:
                kw["use_cache"] = False
            tail = (blocks, ln_f, head, cap["x"].detach(), kw)
            with torch.no_grad():
                again = self._run_tail(tail, torch.zeros(1, *cap["x"].shape, dtype=cap["x"].dtype,
                                                         device=cap["x"].device))
            if again.shape == clean.shape and torch.allclose(again, clean, rtol=1e-4, atol=1e-4):
                return tail
        except Exception:  # any architecture this generic restart does not fit
            pass
        return None

    @staticmethod
    def _run_tail(tail, d_resid: Tensor) -> Tensor:
        """Logits of the blocks after the layer, from the clean residual plus ``d_resid [B, n, ctx, d]``."""
        blocks, ln_f, head, x, kw = tail
        B = d_resid.shape[0]
        n = x.shape[0]

        def rep(v):
            if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == n and n > 1:
                return v.repeat(B, *([1] * (v.ndim - 1)))
            if isinstance(v, tuple):
                return tuple(rep(t) for t in v)
            return v

        kwb = {k: rep(v) for k, v in kw.items()}
        h = (x[None] + d_resid).flatten(0, 1)
        for blk in blocks:
            h = blk(h, **kwb)
            h = h[0] if isinstance(h, tuple) else h
        return head(ln_f(h))

    def _forward(self, deltas: list[Tensor]) -> list[Tensor]:
        """Logits per configuration, given each one's mid-MLP change; counts forward passes."""
        n_seq, n_ctx = self.tokens.shape
        per = max(1, self.max_rows // n_seq)
        out: list[Tensor] = []
        for c in range(0, len(deltas), per):
            chunk = deltas[c:c + per]
            d = torch.stack(chunk).view(len(chunk) * n_seq, n_ctx - 1, -1)
            with torch.no_grad():
                if self._tail is not None:  # restart after the layer: Δresid = Δz·W_out
                    dr = torch.zeros(len(chunk) * n_seq, n_ctx, self.parts.W_out.shape[1],
                                     dtype=self.x.dtype, device=self.x.device)
                    dr[:, 1:] = d @ self.parts.W_out
                    logits = self._run_tail(self._tail, dr.view(len(chunk), n_seq, n_ctx, -1))
                else:
                    def hook(act: Tensor, hook=None, d=d) -> Tensor:
                        return torch.cat([act[:, :1], act[:, 1:] + d.to(act.dtype)], 1)

                    toks = self.tokens.repeat(len(chunk), 1)
                    logits = self.model.run_with_hooks(toks, fwd_hooks=[(self.hook_mlp, hook)])
            self.passes += 1
            out.extend(logits.view(len(chunk), n_seq, n_ctx, -1).unbind(0))
        return out

    def score(self, configs: list[Config], metric: Metric | None = None, kl: bool = False) -> list[float]:
        """D for each configuration: mean KL(clean ‖ ablated), or a metric of the logits.

        ``kl=True`` asks for the KL whatever the context's metric. Every forward computes the
        KL, the context's ``metric`` and its ``companion`` metric
        from the same logits, and caches them per configuration, so validation (which asks for
        the companion on single-edge ablations the search already ran) costs no extra pass.
        """
        metric = None if kl else (metric if metric is not None else self.metric)
        wanted = [m for m in (metric, self.metric, self.companion) if m is not None]
        keys = [tuple(sorted((j, tuple(sorted(v))) for j, v in c.items() if v)) for c in configs]
        todo = list(dict.fromkeys(k for k in keys
                                  if k not in self._scores or any(id(m) not in self._scores[k] for m in wanted)))
        if todo:
            cfg_of = dict(zip(keys, configs))
            logits = self._forward([self.z_delta(cfg_of[k]) for k in todo])
            for k, lg in zip(todo, logits):
                # KL(p‖q) = Σ p log p − Σ p·logits + logsumexp(logits): no full log-softmax needed
                lg1 = lg[:, :-1]
                kl = self.clean_negent - (self.clean_p * lg1).sum(-1) + lg1.logsumexp(-1)
                entry = {None: float(kl.mean())}
                for m in wanted:
                    entry[id(m)] = float(m(lg, self.tokens))
                self._scores[k] = entry
        return [self._scores[k][None if metric is None else id(metric)] for k in keys]


def _with(config: Config, i: int, j: int) -> Config:
    new = dict(config)
    new[j] = frozenset(config.get(j, frozenset()) | {i})
    return new


def visit_order(candidates: EdgeTable) -> list[tuple[int, int, float]]:
    """(src, dst, attribution) in search order: targets by increasing importance, edges by |attr|."""
    imp: dict[int, float] = {}
    rows = list(zip(candidates.src.tolist(), candidates.dst.tolist(), candidates.weight.tolist()))
    for i, j, w in rows:
        imp[j] = imp.get(j, 0.0) + abs(w)
    rows.sort(key=lambda r: (imp[r[1]], r[1], abs(r[2]), r[0]))
    return rows


@dataclass
class SearchResult:
    """Kept edges with their measured Δ, every visit in order, and the pass accounting."""

    visited: list[dict]
    tau: float
    ablation: str
    passes: int
    naive_passes: int
    seconds: float
    d_full: float
    d_empty: float
    meta: dict = field(default_factory=dict)

    @property
    def kept(self) -> list[dict]:
        return [v for v in self.visited if v["kept"]]

    def to_dict(self) -> dict:
        """JSON-able summary."""
        return {"tau": self.tau, "ablation": self.ablation, "passes": self.passes,
                "naive_passes": self.naive_passes, "seconds": self.seconds, "d_full": self.d_full,
                "d_empty": self.d_empty, "n_candidates": len(self.visited), "n_kept": len(self.kept),
                "visited": self.visited, **self.meta}


def search_edges(model, pair, tokens: Tensor, candidates: EdgeTable, *, tau: float, layer: int | None = None,
                 ablation: str = "zero", metric: Metric | None = None, batch: int = 32,
                 max_rows: int = 512, predict: bool = True, progress: bool = True,
                 ctx: AblationContext | None = None) -> SearchResult:
    """Prune ``candidates`` by path-specific ablation (see the module docstring for the order).

    With ``predict``, every candidate is first ablated alone (batched) and the speculative chain
    assumes each edge's decision is the one its single-edge Δ gives; the chain restarts only
    where the real decision differs, so the result is still exactly the sequential search's.
    """
    if len(candidates) == 0:
        raise UserError("no candidate edges to search: raise --candidates or lower the thresholds")
    if candidates.src.min() < 0:
        raise UserError("candidate edges must be feature edges (error sources cannot be ablated by edge)")
    layer = candidates.layer if layer is None else layer
    t0 = time.time()
    ctx = ctx or AblationContext(model, pair, layer, tokens, ablation, metric, max_rows)
    p0 = ctx.passes
    order = visit_order(candidates)
    empty: Config = {}
    for i, j, _ in order:
        empty = _with(empty, i, j)
    if predict:
        d_full, d_empty, *singles = ctx.score([{}, empty] + [_with({}, i, j) for i, j, _ in order])
        pred_keep = [not (s - d_full) < tau for s in singles]
    else:
        d_full, d_empty = ctx.score([{}, empty])
        singles, pred_keep = [None] * len(order), [False] * len(order)
    H, d_H = {}, d_full
    visited: list[dict] = []
    pos = 0
    bar = tqdm(total=len(order), desc="ablation search", disable=not progress)
    while pos < len(order):
        chain = range(pos, min(pos + batch, len(order)))
        configs: list[Config] = []
        bases: list[int | None] = []  # index of the configuration each one is measured against
        base_cfg, base_idx = H, None
        for k in chain:
            i, j, _ = order[k]
            configs.append(_with(base_cfg, i, j))
            bases.append(base_idx)
            if not pred_keep[k]:  # assumed removed: the next edges are tested without it
                base_cfg, base_idx = configs[-1], len(configs) - 1
        ds = ctx.score(configs)
        for n, k in enumerate(chain):
            i, j, w = order[k]
            delta = ds[n] - (d_H if bases[n] is None else ds[bases[n]])
            keep = not delta < tau
            visited.append({"src": i, "dst": j, "attribution": w, "delta": delta, "kept": keep,
                            "visit": k, "single_delta": None if singles[k] is None else singles[k] - d_full})
            pos = k + 1
            bar.update(1)
            if not keep:
                H, d_H = configs[n], ds[n]
            if keep != pred_keep[k]:
                break  # later configurations in this chain assumed the other decision
    bar.close()
    n_seq = len(ctx.tokens)
    per_naive = math.ceil(n_seq / ctx.max_rows) if n_seq > ctx.max_rows else 1
    return SearchResult(visited, tau, ctx.ablation, ctx.passes - p0, (len(order) + 2) * per_naive,
                        round(time.time() - t0, 2), d_full, d_empty)
