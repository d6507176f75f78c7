"""Ablating feature edges across layers: the scope, configurations and their metric (DESIGN §6, §12).

The scope S of a run of layers is every feature edge between adjacent sites — ``resid(L) →
mlp(L)``, ``resid(L) → resid(L+1)``, ``mlp(L) → resid(L+1)`` — at the (target token, source
token) pairs where the source carries something (``c = a − b ≠ 0``, ``b`` its patched or zero
value) and the target is active. The first site's features are the scope's inputs, and the last
sites feed the rest of the model.

Error nodes are kept clean by default (outside the scope). With ``errors="ablated"`` (DESIGN §6:
"report the errors-ablated variant too") each site's error ε is one more source node (global id
``n_features + site index``): its edges into the next sites carry ``ε − ε_b`` (``ε_b`` its
patched or zero value) at every non-BOS source position, and an ablated error edge makes its
target read ``ε_b`` there. BOS is never ablated, as in the one-layer scope, which never reads it.

A configuration (:class:`~featcircuit.ablation.Config` over global feature ids, see
:meth:`CrossContext.gid`) says which edges into each target are kept. Sites are computed in
order; a target reads, through each kept edge, its source's *current* value (after upstream
ablations) and, through each ablated edge, the source's ablation value ``b`` (ACDC's edge
semantics):

- ``mlp(L)`` feature j at token t: ``x' = x_∅ + Σ_{kept i} c'_i·r_i`` at t, then LN2, ``W_in``,
  σ and j's encoder, the clean TopK mask held (exact, as in the one-layer scope); an error
  entry adds ``(ε − ε_b)`` itself: its coefficient is 1 and its direction the error vector;
- ``resid(L+1)`` feature k at t: ``pre' = pre_∅ + Σ_{kept (u,s)} J_uk(s,t)·c'_u(s)`` with
  ``J`` the unit edge through the skip path, ``W_out`` and attention with its pattern and LN
  scale frozen at the clean run (:mod:`featcircuit.edges`), mask held (an error's ``J`` is its
  edge value and its ``c`` 1);
- the change of the last sites enters the residual after the last chosen layer through the same
  frozen maps, and the forward restarts there through the real remaining blocks.

With one layer the scope is the ``resid(L) → mlp(L)`` edges (and ε_R's, errors ablated) and
this equals :class:`~featcircuit.ablation.AblationContext` in either errors mode (tests check it).
Mean ablation is refused: ``a − mean`` is nonzero for almost every feature at every token, so
the scope through attention (every source position × feature into every target) is dense.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from .ablation import Config, Edge, Scorer, _check_errors
from .adapters import held_code, reads_pre_acts
from .edges import ERR, active_rows, coefficients, edges_into, out_grad
from .errors import UserError
from .replacement import Replacement, SiteKey
from .restart import capture_tail, restart_logits, restart_metric

CROSS_ABLATIONS = ("zero", "patch")
X_EMPTY_BYTES = 256 << 20  # above this, x_∅ per MLP row is not kept (configs add from x instead)


class _Entries:
    """Token-level scope entries into one site: (target row, source site, feature, position, J, c).

    An error entry has feature ``ERR``, ``c = 1`` and ``J`` its edge value; ``feat`` marks the
    feature entries (an error's value never changes upstream, so only features read ``dcode``).
    """

    def __init__(self, row, src_si, src, s, J, c, n):
        self.row, self.src_si, self.src, self.s, self.J, self.c, self.n = row, src_si, src, s, J, c, n
        self.feat = src != ERR
        self.edge = torch.empty(0, dtype=torch.long)
        self.row_ptr = self.src_key = self.by_src = self.src_sorted = self.edge


class CrossContext(Scorer):
    """Clean (and corrupt) traces of one token set over a run of layers, and a scorer of configs."""

    def __init__(self, rep: Replacement, tokens: Tensor, ablation: str = "zero", *,
                 corrupt: Tensor | None = None, task=None, metric=None, errors: str = "kept",
                 max_rows: int = 512):
        if ablation not in CROSS_ABLATIONS:
            raise UserError(f"ablation {ablation!r} is not supported across layers: use zero or patch "
                            "(mean ablation moves every feature at every token)")
        _check_errors(errors)
        if task is not None:
            tokens, corrupt, metric = task.clean, task.corrupt, task.metric
        if ablation == "patch" and (corrupt is None or corrupt.shape != tokens.shape):
            raise UserError("patch ablation needs corrupt prompts of the clean prompts' shape "
                            "(a task, or --prompts with clean/corrupt pairs)")
        self.rep, self.model, self.ablation, self.errors = rep, rep.model, ablation, errors
        self.layer = rep.layers[-1]
        self.task, self.user_metric, self.max_rows = task, (None if task is not None else metric), max_rows
        dev = next(self.model.parameters()).device
        self.tokens = tokens.to(dev)
        self.passes = 0
        with torch.no_grad():
            self.tr = rep.trace(self.tokens)
            base = rep.trace(corrupt.to(dev)) if corrupt is not None and ablation == "patch" else None
            self.co = coefficients(self.tr, base)
            self._tail = capture_tail(self.model, self.layer, self.tokens)
            rep.n_forward += 1  # capturing the restart point is one more full forward
        self.sites = list(rep.sites)
        self.si = {s: i for i, s in enumerate(self.sites)}
        widths = [rep.width(s) for s in self.sites]
        self.offset = [sum(widths[:i]) for i in range(len(widths))]
        self.n_features = sum(widths)
        self.n_ids = self.n_features + len(self.sites)  # features, then one error node per site
        self.g_out = self._out_grad()
        with torch.no_grad():
            self._mlp_out = rep.decoder(("mlp", self.layer)) @ rep.parts[self.layer].W_out  # [m, d]
            self._build()
            d = self.tr.acts[("resid", self.layer)].shape[-1]
            (logits,), passes = restart_logits(
                self.model, self.layer, self.tokens, self._tail,
                [torch.zeros(*self.tokens.shape, d, dtype=self.tr.logits.dtype)], self.task is not None,
                self.max_rows)
            self.passes += passes
            self.clean_logits = logits
            if self.task is None and self.user_metric is None:
                self.clean_logp = logits[:, 1:].log_softmax(-1)
                self.clean_p = self.clean_logp.exp()
        self._end_points()

    def _end_points(self) -> None:
        self._values: dict[Config, float] = {}
        self.m_full = self.values([Config.full()])[0]
        self.m_empty = self.values([Config.empty()])[0]

    def with_errors(self, errors: str) -> CrossContext:
        """The same context with the error nodes in (``"ablated"``) or out of (``"kept"``) the
        scope, sharing its forwards: the same as building it anew with ``errors``."""
        _check_errors(errors)
        other = copy.copy(self)
        other.errors = errors
        with torch.no_grad():
            other._build()
        other._end_points()
        return other

    # ---- ids ------------------------------------------------------------------------------

    def gid(self, site: SiteKey, feature: int) -> int:
        """Global id of a feature: the site's offset plus the feature index (the site's error
        node, ``feature == ERR``: ``n_features`` plus the site's index)."""
        if feature == ERR:
            return self.n_features + self.si[site]
        return self.offset[self.si[site]] + int(feature)

    def is_error(self, src: int) -> bool:
        return self.n_features <= src < self.n_ids

    def node(self, gid: int) -> tuple[SiteKey, int]:
        """(site, feature) of a global id (feature ``ERR`` for an error node)."""
        if self.n_features <= gid < self.n_ids:
            return self.sites[gid - self.n_features], ERR
        for i in range(len(self.sites) - 1, -1, -1):
            if gid >= self.offset[i]:
                return self.sites[i], gid - self.offset[i]
        raise ValueError(f"bad global feature id {gid}")

    # ---- the metric's gradient at the residual after the last layer ------------------------

    def _metric_fn(self):
        from .attribution import default_metric

        if self.task is not None:
            return lambda lg: self.task.metric(lg)
        if self.user_metric is not None:
            return lambda lg: self.user_metric(lg, self.tokens)
        n = self.tokens[:, 1:].numel()
        return lambda lg: default_metric(lg, self.tokens) / n  # KL's gradient is 0 at the clean run

    def _out_grad(self) -> Tensor:
        self.passes += 1
        return out_grad(self.model, self.layer, self.tokens, self._tail, self._metric_fn(),
                        self.tr.acts[("resid", self.layer)].shape[-1])

    # ---- the scope ------------------------------------------------------------------------

    def _build(self) -> None:
        """Active target rows and scope entries of every site; ∅ values; scope edge ids."""
        tr, rep = self.tr, self.rep
        ctx = self.tokens.shape[1]
        self.rows: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        self.entries: dict[int, _Entries] = {}
        self.empty_vals: dict[int, Tensor] = {}
        self.x_empty: dict[int, Tensor] = {}
        self.in_abs = torch.zeros(self.n_features, dtype=torch.float64)
        keys_all = []
        for si, site in enumerate(self.sites):
            if si == 0:
                continue
            n, t, k = active_rows(tr, site)
            self.rows[si] = (n, t, k)
            m = rep.width(site)
            rkey = (n * ctx + t) * m + k
            parts: dict[str, list[Tensor]] = {"row": [], "src_si": [], "src": [], "s": [], "J": [], "c": []}
            for ch in edges_into(rep, tr, self.co, site):
                # every target's Σ|e| over all its sources (errors, embedding too): influence's norm
                self.in_abs.index_add_(0, self.offset[si] + ch.dst, ch.value.abs().double())
                if ch.src_site[0] == "emb":
                    continue
                # errors join the scope when ablated, at non-BOS sources (BOS is never ablated)
                take = (ch.src != ERR) | ((ch.s > 0) & (self.errors == "ablated"))
                if not take.any():
                    continue
                psi = self.si[ch.src_site]
                seq, s, src = ch.seq[take], ch.s[take], ch.src[take]
                err = src == ERR
                c = torch.where(err, torch.ones((), dtype=ch.value.dtype),
                                self.co.codes[ch.src_site][seq, s, src.clamp_min(0)])
                row = torch.searchsorted(rkey, (seq * ctx + ch.t[take]) * m + ch.dst[take])
                parts["row"].append(row)
                parts["src_si"].append(torch.full_like(row, psi))
                parts["src"].append(src)
                parts["s"].append(s)
                parts["J"].append(ch.value[take] / c)
                parts["c"].append(c)
            dts = {"J": tr.acts[site].dtype, "c": tr.acts[site].dtype}
            cat = {key: torch.cat(v) if v else torch.zeros(0, dtype=dts.get(key, torch.long))
                   for key, v in parts.items()}
            order = torch.argsort(cat["row"], stable=True)  # entries grouped by target row
            cat = {key: v[order] for key, v in cat.items()}
            E = _Entries(cat["row"], cat["src_si"], cat["src"], cat["s"], cat["J"], cat["c"], n[cat["row"]])
            E.row_ptr = torch.searchsorted(E.row, torch.arange(len(n) + 1))
            E.src_key = self._src_key(E.src_si, E.n, E.s, E.src)
            E.by_src = torch.argsort(E.src_key, stable=True)
            E.src_sorted = E.src_key[E.by_src]
            self.entries[si] = E
            src_gid = torch.where(E.feat, torch.tensor(self.offset, dtype=torch.long)[E.src_si] + E.src,
                                  self.n_features + E.src_si)
            dst_gid = self.offset[si] + k[E.row]
            keys_all.append(dst_gid * self.n_ids + src_gid)
            x_in = tr.acts[("resid", site[1])]
            if site[0] == "mlp" and len(n) * x_in.shape[-1] * x_in.element_size() <= X_EMPTY_BYTES:
                # each row's input with every scope source ablated, x_∅ = x − Σ c·r: a config that
                # keeps few edges then starts from it (one [rows, d] array per MLP site, capped)
                x0 = x_in[n, t].clone()
                for e0 in range(0, len(E.row), 65536):  # bounded memory: [chunk, d]
                    sl = torch.arange(e0, min(e0 + 65536, len(E.row)))
                    x0.index_add_(0, E.row[sl], -E.c[sl, None] * self._dirs(si, sl))
                self.x_empty[si] = x0
            all_rows = torch.arange(len(n))
            self.empty_vals[si] = self._rows_values(si, all_rows, torch.zeros(0, dtype=torch.bool), {})
        keys = torch.cat(keys_all) if keys_all else torch.zeros(0, dtype=torch.long)
        self.edge_keys, inv = torch.unique(keys, return_inverse=True)  # sorted by (dst, src)
        self.edge_count = torch.bincount(inv, minlength=len(self.edge_keys))
        o = 0
        for si in sorted(self.entries):
            E = self.entries[si]
            E.edge = inv[o:o + len(E.row)]
            o += len(E.row)
        self.edge_dst = self.edge_keys // self.n_ids
        self.edge_src = self.edge_keys % self.n_ids
        # rows of each target feature: rows are sorted by (n, t, k); group them by k
        self.rows_by_feat = {}
        for si, (n, t, k) in self.rows.items():
            perm = torch.argsort(k, stable=True)
            bounds = torch.arange(self.rep.width(self.sites[si]) + 1)
            self.rows_by_feat[si] = (perm, torch.searchsorted(k[perm], bounds))

    def _src_key(self, psi: Tensor, n: Tensor, s: Tensor, u: Tensor) -> Tensor:
        """One key per source (site, sequence, position, feature); −1 for errors, which no
        upstream change reaches."""
        ctx = self.tokens.shape[1]
        m = max(self.rep.width(x) for x in self.sites)
        return torch.where(u == ERR, -1, ((psi * len(self.tokens) + n) * ctx + s) * m + u)

    def _dirs(self, si: int, idx: Tensor) -> Tensor:
        """The residual directions of the MLP site ``si``'s entries ``idx``: a feature's decoder
        row, an error's vector ``ε − ε_b`` at its token."""
        E = self.entries[si]
        L = self.sites[si][1]
        src = E.src[idx]
        out = self.rep.decoder(("resid", L))[src.clamp_min(0)]
        err = src == ERR
        if err.any():
            out[err] = self.co.errors[("resid", L)][E.n[idx[err]], E.s[idx[err]]]
        return out

    def scope(self) -> list[Edge]:
        """Every edge (src gid, dst gid) of the scope, in (dst, src) order."""
        return list(zip(self.edge_src.tolist(), self.edge_dst.tolist()))

    def scope_size(self) -> int:
        return len(self.edge_keys)

    # ---- one configuration ------------------------------------------------------------------

    def _kept(self, cfg: Config) -> Tensor:
        """Which scope edges ``cfg`` keeps (bool over edge ids)."""
        kept = torch.full((len(self.edge_keys),), cfg.default == "full", dtype=torch.bool)
        G = self.n_ids
        keep_js = [j for j, kind, _ in cfg.targets if kind == "keep"]
        if keep_js:  # a keep-set target: every other incoming edge ablated
            kept[torch.isin(self.edge_dst, torch.tensor(keep_js))] = False
        for kind, val in (("keep", True), ("remove", False)):
            keys = [j * G + i for j, k, srcs in cfg.targets if k == kind for i in srcs if i != ERR]
            if keys:
                kept[self._lookup(torch.tensor(keys))] = val
        return kept

    def _lookup(self, keys: Tensor) -> Tensor:
        """Edge ids of the scope keys among ``keys`` (keys outside the scope are skipped)."""
        pos = torch.searchsorted(self.edge_keys, keys).clamp_max(max(len(self.edge_keys) - 1, 0))
        return pos[self.edge_keys[pos] == keys] if len(self.edge_keys) else pos[:0]

    @staticmethod
    def _ranges(lo: Tensor, hi: Tensor) -> Tensor:
        """The concatenated index ranges ``[lo_i, hi_i)``."""
        cnt = (hi - lo).clamp_min(0)
        if int(cnt.sum()) == 0:
            return torch.zeros(0, dtype=torch.long)
        start = torch.repeat_interleave(lo, cnt)
        first = torch.repeat_interleave(torch.cumsum(cnt, 0) - cnt, cnt)
        return start + torch.arange(int(cnt.sum())) - first

    def _rows_values(self, si: int, rows: Tensor, kept: Tensor, dcode: dict[int, Tensor]) -> Tensor:
        """Codes of the site's active ``rows`` when kept scope edges carry their source's current
        value (``c + Δcode`` of the parents in ``dcode``) and ablated ones carry ``b``."""
        rep, site = self.rep, self.sites[si]
        n, t, k = self.rows[si]
        E = self.entries[si]
        rows = rows.sort().values
        idx = self._ranges(E.row_ptr[rows], E.row_ptr[rows + 1])  # entries of these rows
        remap = torch.full((len(n),), -1, dtype=torch.long)
        remap[rows] = torch.arange(len(rows))
        r_loc = remap[E.row[idx]]
        c = E.c[idx]
        cur = c.clone()
        for psi, dc in dcode.items():
            sel = (E.src_si[idx] == psi) & E.feat[idx]
            if sel.any():
                ii = idx[sel]
                cur[sel] += dc[E.n[ii], E.s[ii], E.src[ii]]
        kept_e = kept[E.edge[idx]] if len(kept) else torch.zeros(len(idx), dtype=torch.bool)
        now = torch.where(kept_e, cur, torch.zeros_like(cur))  # what each entry carries now
        w = now - c  # its change from the clean run: kept c' − c, ablated −c
        moved = w != 0
        code = self.tr.codes[site][n[rows], t[rows], k[rows]]
        if site[0] == "resid":
            return torch.relu(code.index_add(0, r_loc[moved], E.J[idx][moved] * w[moved]))
        # rows none of whose entries moved keep their exact clean value (no float drift downstream)
        still = torch.ones(len(rows), dtype=torch.bool)
        still[r_loc[moved]] = False
        if not (~still).any():
            return code
        go = torch.nonzero(~still)[:, 0]  # only the moved rows go through the MLP again
        local = torch.full((len(rows),), -1, dtype=torch.long)
        local[go] = torch.arange(len(go))
        L = site[1]
        carry = now != 0
        if si in self.x_empty and int(carry.sum()) < int(moved.sum()):  # fewer terms from x_∅ up
            on = carry & (local[r_loc] >= 0)
            x = self.x_empty[si][rows[go]].index_add(0, local[r_loc[on]],
                                                     now[on, None] * self._dirs(si, idx[on]))
        else:
            x = self.tr.acts[("resid", L)][n[rows[go]], t[rows[go]]].index_add(
                0, local[r_loc[moved]], w[moved, None] * self._dirs(si, idx[moved]))
        M = rep.dictionary(site)
        kk = k[rows[go]]
        out = torch.empty(len(go), dtype=x.dtype)
        # a foreign module is linearised at its clean input, the traced mid-MLP activation
        z_clean = None if reads_pre_acts(M) else self.tr.acts[site][n[rows[go]], t[rows[go]]]
        for s0 in range(0, len(go), 8192):  # bounded memory: [chunk, d_mlp]
            z = rep.parts[L].hidden(x[s0:s0 + 8192])
            kc = kk[s0:s0 + 8192]
            z0 = None if z_clean is None else z_clean[s0:s0 + 8192]
            out[s0:s0 + 8192] = held_code(M, z, kc, z0, code[go[s0:s0 + 8192]])
        return code.index_copy(0, go, out)

    def _x_out(self, cfg: Config) -> Tensor:
        """The change of the residual after the last chosen layer under ``cfg``.

        Only the rows a configuration can move are recomputed: rows of listed targets, and (when
        unlisted targets keep their edges) rows reading a source whose value changed upstream;
        with ``empty`` as default every unlisted target reads ablated sources (its ∅ value).
        """
        rep, tr = self.rep, self.tr
        kept = self._kept(cfg) if cfg.targets or cfg.default == "full" else torch.zeros(0, dtype=torch.bool)
        listed: dict[int, list[int]] = {}
        for j, _, _ in cfg.targets:
            (site, f) = self.node(j)
            listed.setdefault(self.si[site], []).append(f)
        dcode: dict[int, Tensor] = {}
        for si in range(1, len(self.sites)):
            site = self.sites[si]
            n, t, k = self.rows[si]
            E = self.entries[si]
            parts = []
            if si in listed:
                perm, ptr = self.rows_by_feat[si]
                fs = torch.tensor(listed[si])
                parts.append(perm[self._ranges(ptr[fs], ptr[fs + 1])])
            if cfg.default == "full":
                for psi, dc in dcode.items():
                    nz = torch.nonzero(dc, as_tuple=True)
                    if len(nz[0]) == 0:
                        continue
                    keys = self._src_key(torch.full_like(nz[0], psi), *nz)
                    lo = torch.searchsorted(E.src_sorted, keys)
                    hi = torch.searchsorted(E.src_sorted, keys, right=True)
                    parts.append(E.row[E.by_src[self._ranges(lo, hi)]])
            rows = torch.unique(torch.cat(parts)) if parts else torch.zeros(0, dtype=torch.long)
            base = None if cfg.default == "full" else self.empty_vals[si]
            if len(rows) == 0 and base is None:
                continue
            vals = base.clone() if base is not None else tr.codes[site][n, t, k].clone()
            if len(rows):
                vals[rows] = self._rows_values(si, rows, kept, dcode)
            diff = vals - tr.codes[site][n, t, k]
            if diff.any():
                d = torch.zeros_like(tr.codes[site])
                d[n, t, k] = diff
                dcode[si] = d
        L = self.layer
        ri, mi = self.si[("resid", L)], self.si[("mlp", L)]
        dx = _sparse_mm(dcode[ri], rep.decoder(("resid", L))) if ri in dcode else \
            torch.zeros_like(tr.acts[("resid", L)])
        dzo = _sparse_mm(dcode[mi], self._mlp_out) if mi in dcode else None
        return rep.step(L, tr, dx, dzo)

    def values(self, configs: list[Config]) -> list[float]:
        """The metric m for each configuration (cached)."""
        todo = list(dict.fromkeys(c for c in configs if c not in self._values))
        if todo:
            with torch.no_grad():
                for c, v in zip(todo, restart_metric(self, [self._x_out(c) for c in todo])):
                    self._values[c] = v
        return [self._values[c] for c in configs]


def _sparse_mm(d: Tensor, W: Tensor) -> Tensor:
    """``d @ W`` for ``d [..., m]`` whose rows are mostly zero: only the nonzero rows multiply."""
    flat = d.reshape(-1, d.shape[-1])
    on = torch.nonzero(flat.any(-1))[:, 0]
    out = torch.zeros(flat.shape[0], W.shape[1], dtype=torch.promote_types(d.dtype, W.dtype), device=d.device)
    out[on] = flat[on] @ W
    return out.view(*d.shape[:-1], W.shape[1])
