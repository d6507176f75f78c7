"""Evaluation across layers and at any site, against a forward with hand-written splicing hooks."""

import pytest
import torch

from featcircuit import UserError
from featcircuit.dictionary import DictConfig, Dictionary, Pair
from featcircuit.evaluation import evaluate_layers, evaluate_pair, evaluate_site
from featcircuit.replacement import Replacement
from featcircuit.sites import pair_sites, resolve_site
from featcircuit.splicing import site_hooks


def _data(model, n=5, ctx=14, seed=0):
    return torch.randint(0, model.cfg.d_vocab, (n, ctx), generator=torch.Generator().manual_seed(seed))


def _random_dict(d_in, site, layer, seed, k=6):
    d = Dictionary(DictConfig(d_in=d_in, d_sae=4 * d_in, architecture="topk", k=k, site=site, layer=layer),
                   seed=seed)
    return d.eval()


def _identity(d_in, site, layer):
    d = Dictionary(DictConfig(d_in=d_in, d_sae=2 * d_in, architecture="relu", site=site, layer=layer))
    eye = torch.eye(d_in)
    with torch.no_grad():
        d.W_enc.copy_(torch.cat([eye, -eye], 1))
        d.W_dec.copy_(torch.cat([eye, -eye], 0))
    return d.eval()


def _pairs(model, layers, seed=0):
    out = {}
    for layer in layers:
        r, m = pair_sites(model, layer)
        out[layer] = Pair(_random_dict(r.width, "resid", layer, seed + 2 * layer),
                          _random_dict(m.width, "mlp", layer, seed + 2 * layer + 1))
    return out


@torch.no_grad()
def _reference(model, tokens, replace):
    """Mean next-token CE and KL(clean ‖ run) with ``replace[hook](act)`` at positions ≥ 1."""
    def make(fn):
        def hook(act, hook=None):
            out = act.clone()
            out[:, 1:] = fn(act[:, 1:])
            return out
        return hook

    clean = torch.log_softmax(model(tokens)[:, :-1].double(), -1)
    # site_hooks: on sequential blocks the mid residual itself is replaced (the bridge's
    # hook_resid_mid alone only feeds LN2)
    logits = model.run_with_hooks(tokens, fwd_hooks=[x for h, f in replace.items() for x in site_hooks(h, make(f))])
    logp = torch.log_softmax(logits[:, :-1].double(), -1)
    tgt = tokens[:, 1:, None]
    ce = float(-logp.gather(-1, tgt).mean())
    kl = float((clean.exp() * (clean - logp)).sum(-1).mean())
    return ce, kl


def test_all_layers_spliced_at_once_equals_a_hooked_forward(tiny_model):
    toks = _data(tiny_model)
    pairs = _pairs(tiny_model, [0, 2])
    ev = evaluate_layers(tiny_model, pairs, toks, progress=False)
    assert [row["layer"] for row in ev["layers"]] == [0, 2] and ev["all"]["layers"] == [0, 2]
    rep = {}
    for layer, p in pairs.items():
        r, m = pair_sites(tiny_model, layer)
        rep[r.hook] = lambda a, d=p.resid: d.decode(d.encode(a))
        rep[m.hook] = lambda a, d=p.mlp: d.decode(d.encode(a))
    ce, kl = _reference(tiny_model, toks, rep)
    assert ev["all"]["ce_spliced"] == pytest.approx(ce, rel=1e-4)
    assert ev["all"]["kl_spliced"] == pytest.approx(kl, rel=1e-3, abs=1e-6)
    ce_zero, _ = _reference(tiny_model, toks, {h: torch.zeros_like for h in rep})
    assert ev["all"]["ce_zero"] == pytest.approx(ce_zero, rel=1e-4)
    assert ev["all"]["recovered_vs_zero"] == pytest.approx((ce_zero - ce) / (ce_zero - ev["ce_clean"]), rel=1e-3)
    # all four at once differ from any one layer's pair: the row is not a copy of one layer's
    assert all(abs(ev["all"]["kl_spliced"] - row["downstream"]["both"]["kl_spliced"]) > 1e-4
               for row in ev["layers"])


def test_each_layer_matches_evaluate_pair(neox):
    toks = _data(neox)
    pairs = _pairs(neox, [0, 1])
    ev = evaluate_layers(neox, pairs, toks, progress=False)
    for row in ev["layers"]:
        one = evaluate_pair(Replacement(neox, {row["layer"]: pairs[row["layer"]]}), toks, progress=False)
        for site in ("resid", "mlp"):
            for k, v in one["sites"][site].items():
                assert row["sites"][site][k] == pytest.approx(v, rel=1e-5, abs=1e-7), (site, k)
        for w in ("resid", "mlp", "both"):
            for k, v in one["downstream"][w].items():
                assert row["downstream"][w][k] == pytest.approx(v, rel=1e-5, abs=1e-7), (w, k)


def test_identity_everywhere_recovers_everything_and_one_zero_site_is_its_layer(neox):
    toks = _data(neox)
    pairs = {}
    for layer in range(3):
        r, m = pair_sites(neox, layer)
        pairs[layer] = Pair(_identity(r.width, "resid", layer), _identity(m.width, "mlp", layer))
    ev = evaluate_layers(neox, pairs, toks, progress=False)
    assert ev["all"]["kl_spliced"] == pytest.approx(0.0, abs=1e-6)
    assert ev["all"]["recovered_vs_zero"] == pytest.approx(1.0, abs=1e-4)
    assert ev["all"]["recovered_vs_mean"] == pytest.approx(1.0, abs=1e-4)
    # a zero MLP dictionary at layer 1 with identities elsewhere: "all" is layer 1's mlp alone
    z = Dictionary(DictConfig(d_in=pair_sites(neox, 1)[1].width, d_sae=8, architecture="relu"))
    with torch.no_grad():
        z.W_enc.zero_()
        z.W_dec.zero_()
    pairs[1] = Pair(pairs[1].resid, z.eval())
    ev = evaluate_layers(neox, pairs, toks, progress=False)
    assert ev["all"]["ce_spliced"] == pytest.approx(ev["layers"][1]["downstream"]["mlp"]["ce_spliced"], rel=1e-5)
    assert ev["all"]["kl_spliced"] > 1e-4


@pytest.mark.parametrize("name", ["attn_out", "mlp_out"])
def test_single_site_dictionary_against_a_hooked_forward(tiny_model, name):
    toks = _data(tiny_model)
    site = resolve_site(tiny_model, 1, name)
    d = _random_dict(site.width, name, 1, seed=5)
    ev = evaluate_site(tiny_model, d, site, toks, progress=False)
    assert ev["site"] == {"name": name, "layer": 1, "hook": site.hook}
    ce, kl = _reference(tiny_model, toks, {site.hook: lambda a: d.decode(d.encode(a))})
    row = ev["downstream"][name]
    assert row["ce_spliced"] == pytest.approx(ce, rel=1e-4)
    assert row["kl_spliced"] == pytest.approx(kl, rel=1e-3, abs=1e-6)
    ce_zero, _ = _reference(tiny_model, toks, {site.hook: torch.zeros_like})
    assert row["ce_zero"] == pytest.approx(ce_zero, rel=1e-4)
    # FVE and L0 from the site's own activations
    from featcircuit.activations import harvest

    a = harvest(tiny_model, toks, [site.hook], progress=False)[site.hook][:, 1:].reshape(-1, site.width)
    with torch.no_grad():
        c = d.encode(a)
        fve = 1 - (a - d.decode(c)).pow(2).sum() / (a - a.mean(0)).pow(2).sum()
    assert ev["sites"][name]["variance_explained"] == pytest.approx(float(fve), rel=1e-4, abs=1e-6)
    assert ev["sites"][name]["l0"] == pytest.approx(float((c > 0).sum(-1).float().mean()))
    ident = evaluate_site(tiny_model, _identity(site.width, name, 1), site, toks, progress=False)
    assert ident["downstream"][name]["recovered_vs_zero"] == pytest.approx(1.0, abs=1e-4)
    assert ident["sites"][name]["variance_explained"] == pytest.approx(1.0, abs=1e-5)


def test_bad_evaluation_inputs(neox):
    site = resolve_site(neox, 1, "attn_out")
    with pytest.raises(UserError, match="d_in 7, but blocks.1.hook_attn_out is 32 wide"):
        evaluate_site(neox, _random_dict(7, "attn_out", 1, 0, k=2), site, _data(neox), progress=False)
    with pytest.raises(UserError, match="at least one layer"):
        evaluate_layers(neox, {}, _data(neox), progress=False)


def test_cli_evaluate_several_layers(neox, neox_dir, tmp_path, capsys):
    """Repeated --dicts evaluate each layer and all at once; --layers picks some; one line on bad input."""
    import json

    from featcircuit.cli import main
    from featcircuit.dictionary import save_pair

    text = tmp_path / "text"
    text.mkdir()
    for i in range(20):
        (text / f"f{i}.txt").write_text(f"def f{i}(x, y):\n    return x * {i} + y\n" * 8)
    folders = {}
    for layer, p in _pairs(neox, [0, 2], seed=7).items():
        for d in p:
            d.cfg.model_name = neox.featcircuit_name
        folders[layer] = save_pair(p.resid, p.mlp, tmp_path / f"L{layer}")
    base = ["evaluate", "--model", str(neox_dir), "--data", str(text), "--split", "all", "--tokens", "256"]
    assert main(base + ["--dicts", str(folders[2]), "--dicts", str(folders[0]), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert [r["layer"] for r in ev["layers"]] == [0, 2] and ev["all"]["layers"] == [0, 2]
    assert len(ev["all"]["sites"]) == 4 and ev["all"]["kl_spliced"] > 0
    assert main(base + ["--dicts", str(folders[2]), "--dicts", str(folders[0]), "--layers", "2"]) == 0
    cap = capsys.readouterr()
    assert "== layer 2 ==" in cap.out and "== layer 0 ==" not in cap.out and "all (2)" in cap.out
    assert "outside --layers 2" in cap.err
    assert main(base + ["--dicts", str(folders[0]), "--dicts", str(folders[0])]) == 2
    assert "both for layer 0" in capsys.readouterr().err
    assert main(base + ["--dicts", str(folders[0]), "--dicts", str(folders[2]), "--layer", "0"]) == 2
    assert "each folder's layer is read from it" in capsys.readouterr().err
    assert main(base + ["--layers", "1-0"]) == 2
    assert "runs backwards" in capsys.readouterr().err
