"""Two torchrun ranks vs one process: the same `featcircuit train --layers` command, compared.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dist_vs_single.py [--nproc 2] [--tokens 20000]

Runs ``featcircuit train --layers 1-2`` on the built-in model once as a plain process and once
as ``torchrun --nproc-per-node N -m featcircuit train …`` (gloo on CPU), each into its own
``FEATCIRCUIT_CACHE``, then prints the wall time of each and, per layer, site and tensor, the
largest difference between the two pairs relative to the tensor's largest entry.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=20000)
    ap.add_argument("--layers", default="1-2")
    args = ap.parse_args()
    from safetensors.torch import load_file

    tmp = Path(tempfile.mkdtemp(prefix="fc-dist-"))
    train = ["train", "--layers", args.layers, "--tokens", str(args.tokens), "--batch-size", "512",
             "--width", "2", "--device", "cpu"]
    runner = Path(sys.executable).parent / "torchrun"
    cmds = {"one process": [sys.executable, "-m", "featcircuit", *train],
            f"torchrun {args.nproc} ranks": [str(runner), "--nproc-per-node", str(args.nproc),
                                             "-m", "featcircuit", *train]}
    caches = {}
    for name, cmd in cmds.items():
        cache = tmp / name.replace(" ", "_")
        env = {**os.environ, "FEATCIRCUIT_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
        t = time.time()
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"{name} failed:\n{r.stderr[-3000:]}")
        shown = " ".join(cmd[1:] if name == "one process" else cmd)
        print(f"{name:<18} {time.time() - t:6.1f} s   ({shown})")
        caches[name] = cache
    a, b = caches.values()
    names = ("W_enc", "W_dec", "b_enc", "b_dec")
    print(f"\n{'pair folder':<32} {'site':<5} " + " ".join(f"{k:>9}" for k in names))
    for folder in sorted((a / "pairs").iterdir()):
        for site in ("resid", "mlp"):
            x = load_file(folder / "pair" / site / "sae_weights.safetensors")
            y = load_file(b / "pairs" / folder.name / "pair" / site / "sae_weights.safetensors")
            rel = {k: float((x[k] - y[k]).abs().max() / x[k].abs().max()) for k in names}
            print(f"{folder.name:<32} {site:<5} " + " ".join(f"{v:>9.1e}" for v in rel.values()))


if __name__ == "__main__":
    main()
