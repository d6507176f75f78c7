"""Paired training: resumable to the same weights, learns, and bad inputs; evaluation metrics."""

import pytest
import torch

import featcircuit.training as T
from featcircuit import UserError
from featcircuit.dictionary import DictConfig, Dictionary, Pair, load_pair
from featcircuit.evaluation import evaluate_pair
from featcircuit.io import load_state
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
    ev = evaluate_pair(neox, loaded, data[:8], 1, progress=False)
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
    ev = evaluate_pair(neox, pair, _data(neox, n=6), 1, progress=False)
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
    ev = evaluate_pair(neox, pair, _data(neox, n=6), 1, progress=False)
    assert ev["downstream"]["mlp"]["recovered_vs_zero"] == pytest.approx(0.0, abs=1e-5)
    assert ev["sites"]["mlp"]["dead_frac"] == 1.0


def test_bad_training_inputs(neox):
    with pytest.raises(UserError, match="unknown architecture 'gated'"):
        T.train_pair(neox, 1, _data(neox), T.TrainConfig(architecture="gated"), progress=False)
    with pytest.raises(UserError, match="training needs 10,000,000 tokens"):
        T.train_pair(neox, 1, _data(neox), T.TrainConfig(tokens=10_000_000), progress=False)
    with pytest.raises(UserError, match="layer 5 is out of range"):
        T.train_pair(neox, 5, _data(neox), T.TrainConfig(**CFG), progress=False)
