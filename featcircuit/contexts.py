"""Example contexts of a feature worth reading: distinct top activations and the whole range (DESIGN §8).

1. *Documents* (:func:`doc_ids`): contexts are packed from a stream of documents joined by BOS
   (:func:`featcircuit.data.pack`), so a position's document is the number of separators before
   it in that stream; each context's leading BOS belongs to the document of its next token.
2. *Distinct top activations* (:func:`distinct_top`): activations in decreasing order (ties:
   earlier position first), skipping any whose document already gave ``per_doc`` examples and
   any whose ``window`` tokens up to and including the activating one equal an example already
   taken (near-identical contexts: repeated boilerplate in different files); when too few
   documents remain, a second pass fills up from documents already shown.
3. *Across the range* (:func:`quantile_examples`): the nonzero activations cut at their
   quantiles into ``n`` groups of equal size; one example per group drawn with a seeded
   generator, preferring a document not yet shown.
4. *An example* (:func:`example`) is a JSON-able dict: sequence, position, activation, the
   tokens of the window around it and the feature's value on each.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

DEDUP_WINDOW = 8  # tokens before the activating one that make two contexts "the same"


def tok_str(tokenizer, t: int) -> str:
    """The text of one token id (``<id>`` without a tokenizer)."""
    return tokenizer.decode([int(t)]) if tokenizer is not None else f"<{int(t)}>"


def show_token(s: str) -> str:
    """A token for one-line display: newline ⏎, tab ⇥, other control characters as ·."""
    return "".join("⏎" if c == "\n" else "⇥" if c == "\t" else "·" if ord(c) < 32 else c for c in s)


def example_text(ex: dict) -> str:
    """An example's context on one line with the activating token marked ``⟦tok⟧``."""
    return "".join(f"⟦{show_token(t)}⟧" if i == ex["index"] else show_token(t)
                   for i, t in enumerate(ex["tokens"]))


def doc_ids(tokens: Tensor, bos: int | None) -> Tensor:
    """``[n_seq, n_ctx]`` document index of each position of packed ``tokens`` (the row without ``bos``)."""
    n, n_ctx = tokens.shape
    if bos is None or n_ctx < 2:
        return torch.arange(n)[:, None].expand(n, n_ctx).clone()
    stream = tokens[:, 1:].reshape(-1)
    sep = (stream == bos).long()
    doc = (torch.cumsum(sep, 0) - sep).view(n, n_ctx - 1)  # separators strictly before
    return torch.cat([doc[:, :1], doc], 1)


def example(tokens: Tensor, vals_at: dict[int, float], flat: int, tokenizer, left: int, right: int) -> dict:
    """The example at flat position ``flat``: the window ``[p-left, p+right]`` with values."""
    n_ctx = tokens.shape[1]
    s, p = divmod(int(flat), n_ctx)
    a, b = max(0, p - left), min(n_ctx, p + right + 1)
    ids = tokens[s, a:b].tolist()
    return {"seq": s, "pos": p, "act": vals_at.get(int(flat), 0.0), "index": p - a,
            "ids": ids, "tokens": [tok_str(tokenizer, t) for t in ids],
            "values": [vals_at.get(s * n_ctx + q, 0.0) for q in range(a, b)]}


def _window_key(flat_tokens: Tensor, n_ctx: int, flat: int, window: int) -> tuple[int, ...]:
    s, p = divmod(int(flat), n_ctx)
    return tuple(flat_tokens[s * n_ctx + max(1, p - window):flat + 1].tolist())


def distinct_top(pos: Tensor, val: Tensor, tokens: Tensor, docs: Tensor, n: int, *, per_doc: int = 1,
                 window: int = DEDUP_WINDOW, relax: bool = True) -> list[int]:
    """Indices into ``pos``/``val`` of the ``n`` largest activations, by document and distinct context.

    Returned largest first (ties: earlier position first).

    With ``relax``, when fewer than ``n`` documents hold activations the rest are filled from
    documents already shown (still no two near-identical contexts).
    """
    n_ctx = tokens.shape[1]
    flat_tokens, flat_docs = tokens.reshape(-1), docs.reshape(-1)
    order = sorted(range(len(val)), key=lambda i: (-float(val[i]), int(pos[i])))
    taken: list[int] = []
    per: dict[int, int] = {}
    seen: set[tuple[int, ...]] = set()
    for cap in (per_doc, None) if relax else (per_doc,):  # then fill up from documents already shown
        for i in order:
            if len(taken) >= n:
                break
            d = int(flat_docs[int(pos[i])])
            key = _window_key(flat_tokens, n_ctx, int(pos[i]), window)
            if (cap is not None and per.get(d, 0) >= cap) or key in seen:
                continue
            per[d] = per.get(d, 0) + 1
            seen.add(key)
            taken.append(i)
    return sorted(taken, key=lambda i: (-float(val[i]), int(pos[i])))


def quantile_examples(pos: Tensor, val: Tensor, docs: Tensor, n: int, *, seed: int = 0) -> list[dict]:
    """``n`` groups of the activations cut at their quantiles: ``{q_lo, q_hi, lo, hi, count, pick}``.

    ``pick`` indexes ``pos``/``val`` (None for an empty group); deterministic under ``seed``.
    """
    if len(val) == 0 or n < 1:
        return []
    order = sorted(range(len(val)), key=lambda i: (float(val[i]), int(pos[i])))
    flat_docs = docs.reshape(-1)
    g = torch.Generator().manual_seed(seed)
    used: set[int] = set()
    out = []
    for k in range(n):
        a, b = (k * len(order)) // n, ((k + 1) * len(order)) // n
        group = order[a:b]
        pick = None
        if group:
            perm = torch.randperm(len(group), generator=g).tolist()
            fresh = [group[j] for j in perm if int(flat_docs[int(pos[group[j]])]) not in used]
            pick = (fresh or [group[perm[0]]])[0]
            used.add(int(flat_docs[int(pos[pick])]))
        out.append({"q_lo": k / n, "q_hi": (k + 1) / n, "count": len(group),
                    "lo": float(val[group[0]]) if group else None,
                    "hi": float(val[group[-1]]) if group else None, "pick": pick})
    return out


def dominant(ids: Sequence[int], n: int = 2) -> list[int]:
    """The most common id, then (up to ``n`` in all) further ids that occur at least twice."""
    ids = list(ids)
    if not ids:
        return []
    counts: dict[int, int] = {}
    for t in ids:
        counts[t] = counts.get(t, 0) + 1
    best = sorted(counts, key=lambda t: (-counts[t], ids.index(t)))
    return [best[0]] + [t for t in best[1:n] if counts[t] >= 2]


def short(s: str, limit: int = 14) -> str:
    """``repr(s)``, cut to ``limit`` characters with an ellipsis."""
    r = repr(s)
    return r if len(r) <= limit else r[: limit - 2] + "…" + r[-1]


def token_set_text(ids: Sequence[int], tokenizer, limit: int = 14) -> str:
    """Tokens as short reprs joined by spaces (``(never active)`` when empty)."""
    return " ".join(short(tok_str(tokenizer, t), limit) for t in ids) if ids else "(never active)"
