"""Feature analysis, one import away: stats, contexts, lens, cards, labels, evidence (DESIGN §8).

The work lives in modules of one idea each; this module keeps their public names importable from
one place and holds the quick unscored token labels. The ``featcircuit features`` command is in
:mod:`featcircuit.cli`.

1. :mod:`featcircuit.stats`: per-feature statistics, the cached sparse index, density flags.
2. :mod:`featcircuit.contexts`: documents, distinct top contexts, quantile examples.
3. :mod:`featcircuit.lens`: the logit lens.
4. :mod:`featcircuit.cards`: feature cards (and token removal).
5. :mod:`featcircuit.labels`: labels as rules scored on held-out tokens.
6. :mod:`featcircuit.evidence`: the contexts behind an edge.
7. *Quick labels* (:func:`feature_label`, :func:`token_label`, :func:`labels_for`): the dominant
   token of the top ``k`` activations, unscored; :func:`labels_for` returns the scored rules
   instead when given them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from .cards import analyze_features, feature_act_fn, feature_card, format_card, token_removal
from .contexts import (
    distinct_top,
    doc_ids,
    dominant,
    example_text,
    quantile_examples,
    short,
    show_token,
    tok_str,
    token_set_text,
)
from .lens import LENS_MAD, LENS_RULE, feature_directions, lens_mask, lens_top_ids, unembed
from .stats import (
    DENSE_FREQ,
    INDEX_VERSION,
    LABEL_K,
    FeatureIndex,
    FeatureStats,
    build_index,
    candidate_edges,
    collect_stats,
    default_cache_dir,
    dense_features,
    drop_dense,
    feature_index,
    index_key,
    is_dense,
    token_counts,
)

__all__ = ["DENSE_FREQ", "INDEX_VERSION", "LABEL_K", "LENS_MAD", "LENS_RULE", "FeatureIndex", "FeatureStats",
           "analyze_features", "build_index", "candidate_edges", "collect_stats", "default_cache_dir",
           "dense_features", "distinct_top", "doc_ids", "drop_dense", "example_text", "feature_act_fn",
           "feature_card", "feature_directions", "feature_index", "feature_label", "format_card", "index_key",
           "is_dense", "labels_for", "lens_mask", "lens_top_ids", "quantile_examples", "show_token",
           "token_counts", "token_label", "token_removal", "unembed"]


# ---- quick labels ----------------------------------------------------------------------------


def feature_label(top_ids: Sequence[int], lens_id: int | None, tokenizer) -> str:
    """Short unscored label: the dominant activating token(s), then ``→`` the lens token when given."""
    text = token_set_text(dominant([int(t) for t in top_ids]), tokenizer)
    if lens_id is not None:
        text += " → " + short(tok_str(tokenizer, lens_id))
    return text


def token_label(stats: FeatureStats, tokens: Tensor, tokenizer, f: int, n: int = 2) -> str:
    """Short deterministic label: the dominant tokens among feature ``f``'s top activations."""
    vals, pos = stats.top_vals[f], stats.top_pos[f]
    ids = tokens.flatten()[pos[vals > 0]].tolist()
    return token_set_text(dominant(ids, n), tokenizer)


def labels_for(nodes: list[tuple[str, int]], stats: dict[str, FeatureStats], tokens: Tensor,
               tokenizer, layer: int, *, lens: bool = False,
               scored: Mapping[str, Mapping[int, Mapping]] | None = None) -> dict[str, str]:
    """``{node id: label}`` for (site, feature) pairs.

    With ``scored`` (``{site: {feature: label}}`` of :func:`featcircuit.labels.fit_labels`): each
    rule's text and held-out F1. Otherwise the dominant tokens of the top activations (``lens``:
    then ``→`` the top logit-lens token, the old style; the lens belongs in the card).
    """
    out = {}
    for site, f in nodes:
        nid = f"{site}{layer}/{f}"
        lab = (scored or {}).get(site, {}).get(f)
        if lab is not None:
            from .labels import label_text

            out[nid] = label_text(lab)
            continue
        s = stats[site]
        vals, pos = s.top_vals[f][:LABEL_K], s.top_pos[f][:LABEL_K]
        ids = tokens.flatten()[pos[vals > 0]].tolist()
        top = int(s.lens_top[f][0]) if lens and s.lens_top is not None and s.lens_top.shape[1] else None
        out[nid] = feature_label(ids, top, tokenizer)
    return out
