"""The sites are what the MLP really reads and writes, for parallel and sequential blocks."""

import pytest
import torch

from featcircuit import UserError, harvest, mlp_parts, pair_sites, resolve_site
from featcircuit.sites import is_parallel


def test_parallel_flag(neox, gpt2):
    assert is_parallel(neox) and not is_parallel(gpt2)
    assert resolve_site(neox, 1, "resid").hook == "blocks.1.hook_resid_pre"
    assert resolve_site(gpt2, 1, "resid").hook == "blocks.1.hook_resid_mid"
    assert resolve_site(gpt2, 1, "mlp").hook == "blocks.1.mlp.hook_post"
    assert resolve_site(gpt2, 1, "mlp").width == 128 and resolve_site(gpt2, 1, "resid").width == 32


@pytest.mark.parametrize("layer", [0, 2])
def test_mlp_recomputed_from_resid_site(tiny_model, layer):
    """LN2 → W_in → act → W_out on the harvested resid site reproduces the model's MLP."""
    torch.manual_seed(0)
    tokens = torch.randint(0, tiny_model.cfg.d_vocab, (3, 20))
    r, m = pair_sites(tiny_model, layer)
    out_hook = f"blocks.{layer}.hook_mlp_out"
    acts = harvest(tiny_model, tokens, [r.hook, m.hook, out_hook], progress=False)
    parts = mlp_parts(tiny_model, layer)
    z = parts.hidden(acts[r.hook])
    torch.testing.assert_close(z, acts[m.hook], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parts.out(z), acts[out_hook], rtol=1e-5, atol=1e-5)
    # The other candidate residual is *not* what the MLP reads (guards against a wrong site).
    other = f"blocks.{layer}.hook_resid_mid" if r.hook.endswith("pre") else f"blocks.{layer}.hook_resid_pre"
    if other in tiny_model.hook_dict:
        wrong = harvest(tiny_model, tokens, [other], progress=False)[other]
        assert not torch.allclose(parts.hidden(wrong), acts[m.hook], atol=1e-3)


def test_layer_out_of_range_names_range(neox):
    with pytest.raises(UserError, match=r"layer 7 is out of range: this model has layers 0\.\.2"):
        resolve_site(neox, 7, "mlp")
    with pytest.raises(UserError, match="layer -1"):
        pair_sites(neox, -1)


def test_raw_hook_and_unknown_site(neox):
    s = resolve_site(neox, 0, "blocks.1.hook_resid_post")
    assert (s.hook, s.layer, s.width) == ("blocks.1.hook_resid_post", 1, 32)
    with pytest.raises(UserError, match="unknown site 'blocks.9.nope'"):
        resolve_site(neox, 0, "blocks.9.nope")


def test_parse_layers_specs(neox):
    from featcircuit.sites import parse_layers

    assert parse_layers(neox, "all") == [0, 1, 2]
    assert parse_layers(neox, "ALL") == [0, 1, 2]
    assert parse_layers(neox, "0-2") == [0, 1, 2]
    assert parse_layers(neox, "2,0") == [0, 2]
    assert parse_layers(neox, "1, 1,2") == [1, 2]
    assert parse_layers(neox, "0-1,2") == [0, 1, 2]
    assert parse_layers(neox, 1) == [1]
    assert parse_layers(8, "5-7") == [5, 6, 7]


@pytest.mark.parametrize("spec, msg", [
    ("0-5", r"--layers '0-5': layer 5 is out of range: this model has layers 0\.\.2"),
    ("3", r"--layers '3': layer 3 is out of range: this model has layers 0\.\.2"),
    ("2-1", r"--layers '2-1': the range 2-1 runs backwards"),
    ("-1", r"--layers '-1' is not a layer spec: use all, a range such as 0-3, or a list such as 1,3 \(layers 0\.\.2\)"),
    ("", r"--layers '' is not a layer spec"),
    ("1,", r"--layers '1,' is not a layer spec"),
    ("x", r"--layers 'x' is not a layer spec"),
    ("1.5", r"--layers '1.5' is not a layer spec"),
])
def test_parse_layers_rejects_with_one_line(neox, spec, msg):
    from featcircuit.sites import parse_layers

    with pytest.raises(UserError, match=msg) as e:
        parse_layers(neox, spec)
    assert "\n" not in str(e.value)


def test_output_sites_are_what_the_block_adds(tiny_model):
    """attn_out + mlp_out (+ resid_pre) rebuild the block's output residual, for both block kinds."""
    torch.manual_seed(0)
    tokens = torch.randint(0, tiny_model.cfg.d_vocab, (2, 12))
    a, m = resolve_site(tiny_model, 1, "attn_out"), resolve_site(tiny_model, 1, "mlp_out")
    assert (a.hook, a.name, a.layer, a.width) == ("blocks.1.hook_attn_out", "attn_out", 1, 32)
    assert (m.hook, m.name, m.layer, m.width) == ("blocks.1.hook_mlp_out", "mlp_out", 1, 32)
    hooks = [a.hook, m.hook, "blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"]
    acts = harvest(tiny_model, tokens, hooks, progress=False)
    torch.testing.assert_close(acts[hooks[2]] + acts[a.hook] + acts[m.hook], acts[hooks[3]],
                               rtol=1e-5, atol=1e-5)
    # mlp_out is the MLP's own output from the mid-MLP site
    z = harvest(tiny_model, tokens, [resolve_site(tiny_model, 1, "mlp").hook], progress=False)
    torch.testing.assert_close(mlp_parts(tiny_model, 1).out(next(iter(z.values()))), acts[m.hook],
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="layer 5 is out of range"):
        resolve_site(tiny_model, 5, "attn_out")
