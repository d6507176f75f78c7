"""Feature statistics, feature cards and short labels for graph nodes (DESIGN §8).

1. *Stats for labels* (:func:`collect_stats`): one pass over a token budget gives, per feature of
   both dictionaries, activation frequency, mean and maximum activation, the tokens of its top
   activations and its top logit-lens tokens (step 3), as a :class:`FeatureStats`.
2. *Index* (:func:`feature_index`): one pass over a token budget stores every nonzero activation
   of one dictionary, sparse and sorted by feature (a :class:`FeatureIndex`); it is cached in
   ``$FEATCIRCUIT_CACHE/features/`` under a key made of the dictionary's weights, the hook and the
   tokens, so later cards of any feature of that dictionary need no pass over the data.
3. *Logit lens* (:func:`feature_directions`, :func:`unembed`, :func:`lens_mask`): a feature's
   direction in the residual stream (``W_dec[i]`` for resid features, ``W_dec[j] @ W_out`` for MLP
   features) through the final norm's gain (centred first for LayerNorm) and ``W_U``. Tokens the
   lens never shows (rule :data:`LENS_RULE`): special tokens and vocabulary rows past the
   tokenizer, tokens that never occur in the analysed data, and unembedding-norm outliers
   (``‖W_U[:, t]‖ > median + 6·1.4826·MAD`` over the remaining tokens).
4. *Token removal* (:func:`token_removal`): at a feature's top activating position, each earlier
   token of the context is dropped in turn (BOS kept; the ``removal_window`` nearest tokens), the
   model re-runs on the shortened context and the change in the feature's activation at the same
   (now last) token is recorded.
5. *Cards* (:func:`analyze_features`, :func:`format_card`): top-activating contexts with the
   activating token marked ``⟦tok⟧``, one example drawn uniformly at random from each of
   ``n_bins`` equal-width activation bins in ``(0, max]``, the logit lens (top and bottom tokens),
   token-removal effects, activation frequency and a density histogram (counts per bin).
6. *Labels* (:func:`feature_label`, :func:`labels_for`): the dominant token of the top ``k``
   activations (plus the second when it recurs) and the top logit-lens token, e.g.
   ``'self' → '.'`` ("fires on self, promotes ."); deterministic.
7. *CLI* (:func:`add_features_parser`, :func:`cmd_features`): ``featcircuit features --layer 2
   --site mlp --feature 45`` prints a card (``--json`` for the dict).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .errors import UserError
from .sites import pair_sites

INDEX_VERSION = 1
LABEL_K = 8  # top activations the label's tokens are drawn from (collect_stats' default k)
LENS_MAD = 6.0
LENS_RULE = ("hidden from the logit lens: special tokens, vocabulary rows past the tokenizer, tokens "
             "never seen in the analysed data, and unembedding-norm outliers "
             f"(norm > median + {LENS_MAD:g}·1.4826·MAD)")
_SITE_INDEX = {"resid": 0, "mlp": 1}


# ---- 1. stats for labels ---------------------------------------------------------------------


@dataclass
class FeatureStats:
    """Per-feature statistics of one dictionary over ``n_tokens`` tokens (BOS excluded)."""

    freq: Tensor  # [d_sae] fraction of tokens active
    mean_act: Tensor  # [d_sae] mean activation when active
    max_act: Tensor  # [d_sae]
    top_vals: Tensor  # [d_sae, k] largest activations
    top_pos: Tensor  # [d_sae, k] flat positions (seq·n_ctx + pos) of those activations
    n_tokens: int
    lens_top: Tensor | None = None  # [d_sae, n] token ids with the largest logit-lens values

    def node_stats(self, f: int) -> dict:
        """The graph node attributes of feature ``f``."""
        return {"freq": float(self.freq[f]), "mean_act": float(self.mean_act[f]),
                "max_act": float(self.max_act[f])}


@torch.no_grad()
def collect_stats(model, pair, tokens: Tensor, layer: int, *, k: int = LABEL_K, batch_size: int = 16,
                  lens: int = 3, progress: bool = True) -> dict[str, FeatureStats]:
    """``{"resid": FeatureStats, "mlp": FeatureStats}`` of a pair over ``tokens``."""
    from .activations import harvest

    sites = pair_sites(model, layer)
    dicts = {"resid": pair.resid, "mlp": pair.mlp}
    n_ctx = tokens.shape[1]
    acc = {}
    for name, d in dicts.items():
        m = d.W_dec.shape[0]
        acc[name] = {"count": torch.zeros(m), "sum": torch.zeros(m), "max": torch.zeros(m),
                     "tv": torch.zeros(m, 0), "tp": torch.zeros(m, 0, dtype=torch.long)}
    for s in tqdm(range(0, len(tokens), batch_size), desc="feature stats", disable=not progress):
        b = tokens[s:s + batch_size]
        acts = harvest(model, b, [x.hook for x in sites], batch_size=len(b), progress=False)
        pos = (torch.arange(len(b))[:, None] * n_ctx + torch.arange(1, n_ctx)[None, :] + s * n_ctx).flatten()
        for site in sites:
            d = dicts[site.name]
            codes = d.encode(acts[site.hook][:, 1:].flatten(0, 1).to(d.W_dec.device)).cpu()
            a = acc[site.name]
            a["count"] += (codes > 0).sum(0)
            a["sum"] += codes.clamp_min(0).sum(0)
            a["max"] = torch.maximum(a["max"], codes.max(0).values)
            kk = min(k, len(codes))
            v, i = codes.T.topk(kk, dim=1)
            tv = torch.cat([a["tv"], v], 1)
            tp = torch.cat([a["tp"], pos[i]], 1)
            keep = tv.topk(min(k, tv.shape[1]), dim=1)
            a["tv"], a["tp"] = keep.values, tp.gather(1, keep.indices)
    n = tokens.shape[0] * (n_ctx - 1)
    out = {}
    mask = lens_mask(model, token_counts(tokens, model.W_U.shape[1])) if lens > 0 else None
    for name, a in acc.items():
        top = None
        if mask is not None:
            top = lens_top_ids(model, feature_directions(model, pair, layer, name), mask, lens)
        out[name] = FeatureStats(a["count"] / n, a["sum"] / a["count"].clamp_min(1), a["max"], a["tv"],
                                 a["tp"], n, top)
    return out


# ---- 2. the index: every nonzero activation of one dictionary --------------------------------


@dataclass
class FeatureIndex:
    """Every nonzero activation of one dictionary over ``tokens`` (BOS positions excluded).

    Activations are stored sparse, sorted by feature then position: feature ``f`` owns rows
    ``offsets[f]:offsets[f+1]`` of ``pos`` (flat ``seq·n_ctx + position``) and ``val``.
    """

    site: str
    layer: int
    hook: str
    tokens: Tensor  # [n_seq, n_ctx] long
    offsets: Tensor  # [d_sae + 1] long
    pos: Tensor  # [nnz] long
    val: Tensor  # [nnz] float32
    token_counts: Tensor  # [d_vocab] long: occurrences of each token at positions >= 1
    key: str = ""

    @property
    def d_sae(self) -> int:
        """Number of features."""
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        """Tokens the index covers (BOS positions excluded)."""
        return self.tokens.shape[0] * (self.tokens.shape[1] - 1)

    def acts(self, f: int) -> tuple[Tensor, Tensor]:
        """(flat positions, values) of feature ``f``'s nonzero activations, by position."""
        a, b = int(self.offsets[f]), int(self.offsets[f + 1])
        return self.pos[a:b], self.val[a:b]

    def to_dict(self) -> dict:
        """Tensors and fields for ``torch.save`` (loadable with ``weights_only=True``)."""
        return {"version": INDEX_VERSION, "site": self.site, "layer": self.layer, "hook": self.hook,
                "key": self.key, "tokens": self.tokens.to(torch.int32), "offsets": self.offsets,
                "pos": self.pos.to(torch.int32), "val": self.val.to(torch.float32),
                "token_counts": self.token_counts}

    @classmethod
    def from_dict(cls, d: dict) -> FeatureIndex:
        """The inverse of :meth:`to_dict`."""
        return cls(d["site"], int(d["layer"]), d["hook"], d["tokens"].long(), d["offsets"].long(),
                   d["pos"].long(), d["val"].float(), d["token_counts"].long(), d["key"])


def token_counts(tokens: Tensor, d_vocab: int) -> Tensor:
    """Occurrences ``[d_vocab]`` of each token id at positions >= 1 of ``tokens [n, n_ctx]``."""
    return torch.bincount(tokens[:, 1:].flatten().long(), minlength=d_vocab)[:d_vocab]


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, Tensor):
            t = p.detach().cpu().reshape(-1).contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(repr(p).encode())
    return h.hexdigest()[:20]


def index_key(dictionary, hook: str, tokens: Tensor, model_name: str) -> str:
    """Cache key of an index: the dictionary's weights, the hook, the model name and the tokens."""
    d = dictionary
    return _digest(INDEX_VERSION, model_name, hook, d.W_enc, d.W_dec, d.b_enc, d.b_dec,
                   getattr(d, "threshold", torch.zeros(())), d.cfg.architecture, d.cfg.k,
                   tokens.to(torch.int64))


def default_cache_dir() -> Path:
    """Where feature indexes are cached: ``$FEATCIRCUIT_CACHE/features``."""
    from .pairs import cache_root

    return cache_root() / "features"


@torch.no_grad()
def build_index(model, dictionary, hook: str, tokens: Tensor, *, site: str = "", layer: int = -1,
                batch_size: int = 16, progress: bool = False) -> FeatureIndex:
    """One pass over ``tokens``: every nonzero code of ``dictionary`` at ``hook`` (positions >= 1)."""
    from .activations import harvest

    if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] < 2:
        raise UserError("feature analysis needs a [n_seq, n_ctx >= 2] token tensor, got "
                        f"{tuple(tokens.shape)}")
    n_ctx = tokens.shape[1]
    dev = dictionary.W_dec.device
    feats, poss, vals = [], [], []
    for s in tqdm(range(0, len(tokens), batch_size), desc=f"feature index ({site or hook})",
                  disable=not progress):
        b = tokens[s:s + batch_size]
        x = harvest(model, b, [hook], batch_size=len(b), progress=False)[hook][:, 1:]
        codes = dictionary.encode(x.flatten(0, 1).to(dev)).float().cpu()
        row, f = torch.nonzero(codes > 0, as_tuple=True)
        flat = (s + row // (n_ctx - 1)) * n_ctx + row % (n_ctx - 1) + 1
        feats.append(f)
        poss.append(flat)
        vals.append(codes[row, f])
    f, p, v = torch.cat(feats), torch.cat(poss), torch.cat(vals)
    order = torch.argsort(f * tokens.numel() + p)
    f, p, v = f[order], p[order], v[order]
    d_sae = dictionary.W_dec.shape[0]
    offsets = torch.zeros(d_sae + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(torch.bincount(f, minlength=d_sae), 0)
    return FeatureIndex(site, layer, hook, tokens.long().cpu(), offsets, p, v,
                        token_counts(tokens, int(model.W_U.shape[1])))


def feature_index(model, pair, tokens: Tensor, layer: int, site: str, *,
                  cache_dir: str | Path | bool | None = None, progress: bool = False) -> FeatureIndex:
    """The :class:`FeatureIndex` of ``pair``'s ``site`` dictionary: from the cache, or one pass (then cached).

    ``cache_dir``: None for :func:`default_cache_dir`, a folder, or False for no cache.
    """
    from .io import atomic_save_torch
    from .models import model_name

    d, hook = _site_dict(model, pair, layer, site)
    name = model_name(model)
    key = index_key(d, hook, tokens, name)
    path = None
    if cache_dir is not False:
        folder = Path(cache_dir) if cache_dir else default_cache_dir()
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(name).name)
        path = folder / f"{safe}-L{layer}-{site}-{key}.pt"
        if path.is_file():
            try:
                raw = torch.load(path, weights_only=True)
                if raw.get("version") == INDEX_VERSION and raw.get("key") == key:
                    return FeatureIndex.from_dict(raw)
            except Exception:  # a corrupt or foreign cache file is rebuilt, never trusted
                pass
    idx = build_index(model, d, hook, tokens, site=site, layer=layer, progress=progress)
    idx.key = key
    if path is not None:
        atomic_save_torch(idx.to_dict(), path)
    return idx


def _site_dict(model, pair, layer: int, site: str):
    if site not in _SITE_INDEX:
        raise UserError(f"unknown site {site!r}: use resid or mlp")
    return (pair.resid if site == "resid" else pair.mlp), pair_sites(model, layer)[_SITE_INDEX[site]].hook


# ---- 3. logit lens ---------------------------------------------------------------------------


def feature_directions(model, pair, layer: int, site: str, features: Sequence[int] | None = None) -> Tensor:
    """Residual directions ``[n, d_model]`` of features: ``W_dec`` (resid) or ``W_dec @ W_out`` (mlp)."""
    from .sites import mlp_parts

    d, _ = _site_dict(model, pair, layer, site)
    W = d.W_dec.detach() if features is None else d.W_dec.detach()[torch.as_tensor(list(features),
                                                                                     dtype=torch.long)]
    W = W.float()
    if site == "mlp":
        W_out = mlp_parts(model, layer).W_out.float()
        W = W.to(W_out.device) @ W_out
    return W


def _final_norm(model):
    ln = getattr(model, "ln_final", None)
    return getattr(ln, "original_component", ln)


@torch.no_grad()
def unembed(model, directions: Tensor) -> Tensor:
    """Logit-lens values ``[n, d_vocab]``: directions through the final norm's gain and ``W_U``.

    LayerNorm centres its input, so the direction is centred first (RMSNorm does not); the
    norm's scale is left out (it only rescales every value of a token position alike).
    """
    W_U = model.W_U.detach().float()
    d = directions.float().to(W_U.device)
    ln = _final_norm(model)
    if ln is not None:
        norm_type = str(model.cfg.normalization_type).upper()
        rms = "rms" in type(ln).__name__.lower() or norm_type.startswith("RMS")
        if not rms:
            d = d - d.mean(-1, keepdim=True)
        w = getattr(ln, "weight", None)
        if w is not None:
            d = d * w.detach().float().to(d.device)
    return d @ W_U


@torch.no_grad()
def lens_mask(model, counts: Tensor | None = None, mad_k: float = LENS_MAD) -> Tensor:
    """Tokens ``[d_vocab]`` the logit lens may show (rule :data:`LENS_RULE`)."""
    W_U = model.W_U.detach().float()
    d_vocab = W_U.shape[1]
    ok = torch.ones(d_vocab, dtype=torch.bool)
    tok = getattr(model, "tokenizer", None)
    if tok is not None:
        ok[len(tok):] = False
        for t in getattr(tok, "all_special_ids", []) or []:
            if 0 <= t < d_vocab:
                ok[t] = False
    if counts is not None:
        ok &= counts[:d_vocab].cpu() > 0
    norms = W_U.norm(dim=0).cpu()
    if ok.sum() > 2:
        med = norms[ok].median()
        mad = (norms[ok] - med).abs().median()
        ok &= norms <= med + mad_k * 1.4826 * mad + 1e-6
    if not ok.any():  # nothing left (tiny data): fall back to every real token
        ok = torch.ones(d_vocab, dtype=torch.bool)
    return ok


@torch.no_grad()
def lens_top_ids(model, directions: Tensor, mask: Tensor, n: int, chunk: int = 512) -> Tensor:
    """Token ids ``[len(directions), n]`` with the largest logit-lens values among ``mask``."""
    out = []
    for s in range(0, len(directions), chunk):
        v = unembed(model, directions[s:s + chunk]).cpu()
        v[:, ~mask] = -torch.inf
        out.append(v.topk(min(n, int(mask.sum())), dim=1).indices)
    return torch.cat(out) if out else torch.zeros(0, n, dtype=torch.long)


# ---- 4. token removal ------------------------------------------------------------------------


def token_removal(act_fn: Callable[[Tensor], Tensor], context: Tensor, *, window: int | None = 32,
                  keep_first: int = 1, batch_size: int = 64) -> tuple[float, list[dict]]:
    """(activation, effects): the change at the last token of ``context`` as each earlier token is dropped.

    ``act_fn(tokens [b, n]) -> [b]`` is the activation at the last position of each row. Tokens
    ``keep_first`` (BOS) and earlier are never dropped; only the ``window`` tokens nearest the
    last one are tried (all when None). Effects are ``{"pos", "delta"}`` in context order.
    """
    context = context.long().flatten()
    p = len(context) - 1
    base = float(act_fn(context[None])[0])
    start = keep_first if window is None else max(keep_first, p - window)
    qs = list(range(start, p))
    if not qs:
        return base, []
    rows = torch.stack([torch.cat([context[:q], context[q + 1:]]) for q in qs])
    vals = torch.cat([act_fn(rows[i:i + batch_size]).flatten().float().cpu()
                      for i in range(0, len(rows), batch_size)])
    return base, [{"pos": q, "delta": float(v) - base} for q, v in zip(qs, vals.tolist())]


def feature_act_fn(model, dictionary, hook: str, feature: int) -> Callable[[Tensor], Tensor]:
    """``act_fn`` for :func:`token_removal`: feature ``feature``'s code at the last position of each row."""
    from .activations import harvest

    dev = dictionary.W_dec.device

    @torch.no_grad()
    def act(batch: Tensor) -> Tensor:
        x = harvest(model, batch, [hook], batch_size=len(batch), progress=False)[hook][:, -1]
        return dictionary.encode(x.to(dev))[:, feature].float().cpu()

    return act


# ---- 5. cards --------------------------------------------------------------------------------


def _tok_str(tokenizer, t: int) -> str:
    return tokenizer.decode([int(t)]) if tokenizer is not None else f"<{int(t)}>"


def _example(index: FeatureIndex, vals_at: dict[int, float], flat: int, tokenizer, left: int,
             right: int) -> dict:
    n_ctx = index.tokens.shape[1]
    s, p = divmod(int(flat), n_ctx)
    a, b = max(0, p - left), min(n_ctx, p + right + 1)
    ids = index.tokens[s, a:b].tolist()
    return {"seq": s, "pos": p, "act": vals_at.get(int(flat), 0.0), "index": p - a,
            "ids": ids, "tokens": [_tok_str(tokenizer, t) for t in ids],
            "values": [vals_at.get(s * n_ctx + q, 0.0) for q in range(a, b)]}


def _dominant(ids: list[int], n: int = 2) -> list[int]:
    """The most common id, then (up to ``n`` in all) further ids that occur at least twice."""
    if not ids:
        return []
    counts = Counter(ids)
    best = sorted(counts, key=lambda t: (-counts[t], ids.index(t)))
    return [best[0]] + [t for t in best[1:n] if counts[t] >= 2]


def _short(s: str, limit: int = 14) -> str:
    r = repr(s)
    return r if len(r) <= limit else r[: limit - 2] + "…" + r[-1]


def feature_label(top_ids: Sequence[int], lens_id: int | None, tokenizer) -> str:
    """Short label: the dominant activating token(s), then ``→`` the top logit-lens token."""
    dom = _dominant([int(t) for t in top_ids])
    text = " ".join(_short(_tok_str(tokenizer, t)) for t in dom) if dom else "(never active)"
    if lens_id is not None:
        text += " → " + _short(_tok_str(tokenizer, lens_id))
    return text


def feature_card(model, pair, index: FeatureIndex, f: int, *, n_top: int = 10, n_bins: int = 8,
                 n_hist: int = 20, n_lens: int = 10, removal: bool = True, removal_window: int = 32,
                 left: int = 24, right: int = 4, seed: int = 0, mask: Tensor | None = None,
                 lens_values: Tensor | None = None) -> dict:
    """The card (a JSON-able dict) of feature ``f`` of the dictionary ``index`` was built from."""
    tok = getattr(model, "tokenizer", None)
    site, layer = index.site, index.layer
    if not 0 <= f < index.d_sae:
        raise UserError(f"unknown feature {site}:{f}: the {site} dictionary has features "
                        f"0..{index.d_sae - 1}")
    pos, val = index.acts(f)
    vals_at = dict(zip(pos.tolist(), val.tolist()))
    n_active = len(val)
    vmax = float(val.max()) if n_active else 0.0
    card: dict = {"id": f"{site}{layer}/{f}", "site": site, "layer": layer, "feature": f,
                  "hook": index.hook, "n_tokens": index.n_tokens, "n_active": n_active,
                  "freq": n_active / max(1, index.n_tokens),
                  "mean_act": float(val.mean()) if n_active else 0.0, "max_act": vmax}
    # top-activating contexts (ties: earlier position first)
    order = sorted(range(n_active), key=lambda i: (-float(val[i]), int(pos[i])))
    card["top"] = [_example(index, vals_at, int(pos[i]), tok, left, right) for i in order[:n_top]]
    # one example per equal-width bin of (0, max], drawn uniformly within the bin
    g = torch.Generator().manual_seed(seed * 1_000_003 + f)
    bins = []
    edges = torch.linspace(0, vmax, n_bins + 1).tolist() if n_active else []
    for b in range(len(edges) - 1):
        lo, hi = edges[b], edges[b + 1]
        inside = torch.nonzero((val > lo) & (val <= hi if b < n_bins - 1 else val <= vmax)).flatten()
        ex = None
        if len(inside):
            pick = int(inside[torch.randint(len(inside), (1,), generator=g)])
            ex = _example(index, vals_at, int(pos[pick]), tok, left, right)
        bins.append({"lo": lo, "hi": hi, "count": len(inside), "example": ex})
    card["bins"] = bins
    # density histogram of the nonzero activations
    if n_active:
        counts = torch.histc(val, bins=n_hist, min=0.0, max=vmax if vmax > 0 else 1.0)
        h_edges = torch.linspace(0, vmax if vmax > 0 else 1.0, n_hist + 1).tolist()
    else:
        counts, h_edges = torch.zeros(n_hist), torch.linspace(0, 1, n_hist + 1).tolist()
    card["histogram"] = {"edges": h_edges, "counts": [int(c) for c in counts.tolist()]}
    # logit lens
    if mask is None:
        mask = lens_mask(model, index.token_counts)
    if lens_values is None:
        lens_values = unembed(model, feature_directions(model, pair, layer, site, [f]))[0]
    lv = lens_values.detach().float().cpu()
    k = min(n_lens, int(mask.sum()))
    top = torch.where(mask, lv, torch.full_like(lv, -torch.inf)).topk(k)
    bot = torch.where(mask, -lv, torch.full_like(lv, -torch.inf)).topk(k)
    ent = lambda i: {"id": int(i), "token": _tok_str(tok, int(i)), "value": float(lv[i])}  # noqa: E731
    elig = lv[mask]
    lh = torch.histc(elig, bins=n_hist, min=float(elig.min()), max=float(elig.max()) + 1e-9)
    lh_edges = torch.linspace(float(elig.min()), float(elig.max()) + 1e-9, n_hist + 1).tolist()
    card["lens"] = {"top": [ent(i) for i in top.indices.tolist()],
                    "bottom": [ent(i) for i in bot.indices.tolist()],
                    "n_shown": int(mask.sum()), "n_vocab": len(lv), "rule": LENS_RULE,
                    "histogram": {"edges": lh_edges, "counts": [int(c) for c in lh.tolist()]}}
    # token removal at the top activating position
    card["removal"] = None
    if removal and n_active:
        ex = card["top"][0]
        s, p = ex["seq"], ex["pos"]
        context = index.tokens[s, :p + 1]
        bos = getattr(tok, "bos_token_id", None) if tok is not None else None
        d, _ = _site_dict(model, pair, layer, site)
        base, effects = token_removal(feature_act_fn(model, d, index.hook, f), context,
                                      window=removal_window,
                                      keep_first=1 if bos is not None and int(context[0]) == bos else 0)
        for e in effects:
            e["token"] = _tok_str(tok, int(context[e["pos"]]))
        card["removal"] = {"seq": s, "pos": p, "act": base, "window": removal_window,
                           "token": _tok_str(tok, int(context[p])), "effects": effects}
    top_ids = [int(index.tokens.flatten()[int(pos[i])]) for i in order[:LABEL_K]]
    card["label"] = feature_label(top_ids, card["lens"]["top"][0]["id"] if card["lens"]["top"] else None, tok)
    return card


def analyze_features(model, pair, tokens: Tensor, layer: int, site: str, features: Sequence[int], *,
                     n_top: int = 10, n_bins: int = 8, n_hist: int = 20, n_lens: int = 10,
                     removal: bool = True, removal_window: int = 32, seed: int = 0,
                     cache_dir: str | Path | bool | None = None, progress: bool = False) -> list[dict]:
    """Cards of ``features`` of the ``site`` dictionary, from one (cached) pass over ``tokens``."""
    index = feature_index(model, pair, tokens, layer, site, cache_dir=cache_dir, progress=progress)
    features = [int(f) for f in features]
    bad = [f for f in features if not 0 <= f < index.d_sae]
    if bad:
        raise UserError(f"unknown feature {site}:{bad[0]}: the {site} dictionary has features "
                        f"0..{index.d_sae - 1}")
    if not features:
        return []
    mask = lens_mask(model, index.token_counts)
    lens = unembed(model, feature_directions(model, pair, layer, site, features)).cpu()
    return [feature_card(model, pair, index, f, n_top=n_top, n_bins=n_bins, n_hist=n_hist,
                         n_lens=n_lens, removal=removal, removal_window=removal_window, seed=seed,
                         mask=mask, lens_values=lens[i])
            for i, f in enumerate(tqdm(features, desc="feature cards", disable=not progress))]


def show_token(s: str) -> str:
    """A token for one-line display: newline ⏎, tab ⇥, other control characters as ·."""
    return "".join("⏎" if c == "\n" else "⇥" if c == "\t" else "·" if ord(c) < 32 else c for c in s)


def example_text(ex: dict) -> str:
    """An example's context on one line with the activating token marked ``⟦tok⟧``."""
    return "".join(f"⟦{show_token(t)}⟧" if i == ex["index"] else show_token(t)
                   for i, t in enumerate(ex["tokens"]))


def format_card(card: dict, width: int = 40) -> str:
    """A plain-text rendering of a card for the terminal."""
    L = [f"== {card['id']}  {card['label']} ==",
         f"active on {card['n_active']:,} of {card['n_tokens']:,} tokens (freq {card['freq']:.4%}); "
         f"mean {card['mean_act']:.3g}, max {card['max_act']:.3g}  [{card['hook']}]", "",
         "top activations:"]
    L += [f"  {ex['act']:>8.3f}  {example_text(ex)}" for ex in card["top"]] or ["  (never active)"]
    L += ["", "one example per activation bin (uniform within the bin):"]
    for b in card["bins"]:
        ex = b["example"]
        L.append(f"  ({b['lo']:.3g}, {b['hi']:.3g}] n={b['count']:<6} "
                 + (f"{ex['act']:.3f}  {example_text(ex)}" if ex else "-"))
    lens = card["lens"]
    L += ["", f"logit lens ({lens['n_shown']:,} of {lens['n_vocab']:,} tokens shown):"]
    for a, b in zip(lens["top"], lens["bottom"]):
        L.append(f"  {a['value']:>+8.3f} {_short(a['token'], width // 2):<{width // 2 + 2}}"
                 f"  {b['value']:>+8.3f} {_short(b['token'], width // 2)}")
    rem = card.get("removal")
    if rem:
        L += ["", f"token removal at the top example (seq {rem['seq']}, pos {rem['pos']}, "
                  f"{show_token(rem['token'])!r}: {rem['act']:.3f}); largest changes:"]
        for e in sorted(rem["effects"], key=lambda e: -abs(e["delta"]))[:8]:
            L.append(f"  pos {e['pos']:>4} (-{rem['pos'] - e['pos']:>2}) {_short(e['token'], 18):<20} "
                     f"{e['delta']:>+8.3f}")
    h = card["histogram"]
    L += ["", "activation density (counts per bin of (0, max]):"]
    peak = max(h["counts"]) or 1
    for lo, hi, c in zip(h["edges"], h["edges"][1:], h["counts"]):
        L.append(f"  {lo:>7.3g}-{hi:<7.3g} {c:>7} {'█' * round(30 * c / peak)}")
    return "\n".join(L)


# ---- 6. labels -------------------------------------------------------------------------------


def token_label(stats: FeatureStats, tokens: Tensor, tokenizer, f: int, n: int = 2) -> str:
    """Short deterministic label: the dominant tokens among feature ``f``'s top activations."""
    vals, pos = stats.top_vals[f], stats.top_pos[f]
    ids = tokens.flatten()[pos[vals > 0]].tolist()
    if not ids:
        return "(never active)"
    return " ".join(_short(_tok_str(tokenizer, t)) for t in _dominant(ids, n))


def labels_for(nodes: list[tuple[str, int]], stats: dict[str, FeatureStats], tokens: Tensor,
               tokenizer, layer: int) -> dict[str, str]:
    """``{node id: label}`` for (site, feature) pairs: dominant tokens ``→`` top logit-lens token."""
    out = {}
    for site, f in nodes:
        s = stats[site]
        vals, pos = s.top_vals[f][:LABEL_K], s.top_pos[f][:LABEL_K]
        ids = tokens.flatten()[pos[vals > 0]].tolist()
        lens = int(s.lens_top[f][0]) if s.lens_top is not None and s.lens_top.shape[1] else None
        out[f"{site}{layer}/{f}"] = feature_label(ids, lens, tokenizer)
    return out


# ---- 7. CLI ----------------------------------------------------------------------------------


def add_features_parser(subparsers) -> None:
    """Add ``featcircuit features`` to the CLI's sub-parsers."""
    from .cli import _add_model
    from .data import BUILTIN_DATA

    p = subparsers.add_parser("features", help="feature cards: top examples, activation bins, "
                                               "logit lens, token removal, density")
    _add_model(p)
    p.add_argument("--layer", type=int, default=2)
    p.add_argument("--site", default="mlp", choices=sorted(_SITE_INDEX), help="which dictionary")
    p.add_argument("--feature", type=int, nargs="+", required=True, help="feature index(es)")
    p.add_argument("--dicts", help="pair folder; default: the cached default pair (trained when absent)")
    p.add_argument("--data", default=BUILTIN_DATA)
    p.add_argument("--split", default="heldout")
    p.add_argument("--tokens", type=int, default=32768, help="token budget of the analysis pass")
    p.add_argument("--top", type=int, default=10, help="top-activating examples shown")
    p.add_argument("--bins", type=int, default=8, help="activation bins sampled")
    p.add_argument("--removal-window", type=int, default=32, help="earlier tokens dropped in turn")
    p.add_argument("--no-removal", action="store_true", help="skip the token-removal reruns")
    p.add_argument("--json", action="store_true", help="print the cards as JSON")
    p.set_defaults(func=cmd_features)


def cmd_features(args) -> None:
    """``featcircuit features``: print the cards of the given features."""
    from .data import load_tokens
    from .dictionary import load_pair
    from .models import load_model, model_name
    from .pairs import default_pair
    from .sites import check_layer

    model = load_model(args.model, args.device)
    layer = check_layer(model, args.layer)
    r, m = pair_sites(model, layer)
    if args.dicts:
        pair = load_pair(args.dicts, expect_model=model_name(model), expect_layer=layer, d_resid=r.width,
                         d_mlp=m.width, device=next(model.parameters()).device)
    else:
        pair, _ = default_pair(model, layer)
    tokens = load_tokens(args.data, model, n_tokens=args.tokens, split=args.split)
    cards = analyze_features(model, pair, tokens, layer, args.site, args.feature, n_top=args.top,
                             n_bins=args.bins, removal=not args.no_removal,
                             removal_window=args.removal_window, progress=True)
    if args.json:
        print(json.dumps(cards, indent=1))
    else:
        print("\n\n".join(format_card(c) for c in cards))
