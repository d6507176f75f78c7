"""Regenerate every circuit figure the README quotes, and write them into the README.

    .venv/bin/python scripts/regenerate.py [--layer 2] [--tasks all] [--skip-readme]

1. the built-in tasks and the model's accuracy on each (``featcircuit tasks``);
2. ``featcircuit discover --layer L --task NAME`` for every task the model performs, and the
   corpus run ``featcircuit discover --layer L``, each into ``featcircuit-out/readme/…``;
3. their summaries in ``docs/results/results.json``, the faithfulness plots and the rendered
   circuit of the first task in ``docs/results/``;
4. the README's generated blocks (between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->``)
   rewritten from those numbers, so the README never holds a hand-copied figure.

Same seed, same machine → the same kept sets and the same ``graph.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "featcircuit-out" / "readme"
DOCS = ROOT / "docs" / "results"
SWEEP = "0.005,0.05,0.1"
CROSS_TAU, CROSS_CANDIDATES, CROSS_SWEEP = "0.001", "256", "0.0005,0.002,0.005"


def run(args: list[str], threads: int | None = None) -> str:
    cmd = [sys.executable, "-m", "featcircuit", *args]
    print("$ featcircuit " + " ".join(args), flush=True)
    pin = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {}
    env = dict(os.environ, **pin)
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"regenerate: `featcircuit {' '.join(args)}` failed:\n{r.stderr[-3000:]}")
    return r.stdout


def f3(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def f2(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def task_table(tasks: list[dict]) -> str:
    rows = ["| task | what | pairs (held-out) | tokens | accuracy | logit diff clean | corrupt | used |",
            "|---|---|---|---|---|---|---|---|"]
    for t in tasks:
        rows.append(f"| `{t['task']}` | {t['what']} | {t['pairs']} ({t['heldout_pairs']}) | {t['n_ctx']} | "
                    f"{t['accuracy']:.3f} | {t['logit_diff_clean']:+.2f} | {t['logit_diff_corrupt']:+.2f} | "
                    f"{'yes' if t['performs'] else 'no'} |")
    return "\n".join(rows)


def circuit_table(runs: dict[str, dict]) -> str:
    rows = ["| behaviour | ablation | \\|S\\| | m(M) | m(∅) | edges | F | completeness | CPR | CMD "
            "| F, errors ablated | rank (Spearman) | verdict |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in runs.items():
        c = s["circuit"]
        st = c["statistics"]
        sp = st.get(f"spearman_{c['ranking']}")
        rows.append(f"| {name} | {c['ablation']} | {c['scope']['size_heldout']:,} | {c['m_full']:.3g} | "
                    f"{c['m_empty']:.3g} | {c['size']} | {f3(c['faithfulness'])} | {f3(c['completeness'])} | "
                    f"{f2(c['cpr'])} | {f2(c['cmd'])} | {f3(c['errors_other_variant']['faithfulness'])} | "
                    f"{c['ranking']} ({f2(sp)}) | {c['verdict']} |")
    return "\n".join(rows)


def baseline_table(runs: dict[str, dict]) -> str:
    orders = list(next(iter(runs.values()))["circuit"]["baselines_at_size"])
    rows = ["| behaviour | edges | " + " | ".join(f"F: {o}" for o in orders) + " | search beats all? |",
            "|---|---|" + "---|" * len(orders) + "---|"]
    for name, s in runs.items():
        c = s["circuit"]
        b = c["baselines_at_size"]
        fs = b["search"]["faithfulness"]
        beats = fs is not None and all((b[o]["faithfulness"] or -1e9) < fs for o in orders if o != "search")
        # an empty circuit has no size to compare at (the curves' first point is one edge)
        verdict = "n/a (no edge kept)" if c["size"] == 0 else "yes" if beats else "**no**"
        rows.append(f"| {name} | {c['size']} | " + " | ".join(f3(b[o]["faithfulness"]) for o in orders)
                    + f" | {verdict} |")
    rows.append("")
    rows.append("| behaviour | " + " | ".join(f"CPR / CMD: {o}" for o in orders) + " |")
    rows.append("|---|" + "---|" * len(orders))
    for name, s in runs.items():
        a = s["circuit"]["areas"]
        cells = [f"{f2(a[o]['cpr'])} / {f2(a[o]['cmd'])}" for o in orders]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def label_table(runs: dict[str, dict]) -> str:
    """Per run: held-out F1 of the scored rule labels of the drawn feature nodes, and dense nodes."""
    import statistics

    rows = ["| behaviour | feature nodes drawn | label F1 median (quartiles) | F1 ≥ 0.6 | \"every token\" F1 "
            "(median) | dense nodes (> 10% of tokens) |", "|---|---|---|---|---|---|"]
    pooled: dict[str, float] = {}
    for name, s in runs.items():
        lab = s.get("labels")
        if not lab or not lab["circuit_nodes"].get("n"):
            rows.append(f"| {name} | {len((lab or {}).get('nodes', {}))} | n/a | n/a | n/a | n/a |")
            continue
        d = lab["circuit_nodes"]
        rows.append(f"| {name} | {d['n'] + d['n_unscored']} | {f2(d['median'])} "
                    f"({f2(d['q1'])}–{f2(d['q3'])}) | {d['frac_ge_0.6']:.0%} | {f2(d['median_base_f1'])} | "
                    f"{len(lab['dense_nodes'])} |")
        if name.startswith("task"):
            pooled.update({n: v["f1"] for n, v in lab["nodes"].items() if v["f1"] is not None})
    if pooled:
        v = sorted(pooled.values())
        q = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else [v[0]] * 3  # numpy's
        rows.append(f"| all task circuits (unique nodes) | {len(v)} | {f2(statistics.median(v))} "
                    f"({f2(q[0])}–{f2(q[2])}) | {sum(x >= 0.6 for x in v) / len(v):.0%} | | |")
    return "\n".join(rows)


def cross_table(runs: dict[str, dict], layers: str) -> str:
    """Per task: the cross-layer circuit's size, held-out F and completeness, against the cheap orders."""
    rows = [f"| task (layers {layers}) | scope \\|S\\| | edges | edge types | m(M) | m(∅) | F | "
            "completeness | best cheap order at equal size (F) | random (F) | errors ablated: m(∅), F | "
            "fewest edges with F ≥ 0.7 (τ sweep) | stages (s) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    small = []
    for n, s in runs.items():
        c = s["circuit"]
        base = {k: v for k, v in c["baselines_at_size"].items() if k not in ("search", "random")}
        bn = max(base, key=lambda k: base[k]["faithfulness"] if base[k]["faithfulness"] is not None else -1e9)
        types = ", ".join(f"{k} {v}" for k, v in c["edge_types"].items()) or "—"
        st = ", ".join(f"{k} {v:g}" for k, v in s["seconds"].items())
        ea = c["errors_other_variant"]
        pts = [(c["size"], c["faithfulness"])] + [(f["size"], f["faithfulness"]) for f in c["tau_sweep"]]
        ok = sorted((sz, f) for sz, f in pts if f is not None and f >= 0.7)
        fewest = f"{ok[0][0]} (F {ok[0][1]:.3f})" if ok else "none"
        if ok and ok[0][0] <= 100:
            small.append(f"`{n}` ({ok[0][0]} edges, F {ok[0][1]:.3f})")
        rows.append(f"| `{n}` | {c['scope']['size_heldout']:,} | {c['size']} | {types} | {c['m_full']:.3g} | "
                    f"{c['m_empty']:.3g} | {f3(c['faithfulness'])} | {f3(c['completeness'])} | {bn} "
                    f"{f3(base[bn]['faithfulness'])} | "
                    f"{f3(c['baselines_at_size']['random']['faithfulness'])} | "
                    f"{ea['m_empty']:.3g}, {f3(ea['faithfulness'])} | {fewest} | {st} |")
    rows.append("\nCircuits of at most 100 edges with held-out F ≥ 0.7 (the run's circuit or a τ-sweep "
                f"point): {', '.join(small) if small else 'none'}.")
    return "\n".join(rows)


def errors_line(s: dict, args) -> str:
    """The cross-layer run with every site's error node in the scope, against its errors-kept F."""
    c = s["circuit"]
    types = ", ".join(f"{k} {v}" for k, v in c["edge_types"].items()) or "none"
    o = c["errors_other_variant"]
    return (f"With the error nodes in the scope, `discover --layers {args.layers} --task {args.timing_task} "
            f"--errors ablated --tau {CROSS_TAU} --candidates {CROSS_CANDIDATES}` (|S| = "
            f"{c['scope']['size_heldout']:,} on held-out prompts): {c['size']} edges ({types}); m(M) "
            f"{c['m_full']:.3g}, m(∅) {c['m_empty']:.3g}, F {f3(c['faithfulness'])}, completeness "
            f"{f3(c['completeness'])}; the same circuit's feature edges with errors kept: m(∅) "
            f"{o['m_empty']:.3g}, F {f3(o['faithfulness'])}.\n\n")


def timing_line(s: dict, one: dict, args) -> str:
    """The timed runs (alone on the machine, both cores): over more layers, and on one layer."""
    c = s["circuit"]
    st = ", ".join(f"{k} {v:g} s" for k, v in s["seconds"].items())
    ps = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in s["passes"].items())
    wall = f"; wall {s['wall_seconds']:g} s with the process's start" if s.get("wall_seconds") else ""
    def one_run(n: str, o: dict) -> str:
        what = f"`--task {n}`" if n != "corpus" else "corpus (no `--task`)"
        w = f" (wall {o['wall_seconds']:g} s)" if o.get("wall_seconds") else ""
        return f"{what} {o['seconds']['total']:g} s{w}"

    ones = "; ".join(one_run(n, o) for n, o in one.items())
    return (f"Timed alone on this machine (both cores, dictionaries cached): "
            f"`discover --layers {args.timing_layers} --task {args.timing_task} --tau {CROSS_TAU} "
            f"--candidates {CROSS_CANDIDATES}` ({len(s['layers'])} layers, |S| = "
            f"{c['scope']['size_heldout']:,} on held-out prompts): {c['size']} edges, "
            f"F {f3(c['faithfulness'])}, "
            f"completeness {f3(c['completeness'])}; stages {st}{wall}; passes over the prompts: {ps}. "
            f"One layer, `discover --layer {args.layer}` (default options, total seconds of each run, then "
            f"wall time with the process's start): {ones}.")


def replace_block(text: str, name: str, body: str) -> str:
    tag = re.escape(name)
    pat = re.compile(rf"(<!-- results:{tag} -->\n)(?:.*?\n)?(<!-- /results:{tag} -->)", re.S)
    if not pat.search(text):
        raise SystemExit(f"regenerate: README has no block <!-- results:{name} -->")
    return pat.sub(lambda m: m.group(1) + body.rstrip("\n") + "\n" + m.group(2), text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--tasks", default="all", help="comma-separated task names, or all")
    ap.add_argument("--layers", default="2-3", help="the cross-layer runs' --layers")
    ap.add_argument("--timing-layers", default="0-3", help="--layers of the one timed run over more layers")
    ap.add_argument("--timing-task", default="is-not-none", help="its task")
    ap.add_argument("--cross-tasks", default="all",
                    help="tasks of the cross-layer runs (comma-separated, or all)")
    ap.add_argument("--skip-readme", action="store_true")
    ap.add_argument("--reuse", action="store_true", help="reuse finished runs in featcircuit-out/readme")
    ap.add_argument("--jobs", type=int, default=2, help="discover runs at once (each single-threaded if > 1)")
    args = ap.parse_args()
    t0 = time.time()
    DOCS.mkdir(parents=True, exist_ok=True)
    tasks = json.loads(run(["tasks", "--json"]))["tasks"]
    names = [t["task"] for t in tasks if t["performs"]]
    if args.tasks != "all":
        names = [n for n in names if n in args.tasks.split(",")]
    runs: dict[str, dict] = {}
    L = str(args.layer)
    jobs = {f"task-{n}": ["discover", "--layer", L, "--task", n, "--tau-sweep", SWEEP,
                          "--out", str(OUT / f"task-{n}"), "--force"] for n in names}
    jobs["corpus"] = ["discover", "--layer", L, "--out", str(OUT / "corpus"), "--force"]
    cross = [n for n in names if args.cross_tasks == "all" or n in args.cross_tasks.split(",")]
    for n in cross:
        jobs[f"cross-{n}"] = ["discover", "--layers", args.layers, "--task", n, "--tau", CROSS_TAU,
                              "--candidates", CROSS_CANDIDATES, "--tau-sweep", CROSS_SWEEP,
                              "--out", str(OUT / f"cross-{n}"), "--force"]
    if args.timing_task in cross:  # the same task with the error nodes in the scope (and candidates)
        jobs["cross-errors"] = ["discover", "--layers", args.layers, "--task", args.timing_task,
                                "--errors", "ablated", "--tau", CROSS_TAU, "--candidates", CROSS_CANDIDATES,
                                "--out", str(OUT / "cross-errors"), "--force"]
    # the timed runs go alone, after the others, on every core: their seconds are a quiet machine's
    timed = {"cross-timing": ["discover", "--layers", args.timing_layers, "--task", args.timing_task,
                              "--tau", CROSS_TAU, "--candidates", CROSS_CANDIDATES,
                              "--out", str(OUT / "cross-timing"), "--force"],
             **{f"one-timing-{n}": ["discover", "--layer", L, "--task", n,
                                    "--out", str(OUT / f"one-timing-{n}"), "--force"] for n in names},
             "one-timing-corpus": ["discover", "--layer", L,
                                   "--out", str(OUT / "one-timing-corpus"), "--force"]}

    reused: set[str] = set()

    def one(item: tuple[str, list[str]], alone: bool = False) -> str:
        name, a = item
        saved = OUT / name / "stdout.txt"
        if args.reuse and (OUT / name / "summary.json").is_file() and saved.is_file():
            reused.add(name)
            return saved.read_text()
        text = run(a, threads=1 if args.jobs > 1 and not alone else None)
        saved.write_text(text)
        return text

    with ThreadPoolExecutor(args.jobs) as pool:  # each run single-threaded when several share the cores
        printed = dict(zip(jobs, pool.map(one, jobs.items())))
    walls: dict[str, float] = {}
    for item in timed.items():
        t1 = time.time()
        printed[item[0]] = one(item, alone=True)
        wall_file = OUT / item[0] / "wall_seconds.txt"
        if item[0] not in reused:  # the process, start and imports included; kept for a later --reuse
            walls[item[0]] = round(time.time() - t1, 1)
            wall_file.write_text(f"{walls[item[0]]}\n")
        elif wall_file.is_file():  # a reused run keeps the wall time measured when it ran
            walls[item[0]] = float(wall_file.read_text())
    printed = {k.removeprefix("task-"): v for k, v in printed.items()}
    cross_runs = {n: json.loads((OUT / f"cross-{n}" / "summary.json").read_text()) for n in cross}
    timing = json.loads((OUT / "cross-timing" / "summary.json").read_text())
    timing["wall_seconds"] = walls.get("cross-timing")
    one_timing = {}
    for k in timed:
        if k.startswith("one-timing-"):
            one_timing[k.removeprefix("one-timing-")] = json.loads((OUT / k / "summary.json").read_text())
            one_timing[k.removeprefix("one-timing-")]["wall_seconds"] = walls.get(k)
    for n in names:
        out = OUT / f"task-{n}"
        runs[f"task `{n}`"] = json.loads((out / "summary.json").read_text())
        shutil.copyfile(out / "faithfulness.png", DOCS / f"faithfulness-{n}.png")
    out = OUT / "corpus"
    runs["corpus (KL)"] = json.loads((out / "summary.json").read_text())
    shutil.copyfile(out / "faithfulness.png", DOCS / "faithfulness-corpus.png")
    def rel_gap(n: str) -> float:  # the task whose behaviour the layer's scope moves most is shown
        c = runs[f"task `{n}`"]["circuit"]
        return abs(c["m_full"] - c["m_empty"]) / max(abs(c["m_full"]), 1e-9)

    names = sorted(names, key=lambda n: -rel_gap(n))
    if names:
        first = OUT / f"task-{names[0]}"
        shutil.copyfile(first / "faithfulness.png", DOCS / "faithfulness.png")
        for ext in ("svg", "png"):
            run(["render", str(first / "graph.json"), "-o", str(DOCS / f"circuit.{ext}"),
                 "--top-edges", "15"])
    bench = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_search.py"),
                            "--task", names[0] if names else "bracket"],
                           cwd=ROOT, capture_output=True, text=True)
    if bench.returncode != 0:
        sys.exit(f"regenerate: bench_search failed:\n{bench.stderr[-2000:]}")
    if cross:
        best = max(cross, key=lambda n: cross_runs[n]["circuit"]["faithfulness"] or -1e9)
        first = OUT / f"cross-{best}"
        shutil.copyfile(first / "faithfulness.png", DOCS / "faithfulness-cross.png")
        for ext in ("svg", "png"):
            run(["render", str(first / "graph.json"), "-o", str(DOCS / f"circuit-cross.{ext}")])
        shutil.copyfile(first / "attribution_graph.json", DOCS / "attribution_graph-cross.json")
    errors_run = (json.loads((OUT / "cross-errors" / "summary.json").read_text())
                  if "cross-errors" in jobs else None)
    res = {"layer": args.layer, "tasks": tasks, "runs": runs, "cross_layer": cross_runs,
           "cross_errors_ablated": errors_run,
           "cross_timing": timing, "one_layer_timing": one_timing,
           "seconds": round(time.time() - t0, 1),
           "discover_seconds": {k: v["seconds"]["total"] for k, v in runs.items()}}
    (DOCS / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {DOCS / 'results.json'} and the plots in {DOCS}")
    if args.skip_readme:
        return
    readme = ROOT / "README.md"
    text = readme.read_text()
    if names:
        out_txt = printed[names[0]].replace(str(Path.home()), "~").replace(str(ROOT) + "/", "")
        text = replace_block(text, "discover-output",
                             f"`featcircuit discover --layer {L} --task {names[0]}`:\n\n"
                             f"```\n{out_txt.strip()}\n```")
    text = replace_block(text, "bench-search", f"```\n$ .venv/bin/python benchmarks/bench_search.py\n"
                         f"{bench.stdout.strip()}\n```")
    text = replace_block(text, "tasks", task_table(tasks))
    text = replace_block(text, "circuits", circuit_table(runs))
    text = replace_block(text, "baselines", baseline_table(runs))
    text = replace_block(text, "labels", label_table(runs))
    times = ", ".join(f"{k}: {v:.0f} s" for k, v in res["discover_seconds"].items())
    text = replace_block(text, "timing",
                         f"`discover` on this machine, each run's total seconds from its summary.json "
                         f"(`seconds.total`: the process's start and imports not included; pair cached; "
                         f"{args.jobs} runs at once, each on "
                         f"{'one thread' if args.jobs > 1 else 'both cores'}): {times}.")
    sweep_rows = ["| behaviour | τ (relative) | edges | F | completeness |", "|---|---|---|---|---|"]
    for name, s in runs.items():
        for f in s["circuit"]["tau_sweep"]:
            sweep_rows.append(f"| {name} | {f['tau']:g} | {f['size']} | {f3(f['faithfulness'])} | "
                              f"{f3(f['completeness'])} |")
    text = replace_block(text, "sweep", "\n".join(sweep_rows))
    if cross:
        text = replace_block(text, "crosslayer", cross_table(cross_runs, args.layers) +
                             f"\n\n`featcircuit discover --layers {args.layers} --task {best} "
                             f"--tau {CROSS_TAU} --candidates {CROSS_CANDIDATES} --tau-sweep {CROSS_SWEEP}`:"
                             "\n\n```\n"
                             + printed[f"cross-{best}"].replace(str(Path.home()), "~").replace(
                                 str(ROOT) + "/", "").strip() + "\n```\n\n"
                             + (errors_line(errors_run, args) if errors_run else "")
                             + timing_line(timing, one_timing, args))
    readme.write_text(text)
    print(f"updated {readme} (blocks: tasks, circuits, baselines, labels, sweep, timing, crosslayer) in "
          f"{time.time() - t0:.0f}s")
    if names:  # the report's pictures, of the same run the README prints
        shots = subprocess.run([sys.executable, str(ROOT / "scripts" / "screenshots.py"),
                                str(OUT / f"task-{names[0]}")], cwd=ROOT, capture_output=True, text=True)
        print(shots.stdout.strip() if shots.returncode == 0 else
              f"regenerate: no screenshots ({shots.stderr.strip().splitlines()[-1:]})")


if __name__ == "__main__":
    main()
