"""Hardening: pickle-free checkpoints, staged outputs, locks, strict JSON, exact-zero KL, kill/resume."""

from __future__ import annotations

import json
import os
import pickle
import random
import sys
from pathlib import Path

import pytest
import torch

import featcircuit.training as T
from featcircuit import UserError
from featcircuit.checks import (
    MARKER,
    check_out_dir,
    folder_lock,
    parse_json_text,
    seed,
    staged_output,
    strict_int,
)
from featcircuit.io import atomic_save_state, load_state, strict_json


class _Evil:
    """Unpickling this writes a file: what a planted checkpoint would do."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return (Path.write_text, (Path(self.target), "pwned"))


def _plant(folder: Path, names: list[str], target: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        with open(folder / n, "wb") as fh:
            pickle.dump({"step": 1, "x": _Evil(target)}, fh)
    # the payload is live: plain pickle runs it (so the test below means something)
    probe = folder / "probe.pkl"
    probe.write_bytes(pickle.dumps(_Evil(folder / "probe-ran")))
    pickle.loads(probe.read_bytes())
    assert (folder / "probe-ran").exists()
    (folder / "probe-ran").unlink()
    probe.unlink()


def test_crafted_pickle_in_checkpoint_folder_cannot_run_code(neox, tmp_path):
    target = tmp_path / "pwned.txt"
    ckpt = tmp_path / "ckpt"
    # under the old name (train_state.pt) and under the new one (a pickle posing as safetensors)
    _plant(ckpt, ["train_state.pt", T.CKPT_FILE], target)
    data = torch.randint(0, neox.cfg.d_vocab, (40, 16), generator=torch.Generator().manual_seed(0))
    cfg = T.TrainConfig(width=2.0, k=4, tokens=300, epochs=1, batch_size=100, n_ctx=16)
    with pytest.raises(UserError, match="not a featcircuit checkpoint"):
        T.train_pair(neox, 1, data, cfg, ckpt_dir=ckpt, progress=False)
    assert not target.exists()
    with pytest.raises(ValueError):
        load_state(ckpt / "train_state.pt")
    assert not target.exists()


def test_lm_checkpoint_is_not_unpickled(tmp_path):
    """The LM trainer reads its checkpoint with load_state only (a full run takes minutes)."""
    import inspect

    import featcircuit.lm_training as L

    target = tmp_path / "pwned.txt"
    _plant(tmp_path, ["state.pt", "state.safetensors"], target)
    with pytest.raises(ValueError, match="not a featcircuit checkpoint"):
        load_state(tmp_path / "state.safetensors")
    assert not target.exists()
    src = inspect.getsource(L)
    assert "torch.load" not in src and "import pickle" not in src and "load_state(ckpt)" in src


def test_state_round_trip_exact():
    m = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(m.parameters())
    m(torch.randn(4, 3)).sum().backward()
    opt.step()
    st = {"model": m.state_dict(), "opt": opt.state_dict(), "step": 7, "nested": {1: [1.5, None, "a"]},
          "tup": (1, 2), "nan": float("nan")}
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = atomic_save_state(st, Path(d) / "s.safetensors")
        assert oct(os.stat(p).st_mode & 0o777) == oct(0o666 & ~_umask())
        back = load_state(p)
    opt2 = torch.optim.Adam(m.parameters())
    opt2.load_state_dict(back["opt"])  # the structure is what torch expects
    assert back["step"] == 7 and back["nested"] == {1: [1.5, None, "a"]} and back["tup"] == (1, 2)
    assert back["nan"] != back["nan"]
    for k, v in m.state_dict().items():
        assert torch.equal(back["model"][k], v)
    for i, s in opt.state_dict()["state"].items():
        for k, v in s.items():
            assert torch.equal(back["opt"]["state"][i][k], v)


def _umask() -> int:
    u = os.umask(0)
    os.umask(u)
    return u


def test_safetensors_files_get_the_usual_mode(tmp_path):
    from featcircuit.dictionary import DictConfig, Dictionary

    d = Dictionary(DictConfig(d_in=4, d_sae=8, k=2))
    p = d.save(tmp_path / "d")
    for f in p.iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~_umask(), f


def test_killed_writes_leftovers_are_swept_and_nothing_else(tmp_path):
    import featcircuit.io as io

    names: list[str] = []

    def dies(tmp: str) -> None:
        names.append(tmp)
        raise KeyboardInterrupt

    sub = tmp_path / "resid"
    sub.mkdir()
    keep = [tmp_path / ".keep", tmp_path / "notes.tmp", tmp_path / "chunk_00000.safetensors",
            tmp_path / ".notes.tmp", tmp_path / ".w.safetensors.toolong99.tmp"]
    for f in keep:
        f.write_text("mine")
    for folder in (tmp_path, sub):
        with pytest.raises(KeyboardInterrupt):
            io._atomic(folder / "w.safetensors", dies)
    for tmp in names:  # a SIGKILL runs no except clause: the temporaries _atomic named stay behind
        Path(tmp).write_bytes(b"half")
    assert io.clear_stale_temps(tmp_path) == 1 and Path(names[1]).exists()
    assert io.clear_stale_temps(tmp_path, recursive=True) == 1
    assert not any(Path(t).exists() for t in names)
    assert all(f.read_text() == "mine" for f in keep)


# ---- strict values ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["１２", "²", "1_000", "1.0", " ", "", "0x10", "1e3", "9" * 31])
def test_strict_int_rejects(text):
    with pytest.raises(UserError):
        strict_int(text, "--n")


def test_seed_bounds():
    assert seed(str(2**63 - 1)) == 2**63 - 1
    for bad in (str(2**63), "-1", str(2**64)):
        with pytest.raises(UserError, match="0..9223372036854775807"):
            seed(bad)


def test_json_bounds():
    with pytest.raises(UserError, match="nested more than 8"):
        parse_json_text("[" * 9 + "]" * 9, "x", max_depth=8)
    assert parse_json_text('["[[[[[[[[[", {"a": "]]]"}]', "x", max_depth=3) == ["[[[[[[[[[", {"a": "]]]"}]
    with pytest.raises(UserError, match="digits"):
        parse_json_text("1" * 31, "x")
    for const in ("NaN", "Infinity", "-Infinity", "[1, NaN]"):
        with pytest.raises(UserError, match="not valid JSON"):
            parse_json_text(const, "x")


def test_strict_json_null_with_reason():
    text = strict_json({"a": 1.0, "b": float("nan"), "c": [float("inf"), 2], "d": {"r": float("-inf")}},
                       {"b": "undefined: no gap"})
    d = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict constant {c}"))
    assert d["a"] == 1.0 and d["b"] is None and d["c"] == [None, 2] and d["d"] == {"r": None}
    assert d["null_reasons"] == {"b": "undefined: no gap", "c[0]": "the value was inf (not a finite number)",
                                 "d.r": "the value was -inf (not a finite number)"}
    assert "null_reasons" not in json.loads(strict_json({"a": 1.0}))


def test_kl_of_identical_distributions_is_exactly_zero():
    from featcircuit.evaluation import _ce_kl

    torch.manual_seed(0)
    logits = torch.randn(3, 9, 50) * 8
    toks = torch.randint(0, 50, (3, 9))
    clean_logp = logits[:, :-1].log_softmax(-1)
    _, kl, _ = _ce_kl(logits.clone(), clean_logp, toks)
    assert kl == 0.0
    # a perturbation gives the KL a plain float64 reference computes
    other = logits + 0.3 * torch.randn_like(logits)
    _, kl2, _ = _ce_kl(other, clean_logp, toks)
    p = clean_logp.double()
    ref = (p.exp() * (p - other[:, :-1].double().log_softmax(-1))).sum()
    assert kl2 == pytest.approx(float(ref), rel=1e-4) and kl2 > 0


# ---- output folders --------------------------------------------------------------------------


def test_staged_output_swaps_in_complete_folders(tmp_path):
    out = tmp_path / "run"
    with staged_output(out) as tmp:
        (tmp / "a.json").write_text("1")
        assert not out.exists()  # nothing visible until complete
    assert (out / "a.json").read_text() == "1"
    assert json.loads((out / MARKER).read_text())["files"] == ["a.json"]
    # a rerun replaces our own folder whole: no stale file survives
    with staged_output(out) as tmp:
        (tmp / "b.json").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "b.json"]
    # a failed run leaves the old output as it was, and no staging folder behind
    with pytest.raises(RuntimeError):
        with staged_output(out) as tmp:
            (tmp / "c.json").write_text("3")
            raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "b.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".run.lock", "run"]


def test_staged_output_never_deletes_user_files(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(UserError, match=r"did not write \('thesis.tex'\).*--force"):  # names the file
        with staged_output(out):
            pytest.fail("must not start")
    with staged_output(out, force=True) as tmp:
        (tmp / "a.json").write_text("1")
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("mine.old-")]
    assert len(kept) == 1 and (kept[0] / "thesis.tex").read_text() == "precious"
    # a user file added to a featcircuit folder is kept too
    (out / "notes.txt").write_text("mine")
    (out / "zz.txt").write_text("mine")
    with pytest.raises(UserError, match=r"did not write \('notes.txt' and 1 more\)"):
        check_out_dir(out)


def test_staged_output_removes_stale_staging_of_dead_runs(tmp_path):
    out = tmp_path / "run"
    stale = tmp_path / ".run.999999999.dead.tmp"
    stale.mkdir()
    (stale / ".featcircuit-staging").write_text("999999999")
    foreign = tmp_path / ".run.1.other.tmp"  # not ours (no staging file): left alone
    foreign.mkdir()
    with staged_output(out) as tmp:
        (tmp / "x").write_text("")
    assert not stale.exists() and foreign.exists()


@pytest.mark.parametrize("bad,msg", [("file", "existing file"), ("/proc/fc", "cannot write")])
def test_check_out_dir_rejects(tmp_path, bad, msg):
    if bad == "file":
        bad = tmp_path / "f"
        bad.write_text("x")
    with pytest.raises(UserError, match=msg):
        check_out_dir(bad)


def test_folder_lock_serialises(tmp_path):
    with folder_lock(tmp_path / "cache"):
        with pytest.raises(UserError, match="another featcircuit run"):
            with folder_lock(tmp_path / "cache", wait=False):
                pass
    with folder_lock(tmp_path / "cache", wait=False):  # free again
        pass


def test_model_train_refuses_user_folder_before_work(tmp_path):
    from featcircuit.lm_training import train_lm

    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="did not write"):
        train_lm(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"] and (out / "keep.txt").exists()


# ---- kill and resume (the 10-kill version: benchmarks/kill_resume.py) --------------------------


@pytest.mark.parametrize("command", ["train", "harvest"])
def test_random_kills_resume_to_identical_output(command, tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import kill_resume as K

    root = tmp_path_factory.mktemp(f"kill_{command}")
    model, data = K.make_inputs(root)
    res = K.kill_resume(command, model, data, root, kills=2, rng=random.Random(command),
                        max_delay=0.2, scale=0.1)
    assert res["identical"] and res["rerun_exit0_unchanged"], res


def test_a_safetensors_write_creates_only_names_a_resumed_run_sweeps(tmp_path):
    """A chunk's write creates nothing in its folder but featcircuit's own temporary (a private
    folder): safetensors' ``save_file`` made a ``.tmpXXXXXX`` of its own beside its target, and a
    harvest killed mid-write then refused to resume in its cache ("holds files featcircuit did
    not write"). What a kill leaves is accepted in a cache folder and swept on resume."""
    from featcircuit.cli import _CACHE_RE
    from featcircuit.io import _TEMP_NAME, atomic_save_safetensors, clear_stale_temps
    from helpers import created_names

    target = tmp_path / "chunk_00000.safetensors"
    x = torch.randn(1000, 64)
    names = created_names(tmp_path, lambda: atomic_save_safetensors({"x": x}, target))
    temps = names - {target.name}
    assert target.name in names and temps  # written through a temporary, renamed into place
    assert all(_TEMP_NAME.fullmatch(n) for n in temps), temps
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # nothing left behind
    from safetensors.torch import load_file

    torch.testing.assert_close(load_file(target)["x"], x)
    # what a kill leaves: the private folder with safetensors' temporary inside, and (from
    # earlier versions) safetensors' temporary itself; other names stay
    (tmp_path / next(iter(temps))).mkdir()
    (tmp_path / next(iter(temps)) / ".tmpQw3rTy").write_text("")
    for n in [".tmpAb3xY9", ".tmpAb3xY9.txt", "notes.txt"]:
        (tmp_path / n).write_text("")
    assert all(_CACHE_RE.fullmatch(n) for n in [*temps, ".tmpAb3xY9"])
    assert not _CACHE_RE.fullmatch("notes.txt")
    assert clear_stale_temps(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, ".tmpAb3xY9.txt", "notes.txt"])
