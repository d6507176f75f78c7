"""Exports in other tools' formats: Neuronpedia feature dashboards and attribution-graph JSON.

:func:`attribution_graph` writes a :class:`~featcircuit.graph.CircuitGraph` as the attribution-graph
JSON of circuit-tracer and Neuronpedia (``metadata``, ``qParams``, ``nodes``, ``links``), valid
against Neuronpedia's published graph schema (``tests/data/neuronpedia_graph_schema.json``). The
schema leaves ``layer`` and ``feature_type`` free; the frontends read them, so we follow their
conventions:

- ``layer``: the height in the stream, as a string: embeddings ``"E"``, ``resid{L}`` ``2L+1``,
  ``mlp{L}`` ``2L+2``, the metric one above the top. The frontend stacks nodes by ``layer`` and
  groups a feature across positions by ``{layer}_{feature}``, so resid and MLP features of one
  model layer need different numbers (the model layer is in ``model_layer``).
- ``feature_type``: ``"embedding"``, ``"logit"`` (the metric node), ``"mlp reconstruction
  error"``, ``"resid reconstruction error"`` and ``"resid dictionary feature"`` / ``"mlp dictionary
  feature"`` ("cross layer transcoder" would be false: ours are per-site dictionaries).
- ``feature``: the dictionary index; -1 for error nodes and the metric; the position for
  embeddings (as circuit-tracer, so each position is its own embedding "feature").
- ``ctx_idx``: the token position; a corpus-mode graph (edges summed over tokens) has ``ctx_idx`` 0
  for every node and says so in ``metadata.aggregation``.
- the metric's ``clerp`` reads ``Output "..." (p=...)``: the frontend parses the ``(p=`` part.
- ``influence``: circuit-tracer's *cumulative* share, the value Neuronpedia's ``node_threshold``
  prunes on: nodes sorted by their own share of the influence on the metric (descending), a node's
  value is the share held by it and every node before it. Our per-node share is ``influence_share``.

Node ids are ours (``resid1/37@5``), unique, so ``node_id`` and ``jsNodeId`` are both the id.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from .errors import UserError
from .graph import CircuitGraph
from .io import atomic_write_text
from .stats import is_dense

GENERATOR = {"name": "featcircuit"}
CORPUS_TOKEN = "<all tokens>"  # the one "position" of a corpus-mode graph


# ---- Neuronpedia feature dashboards ----------------------------------------------------------


def _centres(edges: list[float]) -> list[float]:
    return [(a + b) / 2 for a, b in zip(edges, edges[1:])]


def _np_activation(ex: dict, bin_min=None, bin_max=None, bin_contains=None) -> dict:
    vals = [float(v) for v in ex["values"]]
    return {"tokens": ex["tokens"], "values": vals, "maxValue": max(vals) if vals else 0.0,
            "maxValueTokenIndex": ex["index"], "minValue": min(vals) if vals else 0.0,
            "binMin": bin_min, "binMax": bin_max, "binContains": bin_contains,
            "qualifyingTokenIndex": ex["index"]}


def neuronpedia_feature(card: dict, model_id: str) -> dict:
    """A card in the field names of a Neuronpedia feature dashboard (plus ``featcircuit`` extras).

    ``activations``: the top examples (``binMin``/``binMax``/``binContains`` null) then one example
    per activation bin (``binMin``/``binMax`` its range, ``binContains`` its count).
    """
    acts = [_np_activation(ex) for ex in card["top"]]
    acts += [_np_activation(b["example"], b["lo"], b["hi"], b["count"]) for b in card["bins"] if b["example"]]
    lens = card["lens"]
    return {
        "modelId": model_id, "layer": f"{card['layer']}-{card['site']}", "index": str(card["feature"]),
        "explanations": [{"description": card["label"], "typeName": "featcircuit-rule",
                          "score": (card.get("label_score") or {}).get("f1"),
                          "scorer": "held-out F1 of predicting where the feature fires"}],
        "maxActApprox": card["max_act"], "frac_nonzero": card["freq"],
        "pos_str": [x["token"] for x in lens["top"]], "pos_values": [x["value"] for x in lens["top"]],
        "neg_str": [x["token"] for x in lens["bottom"]], "neg_values": [x["value"] for x in lens["bottom"]],
        "freq_hist_data_bar_heights": card["histogram"]["counts"],
        "freq_hist_data_bar_values": _centres(card["histogram"]["edges"]),
        "logits_hist_data_bar_heights": lens["histogram"]["counts"],
        "logits_hist_data_bar_values": _centres(lens["histogram"]["edges"]),
        "activations": acts,
        "featcircuit": {"id": card["id"], "hook": card["hook"], "n_tokens": card["n_tokens"],
                        "mean_act": card["mean_act"], "token_removal": card.get("removal"),
                        "lens_rule": lens["rule"], "label": card["label"],
                        "label_score": card.get("label_score"),
                        "dense": card.get("dense"), "dense_limit": card.get("dense_limit"),
                        "n_docs": card.get("n_docs"), "quantiles": card.get("quantiles")},
    }


# ---- attribution-graph JSON (circuit-tracer / Neuronpedia) -----------------------------------


def stream_layer(site: str, layer: int, top: int) -> str:
    """The attribution-graph ``layer`` of a node: "E", 2L+1 (resid), 2L+2 (mlp), ``top`` (out)."""
    if site == "emb":
        return "E"
    if site == "out":
        return str(top)
    return str(2 * layer + (1 if site == "resid" else 2))


def cumulative_influence(graph: CircuitGraph) -> dict[str, float]:
    """circuit-tracer's node ``influence``: running sum of the nodes' shares, largest share first.

    Pruning at a threshold t (keep nodes whose value is <= t) then keeps the fewest nodes holding a
    share t of the influence, as circuit-tracer's ``node_threshold`` does. Nodes without a share
    are left out.
    """
    nodes = graph.g.nodes
    shares = {n: float(nodes[n]["influence"]) for n in graph.sorted_nodes()
              if nodes[n].get("influence") is not None}
    order = sorted(shares, key=lambda n: -shares[n])  # stable: ties keep canonical node order
    out, total = {}, 0.0
    for n in order:
        total += shares[n]
        out[n] = min(total, 1.0)  # float round-off must not push a share past 1
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:100] or "graph"


def attribution_graph(graph: CircuitGraph, cards: Mapping[str, dict] | None = None,
                      evidence: Sequence[Mapping] | None = None, *, slug: str | None = None,
                      token_prob: float | None = None) -> dict:
    """The graph as circuit-tracer / Neuronpedia attribution-graph JSON (one prompt per graph).

    ``nodes`` carry ``node_id``, ``jsNodeId``, ``feature``, ``layer``, ``ctx_idx``,
    ``feature_type``, ``clerp``, ``influence`` (cumulative), ``activation``, ``is_target_logit``,
    ``token_prob`` (the schema's fields; see the module docstring for our conventions) plus
    ``site``, ``model_layer``, ``position``, ``influence_share``, ``effect``, ``dense`` and
    ``label_f1``; ``links``
    carry ``source``, ``target``, ``weight`` plus ``abs_weight``, ``count``, ``behav_weight``,
    ``delta``, ``mean_per_coactivation`` and, with ``evidence``
    (:func:`featcircuit.evidence.edge_evidence`), ``top_tokens`` and the top contexts
    (``evidence``). ``token_prob``: the metric's probability when it is one token's (else 0, as
    circuit-tracer writes for a logit without one). Corpus-mode graphs get ``ctx_idx`` 0 throughout
    and one placeholder prompt token, and ``metadata.aggregation`` says so.
    """
    cards = cards or {}
    ev_by = {(x["source"], x["target"]): x for x in evidence or []}
    meta = graph.meta
    prompt_mode = graph.mode == "prompt"
    if prompt_mode:
        tokens = meta.get("prompt_tokens")
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
            raise UserError(f"a prompt-mode graph needs meta prompt_tokens (a list of strings) for its "
                            f"attribution-graph JSON; got {str(tokens)[:60]}")
    else:
        tokens = [CORPUS_TOKEN]
    p = 0.0 if token_prob is None else float(token_prob)
    if not 0.0 <= p <= 1.0:
        raise UserError(f"bad token_prob {token_prob!r}; expected a probability in [0, 1]")
    layers = graph.layers
    top = 2 * max(layers) + 3 if layers else 1
    metric = str(meta.get("metric") or "metric")
    cumulative = cumulative_influence(graph)
    nodes = []
    for n in graph.sorted_nodes():
        d = graph.g.nodes[n]
        site, feat, pos = d["site"], int(d["feature"]), d.get("position")
        ctx = 0 if pos is None else int(pos)
        label = str(d.get("label", n))
        if site == "emb":
            ftype, feature, clerp = "embedding", ctx, f'Emb: "{tokens[ctx]}"'
        elif site == "out":
            name = metric if label == n else label
            ftype, feature, clerp = "logit", -1, f'Output "{name}" (p={p:.3f})'
        elif feat < 0:
            ftype, feature, clerp = f"{site} reconstruction error", -1, label
        else:
            ftype, feature, clerp = f"{site} dictionary feature", feat, label
        activation = d.get("activation")
        if activation is None:
            activation = d.get("mean_act")  # one-layer corpus graphs know the mean activation
        card = cards.get(n) or {}
        nodes.append({
            "node_id": n, "jsNodeId": n, "feature": feature,
            "layer": stream_layer(site, int(d["layer"]), top), "ctx_idx": ctx, "feature_type": ftype,
            "clerp": clerp, "influence": cumulative.get(n), "activation": activation,
            "is_target_logit": site == "out", "token_prob": p if site == "out" else 0.0,
            "run_idx": 0, "reverse_ctx_idx": 0,
            "site": site, "model_layer": int(d["layer"]), "position": pos,
            "influence_share": d.get("influence"), "effect": d.get("effect"),
            "freq": d.get("freq"), "max_act": d.get("max_act"), "has_card": n in cards,
            "dense": is_dense(d.get("freq")),
            "label_f1": (card.get("label_score") or {}).get("f1", d.get("label_f1"))})
    links = []
    for u, v, d in graph.sorted_edges():
        link = {"source": u, "target": v, "weight": d["weight"], "abs_weight": d["abs_weight"],
                "count": d["count"], "behav_weight": d.get("behav_weight"), "delta": d.get("delta"),
                "mean_per_coactivation": d["weight"] / d["count"] if d["count"] else None}
        ev = ev_by.get((u, v))
        if ev is not None:
            link["top_tokens"] = ev["top_tokens"]
            link["evidence"] = [{k: x[k] for k in ("seq", "pos", "edge", "a", "f", "tokens", "index")}
                                for x in ev["top"]]
        links.append(link)
    model = str(meta.get("model") or "model")
    task = meta.get("task")
    if slug is None:
        where = task or ("prompt" if prompt_mode else "corpus")
        span = f"L{layers[0]}-{layers[-1]}" if len(layers) > 1 else f"L{layers[0]}" if layers else "L"
        slug = _slug(f"{Path(model).name}-{where}-{span}")
    aggregation = ("prompt: one node per (feature, position); ctx_idx is the position in "
                   "prompt_tokens" if prompt_mode else
                   "corpus: edges summed over all token positions of the corpus; every node has "
                   f"ctx_idx 0, which stands for all tokens (prompt_tokens is [{CORPUS_TOKEN!r}])")
    metadata: dict[str, Any] = {
        "slug": slug, "scan": model, "prompt": str(meta.get("prompt") or ""), "prompt_tokens": tokens,
        "info": {"description": f"featcircuit circuit for {metric} on {model}"
                                + (f", task {task}" if task else "") + f"; {aggregation}",
                 "generator": dict(GENERATOR, version=_version())},
        "schema": "circuit-tracer / Neuronpedia attribution graph (Neuronpedia graph schema 1.0.0)",
        "mode": graph.mode, "metric": metric, "task": task, "layers": layers,
        "aggregation": aggregation,
        "layer_convention": "layer: 'E' embeddings, 2L+1 resid{L}, 2L+2 mlp{L}, "
                            f"{top} the metric; the model layer is in model_layer",
        "featcircuit_meta": json.loads(json.dumps(meta)),
    }
    share = meta.get("node_threshold")
    if isinstance(share, (int, float)) and not isinstance(share, bool):
        metadata["node_threshold"] = float(share)
    return {"metadata": metadata,
            "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "",
                        "sg_pos": ""},
            "nodes": nodes, "links": links}


def _version() -> str:
    from . import __version__

    return str(__version__)


def write_attribution_graph(graph: CircuitGraph, path: str | Path, **kwargs: Any) -> Path:
    """Write :func:`attribution_graph` of ``graph`` to ``path`` atomically (JSON, indent 1)."""
    return atomic_write_text(path, json.dumps(attribution_graph(graph, **kwargs), indent=1,
                                              allow_nan=False) + "\n")


__all__ = ["CORPUS_TOKEN", "attribution_graph", "neuronpedia_feature", "stream_layer",
           "write_attribution_graph"]
