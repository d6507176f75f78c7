"""Run the four dictionary analyses of :mod:`featcircuit.analyses` on the built-in model.

    OMP_NUM_THREADS=1 python examples/analyses.py [--model stdlib-neox] [--layer 2] [--out docs/analyses]

Trains small dictionaries on the residual and mid-MLP sites of one layer (TopK at widths 1×, 2×,
4×, 8× plus the 8× again with another seed; ReLU at several L1 penalties), then writes a PNG and
a JSON of the numbers for each analysis into the output folder (plus ``run.json``: arguments,
configs, seconds per step):

a. ``perturbation``: KL(clean ‖ perturbed) against cosine similarity for random perturbations of
   both sites of every layer, with the 8× TopK dictionaries' own (cos-sim, KL) points at the layer
   and their excess over random noise matched to their errors two ways: every token at the mean
   (cos-sim, norm ratio), and each token at its own (so the noise has each token's error norm);
   ``--only perturbation`` runs (a) alone (training only the 8× pair; ``--pair default`` uses the
   cached default pair instead), about 6 minutes of CPU on one thread, most of it training;
b. ``lower_l0``: CE loss recovered against L0 when a ReLU dictionary's most frequent features are
   switched off, against ReLU dictionaries trained with larger L1 penalties;
c. ``stability``: the fraction of features of one TopK size with a >0.9 cosine match in another,
   with a seed-to-seed baseline and a check for matches that are only the shared initialisation;
d. ``norms``: activation norms per site and layer, and the 8× pair's reconstruction error norms.

The default budgets (600k training rows × 2 epochs per dictionary, 16k held-out tokens, 8k for the
sweep in (a)) finish in about 13 minutes on one CPU thread (`--train-tokens 150000` runs in 5 min,
but then the dictionaries barely move from their initialisation and (c) measures nothing).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import featcircuit.analyses as A  # noqa: E402
from featcircuit import harvest, load_model, load_tokens, pair_sites  # noqa: E402
from featcircuit.dictionary import DictConfig, Dictionary  # noqa: E402
from featcircuit.pairs import default_pair  # noqa: E402
from featcircuit.sites import n_layers  # noqa: E402
from featcircuit.training import TrainConfig, train_pair  # noqa: E402

SITES = ("resid", "mlp")


def _json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, default=float) + "\n")


def _fmt(x: float) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"


# ---- a ---------------------------------------------------------------------------------------

def run_perturbation(model, layer, pair, tokens, cos_sims, out: Path, label: str = "8× TopK",
                     run: dict | None = None) -> dict:
    t_start = time.time()
    rows = []
    for lay in range(n_layers(model)):
        for site in SITES:
            # ρ = 1 everywhere, so layers compare like with like; at the dictionary's layer also
            # ρ = the dictionary's mean norm ratio, plus random noise matched to the dictionary's
            # error at its mean (cos-sim, ρ) and token by token (A.matched_noise).
            for r in A.perturbation_sweep(model, lay, site, tokens, cos_sims, norm_ratio=1.0):
                rows.append({**r, "rho": "1"})
            if lay == layer:
                for r in A.perturbation_sweep(model, lay, site, tokens, cos_sims,
                                              dictionary=getattr(pair, site)):
                    rows.append({**r, "rho": "dictionary"})
    head = {"dictionary": label, "dictionary_vs_random": {}, "kl_at_cos_0.9_rho_1": {}}
    for site in SITES:
        mine = [r for r in rows if r["site"] == site and r["layer"] == layer and r["rho"] == "dictionary"]
        kind = {r["kind"]: r for r in mine if r["kind"] != "random"}
        dr = kind["dictionary"]
        kl_interp = A.kl_at(mine, dr["cos_sim"])
        kl_rand1 = A.kl_at([r for r in rows if r["site"] == site and r["layer"] == layer
                            and r["rho"] == "1"], dr["cos_sim"])
        kl_mean, kl_tok = kind["random_mean_matched"]["kl"], kind["random_per_token_matched"]["kl"]

        def ratio(kl_rand: float) -> float:
            return dr["kl"] / kl_rand if kl_rand > 0 else float("nan")

        head["dictionary_vs_random"][site] = {
            "cos_sim": dr["cos_sim"], "norm_ratio": dr["norm_ratio"], "kl_dictionary": dr["kl"],
            "kl_random_mean_matched": kl_mean, "kl_random_per_token_matched": kl_tok,
            "kl_random_mean_matched_interpolated": kl_interp, "kl_random_same_cos_rho_1": kl_rand1,
            # KL(dictionary) / KL(random noise matched to it): the dictionary's excess over random
            "excess_over_random": {"mean_matched": ratio(kl_mean), "per_token_matched": ratio(kl_tok),
                                   "mean_matched_interpolated": ratio(kl_interp)},
            "dictionary_beats_random": {"mean_matched": bool(dr["kl"] < kl_mean),
                                        "per_token_matched": bool(dr["kl"] < kl_tok)},
            "recovered_vs_zero_dictionary": dr["recovered_vs_zero"]}
    for site in SITES:
        for lay in range(n_layers(model)):
            sel = [r for r in rows if r["site"] == site and r["layer"] == lay and r["rho"] == "1"]
            head["kl_at_cos_0.9_rho_1"][f"{site}/L{lay}"] = A.kl_at(sel, 0.9)
    frag = head["kl_at_cos_0.9_rho_1"]
    head["most_fragile_first"] = sorted(frag, key=lambda k: -frag[k])
    head["most_fragile_per_site"] = {site: max((k for k in frag if k.startswith(site + "/")), key=frag.get)
                                     for site in SITES}

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 5.5), gridspec_kw={"width_ratios": [2.2, 1]})
    colors = plt.cm.viridis(np.linspace(0, 0.9, n_layers(model)))
    for lay in range(n_layers(model)):
        for site, ls, mk in zip(SITES, ("-", "--"), ("o", "s")):
            sel = sorted((r["cos_sim"], r["kl"]) for r in rows if r["site"] == site and r["layer"] == lay
                         and r["kind"] == "random" and r["rho"] == "1")
            ax.plot(*zip(*sel), ls=ls, marker=mk, ms=3, color=colors[lay], label=f"{site} L{lay}, ρ=1")
    for site, ls, mk in zip(SITES, ("-", "--"), ("*", "P")):
        sel = sorted((r["cos_sim"], r["kl"]) for r in rows if r["site"] == site and r["layer"] == layer
                     and r["kind"] == "random" and r["rho"] == "dictionary")
        h = head["dictionary_vs_random"][site]
        ax.plot(*zip(*sel), ls=ls, color="red", lw=0.9, alpha=0.7,
                label=f"{site} L{layer}, ρ={h['norm_ratio']:.2f} (dictionary's)")
        ax.plot(h["cos_sim"], h["kl_dictionary"], mk, ms=15, color=colors[layer], mec="red", mew=1.5,
                ls="none", label=f"{label} dictionary, {site} L{layer}")
        ex = h["excess_over_random"]
        ax.plot(h["cos_sim"], h["kl_random_mean_matched"], "x", ms=9, mew=1.8, color="red", ls="none",
                label=f"{site}: random, mean-matched (dict ×{ex['mean_matched']:.2f})")
        ax.plot(h["cos_sim"], h["kl_random_per_token_matched"], "_", ms=16, mew=2.2, color="black",
                ls="none", label=f"{site}: random, per-token-matched (dict ×{ex['per_token_matched']:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("cosine similarity of the replacement to the activation")
    ax.set_ylabel("KL(clean ‖ perturbed), nats/token")
    ax.set_title("Random perturbations at a fixed cos-sim vs dictionary reconstructions\n"
                 "(random: x' = ρ‖x‖(c·x̂ + √(1−c²)·n̂), n̂ orthogonal to x̂; "
                 "red: ρ = the dictionary's mean norm ratio;\n"
                 "×: every token at the mean (c, ρ); —: each token at its own c and ‖x̂‖, "
                 "so ‖x'−x‖ = its error norm)",
                 fontsize=8)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6, ncol=2, loc="lower left")
    # right: the excess over random, KL(dictionary) / KL(matched random noise), both matchings
    xs = np.arange(len(SITES))
    for j, (key, name, col) in enumerate((("mean_matched", "mean-matched", "tab:red"),
                                          ("per_token_matched", "per-token-matched", "black"))):
        vals = [head["dictionary_vs_random"][site]["excess_over_random"][key] for site in SITES]
        bars = bx.bar(xs + (j - 0.5) * 0.38, vals, 0.36, color=col, alpha=0.75, label=name)
        bx.bar_label(bars, fmt="×%.2f", fontsize=8)
    top = max(v for site in SITES for v in head["dictionary_vs_random"][site]["excess_over_random"].values()
              if not math.isnan(v))
    bx.set_ylim(0, max(1.0, top) * 1.3)
    bx.axhline(1.0, color="grey", lw=1, ls=":")
    bx.set_xticks(xs, [f"{site} L{layer}" for site in SITES])
    bx.set_ylabel("KL(dictionary) / KL(matched random noise)")
    bx.set_title(f"{label}: excess over random\n(>1: its error hurts more than random noise)", fontsize=8)
    bx.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(out / "perturbation.png", dpi=130)
    plt.close(fig)
    if run is not None:
        run = {**run, "seconds": {**run.get("seconds", {}), "a_perturbation": time.time() - t_start}}
    _json(out / "perturbation.json", {"headline": head, "rows": rows, "cos_sims": list(cos_sims),
                                      **({"run": run} if run is not None else {})})
    return head


def print_perturbation(a: dict, layer: int) -> None:
    print(f"(a) random perturbation vs the {a['dictionary']} dictionary at layer {layer}; "
          "KL(dict) / KL(random noise matched to its error) = excess over random:")
    for site, h in a["dictionary_vs_random"].items():
        ex = h["excess_over_random"]
        print(f"    {site:5s}: mean cos {h['cos_sim']:.3f}, mean ρ {h['norm_ratio']:.3f}: KL dict "
              f"{_fmt(h['kl_dictionary'])} vs random mean-matched {_fmt(h['kl_random_mean_matched'])} "
              f"(×{_fmt(ex['mean_matched'])}; read off the sweep ×{_fmt(ex['mean_matched_interpolated'])}), "
              f"per-token-matched {_fmt(h['kl_random_per_token_matched'])} "
              f"(×{_fmt(ex['per_token_matched'])})")
    frag = a["kl_at_cos_0.9_rho_1"]
    print("    KL at cos 0.9 (ρ=1), most fragile first: "
          + ", ".join(f"{k} {_fmt(frag[k])}" for k in a["most_fragile_first"]))


def train_common(args) -> dict:
    """The TrainConfig fields every dictionary of this script shares."""
    return dict(tokens=args.train_tokens, epochs=args.epochs, batch_size=1024, lr=args.lr,
                warmup_steps=20, dead_tokens=max(1024, args.train_tokens // 4))


def perturbation_only(args) -> None:
    """``--only perturbation``: (a) alone, on the widest TopK pair (as in the full run) or the default."""
    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    model = load_model(args.model, device="cpu")
    layer, n_ctx = args.layer, 128
    heldout = load_tokens(args.data, model, n_ctx=n_ctx, n_tokens=args.eval_tokens, split="heldout")
    sweep = heldout[: -(-args.sweep_tokens // n_ctx)]
    run: dict = {"args": vars(args), "torch_threads": torch.get_num_threads()}
    if args.pair == "default":
        pair, folder = default_pair(model, layer, data=args.data, progress=False)
        label, run["pair"] = "default pair", str(folder)
    else:
        n_seq = -(-args.train_tokens // (n_ctx - 1))
        train = load_tokens(args.data, model, n_ctx=n_ctx, n_tokens=n_seq * n_ctx, split="train")
        cfg = TrainConfig(architecture="topk", width=max(args.widths), k=args.k, seed=args.seed,
                          **train_common(args))
        pair = train_pair(model, layer, train, cfg, progress=False)
        label, run["topk_config"] = f"{max(args.widths):g}x TopK", asdict(cfg)
    run["seconds"] = {"load_and_dictionaries": time.time() - t0}
    print(f"model {args.model}: layer {layer}; {label}; {len(sweep) * n_ctx:,} held-out tokens for the sweep")
    a = run_perturbation(model, layer, pair, sweep, args.cos_sims, out, label=label, run=run)
    print_perturbation(a, layer)
    print(f"wrote perturbation.png, perturbation.json to {out}/ in {time.time() - t0:.0f}s")


# ---- b ---------------------------------------------------------------------------------------

def run_lower_l0(model, layer, relu_pairs, tokens, out: Path) -> dict:
    l1s = sorted(relu_pairs)
    result, head = {}, {}
    for site in SITES:
        base = getattr(relu_pairs[l1s[0]], site)
        others = {l1: getattr(relu_pairs[l1], site) for l1 in l1s[1:]}
        base_l0 = float(A.feature_frequencies(base, A.site_acts(model, layer, site, tokens)).sum())
        extra = [base_l0 * f for f in (0.75, 0.5, 0.3, 0.15)]
        rows = A.lower_l0_comparison(model, layer, site, base, others, tokens, target_l0s=extra)
        result[site] = rows
        matched = []
        for r in (x for x in rows if x["method"] == "l1"):
            rm = next(x for x in rows if x["method"] == "remove_frequent"
                      and abs(x["target_l0"] - round(r["l0"], 6)) < 1e-9)
            matched.append({"l1_coefficient": r["l1_coefficient"], "l0_l1": r["l0"],
                            "recovered_l1": r["recovered_vs_zero"], "l0_removal": rm["l0"],
                            "n_removed": rm["n_removed"], "recovered_removal": rm["recovered_vs_zero"]})
        head[site] = {"base_l1_coefficient": l1s[0], "base_l0": base_l0,
                      "base_recovered": next(x for x in rows if x["method"] == "base")["recovered_vs_zero"],
                      "matched": matched}

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, site in zip(axes, SITES):
        rows = result[site]
        b = next(x for x in rows if x["method"] == "base")
        bp = (b["l0"], b["recovered_vs_zero"], b["l1_coefficient"])
        rm = sorted([(x["l0"], x["recovered_vs_zero"]) for x in rows if x["method"] == "remove_frequent"]
                    + [bp[:2]])
        l1 = sorted([(x["l0"], x["recovered_vs_zero"], x["l1_coefficient"]) for x in rows
                     if x["method"] == "l1"] + [bp])
        ax.plot([p[0] for p in rm], [p[1] for p in rm], "o-",
                label=f"remove most frequent features (from L1={l1s[0]:g})")
        ax.plot([p[0] for p in l1], [p[1] for p in l1], "s-", label="train with larger L1")
        for x, y, c in l1[:-1]:
            ax.annotate(f"L1={c:g}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
        ax.plot(b["l0"], b["recovered_vs_zero"], "k*", ms=12, label=f"base ReLU dictionary (L1={l1s[0]:g})")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("mean L0 (held-out tokens)")
        ax.set_ylabel("CE loss recovered vs zero ablation")
        ax.set_title(f"{site} site, layer {layer}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle("Lower L0 two ways: frequency removal vs larger L1 penalty", fontsize=11)
    fig.tight_layout()
    fig.savefig(out / "lower_l0.png", dpi=130)
    plt.close(fig)
    _json(out / "lower_l0.json", {"headline": head, "rows": result})
    return head


# ---- c ---------------------------------------------------------------------------------------

def run_stability(model, layer, trained: dict, eval_acts, out: Path) -> dict:
    """``trained``: label → (pair, its TrainConfig)."""
    result = {}
    for site in SITES:
        dicts = {lab: getattr(p, site) for lab, (p, _) in trained.items()}
        live = {lab: A.feature_frequencies(d, eval_acts[site]) > 0 for lab, d in dicts.items()}
        st = A.stability_matrix(dicts, 0.9, live=live)
        # Same seed ⇒ the decoder inits of different widths share their first rows; a feature
        # that never moved from its init would "match" across sizes for no learned reason.
        near_init = {}
        for lab, (p, cfg) in trained.items():
            d = getattr(p, site)
            init = Dictionary(DictConfig(d_in=d.cfg.d_in, d_sae=d.cfg.d_sae),
                              seed=cfg.seed + SITES.index(site)).W_dec.detach()
            cos0 = torch.nn.functional.cosine_similarity(d.W_dec.detach(), init, dim=-1)
            near_init[lab] = float((cos0 > 0.9).float().mean())
        # How much of a cross-size match is the shared init: the best match of feature i of the
        # smaller dictionary is feature i of the larger one (same seed ⇒ same initial row).
        same_index = {}
        for la, (_, ca) in trained.items():
            for lb, (_, cb) in trained.items():
                if la != lb and ca.seed == cb.seed:
                    wa, wb = dicts[la].W_dec.detach(), dicts[lb].W_dec.detach()
                    n = min(len(wa), len(wb))
                    best = (torch.nn.functional.normalize(wa[:n], dim=-1)
                            @ torch.nn.functional.normalize(wb, dim=-1).T).argmax(-1)
                    same_index[f"{la}->{lb}"] = float((best == torch.arange(n)).float().mean())
        result[site] = {"labels": st["labels"], "threshold": st["threshold"],
                        "frac_above": st["frac_above"], "frac_above_live": st["frac_above_live"],
                        "live_frac": {k: float(v.float().mean()) for k, v in live.items()},
                        "frac_near_init": near_init,
                        "frac_best_match_same_index": same_index,
                        "max_cos_median": {f"{a}->{b}": float(v.median())
                                           for (a, b), v in st["max_cos"].items()},
                        "_raw": st["max_cos"]}

    fig = plt.figure(figsize=(3.2 * (len(trained) + 1), 7.5))
    for row, site in enumerate(SITES):
        r = result[site]
        labs = r["labels"]
        ax = fig.add_subplot(2, len(labs) + 1, row * (len(labs) + 1) + 1)
        m = np.array(r["frac_above"])
        med = np.array([[r["max_cos_median"][f"{a}->{b}"] for b in labs] for a in labs])
        ax.imshow(med, vmin=0, vmax=1, cmap="magma")
        for i in range(len(labs)):
            for j in range(len(labs)):
                ax.text(j, i, f"{m[i, j]:.2f}\n({med[i, j]:.2f})", ha="center", va="center", fontsize=7,
                        color="black" if med[i, j] > 0.6 else "white")
        ax.set_xticks(range(len(labs)), labs)
        ax.set_yticks(range(len(labs)), labs)
        ax.set_xlabel("B (matched against)")
        ax.set_ylabel("A (features of)")
        ax.set_title(f"{site}: frac of A's features with max cos\nto B > 0.9 (median max cos; colour)",
                     fontsize=8)
        for k, la in enumerate(labs):
            ax = fig.add_subplot(2, len(labs) + 1, row * (len(labs) + 1) + 2 + k)
            for lb in labs:
                if lb == la:
                    continue
                ax.hist(r["_raw"][(la, lb)].numpy(), bins=40, range=(0, 1), histtype="step", label=f"vs {lb}")
            ax.set_title(f"{site}: features of {la}", fontsize=9)
            ax.set_xlabel("max cos-sim to B's decoder rows", fontsize=8)
            ax.axvline(0.9, color="gray", ls=":")
            ax.legend(fontsize=7)
    fig.suptitle(f"TopK dictionary stability across widths (layer {layer}, same data; same seed unless "
                 "labelled)", fontsize=11)
    fig.tight_layout()
    fig.savefig(out / "stability.png", dpi=110)
    plt.close(fig)
    for site in SITES:
        result[site].pop("_raw")
    _json(out / "stability.json", result)
    return result


# ---- d ---------------------------------------------------------------------------------------

def run_norms(model, layer, pair, tokens, out: Path, label: str = "8× TopK") -> dict:
    layers = list(range(n_layers(model)))
    norms = A.site_norms(model, tokens, layers, SITES)
    stats = {site: {f"L{lay}": A.norm_stats(norms[(site, lay)]) for lay in layers} for site in SITES}
    r, m = pair_sites(model, layer)
    acts = harvest(model, tokens, [r.hook, m.hook], progress=False)
    err = {}
    for s in (r, m):
        e = A.error_norms(getattr(pair, s.name), acts[s.hook][:, 1:].reshape(-1, s.width))
        err[s.name] = e
    err_stats = {site: {k: A.norm_stats(v) for k, v in err[site].items()} for site in SITES}

    fig, axes = plt.subplots(1, 4, figsize=(19, 4.3))
    for ax, site in zip(axes[:2], SITES):
        hi = max(float(torch.quantile(norms[(site, lay)], 0.999)) for lay in layers)
        for lay in layers:
            ax.hist(norms[(site, lay)].numpy(), bins=80, range=(0, hi), histtype="step", lw=1.3,
                    label=f"L{lay} (median {stats[site][f'L{lay}']['median']:.2f})")
        ax.set_xlabel("‖activation‖₂ (positions ≥ 1)")
        ax.set_ylabel("tokens")
        ax.set_title(f"{site} activation norms per layer", fontsize=10)
        ax.legend(fontsize=8)
    ax = axes[2]
    for site, c in zip(SITES, ("C0", "C1")):
        hi = float(torch.quantile(err[site]["act"], 0.999)) * 1.05
        ax.hist(err[site]["error"].numpy(), bins=80, range=(0, hi), histtype="step", color=c, lw=1.3,
                label=f"{site} ‖x − x̂‖ (median {err_stats[site]['error']['median']:.2f})")
        ax.hist(err[site]["act"].numpy(), bins=80, range=(0, hi), histtype="step", color=c, ls=":",
                label=f"{site} ‖x‖ (median {err_stats[site]['act']['median']:.2f})")
    ax.set_xlabel("L2 norm")
    ax.set_ylabel("tokens")
    ax.set_title(f"reconstruction error norms, {label} pair, layer {layer}", fontsize=10)
    ax.legend(fontsize=7)
    ax = axes[3]
    for site, c in zip(SITES, ("C0", "C1")):
        rel = err[site]["relative"].numpy()
        ax.hist(rel, bins=80, range=(0, min(2.0, float(np.quantile(rel, 0.999)) * 1.05)),
                histtype="step", color=c, lw=1.3,
                label=f"{site} (median {err_stats[site]['relative']['median']:.2f})")
    ax.set_xlabel("‖x − x̂‖ / ‖x‖")
    ax.set_ylabel("tokens")
    ax.set_title(f"relative reconstruction error, layer {layer}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "norms.png", dpi=130)
    plt.close(fig)
    res = {"activation_norms": stats, "layer": layer, "dictionary": label, "error_norms": err_stats}
    _json(out / "norms.json", res)
    return res


# ---- main ------------------------------------------------------------------------------------

def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="stdlib-neox")
    ap.add_argument("--data", default="builtin:stdlib")
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--out", default="docs/analyses")
    ap.add_argument("--train-tokens", type=int, default=600_000, help="training rows per dictionary")
    ap.add_argument("--eval-tokens", type=int, default=16_384, help="held-out tokens for (b)-(d)")
    ap.add_argument("--sweep-tokens", type=int, default=8_192, help="held-out tokens for (a)")
    ap.add_argument("--widths", type=float, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-3,
                    help="Adam lr for every dictionary (short runs need more than the default rule)")
    ap.add_argument("--control-seed", type=int, default=1,
                    help="also train the widest TopK with this seed, as a seed-to-seed baseline for (c)")
    ap.add_argument("--relu-width", type=float, default=4)
    ap.add_argument("--l1", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.4])
    ap.add_argument("--cos-sims", type=float, nargs="+", default=list(A.DEFAULT_COS_SIMS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=["perturbation"],
                    help="run one analysis alone (trains only the dictionaries it needs)")
    ap.add_argument("--pair", choices=["trained", "default"], default="trained",
                    help="with --only perturbation: the widest TopK pair trained here, or the cached "
                         "default pair (`featcircuit` trains it on first use)")
    args = ap.parse_args(argv)
    if args.pair != "trained" and args.only != "perturbation":
        ap.error("--pair default needs --only perturbation")
    if args.only == "perturbation":
        return perturbation_only(args)

    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    model = load_model(args.model, device="cpu")
    layer, n_ctx = args.layer, 128
    n_seq = -(-args.train_tokens // (n_ctx - 1))
    train = load_tokens(args.data, model, n_ctx=n_ctx, n_tokens=n_seq * n_ctx, split="train")
    heldout = load_tokens(args.data, model, n_ctx=n_ctx, n_tokens=args.eval_tokens, split="heldout")
    sweep = heldout[: -(-args.sweep_tokens // n_ctx)]
    sites = pair_sites(model, layer)
    acts = harvest(model, train, [s.hook for s in sites], progress=False)
    ev_h = harvest(model, heldout, [s.hook for s in sites], progress=False)
    eval_acts = {s.name: ev_h[s.hook][:, 1:].reshape(-1, s.width) for s in sites}
    del ev_h
    times = {"load_and_harvest": time.time() - t0}
    print(f"model {args.model}: layer {layer}; {len(train) * (n_ctx - 1):,} training rows, "
          f"{len(heldout) * n_ctx:,} held-out tokens ({len(sweep) * n_ctx:,} for the sweep)")

    t = time.time()
    common = train_common(args)
    cfgs = {f"{w:g}x": TrainConfig(architecture="topk", width=w, k=args.k, seed=args.seed, **common)
            for w in args.widths}
    wmax = f"{max(args.widths):g}x"
    if args.control_seed is not None and args.control_seed != args.seed:
        cfgs[f"{wmax}-seed{args.control_seed}"] = replace(cfgs[wmax], seed=args.control_seed)
    topk = {lab: (train_pair(model, layer, train, cfg, acts=acts, progress=False), cfg)
            for lab, cfg in cfgs.items()}
    relu_cfg = TrainConfig(architecture="relu", width=args.relu_width, seed=args.seed, **common)
    relu = A.train_l1_sweep(model, layer, train, args.l1, relu_cfg, acts=acts)
    del acts
    times["training"] = time.time() - t
    big = topk[wmax][0]
    print(f"trained {len(topk)} TopK pairs (k={args.k}) and {len(relu)} ReLU pairs "
          f"in {times['training']:.0f}s")

    t = time.time()
    c = run_stability(model, layer, topk, eval_acts, out)
    times["c_stability"] = time.time() - t
    t = time.time()
    a = run_perturbation(model, layer, big, sweep, args.cos_sims, out, label=f"{wmax} TopK")
    times["a_perturbation"] = time.time() - t
    t = time.time()
    b = run_lower_l0(model, layer, relu, heldout, out)
    times["b_lower_l0"] = time.time() - t
    t = time.time()
    d = run_norms(model, layer, big, heldout, out, label=f"{wmax} TopK")
    times["d_norms"] = time.time() - t
    times["total"] = time.time() - t0
    _json(out / "run.json", {"args": vars(args), "seconds": times,
                             "topk_config": asdict(cfgs[wmax]), "relu_config": asdict(relu_cfg),
                             "torch_threads": torch.get_num_threads()})

    print()
    print_perturbation(a, layer)
    print(f"(b) lower L0 (ReLU, width {args.relu_width:g}x), CE recovered vs zero ablation:")
    for site, h in b.items():
        print(f"    {site:5s}: base L1={h['base_l1_coefficient']:g} L0 {h['base_l0']:.1f} recovered "
              f"{h['base_recovered']:.3f}")
        for mt in h["matched"]:
            print(f"           L0 {mt['l0_l1']:6.1f}: larger L1 ({mt['l1_coefficient']:g}) "
                  f"{mt['recovered_l1']:.3f}"
                  f"  vs removing {mt['n_removed']} frequent features (L0 {mt['l0_removal']:.1f}) "
                  f"{mt['recovered_removal']:.3f}")
    print("(c) stability, fraction of A's features with a >0.9 cos match in B (rows A, cols B):")
    for site in SITES:
        r = c[site]
        print(f"    {site:5s}   " + " ".join(f"{lab:>8s}" for lab in r["labels"])
              + "   live  near-init")
        for lab, row in zip(r["labels"], r["frac_above"]):
            print(f"    {lab:>8s} " + " ".join(f"{v:8.2f}" for v in row)
                  + f"   {r['live_frac'][lab]:.2f}  {r['frac_near_init'][lab]:.2f}")
        med, same = r["max_cos_median"], r["frac_best_match_same_index"]
        widths = [f"{w:g}x" for w in sorted(args.widths)]
        print("        median max-cos (best match is the same-index row, i.e. the shared init): "
              + ", ".join(f"{a}->{b} {med[f'{a}->{b}']:.2f} ({same[f'{a}->{b}']:.2f})"
                          for a, b in zip(widths, widths[1:]))
              + "".join(f"; seed baseline {wmax}->{lab} {med[f'{wmax}->{lab}']:.2f}"
                        for lab in r["labels"] if lab.startswith(wmax + "-seed")))
    print("(d) median activation norm per layer: " + "; ".join(
        f"{site} " + " ".join(f"{d['activation_norms'][site][f'L{lay}']['median']:.2f}"
                              for lay in range(n_layers(model))) for site in SITES))
    print(f"    layer {layer} {max(args.widths):g}x pair, median ‖x−x̂‖/‖x‖: " + ", ".join(
        f"{site} {d['error_norms'][site]['relative']['median']:.3f}" for site in SITES))
    print(f"\nwrote {', '.join(sorted(p.name for p in out.iterdir() if p.suffix in ('.png', '.json')))} "
          f"to {out}/ in {times['total']:.0f}s")


if __name__ == "__main__":
    main()
