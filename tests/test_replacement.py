"""The one object: a model and its dictionaries, and the one-layer view every resid→mlp analysis takes."""

import pytest
import torch

from featcircuit import Replacement, UserError, attribute_edges, node_effects
from featcircuit.activations import harvest
from featcircuit.sites import resolve_site
from helpers import Foreign, random_pair, text_tokens


def test_one_layer_view_is_the_layer_of_the_model(neox):
    """``rep.at(L)`` is layer L: its sites are the hooks the model's own MLP of block L reads and
    writes (the MLP recomputed from the harvested resid site equals the harvested mlp site), and
    its pair is the object given for L."""
    pairs = {L: random_pair(neox, L, seed=L) for L in (0, 1, 2)}
    rep = Replacement(neox, pairs)
    tokens = text_tokens(neox)[:2]
    for L in (0, 1, 2):
        one = rep.at(L)
        assert one.layer == L and one.layers == [L]
        assert one.pair is pairs[L] and one.model is neox
        assert one.resid_site == resolve_site(neox, L, "resid") == one.site("resid")
        assert one.mlp_site == resolve_site(neox, L, "mlp") == one.site("mlp")
        acts = harvest(neox, tokens, [one.resid_site.hook, one.mlp_site.hook], progress=False)
        z = one.mlp_parts.hidden(acts[one.resid_site.hook])
        torch.testing.assert_close(z, acts[one.mlp_site.hook], rtol=1e-4, atol=1e-5)


def test_a_multi_layer_replacement_asks_for_one_layer(neox):
    rep = Replacement(neox, {L: random_pair(neox, L) for L in (0, 1)})
    with pytest.raises(UserError, match=r"holds layers 0-1: pass rep.at\(L\)"):
        rep.layer  # noqa: B018
    with pytest.raises(UserError, match=r"rep.at\(L\)"):
        attribute_edges(rep, text_tokens(neox)[:1], progress=False)
    with pytest.raises(UserError, match="layer 2 is not in this Replacement"):
        rep.at(2)
    with pytest.raises(UserError, match="unknown site 'attn'"):
        rep.at(0).site("attn")


def test_analyses_take_a_replacement_not_a_model(neox):
    with pytest.raises(TypeError, match=r"node_effects takes a Replacement \(fc.Replacement\(model"):
        node_effects(neox, text_tokens(neox)[:1])


def test_the_view_of_a_multi_layer_replacement_gives_that_layers_edges(neox):
    """Attribution through ``rep.at(1)`` of a three-layer replacement is layer 1's table, built alone."""
    pairs = {L: random_pair(neox, L, seed=3 * L) for L in (0, 1, 2)}
    tokens = text_tokens(neox)[:2]
    alone = attribute_edges(Replacement(neox, {1: pairs[1]}), tokens, progress=False)
    via = attribute_edges(Replacement(neox, pairs).at(1), tokens, progress=False)
    other = attribute_edges(Replacement(neox, pairs).at(2), tokens, progress=False)
    assert via.layer == 1 and via.meta["hook_resid"] == "blocks.1.hook_resid_pre"
    torch.testing.assert_close(via.to_dense(), alone.to_dense())
    assert other.layer == 2 and not torch.equal(via.to_dense(), other.to_dense())


def test_a_dictionary_of_another_width_is_refused_naming_both(neox):
    """A pair trained for another site fails when the replacement is built, before any forward,
    with the widths named — for featcircuit dictionaries and for foreign modules alike."""
    pair = random_pair(neox, 1)
    mlp_for_resid = (pair.mlp, pair.mlp)  # d_mlp-wide dictionary at the d_model-wide resid site
    d_model, d_mlp = int(neox.cfg.d_model), int(neox.cfg.d_mlp)
    with pytest.raises(UserError, match=f"resid dictionary of layer 1 takes width {d_mlp} but "
                                        f"blocks.1.hook_resid_pre has width {d_model}"):
        Replacement(neox, {1: mlp_for_resid})
    with pytest.raises(UserError, match=f"cannot encode vectors of width {d_model}"):
        Replacement(neox, {1: (Foreign(pair.mlp), Foreign(pair.mlp))})


def test_the_mlp_slot_is_width_checked_too(neox):
    pair = random_pair(neox, 1)
    d_model, d_mlp = int(neox.cfg.d_model), int(neox.cfg.d_mlp)
    with pytest.raises(UserError, match=f"mlp dictionary of layer 1 takes width {d_model} but "
                                        f"blocks.1.mlp.hook_post has width {d_mlp}"):
        Replacement(neox, {1: (pair.resid, pair.resid)})


def test_an_index_of_another_layer_is_refused(neox, tmp_path):
    """Cards read the index's activations and the replacement's dictionary: they must be one layer's."""
    from featcircuit.cards import add_removals, feature_card
    from featcircuit.stats import feature_index

    pairs = {L: random_pair(neox, L, seed=L) for L in (1, 2)}
    rep = Replacement(neox, pairs)
    index = feature_index(rep.at(1), text_tokens(neox)[:2], "mlp", cache_dir=False)
    f = next(f for f in range(index.d_sae) if len(index.acts(f)[0]))
    with pytest.raises(UserError, match=r"feature_card: the feature index is of mlp layer 1 .* layer 2"):
        feature_card(rep.at(2), index, f)
    with pytest.raises(UserError, match=r"add_removals: the feature index is of mlp layer 1"):
        add_removals(rep.at(2), index, [])
    assert feature_card(rep.at(1), index, f, removal=False)["id"] == f"mlp1/{f}"


def test_statistics_need_no_mlp_weights(neox, monkeypatch):
    """An MLP attribution does not support (here: another nonlinearity) still has feature
    statistics; attribution says what it does not support."""
    from featcircuit.stats import feature_index

    monkeypatch.setattr(neox.cfg, "act_fn", "solu_ln")
    rep = Replacement(neox, {1: random_pair(neox, 1)})
    tokens = text_tokens(neox)[:2]
    assert feature_index(rep, tokens, "resid", cache_dir=False).n_tokens == tokens[:, 1:].numel()
    with pytest.raises(UserError, match="MLP activation 'solu_ln' is not supported"):
        attribute_edges(rep, tokens, progress=False)
