"""How far to trust the labels: held-out F1 of the scored rule labels of a layer's pair (DESIGN §8).

1. Load the built-in model and its cached default pair for ``--layer`` (never trained here).
2. Fit a rule label for every feature of both dictionaries on ``--train-tokens`` of the training
   split and score it on ``--heldout-tokens`` of the held-out split (:func:`featcircuit.labels.label_pair`).
3. "Circuit nodes": the ends of the layer's ``--top`` edges by |Σ_t e_ij(t)| over the held-out
   tokens (:func:`featcircuit.attribution.attribute_edges`), once with every feature and once with
   dense features kept out (:func:`featcircuit.stats.candidate_edges`).
4. Print the F1 distribution over each dictionary and over those nodes; write ``docs/labels/``:
   ``labels_L{layer}.json`` (every label), ``summary_L{layer}.json`` (distributions, dense
   features, circuit nodes) and ``edge_evidence_L{layer}.json`` (evidence of the top edges).
5. With ``--report DIR``, a report of the top edges (scored labels, dense flags, edge evidence);
   with ``--screenshot PNG`` also a screenshot of one node's card (headless Chromium).

Run: ``.venv/bin/python examples/labels_report.py`` (about 5 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from featcircuit import (
    Replacement,
    TrainConfig,
    attribute_edges,
    default_pair,
    load_model,
    load_pair,
    load_tokens,
)
from featcircuit.data import BUILTIN_DATA
from featcircuit.evidence import edge_evidence, save_evidence
from featcircuit.features import collect_stats, labels_for
from featcircuit.graph import CircuitGraph, format_table, parse_node_id, table_rows
from featcircuit.io import atomic_write_text
from featcircuit.labels import f1_distribution, label_pair, label_text, node_f1_distribution
from featcircuit.pairs import pair_dir
from featcircuit.stats import DENSE_FREQ, candidate_edges, dense_features


def _lab(labels: dict, nid: str) -> dict:
    site, _, f = parse_node_id(nid)
    return labels[site][f]


def _dist_line(name: str, d: dict) -> str:
    if not d.get("n"):
        return f"{name:<34} n=0"
    return (f"{name:<34} n={d['n']:<5} median {d['median']:.3f}  quartiles {d['q1']:.3f}–{d['q3']:.3f}  "
            f"mean {d['mean']:.3f}  F1≥0.6: {d['frac_ge_0.6']:.0%}  "
            f"(\"every token\" median {d['median_base_f1']:.3f}; unscored {d['n_unscored']})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layer", type=int, default=2)
    p.add_argument("--train-tokens", type=int, default=32768)
    p.add_argument("--heldout-tokens", type=int, default=16384)
    p.add_argument("--top", type=int, default=30, help="top edges whose ends are the circuit nodes")
    p.add_argument("--threshold-frac", type=float, default=0.0,
                   help="a feature fires above this fraction of its max (0: any nonzero code)")
    p.add_argument("--max-clauses", type=int, default=3,
                   help="clauses a rule may join with 'or' (1: one atom or one conjunction)")
    p.add_argument("--out", default="docs/labels")
    p.add_argument("--model", default="stdlib-neox")
    p.add_argument("--dicts", help="pair folder (default: the cached default pair of the built-in model)")
    p.add_argument("--report", help="also write a report of the top edges into this folder")
    p.add_argument("--screenshot", help="PNG of one card of the report (needs --report and chromium)")
    p.add_argument("--node", help="the node whose card is screenshot (default: the top edge's target)")
    args = p.parse_args()

    t0 = time.time()
    torch.manual_seed(0)
    model = load_model(args.model, "cpu")
    layer = args.layer
    if args.dicts:
        pair, pair_path = load_pair(args.dicts), Path(args.dicts)
    else:  # never start a training run from here: a report waits for the pair
        folder = pair_dir(model, layer, TrainConfig())
        if not (folder / "pair" / "mlp" / "cfg.json").exists():
            raise SystemExit(f"no cached default pair at {folder}: train it first (featcircuit train "
                             f"--layer {layer}) or pass --dicts")
        pair, pair_path = default_pair(model, layer)
    rep = Replacement(model, {layer: pair})  # the model and this layer's pair, as every analysis takes them
    train = load_tokens(BUILTIN_DATA, model, n_tokens=args.train_tokens, split="train")
    heldout = load_tokens(BUILTIN_DATA, model, n_tokens=args.heldout_tokens, split="heldout")
    print(f"pair {pair_path}; labels fitted on {train.numel():,} training tokens, scored on "
          f"{heldout.numel():,} held-out tokens; fires = activation > {args.threshold_frac:g}·max")
    kw = dict(threshold_frac=args.threshold_frac, max_clauses=args.max_clauses)
    labels = label_pair(rep, train, heldout, progress=True, **kw)
    again = label_pair(rep, train, heldout, **kw)
    deterministic = json.dumps(labels, sort_keys=True) == json.dumps(again, sort_keys=True)
    t_labels = time.time() - t0

    stats = collect_stats(rep, heldout, progress=False)
    dense = dense_features(stats)
    table = attribute_edges(rep, heldout, progress=True)
    tops = {"all": candidate_edges(table, args.top, by="weight"),
            "dense kept out": candidate_edges(table, args.top, by="weight", stats=stats, exclude_dense=True)}
    summary: dict = {"layer": layer, "pair": str(pair_path), "train_tokens": int(train.numel()),
                     "heldout_tokens": int(heldout.numel()), "threshold_frac": args.threshold_frac,
                     "max_clauses": args.max_clauses,
                     "deterministic": deterministic, "dense_limit": DENSE_FREQ,
                     "dense": {s: [{"feature": f, "freq": float(stats[s].freq[f])} for f in v]
                               for s, v in dense.items()}, "dictionaries": {}, "circuits": {}}
    print(f"\n== held-out label F1 (layer {layer}; deterministic rerun: {deterministic}) ==")
    for site in ("resid", "mlp"):
        d = f1_distribution(labels[site])
        summary["dictionaries"][site] = d
        print(_dist_line(f"all {site} features", d))
    for name, top in tops.items():
        nodes = {"resid": sorted(set(top.src.tolist())), "mlp": sorted(set(top.dst.tolist()))}
        both = {f"{s}{layer}/{f}": labels[s][f] for s in nodes for f in nodes[s]}
        d = node_f1_distribution(labels, both)
        summary["circuits"][name] = {"distribution": d, "nodes": {
            n: {"label": lab["text"], "f1": lab["f1"], "precision": lab["precision"], "recall": lab["recall"],
                "base_f1": lab["base_f1"], "n_fire": lab["n_fire"],
                "freq": float(stats[parse_node_id(n)[0]].freq[parse_node_id(n)[2]])}
            for n, lab in both.items()}}
        print(_dist_line(f"nodes of the top-{args.top} edges ({name})", d))
    print(f"dense features (> {DENSE_FREQ:.0%} of held-out tokens): resid {len(dense['resid'])}, "
          f"mlp {len(dense['mlp'])}")

    nodes = [(s, f) for s in ("resid", "mlp") for f in range(len(labels[s]))]
    names = labels_for(nodes, stats, heldout, model.tokenizer, layer, scored=labels)
    freq = {s: stats[s].freq.tolist() for s in ("resid", "mlp")}
    print(f"\n== top {min(args.top, 15)} edges of layer {layer} by |weight| (all features) ==")
    print(format_table(table_rows(table, layer, min(args.top, 15), by="weight", freq=freq, labels=names,
                                  features_only=True)))

    top = tops["all"]
    edges = list(zip(top.src.tolist(), top.dst.tolist()))
    evidence = edge_evidence(rep, heldout, edges, k=5, progress=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"labels_L{layer}.json", json.dumps(
        {site: {str(f): lab for f, lab in labs.items()} for site, labs in labels.items()},
        ensure_ascii=False))
    summary["seconds"] = {"labels_twice": round(t_labels, 1), "total": round(time.time() - t0, 1)}
    atomic_write_text(out / f"summary_L{layer}.json", json.dumps(summary, indent=1, ensure_ascii=False))
    save_evidence(evidence, out / f"edge_evidence_L{layer}.json")
    print("\n== evidence of the top 5 edges: mean e per co-activation, tokens carrying the sum ==")
    for x in evidence[:5]:
        toks = ", ".join(f"{t['token']!r} {t['share']:+.0%}" for t in x["top_tokens"][:5])
        print(f"{x['source']} -> {x['target']}: Σe {x['sum']:.3g} over {x['count']:,} co-activations, "
              f"mean {x['mean']:.3g}; {toks}")
    print(f"\nwrote {out}/labels_L{layer}.json, summary_L{layer}.json, edge_evidence_L{layer}.json "
          f"in {time.time() - t0:.0f}s")

    if args.report:
        from featcircuit.report import write_report

        used = sorted({("resid", i) for i, _ in edges} | {("mlp", j) for _, j in edges})
        node_stats = {f"{s}{layer}/{f}": {**stats[s].node_stats(f), "label_f1": labels[s][f]["f1"]}
                      for s, f in used}
        graph = CircuitGraph.from_edges(layer, top.src, top.dst, top.weight, top.abs_weight, top.count,
                                        node_stats=node_stats,
                                        labels={n: label_text(_lab(labels, n)) for n in node_stats},
                                        meta={"model": args.model, "layer": layer,
                                              "tokens": int(heldout.numel()),
                                              "edge_rank": f"|weight|, top {args.top}"})
        html = write_report(args.report, rep=rep, tokens=heldout, graph=graph,
                            quality=None, stats=stats, labels=labels, evidence=evidence, progress=True)
        graph.save_json(Path(args.report) / "graph.json")
        print(f"wrote {html}")
        if args.screenshot:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from helpers import screenshot_report  # the tests' headless-Chromium helper

            node = args.node or evidence[0]["target"]
            log = screenshot_report(html, args.screenshot, node=node, width=1600, height=1400)
            print(f"wrote {args.screenshot} (card of {node}; {len(log)} browser log lines)")


if __name__ == "__main__":
    main()
