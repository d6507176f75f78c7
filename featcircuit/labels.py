"""Labels as short rules over the context, fitted on training tokens, scored on held-out ones (DESIGN §8).

A label says *where a feature fires*, and its score says how far to trust it.

1. *Context variables* of every token position (:func:`token_contexts`), from the text of the
   row the model sees (state resets at each row start and at each document separator):
   ``tok`` the current token; ``prev`` the previous token; ``shape`` the current token's class
   (newline, blank, word after a space, word piece, number, punctuation, other); ``line`` the
   tokens earlier in the same line (a set); ``bracket`` the innermost open bracket (none, ``(``,
   ``[``, ``{``; brackets in strings and comments ignored); ``indent`` the current line's
   indentation in steps of 4 columns (0, 4, 8, 12, 16+); ``lex`` the lexical state at the
   token's first character (code, string, triple-quoted string, comment); ``col`` the token's
   place in its line (1st, 2nd, 3rd, later).
2. *Fires*: the feature's activation exceeds its own threshold, ``threshold_frac`` × its
   largest activation on the training tokens (0: any nonzero code, the firing of a TopK code).
3. *Atoms* ``variable ∈ S``: for each variable, the value set S is grown greedily on the
   training tokens, each step adding the value that most raises F1 of predicting "fires"
   (values seen fewer than ``min_count`` times are not candidates; at most ``max_values`` values,
   3 for ``line``; stop when F1 gains less than ``min_gain``). ``any`` (every token) is an atom too.
4. *Clause*: the best atom, or a conjunction ``A ∧ B`` when one raises training F1 by at least
   ``min_pair_gain``: for each of the ``n_pair`` best atoms A, the set of every other variable is
   grown on the tokens where A holds, maximising F1 of ``A ∧ B`` over all tokens.
   *Rule*: a disjunction of up to ``max_clauses`` clauses by sequential covering; each further
   clause is grown on the tokens the rule does not yet predict and kept when it raises the whole
   rule's training F1 by ``min_clause_gain`` (single-atom clauses of one variable merge into one
   value set).
5. *Score* on the held-out tokens at the same absolute threshold: precision, recall and F1 of
   the rule, the number of firing tokens, and ``base_f1`` (F1 of "every token", what a dense
   feature gets for free).
6. Deterministic: fixed variable order, ties to the smaller value id, no randomness; the same
   indexes give the same labels.

:func:`label_pair` fits every feature (or the given ones) of both dictionaries of a pair;
:func:`f1_distribution` summarises the scores over a dictionary, :func:`node_f1_distribution`
over a circuit's nodes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from torch import Tensor
from tqdm.auto import tqdm

from .contexts import short, tok_str
from .errors import UserError
from .stats import FeatureIndex

KINDS = ("tok", "prev", "shape", "line", "bracket", "indent", "lex", "col")  # the order ties are broken in
MULTI = "line"  # the one variable that holds a set of values per token
BRACKETS = ("none", "(", "[", "{")
LEX = ("code", "string", "triple-quoted string", "comment")
COLS = ("1st", "2nd", "3rd", "later")
SHAPES = ("newline", "blank", "word after a space", "word piece", "number", "punctuation", "other")


def token_shape(text: str) -> int:
    """The shape class of a token's text: an index into :data:`SHAPES`."""
    if "\n" in text:
        return 0
    if not text or text.isspace():
        return 1
    body = text.lstrip(" ")
    if body.isdigit():
        return 4
    if body[0].isalpha() or body[0] == "_":
        return 2 if body != text else 3
    if all(not c.isalnum() and not c.isspace() for c in body):
        return 5
    return 6
INDENT_STEP, INDENT_MAX = 4, 4


# ---- 1. context variables --------------------------------------------------------------------


@dataclass
class TokenContexts:
    """Context variables of the positions ``1..n_ctx-1`` of every row of ``tokens`` (row-major)."""

    tokens: Tensor  # [n_seq, n_ctx]
    cat: dict[str, np.ndarray]  # single-valued variables: [n] value per position
    line_ptr: np.ndarray  # [n + 1] CSR offsets into line_val
    line_val: np.ndarray  # token ids earlier in the line, per position (unique, sorted)
    line_row: np.ndarray  # the position of each entry of line_val

    @property
    def n(self) -> int:
        """Positions covered (BOS column excluded)."""
        return len(self.cat["tok"])

    def rows_of(self, flat: Tensor | np.ndarray) -> np.ndarray:
        """Row numbers of flat positions ``seq·n_ctx + p`` (p >= 1)."""
        flat = np.asarray(flat, dtype=np.int64)
        n_ctx = self.tokens.shape[1]
        return (flat // n_ctx) * (n_ctx - 1) + flat % n_ctx - 1


def _scan_row(text_of: list[str]) -> tuple[list[int], list[int], list[int], list[int]]:
    """(bracket, indent, lex, line-start flag) of each token of one row.

    Bracket and lexical state are taken at the token's first character; the indentation is that
    of the line the token starts on (its leading blanks, including the token's own).
    """
    br, line_of, lex, start = [], [], [], []
    line_indent = [0]  # the leading blanks of each line, final once its first other character is seen
    stack: list[str] = []
    state, quote = 0, ""  # 0 code, 1 string, 2 triple-quoted string, 3 comment
    indent, at_start = 0, True  # indentation of the current line; still in its leading blanks
    new_line = True
    pending_escape = False
    opener = {")": "(", "]": "[", "}": "{"}
    for text in text_of:
        br.append(BRACKETS.index(stack[-1]) if stack else 0)
        line_of.append(len(line_indent) - 1)
        lex.append(state)
        start.append(1 if new_line else 0)
        new_line = False
        i = 0
        while i < len(text):
            c = text[i]
            if c == "\n":
                if state in (1, 3):
                    state = 0  # a one-line string or a comment ends at the line's end
                indent, at_start, new_line, pending_escape = 0, True, True, False
                line_indent.append(0)
                i += 1
                continue
            if at_start:
                if c == " ":
                    indent += 1
                elif c == "\t":
                    indent += INDENT_STEP
                else:
                    at_start = False
                line_indent[-1] = indent
            if pending_escape:
                pending_escape = False
            elif state == 3:
                pass
            elif state in (1, 2):
                if c == "\\":
                    pending_escape = True
                elif state == 1 and c == quote:
                    state = 0
                elif state == 2 and text.startswith(quote, i):
                    state, i = 0, i + 2
            elif c == "#":
                state = 3
            elif c in "'\"":
                if text.startswith(c * 3, i):
                    state, quote, i = 2, c * 3, i + 2
                else:
                    state, quote = 1, c
            elif c in "([{":
                stack.append(c)
            elif c in ")]}":
                if stack and stack[-1] == opener[c]:
                    stack.pop()
            i += 1
    ind = [min(line_indent[k] // INDENT_STEP, INDENT_MAX) for k in line_of]
    return br, ind, lex, start


def token_contexts(tokens: Tensor, tokenizer, bos: int | None = None) -> TokenContexts:
    """The context variables of every position >= 1 of ``tokens [n_seq, n_ctx]`` (step 1)."""
    tokens = tokens.long().cpu()
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise UserError(f"labels need a [n_seq, n_ctx >= 2] token tensor, got {tuple(tokens.shape)}")
    if bos is None:
        bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    ids = sorted(set(tokens.flatten().tolist()))
    text = {t: tok_str(tokenizer, t) if tokenizer is not None else "" for t in ids}
    shape = {t: token_shape(text[t]) for t in ids}
    cat: dict[str, list] = {k: [] for k in ("tok", "prev", "shape", "bracket", "indent", "lex", "col")}
    ptr, vals = [0], []
    for row in tokens.tolist():
        body = row[1:]
        # segments between document separators start fresh, as a new row does
        seg_start = 0
        for s in range(len(body) + 1):
            if s < len(body) and not (bos is not None and body[s] == bos):
                continue
            seg = body[seg_start:s + 1] if s < len(body) else body[seg_start:]
            br, ind, lex, start = _scan_row([text[t] for t in seg])
            line: list[int] = []
            col = 0
            for k, t in enumerate(seg):
                if start[k] and k > 0:
                    line, col = [], 0
                prev = row[0] if seg_start + k == 0 else body[seg_start + k - 1]
                cat["tok"].append(t)
                cat["prev"].append(prev)
                cat["shape"].append(shape[t])
                cat["bracket"].append(br[k])
                cat["indent"].append(ind[k])
                cat["lex"].append(lex[k])
                cat["col"].append(min(col, len(COLS) - 1))
                u = sorted(set(line))
                vals.extend(u)
                ptr.append(ptr[-1] + len(u))
                line.append(t)
                col += 1
            seg_start = s + 1
    ptr_a = np.asarray(ptr, dtype=np.int64)
    return TokenContexts(tokens, {k: np.asarray(v, dtype=np.int64) for k, v in cat.items()}, ptr_a,
                         np.asarray(vals, dtype=np.int64),
                         np.repeat(np.arange(len(ptr_a) - 1), np.diff(ptr_a)))


# ---- 3-4. fitting ------------------------------------------------------------------------------


def _gather(ptr: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Entry indices of the CSR rows ``rows``."""
    starts, lens = ptr[rows], ptr[rows + 1] - ptr[rows]
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    return np.repeat(starts - np.cumsum(lens) + lens, lens) + np.arange(total)


def _f1(tp, pp, p):
    return np.where(pp + p > 0, 2 * tp / np.maximum(pp + p, 1), 0.0)


def _grow(fires: np.ndarray, tot: np.ndarray, P: int, max_values: int, min_count: int,
          min_gain: float, tp0: float = 0.0, pp0: float = 0.0) -> tuple[list[int], float, float, float]:
    """Greedy value set of a single-valued variable: (values, F1, TP, PP).

    ``tp0``/``pp0``: true and predicted positives already claimed by earlier clauses of the rule
    (the counts ``fires``/``tot`` are then taken outside them), so F1 is that of the whole rule.
    """
    fires, tot = fires.astype(np.float64), tot.astype(np.float64)
    ok = (tot >= min_count) & (fires > 0)
    chosen: list[int] = []
    tp, pp, best = tp0, pp0, 0.0
    for _ in range(max_values):
        if not ok.any():
            break
        f1 = np.where(ok, _f1(tp + fires, pp + tot, P), -1.0)
        v = int(np.argmax(f1))  # ties: the smaller value id
        if f1[v] <= 0 or (chosen and f1[v] < best + min_gain):
            break
        chosen.append(v)
        tp, pp, best = tp + fires[v], pp + tot[v], float(f1[v])
        ok[v] = False
    return chosen, best, tp, pp


class _Fitter:
    """Fits rules for one feature at a time against one :class:`TokenContexts`."""

    def __init__(self, ctx: TokenContexts, max_values: int, min_count: int, min_gain: float):
        self.ctx, self.max_values, self.min_count, self.min_gain = ctx, max_values, min_count, min_gain
        self.nv = {k: int(v.max()) + 1 if len(v) else 1 for k, v in ctx.cat.items()}
        self.nv[MULTI] = max(int(ctx.line_val.max()) + 1 if len(ctx.line_val) else 1, self.nv["tok"])
        self.tot = {k: np.bincount(v, minlength=self.nv[k]) for k, v in ctx.cat.items()}
        self.tot[MULTI] = np.bincount(ctx.line_val, minlength=self.nv[MULTI])

    def mask(self, atom: tuple[str, tuple[int, ...]]) -> np.ndarray:
        """Positions where ``variable ∈ values`` holds."""
        kind, values = atom
        if kind == "any":
            return np.ones(self.ctx.n, dtype=bool)
        if kind == MULTI:
            m = np.zeros(self.ctx.n, dtype=bool)
            m[self.ctx.line_row[np.isin(self.ctx.line_val, values)]] = True
            return m
        return np.isin(self.ctx.cat[kind], values)

    def grow(self, kind: str, fire_rows: np.ndarray, P: int, domain: np.ndarray | None, tp0: float = 0.0,
             pp0: float = 0.0):
        """(values, F1, TP, PP) of ``variable ∈ S`` (within ``domain`` when given) against the fires.

        ``tp0``/``pp0`` as for :func:`_grow`: what earlier clauses already predict (outside ``domain``).
        """
        cap = min(self.max_values, 3) if kind == MULTI else self.max_values
        if kind != MULTI:
            v = self.ctx.cat[kind]
            f_rows = fire_rows if domain is None else fire_rows[domain[fire_rows]]
            fires = np.bincount(v[f_rows], minlength=self.nv[kind])
            tot = self.tot[kind] if domain is None else np.bincount(v[domain], minlength=self.nv[kind])
            return _grow(fires, tot, P, cap, self.min_count, self.min_gain, tp0, pp0)
        # a set-valued variable: values overlap, so counts are taken over the uncovered positions
        ptr, lv, nv = self.ctx.line_ptr, self.ctx.line_val, self.nv[MULTI]
        f_rows = fire_rows if domain is None else fire_rows[domain[fire_rows]]
        fires = np.bincount(lv[_gather(ptr, f_rows)], minlength=nv).astype(np.float64)
        dom_rows = None if domain is None else np.nonzero(domain)[0]
        tot = (self.tot[MULTI] if dom_rows is None else
               np.bincount(lv[_gather(ptr, dom_rows)], minlength=nv)).astype(np.float64)
        covered = np.zeros(self.ctx.n, dtype=bool)
        fire_set = np.zeros(self.ctx.n, dtype=bool)
        fire_set[f_rows] = True
        ok = (tot >= self.min_count) & (fires > 0)
        chosen: list[int] = []
        tp, pp, best = tp0, pp0, 0.0
        for _ in range(cap):
            if not ok.any():
                break
            f1 = np.where(ok, _f1(tp + fires, pp + tot, P), -1.0)
            w = int(np.argmax(f1))
            if f1[w] <= 0 or (chosen and f1[w] < best + self.min_gain):
                break
            chosen.append(w)
            tp, pp, best = tp + fires[w], pp + tot[w], float(f1[w])
            ok[w] = False
            new = np.unique(self.ctx.line_row[lv == w])
            if domain is not None:
                new = new[domain[new]]
            new = new[~covered[new]]
            covered[new] = True
            e = _gather(ptr, new)  # entries of newly covered positions count no more
            fires -= np.bincount(lv[e[fire_set[self.ctx.line_row[e]]]], minlength=nv)
            tot -= np.bincount(lv[e], minlength=nv)
        return chosen, best, tp, pp

    def clause(self, fire_rows: np.ndarray, P: int, free: np.ndarray | None, tp0: float, pp0: float,
               n_pair: int, min_pair_gain: float) -> tuple[list, float]:
        """(clause, F1 of the rule with it): one atom or ``A ∧ B``, grown on the ``free`` positions.

        ``free``: the positions earlier clauses leave unpredicted (None: all, the first clause);
        the clause's F1 counts what they predict (``tp0``/``pp0``) too.
        """
        n = self.ctx.n
        singles = [([("any", ())], float(_f1(P, n, P)))] if free is None else []
        for kind in KINDS:
            values, f1, _, _ = self.grow(kind, fire_rows, P, free, tp0, pp0)
            if values:
                singles.append(([(kind, tuple(values))], f1))
        if not singles:
            return [], 0.0
        order = sorted(range(len(singles)), key=lambda i: (-singles[i][1], i))
        best_rule, best_f1 = singles[order[0]]
        pair_rule, pair_f1 = None, best_f1
        for i in [i for i in order if singles[i][0][0][0] != "any"][:n_pair]:
            (a,), _ = singles[i]
            dom = self.mask(a) if free is None else self.mask(a) & free
            for kind in KINDS:
                if kind == a[0]:
                    continue
                values, f1, _, _ = self.grow(kind, fire_rows, P, dom, tp0, pp0)
                if values and f1 > pair_f1 + 1e-12:
                    pair_rule, pair_f1 = [a, (kind, tuple(values))], f1
        if pair_rule is not None and pair_f1 >= best_f1 + min_pair_gain:
            return pair_rule, pair_f1
        return best_rule, best_f1

    def fit(self, fire_rows: np.ndarray, n_pair: int, min_pair_gain: float, max_clauses: int = 1,
            min_clause_gain: float = 0.02) -> tuple[list[list], float]:
        """(clauses, training F1): a disjunction of up to ``max_clauses`` clauses (step 4).

        Sequential covering: each further clause is grown on the positions the rule does not yet
        predict and kept only if it raises the rule's training F1 by ``min_clause_gain``.
        """
        P = len(fire_rows)
        fire = np.zeros(self.ctx.n, dtype=bool)
        fire[fire_rows] = True
        clauses: list[list] = []
        best, covered = 0.0, np.zeros(self.ctx.n, dtype=bool)
        for c in range(max_clauses):
            free = None if c == 0 else ~covered
            tp0, pp0 = float((covered & fire).sum()), float(covered.sum())
            rule, f1 = self.clause(fire_rows, P, free, tp0, pp0, n_pair, min_pair_gain)
            if not rule or (c and f1 < best + min_clause_gain):
                break
            clauses.append(rule)
            best = f1
            if rule[0][0] == "any":
                break
            covered |= self.predict([rule])
        return _merge(clauses), best

    def predict(self, clauses: Sequence[Sequence[tuple[str, tuple[int, ...]]]]) -> np.ndarray:
        """``[n]`` bool: where any clause holds (a clause: all its atoms)."""
        pred = np.zeros(self.ctx.n, dtype=bool)
        for rule in clauses:
            m = np.ones(self.ctx.n, dtype=bool)
            for atom in rule:
                m &= self.mask(atom)
            pred |= m
        return pred


def _merge(clauses: list[list]) -> list[list]:
    """Single-atom clauses of one variable as one atom: ``tok ∈ A or tok ∈ B`` is ``tok ∈ A ∪ B``."""
    out: list[list] = []
    at: dict[str, int] = {}
    for rule in clauses:
        if len(rule) == 1 and rule[0][0] != "any" and rule[0][0] in at:
            k = at[rule[0][0]]
            out[k] = [(rule[0][0], out[k][0][1] + rule[0][1])]
            continue
        if len(rule) == 1:
            at[rule[0][0]] = len(out)
        out.append(rule)
    return out


def _score(pred: np.ndarray, fire: np.ndarray) -> dict:
    tp, pp, p = int((pred & fire).sum()), int(pred.sum()), int(fire.sum())
    return {"precision": tp / pp if pp else 0.0, "recall": tp / p if p else 0.0,
            "f1": 2 * tp / (pp + p) if pp + p else 0.0, "n_fire": p, "n_pred": pp}


# ---- rendering ---------------------------------------------------------------------------------


def _value_text(kind: str, v: int, tokenizer) -> str:
    if kind in ("tok", "prev", MULTI):
        return short(tok_str(tokenizer, v), 16)
    if kind == "bracket":
        return BRACKETS[v]
    if kind == "indent":
        return f"{v * INDENT_STEP}{'+' if v == INDENT_MAX else ''}"
    if kind == "lex":
        return LEX[v]
    if kind == "shape":
        return SHAPES[v]
    return COLS[v]


def atom_text(kind: str, values: Sequence[int], tokenizer, limit: int = 4) -> str:
    """One atom in words, e.g. ``after 'def'|'class'`` or ``inside (``."""
    if kind == "any":
        return "any token"
    shown = [_value_text(kind, v, tokenizer) for v in values[:limit]]
    more = f"|…+{len(values) - limit}" if len(values) > limit else ""
    alt = "|".join(shown) + more
    if kind == "tok":
        return alt
    if kind == "prev":
        return f"after {alt}"
    if kind == MULTI:
        return f"{alt} earlier in line"
    if kind == "bracket":
        return "outside brackets" if list(values) == [0] else f"inside {alt}"
    if kind == "indent":
        return f"indent {alt}"
    if kind == "lex":
        return f"in {alt}"
    if kind == "shape":
        return f"a {alt}" if len(values) == 1 else f"a token: {alt}"
    return f"{alt} token of line"


def label_text(label: Mapping, digits: int = 2) -> str:
    """A label as node text: the rule, then its held-out F1 (``[F1 0.83]``)."""
    f1 = label.get("f1")
    return str(label["text"]) + (f" [F1 {f1:.{digits}f}]" if f1 is not None else " [unscored]")


# ---- the entry points --------------------------------------------------------------------------


def fit_labels(train: FeatureIndex, heldout: FeatureIndex, tokenizer, features: Iterable[int] | None = None,
               *,
               threshold_frac: float = 0.0, max_values: int = 6, min_count: int = 2, min_gain: float = 0.005,
               n_pair: int = 2, min_pair_gain: float = 0.02, max_clauses: int = 3,
               min_clause_gain: float = 0.02, train_ctx: TokenContexts | None = None,
               heldout_ctx: TokenContexts | None = None, progress: bool = False) -> dict[int, dict]:
    """``{feature: label}`` fitted on ``train``'s tokens and scored on ``heldout``'s (steps 2-5).

    A label: ``text``, ``clauses`` (``[[{kind, values, shown}, …], …]``: any clause, all its atoms),
    held-out ``precision``/``recall``/``f1``/``n_fire``/``n_pred``, ``base_f1``, ``train_f1``,
    ``threshold`` (absolute) and ``threshold_frac``. A feature never active on the training
    tokens gets ``(never active)`` and ``f1`` None; one that never fires on the held-out tokens
    gets ``f1`` None too.
    """
    if not 0 <= threshold_frac < 1:
        raise UserError(f"bad threshold_frac {threshold_frac!r}: use a fraction of the feature's max "
                        "in [0, 1)")
    if max_values < 1:
        raise UserError(f"bad max_values {max_values!r}: use an integer >= 1")
    if train.d_sae != heldout.d_sae:
        raise UserError(f"train and held-out indexes differ in width: {train.d_sae} vs {heldout.d_sae}")
    feats = list(range(train.d_sae)) if features is None else sorted({int(f) for f in features})
    bad = [f for f in feats if not 0 <= f < train.d_sae]
    if bad:
        raise UserError(f"unknown feature {bad[0]}: the dictionary has features 0..{train.d_sae - 1}")
    tc = train_ctx or token_contexts(train.tokens, tokenizer)
    hc = heldout_ctx or token_contexts(heldout.tokens, tokenizer)
    fitter = _Fitter(tc, max_values, min_count, min_gain)
    scorer = _Fitter(hc, max_values, min_count, min_gain)
    out: dict[int, dict] = {}
    for f in tqdm(feats, desc=f"labels ({train.site or 'features'})", disable=not progress):
        pos, val = train.acts(f)
        vmax = float(val.max()) if len(val) else 0.0
        thr = threshold_frac * vmax
        fire_rows = np.unique(tc.rows_of(pos[val > thr].numpy()))
        hpos, hval = heldout.acts(f)
        h_fire = np.zeros(hc.n, dtype=bool)
        h_fire[hc.rows_of(hpos[hval > thr].numpy())] = True
        base = _score(np.ones(hc.n, dtype=bool), h_fire)["f1"]
        if len(fire_rows) == 0:
            out[f] = {"text": "(never active)", "clauses": [], "precision": None, "recall": None, "f1": None,
                      "n_fire": int(h_fire.sum()), "n_pred": 0, "base_f1": base, "train_f1": None,
                      "threshold": thr, "threshold_frac": threshold_frac}
            continue
        clauses, train_f1 = fitter.fit(fire_rows, n_pair, min_pair_gain, max_clauses, min_clause_gain)
        sc = _score(scorer.predict(clauses), h_fire)
        if sc["n_fire"] == 0:
            sc.update(precision=None, recall=None, f1=None)
        out[f] = {"text": " or ".join(" & ".join(atom_text(k, list(v), tokenizer) for k, v in rule)
                                      for rule in clauses),
                  "clauses": [[{"kind": k, "values": [int(x) for x in v],
                                "shown": [_value_text(k, x, tokenizer) for x in v] if k != "any" else []}
                               for k, v in rule] for rule in clauses],
                  **sc, "base_f1": base, "train_f1": float(train_f1), "threshold": thr,
                  "threshold_frac": threshold_frac}
    return out


def label_pair(rep, train_tokens: Tensor, heldout_tokens: Tensor, *,
               features: Mapping[str, Iterable[int]] | None = None, threshold_frac: float = 0.0,
               cache_dir: str | Path | Literal[False] | None = None, progress: bool = False,
               **fit_kw) -> dict[str, dict[int, dict]]:
    """``{"resid": {f: label}, "mlp": {f: label}}``: labels of a one-layer replacement's features
    (all, or ``features``).

    Fitted on ``train_tokens`` (use the training split), scored on ``heldout_tokens``; both
    indexes come from :func:`featcircuit.stats.feature_index` (cached).
    """
    from .replacement import one_layer
    from .stats import feature_indexes

    rep = one_layer(rep, "label_pair")
    tok = getattr(rep.model, "tokenizer", None)
    tc, hc = token_contexts(train_tokens, tok), token_contexts(heldout_tokens, tok)
    sites = [s for s in ("resid", "mlp") if features is None or s in features]
    trs = feature_indexes(rep, train_tokens, sites, cache_dir=cache_dir, progress=progress)
    hos = feature_indexes(rep, heldout_tokens, sites, cache_dir=cache_dir, progress=progress)
    out = {}
    for site in sites:
        tr, ho = trs[site], hos[site]
        out[site] = fit_labels(tr, ho, tok, None if features is None else features[site],
                               threshold_frac=threshold_frac, train_ctx=tc, heldout_ctx=hc,
                               progress=progress, **fit_kw)
    return out


def f1_distribution(labels: Mapping, features: Iterable | None = None) -> dict:
    """Summary of held-out label F1 over ``features`` (default: all labelled ones).

    Features without a score (never active on the training tokens, or never firing on the
    held-out ones) are counted apart, not as zeros. Returns n, median, q1, q3, mean, the
    fraction with F1 >= 0.6, a 10-bin histogram of [0, 1], and the same for ``base_f1``.
    """
    feats = sorted(labels) if features is None else list(features)
    missing = [f for f in feats if f not in labels]
    if missing:
        raise UserError(f"no label for feature {missing[0]}: fit it first (fit_labels / label_pair)")
    f1 = np.asarray([labels[f]["f1"] for f in feats if labels[f]["f1"] is not None], dtype=np.float64)
    base = np.asarray([labels[f]["base_f1"] for f in feats if labels[f]["f1"] is not None], dtype=np.float64)
    out: dict = {"n": len(f1), "n_unscored": len(feats) - len(f1)}
    if len(f1):
        q1, med, q3 = np.quantile(f1, [0.25, 0.5, 0.75]).tolist()
        out |= {"median": med, "q1": q1, "q3": q3, "mean": float(f1.mean()),
                "frac_ge_0.6": float((f1 >= 0.6).mean()),
                "histogram": np.histogram(f1, bins=10, range=(0, 1))[0].tolist(),
                "median_base_f1": float(np.median(base)),
                "median_lift": float(np.median(f1 - base))}
    return out


def node_f1_distribution(labels: Mapping[str, Mapping[int, Mapping]], nodes: Iterable[str]) -> dict:
    """:func:`f1_distribution` over graph node ids (``resid2/41``, ``mlp2/66``; error nodes skipped)."""
    from .graph import parse_node_id

    picked = {}
    for nid in nodes:
        site, _, f = parse_node_id(nid)
        if site in ("resid", "mlp") and isinstance(f, int):  # not an error node
            if f not in labels.get(site, {}):
                raise UserError(f"no label for node {nid}: fit it first (label_pair)")
            picked[nid] = labels[site][f]
    return f1_distribution(picked)


def rule_firing(ctx: TokenContexts, label: Mapping) -> np.ndarray:
    """``[n]`` bool: where ``label``'s rule holds on the positions of ``ctx``."""
    fitter = _Fitter(ctx, 1, 1, 0.0)
    clauses = label.get("clauses") or []
    return fitter.predict([[(a["kind"], tuple(a["values"])) for a in rule] for rule in clauses])


__all__ = ["KINDS", "TokenContexts", "atom_text", "f1_distribution", "fit_labels", "label_pair", "label_text",
           "node_f1_distribution", "rule_firing", "token_contexts"]
