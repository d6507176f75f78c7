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


def test_one_layer_scope_equals_the_one_layer_context(neox):
    pair = random_pair(neox, 1, k=5)
    task = _task(neox)
    cx = CrossContext(Replacement(neox, {1: pair}, [1]), None, "patch", task=task)
    ax = AblationContext(Replacement(neox, {1: pair}), None, "patch", task=task)
    off = cx.offset[1]
    assert sorted((i, j + off) for i, j in ax.scope()) == sorted(cx.scope())
    assert cx.m_full == pytest.approx(ax.m_full, abs=1e-5)
    assert cx.m_empty == pytest.approx(ax.m_empty, abs=1e-5)
    sub = ax.scope()[::3]
    for a_cfg, c_cfg in ((Config.keeping(sub), Config.keeping([(i, j + off) for i, j in sub])),
                         (Config.removing(sub), Config.removing([(i, j + off) for i, j in sub]))):
        assert cx.values([c_cfg])[0] == pytest.approx(ax.values([a_cfg])[0], abs=1e-5)


def test_removing_an_edge_propagates_like_the_frozen_replacement_model(model64):
    """Ablating one resid(0)→resid(1) edge: the metric equals two forwards through the model's own
    modules (attention/LN1 frozen inside the layers, every site spliced with its clean mask and
    error): one gives the target's input with the source at its ablation value, the other runs
    the replacement model with that one target changed and everything downstream recomputed."""
    rep = _rep(model64, [0, 1])
    task = _task(model64)
    cx = CrossContext(rep, None, "zero", task=task)
    tr = cx.tr
    lo = cx.offset[2]
    E = cx.entries[2]
    best = int(torch.argmax((E.J * E.c).abs() * (E.src_si == 0)))
    i, v = int(E.src[best]), int(cx.edge_dst[E.edge[best]])
    k = v - lo
    ours = cx.values([Config.removing([(cx.gid(("resid", 0), i), v)])])[0]

    frozen = _freeze(model64, tr, rep.attn_layers())
    R0 = rep.dictionary(("resid", 0))
    got = {}
    without_i = lambda act, hook=None: act - tr.codes[("resid", 0)][..., i:i + 1] * R0.W_dec[i]  # noqa: E731
    drop = [*site_hooks(rep.hooks[("resid", 0)], without_i),
            *site_hooks(rep.hooks[("mlp", 0)], lambda act, hook=None: tr.acts[("mlp", 0)]),
            *site_hooks(rep.hooks[("resid", 1)], lambda act, hook=None: got.setdefault("x1", act))]
    model64.run_with_hooks(tr.tokens, fwd_hooks=frozen + drop)
    T = rep.dictionary(("resid", 1))
    masks = {s: tr.codes[s] != 0 for s in rep.sites}

    def splice(site):
        d = rep.dictionary(site)

        def hook(act, hook=None):
            codes = torch.relu(d.pre_acts(act)) * masks[site]
            if site == ("resid", 1):
                codes = codes.clone()
                codes[..., k] = torch.relu(T.pre_acts(got["x1"]))[..., k] * masks[site][..., k]
            n, c, m = codes.shape
            out = d.decode(codes.reshape(n * c, m)).view(n, c, -1) + tr.errors[site]
            out[:, 0] = act[:, 0]
            return out
        return hook

    hooks = frozen + [h for s in rep.sites for h in site_hooks(rep.hooks[s], splice(s))]
    ref = float(task.metric(model64.run_with_hooks(tr.tokens, fwd_hooks=hooks)))
    assert abs(ref - cx.m_full) > 1e-6, "the chosen edge must matter"
    assert ours == pytest.approx(ref, rel=1e-7, abs=1e-9)


@pytest.mark.parametrize("x_empty_kept", [True, False])
def test_empty_scope_is_every_target_reading_ablated_sources(model64, x_empty_kept, monkeypatch):
    """m(∅): each site's targets read their sources at the ablation value (zero): the last sites'
    codes come from a forward with the previous sites' codes zeroed, then the output. Both ways
    to an MLP row's input (up from a stored x_∅, down from x) are checked."""
    import featcircuit.crossablation as CA

    if not x_empty_kept:
        monkeypatch.setattr(CA, "X_EMPTY_BYTES", 0)
    rep = _rep(model64, [0, 1])
    task = _task(model64)
    cx = CrossContext(rep, None, "zero", task=task)
    tr = cx.tr
    frozen = _freeze(model64, tr, rep.attn_layers())
    masks = {s: tr.codes[s] != 0 for s in rep.sites}
    got = {}

    def zeroed(site):  # the source's features at their ablation value 0, its error kept
        return lambda act, hook=None: tr.errors[site] + _bias(rep.dictionary(site), act)

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


def test_code_gradients_match_finite_differences_through_the_model(model64):
    """∂m/∂code at a resid(1) and an mlp(0) row: a nudge of the code in the replacement model
    run through the model's own modules (frozen attention, spliced sites, masks held)."""
    from featcircuit.influence import code_grads

    rep = _rep(model64, [0, 1])
    task = _task(model64)
    cx = CrossContext(rep, None, "zero", task=task)
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
        row = int(torch.argmax(g.abs()))
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


@pytest.mark.parametrize("argv, msg", [
    (["--layers", "0,2", "--task", "quote"], "not contiguous"),
    (["--layers", "1-9", "--task", "quote"], "out of range"),
    (["--layers", "0-1", "--task", "quote", "--errors", "ablated"], "--errors ablated"),
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
