"""The closed-form edges against plain autograd, and behavioural effects against finite differences."""

import pytest
import torch

from featcircuit import load_model
from featcircuit.attribution import attribute_edges, batch_edges, node_effects
from featcircuit.replacement import Replacement
from featcircuit.sites import mlp_parts, pair_sites
from helpers import Foreign, autograd_edges, random_pair, random_resid


def closed_dense(parts, R, M, x, ln):
    with torch.no_grad():
        a_vals, a_idx, f_vals, f_idx, e, _ = batch_edges(parts, R, M, x, ln=ln)
    T, d_r, d_m = len(x), R.W_dec.shape[0], M.W_dec.shape[0]
    out = torch.zeros(T, d_m, d_r + 1, dtype=torch.float64)
    for t in range(T):
        for jj, j in enumerate(f_idx[t].tolist()):
            if f_vals[t, jj] == 0:
                continue
            for ii, i in enumerate(a_idx[t].tolist()):
                if a_vals[t, ii] != 0:
                    out[t, j, i] = float(e[t, jj, ii])
            out[t, j, d_r] = float(e[t, jj, -1])
    return out


@pytest.mark.parametrize("arch", ["topk", "relu"])
@pytest.mark.parametrize("ln", ["exact", "frozen"])
def test_closed_form_equals_autograd(tiny_model, arch, ln):
    layer = 1
    parts = mlp_parts(tiny_model, layer)
    pair = random_pair(tiny_model, layer, arch)
    _, x = random_resid(tiny_model, layer)
    ref = autograd_edges(parts, pair.resid, pair.mlp, x, frozen=(ln == "frozen"))
    got = closed_dense(parts, pair.resid, pair.mlp, x, ln)
    assert (ref != 0).sum() > 20  # a real test: many edges
    assert torch.equal(ref != 0, got != 0)
    rel = (got - ref).abs().max() / ref.abs().max()
    assert rel < 1e-5, float(rel)
    if ln == "frozen":  # and the two modes really differ
        exact = closed_dense(parts, pair.resid, pair.mlp, x, "exact")
        assert (exact - got).abs().max() > 1e-4 * ref.abs().max()


@pytest.mark.parametrize("dense", [True, False])
def test_aggregated_table_equals_autograd_sum(neox, dense):
    layer = 1
    parts = mlp_parts(neox, layer)
    pair = random_pair(neox, layer)
    tokens, x = random_resid(neox, layer, n=3)
    ref = autograd_edges(parts, pair.resid, pair.mlp, x)
    table = attribute_edges(Replacement(neox, {layer: pair}), tokens, batch_size=2, dense=dense,
                            progress=False)
    w = table.to_dense("weight")
    torch.testing.assert_close(w, ref.sum(0), rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    torch.testing.assert_close(table.to_dense("abs_weight"), ref.abs().sum(0), rtol=1e-5,
                               atol=1e-5 * ref.abs().max().item())
    torch.testing.assert_close(table.to_dense("max_abs"), ref.abs().amax(0), rtol=1e-5,
                               atol=1e-5 * ref.abs().max().item())
    assert torch.equal(table.to_dense("count"), (ref != 0).sum(0).double())
    assert table.n_tokens == len(x)
    top = table.top(5)
    assert (top.abs_weight[:-1] >= top.abs_weight[1:]).all() and (top.src >= 0).all()


@pytest.fixture(scope="module")
def neox64(neox_dir):
    return load_model(str(neox_dir), device="cpu", dtype=torch.float64)


def test_splice_keeps_logits_and_effects_match_finite_differences(neox64):
    layer = 1
    pair = random_pair(neox64, layer, dtype=torch.float64)
    tokens = torch.randint(0, neox64.cfg.d_vocab, (2, 6), generator=torch.Generator().manual_seed(3))
    eff = node_effects(Replacement(neox64, {layer: pair}), tokens, keep_tensors=True)
    clean = neox64(tokens)
    torch.testing.assert_close(eff["logits"], clean, rtol=1e-10, atol=1e-10)
    from featcircuit.attribution import default_metric
    r_hook, m_hook = (s.hook for s in pair_sites(neox64, layer))

    errs = {}  # the errors ε_R, ε_M of the clean run, held constant as the spec says

    def metric_with(delta_a=None, delta_f=None):
        def rh(act, hook=None):
            x = act[:, 1:]
            a = pair.resid.encode(x)
            errs.setdefault("r", x - pair.resid.decode(a))
            if delta_a is not None:
                a = a + delta_a.view_as(a)
            return torch.cat([act[:, :1], pair.resid.decode(a) + errs["r"]], 1)

        def mh(act, hook=None):
            z = act[:, 1:]
            f = pair.mlp.encode(z)
            errs.setdefault("m", z - pair.mlp.decode(f))
            if delta_f is not None:
                f = f + delta_f.view_as(f)
            return torch.cat([act[:, :1], pair.mlp.decode(f) + errs["m"]], 1)
        with torch.no_grad():
            logits = neox64.run_with_hooks(tokens, fwd_hooks=[(r_hook, rh), (m_hook, mh)])
            return float(default_metric(logits, tokens))

    assert eff["metric"] == pytest.approx(metric_with(), rel=1e-12)
    f = eff["f"]
    t, j = torch.nonzero(f)[0].tolist()
    h = 1e-5
    e = torch.zeros_like(f)
    e[t, j] = h
    fd = (metric_with(delta_f=e) - metric_with(delta_f=-e)) / (2 * h)
    assert eff["grad_f"][t, j].item() == pytest.approx(fd, rel=1e-5)
    # a resid feature: its total derivative, through attention, the skip path and the MLP's features
    a = eff["a"]
    t, i = torch.nonzero(a)[0].tolist()
    e = torch.zeros_like(a)
    e[t, i] = h
    fd = (metric_with(delta_a=e) - metric_with(delta_a=-e)) / (2 * h)
    assert eff["grad_a"][t, i].item() == pytest.approx(fd, rel=1e-5)
    # node effect = a·∂m/∂a summed over tokens (zero baseline)
    torch.testing.assert_close(eff["resid"], (eff["a"] * eff["grad_a"]).sum(0))


def test_any_module_with_encode_decode(neox):
    layer = 1
    pair = random_pair(neox, layer, arch="topk")
    tokens, _ = random_resid(neox, layer, n=2)
    ours = attribute_edges(Replacement(neox, {layer: pair}), tokens, progress=False)
    theirs = attribute_edges(Replacement(neox, {layer: (Foreign(pair.resid), Foreign(pair.mlp))}), tokens,
                             progress=False)
    torch.testing.assert_close(theirs.to_dense(), ours.to_dense(), rtol=1e-5, atol=1e-6)
    eff = node_effects(Replacement(neox, {layer: (Foreign(pair.resid), Foreign(pair.mlp))}), tokens)
    torch.testing.assert_close(eff["logits"], neox(tokens), rtol=1e-5, atol=1e-5)
