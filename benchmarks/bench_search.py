"""Ablation search: chained batches vs one forward per edge, and the batch the search picks.

    .venv/bin/python benchmarks/bench_search.py [--task bracket] [--candidates 128] [--tau 0.01]

On the built-in model's layer-2 default pair and a built-in task's search pairs, the same
candidates are pruned three ways, each on a fresh context (no shared caches):

1. one configuration per forward pass (plain ACDC);
2. chains of B configurations per pass (speculative, restarted after a misprediction);
3. ``batch=None``: the search measures a 1- and a B-configuration pass and the decisions the
   chain settles, picks one of the two, and leaves chains when they stop paying.

Prints wall time and passes of each, the ratio to (1), and checks all three keep the same edges.
"""

from __future__ import annotations

import argparse
import time

import torch

from featcircuit import load_model
from featcircuit.ablation import AblationContext
from featcircuit.pairs import default_pair
from featcircuit.replacement import Replacement
from featcircuit.search import rank_edges, relative_tau, search_circuit
from featcircuit.tasks import builtin_task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="bracket")
    ap.add_argument("--candidates", type=int, default=128)
    ap.add_argument("--tau", type=float, default=0.02, help="relative to |m(M) − m(∅)|")
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = load_model("stdlib-neox", device="cpu")
    pair, _ = default_pair(model, 2, progress=False)
    task, _ = builtin_task(args.task, model).halves()

    def fresh() -> AblationContext:
        return AblationContext(Replacement(model, {2: pair}), task.clean, "patch", task=task)

    ctx0 = fresh()
    rk = rank_edges(ctx0)
    cands, stat = rk.order("abs")[: args.candidates], rk.stat("abs")
    tau = relative_tau(ctx0, args.tau)
    rows = []
    for name, batch in (("one per pass", 1), (f"chains of {args.batch}", args.batch), ("auto", None)):
        ctx = fresh()
        t = time.perf_counter()
        res = search_circuit(ctx, cands, tau=tau, stat=stat, batch=batch, progress=False)
        rows.append((name, time.perf_counter() - t, res))
    base_t = rows[0][1]
    print(f"task {args.task}: {len(task)} search pairs × {task.clean.shape[1]} tokens, "
          f"{len(cands)} candidates, τ = {tau:.3g} ({args.tau} × |m(M) − m(∅)|), "
          f"{torch.get_num_threads()} threads")
    print(f"{'search':<16} {'seconds':>8} {'passes':>7} {'kept':>5} {'× time of one-per-pass':>24}")
    for name, t, res in rows:
        print(f"{name:<16} {t:>8.2f} {res.passes:>7} {len(res.kept):>5} {t / base_t:>24.2f}"
              + (f"   ({_picked(res)})" if name == "auto" else ""))
    kept = [set(r.kept) for _, _, r in rows]
    print("identical kept sets:", all(k == kept[0] for k in kept))


def _picked(res) -> str:
    """What the automatic search chose, and where it went over to one edge per pass."""
    t = res.meta.get("batch_timing", {})
    if "one_per_pass_from_visit" in t:
        return f"picked batch {res.batch}, one per pass from visit {t['one_per_pass_from_visit']}"
    return f"picked batch {res.batch}"


if __name__ == "__main__":
    main()
