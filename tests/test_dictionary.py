"""Tests for featcircuit.dictionary: the maths of each architecture, the file format, and errors."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch

from featcircuit import dictionary as dmod
from featcircuit.dictionary import DictConfig, Dictionary, Pair, load_pair, save_pair
from featcircuit.errors import UserError

D_IN, D_SAE, K = 16, 64, 4
ARCHS = ["topk", "relu", "batchtopk"]


def make(arch: str = "topk", seed: int = 0, **meta) -> Dictionary:
    """A small dictionary with non-trivial biases and threshold, so every term is exercised."""
    cfg = DictConfig(d_in=D_IN, d_sae=D_SAE, architecture=arch, k=K, **meta)
    d = Dictionary(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        d.b_enc.copy_(0.1 * torch.randn(D_SAE, generator=g))
        d.b_dec.copy_(0.5 * torch.randn(D_IN, generator=g))
        d.threshold.fill_(0.3)
    return d


def xs(n: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed)) + 1.0


def user_error(fn, *needles: str) -> str:
    """Run fn, require a one-line UserError mentioning every needle; return the message."""
    with pytest.raises(UserError) as ei:
        fn()
    msg = str(ei.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


# ---- config ----------------------------------------------------------------------------------

def test_config_round_trip_and_saelens_keys():
    cfg = DictConfig(d_in=8, d_sae=32, architecture="batchtopk", k=3, hook_name="blocks.2.hook",
                     model_name="m", layer=2, site="mlp", training_tokens=10,
                     metrics={"fvu": 0.1}, l1_coefficient=0.5)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert DictConfig.from_dict(d) == cfg
    for key in ("d_in", "d_sae", "architecture", "k", "hook_name", "model_name", "layer", "site",
                "dtype"):
        assert key in d
    assert DictConfig.from_dict({**d, "some_future_key": 1}) == cfg


def test_config_rejects_bad_values():
    user_error(lambda: DictConfig.from_dict({"d_in": 4, "d_sae": 8, "architecture": "jumprelu"}),
               "'jumprelu'", "topk")
    user_error(lambda: DictConfig.from_dict({"d_in": 4}), "'d_sae'")
    user_error(lambda: DictConfig.from_dict({"d_in": "4", "d_sae": 8}), "'4'", "d_in")
    user_error(lambda: DictConfig.from_dict({"d_in": 4, "d_sae": 8, "k": 9}), "k=9", "d_sae=8")
    user_error(lambda: DictConfig.from_dict([1, 2]), "list")


# ---- encoding --------------------------------------------------------------------------------

def test_topk_keeps_exactly_the_k_largest():
    d = make("topk")
    x = xs(20)
    pre = torch.relu(d.pre_acts(x))
    assert (pre > 0).sum(-1).min() > K  # precondition: every row has more than k candidates
    codes = d.encode(x)
    nz = codes != 0
    assert (nz.sum(-1) == K).all()
    assert torch.equal(codes[nz], pre[nz])
    # every kept value is >= every dropped value in its row
    kept_min = torch.where(nz, pre, torch.inf).min(-1).values
    dropped_max = torch.where(nz, -torch.inf, pre).max(-1).values
    assert (kept_min >= dropped_max).all()
    acts, idx = d.encode_sparse(x)
    assert acts.shape == idx.shape == (20, K)
    assert torch.equal(torch.zeros_like(codes).scatter(-1, idx, acts), codes)


def test_topk_never_emits_negative_codes():
    d = make("topk")
    with torch.no_grad():
        d.b_enc.fill_(-100.0)
        d.b_enc[:2] = 100.0  # only two features can fire, fewer than k
    x = xs()
    codes = d.encode(x)
    assert codes.min() >= 0 and ((codes != 0).sum(-1) == 2).all()
    assert d.encode_sparse(x).top_acts.min() >= 0
    assert ((d(x).codes != 0).sum(-1) == 2).all()


def test_relu_encode_and_encode_sparse_refuses():
    d = make("relu")
    x = xs()
    assert torch.equal(d.encode(x), torch.relu(d.pre_acts(x)))
    user_error(lambda: d.encode_sparse(x), "'relu'", "encode()")


def test_pre_acts_subtracts_b_dec():
    d = make("relu")
    x = xs()
    torch.testing.assert_close(d.pre_acts(x), (x - d.b_dec) @ d.W_enc + d.b_enc)
    assert not torch.allclose(d.pre_acts(x), x @ d.W_enc + d.b_enc)


def test_batchtopk_train_keeps_k_times_n_largest_over_batch():
    d = make("batchtopk").train()
    x = xs(10)
    pre = torch.relu(d.pre_acts(x))
    codes = d.encode(x)
    nz = codes != 0
    assert nz.sum() == K * 10
    assert (nz.sum(-1) != K).any()  # really batch-level, not per-row top-k
    assert torch.equal(codes[nz], pre[nz])
    assert pre[nz].min() >= pre[~nz].max()
    # leading dims are flattened into the batch
    assert (d.encode(x.view(2, 5, D_IN)) != 0).sum() == K * 10


def test_batchtopk_eval_uses_threshold():
    d = make("batchtopk").eval()
    x = xs()
    pre = (x - d.b_dec) @ d.W_enc + d.b_enc
    manual = torch.where(pre > 0.3, pre, torch.zeros_like(pre))
    codes = d.encode(x)
    torch.testing.assert_close(codes, manual)
    assert (codes != 0).sum() < (pre > 0).sum()  # the threshold really removed something


# ---- decoding and forward --------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(7,), (3, 5)])
def test_sparse_decode_matches_dense_values_and_grads(shape):
    d = make("topk")
    x = torch.randn(*shape, D_IN, generator=torch.Generator().manual_seed(3))
    acts, idx = d.encode_sparse(x)
    sparse = d.decode_sparse(acts, idx)
    dense = d.decode(d.encode(x))
    assert sparse.shape == (*shape, D_IN)
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)
    g_sparse = torch.autograd.grad(sparse.square().sum(), [d.W_dec, d.W_enc, d.b_dec])
    g_dense = torch.autograd.grad(dense.square().sum(), [d.W_dec, d.W_enc, d.b_dec])
    for a, b in zip(g_sparse, g_dense):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_outputs(arch):
    d = make(arch).eval()
    x = xs(15)
    out = d(x)
    codes = d.encode(x)
    torch.testing.assert_close(out.codes, codes)
    torch.testing.assert_close(out.recon, d.decode(codes), atol=1e-5, rtol=1e-5)
    assert out.l0.item() == pytest.approx((codes != 0).sum().item() / 15)
    fvu = ((x - out.recon) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    torch.testing.assert_close(out.fvu, fvu)


# ---- training helpers ------------------------------------------------------------------------

def test_decoder_unit_norm_and_gradient_projection():
    d = make("topk")
    with torch.no_grad():
        d.W_dec.mul_(torch.rand(D_SAE, 1) * 3 + 0.1)
    d.set_decoder_norm_to_unit_norm()
    torch.testing.assert_close(d.W_dec.norm(dim=-1), torch.ones(D_SAE))

    d.remove_gradient_parallel_to_decoder_directions()  # no grad yet: a no-op, not an error
    d(xs()).fvu.backward()
    before = d.W_dec.grad.clone()
    assert (before * d.W_dec).sum(-1).abs().max() > 1e-4  # there was a parallel part
    d.remove_gradient_parallel_to_decoder_directions()
    after = d.W_dec.grad
    torch.testing.assert_close((after * d.W_dec).sum(-1), torch.zeros(D_SAE), atol=1e-6, rtol=0)
    # only the parallel component was removed
    parallel = (before * d.W_dec).sum(-1, keepdim=True) * d.W_dec
    torch.testing.assert_close(after, before - parallel, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_fold_input_scale_matches_training_on_scaled_inputs(arch):
    s = 3.7
    trained = make(arch).eval()
    folded = copy.deepcopy(trained)
    folded.fold_input_scale(s)
    x = xs(20)
    c_trained = trained.encode(x * s)
    c_raw = folded.encode(x)
    assert (c_trained != 0).sum() > 0
    torch.testing.assert_close(c_raw, c_trained / s, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(folded.decode(c_raw), trained.decode(c_trained) / s,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(folded(x).recon, trained(x * s).recon / s, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(folded.W_dec, trained.W_dec)  # decoder stays unit-norm
    user_error(lambda: folded.fold_input_scale(0.0), "0.0")
    user_error(lambda: folded.fold_input_scale(float("nan")), "nan")


# ---- save / load -----------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip(tmp_path, arch):
    d = make(arch, model_name="stdlib-neox", layer=2, site="mlp", metrics={"fvu": 0.2})
    d.save(tmp_path / "dict")
    assert sorted(os.listdir(tmp_path)) == ["dict"]  # no temp folders left behind
    tensors = safetensors.torch.load_file(str(tmp_path / "dict" / "sae_weights.safetensors"))
    want = {"W_enc": (D_IN, D_SAE), "W_dec": (D_SAE, D_IN), "b_enc": (D_SAE,), "b_dec": (D_IN,)}
    if arch == "batchtopk":
        want["threshold"] = ()
    assert {k: tuple(v.shape) for k, v in tensors.items()} == want
    cfg = json.loads((tmp_path / "dict" / "cfg.json").read_text())
    assert (cfg["d_in"], cfg["d_sae"], cfg["architecture"], cfg["layer"]) == (D_IN, D_SAE, arch, 2)

    back = Dictionary.load(tmp_path / "dict", expect={"model_name": "stdlib-neox", "layer": 2,
                                                      "site": "mlp", "d_in": D_IN})
    assert back.cfg == d.cfg
    x = xs()
    for mode in ("eval", "train"):
        getattr(d, mode)(), getattr(back, mode)()
        assert torch.equal(back.encode(x), d.encode(x))
        assert torch.equal(back.decode(d.encode(x)), d.decode(d.encode(x)))


def test_save_overwrites_previous_dictionary(tmp_path):
    make("topk", seed=0).save(tmp_path / "d")
    new = make("relu", seed=5)
    new.save(tmp_path / "d")
    assert Dictionary.load(tmp_path / "d").cfg.architecture == "relu"
    assert torch.equal(Dictionary.load(tmp_path / "d").W_enc, new.W_enc)
    assert sorted(os.listdir(tmp_path)) == ["d"]


def test_save_refuses_to_replace_unrelated_folder(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("keep me")
    user_error(lambda: make().save(tmp_path / "run"), "notes.txt", str(tmp_path / "run"))
    assert (tmp_path / "run" / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    user_error(lambda: make().save(tmp_path / "file"), "is a file")


def _fail(*a, **k):
    raise RuntimeError("disk full")


def test_failed_save_leaves_nothing_and_keeps_previous(tmp_path, monkeypatch):
    old = make("topk", seed=0)
    old.save(tmp_path / "d")
    monkeypatch.setattr(safetensors.torch, "save_file", _fail)
    with pytest.raises(RuntimeError):
        make("relu", seed=1).save(tmp_path / "d")
    with pytest.raises(RuntimeError):
        make("relu", seed=1).save(tmp_path / "fresh")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["d"]
    back = Dictionary.load(tmp_path / "d")
    assert back.cfg.architecture == "topk" and torch.equal(back.W_enc, old.W_enc)


def test_failed_swap_restores_previous(tmp_path, monkeypatch):
    old = make("topk", seed=0)
    old.save(tmp_path / "d")
    real_rename = os.rename

    def rename(src, dst):
        if str(src).endswith(".tmp"):  # moving the new folder into place
            raise OSError("simulated crash")
        return real_rename(src, dst)

    monkeypatch.setattr(dmod.os, "rename", rename)
    with pytest.raises(OSError):
        make("relu", seed=1).save(tmp_path / "d")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["d"]
    assert torch.equal(Dictionary.load(tmp_path / "d").W_enc, old.W_enc)


# ---- load errors -----------------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path) -> Path:
    make("topk", model_name="stdlib-neox", layer=3, site="mlp").save(tmp_path / "d")
    return tmp_path / "d"


def test_load_missing_folder(tmp_path):
    p = tmp_path / "nope"
    user_error(lambda: Dictionary.load(p), f"no dictionary at {p}", "cfg.json",
               "sae_weights.safetensors")


@pytest.mark.parametrize("name", ["cfg.json", "sae_weights.safetensors"])
def test_load_missing_file(saved, name):
    (saved / name).unlink()
    user_error(lambda: Dictionary.load(saved), str(saved), f"no {name}")


def test_load_corrupt_cfg(saved):
    (saved / "cfg.json").write_bytes(b"{not json \xff\xfe")
    user_error(lambda: Dictionary.load(saved), "corrupt", str(saved / "cfg.json"))
    (saved / "cfg.json").write_text('"just a string"')
    user_error(lambda: Dictionary.load(saved), str(saved / "cfg.json"), "str")
    (saved / "cfg.json").write_text(json.dumps({"d_in": D_IN, "d_sae": D_SAE,
                                                "architecture": "gated"}))
    user_error(lambda: Dictionary.load(saved), "'gated'", str(saved / "cfg.json"))


def test_load_corrupt_weights(saved):
    w = saved / "sae_weights.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    user_error(lambda: Dictionary.load(saved), "corrupt", str(w))
    w.write_bytes(b"garbage")
    user_error(lambda: Dictionary.load(saved), "corrupt", str(w))


def test_load_shape_mismatch(saved):
    cfg = json.loads((saved / "cfg.json").read_text())
    cfg["d_in"] = 24
    (saved / "cfg.json").write_text(json.dumps(cfg))
    user_error(lambda: Dictionary.load(saved), "W_enc", "[16, 64]", "[24, 64]", "d_in=24")


def test_load_missing_tensor(saved):
    w = saved / "sae_weights.safetensors"
    t = safetensors.torch.load_file(str(w))
    del t["b_dec"]
    safetensors.torch.save_file(t, str(w))
    user_error(lambda: Dictionary.load(saved), "b_dec", str(w))


@pytest.mark.parametrize("key,want,found", [("layer", 2, "3"), ("model_name", "gpt2", "'stdlib-neox'"),
                                            ("site", "resid", "'mlp'"), ("d_in", 512, "16")])
def test_load_expect_mismatch(saved, key, want, found):
    msg = user_error(lambda: Dictionary.load(saved, expect={key: want}), str(saved))
    assert f"is for {key} {found}, expected {key} {want!r}" in msg


def test_load_expect_unknown_key_and_none_is_dont_care(saved):
    user_error(lambda: Dictionary.load(saved, expect={"layr": 3}), "'layr'")
    Dictionary.load(saved, expect={"layer": None, "model_name": "stdlib-neox"})


# ---- pairs -----------------------------------------------------------------------------------

def _pair(layer: int = 2) -> tuple[Dictionary, Dictionary]:
    r = make("topk", seed=0, model_name="m", layer=layer, site="resid")
    cfg = DictConfig(d_in=8, d_sae=32, architecture="relu", model_name="m", layer=layer,
                     site="mlp")
    return r, Dictionary(cfg, seed=1)


def test_pair_round_trip(tmp_path):
    r, m = _pair()
    save_pair(r, m, tmp_path / "p")
    p = load_pair(tmp_path / "p", expect_model="m", expect_layer=2, d_resid=D_IN, d_mlp=8)
    assert isinstance(p, Pair)
    assert torch.equal(p.resid.W_enc, r.W_enc) and torch.equal(p.mlp.W_enc, m.W_enc)
    assert sorted(os.listdir(tmp_path / "p")) == ["mlp", "resid"]
    save_pair(r, m, tmp_path / "p")  # overwriting a pair folder is allowed


def test_pair_errors(tmp_path):
    r, m = _pair()
    user_error(lambda: save_pair(m, r, tmp_path / "x"), "'mlp'", "resid")  # swapped slots
    save_pair(r, m, tmp_path / "p")
    user_error(lambda: load_pair(tmp_path / "p", expect_layer=5), "layer 2", "expected layer 5")
    user_error(lambda: load_pair(tmp_path / "p", d_mlp=512), "d_in 8", "expected d_in 512")
    user_error(lambda: load_pair(tmp_path / "p", expect_model="z"), "'m'", "'z'")
    user_error(lambda: load_pair(tmp_path / "nope"), "no dictionary pair", str(tmp_path / "nope"))
    os.rename(tmp_path / "p" / "mlp", tmp_path / "mlp_aside")
    user_error(lambda: load_pair(tmp_path / "p"), "no mlp/", str(tmp_path / "p"))
    os.rename(tmp_path / "mlp_aside", tmp_path / "p" / "mlp")
    os.rename(tmp_path / "p" / "resid", tmp_path / "p" / "tmp")
    os.rename(tmp_path / "p" / "mlp", tmp_path / "p" / "resid")
    os.rename(tmp_path / "p" / "tmp", tmp_path / "p" / "mlp")
    user_error(lambda: load_pair(tmp_path / "p"), "site 'mlp'", "expected site 'resid'")
