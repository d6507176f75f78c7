"""Feature cards on cases with known answers: a token-detector feature built by hand, a hand-set
unembedding for the logit lens, a stub activation for token removal, a synthetic index for bins."""

import json

import pytest
import torch

from featcircuit import load_model
from featcircuit.dictionary import DictConfig, Dictionary, Pair, save_pair
from featcircuit.features import (
    FeatureIndex,
    analyze_features,
    collect_stats,
    feature_card,
    feature_directions,
    feature_index,
    format_card,
    labels_for,
    lens_mask,
    token_label,
    token_removal,
    unembed,
)
from featcircuit.models import model_name
from featcircuit.replacement import Replacement
from featcircuit.sites import mlp_parts, pair_sites
from helpers import TEXT, autograd_edges, random_pair, text_tokens


@pytest.fixture(scope="module")
def own_neox(neox_dir):
    """A private copy of the tiny NeoX whose unembedding the tests below rewrite."""
    return load_model(str(neox_dir), device="cpu")


def _detector_pair(model, target: int, layer: int = 0, d_sae: int = 4, seed: int = 0) -> Pair:
    """Resid feature 0 fires exactly on ``target`` at layer 0 (resid = the token's embedding)."""
    r, m = pair_sites(model, layer)
    E = model.original_model.gpt_neox.embed_in.weight.detach()
    u = E[target] / E[target].norm()
    proj = E @ u
    others = torch.cat([proj[:target], proj[target + 1:]])
    assert proj[target] > others.max()  # the detector is possible for this embedding
    thr = float(others.max() + proj[target]) / 2
    dicts = []
    for site in (r, m):
        cfg = DictConfig(d_in=site.width, d_sae=d_sae, architecture="relu", k=1, hook_name=site.hook,
                         model_name=model_name(model), layer=layer, site=site.name)
        d = Dictionary(cfg, seed=seed)
        with torch.no_grad():
            d.W_enc.zero_()
            d.b_enc.fill_(-1.0)  # every other feature is dead
            d.b_dec.zero_()
            if site.name == "resid":
                d.W_enc[:, 0] = u
                d.b_enc[0] = -thr
                d.W_dec[0] = u
        dicts.append(d.eval())
    return Pair(*dicts)


def _target(model, tokens):
    """The most frequent non-BOS token whose embedding a detector can separate from all others."""
    E = model.original_model.gpt_neox.embed_in.weight.detach()
    counts = torch.bincount(tokens[:, 1:].flatten(), minlength=E.shape[0])
    for t in counts.argsort(descending=True).tolist():
        u = E[t] / E[t].norm()
        proj = E @ u
        if proj[t] > torch.cat([proj[:t], proj[t + 1:]]).max() + 0.05:
            return t
    raise AssertionError("no separable token")


@pytest.fixture(scope="module")
def lens_setup(own_neox):
    """The detector pair plus an unembedding with known top/bottom tokens and two decoys."""
    model = own_neox
    tokens = text_tokens(model)
    target = _target(model, tokens)
    pair = _detector_pair(model, target)
    counts = torch.bincount(tokens[:, 1:].flatten(), minlength=model.cfg.d_vocab)
    special = set(model.tokenizer.all_special_ids)
    seen = [t for t in torch.nonzero(counts).flatten().tolist() if t != target and t not in special]
    unseen = [t for t in range(len(model.tokenizer)) if counts[t] == 0
              and t not in special]
    W = model.original_model.lm_head.weight  # [d_vocab, d_model] = W_U.T
    ln_w = model.original_model.gpt_neox.final_layer_norm.weight.detach()
    u = pair.resid.W_dec[0].detach()
    v = (u - u.mean()) * ln_w  # what the lens multiplies W_U by
    v = v / v.norm()
    med = float(W.detach().norm(dim=1).median())
    promote, suppress, junk, ghost = seen[0], seen[1], seen[2], unseen[0]
    with torch.no_grad():
        W[promote] = med * v  # largest lens value among shown tokens
        W[suppress] = -med * v  # smallest
        W[junk] = 50 * med * v  # an unembedding-norm outlier: hidden
        W[ghost] = 1.5 * med * v  # never in the data: hidden
    return {"model": model, "pair": pair, "tokens": tokens, "target": target, "promote": promote,
            "suppress": suppress, "junk": junk, "ghost": ghost}


def test_detector_card_top_tokens_freq_and_lens(lens_setup, tmp_path):
    s = lens_setup
    model, tokens, target = s["model"], s["tokens"], s["target"]
    (card,) = analyze_features(Replacement(model, {0: s["pair"]}), tokens, "resid", [0], cache_dir=tmp_path)
    n_target = int((tokens[:, 1:] == target).sum())
    assert card["n_active"] == n_target
    assert card["freq"] == pytest.approx(n_target / (tokens.shape[0] * (tokens.shape[1] - 1)))
    assert len(card["top"]) == min(10, n_target)
    for ex in card["top"]:
        assert ex["ids"][ex["index"]] == target  # the activating token is the detected one
        assert tokens[ex["seq"], ex["pos"]] == target
        # only occurrences of the target token are nonzero in the context
        assert all((v > 0) == (i == target) for v, i in zip(ex["values"], ex["ids"]))
    # logit lens: the hand-set columns, with the outlier and the unseen token hidden
    assert card["lens"]["top"][0]["id"] == s["promote"]
    assert card["lens"]["bottom"][0]["id"] == s["suppress"]
    shown = {x["id"] for x in card["lens"]["top"] + card["lens"]["bottom"]}
    assert s["junk"] not in shown and s["ghost"] not in shown
    mask = lens_mask(model, torch.bincount(tokens[:, 1:].flatten(), minlength=model.cfg.d_vocab))
    assert not mask[s["junk"]] and not mask[s["ghost"]] and mask[s["promote"]]
    assert not mask[model.tokenizer.bos_token_id]
    # label (unscored here): the detected token; the promoted one stays in the card's lens only
    tok = model.tokenizer
    assert card["label"] == repr(tok.decode([target])) and card["label_score"] is None
    assert card["dense"] == (card["freq"] > 0.1)
    # layer 0 reads only the current token's embedding: dropping earlier tokens changes nothing
    rem = card["removal"]
    assert rem["effects"] and rem["act"] == pytest.approx(card["top"][0]["act"], abs=1e-5)
    assert max(abs(e["delta"]) for e in rem["effects"]) < 1e-5
    assert rem["effects"][0]["pos"] >= 1  # BOS is never dropped
    text = format_card(card)
    assert f"⟦{tok.decode([target]).replace(chr(10), '⏎')}⟧" in text


def test_labels_for_and_collect_stats_agree_with_card(lens_setup, tmp_path):
    s = lens_setup
    model, tokens = s["model"], s["tokens"]
    stats = collect_stats(Replacement(model, {0: s["pair"]}), tokens, progress=False)
    assert stats["resid"].lens_top[0, 0] == s["promote"]
    labels = labels_for([("resid", 0), ("mlp", 1)], stats, tokens, model.tokenizer, 0)
    (card,) = analyze_features(Replacement(model, {0: s["pair"]}), tokens, "resid", [0], removal=False,
                               cache_dir=tmp_path)
    assert labels["resid0/0"] == card["label"]
    old = labels_for([("resid", 0)], stats, tokens, model.tokenizer, 0, lens=True)["resid0/0"]
    assert old == f"{card['label']} → {model.tokenizer.decode([s['promote']])!r}"
    scored = {"resid": {0: {"text": "'x'", "f1": 0.5}}}
    got = labels_for([("resid", 0)], stats, tokens, model.tokenizer, 0, scored=scored)
    assert got == {"resid0/0": "'x' [F1 0.50]"}
    assert labels["mlp0/1"].startswith("(never active)")
    want = repr(model.tokenizer.decode([s["target"]]))
    assert token_label(stats["resid"], tokens, model.tokenizer, 0) == want
    assert stats["resid"].node_stats(0)["freq"] == pytest.approx(card["freq"])


def test_unembed_matches_the_model_logits(neox):
    """unembed(x)/σ(x) plus the bias terms is exactly the model's logits (LayerNorm final norm)."""
    tokens = text_tokens(neox)[:2]
    logits, cache = neox.run_with_cache(tokens)
    x = cache[f"blocks.{neox.cfg.n_layers - 1}.hook_resid_post"].flatten(0, 1)
    ln = neox.original_model.gpt_neox.final_layer_norm
    xc = x - x.mean(-1, keepdim=True)
    sigma = (xc.pow(2).mean(-1, keepdim=True) + ln.eps).sqrt()
    want = unembed(neox, x) / sigma + ln.bias @ neox.W_U + neox.b_U
    torch.testing.assert_close(want, logits.flatten(0, 1), atol=1e-4, rtol=1e-4)


def test_mlp_direction_goes_through_w_out(neox):
    pair = random_pair(neox, 1)
    rep = Replacement(neox, {1: pair})
    d = feature_directions(rep, "mlp", [3, 5])
    torch.testing.assert_close(d, pair.mlp.W_dec[[3, 5]] @ mlp_parts(neox, 1).W_out)
    torch.testing.assert_close(feature_directions(rep, "resid", [2]), pair.resid.W_dec[[2]])


def test_token_removal_previous_token_stub():
    """A feature that fires when the previous token is 7: only dropping that token changes it."""
    def act(batch):
        return (batch[:, -2] == 7).float() * 2.0 + 0.5

    context = torch.tensor([0, 3, 5, 7, 9])
    base, eff = token_removal(act, context, window=None, keep_first=1)
    assert base == 2.5
    assert [e["pos"] for e in eff] == [1, 2, 3]
    assert {e["pos"]: e["delta"] for e in eff} == {1: 0.0, 2: 0.0, 3: -2.0}
    # the window keeps only the nearest tokens; keep_first protects the start
    _, eff = token_removal(act, context, window=2, keep_first=1)
    assert [e["pos"] for e in eff] == [2, 3]
    _, eff = token_removal(act, context, window=None, keep_first=0, batch_size=2)
    assert [e["pos"] for e in eff] == [0, 1, 2, 3] and eff[3]["delta"] == -2.0


def _synthetic_index(vals: list[float], n_seq=4, n_ctx=16) -> FeatureIndex:
    tokens = torch.arange(n_seq * n_ctx).view(n_seq, n_ctx) % 50
    pos = torch.tensor([s * n_ctx + p for s in range(n_seq) for p in range(1, n_ctx)])[: len(vals)]
    return FeatureIndex("mlp", 1, "h", tokens, torch.tensor([0, len(vals)]), pos,
                        torch.tensor(vals, dtype=torch.float32), torch.ones(50, dtype=torch.long))


def test_bins_cover_the_range_and_histogram_counts():
    # activations skewed to small values: top-k alone would never show the low end
    vals = [0.07 + 0.1 * i for i in range(40)] + [8.0, 9.0, 10.0]
    idx = _synthetic_index(vals)
    card = feature_card(None, idx, 0, n_bins=8, n_hist=10, removal=False,
                        mask=torch.ones(50, dtype=torch.bool), lens_values=torch.linspace(-1, 1, 50))
    assert card["max_act"] == pytest.approx(10.0)
    edges = [(b["lo"], b["hi"]) for b in card["bins"]]
    assert edges[0][0] == 0 and edges[-1][1] == pytest.approx(10.0) and len(edges) == 8
    assert sum(b["count"] for b in card["bins"]) == len(vals)
    for b in card["bins"]:
        if b["count"]:
            assert b["lo"] < b["example"]["act"] <= b["hi"] + 1e-6
            ex = b["example"]
            assert ex["values"][ex["index"]] == pytest.approx(ex["act"])
        else:
            assert b["example"] is None
    assert [b["count"] > 0 for b in card["bins"]] == [True, True, True, True, False, False, True, True]
    assert sum(card["histogram"]["counts"]) == len(vals)
    assert card["histogram"]["counts"][0] == 10  # 0.07 … 0.97 fall in (0, 1]
    assert [ex["act"] for ex in card["top"][:3]] == pytest.approx([10.0, 9.0, 8.0])
    assert card["lens"]["top"][0]["id"] == 49 and card["lens"]["bottom"][0]["id"] == 0
    # deterministic: same seed, same examples
    again = feature_card(None, idx, 0, n_bins=8, n_hist=10, removal=False,
                         mask=torch.ones(50, dtype=torch.bool), lens_values=torch.linspace(-1, 1, 50))
    assert json.dumps(again) == json.dumps(card)


def test_index_is_cached_per_dictionary(neox, tmp_path, monkeypatch):
    import featcircuit.stats as F

    tokens = text_tokens(neox)[:6]
    pair = random_pair(neox, 1)
    a = feature_index(Replacement(neox, {1: pair}), tokens, "mlp", cache_dir=tmp_path)
    files = list(tmp_path.glob("*.pt"))
    assert len(files) == 1
    # the one pass matches a dense encode of the harvested activations
    from featcircuit import harvest
    hook = pair_sites(neox, 1)[1].hook
    codes = pair.mlp.encode(harvest(neox, tokens, [hook], progress=False)[hook][:, 1:])
    p, v = a.acts(5)
    dense = codes[..., 5]
    nz = torch.nonzero(dense > 0)
    assert torch.equal(p, nz[:, 0] * tokens.shape[1] + nz[:, 1] + 1)
    torch.testing.assert_close(v, dense[dense > 0])
    monkeypatch.setattr(F, "build_indexes", lambda *a, **k: (_ for _ in ()).throw(AssertionError("rebuilt")))
    b = feature_index(Replacement(neox, {1: pair}), tokens, "mlp", cache_dir=tmp_path)
    assert torch.equal(a.pos, b.pos) and torch.equal(a.val, b.val) and a.key == b.key
    with torch.no_grad():
        pair.mlp.b_enc[0] += 1.0  # another dictionary: another key, so a new pass
    with pytest.raises(AssertionError, match="rebuilt"):
        feature_index(Replacement(neox, {1: pair}), tokens, "mlp", cache_dir=tmp_path)


def test_unknown_feature_and_site_are_user_errors(neox, tmp_path):
    from featcircuit.errors import UserError

    pair = random_pair(neox, 1)
    tokens = text_tokens(neox)[:2]
    with pytest.raises(UserError, match="unknown feature mlp:9999"):
        analyze_features(Replacement(neox, {1: pair}), tokens, "mlp", [9999], cache_dir=tmp_path)
    with pytest.raises(UserError, match="unknown site"):
        analyze_features(Replacement(neox, {1: pair}), tokens, "attn", [0], cache_dir=tmp_path)


def test_cli_prints_a_card(lens_setup, tmp_path, capsys, monkeypatch):
    import argparse

    from featcircuit.cli import add_features_parser

    s = lens_setup
    model = s["model"]
    save_pair(s["pair"].resid, s["pair"].mlp, tmp_path / "pair")
    txt = tmp_path / "data.txt"
    txt.write_text(TEXT)
    monkeypatch.setenv("FEATCIRCUIT_CACHE", str(tmp_path / "cache"))
    parser = argparse.ArgumentParser()
    add_features_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["features", "--model", model_name(model), "--device", "cpu", "--layer", "0",
                              "--site", "resid", "--feature", "0", "--dicts", str(tmp_path / "pair"),
                              "--data", str(txt), "--split", "all", "--tokens", "512",
                              "--label-tokens", "512"])
    monkeypatch.setattr("featcircuit.models.load_model", lambda *a, **k: model)  # keep the rewritten W_U
    args.func(args)
    out = capsys.readouterr().out
    tok = model.tokenizer
    assert "resid0/0" in out and f"⟦{tok.decode([s['target']]).replace(chr(10), '⏎')}⟧" in out
    assert "logit lens" in out and "token removal" in out and "activation density" in out
    # the scored label: the detector fires exactly on the target token
    assert f"== resid0/0  {tok.decode([s['target']])!r} ==" in out and "label: held-out F1 1.00" in out
    assert list((tmp_path / "cache" / "features").glob("*.pt"))


# ---- distinct contexts, quantiles, density, edge evidence ---------------------------------------


def test_doc_ids_follow_the_packed_stream():
    from featcircuit.contexts import doc_ids

    B = 0
    tokens = torch.tensor([[B, 5, 6, B, 7], [B, 8, B, 9, 9], [B, 4, 4, 4, 4]])
    # the stream is 5 6 B 7 | 8 B 9 9 | 4 4 4 4: a separator belongs to the document it ends
    assert doc_ids(tokens, B).tolist() == [[0, 0, 0, 0, 1], [1, 1, 1, 2, 2], [2, 2, 2, 2, 2]]
    assert doc_ids(tokens, None).tolist() == [[0] * 5, [1] * 5, [2] * 5]


def test_distinct_top_one_per_document_and_no_near_duplicates():
    from featcircuit.contexts import distinct_top, doc_ids

    B = 0
    # doc 0: "1 2 3 9" twice (the same context) and a weaker "4 5 9"; doc 1: "1 2 3 9" again, "7 9"
    tokens = torch.tensor([[B, 1, 2, 3, 9, 4, 5, 9, 1, 2, 3, 9, B, 1, 2, 3, 9, 7, 9]])
    n_ctx = tokens.shape[1]
    nines = [p for p in range(1, n_ctx) if tokens[0, p] == 9]
    pos = torch.tensor(nines)
    val = torch.tensor([5.0, 1.0, 4.0, 3.0, 2.0])  # at positions 4, 7, 11, 16, 18
    docs = doc_ids(tokens, B)
    picks = distinct_top(pos, val, tokens, docs, 3, window=3)
    # 5.0 (doc 0); 4.0 repeats its window "1 2 3 9"; 3.0 repeats it too (doc 1); 2.0 "9 7 9" in doc 1;
    # then the relaxed pass fills up from doc 0: 1.0
    assert [float(val[i]) for i in picks] == [5.0, 2.0, 1.0]
    strict = distinct_top(pos, val, tokens, docs, 3, window=3, relax=False)
    assert [float(val[i]) for i in strict] == [5.0, 2.0]
    # a narrow window (the token alone) makes every activation a near duplicate of the first
    assert [float(val[i]) for i in distinct_top(pos, val, tokens, docs, 3, window=0)] == [5.0]


def test_quantile_groups_cover_the_activations_in_equal_parts():
    from featcircuit.contexts import quantile_examples

    val = torch.tensor([float(v) for v in range(1, 101)])
    pos = torch.arange(1, 101)
    docs = torch.zeros(1, 101, dtype=torch.long)
    qs = quantile_examples(pos, val, docs, 4, seed=3)
    assert [q["count"] for q in qs] == [25] * 4
    assert [(q["lo"], q["hi"]) for q in qs] == [(1.0, 25.0), (26.0, 50.0), (51.0, 75.0), (76.0, 100.0)]
    for q in qs:
        assert q["lo"] <= float(val[q["pick"]]) <= q["hi"]
    assert qs == quantile_examples(pos, val, docs, 4, seed=3)  # deterministic


def test_card_examples_are_distinct_and_span_the_quantiles():
    vals = [0.07 + 0.1 * i for i in range(40)] + [8.0, 9.0, 10.0]
    idx = _synthetic_index(vals)
    card = feature_card(None, idx, 0, n_top=4, n_quantiles=4, removal=False,
                        mask=torch.ones(50, dtype=torch.bool), lens_values=torch.linspace(-1, 1, 50))
    # without a tokenizer each row is a document: the best of each row first (10, 2.97, 1.47), then
    # filled up from rows already shown (9); shown largest first
    assert [ex["act"] for ex in card["top"]] == pytest.approx([10.0, 9.0, 2.97, 1.47])
    assert [ex["seq"] for ex in card["top"]] == [2, 2, 1, 0]
    assert card["n_docs"] == 3
    assert [q["count"] for q in card["quantiles"]] == [10, 11, 11, 11]
    assert card["quantiles"][0]["example"]["act"] < 1.1 and card["quantiles"][-1]["example"]["act"] > 2.9
    assert card["dense"] is True  # 43 of 60 tokens
    assert "DENSE" in format_card(card)


def test_drop_dense_and_candidate_edges():
    from featcircuit.attribution import EdgeTable
    from featcircuit.errors import UserError
    from featcircuit.stats import FeatureStats, candidate_edges, dense_features, drop_dense

    def st(freq):
        n = len(freq)
        return FeatureStats(torch.tensor(freq), torch.ones(n), torch.ones(n), torch.zeros(n, 1),
                            torch.zeros(n, 1, dtype=torch.long), 100)

    stats = {"resid": st([0.5, 0.01, 0.02]), "mlp": st([0.05, 0.3])}
    src, dst = torch.tensor([0, 1, 2, -1, -1, 2]), torch.tensor([0, 0, 1, 0, 1, 0])
    w = torch.tensor([9.0, 5.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    table = EdgeTable(2, 3, 2, src, dst, w, w.abs(), torch.ones(6, dtype=torch.long), w.abs(), 100)
    assert dense_features(stats) == {"resid": [0], "mlp": [1]}
    kept = drop_dense(table, stats)
    # resid 0 and mlp 1 are dense: their edges go, the error's edge into mlp 0 stays
    assert set(zip(kept.src.tolist(), kept.dst.tolist())) == {(1, 0), (-1, 0), (2, 0)}
    top = candidate_edges(table, 2, stats=stats, exclude_dense=True)
    # error sources are left out by top()
    assert list(zip(top.src.tolist(), top.dst.tolist())) == [(1, 0), (2, 0)]
    plain = candidate_edges(table, 2)
    assert list(zip(plain.src.tolist(), plain.dst.tolist())) == [(0, 0), (1, 0)]
    with pytest.raises(UserError, match="exclude_dense needs the feature stats"):
        candidate_edges(table, 2, exclude_dense=True)


def test_edge_evidence_matches_the_table_and_autograd(neox):
    from featcircuit import harvest
    from featcircuit.attribution import attribute_edges
    from featcircuit.evidence import edge_evidence

    tokens = text_tokens(neox)[:6]
    pair = random_pair(neox, 1)
    table = attribute_edges(Replacement(neox, {1: pair}), tokens, progress=False)
    top = table.top(4, features_only=False)
    edges = list(zip(top.src.tolist(), top.dst.tolist()))
    ev = edge_evidence(Replacement(neox, {1: pair}), tokens, edges, k=3, n_tokens_shown=10**6)
    hook = pair_sites(neox, 1)[0].hook
    x_all = harvest(neox, tokens, [hook], progress=False)[hook]
    parts = mlp_parts(neox, 1)
    for (i, j), x in zip(edges, ev):
        row = torch.nonzero((table.src == i) & (table.dst == j)).flatten()
        assert x["sum"] == pytest.approx(float(table.weight[row]), rel=1e-9)
        assert x["count"] == int(table.count[row])
        assert x["mean"] == pytest.approx(x["sum"] / x["count"])
        assert x["max_abs"] == pytest.approx(float(table.max_abs[row]), rel=1e-6)
        assert sum(t["sum"] for t in x["top_tokens"]) == pytest.approx(x["sum"], rel=1e-6)
        assert sum(t["count"] for t in x["top_tokens"]) == x["count"]
        sign = 1 if x["sum"] >= 0 else -1
        signed = [sign * t["edge"] for t in x["top"]]
        assert signed == sorted(signed, reverse=True)
        # each shown e_ij(t) is the autograd edge at that token
        for t in x["top"][:2]:
            xt = x_all[t["seq"], t["pos"]][None]
            ref = autograd_edges(parts, pair.resid, pair.mlp, xt)  # [1, d_mlp, d_resid + 1]
            col = pair.resid.W_dec.shape[0] if i < 0 else i
            assert t["edge"] == pytest.approx(float(ref[0, j, col]), rel=1e-4, abs=1e-6)
            assert t["values"][t["index"]] == pytest.approx(t["edge"])
    with pytest.raises(Exception, match="unknown edge"):
        edge_evidence(Replacement(neox, {1: pair}), tokens, [(0, 10**6)])


def test_stats_read_off_the_index_equal_codes_of_a_cached_forward(neox, tmp_path):
    """collect_stats (from the sparse index) against codes encoded from run_with_cache directly."""
    from featcircuit.features import collect_stats

    pair = random_pair(neox, 1, k=3, width=2)
    tokens = text_tokens(neox)[:6]
    k = 5
    stats = collect_stats(Replacement(neox, {1: pair}), tokens, k=k, lens=0, progress=False,
                          cache_dir=tmp_path, batch_size=4)
    _, cache = neox.run_with_cache(tokens)
    n_ctx = tokens.shape[1]
    for site, d in zip(pair_sites(neox, 1), (pair.resid, pair.mlp)):
        codes = d.encode(cache[site.hook][:, 1:].flatten(0, 1))  # [T, m], BOS left out
        pos = (torch.arange(len(tokens))[:, None] * n_ctx + torch.arange(1, n_ctx)).flatten()
        st = stats[site.name]
        on = codes > 0
        assert st.n_tokens == len(codes)
        torch.testing.assert_close(st.freq, on.float().mean(0))
        torch.testing.assert_close(st.mean_act, codes.sum(0) / on.sum(0).clamp_min(1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(st.max_act, codes.max(0).values, rtol=1e-5, atol=1e-6)
        v, i = codes.T.topk(k, dim=1)
        torch.testing.assert_close(st.top_vals, v, rtol=1e-5, atol=1e-6)
        # positions of the top activations: the same (value, position) pairs where values are > 0
        for f in range(codes.shape[1]):
            live = v[f] > 0
            assert sorted(st.top_pos[f][live].tolist()) == sorted(pos[i[f][live]].tolist()) or \
                len(set(v[f][live].tolist())) < int(live.sum())  # ties may pick other positions


def test_both_indexes_of_a_cold_cache_come_from_one_pass(neox, tmp_path, monkeypatch):
    """feature_indexes reads what is cached and builds the rest in one shared pass: each index still
    holds exactly the nonzero codes of a run_with_cache forward."""
    import featcircuit.activations as acts
    from featcircuit.stats import feature_indexes

    pair = random_pair(neox, 1, k=3, width=2)
    tokens = text_tokens(neox)[:6]
    calls = []
    real = acts.harvest
    monkeypatch.setattr(acts, "harvest", lambda *a, **kw: calls.append(a[2]) or real(*a, **kw))
    idx = feature_indexes(Replacement(neox, {1: pair}), tokens, cache_dir=tmp_path, batch_size=4)
    assert len(calls) == 2 and all(len(h) == 2 for h in calls)  # 6 sequences in batches of 4, both hooks
    _, cache = neox.run_with_cache(tokens)
    n_ctx = tokens.shape[1]
    for site, d in zip(pair_sites(neox, 1), (pair.resid, pair.mlp)):
        codes = d.encode(cache[site.hook][:, 1:].flatten(0, 1))
        row, f = torch.nonzero(codes > 0, as_tuple=True)
        pos = (row // (n_ctx - 1)) * n_ctx + row % (n_ctx - 1) + 1
        order = torch.argsort(f * tokens.numel() + pos)
        got = idx[site.name]
        assert torch.equal(got.pos, pos[order])
        torch.testing.assert_close(got.val, codes[row, f][order], rtol=1e-5, atol=1e-6)
        assert torch.equal(got.offsets[1:] - got.offsets[:-1], torch.bincount(f, minlength=d.W_dec.shape[0]))
    calls.clear()
    again = feature_indexes(Replacement(neox, {1: pair}), tokens, cache_dir=tmp_path, batch_size=4)
    assert calls == [] and torch.equal(again["mlp"].pos, idx["mlp"].pos)  # read from the cache
    (tmp_path / next(p.name for p in tmp_path.iterdir() if "-resid-" in p.name)).unlink()
    feature_indexes(Replacement(neox, {1: pair}), tokens, cache_dir=tmp_path, batch_size=4)
    assert len(calls) == 2 and all(len(h) == 1 for h in calls)  # only the missing site is rebuilt


def test_removals_in_shared_passes_equal_one_context_at_a_time(neox, tmp_path):
    """The cards' token removal, batched over features with right padding, against each card's own
    contexts run alone through the model (feature_card's path: one forward per context)."""
    pair = random_pair(neox, 1)
    tokens = text_tokens(neox)[:4]
    rep = Replacement(neox, {1: pair})
    for site in ("resid", "mlp"):
        index = feature_index(rep, tokens, site, cache_dir=tmp_path)
        feats = [f for f in range(index.d_sae) if len(index.acts(f)[0])][:6]
        cards = analyze_features(rep, tokens, site, feats, cache_dir=tmp_path, removal_window=5)
        assert len({c["removal"]["pos"] for c in cards}) > 1  # contexts of several lengths share a batch
        for f, card in zip(feats, cards):
            alone = feature_card(rep, index, f, removal=True, removal_window=5)["removal"]
            got = card["removal"]
            assert {k: v for k, v in got.items() if k not in ("act", "effects")} == \
                   {k: v for k, v in alone.items() if k not in ("act", "effects")}
            assert got["act"] == pytest.approx(alone["act"], rel=1e-5, abs=1e-6)
            assert [e["pos"] for e in got["effects"]] == [e["pos"] for e in alone["effects"]]
            assert [e["token"] for e in got["effects"]] == [e["token"] for e in alone["effects"]]
            for a, b in zip(got["effects"], alone["effects"]):
                assert a["delta"] == pytest.approx(b["delta"], rel=1e-4, abs=1e-5)
            assert any(abs(e["delta"]) > 1e-3 for c in cards for e in c["removal"]["effects"])
        # batches of 4 rows: a card's contexts split across batches of other lengths read the same
        from featcircuit.cards import add_removals

        again = [dict(c, removal=None) for c in cards]
        add_removals(rep, index, again, 5, batch_size=4)
        for a, b in zip(again, cards):
            assert a["removal"]["act"] == pytest.approx(b["removal"]["act"], rel=1e-5, abs=1e-6)
            for x, y in zip(a["removal"]["effects"], b["removal"]["effects"], strict=True):
                assert x["pos"] == y["pos"] and x["delta"] == pytest.approx(y["delta"], rel=1e-4, abs=1e-5)
