"""Ablation semantics pinned by an independent implementation, and a planted circuit.

The reference below shares nothing with featcircuit.ablation: it harvests with its own hooks,
computes ablation values from scratch, gets every ablated MLP hidden activation by running the
model's own modules (a forward with the resid site replaced), and scores with a full forward
with a hook on the MLP's hidden activation (no restart after the layer).
"""

import pytest
import torch

from featcircuit import load_model
from featcircuit.ablation import ERR, AblationContext, Config
from featcircuit.faithfulness import _areas, curves, end_points
from featcircuit.replacement import Replacement
from featcircuit.search import rank_edges, search_circuit
from featcircuit.sites import pair_sites
from featcircuit.tasks import TaskPrompts
from helpers import random_pair

LAYER = 1


def _capture(model, tokens, hooks, replace=None):
    got = {}

    def save(name):
        def f(act, hook=None):
            got[name] = act.detach().clone()
        return f

    fwd = [(h, save(h)) for h in hooks]
    if replace is not None:
        fwd = [replace] + fwd
    model.run_with_hooks(tokens, fwd_hooks=fwd)
    return got


def reference_metric(model, pair, task, kept: set, ablation: str, errors: str = "kept", score=None) -> float:
    """m(C) with only ``kept`` (i, j) edges intact, computed from the model's own modules."""
    r, m = pair_sites(model, LAYER)
    R, M = pair
    acts = _capture(model, task.clean, [r.hook, m.hook])
    x, z = acts[r.hook][:, 1:], acts[m.hook][:, 1:]  # [n, ctx-1, d]
    a = R.encode(x)
    err = x - R.decode(a)
    f = M.encode(z)
    if ablation == "zero":
        b, b_err = torch.zeros_like(a), torch.zeros_like(err)
    elif ablation == "mean":
        b = a.reshape(-1, a.shape[-1]).mean(0).expand_as(a)
        b_err = err.reshape(-1, err.shape[-1]).mean(0).expand_as(err)
    else:
        xc = _capture(model, task.corrupt, [r.hook])[r.hook][:, 1:]
        b = R.encode(xc)
        b_err = xc - R.decode(b)
    dz = torch.zeros_like(z)
    for j in range(f.shape[-1]):
        on = f[..., j] != 0
        if not on.any():
            continue
        xj = b @ R.W_dec + R.b_dec + (err if errors == "kept" else b_err)  # every edge ablated
        for i in range(a.shape[-1]):
            if (i, j) in kept:
                xj = xj + (a[..., i] - b[..., i])[..., None] * R.W_dec[i]
        if errors == "ablated" and (ERR, j) in kept:
            xj = xj + err - b_err

        def put(act, hook=None, xj=xj):
            return torch.cat([act[:, :1], xj.to(act.dtype)], 1)

        zj = _capture(model, task.clean, [m.hook], replace=(r.hook, put))[m.hook][:, 1:]
        fj = torch.relu(M.pre_acts(zj)[..., j]) * on
        dz = dz + (fj - f[..., j])[..., None] * M.W_dec[j]

    def add(act, hook=None):
        return torch.cat([act[:, :1], act[:, 1:] + dz], 1)

    logits = model.run_with_hooks(task.clean, fwd_hooks=[(m.hook, add)])
    return float((score or task.metric)(logits.detach()))


@pytest.fixture(scope="module")
def setup(neox_dir):
    model = load_model(str(neox_dir), device="cpu", dtype=torch.float64)
    pair = random_pair(model, LAYER, dtype=torch.float64, k=4, width=2)
    g = torch.Generator().manual_seed(3)
    clean = torch.randint(1, model.cfg.d_vocab, (4, 7), generator=g)
    corrupt = clean.clone()
    corrupt[:, 2:4] = torch.randint(1, model.cfg.d_vocab, (4, 2), generator=g)
    task = TaskPrompts("t", clean, corrupt, torch.tensor([5, 6, 7, 8]), torch.tensor([9, 10, 11, 12]))
    return model, pair, task


@pytest.mark.parametrize("ablation, errors, path", [
    ("zero", "kept", "auto"), ("mean", "kept", "auto"), ("patch", "kept", "auto"),
    ("patch", "ablated", "auto"), ("mean", "ablated", "auto"),
    ("patch", "ablated", "small"), ("mean", "kept", "small"),
    ("patch", "ablated", "dense"), ("zero", "kept", "dense"),
    ("patch", "ablated", "switched"), ("mean", "kept", "switched"), ("zero", "ablated", "switched")])
def test_values_equal_independent_reference(setup, ablation, errors, path, monkeypatch):
    """``small``: one target per fill chunk and dout by scatter; ``dense``: dout always by the
    dense [N, d_M] matmul; ``switched``: a context built with the other errors mode, then
    :meth:`~AblationContext.with_errors` (the source context stays as it was)."""
    import featcircuit.ablation as ab

    if path == "small":
        monkeypatch.setattr(ab, "FILL_ROWS", 1)
        monkeypatch.setattr(ab, "DENSE_DOUT", 0)
    if path == "dense":
        monkeypatch.setattr(ab, "DOUT_CROSSOVER", 10**12)
    model, pair, task = setup
    if path == "switched":
        other = "kept" if errors == "ablated" else "ablated"
        src = AblationContext(Replacement(model, {LAYER: pair}), task.clean, ablation, task=task,
                              errors=other)
        src_scope, src_empty = list(src.scope()), src.m_empty
        ctx = src.with_errors(errors)
    else:
        ctx = AblationContext(Replacement(model, {LAYER: pair}), task.clean, ablation, task=task,
                              errors=errors)
    scope = ctx.scope()
    assert any(i == ERR for i, _ in scope) == (errors == "ablated")
    some = scope[::3][:12]
    circuits = [[], some]
    if path == "switched":  # the source context scores the same configurations first
        src.values([Config.keeping(c) for c in circuits] + [Config.removing(some)])
    ours = ctx.values([Config.keeping(c) for c in circuits])
    ref = [reference_metric(model, pair, task, set(c), ablation, errors) for c in circuits]
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(ref), rtol=1e-9, atol=1e-9)
    # the end points mean what they say: m(M) is the model itself, m(∅) moves the metric
    clean = float(task.metric(model(task.clean)))
    assert ctx.m_full == pytest.approx(clean, abs=1e-9)
    assert abs(ctx.m_empty - ctx.m_full) > 1e-5  # far above the 1e-9 agreement
    # the complement of C equals the reference with S∖C kept
    (comp,) = ctx.values([Config.removing(some)])
    ref = reference_metric(model, pair, task, set(scope) - set(some), ablation, errors)
    assert comp == pytest.approx(ref, abs=1e-9)
    if path == "switched":
        assert src.errors == other and src.scope() == src_scope and src.m_empty == src_empty
        assert src.values([Config.empty()]) == [src_empty] and ctx.m_empty != src_empty


def test_corpus_kl_equals_independent_reference(setup):
    """Corpus mode: m = mean next-token KL(clean ‖ ablated) over the scored positions."""
    model, pair, task = setup
    ctx = AblationContext(Replacement(model, {LAYER: pair}), task.clean, "zero")
    logp = torch.log_softmax(model(task.clean).detach(), -1)

    def kl(logits):
        return torch.nn.functional.kl_div(torch.log_softmax(logits, -1)[:, 1:], logp[:, 1:], log_target=True,
                                          reduction="none").sum(-1).mean()

    some = ctx.scope()[::2][:10]
    ours = ctx.values([Config.keeping([]), Config.keeping(some), Config.removing(some)])
    ref = [reference_metric(model, pair, task, kept, "zero", score=kl)
           for kept in (set(), set(some), set(ctx.scope()) - set(some))]
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(ref), rtol=1e-7, atol=1e-10)
    assert min(ours) > 1e-6  # far from the 0 that an unchanged run gives
    # a change after the layer that touches one sequence: the KL is still the mean over all of them
    from featcircuit.restart import restart_metric

    one = torch.zeros(*task.clean.shape, model.cfg.d_model, dtype=torch.float64)
    one[1, 2:] = 0.5 * torch.randn(task.clean.shape[1] - 2, model.cfg.d_model, dtype=torch.float64,
                                   generator=torch.Generator().manual_seed(0))
    (got,) = restart_metric(ctx, [one])
    hooked = model.run_with_hooks(task.clean, fwd_hooks=[(f"blocks.{LAYER}.hook_resid_post",
                                                          lambda act, hook: act + one)]).detach()
    assert got == pytest.approx(float(kl(hooked)), rel=1e-7) and got > 1e-6


def test_ablation_values_differ(setup):
    """Zero, mean and patch are different interventions (a mean that ignores the mean fails)."""
    model, pair, task = setup
    ms = [AblationContext(Replacement(model, {LAYER: pair}), task.clean, a, task=task).m_empty
          for a in ("zero", "mean", "patch")]
    assert min(abs(ms[0] - ms[1]), abs(ms[0] - ms[2]), abs(ms[1] - ms[2])) > 1e-4


def test_kl_of_unchanged_run_is_exactly_zero(setup):
    model, pair, task = setup
    ctx = AblationContext(Replacement(model, {LAYER: pair}), task.clean, "zero")
    assert ctx.m_full == 0.0
    assert ctx.m_empty > 0


def test_config_algebra():
    c = Config.keeping([(1, 5), (2, 5), (3, 7)])
    assert c.without(1, 5) == Config.keeping([(2, 5), (3, 7)])
    assert c.without(3, 7) == Config.keeping([(1, 5), (2, 5)])
    assert Config.full().without(4, 2) == Config.removing([(4, 2)])
    assert Config.removing([(4, 2)]).without(5, 2) == Config.removing([(4, 2), (5, 2)])
    # small and large edge lists (two ways of grouping) give each target its set of sources
    g = torch.Generator().manual_seed(0)
    edges = list(zip(torch.randint(-1, 300, (3000,), generator=g).tolist(),
                     torch.randint(0, 200, (3000,), generator=g).tolist()))
    for n in (0, 7, 600, 3000):
        by: dict[int, set] = {}
        for i, j in edges[:n]:
            by.setdefault(j, set()).add(i)
        c = Config.keeping(edges[:n])
        assert c.default == "empty" and [t[0] for t in c.targets] == sorted(by)
        assert all(kind == "keep" and srcs == by[j] for j, kind, srcs in c.targets)
        import numpy as np  # the curves' path: an [E, 2] array of (src, dst)
        assert Config.keeping(np.asarray(edges[:n], dtype=np.int64).reshape(-1, 2)) == c


def test_planted_circuit_faithfulness_and_search(neox_dir):
    """A hand-set mechanism: only two edges reach the output; ∅, full and planted circuit score 0, 1, 1."""
    model = load_model(str(neox_dir), device="cpu", dtype=torch.float64)
    pair = random_pair(model, LAYER, dtype=torch.float64, k=6, width=4)
    R, M = pair
    tokens = torch.randint(1, model.cfg.d_vocab, (3, 8), generator=torch.Generator().manual_seed(9))
    probe = AblationContext(Replacement(model, {LAYER: pair}), tokens, "zero")
    # the MLP feature active on most tokens is the one live target; two of the resid features
    # active on most tokens are the live sources
    j1 = int(probe.mask.sum(0).argmax())
    counts = (probe.a != 0).sum(0)
    i1, i2 = counts.topk(2).indices.tolist()
    with torch.no_grad():
        dead_r = torch.ones(R.W_dec.shape[0], dtype=torch.bool)
        dead_r[[i1, i2]] = False
        R.W_dec[dead_r] = 0
        dead_m = torch.ones(M.W_dec.shape[0], dtype=torch.bool)
        dead_m[j1] = False
        M.W_dec[dead_m] = 0
    ctx = AblationContext(Replacement(model, {LAYER: pair}), tokens, "zero")
    planted_edges = [(i1, j1), (i2, j1)]
    ep = end_points(ctx, planted_edges)
    assert ep["faithfulness"] == pytest.approx(1.0, abs=1e-9)
    assert ep["completeness"] == pytest.approx(0.0, abs=1e-9)
    others = [e for e in ctx.scope() if e not in planted_edges]
    assert end_points(ctx, others)["faithfulness"] == pytest.approx(0.0, abs=1e-9)
    assert ctx.faithfulness(Config.full()) == pytest.approx(1.0)
    assert ctx.faithfulness(Config.empty()) == pytest.approx(0.0)
    # the ranking puts the planted edges first, and the search keeps exactly them
    rk = rank_edges(ctx)
    top2 = set(rk.order("abs")[:2])
    assert top2 == set(planted_edges)
    res = search_circuit(ctx, rk.order("abs")[:10], tau=1e-6 * abs(ctx.gap), stat=rk.stat("abs"),
                         progress=False)
    assert set(res.kept) == set(planted_edges)
    # an edge the caller keeps out of the candidates (discover --exclude-dense) is never searched,
    # yet stays in the scope: the circuit is scored with it ablated, so it explains less
    from featcircuit.circuit import CircuitConfig, find_circuit

    base = dict(ablation="zero", candidates=10, tau=1e-6, rank_by="abs", batch=1)
    rep = Replacement(model, {LAYER: pair})
    full = find_circuit(rep, tokens, tokens, CircuitConfig(**base), progress=False)
    assert {tuple(e) for e in full["circuit"]} == set(planted_edges)
    assert full["heldout"]["faithfulness"] == pytest.approx(1.0, abs=1e-9)
    skip = CircuitConfig(**base, skip=lambda e: e == (i1, j1))
    cut = find_circuit(rep, tokens, tokens, skip, progress=False)
    assert [i1, j1] not in cut["candidates"] and [tuple(e) for e in cut["circuit"]] == [(i2, j1)]
    assert cut["scope"]["size_heldout"] == full["scope"]["size_heldout"]
    one = end_points(ctx, [(i2, j1)])["faithfulness"]
    assert cut["heldout"]["faithfulness"] == pytest.approx(one) and one < 1 - 1e-6


@pytest.mark.parametrize("batch", [1, 4])
def test_batched_search_equals_sequential(setup, batch):
    model, pair, task = setup
    ctx = AblationContext(Replacement(model, {LAYER: pair}), task.clean, "patch", task=task)
    rk = rank_edges(ctx)
    cands = rk.order("abs")[:16]
    stat = rk.stat("abs")
    probe = search_circuit(ctx, cands, tau=0.0, stat=stat, batch=1, progress=False)
    tau = float(torch.tensor([abs(v["delta"]) for v in probe.visited]).median())
    ref = search_circuit(ctx, cands, tau=tau, stat=stat, batch=1, progress=False)
    got = search_circuit(ctx, cands, tau=tau, stat=stat, batch=batch, progress=False)
    def steps(res):
        return [(v["src"], v["dst"], v["kept"]) for v in res.visited]

    assert steps(got) == steps(ref)
    assert 0 < len(ref.kept) < len(cands)
    # every decision is the measured Δ against the current circuit: recompute them one by one
    H = Config.keeping(cands)
    for v in ref.visited:
        (d0, d1) = ctx.distance([H, H.without(v["src"], v["dst"])])
        assert v["delta"] == pytest.approx(d1 - d0, abs=1e-12)
        if not v["kept"]:
            H = H.without(v["src"], v["dst"])


def test_areas():
    fr = [0.001, 0.01, 0.1, 1.0]
    assert _areas(fr, [1, 1, 1, 1]) == (pytest.approx(1.0), pytest.approx(0.0))
    assert _areas(fr, [0, 0, 0, 0]) == (pytest.approx(0.0), pytest.approx(1.0))
    assert _areas(fr, [0, 1 / 3, 2 / 3, 1])[0] == pytest.approx(0.5)
    # |1 − F| = 1, 0.5, 0.5, 0 at equal log steps: trapezoids 0.75, 0.5, 0.25 → mean 0.5
    assert _areas(fr, [0, 1.5, 1.5, 1])[1] == pytest.approx(0.5)


def test_curves_end_points(setup):
    model, pair, task = setup
    ctx = AblationContext(Replacement(model, {LAYER: pair}), task.clean, "patch", task=task)
    scope = ctx.scope()
    res = curves(ctx, {"scope": scope}, extra_sizes=[3])
    pts = res["orders"]["scope"]["points"]
    assert pts[-1]["size"] == len(scope)
    assert pts[-1]["faithfulness"] == pytest.approx(1.0) and pts[-1]["completeness"] == pytest.approx(0.0)
    assert 3 in res["sizes"]


@pytest.mark.parametrize("last", [True, False])
def test_restart_runs_only_changed_sequences_and_equals_a_hooked_forward(setup, last):
    """restart_logits with the clean logits reruns only the sequences a change touches."""
    from featcircuit.restart import capture_tail, restart_logits

    model, _, task = setup
    tokens = task.clean
    n, ctx = tokens.shape
    d = model.cfg.d_model
    g = torch.Generator().manual_seed(5)
    one = torch.zeros(n, ctx, d, dtype=torch.float64)
    one[2, 3:] = torch.randn(ctx - 3, d, generator=g, dtype=torch.float64)  # only sequence 2 moves
    every = torch.randn(n, ctx, d, generator=g, dtype=torch.float64)
    changes = [one, torch.zeros_like(one), every]
    tail = capture_tail(model, LAYER, tokens)
    assert tail is not None and tail.last_mlp is not None  # the last-position shortcut is the path tested
    (clean,), _ = restart_logits(model, LAYER, tokens, tail, [changes[1]], last)
    got, passes = restart_logits(model, LAYER, tokens, tail, changes, last, max_rows=n, clean=clean)
    assert passes == 2  # 1 + 0 + n sequences in batches of n: [one], [every]

    for dr, lg in zip(changes, got):
        def add(act, hook=None, dr=dr):
            return act + dr

        ref = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{LAYER}.hook_resid_post", add)]).detach()
        ref = ref[:, -1:] if last else ref
        torch.testing.assert_close(lg, ref, rtol=1e-9, atol=1e-9)
    assert torch.equal(got[0][[0, 1, 3]], clean[[0, 1, 3]]) and not torch.equal(got[0][2], clean[2])


def test_kl_keeps_its_digits_in_float32_on_a_large_vocabulary():
    """A small KL over 50k tokens and large logits, float32, against float64 log_softmax."""
    from featcircuit.restart import kl_positions

    g = torch.Generator().manual_seed(0)
    clean = 4 * torch.randn(6, 50257, generator=g, dtype=torch.float64) - 80  # GPT-2-like offset
    changed = clean + 0.02 * torch.randn(6, 50257, generator=g, dtype=torch.float64)
    lp, lq = clean.log_softmax(-1), changed.log_softmax(-1)
    ref = (lp.exp() * (lp - lq)).sum(-1)
    c32, x32 = clean.float(), changed.float()
    got = kl_positions(c32.log_softmax(-1), c32.softmax(-1), x32)
    assert ref.min() > 1e-5
    # float32's floor: within 1% and 1e-6 of the float64 value (a difference of sums over the
    # vocabulary misses by ~1e-3 here and clamps every position to 0; one in Δ misses by ~1e-5)
    torch.testing.assert_close(got.double(), ref, rtol=1e-2, atol=1e-6)


def _fake_clock(monkeypatch, ctx, cost):
    """``ctx.values`` recorded, and the search module's clock advanced by ``cost(n configs)`` per call."""
    import types

    from featcircuit import search

    seen: list[list[Config]] = []
    clock = [0.0]
    real = ctx.values

    def values(configs):
        seen.append(list(configs))
        clock[0] += cost(len(configs))
        return real(configs)

    monkeypatch.setattr(ctx, "values", values)
    now = lambda: clock[0]  # noqa: E731
    monkeypatch.setattr(search, "time", types.SimpleNamespace(perf_counter=now, time=now))
    return seen


def _settled_by_first_chain(ctx, cands, stat, tau, n=8) -> int:
    """Decisions the first chain of ``n`` settles, from a one-edge-per-pass search (independent
    of the chain code): those up to and including the first whose decision ≠ its prediction."""
    from featcircuit.search import visit_order

    ref = search_circuit(ctx, cands, tau=tau, stat=stat, batch=1, progress=False)
    for k, v in enumerate(ref.visited[:n]):
        if v["kept"] != (stat[(v["src"], v["dst"])] >= tau):
            return k + 1
    assert [(v["src"], v["dst"]) for v in ref.visited[:n]] == visit_order(cands, stat)[:n]
    return n


@pytest.mark.parametrize("margin, picked", [(1.05, 1), (0.95, 8), (0.2, 8)])
def test_choose_batch_probes_the_searchs_own_configurations(setup, monkeypatch, margin, picked):
    """The probe scores the search's first single-edge removal and its first chain of 8 (never ∅),
    and picks chains when the chain's pass costs under 60% of one single pass per decision the
    chain settles (up to and including its first misprediction), not per configuration it holds."""
    from featcircuit.search import choose_batch, visit_order

    model, pair, task = setup
    ctx = AblationContext(Replacement(model, {LAYER: pair}), task.clean, "patch", task=task)
    rk = rank_edges(ctx)
    cands, stat = rk.order("abs")[:16], rk.stat("abs")
    order = visit_order(cands, stat)
    tau = sorted(stat[e] for e in order[:8])[4]  # some edges of the first chain predicted kept
    settled = _settled_by_first_chain(ctx, cands, stat, tau)
    assert 1 <= settled < 8  # so counting configurations instead of decisions picks otherwise
    ctx = AblationContext(Replacement(model, {LAYER: pair}), task.clean, "patch", task=task)
    H = Config.keeping(cands)
    ctx.values([H])
    cache, passes = dict(ctx._values), ctx.passes
    t_chain = margin * 0.6 * settled
    seen = _fake_clock(monkeypatch, ctx, lambda n: 1.0 if n == 1 else t_chain)
    batch, timing = choose_batch(ctx, cands, tau=tau, stat=stat)
    assert batch == picked
    assert timing == {"t_single_pass": pytest.approx(1.0), "t_pass_of_8": pytest.approx(t_chain),
                      "chain_pass_in_single_passes": pytest.approx(t_chain), "probe_chain_settles": settled}
    # the search's own configurations: the candidates without the first edge visited, and the
    # chain H−e₁, H−e₁(−e₂ if predicted removed)… of the first 8 edges visited
    single = [H.without(*order[0])]
    chain, base = [], H
    for e in order[:8]:
        chain.append(base.without(*e))
        if stat[e] < tau:
            base = chain[-1]
    assert any(stat[e] >= tau for e in order[:8]) and any(stat[e] < tau for e in order[:8])
    # H (cached), warm-up chain (its distances read from the cache), then alternating
    assert seen == [[H], chain, chain, single, chain, single]
    assert Config.empty() not in chain
    assert ctx._values == cache and ctx.passes == passes  # the probe leaves no trace


def test_a_busy_spell_during_the_probe_picks_one_configuration_per_pass(setup, monkeypatch):
    """Other work slows whatever pass it overlaps: a spell over the first single pass must not make
    chains look cheap (chains truly cost 8 singles, so the right pick is 1; set against the slowed
    single alone, they would look ten times cheaper and be picked)."""
    from featcircuit.search import choose_batch

    model, pair, task = setup
    ctx = AblationContext(Replacement(model, {LAYER: pair}), task.clean, "patch", task=task)
    rk = rank_edges(ctx)
    cands, stat = rk.order("abs")[:16], rk.stat("abs")
    assert _settled_by_first_chain(ctx, cands, stat, 0.0) >= 2  # 0.8 < 0.6 × 2 × 1.0: chains
    ctx = AblationContext(Replacement(model, {LAYER: pair}), task.clean, "patch", task=task)
    calls = iter(range(100))
    busy = {3: 10.0}  # calls: H, warm-up chain, its distances, then the first single: ten times slower
    _fake_clock(monkeypatch, ctx, lambda n: (0.1 if n == 1 else 0.8) * busy.get(next(calls), 1.0))
    batch, timing = choose_batch(ctx, cands, tau=0.0, stat=stat)
    assert timing["t_single_pass"] == pytest.approx(0.1) and timing["t_pass_of_8"] == pytest.approx(0.8)
    assert batch == 1


def test_search_with_a_chosen_batch_equals_sequential(setup, monkeypatch):
    """When the probe picks chains (a pass costing about the same at any size), the search's
    decisions are still the one-edge-per-pass ones."""
    model, pair, task = setup
    ctx = AblationContext(Replacement(model, {LAYER: pair}), task.clean, "patch", task=task)
    rk = rank_edges(ctx)
    cands, stat = rk.order("abs")[:16], rk.stat("abs")
    probe = search_circuit(ctx, cands, tau=0.0, stat=stat, batch=1, progress=False)
    tau = float(torch.tensor([abs(v["delta"]) for v in probe.visited]).median())
    ref = search_circuit(ctx, cands, tau=tau, stat=stat, batch=1, progress=False)
    _fake_clock(monkeypatch, ctx, lambda n: 1.0)
    got = search_circuit(ctx, cands, tau=tau, stat=stat, batch=None, progress=False)
    assert got.batch == 8 and ref.batch == 1
    assert [(v["src"], v["dst"], v["kept"], v["delta"]) for v in got.visited] == \
        [(v["src"], v["dst"], v["kept"], v["delta"]) for v in ref.visited]
    assert 0 < len(ref.kept) < len(cands)


class _AdditiveScorer:
    """A scorer whose metric is the sum of the kept edges' weights: ``D(H − e) − D(H) = w_e``
    exactly (all weights positive), so the search keeps an edge iff ``w_e ≥ τ``."""

    def __init__(self, weights: dict):
        self.w, self.passes, self._values = weights, 0, {}
        self.m_full, self.m_empty = sum(weights.values()), 0.0

    def _kept(self, c: Config, e) -> bool:
        i, j = e
        for jj, kind, s in c.targets:
            if jj == j:
                return (i in s) if kind == "keep" else (i not in s)
        return c.default == "full"

    def values(self, configs):
        todo = [c for c in dict.fromkeys(configs) if c not in self._values]
        if todo:
            self.passes += 1
            for c in todo:
                self._values[c] = sum(w for e, w in self.w.items() if self._kept(c, e))
        return [self._values[c] for c in configs]

    def distance(self, configs):
        return [abs(v - self.m_full) for v in self.values(configs)]


def test_chains_that_stop_settling_give_way_to_one_edge_per_pass(monkeypatch):
    """A search that picked chains (its first chain settles all 8 decisions) but then meets a
    misprediction every other edge goes over to one edge per pass, with the same decisions. Pass
    cost 1 + 0.5·configs: a chain of 8 costs 5, a single 1.5, so a chain pays from 3.4 decisions."""

    edges = [(i, 0) for i in range(40)]
    stat = {e: 0.01 * (k + 1) for k, e in enumerate(edges)}  # visited in this order; all predicted removed
    w = {e: (2.0 if k >= 16 and k % 2 == 0 else 0.1) for k, e in enumerate(edges)}  # kept from visit 16 on
    tau = 1.0
    ref = search_circuit(_AdditiveScorer(w), edges, tau=tau, stat=stat, batch=1, progress=False)
    assert ref.kept == [e for e in edges if w[e] >= tau]  # the scorer means what it says
    ctx = _AdditiveScorer(w)
    _fake_clock(monkeypatch, ctx, lambda n: 1.0 + 0.5 * n)
    got = search_circuit(ctx, edges, tau=tau, stat=stat, batch=None, progress=False)
    timing = got.meta["batch_timing"]
    assert timing["probe_chain_settles"] == 8 and timing["t_pass_of_8"] == pytest.approx(5.0)
    # chains at visits 0 and 8 (8 decisions each), then 16 (1), 17 (2), 19 (2): the last four
    # chains settled 13 decisions, fewer than 4 × 5/1.5, so from visit 21 one edge per pass
    assert timing["one_per_pass_from_visit"] == 21 and got.batch == 8  # the batch picked
    assert [(v["src"], v["dst"], v["kept"]) for v in got.visited] == \
        [(v["src"], v["dst"], v["kept"]) for v in ref.visited]
    # H's own pass, five chains, then one configuration per pass for the 19 edges left
    assert got.passes == 1 + 5 + (40 - 21)
