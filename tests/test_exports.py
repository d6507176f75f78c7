"""Tests for featcircuit.exports: attribution-graph JSON valid against Neuronpedia's schema, with meaning."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from featcircuit.errors import UserError
from featcircuit.exports import CORPUS_TOKEN, attribution_graph, write_attribution_graph
from featcircuit.graph import CircuitGraph, parse_node

SCHEMA = json.loads((Path(__file__).parent / "data" / "neuronpedia_graph_schema.json").read_text("utf-8"))
TOKENS = ["<bos>", "When", " Mary", " and", " John", " went", ",", " John", " gave", " to"]


def validate(doc: dict) -> None:
    jsonschema.Draft7Validator(SCHEMA).validate(doc)


def prompt_graph() -> CircuitGraph:
    """Two layers, features, error nodes, embeddings and the metric at several positions."""
    nodes = {"emb@2": {}, "emb@7": {}, "emb@9": {},
             "resid0/5@2": {"activation": 2.5, "influence": 0.20, "label": "name Mary"},
             "resid0/5@7": {"activation": 0.4, "influence": 0.05, "label": "name Mary"},
             "resid0/err@9": {"influence": 0.02},
             "mlp0/11@7": {"activation": 1.25, "influence": 0.15, "label": "repeated name"},
             "resid1/3@9": {"activation": 3.0, "influence": 0.45, "label": "IO mover"},
             "mlp1/err@9": {"influence": 0.01}, "mlp1/8@9": {"activation": 0.5, "effect": -0.2},
             "out@9": {"label": "logit( Mary) - logit( John)"}}
    edges = [("emb@2", "resid0/5@2", {"weight": 1.5}), ("emb@7", "resid0/5@7", {"weight": 0.2}),
             ("emb@9", "resid0/err@9", {"weight": 0.3}),
             ("resid0/5@2", "mlp0/11@7", {"weight": 0.8, "delta": 0.30}),
             ("resid0/5@7", "mlp0/11@7", {"weight": -0.1}),
             ("mlp0/11@7", "resid1/3@9", {"weight": 1.1, "delta": 0.55}),
             ("resid0/err@9", "resid1/3@9", {"weight": 0.05}),
             ("resid1/3@9", "mlp1/8@9", {"weight": -0.4}),
             ("resid1/3@9", "out@9", {"weight": 2.0, "delta": 0.9}),
             ("mlp1/8@9", "out@9", {"weight": -0.3}), ("mlp1/err@9", "out@9", {"weight": 0.07})]
    return CircuitGraph.from_nodes_edges(nodes, edges, {
        "model": "stdlib-neox", "mode": "prompt", "metric": "logit_diff", "task": "ioi",
        "prompt": "".join(TOKENS[1:]), "prompt_tokens": TOKENS, "layers": [0, 1], "node_threshold": 0.8})


def corpus_graph() -> CircuitGraph:
    nodes = {"resid0/5": {"activation": 0.3}, "mlp0/11": {}, "resid1/3": {}, "resid1/err": {},
             "out": {}}
    edges = [("resid0/5", "mlp0/11", {"weight": 4.0, "abs_weight": 5.0, "count": 40}),
             ("mlp0/11", "resid1/3", {"weight": -2.0, "abs_weight": 2.5, "count": 12}),
             ("resid1/3", "out", {"weight": 1.0, "abs_weight": 1.0, "count": 9}),
             ("resid1/err", "out", {"weight": 0.5, "abs_weight": 0.9, "count": 30})]
    return CircuitGraph.from_nodes_edges(nodes, edges, {"model": "stdlib-neox", "mode": "corpus",
                                                        "metric": "loss"})


def test_schema_is_neuronpedias_and_the_validator_bites():
    assert SCHEMA["title"] == "Anthropic Attribution Graph" and SCHEMA["version"] == "1.0.0"
    assert set(SCHEMA["required"]) == {"metadata", "qParams", "nodes", "links"}
    doc = attribution_graph(prompt_graph())
    validate(doc)
    # the validator rejects what the schema forbids: a node without its clerp, a string weight
    broken = json.loads(json.dumps(doc))
    del broken["nodes"][0]["clerp"]
    with pytest.raises(jsonschema.ValidationError, match="clerp"):
        validate(broken)
    broken = json.loads(json.dumps(doc))
    broken["links"][0]["weight"] = "1.5"
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)
    broken = json.loads(json.dumps(doc))
    del broken["metadata"]["prompt_tokens"]
    with pytest.raises(jsonschema.ValidationError, match="prompt_tokens"):
        validate(broken)


def test_prompt_mode_nodes_carry_positions_tokens_and_types():
    g = prompt_graph()
    doc = attribution_graph(g, token_prob=0.42)
    validate(doc)
    meta = doc["metadata"]
    assert meta["prompt_tokens"] == TOKENS and meta["prompt"] == "".join(TOKENS[1:])
    assert meta["scan"] == "stdlib-neox" and meta["node_threshold"] == 0.8
    assert meta["mode"] == "prompt" and meta["layers"] == [0, 1]
    by_id = {n["node_id"]: n for n in doc["nodes"]}
    assert set(by_id) == set(g.g.nodes)
    assert len({n["jsNodeId"] for n in doc["nodes"]}) == len(doc["nodes"])  # the frontend keys on it
    for nid, n in by_id.items():
        ref = parse_node(nid)
        assert n["ctx_idx"] == ref.position and n["position"] == ref.position
        assert n["model_layer"] == ref.layer and n["site"] == ref.site
        d = g.g.nodes[nid]
        assert n["influence_share"] == d["influence"] and n["activation"] == d["activation"]
        want_type = {"emb": "embedding", "out": "logit"}.get(ref.site) or (
            f"{ref.site} reconstruction error" if ref.feature < 0 else f"{ref.site} dictionary feature")
        assert n["feature_type"] == want_type
        assert n["is_target_logit"] == (ref.site == "out")
    assert by_id["mlp1/err@9"]["feature_type"] == "mlp reconstruction error"  # the schema's own name
    # embeddings: layer "E", feature = position, clerp quotes the prompt token at that position
    assert by_id["emb@7"]["layer"] == "E" and by_id["emb@7"]["feature"] == 7
    assert by_id["emb@7"]["clerp"] == 'Emb: " John"'
    # the metric: the frontend parses '(p=' out of a logit's clerp
    out = by_id["out@9"]
    assert out["clerp"] == 'Output "logit( Mary) - logit( John)" (p=0.420)' and out["token_prob"] == 0.42
    assert by_id["resid1/3@9"]["clerp"] == "IO mover" and by_id["resid1/3@9"]["feature"] == 3


def test_influence_is_circuit_tracers_cumulative_share():
    doc = attribution_graph(prompt_graph())
    infl = {n["node_id"]: n["influence"] for n in doc["nodes"]}
    # shares 0.45, 0.20, 0.15, 0.05, 0.02, 0.01: running sums, largest share first
    assert infl["resid1/3@9"] == pytest.approx(0.45) and infl["resid0/5@2"] == pytest.approx(0.65)
    assert infl["mlp0/11@7"] == pytest.approx(0.80) and infl["mlp1/err@9"] == pytest.approx(0.88)
    assert infl["emb@2"] is None and infl["out@9"] is None  # no share given: left out
    # Neuronpedia's node_threshold (0.8 here) keeps nodes with influence <= 0.8: the three nodes
    # holding 80% of the influence
    kept = {n for n, v in infl.items() if v is not None and v <= doc["metadata"]["node_threshold"] + 1e-9}
    assert kept == {"resid1/3@9", "resid0/5@2", "mlp0/11@7"}


def test_layers_stack_the_stream_and_keep_sites_apart():
    doc = attribution_graph(prompt_graph())
    height = {n["node_id"]: -1 if n["layer"] == "E" else int(n["layer"]) for n in doc["nodes"]}
    # every link goes up: the frontend draws nodes at their layer, so this is the picture's order
    for link in doc["links"]:
        assert height[link["source"]] < height[link["target"]], link
    assert height["resid0/5@2"] == 1 and height["mlp0/11@7"] == 2 and height["resid1/3@9"] == 3
    assert height["mlp1/8@9"] == 4 and height["out@9"] == 5
    # the frontend groups a feature's nodes across positions by "{layer}_{feature}": resid0/5 at
    # two positions is one feature; no two different features share a key
    groups: dict[str, set[str]] = {}
    for n in doc["nodes"]:
        if n["feature_type"].endswith("dictionary feature"):
            groups.setdefault(f"{n['layer']}_{n['feature']}", set()).add(n["node_id"].split("@")[0])
    assert groups["1_5"] == {"resid0/5"} and all(len(v) == 1 for v in groups.values())


def test_links_are_the_edges_with_their_measurements():
    g = prompt_graph()
    doc = attribution_graph(g)
    got = {(x["source"], x["target"]): x for x in doc["links"]}
    assert set(got) == set(g.g.edges)
    for (u, v), x in got.items():
        d = g.g.edges[u, v]
        assert (x["weight"], x["abs_weight"], x["count"], x["delta"]) == (
            d["weight"], d["abs_weight"], d["count"], d["delta"])
    assert got["resid1/3@9", "out@9"]["delta"] == 0.9


def test_corpus_mode_exports_ctx_idx_zero_and_says_so(tmp_path):
    g = corpus_graph()
    doc = attribution_graph(g)
    validate(doc)
    assert {n["ctx_idx"] for n in doc["nodes"]} == {0}
    assert all(n["position"] is None for n in doc["nodes"])
    assert doc["metadata"]["prompt_tokens"] == [CORPUS_TOKEN]
    assert doc["metadata"]["mode"] == "corpus" and "summed over all token positions" in \
        doc["metadata"]["aggregation"]
    assert "ctx_idx 0" in doc["metadata"]["info"]["description"]
    by_id = {n["node_id"]: n for n in doc["nodes"]}
    assert by_id["resid0/5"]["activation"] == 0.3 and by_id["resid1/err"]["feature"] == -1
    assert by_id["out"]["clerp"] == 'Output "loss" (p=0.000)'
    # the file writer gives the same document
    path = write_attribution_graph(g, tmp_path / "sub" / "ag.json")
    assert json.loads(path.read_text()) == json.loads(json.dumps(doc))


def test_one_layer_graph_exports_valid_json():
    g = CircuitGraph.from_edges(2, [0, -1, 1], [3, 3, -1], [1.0, -0.5, 0.2], [1.0, 0.6, 0.3], [4, 2, 1],
                                node_stats={"resid2/0": {"mean_act": 0.7, "freq": 0.2}, "out": {}},
                                meta={"model": "toy"})
    doc = attribution_graph(g)
    validate(doc)
    by_id = {n["node_id"]: n for n in doc["nodes"]}
    assert by_id["resid2/0"]["activation"] == 0.7 and by_id["resid2/0"]["dense"] is True
    assert by_id["resid2/err"]["feature_type"] == "resid reconstruction error"
    assert by_id["mlp2/err"]["feature_type"] == "mlp reconstruction error"
    assert doc["metadata"]["slug"] == "toy-corpus-L2"


def test_bad_token_prob_is_a_user_error():
    with pytest.raises(UserError, match="token_prob 1.5"):
        attribution_graph(prompt_graph(), token_prob=1.5)


def test_report_uses_the_moved_functions():
    import featcircuit.exports as exports
    import featcircuit.report as report

    assert report.attribution_graph is exports.attribution_graph
    assert report.neuronpedia_feature is exports.neuronpedia_feature
