"""Closed-form edges vs the naive autograd loop (one backward per active target per token).

    .venv/bin/python benchmarks/bench_attribution.py [--tokens 256]

Both run on the same tokens and pair (the built-in model's default layer-2 pair when cached,
else a random TopK pair of the same shape); prints tokens/s of each and the ratio.
"""

from __future__ import annotations

import argparse
import time

import torch

from featcircuit import harvest, load_model, load_tokens, mlp_parts, pair_sites
from featcircuit.attribution import attribute_edges, batch_edges
from featcircuit.replacement import Replacement


def naive_edges(parts, R, M, x: torch.Tensor) -> float:
    """One backward per active MLP feature per token (plain autograd); returns Σ|e| to check."""
    total = 0.0
    for t in range(len(x)):
        xt = x[t:t + 1].clone().requires_grad_(True)
        f = M.encode(parts.hidden(xt))[0]
        a = R.encode(x[t:t + 1])[0].detach()
        act = torch.nonzero(a).flatten()
        for j in torch.nonzero(f).flatten().tolist():
            (g,) = torch.autograd.grad(f[j], xt, retain_graph=True)
            total += float((a[act] * (R.W_dec[act] @ g[0])).abs().sum())
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=256, help="tokens for the naive loop (the slow side)")
    ap.add_argument("--closed-tokens", type=int, default=16384, help="tokens for the closed form")
    args = ap.parse_args()
    model = load_model("stdlib-neox", device="cpu")
    from featcircuit.pairs import default_pair
    pair, path = default_pair(model, args.layer)
    parts = mlp_parts(model, args.layer)
    hook = pair_sites(model, args.layer)[0].hook
    toks = load_tokens("builtin:stdlib", model, n_tokens=args.closed_tokens, split="heldout")
    x = harvest(model, toks[:3], [hook], progress=False)[hook][:, 1:].flatten(0, 1)[: args.tokens]

    t = time.perf_counter()
    ref = naive_edges(parts, pair.resid, pair.mlp, x)
    t_naive = time.perf_counter() - t
    t = time.perf_counter()
    with torch.no_grad():
        a_vals, a_idx, f_vals, f_idx, e, _ = batch_edges(parts, pair.resid, pair.mlp, x)
    mask = (f_vals != 0)[:, :, None] & (a_vals != 0)[:, None, :]
    got = float(e[:, :, :-1][mask].abs().sum())
    t_closed_same = time.perf_counter() - t
    t = time.perf_counter()
    table = attribute_edges(Replacement(model, {args.layer: pair}), toks, progress=False)
    t_full = time.perf_counter() - t
    print(f"pair {path}: resid {tuple(pair.resid.W_dec.shape)}, mlp {tuple(pair.mlp.W_dec.shape)}, "
          f"k={pair.mlp.cfg.k}")
    print(f"same {len(x)} tokens: naive autograd {t_naive:.2f}s ({len(x) / t_naive:,.0f} tok/s), "
          f"closed form {t_closed_same * 1e3:.1f} ms ({len(x) / t_closed_same:,.0f} tok/s)")
    print(f"Σ|e| agree: naive {ref:.6g} vs closed {got:.6g} (rel diff {abs(ref - got) / ref:.1e})")
    print(f"speed-up closed form vs naive: {t_naive / t_closed_same:,.0f}x")
    print(f"attribute_edges end to end (harvest + edges + scatter-add): {table.n_tokens:,} tokens in "
          f"{t_full:.2f}s = {table.n_tokens / t_full:,.0f} tok/s, {len(table):,} co-active pairs")


if __name__ == "__main__":
    main()
