"""Harvest equals run_with_cache, stops early, and resumes a killed run without recomputing."""

import pytest
import torch

import featcircuit.activations as A
from featcircuit import UserError, harvest


def _tokens(model, n=10, ctx=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.d_vocab, (n, ctx), generator=g)


def test_harvest_equals_run_with_cache(tiny_model):
    tokens = _tokens(tiny_model)
    hooks = ["blocks.0.mlp.hook_post", "blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"]
    got = harvest(tiny_model, tokens, hooks, batch_size=3, progress=False)
    _, cache = tiny_model.run_with_cache(tokens, names_filter=lambda n: n in hooks)
    for h in hooks:
        torch.testing.assert_close(got[h], cache[h].float(), rtol=1e-6, atol=1e-6)


def test_stop_layer(neox):
    assert A.stop_layer(neox, ["blocks.0.hook_resid_pre", "blocks.1.mlp.hook_post"]) == 2
    assert A.stop_layer(neox, ["blocks.2.mlp.hook_post"]) is None  # last block: full forward
    assert A.stop_layer(neox, ["ln_final.hook_normalized"]) is None


def test_killed_harvest_resumes(neox, tmp_path, monkeypatch):
    tokens = _tokens(neox, n=10)
    hooks = ["blocks.1.hook_resid_pre", "blocks.1.mlp.hook_post"]
    full = harvest(neox, tokens, hooks, progress=False)

    real_save, saved = A.atomic_save_safetensors, []

    def dying_save(t, path, metadata=None):
        if len(saved) == 2:
            raise KeyboardInterrupt  # killed while the third chunk was being made
        saved.append(path)
        return real_save(t, path, metadata)

    monkeypatch.setattr(A, "atomic_save_safetensors", dying_save)
    with pytest.raises(KeyboardInterrupt):
        harvest(neox, tokens, hooks, cache_dir=tmp_path, chunk_size=3, batch_size=2, progress=False)
    monkeypatch.setattr(A, "atomic_save_safetensors", real_save)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["chunk_00000.safetensors", "chunk_00001.safetensors", "manifest.json"]

    calls = []
    real_forward = A._forward
    monkeypatch.setattr(A, "_forward", lambda m, b, *a: calls.append(len(b)) or real_forward(m, b, *a))
    resumed = harvest(neox, tokens, hooks, cache_dir=tmp_path, chunk_size=3, batch_size=2, progress=False)
    assert sum(calls) == 4  # only the sequences of chunks 2 and 3 were recomputed
    for h in hooks:
        torch.testing.assert_close(resumed[h], full[h], rtol=0, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        *(f"chunk_{c:05d}.safetensors" for c in range(4)), "manifest.json"]


def test_cache_for_other_tokens_rejected(neox, tmp_path):
    hooks = ["blocks.0.mlp.hook_post"]
    harvest(neox, _tokens(neox, seed=0), hooks, cache_dir=tmp_path, progress=False)
    with pytest.raises(UserError, match="was made for other tokens"):
        harvest(neox, _tokens(neox, seed=1), hooks, cache_dir=tmp_path, progress=False)


def test_bad_harvest_inputs(neox):
    with pytest.raises(UserError, match="unknown hook 'blocks.0.nope'"):
        harvest(neox, _tokens(neox), ["blocks.0.nope"], progress=False)
    with pytest.raises(UserError, match="non-empty"):
        harvest(neox, torch.empty(0, 16, dtype=torch.long), ["blocks.0.mlp.hook_post"], progress=False)
