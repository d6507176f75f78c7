"""``featcircuit discover`` end to end on a tiny model, and its bad inputs (exit code 2)."""

import json
import subprocess
import sys

import pytest

from featcircuit.graph import CircuitGraph
from featcircuit.training import TrainConfig, train_pair


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


def run(*args):
    return subprocess.run([sys.executable, "-m", "featcircuit", *map(str, args)], capture_output=True,
                          text=True,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})


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
    (dict(search="greedy"), "unknown --search 'greedy'"),
    (dict(metric="bleu"), "unknown --metric 'bleu'"),
    (dict(ablation="resample"), "unknown --ablation 'resample'"),
    (dict(ablation="patch"), "--ablation patch needs corrupt prompts"),
    (dict(task="nope"), "unknown task 'nope'"),
    (dict(tau_sweep="0.1,x"), "bad --tau-sweep"),
    (dict(errors="some"), "unknown --errors 'some'"),
    (dict(tau=-1), "--tau"),
    (dict(candidates=0), "--candidates"),
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
