"""Jacobian-sparse pairs on the built-in model: a λ sweep against the plain pair, in one run.

    .venv/bin/python benchmarks/jacobian_sweep.py [--tokens 1000000] [--lambdas 0.001,0.003,0.01,0.03,0.1]
        [--resume] [--readme]      (about 15 minutes on 2 cores)

1. harvest layer ``--layer``'s resid and mlp activations once (``--tokens`` training rows);
2. train the plain pair (λ = 0) and one pair per λ on exactly those rows, same seed, same steps,
   timing each ``train_pair`` call alone (the harvest is shared, so the time ratio vs plain is the
   cost of the penalty);
3. evaluate every pair on the same held-out tokens: FVE per site, CE recovered (both spliced,
   vs zero and mean ablation), dead fractions, and the Jacobian statistics (|J| entries per token
   above 0.005–0.04 of the k² active pairs, top-10% mass share, normalised units);
4. save each pair under ``--pairs`` (``discover --dicts`` reads it) and write ``sweep.json``
   (rows appended as they finish), ``sweep.md`` (the table) and
   ``sweep.png`` (|J| > 0.01 entries per token against the mlp dictionary's CE recovered and FVE)
   into ``--out``; with ``--readme`` the table goes into README.md too.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from featcircuit import load_model, load_tokens
from featcircuit.activations import harvest
from featcircuit.evaluation import evaluate_pair
from featcircuit.replacement import Replacement
from featcircuit.sites import pair_sites
from featcircuit.training import TrainConfig, train_pair


def row_of(lam: float, seconds: float, cpu_seconds: float, steps: int, ev: dict) -> dict:
    """One table row from an evaluate_pair result."""
    s, d, j = ev["sites"], ev["downstream"], ev["jacobian"]
    return {
        "lambda": lam, "train_s": seconds, "train_cpu_s": cpu_seconds, "s_per_step": seconds / steps,
        "fve_resid": s["resid"]["variance_explained"], "fve_mlp": s["mlp"]["variance_explained"],
        "dead_resid": s["resid"]["dead_frac"], "dead_mlp": s["mlp"]["dead_frac"],
        "ce_rec_zero": d["both"]["recovered_vs_zero"], "ce_rec_mean": d["both"]["recovered_vs_mean"],
        "ce_rec_mlp_mean": d["mlp"]["recovered_vs_mean"], "kl_both": d["both"]["kl_spliced"],
        "above": j["above"], "top10_share": j["top10_share"], "l1_per_token": j["l1_per_token"],
        "pairs_per_token": j["pairs_per_token"],
    }


def table(rows: list[dict]) -> str:
    """Markdown table; ratios against the λ = 0 row."""
    base = next(r for r in rows if r["lambda"] == 0)
    header = ("| λ | FVE resid | FVE mlp | CE rec. mlp alone (mean) | CE rec. both (zero / mean) | "
              "dead resid / mlp | "
              "\\|J\\|>0.005 | >0.01 | >0.02 | >0.04 | fewer >0.01 | top-10% share | train s (wall / CPU) | "
              "× plain (wall / CPU) |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a = r["above"]
        lines.append(
            f"| {r['lambda']:g} | {r['fve_resid']:.3f} | {r['fve_mlp']:.3f} | {r['ce_rec_mlp_mean']:.3f} | "
            f"{r['ce_rec_zero']:.3f} / {r['ce_rec_mean']:.3f} | "
            f"{r['dead_resid']:.3f} / {r['dead_mlp']:.3f} | "
            f"{a['0.005']:.0f} | {a['0.01']:.0f} | {a['0.02']:.0f} | {a['0.04']:.0f} | "
            f"{base['above']['0.01'] / max(a['0.01'], 1e-9):.1f}× | {r['top10_share']:.2f} | "
            f"{r['train_s']:.0f} / {r['train_cpu_s']:.0f} | {r['train_s'] / base['train_s']:.2f} / "
            f"{r['train_cpu_s'] / base['train_cpu_s']:.2f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, meta: dict) -> None:
    """|J| > 0.01 entries per token (log x) against CE recovered, one point per λ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    xs = [r["above"]["0.01"] for r in rows]
    for axis, key, label in ((ax[0], "ce_rec_mlp_mean", "CE recovered vs mean ablation (mlp spliced)"),
                             (ax[1], "fve_mlp", "FVE of the mlp dictionary")):
        ys = [r[key] for r in rows]
        axis.plot(xs, ys, "o-", color="tab:blue")
        for r, x, y in zip(rows, xs, ys):
            axis.annotate("plain" if r["lambda"] == 0 else f"λ={r['lambda']:g}", (x, y),
                          textcoords="offset points", xytext=(4, 4), fontsize=8)
        axis.set_xscale("log")
        axis.set_xlabel(f"|J| > 0.01 entries per token (of {rows[0]['pairs_per_token']:.0f})")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    fig.suptitle(f"Jacobian-sparse pairs, {meta['model']} layer {meta['layer']}: "
                 f"{meta['train_tokens']:,} tokens × {meta['epochs']} epoch(s), k={meta['k']}, "
                 f"{meta['d_sae']} features/site", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lambdas", default="0.001,0.003,0.01,0.03,0.1")
    ap.add_argument("--jacobian-tokens", type=int, default=TrainConfig.jacobian_tokens)
    ap.add_argument("--warmup-steps", type=int, default=20)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="docs/jacobian")
    ap.add_argument("--pairs", default="featcircuit-out/jacobian-pairs",
                    help="folder the trained pairs are saved in (one per λ), for discover --dicts")
    ap.add_argument("--readme", action="store_true", help="also write the table into README.md's "
                    "block <!-- results:jacobian-sweep -->")
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows of an existing sweep.json with the same settings; train the rest")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model("stdlib-neox", device="cpu")
    cfg0 = TrainConfig(tokens=args.tokens, epochs=args.epochs, jacobian_tokens=args.jacobian_tokens,
                       warmup_steps=args.warmup_steps)
    n_seq = -(-cfg0.tokens // (cfg0.n_ctx - 1))
    data = load_tokens("builtin:stdlib", model, n_ctx=cfg0.n_ctx, n_tokens=n_seq * cfg0.n_ctx, split="train")
    held = load_tokens("builtin:stdlib", model, n_tokens=args.eval_tokens, split="heldout")
    t0 = time.perf_counter()
    acts = harvest(model, data[:n_seq], [s.hook for s in pair_sites(model, args.layer)], progress=False)
    harvest_s = time.perf_counter() - t0
    steps = (cfg0.tokens // cfg0.batch_size) * cfg0.epochs
    meta = {"model": "stdlib-neox", "layer": args.layer, "train_tokens": cfg0.tokens,
            "epochs": cfg0.epochs, "k": cfg0.k, "d_sae": int(cfg0.width * model.cfg.d_model),
            "batch_size": cfg0.batch_size, "steps": steps, "jacobian_tokens": cfg0.jacobian_tokens,
            "eval_tokens": int(held[:, 1:].numel()), "threads": args.threads, "harvest_s": harvest_s,
            "warmup_steps": cfg0.warmup_steps, "lambdas": args.lambdas,
            "units": "normalised: J·rms(resid)/rms(mlp), both sites at unit mean squared norm"}
    rows: list[dict] = []
    old = out / "sweep.json"
    if args.resume and old.exists():
        prev = json.loads(old.read_text())
        loose = ("harvest_s", "lambdas")  # neither changes a row
        same = {k: v for k, v in prev["meta"].items() if k not in loose} == \
            {k: v for k, v in meta.items() if k not in loose}
        rows = prev["rows"] if same else []
        if same:
            meta["resumed_from_harvest_s"] = prev["meta"]["harvest_s"]
        print(f"resume: {len(rows)} rows kept from {old}" if same else
              f"resume: {old} has other settings, starting over")
    lams = [0.0] + [float(v) for v in args.lambdas.split(",") if v.strip()]
    for lam in lams:
        if any(r["lambda"] == lam for r in rows):
            continue
        cfg = TrainConfig(**{**cfg0.__dict__, "jacobian": lam})
        t0, c0 = time.perf_counter(), time.process_time()
        pair = train_pair(model, args.layer, data, cfg, acts=acts, progress=False,
                          out=Path(args.pairs) / f"lambda-{lam:g}")
        dt, dc = time.perf_counter() - t0, time.process_time() - c0  # CPU time: less hit by load
        ev = evaluate_pair(Replacement(model, {args.layer: pair}), held, progress=False)
        rows.append(row_of(lam, dt, dc, steps, ev))
        r = rows[-1]
        print(f"λ={lam:g}: {dt:.0f}s ({dt / rows[0]['train_s']:.2f}× plain), FVE {r['fve_resid']:.3f}/"
              f"{r['fve_mlp']:.3f}, CE rec {r['ce_rec_zero']:.3f}/{r['ce_rec_mean']:.3f}, "
              f"|J|>0.01 {r['above']['0.01']:.1f}, top10 {r['top10_share']:.2f}", flush=True)
        rows.sort(key=lambda r: r["lambda"])
        (out / "sweep.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / "sweep.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))  # kept rows too
    (out / "sweep.md").write_text(table(rows) + "\n")
    plot(rows, out / "sweep.png", meta)
    print(table(rows))
    print(f"{meta['train_tokens']:,} tokens × {meta['epochs']} epoch(s) = {steps} steps of "
          f"{cfg0.batch_size}; penalty on {cfg0.jacobian_tokens} rows per batch; "
          f"eval on {meta['eval_tokens']:,} held-out tokens")
    print(f"wrote {out / 'sweep.json'}, {out / 'sweep.md'}, {out / 'sweep.png'}")
    if args.readme:
        write_readme_block("jacobian-sweep", table(rows) + "\n\n" + caption(meta, steps))


def caption(meta: dict, steps: int) -> str:
    """What the table was measured on, under it in the README."""
    return (f"{meta['train_tokens']:,} training tokens × {meta['epochs']} epoch = {steps} steps of "
            f"{meta['batch_size']} rows, the penalty on {meta['jacobian_tokens']} rows of each batch, "
            f"k = {meta['k']}, {meta['d_sae']} features per site; evaluated on {meta['eval_tokens']:,} "
            f"held-out tokens; |J| in {meta['units']}. Regenerated by `.venv/bin/python "
            f"benchmarks/jacobian_sweep.py --tokens {meta['train_tokens']} --lambdas "
            f"{meta.get('lambdas', '…')} --jacobian-tokens {meta['jacobian_tokens']} --readme`"
            + (" (`--resume`: the rows, train times included, are those of the run that trained the "
               "pairs, all in one process)" if "resumed_from_harvest_s" in meta else "") + ".")


def write_readme_block(name: str, body: str) -> None:
    """Replace README.md's ``<!-- results:NAME -->`` block (scripts/regenerate.py's convention)."""
    import sys

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "scripts"))
    from regenerate import replace_block

    readme = root / "README.md"
    readme.write_text(replace_block(readme.read_text(), name, body))
    print(f"updated {readme} (block {name})")


if __name__ == "__main__":
    main()
