"""Find a circuit for a behaviour and score it on held-out prompts (DESIGN §6).

1. on the *search* half (prompt pairs of a task, or a corpus slice): one
   :class:`~featcircuit.ablation.AblationContext`; every scope edge ranked by both
   attribution-patching statistics; each statistic's Spearman with the measured single-edge Δ on
   a sample; the better one (or the one asked for) picks the candidates;
2. the ACDC-style search prunes the candidates with τ relative to ``|m(M) − m(∅)|`` (or
   absolute); an optional τ sweep gives the faithfulness–size frontier;
3. on the *held-out* half: end points of the found circuit (errors kept and errors ablated),
   and faithfulness/completeness curves with CPR and CMD for the search's order against the
   cheap orders — by net and by absolute attribution, by single-edge ablation, random;
4. a verdict in words: how much of the behaviour the scope carries, and how much the circuit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tqdm.auto import tqdm

from .ablation import AblationContext, Edge
from .errors import UserError
from .faithfulness import curves, end_points, random_order
from .search import compare_statistics, rank_edges, relative_tau, search_circuit, single_edge_deltas

EXPLAINS_LITTLE = 0.5
SMALL_SCOPE = 0.05  # a scope moving a task's metric by < 5% of its clean value explains little of it


@dataclass
class CircuitConfig:
    """How the circuit is searched and scored."""

    ablation: str = "auto"
    """zero | mean | patch | auto (patch for a task, zero for a corpus)"""
    errors: str = "kept"
    """kept: error nodes stay clean; ablated: the error nodes' edges are in scope (and candidates):
    ε_R's for one layer, every site's across layers"""
    candidates: int = 128
    """edges handed from the ranking to the pruning search"""
    tau: float = 0.02
    """remove an edge when it moves D by less than tau × |m(M) − m(∅)|"""
    tau_abs: float | None = None
    """absolute τ in the metric's units (overrides tau)"""
    tau_sweep: tuple[float, ...] = ()
    """relative τ values for the faithfulness–size frontier"""
    rank_by: str = "auto"
    """abs (Σ_t|est|) | net (|Σ_t est|) | auto (the higher Spearman with single-edge Δ)"""
    batch: int | None = None
    """configurations per forward pass; None = chosen by measured cost"""
    seed: int = 0
    skip: Callable[[Edge], bool] | None = None
    """edges never handed to the search (e.g. those touching dense features); they stay in the
    scope, so the circuit is scored with them ablated"""


def other_errors(errors: str) -> str:
    """The errors mode a run reports besides its own: kept ↔ ablated."""
    return "ablated" if errors == "kept" else "kept"


def _ablation(cfg: CircuitConfig, is_task: bool) -> str:
    if cfg.ablation == "auto":
        return "patch" if is_task else "zero"
    if cfg.ablation == "patch" and not is_task:
        raise UserError("--ablation patch needs corrupt prompts: use --task NAME or --prompts FILE")
    return cfg.ablation


def _context(rep, beh, ablation, errors) -> AblationContext:
    if hasattr(beh, "clean"):
        return AblationContext(rep, beh.clean, ablation, task=beh, errors=errors)
    return AblationContext(rep, beh, ablation, errors=errors)


def find_circuit(rep, search_beh, eval_beh, cfg: CircuitConfig, progress: bool = True) -> dict:
    """Search on ``search_beh`` and score on ``eval_beh`` (a TaskPrompts or a token tensor) in a
    one-layer :class:`~featcircuit.replacement.Replacement`."""
    from .replacement import one_layer

    rep = one_layer(rep, "find_circuit")
    abl = _ablation(cfg, hasattr(search_beh, "clean"))
    layer = rep.layer

    def make(beh, errors):
        return _context(rep, beh, abl, errors)

    what = (f"every resid{layer} → mlp{layer} feature edge" +
            (" and the residual error's edges" if cfg.errors == "ablated" else "") +
            " at the tokens where both ends are present")
    return search_and_score(make, rank_edges, search_beh, eval_beh, cfg, abl, what, progress=progress)


def search_and_score(make: Callable, rank: Callable, search_beh, eval_beh, cfg: CircuitConfig, abl: str,
                     scope_what: str, *, extra_orders: Callable | None = None, keep: dict | None = None,
                     progress: bool = True) -> dict:
    """Rank, search and score with any context: ``make(behaviour, errors)`` builds one (an
    :class:`AblationContext`, a cross-layer context …), ``rank(ctx)`` gives its
    :class:`~featcircuit.search.EdgeRanking`; ``extra_orders(ctx)`` adds named orders; ``keep``
    receives the search and held-out contexts."""
    steps = tqdm(total=5, desc="circuit", disable=not progress)
    ctx = make(search_beh, cfg.errors)
    ranking = rank(ctx)
    cmp = compare_statistics(ctx, ranking, seed=cfg.seed)
    steps.update(1)
    by = cfg.rank_by
    if by == "auto":
        sa, sn = cmp["spearman_abs"], cmp["spearman_net"]
        by = "net" if (sn is not None and (sa is None or sn > sa)) else "abs"
    stat = ranking.stat(by)
    order = ranking.order(by)
    cands = (order if cfg.skip is None else [e for e in order if not cfg.skip(e)])[: cfg.candidates]
    tau = cfg.tau_abs if cfg.tau_abs is not None else relative_tau(ctx, cfg.tau)
    batch = cfg.batch if cfg.batch is not None or hasattr(ctx, "dout_empty") else 1
    res = search_circuit(ctx, cands, tau=tau, stat=stat, batch=batch, progress=progress)
    kept = res.kept
    steps.update(1)
    singles = single_edge_deltas(ctx, cands)
    sweep = []
    sweep_batch = 1 if "one_per_pass_from_visit" in res.meta.get("batch_timing", {}) else res.batch
    for t in sorted(cfg.tau_sweep):  # one per pass if the search's chains stopped paying
        r = search_circuit(ctx, cands, tau=relative_tau(ctx, t), stat=stat, batch=sweep_batch, progress=False)
        sweep.append({"tau": t, "kept": r.kept})
    steps.update(1)

    ev = make(eval_beh, cfg.errors)
    if keep is not None:
        keep.update(search=ctx, heldout=ev)
    other = other_errors(cfg.errors)
    by_delta = {(v["src"], v["dst"]): v["delta"] for v in res.visited}
    kept_set, cand_set = set(kept), set(cands)
    removed = sorted((e for e in cands if e not in kept_set), key=lambda e: -by_delta[e])
    rest = [e for e in order if e not in cand_set]  # the scope past the candidates
    search_order = sorted(kept, key=lambda e: -by_delta[e]) + removed + rest
    single_order = [cands[k] for k in sorted(range(len(cands)), key=lambda k: -singles[k])] + rest
    orders = {"search": search_order, "attribution (net)": ranking.order("net"),
              "attribution (abs)": ranking.order("abs"), "single-edge ablation": single_order}
    if extra_orders is not None:
        orders.update(extra_orders(ctx))
    orders["random"] = random_order(ev.scope(), cfg.seed)
    steps.update(1)
    cur = curves(ev, orders, extra_sizes=[max(len(kept), 1)])
    ep = end_points(ev, kept)
    ep_search = end_points(ctx, kept)
    for f in sweep:
        f.update(size=len(f["kept"]), heldout=end_points(ev, f["kept"]))
    # the held-out context again with the other errors mode (its forwards shared); with errors
    # kept, the circuit's error edges are no edges at all
    ev_other = ev.with_errors(other)
    out_other = {f"heldout_errors_{other}": end_points(ev_other, [e for e in kept if not ev.is_error(e[0])])}
    steps.update(1)
    steps.close()
    size = min(max(len(kept), 1), cur["scope_size"])  # an empty circuit is compared at one edge
    at_size = {name: next(p for p in o["points"] if p["size"] == size)
               for name, o in cur["orders"].items()} if cur["scope_size"] else {}
    return {
        "ablation": abl, "errors": cfg.errors, "rank_by": by, "tau": tau, "tau_relative": cfg.tau_abs is None,
        "tau_setting": cfg.tau if cfg.tau_abs is None else cfg.tau_abs,
        "search_tokens": _describe(search_beh), "heldout_tokens": _describe(eval_beh),
        "scope": {"what": scope_what, "size_search": len(ctx.scope()), "size_heldout": cur["scope_size"]},
        "statistics": {k: v for k, v in cmp.items() if k not in ("edges", "measured")},
        "statistics_sample": {"edges": cmp["edges"], "single_edge_delta": cmp["measured"]},
        "search": res.to_dict(),
        "candidates": [list(e) for e in cands],
        "single_edge_delta": singles,
        "circuit": [list(e) for e in kept],
        "search_tokens_end_points": ep_search,
        "heldout": ep, **out_other,
        "curves": cur, "at_circuit_size": at_size,
        "tau_sweep": [{k: v for k, v in f.items() if k != "kept"} | {"circuit": [list(e) for e in f["kept"]]}
                      for f in sweep],
        "verdict": verdict(ep, ev),
    }


def _describe(beh) -> dict:
    if hasattr(beh, "clean"):
        return {"pairs": len(beh), "n_ctx": int(beh.clean.shape[1])}
    return {"sequences": int(beh.shape[0]), "n_ctx": int(beh.shape[1])}


def verdict(ep: dict, ctx) -> str:
    """One plain sentence on what the scope and the circuit explain."""
    f = ep["faithfulness"]
    if f is None:
        return ("the layer's feature edges do not move the metric at all (m(M) = m(∅)): "
                "no circuit at this layer explains the behaviour")
    base = abs(ctx.m_full) if ctx.task is not None else None
    share = f"; the whole scope moves the metric by {abs(ctx.gap):.3g}" + (
        f" ({abs(ctx.gap) / base:.0%} of its clean value {ctx.m_full:.3g})" if base else "")
    if base and abs(ctx.gap) < SMALL_SCOPE * base:
        return (f"this layer's feature edges carry little of the behaviour{share}: faithfulness "
                f"({f:.2f}, completeness {ep['completeness']:.2f}) is normalised by that small gap and "
                "says little either way")
    if f < EXPLAINS_LITTLE:
        return (f"the circuit explains little: faithfulness {f:.2f} on held-out prompts "
                f"(completeness {ep['completeness']:.2f}){share}")
    return f"the circuit recovers {f:.0%} of the scope's effect on held-out prompts{share}"
