"""Steering means what it says: checked against hooks through the model's own modules and weights."""

import json
import re

import pytest
import torch

from featcircuit import UserError
from featcircuit.dictionary import DictConfig, Dictionary
from featcircuit.sites import mlp_parts, resolve_site
from featcircuit.steer import (
    FeatureRef,
    Steering,
    parse_feature,
    parse_positions,
    resolve_positions,
    run_steered,
    steer,
)
from featcircuit.tasks import TaskPrompts

ATOL = 2e-5


def _data(model, n=4, ctx=12, seed=0):
    return torch.randint(0, model.cfg.d_vocab, (n, ctx), generator=torch.Generator().manual_seed(seed))


def _dict(d_in, site, layer, arch="relu", seed=0):
    d = Dictionary(DictConfig(d_in=d_in, d_sae=3 * d_in, architecture=arch, k=5, site=site, layer=layer),
                   seed=seed)
    with torch.no_grad():  # a bias so that ReLU features fire on about half the tokens
        d.b_enc.copy_(torch.linspace(-0.2, 0.2, d.cfg.d_sae))
    return d.eval()


def _adder(vec, positions=None):
    """A hook adding ``vec`` at ``positions`` (None: every position after BOS), written independently."""
    def hook(act, hook=None):
        out = act.clone()
        idx = range(1, act.shape[1]) if positions is None else [p % act.shape[1] for p in positions]
        for p in idx:
            out[:, p] = out[:, p] + vec
        return out
    return hook


@pytest.mark.parametrize("positions", [None, (3, -1)])
def test_add_at_mlp_equals_adding_its_image_under_W_out(tiny_model, positions):
    """α·m_j added at the mid-MLP = α·(m_j W_out) added to the MLP output (the model's own W_out)."""
    toks = _data(tiny_model)
    site = resolve_site(tiny_model, 1, "mlp")
    d = _dict(site.width, "mlp", 1)
    alpha, j = 3.0, 7
    st = Steering(site, d, j, "add", alpha, positions)
    got = run_steered(tiny_model, toks, st)
    ref = tiny_model.run_with_hooks(toks, fwd_hooks=[(
        "blocks.1.hook_mlp_out", _adder(alpha * (d.W_dec[j] @ mlp_parts(tiny_model, 1).W_out), positions))])
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=ATOL)
    clean = tiny_model(toks)
    assert (got - clean).abs().max() > 100 * ATOL  # the intervention does something
    if positions is not None:  # and only from its first position on
        torch.testing.assert_close(got[:, :3], clean[:, :3], rtol=0, atol=1e-6)


def test_add_at_resid_equals_adding_to_what_writes_that_residual(tiny_model):
    """resid(1) is what block 0 leaves (parallel: + mlp_out(0)) or resid_mid(1) (sequential: + attn_out(1))."""
    toks = _data(tiny_model)
    site = resolve_site(tiny_model, 1, "resid")
    d = _dict(site.width, "resid", 1, arch="topk")
    alpha, j = -2.5, 11
    writer = "blocks.0.hook_mlp_out" if site.hook.endswith("resid_pre") else "blocks.1.hook_attn_out"
    got = run_steered(tiny_model, toks, Steering(site, d, j, "add", alpha))
    ref = tiny_model.run_with_hooks(toks, fwd_hooks=[(writer, _adder(alpha * d.W_dec[j]))])
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=ATOL)
    assert (got - tiny_model(toks)).abs().max() > 100 * ATOL


def test_resid_steering_reaches_the_residual_skip_as_well_as_the_mlp(gpt2):
    """Sequential block: after it the residual is clean + α·r_j + the MLP's response, not only the MLP moved.

    (In the TransformerBridge, GPT-2's hook_resid_mid is LN2's input; an edit there alone leaves the
    skip clean, which this test would catch.)
    """
    from featcircuit.activations import harvest

    toks = _data(gpt2, n=2)
    site = resolve_site(gpt2, 1, "resid")
    assert site.hook == "blocks.1.hook_resid_mid"
    d = _dict(site.width, "resid", 1, arch="topk")
    st = Steering(site, d, 4, "add", 3.0, (2,))
    post, mlp_out = "blocks.1.hook_resid_post", "blocks.1.hook_mlp_out"
    clean = harvest(gpt2, toks, [post, mlp_out], progress=False)
    seen = {}

    def keep(name):
        def hook(act, hook=None):
            seen[name] = act.detach().clone()
            return act
        return hook

    gpt2.run_with_hooks(toks, fwd_hooks=st.fwd_hooks() + [(post, keep(post)), (mlp_out, keep(mlp_out))])
    assert (seen[mlp_out] - clean[mlp_out]).abs().max() > 1e-3  # the MLP read the steered residual
    want = clean[post] + (seen[mlp_out] - clean[mlp_out])
    want[:, 2] += 3.0 * d.W_dec[4]
    torch.testing.assert_close(seen[post], want, rtol=1e-5, atol=1e-5)


def test_clamp_at_resid_uses_the_residual_the_mlp_reads(tiny_model):
    """Clamping a resid feature to its clean code (read at the MLP's input) changes nothing."""
    toks = _data(tiny_model, n=1)
    site = resolve_site(tiny_model, 1, "resid")
    d = _dict(site.width, "resid", 1)
    _, codes = _active(tiny_model, d, site, toks)
    j = int(codes[0, 4].argmax())
    clean = tiny_model(toks)
    same = run_steered(tiny_model, toks, Steering(site, d, j, "clamp", float(codes[0, 4, j]), (4,)))
    torch.testing.assert_close(same, clean, rtol=0, atol=1e-5)
    moved = run_steered(tiny_model, toks, Steering(site, d, j, "clamp", float(codes[0, 4, j]) + 2.0, (4,)))
    assert (moved - clean).abs().max() > 100 * ATOL


def _active(model, d, site, toks):
    from featcircuit.activations import harvest

    a = harvest(model, toks, [site.hook], progress=False)[site.hook]
    with torch.no_grad():
        return a, d.encode(a)


def test_clamp_to_the_clean_code_is_a_no_op_and_to_another_value_is_not(tiny_model):
    toks = _data(tiny_model, n=1)
    site = resolve_site(tiny_model, 1, "mlp")
    d = _dict(site.width, "mlp", 1)
    _, codes = _active(tiny_model, d, site, toks)
    p = 5
    j = int(codes[0, p].argmax())
    v = float(codes[0, p, j])
    assert v > 0
    clean = tiny_model(toks)
    same = run_steered(tiny_model, toks, Steering(site, d, j, "clamp", v, (p,)))
    assert torch.equal(same, clean)
    other = run_steered(tiny_model, toks, Steering(site, d, j, "clamp", v, None))  # v at every position
    assert (other - clean).abs().max() > 100 * ATOL


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_clamp_is_encode_set_decode_keeping_the_error(tiny_model, arch):
    """Clamp j to v at mid-MLP ≡ a literal encode→set→decode + error hook ≡ ((v−c_j)·m_j) W_out at the MLP output."""
    toks = _data(tiny_model)
    site = resolve_site(tiny_model, 1, "mlp")
    d = _dict(site.width, "mlp", 1, arch=arch, seed=3)
    _, codes = _active(tiny_model, d, site, toks)
    j = int((codes[:, 1:] > 0).sum((0, 1)).argmax())  # the most frequent feature: it varies by token
    v = 2.0

    def literal(act, hook=None):
        out = act.clone()
        c = d.encode(act[:, 1:])
        err = act[:, 1:] - d.decode(c)
        c = c.clone()
        c[..., j] = v
        out[:, 1:] = d.decode(c) + err
        return out

    got = run_steered(tiny_model, toks, Steering(site, d, j, "clamp", v))
    ref = tiny_model.run_with_hooks(toks, fwd_hooks=[(site.hook, literal)])
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=ATOL)
    W_out = mlp_parts(tiny_model, 1).W_out
    change = ((v - codes[:, :, j])[..., None] * d.W_dec[j]) @ W_out  # per token, from the clean codes

    def through_w_out(act, hook=None):
        out = act.clone()
        out[:, 1:] = act[:, 1:] + change[:, 1:]
        return out

    ref2 = tiny_model.run_with_hooks(toks, fwd_hooks=[("blocks.1.hook_mlp_out", through_w_out)])
    torch.testing.assert_close(got, ref2, rtol=1e-4, atol=ATOL)


def _task(model, n=6, ctx=10):
    toks = _data(model, n=n, ctx=ctx, seed=4)
    g = torch.Generator().manual_seed(5)
    ans = torch.randint(0, model.cfg.d_vocab, (n,), generator=g)
    wrong = (ans + 1) % model.cfg.d_vocab
    return TaskPrompts("toy", toks, toks.clone(), ans, wrong)


def _greedy(model, toks, hooks, n):
    for _ in range(n):
        logits = model.run_with_hooks(toks, fwd_hooks=hooks) if hooks else model(toks)
        toks = torch.cat([toks, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return toks


def test_steer_reports_task_next_token_and_generation_against_references(neox):
    task = _task(neox)
    site = resolve_site(neox, 1, "mlp")
    d = _dict(site.width, "mlp", 1)
    alpha, j = 4.0, 2
    st = Steering(site, d, j, "add", alpha)
    res = steer(neox, st, task=task, max_new_tokens=4, top=3, progress=False)
    hooks = [("blocks.1.hook_mlp_out", _adder(alpha * (d.W_dec[j] @ mlp_parts(neox, 1).W_out)))]
    with torch.no_grad():
        before, after = neox(task.clean), neox.run_with_hooks(task.clean, fwd_hooks=hooks)
    ld0 = (before[:, -1].gather(1, task.answer[:, None]) - before[:, -1].gather(1, task.wrong[:, None])).mean()
    ld1 = (after[:, -1].gather(1, task.answer[:, None]) - after[:, -1].gather(1, task.wrong[:, None])).mean()
    t = res["task"]
    assert t["before"] == pytest.approx(float(ld0), abs=1e-4)
    assert t["after"] == pytest.approx(float(ld1), abs=1e-4)
    assert t["delta"] == pytest.approx(float(ld1 - ld0), abs=1e-4) and abs(t["delta"]) > 1e-3
    lp0, lp1 = before[:, -1].double().log_softmax(-1), after[:, -1].double().log_softmax(-1)
    kl = float((lp0.exp() * (lp0 - lp1)).sum(-1).mean())
    nt = res["next_token_task"]
    assert nt["kl"] == pytest.approx(kl, rel=1e-3, abs=1e-7) and nt["kl"] > 0
    dp = lp1.exp().mean(0) - lp0.exp().mean(0)
    assert nt["rose"][0]["id"] == int(dp.argmax()) and nt["fell"][0]["id"] == int(dp.argmin())
    assert nt["rose"][0]["delta"] == pytest.approx(float(dp.max()), abs=1e-6)
    g = res["generation"]  # the first task prompt continued, plainly and with the hook
    assert g["before_ids"] == _greedy(neox, task.clean[:1], None, 4)[0, -4:].tolist()
    assert g["after_ids"] == _greedy(neox, task.clean[:1], hooks, 4)[0, -4:].tolist()
    zero = steer(neox, Steering(site, d, j, "add", 0.0), task=task, max_new_tokens=4, progress=False)
    assert zero["task"]["delta"] == 0.0 and zero["next_token_task"]["kl"] == 0.0
    assert zero["generation"]["after_ids"] == zero["generation"]["before_ids"]


def test_prompt_mode_positions_stay_on_the_prompt_during_generation(neox):
    site = resolve_site(neox, 1, "mlp")
    d = _dict(site.width, "mlp", 1)
    st = Steering(site, d, 2, "add", 6.0, (-1,))
    res = steer(neox, st, prompt="def add(a, b):", max_new_tokens=3, progress=False)
    from featcircuit.steer import encode_prompt

    toks = encode_prompt(neox, "def add(a, b):")
    n = toks.shape[1]
    hooks = [("blocks.1.hook_mlp_out", _adder(6.0 * (d.W_dec[2] @ mlp_parts(neox, 1).W_out), [n - 1]))]
    assert res["generation"]["after_ids"] == _greedy(neox, toks, hooks, 3)[0, n:].tolist()
    assert "task" not in res and res["next_token"]["kl"] > 0


def test_parsing_and_bad_values(neox):
    assert parse_feature("mlp2/123") == FeatureRef("mlp", 2, 123)
    assert parse_feature("resid0/7") == FeatureRef("resid", 0, 7)
    assert parse_feature("attn_out1/5") == FeatureRef("attn_out", 1, 5)
    assert str(parse_feature("mlp_out3/0")) == "mlp_out3/0"
    for bad in ("mlp2:123", "mlp/1", "mlp02/1", "mlp2/-1", "logit/5", "mlp2/x", ""):
        with pytest.raises(UserError, match="is not a feature id: expected SITE"):
            parse_feature(bad)
    with pytest.raises(UserError, match="is an error node"):
        parse_feature("mlp2/err")
    assert parse_positions("all") is None and parse_positions("last") == (-1,)
    assert parse_positions("3, 5,-1,3") == (3, 5, -1)
    with pytest.raises(UserError, match=r"--positions '1\.\.3' is not a position list"):
        parse_positions("1..3")
    assert resolve_positions((-1, 2), 6) == [2, 5] and resolve_positions(None, 4) == [1, 2, 3]
    with pytest.raises(UserError, match="position 6 is outside a prompt of 6 tokens: use -6..5"):
        resolve_positions((6,), 6)
    site = resolve_site(neox, 1, "mlp")
    d = _dict(site.width, "mlp", 1)
    with pytest.raises(UserError, match=r"feature 999 is out of range: .* features 0\.\.383"):
        Steering(site, d, 999)
    with pytest.raises(UserError, match="steering mode 'set' is unknown"):
        Steering(site, d, 1, "set")
    with pytest.raises(UserError, match="position 40 is outside"):
        steer(neox, Steering(site, d, 1, "add", 1.0, (40,)), prompt="def f(x):", progress=False)
    with pytest.raises(UserError, match="nothing to steer on"):
        steer(neox, Steering(site, d, 1), progress=False)
    with pytest.raises(UserError, match=f"plus --max-new-tokens 100000 exceeds the model's {neox.cfg.n_ctx} positions"):
        steer(neox, Steering(site, d, 1), prompt="def f(x):", max_new_tokens=100_000, progress=False)


# ---- the command line ------------------------------------------------------------------------

@pytest.mark.parametrize("argv, msg", [
    (["steer", "mlp2:3", "--prompt", "x"], "feature 'mlp2:3' is not a feature id"),
    (["steer", "mlp2/err", "--prompt", "x"], "is an error node"),
    (["steer", "mlp2/3", "--prompt", "x", "--positions", "a"], "--positions 'a' is not a position list"),
    (["steer", "mlp2/3"], "nothing to steer on"),
    (["steer", "mlp2/3", "--task", "nope"], "--task 'nope' is unknown: built-in tasks are docstring"),
    (["steer", "mlp2/3", "--prompt", "x", "--scale", "1", "--value", "2"], "give one magnitude"),
    (["steer", "mlp2/3", "--prompt", "x", "--scale", "nan"], "--scale 'nan' is not a finite number"),
    (["steer", "mlp9/3", "--prompt", "x"], r"feature mlp9/3: layer 9 is out of range: model 'stdlib-neox' has layers 0\.\.3"),
    (["steer", "attn_out1/3", "--prompt", "x"], "is at site attn_out: pass --dicts FOLDER"),
    (["steer", "mlp1/3", "--prompt", "x", "--mode", "set"], "invalid choice: 'set'"),
])
def test_cli_bad_input_is_one_line_before_the_model_loads(monkeypatch, capsys, argv, msg):
    import featcircuit.models as M
    from featcircuit.cli import main

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(M, "load_model", boom)
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("featcircuit: error:")
    assert re.search(msg, err), err


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("steer_data")
    for i in range(30):
        (d / f"f{i}.txt").write_text(f"def f{i}(x, y):\n    return x * {i} + y\n" * 8)
    return d


def test_cli_train_site_then_evaluate(neox_dir, text_dir, tmp_path, capsys):
    """`train --site mlp_out` writes a one-dictionary SAELens folder; `evaluate --dicts` scores that site."""
    from featcircuit.cli import main

    folder = tmp_path / "mlp_out1"
    argv = ["train", "--model", str(neox_dir), "--site", "mlp_out", "--layer", "1", "--data", str(text_dir),
            "--tokens", "1500", "--batch-size", "100", "--epochs", "1", "--width", "2x", "--k", "4",
            "--out", str(folder)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"to {folder}" in out and "blocks.1.hook_mlp_out" in out
    cfg = json.loads((folder / "cfg.json").read_text())
    assert (cfg["site"], cfg["layer"], cfg["hook_name"], cfg["d_in"], cfg["d_sae"], cfg["k"]) == (
        "mlp_out", 1, "blocks.1.hook_mlp_out", 32, 64, 4)
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae_weights.safetensors", "train_config.json"]
    assert main(argv) == 0 and "already trained" in capsys.readouterr().out
    assert main(["evaluate", "--model", str(neox_dir), "--dicts", str(folder), "--data", str(text_dir),
                 "--split", "all", "--tokens", "512", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["site"] == {"name": "mlp_out", "layer": 1, "hook": "blocks.1.hook_mlp_out"}
    assert ev["sites"]["mlp_out"]["l0"] <= 4 and ev["downstream"]["n_tokens"] > 0
    bad = [(["train", "--model", str(neox_dir), "--site", "nowhere", "--layer", "1"], "--site 'nowhere' is not a site"),
           (["train", "--model", str(neox_dir), "--site", "attn_out", "--layer", "1", "--jacobian", "0.1"],
            "needs the resid/mlp pair"),
           (["evaluate", "--model", str(neox_dir), "--dicts", str(folder), "--layers", "0-1"],
            "one-dictionary folder: evaluate it alone"),
           (["evaluate", "--model", str(neox_dir)], "nothing to evaluate"),
           (["evaluate", "--model", str(neox_dir), "--layers", "0-7"], r"--layers '0-7': layer 7 is out of range"),
           (["evaluate", "--model", str(neox_dir), "--layers", "1", "--layer", "1"], "pass one of them")]
    for argv, msg in bad:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and re.search(msg, err), (argv, err)


def test_builtin_out_site_dictionary_trains_evaluates_and_steers(builtin, tmp_path, capsys):
    """A tiny attn_out dictionary on the built-in model: trained, evaluated, then steered from the CLI."""
    from featcircuit.cli import main
    from featcircuit.data import BUILTIN_DATA, load_tokens
    from featcircuit.evaluation import evaluate_site
    from featcircuit.site_training import train_site
    from featcircuit.training import TrainConfig

    site = resolve_site(builtin, 1, "attn_out")
    folder = tmp_path / "attn1"
    tokens = load_tokens(BUILTIN_DATA, builtin, n_ctx=128, n_tokens=64 * 128, split="train")
    cfg = TrainConfig(width=1.0, k=8, tokens=8000, batch_size=200, epochs=2)
    d = train_site(builtin, site, tokens, cfg, out=folder, progress=False)
    ev = evaluate_site(builtin, d, site, load_tokens(BUILTIN_DATA, builtin, n_tokens=1024, split="heldout"),
                       progress=False)
    assert ev["sites"]["attn_out"]["variance_explained"] > 0.2
    assert ev["sites"]["attn_out"]["l0"] == pytest.approx(8.0)
    row = ev["downstream"]["attn_out"]
    assert ev["downstream"]["ce_clean"] < row["ce_spliced"] < row["ce_zero"]
    assert row["recovered_vs_zero"] > 0.2
    res_file = tmp_path / "steer.json"
    assert main(["steer", "attn_out1/0", "--dicts", str(folder), "--task", "docstring", "--pairs", "4",
                 "--prompt", "def f(x):", "--scale", "10", "--tokens", "1024", "--max-new-tokens", "3",
                 "--device", "cpu", "--out", str(res_file)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {res_file}" in out and "logit difference" in out
    res = json.loads(res_file.read_text())
    assert res["feature"] == "attn_out1/0" and res["task"]["pairs"] == 4 and res["scale"] == 10
    assert res["value"] == pytest.approx(10 * res["typical_activation"]["mean_active"])
    assert res["next_token"]["kl"] > 0 and len(res["generation"]["after_ids"]) == 3
    assert main(["steer", "attn_out1/128", "--dicts", str(folder), "--prompt", "x"]) == 2
    assert "features 0..127" in capsys.readouterr().err
