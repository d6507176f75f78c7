"""``featcircuit discover`` end to end on a tiny model, and its bad inputs (exit code 2)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from featcircuit.graph import CircuitGraph
from featcircuit.training import TrainConfig, train_pair
from helpers import random_pair


@pytest.fixture(scope="module")
def setup(neox, neox_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("disc")
    data = root / "data"
    data.mkdir()
    for i in range(40):
        (data / f"f{i}.txt").write_text(
            f"def add{i}(a, b):\n    return a + b * {i}\n\nclass P{i}:\n    pass\n" * 6)
    from featcircuit import load_tokens
    toks = load_tokens(str(data), neox, n_ctx=32, split="all")
    cfg = TrainConfig(width=2.0, k=4, tokens=2000, epochs=2, batch_size=200, warmup_steps=2, n_ctx=32)
    for layer in (1, 2):
        train_pair(neox, layer, toks, cfg, out=root / f"pair{layer}", progress=False)
    return root, data, neox_dir


ENV = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}


def run(*args, launch=(sys.executable, "-m", "featcircuit")):
    return subprocess.run([*launch, *map(str, args)], capture_output=True, text=True, env=ENV)


def base_args(setup, layer=1, **kw):
    root, data, model = setup
    args = ["discover", "--model", model, "--layer", layer, "--dicts", root / f"pair{layer}", "--data", data,
            "--split", "all", "--tokens", 1024, "--eval-tokens", 256, "--candidates", 12,
            "--search-tokens", 256, "--tau", 1e-4, "--top-edges", 10, "--out", root / "out"]
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}", v]
    return args


def test_discover_end_to_end(setup):
    root = setup[0]
    r = run(*base_args(setup))
    assert r.returncode == 0, r.stderr[-3000:]
    out = root / "out"
    for f in ("graph.json", "graph.graphml", "circuit.dot", "edges.json", "quality.json", "search.json",
              "summary.json", "faithfulness.png"):
        assert (out / f).exists(), f
    g = CircuitGraph.load_json(out / "graph.json")
    assert 0 < g.g.number_of_edges() <= 10
    assert all(d["delta"] is not None for _, _, d in g.g.edges(data=True))  # searched edges carry Δ
    s = json.loads((out / "summary.json").read_text())
    c = s["circuit"]
    assert c["size"] == len(json.loads((out / "search.json").read_text())["circuit"])
    assert c["scope"]["size_heldout"] > c["size"] and "every resid1 → mlp1 feature edge" in c["scope"]["what"]
    # the standard end points: ∅ = the whole scope ablated; KL of the full model is exactly 0
    assert c["m_full"] == 0.0 and c["m_empty"] > 0
    assert c["faithfulness"] == pytest.approx((c["m_circuit"] - c["m_empty"]) / (c["m_full"] - c["m_empty"]))
    assert 0 <= c["cpr"] <= 1.5 and c["cmd"] >= 0
    assert set(c["baselines_at_size"]) >= {"search", "random", "single-edge ablation"}
    assert "top edges of layer 1" in r.stdout and "circuit edges" in r.stdout and "wrote" in r.stdout
    assert str(out) in r.stdout
    # scored labels on every feature node: the rule, its held-out F1 on the node, in the summary and
    # in features.json, all the same number
    lab = s["labels"]
    feats = [n for n in g.g.nodes if g.g.nodes[n]["site"] in ("resid", "mlp") and "err" not in n]
    assert sorted(lab["nodes"]) == sorted(feats)
    assert lab["fit_split"] == "train" and lab["scored_split"] == "heldout"
    assert lab["circuit_nodes"]["n"] + lab["circuit_nodes"]["n_unscored"] == len(feats)
    published = {f"{x['layer'].split('-')[1]}1/{x['index']}": x["explanations"][0]
                 for x in json.loads((out / "features.json").read_text())["features"]}
    for n in feats:
        f1 = lab["nodes"][n]["f1"]
        assert g.g.nodes[n]["label_f1"] == f1 and published[n]["score"] == f1
        assert g.g.nodes[n]["label"].endswith(f"[F1 {f1:.2f}]" if f1 is not None else "[unscored]")
        assert published[n]["description"] == lab["nodes"][n]["text"]
    assert "labels: rules fitted on" in r.stdout
    # edge evidence of every drawn edge: on the corpus (the tokens the table was attributed on) its
    # sum and count are the table's, computed by attribute_edges on its own path
    ev_file = json.loads((out / "edge_evidence.json").read_text())
    ev = {(x["source"], x["target"]): x for x in ev_file["edges"]}
    assert set(ev) == {(u, v) for u, v in g.g.edges() if u.startswith("resid")}
    tab = json.loads((out / "edges.json").read_text())
    row = {(f"resid1/{i}" if i >= 0 else "resid1/err", f"mlp1/{j}"): k
           for k, (i, j) in enumerate(zip(tab["src"], tab["dst"]))}
    checked = 0
    for key, x in ev.items():
        if key in row:
            assert x["sum"] == pytest.approx(tab["weight"][row[key]], rel=1e-6)
            assert x["count"] == tab["count"][row[key]]
            checked += 1
    assert checked >= 1
    # re-render with other thresholds, without recomputing
    rr = run("render", out / "graph.json", "-o", root / "small.dot", "--top-edges", 3)
    assert rr.returncode == 0, rr.stderr
    assert (root / "small.dot").read_text().count("->") >= 3


def test_target_and_prompts(setup):
    root, _, model = setup
    edges_file = root / "out" / "edges.json"
    edges = json.loads(edges_file.read_text()) if edges_file.exists() else None
    j = edges["dst"][0] if edges else 0
    r = run(*base_args(setup, target=f"mlp:{j}", search="none"))
    assert r.returncode == 0, r.stderr[-2000:]
    p = root / "prompts.jsonl"
    pairs = [("def add(a, b):\n    return a", "def add(b, a):\n    return a", " +", " a")] * 6
    p.write_text("".join(json.dumps({"clean": c, "corrupt": k, "answer": a, "wrong": w}) + "\n"
                         for c, k, a, w in pairs))
    r = run(*base_args(setup, prompts=p, candidates=6))
    assert r.returncode == 0, r.stderr[-2000:]
    out = root / "out"
    s = json.loads((out / "summary.json").read_text())
    assert s["circuit"]["ablation"] == "patch"  # the default for prompt pairs
    assert len((out / "prompts.jsonl").read_text().splitlines()) == 6
    assert "logit difference" in json.loads((out / "graph.json").read_text())["meta"]["metric"]


@pytest.mark.parametrize("change, match", [
    (dict(layer=7), "--layer 7 is out of range"),
    (dict(target="mlp:99999"), "unknown target feature mlp:99999"),
    (dict(target="resid:3"), "bad --target 'resid:3'"),
    (dict(search="greedy"), "--search: invalid choice: 'greedy' (choose from 'acdc', 'none')"),
    (dict(metric="bleu"), "--metric: invalid choice: 'bleu' (choose from 'ce')"),
    (dict(ablation="resample"), "--ablation: invalid choice: 'resample'"),
    (dict(ablation="patch"), "--ablation patch needs corrupt prompts"),
    (dict(prompts=""), "--prompts is empty"),
    (dict(task="nope"), "unknown task 'nope'"),
    (dict(tau_sweep="0.1,x"), "bad --tau-sweep"),
    (dict(errors="some"), "--errors: invalid choice: 'some' (choose from 'kept', 'ablated')"),
    (dict(tau=-1), "--tau"),
    (dict(candidates=0), "--candidates"),
    (dict(label_tokens=5), "--label-tokens 5 is less than one context of 128 tokens"),
    (dict(evidence=-1), "--evidence"),
])
def test_bad_inputs_exit_2(setup, change, match):
    args = base_args(setup)
    for k, v in change.items():
        flag = f"--{k.replace('_', '-')}"
        if flag in args:
            args[args.index(flag) + 1] = v
        else:
            args += [flag, v]
    r = run(*args)
    assert r.returncode == 2, (r.returncode, r.stderr[-1500:])
    assert match in r.stderr and r.stderr.strip().count("\n") == 0


def test_dictionary_for_other_layer_and_empty_prompts(setup):
    root = setup[0]
    args = base_args(setup, layer=1)
    args[args.index("--dicts") + 1] = root / "pair2"
    r = run(*args)
    assert r.returncode == 2 and "layer 2, expected layer 1" in r.stderr, r.stderr[-800:]
    empty = root / "empty.jsonl"
    empty.write_text("\n")
    r = run(*base_args(setup, prompts=empty))
    assert r.returncode == 2 and "holds no prompts" in r.stderr
    assert not (root / "never").exists()


@pytest.mark.parametrize("change, match", [
    (dict(search="greedy"), "unknown --search 'greedy'"),
    (dict(ablation="resample"), "unknown --ablation 'resample'"),
    (dict(label_tokens=-1), "--label-tokens -1 must be >= 0"),
    (dict(label_tokens=64), "--label-tokens 64 is less than one context"),
    (dict(exclude_dense=True, layers="2-3"), "--exclude-dense takes one layer"),
])
def test_api_config_is_checked_before_any_work(change, match):
    """The Python API gets the same checks as the command line (which argparse does first)."""
    from featcircuit.discover import DiscoverConfig, discover
    from featcircuit.errors import UserError

    with pytest.raises(UserError, match=match):
        discover(DiscoverConfig(progress=False, **change))


def test_discover_under_torchrun_writes_what_one_process_writes(setup, tmp_path):
    """Two torchrun ranks (gloo): the corpus attribution's batches shared out, rank 0 writing alone,
    and the files the same as one process's — the same circuit, the same drawn edges and weights."""
    outs = {}
    torchrun = (str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2",
                "-m", "featcircuit")
    for name, launch in (("one", (sys.executable, "-m", "featcircuit")), ("two", torchrun)):
        args = [str(a) for a in base_args(setup)]
        args[args.index("--out") + 1] = str(tmp_path / name)
        r = run(*args, launch=launch)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.count("wrote ") == 1  # one rank printed and wrote
        outs[name] = tmp_path / name
    assert sorted(p.name for p in outs["one"].iterdir()) == sorted(p.name for p in outs["two"].iterdir())
    s1, s2 = (json.loads((outs[n] / "summary.json").read_text()) for n in ("one", "two"))
    for k in ("n_tokens_attributed", "n_edges_attributed"):
        assert s1[k] == s2[k], k
    c1, c2 = s1["circuit"], s2["circuit"]
    for k in ("size", "m_full", "m_empty", "m_circuit", "faithfulness", "completeness"):
        assert c1[k] == pytest.approx(c2[k], rel=1e-6, abs=1e-9), k
    e1, e2 = (json.loads((outs[n] / "edges.json").read_text()) for n in ("one", "two"))
    assert e1["src"] == e2["src"] and e1["dst"] == e2["dst"] and e1["count"] == e2["count"]
    for k in ("weight", "abs_weight", "behav_weight"):
        torch.testing.assert_close(torch.tensor(e2[k]), torch.tensor(e1[k]), rtol=1e-5, atol=1e-7)
    g1, g2 = (CircuitGraph.load_json(outs[n] / "graph.json").g for n in ("one", "two"))
    assert sorted(g1.edges) == sorted(g2.edges)


def test_torchrun_follower_of_a_prompts_run_leaves_after_the_pairs(setup, tmp_path, monkeypatch):
    """Under torchrun a prompts (or task, --layers, --prompt) run shares nothing past the default
    pairs' training: the other ranks join that and leave, rank 0 alone runs and writes the rest."""
    import importlib

    import featcircuit.models
    import featcircuit.pairs
    from featcircuit.discover import DiscoverConfig

    disc = importlib.import_module("featcircuit.discover")  # the module (the package exports the function)
    root, data, model = setup
    p = tmp_path / "prompts.jsonl"
    pair = {"clean": "def add(a, b):\n    return a", "corrupt": "def add(b, a):\n    return a",
            "answer": " +", "wrong": " a"}
    p.write_text((json.dumps(pair) + "\n") * 6)

    def no(*a, **k):
        raise AssertionError("a follower of a prompts run must not run the pipeline")

    class Stop(Exception):
        pass

    def recorder(into):
        def default_pair(m, L, **k):
            into.append(int(L))
            return random_pair(m, int(L)), tmp_path
        return default_pair

    def stop(*a, **k):
        raise Stop

    # rank 0's own run, stopped just after its pairs (one layer: at the corpus load; --layers: at the
    # Replacement), against the follower's: the same default_pair calls, so their barriers pair
    real_run = disc._run
    monkeypatch.setattr("featcircuit.data.load_tokens", stop)
    monkeypatch.setattr("featcircuit.replacement.Replacement", stop)
    for extra in (dict(), dict(layers="1-2")):
        cfg = DiscoverConfig(model=model, layer=1, prompts=str(p), data=str(data), out=str(tmp_path / "o"),
                             progress=False, **extra)
        rank0: list[int] = []
        follower: list[int] = []
        monkeypatch.setattr(featcircuit.pairs, "default_pair", recorder(rank0))
        with pytest.raises(Stop):
            real_run(cfg, 0.0)
        monkeypatch.setattr(featcircuit.pairs, "default_pair", recorder(follower))
        monkeypatch.setattr(disc, "_run", no)
        assert disc._follow(cfg, 0.0) == {}
        monkeypatch.setattr(disc, "_run", real_run)
        assert follower == rank0 == ([1] if not extra else [1, 2])
    monkeypatch.setattr(disc, "_run", no)
    monkeypatch.setattr(featcircuit.models, "load_model", no)
    import dataclasses
    with_dicts = dataclasses.replace(cfg, layers=None, dicts=str(root / "pair1"))
    assert disc._follow(with_dicts, 0.0) == {}  # nothing shared: no model even loaded

    # the real thing: two ranks write what one process writes
    outs = {}
    torchrun = (str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2",
                "-m", "featcircuit")
    for name, launch in (("one", (sys.executable, "-m", "featcircuit")), ("two", torchrun)):
        args = [str(a) for a in base_args(setup, prompts=p, candidates=6)]
        args[args.index("--out") + 1] = str(tmp_path / name)
        r = run(*args, launch=launch)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.count("wrote ") == 1
        outs[name] = json.loads((tmp_path / name / "summary.json").read_text())["circuit"]
    for k in ("size", "m_full", "m_empty", "m_circuit", "faithfulness"):
        assert outs["one"][k] == pytest.approx(outs["two"][k], rel=1e-6, abs=1e-9), k
