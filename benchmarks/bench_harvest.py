"""Harvest throughput: early stopping after the needed block vs a full forward, in one run.

    .venv/bin/python benchmarks/bench_harvest.py [--layer 2] [--tokens 65536]
"""

from __future__ import annotations

import argparse

import torch
from _timing import best_time

import featcircuit.activations as A
from featcircuit import harvest, load_model, load_tokens, pair_sites


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="stdlib-neox")
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    model = load_model(args.model, device="auto")
    tokens = load_tokens("builtin:stdlib", model, n_tokens=args.tokens, split="heldout")
    hooks = [s.hook for s in pair_sites(model, args.layer)]
    n = tokens.numel()
    early = best_time(lambda: harvest(model, tokens, hooks, batch_size=args.batch_size, progress=False))
    real_stop = A.stop_layer
    A.stop_layer = lambda m, h: None  # the baseline: same harvest, full forward
    try:
        full = best_time(lambda: harvest(model, tokens, hooks, batch_size=args.batch_size, progress=False))
    finally:
        A.stop_layer = real_stop
    print(f"model {args.model}, layer {args.layer} of {model.cfg.n_layers}, {n:,} tokens, "
          f"batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"device {next(model.parameters()).device}")
    print(f"early stop : {n / early:>10,.0f} tokens/s")
    print(f"full fwd   : {n / full:>10,.0f} tokens/s")
    print(f"speed-up   : {full / early:.2f}x")


if __name__ == "__main__":
    main()
