"""Feature cards: what a researcher reads to judge one feature (DESIGN §8).

1. *Top activations* from the feature's :class:`~featcircuit.stats.FeatureIndex`, distinct by
   document and by near-identical context (:func:`featcircuit.contexts.distinct_top`), the
   activating token marked ``⟦tok⟧``.
2. *Across the range*: one example from each of ``n_quantiles`` equal-size quantile groups of
   the nonzero activations, and one drawn uniformly from each of ``n_bins`` equal-width bins of
   ``(0, max]`` (the Neuronpedia dashboards' bins).
3. *Density*: activation frequency, the dense flag (more than :data:`DENSE_FREQ` of tokens) and
   a histogram of the nonzero activations.
4. *Logit lens* (:mod:`featcircuit.lens`): top and bottom tokens; the top token is shown in the
   card only, never in the label.
5. *Token removal* (:func:`token_removal`): at the top activating position, each earlier token of
   the context is dropped in turn (BOS kept; the ``removal_window`` nearest tokens), the model
   re-runs on the shortened context and the change in the activation is recorded
   (:func:`add_removals` runs every card's contexts of one site in shared, padded passes).
6. *Label*: a scored rule from :mod:`featcircuit.labels` when the caller passes one (text,
   precision, recall and F1 on held-out tokens); otherwise the dominant token of the top
   activations, unscored.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .contexts import (
    distinct_top,
    doc_ids,
    dominant,
    example,
    example_text,
    quantile_examples,
    short,
    show_token,
    tok_str,
    token_set_text,
)
from .errors import UserError
from .lens import LENS_RULE, feature_directions, lens_mask, unembed
from .replacement import check_index, one_layer
from .stats import DENSE_FREQ, LABEL_K, FeatureIndex, _site_dict, feature_index

# ---- token removal ---------------------------------------------------------------------------

def token_removal(act_fn: Callable[[Tensor], Tensor], context: Tensor, *, window: int | None = 32,
                  keep_first: int = 1, batch_size: int = 64) -> tuple[float, list[dict]]:
    """(activation, effects): the change at the last token of ``context`` as each earlier token is dropped.

    ``act_fn(tokens [b, n]) -> [b]`` is the activation at the last position of each row. Tokens
    ``keep_first`` (BOS) and earlier are never dropped; only the ``window`` tokens nearest the
    last one are tried (all when None). Effects are ``{"pos", "delta"}`` in context order.
    """
    context = context.long().flatten()
    base = float(act_fn(context[None])[0])
    qs, dropped = _removal_rows(context, window, keep_first)
    if not qs:
        return base, []
    rows = torch.stack(dropped)
    vals = torch.cat([act_fn(rows[i:i + batch_size]).flatten().float().cpu()
                      for i in range(0, len(rows), batch_size)])
    return base, [{"pos": q, "delta": float(v) - base} for q, v in zip(qs, vals.tolist())]


def _removal_rows(context: Tensor, window: int | None, keep_first: int) -> tuple[list[int], list[Tensor]]:
    """The positions :func:`token_removal` drops, and the context without each of them."""
    p = len(context) - 1
    start = keep_first if window is None else max(keep_first, p - window)
    qs = list(range(start, p))
    return qs, [torch.cat([context[:q], context[q + 1:]]) for q in qs]


def feature_act_fn(model, dictionary, hook: str, feature: int) -> Callable[[Tensor], Tensor]:
    """``act_fn`` for :func:`token_removal`: feature ``feature``'s code at the last position of each row."""
    from .activations import harvest

    dev = dictionary.W_dec.device

    @torch.no_grad()
    def act(batch: Tensor) -> Tensor:
        x = harvest(model, batch, [hook], batch_size=len(batch), progress=False)[hook][:, -1]
        return dictionary.encode(x.to(dev))[:, feature].float().cpu()

    return act
# ---- cards -----------------------------------------------------------------------------------


def feature_card(rep, index: FeatureIndex, f: int, *, n_top: int = 10, n_bins: int = 8,
                 n_hist: int = 20, n_lens: int = 10, removal: bool = True, removal_window: int = 32,
                 left: int = 24, right: int = 4, seed: int = 0, mask: Tensor | None = None,
                 lens_values: Tensor | None = None, label: Mapping | None = None, per_doc: int = 1,
                 n_quantiles: int = 5, docs: Tensor | None = None, dense_limit: float = DENSE_FREQ) -> dict:
    """The card (a JSON-able dict) of feature ``f`` of the dictionary ``index`` was built from
    (``rep``: the one-layer :class:`~featcircuit.replacement.Replacement` that dictionary is in;
    None is enough when ``mask`` and ``lens_values`` are given and ``removal`` is off).

    ``label``: a scored label of :func:`featcircuit.labels.fit_labels` (its ``text`` becomes the
    card's label, the rest its ``label_score``); ``docs``: :func:`featcircuit.contexts.doc_ids`
    of ``index.tokens`` (computed when None).
    """
    if rep is not None:
        rep = one_layer(rep, "feature_card")
        check_index(rep, index, "feature_card")
    model = None if rep is None else rep.model
    tok = getattr(model, "tokenizer", None)
    site, layer = index.site, index.layer
    if not 0 <= f < index.d_sae:
        raise UserError(f"unknown feature {site}:{f}: the {site} dictionary has features "
                        f"0..{index.d_sae - 1}")
    if docs is None:
        docs = doc_ids(index.tokens, getattr(tok, "bos_token_id", None) if tok is not None else None)
    pos, val = index.acts(f)
    vals_at = dict(zip(pos.tolist(), val.tolist()))
    n_active = len(val)
    vmax = float(val.max()) if n_active else 0.0
    freq = n_active / max(1, index.n_tokens)
    ex = lambda i: example(index.tokens, vals_at, int(pos[i]), tok, left, right)  # noqa: E731
    card: dict = {"id": f"{site}{layer}/{f}", "site": site, "layer": layer, "feature": f,
                  "hook": index.hook, "n_tokens": index.n_tokens, "n_active": n_active,
                  "freq": freq, "dense": freq > dense_limit, "dense_limit": dense_limit,
                  "mean_act": float(val.mean()) if n_active else 0.0, "max_act": vmax}
    # top-activating contexts, distinct by document and context (ties: earlier position first)
    top = distinct_top(pos, val, index.tokens, docs, n_top, per_doc=per_doc)
    card["top"] = [ex(i) for i in top]
    card["n_docs"] = len({int(d) for d in docs.reshape(-1)[pos].tolist()}) if n_active else 0
    # one example per quantile group of the nonzero activations
    qs = quantile_examples(pos, val, docs, n_quantiles, seed=seed * 1_000_003 + f)
    card["quantiles"] = [{k: v for k, v in q.items() if k != "pick"}
                         | {"example": ex(q["pick"]) if q["pick"] is not None else None} for q in qs]
    # one example per equal-width bin of (0, max], drawn uniformly within the bin
    g = torch.Generator().manual_seed(seed * 1_000_003 + f)
    bins = []
    edges = torch.linspace(0, vmax, n_bins + 1).tolist() if n_active else []
    for b in range(len(edges) - 1):
        lo, hi = edges[b], edges[b + 1]
        inside = torch.nonzero((val > lo) & (val <= hi if b < n_bins - 1 else val <= vmax)).flatten()
        e = None
        if len(inside):
            e = ex(int(inside[torch.randint(len(inside), (1,), generator=g)]))
        bins.append({"lo": lo, "hi": hi, "count": len(inside), "example": e})
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
        lens_values = unembed(model, feature_directions(rep, site, [f]))[0]
    lv = lens_values.detach().float().cpu()
    k = min(n_lens, int(mask.sum()))
    ltop = torch.where(mask, lv, torch.full_like(lv, -torch.inf)).topk(k)
    lbot = torch.where(mask, -lv, torch.full_like(lv, -torch.inf)).topk(k)
    ent = lambda i: {"id": int(i), "token": tok_str(tok, int(i)), "value": float(lv[i])}  # noqa: E731
    elig = lv[mask]
    lh = torch.histc(elig, bins=n_hist, min=float(elig.min()), max=float(elig.max()) + 1e-9)
    lh_edges = torch.linspace(float(elig.min()), float(elig.max()) + 1e-9, n_hist + 1).tolist()
    card["lens"] = {"top": [ent(i) for i in ltop.indices.tolist()],
                    "bottom": [ent(i) for i in lbot.indices.tolist()],
                    "n_shown": int(mask.sum()), "n_vocab": len(lv), "rule": LENS_RULE,
                    "histogram": {"edges": lh_edges, "counts": [int(c) for c in lh.tolist()]}}
    # token removal at the top activating position
    card["removal"] = None
    if removal and n_active:
        d, _ = _site_dict(rep, site)
        context, keep_first = _removal_context(model, index, card)
        base, effects = token_removal(feature_act_fn(model, d, index.hook, f), context,
                                      window=removal_window, keep_first=keep_first)
        _set_removal(model, card, context, base, effects, removal_window)
    # label: the scored rule when given, else the dominant token of the top activations (unscored)
    if label is not None:
        card["label"] = str(label["text"])
        card["label_score"] = {k: v for k, v in label.items() if k != "text"}
    else:
        order = sorted(range(n_active), key=lambda i: (-float(val[i]), int(pos[i])))[:LABEL_K]
        ids = [int(index.tokens.flatten()[int(pos[i])]) for i in order]
        card["label"] = token_set_text(dominant(ids), tok)
        card["label_score"] = None
    return card


def _removal_context(model, index: FeatureIndex, card: dict) -> tuple[Tensor, int]:
    """The context ending at a card's top activation, and how many leading tokens stay (BOS)."""
    tok = getattr(model, "tokenizer", None)
    e0 = card["top"][0]
    context = index.tokens[e0["seq"], :e0["pos"] + 1]
    bos = getattr(tok, "bos_token_id", None) if tok is not None else None
    return context, 1 if bos is not None and int(context[0]) == bos else 0


def _set_removal(model, card: dict, context: Tensor, base: float, effects: list[dict],
                 window: int | None) -> None:
    tok = getattr(model, "tokenizer", None)
    for e in effects:
        e["token"] = tok_str(tok, int(context[e["pos"]]))
    p = len(context) - 1
    card["removal"] = {"seq": card["top"][0]["seq"], "pos": p, "act": base, "window": window,
                       "token": tok_str(tok, int(context[p])), "effects": effects}


@torch.no_grad()
def add_removals(rep, index: FeatureIndex, cards: list[dict], window: int | None = 32,
                 batch_size: int = 64) -> None:
    """:func:`token_removal` for many cards of one site in shared forward passes.

    Every card's shortened contexts (and its full one) are right-padded into common batches: with
    causal attention the padding never reaches a row's last real position, where the feature is
    read. Fills each card's ``removal`` as :func:`feature_card` does one at a time.
    """
    from .activations import harvest

    rep = one_layer(rep, "add_removals")
    check_index(rep, index, "add_removals")
    model = rep.model
    d, _ = _site_dict(rep, index.site)
    todo = [c for c in cards if c["n_active"]]
    rows: list[Tensor] = []
    plan = []  # per card: (context, first row, positions dropped)
    for c in todo:
        context, keep_first = _removal_context(model, index, c)
        context = context.long()
        qs, dropped = _removal_rows(context, window, keep_first)
        plan.append((context, len(rows), qs))
        rows += [context, *dropped]
    if not rows:
        return
    feat = torch.tensor([c["feature"] for c, (_, _, qs) in zip(todo, plan) for _ in range(1 + len(qs))])
    vals = torch.empty(len(rows))
    dev = d.W_dec.device
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        lens = torch.tensor([len(r) for r in chunk])
        batch = torch.zeros(len(chunk), int(lens.max()), dtype=torch.long)
        for i, r in enumerate(chunk):
            batch[i, :len(r)] = r
        x = harvest(model, batch, [index.hook], batch_size=len(chunk), progress=False)[index.hook]
        x = x[torch.arange(len(chunk)), lens - 1]  # each row's last real position
        codes = d.encode(x.to(dev))
        vals[s:s + len(chunk)] = codes[torch.arange(len(chunk)), feat[s:s + len(chunk)]].float().cpu()
    for c, (context, r0, qs) in zip(todo, plan):
        base = float(vals[r0])
        dropped = vals[r0 + 1:r0 + 1 + len(qs)].tolist()
        effects = [{"pos": q, "delta": float(v) - base} for q, v in zip(qs, dropped)]
        _set_removal(model, c, context, base, effects, window)


def analyze_features(rep, tokens: Tensor, site: str, features: Sequence[int], *,
                     n_top: int = 10, n_bins: int = 8, n_hist: int = 20, n_lens: int = 10,
                     removal: bool = True, removal_window: int = 32, seed: int = 0,
                     cache_dir: str | Path | Literal[False] | None = None, progress: bool = False,
                     labels: Mapping[int, Mapping] | None = None, per_doc: int = 1,
                     n_quantiles: int = 5, dense_limit: float = DENSE_FREQ) -> list[dict]:
    """Cards of ``features`` of a one-layer replacement's ``site`` dictionary, from one (cached)
    pass over ``tokens``.

    ``labels``: ``{feature: scored label}`` (:func:`featcircuit.labels.fit_labels`) for the cards.
    """
    index = feature_index(rep, tokens, site, cache_dir=cache_dir, progress=progress)
    model = rep.model
    features = [int(f) for f in features]
    bad = [f for f in features if not 0 <= f < index.d_sae]
    if bad:
        raise UserError(f"unknown feature {site}:{bad[0]}: the {site} dictionary has features "
                        f"0..{index.d_sae - 1}")
    if not features:
        return []
    labels = labels or {}
    tok = getattr(model, "tokenizer", None)
    docs = doc_ids(index.tokens, getattr(tok, "bos_token_id", None) if tok is not None else None)
    mask = lens_mask(model, index.token_counts)
    lens = unembed(model, feature_directions(rep, site, features)).cpu()
    cards = [feature_card(rep, index, f, n_top=n_top, n_bins=n_bins, n_hist=n_hist,
                          n_lens=n_lens, removal=False, seed=seed, mask=mask, lens_values=lens[i],
                          label=labels.get(f), per_doc=per_doc, n_quantiles=n_quantiles, docs=docs,
                          dense_limit=dense_limit)
             for i, f in enumerate(tqdm(features, desc="feature cards", disable=not progress))]
    if removal:  # every card's removal contexts in shared passes (one pass per card costs ~40 ms)
        add_removals(rep, index, cards, removal_window)
    return cards


def _score_text(sc: Mapping | None) -> str:
    if not sc or sc.get("f1") is None:
        return "unscored"
    return (f"held-out F1 {sc['f1']:.2f} (precision {sc['precision']:.2f}, recall {sc['recall']:.2f}, "
            f"{sc.get('n_fire', 0):,} firing tokens; fires = activation > {sc.get('threshold', 0):.3g})")


def format_card(card: dict, width: int = 40) -> str:
    """A plain-text rendering of a card for the terminal."""
    dense = "  DENSE" if card.get("dense") else ""
    L = [f"== {card['id']}  {card['label']} =={dense}",
         f"label: {_score_text(card.get('label_score'))}",
         f"active on {card['n_active']:,} of {card['n_tokens']:,} tokens (freq {card['freq']:.4%}"
         f"{', dense' if card.get('dense') else ''}); "
         f"mean {card['mean_act']:.3g}, max {card['max_act']:.3g}  [{card['hook']}]", "",
         f"top activations (distinct documents and contexts; {card.get('n_docs', 0)} documents "
         "hold activations):"]
    L += [f"  {ex['act']:>8.3f}  {example_text(ex)}" for ex in card["top"]] or ["  (never active)"]
    if card.get("quantiles"):
        L += ["", "one example per quantile group of the activations:"]
        for q in card["quantiles"]:
            ex = q["example"]
            L.append(f"  q{q['q_lo']:.0%}-{q['q_hi']:.0%} n={q['count']:<6} "
                     + (f"{ex['act']:.3f}  {example_text(ex)}" if ex else "-"))
    L += ["", "one example per activation bin (uniform within the bin):"]
    for b in card["bins"]:
        ex = b["example"]
        L.append(f"  ({b['lo']:.3g}, {b['hi']:.3g}] n={b['count']:<6} "
                 + (f"{ex['act']:.3f}  {example_text(ex)}" if ex else "-"))
    lens = card["lens"]
    L += ["", f"logit lens ({lens['n_shown']:,} of {lens['n_vocab']:,} tokens shown):"]
    for a, b in zip(lens["top"], lens["bottom"]):
        L.append(f"  {a['value']:>+8.3f} {short(a['token'], width // 2):<{width // 2 + 2}}"
                 f"  {b['value']:>+8.3f} {short(b['token'], width // 2)}")
    rem = card.get("removal")
    if rem:
        L += ["", f"token removal at the top example (seq {rem['seq']}, pos {rem['pos']}, "
                  f"{show_token(rem['token'])!r}: {rem['act']:.3f}); largest changes:"]
        for e in sorted(rem["effects"], key=lambda e: -abs(e["delta"]))[:8]:
            L.append(f"  pos {e['pos']:>4} (-{rem['pos'] - e['pos']:>2}) {short(e['token'], 18):<20} "
                     f"{e['delta']:>+8.3f}")
    h = card["histogram"]
    L += ["", "activation density (counts per bin of (0, max]):"]
    peak = max(h["counts"]) or 1
    for lo, hi, c in zip(h["edges"], h["edges"][1:], h["counts"]):
        L.append(f"  {lo:>7.3g}-{hi:<7.3g} {c:>7} {'█' * round(30 * c / peak)}")
    return "\n".join(L)
