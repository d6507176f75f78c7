"""Cost of the Jacobian penalty per training step, against a plain pair step, in one run.

    .venv/bin/python benchmarks/bench_jacobian.py [--batch 1024] [--reps 7]

1. real shapes of the built-in model's layer 2 (resid d=128, mlp d=512, 1,024 features/site,
   k=32) and its real MLP weights; residual rows drawn from a Gaussian (the cost does not depend
   on the values);
2. a plain step (both dictionaries, each its own backward, as ``train_pair`` does at λ = 0) and
   a joint step with the penalty on ``n`` rows of the batch, for several ``n``; steps alternate
   so machine load hits both alike; the best of ``--reps`` CPU-time measurements is kept;
3. prints seconds per step and the ratio to the plain step.
"""

from __future__ import annotations

import argparse
import time

import torch

from featcircuit import load_model
from featcircuit.dictionary import DictConfig, Dictionary
from featcircuit.jacobian import training_penalty
from featcircuit.sites import mlp_parts
from featcircuit.training import TrainConfig, _loss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--rows", default="64,128,256,1024", help="penalty rows per batch to time")
    args = ap.parse_args()
    model = load_model("stdlib-neox", device="cpu")
    parts = mlp_parts(model, 2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 128, generator=g) * 4
    z = parts.hidden(x)
    dicts = {"resid": Dictionary(DictConfig(d_in=128, d_sae=1024, k=32), seed=0),
             "mlp": Dictionary(DictConfig(d_in=512, d_sae=1024, k=32), seed=1)}
    rows = {"resid": x / x.pow(2).sum(-1).mean().sqrt(), "mlp": z / z.pow(2).sum(-1).mean().sqrt()}
    ratio = float(x.pow(2).sum(-1).mean().sqrt() / z.pow(2).sum(-1).mean().sqrt())
    opts = {k: torch.optim.Adam(d.parameters(), lr=1e-4) for k, d in dicts.items()}
    cfg = TrainConfig()
    dead = torch.zeros(1024, dtype=torch.bool)

    def plain() -> None:
        for k, d in dicts.items():
            loss, *_ = _loss(d, rows[k], cfg, dead, 1.0)
            opts[k].zero_grad(set_to_none=True)
            loss.backward()
            d.remove_gradient_parallel_to_decoder_directions()
            opts[k].step()
            d.set_decoder_norm_to_unit_norm()

    def joint(n: int) -> None:
        held = {k: {} for k in dicts}
        losses = [_loss(d, rows[k], cfg, dead, 1.0, keep=held[k])[0] for k, d in dicts.items()]
        pen = training_penalty(parts, x[:n], dicts["resid"], dicts["mlp"], held["resid"], held["mlp"], ratio)
        total = losses[0] + losses[1] + 0.01 * pen
        for o in opts.values():
            o.zero_grad(set_to_none=True)
        total.backward()
        for k, d in dicts.items():
            d.remove_gradient_parallel_to_decoder_directions()
            opts[k].step()
            d.set_decoder_norm_to_unit_norm()

    ns = [int(v) for v in args.rows.split(",")]
    best = {"plain": float("inf"), **{n: float("inf") for n in ns}}
    plain()
    for _ in range(args.reps):
        for key, prev in list(best.items()):
            c0 = time.process_time()
            plain() if key == "plain" else joint(key)
            best[key] = min(prev, time.process_time() - c0)
    print(f"batch {args.batch}, {torch.get_num_threads()} threads; best of {args.reps} (CPU time)")
    print(f"{'step':<24} {'s/step':>8} {'× plain':>8}")
    for key, t in best.items():
        name = "plain pair" if key == "plain" else f"joint, penalty on {key} rows"
        print(f"{name:<24} {t:>8.3f} {t / best['plain']:>8.2f}")


if __name__ == "__main__":
    main()
