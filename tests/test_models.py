"""Model loading: built-in offline with its recorded quality, local folders, bad names."""

import json
import subprocess
import sys
import time

import pytest
import torch

from featcircuit import UserError, load_model, load_tokens
from featcircuit.models import BUILTIN_DIR, builtin_provenance, model_info


def test_builtin_heldout_loss_matches_record(builtin):
    from featcircuit import corpus

    prov = builtin_provenance()
    if corpus.corpus_hash(corpus.stdlib_files()) != prov["corpus_hash"]:
        pytest.skip("this Python's stdlib differs from the one the model was measured on")
    tokens = load_tokens("builtin:stdlib", builtin, n_ctx=prov["config"]["n_ctx"], split="heldout")
    assert tokens.numel() == prov["heldout_tokens"]
    loss = 0.0
    with torch.no_grad():
        for i in range(0, len(tokens), 64):
            b = tokens[i:i + 64]
            loss += builtin(b, return_type="loss").item() * b[:, 1:].numel()
    ce = loss / tokens[:, 1:].numel()
    assert abs(ce - prov["heldout"]["ce"]) < 2e-3
    assert ce < prov["baselines"]["bigram"]["ce"] - 0.3  # clearly beats the bigram baseline


def test_builtin_shape_and_size(builtin):
    info = model_info(builtin)
    assert info["blocks"] == "parallel attention+MLP" and info["n_layers"] >= 4
    assert info["d_model"] >= 128 and info["d_mlp"] == 4 * info["d_model"]
    size = sum(p.stat().st_size for p in BUILTIN_DIR.iterdir())
    assert size <= 10 * 2**20


def test_local_folder_loads(neox_dir):
    m = load_model(str(neox_dir), device="cpu")
    assert m.cfg.n_layers == 3 and model_info(m)["hf_model_type"] == "gpt_neox"


def test_unknown_model_offline_is_quick_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.time()
    with pytest.raises(UserError, match="'nobody/no-such-model' is not available locally") as e:
        load_model("nobody/no-such-model")
    assert "\n" not in str(e.value) and time.time() - t < 10


def test_folder_without_config(tmp_path):
    with pytest.raises(UserError, match="has no config.json"):
        load_model(str(tmp_path))


def test_cli_bad_model_exit_2():
    r = subprocess.run([sys.executable, "-m", "featcircuit", "model", "info", "--model",
                        "nobody/no-such-model"], capture_output=True, text=True,
                       env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "nobody/no-such-model" in r.stderr


def test_cli_model_info_builtin():
    r = subprocess.run([sys.executable, "-m", "featcircuit", "model", "info", "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["sites"][2]["resid"] == "blocks.2.hook_resid_pre"
    assert info["sites"][2]["mlp"] == "blocks.2.mlp.hook_post" and info["sites"][2]["d_mlp"] == info["d_mlp"]
