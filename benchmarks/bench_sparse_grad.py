"""The TopK encoder's gradient from the picks alone against autograd's dense one, in one run.

    .venv/bin/python benchmarks/bench_sparse_grad.py [--batch 4096] [--repeats 2]

For each shape (the built-in model's mlp site, and Pythia-70m's mlp width 2048 at 4k and 16k
features), times a whole training step (loss, backward, Adam, decoder renorm) on random rows
with the dense encoder gradient (``SPARSE_GRAD = False``: plain autograd) and with the sparse one
(``True``, :mod:`featcircuit.sparse_encoder`), the two alternating so machine load hits both
alike, best of ``--repeats``. Prints tokens/s of both, the speed-up, and the share of the
machine's fp32 matmul peak (a plain ``[B, d] @ [d, m]``, measured in the same run) that the
FLOPs each step *performs* reach: dense 4·B·d·m + 6·B·k·d, sparse 2·B·d·m + 2·B·k·d + 6·B·k·d
(no latent is dead, so no AuxK picks). The trainer uses the sparse path from
``MIN_WIDTH`` features on.
"""

from __future__ import annotations

import argparse
import time

import torch
from _timing import best_time, training_step

import featcircuit.sparse_encoder as S
from featcircuit.dictionary import DictConfig, Dictionary
from featcircuit.training import TrainConfig

SHAPES = [("built-in mlp", 512, 1024), ("Pythia-70m mlp", 2048, 4096), ("Pythia-70m mlp", 2048, 16384)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    B, k = args.batch, args.k
    print(f"batch {B}, k {k}, {torch.get_num_threads()} threads; the trainer's default: sparse from "
          f"{S.MIN_WIDTH} features")
    print(f"{'shape':<16} {'d_in':>5} {'d_sae':>6} {'dense tok/s':>11} {'sparse tok/s':>12} {'speed-up':>8} "
          f"{'peak':>6} {'dense of peak':>13} {'sparse of peak':>14}")
    for name, d, m in SHAPES:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(B, d, generator=g)
        w = torch.randn(d, m, generator=g)
        peak = 2 * B * d * m / best_time(lambda: x @ w, args.repeats) / 1e9
        dct = Dictionary(DictConfig(d_in=d, d_sae=m, architecture="topk", k=k), seed=0)
        opt = torch.optim.Adam(dct.parameters(), lr=1e-4)
        cfg = TrainConfig(k=k)
        dead = torch.zeros(m, dtype=torch.bool)

        step = training_step(dct, x, cfg, dead, opt)

        best = {False: float("inf"), True: float("inf")}
        for mode in best:  # one warm-up each
            S.SPARSE_GRAD = mode
            step()
        for _ in range(args.repeats):
            for mode in best:
                S.SPARSE_GRAD = mode
                t = time.perf_counter()
                step()
                best[mode] = min(best[mode], time.perf_counter() - t)
        S.SPARSE_GRAD = None
        flops = {False: 4 * B * d * m + 6 * B * k * d, True: 2 * B * d * m + 2 * B * k * d + 6 * B * k * d}
        share = {mode: flops[mode] / best[mode] / 1e9 / peak for mode in best}
        print(f"{name:<16} {d:>5} {m:>6} {B / best[False]:>11,.0f} {B / best[True]:>12,.0f} "
              f"{best[False] / best[True]:>7.2f}x {peak:>6.1f} {share[False]:>13.0%} {share[True]:>14.0%}")


if __name__ == "__main__":
    main()
