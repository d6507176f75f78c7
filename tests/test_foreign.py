"""A user's dictionary (any module with encode/decode) works everywhere a featcircuit one does.

Each analysis runs twice on the same weights, once through featcircuit's Dictionary and once
through a wrapper that hides every weight name; the results must agree.
"""

import json

import pytest
import torch

from featcircuit.replacement import Replacement
from featcircuit.sites import pair_sites
from helpers import Foreign, random_pair, text_tokens

LAYER = 1


@pytest.fixture(scope="module")
def both(neox):
    pair = random_pair(neox, LAYER, k=3, width=2)
    return pair, (Foreign(pair.resid), Foreign(pair.mlp)), text_tokens(neox)[:6]


def test_stats_cards_and_labels(neox, both, tmp_path):
    from featcircuit.cards import analyze_features
    from featcircuit.labels import label_pair
    from featcircuit.stats import collect_stats

    pair, foreign, tokens = both
    ours = collect_stats(Replacement(neox, {LAYER: pair}), tokens, progress=False, cache_dir=tmp_path)
    theirs = collect_stats(Replacement(neox, {LAYER: foreign}), tokens, progress=False, cache_dir=tmp_path)
    for site in ("resid", "mlp"):
        torch.testing.assert_close(theirs[site].freq, ours[site].freq)
        torch.testing.assert_close(theirs[site].top_vals, ours[site].top_vals, rtol=1e-5, atol=1e-6)
        assert torch.equal(theirs[site].lens_top, ours[site].lens_top)
    feats = torch.nonzero(ours["mlp"].freq > 0).flatten()[:2].tolist()
    ca, cb = (analyze_features(Replacement(neox, {LAYER: p}), tokens, "mlp", feats, cache_dir=tmp_path,
                               removal_window=4) for p in (pair, foreign))
    for a, b in zip(ca, cb):
        assert [x["token"] for x in a["lens"]["top"]] == [x["token"] for x in b["lens"]["top"]]
        assert [(t["seq"], t["pos"]) for t in a["top"]] == [(t["seq"], t["pos"]) for t in b["top"]]
        assert b["removal"]["act"] == pytest.approx(a["removal"]["act"], rel=1e-5)
    la = label_pair(Replacement(neox, {LAYER: pair}), tokens[:3], tokens[3:], cache_dir=tmp_path)
    lb = label_pair(Replacement(neox, {LAYER: foreign}), tokens[:3], tokens[3:], cache_dir=tmp_path)
    assert json.dumps(la, sort_keys=True) == json.dumps(lb, sort_keys=True)


def test_evaluation_evidence_ablation_and_steering(neox, both):
    from featcircuit.attribution import attribute_edges
    from featcircuit.evaluation import evaluate_pair
    from featcircuit.evidence import edge_evidence
    from featcircuit.steer import Steering

    pair, foreign, tokens = both
    qa = evaluate_pair(Replacement(neox, {LAYER: pair}), tokens, progress=False)
    qb = evaluate_pair(Replacement(neox, {LAYER: foreign}), tokens, progress=False)
    for site in ("resid", "mlp"):
        for k in ("l0", "variance_explained", "dead_frac"):
            assert qb["sites"][site][k] == pytest.approx(qa["sites"][site][k], rel=1e-5, abs=1e-6)
    assert qb["downstream"]["both"]["ce_spliced"] == pytest.approx(qa["downstream"]["both"]["ce_spliced"],
                                                                   rel=1e-5)
    top = attribute_edges(Replacement(neox, {LAYER: pair}), tokens, progress=False).top(3)
    edges = list(zip(top.src.tolist(), top.dst.tolist()))
    ea, eb = (edge_evidence(Replacement(neox, {LAYER: p}), tokens, edges, k=2) for p in (pair, foreign))
    assert [x["count"] for x in ea] == [x["count"] for x in eb]
    assert [x["sum"] for x in eb] == pytest.approx([x["sum"] for x in ea], rel=1e-5)
    site = pair_sites(neox, LAYER)[1]
    x = torch.randn(2, 5, site.width, generator=torch.Generator().manual_seed(0))
    for mode in ("add", "clamp"):
        sa = Steering(site, pair.mlp, 0, mode, 2.0).delta(x)
        sb = Steering(site, foreign[1], 0, mode, 2.0).delta(x)
        torch.testing.assert_close(sb, sa, rtol=1e-5, atol=1e-6)


def test_ablation_holds_the_mask_of_any_module(neox_dir):
    """The search's ablated targets: a module's codes are re-read with the clean TopK mask held, as
    featcircuit's own dictionary's are (re-running its encode would re-select the top k)."""
    from featcircuit import load_model
    from featcircuit.ablation import AblationContext, Config

    model = load_model(str(neox_dir), device="cpu", dtype=torch.float64)
    pair = random_pair(model, LAYER, dtype=torch.float64, k=3, width=2)
    foreign = (Foreign(pair.resid), Foreign(pair.mlp))
    tokens = text_tokens(model)[:4]
    ca = AblationContext(Replacement(model, {LAYER: pair}), tokens, "zero")
    cb = AblationContext(Replacement(model, {LAYER: foreign}), tokens, "zero")
    scope = ca.scope()
    assert cb.scope() == scope
    cfgs = [Config.empty(), Config.keeping(scope[::3]), Config.removing(scope[::5])]
    got, ref = torch.tensor(cb.values(cfgs)), torch.tensor(ca.values(cfgs))
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)
    assert ca.m_empty > 1e-8


def test_cross_layer_scorer_and_influence_take_any_module(neox_dir):
    """Across layers 0-1 with modules in place of both pairs: the same configuration values and
    the same influence ranking as featcircuit's own dictionaries."""
    from featcircuit import load_model
    from featcircuit.ablation import Config
    from featcircuit.crossablation import CrossContext
    from featcircuit.influence import rank_cross_edges
    from featcircuit.replacement import Replacement

    model = load_model(str(neox_dir), device="cpu", dtype=torch.float64)
    pairs = {L: random_pair(model, L, dtype=torch.float64, k=3, width=2, seed=L) for L in (0, 1)}
    foreign = {L: (Foreign(p.resid), Foreign(p.mlp)) for L, p in pairs.items()}
    tokens = text_tokens(model)[:3]
    ca = CrossContext(Replacement(model, pairs, [0, 1]), tokens, "zero")
    cb = CrossContext(Replacement(model, foreign, [0, 1]), tokens, "zero")
    scope = ca.scope()
    assert cb.scope() == scope
    cfgs = [Config.empty(), Config.keeping(scope[::3]), Config.removing(scope[::4])]
    got, ref = torch.tensor(cb.values(cfgs)), torch.tensor(ca.values(cfgs))
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)
    ra, rb = rank_cross_edges(ca), rank_cross_edges(cb)  # through the backward pass of code_grads
    sa, sb = ra.stat("abs"), rb.stat("abs")
    assert sa.keys() == sb.keys() and max(abs(v) for v in sa.values()) > 0
    for e in sa:
        assert sb[e] == pytest.approx(sa[e], rel=1e-7, abs=1e-12)


class _ReluAE(torch.nn.Module):
    """A user's ReLU autoencoder (no featcircuit names): codes relu(W x + b)."""

    def __init__(self, d, m, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = torch.nn.Parameter(torch.randn(m, d, generator=g, dtype=torch.float64) / d**0.5)
        self.b = torch.nn.Parameter(torch.randn(m, generator=g, dtype=torch.float64) * 0.3)
        self.D = torch.nn.Parameter(torch.randn(m, d, generator=g, dtype=torch.float64))

    def encode(self, x):
        return torch.relu(x @ self.W.T + self.b)

    def decode(self, f):
        return f @ self.D


def _jacobian_rows(module, z, idx):
    """``∂code_{idx[r, s]}/∂z[r]`` from torch's full Jacobian of one row at a time."""
    rows = []
    for r in range(len(z)):
        J = torch.autograd.functional.jacobian(lambda v: module.encode(v[None])[0], z[r])  # [m, d]
        rows.append(J[idx[r]])
    return torch.stack(rows)


def test_encoder_columns_of_any_module_are_its_jacobian_rows():
    """``enc_cols`` of a user's module (one vjp per feature slot) equals torch's own Jacobian, for
    active and inactive features, repeated ones too."""
    from featcircuit.adapters import ModuleDictionary

    d, m, T = 5, 9, 6
    ae = _ReluAE(d, m, seed=3)
    md = ModuleDictionary(ae, d)
    z = torch.randn(T, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    idx = torch.randint(0, m, (T, 20), generator=torch.Generator().manual_seed(2))
    got = md.enc_cols(z, idx)
    assert got.shape == (T, 20, d)
    ref = _jacobian_rows(ae, z, idx)
    assert ref.abs().sum() > 0 and (ref == 0).any()  # active and inactive features both asked for
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)
