"""Feature statistics and short labels for graph nodes (DESIGN §8, first part).

One pass over a token budget collects, per feature of both dictionaries: activation frequency,
mean activation when active, maximum activation, and the tokens of its top activations. The
label drawn on a node is the feature's most frequent token among its top activations.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .sites import pair_sites


@dataclass
class FeatureStats:
    """Per-feature statistics of one dictionary over ``n_tokens`` tokens (BOS excluded)."""

    freq: Tensor  # [d_sae] fraction of tokens active
    mean_act: Tensor  # [d_sae] mean activation when active
    max_act: Tensor  # [d_sae]
    top_vals: Tensor  # [d_sae, k] largest activations
    top_pos: Tensor  # [d_sae, k] flat positions (seq·n_ctx + pos) of those activations
    n_tokens: int

    def node_stats(self, f: int) -> dict:
        """The graph node attributes of feature ``f``."""
        return {"freq": float(self.freq[f]), "mean_act": float(self.mean_act[f]),
                "max_act": float(self.max_act[f])}


@torch.no_grad()
def collect_stats(model, pair, tokens: Tensor, layer: int, *, k: int = 8, batch_size: int = 16,
                  progress: bool = True) -> dict[str, FeatureStats]:
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
    return {name: FeatureStats(a["count"] / n, a["sum"] / a["count"].clamp_min(1), a["max"], a["tv"],
                               a["tp"], n) for name, a in acc.items()}


def token_label(stats: FeatureStats, tokens: Tensor, tokenizer, f: int, n: int = 2) -> str:
    """Short deterministic label: the most common tokens among feature ``f``'s top activations."""
    vals, pos = stats.top_vals[f], stats.top_pos[f]
    ids = tokens.flatten()[pos[vals > 0]].tolist()
    if not ids:
        return "(never active)"
    counts = Counter(ids)
    best = sorted(counts, key=lambda t: (-counts[t], ids.index(t)))[:n]
    return " ".join(repr(tokenizer.decode([t])) for t in best)


def labels_for(nodes: list[tuple[str, int]], stats: dict[str, FeatureStats], tokens: Tensor,
               tokenizer, layer: int) -> dict[str, str]:
    """``{node id: label}`` for (site, feature) pairs."""
    return {f"{site}{layer}/{f}": token_label(stats[site], tokens, tokenizer, f) for site, f in nodes}
