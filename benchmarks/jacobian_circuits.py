"""Circuit size at equal faithfulness: the plain pair against Jacobian-sparse pairs, on one task.

    .venv/bin/python benchmarks/jacobian_circuits.py [--task is-not-none] [--lambdas 0.03]

Reads the pairs ``benchmarks/jacobian_sweep.py`` saved (``--pairs``, one folder per λ, trained on
the same tokens with the same seed), runs ``featcircuit discover --layer 2 --task NAME`` on each
with a τ sweep (labels and edge evidence off: they do not touch the circuit), and reports, from
each pair's held-out frontier (edges kept, standard faithfulness F against ∅ = every
resid→mlp edge of the layer ablated), the fewest edges that reach F ≥ 0.7, 0.8 and 0.9.
Each pair is scored against its own m(∅): the scope is its own feature edges, so F says how much
of what *that pair's* edges carry the circuit keeps. Writes ``circuits.json`` and
``circuits.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TARGETS = (0.7, 0.8, 0.9)


def frontier(search: dict) -> list[tuple[int, float]]:
    """(edges, held-out F) of the main search and of every τ of the sweep, sorted by size."""
    pts = {(search["heldout"]["size"], search["heldout"]["faithfulness"])}
    for s in search.get("tau_sweep", []):
        pts.add((s["heldout"]["size"], s["heldout"]["faithfulness"]))
    return sorted(pts)


def fewest(points: list[tuple[int, float]], target: float) -> int | None:
    """The fewest edges among the frontier's circuits with F ≥ ``target`` (None: none reaches it)."""
    ok = [n for n, f in points if f >= target]
    return min(ok) if ok else None


def table(rows: list[dict], task: str, layer: int) -> list[str]:
    """Markdown lines; a pair whose scope barely moves the metric gets no "fewest edges" entries."""
    from featcircuit.circuit import SMALL_SCOPE

    lines = [f"Task `{task}`, layer {layer}, held-out prompts; F against ∅ = every resid→mlp edge of "
             "the pair ablated (each pair its own scope); FVE mlp on discover's 8,192 held-out corpus "
             "tokens (the sweep's table uses 4,064).", "",
             "| λ | FVE mlp | scope | m(M) | m(∅) | gap (of m(M)) | "
             f"edges at τ={rows[0]['default_tau']:g} (F) | "
             + " | ".join(f"fewest edges, F ≥ {t:g}" for t in TARGETS) + " | frontier (edges:F) |",
             "|---|---|---|---|---|---|---|" + "---|" * len(TARGETS) + "---|"]
    small = []
    for r in rows:
        gap = r["m_full"] - r["m_empty"]
        share = abs(gap) / max(abs(r["m_full"]), 1e-9)
        if share < SMALL_SCOPE:
            small.append(r["lambda"])
            few = " | ".join(["(gap too small)"] * len(TARGETS))
        else:
            few = " | ".join("–" if v is None else str(v) for v in r["fewest"].values())
        pts = ", ".join(f"{n}:{f:.2f}" for n, f in r["frontier"])
        lines.append(f"| {r['lambda']:g} | {r['fve_mlp']:.3f} | {r['scope']:,} | {r['m_full']:.3f} | "
                     f"{r['m_empty']:.3f} | {gap:+.3f} ({share:.0%}) | "
                     f"{r['size']} ({r['faithfulness']:.2f}) | "
                     f"{few} | {pts} |")
    if small:
        lines += ["", f"λ = {', '.join(f'{v:g}' for v in small)}: the pair's whole scope moves the metric by "
                  f"less than {SMALL_SCOPE:.0%} of m(M), so F is a ratio of small numbers and no size is "
                  "read off it."]
    return lines


def main() -> None:
    from featcircuit.discover import DiscoverConfig, discover

    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="is-not-none")
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--pairs", default="featcircuit-out/jacobian-pairs")
    ap.add_argument("--lambdas", default="0.01,0.03",
                    help="λs whose saved pairs are compared with the plain one (λ = 0)")
    ap.add_argument("--tau-sweep", default="0.005,0.01,0.03,0.1,0.2,0.3,0.5")
    ap.add_argument("--out", default="docs/jacobian")
    ap.add_argument("--reuse", action="store_true",
                    help="keep the rows of an existing circuits.json with the same task, layer and τ sweep")
    ap.add_argument("--readme", action="store_true", help="also write the table into README.md's "
                    "block <!-- results:jacobian-circuits -->")
    args = ap.parse_args()
    lams = [0.0] + [float(v) for v in args.lambdas.split(",") if v.strip()]
    folders = {lam: Path(args.pairs) / f"lambda-{lam:g}" for lam in lams}
    missing = [str(f) for f in folders.values() if not (f / "resid").is_dir()]
    if missing:
        raise SystemExit(f"no saved pair at {', '.join(missing)}: run benchmarks/jacobian_sweep.py "
                         f"with --pairs {args.pairs} and these λs first")
    rows = []
    old = Path(args.out) / "circuits.json"
    if args.reuse and old.exists():
        prev = json.loads(old.read_text())
        if (prev["task"], prev["layer"], prev["tau_sweep"]) == (args.task, args.layer, args.tau_sweep):
            rows = [r for r in prev["rows"] if r["lambda"] in folders and "fve_mlp" in r]
    for lam, folder in folders.items():
        if any(r["lambda"] == lam for r in rows):
            continue
        run_out = Path("featcircuit-out/jacobian-circuits") / f"{args.task}-lambda-{lam:g}"
        summary = discover(DiscoverConfig(layer=args.layer, task=args.task, dicts=str(folder),
                                          tau_sweep=args.tau_sweep, label_tokens=0, evidence=0,
                                          out=str(run_out), force=True, progress=False))
        search = json.loads((run_out / "search.json").read_text())
        pts = frontier(search)
        h = search["heldout"]
        rows.append({"lambda": lam, "pair": str(folder), "m_full": h["m_full"], "m_empty": h["m_empty"],
                     "scope": search["scope"]["size_heldout"], "default_tau": search["tau_setting"],
                     "size": h["size"], "faithfulness": h["faithfulness"], "frontier": pts,
                     "fewest": {f"{t:g}": fewest(pts, t) for t in TARGETS},
                     "fve_mlp": summary["quality"]["sites"]["mlp"]["variance_explained"],
                     "seconds": summary["seconds"]["total"]})
        rows.sort(key=lambda r: r["lambda"])
        print(f"λ={lam:g}: m(M) {h['m_full']:.3f} m(∅) {h['m_empty']:.3f}; frontier "
              + ", ".join(f"{n}:{f:.2f}" for n, f in pts), flush=True)
    lines = table(rows, args.task, args.layer)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "circuits.json").write_text(json.dumps({"task": args.task, "layer": args.layer,
                                                   "tau_sweep": args.tau_sweep, "rows": rows}, indent=1))
    (out / "circuits.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out / 'circuits.json'}, {out / 'circuits.md'}")
    if args.readme:
        from jacobian_sweep import write_readme_block

        write_readme_block("jacobian-circuits", "\n".join(lines) + (
            f"\n\nRegenerated by `.venv/bin/python benchmarks/jacobian_circuits.py --task {args.task} "
            f"--lambdas {args.lambdas} --tau-sweep {args.tau_sweep} --readme`."))


if __name__ == "__main__":
    main()
