"""``featcircuit discover``: the whole job, from a model name to a scored, rendered circuit.

1. reject bad options (before any model is loaded); load the model and the pair (``--dicts``, or
   the cached default, trained when absent);
2. the behaviour: a task (``--task NAME`` built in, or ``--prompts FILE``; split into search and
   held-out pairs; the model's accuracy on it) or a corpus slice (next-token KL); held-out corpus
   tokens for dictionary quality, feature statistics and labels;
3. exact edges with behavioural weights on the behaviour's tokens;
4. the circuit (:mod:`featcircuit.circuit`): ranked, searched on the search half, scored on the
   held-out half against the cheap orders;
5. the graph of the circuit's edges (with measured Δ) as JSON, GraphML, DOT and SVG; ``summary.json``
   with the scope, m(M), m(∅), m(C), faithfulness, completeness, CPR, CMD and size;
   ``prompts.jsonl``; feature cards and ``report.html``; a printed summary.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, get_args

import torch

from . import checks as C
from .behaviour import behaviour as _behaviour
from .behaviour import fmt as _f
from .behaviour import parse_sweep as _parse_sweep
from .configs import option
from .data import BUILTIN_DATA
from .errors import UserError
from .io import atomic_write_text, strict_json
from .models import BUILTIN_NAME

Search = Literal["acdc", "none"]
Ablation = Literal["auto", "zero", "mean", "patch"]
SEARCHES: tuple[str, ...] = get_args(Search)
ABLATIONS: tuple[str, ...] = get_args(Ablation)


@dataclass
class DiscoverConfig:
    """The whole job: pair, edges, search, rendered circuit.

    One layer (``--layer``): exact resid→mlp edges, the ablation search and its faithfulness, scored
    labels and edge evidence, the report. Several (``--layers``) or one prompt (``--prompt``): the
    cross-layer graph of every adjacent site. Each field is a flag of the same name.
    """

    layer: int = option(2, check=C.nonneg_int)
    """the layer whose resid→mlp circuit is found"""
    layers: str | None = None
    """a circuit across layers: all | A-B | A,B,… (contiguous); dictionaries of each layer from the
    default cache"""
    prompt: str | None = None
    """one prompt's attribution graph per position (pruned by influence) for its next-token
    prediction, across --layers (default: --layer)"""
    model: str = BUILTIN_NAME
    """built-in name, HuggingFace name or local HF folder"""
    data: str = BUILTIN_DATA
    """builtin:stdlib, a .txt or .jsonl file, a folder of text files, or a HuggingFace dataset"""
    split: str = "heldout"
    """train | heldout | all: the corpus tokens attributed, labelled and searched (corpus mode)"""
    dicts: str | None = None
    """pair folder; default: the cached default pair (trained when absent)"""
    task: str | None = None
    """a built-in behaviour (`featcircuit tasks` lists them): logit difference at the answer position
    of clean/corrupt pairs"""
    prompts: str | None = None
    """jsonl of clean/corrupt/answer/wrong for a logit-difference metric"""
    target: str | None = None
    """explain one MLP feature, e.g. mlp:123"""
    metric: Literal["ce"] = "ce"
    """ce (next-token loss) for corpus attribution; --task and --prompts give the logit difference"""
    tokens: int = option(C.DefaultInt(16384), check=C.positive_int, limits=(10**10,))
    """attribution token budget"""
    eval_tokens: int = option(8192, check=C.positive_int, limits=(10**10,))
    """held-out tokens for dictionary quality"""
    top_edges: int = option(30, check=C.positive_int, limits=(10**6,))
    """edges drawn in the graph"""
    node_threshold: float = option(0.0, check=C.finite_float, limits=(0.0,))
    """drop drawn nodes whose |effect| on the metric is below this (nodes without one stay)"""
    edge_threshold: float = option(0.0, check=C.finite_float, limits=(0.0,))
    """drop drawn edges whose Σ_t |e_ij(t)| is below this"""
    search: Search = "acdc"
    """acdc: the ablation search; none: draw the top edges by |behavioural weight|"""
    tau: float = option(0.02, check=C.finite_float, limits=(0.0,))
    """remove an edge when it moves D by less than tau × |m(M) − m(∅)| (relative)"""
    tau_abs: float | None = option(None, check=C.finite_float, limits=(0.0,))
    """absolute τ in the metric's units (overrides --tau)"""
    tau_sweep: str | None = None
    """comma-separated relative τ values: the faithfulness–size frontier"""
    candidates: int = option(128, check=C.positive_int, limits=(10**7,))
    """edges handed from the ranking to the search"""
    ablation: Ablation = "auto"
    """auto: patch from the corrupt prompt for a task, zero otherwise"""
    errors: Literal["kept", "ablated"] = "kept"
    """error nodes outside (kept) or inside (ablated) the scope"""
    rank_by: Literal["auto", "abs", "net"] = "auto"
    """candidate ranking (auto: the higher Spearman with single-edge Δ)"""
    search_tokens: int = option(2048, check=C.positive_int, limits=(10**10,))
    """corpus mode: tokens for the search (and as many held out for scoring)"""
    exclude_dense: bool = False
    """hand no edge that touches a dense feature (active on > 10% of the corpus tokens) to the
    search; such edges stay in the scope, so they count as ablated when the circuit is scored"""
    label_tokens: int = option(32768, check=C.nonneg_int, limits=(10**10,))
    """fit each node's rule label on this many training-split tokens and score it (F1) on held-out
    tokens (0: unscored token labels)"""
    evidence: int = option(5, check=C.nonneg_int, limits=(10**4,))
    """contexts per drawn edge where e_ij(t) is largest, in the report and edge_evidence.json (0: none)"""
    ln: Literal["exact", "frozen"] = "exact"
    """LayerNorm Jacobian of the edges: exact, or its scale frozen"""
    out: str | None = None
    """output folder (default featcircuit-out/MODEL-LLAYER)"""
    force: bool = False
    """replace an --out folder featcircuit did not write"""
    device: str = option("auto", check=C.device)
    """auto | cpu | cuda | cuda:N"""
    seed: int = option(0, check=C.seed)
    """random seed (search order ties, random baseline)"""
    progress: bool = option(True, cli=False)
    """progress bars (the API may turn them off)"""


def _parse_target(target: str, d_mlp: int) -> int:
    site, _, idx = target.partition(":")
    if site != "mlp" or not (idx.isascii() and idx.isdigit()):
        raise UserError(f"bad --target {target!r}: expected mlp:J with J an MLP feature index")
    j = int(idx)
    if j >= d_mlp:
        raise UserError(f"unknown target feature {target}: the MLP dictionary has features 0..{d_mlp - 1}")
    return j


def _check_options(cfg: DiscoverConfig) -> None:
    """Reject bad option values before any model is loaded or anything is computed."""
    from .tasks import BUILTIN_TASKS

    for name, allowed in (("search", SEARCHES), ("ablation", ABLATIONS), ("ln", ("exact", "frozen")),
                          ("errors", ("kept", "ablated")), ("rank_by", ("auto", "abs", "net"))):
        if getattr(cfg, name) not in allowed:
            raise UserError(f"unknown --{name.replace('_', '-')} {getattr(cfg, name)!r}: use one of {', '.join(allowed)}")
    if cfg.task is not None and cfg.task not in BUILTIN_TASKS:
        raise UserError(f"unknown task {cfg.task!r}: built-in tasks are {', '.join(BUILTIN_TASKS)} "
                        "(`featcircuit tasks`), or pass your own with --prompts FILE.jsonl")
    if cfg.task is not None and cfg.prompts is not None:
        raise UserError("--task and --prompts both given: use one behaviour")
    if cfg.prompts is not None and not cfg.prompts.strip():  # not a silent corpus run
        raise UserError("--prompts is empty: give a JSONL file of clean/corrupt pairs, or drop it for a corpus run")
    if cfg.ablation == "patch" and cfg.task is None and cfg.prompts is None:
        raise UserError("--ablation patch needs corrupt prompts: use --task NAME or --prompts FILE")
    if cfg.task is not None and cfg.metric != "ce":
        raise UserError(f"--metric {cfg.metric} cannot be combined with --task (which measures the "
                        "logit difference): drop one of them")
    if cfg.metric not in ("ce",):
        raise UserError(f"unknown --metric {cfg.metric!r}: use ce (the search on a corpus measures KL); "
                        "--task or --prompts give the logit difference")
    if cfg.tau_abs is not None and not 0 <= cfg.tau_abs < float("inf"):
        raise UserError(f"--tau-abs {cfg.tau_abs} must be a finite number >= 0")
    if not 0 <= cfg.tau < 1e6:
        raise UserError(f"--tau {cfg.tau} must be a finite number >= 0 (a fraction of |m(M) − m(∅)|)")
    _parse_sweep(cfg.tau_sweep)
    for name in ("label_tokens", "evidence"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)} must be >= 0 (0: none)")
    for name in ("tokens", "eval_tokens", "search_tokens", "candidates", "top_edges"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)} must be at least 1")
    for name in ("node_threshold", "edge_threshold"):
        if not getattr(cfg, name) >= 0:
            raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)} must be >= 0")
    from .checks import check_discover_options

    # device, seed, model, layer, data and token budget, --target syntax, --prompts file, --out
    check_discover_options(cfg)
    if cfg.label_tokens and cfg.layers is None and cfg.prompt is None:
        _check_label_options(cfg)
    if cfg.layers is not None or cfg.prompt is not None:
        _check_cross_options(cfg)


def _check_label_options(cfg: DiscoverConfig) -> None:
    """Scored labels need a context's worth of tokens and data with a train and a held-out split."""
    if cfg.label_tokens < 128:
        raise UserError(f"--label-tokens {cfg.label_tokens} is less than one context of 128 tokens: use 0 "
                        "(unscored token labels) or at least 128")
    p = Path(cfg.data).expanduser()
    if cfg.data != BUILTIN_DATA and p.is_file() and p.suffix != ".jsonl":
        raise UserError(f"--data {cfg.data!r} is one document, so scored labels have no held-out text: use a "
                        "folder or .jsonl of documents, or --label-tokens 0 for unscored token labels")


def _check_cross_options(cfg: DiscoverConfig) -> None:
    """What ``--layers``/``--prompt`` accept, checked before the model loads."""
    from .checks import model_sizes
    from .sites import parse_layers

    if cfg.prompt is not None:
        if cfg.task is not None or cfg.prompts is not None:
            raise UserError("--prompt explains one prompt's prediction: drop --task/--prompts (or drop --prompt)")
        if not cfg.prompt.strip():
            raise UserError("--prompt is empty: give the text whose next-token prediction to explain")
    if cfg.dicts is not None or cfg.target is not None:
        raise UserError("--dicts and --target take one layer's pair: use --layer L without --layers/--prompt")
    if cfg.exclude_dense:
        raise UserError("--exclude-dense takes one layer's feature statistics: use --layer L without "
                        "--layers/--prompt")
    if cfg.ablation == "mean":
        raise UserError("--ablation mean is not supported with --layers: use auto, patch (tasks) or zero "
                        "(a − mean is nonzero for nearly every feature at every token: the scope would be dense)")
    n = model_sizes(cfg.model)["n_layers"]
    if cfg.layers is not None:
        ls = parse_layers(n if n is not None else 10**6, cfg.layers)
        if ls != list(range(ls[0], ls[-1] + 1)):
            raise UserError(f"--layers {cfg.layers} names layers {ls} that are not contiguous: cross-layer "
                            f"edges join adjacent layers, e.g. --layers {ls[0]}-{ls[-1]}")


def target_decomposition(rep, tokens: torch.Tensor, j: int) -> dict:
    """What drives MLP feature ``j`` of a one-layer replacement, additively: frozen-LN linear contributions to its input.

    With the LayerNorm scale frozen, ``g_t = ∂pre_j/∂x`` is a fixed linear read-out at each token
    and ``x = Σ_i a_i r_i + b_R + ε_R``, so ``g_t·x_t`` splits *exactly* into resid features,
    the decoder bias and the residual error; the shares sum to 1 by construction. (With the
    exact LN Jacobian they do not: ``J_LN x = 0`` by scale invariance, so exact edges carry no
    share of anything.)
    """
    from .activations import harvest
    from .attribution import grad_rows
    from .replacement import one_layer

    rep = one_layer(rep, "target_decomposition")
    r, m, parts = rep.resid_site, rep.mlp_site, rep.mlp_parts
    R, M = rep.pair.resid, rep.pair.mlp
    acts = harvest(rep.model, tokens, [r.hook, m.hook], progress=False)
    x = acts[r.hook][:, 1:].flatten(0, 1).to(parts.W_in.device)
    with torch.no_grad():
        on = M.encode(acts[m.hook][:, 1:].flatten(0, 1).to(x.device))[:, j] != 0
        x = x[on]
        if len(x) == 0:
            return {"target": j, "n_active_tokens": 0, "total": 0.0, "drivers": [],
                    "note": "the feature is never active on these tokens"}
        g = grad_rows(parts, x, M.W_enc[:, j].expand(len(x), 1, -1), ln="frozen")[:, 0]  # [T, d]
        a = R.encode(x)
        per_feat = ((g @ R.W_dec.T) * a).sum(0).double()  # Σ_t a_i g·r_i
        err = float((g * (x - R.decode(a))).sum())
        bias = float((g @ R.b_dec).sum())
        total = float((g * x).sum())
    order = per_feat.abs().argsort(descending=True)
    drivers = [{"src": int(i), "contribution": float(per_feat[i]), "share": float(per_feat[i]) / total}
               for i in order[:20].tolist() if per_feat[i] != 0]
    return {"target": j, "n_active_tokens": int(on.sum()), "total": total, "ln": "frozen",
            "features": float(per_feat.sum()), "error": err, "decoder_bias": bias,
            "share_features": float(per_feat.sum()) / total, "share_error": err / total,
            "share_decoder_bias": bias / total, "drivers": drivers}


def _quality(rep, pair_path: Path, tokens: torch.Tensor, progress: bool) -> dict:
    """Dictionary quality on ``tokens``, measured once per (pair weights, tokens, layer) and cached.

    The key hashes the pair's weight files and the tokens, so a retrained pair or other tokens
    are measured afresh; a corrupt cache entry is measured again and overwritten.
    """
    import hashlib

    from .activations import tokens_digest
    from .evaluation import evaluate_pair
    from .models import model_name
    from .pairs import cache_root

    h = hashlib.sha256(f"{model_name(rep.model)}|{rep.layer}|{tokens_digest(tokens)}".encode())
    files = sorted(Path(pair_path).glob("*/sae_weights.safetensors"))
    for f in files:
        h.update(f.read_bytes())
    path = cache_root() / "quality" / f"{h.hexdigest()[:20]}.json"
    if files and path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            pass
    q = evaluate_pair(rep, tokens, progress=progress)
    if files:
        try:
            atomic_write_text(path, strict_json(q, indent=1))
        except OSError:  # a read-only cache is not an error: the numbers were measured anyway
            pass
    return q


def discover(cfg: DiscoverConfig) -> dict:
    """Run the pipeline and write its files into the output folder; returns the summary dict.

    Under ``torchrun`` every rank runs it, the corpus attribution's batches shared out over them,
    and rank 0 alone writes and prints.
    """
    from . import distributed as D

    t0 = time.time()
    torch.manual_seed(cfg.seed)
    _check_options(cfg)
    if D.init(cfg.device) and not D.is_writer():
        return _follow(cfg, t0)
    return _run(cfg, t0)


def _run(cfg: DiscoverConfig, t0: float) -> dict:
    """The pipeline after the options are checked (module docstring, steps 1–5)."""
    from .attribution import attribute_edges
    from .checks import discover_out, staged_output
    from .circuit import CircuitConfig, find_circuit, other_errors
    from .data import load_tokens
    from .dictionary import load_pair
    from .faithfulness import plot_curves
    from .features import collect_stats, labels_for
    from .graph import CircuitGraph
    from .models import load_model, model_name
    from .pairs import each_default_pair
    from .replacement import Replacement
    from .report import write_report
    from .sharded_edges import attribute_edges_sharded
    from .sites import check_layer, pair_sites

    if cfg.layers is not None or cfg.prompt is not None:
        from .crossdiscover import discover_layers

        return discover_layers(cfg)
    sweep = _parse_sweep(cfg.tau_sweep)
    model = load_model(cfg.model, cfg.device)
    layer = check_layer(model, cfg.layer)
    r_site, m_site = pair_sites(model, layer)
    name = model_name(model)
    out = discover_out(cfg)
    task, beh_search, beh_eval, perf = _behaviour(cfg, model)  # bad prompts fail before training
    if cfg.dicts:
        pair = load_pair(cfg.dicts, expect_model=name, expect_layer=layer, d_resid=r_site.width,
                         d_mlp=m_site.width, device=next(model.parameters()).device)
        pair_path = Path(cfg.dicts)
    else:
        pair, pair_path = each_default_pair(model, [layer], cfg.progress)[layer]
    rep = Replacement(model, {layer: pair})  # the model and this layer's dictionaries, one object
    rep.check_mlps()  # an MLP the edges cannot read fails here, before any pass
    target = _parse_target(cfg.target, rep.width(("mlp", layer))) if cfg.target else None
    print(f"model {name}, layer {layer}: resid {r_site.hook} ({r_site.width}), mlp {m_site.hook} "
          f"({m_site.width}); dictionaries {pair_path}")
    corpus = load_tokens(cfg.data, model, n_tokens=cfg.tokens, split=cfg.split)
    t_setup = time.time() - t0

    quality = _quality(rep, pair_path, corpus[: max(1, cfg.eval_tokens // corpus.shape[1])], cfg.progress)
    stats = collect_stats(rep, corpus, progress=cfg.progress)
    if task is not None:  # edges and their behavioural weights on the behaviour itself
        table = attribute_edges(rep, beh_search.clean, ln=cfg.ln, metric=beh_search.metric,
                                batch_size=len(beh_search), progress=cfg.progress)  # the metric reads every pair
    else:  # under torchrun each rank attributes its share of the batches; every rank gets the sum
        from .attribution import default_metric
        table = attribute_edges_sharded(rep, corpus, ln=cfg.ln, metric=default_metric,
                                        progress=cfg.progress)
    t_attr = time.time() - t0 - t_setup

    found = None
    if cfg.search == "acdc":
        ccfg = CircuitConfig(ablation=cfg.ablation, errors=cfg.errors, candidates=cfg.candidates, tau=cfg.tau,
                             tau_abs=cfg.tau_abs, tau_sweep=sweep, rank_by=cfg.rank_by, seed=cfg.seed,
                             skip=_dense_edges(stats) if cfg.exclude_dense else None)
        found = find_circuit(rep, beh_search, beh_eval, ccfg, progress=cfg.progress)
    t_search = time.time() - t0 - t_setup - t_attr

    # the graph: the circuit's edges (or the top edges by |behavioural weight| without a search)
    by = "behav_weight"
    idx = {(i, j): k for k, (i, j) in enumerate(zip(table.src.tolist(), table.dst.tolist()))}
    if found is not None:
        deltas = {(v["src"], v["dst"]): v["delta"] for v in found["search"]["visited"]}
        edges = [tuple(e) for e in found["circuit"]]
    else:
        top = table.top(cfg.top_edges, by=by)
        edges, deltas = list(zip(top.src.tolist(), top.dst.tolist())), {}
    rows = [idx.get(e) for e in edges]
    present = [(e, r) for e, r in zip(edges, rows) if r is not None]
    sel = table.select(torch.tensor([r for _, r in present], dtype=torch.long))
    gtab = sel.select(sel.order(by)[: cfg.top_edges])
    nodes = sorted({("resid", i) for i in gtab.src.tolist() if i >= 0} | {("mlp", j) for j in gtab.dst.tolist()})
    tok = model.tokenizer
    scored, label_summary = _scored_labels(cfg, rep, corpus, nodes, stats)
    labels = labels_for(nodes, stats, corpus, tok, layer, scored=scored)
    evidence = None
    if cfg.evidence and len(gtab):  # where each drawn edge is largest on the corpus, its mean per co-activation
        from .evidence import edge_evidence

        evidence = edge_evidence(rep, corpus, list(zip(gtab.src.tolist(), gtab.dst.tolist())),
                                 k=cfg.evidence, ln=cfg.ln, progress=cfg.progress)
    t_labels = time.time() - t0 - t_setup - t_attr - t_search
    node_stats = {f"{site}{layer}/{f}": stats[site].node_stats(f) for site, f in nodes}
    meta = {"model": name, "layer": layer, "dictionaries": str(pair_path),
            "behaviour": (f"task {task.name}" if task is not None else f"corpus {cfg.data} ({cfg.split})"),
            "metric": "logit difference at the answer position" if task is not None else "KL(clean ‖ ablated)",
            "search": cfg.search, "tau": cfg.tau if cfg.tau_abs is None else cfg.tau_abs,
            "tau_relative": cfg.tau_abs is None,
            "ablation": found["ablation"] if found else cfg.ablation, "ln": cfg.ln, "edge_rank": by,
            "tokens": int(corpus.numel())}
    graph = CircuitGraph.from_edges(
        layer, gtab.src, gtab.dst, gtab.weight, gtab.abs_weight, gtab.count, behav_weight=gtab.behav_weight,
        delta=[deltas.get((i, j)) for i, j in zip(gtab.src.tolist(), gtab.dst.tolist())],
        node_stats=node_stats, labels=labels, meta=meta,
        node_threshold=cfg.node_threshold, edge_threshold=cfg.edge_threshold)
    for site, f in nodes if scored is not None else []:  # the score beside the label, for renderers and JSON
        if f"{site}{layer}/{f}" in graph.g:
            graph.g.nodes[f"{site}{layer}/{f}"]["label_f1"] = scored[site][f]["f1"]

    summary = {"config": asdict(cfg), "model": name, "layer": layer, "task": perf,
               "quality": quality, "n_edges_attributed": len(table), "n_tokens_attributed": table.n_tokens,
               "labels": label_summary}
    if found is not None:
        ho = found["heldout"]
        summary["circuit"] = {
            "scope": found["scope"], "ablation": found["ablation"], "errors": found["errors"],
            "size": ho["size"], "m_full": ho["m_full"], "m_empty": ho["m_empty"], "m_circuit": ho["m_circuit"],
            "faithfulness": ho["faithfulness"], "completeness": ho["completeness"],
            "cpr": found["curves"]["orders"]["search"]["cpr"], "cmd": found["curves"]["orders"]["search"]["cmd"],
            "errors_other_variant": dict(found[f"heldout_errors_{other_errors(found['errors'])}"]),
            "on_search_tokens": found["search_tokens_end_points"],
            "baselines_at_size": {n: {"faithfulness": p["faithfulness"], "completeness": p["completeness"]}
                                  for n, p in found["at_circuit_size"].items()},
            "areas": {n: {"cpr": o["cpr"], "cmd": o["cmd"]} for n, o in found["curves"]["orders"].items()},
            "ranking": found["rank_by"], "statistics": found["statistics"],
            "tau": found["tau"], "tau_relative": found["tau_relative"],
            "search_passes": found["search"]["passes"], "search_seconds": found["search"]["seconds"],
            "search_batch": found["search"]["batch"],
            "search_one_per_pass_from_visit": found["search"]["batch_timing"].get("one_per_pass_from_visit"),
            "tau_sweep": [{k: f[k] for k in ("tau", "size")} | {"faithfulness": f["heldout"]["faithfulness"],
                                                                 "completeness": f["heldout"]["completeness"]}
                          for f in found["tau_sweep"]],
            "verdict": found["verdict"]}
    expl = target_decomposition(rep, beh_search.clean if task is not None else corpus[:32],
                                target) if target is not None else None
    summary["seconds"] = {"setup_and_pair": round(t_setup, 1), "quality_stats_attribution": round(t_attr, 1),
                          "circuit": round(t_search, 1), "labels_and_evidence": round(t_labels, 1)}

    with staged_output(out, cfg.force) as tmp:
        written = [graph.save_json(tmp / "graph.json"), graph.save_graphml(tmp / "graph.graphml"),
                   graph.save_dot(tmp / "circuit.dot")]
        svg = graph.render(tmp / "circuit.svg")
        if svg is None:
            print(f"note: graphviz `dot` not found, so no SVG: render with "
                  f"`dot -Tsvg {out / 'circuit.dot'} -o {out / 'circuit.svg'}`")
        else:
            written.append(svg)
        top_all = table.select(table.order(by)[:1000])
        written.append(atomic_write_text(tmp / "edges.json", strict_json(top_all.to_dict())))
        written.append(atomic_write_text(tmp / "quality.json", strict_json(quality, indent=1)))
        if task is not None:
            written.append(atomic_write_text(tmp / "prompts.jsonl", task.to_jsonl(tok)))
        if expl is not None:
            written.append(atomic_write_text(tmp / "target.json", strict_json(expl, indent=1)))
        if found is not None:
            written.append(atomic_write_text(tmp / "search.json", strict_json(found, indent=1)))
            plot_curves(found["curves"], tmp / "faithfulness.png", found["heldout"],
                        title=f"{meta['behaviour']}, layer {layer}, {found['ablation']} ablation, held-out")
            written.append(tmp / "faithfulness.png")
        written.append(write_report(tmp, rep=rep, tokens=corpus, graph=graph,
                                    quality=quality, search=_report_search(found), stats=stats,
                                    progress=cfg.progress, labels=scored, evidence=evidence))
        written += [tmp / "features.json", tmp / "attribution_graph.json"]
        if evidence is not None:
            written.append(tmp / "edge_evidence.json")
        summary["seconds"]["total"] = round(time.time() - t0, 1)
        written.append(atomic_write_text(tmp / "summary.json", strict_json(summary, indent=1)))
        names = [Path(p).name for p in written]

    _print(summary, quality, table, graph, cfg, layer, perf, found, expl)
    print(f"\nwrote {len(names)} files to {out}/: " + ", ".join(names))
    print(f"done in {summary['seconds']['total']:.1f}s")
    return summary


def _follow(cfg: DiscoverConfig, t0: float) -> dict:
    """A torchrun rank other than 0: the same run, so that its collectives pair with rank 0's (the
    corpus attribution's batches are shared out), with its files in a temporary folder and its
    printout dropped; rank 0 writes the one set of outputs. Where only the default pairs'
    training is shared (a task, prompts, --layers, --prompt), it joins that and leaves."""
    import contextlib
    import dataclasses
    import io
    import tempfile

    if cfg.task is not None or cfg.prompts is not None or cfg.layers is not None or cfg.prompt is not None:
        return _join_pairs(cfg)
    with tempfile.TemporaryDirectory(prefix="featcircuit-rank-") as tmp, contextlib.redirect_stdout(io.StringIO()):
        return _run(dataclasses.replace(cfg, out=str(Path(tmp) / "out"), force=True, progress=False), t0)


def _join_pairs(cfg: DiscoverConfig) -> dict:
    """A follower's share of a run whose only collectives are the default pairs' training
    (:func:`~featcircuit.pairs.each_default_pair` over the run's layers, as rank 0 calls it),
    then nothing; rank 0 runs the rest alone."""
    from .models import load_model
    from .pairs import each_default_pair
    from .sites import parse_layers

    if cfg.dicts is None:
        model = load_model(cfg.model, cfg.device)
        each_default_pair(model, parse_layers(model, cfg.layers if cfg.layers is not None else str(cfg.layer)),
                          False)
    return {}


def _dense_edges(stats):
    """``skip(edge)``: whether a resid→mlp edge touches a feature active on > 10% of the tokens."""
    from .stats import DENSE_FREQ

    dr, dm = stats["resid"].dense(DENSE_FREQ).tolist(), stats["mlp"].dense(DENSE_FREQ).tolist()
    return lambda e: dm[e[1]] or (e[0] >= 0 and dr[e[0]])


def _scored_labels(cfg: DiscoverConfig, rep, corpus, nodes: list[tuple[str, int]], stats):
    """(``{site: {feature: label}}`` or None, summary): rule labels of the graph's feature nodes.

    Fitted on ``--label-tokens`` of the training split, scored on held-out tokens (the corpus when
    it is the held-out split), so each label's F1 says how well it predicts where the feature fires
    on text it was not fitted on. ``--label-tokens 0``: unscored token labels, summary None.
    """
    if not cfg.label_tokens or not nodes:
        return None, None
    from .data import load_tokens
    from .labels import label_pair, node_f1_distribution
    from .stats import DENSE_FREQ

    model, layer = rep.model, rep.layer
    fit_on = load_tokens(cfg.data, model, n_tokens=cfg.label_tokens, split="train")
    scored_on = corpus if cfg.split == "heldout" else load_tokens(cfg.data, model, n_tokens=cfg.tokens,
                                                                  split="heldout")
    feats = {site: sorted(f for s, f in nodes if s == site) for site in ("resid", "mlp")}
    scored = label_pair(rep, fit_on, scored_on, features=feats, progress=cfg.progress)
    ids = [f"{site}{layer}/{f}" for site, f in nodes]
    dist = node_f1_distribution(scored, ids)
    flags = {site: stats[site].dense(DENSE_FREQ) for site in ("resid", "mlp")}  # the graph's dense flags
    dense = [f"{site}{layer}/{f}" for site, f in nodes if bool(flags[site][f])]
    return scored, {"fit_tokens": int(fit_on.numel()), "fit_split": "train", "scored_tokens": int(scored_on.numel()),
                    "scored_split": "heldout", "circuit_nodes": dist, "dense_nodes": dense,
                    "nodes": {i: {k: scored[s][f][k] for k in ("text", "f1", "precision", "recall", "base_f1")}
                              for i, (s, f) in zip(ids, nodes)}}


def _report_search(found: dict | None) -> dict | None:
    """The search block the report page reads."""
    if found is None:
        return None
    s = found["search"]
    ho = found["heldout"]
    pts = found["curves"]["orders"]
    return {"search": {"n_candidates": s["n_candidates"], "n_kept": s["n_kept"], "passes": s["passes"],
                       "seconds": s["seconds"], "tau": found["tau"], "ablation": found["ablation"]},
            "faithfulness": {"circuit": {"size": ho["size"], "faithfulness": ho["faithfulness"],
                                         "completeness": ho["completeness"]},
                             "sizes": found["curves"]["sizes"],
                             "curves": {n: o["points"] for n, o in pts.items()}}}


def _print(summary, quality, table, graph, cfg, layer, perf, found, expl) -> None:
    from .circuit import other_errors
    from .evaluation import format_quality
    from .graph import format_table

    print("\n== dictionary quality (held-out) ==")
    print(format_quality(quality))
    if perf is not None:
        print(f"\n== task {perf['task']}: {perf['pairs']} pairs ({perf['heldout_pairs']} held out), "
              f"{perf['n_ctx']} tokens each ==")
        print(f"accuracy {perf['accuracy']:.3f} (logit diff clean {perf['logit_diff_clean']:+.2f}, corrupt "
              f"{perf['logit_diff_corrupt']:+.2f})" + ("" if perf["performs"] else
                                                       "  -- the model does not perform this task"))
    print(f"\n== top edges of layer {layer} by |behavioural weight| ({len(table):,} co-active pairs over "
          f"{table.n_tokens:,} tokens) ==")
    top = table.top(10, by="behav_weight")
    print(format_table([{"source": f"resid{layer}/{i}", "target": f"mlp{layer}/{j}", "weight": w, "behav_weight": b,
                         "count": c} for i, j, w, b, c in zip(top.src.tolist(), top.dst.tolist(), top.weight.tolist(),
                                                              top.behav_weight.tolist(), top.count.tolist())]))
    if found is not None:
        c = summary["circuit"]
        st = c["statistics"]
        print(f"\n== circuit edges ({graph.g.number_of_edges()} drawn of {c['size']}) ==")
        print(format_table(graph.top_edges(min(15, cfg.top_edges))))
        print(f"\n== circuit: {found['ablation']} ablation, errors {found['errors']}, scope = {c['scope']['what']} "
              f"(|S| = {c['scope']['size_heldout']:,} on held-out tokens) ==")
        print(f"ranking by {found['rank_by']}: Spearman with single-edge Δ on {st['n_sample']} edges: "
              f"abs {_f(st['spearman_abs'])}, net {_f(st['spearman_net'])}")
        print(f"search: kept {c['size']} of {len(found['candidates'])} candidates, τ = {found['tau']:.3g} "
              f"({'relative ' + format(cfg.tau, 'g') + ' × |m(M) − m(∅)|' if found['tau_relative'] else 'absolute'}), "
              f"{c['search_passes']} passes of {c['search_batch']} configuration(s)"
              + (f" (one per pass from visit {c['search_one_per_pass_from_visit']})"
                 if c.get("search_one_per_pass_from_visit") is not None else "")
              + f", {c['search_seconds']:.1f}s")
        print(f"held-out: m(M) {c['m_full']:.4g}, m(∅) {c['m_empty']:.4g}, m(C) {c['m_circuit']:.4g}; "
              f"faithfulness {_f(c['faithfulness'])}, completeness {_f(c['completeness'])}, "
              f"CPR {_f(c['cpr'])}, CMD {_f(c['cmd'])}")
        o = c["errors_other_variant"]
        print(f"with errors {other_errors(found['errors'])}: m(∅) {o['m_empty']:.4g}, "
              f"faithfulness {_f(o['faithfulness'])}, completeness {_f(o['completeness'])}")
        print(f"\n{'order':<22} {'F at |C|':>9} {'compl.':>7} {'CPR':>6} {'CMD':>6}")
        for n, p in c["baselines_at_size"].items():
            a = c["areas"][n]
            print(f"{n:<22} {_f(p['faithfulness']):>9} {_f(p['completeness']):>7} {_f(a['cpr'], '.2f'):>6} "
                  f"{_f(a['cmd'], '.2f'):>6}")
        best = max((n for n in c["baselines_at_size"] if n != "search"),
                   key=lambda n: c["baselines_at_size"][n]["faithfulness"] or -1e9)
        fs, fb = c["faithfulness"], c["baselines_at_size"][best]["faithfulness"]
        if c["size"] == 0:
            print("the search kept no edge: there is no circuit to compare with the cheap orders")
        elif fs is not None and fb is not None:
            print(f"the search {'beats' if fs > fb else 'does NOT beat'} the best cheap order ({best}, "
                  f"{fb:.3f}) at equal size on held-out prompts")
        for f in c["tau_sweep"]:
            print(f"  τ sweep {f['tau']:g}: {f['size']} edges, faithfulness {_f(f['faithfulness'])}, "
                  f"completeness {_f(f['completeness'])}")
        print(c["verdict"])
    lab = summary.get("labels")
    if lab is not None and lab["circuit_nodes"].get("n"):
        d = lab["circuit_nodes"]
        print(f"\nlabels: rules fitted on {lab['fit_tokens']:,} training tokens, scored on {lab['scored_tokens']:,} "
              f"held-out tokens; over the {d['n']} drawn feature nodes held-out F1 median {d['median']:.2f} "
              f"(quartiles {d['q1']:.2f}–{d['q3']:.2f}; the rule \"every token\" gets {d['median_base_f1']:.2f}), "
              f"{len(lab['dense_nodes'])} dense (> 10% of tokens, flagged)")
    if expl is not None:
        print(f"\n== what drives mlp{layer}/{expl['target']} (frozen-LN contributions, active on "
              f"{expl['n_active_tokens']} tokens; they sum exactly) ==")
        if expl["n_active_tokens"]:
            print(f"resid features {expl['share_features']:.1%}, residual error {expl['share_error']:.1%}, "
                  f"decoder bias {expl['share_decoder_bias']:.1%}")
            print(format_table([{"source": f"resid{layer}/{d['src']}", "contribution": d["contribution"],
                                 "share": d["share"]} for d in expl["drivers"][:12]]))


def tasks_table(model) -> list[dict]:
    """The model's performance on every built-in task (for ``featcircuit tasks``)."""
    from .tasks import BUILTIN_TASKS, builtin_task, task_performance

    rows = []
    for name, (_, _, what) in BUILTIN_TASKS.items():
        row = task_performance(model, builtin_task(name, model))
        row["what"] = what
        rows.append(row)
    return rows


def print_json(obj) -> None:
    """Strict JSON on stdout."""
    print(json.dumps(json.loads(strict_json(obj)), indent=1))
