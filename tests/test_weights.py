"""Virtual weights equal the frozen-LN edge derivative at one token; sufficiency is the stated input."""

import torch

from featcircuit.attribution import batch_edges
from featcircuit.sites import mlp_parts
from featcircuit.weights import mean_stats, sufficiency, virtual_weights
from helpers import random_pair, random_resid


def test_virtual_weights_match_frozen_edges_at_one_token(tiny_model):
    layer = 1
    parts = mlp_parts(tiny_model, layer)
    pair = random_pair(tiny_model, layer)
    _, x = random_resid(tiny_model, layer, n=1)
    x1 = x[3:4]  # at a single token, h̄ = h(x) and s̄ = s(x): the linearisation is exact
    vw = virtual_weights(parts, pair, mean_stats(parts, x1))
    with torch.no_grad():
        a_vals, a_idx, f_vals, f_idx, e, _ = batch_edges(parts, pair.resid, pair.mlp, x1, ln="frozen")
    active = (f_vals[0] != 0)
    expected = e[0, :, :-1][active]  # [k_out active, k_in]
    got = vw[f_idx[0][active]][:, a_idx[0]] * a_vals[0]
    assert active.sum() > 0 and expected.abs().max() > 0
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


def test_sufficiency_input(neox):
    parts = mlp_parts(neox, 1)
    pair = random_pair(neox, 1)
    a_max = torch.rand(pair.resid.W_dec.shape[0]) * 3
    x_mean = torch.randn(parts.W_in.shape[0])
    out = sufficiency(parts, pair, a_max, x_mean, features=torch.tensor([4, 7]))
    manual = pair.mlp.encode(parts.hidden(a_max[7] * pair.resid.W_dec[7] + x_mean))
    torch.testing.assert_close(out[1], manual)
