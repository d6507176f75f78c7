"""What it means to ablate resid(L) → mlp(L) feature edges, held once for search and faithfulness.

The scope S of layer L is every edge from a resid feature i (and, with ``errors="ablated"``, the
residual error ε_R) into an active MLP feature j, at the tokens where both are present. An edge
carries ``coef_i(t)·r_i`` into j's input, with ``coef = a − b`` the clean code minus its
ablation value ``b``:

- ``zero``: ``b = 0``;  ``mean``: ``b`` = the mean code over the tokens (or given means);
- ``patch``: ``b`` = the code on the corrupt prompt at the same position (tasks' default).

1. one clean forward harvests the resid input ``x`` and mid-MLP ``z`` of every non-BOS token
   (and one corrupt forward for ``patch``); codes ``a = R(x)``, ``f = M(z)``, the TopK mask of f;
2. a :class:`Config` says, per MLP feature j, which of its incoming edges are kept; j reads
   ``x_∅ + Σ_{i kept} coef_i·r_i`` (or ``x − Σ_{i removed} coef_i·r_i``), with
   ``x_∅ = x − Σ_i coef_i·r_i`` (− ε_R + ε_R's ablation value when errors are ablated);
   its activation is recomputed through LN2, ``W_in``, σ and j's encoder column with the clean
   mask held; every other MLP feature keeps the value its own config gives it;
3. ``Δz = Σ_j (f'_j − f_j)·m_j`` (the MLP error ε_M kept), and the forward restarts at block L+1
   from the clean residual plus ``Δz·W_out`` — earlier blocks never rerun;
4. the metric: the task's (logit difference at the last position, only that position's logits
   are computed), a user metric of the logits, or mean KL(clean ‖ ablated) over non-BOS
   positions as ``Σ p (log p − log q)``, summed over the sequences a configuration changes only
   (an unchanged one adds exactly 0).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .adapters import held_code, reads_pre_acts
from .errors import UserError
from .restart import capture_tail, restart_logits, restart_metric

ABLATIONS = ("zero", "mean", "patch")
FILL_ROWS = 2**18  # (target, token) rows per _fill chunk: bounds its [rows, k] gathers
DENSE_DOUT = 2**24  # dout as one [N, d_M] × [d_M, d] matmul up to this many elements of the change
DOUT_CROSSOVER = 128  # ... and when its (token, j) pairs fill more than 1/this of it
ERR = -1  # source index of the residual error ε_R
Edge = tuple[int, int]  # (src i, dst j)


def _check_errors(errors: str) -> None:
    if errors not in ("kept", "ablated"):
        raise UserError(f"unknown errors mode {errors!r}: use kept or ablated")


@dataclass(frozen=True)
class Config:
    """Which edges of the scope are kept: per listed target, a kept or removed source set.

    ``default`` says what unlisted targets get: ``"full"`` (every incoming edge kept, the clean
    value) or ``"empty"`` (every incoming edge ablated).
    """

    default: str
    targets: tuple[tuple[int, str, frozenset], ...] = ()

    @staticmethod
    def full() -> Config:
        return Config("full")

    @staticmethod
    def empty() -> Config:
        return Config("empty")

    @staticmethod
    def keeping(edges: Iterable[Edge] | np.ndarray) -> Config:
        """Only ``edges`` kept; everything else in scope ablated (a circuit C)."""
        return Config._of("empty", "keep", edges)

    @staticmethod
    def removing(edges: Iterable[Edge] | np.ndarray) -> Config:
        """Only ``edges`` ablated; everything else kept (the complement S ∖ C)."""
        return Config._of("full", "remove", edges)

    @staticmethod
    def _of(default: str, kind: str, edges: Iterable[Edge] | np.ndarray) -> Config:
        """Edges grouped by target; an ``[E, 2]`` int array (src, dst) skips the list's conversion."""
        if isinstance(edges, np.ndarray):
            return Config._grouped(default, kind, edges.reshape(-1, 2))
        edges = list(edges)
        if len(edges) < 512:  # the search's configurations: a dict is faster than numpy's setup
            by: dict[int, set] = {}
            for i, j in edges:
                by.setdefault(int(j), set()).add(int(i))
            return Config(default, tuple((j, kind, frozenset(s)) for j, s in sorted(by.items())))
        return Config._grouped(default, kind, np.asarray(edges, dtype=np.int64).reshape(-1, 2))

    @staticmethod
    def _grouped(default: str, kind: str, e: np.ndarray) -> Config:
        e = e[np.argsort(e[:, 1], kind="stable")]  # grouped by target: curves build 10⁵-edge configs
        js, starts = np.unique(e[:, 1], return_index=True)
        src, ends = e[:, 0].tolist(), [*starts[1:].tolist(), len(e)]
        return Config(default, tuple((j, kind, frozenset(src[a:b]))
                                     for j, a, b in zip(js.tolist(), starts.tolist(), ends)))

    def without(self, i: int, j: int) -> Config:
        """This configuration with edge (i, j) ablated as well."""
        t = {jj: (k, s) for jj, k, s in self.targets}
        kind, s = t.get(j, ("keep", frozenset()) if self.default == "empty" else ("remove", frozenset()))
        s = s - {i} if kind == "keep" else s | {i}
        if (kind == "keep" and not s and self.default == "empty") or (kind == "remove" and not s
                                                                     and self.default == "full"):
            t.pop(j, None)
        else:
            t[j] = (kind, frozenset(s))
        return Config(self.default, tuple((jj, k, ss) for jj, (k, ss) in sorted(t.items())))


class Scorer:
    """What every ablation context derives from its ``values``: distance, gap and faithfulness."""

    m_full: float
    m_empty: float
    passes: int  # forward passes run so far
    _values: dict[Config, float]  # the values cache

    def values(self, configs: list[Config]) -> list[float]:
        raise NotImplementedError

    def with_errors(self, errors: str) -> Scorer:
        """The same context with the error nodes in (``"ablated"``) or out of (``"kept"``) the scope."""
        raise NotImplementedError

    def is_error(self, src: int) -> bool:
        """Whether source id ``src`` is an error node (the one-layer scope's ε_R is ``ERR``)."""
        return src == ERR

    def distance(self, configs: list[Config]) -> list[float]:
        """``D = |m(config) − m(M)|``: how far each configuration is from the full model."""
        return [abs(v - self.m_full) for v in self.values(configs)]

    @property
    def gap(self) -> float:
        """``m(M) − m(∅)``: what the whole scope does to the metric."""
        return self.m_full - self.m_empty

    def faithfulness(self, cfg: Config) -> float | None:
        """``(m(C) − m(∅)) / (m(M) − m(∅))``; None when the scope does nothing (gap 0)."""
        (v,) = self.values([cfg])
        return (v - self.m_empty) / self.gap if self.gap != 0 else None


class AblationContext(Scorer):
    """Clean (and corrupt) activations of one token set, and the scorer of :class:`Config` s of a
    one-layer :class:`~featcircuit.replacement.Replacement`'s resid → mlp edges."""

    def __init__(self, rep, tokens: Tensor, ablation: str = "zero", *,
                 corrupt: Tensor | None = None, task=None, metric=None, errors: str = "kept",
                 means: Tensor | None = None, max_rows: int = 512):
        from .activations import harvest
        from .replacement import one_layer

        rep = one_layer(rep, "AblationContext")
        if ablation not in ABLATIONS:
            raise UserError(f"unknown ablation {ablation!r}: use one of {', '.join(ABLATIONS)}")
        _check_errors(errors)
        if task is not None:
            tokens, corrupt, metric = task.clean, task.corrupt, task.metric
        if ablation == "patch" and (corrupt is None or corrupt.shape != tokens.shape):
            raise UserError("patch ablation needs corrupt prompts of the clean prompts' shape "
                            "(a task, or --prompts with clean/corrupt pairs)")
        model, layer = rep.model, rep.layer
        self.rep, self.model, self.layer, self.ablation, self.errors = rep, model, layer, ablation, errors
        self.task, self.user_metric, self.max_rows = task, (None if task is not None else metric), max_rows
        r, m = rep.resid_site, rep.mlp_site
        self.pair = rep.pair
        self.hook_mlp = m.hook
        self.parts = rep.mlp_parts
        dev = self.parts.W_in.device
        self.tokens = tokens.to(dev)
        self.passes = 0
        R, M = self.pair.resid, self.pair.mlp
        acts = harvest(model, self.tokens, [r.hook, m.hook], batch_size=64, progress=False)
        with torch.no_grad():
            self.x = acts[r.hook][:, 1:].to(dev).flatten(0, 1)  # [N, d]  (N = n_seq·(n_ctx−1))
            z = acts[m.hook][:, 1:].to(dev).flatten(0, 1)  # [N, d_mlp]
            self.a = R.encode(self.x)
            self.err = self.x - R.decode(self.a)  # ε_R
            self.f = M.encode(z)
            self.mask = self.f != 0
            # a foreign module is linearised at its clean input: the harvested z, kept for it alone
            self._z = None if reads_pre_acts(M) else z
            if ablation == "patch":
                xc = harvest(model, corrupt.to(dev), [r.hook], batch_size=64, progress=False)[r.hook]
                xc = xc[:, 1:].to(dev).flatten(0, 1)
                b = R.encode(xc)
                b_err = xc - R.decode(b)
            elif ablation == "mean":
                b = (self.a.mean(0) if means is None else means.to(self.a))[None].expand_as(self.a)
                b_err = self.err.mean(0)[None].expand_as(self.err)
            else:
                b, b_err = torch.zeros_like(self.a), torch.zeros_like(self.err)
            self.coef = self.a - b  # what edge i carries, per token: coef_i·r_i
            self.err_coef = self.err - b_err
            self.W_R = R.W_dec
            self._x_no_features = self.x - self.coef @ self.W_R  # x with every feature edge ablated
            self._d_r = self.coef.shape[1]
            # each token's sources that carry something, as (index, coefficient) lists: a sparse
            # code has k of d_R, so counting and summing a configuration's sources reads k, not d_R
            s_max = max(1, int((self.coef != 0).sum(-1).max())) if len(self.coef) else 1
            on, self._src_idx = self.coef.abs().topk(min(s_max, self._d_r), dim=-1)
            self._src_on = on > 0  # [N, s]
            self._src_val = self.coef.gather(1, self._src_idx) * self._src_on
            self._tail = capture_tail(model, layer, self.tokens)
            # a feature's change reaches the residual through W_dec·W_out: one [m, d] map, not two
            self._dec_out = M.W_dec @ self.parts.W_out
            (self.clean_logits,) = self._forward([torch.zeros(len(z), self._dec_out.shape[1], dtype=z.dtype,
                                                              device=z.device)])
            if self.task is None and self.user_metric is None:
                self.clean_logp = self.clean_logits[:, 1:].log_softmax(-1)
                self.clean_p = self.clean_logp.exp()
        self._enc_t = M.W_enc.detach().T.contiguous() if reads_pre_acts(M) else None
        jm, rm = torch.nonzero(self.mask.T, as_tuple=True)  # (target, token), by target
        self._by_target = rm
        self._target_off = torch.zeros(self.mask.shape[1] + 1, dtype=torch.long, device=rm.device)
        self._target_off[1:] = torch.cumsum(torch.bincount(jm, minlength=self.mask.shape[1]), 0)
        self._n_rows: list[int] = (self._target_off[1:] - self._target_off[:-1]).tolist()
        self._set_errors(errors)

    @torch.no_grad()
    def _set_errors(self, errors: str) -> None:
        """What depends on whether ε_R is in the scope: ∅'s input and codes, the source counts,
        empty caches, m(M) and m(∅)."""
        self.errors = errors
        self.x_empty = self._x_no_features - self.err_coef if errors == "ablated" else self._x_no_features
        self.f_empty = self._pre_all(self.x_empty)
        self._err_on = (self.err_coef.abs().sum(-1) > 0) & (errors == "ablated")  # [N]
        self._n_src = self._src_on.sum(1) + self._err_on
        self.dout_empty = (self.f_empty - self.f) @ self._dec_out  # [N, d_model]
        self.passes = 0
        self._acts: dict[tuple, Tensor] = {}
        self._values: dict[Config, float] = {}
        self._scope: list[Edge] | None = None
        self.m_full = self.values([Config.full()])[0]
        self.m_empty = self.values([Config.empty()])[0]

    def with_errors(self, errors: str) -> AblationContext:
        """The same context with the residual error in (``"ablated"``) or out of (``"kept"``) the
        scope, sharing its forwards: the same as building it anew with ``errors``."""
        _check_errors(errors)
        other = copy.copy(self)
        other._set_errors(errors)
        return other

    # ---- the scope -----------------------------------------------------------------------

    def scope_counts(self) -> Tensor:
        """``[d_M, d_R (+1)]`` co-occurrence counts of every edge in scope (last column: ε_R)."""
        m = self.mask.to(self.x.dtype)
        cnt = m.T @ (self.coef != 0).to(m.dtype)
        if self.errors == "ablated":
            cnt = torch.cat([cnt, m.T @ (self.err_coef.abs().sum(-1, keepdim=True) > 0).to(m.dtype)], 1)
        return cnt

    def scope(self) -> list[Edge]:
        """Every edge (i, j) of the scope (i = −1 for ε_R), in (j, i) order (built once; do not
        modify the list: search, curves and the summary each read it, 10⁵ edges)."""
        if self._scope is None:
            cnt = self.scope_counts()
            d_r = self.coef.shape[1]
            jj, ii = torch.nonzero(cnt, as_tuple=True)
            ii = torch.where(ii == d_r, ERR, ii)
            self._scope = list(zip(ii.tolist(), jj.tolist()))
        return self._scope

    # ---- ablated MLP features ------------------------------------------------------------

    def _pre_all(self, x: Tensor) -> Tensor:
        """Every clean-active MLP feature's code at inputs ``x [N, d]`` (row-aligned with the clean
        run), its mask held; zero where it is inactive in the clean run."""
        M = self.pair.mlp
        if reads_pre_acts(M):  # every feature at once
            return torch.relu(M.pre_acts(self.parts.hidden(x))) * self.mask
        assert self._z is not None  # kept for every module without its own pre-activation
        z = self.parts.hidden(x)  # [N, d_mlp], as the harvested clean z
        rows, k = torch.nonzero(self.mask, as_tuple=True)
        out = torch.zeros_like(self.f)
        for s in range(0, len(rows), 8192):  # bounded memory: [chunk, d_mlp]
            r, kc = rows[s:s + 8192], k[s:s + 8192]
            out[r, kc] = held_code(M, z[r], kc, self._z[r], self.f[r, kc])
        return out

    def rows(self, j: int) -> Tensor:
        """Token indices where MLP feature j is active in the clean run."""
        return self._by_target[self._target_off[j]:self._target_off[j + 1]]

    def _key_rows(self, keys: list[tuple[int, str, frozenset]]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Every key's active tokens at once: (rows ``[T]``, key index and target per row, rows per key)."""
        j = torch.tensor([k[0] for k in keys], dtype=torch.long, device=self.x.device)
        n = self._target_off[j + 1] - self._target_off[j]
        kid = torch.repeat_interleave(torch.arange(len(keys), device=j.device), n)
        first = torch.cumsum(n, 0) - n  # each key's first slot in the concatenation
        at = self._target_off[j][kid] + torch.arange(len(kid), device=j.device) - first[kid]
        return self._by_target[at], kid, j[kid], n

    @torch.no_grad()  # the dictionaries' parameters may require grad: no graph here
    def target_acts(self, j: int, kind: str, srcs: frozenset) -> Tensor:
        """MLP feature j's activation on its active tokens when it reads the configured input."""
        self._fill([(j, kind, srcs)])
        return self._acts[(j, kind, srcs)]

    def _fill(self, keys: list[tuple[int, str, frozenset]]) -> None:
        """Compute and cache the activations of several configured targets, all keys at once.

        Only tokens where a configuration keeps some but not all of the sources that carry
        anything there are recomputed; the others read the clean or the all-ablated value.
        Keys go in chunks of bounded rows and membership-matrix size (a curve point lists 10⁴).
        ε_R in a source set counts only with ``errors="ablated"``; kept errors are outside the scope.
        """
        todo = [k for k in dict.fromkeys(keys) if k not in self._acts]
        n_rows = self._n_rows
        per = max(1, 2**24 // (self._d_r + 1))
        # rows per chunk: each row gathers its source list (k long for a sparse code, d_R under mean)
        cap = max(1, min(FILL_ROWS, 2**24 // self._src_idx.shape[1]))
        s = 0
        while s < len(todo):
            chunk: list[tuple[int, str, frozenset]] = []
            rows = 0
            while s < len(todo) and len(chunk) < per and (not chunk or rows + n_rows[todo[s][0]] <= cap):
                rows += n_rows[todo[s][0]]
                chunk.append(todo[s])
                s += 1
            self._fill_chunk(chunk)

    def _fill_chunk(self, keys: list[tuple[int, str, frozenset]]) -> None:
        """:meth:`_fill` for one chunk of keys: every (key, active token) row in one set of ops."""
        dev = self.x.device
        R, kid, J, n = self._key_rows(keys)
        kinds = {k[1] for k in keys}
        keep = torch.tensor([k[1] == "keep" for k in keys], device=dev)[kid]
        # membership [K, d_R + 1] of each key's sources (the last column: ε_R, in scope if ablated)
        lens = torch.tensor([len(k[2]) for k in keys], dtype=torch.long, device=dev)
        src = torch.tensor([i for k in keys for i in k[2]], dtype=torch.long, device=dev)
        src = torch.where(src < 0, self._d_r, src)
        mem = torch.zeros(len(keys), self._d_r + 1, dtype=torch.bool, device=dev)
        mem[torch.repeat_interleave(torch.arange(len(keys), device=dev), lens), src] = True
        idx = self._src_idx[R]
        inset = mem[kid[:, None], idx] & self._src_on[R]  # [T, s] listed sources present
        err = mem[kid, self._d_r] & self._err_on[R]  # ε_R listed and carrying something (ablated only)
        hit = inset.sum(1) + err
        total = self._n_src[R]
        none_kept = torch.where(keep, hit == 0, hit == total)
        all_kept = torch.where(keep, hit == total, hit == 0)
        val = torch.where(none_kept, self.f_empty[R, J], self.f[R, J])
        part = torch.nonzero(~(none_kept | all_kept))[:, 0]
        M = self.pair.mlp
        for s in range(0, len(part), 8192):  # bounded memory: [chunk, d_mlp]
            p = part[s:s + 8192]
            pr, jc = R[p], J[p]
            # Σ over the listed sources present of coef_i·r_i, row by row, from the k nonzeros
            c = torch.nn.functional.embedding_bag(idx[p], self.W_R, mode="sum",
                                                  per_sample_weights=self._src_val[pr] * inset[p])
            if self.errors == "ablated":  # ε_R is a source only then (else err is all False)
                c = c + self.err_coef[pr] * err[p, None]
            if kinds == {"keep"}:  # a configuration's targets are all keep or all remove: one side
                x = self.x_empty[pr] + c
            elif kinds == {"remove"}:
                x = self.x[pr] - c
            else:
                x = torch.where(keep[p, None], self.x_empty[pr] + c, self.x[pr] - c)
            z0 = None if self._z is None else self._z[pr]
            val[p] = held_code(M, self.parts.hidden(x), jc, z0, self.f[pr, jc],  # its own target, mask held
                               self._enc_t)
        for key, v in zip(keys, torch.split(val, n.tolist())):
            self._acts[key] = v

    @torch.no_grad()  # the dictionaries' parameters may require grad: no graph here
    def dout(self, cfg: Config) -> Tensor:
        """Change of the MLP's output ``Δz·W_out [N, d_model]`` under ``cfg`` (ε_M kept)."""
        W = self._dec_out
        out = self.dout_empty.clone() if cfg.default == "empty" else torch.zeros_like(self.dout_empty)
        keys = [t for t in cfg.targets if self._n_rows[t[0]]]
        if not keys:
            return out
        self._fill(keys)
        r, _, jj, _ = self._key_rows(keys)
        dflt = self.f_empty[r, jj] if cfg.default == "empty" else self.f[r, jj]
        v = torch.cat([self._acts[k] for k in keys]) - dflt
        # Σ_j (f'_j − f_j^default)·m_j·W_out: a gather of W's rows per (token, j), or, when the
        # (token, j) pairs fill more than 1/128 of [N, d_M] (the measured crossover on CPU is near
        # 1/160), a dense [N, d_M] change times W: each (token, j) is listed once, so one matmul
        dense = out.shape[0] * W.shape[0]
        if len(r) * DOUT_CROSSOVER > dense and dense <= DENSE_DOUT:
            delta = torch.zeros(out.shape[0], W.shape[0], dtype=v.dtype, device=v.device)
            delta.index_put_((r, jj), v, accumulate=True)  # a target listed twice adds, as below
            return out.addmm_(delta, W)
        return out.index_add_(0, r, v[:, None] * W[jj])

    # ---- the forward and the metric ------------------------------------------------------

    def _resid_change(self, dout: Tensor) -> Tensor:
        """The residual change ``[n, ctx, d]`` after the layer from ``Δz·W_out`` at the scored tokens."""
        n_seq, n_ctx = self.tokens.shape
        dr = torch.zeros(n_seq, n_ctx, dout.shape[-1], dtype=self.x.dtype, device=self.x.device)
        dr[:, 1:] = dout.view(n_seq, n_ctx - 1, -1)
        return dr

    def _forward(self, douts: list[Tensor]) -> list[Tensor]:
        """Logits per configuration (last position only for a task), given each one's Δz·W_out."""
        drs = [self._resid_change(d) for d in douts]
        out, passes = restart_logits(self.model, self.layer, self.tokens, self._tail, drs,
                                     self.task is not None, self.max_rows,
                                     clean=getattr(self, "clean_logits", None))
        self.passes += passes
        return out

    @torch.no_grad()  # the dictionaries' parameters may require grad: no graph here
    def values(self, configs: list[Config]) -> list[float]:
        """The metric m for each configuration (cached): logit difference, user metric or KL."""
        todo = list(dict.fromkeys(c for c in configs if c not in self._values))
        if todo:
            for c, v in zip(todo, restart_metric(self, [self._resid_change(self.dout(c)) for c in todo])):
                self._values[c] = v
        return [self._values[c] for c in configs]
