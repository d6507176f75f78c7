"""Cross-layer edges and ablation against the model's own modules (DESIGN §12).

The reference for every edge type is plain autograd through the model, run with hooks: the
sources' codes are leaves spliced in at their hooks (``decode(a) + ε``), attention patterns and
LN1 scales are frozen at the clean run by hooks on ``hook_pattern``/``hook_scale``, and the
target is read at its own hook. Float64, so each edge is compared relative to itself.
"""

from __future__ import annotations

import pytest
import torch

from featcircuit import load_model
from featcircuit.ablation import AblationContext, Config
from featcircuit.crossablation import CrossContext
from featcircuit.edges import EMB, ERR, OUT, coefficients, edges_into, edges_into_out, out_grad
from featcircuit.replacement import Replacement
from featcircuit.splicing import site_hooks
from featcircuit.tasks import TaskPrompts
from helpers import random_pair

REL = 1e-5


@pytest.fixture(scope="module", params=["neox", "gpt2"])
def model64(request, neox_dir, gpt2_dir):
    path = neox_dir if request.param == "neox" else gpt2_dir
    return load_model(str(path), device="cpu", dtype=torch.float64)


def _rep(model, layers, k=5):
    pairs = {L: random_pair(model, L, k=k, seed=10 * L, dtype=torch.float64) for L in layers}
    return Replacement(model, pairs, layers)


def _tokens(model, n=2, ctx=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, model.cfg.d_vocab, (n, ctx), generator=g)


def _freeze(model, tr, layers):
    """Hooks that hold attention patterns and LN1 scales of ``layers`` at their clean values."""
    hooks = []
    for L in layers:
        if L in tr.pattern:
            hooks.append((f"blocks.{L}.attn.hook_pattern", lambda a, hook=None, P=tr.pattern[L]: P.clone()))
            hooks.append((f"blocks.{L}.ln1.hook_scale", lambda a, hook=None, s=tr.ln_scale[L]: s.clone()))
    return hooks


def _splice(d, codes, err):
    """A hook replacing the activation by ``decode(codes) + err`` (codes [n, ctx, m])."""
    def hook(act, hook=None):
        n, c, m = codes.shape
        return d.decode(codes.reshape(n * c, m)).view(n, c, -1) + err
    return hook


def _edge_dict(chunks):
    out = {}
    for ch in chunks:
        for n, t, k, s, i, v in zip(ch.seq.tolist(), ch.t.tolist(), ch.dst.tolist(), ch.s.tolist(),
                                    ch.src.tolist(), ch.value.tolist()):
            key = (ch.src_site, ch.dst_site, n, t, k, s, i)
            out[key] = out.get(key, 0.0) + v
    return out


def _compare(ours: dict, ref: dict, what: str):
    assert ref, f"{what}: the reference has no edges"
    for key, v in ref.items():
        if abs(v) < 1e-12:
            continue
        got = ours.get(key, 0.0)
        assert abs(got - v) <= REL * abs(v) + 1e-12, f"{what} {key}: ours {got} vs autograd {v}"
    for key, v in ours.items():  # nothing extra: every edge of ours is the reference's
        assert abs(v - ref.get(key, 0.0)) <= REL * abs(v) + 1e-12, f"{what} {key}: extra edge {v}"


def _ref_into_resid(model, rep, tr, L):
    """resid(L-1), mlp(L-1) → resid(L): leaves at both sources, frozen attention, read resid(L)."""
    P = L - 1
    a = tr.codes[("resid", P)].clone().requires_grad_(True)
    f = tr.codes[("mlp", P)].clone().requires_grad_(True)
    R, M, T = rep.dictionary(("resid", P)), rep.dictionary(("mlp", P)), rep.dictionary(("resid", L))
    got = {}
    hooks = _freeze(model, tr, range(model.cfg.n_layers)) + [
        *site_hooks(rep.hooks[("resid", P)], _splice(R, a, tr.errors[("resid", P)])),
        *site_hooks(rep.hooks[("mlp", P)], _splice(M, f, tr.errors[("mlp", P)])),
        *site_hooks(rep.hooks[("resid", L)], lambda act, hook=None: got.setdefault("x", act))]
    with torch.enable_grad():
        model.run_with_hooks(tr.tokens, fwd_hooks=hooks)
        pre = got["x"] @ T.W_enc  # the encoder's linear part; the mask is held
        ref = {}
        for n, t, k in torch.nonzero(tr.codes[("resid", L)] != 0).tolist():
            ga, gf = torch.autograd.grad(pre[n, t, k], [a, f], retain_graph=True)
            for site, g in ((("resid", P), ga), (("mlp", P), gf)):
                c = tr.codes[site]
                for s, i in torch.nonzero(c[n] != 0).tolist():
                    ref[(site, ("resid", L), n, t, k, s, i)] = float(c[n, s, i] * g[n, s, i])
    return ref


def test_resid_to_resid_and_mlp_to_resid_edges_match_autograd(model64):
    rep = _rep(model64, [0, 1])
    tr = rep.trace(_tokens(model64))
    ours = {k: v for k, v in _edge_dict(edges_into(rep, tr, coefficients(tr), ("resid", 1))).items()
            if k[-1] != ERR}
    _compare(ours, _ref_into_resid(model64, rep, tr, 1), "resid/mlp(0) → resid(1)")
    # both kinds of source and edges across positions are present (the test is not vacuous)
    assert {k[0] for k in ours} == {("resid", 0), ("mlp", 0)}
    assert any(k[3] != k[5] for k in ours)


def test_resid_to_mlp_edges_match_autograd(model64):
    rep = _rep(model64, [1])
    tr = rep.trace(_tokens(model64))
    ours = {k: v for k, v in _edge_dict(edges_into(rep, tr, coefficients(tr), ("mlp", 1))).items()
            if k[-1] != ERR}
    a = tr.codes[("resid", 1)].clone().requires_grad_(True)
    R, M = rep.dictionary(("resid", 1)), rep.dictionary(("mlp", 1))
    got = {}
    hooks = [*site_hooks(rep.hooks[("resid", 1)], _splice(R, a, tr.errors[("resid", 1)])),
             *site_hooks(rep.hooks[("mlp", 1)], lambda act, hook=None: got.setdefault("z", act))]
    ref = {}
    with torch.enable_grad():
        model64.run_with_hooks(tr.tokens, fwd_hooks=hooks)
        pre = M.pre_acts(got["z"])
        for n, t, k in torch.nonzero(tr.codes[("mlp", 1)] != 0).tolist():
            (g,) = torch.autograd.grad(pre[n, t, k], [a], retain_graph=True)
            for s, i in torch.nonzero(a[n].detach() != 0).tolist():
                ref[(("resid", 1), ("mlp", 1), n, t, k, s, i)] = float(a[n, s, i] * g[n, s, i])
    _compare(ours, ref, "resid(1) → mlp(1)")


def test_embedding_edges_match_autograd(model64):
    rep = _rep(model64, [0])
    tr = rep.trace(_tokens(model64))
    ours = _edge_dict(edges_into(rep, tr, coefficients(tr), ("resid", 0)))
    e = tr.embed.clone().requires_grad_(True)
    got = {}
    hooks = _freeze(model64, tr, [0]) + [
        *site_hooks("blocks.0.hook_resid_pre", lambda act, hook=None: e),
        *site_hooks(rep.hooks[("resid", 0)], lambda act, hook=None: got.setdefault("x", act))]
    ref = {}
    with torch.enable_grad():
        model64.run_with_hooks(tr.tokens, fwd_hooks=hooks)
        pre = got["x"] @ rep.dictionary(("resid", 0)).W_enc
        for n, t, k in torch.nonzero(tr.codes[("resid", 0)] != 0).tolist():
            (g,) = torch.autograd.grad(pre[n, t, k], [e], retain_graph=True)
            for s in range(tr.tokens.shape[1]):
                ref[(EMB, ("resid", 0), n, t, k, s, 0)] = float((g[n, s] * e[n, s]).sum())
    _compare(ours, ref, "emb → resid(0)")


def test_out_edges_match_autograd(model64):
    """resid/mlp(last) → a logit difference: frozen attention in the block, the real final LN."""
    last = model64.cfg.n_layers - 1
    rep = _rep(model64, [last])
    tokens = _tokens(model64)
    tr = rep.trace(tokens)
    metric = lambda lg: (lg[:, -1, 3] - lg[:, -1, 5]).sum()  # noqa: E731
    d = tr.acts[("resid", last)].shape[-1]
    g = out_grad(model64, last, tr.tokens, None, metric, d)
    ours = {k: v for k, v in _edge_dict(edges_into_out(rep, tr, coefficients(tr), g)).items() if k[-1] != ERR}
    rs, ms = ("resid", last), ("mlp", last)
    a = tr.codes[rs].clone().requires_grad_(True)
    f = tr.codes[ms].clone().requires_grad_(True)
    hooks = _freeze(model64, tr, [last]) + [
        *site_hooks(rep.hooks[rs], _splice(rep.dictionary(rs), a, tr.errors[rs])),
        *site_hooks(rep.hooks[ms], _splice(rep.dictionary(ms), f, tr.errors[ms]))]
    with torch.enable_grad():
        m = metric(model64.run_with_hooks(tr.tokens, fwd_hooks=hooks))
        ga, gf = torch.autograd.grad(m, [a, f])
    ref = {}
    ctx = tokens.shape[1]
    for site, gg in ((rs, ga), (ms, gf)):
        c = tr.codes[site]
        for n, s, i in torch.nonzero(c != 0).tolist():
            ref[(site, OUT, n, ctx - 1, 0, s, i)] = float(c[n, s, i] * gg[n, s, i])
    _compare(ours, ref, "last sites → out")


def test_edges_and_errors_sum_to_the_target(model64):
    """Completeness: a resid(1) target's pre-activation change equals the sum of its edges."""
    rep = _rep(model64, [0, 1])
    tr = rep.trace(_tokens(model64))
    co = coefficients(tr)
    edges = _edge_dict(edges_into(rep, tr, co, ("resid", 1)))
    # dropping every source feature and error of layer 0 moves pre by exactly Σ edges
    T = rep.dictionary(("resid", 1))
    dx = -(tr.codes[("resid", 0)] @ rep.decoder(("resid", 0)) + tr.errors[("resid", 0)])
    dzo = -(tr.codes[("mlp", 0)] @ rep.decoder(("mlp", 0)) + tr.errors[("mlp", 0)]) @ rep.parts[0].W_out
    dpre = rep.step(0, tr, dx, dzo) @ T.W_enc
    for n, t, k in torch.nonzero(tr.codes[("resid", 1)] != 0).tolist()[:20]:
        tot = sum(v for key, v in edges.items() if key[2:5] == (n, t, k))
        assert tot == pytest.approx(-float(dpre[n, t, k]), rel=1e-9, abs=1e-12)


# ---- ablation across layers ---------------------------------------------------------------


def _task(model, n=4, ctx=7):
    clean = _tokens(model, n, ctx, seed=1)
    corrupt = clean.clone()
    corrupt[:, 3] = _tokens(model, n, 1, seed=2)[:, 0]
    return TaskPrompts("t", clean, corrupt, torch.full((n,), 3), torch.full((n,), 5))


@pytest.mark.parametrize("ablation", ["patch", "zero"])
@pytest.mark.parametrize("errors", ["kept", "ablated"])
def test_one_layer_scope_equals_the_one_layer_context(neox, errors, ablation):
    """On one layer the cross-layer scope is the one-layer scope: the same edges (ε_R's among them
    when errors are ablated, as the resid site's error node), end points and configurations."""
    pair = random_pair(neox, 1, k=5)
    task = _task(neox)
    cx = CrossContext(Replacement(neox, {1: pair}, [1]), None, ablation, task=task, errors=errors)
    ax = AblationContext(Replacement(neox, {1: pair}), None, ablation, task=task, errors=errors)
    off = cx.offset[1]

    def gid(e):
        i, j = e
        return (cx.gid(("resid", 1), i), j + off)
    assert sorted(map(gid, ax.scope())) == sorted(cx.scope())
    n_err = sum(i == ERR for i, _ in ax.scope())
    assert (n_err > 0) == (errors == "ablated")
    assert cx.m_full == pytest.approx(ax.m_full, abs=1e-5)
    assert cx.m_empty == pytest.approx(ax.m_empty, abs=1e-5)
    if errors == "ablated":  # ε_R moves the metric: the two modes' ∅ differ
        assert abs(cx.m_empty - cx.with_errors("kept").m_empty) > 1e-4
    errs = [e for e in ax.scope() if e[0] == ERR]
    sub = ax.scope()[::3] + errs[:3]
    i0, j0 = ax.scope()[0]  # a keep-set target under a full default: j0 reads i0 alone, all else clean
    mixed = (Config("full", ((j0, "keep", frozenset({i0})),)),
             Config("full", ((gid((i0, j0))[1], "keep", frozenset({gid((i0, j0))[0]})),)))
    for a_cfg, c_cfg in ((Config.keeping(sub), Config.keeping(list(map(gid, sub)))),
                         (Config.removing(sub), Config.removing(list(map(gid, sub)))),
                         (Config.removing(errs), Config.removing(list(map(gid, errs)))), mixed):
        assert cx.values([c_cfg])[0] == pytest.approx(ax.values([a_cfg])[0], abs=1e-5)


def test_with_errors_equals_building_anew(model64):
    rep = _rep(model64, [0, 1])
    task = _task(model64)
    kept = CrossContext(rep, None, "patch", task=task)
    abl = CrossContext(rep, None, "patch", task=task, errors="ablated")
    other = kept.with_errors("ablated")
    assert other.scope() == abl.scope() and len(abl.scope()) > len(kept.scope())
    assert (other.m_full, other.m_empty) == (abl.m_full, abl.m_empty)
    back = abl.with_errors("kept")
    assert back.scope() == kept.scope() and (back.m_full, back.m_empty) == (kept.m_full, kept.m_empty)
    assert kept.errors == "kept" and kept.m_empty != abl.m_empty  # the source context is untouched


def _removal_reference(model, rep, tr, task, src, drop, dst, k) -> float:
    """The metric with target feature ``k`` of site ``dst`` reading source site ``src`` as
    ``drop(act)`` (every other target reading its sources clean), through the model's own modules:
    one forward gives the target's input with that source changed (the other source of a resid
    target held clean, attention/LN1 frozen), the other runs the replacement model (every site
    spliced with its clean mask and error) with that one target changed and everything downstream
    recomputed."""
    frozen = _freeze(model, tr, rep.attn_layers())
    got = {}
    held = [s for s in ((("resid", 0), ("mlp", 0)) if dst == ("resid", 1) else ()) if s != src]
    model.run_with_hooks(tr.tokens, fwd_hooks=frozen + [
        *site_hooks(rep.hooks[src], lambda act, hook=None: drop(act)),
        *[h for s in held for h in site_hooks(rep.hooks[s], lambda act, hook=None, s=s: tr.acts[s])],
        *site_hooks(rep.hooks[dst], lambda act, hook=None: got.setdefault("x", act))])
    masks = {s: tr.codes[s] != 0 for s in rep.sites}
    new_k = torch.relu(rep.dictionary(dst).pre_acts(got["x"]))[..., k] * masks[dst][..., k]

    def splice(site):
        d = rep.dictionary(site)

        def hook(act, hook=None):
            codes = torch.relu(d.pre_acts(act)) * masks[site]
            if site == dst:
                codes = codes.clone()
                codes[..., k] = new_k
            n, c, m = codes.shape
            out = d.decode(codes.reshape(n * c, m)).view(n, c, -1) + tr.errors[site]
            out[:, 0] = act[:, 0]
            return out
        return hook

    hooks = frozen + [h for s in rep.sites for h in site_hooks(rep.hooks[s], splice(s))]
    with torch.no_grad():
        return float(task.metric(model.run_with_hooks(tr.tokens, fwd_hooks=hooks)))


def test_removing_an_edge_propagates_like_the_frozen_replacement_model(model64):
    """Ablating one resid(0)→resid(1) edge: the metric equals the frozen replacement model's with
    that target reading the source feature at 0 (:func:`_removal_reference`)."""
    rep = _rep(model64, [0, 1])
    task = _task(model64)
    cx = CrossContext(rep, None, "zero", task=task)
    tr = cx.tr
    E = cx.entries[2]
    best = int(torch.argmax((E.J * E.c).abs() * (E.src_si == 0)))
    i, v = int(E.src[best]), int(cx.edge_dst[E.edge[best]])
    ours = cx.values([Config.removing([(cx.gid(("resid", 0), i), v)])])[0]
    R0 = rep.dictionary(("resid", 0))
    without_i = lambda act: act - tr.codes[("resid", 0)][..., i:i + 1] * R0.W_dec[i]  # noqa: E731
    ref = _removal_reference(model64, rep, tr, task, ("resid", 0), without_i, ("resid", 1), v - cx.offset[2])
    assert abs(ref - cx.m_full) > 1e-6, "the chosen edge must matter"
    assert ours == pytest.approx(ref, rel=1e-7, abs=1e-9)


@pytest.mark.parametrize("src, dst", [(("resid", 0), ("resid", 1)), (("mlp", 0), ("resid", 1)),
                                      (("resid", 0), ("mlp", 0))])
def test_removing_an_error_edge_propagates_like_the_frozen_replacement_model(model64, src, dst):
    """Errors ablated: removing one error node's edge makes that target read the source's error
    at its ablation value (0; BOS never ablated) — through attention, W_out, or the MLP's own
    nonlinearity — and everything downstream follows (:func:`_removal_reference`)."""
    rep = _rep(model64, [0, 1])
    task = _task(model64)
    cx = CrossContext(rep, None, "zero", task=task, errors="ablated")
    tr = cx.tr
    di = cx.si[dst]
    E = cx.entries[di]
    sel = ~E.feat & (E.src_si == cx.si[src])
    assert sel.any() and not (E.s[sel] == 0).any(), "error entries exist, none at BOS"
    v = int(cx.edge_dst[E.edge[int(torch.argmax((E.J * E.c).abs() * sel))]])
    ours = cx.values([Config.removing([(cx.gid(src, ERR), v)])])[0]
    err = tr.errors[src].clone()
    err[:, 0] = 0  # BOS keeps its error
    ref = _removal_reference(model64, rep, tr, task, src, lambda act: act - err, dst, v - cx.offset[di])
    assert abs(ref - cx.m_full) > 1e-6, "the chosen edge must matter"
    assert ours == pytest.approx(ref, rel=1e-7, abs=1e-9)


def _rep_last_mlp0(model):
    """Layers 0-1 with mlp(0)'s most often active feature moved to the last index: an error entry
    reading a code at index −1 (``ERR``) instead of its own value would then read that feature."""
    rep = _rep(model, [0, 1])
    codes = rep.trace(_task(model).clean).codes[("mlp", 0)]
    f = int((codes != 0).flatten(0, 1).sum(0).argmax())
    d = rep.dictionary(("mlp", 0))
    perm = torch.arange(d.W_enc.shape[1])
    perm[f], perm[-1] = perm[-1].item(), f
    with torch.no_grad():
        d.W_enc.copy_(d.W_enc[:, perm])
        d.b_enc.copy_(d.b_enc[perm])
        d.W_dec.copy_(d.W_dec[perm])
    return Replacement(model, {L: rep.pairs[L] for L in (0, 1)}, [0, 1])


def test_error_sources_never_read_a_feature_s_change(model64):
    """Errors ablated, error edges kept: removing an edge into mlp(0)'s last feature changes that
    feature only; the mlp(0) error entries at the same tokens keep their clean value (as in the
    frozen replacement model), they do not pick up the feature's change."""
    rep = _rep_last_mlp0(model64)
    task = _task(model64)
    cx = CrossContext(rep, None, "zero", task=task, errors="ablated")
    tr = cx.tr
    last = rep.width(("mlp", 0)) - 1
    E = cx.entries[cx.si[("mlp", 0)]]
    into = (cx.rows[cx.si[("mlp", 0)]][2][E.row] == last) & E.feat
    best = int(torch.argmax((E.J * E.c).abs() * into))
    i = int(E.src[best])
    E1 = cx.entries[cx.si[("resid", 1)]]
    on = tr.codes[("mlp", 0)][..., last] != 0
    assert (~E1.feat & (E1.src_si == cx.si[("mlp", 0)]) & on[E1.n, E1.s]).any(), "the case must arise"
    ours = cx.values([Config.removing([(cx.gid(("resid", 0), i), cx.gid(("mlp", 0), last))])])[0]
    R0 = rep.dictionary(("resid", 0))
    without_i = lambda act: act - tr.codes[("resid", 0)][..., i:i + 1] * R0.W_dec[i]  # noqa: E731
    ref = _removal_reference(model64, rep, tr, task, ("resid", 0), without_i, ("mlp", 0), last)
    assert abs(ref - cx.m_full) > 1e-6, "the chosen edge must matter"
    assert ours == pytest.approx(ref, rel=1e-7, abs=1e-9)


@pytest.mark.parametrize("errors", ["kept", "ablated"])
@pytest.mark.parametrize("x_empty_kept", [True, False])
def test_empty_scope_is_every_target_reading_ablated_sources(model64, x_empty_kept, errors, monkeypatch):
    """m(∅): each site's targets read their sources at the ablation value (zero; with errors
    ablated the sources' errors too, BOS's kept): the last sites' codes come from a forward with
    the previous sites' codes zeroed, then the output. Both ways to an MLP row's input (up from a
    stored x_∅, down from x) are checked."""
    import featcircuit.crossablation as CA

    if not x_empty_kept:
        monkeypatch.setattr(CA, "X_EMPTY_BYTES", 0)
    rep = _rep(model64, [0, 1])
    task = _task(model64)
    cx = CrossContext(rep, None, "zero", task=task, errors=errors)
    tr = cx.tr
    frozen = _freeze(model64, tr, rep.attn_layers())
    masks = {s: tr.codes[s] != 0 for s in rep.sites}
    got = {}

    def zeroed(site):  # the source's features at their ablation value 0, its error kept or zeroed
        err = tr.errors[site].clone()
        if errors == "ablated":
            err[:, 1:] = 0
        return lambda act, hook=None: err + _bias(rep.dictionary(site), act)

    model64.run_with_hooks(tr.tokens, fwd_hooks=frozen + [
        *site_hooks(rep.hooks[("resid", 0)], zeroed(("resid", 0))),
        *site_hooks(rep.hooks[("mlp", 0)], zeroed(("mlp", 0))),
        *site_hooks(rep.hooks[("resid", 1)], lambda act, hook=None: got.setdefault("x1", act))])
    a1 = torch.relu(rep.dictionary(("resid", 1)).pre_acts(got["x1"])) * masks[("resid", 1)]
    model64.run_with_hooks(tr.tokens, fwd_hooks=[
        *site_hooks(rep.hooks[("resid", 1)], zeroed(("resid", 1))),
        *site_hooks(rep.hooks[("mlp", 1)], lambda act, hook=None: got.setdefault("z1", act))])
    f1 = torch.relu(rep.dictionary(("mlp", 1)).pre_acts(got["z1"])) * masks[("mlp", 1)]

    def put(site, codes):
        d = rep.dictionary(site)

        def hook(act, hook=None):
            n, c, m = codes.shape
            out = d.decode(codes.reshape(n * c, m)).view(n, c, -1) + tr.errors[site]
            out[:, 0] = act[:, 0]
            return out
        return hook

    hooks = _freeze(model64, tr, [L for L in rep.attn_layers() if L >= 1]) + [
        *site_hooks(rep.hooks[("resid", 1)], put(("resid", 1), a1)),
        *site_hooks(rep.hooks[("mlp", 1)], put(("mlp", 1), f1))]
    ref = float(task.metric(model64.run_with_hooks(tr.tokens, fwd_hooks=hooks)))
    assert abs(ref - cx.m_full) > 1e-6
    assert cx.m_empty == pytest.approx(ref, rel=1e-7, abs=1e-9)
    assert (("mlp", 1) in [cx.sites[si] for si in cx.x_empty]) == x_empty_kept


def _bias(d, act):
    return d.b_dec.expand_as(act)  # every code at its ablation value 0 (BOS's codes are 0 already)


def test_splicing_the_mid_residual_reaches_the_next_block(gpt2):
    """On sequential blocks the bridge's hook_resid_mid only feeds LN2: splicing must move the
    residual stream itself (resid_post = spliced mid + the MLP of the spliced mid)."""
    from featcircuit.splicing import run_spliced

    tokens = _tokens(gpt2)
    v = torch.randn(gpt2.cfg.d_model, generator=torch.Generator().manual_seed(3))
    seen = {}
    grab = [(f"blocks.0.{h}", lambda a, hook=None, h=h: seen.setdefault(h, a.detach()))
            for h in ("hook_resid_post", "hook_mlp_out", "ln2.hook_in")]
    _, clean = gpt2.run_with_cache(tokens)
    hooks = site_hooks("blocks.0.hook_resid_mid", lambda a, hook=None: a + v) + grab
    logits = gpt2.run_with_hooks(tokens, fwd_hooks=hooks)
    mid = clean["blocks.0.hook_resid_mid"] + v
    torch.testing.assert_close(seen["ln2.hook_in"], mid)
    torch.testing.assert_close(seen["hook_resid_post"], mid + seen["hook_mlp_out"])
    spliced = run_spliced(gpt2, tokens, {"blocks.0.hook_resid_mid": lambda a: a + v})
    keep_bos = gpt2.run_with_hooks(tokens, fwd_hooks=site_hooks(
        "blocks.0.hook_resid_mid", lambda a, hook=None: torch.cat([a[:, :1], a[:, 1:] + v], 1)))
    torch.testing.assert_close(spliced, keep_bos)  # run_spliced leaves BOS clean
    assert (logits - gpt2(tokens)).abs().max() > 1e-3  # the splice moved the output


# ---- gradients, ranking and influence ----------------------------------------------------------


@pytest.mark.parametrize("errors", ["kept", "ablated"])
def test_code_gradients_match_finite_differences_through_the_model(model64, errors):
    """∂m/∂code at a resid(1) and an mlp(0) row: a nudge of the code in the replacement model
    run through the model's own modules (frozen attention, spliced sites, masks held). The mlp(0)
    row is one of its last feature's: error entries at its token must not carry the nudge."""
    from featcircuit.influence import code_grads

    rep = _rep_last_mlp0(model64)
    task = _task(model64)
    cx = CrossContext(rep, None, "zero", task=task, errors=errors)
    grads = code_grads(cx)
    tr = cx.tr
    masks = {s: tr.codes[s] != 0 for s in rep.sites}
    frozen = _freeze(model64, tr, rep.attn_layers())

    def metric_with(site, row, eps):
        n, t, k = (int(x[row]) for x in cx.rows[cx.si[site]])

        def splice(s):
            d = rep.dictionary(s)

            def hook(act, hook=None):
                codes = torch.relu(d.pre_acts(act)) * masks[s]
                codes[:, 0] = 0
                if s == site:
                    codes = codes.clone()
                    codes[n, t, k] += eps
                nn_, c, m = codes.shape
                return d.decode(codes.reshape(nn_ * c, m)).view(nn_, c, -1) + tr.errors[s]
            return hook
        hooks = frozen + [h for s in rep.sites for h in site_hooks(rep.hooks[s], splice(s))]
        return float(task.metric(model64.run_with_hooks(tr.tokens, fwd_hooks=hooks)))

    base = metric_with(("resid", 1), 0, 0.0)
    assert base == pytest.approx(cx.m_full, abs=1e-9)
    for site in (("resid", 1), ("mlp", 0)):
        g = grads[cx.si[site]]
        last = cx.rows[cx.si[site]][2] == rep.width(site) - 1
        row = int(torch.argmax(g.abs() * (last if site[0] == "mlp" else 1)))
        eps = 1e-5
        fd = (metric_with(site, row, eps) - metric_with(site, row, -eps)) / (2 * eps)
        assert abs(g[row]) > 1e-6
        assert float(g[row]) == pytest.approx(fd, rel=1e-5, abs=1e-9)


def test_one_layer_ranking_equals_the_one_layer_estimates(neox):
    from featcircuit.influence import rank_cross_edges
    from featcircuit.search import rank_edges

    pair = random_pair(neox, 1, k=5)
    task = _task(neox)
    cx = CrossContext(Replacement(neox, {1: pair}, [1]), None, "patch", task=task)
    ax = AblationContext(Replacement(neox, {1: pair}), None, "patch", task=task)
    a, c = rank_edges(ax), rank_cross_edges(cx)
    off = cx.offset[1]
    ours = {(i, j - off): (x, y) for (i, j), x, y in zip(c.edges, c.abs.tolist(), c.net.tolist())}
    ref = {e: (x, y) for e, x, y in zip(a.edges, a.abs.tolist(), a.net.tolist()) if e[0] >= 0}
    assert set(ours) == set(ref)
    for e, (x, y) in ref.items():
        assert ours[e][0] == pytest.approx(x, rel=1e-4, abs=1e-7)
        assert ours[e][1] == pytest.approx(y, rel=1e-4, abs=1e-7)


def test_influence_flows_back_from_the_metric(neox):
    """Every feature's influence is what its edges pass on (to targets and to the metric), each
    target passes on at most its own influence, and the normalisation is by all incoming |e|."""
    from featcircuit.influence import influence, prune_by_influence

    rep = Replacement(neox, {L: random_pair(neox, L, k=5, seed=L) for L in (0, 1)}, [0, 1])
    cx = CrossContext(rep, None, "patch", task=_task(neox))
    inf = influence(cx)
    passed: dict = {}
    received: dict = {}
    for k, (s, d) in enumerate(zip(cx.edge_src.tolist(), cx.edge_dst.tolist())):
        passed[s] = passed.get(s, 0.0) + float(inf.edge[k])
        received[d] = received.get(d, 0.0) + float(inf.edge[k])
    for g, v in inf.node.items():
        assert v == pytest.approx(passed.get(g, 0.0) + inf.out_edges.get(g, 0.0), rel=1e-9, abs=1e-12)
    for d, r in received.items():
        assert r <= inf.node.get(d, 0.0) * (1 + 1e-9) + 1e-12
    assert 0 < sum(inf.out_edges.values()) <= 1 + 1e-9
    keep, mask = prune_by_influence(cx, inf, node_share=0.5, edge_share=0.9)
    assert 0 < len(keep) < len(inf.node)
    kept_infl = float(inf.edge[mask].sum())
    assert kept_infl >= 0.9 * float((inf.edge * torch.tensor(
        [s in keep and d in keep for s, d in zip(cx.edge_src.tolist(), cx.edge_dst.tolist())])).sum()) - 1e-12


# ---- the pipeline on a tiny model ----------------------------------------------------------------


def test_cross_circuit_graphs_and_export_on_a_tiny_model(neox, tmp_path):
    """Search + held-out scoring across two layers, the circuit's graph, a prompt's attribution
    graph valid against Neuronpedia's schema; the circuit's F is the context's own value."""
    import json
    from pathlib import Path

    import jsonschema

    from featcircuit.ablation import Config
    from featcircuit.circuit import CircuitConfig
    from featcircuit.crosscircuit import circuit_graph, find_cross_circuit, prompt_graph
    from featcircuit.exports import attribution_graph

    rep = Replacement(neox, {L: random_pair(neox, L, k=5, seed=L) for L in (0, 1)}, [0, 1])
    task = _task(neox, n=8)
    s, h = task.subset(torch.arange(0, 8, 2)), task.subset(torch.arange(1, 8, 2))
    keep: dict = {}
    found = find_cross_circuit(rep, s, h, CircuitConfig(candidates=24, tau=0.01), keep=keep, progress=False)
    ev = keep["heldout"]
    circuit = [tuple(e) for e in found["circuit"]]
    assert found["heldout"]["faithfulness"] == pytest.approx(ev.faithfulness(Config.keeping(circuit)))
    assert {"search", "influence (circuit-tracer)", "random"} <= set(found["curves"]["orders"])
    deltas = {(v["src"], v["dst"]): v["delta"] for v in found["search"]["visited"]}
    g = circuit_graph(ev, circuit, deltas, {"model": "tiny", "metric": "logit difference"})
    assert g.g.number_of_edges() >= len(circuit)
    for u, v, d in g.g.edges(data=True):
        if v != "out" and u != "emb":
            assert d["delta"] is not None  # every circuit edge carries its measured Δ
    pg = prompt_graph(rep, h.clean[:1], lambda lg: lg[0, -1, 3] - lg[0, -1, 5],
                      {"model": "tiny", "metric": "logit difference"})
    assert any(n.startswith("out@") for n in pg.g.nodes)
    schema = json.loads((Path(__file__).parent / "data" / "neuronpedia_graph_schema.json").read_text("utf-8"))
    jsonschema.Draft7Validator(schema).validate(attribution_graph(pg))
    g.save_json(tmp_path / "graph.json")


def test_discover_layers_with_errors_ablated_end_to_end(neox_dir, tmp_path, monkeypatch, capsys):
    """``discover --layers 0-1 --errors ablated`` on prompt pairs: the error nodes' edges are in
    the scope and the search's candidates; the summary reports the errors-kept variant too, and
    any error edge of the circuit is drawn from an ``…/err`` node."""
    import json

    import featcircuit.pairs
    from featcircuit.cli import main
    from featcircuit.graph import CircuitGraph

    monkeypatch.setattr(featcircuit.pairs, "default_pair",
                        lambda m, L, **k: (random_pair(m, int(L), k=5, seed=int(L)), tmp_path))
    p = tmp_path / "prompts.jsonl"
    lines = [{"clean": f"def f{i}(a, b):\n    return a", "corrupt": f"def f{i}(b, a):\n    return a",
              "answer": " +", "wrong": " a"} for i in range(8)]
    p.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out"
    assert main(["discover", "--model", str(neox_dir), "--layers", "0-1", "--prompts", str(p), "--errors",
                 "ablated", "--candidates", "40", "--tau", "0.001", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "errors ablated" in printed and "with errors kept: m(∅)" in printed
    summary = json.loads((out / "summary.json").read_text())
    c = summary["circuit"]
    assert c["errors"] == "ablated" and "error node is a source" in c["scope"]["what"]
    kept_variant = c["errors_other_variant"]
    assert kept_variant["m_empty"] != c["m_empty"]  # the errors move the metric
    n_err_edges = sum(v for k, v in c["edge_types"].items() if " err→" in k)
    assert n_err_edges > 0, "error edges reach the circuit on these prompts (seeded)"
    g = CircuitGraph.load_json(out / "graph.json").g
    err_out = {u for u, v in g.edges if u.endswith("/err") and v != "out"}
    assert {u.split("/")[0] for u in err_out} <= {"resid0", "mlp0", "resid1"} and err_out
    assert sum(1 for u, v in g.edges if u in err_out and v != "out") == n_err_edges
    assert kept_variant["size"] == c["size"] - n_err_edges  # with errors kept they are no edges


@pytest.mark.parametrize("argv, msg", [
    (["--layers", "0,2", "--task", "quote"], "not contiguous"),
    (["--layers", "1-9", "--task", "quote"], "out of range"),
    (["--layers", "0-1", "--task", "quote", "--ablation", "mean"], "--ablation mean"),
    (["--prompt", "def f", "--task", "quote"], "--prompt"),
    (["--prompt", "   "], "--prompt is empty"),
])
def test_cross_layer_bad_options_exit_2_before_loading(argv, msg, capsys, monkeypatch):
    import featcircuit.models as models
    from featcircuit.cli import main

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("model loaded before the check"))
    assert main(["discover", *argv]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1


def test_prompt_graph_is_the_same_in_every_process(neox_dir, tmp_path):
    """Same prompt, same weights → byte-identical graph in two processes with different string
    hash seeds (a share summed over a set followed each process's hash order in its last bits)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = f"""
import json, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from helpers import random_pair, text_tokens
from featcircuit import load_model
from featcircuit.crosscircuit import prompt_graph
from featcircuit.replacement import Replacement
m = load_model({str(neox_dir)!r}, device="cpu")
rep = Replacement(m, {{L: random_pair(m, L, k=5, seed=L) for L in (0, 1)}})
g = prompt_graph(rep, text_tokens(m, n_ctx=12)[:1], lambda lg: lg[0, -1, 3] - lg[0, -1, 5],
                 {{"model": "tiny", "metric": "logit difference"}})
print(json.dumps(sorted((n, d) for n, d in g.g.nodes(data=True))))
"""
    runs = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           env=dict(os.environ, PYTHONHASHSEED=str(seed))) for seed in (1, 2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    assert "influence" in runs[0].stdout and runs[0].stdout == runs[1].stdout


def test_planted_cross_layer_chain_is_recovered(neox_dir):
    """A hand-set mechanism across layers 0-1: only resid0/i → resid1/k (skip path and frozen
    attention) and resid1/k → mlp1/j carry anything downstream (every other decoder row zeroed, so
    no other feature moves the output). The pair scores F = 1, completeness 0; everything else
    F = 0; the ranking puts it first and the search keeps exactly it."""
    from featcircuit.circuit import CircuitConfig
    from featcircuit.crosscircuit import find_cross_circuit
    from featcircuit.faithfulness import end_points

    model = load_model(str(neox_dir), device="cpu", dtype=torch.float64)
    pairs = {L: random_pair(model, L, dtype=torch.float64, k=6, width=4, seed=L) for L in (0, 1)}
    tokens = _tokens(model, n=3, ctx=8, seed=9)
    probe = CrossContext(Replacement(model, pairs, [0, 1]), tokens, "zero")

    def strongest(si, src_si, src=None):
        """(source feature, target feature) of the largest Σ|e| edge into site si from src_si."""
        E = probe.entries[si]
        sel = (E.src_si == src_si) & E.feat & (True if src is None else E.src == src)
        w = torch.zeros(len(probe.edge_keys), dtype=torch.float64)
        w.index_add_(0, E.edge[sel], (E.J * E.c)[sel].abs())
        e = int(w.argmax())
        return probe.node(int(probe.edge_src[e]))[1], probe.node(int(probe.edge_dst[e]))[1]

    i, k = strongest(2, 0)  # resid0 → resid1
    _, j = strongest(3, 2, k)  # resid1/k → mlp1
    with torch.no_grad():
        for (L, kind), keep in (((0, "resid"), i), ((0, "mlp"), None), ((1, "resid"), k), ((1, "mlp"), j)):
            D = getattr(pairs[L], kind).W_dec
            dead = torch.ones(D.shape[0], dtype=torch.bool)
            if keep is not None:
                dead[keep] = False
            D[dead] = 0
    rep = Replacement(model, pairs, [0, 1])
    cx = CrossContext(rep, tokens, "zero")
    A = (cx.gid(("resid", 0), i), cx.gid(("resid", 1), k))
    B = (cx.gid(("resid", 1), k), cx.gid(("mlp", 1), j))
    scope = cx.scope()
    assert A in scope and B in scope and len(scope) > 10
    ep = end_points(cx, [A, B])
    assert ep["faithfulness"] == pytest.approx(1.0, abs=1e-9) and abs(cx.gap) > 1e-6
    assert ep["completeness"] == pytest.approx(0.0, abs=1e-9)
    rest = [e for e in scope if e not in (A, B)]
    assert end_points(cx, rest)["faithfulness"] == pytest.approx(0.0, abs=1e-9)
    assert 1e-6 < end_points(cx, [A])["faithfulness"] < 1 - 1e-6  # each half alone explains part
    found = find_cross_circuit(rep, tokens, tokens, CircuitConfig(ablation="zero", candidates=10, tau=1e-6,
                                                                  rank_by="abs"), progress=False)
    assert set(map(tuple, found["candidates"][:2])) == {A, B}
    assert {tuple(e) for e in found["circuit"]} == {A, B}
    assert found["heldout"]["faithfulness"] == pytest.approx(1.0, abs=1e-9)
