"""Restarting the forward after a layer: the clean residual plus a change, through the rest.

A configuration changes the residual stream after block L only; everything before it is the
clean run. :func:`capture_tail` keeps, from one clean forward, what block L+1 reads (the
residual and its call arguments) and the blocks after it; :func:`run_tail` runs them on the
clean residual plus a change. When only the last position's logits are read (a task's metric),
the last block's MLP runs on the last position alone: attention still reads every position,
but no later position needs the last block's MLP output (about 2/3 of that block's work).
:func:`restart_logits`, :func:`restart_rows` and :func:`restart_metric` batch many changes into
few such runs, rerunning only the sequences a change touches.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

CHECK_SEQUENCES = 4  # at most this many sequences capture_tail restarts to check it against the clean run


@dataclass
class Tail:
    """The blocks after a layer, with what the first of them read on the clean run."""

    blocks: list  # the model's own (HF) blocks after the layer
    ln_f: torch.nn.Module
    head: torch.nn.Module
    x: Tensor  # [n, ctx, d] the clean residual the first block (or ln_f) reads
    kwargs: dict  # the first block's clean call arguments (masks, rotary tables …)
    last_mlp: torch.nn.Module | None = None  # the last block's MLP, if it may run on the last position only


def capture_tail(model, layer: int, tokens: Tensor) -> Tail | None:
    """The :class:`Tail` after ``layer`` from one clean forward, or None when it does not fit.

    None (the caller falls back to a full forward with a hook) when the model's blocks cannot be
    driven this way: the check compares the restarted forward with the clean one, and the last-
    position shortcut with the clean last position.
    """
    try:
        blocks = [model.blocks[k].original_component for k in range(layer + 1, model.cfg.n_layers)]
        ln_f, head = model.ln_final.original_component, model.unembed.original_component
        entry = blocks[0] if blocks else ln_f
        cap: dict = {}

        def pre(mod, args, kwargs):
            cap["x"], cap["kwargs"] = args[0], dict(kwargs)

        h = entry.register_forward_pre_hook(pre, with_kwargs=True)
        try:
            with torch.no_grad():
                clean = model(tokens)
        finally:
            h.remove()
        kw = {k: v for k, v in cap["kwargs"].items()
              if k not in ("layer_past", "past_key_values", "past_key_value", "cache_position")}
        if "use_cache" in kw:
            kw["use_cache"] = False
        tail = Tail(blocks, ln_f, head, cap["x"].detach(), kw)
        # the check restarts a few sequences, picked as the restarts pick theirs (the blocks and
        # their call arguments are what it tests, not the tokens): rerunning all of them cost as
        # much as the clean forward again
        n = len(tokens)  # the last, first, middle and second sequences (out of order, as picks are)
        seq = torch.tensor([s for s in dict.fromkeys((n - 1, 0, n // 2, 1)) if s < n], device=tail.x.device)
        zero = torch.zeros(len(seq), *tail.x.shape[1:], dtype=tail.x.dtype, device=tail.x.device)
        with torch.no_grad():
            again = run_tail(tail, zero, False, seq)
        want = clean[seq.to(clean.device)]
        if again.shape != want.shape or not torch.allclose(again, want, rtol=1e-4, atol=1e-4):
            return None
    except Exception:  # any architecture this generic restart does not fit
        return None
    if blocks:
        tail.last_mlp = _last_mlp(model, tail, zero, want[:, -1:], seq)
    return tail


def _last_mlp(model, tail: Tail, zero: Tensor, clean_last: Tensor, seq: Tensor) -> torch.nn.Module | None:
    """The last block's MLP module if running it on the last position alone reproduces the
    clean last position of the sequences ``seq`` (its output then broadcasts onto the
    residual), else None."""
    try:
        mlp = model.blocks[model.cfg.n_layers - 1].mlp
        if not any(m is mlp for m in tail.blocks[-1].modules()):
            return None
        with torch.no_grad():
            got = run_tail(replace(tail, last_mlp=mlp), zero, True, seq)
        if got.shape == clean_last.shape and torch.allclose(got, clean_last, rtol=1e-4, atol=1e-4):
            return mlp
    except Exception:  # an MLP called in a way the slice does not fit
        pass
    return None


def _last_position(mod, args):
    """Forward pre-hook: the MLP reads the last position of its (positional) input only."""
    if not args:
        raise TypeError("the MLP's input is not positional: no last-position shortcut")
    return (args[0][:, -1:], *args[1:])


def run_tail(tail: Tail, d_resid: Tensor, last_only: bool, seq: Tensor | None = None) -> Tensor:
    """Logits of the blocks after the layer from the clean residual plus a change.

    ``d_resid [B, n, ctx, d]`` changes every sequence B times over; with ``seq``, ``d_resid
    [len(seq), ctx, d]`` changes the sequences ``seq`` (repeats allowed). ``last_only``: the
    last position's logits ``[., 1, V]`` only.
    """
    x = tail.x
    n = x.shape[0]
    if seq is None:
        seq = torch.arange(n, device=x.device).repeat(d_resid.shape[0])
        d_resid = d_resid.flatten(0, 1)

    def pick(v):
        if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == n and n > 1:
            return v[seq]
        if isinstance(v, tuple):
            return tuple(pick(t) for t in v)
        return v

    kwb = {k: pick(v) for k, v in tail.kwargs.items()}
    h = x[seq] + d_resid
    hook = (tail.last_mlp.register_forward_pre_hook(_last_position)
            if last_only and tail.last_mlp is not None else None)
    try:
        for blk in tail.blocks:
            h = blk(h, **kwb)
            h = h[0] if isinstance(h, tuple) else h
    finally:
        if hook is not None:
            hook.remove()
    if last_only:
        h = h[:, -1:]
    return tail.head(tail.ln_f(h))


def restart_logits(model, layer: int, tokens: Tensor, tail, d_resids: list[Tensor], last: bool,
                   max_rows: int = 512, clean: Tensor | None = None) -> tuple[list[Tensor], int]:
    """Logits per residual change ``d_resid [n, ctx, d]`` added after block ``layer``, and passes.

    Restarts at block ``layer + 1`` from the captured clean residual (``tail``); without one, a
    forward with a hook at ``blocks.{layer}.hook_resid_post``. ``last``: only the last position's
    logits (a task's metric reads nothing else). With the ``clean`` logits, only the sequences a
    change touches run again (a configuration usually moves a few prompts); the others are clean.
    """
    rows, passes = restart_rows(model, layer, tokens, tail, d_resids, last, max_rows,
                                sparse=clean is not None)
    if clean is None:
        return [lg for _, lg in rows], passes
    out = []
    for seqs, lg in rows:
        o = clean.clone()
        o[seqs] = lg
        out.append(o)
    return out, passes


def restart_rows(model, layer: int, tokens: Tensor, tail, d_resids: list[Tensor], last: bool,
                 max_rows: int = 512, sparse: bool = True) -> tuple[list[tuple[Tensor, Tensor]], int]:
    """Per change, (the sequences it touches, their logits); every sequence unless ``sparse``."""
    n_seq, n_ctx = tokens.shape
    vocab = int(model.cfg.d_vocab)
    per_rows = max_rows if last else max(1, min(max_rows, 2**26 // (n_ctx * vocab)))
    every = torch.arange(n_seq, device=tokens.device)
    todo = [torch.nonzero(d.flatten(1).any(1))[:, 0] if sparse else every for d in d_resids]
    out: list[tuple[Tensor, Tensor]] = []
    passes = 0
    k = 0
    while k < len(todo):  # batches of at most per_rows sequences (one change may exceed it)
        batch: list[int] = []
        rows = 0
        while k < len(todo) and (not batch or rows + len(todo[k]) <= per_rows):
            batch.append(k)
            rows += len(todo[k])
            k += 1
        if rows == 0:
            out += [(todo[i], d_resids[i].new_zeros(0, 1 if last else n_ctx, vocab)) for i in batch]
            continue
        seq = torch.cat([todo[i] for i in batch])
        dr = torch.cat([d_resids[i][todo[i]] for i in batch])
        with torch.no_grad():
            logits = _rows_logits(model, layer, tokens, tail, seq, dr, last)
        passes += 1
        o = 0
        for i in batch:
            out.append((todo[i], logits[o:o + len(todo[i])]))
            o += len(todo[i])
    return out, passes


def restart_metric(ctx, d_resids: list[Tensor]) -> list[float]:
    """The metric of a context per residual change after its layer, rerunning only what changed.

    Next-token KL sums over the changed sequences alone (an unchanged one contributes exactly 0);
    a task's or user's metric reads the clean logits with the changed sequences put in.
    """
    kl = ctx.task is None and ctx.user_metric is None
    if not kl:
        logits, passes = restart_logits(ctx.model, ctx.layer, ctx.tokens, ctx._tail, d_resids,
                                        ctx.task is not None, ctx.max_rows, clean=ctx.clean_logits)
        ctx.passes += passes
        return [metric_value(ctx, lg) for lg in logits]
    rows, passes = restart_rows(ctx.model, ctx.layer, ctx.tokens, ctx._tail, d_resids, False, ctx.max_rows)
    ctx.passes += passes
    n_pos = ctx.clean_p.shape[0] * ctx.clean_p.shape[1]
    out = []
    for seqs, lg in rows:
        if len(seqs) == 0:
            out.append(0.0)
            continue
        every = len(seqs) == len(ctx.clean_p)  # no gather (a copy) when every sequence moved
        pick = slice(None) if every else seqs
        out.append(float(kl_positions(ctx.clean_logp[pick], ctx.clean_p[pick], lg[:, 1:]).sum() / n_pos))
    return out


def _rows_logits(model, layer: int, tokens: Tensor, tail, seq: Tensor, d: Tensor, last: bool) -> Tensor:
    """Logits of sequences ``seq`` with ``d [len(seq), ctx, d]`` added after block ``layer``."""
    if tail is not None:
        return run_tail(tail, d, last, seq)

    def hook(act: Tensor, hook=None) -> Tensor:
        return act + d.to(act.dtype)

    logits = model.run_with_hooks(tokens[seq], fwd_hooks=[(f"blocks.{layer}.hook_resid_post", hook)])
    return logits[:, -1:] if last else logits


def kl_positions(clean_logp: Tensor, clean_p: Tensor, logits: Tensor) -> Tensor:
    """KL(clean ‖ changed) per position from the changed logits ``[..., V]``, clamped at 0.

    ``Σ p (log p − log q)`` term by term: each term is a difference of two log-probabilities, so a
    small KL keeps its digits in float32 (a difference of sums over the vocabulary would not).
    """
    return (clean_p * (clean_logp - logits.log_softmax(-1))).sum(-1).clamp_min(0)


def metric_value(ctx, logits: Tensor) -> float:
    """A task's or user's metric of a context on logits (KL is :func:`restart_metric`'s own)."""
    if ctx.task is not None:
        return float(ctx.task.metric(logits))
    return float(ctx.user_metric(logits, ctx.tokens))
