"""The smaller commands end to end: train → evaluate, features, harvest; model training; bad inputs."""

import json
import subprocess
import sys

import pytest

from featcircuit import UserError, load_model, load_tokens


def run(*args, env_extra=None):
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "featcircuit", *map(str, args)], capture_output=True,
                          text=True, env=env)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_data")
    for i in range(30):
        (d / f"f{i}.txt").write_text(f"def f{i}(x, y):\n    return x * {i} + y\n" * 8)
    return d


def test_train_then_evaluate(neox_dir, data, tmp_path):
    pair = tmp_path / "pair"
    r = run("train", "--model", neox_dir, "--layer", 1, "--data", data, "--width", "2x", "--k", 4,
            "--tokens", 1500, "--epochs", 1, "--batch-size", 100, "--out", pair)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (pair / "resid" / "cfg.json").exists() and str(pair) in r.stdout
    cfg = json.loads((pair / "mlp" / "cfg.json").read_text())
    assert (cfg["layer"], cfg["site"], cfg["k"], cfg["d_sae"]) == (1, "mlp", 4, 64)
    r = run("evaluate", "--model", neox_dir, "--dicts", pair, "--data", data, "--split", "all",
            "--tokens", 512, "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    ev = json.loads(r.stdout)
    assert ev["sites"]["resid"]["l0"] <= 4 and 0 < ev["downstream"]["n_tokens"]
    r = run("evaluate", "--model", neox_dir, "--dicts", pair, "--layer", 2, "--data", data, "--split", "all")
    assert r.returncode == 2 and "expected layer 2" in r.stderr
    r = run("features", "--model", neox_dir, "--dicts", pair, "--layer", 1, "--site", "mlp", "--feature", 0,
            "--data", data, "--split", "all", "--tokens", 512, env_extra={"FEATCIRCUIT_CACHE": str(tmp_path / "c")})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "mlp1/0" in r.stdout


def test_harvest_command_resumable(neox_dir, data, tmp_path):
    out = tmp_path / "acts"
    args = ("harvest", "--model", neox_dir, "--layer", 1, "--data", data, "--split", "all", "--tokens", 512,
            "--n-ctx", 32, "--out", out)
    r = run(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "manifest.json").exists() and f"wrote activation cache to {out}" in r.stdout
    files = sorted(p.name for p in out.iterdir())
    # a SIGKILL mid-write runs no cleanup: its temporary (mkstemp's name) stays until the next run
    (out / ".chunk_00001.safetensors.k1ll3d_x.tmp").write_bytes(b"half a chunk")
    assert run(*args).returncode == 0  # a second run reuses every chunk
    assert sorted(p.name for p in out.iterdir()) == files


def test_model_train_small(tmp_path):
    """`featcircuit model train`'s code path on a tiny configuration: loads back and records provenance."""
    from featcircuit.lm_training import LMConfig, train_lm

    cfg = LMConfig(vocab_size=512, d_model=32, n_layers=2, n_heads=2, d_mlp=128, n_ctx=32, batch_size=4,
                   steps=6, warmup=2, ckpt_every=3)
    prov = train_lm(tmp_path / "m", cfg, progress=False)
    assert prov["steps"] == 6 and prov["heldout"]["ce"] > 0 and len(prov["corpus_hash"]) == 64
    m = load_model(str(tmp_path / "m"), device="cpu")
    assert m.cfg.n_layers == 2 and m.cfg.d_mlp == 128
    toks = load_tokens("builtin:stdlib", m, n_ctx=32, n_tokens=256, split="heldout")
    assert toks.shape == (8, 32)
    again = train_lm(tmp_path / "m", cfg, progress=False)  # resumes from the finished checkpoint
    assert again["heldout"]["ce"] == pytest.approx(prov["heldout"]["ce"], rel=1e-6)


def test_unknown_hf_dataset_offline(neox, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="'nobody/no-such-dataset' is not available"):
        load_tokens("nobody/no-such-dataset", neox, n_tokens=256)
