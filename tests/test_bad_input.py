"""The bad-input battery: every command with malformed input answers exit 2, one line, no files.

Each row of ``CASES`` is one invocation: an id, the argv (``{name}`` placeholders are filled
from the fixtures built in ``ws``) and a fragment the one-line message must contain. A case
runs ``featcircuit.cli.main`` in-process (a traceback would fail the test as an exception),
with the working directory and the caches inside a scratch folder, and asserts:
exit code 2, exactly one non-empty line on stderr naming the problem, and no file created or
changed anywhere in the scratch folder. A few rows also run as a real subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from featcircuit.cli import main
from featcircuit.dictionary import DictConfig, Dictionary, save_pair
from featcircuit.models import canonical_name

BIG = str(2**64)
DEEP = "[" * 10_000 + "]" * 10_000


def _graph() -> dict:
    def node(nid, site, feat, label=None):
        return {"id": nid, "site": site, "layer": 1, "feature": feat, "label": label or nid,
                "freq": 0.1, "mean_act": 1.0, "max_act": 2.0, "effect": 0.5}

    return {"schema": "featcircuit.graph", "version": 1, "meta": {"model": "m", "layer": 1},
            "nodes": [node("resid1/0", "resid", 0), node("mlp1/3", "mlp", 3)],
            "edges": [{"source": "resid1/0", "target": "mlp1/3", "weight": 0.5, "abs_weight": 0.5,
                       "count": 3, "behav_weight": None, "delta": None}]}


def _pair(root: Path, model: str, name: str, d_in: int = 32, d_mlp: int = 128,
          edit=None) -> Path:
    torch.manual_seed(0)
    ds = []
    for site, w in (("resid", d_in), ("mlp", d_mlp)):
        ds.append(Dictionary(DictConfig(d_in=w, d_sae=64, k=4, model_name=model, layer=1, site=site)))
    out = save_pair(ds[0], ds[1], root / name)
    if edit:
        edit(out)
    return out


def _nan_weights(p: Path) -> None:
    from safetensors.torch import load_file, save_file

    f = p / "mlp" / "sae_weights.safetensors"
    t = load_file(f)
    t["W_enc"][0, 0] = float("nan")
    save_file(t, f)


def _inf_weights(p: Path) -> None:
    from safetensors.torch import load_file, save_file

    f = p / "resid" / "sae_weights.safetensors"
    t = load_file(f)
    t["b_dec"][1] = float("inf")
    save_file(t, f)


def _cfg_edit(change):
    def edit(p: Path) -> None:
        f = p / "mlp" / "cfg.json"
        f.write_text(change(f.read_text()))
    return edit


@pytest.fixture(scope="module")
def ws(tmp_path_factory, neox_dir):
    """A scratch workspace: tiny model, data, pairs (good and broken), graphs, prompts, odd paths."""
    root = tmp_path_factory.mktemp("bad_input")
    model = canonical_name(str(neox_dir))
    data = root / "data"
    data.mkdir()
    for i in range(12):
        (data / f"f{i}.txt").write_text(f"def f{i}(x, y):\n    return x * {i} + y\n" * 6)
    f = {"model": str(neox_dir), "data": str(data), "root": str(root)}
    f["pair"] = str(_pair(root, model, "pair"))
    f["nan_pair"] = str(_pair(root, model, "nan_pair", edit=_nan_weights))
    f["inf_pair"] = str(_pair(root, model, "inf_pair", edit=_inf_weights))
    f["wide_pair"] = str(_pair(root, model, "wide_pair", d_in=48, d_mlp=200))
    f["deep_pair"] = str(_pair(root, model, "deep_pair", edit=_cfg_edit(lambda t: t[:-2] + ', "x": ' + DEEP + "}")))
    f["bigint_pair"] = str(_pair(root, model, "bigint_pair",
                                 edit=_cfg_edit(lambda t: t.replace('"d_sae": 64', '"d_sae": ' + "9" * 5000))))
    f["nan_cfg_pair"] = str(_pair(root, model, "nan_cfg_pair",
                                  edit=_cfg_edit(lambda t: t.replace('"l1_coefficient": 0.0', '"l1_coefficient": NaN'))))
    f["file"] = str(root / "afile.txt")
    Path(f["file"]).write_text("not a folder\n")
    user = root / "userdir"
    user.mkdir()
    (user / "thesis.tex").write_text("precious\n")
    f["userdir"] = str(user)
    for name, text in {"bad_manifest": "{not json", "list_manifest": "[1, 2, 3]",
                       "deep_manifest": DEEP}.items():
        d = root / name
        d.mkdir()
        (d / "manifest.json").write_text(text)
        f[name] = str(d)
    graphs = {
        "graph_bigint": lambda g: json.dumps(g).replace('"count": 3', '"count": ' + "7" * 5000),
        "graph_deep": lambda g: DEEP,
        "graph_nan_meta": lambda g: json.dumps({**g, "meta": {"x": float("nan"), "layer": 1}}),
        "graph_long_label": lambda g: json.dumps(_set(g, ("nodes", 0, "label"), "x" * 17_000)),
        "graph_back_edge": lambda g: json.dumps(_set(_set(g, ("edges", 0, "source"), "mlp1/3"),
                                                     ("edges", 0, "target"), "resid1/0")),
        "graph_self_loop": lambda g: json.dumps(_set(g, ("edges", 0, "target"), "resid1/0")),
        "graph_neg_abs": lambda g: json.dumps(_set(g, ("edges", 0, "abs_weight"), -1.0)),
        "graph_neg_count": lambda g: json.dumps(_set(g, ("edges", 0, "count"), -4)),
        "graph_list": lambda g: "[]",
        "graph_good": lambda g: json.dumps(g),
    }
    for name, make in graphs.items():
        p = root / f"{name}.json"
        p.write_text(make(_graph()))
        f[name] = str(p)
    f["binary"] = str(root / "blob.bin")
    Path(f["binary"]).write_bytes(bytes(range(256)) * 4)
    prompts = {
        "prompts_number": '{"clean": "a b", "corrupt": "a c", "answer": 5, "wrong": " y"}\n',
        "prompts_missing": '{"clean": "a b", "corrupt": "a c", "answer": " x"}\n',
        "prompts_list": '[1, 2]\n',
        "prompts_empty": "\n\n",
        "prompts_good": '{"clean": "def f", "corrupt": "def g", "answer": "(", "wrong": ":"}\n',
        "prompts_long": json.dumps({"clean": "def add(a, b): " * 200, "corrupt": "def add(a, c): " * 200,
                                    "answer": "(", "wrong": ":"}) + "\n",
    }
    for name, text in prompts.items():
        p = root / f"{name}.jsonl"
        p.write_text(text)
        f[name] = str(p)
    (root / "work").mkdir()
    return f


def _set(d, path, value):
    d = json.loads(json.dumps(d))
    cur = d
    for k in path[:-1]:
        cur = cur[k]
    cur[path[-1]] = value
    return d


M = ["--model", "{model}"]
D = ["--data", "{data}", "--split", "all"]
H = ["harvest", *M, *D, "--layer", "1", "--n-ctx", "16", "--tokens", "256"]
T = ["train", *M, *D[:2], "--layer", "1", "--width", "2x", "--k", "4", "--tokens", "400",
     "--batch-size", "100"]
E = ["evaluate", *M, *D, "--tokens", "256"]
F = ["features", *M, *D, "--layer", "1", "--dicts", "{pair}", "--feature", "0", "--tokens", "256"]
R = ["render", "{graph_good}", "-o", "{root}/work/c.dot"]
X = ["discover", *M, *D, "--layer", "1"]

# id, argv, a fragment of the expected one-line message
CASES: list[tuple[str, list[str], str]] = [
    # top level and parser
    ("no-command", [], "required"),
    ("unknown-command", ["bogus"], "invalid choice"),
    ("unknown-option", ["train", "--bogus", "1"], "unrecognized arguments"),
    # model info / model train
    ("info-device-cuda-x", ["model", "info", "--device", "cuda:x"], "--device 'cuda:x' is not a device"),
    ("info-device-gpu", ["model", "info", "--device", "gpu"], "not a device"),
    ("info-missing-model", ["model", "info", "--model", "{root}/no-such-model"], "not available locally"),
    ("info-model-is-file", ["model", "info", "--model", "{file}"], "has no config.json"),
    ("lm-steps-0", ["model", "train", "--steps", "0", "--out", "{root}/work/m"], "--steps 0 is out of range"),
    ("lm-steps-neg", ["model", "train", "--steps", "-5", "--out", "{root}/work/m"], "--steps -5"),
    ("lm-steps-word", ["model", "train", "--steps", "abc"], "not an integer"),
    ("lm-seed-64bit", ["model", "train", "--seed", BIG, "--out", "{root}/work/m"], "--seed"),
    ("lm-out-file", ["model", "train", "--steps", "1", "--out", "{file}"], "is an existing file"),
    ("lm-out-userdir", ["model", "train", "--steps", "1", "--out", "{userdir}"], "did not write"),
    ("lm-out-proc", ["model", "train", "--steps", "1", "--out", "/proc/featcircuit-x"], "cannot write"),
    # harvest
    ("harvest-batch-0", [*H, "--batch-size", "0"], "--batch-size 0 is out of range"),
    ("harvest-batch-neg", [*H, "--batch-size", "-1"], "--batch-size -1"),
    ("harvest-chunk-0", [*H, "--chunk-size", "0"], "--chunk-size 0"),
    ("harvest-out-file", [*H, "--out", "{file}"], "is an existing file"),
    ("harvest-out-userdir", [*H, "--out", "{userdir}"], "did not write"),
    ("harvest-bad-manifest", [*H, "--out", "{bad_manifest}"], "not valid JSON"),
    ("harvest-list-manifest", [*H, "--out", "{list_manifest}"], "not a featcircuit manifest"),
    ("harvest-deep-manifest", [*H, "--out", "{deep_manifest}"], "nested more than"),
    ("harvest-n-ctx-beyond-model", [*H, "--n-ctx", "2048"], "beyond the 128 positions"),
    ("harvest-n-ctx-1", [*H, "--n-ctx", "1"], "--n-ctx 1 is out of range"),
    ("harvest-tokens-0", [*H, "--tokens", "0"], "--tokens 0"),
    ("harvest-tokens-below-ctx", [*H, "--tokens", "8"], "less than one context"),
    ("harvest-tokens-beyond-data", [*H, "--tokens", "1000000000"], "can hold"),
    ("harvest-layer-9", [*H, "--layer", "9"], "--layer 9 is out of range"),
    ("harvest-layer-neg", [*H, "--layer", "-1"], "--layer -1"),
    ("harvest-missing-data", ["harvest", *M, "--data", "{root}/nodata"], "not found"),
    ("harvest-bad-split", ["harvest", *M, "--data", "{data}", "--split", "test"], "unknown --split"),
    ("harvest-device", [*H, "--device", "cuda:x"], "not a device"),
    ("harvest-fullwidth-int", [*H, "--batch-size", "１２"], "not an integer"),
    # train
    ("train-batch-0", [*T, "--batch-size", "0"], "--batch-size 0"),
    ("train-epochs-neg", [*T, "--epochs", "-1"], "--epochs -1"),
    ("train-epochs-0", [*T, "--epochs", "0"], "--epochs 0"),
    ("train-width-nan", [*T, "--width", "nan"], "not a finite number"),
    ("train-width-0", [*T, "--width", "0"], "--width 0 is out of range"),
    ("train-width-neg", [*T, "--width=-2x"], "--width -2"),
    ("train-width-tiny", [*T, "--width", "0.01"], "fewer than --k"),
    ("train-l1-nan", [*T, "--l1", "nan"], "not a finite number"),
    ("train-l1-neg", [*T, "--l1", "-1"], "--l1 -1"),
    ("train-l1-inf", [*T, "--l1", "inf"], "not a finite number"),
    ("train-k-0", [*T, "--k", "0"], "--k 0"),
    ("train-k-superscript", [*T, "--k", "²"], "not an integer"),
    ("train-arch", [*T, "--arch", "jumprelu"], "invalid choice"),
    ("train-tokens-below-batch", [*T, "--tokens", "50"], "less than one batch"),
    ("train-seed-2-63", [*T, "--seed", str(2**63)], "--seed"),
    ("train-seed-float", [*T, "--seed", "1.5"], "not an integer"),
    ("train-out-file", [*T, "--out", "{file}"], "is an existing file"),
    ("train-out-userdir", [*T, "--out", "{userdir}"], "did not write"),
    ("train-layer-9", [*T, "--layer", "9"], "out of range"),
    ("train-ckpt-every-0", [*T, "--ckpt-every", "0"], "--ckpt-every 0"),
    # evaluate
    ("eval-missing-dicts", [*E, "--dicts", "{root}/nope"], "not a folder"),
    ("eval-dicts-file", [*E, "--dicts", "{file}"], "not a folder"),
    ("eval-nan-weights", [*E, "--dicts", "{nan_pair}"], "NaN or infinite"),
    ("eval-inf-weights", [*E, "--dicts", "{inf_pair}"], "NaN or infinite"),
    ("eval-deep-cfg", [*E, "--dicts", "{deep_pair}"], "nested more than"),
    ("eval-bigint-cfg", [*E, "--dicts", "{bigint_pair}"], "digits"),
    ("eval-nan-cfg", [*E, "--dicts", "{nan_cfg_pair}"], "NaN is not valid JSON"),
    ("eval-width-mismatch", [*E, "--dicts", "{wide_pair}"], "expected d_in 32"),
    ("eval-tokens-0", [*E, "--dicts", "{pair}", "--tokens", "0"], "--tokens 0"),
    ("eval-layer-5", [*E, "--dicts", "{pair}", "--layer", "5"], "out of range"),
    # features
    ("features-bins-neg", [*F, "--bins", "-2"], "--bins -2"),
    ("features-bins-0", [*F, "--bins", "0"], "--bins 0"),
    ("features-top-neg", [*F, "--top", "-3"], "--top -3"),
    ("features-window-neg", [*F, "--removal-window", "-4"], "--removal-window -4"),
    ("features-feature-neg", [*F[:-4], "--feature", "-1"], "--feature -1"),
    ("features-feature-beyond", [*F[:-4], "--feature", "9999", "--tokens", "256"], "--feature 9999 is out of range"),
    ("features-site", [*F, "--site", "attn"], "invalid choice"),
    ("features-nan-dicts", [*F[:-6], "--dicts", "{nan_pair}", "--feature", "0", "--tokens", "256"], "NaN or infinite"),
    # render
    ("render-bigint", ["render", "{graph_bigint}", "-o", "{root}/work/c.dot"], "digits"),
    ("render-deep", ["render", "{graph_deep}", "-o", "{root}/work/c.dot"], "nested more than"),
    ("render-nan-meta", ["render", "{graph_nan_meta}", "-o", "{root}/work/c.dot"], "NaN is not valid JSON"),
    ("render-long-label", ["render", "{graph_long_label}", "-o", "{root}/work/c.svg"], "label of 17,000"),
    ("render-back-edge", ["render", "{graph_back_edge}", "-o", "{root}/work/c.dot"], "not a circuit edge"),
    ("render-self-loop", ["render", "{graph_self_loop}", "-o", "{root}/work/c.dot"], "not a circuit edge"),
    ("render-neg-abs", ["render", "{graph_neg_abs}", "-o", "{root}/work/c.dot"], "expected >= 0"),
    ("render-neg-count", ["render", "{graph_neg_count}", "-o", "{root}/work/c.dot"], "expected >= 0"),
    ("render-list", ["render", "{graph_list}", "-o", "{root}/work/c.dot"], "expected a JSON object"),
    ("render-dev-zero", ["render", "/dev/zero", "-o", "{root}/work/c.dot"], "not a regular file"),
    ("render-binary", ["render", "{binary}", "-o", "{root}/work/c.dot"], "not UTF-8"),
    ("render-missing", ["render", "{root}/none.json", "-o", "{root}/work/c.dot"], "not found"),
    ("render-folder-input", ["render", "{root}", "-o", "{root}/work/c.dot"], "is a folder"),
    ("render-out-folder", ["render", "{graph_good}", "-o", "{userdir}"], "suffix"),
    ("render-out-folder-svg", ["render", "{graph_good}", "-o", "{root}/work"], "suffix"),
    ("render-out-proc", [*R[:2], "-o", "/proc/x/c.svg"], "cannot write"),
    ("render-out-suffix", [*R[:2], "-o", "{root}/work/c.txt"], "suffix"),
    ("render-top-neg", [*R, "--top-edges", "-1"], "--top-edges -1"),
    ("render-threshold-nan", [*R, "--edge-threshold", "nan"], "not a finite number"),
    ("render-threshold-neg", [*R, "--node-threshold", "-0.5"], "out of range"),
    # discover (flags that exist now)
    ("discover-device", [*X, "--device", "cuda:x"], "not a device"),
    ("discover-seed-64bit", [*X, "--seed", BIG], "--seed"),
    ("discover-target-superscript", [*X, "--target", "mlp:²"], "bad --target"),
    ("discover-target-fullwidth", [*X, "--target", "mlp:１２"], "bad --target"),
    ("discover-target-word", [*X, "--target", "resid:3"], "bad --target"),
    ("discover-out-file", [*X, "--out", "{file}"], "is an existing file"),
    ("discover-out-userdir", [*X, "--out", "{userdir}"], "did not write"),
    ("discover-out-proc", [*X, "--out", "/proc/featcircuit"], "cannot write"),
    ("discover-prompts-number", [*X, "--prompts", "{prompts_number}"], "expected a non-empty string"),
    ("discover-prompts-missing-key", [*X, "--prompts", "{prompts_missing}"], "has no 'wrong'"),
    ("discover-prompts-list", [*X, "--prompts", "{prompts_list}"], "not a JSON object"),
    ("discover-prompts-empty", [*X, "--prompts", "{prompts_empty}"], "holds no prompts"),
    ("discover-prompts-binary", [*X, "--prompts", "{binary}"], "not UTF-8"),
    ("discover-prompts-metric", [*X, "--prompts", "{prompts_good}", "--metric", "kl"], "--metric"),
    ("discover-prompts-too-long", [*X, "--prompts", "{prompts_long}"], "beyond the 128 positions"),
    ("discover-target-beyond", [*X, "--target", "mlp:64", "--dicts", "{pair}"], "features 0..63"),
    ("discover-target-beyond-default", [*X, "--target", "mlp:100000"], "unknown target feature"),
    ("discover-tokens-huge", [*X, "--tokens", "1000000000000"], "--tokens"),
    ("discover-tokens-beyond-data", [*X, "--tokens", "5000000"], "can hold"),
    ("discover-tau-neg", [*X, "--tau", "-1"], "--tau -1"),
    ("discover-tau-nan", [*X, "--tau", "nan"], "not a finite number"),
    ("discover-layer-9", [*X, "--layer", "9"], "out of range"),
    ("discover-missing-model", ["discover", "--model", "{root}/no-model"], "not available locally"),
    ("discover-missing-dicts", [*X, "--dicts", "{root}/nope"], "not a folder"),
    ("discover-nan-dicts", [*X, "--dicts", "{nan_pair}", "--out", "{root}/work/d"], "NaN or infinite"),
    ("discover-search", [*X, "--search", "greedy"], "--search: invalid choice: 'greedy' (choose from 'acdc', 'none')"),
    ("discover-candidates-0", [*X, "--candidates", "0"], "--candidates 0"),
]


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def _fill(argv: list[str], ws: dict) -> list[str]:
    return [a.format(**ws) for a in argv]


def test_battery_is_large_and_unique():
    assert len(CASES) >= 60
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("argv,fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(argv, fragment, ws, capsys, monkeypatch):
    root = Path(ws["root"])
    monkeypatch.chdir(root / "work")
    monkeypatch.setenv("FEATCIRCUIT_CACHE", str(root / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = _snapshot(root)
    try:
        code = main(_fill(argv, ws))
    except SystemExit as e:  # argparse's error() exits
        code = e.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err[-2000:]
    assert len(lines) == 1, err[-2000:]
    assert lines[0].startswith("featcircuit: error: ") and "Traceback" not in err
    assert fragment in lines[0], lines[0]
    assert _snapshot(root) == before, "a rejected command created or changed files"


@pytest.mark.parametrize("case", ["train-epochs-neg", "render-dev-zero", "discover-target-superscript"])
def test_bad_input_real_process(case, ws, tmp_path):
    """The console entry point itself: exit code 2 and one line, as a separate process."""
    argv = _fill(dict((c[0], c[1]) for c in CASES)[case], ws)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FEATCIRCUIT_CACHE": str(tmp_path / "c")}
    r = subprocess.run([sys.executable, "-m", "featcircuit", *argv], capture_output=True, text=True,
                       env=env, cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and list(tmp_path.iterdir()) == []
