"""Feature activity over a token budget: per-feature statistics, the sparse index, density (DESIGN §8).

1. *Stats* (:func:`collect_stats`): per feature of both dictionaries, activation frequency, mean
   and maximum activation, the positions of its top activations and its top logit-lens tokens,
   as a :class:`FeatureStats`, read off the index below (no pass of its own).
2. *Index* (:func:`feature_index`): one pass over a token budget stores every nonzero activation
   of one dictionary, sparse and sorted by feature (a :class:`FeatureIndex`); it is cached in
   ``$FEATCIRCUIT_CACHE/features/`` under a key made of the dictionary's weights, the hook and the
   tokens, so later cards, labels and evidence of any feature need no pass over the data.
3. *Density*: a feature active on more than :data:`DENSE_FREQ` (10%) of tokens is *dense*
   (:func:`is_dense`, :func:`dense_features`); edge sums over tokens reward frequency, so
   :func:`drop_dense` / :func:`candidate_edges` keep dense features out of a candidate set.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .errors import UserError

INDEX_VERSION = 1
LABEL_K = 8  # top activations kept per feature by collect_stats (its default k)
DENSE_FREQ = 0.10  # a feature active on more than this fraction of tokens is dense


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

    def dense(self, limit: float = DENSE_FREQ) -> Tensor:
        """``[d_sae]`` bool: active on more than ``limit`` of the tokens."""
        return self.freq > limit


@torch.no_grad()
def collect_stats(rep, tokens: Tensor, *, k: int = LABEL_K, batch_size: int = 16,
                  lens: int = 3, progress: bool = True,
                  cache_dir: str | Path | Literal[False] | None = None) -> dict[str, FeatureStats]:
    """``{"resid": FeatureStats, "mlp": FeatureStats}`` of a one-layer replacement's pair over ``tokens``.

    Read off each dictionary's :class:`FeatureIndex` (cached, so cards and labels of the same
    tokens need no second pass); ``cache_dir`` as for :func:`feature_index`.
    """
    from .lens import feature_directions, lens_mask, lens_top_ids
    from .replacement import one_layer

    rep = one_layer(rep, "collect_stats")
    model = rep.model
    mask = lens_mask(model, token_counts(tokens, model.W_U.shape[1])) if lens > 0 else None
    out = {}
    indexes = feature_indexes(rep, tokens, cache_dir=cache_dir, progress=progress,
                              batch_size=batch_size)  # one pass for both sites on a cold cache
    for name, idx in indexes.items():
        top = None
        if mask is not None:
            top = lens_top_ids(model, feature_directions(rep, name), mask, lens)
        out[name] = stats_from_index(idx, k, top)
    return out


def stats_from_index(idx: FeatureIndex, k: int = LABEL_K, lens_top: Tensor | None = None) -> FeatureStats:
    """Frequency, mean and max activation and the top-``k`` activations of every feature of an index."""
    d, nnz = idx.d_sae, len(idx.val)
    count = (idx.offsets[1:] - idx.offsets[:-1]).float()
    feat = torch.repeat_interleave(torch.arange(d), (idx.offsets[1:] - idx.offsets[:-1]))
    val = idx.val.float()
    total = torch.zeros(d).index_add_(0, feat, val)
    vmax = torch.zeros(d).scatter_reduce_(0, feat, val, "amax", include_self=True)
    # each feature's activations by decreasing value (stable: ties keep position order)
    order = torch.argsort(val, descending=True, stable=True)
    order = order[torch.argsort(feat[order], stable=True)]
    rank = torch.arange(nnz) - idx.offsets[feat[order]]
    top = rank < k
    tv, tp = torch.zeros(d, k), torch.zeros(d, k, dtype=torch.long)  # unfilled slots: value 0
    tv[feat[order][top], rank[top]] = val[order][top]
    tp[feat[order][top], rank[top]] = idx.pos[order][top]
    return FeatureStats(count / idx.n_tokens, total / count.clamp_min(1), vmax, tv, tp, idx.n_tokens,
                        lens_top)


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
    if not hasattr(d, "cfg"):  # a wrapped module: every tensor of its state, by name
        state = sorted(d.state_dict().items())
        return _digest(INDEX_VERSION, model_name, hook, type(getattr(d, "module", d)).__qualname__,
                       *[x for k, t in state for x in (k, t)], tokens.to(torch.int64))
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
    return build_indexes(model, {site: (dictionary, hook)}, tokens, layer=layer, batch_size=batch_size,
                         progress=progress)[site]


@torch.no_grad()
def build_indexes(model, dicts: dict[str, tuple], tokens: Tensor, *, layer: int = -1, batch_size: int = 16,
                  progress: bool = False) -> dict[str, FeatureIndex]:
    """``{site: FeatureIndex}`` of several ``{site: (dictionary, hook)}`` from one pass over ``tokens``."""
    from .activations import harvest

    if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] < 2:
        raise UserError("feature analysis needs a [n_seq, n_ctx >= 2] token tensor, got "
                        f"{tuple(tokens.shape)}")
    n_ctx = tokens.shape[1]
    hooks = sorted({hook for _, hook in dicts.values()})
    found: dict[str, tuple[list, list, list]] = {site: ([], [], []) for site in dicts}
    for s in tqdm(range(0, len(tokens), batch_size), desc=f"feature index ({', '.join(dicts)})",
                  disable=not progress):
        b = tokens[s:s + batch_size]
        acts = harvest(model, b, hooks, batch_size=len(b), progress=False)
        for site, (dictionary, hook) in dicts.items():
            x = acts[hook][:, 1:]
            codes = dictionary.encode(x.flatten(0, 1).to(dictionary.W_dec.device)).float().cpu()
            row, f = torch.nonzero(codes > 0, as_tuple=True)
            feats, poss, vals = found[site]
            feats.append(f)
            poss.append((s + row // (n_ctx - 1)) * n_ctx + row % (n_ctx - 1) + 1)
            vals.append(codes[row, f])
    counts = token_counts(tokens, int(model.W_U.shape[1]))
    out = {}
    for site, (dictionary, hook) in dicts.items():
        f, p, v = (torch.cat(xs) for xs in found[site])
        order = torch.argsort(f * tokens.numel() + p)
        f, p, v = f[order], p[order], v[order]
        d_sae = dictionary.W_dec.shape[0]
        offsets = torch.zeros(d_sae + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(torch.bincount(f, minlength=d_sae), 0)
        out[site] = FeatureIndex(site, layer, hook, tokens.long().cpu(), offsets, p, v, counts)
    return out


def feature_index(rep, tokens: Tensor, site: str, *,
                  cache_dir: str | Path | Literal[False] | None = None,
                  progress: bool = False, batch_size: int = 16) -> FeatureIndex:
    """The :class:`FeatureIndex` of a one-layer replacement's ``site`` dictionary: from the cache,
    or one pass (then cached).

    ``cache_dir``: None for :func:`default_cache_dir`, a folder, or False for no cache.
    """
    return feature_indexes(rep, tokens, (site,), cache_dir=cache_dir, progress=progress,
                           batch_size=batch_size)[site]


def feature_indexes(rep, tokens: Tensor, sites=("resid", "mlp"), *,
                    cache_dir: str | Path | Literal[False] | None = None,
                    progress: bool = False, batch_size: int = 16) -> dict[str, FeatureIndex]:
    """``{site: FeatureIndex}`` of several of a one-layer replacement's dictionaries: cached ones
    are read, the others come from one shared pass over ``tokens`` (then cached); ``cache_dir`` as
    for :func:`feature_index`."""
    from .io import atomic_save_torch
    from .models import model_name
    from .replacement import one_layer

    rep = one_layer(rep, "feature_indexes")
    model, layer = rep.model, rep.layer
    name = model_name(model)
    out: dict[str, FeatureIndex] = {}
    todo: dict[str, tuple] = {}
    paths: dict[str, tuple[Path | None, str]] = {}
    for site in sites:
        d, hook = _site_dict(rep, site)
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
                        out[site] = FeatureIndex.from_dict(raw)
                        continue
                except Exception:  # a corrupt or foreign cache file is rebuilt, never trusted
                    pass
        todo[site], paths[site] = (d, hook), (path, key)
    if todo:
        for site, idx in build_indexes(model, todo, tokens, layer=layer, batch_size=batch_size,
                                       progress=progress).items():
            path, idx.key = paths[site]
            if path is not None:
                atomic_save_torch(idx.to_dict(), path)
            out[site] = idx
    return {site: out[site] for site in sites}


def _site_dict(rep, site: str):
    hook = rep.site(site).hook  # a UserError for anything but resid or mlp
    return rep.dictionary((site, rep.layer)), hook


# ---- 3. density ------------------------------------------------------------------------------


def is_dense(freq: float | None, limit: float = DENSE_FREQ) -> bool:
    """Whether a feature with activation frequency ``freq`` is dense (None: unknown, not dense)."""
    return freq is not None and float(freq) > limit


def dense_features(stats: dict[str, FeatureStats], limit: float = DENSE_FREQ) -> dict[str, list[int]]:
    """``{site: sorted feature indices}`` of the dense features of each dictionary."""
    return {site: torch.nonzero(s.dense(limit)).flatten().tolist() for site, s in stats.items()}


def drop_dense(table, stats: dict[str, FeatureStats], limit: float = DENSE_FREQ):
    """``table`` (an :class:`~featcircuit.attribution.EdgeTable`) without edges that touch a dense feature.

    The error node (src -1) is never dense; its edges into dense MLP features go too.
    """
    if not 0 <= limit <= 1:
        raise UserError(f"bad dense limit {limit!r}: use a fraction of tokens in [0, 1]")
    dr, dm = stats["resid"].dense(limit), stats["mlp"].dense(limit)
    bad = dm[table.dst] | ((table.src >= 0) & dr[table.src.clamp_min(0)])
    return table.select(torch.nonzero(~bad).flatten())


def candidate_edges(table, n: int, *, by: str = "abs_weight", stats: dict[str, FeatureStats] | None = None,
                    exclude_dense: bool = False, dense_limit: float = DENSE_FREQ,
                    features_only: bool = True):
    """The ``n`` edges of largest ``|by|``; with ``exclude_dense`` none that touches a dense feature."""
    if exclude_dense:
        if stats is None:
            raise UserError("exclude_dense needs the feature stats (collect_stats) to know which "
                            "features are dense")
        table = drop_dense(table, stats, dense_limit)
    return table.top(n, by=by, features_only=features_only)
