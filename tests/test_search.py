"""Ablation search: batched equals one-forward-per-edge, known kept sets, τ extremes, end points."""

import pytest
import torch

from featcircuit import load_model
from featcircuit.attribution import attribute_edges
from featcircuit.search import AblationContext, _with, search_edges, visit_order
from featcircuit.validation import faithfulness_curves, validate_edges
from test_attribution import random_pair


@pytest.fixture(scope="module")
def setup64(neox_dir):
    model = load_model(str(neox_dir), device="cpu", dtype=torch.float64)
    pair = random_pair(model, 1, dtype=torch.float64, k=4)
    tokens = torch.randint(0, model.cfg.d_vocab, (3, 8), generator=torch.Generator().manual_seed(5))
    table = attribute_edges(model, pair, tokens, layer=1, progress=False)
    return model, pair, tokens, table.top(20)


def reference_search(model, pair, tokens, cands, tau, ablation="zero"):
    """Plain ACDC: one forward per edge, no speculation."""
    H, out = {}, []
    ctx = AblationContext(model, pair, 1, tokens, ablation)
    (d_H,) = ctx.score([H])
    for i, j, w in visit_order(cands):
        (d,) = ctx.score([_with(H, i, j)])
        keep = not (d - d_H) < tau
        out.append((i, j, d - d_H, keep))
        if not keep:
            H, d_H = _with(H, i, j), d
    return out, ctx.passes


@pytest.mark.parametrize("ablation, predict", [("zero", True), ("zero", False), ("mean", True)])
def test_batched_equals_unbatched(setup64, ablation, predict):
    model, pair, tokens, cands = setup64
    deltas = [v["delta"] for v in search_edges(model, pair, tokens, cands, tau=0.0, ablation=ablation,
                                               progress=False).visited]
    tau = float(torch.tensor(deltas).abs().median())  # a τ that keeps some and removes some
    ref, ref_passes = reference_search(model, pair, tokens, cands, tau, ablation)
    res = search_edges(model, pair, tokens, cands, tau=tau, ablation=ablation, batch=8, predict=predict,
                       progress=False)
    got = [(v["src"], v["dst"], v["delta"], v["kept"]) for v in res.visited]
    assert [g[:2] for g in got] == [r[:2] for r in ref]
    assert [g[3] for g in got] == [r[3] for r in ref]
    assert 0 < sum(r[3] for r in ref) < len(ref)
    torch.testing.assert_close(torch.tensor([g[2] for g in got]), torch.tensor([r[2] for r in ref]),
                               rtol=1e-9, atol=1e-12)
    assert res.passes < ref_passes


def test_known_kept_set(setup64):
    """Edges into MLP features whose decoder row is zero carry nothing to the output: removed."""
    model, pair, tokens, cands = setup64
    dead_targets = sorted(set(cands.dst.tolist()))[::2]
    W = pair.mlp.W_dec.clone()
    try:
        with torch.no_grad():
            pair.mlp.W_dec[dead_targets] = 0
        res = search_edges(model, pair, tokens, cands, tau=1e-13, progress=False)
    finally:
        with torch.no_grad():
            pair.mlp.W_dec.copy_(W)
    kept = {(v["src"], v["dst"]) for v in res.kept}
    expected = {(i, j) for i, j in zip(cands.src.tolist(), cands.dst.tolist()) if j not in dead_targets}
    assert kept == expected


def test_tau_extremes(setup64):
    model, pair, tokens, cands = setup64
    res = search_edges(model, pair, tokens, cands, tau=0.0, progress=False)
    assert all(v["kept"] == (v["delta"] >= 0) for v in res.visited)
    assert len(res.kept) > 0
    none = search_edges(model, pair, tokens, cands, tau=1e9, progress=False)
    assert none.kept == [] and len(none.visited) == len(cands)


def test_end_points_and_validation(setup64):
    model, pair, tokens, cands = setup64
    ctx = AblationContext(model, pair, 1, tokens)
    res = search_edges(model, pair, tokens, cands, tau=1e-6, progress=False, ctx=ctx)
    assert abs(res.d_full) < 1e-12  # the spliced model with errors kept is the clean model
    curves = faithfulness_curves(ctx, cands, res)
    n = len(cands)
    for pts in curves["curves"].values():
        first, last = pts[0], pts[-1]
        assert first["size"] == 0 and last["size"] == n
        assert first["faithfulness"] == pytest.approx(0.0, abs=1e-9)  # ∅
        assert last["faithfulness"] == pytest.approx(1.0, abs=1e-9)  # full
        assert first["completeness"] == pytest.approx(0.0, abs=1e-9)  # nothing ablated
        assert last["completeness"] == pytest.approx(1.0, abs=1e-9)  # every candidate ablated
        assert first["kl"] == pytest.approx(curves["kl_empty"]) and last["kl"] == pytest.approx(curves["kl_full"])
    val = validate_edges(ctx, cands)
    assert len(val["edges"]) == n
    # the linear estimate is close to the measured single-edge effect on this smooth tiny model
    assert val["pearson"] > 0.9, val["pearson"]


def test_restart_after_layer_equals_full_forward(tiny_model):
    """The forward restarted at block L+1 gives the logits of the full forward with a hook."""
    pair = random_pair(tiny_model, 1)
    tokens = torch.randint(0, tiny_model.cfg.d_vocab, (3, 8), generator=torch.Generator().manual_seed(2))
    fast = AblationContext(tiny_model, pair, 1, tokens)
    assert fast._tail is not None
    slow = AblationContext(tiny_model, pair, 1, tokens)
    slow._tail = None
    cands = attribute_edges(tiny_model, pair, tokens, layer=1, progress=False).top(6)
    configs = [{}] + [_with({}, i, j) for i, j in zip(cands.src.tolist(), cands.dst.tolist())]
    torch.testing.assert_close(torch.tensor(fast.score(configs)), torch.tensor(slow.score(configs)),
                               rtol=1e-4, atol=1e-7)
    assert max(fast.score(configs)) > 1e-6  # the configurations really change the output
