"""The four dictionary analyses: exact perturbations, frequency removal, max-cos stability, norms."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import featcircuit.analyses as A
from featcircuit.dictionary import DictConfig, Dictionary, Pair
from featcircuit.evaluation import evaluate_pair
from featcircuit.replacement import Replacement
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
    ev = evaluate_pair(Replacement(neox, {1: Pair(_identity(r.width, site="resid"), d)}), toks, progress=False)
    assert dict_row["kl"] == pytest.approx(ev["downstream"]["mlp"]["kl_spliced"], rel=1e-4, abs=1e-7)
    assert dict_row["ce"] == pytest.approx(ev["downstream"]["mlp"]["ce_spliced"], rel=1e-5)


def _spread_acts(n=400, d=48, seed=3):
    """Rows with norms over four decades and a shared offset (cos-sims to a reconstruction vary)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * torch.logspace(-1, 1.5, n)[:, None] + 0.7


def test_matched_noise_has_each_tokens_error_norm_and_cos_sim():
    x = _spread_acts()
    d = _relu_dict(x.shape[1], 3 * x.shape[1])
    with torch.no_grad():
        recon = d.decode(d.encode(x)).double()
    xd = x.double()
    want_cos = (xd * recon).sum(-1) / (xd.norm(dim=-1) * recon.norm(dim=-1))
    assert want_cos.std() > 0.05 and recon.norm(dim=-1).std() > 0.1  # the targets really vary per token
    xp = A.matched_noise(d, torch.Generator().manual_seed(1))(x).double()
    cos = (xd * xp).sum(-1) / (xd.norm(dim=-1) * xp.norm(dim=-1))
    torch.testing.assert_close(cos, want_cos, atol=1e-5, rtol=0)
    torch.testing.assert_close(xp.norm(dim=-1), recon.norm(dim=-1), rtol=1e-5, atol=1e-6)
    # hence the noise x'−x has exactly the error's norm, token by token
    torch.testing.assert_close((xp - xd).norm(dim=-1), (recon - xd).norm(dim=-1), rtol=1e-4, atol=1e-5)
    # …but not its direction: the parts orthogonal to x are unrelated (random)
    xhat = xd / xd.norm(dim=-1, keepdim=True)
    perp = lambda v: v - (v * xhat).sum(-1, keepdim=True) * xhat  # noqa: E731
    assert F.cosine_similarity(perp(xp), perp(recon), dim=-1).abs().mean() < 0.3
    # mean matching (the old reference) misses every token's cos-sim by its spread
    xm = A.perturb(x, float(want_cos.mean()), float((recon.norm(dim=-1) / xd.norm(dim=-1)).mean()),
                   torch.Generator().manual_seed(1)).double()
    assert ((xd * xm).sum(-1) / (xd.norm(dim=-1) * xm.norm(dim=-1)) - want_cos).abs().max() > 0.1


def test_matched_noise_in_two_dimensions_is_the_reconstruction_or_its_mirror_image():
    # in 2-D the only unit vectors ⟂ x̂ are ±n̂, so a point with x̂'s norm and cos-sim is x̂ itself
    # or its reflection across the line of x — a reference that shares no code with perturb_to
    x = _spread_acts(300, 2)
    d = _relu_dict(2, 8)
    with torch.no_grad():
        recon = d.decode(d.encode(x)).double()
    xp = A.matched_noise(d, torch.Generator().manual_seed(4))(x).double()
    u = x.double() / x.double().norm(dim=-1, keepdim=True)
    mirror = 2 * (recon * u).sum(-1, keepdim=True) * u - recon
    err = torch.minimum((xp - recon).norm(dim=-1), (xp - mirror).norm(dim=-1))
    assert float(err.max()) < 1e-4 * float(recon.norm(dim=-1).max())
    picked_mirror = (xp - mirror).norm(dim=-1) < (xp - recon).norm(dim=-1)
    far = (recon - mirror).norm(dim=-1) > 1e-2  # where the two differ, the sign is a coin flip
    assert 0.2 < float(picked_mirror[far].double().mean()) < 0.8


def test_perturb_to_edge_cases_and_bad_targets():
    x = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0]])
    out = A.perturb_to(x, torch.tensor([1.0, 0.3]), torch.tensor([10.0, 2.0]),
                       torch.Generator().manual_seed(0))
    torch.testing.assert_close(out[0], torch.tensor([6.0, 8.0, 0.0]))  # c = 1: x's direction, the target norm
    assert float(out[1].norm()) == pytest.approx(2.0, rel=1e-6)  # a zero row keeps the target norm
    with pytest.raises(A.UserError, match="1.5"):
        A.perturb_to(x, torch.tensor([0.5, 1.5]), torch.tensor([1.0, 1.0]))
    with pytest.raises(A.UserError, match="negative"):
        A.perturb_to(x, torch.tensor([0.5, 0.5]), torch.tensor([1.0, -1.0]))


class _SignScaler(Dictionary):
    """A hand-built "dictionary" whose reconstruction is x scaled by 0.4 or 1.6 (by the sign of x₀)."""

    def encode(self, x):
        return x

    def decode(self, codes):
        return codes * torch.where(codes[..., :1] > 0, 1.6, 0.4)


def test_per_token_matched_row_equals_a_parallel_reconstruction_and_mean_matching_does_not(neox):
    # cos(x, x̂) = 1 at every token, so per-token-matched noise is x̂ itself (no random part) and its
    # KL must equal the dictionary's; mean matching puts every token at the mean scale instead
    toks = _data(neox)
    m = pair_sites(neox, 1)[1]
    d = _SignScaler(DictConfig(d_in=m.width, d_sae=m.width, architecture="relu", layer=1, site="mlp")).eval()
    acts = A.site_acts(neox, 1, "mlp", toks)
    assert 0.2 < float((acts[:, 0] > 0).double().mean()) < 0.8
    rows = {r["kind"]: r for r in A.perturbation_sweep(neox, 1, "mlp", toks, [0.9], dictionary=d)}
    assert rows["dictionary"]["cos_sim"] == pytest.approx(1.0, abs=1e-6)
    assert rows["dictionary"]["kl"] > 1e-4
    assert rows["random_per_token_matched"]["kl"] == pytest.approx(rows["dictionary"]["kl"], rel=1e-4)
    assert rows["random_mean_matched"]["kl"] < 0.5 * rows["dictionary"]["kl"]
    assert rows["random_mean_matched"]["norm_ratio"] == pytest.approx(
        float((0.4 + 1.2 * (acts[:, 0] > 0).double()).mean()), rel=1e-5)


def test_matched_rows_do_not_depend_on_the_sweep_but_on_the_seed(neox):
    toks = _data(neox)
    r = pair_sites(neox, 1)[1]
    d = _relu_dict(r.width, 3 * r.width)

    def matched(cos_sims, seed):
        rows = A.perturbation_sweep(neox, 1, "mlp", toks, cos_sims, dictionary=d, seed=seed)
        return {x["kind"]: x["kl"] for x in rows if x["kind"] != "random"}

    a, b, c = matched([0.9, 0.5], 3), matched([0.5], 3), matched([0.5], 4)
    for k in ("dictionary", "random_mean_matched", "random_per_token_matched"):
        assert a[k] == pytest.approx(b[k], rel=1e-9)
    assert c["dictionary"] == pytest.approx(b["dictionary"], rel=1e-9)
    assert c["random_per_token_matched"] != pytest.approx(b["random_per_token_matched"], rel=1e-6)


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


# ---- any site -------------------------------------------------------------------------------

def test_analyses_at_the_output_sites(neox):
    """attn_out / mlp_out (by name or as a Site) work in every analysis, against direct references."""
    from featcircuit.sites import mlp_parts, resolve_site

    toks = _data(neox)
    a_site = resolve_site(neox, 1, "attn_out")
    # perturbation: the identity dictionary is the clean run; c=1, ρ=1 too
    rows = A.perturbation_sweep(neox, 1, a_site, toks, [1.0, 0.5], dictionary=_identity(32, site="attn_out"))
    by = {r["kind"] if r["kind"] != "random" else r["cos_sim"]: r for r in rows}
    assert {r["hook"] for r in rows} == {"blocks.1.hook_attn_out"} and {r["site"] for r in rows} == {"attn_out"}
    assert by["dictionary"]["kl"] == pytest.approx(0.0, abs=1e-6) and by[1.0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert by[0.5]["kl"] > 1e-5
    # mlp_out activations are the MLP's output computed from its hidden activation
    out = A.site_acts(neox, 1, "mlp_out", toks)
    hid = A.site_acts(neox, 1, "mlp", toks)
    torch.testing.assert_close(out, mlp_parts(neox, 1).out(hid), rtol=1e-5, atol=1e-5)
    # lower L0 at mlp_out: the identity recovers everything, removing frequent features does not
    rows = A.lower_l0_comparison(neox, 1, "mlp_out", _identity(32, site="mlp_out"), {}, toks, target_l0s=(10.0,))
    by = {r["method"]: r for r in rows}
    assert by["base"]["recovered_vs_zero"] == pytest.approx(1.0, abs=1e-4) and by["base"]["site"] == "mlp_out"
    assert by["remove_frequent"]["l0"] <= 10.0 and abs(by["remove_frequent"]["recovered_vs_zero"] - 1) > 1e-3
    norms = A.site_norms(neox, toks, [1], sites=("attn_out", "mlp_out"))
    torch.testing.assert_close(norms[("mlp_out", 1)], out.norm(dim=-1))


def test_l1_sweep_at_a_single_site(neox):
    from featcircuit.training import TrainConfig

    toks = _data(neox, n=120, ctx=16)
    cfg = TrainConfig(architecture="relu", width=2.0, tokens=1500, epochs=2, batch_size=100, warmup_steps=3)
    got = A.train_l1_sweep(neox, 1, toks, [0.0, 3.0], cfg, site="attn_out")
    assert set(got) == {0.0, 3.0}
    acts = A.site_acts(neox, 1, "attn_out", toks[:20])
    l0 = {}
    for l1, d in got.items():
        assert isinstance(d, Dictionary) and d.cfg.site == "attn_out" and d.cfg.l1_coefficient == l1
        assert d.cfg.hook_name == "blocks.1.hook_attn_out" and d.cfg.d_in == 32
        l0[l1] = float(A.feature_frequencies(d, acts).sum())
    assert l0[3.0] < l0[0.0]  # the L1 penalty is what lowers L0
