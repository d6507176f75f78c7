"""Ablation search: speculatively batched vs naive ACDC (one forward per edge), same candidates.

    .venv/bin/python benchmarks/bench_search.py [--candidates 64] [--tau 2e-5]

Both searches run on the built-in model's layer-2 default pair and the same held-out tokens;
prints wall time and forward passes of each, and checks the kept sets and Δ values agree.
"""

from __future__ import annotations

import argparse
import time

import torch

from featcircuit import load_model, load_tokens
from featcircuit.attribution import attribute_edges, default_metric
from featcircuit.pairs import default_pair
from featcircuit.search import AblationContext, _with, search_edges, visit_order


def naive(ctx: AblationContext, cands, tau: float):
    H, out = {}, []
    (d_H,) = ctx.score([H])
    for i, j, _ in visit_order(cands):
        (d,) = ctx.score([_with(H, i, j)])
        keep = not (d - d_H) < tau
        out.append((i, j, d - d_H, keep))
        if not keep:
            H, d_H = _with(H, i, j), d
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--candidates", type=int, default=64)
    ap.add_argument("--tau", type=float, default=2e-5)
    ap.add_argument("--search-tokens", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=32, help="speculative chain length")
    ap.add_argument("--max-rows", type=int, default=512, help="sequences per forward pass")
    ap.add_argument("--no-predict", action="store_true", help="speculate 'removed' for every edge")
    args = ap.parse_args()
    model = load_model("stdlib-neox", device="cpu")
    pair, _ = default_pair(model, args.layer)
    toks = load_tokens("builtin:stdlib", model, n_tokens=16384, split="heldout")
    table = attribute_edges(model, pair, toks, layer=args.layer, metric=default_metric, progress=False)
    cands = table.top(args.candidates, by="behav_weight")
    stoks = toks[: args.search_tokens // toks.shape[1]]

    ctx = AblationContext(model, pair, args.layer, stoks)
    t = time.perf_counter()
    ref = naive(ctx, cands, args.tau)
    t_naive, p_naive = time.perf_counter() - t, ctx.passes
    ctx2 = AblationContext(model, pair, args.layer, stoks, max_rows=args.max_rows)
    t = time.perf_counter()
    res = search_edges(model, pair, stoks, cands, tau=args.tau, ctx=ctx2, batch=args.batch,
                       predict=not args.no_predict, progress=False)
    t_b = time.perf_counter() - t
    got = [(v["src"], v["dst"], v["delta"], v["kept"]) for v in res.visited]
    same_kept = [g[3] for g in got] == [r[3] for r in ref]
    max_dd = max(abs(g[2] - r[2]) for g, r in zip(got, ref))
    print(f"{len(cands)} candidates, tau {args.tau:g}, {stoks.numel():,} tokens, chain {args.batch}, "
          f"{args.max_rows} rows/pass, predict {not args.no_predict}, {torch.get_num_threads()} threads")
    print(f"naive ACDC : {p_naive:>4} forward passes, {t_naive:6.1f}s")
    print(f"batched    : {res.passes:>4} forward passes, {t_b:6.1f}s (incl. the ∅ end point)")
    print(f"passes ratio {p_naive / res.passes:.1f}x, wall-time ratio {t_naive / t_b:.1f}x; "
          f"kept {len(res.kept)}; identical decisions: {same_kept}; max |ΔΔ| {max_dd:.1e}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
