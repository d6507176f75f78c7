"""Dictionary training throughput against the machine's measured fp32 matmul peak, in one run.

    .venv/bin/python benchmarks/bench_training.py [--batch 4096] [--steps 10]

For each site (resid d=128, mlp d=512 of the built-in model) and architecture (TopK, ReLU), times
training steps on random activations of the real shapes, counts the matmul FLOPs of a step
(encoder forward 2·B·d·m, encoder weight gradient 2·B·d·m; ReLU adds dense decode forward and
its two gradients, 6·B·m·d; TopK's sparse decode is 6·B·k·d), and divides the achieved rate by
the peak of a plain [B,d]@[d,m] matmul of the same shape measured in the same run.
"""

from __future__ import annotations

import argparse

import torch
from _timing import best_time, training_step

from featcircuit.dictionary import DictConfig, Dictionary
from featcircuit.training import TrainConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    B, m, k = args.batch, args.width, args.k
    print(f"batch {B}, d_sae {m}, k {k}, {torch.get_num_threads()} threads")
    print(f"{'site':<6} {'arch':<5} {'tok/s':>10} {'GFLOP/s':>8} {'peak':>8} {'of peak':>8}")
    for site, d in (("resid", 128), ("mlp", 512)):
        x = torch.randn(B, d)
        w = torch.randn(d, m)
        peak_t = best_time(lambda: x @ w, args.steps * 2)
        peak = 2 * B * d * m / peak_t / 1e9
        for arch in ("topk", "relu"):
            dct = Dictionary(DictConfig(d_in=d, d_sae=m, architecture=arch, k=k), seed=0)
            opt = torch.optim.Adam(dct.parameters(), lr=1e-4)
            cfg = TrainConfig(architecture=arch, k=k)
            dead = torch.zeros(m, dtype=torch.bool)

            step = training_step(dct, x, cfg, dead, opt)

            t = best_time(step, args.steps)
            flops = 4 * B * d * m + (6 * B * m * d if arch == "relu" else 6 * B * k * d)
            rate = flops / t / 1e9
            print(f"{site:<6} {arch:<5} {B / t:>10,.0f} {rate:>8.1f} {peak:>8.1f} {rate / peak:>8.0%}")


if __name__ == "__main__":
    main()
