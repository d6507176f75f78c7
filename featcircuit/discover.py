"""``featcircuit discover``: the whole job, from a model name to a rendered, validated circuit.

1. load the model and the pair (``--dicts``, or the cached default, trained when absent);
2. held-out tokens; dictionary quality on a slice of them;
3. exact edges with behavioural weights (one backward per batch), feature stats and labels;
4. ablation search over the top candidates, single-edge validation, faithfulness curves;
5. the graph (the kept edges with their measured Δ) as JSON, GraphML, DOT and SVG, the edge
   table, quality and search results as JSON, feature cards (Neuronpedia-style JSON) and a
   self-contained ``report.html``; a printed summary.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import UserError
from .io import atomic_write_text


@dataclass
class DiscoverConfig:
    """Options of ``featcircuit discover`` (each is a flag of the same name)."""

    layer: int = 2
    model: str = "stdlib-neox"
    data: str = "builtin:stdlib"
    split: str = "heldout"
    dicts: str | None = None
    target: str | None = None
    metric: str = "ce"
    prompts: str | None = None
    tokens: int = 16384
    eval_tokens: int = 8192
    top_edges: int = 30
    node_threshold: float = 0.0
    edge_threshold: float = 0.0
    search: str = "acdc"
    tau: float = 2e-5
    candidates: int = 64
    ablation: str = "zero"
    search_tokens: int = 2048
    ln: str = "exact"
    out: str | None = None
    device: str = "auto"
    seed: int = 0
    progress: bool = True


def _metric(name: str):
    from .attribution import default_metric

    if name == "ce":
        return default_metric
    if name == "kl":
        raise UserError("--metric kl has zero gradient at the clean run (the spliced model equals "
                        "it), so it cannot weight edges; use --metric ce, or --prompts for a logit "
                        "difference (the ablation search always measures KL)")
    raise UserError(f"unknown metric {name!r}: use ce (next-token loss) or pass --prompts for logit difference")


def _parse_target(target: str, d_mlp: int) -> int:
    site, _, idx = target.partition(":")
    if site != "mlp" or not idx.isdigit():
        raise UserError(f"bad --target {target!r}: expected mlp:J with J an MLP feature index")
    j = int(idx)
    if j >= d_mlp:
        raise UserError(f"unknown target feature {target}: the MLP dictionary has features 0..{d_mlp - 1}")
    return j


def explain_target(table, j: int, mlp_stats) -> dict:
    """What drives MLP feature ``j``: its incoming edges and the share of its activation they explain.

    Over the tokens where j is active, ``Σ_t f_j(t)`` splits (to first order) into the summed
    edges from resid features, the edge from the residual error, and the rest (encoder bias,
    decoder bias and the nonlinearity's curvature).
    """
    t = table.for_target(j)
    total = float(mlp_stats.mean_act[j] * mlp_stats.freq[j] * mlp_stats.n_tokens)
    feat = float(t.weight[t.src >= 0].sum())
    err = float(t.weight[t.src < 0].sum())
    safe = total if total > 0 else float("nan")
    drivers = [{"src": i, "weight": w, "share": w / safe, "count": c}
               for i, w, c in zip(t.src.tolist(), t.weight.tolist(), t.count.tolist())]
    return {"target": j, "total_activation": total,
            "n_active_tokens": int(round(float(mlp_stats.freq[j]) * mlp_stats.n_tokens)),
            "frac_features": feat / safe, "frac_error": err / safe, "frac_rest": 1 - (feat + err) / safe,
            "drivers": drivers}


def _weight_view(model, pair, layer, tokens, table, stats) -> dict:
    from .activations import harvest
    from .sites import mlp_parts, pair_sites
    from .weights import compare, mean_slope_weights, mean_stats, sufficiency, virtual_weights

    parts = mlp_parts(model, layer)
    hook = pair_sites(model, layer)[0].hook
    x = harvest(model, tokens, [hook], progress=False)[hook][:, 1:].flatten(0, 1).to(parts.W_in.device)
    vw = virtual_weights(parts, pair, mean_stats(parts, x))
    suff = sufficiency(parts, pair, stats["resid"].max_act.to(x.device), x.mean(0))
    return compare(table, vw.cpu(), suff.cpu(), vw_slope=mean_slope_weights(parts, pair, x).cpu())


def _check_options(cfg: DiscoverConfig) -> None:
    """Reject bad option values before any model is loaded or anything is computed."""
    if cfg.search not in ("acdc", "none"):
        raise UserError(f"unknown --search {cfg.search!r}: use acdc or none")
    if cfg.ablation not in ("zero", "mean"):
        raise UserError(f"unknown --ablation {cfg.ablation!r}: use zero or mean")
    if cfg.ln not in ("exact", "frozen"):
        raise UserError(f"unknown --ln {cfg.ln!r}: use exact or frozen")
    if not cfg.tau >= 0:
        raise UserError(f"--tau {cfg.tau} is negative: use a number >= 0 (nats of KL)")
    for name in ("tokens", "eval_tokens", "search_tokens", "candidates", "top_edges"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)} must be at least 1")
    for name in ("node_threshold", "edge_threshold"):
        if not getattr(cfg, name) >= 0:
            raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)} must be >= 0")


def discover(cfg: DiscoverConfig) -> dict:
    """Run the pipeline and write its files into ``cfg.out``; returns the summary dict."""
    from .attribution import attribute_edges, node_effects
    from .dictionary import load_pair
    from .evaluation import evaluate_pair, format_quality
    from .features import collect_stats, labels_for
    from .graph import CircuitGraph, format_table
    from .models import load_model, model_name
    from .pairs import default_pair
    from .prompts import load_prompts
    from .report import write_report
    from .search import AblationContext, search_edges
    from .validation import faithfulness_curves, mean_ce, plot_curves, validate_edges
    from .sites import check_layer, pair_sites

    t0 = time.time()
    torch.manual_seed(cfg.seed)
    _check_options(cfg)
    model = load_model(cfg.model, cfg.device)
    layer = check_layer(model, cfg.layer)
    r_site, m_site = pair_sites(model, layer)
    name = model_name(model)
    out = Path(cfg.out or f"featcircuit-out/{Path(name).name}-L{layer}")
    prompts = load_prompts(cfg.prompts, model) if cfg.prompts else None
    metric = prompts.metric if prompts else _metric(cfg.metric)
    if cfg.dicts:
        pair = load_pair(cfg.dicts, expect_model=name, expect_layer=layer, d_resid=r_site.width,
                         d_mlp=m_site.width, device=next(model.parameters()).device)
        pair_path = Path(cfg.dicts)
    else:
        pair, pair_path = default_pair(model, layer, progress=cfg.progress)
    target = _parse_target(cfg.target, pair.mlp.W_dec.shape[0]) if cfg.target else None
    print(f"model {name}, layer {layer}: resid {r_site.hook} ({r_site.width}), mlp {m_site.hook} "
          f"({m_site.width}); dictionaries {pair_path}")

    from .data import load_tokens
    tokens = (prompts.clean if prompts else
              load_tokens(cfg.data, model, n_tokens=cfg.tokens, split=cfg.split))
    t_setup = time.time() - t0
    quality = evaluate_pair(model, pair, tokens[: max(1, cfg.eval_tokens // tokens.shape[1])], layer,
                            progress=cfg.progress)
    table = attribute_edges(model, pair, tokens, layer=layer, ln=cfg.ln, metric=metric,
                            progress=cfg.progress)
    stats = collect_stats(model, pair, tokens, layer, progress=cfg.progress)
    effects = node_effects(model, pair, tokens[:16], layer=layer, metric=metric,
                           baseline="corrupt" if prompts else "zero",
                           corrupt=prompts.corrupt[:16] if prompts else None)
    weights_view = _weight_view(model, pair, layer, tokens[:16], table, stats)
    t_attr = time.time() - t0 - t_setup

    # candidates: the top edges (by |behavioural weight|: what matters for the output)
    by = "behav_weight" if table.behav_weight is not None else "abs_weight"
    cands = table.for_target(target) if target is not None else table.top(cfg.candidates, by=by)
    if target is not None:
        cands = cands.select(cands.order(by)[cands.src[cands.order(by)] >= 0][: cfg.candidates])
    search_res, validation, curves = None, None, None
    deltas: dict[tuple[int, int], float] = {}
    if cfg.search == "acdc" and len(cands):
        stoks = tokens[: max(1, cfg.search_tokens // tokens.shape[1])]
        vmetric = prompts.metric if prompts else mean_ce
        # the companion metric rides on every search forward: validation's single-edge
        # ablations are the search's own speculation singles, read back from the cache
        ctx = AblationContext(model, pair, layer, stoks, cfg.ablation, companion=vmetric)
        search_res = search_edges(model, pair, stoks, cands, tau=cfg.tau, ctx=ctx, progress=cfg.progress)
        validation = validate_edges(ctx, cands, metric=vmetric)
        curves = faithfulness_curves(ctx, cands, search_res, seed=cfg.seed)
        deltas = {(v["src"], v["dst"]): v["delta"] for v in search_res.visited}
    t_search = time.time() - t0 - t_setup - t_attr

    # graph: the kept edges after search (or the top edges without search)
    if search_res is not None:
        keep = {(v["src"], v["dst"]) for v in search_res.kept}
        rows = [k for k, (i, j) in enumerate(zip(cands.src.tolist(), cands.dst.tolist())) if (i, j) in keep]
        gtab = cands.select(torch.tensor(rows, dtype=torch.long))
    else:
        gtab = cands
    gtab = gtab.select(gtab.order(by)[: cfg.top_edges])
    nodes = sorted({("resid", i) for i in gtab.src.tolist()} | {("mlp", j) for j in gtab.dst.tolist()})
    tok = model.tokenizer
    labels = labels_for(nodes, stats, tokens, tok, layer)
    node_stats = {}
    for site, f in nodes:
        s = stats[site].node_stats(f)
        s["effect"] = float(effects[site][f])
        node_stats[f"{site}{layer}/{f}"] = s
    meta = {"model": name, "layer": layer, "dictionaries": str(pair_path), "tokens": int(tokens.numel()),
            "metric": "logit-diff" if prompts else cfg.metric, "search": cfg.search, "tau": cfg.tau,
            "ablation": cfg.ablation, "ln": cfg.ln, "edge_rank": by}
    graph = CircuitGraph.from_edges(
        layer, gtab.src, gtab.dst, gtab.weight, gtab.abs_weight, gtab.count,
        behav_weight=gtab.behav_weight,
        delta=[deltas.get((i, j)) for i, j in zip(gtab.src.tolist(), gtab.dst.tolist())],
        node_stats=node_stats, labels=labels, meta=meta,
        node_threshold=cfg.node_threshold, edge_threshold=cfg.edge_threshold)

    out.mkdir(parents=True, exist_ok=True)
    written = [graph.save_json(out / "graph.json"), graph.save_graphml(out / "graph.graphml"),
               graph.save_dot(out / "circuit.dot")]
    svg = graph.render(out / "circuit.svg")
    if svg is None:
        print(f"note: graphviz `dot` not found, so no SVG: render with `dot -Tsvg {out / 'circuit.dot'} -o {out / 'circuit.svg'}`")
    else:
        written.append(svg)
    top_all = table.select(table.order(by)[:1000])
    written.append(atomic_write_text(out / "edges.json", json.dumps(top_all.to_dict())))
    written.append(atomic_write_text(out / "quality.json", json.dumps(quality, indent=1)))
    written.append(atomic_write_text(out / "weights.json", json.dumps(weights_view, indent=1)))
    if target is not None:
        expl = explain_target(table, target, stats["mlp"])
        written.append(atomic_write_text(out / "target.json", json.dumps(expl, indent=1)))
    if search_res is not None:
        written.append(atomic_write_text(out / "search.json", json.dumps(
            {"search": search_res.to_dict(), "validation": validation, "faithfulness": curves}, indent=1)))
        plot_curves(curves, out / "faithfulness.png")
        written.append(out / "faithfulness.png")
    search_d = ({"search": search_res.to_dict(), "validation": validation, "faithfulness": curves}
                if search_res is not None else None)
    written.append(write_report(out, model=model, pair=pair, tokens=tokens, layer=layer, graph=graph,
                                quality=quality, search=search_d, stats=stats, progress=cfg.progress))
    written += [out / "features.json", out / "attribution_graph.json"]
    summary = {"config": asdict(cfg), "model": name, "layer": layer, "quality": quality,
               "n_edges_total": len(table), "n_tokens": table.n_tokens,
               "seconds": {"setup_and_pair": round(t_setup, 1), "quality_attribution_stats": round(t_attr, 1),
                           "search": round(t_search, 1), "total": round(time.time() - t0, 1)}}
    if search_res is not None:
        summary["search"] = {k: v for k, v in search_res.to_dict().items() if k != "visited"}
        summary["validation"] = {"pearson": validation["pearson"], "spearman": validation["spearman"],
                                 "n_disagree": validation["n_disagree"]}
        summary["faithfulness"] = curves["circuit"]
    written.append(atomic_write_text(out / "summary.json", json.dumps(summary, indent=1)))

    print("\n== dictionary quality (held-out) ==")
    print(format_quality(quality))
    print(f"\n== top edges of layer {layer} ({len(table):,} co-active pairs over {table.n_tokens:,} tokens) ==")
    print(format_table(graph.top_edges(min(15, cfg.top_edges))))
    wv = weights_view
    print(f"\n== weight-based view vs the data (weights.json) ==\n"
          f"virtual weights at σ'(mean h): Spearman with data edges {wv['spearman_data_vs_virtual']:+.3f}, "
          f"top-{len(wv['top_edges'])} sign agreement {wv['top_sign_agreement']:.0%}\n"
          f"with the mean slope E[σ'(h)]:  Spearman {wv['spearman_data_vs_mean_slope']:+.3f}, "
          f"sign agreement {wv['top_sign_agreement_mean_slope']:.0%}\n"
          f"sufficiency: {wv['top_fire_alone']:.0%} of the top data edges' targets fire from a_max·r_i + mean residual alone")
    if target is not None:
        print(f"\n== what drives mlp{layer}/{target} (active on {expl['n_active_tokens']} tokens, "
              f"total activation {expl['total_activation']:.3g}) ==")
        print(f"resid features account for {expl['frac_features']:.1%}, the residual error for "
              f"{expl['frac_error']:.1%}, bias and nonlinearity the remaining {expl['frac_rest']:.1%}")
        print(format_table([{"source": f"resid{layer}/{r['src']}" if r["src"] >= 0 else f"resid{layer}/err",
                             "label": labels_for([("resid", r["src"])], stats, tokens, tok, layer)[f"resid{layer}/{r['src']}"]
                             if r["src"] >= 0 else "error", "weight": r["weight"], "share": r["share"], "count": r["count"]}
                            for r in expl["drivers"][:12]]))
    if search_res is not None:
        s = summary["search"]
        print(f"\n== ablation search ({cfg.ablation}, tau={cfg.tau:g}) ==")
        print(f"kept {s['n_kept']} of {s['n_candidates']} candidate edges in {s['passes']} forward passes "
              f"(naive: {s['naive_passes']}, {s['naive_passes'] / max(1, s['passes']):.1f}x fewer), {s['seconds']:.1f}s")
        v = summary["validation"]
        print(f"single-edge ablation vs attribution: Pearson {v['pearson']:.3f}, Spearman {v['spearman']:.3f}, "
              f"{v['n_disagree']} of {len(cands)} disagree (sign or >3x)")
        c = curves["circuit"]
        print(f"circuit of {c['size']} edges: faithfulness {c['faithfulness']:.3f} "
              f"(KL {c['kl']:.2e}; all candidates ablated {curves['kl_empty']:.2e})")
    print(f"\nwrote {len(written)} files to {out}/: " + ", ".join(Path(p).name for p in written))
    print(f"done in {summary['seconds']['total']:.1f}s")
    return summary
