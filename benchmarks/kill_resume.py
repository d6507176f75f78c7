"""Random SIGKILLs during ``featcircuit train`` and ``harvest``: every rerun ends identical.

1. build a tiny GPT-NeoX and a text folder (as the tests do) in a scratch folder;
2. run the command once uninterrupted into ``ref/`` and hash every output file;
3. run it again into ``run/``, SIGKILL it ``--kills`` times at random moments once its first
   checkpoint (train) or chunk (harvest) exists, rerunning after each kill; then let it finish;
4. compare the hashes: the killed-and-resumed output must equal the uninterrupted one byte for
   byte; one more rerun of the finished command must exit 0 and change nothing.

Usage: ``python benchmarks/kill_resume.py --kills 10`` (prints one line per command).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def make_inputs(root: Path) -> tuple[Path, Path]:
    """A tiny GPT-NeoX folder and a text folder under ``root``."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import _save_neox  # the tests' tiny model

    model = _save_neox(root / "model")
    data = root / "data"
    data.mkdir()
    for i in range(60):
        (data / f"f{i}.txt").write_text(
            "".join(f"def f{i}_{j}(x, y):\n    return x * {i + j} + y - {j}\n" for j in range(40)))
    return model, data


def digest(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` except the output marker, by relative path."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".featcircuit-out.json"}


def commands(model: Path, data: Path, out: Path, scale: float = 1.0
             ) -> dict[str, tuple[list[str], Path, Path]]:
    """{name: (argv, output folder, file whose appearance means work has started)}."""
    train = out / "pair"
    harvest = out / "acts"
    return {
        "train": (["train", "--model", str(model), "--data", str(data), "--layer", "1", "--width", "2x",
                   "--k", "4", "--tokens", str(int(12000 * scale)), "--epochs", "2", "--batch-size", "64",
                   "--ckpt-every", "3", "--out", str(train)],
                  train, out / ".pair.ckpt" / "train_state.safetensors"),
        "harvest": (["harvest", "--model", str(model), "--data", str(data), "--split", "all",
                     "--layer", "1", "--tokens", str(int(16384 * scale)), "--n-ctx", "32",
                     "--batch-size", "4", "--chunk-size", "4", "--out", str(harvest)],
                    harvest, harvest / "chunk_00000.safetensors"),
    }


def run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "featcircuit", *argv], capture_output=True, text=True,
                          env=_env())


def kill_resume(name: str, model: Path, data: Path, root: Path, kills: int, rng: random.Random,
                max_delay: float = 1.0, scale: float = 1.0) -> dict:
    """Kill ``name`` ``kills`` times, resume, and compare with an uninterrupted run."""
    argv, out, started = commands(model, data, root / "ref", scale)[name]
    t0 = time.time()
    r = run(argv)
    ref_s = time.time() - t0
    assert r.returncode == 0, r.stderr[-2000:]
    ref = digest(out)
    argv, out, started = commands(model, data, root / "run", scale)[name]
    landed = 0
    for _ in range(kills):
        p = subprocess.Popen([sys.executable, "-m", "featcircuit", *argv], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=_env())
        while p.poll() is None and not started.exists():
            time.sleep(0.01)
        time.sleep(rng.uniform(0, max_delay))
        if p.poll() is None:
            landed += 1
            p.send_signal(signal.SIGKILL)
        p.wait()
    r = run(argv)
    assert r.returncode == 0, r.stderr[-2000:]
    got = digest(out)
    again = run(argv)
    same_after_rerun = again.returncode == 0 and digest(out) == got
    return {"command": name, "kills": kills, "kills_mid_run": landed, "identical": got == ref,
            "rerun_exit0_unchanged": same_after_rerun, "files": len(ref), "uninterrupted_s": round(ref_s, 1),
            "rerun_says": again.stdout.strip().splitlines()[-1] if again.stdout.strip() else ""}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-delay", type=float, default=1.0, help="seconds after work starts")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, data = make_inputs(root)
        for name in ("train", "harvest"):
            res = kill_resume(name, model, data, root, args.kills, rng, args.max_delay)
            print(" ".join(f"{k}={v}" for k, v in res.items()), flush=True)


if __name__ == "__main__":
    main()
