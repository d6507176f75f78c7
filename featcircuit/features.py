"""Feature analysis, one import away: stats, contexts, lens, cards, labels, evidence (DESIGN §8).

The work lives in modules of one idea each; this module keeps their public names importable from
one place, holds the quick unscored token labels and the ``featcircuit features`` command.

1. :mod:`featcircuit.stats`: per-feature statistics, the cached sparse index, density flags.
2. :mod:`featcircuit.contexts`: documents, distinct top contexts, quantile examples.
3. :mod:`featcircuit.lens`: the logit lens.
4. :mod:`featcircuit.cards`: feature cards (and token removal).
5. :mod:`featcircuit.labels`: labels as rules scored on held-out tokens.
6. :mod:`featcircuit.evidence`: the contexts behind an edge.
7. *Quick labels* (:func:`feature_label`, :func:`token_label`, :func:`labels_for`): the dominant
   token of the top ``k`` activations, unscored; :func:`labels_for` returns the scored rules
   instead when given them.
8. *CLI* (:func:`add_features_parser`, :func:`cmd_features`): ``featcircuit features --layer 2
   --site mlp --feature 45`` prints a card (``--json`` for the dict).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from .cards import analyze_features, feature_act_fn, feature_card, format_card, token_removal
from .contexts import (distinct_top, doc_ids, dominant, example_text, quantile_examples, short, show_token,
                       tok_str, token_set_text)
from .lens import LENS_MAD, LENS_RULE, feature_directions, lens_mask, lens_top_ids, unembed
from .sites import pair_sites
from .stats import (DENSE_FREQ, INDEX_VERSION, LABEL_K, _SITE_INDEX, FeatureIndex, FeatureStats, build_index,
                    candidate_edges, collect_stats, default_cache_dir, dense_features, drop_dense,
                    feature_index, index_key, is_dense, token_counts)

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


# ---- CLI --- ----------------------------------------------------------------------------------


def add_features_parser(subparsers) -> None:
    """Add ``featcircuit features`` to the CLI's sub-parsers."""
    from .cli import _add_model
    from .data import BUILTIN_DATA

    p = subparsers.add_parser("features", help="feature cards: top examples, activation bins, "
                                               "logit lens, token removal, density")
    _add_model(p)
    from . import checks as C
    from .cli import NONNEG

    p.add_argument("--layer", type=NONNEG, default=2)
    p.add_argument("--site", default="mlp", choices=sorted(_SITE_INDEX), help="which dictionary")
    p.add_argument("--feature", type=C.arg_type(C.nonneg_int, "--feature", 1 << 30), nargs="+",
                   required=True, help="feature index(es)")
    p.add_argument("--dicts", help="pair folder; default: the cached default pair (trained when absent)")
    p.add_argument("--data", default=BUILTIN_DATA)
    p.add_argument("--split", default="heldout")
    p.add_argument("--tokens", type=C.arg_type(C.positive_int, "--tokens", 10**10), default=C.DefaultInt(32768),
                   help="token budget of the analysis pass")
    p.add_argument("--top", type=C.arg_type(C.positive_int, "--top", 10**4), default=10,
                   help="top-activating examples shown")
    p.add_argument("--bins", type=C.arg_type(C.positive_int, "--bins", 10**4), default=8,
                   help="activation bins sampled")
    p.add_argument("--removal-window", type=C.arg_type(C.positive_int, "--removal-window", 10**5),
                   default=32, help="earlier tokens dropped in turn")
    p.add_argument("--no-removal", action="store_true", help="skip the token-removal reruns")
    p.add_argument("--label-tokens", type=C.arg_type(C.nonneg_int, "--label-tokens", 10**10), default=0,
                   help="fit a rule label on this many tokens of the training split and score it on "
                        "the analysed tokens (0: an unscored token label)")
    p.add_argument("--json", action="store_true", help="print the cards as JSON")
    p.set_defaults(func=cmd_features)


def cmd_features(args) -> None:
    """``featcircuit features``: print the cards of the given features."""
    from .data import load_tokens
    from .dictionary import load_pair
    from .models import load_model, model_name
    from .pairs import default_pair
    from .cli import precheck
    from .sites import check_layer

    precheck(args, tokens=args.tokens)
    model = load_model(args.model, args.device)
    layer = check_layer(model, args.layer)
    r, m = pair_sites(model, layer)
    if args.dicts:
        pair = load_pair(args.dicts, expect_model=model_name(model), expect_layer=layer, d_resid=r.width,
                         d_mlp=m.width, device=next(model.parameters()).device)
    else:
        pair, _ = default_pair(model, layer)
    from .errors import UserError

    d_sae = getattr(pair, args.site).cfg.d_sae
    bad = [f for f in args.feature if f >= d_sae]
    if bad:  # before any analysis pass
        raise UserError(f"--feature {bad[0]} is out of range: the {args.site} dictionary has "
                        f"features 0..{d_sae - 1}")
    tokens = load_tokens(args.data, model, n_tokens=args.tokens, split=args.split)
    labels = None
    if args.label_tokens:
        from .labels import label_pair

        train = load_tokens(args.data, model, n_tokens=args.label_tokens, split="train")
        labels = label_pair(model, pair, layer, train, tokens, features={args.site: args.feature},
                            progress=True)[args.site]
    cards = analyze_features(model, pair, tokens, layer, args.site, args.feature, n_top=args.top,
                             n_bins=args.bins, removal=not args.no_removal,
                             removal_window=args.removal_window, progress=True, labels=labels)
    if args.json:
        from .io import strict_json

        print(strict_json(cards, indent=1))  # NaN/inf become null + reason: strict readers parse it
    else:
        print("\n\n".join(format_card(c) for c in cards))
