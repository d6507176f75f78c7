"""Behaviours with an answer: clean/corrupt prompt pairs and their logit-difference metric (DESIGN §11).

A task is a set of prompt pairs of one token length, each with an answer token and a wrong
token to be predicted after the last position. The metric is the mean over pairs of
``logit[answer] − logit[wrong]`` at the last position. Corrupting changes the few tokens that
decide the answer and keeps the length, so activations can be patched position by position.

The built-in suite is generated from the held-out split of the built-in corpus, on token ids of
the model's own tokenizer:

1. tokenize each held-out document; walk its positions in order; a position is a candidate when
   the task's rule matches the tokens before it (e.g. a triple quote right after a ``def …):`` header);
2. the prompt is the ``n_ctx − 1`` tokens before the position, after BOS; the corrupt prompt
   swaps the deciding tokens for others (token ids, so the length is kept) and must survive a
   decode → encode round trip unchanged;
3. at most ``per_doc`` pairs per document, at least ``n_ctx / 2`` tokens apart, in corpus order;
   pairs from even-numbered documents are the *search* split, odd-numbered the *held-out* one;
4. the model's accuracy (share of clean pairs with a positive logit difference) and mean logit
   difference on clean and corrupt prompts are measured; a task the model does not do (clean
   accuracy < 0.8 or a clean − corrupt gap < 1 nat) is reported, not used.

User tasks come as JSONL (``--prompts``): ``{"clean", "corrupt", "answer", "wrong"}`` per line.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .errors import UserError

TASK_VERSION = 1
MIN_ACCURACY = 0.8
MIN_GAP = 1.0
MIN_PAIRS = 64


@dataclass
class TaskPrompts:
    """Tokenized prompt pairs (BOS first) with per-pair answer and wrong token ids."""

    name: str
    clean: Tensor  # [n, n_ctx] long
    corrupt: Tensor  # [n, n_ctx] long
    answer: Tensor  # [n] long
    wrong: Tensor  # [n] long
    split: Tensor | None = None  # [n] bool, True = held-out pair

    def __len__(self) -> int:
        return len(self.clean)

    def metric(self, logits: Tensor, tokens: Tensor | None = None) -> Tensor:
        """Mean logit difference (answer − wrong) at the last position of ``logits [n, ctx, V]``."""
        return self.logit_diff(logits).mean()

    def logit_diff(self, logits: Tensor) -> Tensor:
        """Per-pair logit difference ``[n]`` at the last position (one row of logits per pair)."""
        last = logits[:, -1]
        if len(last) != len(self):
            raise ValueError(f"task {self.name!r} has {len(self)} pairs but got logits for {len(last)} "
                             "prompts: score a subset with task.subset(rows)")
        ans, wr = self.answer.to(last.device), self.wrong.to(last.device)
        return last.gather(1, ans[:, None])[:, 0] - last.gather(1, wr[:, None])[:, 0]

    def subset(self, rows: Tensor) -> TaskPrompts:
        """The pairs at ``rows``."""
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return TaskPrompts(self.name, self.clean[rows], self.corrupt[rows], self.answer[rows],
                           self.wrong[rows], pick(self.split))

    def halves(self) -> tuple[TaskPrompts, TaskPrompts]:
        """(search pairs, held-out pairs): by the task's own split, else alternate pairs."""
        held = self.split if self.split is not None else torch.arange(len(self)) % 2 == 1
        if held.all() or not held.any():
            raise UserError(f"task {self.name!r} has {len(self)} pairs, all in one split: need pairs "
                            "for both the search and the held-out evaluation (at least 2)")
        return self.subset(torch.nonzero(~held).flatten()), self.subset(torch.nonzero(held).flatten())

    def to_jsonl(self, tokenizer) -> str:
        """One JSON object per pair: texts, answer and wrong strings, and the exact token ids."""
        dec = lambda ids: tokenizer.decode(ids)  # noqa: E731
        lines = []
        for k in range(len(self)):
            lines.append(json.dumps({
                "clean": dec(self.clean[k, 1:].tolist()), "corrupt": dec(self.corrupt[k, 1:].tolist()),
                "answer": dec([int(self.answer[k])]), "wrong": dec([int(self.wrong[k])]),
                "split": None if self.split is None else ("heldout" if bool(self.split[k]) else "search"),
                "clean_ids": self.clean[k].tolist(), "corrupt_ids": self.corrupt[k].tolist()}))
        return "\n".join(lines) + "\n"


# ---- rules of the built-in tasks ---------------------------------------------------------

Rule = Callable[[list[int], int, "_Vocab"], "tuple[list[int], int, int] | None"]


class _Vocab:
    """Token strings and single-token ids of a tokenizer."""

    def __init__(self, tok):
        self.tok = tok
        self.s = [tok.decode([i]) for i in range(len(tok))]
        self._ids: dict[str, int | None] = {}

    def id(self, s: str) -> int | None:
        if s not in self._ids:
            ids = self.tok(s, add_special_tokens=False)["input_ids"]
            self._ids[s] = ids[0] if len(ids) == 1 else None
        return self._ids[s]


def _line_start(toks: list[int], p: int, v: _Vocab) -> int:
    """Index of the first token of the line that token ``p`` is on."""
    q = p
    while q > 0 and "\n" not in v.s[toks[q - 1]]:
        q -= 1
    return q


def _docstring(toks, p, v):
    """A triple quote after a ``def …):`` header; corrupt: ``def`` → ``if`` (no docstring after an if)."""
    ans, wrong = v.id(' """'), v.id(" return")
    if toks[p] != ans or not v.s[toks[p - 1]].startswith("\n") or not v.s[toks[p - 2]].endswith(":"):
        return None
    start = _line_start(toks, p - 2, v)
    defs = [q for q in range(start, p - 2) if v.s[toks[q]] == " def"]
    if len(defs) != 1:
        return None
    corrupt = list(toks)
    corrupt[defs[0]] = v.id(" if")
    return corrupt, ans, wrong


def _bracket(toks, p, v):
    """The bracket that closes the innermost open one; corrupt: swap that opener ``(`` ↔ ``[``."""
    first = v.s[toks[p]][:1]
    if first not in (")", "]"):
        return None
    stack: list[tuple[str, int]] = []
    for q in range(max(0, p - 64), p):
        for ch in v.s[toks[q]]:
            if ch in "([{":
                stack.append((ch, q))
            elif ch in ")]}" and stack:
                stack.pop()
    if not stack:
        return None
    ch, q = stack[-1]
    want = {"(": ")", "[": "]"}.get(ch)
    if want != first or v.s[toks[q]] != ch or q == p - 1:
        return None
    other = "[" if ch == "(" else "("
    corrupt = list(toks)
    corrupt[q] = v.id(other)
    return corrupt, v.id(want), v.id({"(": "]", "[": ")"}[ch])


def _quote(toks, p, v):
    """The quote that closes a string; corrupt: swap the opening ``'`` ↔ ``"``."""
    s = v.s[toks[p]]
    if s not in ("'", '"'):
        return None
    for q in range(p - 1, max(0, p - 12), -1):
        t = v.s[toks[q]]
        if t in (" '", ' "', "('", '("', "['", '["'):
            if t[-1] != s or q == p - 1:
                return None
            swapped = t[:-1] + ("'" if s == '"' else '"')
            oid = v.id(swapped)
            if oid is None:
                return None
            corrupt = list(toks)
            corrupt[q] = oid
            return corrupt, toks[p], v.id('"' if s == "'" else "'")
        if any(c in t for c in "'\"\n#\\"):
            return None
    return None


_FILLERS = ("name", "data", "value", "path", "size", "items", "args", "result", "text", "buf",
            "count", "index", "mode", "state", "config", "key")


def _self_attr(toks, p, v):
    """The attribute recalled after ``self.`` when it appeared before; corrupt: rename it earlier."""
    name = toks[p]
    if v.s[toks[p - 1]] != "." or v.s[toks[p - 2]] not in ("self", " self"):
        return None
    if not v.s[name].isidentifier():
        return None
    earlier = [q for q in range(2, p - 2) if toks[q] == name and v.s[toks[q - 1]] == "."
               and v.s[toks[q - 2]] in ("self", " self")]
    if not earlier or any(toks[q] == name for q in range(p - 2) if q not in earlier):
        return None
    present = set(toks)
    for f in _FILLERS:
        fid = v.id(f)
        if fid is not None and fid != name and fid not in present:
            corrupt = list(toks)
            for q in earlier:
                corrupt[q] = fid
            return corrupt, name, fid
    return None


def _is_not_none(toks, p, v):
    """``None`` after ``is not``; corrupt: ``is`` → ``and`` (``x and not …`` rarely ends in None)."""
    ans = v.id(" None")
    if toks[p] != ans or v.s[toks[p - 1]] != " not" or v.s[toks[p - 2]] != " is":
        return None
    corrupt = list(toks)
    corrupt[p - 2] = v.id(" and")
    return corrupt, ans, v.id(" self")


BUILTIN_TASKS: dict[str, tuple[Rule, int, str]] = {
    "docstring": (_docstring, 24, 'the `"""` that opens a docstring after a `def …):` header (vs ` return`)'),
    "bracket": (_bracket, 24, "the closing bracket that matches the innermost open one: `]` vs `)`"),
    "quote": (_quote, 16, "the quote that closes a string literal: `'` vs `\"`"),
    "self-attr": (_self_attr, 48, "the attribute name recalled after `self.` (vs a name never seen)"),
    "is-not-none": (_is_not_none, 24, "` None` after `is not` (vs ` self`)"),
}


def _generate(name: str, tokenizer, max_pairs: int = 256, per_doc: int = 16) -> TaskPrompts:
    from .data import BUILTIN_DATA, iter_texts

    rule, n_ctx, _ = BUILTIN_TASKS[name]
    v = _Vocab(tokenizer)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    rows: list[tuple[list[int], list[int], int, int, bool]] = []
    docs = tokenizer([t for t in iter_texts(BUILTIN_DATA, "heldout")], add_special_tokens=False)["input_ids"]
    for d, toks in enumerate(docs):
        taken, last = 0, -n_ctx
        for p in range(n_ctx - 1, len(toks)):
            if taken >= per_doc or len(rows) >= max_pairs:
                break
            if p - last < n_ctx // 2:
                continue
            window = toks[p - (n_ctx - 1): p + 1]  # the prompt plus the answer position
            got = rule(window, n_ctx - 1, v)
            if got is None or any(t is None for t in got[1:]) or None in got[0]:
                continue
            corrupt, ans, wrong = got
            clean_p, corrupt_p = window[:-1], corrupt[:-1]
            if corrupt_p == clean_p:
                continue
            if tokenizer(tokenizer.decode(corrupt_p), add_special_tokens=False)["input_ids"] != corrupt_p:
                continue  # the corrupt text would not tokenize to these ids
            rows.append(([bos] + clean_p, [bos] + corrupt_p, ans, wrong, d % 2 == 1))
            taken += 1
            last = p
        if len(rows) >= max_pairs:
            break
    if not rows:
        raise UserError(f"task {name!r}: no prompt pairs found in the held-out split for this tokenizer")
    t = lambda k: torch.tensor([r[k] for r in rows], dtype=torch.long)  # noqa: E731
    return TaskPrompts(name, t(0), t(1), t(2), t(3), torch.tensor([r[4] for r in rows]))


def builtin_task(name: str, model) -> TaskPrompts:
    """The built-in task ``name`` generated (deterministically) for ``model``'s tokenizer."""
    if name not in BUILTIN_TASKS:
        raise UserError(f"unknown task {name!r}: built-in tasks are {', '.join(BUILTIN_TASKS)} "
                        "(`featcircuit tasks`), or pass your own with --prompts FILE.jsonl")
    return _generate(name, model.tokenizer)


@torch.no_grad()
def task_performance(model, task: TaskPrompts, batch_size: int = 64) -> dict:
    """The model's accuracy and mean logit difference on the clean and corrupt prompts."""
    dev = next(model.parameters()).device
    diffs = {}
    for kind in ("clean", "corrupt"):
        toks = getattr(task, kind)
        out = []
        for s in range(0, len(toks), batch_size):
            sub = task.subset(torch.arange(s, min(s + batch_size, len(toks))))
            out.append(sub.logit_diff(model(getattr(sub, kind).to(dev))).cpu())
        diffs[kind] = torch.cat(out).double()
    c, k = diffs["clean"], diffs["corrupt"]
    acc = float((c > 0).double().mean())
    gap = float((c - k).mean())
    n_held = int(task.split.sum()) if task.split is not None else None
    return {"task": task.name, "pairs": len(task), "heldout_pairs": n_held, "n_ctx": int(task.clean.shape[1]),
            "accuracy": acc, "corrupt_accuracy": float((k < 0).double().mean()),
            "logit_diff_clean": float(c.mean()), "logit_diff_corrupt": float(k.mean()),
            "gap": gap, "performs": acc >= MIN_ACCURACY and gap >= MIN_GAP and len(task) >= MIN_PAIRS}


def load_prompts(path: str, model, name: str | None = None) -> TaskPrompts:
    """Read and tokenize a JSONL prompts file; a UserError names the bad line."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"prompts file {path!r} not found: expected a .jsonl with clean, corrupt, "
                        "answer, wrong")
    tok = model.tokenizer
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    rows = []
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"prompts file {path!r} is not UTF-8 text: expected JSON lines") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            c, k, a, w = d["clean"], d["corrupt"], d["answer"], d["wrong"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{path}:{n} is not a JSON object with clean, corrupt, answer, wrong") from None
        if not all(isinstance(s, str) for s in (c, k, a, w)):
            raise UserError(f"{path}:{n}: clean, corrupt, answer and wrong must be strings")
        ids = [tok(s, add_special_tokens=False)["input_ids"] for s in (c, k, a, w)]
        if len(ids[0]) != len(ids[1]):
            raise UserError(f"{path}:{n}: clean and corrupt prompts tokenize to {len(ids[0])} and "
                            f"{len(ids[1])} tokens; they must be the same length")
        if len(ids[2]) != 1 or len(ids[3]) != 1:
            raise UserError(f"{path}:{n}: answer and wrong must each be a single token")
        if not ids[0]:
            raise UserError(f"{path}:{n}: the clean prompt is empty")
        rows.append(([bos] + ids[0], [bos] + ids[1], ids[2][0], ids[3][0]))
    if not rows:
        raise UserError(f"prompts file {path!r} holds no prompts: expected one JSON object per line")
    lengths = {len(r[0]) for r in rows}
    if len(lengths) != 1:
        raise UserError(f"prompts in {path!r} have different token lengths {sorted(lengths)}; "
                        "use one length per file")
    n_ctx = int(getattr(model.cfg, "n_ctx", 0) or 0)
    if n_ctx and lengths.pop() > n_ctx:
        raise UserError(f"prompts in {path!r} are longer than the model's context of {n_ctx} tokens")
    t = lambda k: torch.tensor([r[k] for r in rows], dtype=torch.long)  # noqa: E731
    return TaskPrompts(name or p.stem, t(0), t(1), t(2), t(3))
