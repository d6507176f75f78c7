"""featcircuit's trainer vs SAELens's trainer on identical activations: tokens/s and held-out FVE.

    bash benchmarks/peer_saelens/setup.sh            # once: SAELens in its own .venv here
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/peer_saelens/run.py [--builtin-tokens 131072]

1. harvests with featcircuit (one harvest per model, both sites at once): the built-in model's
   layer 2 on its own training text (resid 128, mlp 512), and a random-weights GPT-NeoX of
   Pythia-70m's shape at layer 3 on random tokens (mlp 2048; its activations are not a trained
   model's, so its FVE only compares the trainers);
2. featcircuit trains its TopK pair on those rows (``train_pair(acts=…)``, one epoch); the very
   rows it trained on (BOS dropped, same cut) are saved as ``train`` with held-out rows from
   other tokens as ``heldout`` in one safetensors file per site;
3. SAELens's ``SAETrainer`` trains its TopK SAE on that file in this folder's venv
   (``saelens_train.py``), with the same d_sae, k, batch size and number of steps; each
   trainer keeps its own defaults otherwise (learning rate, schedule, AuxK, initialisation);
4. tokens/s is the batch over the median step time (first step excluded) for the dictionary of
   that site; FVE = 1 − Σ‖x − x̂‖² / Σ‖x − mean‖² on the held-out rows, each SAE through its own
   encode/decode. Threads: whatever OMP_NUM_THREADS gives both processes.

Prints a table and writes ``docs/scale/peer_saelens.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's featcircuit
sys.path.insert(0, str(ROOT / "benchmarks"))
PEER_PY = HERE / ".venv" / "bin" / "python"


def featcircuit_pair(model, layer, acts, cfg):
    """(pair, {site: median step seconds}) of featcircuit's trainer on harvested ``acts``."""
    import featcircuit.training as T

    stamps: list[float] = []
    real = T._loss

    def stamped(*a, **k):
        stamps.append(time.perf_counter())
        return real(*a, **k)

    T._loss = stamped
    try:
        t0 = time.perf_counter()
        pair = T.train_pair(model, layer, None, cfg, acts=acts, progress=False)
        stamps.append(time.perf_counter())
        wall = time.perf_counter() - t0
    finally:
        T._loss = real
    steps = [(stamps[i + 1] - stamps[i], stamps[i + 2] - stamps[i + 1])
             for i in range(2, len(stamps) - 2, 2)]  # (resid, mlp) per step, the first skipped
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    return pair, {"resid": med([s[0] for s in steps]), "mlp": med([s[1] for s in steps])}, wall


def fve(d, x: torch.Tensor) -> tuple[float, float]:
    """(held-out fraction of variance explained, L0) of a featcircuit dictionary on raw rows."""
    with torch.no_grad():
        codes = d.encode(x)
        r = d.decode(codes)
    var = (x - x.mean(0)).pow(2).sum()
    return 1 - float((x - r).pow(2).sum() / var), float((codes != 0).sum(-1).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--builtin-tokens", type=int, default=131072)
    ap.add_argument("--pythia-tokens", type=int, default=8192)
    ap.add_argument("--heldout-tokens", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--builtin-d-sae", type=int, default=1024)
    ap.add_argument("--pythia-d-sae", type=int, default=4096)
    ap.add_argument("--skip", nargs="*", default=[], choices=["builtin", "pythia-70m"])
    ap.add_argument("--out", help="JSON path (default docs/scale/peer_saelens.json)")
    args = ap.parse_args()
    if not PEER_PY.exists():
        sys.exit(f"no SAELens venv at {PEER_PY.parent.parent}: run `bash {HERE / 'setup.sh'}` first")

    from bench_scale import build_model

    from featcircuit.activations import harvest
    from featcircuit.data import BUILTIN_DATA, load_tokens
    from featcircuit.models import load_model
    from featcircuit.sites import pair_sites
    from featcircuit.training import TrainConfig

    n_ctx = 128
    rows = []
    work = Path(tempfile.mkdtemp(prefix="fc-peer-"))
    cases = [c for c in (("builtin", 2, ("resid", "mlp"), args.builtin_tokens, args.builtin_d_sae),
                         ("pythia-70m", 3, ("mlp",), args.pythia_tokens, args.pythia_d_sae))
             if c[0] not in args.skip]
    for name, layer, sites_wanted, n_tok, d_sae in cases:
        n_tok = (n_tok // args.batch) * args.batch
        n_seq = -(-n_tok // (n_ctx - 1))
        h_seq = -(-args.heldout_tokens // (n_ctx - 1))
        if name == "builtin":
            model = load_model("stdlib-neox", device="cpu")
            train_tok = load_tokens(BUILTIN_DATA, model, n_ctx=n_ctx, n_tokens=n_seq * n_ctx, split="train")
            held_tok = load_tokens(BUILTIN_DATA, model, n_ctx=n_ctx, n_tokens=h_seq * n_ctx, split="heldout")
        else:
            model = build_model(name, work / name, "cpu")
            g = torch.Generator().manual_seed(0)
            train_tok = torch.randint(1, 50304, (n_seq, n_ctx), generator=g)
            held_tok = torch.randint(1, 50304, (h_seq, n_ctx), generator=g)
            train_tok[:, 0] = held_tok[:, 0] = 0
        sites = pair_sites(model, layer)
        hooks = [s.hook for s in sites]
        acts = harvest(model, train_tok, hooks, progress=False)
        held = harvest(model, held_tok, hooks, progress=False)
        steps = n_tok // args.batch
        cfg = TrainConfig(width=d_sae / sites[0].width, k=args.k, tokens=n_tok, epochs=1,
                          batch_size=args.batch, warmup_steps=max(1, steps // 10), n_ctx=n_ctx,
                          ckpt_every=10**9)
        pair, step, wall = featcircuit_pair(model, layer, acts, cfg)
        for s in sites:
            if s.name not in sites_wanted:
                continue
            x = acts[s.hook][:, 1:].reshape(-1, s.width)[:n_tok]  # exactly the rows trained on
            xh = held[s.hook][:, 1:].reshape(-1, s.width)
            from safetensors.torch import save_file

            path = work / f"{name}-{s.name}.safetensors"
            save_file({"train": x.contiguous(), "heldout": xh.contiguous()}, str(path))
            ours_fve, ours_l0 = fve(getattr(pair, s.name), xh)
            out = work / f"{name}-{s.name}.json"
            r = subprocess.run([str(PEER_PY), str(HERE / "saelens_train.py"), str(path), str(out),
                                "--d-sae", str(d_sae), "--k", str(args.k), "--batch", str(args.batch),
                                "--steps", str(steps)], capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"SAELens run failed for {name} {s.name}:\n{r.stderr[-3000:]}")
            peer = json.loads(out.read_text())
            row = dict(model=name, site=s.name, d_in=s.width, d_sae=d_sae, k=args.k, batch=args.batch,
                       steps=steps, train_rows=len(x), heldout_rows=len(xh),
                       featcircuit_tok_s=args.batch / step[s.name], featcircuit_fve=ours_fve,
                       featcircuit_l0=ours_l0, featcircuit_pair_wall_s=wall,
                       saelens_tok_s=peer["tok_s"], saelens_fve=peer["heldout_fve"],
                       saelens_l0=peer["heldout_l0"], saelens_wall_s=peer["wall_s"],
                       saelens=peer["trainer"], random_weights=name != "builtin")
            rows.append(row)
            print(f"{name:<11} {s.name:<5} d_in {s.width:>4} d_sae {d_sae:>5} {steps:>4} steps | "
                  f"featcircuit {row['featcircuit_tok_s']:>9,.0f} tok/s FVE {ours_fve:.3f} | "
                  f"SAELens {row['saelens_tok_s']:>9,.0f} tok/s FVE {row['saelens_fve']:.3f} | "
                  f"speed ratio {row['featcircuit_tok_s'] / row['saelens_tok_s']:.1f}×", flush=True)
    out = Path(args.out) if args.out else ROOT / "docs" / "scale" / "peer_saelens.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": torch.get_num_threads(), "args": vars(args), "rows": rows},
                              indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
