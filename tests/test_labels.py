"""Scored rule labels on a synthetic code corpus whose features fire by rules the generator knows.

The generator writes Python-like lines from a small vocabulary and records, for every token, the
facts the planted features depend on (which template, inside which bracket, after which token);
the features' activations come from those records, never from featcircuit's context scanner.
"""

import json
import random

import numpy as np
import pytest
import torch

from featcircuit.errors import UserError
from featcircuit.labels import atom_text, f1_distribution, fit_labels, label_text, rule_firing, token_contexts
from featcircuit.replacement import Replacement
from featcircuit.stats import FeatureIndex
from helpers import text_tokens

VOCAB = ["<bos>", "def", " f", "(", "x", ",", "y", ")", ":", "\n", "    ", "return", " x", "print", "#", " c",
         "=", " y", "'", "s", "[", "]", " g"]
ID = {t: i for i, t in enumerate(VOCAB)}
BOS = 0


class StubTokenizer:
    """Decodes ids of :data:`VOCAB`; nothing else."""

    bos_token_id = BOS

    def decode(self, ids):
        return "".join(VOCAB[i] for i in ids)


def _line(rng: random.Random) -> list[tuple[str, dict]]:
    """One line of tokens, each with the facts the planted features read."""
    X = lambda: rng.choice(["x", "y"])  # noqa: E731
    kind = rng.choice("ABCDEF")
    if kind == "A":  # def f(x, y):
        toks = [("def", {}), (" f", {"after_def": True}), ("(", {}), (X(), {"in_paren": True}), (",", {}),
                (X(), {"in_paren": True}), (")", {}), (":", {})]
    elif kind == "B":  # ····return x
        toks = [("    ", {}), ("return", {}), (" x", {})]
    elif kind == "C":  # print(x) or print('s', x), then maybe ", y" (after the parentheses close)
        arg = [(X(), {"in_paren": True})] if rng.random() < 0.5 else \
            [("'", {}), ("s", {}), ("'", {}), (",", {}), (X(), {"in_paren": True})]
        tail = [(",", {}), (X(), {})] if rng.random() < 0.5 else []
        toks = [("print", {}), ("(", {})] + arg + [(")", {})] + tail
    elif kind == "D":  # # c x   (a comment)
        toks = [("#", {}), (" c", {"comment": True}), (X(), {"comment": True})]
    elif kind == "E":  # x = y, or f = y (" f" not after "def")
        toks = [(rng.choice([X(), " f"]), {}), ("=", {}), (" y", {})]
    else:  # g[x] or g[x, y]  (in square brackets: not in parentheses)
        toks = [(" g", {}), ("[", {}), (X(), {})] + ([(",", {}), (X(), {})] if rng.random() < 0.5 else []) + \
            [("]", {})]
    return toks + [("\n", {})]


def _corpus(seed: int, n_seq: int = 24, n_ctx: int = 64):
    """Rows of whole lines (the last one cut), so no line, bracket or comment spans two rows."""
    rng = random.Random(seed)
    rows, facts = [], []
    for _ in range(n_seq):
        row: list[tuple[str, dict]] = []
        while len(row) < n_ctx - 1:
            if rng.random() < 0.03:
                row.append(("<bos>", {}))  # a document boundary
            row += _line(rng)
        rows.append([ID[t] for t, _ in row[: n_ctx - 1]])
        facts += [f for _, f in row[: n_ctx - 1]]
    tokens = torch.cat([torch.full((n_seq, 1), BOS), torch.tensor(rows)], 1)
    return tokens, facts


def _planted(tokens: torch.Tensor, facts: list[dict], seed: int) -> torch.Tensor:
    """``[n_positions, 5]`` activations of five planted features (positions >= 1, row-major)."""
    flat = tokens[:, 1:].flatten().tolist()
    g = torch.Generator().manual_seed(seed)
    acts = torch.zeros(len(flat), 5)
    for r, (t, f) in enumerate(zip(flat, facts)):
        acts[r, 0] = 2.0 if VOCAB[t] == "print" else 0.0  # the current token
        acts[r, 1] = 1.5 if f.get("after_def") else 0.0  # the previous token
        acts[r, 2] = 1.0 if VOCAB[t] in ("x", "y") and f.get("in_paren") else 0.0  # token ∧ bracket
        acts[r, 3] = 0.7 if f.get("comment") else 0.0  # lexical state
    acts[:, 4] = (torch.rand(len(flat), generator=g) < 0.3).float() * 0.5  # noise
    # feature 0 also fires weakly on "(": only its strong firings are "print"
    paren = torch.tensor([VOCAB[t] == "(" for t in flat])
    acts[paren, 0] = 0.2
    return acts


def _index(tokens: torch.Tensor, acts: torch.Tensor) -> FeatureIndex:
    n_seq, n_ctx = tokens.shape
    rows, feats = torch.nonzero(acts > 0, as_tuple=True)
    flat = (rows // (n_ctx - 1)) * n_ctx + rows % (n_ctx - 1) + 1
    order = torch.argsort(feats * tokens.numel() + flat)
    feats, flat, vals = feats[order], flat[order], acts[rows, feats][order]
    offsets = torch.zeros(acts.shape[1] + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(torch.bincount(feats, minlength=acts.shape[1]), 0)
    return FeatureIndex("mlp", 0, "h", tokens, offsets, flat, vals,
                        torch.bincount(tokens[:, 1:].flatten(), minlength=len(VOCAB)))


@pytest.fixture(scope="module")
def planted():
    tr_tokens, tr_facts = _corpus(0)
    ho_tokens, ho_facts = _corpus(1)
    tr = _index(tr_tokens, _planted(tr_tokens, tr_facts, 0))
    ho = _index(ho_tokens, _planted(ho_tokens, ho_facts, 1))
    return tr, ho, ho_facts


def test_context_variables_of_a_hand_written_row():
    text = ["def", " f", "(", "x", ",", "[", "y", "]", ")", ":", "\n", "    ", "return", " x", "#", " c", "(",
            "\n", "print", "(", "'", "s", "(", "'", ")"]
    tokens = torch.tensor([[BOS] + [ID[t] for t in text]])
    ctx = token_contexts(tokens, StubTokenizer())
    at = {k: ctx.cat[k].tolist() for k in ctx.cat}
    br = [("none", "(", "[", "{")[v] for v in at["bracket"]]
    assert br[:11] == ["none", "none", "none", "(", "(", "(", "[", "[", "(", "none", "none"]
    # the comment's "(" and the string's "(" open nothing
    assert br[16] == "none" and br[17] == "none" and br[21] == "(" and br[23] == "(" and br[24] == "("
    lex = [("code", "string", "triple", "comment")[v] for v in at["lex"]]
    assert lex[14] == "code" and lex[15] == "comment" and lex[16] == "comment" and lex[18] == "code"
    assert lex[20] == "code" and lex[21] == "string" and lex[22] == "string" and lex[23] == "string"
    assert lex[24] == "code"
    assert at["indent"][11:17] == [1] * 6 and at["indent"][:11] == [0] * 11 and at["indent"][18] == 0
    assert at["col"][:4] == [0, 1, 2, 3] and at["col"][11] == 0 and at["col"][12] == 1 and at["col"][18] == 0
    assert at["prev"][0] == BOS and at["prev"][1] == ID["def"] and at["tok"][3] == ID["x"]
    shapes = [("newline", "blank", "word after a space", "word piece", "number", "punctuation", "other")[v]
              for v in at["shape"]]
    assert shapes[:4] == ["word piece", "word after a space", "punctuation", "word piece"]
    assert shapes[10] == "newline" and shapes[11] == "blank"
    line = lambda r: sorted(ctx.line_val[ctx.line_ptr[r]:ctx.line_ptr[r + 1]].tolist())  # noqa: E731
    assert line(0) == [] and line(3) == sorted({ID["def"], ID[" f"], ID["("]})
    assert line(11) == [] and line(13) == sorted({ID["    "], ID["return"]}) and line(18) == []


def test_planted_rules_are_found_and_scored_on_heldout(planted):
    tr, ho, ho_facts = planted
    tok = StubTokenizer()
    labels = fit_labels(tr, ho, tok, threshold_frac=0.0)
    # feature 0 fires on "print" and weakly on "(": at threshold 0 both belong to the rule
    assert [[set(a["shown"]) for a in rule] for rule in labels[0]["clauses"]] == [[{"'print'", "'('"}]]
    assert labels[0]["f1"] == pytest.approx(1.0)
    assert labels[1]["text"] == "after 'def'" and labels[1]["f1"] == pytest.approx(1.0)
    # x/y inside parentheses: the conjunction of the token and the bracket state
    assert len(labels[2]["clauses"]) == 1
    kinds = {a["kind"]: set(a["shown"]) for a in labels[2]["clauses"][0]}
    assert kinds.get("tok") == {"'x'", "'y'"} and kinds.get("bracket") == {"("}
    assert labels[2]["f1"] == pytest.approx(1.0)
    assert labels[3]["f1"] == pytest.approx(1.0)  # "in comment" (or "'#' earlier in line")
    # noise: nothing predicts it; its score is near what "every token" gets
    assert labels[4]["f1"] < 0.6 and labels[4]["f1"] == pytest.approx(labels[4]["base_f1"], abs=0.1)
    # the held-out score is the rule's own precision/recall on the held-out firings
    hc = token_contexts(ho.tokens, tok)
    for f in range(5):
        pred = rule_firing(hc, labels[f])
        fire = np.zeros(hc.n, dtype=bool)
        fire[hc.rows_of(ho.acts(f)[0].numpy())] = True
        tp = (pred & fire).sum()
        assert labels[f]["precision"] == pytest.approx(tp / pred.sum())
        assert labels[f]["recall"] == pytest.approx(tp / fire.sum())
        assert labels[f]["n_fire"] == fire.sum()
        assert labels[f]["base_f1"] == pytest.approx(2 * fire.mean() / (1 + fire.mean()))
    n_paren_xy = sum(1 for f in ho_facts if f.get("in_paren"))
    assert labels[2]["n_fire"] == n_paren_xy
    assert "[F1 1.00]" in label_text(labels[1])


def test_a_disjunction_is_found_when_one_clause_cannot_say_it():
    """A feature firing on "print" or inside a comment: two clauses of different variables."""
    def acts_of(tokens, facts):
        flat = tokens[:, 1:].flatten().tolist()
        a = torch.zeros(len(flat), 1)
        for r, (t, f) in enumerate(zip(flat, facts)):
            a[r, 0] = 1.0 if VOCAB[t] == "print" or f.get("comment") else 0.0
        return a
    (trt, trf), (hot, hof) = _corpus(0), _corpus(1)
    tr, ho = _index(trt, acts_of(trt, trf)), _index(hot, acts_of(hot, hof))
    two = fit_labels(tr, ho, StubTokenizer(), max_clauses=3)[0]
    assert len(two["clauses"]) >= 2 and " or " in two["text"]
    assert two["f1"] == pytest.approx(1.0)
    one = fit_labels(tr, ho, StubTokenizer(), max_clauses=1)[0]
    assert len(one["clauses"]) == 1 and one["f1"] < 0.9  # one clause says only part of it
    # held-out score: the disjunction's own precision and recall
    hc = token_contexts(ho.tokens, StubTokenizer())
    fire = np.zeros(hc.n, dtype=bool)
    fire[hc.rows_of(ho.acts(0)[0].numpy())] = True
    for lab in (one, two):
        pred = rule_firing(hc, lab)
        assert lab["recall"] == pytest.approx((pred & fire).sum() / fire.sum())


def test_clauses_of_one_variable_merge_into_one_value_set():
    from featcircuit.labels import _merge

    a, b = ("tok", (1, 2)), ("tok", (5,))
    both = [("prev", (3,)), ("tok", (4,))]
    assert _merge([[a], both, [b]]) == [[("tok", (1, 2, 5))], both]


def test_threshold_is_a_fraction_of_the_features_max(planted):
    tr, ho, _ = planted
    labels = fit_labels(tr, ho, StubTokenizer(), [0], threshold_frac=0.5)
    assert labels[0]["threshold"] == pytest.approx(1.0)  # half of max 2.0: only "print" fires
    assert labels[0]["text"] == "'print'" and labels[0]["f1"] == pytest.approx(1.0)


def test_labels_are_deterministic(planted):
    tr, ho, _ = planted
    a = fit_labels(tr, ho, StubTokenizer())
    b = fit_labels(tr, ho, StubTokenizer())
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_f1_distribution_matches_numpy(planted):
    tr, ho, _ = planted
    labels = fit_labels(tr, ho, StubTokenizer())
    labels[7] = {"f1": None, "base_f1": 0.0}  # a feature without a score counts apart
    d = f1_distribution(labels)
    f1 = np.array([labels[f]["f1"] for f in range(5)])
    assert d["n"] == 5 and d["n_unscored"] == 1
    assert d["median"] == pytest.approx(np.median(f1)) and d["q1"] == pytest.approx(np.quantile(f1, 0.25))
    assert d["frac_ge_0.6"] == pytest.approx((f1 >= 0.6).mean()) and sum(d["histogram"]) == 5
    sub = f1_distribution(labels, [1, 4])
    assert sub["n"] == 2 and sub["median"] == pytest.approx((labels[1]["f1"] + labels[4]["f1"]) / 2)
    with pytest.raises(UserError, match="no label for feature 9"):
        f1_distribution(labels, [9])
    from featcircuit.labels import node_f1_distribution

    nd = node_f1_distribution({"mlp": labels, "resid": {}}, ["mlp0/1", "mlp0/4", "mlp0/err"])
    assert nd == sub
    with pytest.raises(UserError, match="no label for node resid0/3"):
        node_f1_distribution({"mlp": labels, "resid": {}}, ["resid0/3"])


def test_bad_arguments_are_user_errors(planted):
    tr, ho, _ = planted
    with pytest.raises(UserError, match="threshold_frac"):
        fit_labels(tr, ho, StubTokenizer(), threshold_frac=1.5)
    with pytest.raises(UserError, match="unknown feature 99"):
        fit_labels(tr, ho, StubTokenizer(), [99])


def test_atom_text():
    tok = StubTokenizer()
    assert atom_text("prev", [ID["def"], ID["print"]], tok) == "after 'def'|'print'"
    assert atom_text("bracket", [0], tok) == "outside brackets"
    assert atom_text("line", [ID["#"]], tok) == "'#' earlier in line"
    assert atom_text("tok", list(range(1, 7)), tok).endswith("|…+2")


def test_same_seed_retrain_gives_the_same_weights_and_labels(neox, tmp_path):
    """Dictionary training and labelling are deterministic: a same-seed retrain changes no label."""
    from featcircuit.labels import label_pair
    from featcircuit.training import TrainConfig, train_pair

    tokens = text_tokens(neox)
    cfg = TrainConfig(width=2.0, k=4, tokens=600, epochs=1, batch_size=100, warmup_steps=2, dead_tokens=200,
                      n_ctx=tokens.shape[1])
    a = train_pair(neox, 1, tokens, cfg, progress=False)
    b = train_pair(neox, 1, tokens, cfg, progress=False)
    for site in ("resid", "mlp"):
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            assert torch.equal(getattr(getattr(a, site), name), getattr(getattr(b, site), name)), (site, name)
    half = len(tokens) // 2
    la = label_pair(Replacement(neox, {1: a}), tokens[:half], tokens[half:], cache_dir=tmp_path / "a")
    lb = label_pair(Replacement(neox, {1: b}), tokens[:half], tokens[half:], cache_dir=tmp_path / "b")
    assert json.dumps(la, sort_keys=True) == json.dumps(lb, sort_keys=True)
    assert any(x["f1"] is not None for x in la["mlp"].values())
