"""Jacobian-sparse pairs: the closed-form code Jacobian against autograd through the model's own
MLP, λ = 0 as plain training bit for bit, the penalty's effect, statistics, cache keys, CLI."""

import hashlib
import json
from dataclasses import asdict

import pytest
import torch

import featcircuit.jacobian as JM
import featcircuit.training as T
from featcircuit import UserError
from featcircuit.dictionary import DictConfig, Dictionary, Pair
from featcircuit.evaluation import evaluate_pair
from featcircuit.jacobian import JacobianStats, jacobian_stats, pair_jacobian, rms
from featcircuit.replacement import Replacement
from featcircuit.sites import mlp_parts, pair_sites

CFG = {"width": 2.0, "k": 4, "tokens": 1200, "epochs": 2, "batch_size": 100, "warmup_steps": 3,
       "ckpt_every": 5, "dead_tokens": 300, "n_ctx": 16}


def _data(model, n=100, ctx=16, seed=0):
    return torch.randint(0, model.cfg.d_vocab, (n, ctx), generator=torch.Generator().manual_seed(seed))


def _resid(model, layer, n=4, seed=3):
    from featcircuit.activations import harvest

    hook = pair_sites(model, layer)[0].hook
    acts = harvest(model, _data(model, n, seed=seed), [hook], progress=False)[hook]
    return acts[:, 1:].reshape(-1, model.cfg.d_model)


def _model_hidden(model, layer):
    """z(x) by the model's own modules: block.ln2, then block.mlp with its hook_post read out."""
    block = model.blocks[layer]

    def z_of(x):
        cap = {}
        h = block.mlp.hook_post.register_forward_hook(lambda mod, i, o: cap.__setitem__("z", o))
        try:
            block.mlp(block.ln2(x[None, None, :]))
        finally:
            h.remove()
        return cap["z"][0, 0]
    return z_of


def _dicts(model, layer, k=4, arch="topk"):
    r, m = pair_sites(model, layer)
    R = Dictionary(DictConfig(d_in=r.width, d_sae=3 * r.width, k=k, architecture=arch), seed=1)
    M = Dictionary(DictConfig(d_in=m.width, d_sae=96, k=k, architecture=arch), seed=2)
    with torch.no_grad():  # codes fire on real activations, not just the biases
        R.b_enc.fill_(0.05)
        M.b_enc.fill_(0.05)
    return R, M


def autograd_jacobian(model, layer, R, M, x_t, s_r=1.0, s_m=1.0):
    """Reference for one token: d(M codes at the active slots)/d(R active codes), masks held.

    The dictionaries see scaled inputs ``s_r·x`` and ``s_m·z``; the residual is rebuilt as
    ``x + (a − a₀)·R_dec/s_r`` (the error held) and run through the model's own LN and MLP.
    """
    z_of = _model_hidden(model, layer)
    a0 = R.encode(s_r * x_t[None])[0].detach()
    a_idx = torch.nonzero(a0).flatten()
    f0 = M.encode(s_m * z_of(x_t)[None])[0].detach()
    f_idx = torch.nonzero(f0).flatten()

    def g(av):
        x = x_t + (av - a0[a_idx]) @ R.W_dec[a_idx] / s_r
        return M.pre_acts(s_m * z_of(x)[None])[0][f_idx]

    J = torch.autograd.functional.jacobian(g, a0[a_idx].clone(), create_graph=True)
    return J, a_idx, f_idx


@pytest.mark.parametrize("ln", ["exact", "frozen"])
def test_code_jacobian_equals_autograd(tiny_model, ln):
    model, layer = tiny_model, 1
    parts = mlp_parts(model, layer)
    R, M = _dicts(model, layer)
    x = _resid(model, layer)[:6]
    with torch.no_grad():
        J, a_on, f_on = pair_jacobian(parts, R, M, x, ln=ln)
        _, a_idx, _ = JM.active_codes(R, x)
        _, f_idx, _ = JM.active_codes(M, parts.hidden(x))
    checked = 0
    for t in range(len(x)):
        if ln == "exact":
            ref, ra, rf = autograd_jacobian(model, layer, R, M, x[t])
        else:  # frozen scale: the reference holds the norm's 1/scale constant
            ref, ra, rf = _frozen_reference(model, layer, parts, R, M, x[t])
        # place the closed form's [k_out, k_in] slots by feature index
        mine = torch.zeros(M.cfg.d_sae, R.cfg.d_sae)
        for jj, j in enumerate(f_idx[t].tolist()):
            for ii, i in enumerate(a_idx[t].tolist()):
                if f_on[t, jj] and a_on[t, ii]:
                    mine[j, i] = J[t, jj, ii]
        dense = torch.zeros_like(mine)
        dense[rf[:, None], ra[None, :]] = ref.detach()
        assert len(ra) and len(rf)
        torch.testing.assert_close(mine, dense, rtol=1e-4, atol=1e-5 * float(dense.abs().max()))
        checked += len(ra) * len(rf)
    assert checked > 20


def _frozen_reference(model, layer, parts, R, M, x_t):
    a0 = R.encode(x_t[None])[0].detach()
    a_idx = torch.nonzero(a0).flatten()
    f0 = M.encode(parts.hidden(x_t[None]))[0].detach()
    f_idx = torch.nonzero(f0).flatten()
    xc0 = x_t - x_t.mean()
    inv = torch.rsqrt(xc0.pow(2).mean() + parts.ln_eps)

    def g(av):
        x = x_t + (av - a0[a_idx]) @ R.W_dec[a_idx]
        u = (x - x.mean()) * inv * parts.ln_weight + parts.ln_bias
        return M.pre_acts(parts.act(u @ parts.W_in + parts.b_in)[None])[0][f_idx]

    return torch.autograd.functional.jacobian(g, a0[a_idx].clone()), a_idx, f_idx


def test_training_penalty_and_its_gradient_match_autograd(neox):
    """The penalty in the scaled units, and its gradients w.r.t. R's decoder and M's encoder."""
    model, layer = neox, 1
    parts = mlp_parts(model, layer)
    R, M = _dicts(model, layer)
    x = _resid(model, layer)[:3]
    s_r, s_m = 0.7, 1.9  # the sites' input scales during training
    z = parts.hidden(x)
    held = {}
    for key, d, v in (("resid", R, s_r * x), ("mlp", M, s_m * z)):
        acts, idx = torch.relu(d.pre_acts(v)).topk(d.cfg.k, dim=-1, sorted=False)
        held[key] = {"acts": acts, "idx": idx}
    pen = JM.training_penalty(parts, x, R, M, held["resid"], held["mlp"], s_m / s_r)
    g_mine = torch.autograd.grad(pen, [R.W_dec, M.W_enc])
    ref = 0.0
    for t in range(len(x)):
        J, _, _ = autograd_jacobian(model, layer, R, M, x[t], s_r, s_m)
        ref = ref + J.abs().sum() / len(x)
    g_ref = torch.autograd.grad(ref, [R.W_dec, M.W_enc])
    torch.testing.assert_close(pen, ref, rtol=1e-4, atol=0)
    for a, b in zip(g_mine, g_ref):
        assert float(b.abs().sum()) > 0
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5 * float(b.abs().max()))


def test_stats_match_a_direct_count():
    g = torch.Generator().manual_seed(0)
    J = torch.randn(5, 6, 7, generator=g) * 0.02
    a_on = torch.rand(5, 7, generator=g) > 0.2
    f_on = torch.rand(5, 6, generator=g) > 0.2
    st = JacobianStats()
    st.add(J[:2], a_on[:2], f_on[:2])
    st.add(J[2:], a_on[2:], f_on[2:])
    res = st.result()
    counts = {th: 0.0 for th in (0.005, 0.01, 0.02, 0.04)}
    shares = []
    for t in range(5):
        vals = sorted((abs(float(J[t, j, i])) for j in range(6) for i in range(7)
                       if f_on[t, j] and a_on[t, i]), reverse=True)
        for th in counts:
            counts[th] += sum(v > th for v in vals) / 5
        n_top = -(-len(vals) // 10)
        shares.append(sum(vals[:n_top]) / sum(vals))
    for th, c in counts.items():
        assert res["above"][f"{th:g}"] == pytest.approx(c)
    assert res["top10_share"] == pytest.approx(sum(shares) / 5)
    assert res["n_tokens"] == 5


@pytest.fixture(scope="module")
def plain_pair(neox):
    return T.train_pair(neox, 1, _data(neox), T.TrainConfig(**CFG), progress=False)


def test_lambda_zero_is_plain_training_bit_for_bit(neox, plain_pair, monkeypatch):
    data = _data(neox)
    assert T.TrainConfig(**CFG, jacobian=0.0) == T.TrainConfig(**CFG)  # λ = 0 is the plain config
    # The joint path with the penalty multiplied by 0: only the penalty separates it from plain.
    real = JM.training_penalty
    calls = {"n": 0}

    def zeroed(*a, **k):
        calls["n"] += 1
        return real(*a, **k) * 0.0

    monkeypatch.setattr(JM, "training_penalty", zeroed)
    joint = T.train_pair(neox, 1, data, T.TrainConfig(**CFG, jacobian=1.0), progress=False)
    assert calls["n"] == 24  # one per step: the joint path ran
    for site in ("resid", "mlp"):
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            ref = getattr(getattr(plain_pair, site), name)
            assert torch.equal(getattr(getattr(joint, site), name), ref), (site, name)


def test_penalty_lowers_the_entry_count(neox, plain_pair):
    x = _resid(neox, 1, n=12, seed=7)
    parts = mlp_parts(neox, 1)
    z = parts.hidden(x)
    sparse_pair = T.train_pair(neox, 1, _data(neox), T.TrainConfig(**CFG, jacobian=1.0, jacobian_tokens=50),
                               progress=False)
    res = {}
    for name, pair in (("plain", plain_pair), ("sparse", sparse_pair)):
        res[name] = jacobian_stats(parts, pair.resid, pair.mlp, x, scale=rms(x) / rms(z))
        res[name]["fve"] = float(1 - (pair.mlp.decode(pair.mlp.encode(z)) - z).pow(2).sum()
                                 / (z - z.mean(0)).pow(2).sum())
    plain, sparse = res["plain"], res["sparse"]
    assert plain["above"]["0.04"] > 5
    assert sparse["above"]["0.04"] < 0.5 * plain["above"]["0.04"], (plain, sparse)
    assert sparse["l1_per_token"] < 0.5 * plain["l1_per_token"]
    assert sparse["fve"] > 0.1  # still a dictionary, not a collapse


def test_cache_key_unchanged_for_plain_pairs(neox, monkeypatch, tmp_path):
    from featcircuit.pairs import pair_dir

    monkeypatch.setenv("FEATCIRCUIT_CACHE", str(tmp_path))
    cfg = T.TrainConfig()
    # the fields added after pairs were first cached (jacobian…, shuffle_rows) are not in the key
    later = ("jacobian", "jacobian_tokens", "shuffle_rows")
    old = {k: v for k, v in asdict(cfg).items() if k not in later}
    key = json.dumps({"cfg": old, "data": "builtin:stdlib"}, sort_keys=True)
    h = hashlib.sha256(key.encode()).hexdigest()[:10]
    assert pair_dir(neox, 1, cfg, "builtin:stdlib").name.endswith(h)
    plain = T.TrainConfig(jacobian=0.0, jacobian_tokens=7)
    assert pair_dir(neox, 1, plain, "builtin:stdlib").name.endswith(h)
    assert not pair_dir(neox, 1, T.TrainConfig(jacobian=0.1), "builtin:stdlib").name.endswith(h)
    # a Jacobian pair cached when the subsample default was 128 rows keeps its key; today's 64 is in it
    assert "jacobian_tokens" not in T.config_key(T.TrainConfig(jacobian=0.1, jacobian_tokens=128))
    assert T.config_key(T.TrainConfig(jacobian=0.1))["jacobian_tokens"] == T.TrainConfig.jacobian_tokens
    # a larger shuffle window trains the same batches while the harvest fits the default one
    assert pair_dir(neox, 1, T.TrainConfig(shuffle_rows=2**22), "builtin:stdlib").name.endswith(h)
    assert not pair_dir(neox, 1, T.TrainConfig(shuffle_rows=2**16), "builtin:stdlib").name.endswith(h)


@pytest.mark.parametrize("bad", [{"jacobian": -1.0}, {"jacobian": float("nan")},
                                 {"jacobian": 0.1, "jacobian_tokens": 0}])
def test_bad_jacobian_options(neox, bad):
    with pytest.raises(UserError, match="jacobian"):
        T.train_pair(neox, 1, _data(neox), T.TrainConfig(**{**CFG, **bad}), progress=False)


def test_evaluate_reports_the_jacobian(neox):
    model, layer = neox, 1
    R, M = _dicts(model, layer)
    R.cfg.site, M.cfg.site = "resid", "mlp"
    toks = _data(model, n=6, seed=5)
    ev = evaluate_pair(Replacement(model, {layer: Pair(R, M)}), toks, progress=False)
    jac = ev["jacobian"]
    parts = mlp_parts(model, layer)
    x = _resid(model, layer, n=6, seed=5)
    direct = jacobian_stats(parts, R, M, x, scale=rms(x) / rms(parts.hidden(x)))
    for th in ("0.005", "0.01", "0.02", "0.04"):
        assert jac["above"][th] == pytest.approx(direct["above"][th])
    assert jac["top10_share"] == pytest.approx(direct["top10_share"], rel=1e-4)
    assert jac["pairs_per_token"] <= 16


def test_cli_train_jacobian_flag(neox_dir, tmp_path, monkeypatch):
    from featcircuit.cli import build_parser

    args = build_parser().parse_args(["train", "--model", str(neox_dir), "--jacobian", "0.5"])
    assert args.jacobian == 0.5
    assert build_parser().parse_args(["train"]).jacobian == 0.0
