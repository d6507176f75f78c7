"""Dictionary quality, measured on held-out tokens (DESIGN §4).

Per site: L0, fraction of variance explained, cosine similarity, dead and dense fractions.
Downstream: next-token CE and KL(clean ‖ spliced) with each dictionary spliced in and with
both, against zero- and mean-ablation of the same sites:
``recovered = (CE_ablated − CE_spliced) / (CE_ablated − CE_clean)``.
The same numbers for one dictionary at any site (:func:`evaluate_site`: ``attn_out``, ``mlp_out``…)
and for the pairs of several layers, each alone and all spliced at once (:func:`evaluate_layers`).
Links: the Jacobian between active resid and MLP codes (:mod:`featcircuit.jacobian`) on up to
``JACOBIAN_TOKENS`` of the held-out tokens: entries per token above thresholds, top-10% share.

KL is summed per position as ``Σ p_clean·(log p_clean − log p)`` and clamped at 0 there, so
identical distributions give exactly 0 and float rounding never makes it negative. NaN or
infinite activations or logits are rejected with a UserError; a ``recovered`` whose gap is 0 is
NaN and explained in :data:`NAN_REASONS` (the CLI writes it as null plus that reason).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from .dictionary import Pair
from .errors import UserError
from .sites import Site
from .splicing import mean_ablate, reconstruct_with, run_spliced, zero_ablate

DENSE_FREQ = 0.1  # a feature firing on more than 10% of tokens counts as dense
JACOBIAN_TOKENS = 4096  # the Jacobian statistics settle well before this; keeps evaluate cheap
NAN_REASONS = {
    "recovered_vs_zero": "undefined: zero-ablating the site does not change the CE, so there is no gap to recover",
    "recovered_vs_mean": "undefined: mean-ablating the site does not change the CE, so there is no gap to recover",
}


def _ce_kl(logits: Tensor, clean_logp: Tensor, tokens: Tensor) -> tuple[float, float, int]:
    logp = logits[:, :-1].log_softmax(-1)
    tgt = tokens[:, 1:]
    ce = -logp.gather(-1, tgt[..., None]).sum()
    # per position, then clamped: identical rows give exactly 0, rounding never goes below it
    kl = (clean_logp.exp() * (clean_logp - logp)).sum(-1).clamp_min(0).sum()
    if not (bool(torch.isfinite(ce)) and bool(torch.isfinite(kl))):
        raise UserError("the model produced NaN or infinite logits with a dictionary spliced in: "
                        "the dictionary weights or the model are broken")
    return float(ce), float(kl), tgt.numel()


@torch.no_grad()
def site_stats(d, acts: Tensor) -> dict:
    """Reconstruction statistics of dictionary ``d`` on activations ``acts [n, d_in]``."""
    codes = d.encode(acts)
    recon = d.decode(codes)
    fired = codes > 0
    freq = fired.float().mean(0)
    var = (acts - acts.mean(0)).pow(2).sum()
    return {
        "l0": float(fired.sum(-1).float().mean()),
        "variance_explained": float(1 - (acts - recon).pow(2).sum() / var),
        "cos_sim": float(F.cosine_similarity(acts, recon, dim=-1).mean()),
        "dead_frac": float((freq == 0).float().mean()),
        "dense_frac": float((freq > DENSE_FREQ).float().mean()),
        "rel_error_norm": float(((acts - recon).norm(dim=-1) / acts.norm(dim=-1).clamp_min(1e-8)).mean()),
        "n_tokens": int(acts.shape[0]),
    }


@torch.no_grad()
def link_stats(rep, resid_acts: Tensor, *, max_tokens: int = JACOBIAN_TOKENS) -> dict | None:
    """Jacobian statistics of a one-layer replacement's pair on residual rows ``resid_acts [n, d]``
    (None if not affine).

    In normalised units (both sites at unit mean squared norm, as in training); see
    :func:`featcircuit.jacobian.jacobian_stats`.
    """
    from .jacobian import jacobian_stats, rms
    from .replacement import one_layer

    rep = one_layer(rep, "link_stats")
    pair = rep.pair
    if not (isinstance(getattr(pair.resid, "W_dec", None), Tensor)
            and isinstance(getattr(pair.mlp, "W_enc", None), Tensor) and not hasattr(pair.mlp, "enc_cols")):
        return None  # a wrapped module without weights: no closed form
    parts = rep.mlp_parts
    dev = parts.W_in.device
    x = resid_acts[:max_tokens].to(dev)
    scale = rms(x) / max(rms(parts.hidden(x)), 1e-30)
    return jacobian_stats(parts, pair.resid.to(dev), pair.mlp.to(dev), x, scale=scale)


@torch.no_grad()
def downstream(model, tokens: Tensor, dicts: Mapping[str, object], means: Mapping[str, Tensor],
               groups: Mapping[str, Sequence[str]], *, batch_size: int = 16, progress: bool = True,
               desc: str = "evaluate") -> dict:
    """Clean CE, and per group of hooks CE/KL with all of them spliced, zero- or mean-ablated at once.

    ``dicts`` and ``means`` are keyed by hook; a group's row holds ``ce_{spliced,zero,mean}``,
    ``kl_…`` and ``recovered_vs_{zero,mean}``. One clean forward per batch serves every group.
    """
    device = next(model.parameters()).device
    means = {h: v.to(device) for h, v in means.items()}
    conditions = {
        "spliced": lambda h: reconstruct_with(dicts[h]),
        "zero": lambda h: zero_ablate(),
        "mean": lambda h: mean_ablate(means[h]),
    }
    sums: dict[str, list[float]] = {}
    ce_clean, n_tok = 0.0, 0
    for i in tqdm(range(0, len(tokens), batch_size), desc=desc, disable=not progress):
        b = tokens[i:i + batch_size].to(device)
        clean = model(b)
        clean_logp = clean[:, :-1].log_softmax(-1)
        ce, _, n = _ce_kl(clean, clean_logp, b)
        ce_clean += ce
        n_tok += n
        for cond, make in conditions.items():
            for w, hooks in groups.items():
                logits = run_spliced(model, b, {h: make(h) for h in hooks})
                ce, kl, _ = _ce_kl(logits, clean_logp, b)
                acc = sums.setdefault(f"{w}/{cond}", [0.0, 0.0])
                acc[0] += ce
                acc[1] += kl
    ce_clean /= n_tok
    out: dict = {"ce_clean": ce_clean, "n_tokens": n_tok}
    for w in groups:
        row = {}
        for cond in conditions:
            row[f"ce_{cond}"] = sums[f"{w}/{cond}"][0] / n_tok
            row[f"kl_{cond}"] = sums[f"{w}/{cond}"][1] / n_tok
        for base in ("zero", "mean"):
            gap = row[f"ce_{base}"] - ce_clean
            row[f"recovered_vs_{base}"] = (row[f"ce_{base}"] - row["ce_spliced"]) / gap if abs(gap) > 1e-9 else float("nan")
        out[w] = row
    return out


def _check_tokens(tokens: Tensor) -> None:
    if tokens.ndim != 2 or len(tokens) == 0:
        raise UserError(f"evaluation needs a non-empty [n, n_ctx] token tensor, got {tuple(tokens.shape)}")


def _site_rows(model, tokens: Tensor, sites: Sequence[Site], batch_size: int) -> dict[str, Tensor]:
    """``{hook: [n·(n_ctx−1), width]}`` from one harvest (BOS dropped); NaN/inf is a UserError."""
    from .activations import harvest

    acts = harvest(model, tokens, [s.hook for s in sites], batch_size=batch_size, progress=False)
    flat = {s.hook: acts[s.hook][:, 1:].reshape(-1, s.width) for s in sites}
    for s in sites:
        if not bool(torch.isfinite(flat[s.hook]).all()):
            raise UserError(f"the model's {s.name} activations at layer {s.layer} hold NaN or infinite "
                            "values: the model weights are broken")
    return flat


def _stats_on_cpu(d, rows: Tensor, device) -> dict:
    out = site_stats(d.to("cpu"), rows)
    d.to(device)
    return out


def evaluate_pair(rep, tokens: Tensor, *, batch_size: int = 16, progress: bool = True) -> dict:
    """Quality of a one-layer replacement's dictionary pair on ``tokens`` (BOS positions excluded
    from every number)."""
    from .replacement import one_layer

    _check_tokens(tokens)
    rep = one_layer(rep, "evaluate_pair")
    model, pair, r_site, m_site = rep.model, rep.pair, rep.resid_site, rep.mlp_site
    device = next(model.parameters()).device
    flat = _site_rows(model, tokens, (r_site, m_site), batch_size)
    dicts = {r_site.hook: pair.resid, m_site.hook: pair.mlp}
    out: dict = {"sites": {s.name: _stats_on_cpu(dicts[s.hook], flat[s.hook], device)
                           for s in (r_site, m_site)}}
    out["jacobian"] = link_stats(rep, flat[r_site.hook])
    means = {h: v.mean(0) for h, v in flat.items()}
    groups = {"resid": [r_site.hook], "mlp": [m_site.hook], "both": [r_site.hook, m_site.hook]}
    out["downstream"] = downstream(model, tokens, dicts, means, groups, batch_size=batch_size,
                                   progress=progress)
    return out


def evaluate_site(model, d, site: Site, tokens: Tensor, *, batch_size: int = 16,
                  progress: bool = True) -> dict:
    """Quality of one dictionary at ``site`` (any site): L0, FVE, cos, dead/dense, spliced CE/KL."""
    _check_tokens(tokens)
    if d.cfg.d_in != site.width:
        raise UserError(f"the dictionary has d_in {d.cfg.d_in}, but {site.hook} is {site.width} wide")
    device = next(model.parameters()).device
    flat = _site_rows(model, tokens, (site,), batch_size)
    d.to(device)
    out: dict = {"site": {"name": site.name, "layer": site.layer, "hook": site.hook},
                 "sites": {site.name: _stats_on_cpu(d, flat[site.hook], device)}}
    means = {site.hook: flat[site.hook].mean(0)}
    out["downstream"] = downstream(model, tokens, {site.hook: d}, means, {site.name: [site.hook]},
                                   batch_size=batch_size, progress=progress)
    return out


def evaluate_layers(model, pairs: Mapping[int, Pair], tokens: Tensor, *, batch_size: int = 16,
                    progress: bool = True) -> dict:
    """Each layer's pair as :func:`evaluate_pair` reports it, and every dictionary spliced at once.

    ``layers`` is a list of per-layer results (``layer``, ``sites``, ``jacobian``, ``downstream``
    with ``resid``/``mlp``/``both``); ``all`` is the row with every resid and mlp dictionary of
    those layers replaced by its reconstruction in the same forward, against zero- and
    mean-ablating all of those sites together. One harvest and one clean forward per batch serve
    every layer.
    """
    _check_tokens(tokens)
    if not pairs:
        raise UserError("evaluate_layers needs at least one layer's pair")
    device = next(model.parameters()).device
    from .replacement import Replacement

    layers = sorted(pairs)
    # one-layer replacements: the layers need not be contiguous here (no edges between them)
    reps = {layer: Replacement(model, {layer: pairs[layer]}) for layer in layers}
    flat = _site_rows(model, tokens, [s for rep in reps.values() for s in (rep.resid_site, rep.mlp_site)],
                      batch_size)
    dicts, groups, per = {}, {}, []
    for layer, rep in reps.items():
        r, m = rep.resid_site, rep.mlp_site
        dicts[r.hook], dicts[m.hook] = rep.pair.resid, rep.pair.mlp
        per.append({"layer": layer,
                    "sites": {s.name: _stats_on_cpu(dicts[s.hook], flat[s.hook], device) for s in (r, m)},
                    "jacobian": link_stats(rep, flat[r.hook])})
        groups.update({f"L{layer}/resid": [r.hook], f"L{layer}/mlp": [m.hook],
                       f"L{layer}/both": [r.hook, m.hook]})
    groups["all"] = list(dicts)
    means = {h: v.mean(0) for h, v in flat.items()}
    down = downstream(model, tokens, dicts, means, groups, batch_size=batch_size, progress=progress,
                      desc=f"evaluate {len(layers)} layers")
    common = {"ce_clean": down["ce_clean"], "n_tokens": down["n_tokens"]}
    for row in per:
        row["downstream"] = {**common, **{w: down[f"L{row['layer']}/{w}"] for w in ("resid", "mlp", "both")}}
    return {"layers": per, "all": {"layers": layers, "sites": [h for h in dicts], **common, **down["all"]},
            **common}


def _site_lines(sites: dict) -> list[str]:
    lines = [f"{'site':<8} {'L0':>6} {'var.expl':>8} {'cos':>6} {'dead':>6} {'dense':>6}"]
    for k, s in sites.items():
        lines.append(f"{k:<8} {s['l0']:>6.1f} {s['variance_explained']:>8.3f} {s['cos_sim']:>6.3f} "
                     f"{s['dead_frac']:>6.3f} {s['dense_frac']:>6.3f}")
    return lines


def _down_lines(rows: dict[str, dict], width: int = 8) -> tuple[list[str], bool]:
    """Table lines of downstream rows, and whether a recovered value was undefined (NaN)."""
    undefined = False

    def rec(x: float) -> str:
        nonlocal undefined
        if x == x:
            return f"{x:>9.3f}"
        undefined = True
        return f"{'n/a*':>9}"

    width = max([width, *map(len, rows)])
    lines = [f"{'spliced':<{width}} {'CE':>7} {'KL':>7} {'CE zero':>8} {'CE mean':>8} {'rec(zero)':>9} {'rec(mean)':>9}"]
    for w, r in rows.items():
        lines.append(f"{w:<{width}} {r['ce_spliced']:>7.4f} {r['kl_spliced']:>7.4f} {r['ce_zero']:>8.4f} "
                     f"{r['ce_mean']:>8.4f} {rec(r['recovered_vs_zero'])} {rec(r['recovered_vs_mean'])}")
    return lines, undefined


_NA_LINE = "* n/a: the ablation does not change the CE, so there is no gap to recover"


def format_quality(ev: dict) -> str:
    """A plain-text table of an :func:`evaluate_pair` result."""
    lines = _site_lines(ev["sites"])
    d = ev["downstream"]
    lines.append("")
    lines.append(f"CE clean {d['ce_clean']:.4f} nats/token over {d['n_tokens']:,} tokens")
    rows, undefined = _down_lines({w: d[w] for w in ("resid", "mlp", "both")})
    lines += rows
    if undefined:
        lines.append(_NA_LINE)
    if ev.get("jacobian"):
        from .jacobian import format_jacobian

        lines.append("")
        lines.append(format_jacobian(ev["jacobian"]))
    return "\n".join(lines)


def format_site(ev: dict) -> str:
    """A plain-text table of an :func:`evaluate_site` result."""
    s = ev["site"]
    d = ev["downstream"]
    lines = [f"{s['name']} of layer {s['layer']} ({s['hook']})", ""] + _site_lines(ev["sites"])
    lines += ["", f"CE clean {d['ce_clean']:.4f} nats/token over {d['n_tokens']:,} tokens"]
    rows, undefined = _down_lines({s["name"]: d[s["name"]]})
    lines += rows + ([_NA_LINE] if undefined else [])
    return "\n".join(lines)


def format_layers(ev: dict) -> str:
    """A plain-text report of an :func:`evaluate_layers` result: each layer, then all spliced at once."""
    lines = [f"CE clean {ev['ce_clean']:.4f} nats/token over {ev['n_tokens']:,} tokens"]
    for row in ev["layers"]:
        lines += ["", f"== layer {row['layer']} =="] + _site_lines(row["sites"])
        if row.get("jacobian"):
            from .jacobian import format_jacobian

            lines.append(format_jacobian(row["jacobian"]))
    lines += ["", "downstream (each layer's dictionaries alone, then every one of them at once)"]
    table = {f"L{row['layer']} {w}": row["downstream"][w]
             for row in ev["layers"] for w in ("resid", "mlp", "both")}
    a = ev["all"]
    table[f"all ({len(a['sites'])})"] = a
    rows, undefined = _down_lines(table, width=11)
    lines += rows + ([_NA_LINE] if undefined else [])
    lines.append(f"all = the resid and mlp dictionaries of layers {', '.join(map(str, a['layers']))} "
                 "spliced in the same forward; baselines ablate all of those sites together")
    return "\n".join(lines)
