"""Four dictionary analyses: how good a reconstruction is, and what the dictionary's features are.

1. *Reconstruction vs random perturbation at the same cosine similarity*
   (:func:`perturbation_sweep`): the activation ``x`` of a site is replaced, per token, by
   ``x' = ρ‖x‖(c·x̂ + √(1−c²)·n̂)`` (:func:`perturb`; ``n̂`` a random unit vector orthogonal to
   ``x̂``) and KL(clean ‖ perturbed) of the next-token distribution is measured for a sweep of
   ``c``; a dictionary's own (mean cos-sim, KL) point is compared with random noise matched to
   it two ways: (a) *mean-matched*, every token at the dictionary's mean ``c`` and mean ``ρ``
   (also read off the sweep, :func:`kl_at`); (b) *per-token-matched* (:func:`matched_noise`),
   token ``t`` replaced by ``‖x̂_t‖(c_t·x̂ + √(1−c_t²)·n̂)`` with ``c_t = cos(x_t, x̂_t)`` and
   ``x̂_t`` the dictionary's reconstruction of ``x_t`` (:func:`perturb_to`), so the noise
   ``x' − x`` has exactly the error's norm ``‖x̂_t − x_t‖`` at every token. KL is convex in the
   perturbation's size, so (a) understates the harm of random noise whenever error norms vary
   across tokens; (a) and (b) draw the same ``n̂`` (common random numbers).
2. *Lower L0 two ways* (:func:`lower_l0_comparison`): a ReLU dictionary's most frequent features
   are switched off at inference until the mean L0 reaches a target (:func:`frequency_removal`),
   against ReLU dictionaries trained with larger L1 penalties (:func:`train_l1_sweep`); both are
   scored by CE loss recovered against zero ablation (:func:`splice_eval`).
3. *Stability across sizes* (:func:`stability_matrix`): for each feature of dictionary A the
   largest cosine similarity to any decoder row of dictionary B (:func:`max_cos`), summarised as
   the fraction of A's features above a threshold, for every ordered pair of dictionaries.
4. *Norms* (:func:`site_norms`, :func:`error_norms`, :func:`norm_stats`): the distribution of
   activation L2 norms per site and layer, and of a pair's reconstruction error norms.

Every analysis takes any site: ``resid``, ``mlp``, ``attn_out``, ``mlp_out`` of a layer, a raw hook
name, or a :class:`~featcircuit.sites.Site` (then ``layer`` is ignored); :func:`train_l1_sweep`
trains pairs or, with ``site``, single dictionaries there.

Every number is taken over positions ≥ 1: the BOS position is never spliced (as in
:mod:`featcircuit.splicing`) and its activation norms are outliers no dictionary is trained on.
CE and KL follow :func:`featcircuit.evaluation.evaluate_pair` (next-token predictions at positions
0..n_ctx−2, averaged over all of them), so ``splice_eval`` of a reconstruction gives the same
``kl_spliced`` and ``recovered_vs_zero`` as ``evaluate_pair``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .activations import harvest
from .dictionary import Dictionary, Pair
from .errors import UserError
from .sites import Site, pair_sites, resolve_site
from .splicing import Replace, reconstruct_with, run_spliced, zero_ablate
from .training import TrainConfig, train_pair

DEFAULT_COS_SIMS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995)
PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
_MATCHED = 1_000_002  # generator index of the two matched-noise conditions


# ---- shared ---------------------------------------------------------------------------------

def as_site(model, layer: int, site: str | Site) -> Site:
    """``site`` itself if it is a :class:`Site`, else the named site or hook of ``layer``."""
    return site if isinstance(site, Site) else resolve_site(model, layer, site)


def _flat(acts: Tensor, width: int) -> Tensor:
    """``[n, n_ctx, width]`` harvested activations → ``[n·(n_ctx−1), width]`` without BOS."""
    return acts[:, 1:].reshape(-1, width)


def site_acts(model, layer: int, site: str | Site, tokens: Tensor, *, batch_size: int = 16) -> Tensor:
    """Activations ``[n·(n_ctx−1), width]`` of one site on ``tokens`` (BOS positions dropped)."""
    s = as_site(model, layer, site)
    return _flat(harvest(model, tokens, [s.hook], batch_size=batch_size, progress=False)[s.hook], s.width)


@torch.no_grad()
def splice_eval(model, tokens: Tensor, conditions: Mapping[str, Mapping[str, Replace]], *,
                batch_size: int = 16) -> dict:
    """Clean CE, and per condition (``{hook: replace}``) mean CE and KL(clean ‖ spliced).

    A condition named ``zero`` is added for every hook that appears in a condition alone, and
    each condition whose hooks equal a zero condition's gets ``recovered_vs_zero``.
    """
    if tokens.ndim != 2 or len(tokens) == 0:
        raise UserError(f"need a non-empty [n, n_ctx] token tensor, got {tuple(tokens.shape)}")
    conds = {k: dict(v) for k, v in conditions.items()}
    zero_names = {}
    for reps in list(conds.values()):
        if len(reps) == 1:
            (hook,) = reps
            zero_names[hook] = f"zero:{hook}"
            conds.setdefault(f"zero:{hook}", {hook: zero_ablate()})
    device = next(model.parameters()).device
    sums = {k: [0.0, 0.0] for k in conds}
    ce_clean, n_tok = 0.0, 0
    for i in range(0, len(tokens), batch_size):
        b = tokens[i:i + batch_size].to(device)
        tgt = b[:, 1:]
        clean_logp = model(b)[:, :-1].log_softmax(-1)
        ce_clean += float(-clean_logp.gather(-1, tgt[..., None]).sum())
        n_tok += tgt.numel()
        p_clean = clean_logp.exp()
        for k, reps in conds.items():
            logp = run_spliced(model, b, reps)[:, :-1].log_softmax(-1)
            sums[k][0] += float(-logp.gather(-1, tgt[..., None]).sum())
            sums[k][1] += float((p_clean * (clean_logp - logp)).sum())
    out: dict = {"ce_clean": ce_clean / n_tok, "n_tokens": n_tok, "conditions": {}}
    for k, (ce, kl) in sums.items():
        out["conditions"][k] = {"ce": ce / n_tok, "kl": kl / n_tok}
    for k, reps in conds.items():
        if len(reps) == 1 and not k.startswith("zero:"):
            ce_zero = out["conditions"][zero_names[next(iter(reps))]]["ce"]
            gap = ce_zero - out["ce_clean"]
            row = out["conditions"][k]
            row["recovered_vs_zero"] = (ce_zero - row["ce"]) / gap if abs(gap) > 1e-9 else float("nan")
    return out


# ---- 1. perturbation ------------------------------------------------------------------------

def perturb_to(x: Tensor, cos_sim: Tensor, norm: Tensor,
               generator: torch.Generator | None = None) -> Tensor:
    """Per row ``i`` of ``x``: ``norm[i]·(c_i·x̂_i + √(1−c_i²)·n̂_i)``, ``n̂_i`` a random unit vector ⟂ ``x̂_i``.

    ``cos_sim`` and ``norm`` are per-row targets of shape ``x.shape[:-1]`` (or broadcastable to
    it). A zero row of ``x`` has no direction, hence no cos-sim: it gets ``norm[i]·n̂_i``.
    """
    xd = x.double()
    c = torch.as_tensor(cos_sim, dtype=torch.float64, device=x.device).expand(x.shape[:-1])
    r = torch.as_tensor(norm, dtype=torch.float64, device=x.device).expand(x.shape[:-1])
    if bool((c.abs() > 1.0 + 1e-12).any()):
        bad = float(c[c.abs() > 1.0 + 1e-12].flatten()[0])
        raise UserError(f"cosine similarity {bad} is outside [-1, 1]")
    if bool((r < 0).any()):
        raise UserError(f"target norm {float(r[r < 0].flatten()[0])} is negative")
    c = c.clamp(-1.0, 1.0)[..., None]
    xnorm = xd.norm(dim=-1, keepdim=True)
    xhat = xd / xnorm.clamp_min(1e-30)
    n = torch.randn(x.shape, generator=generator, dtype=torch.float64).to(x.device)
    for _ in range(2):  # Gram–Schmidt twice: orthogonal to rounding error
        n = n - (n * xhat).sum(-1, keepdim=True) * xhat
    nhat = n / n.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    sin = torch.where(xnorm > 0, (1 - c ** 2).clamp_min(0.0).sqrt(), torch.ones_like(c))
    out = r[..., None] * (c * xhat + sin * nhat)
    return out.to(x.dtype)


def perturb(x: Tensor, cos_sim: float, norm_ratio: float = 1.0,
            generator: torch.Generator | None = None) -> Tensor:
    """``ρ‖x‖(c·x̂ + √(1−c²)·n̂)`` per row of ``x``, with ``n̂`` a random unit vector ⟂ ``x̂``."""
    if not -1.0 <= cos_sim <= 1.0:
        raise UserError(f"cosine similarity {cos_sim} is outside [-1, 1]")
    if norm_ratio < 0:
        raise UserError(f"norm ratio {norm_ratio} is negative")
    return perturb_to(x, torch.tensor(float(cos_sim)), norm_ratio * x.double().norm(dim=-1), generator)


@torch.no_grad()
def token_geometry(d: Dictionary, acts: Tensor) -> tuple[Tensor, Tensor]:
    """Per row of ``acts``: cos(x, x̂) (0 where either is zero) and ‖x̂‖, x̂ = ``d``'s reconstruction."""
    xd = acts.double()
    rd = d.decode(d.encode(acts)).double()
    xn, rn = xd.norm(dim=-1), rd.norm(dim=-1)
    ok = (xn > 0) & (rn > 0)
    cos = torch.where(ok, (xd * rd).sum(-1) / (xn * rn).clamp_min(1e-300), torch.zeros_like(xn))
    return cos.clamp(-1.0, 1.0), rn


def matched_noise(d: Dictionary, generator: torch.Generator | None = None) -> Replace:
    """Replace each token by random noise at that token's cos(x, x̂) and norm ‖x̂‖ (so ‖x'−x‖ = ‖x̂−x‖)."""
    def fn(a: Tensor) -> Tensor:
        cos, norm = token_geometry(d, a)
        return perturb_to(a, cos, norm, generator)
    return fn


@torch.no_grad()
def reconstruction_geometry(d: Dictionary, acts: Tensor) -> dict:
    """Mean cosine similarity and mean norm ratio ‖x̂‖/‖x‖ of ``d``'s reconstructions of ``acts``."""
    recon = d.decode(d.encode(acts))
    ok = acts.norm(dim=-1) > 0
    return {"cos_sim": float(F.cosine_similarity(acts[ok], recon[ok], dim=-1).mean()),
            "norm_ratio": float((recon[ok].norm(dim=-1) / acts[ok].norm(dim=-1)).mean()),
            "n_tokens": int(ok.sum())}


def perturbation_sweep(model, layer: int, site: str | Site, tokens: Tensor,
                       cos_sims: Sequence[float] = DEFAULT_COS_SIMS,
                       dictionary: Dictionary | None = None, *, norm_ratio: float | None = None,
                       seed: int = 0, batch_size: int = 16) -> list[dict]:
    """KL(clean ‖ perturbed) per cos-sim, with ρ = the dictionary's mean norm ratio (else 1.0).

    Rows have ``kind`` ``random`` (one per cos-sim) and, with a dictionary, three more: ``dictionary``
    (its mean cos-sim, mean norm ratio and KL with its reconstruction spliced in),
    ``random_mean_matched`` (every token at that mean cos-sim and mean ρ) and
    ``random_per_token_matched`` (:func:`matched_noise`: each token at its own cos-sim and ‖x̂‖).
    Each condition draws from its own generator, so a row does not depend on which others run;
    the two matched rows share theirs, so they differ only in the matching.
    """
    s = as_site(model, layer, site)
    geo = None
    if dictionary is not None:
        if dictionary.cfg.d_in != s.width:
            raise UserError(f"dictionary has d_in {dictionary.cfg.d_in}, site {s.hook} has width {s.width}")
        dictionary = dictionary.to(next(model.parameters()).device).eval()
        geo = reconstruction_geometry(dictionary, site_acts(model, layer, s, tokens,
                                                            batch_size=batch_size))
    rho = norm_ratio if norm_ratio is not None else (geo["norm_ratio"] if geo else 1.0)

    def gen(i: int) -> torch.Generator:  # i < len(cos_sims): the sweep; _MATCHED: both matched rows
        return torch.Generator().manual_seed(seed * 1_000_003 + i)

    conds: dict[str, dict[str, Replace]] = {
        f"c={c}": {s.hook: (lambda a, c=c, g=gen(i): perturb(a, c, rho, g))}
        for i, c in enumerate(cos_sims)}
    if dictionary is not None and geo is not None:
        conds["dictionary"] = {s.hook: reconstruct_with(dictionary)}
        conds["random_mean_matched"] = {s.hook: (lambda a, g=gen(_MATCHED): perturb(
            a, geo["cos_sim"], geo["norm_ratio"], g))}
        conds["random_per_token_matched"] = {s.hook: matched_noise(dictionary, gen(_MATCHED))}
    res = splice_eval(model, tokens, conds, batch_size=batch_size)
    base = {"site": s.name, "layer": s.layer, "hook": s.hook}

    def row(name: str, kind: str, cos_sim: float, ratio: float) -> dict:
        r = res["conditions"][name]
        return {**base, "kind": kind, "cos_sim": float(cos_sim), "norm_ratio": ratio, "kl": r["kl"],
                "ce": r["ce"], "recovered_vs_zero": r["recovered_vs_zero"],
                "ce_clean": res["ce_clean"], "n_tokens": res["n_tokens"]}

    rows = [row(f"c={c}", "random", c, rho) for c in cos_sims]
    if geo is not None:
        for name in ("dictionary", "random_mean_matched", "random_per_token_matched"):
            rows.append(row(name, name, geo["cos_sim"], geo["norm_ratio"]))
    return rows


def kl_at(rows: Iterable[dict], cos_sim: float) -> float:
    """Random-perturbation KL at ``cos_sim``, interpolated linearly in log KL; NaN outside the sweep."""
    pts = sorted((r["cos_sim"], r["kl"]) for r in rows if r.get("kind", "random") == "random")
    if not pts:
        raise UserError("no random-perturbation rows to interpolate")
    cs = np.array([p[0] for p in pts])
    if not cs[0] <= cos_sim <= cs[-1]:
        return float("nan")
    logkl = np.log(np.maximum([p[1] for p in pts], 1e-30))
    return float(np.exp(np.interp(cos_sim, cs, logkl)))


# ---- 2. lower L0 two ways -------------------------------------------------------------------

@torch.no_grad()
def feature_frequencies(d: Dictionary, acts: Tensor, *, batch_size: int = 8192) -> Tensor:
    """Fraction of rows of ``acts`` on which each feature of ``d`` is active, ``[d_sae]``."""
    count = torch.zeros(d.cfg.d_sae, dtype=torch.float64)
    for i in range(0, len(acts), batch_size):
        count += (d.encode(acts[i:i + batch_size]) > 0).sum(0).double().cpu()
    return count / max(1, len(acts))


def frequency_removal(freq: Tensor, target_l0: float) -> Tensor:
    """Features to switch off, most frequent first, the fewest that bring mean L0 = Σfreq to ≤ target."""
    freq = freq.double()
    order = torch.argsort(freq, descending=True, stable=True)
    left = freq.sum() - torch.cumsum(freq[order], 0)  # mean L0 after removing the top m+1
    if float(freq.sum()) <= target_l0:
        return order[:0]
    m = int((left > target_l0 + 1e-12).sum()) + 1  # left is non-increasing
    return order[:min(m, len(order))]


def without_features(d: Dictionary, removed: Tensor) -> Replace:
    """Replace by ``d``'s reconstruction with the ``removed`` features' codes set to zero."""
    keep = torch.ones(d.cfg.d_sae, dtype=d.W_dec.dtype, device=d.W_dec.device)
    keep[removed.to(keep.device)] = 0
    return lambda a: d.decode(d.encode(a) * keep)


@torch.no_grad()
def masked_l0(d: Dictionary, acts: Tensor, removed: Tensor, *, batch_size: int = 8192) -> float:
    """Mean number of active codes of ``d`` on ``acts`` with the ``removed`` features switched off."""
    keep = torch.ones(d.cfg.d_sae, dtype=torch.bool, device=acts.device)
    keep[removed.to(acts.device)] = False
    total = sum(float(((d.encode(acts[i:i + batch_size]) > 0) & keep).sum())
                for i in range(0, len(acts), batch_size))
    return total / max(1, len(acts))


def train_l1_sweep(model, layer: int, tokens: Tensor, l1_coefficients: Sequence[float],
                   config: TrainConfig | None = None, *, acts: dict[str, Tensor] | None = None,
                   site: str | Site | None = None, progress: bool = False) -> dict[float, Pair | Dictionary]:
    """A ReLU pair (or, with ``site``, one ReLU dictionary there) per L1 coefficient, on the same rows."""
    from dataclasses import replace

    from .site_training import train_site

    cfg = config or TrainConfig(architecture="relu")
    s = None if site is None else as_site(model, layer, site)
    hooks = [s.hook] if s is not None else [x.hook for x in pair_sites(model, layer)]
    if acts is None:
        n_seq = -(-cfg.tokens // (tokens.shape[1] - 1))
        acts = harvest(model, tokens[:n_seq], hooks, progress=False)
    out: dict[float, Pair | Dictionary] = {}
    for l1 in l1_coefficients:
        c = replace(cfg, architecture="relu", l1_coefficient=float(l1))
        out[float(l1)] = (train_pair(model, layer, tokens, c, acts=acts, progress=progress) if s is None
                          else train_site(model, s, tokens, c, acts=acts[s.hook], progress=progress))
    return out


def lower_l0_comparison(model, layer: int, site: str | Site, base: Dictionary,
                        l1_dictionaries: Mapping[float, Dictionary], tokens: Tensor,
                        target_l0s: Sequence[float] = (), *, batch_size: int = 16) -> list[dict]:
    """CE recovered (vs zero ablation) at each L0, reached by frequency removal from ``base`` or by L1.

    Frequency removal targets the L0 of every L1 dictionary (a matched comparison) plus
    ``target_l0s``; frequencies and L0s are measured on ``tokens``.
    """
    s = as_site(model, layer, site)
    dev = next(model.parameters()).device
    acts = site_acts(model, layer, s, tokens, batch_size=batch_size).to(dev)
    base = base.to(dev).eval()
    freq = feature_frequencies(base, acts)
    l1_rows = []
    conds: dict[str, dict[str, Replace]] = {"base": {s.hook: reconstruct_with(base)}}
    for l1, d in sorted(l1_dictionaries.items()):
        d = d.to(dev).eval()
        l0 = float(feature_frequencies(d, acts).sum())
        l1_rows.append({"method": "l1", "l1_coefficient": float(l1), "l0": l0})
        conds[f"l1={l1}"] = {s.hook: reconstruct_with(d)}
    targets = sorted({round(r["l0"], 6) for r in l1_rows} | {float(t) for t in target_l0s}, reverse=True)
    rm_rows = []
    for t in targets:
        removed = frequency_removal(freq, t)
        fn = without_features(base, removed)
        l0 = masked_l0(base, acts, removed)
        rm_rows.append({"method": "remove_frequent", "target_l0": t, "l0": l0,
                        "n_removed": int(len(removed)),
                        "removed_freq_mass": float(freq[removed].sum())})
        conds[f"target={t}"] = {s.hook: fn}
    res = splice_eval(model, tokens, conds, batch_size=batch_size)
    c = res["conditions"]
    ce_zero = c[f"zero:{s.hook}"]["ce"]
    common = {"site": s.name, "layer": s.layer, "ce_clean": res["ce_clean"], "ce_zero": ce_zero,
              "n_tokens": res["n_tokens"]}
    rows = [{**common, "method": "base", "l1_coefficient": base.cfg.l1_coefficient,
             "l0": float(freq.sum()), **_score(c["base"])}]
    for r in l1_rows:
        rows.append({**common, **r, **_score(c[f"l1={r['l1_coefficient']}"])})
    for r in rm_rows:
        rows.append({**common, **r, **_score(c[f"target={r['target_l0']}"])})
    return rows


def _score(cond: dict) -> dict:
    return {"ce": cond["ce"], "kl": cond["kl"], "recovered_vs_zero": cond["recovered_vs_zero"]}


def recovered_at(rows: Iterable[dict], method: str, l0: float) -> float:
    """``recovered_vs_zero`` of ``method``'s rows interpolated linearly in L0; NaN outside them."""
    pts = sorted((r["l0"], r["recovered_vs_zero"]) for r in rows if r["method"] == method)
    if not pts or not pts[0][0] <= l0 <= pts[-1][0]:
        return float("nan")
    return float(np.interp(l0, [p[0] for p in pts], [p[1] for p in pts]))


# ---- 3. stability across sizes --------------------------------------------------------------

def _rows(d: Dictionary | Tensor) -> Tensor:
    w = d.W_dec if isinstance(d, Dictionary) else d
    return w.detach().float().cpu()


@torch.no_grad()
def max_cos(a: Dictionary | Tensor, b: Dictionary | Tensor, *, chunk: int = 4096) -> Tensor:
    """For each decoder row of ``a``, the largest cosine similarity to any decoder row of ``b``."""
    wa, wb = F.normalize(_rows(a), dim=-1), F.normalize(_rows(b), dim=-1)
    if wa.shape[1] != wb.shape[1]:
        raise UserError(f"decoder widths differ: {wa.shape[1]} vs {wb.shape[1]}")
    return torch.cat([(wa[i:i + chunk] @ wb.T).max(-1).values for i in range(0, len(wa), chunk)])


def stability_matrix(dictionaries: Mapping[str, Dictionary | Tensor], threshold: float = 0.9,
                     live: Mapping[str, Tensor] | None = None) -> dict:
    """For every ordered pair (A, B): fraction of A's features whose max cos-sim to B is > threshold.

    ``live`` (a bool mask per label) adds the same fraction over A's live features only.
    Returns ``labels``, ``frac_above[i][j]`` (A = labels[i], B = labels[j]), optional
    ``frac_above_live`` and the raw ``max_cos[(A, B)]`` tensors.
    """
    labels = list(dictionaries)
    frac, frac_live, raw = [], [], {}
    for la in labels:
        row, row_live = [], []
        for lb in labels:
            m = max_cos(dictionaries[la], dictionaries[lb])
            raw[(la, lb)] = m
            row.append(float((m > threshold).float().mean()))
            if live is not None:
                mask = live[la]
                row_live.append(float((m[mask] > threshold).float().mean()) if mask.any() else float("nan"))
        frac.append(row)
        frac_live.append(row_live)
    out = {"labels": labels, "threshold": threshold, "frac_above": frac, "max_cos": raw}
    if live is not None:
        out["frac_above_live"] = frac_live
    return out


# ---- 4. norms -------------------------------------------------------------------------------

def norm_stats(norms: Tensor) -> dict:
    """Count, mean, std, min, max and percentiles (1, 5, 25, 50, 75, 95, 99) of a 1-D tensor."""
    x = norms.detach().double().flatten().cpu()
    if x.numel() == 0:
        raise UserError("no norms to summarise")
    q = torch.quantile(x, torch.tensor([p / 100 for p in PERCENTILES], dtype=torch.float64))
    out = {"n": int(x.numel()), "mean": float(x.mean()), "std": float(x.std()) if x.numel() > 1 else 0.0,
           "min": float(x.min()), "max": float(x.max()), "median": float(q[PERCENTILES.index(50)])}
    out.update({f"p{p}": float(v) for p, v in zip(PERCENTILES, q)})
    return out


def site_norms(model, tokens: Tensor, layers: Sequence[int], sites: Sequence[str] = ("resid", "mlp"), *,
               batch_size: int = 16) -> dict[tuple[str, int], Tensor]:
    """L2 norms ``[n·(n_ctx−1)]`` of each (site, layer)'s activations (any named site), from one harvest."""
    want: list[Site] = [resolve_site(model, layer, s) for s in sites for layer in layers]
    acts = harvest(model, tokens, [s.hook for s in want], batch_size=batch_size, progress=False)
    return {(s.name, s.layer): _flat(acts[s.hook], s.width).norm(dim=-1) for s in want}


@torch.no_grad()
def error_norms(d: Dictionary, acts: Tensor) -> dict[str, Tensor]:
    """Per row of ``acts``: ‖x‖, ‖x − x̂‖, ‖x̂‖ and the relative error ‖x − x̂‖/‖x‖."""
    d = d.to(acts.device).eval()
    recon = d.decode(d.encode(acts))
    xn = acts.norm(dim=-1)
    en = (acts - recon).norm(dim=-1)
    return {"act": xn, "error": en, "recon": recon.norm(dim=-1), "relative": en / xn.clamp_min(1e-12)}
