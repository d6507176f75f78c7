"""A foreign dictionary's encoder gradients: one batched backward against one backward per slot.

    .venv/bin/python benchmarks/bench_foreign.py [--rows 1024] [--features 512] [--repeats 2]

A dictionary that is any module with ``encode``/``decode`` has no encoder weights to read, so
attribution asks it for ``∂f_j/∂z`` of every active feature j of every row
(:meth:`featcircuit.adapters.ModuleDictionary.enc_cols`): one forward, then one backward per
feature slot. Here the module is a plain ReLU autoencoder (``relu(W z + b)``, as in
``examples/custom_attribution.py``) on the built-in model's mid-MLP width with random weights and
inputs; its codes' active count per row sets the slots. Times both ways on the same rows, best of
``--repeats`` after a warm-up, alternating; prints the seconds, the speed-up and the largest
difference between the two results (they must agree).
"""

from __future__ import annotations

import argparse

import torch
from _timing import best_time

from featcircuit.adapters import ModuleDictionary


class ReluAE(torch.nn.Module):
    def __init__(self, d: int, m: int, bias: float):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.enc = torch.nn.Linear(d, m)
        self.dec = torch.nn.Linear(m, d)
        with torch.no_grad():
            self.enc.weight.copy_(torch.randn(m, d, generator=g) / d**0.5)
            self.enc.bias.fill_(bias)
        self.requires_grad_(False)

    def encode(self, x):
        return torch.relu(self.enc(x))

    def decode(self, f):
        return self.dec(f)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--d", type=int, default=2048, help="input width (the built-in model's d_mlp)")
    ap.add_argument("--features", type=int, default=512)
    ap.add_argument("--bias", type=float, default=0.2, help="encoder bias: sets how many features fire")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    ae = ReluAE(args.d, args.features, args.bias)
    md = ModuleDictionary(ae, args.d)
    z = torch.randn(args.rows, args.d)
    with torch.no_grad():
        f = ae.encode(z)
    k = int((f != 0).sum(-1).max())
    idx = f.abs().topk(k, dim=-1).indices  # each row's active features (padded with inactive ones)
    print(f"{args.rows} rows, d {args.d}, {args.features} features, {k} slots (active per row: mean "
          f"{float((f != 0).sum(-1).float().mean()):.0f}), {torch.get_num_threads()} threads")

    def run(batched: bool):
        def fn():
            md.batched = None if batched else False
            return md.enc_cols(z, idx)
        return fn

    one, many = run(False)(), run(True)()
    assert md.batched, "vmap did not batch this module's backward"
    diff = float((one - many).abs().max())
    t = {False: float("inf"), True: float("inf")}
    for _ in range(args.repeats):  # alternating, so machine load hits both alike
        for b in t:
            t[b] = min(t[b], best_time(run(b), 1, warmup=False))
    print(f"one backward per slot {t[False]:.3f} s; batched (vmap) {t[True]:.3f} s; speed-up "
          f"{t[False] / t[True]:.2f}x; max |difference| {diff:.2e}")


if __name__ == "__main__":
    main()
