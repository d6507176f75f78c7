"""Paired training: resumable to the same weights, learns, and bad inputs; evaluation metrics."""

import pytest
import torch

import featcircuit.training as T
from featcircuit import UserError
from featcircuit.dictionary import DictConfig, Dictionary, Pair, load_pair
from featcircuit.evaluation import evaluate_pair
from featcircuit.io import load_state
from featcircuit.replacement import Replacement
from featcircuit.sites import pair_sites

CFG = dict(width=2.0, k=4, tokens=1200, epochs=2, batch_size=100, warmup_steps=3, ckpt_every=5,
           dead_tokens=300, n_ctx=16)


def _data(model, n=100, ctx=16):
    return torch.randint(0, model.cfg.d_vocab, (n, ctx), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ["topk", "relu", "batchtopk"])
def test_training_learns_and_saves(neox, tmp_path, arch):
    data = _data(neox)
    pair = T.train_pair(neox, 1, data, T.TrainConfig(architecture=arch, **CFG), out=tmp_path / "p",
                        progress=False)
    loaded = load_pair(tmp_path / "p", expect_model=neox.featcircuit_name, expect_layer=1)
    ev = evaluate_pair(Replacement(neox, {1: loaded}), data[:8], progress=False)
    for site in ("resid", "mlp"):
        assert ev["sites"][site]["variance_explained"] > 0.3, (arch, site, ev["sites"][site])
        torch.testing.assert_close(getattr(loaded, site).W_enc, getattr(pair, site).W_enc)
    if arch != "relu":
        assert ev["sites"]["resid"]["l0"] <= 4 * 1.5


def test_resumed_run_equals_uninterrupted(neox, tmp_path, monkeypatch):
    data = _data(neox)
    cfg = T.TrainConfig(**CFG)
    ref = T.train_pair(neox, 1, data, cfg, progress=False)

    calls = {"n": 0}
    real = T._loss

    def dying_loss(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2 * 13:  # killed in step 13, after the checkpoint of step 10
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(T, "_loss", dying_loss)
    with pytest.raises(KeyboardInterrupt):
        T.train_pair(neox, 1, data, cfg, ckpt_dir=tmp_path, progress=False)
    monkeypatch.setattr(T, "_loss", real)
    assert load_state(tmp_path / T.CKPT_FILE)["step"] == 10
    resumed = T.train_pair(neox, 1, data, cfg, ckpt_dir=tmp_path, progress=False)
    # a rerun from the finished checkpoint trains nothing and gives the same pair again
    again = T.train_pair(neox, 1, data, cfg, ckpt_dir=tmp_path, progress=False)
    for site in ("resid", "mlp"):
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            torch.testing.assert_close(getattr(getattr(resumed, site), name),
                                       getattr(getattr(ref, site), name), rtol=1e-5, atol=1e-6)
            assert torch.equal(getattr(getattr(again, site), name), getattr(getattr(resumed, site), name))
        assert getattr(again, site).cfg.metrics == getattr(resumed, site).cfg.metrics


def _identity(d_in: int, site: str, layer: int) -> Dictionary:
    d = Dictionary(DictConfig(d_in=d_in, d_sae=2 * d_in, architecture="relu", site=site, layer=layer))
    eye = torch.eye(d_in)
    with torch.no_grad():
        d.W_enc.copy_(torch.cat([eye, -eye], 1))
        d.W_dec.copy_(torch.cat([eye, -eye], 0))
    return d.eval()


def test_identity_pair_scores_perfectly(neox):
    r, m = pair_sites(neox, 1)
    pair = Pair(_identity(r.width, "resid", 1), _identity(m.width, "mlp", 1))
    ev = evaluate_pair(Replacement(neox, {1: pair}), _data(neox, n=6), progress=False)
    for site in ("resid", "mlp"):
        assert ev["sites"][site]["variance_explained"] == pytest.approx(1.0, abs=1e-5)
        assert ev["sites"][site]["cos_sim"] == pytest.approx(1.0, abs=1e-5)
    for w in ("resid", "mlp", "both"):
        row = ev["downstream"][w]
        assert row["kl_spliced"] == pytest.approx(0.0, abs=1e-5)
        assert row["recovered_vs_zero"] == pytest.approx(1.0, abs=1e-4)
        assert row["recovered_vs_mean"] == pytest.approx(1.0, abs=1e-4)


def test_zero_dictionary_recovers_zero(neox):
    """A dictionary that outputs zeros is exactly the zero-ablation: recovered 0 against zero."""
    r, m = pair_sites(neox, 1)
    z = Dictionary(DictConfig(d_in=m.width, d_sae=8, architecture="relu"))
    with torch.no_grad():
        z.W_enc.zero_()
        z.W_dec.zero_()
    pair = Pair(_identity(r.width, "resid", 1), z.eval())
    ev = evaluate_pair(Replacement(neox, {1: pair}), _data(neox, n=6), progress=False)
    assert ev["downstream"]["mlp"]["recovered_vs_zero"] == pytest.approx(0.0, abs=1e-5)
    assert ev["sites"]["mlp"]["dead_frac"] == 1.0


def test_bad_training_inputs(neox):
    with pytest.raises(UserError, match="unknown architecture 'gated'"):
        T.train_pair(neox, 1, _data(neox), T.TrainConfig(architecture="gated"), progress=False)
    with pytest.raises(UserError, match="training needs 10,000,000 tokens"):
        T.train_pair(neox, 1, _data(neox), T.TrainConfig(tokens=10_000_000), progress=False)
    with pytest.raises(UserError, match="layer 5 is out of range"):
        T.train_pair(neox, 5, _data(neox), T.TrainConfig(**CFG), progress=False)


def test_fewer_tokens_than_a_batch_is_refused_before_the_cache_is_read(neox, tmp_path, monkeypatch):
    """From an activation cache, a token budget below one batch used to cut zero rows and fail
    deep in the statistics (IndexError); it is a one-line UserError before anything is read."""
    import featcircuit.shards as S

    monkeypatch.setattr(S.CacheRows, "__init__", lambda *a, **k: pytest.fail("the cache was read"))
    with pytest.raises(UserError, match="--tokens 0 is less than one batch of 512"):
        T.train_pair(neox, 1, None, T.TrainConfig(tokens=0, batch_size=512), acts_dir=tmp_path,
                     progress=False)


# ---- every layer from one harvest (train --layers, default_pairs) ------------------------------

def _text_folder(path):
    path.mkdir()
    for i in range(30):
        (path / f"f{i}.txt").write_text(f"def f{i}(x, y):\n    return x * {i} + y\n" * 8)
    return str(path)


def test_train_layers_one_harvest_into_the_default_cache(neox, neox_dir, tmp_path, monkeypatch, capsys):
    import featcircuit.activations as A
    import featcircuit.pairs as P
    from featcircuit.cli import main
    from featcircuit.data import load_tokens

    monkeypatch.setenv("FEATCIRCUIT_CACHE", str(tmp_path / "cache"))
    data = _text_folder(tmp_path / "text")
    batches = []
    real_forward = A._forward
    monkeypatch.setattr(A, "_forward", lambda m, b, hooks, stop: batches.append((len(b), tuple(hooks)))
                        or real_forward(m, b, hooks, stop))
    argv = ["train", "--model", str(neox_dir), "--layers", "0,2", "--data", data, "--width", "2x",
            "--k", "4", "--tokens", "1200", "--epochs", "1", "--batch-size", "100"]
    assert main(argv) == 0
    cfg = T.TrainConfig(width=2.0, k=4, tokens=1200, epochs=1, batch_size=100)
    n_seq = -(-1200 // 127)
    # one pass over the tokens: every batch captured both layers' resid and mlp hooks at once
    assert sum(n for n, _ in batches) == n_seq
    assert all(len(h) == 4 for _, h in batches)
    out = capsys.readouterr().out
    model = neox
    for layer in (0, 2):
        folder = P.pair_dir(model, layer, cfg, data)
        assert str(folder / "pair") in out and (folder / "pair" / "mlp" / "cfg.json").exists()
        assert not (folder / T.CKPT_FILE).exists()
    # the harvest is spent and deleted (its lock file stays, as pair folders' do)
    assert [p.name for p in (tmp_path / "cache" / "acts").iterdir() if not p.name.startswith(".")] == []

    # the API and default_pair now load them, training nothing
    monkeypatch.setattr(P, "train_pair", lambda *a, **k: pytest.fail("trained again"))
    got = P.default_pairs(model, [2, 0], cfg, data=data, progress=False)
    assert list(got) == [0, 2]
    one, where = P.default_pair(model, 2, cfg, data=data, progress=False)
    assert where == got[2][1]
    torch.testing.assert_close(one.mlp.W_enc, got[2][0].mlp.W_enc, rtol=0, atol=0)
    # each layer's pair is the one train_pair trains for that layer alone on the same rows
    tokens = load_tokens(data, model, n_ctx=cfg.n_ctx, n_tokens=n_seq * cfg.n_ctx, split="train")
    monkeypatch.setattr(A, "_forward", real_forward)
    alone = T.train_pair(model, 0, tokens, cfg, acts_dir=tmp_path / "alone", progress=False)
    for site in ("resid", "mlp"):
        torch.testing.assert_close(getattr(alone, site).W_dec, getattr(got[0][0], site).W_dec,
                                   rtol=1e-6, atol=1e-7)
    assert got[0][0].mlp.cfg.layer == 0 and got[2][0].mlp.cfg.layer == 2


@pytest.mark.parametrize("extra,fragment", [
    (["--layers", "9"], "--layers '9' is invalid: the model has layers 0..2"),
    (["--layers", "2-1"], "--layers '2-1' is invalid"),
    (["--layers", "one"], "expected all, a range such as 0-3"),
    (["--layers", "0", "--layer", "1"], "--layer and --layers both given"),
    (["--layers", "all", "--out", "x"], "--out is for one --layer"),
])
def test_bad_layers(neox_dir, tmp_path, monkeypatch, capsys, extra, fragment):
    from featcircuit.cli import main

    monkeypatch.setenv("FEATCIRCUIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    code = main(["train", "--model", str(neox_dir), "--data", _text_folder(tmp_path / "t"),
                 "--tokens", "400", "--batch-size", "100", "--width", "2x", "--k", "4", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and fragment in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]  # nothing written


@pytest.mark.parametrize("n_dead", [0, 3, 200])
def test_sync_free_auxk_has_the_same_gradients(monkeypatch, n_dead):
    """The CUDA step's AuxK (fixed k_aux, live latents masked, no host sync) equals the CPU one."""
    d = Dictionary(DictConfig(d_in=16, d_sae=256, architecture="topk", k=4), seed=0)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    dead = torch.zeros(256, dtype=torch.bool)
    dead[torch.randperm(256, generator=torch.Generator().manual_seed(1))[:n_dead]] = True
    cfg = T.TrainConfig(k=4)
    grads = []
    for mode in (False, True):
        monkeypatch.setattr(T, "SYNC_FREE", mode)
        d.zero_grad(set_to_none=True)
        loss, fvu, l0, fired = T._loss(d, x, cfg, dead, 1.0)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in d.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7)
    if n_dead:  # and the auxiliary term is really there: without it the gradients differ
        monkeypatch.setattr(T, "SYNC_FREE", None)
        d.zero_grad(set_to_none=True)
        T._loss(d, x, T.TrainConfig(k=4, auxk_alpha=0.0), dead, 1.0)[0].backward()
        assert (d.W_enc.grad - grads[0]["W_enc"]).abs().max() > 1e-6


def test_train_layer_rerun_is_done_also_for_older_pair_folders(neox_dir, tmp_path, capsys):
    """A finished --out is recognised, also when its train_config.json predates shuffle_rows."""
    import json

    from featcircuit.cli import main

    argv = ["train", "--model", str(neox_dir), "--layer", "1", "--data", _text_folder(tmp_path / "t"),
            "--width", "2x", "--k", "4", "--tokens", "400", "--epochs", "1", "--batch-size", "100",
            "--out", str(tmp_path / "p")]
    assert main(argv) == 0
    cfg_file = tmp_path / "p" / "train_config.json"
    old = json.loads(cfg_file.read_text())
    del old["shuffle_rows"]  # as written before the option existed
    cfg_file.write_text(json.dumps(old))
    capsys.readouterr()
    assert main(argv) == 0
    assert "already trained" in capsys.readouterr().out


@pytest.mark.parametrize("sync_free", [False, True])
@pytest.mark.parametrize("n_dead", [0, 3, 12, 256])  # 3 < k_aux = 8: sync-free picks live latents too
def test_sparse_encoder_gradient_equals_autograd(monkeypatch, sync_free, n_dead):
    """The wide-dictionary step (encoder gradient from the picks alone) has autograd's gradients."""
    import featcircuit.sparse_encoder as S

    d = Dictionary(DictConfig(d_in=16, d_sae=256, architecture="topk", k=4), seed=0)
    with torch.no_grad():  # a nonzero b_dec: the weight gradient reads x − b_dec
        d.b_dec.copy_(torch.randn(16, generator=torch.Generator().manual_seed(2)))
        d.b_enc.copy_(0.1 * torch.randn(256, generator=torch.Generator().manual_seed(3)))
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    dead = torch.zeros(256, dtype=torch.bool)
    dead[torch.randperm(256, generator=torch.Generator().manual_seed(1))[:n_dead]] = True
    monkeypatch.setattr(T, "SYNC_FREE", sync_free)
    grads = []
    for sparse in (False, True):  # False: plain autograd through d.pre_acts
        monkeypatch.setattr(S, "SPARSE_GRAD", sparse)
        d.zero_grad(set_to_none=True)
        loss = T._loss(d, x, T.TrainConfig(k=4), dead, 1.0)[0]
        loss.backward()
        grads.append((float(loss), {n: p.grad.clone() for n, p in d.named_parameters()}))
    assert grads[1][0] == grads[0][0]  # the same forward values
    for n in grads[0][1]:
        torch.testing.assert_close(grads[1][1][n], grads[0][1][n], rtol=1e-5, atol=1e-6)


def test_selected_pre_input_gradient_and_gating():
    from featcircuit.sparse_encoder import MIN_WIDTH, selected_pre, use_sparse_grad

    d = Dictionary(DictConfig(d_in=8, d_sae=64, architecture="topk", k=3), seed=0)
    x = torch.randn(10, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    idx = torch.randint(0, 64, (10, 5), generator=torch.Generator().manual_seed(1))
    w = torch.randn(10, 5, generator=torch.Generator().manual_seed(2))
    ref = torch.autograd.grad((d.pre_acts(x).gather(-1, idx) * w).sum(), [x, d.W_enc, d.b_enc, d.b_dec])
    with torch.no_grad():
        pre = d.pre_acts(x)
    got = torch.autograd.grad((selected_pre(d, x, idx, pre) * w).sum(), [x, d.W_enc, d.b_enc, d.b_dec])
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not use_sparse_grad(Dictionary(DictConfig(d_in=8, d_sae=MIN_WIDTH // 2, k=3), seed=0))
    assert use_sparse_grad(Dictionary(DictConfig(d_in=8, d_sae=MIN_WIDTH, k=3), seed=0))
    assert not use_sparse_grad(Dictionary(DictConfig(d_in=8, d_sae=MIN_WIDTH, k=3), seed=0), "cuda")
    assert not use_sparse_grad(Dictionary(DictConfig(d_in=8, d_sae=MIN_WIDTH, architecture="relu"), seed=0))


def test_default_pair_is_the_pair_train_layers_makes(neox_dir, tmp_path, monkeypatch):
    """discover's lazily trained pair and `train --layers`' pair are one path, bit for bit."""
    import featcircuit.pairs as P
    from featcircuit.models import load_model

    model = load_model(str(neox_dir), "cpu")
    data = _text_folder(tmp_path / "text")
    cfg = T.TrainConfig(width=2.0, k=4, tokens=1200, epochs=1, batch_size=100)
    monkeypatch.setenv("FEATCIRCUIT_CACHE", str(tmp_path / "a"))
    one, _ = P.default_pair(model, 1, cfg, data=data, progress=False)
    monkeypatch.setenv("FEATCIRCUIT_CACHE", str(tmp_path / "b"))
    both = P.default_pairs(model, [0, 1], cfg, data=data, progress=False)
    for site in ("resid", "mlp"):
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            torch.testing.assert_close(getattr(getattr(one, site), name),
                                       getattr(getattr(both[1][0], site), name), rtol=0, atol=0)
