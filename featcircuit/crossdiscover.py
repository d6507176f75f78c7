"""``featcircuit discover --layers A-B``: a circuit across layers for a task, a corpus or a prompt.

1. options checked before anything loads; the model, and the cached default pair of each layer
   (trained in one harvest pass when absent);
2. a task (``--task``/``--prompts``: search and held-out halves) or a corpus slice: the cross-layer
   circuit of :func:`~featcircuit.crosscircuit.find_cross_circuit` — ranked, ACDC-searched and
   scored on held-out prompts against the cheap orders (attribution, circuit-tracer influence,
   single-edge ablation, random) with ∅ = every edge between adjacent sites ablated;
3. the circuit's graph (one rank per site, embeddings at the bottom, the metric on top), the
   faithfulness curves, and one held-out prompt's attribution graph per position in
   Neuronpedia's format; with ``--prompt TEXT`` only that prompt's attribution graph (pruned by
   influence, no search: a single prompt has no corrupt counterpart).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch

from .errors import UserError
from .graph import CircuitGraph
from .io import atomic_write_text, strict_json


def discover_layers(cfg) -> dict:
    """The cross-layer pipeline; ``cfg`` is a :class:`~featcircuit.discover.DiscoverConfig`."""
    from .behaviour import behaviour as _behaviour
    from .behaviour import parse_sweep as _parse_sweep
    from .checks import discover_out, staged_output
    from .circuit import CircuitConfig, other_errors
    from .crosscircuit import circuit_graph, find_cross_circuit, prompt_graph
    from .exports import write_attribution_graph
    from .faithfulness import plot_curves
    from .models import load_model, model_name
    from .pairs import each_default_pair
    from .replacement import Replacement

    t0 = time.time()
    torch.manual_seed(cfg.seed)
    sweep = _parse_sweep(cfg.tau_sweep)
    if cfg.dicts or cfg.target:
        raise UserError("--dicts and --target take one layer: use --layer L (or --layers L)")
    model = load_model(cfg.model, cfg.device)
    from .sites import parse_layers

    layers = parse_layers(model, cfg.layers if cfg.layers is not None else str(cfg.layer))
    name = model_name(model)
    out = discover_out(cfg)
    prompt_mode = cfg.prompt is not None
    task = beh_search = beh_eval = perf = None
    if not prompt_mode:
        task, beh_search, beh_eval, perf = _behaviour(cfg, model)
    pairs = {L: p for L, (p, _) in each_default_pair(model, layers, cfg.progress).items()}
    rep = Replacement(model, pairs, layers)
    rep.check_mlps()  # an MLP the edges cannot read fails here, before any pass
    print(f"model {name}, layers {layers[0]}-{layers[-1]}: {len(rep.sites)} sites "
          f"({', '.join(f'{k}{L}' for k, L in rep.sites)}), dictionaries from the default cache")
    times = {"setup_and_pairs": round(time.time() - t0, 1)}
    meta = {"model": name, "task": task.name if task is not None else None,
            "metric": ("logit difference at the answer position" if task is not None else
                       "logit of the predicted next token" if prompt_mode else "KL(clean ‖ ablated)")}
    summary: dict = {"config": asdict(cfg), "model": name, "layers": layers, "task": perf}
    files: dict[str, CircuitGraph] = {}
    if prompt_mode:
        tokens = _prompt_tokens(model, cfg.prompt)
        with torch.no_grad():
            top = int(model(tokens)[0, -1].argmax())
        meta["metric"] = f"logit of {model.tokenizer.decode([top])!r} at the last position"
        t1 = time.time()
        g = prompt_graph(rep, tokens, lambda lg: lg[0, -1, top], meta)
        times["prompt_graph"] = round(time.time() - t1, 1)
        files["prompt_graph"] = g
        summary["prompt"] = {"tokens": g.meta["prompt_tokens"], "nodes": g.g.number_of_nodes(),
                             "edges": g.g.number_of_edges(), "predicted": model.tokenizer.decode([top])}
    else:
        keep: dict = {}
        t1 = time.time()
        ccfg = CircuitConfig(ablation=cfg.ablation, errors=cfg.errors, candidates=cfg.candidates, tau=cfg.tau,
                             tau_abs=cfg.tau_abs, tau_sweep=sweep, rank_by=cfg.rank_by, seed=cfg.seed)
        found = find_cross_circuit(rep, beh_search, beh_eval, ccfg, keep=keep, progress=cfg.progress)
        times["circuit"] = round(time.time() - t1, 1)
        ev = keep["heldout"]
        t1 = time.time()
        deltas = {(v["src"], v["dst"]): v["delta"] for v in found["search"]["visited"]}
        circuit = [tuple(e) for e in found["circuit"]]
        graph = circuit_graph(ev, circuit, deltas, meta | {"behaviour": meta["task"] or f"corpus {cfg.data}",
                                                           "faithfulness": found["heldout"]["faithfulness"]})
        files["graph"] = graph
        if task is not None and beh_eval is not None:  # one held-out prompt's graph, as Neuronpedia reads it
            p = beh_eval.subset(torch.arange(1))
            files["prompt_graph"] = prompt_graph(rep, p.clean, p.metric, meta | {"pair": 0})
        times["graphs"] = round(time.time() - t1, 1)
        ho = found["heldout"]
        summary["circuit"] = {
            "scope": found["scope"], "ablation": found["ablation"], "errors": found["errors"],
            "size": ho["size"],
            "m_full": ho["m_full"], "m_empty": ho["m_empty"], "m_circuit": ho["m_circuit"],
            "faithfulness": ho["faithfulness"], "completeness": ho["completeness"],
            "errors_other_variant": found[f"heldout_errors_{other_errors(found['errors'])}"],
            "edge_types": _edge_types(ev, circuit),
            "baselines_at_size": {n: {"faithfulness": q["faithfulness"], "completeness": q["completeness"]}
                                  for n, q in found["at_circuit_size"].items()},
            "areas": {n: {"cpr": o["cpr"], "cmd": o["cmd"]} for n, o in found["curves"]["orders"].items()},
            "ranking": found["rank_by"], "statistics": found["statistics"], "tau": found["tau"],
            "search_passes": found["search"]["passes"], "search_seconds": found["search"]["seconds"],
            "tau_sweep": [{k: f[k] for k in ("tau", "size")} | {"faithfulness": f["heldout"]["faithfulness"]}
                          for f in found["tau_sweep"]],
            "verdict": found["verdict"]}
        summary["passes"] = {"full_forwards": rep.n_forward,
                             "restarts_search_half": keep["search"].passes,
                             "restarts_heldout_half": ev.passes}
        summary["_found"] = found
    summary["seconds"] = times
    found = summary.pop("_found", None)
    with staged_output(out, cfg.force) as tmp:
        written: list[Path] = []
        if "graph" in files:
            g = files["graph"]
            written += [g.save_json(tmp / "graph.json"), g.save_graphml(tmp / "graph.graphml"),
                        g.save_dot(tmp / "circuit.dot")]
            svg = g.render(tmp / "circuit.svg")
            if svg is not None:
                written.append(svg)
        if "prompt_graph" in files:
            pg = files["prompt_graph"]
            written += [pg.save_json(tmp / "prompt_graph.json"),
                        write_attribution_graph(pg, tmp / "attribution_graph.json")]
            svg = pg.render(tmp / "prompt_graph.svg")
            if svg is not None:
                written.append(svg)
        if found is not None:
            written.append(atomic_write_text(tmp / "search.json", strict_json(found, indent=1)))
            plot_curves(found["curves"], tmp / "faithfulness.png", found["heldout"],
                        title=f"{meta['task'] or 'corpus'}, layers {layers[0]}-{layers[-1]}, "
                              f"{found['ablation']} ablation, held-out")
            written.append(tmp / "faithfulness.png")
        if task is not None:
            written.append(atomic_write_text(tmp / "prompts.jsonl", task.to_jsonl(model.tokenizer)))
        summary["seconds"]["total"] = round(time.time() - t0, 1)
        written.append(atomic_write_text(tmp / "summary.json", strict_json(summary, indent=1)))
        names = [Path(p).name for p in written]
    _print(summary, found)
    print(f"\nwrote {len(names)} files to {out}/: " + ", ".join(names))
    print(f"done in {summary['seconds']['total']:.1f}s")
    return summary


def _prompt_tokens(model, text: str) -> torch.Tensor:
    """BOS + the prompt's tokens ``[1, ctx]``."""
    ids = model.tokenizer.encode(text)
    bos = model.tokenizer.bos_token_id
    if not ids:
        raise UserError(f"--prompt {text!r} has no tokens")
    if bos is not None and ids[0] != bos:
        ids = [bos] + ids
    return torch.tensor([ids], device=next(model.parameters()).device)


def _edge_types(cx, circuit) -> dict[str, int]:
    """How many circuit edges of each type (resid→mlp, resid→resid, mlp→resid; an error source
    ``resid err→mlp``)."""
    out: dict[str, int] = {}
    for i, j in circuit:
        (a, _), _ = cx.node(i)
        (b, _), _ = cx.node(j)
        key = f"{a}{' err' if cx.is_error(i) else ''}→{b}"
        out[key] = out.get(key, 0) + 1
    return out


def _print(summary: dict, found: dict | None) -> None:
    from .behaviour import fmt as _f
    from .circuit import other_errors

    if summary.get("task"):
        p = summary["task"]
        print(f"\n== task {p['task']}: {p['pairs']} pairs ({p['heldout_pairs']} held out); accuracy "
              f"{p['accuracy']:.3f} ==")
    if "prompt" in summary:
        p = summary["prompt"]
        print(f"\n== prompt graph: {p['nodes']} nodes, {p['edges']} edges after influence pruning; the model "
              f"predicts {p['predicted']!r} ==")
    if found is None:
        return
    c = summary["circuit"]
    print(f"\n== circuit across layers {summary['layers'][0]}-{summary['layers'][-1]}: {c['ablation']} "
          f"ablation, errors {c['errors']}, |S| = {c['scope']['size_heldout']:,} edges on held-out "
          "prompts ==")
    print(f"kept {c['size']} edges ({', '.join(f'{k} {v}' for k, v in c['edge_types'].items()) or 'none'}); "
          f"held-out m(M) {c['m_full']:.4g}, m(∅) {c['m_empty']:.4g}, m(C) {c['m_circuit']:.4g}; "
          f"faithfulness {_f(c['faithfulness'])}, completeness {_f(c['completeness'])}")
    o = c["errors_other_variant"]
    print(f"with errors {other_errors(c['errors'])}: m(∅) {o['m_empty']:.4g}, "
          f"faithfulness {_f(o['faithfulness'])}, completeness {_f(o['completeness'])}")
    print(f"\n{'order':<28} {'F at |C|':>9} {'compl.':>7} {'CPR':>6} {'CMD':>6}")
    for n, q in c["baselines_at_size"].items():
        a = c["areas"][n]
        print(f"{n:<28} {_f(q['faithfulness']):>9} {_f(q['completeness']):>7} {_f(a['cpr'], '.2f'):>6} "
              f"{_f(a['cmd'], '.2f'):>6}")
    for f in c["tau_sweep"]:
        print(f"  τ sweep {f['tau']:g}: {f['size']} edges, faithfulness {_f(f['faithfulness'])}")
    print(c["verdict"])
    print("seconds: " + ", ".join(f"{k} {v}" for k, v in summary["seconds"].items()))
