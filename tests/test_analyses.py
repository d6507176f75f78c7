"""The four dictionary analyses: exact perturbations, frequency removal, max-cos stability, norms."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import featcircuit.analyses as A
from featcircuit.dictionary import DictConfig, Dictionary, Pair
from featcircuit.evaluation import evaluate_pair
from featcircuit.sites import pair_sites


def _data(model, n=6, ctx=16, seed=0):
    return torch.randint(0, model.cfg.d_vocab, (n, ctx), generator=torch.Generator().manual_seed(seed))


def _relu_dict(d_in, d_sae, seed=0, layer=1, site="mlp"):
    d = Dictionary(DictConfig(d_in=d_in, d_sae=d_sae, architecture="relu", layer=layer, site=site), seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # spread the biases so features fire at very different rates
        d.b_enc.copy_(torch.linspace(-2.0, 1.0, d_sae)[torch.randperm(d_sae, generator=g)])
    return d.eval()


def _identity(d_in, layer=1, site="mlp"):
    d = Dictionary(DictConfig(d_in=d_in, d_sae=2 * d_in, architecture="relu", layer=layer, site=site))
    eye = torch.eye(d_in)
    with torch.no_grad():
        d.W_enc.copy_(torch.cat([eye, -eye], 1))
        d.W_dec.copy_(torch.cat([eye, -eye], 0))
    return d.eval()


# ---- 1. perturbation ------------------------------------------------------------------------

@pytest.mark.parametrize("c", [-0.5, 0.0, 0.5, 0.9, 0.995, 1.0])
@pytest.mark.parametrize("rho", [1.0, 0.73, 1.4])
def test_perturbation_has_exact_cos_sim_and_norm_ratio(c, rho):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 64, generator=g) * torch.logspace(-2, 2, 200)[:, None] + 3.0
    xp = A.perturb(x, c, rho, torch.Generator().manual_seed(1))
    cos = F.cosine_similarity(x.double(), xp.double(), dim=-1)
    ratio = xp.double().norm(dim=-1) / x.double().norm(dim=-1)
    assert (cos - c).abs().max() < 1e-5
    assert (ratio - rho).abs().max() < 1e-5
    if c < 1:  # the orthogonal part is random: two seeds give different perturbations
        other = A.perturb(x, c, rho, torch.Generator().manual_seed(2))
        assert not torch.allclose(xp, other)
        resid = xp - c * rho * x  # the noise component is orthogonal to x
        assert F.cosine_similarity(resid.double(), x.double(), dim=-1).abs().max() < 1e-5


def test_perturbation_sweep_kl(neox):
    toks = _data(neox)
    rows = A.perturbation_sweep(neox, 1, "mlp", toks, [1.0, 0.99, 0.5])
    kl = {r["cos_sim"]: r["kl"] for r in rows}
    assert kl[1.0] == pytest.approx(0.0, abs=1e-6)  # c=1, ρ=1 is the clean run
    assert kl[0.5] > kl[0.99] > 1e-6
    assert all(r["norm_ratio"] == 1.0 for r in rows)
    assert A.kl_at(rows, 0.5) == pytest.approx(kl[0.5])
    assert np.isnan(A.kl_at(rows, 0.2))


def test_dictionary_point_matches_evaluate_pair(neox):
    toks = _data(neox)
    r, m = pair_sites(neox, 1)
    d = _relu_dict(m.width, 3 * m.width)
    rows = A.perturbation_sweep(neox, 1, "mlp", toks, [0.9], dictionary=d)
    dict_row = next(x for x in rows if x["kind"] == "dictionary")
    acts = A.site_acts(neox, 1, "mlp", toks)
    with torch.no_grad():
        recon = d.decode(d.encode(acts))
    assert dict_row["cos_sim"] == pytest.approx(float(F.cosine_similarity(acts, recon).mean()), abs=1e-5)
    rho = float((recon.norm(dim=-1) / acts.norm(dim=-1)).mean())
    assert dict_row["norm_ratio"] == pytest.approx(rho, abs=1e-5)
    assert rows[0]["norm_ratio"] == pytest.approx(rho, abs=1e-5)  # random rows use the same ρ
    ev = evaluate_pair(neox, Pair(_identity(r.width, site="resid"), d), toks, 1, progress=False)
    assert dict_row["kl"] == pytest.approx(ev["downstream"]["mlp"]["kl_spliced"], rel=1e-4, abs=1e-7)
    assert dict_row["ce"] == pytest.approx(ev["downstream"]["mlp"]["ce_spliced"], rel=1e-5)


# ---- 2. lower L0 ----------------------------------------------------------------------------

def test_frequency_removal_reaches_target_in_frequency_order():
    d = _relu_dict(32, 96)
    acts = torch.randn(3000, 32, generator=torch.Generator().manual_seed(5))
    freq = A.feature_frequencies(d, acts)
    direct = (d.encode(acts) > 0).double().mean(0)
    torch.testing.assert_close(freq, direct)
    l0 = float(freq.sum())
    assert l0 > 10
    for target in (0.8 * l0, 0.5 * l0, 0.1 * l0, 0.0):
        removed = A.frequency_removal(freq, target)
        assert A.masked_l0(d, acts, removed) <= target + 1e-9
        # the fewest features: putting the last one back overshoots the target
        assert A.masked_l0(d, acts, removed[:-1]) > target
        # removed in frequency order, and the removed set is the top-frequency set
        assert torch.all(freq[removed][:-1] >= freq[removed][1:])
        kept = torch.ones(96, dtype=torch.bool)
        kept[removed] = False
        if kept.any():
            assert freq[removed].min() >= freq[kept].max()
    assert len(A.frequency_removal(freq, l0 + 1)) == 0


def test_lower_l0_comparison_rows(neox):
    toks = _data(neox)
    _, m = pair_sites(neox, 1)
    base = _identity(m.width)
    rows = A.lower_l0_comparison(neox, 1, "mlp", base, {0.5: _identity(m.width)}, toks, target_l0s=(20.0,))
    by = {(r["method"], r.get("target_l0")): r for r in rows}
    assert by[("base", None)]["recovered_vs_zero"] == pytest.approx(1.0, abs=1e-4)
    assert by[("l1", None)]["recovered_vs_zero"] == pytest.approx(1.0, abs=1e-4)
    same = [r for r in rows if r["method"] == "remove_frequent" and r["n_removed"] == 0]
    assert same and same[0]["recovered_vs_zero"] == pytest.approx(1.0, abs=1e-4)
    low = by[("remove_frequent", 20.0)]
    assert low["l0"] <= 20.0 and low["n_removed"] > 0 and low["recovered_vs_zero"] < 0.999


# ---- 3. stability ---------------------------------------------------------------------------

def test_max_cos_self_permuted_and_random():
    d = Dictionary(DictConfig(d_in=128, d_sae=256), seed=3)
    torch.testing.assert_close(A.max_cos(d, d), torch.ones(256), atol=1e-5, rtol=0)
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(0))
    scaled = d.W_dec.detach()[perm] * (torch.rand(256, 1) * 5 + 0.1)  # norms do not matter
    torch.testing.assert_close(A.max_cos(d, scaled), torch.ones(256), atol=1e-5, rtol=0)
    rand = torch.randn(512, 128, generator=torch.Generator().manual_seed(9))
    assert A.max_cos(d, rand).max() < 0.5
    half = torch.cat([d.W_dec.detach()[:128], torch.randn(100, 128)])  # B holds exactly A's first half
    st = A.stability_matrix({"a": d, "perm": scaled, "half": half, "rand": rand})
    f = np.array(st["frac_above"])
    assert st["labels"] == ["a", "perm", "half", "rand"]
    assert f[0, 0] == f[0, 1] == f[1, 0] == 1.0
    assert f[0, 2] == pytest.approx(0.5)
    assert f[2, 0] == pytest.approx(128 / 228)
    assert f[0, 3] == 0.0 and f[3, 0] == 0.0


# ---- 4. norms -------------------------------------------------------------------------------

def test_norm_stats_match_direct_computation(neox):
    toks = _data(neox)
    norms = A.site_norms(neox, toks, [0, 2])
    hooks = {(s.name, s.layer): s for layer in (0, 2) for s in pair_sites(neox, layer)}
    got = {}
    neox.run_with_hooks(toks, fwd_hooks=[(s.hook, lambda a, hook, k=k: got.__setitem__(k, a.clone()))
                                         for k, s in hooks.items()])
    assert set(norms) == set(hooks)
    for k, a in got.items():
        direct = torch.linalg.vector_norm(a[:, 1:], dim=-1).flatten()
        torch.testing.assert_close(norms[k], direct)
        st = A.norm_stats(norms[k])
        x = direct.double().numpy()
        assert st["n"] == x.size
        assert st["mean"] == pytest.approx(x.mean(), rel=1e-6)
        assert st["median"] == pytest.approx(np.median(x), rel=1e-6)
        assert st["std"] == pytest.approx(x.std(ddof=1), rel=1e-6)
        for p in A.PERCENTILES:
            assert st[f"p{p}"] == pytest.approx(np.percentile(x, p), rel=1e-6)
        assert st["min"] == pytest.approx(x.min()) and st["max"] == pytest.approx(x.max())
    d = _relu_dict(hooks[("mlp", 2)].width, 64)
    acts = got[("mlp", 2)][:, 1:].reshape(-1, d.cfg.d_in)
    e = A.error_norms(d, acts)
    with torch.no_grad():
        recon = F.relu((acts - d.b_dec) @ d.W_enc + d.b_enc) @ d.W_dec + d.b_dec
    torch.testing.assert_close(e["error"], (acts - recon).norm(dim=-1))
    torch.testing.assert_close(e["relative"], (acts - recon).norm(dim=-1) / acts.norm(dim=-1))
