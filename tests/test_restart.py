"""The restart after a layer against the model's own full forward with a hook (both block kinds)."""

import pytest
import torch

from featcircuit.restart import capture_tail, run_tail


@pytest.mark.parametrize("layer", [0, 1])
def test_restart_equals_a_hooked_full_forward(tiny_model, layer):
    """Every position and the last-position shortcut (the last block's MLP on one position) equal
    a full forward whose residual after ``layer`` gets the same change."""
    model = tiny_model
    g = torch.Generator().manual_seed(layer)
    tokens = torch.randint(1, model.cfg.d_vocab, (3, 9), generator=g)
    tail = capture_tail(model, layer, tokens)
    assert tail is not None and tail.last_mlp is not None
    d = 0.5 * torch.randn(2, *tokens.shape, model.cfg.d_model, generator=g)
    for b in range(2):
        ref = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.hook_resid_post",
                                                       lambda act, hook=None, b=b: act + d[b])]).detach()
        with torch.no_grad():
            every = run_tail(tail, d[b:b + 1], False)
            last = run_tail(tail, d[b:b + 1], True)
        torch.testing.assert_close(every, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(last, ref[:, -1:], rtol=1e-5, atol=1e-5)
    # a few sequences, repeated, with their own changes
    seq = torch.tensor([2, 0, 2])
    with torch.no_grad():
        got = run_tail(tail, d[0][seq], True, seq)
    ref = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.hook_resid_post",
                                                   lambda act, hook=None: act + d[0])]).detach()
    torch.testing.assert_close(got, ref[seq][:, -1:], rtol=1e-5, atol=1e-5)
    # the shortcut leaves the model as it was: a plain forward has no hook left on the MLP
    assert not tail.last_mlp._forward_pre_hooks


def test_capture_tail_refuses_a_restart_that_does_not_reproduce_the_clean_run(tiny_model, monkeypatch):
    """The check restarts a few of the sequences and compares them with the clean forward: a
    restart off by 1e-2 gives no tail (callers then run full forwards), and a last-position
    shortcut off by as much gives a tail without it."""
    import featcircuit.restart as R

    tokens = torch.randint(1, tiny_model.cfg.d_vocab, (R.CHECK_SEQUENCES + 3, 9),
                           generator=torch.Generator().manual_seed(0))
    real = R.run_tail
    assert R.capture_tail(tiny_model, 0, tokens).last_mlp is not None
    monkeypatch.setattr(R, "run_tail", lambda tail, d, last, seq=None: real(tail, d, last, seq) + 1e-2)
    assert R.capture_tail(tiny_model, 0, tokens) is None
    monkeypatch.setattr(R, "run_tail", lambda tail, d, last, seq=None: real(tail, d, last, seq) + 1e-2 * last)
    tail = R.capture_tail(tiny_model, 0, tokens)
    assert tail is not None and tail.last_mlp is None
