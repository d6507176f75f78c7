"""Single-site training: learns, resumes to the same weights, writes a SAELens folder, rejects bad input."""

import pytest
import torch

import featcircuit.training as T
from featcircuit import UserError
from featcircuit.dictionary import Dictionary
from featcircuit.io import load_state
from featcircuit.site_training import is_site_folder, load_dictionaries, train_site
from featcircuit.sites import resolve_site

CFG = dict(width=2.0, k=4, tokens=1200, epochs=2, batch_size=100, warmup_steps=3, ckpt_every=5,
           dead_tokens=300, n_ctx=16)


def _data(model, n=100, ctx=16):
    return torch.randint(0, model.cfg.d_vocab, (n, ctx), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ["attn_out", "mlp_out"])
def test_single_site_learns_and_saves(tiny_model, tmp_path, name):
    site = resolve_site(tiny_model, 1, name)
    d = train_site(tiny_model, site, _data(tiny_model), T.TrainConfig(**CFG), out=tmp_path / "d", progress=False)
    assert is_site_folder(tmp_path / "d")
    (loaded,) = load_dictionaries(tmp_path / "d").values()
    assert (loaded.cfg.site, loaded.cfg.hook_name, loaded.cfg.layer, loaded.cfg.d_sae) == (name, site.hook, 1, 64)
    torch.testing.assert_close(loaded.W_enc, d.W_enc)
    from featcircuit.activations import harvest

    a = harvest(tiny_model, _data(tiny_model, n=8), [site.hook], progress=False)[site.hook][:, 1:].reshape(-1, 32)
    with torch.no_grad():  # the saved dictionary takes raw activations (the scale is folded in)
        fve = 1 - (a - loaded.decode(loaded.encode(a))).pow(2).sum() / (a - a.mean(0)).pow(2).sum()
    assert fve > 0.3


def test_single_site_resumes_to_the_same_weights(neox, tmp_path, monkeypatch):
    site = resolve_site(neox, 1, "attn_out")
    cfg = T.TrainConfig(**CFG)
    ref = train_site(neox, site, _data(neox), cfg, progress=False)
    import featcircuit.site_training as S

    calls = {"n": 0}
    real = S._loss

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 13:  # killed in step 13, after the checkpoint of step 10
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(S, "_loss", dying)
    with pytest.raises(KeyboardInterrupt):
        train_site(neox, site, _data(neox), cfg, ckpt_dir=tmp_path, progress=False)
    monkeypatch.setattr(S, "_loss", real)
    assert load_state(tmp_path / T.CKPT_FILE)["step"] == 10
    resumed = train_site(neox, site, _data(neox), cfg, ckpt_dir=tmp_path, progress=False)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(getattr(resumed, name), getattr(ref, name), rtol=1e-5, atol=1e-6)
    other = resolve_site(neox, 1, "mlp_out")
    with pytest.raises(UserError, match="belongs to another training config or site"):
        train_site(neox, other, _data(neox), cfg, ckpt_dir=tmp_path, progress=False)


def test_single_site_bad_inputs(neox, tmp_path):
    site = resolve_site(neox, 1, "attn_out")
    with pytest.raises(UserError, match="needs a resid/mlp pair"):
        train_site(neox, site, _data(neox), T.TrainConfig(**{**CFG, "jacobian": 0.1}), progress=False)
    with pytest.raises(UserError, match="training needs 10,000,000 tokens"):
        train_site(neox, site, _data(neox), T.TrainConfig(tokens=10_000_000), progress=False)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    d = Dictionary.__new__(Dictionary)  # never reached: the folder check comes first
    from featcircuit.site_training import save_site_dict

    with pytest.raises(UserError, match="cannot save to .* it holds \\['notes.txt'\\]"):
        save_site_dict(d, tmp_path / "x")
