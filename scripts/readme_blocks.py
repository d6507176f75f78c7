"""Regenerate the README's figures that are not circuit runs: dictionary quality, several layers
spliced at once, steering, the benchmarks' printouts, scale, two ranks against one, the peer.

    .venv/bin/python scripts/readme_blocks.py [--only quality,layers,steer,bench,scale,dist,peer]
    (about 20 minutes in all; scale alone about 10)

Each block is rewritten from a fresh run of the command it names (``featcircuit evaluate``,
``featcircuit steer``, ``benchmarks/bench_*.py``), between ``<!-- results:NAME -->`` and
``<!-- /results:NAME -->`` (:func:`regenerate.replace_block`), so no figure there is copied by
hand. ``scripts/regenerate.py`` does the same for the circuit runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from regenerate import replace_block  # noqa: E402
from regenerate import run as featcircuit  # noqa: E402  (`featcircuit ARGS`, exits on failure)

STEERS = [  # (what the table says, the extra flags): one feature, three interventions
    ("`--scale 4 --positions last`", ["--scale", "4", "--positions", "last"]),
    ("`--mode clamp --value 0 --positions last`", ["--mode", "clamp", "--value", "0", "--positions", "last"]),
    ("`--scale 10` (all positions)", ["--scale", "10"]),
]
STEER_FEATURE, STEER_TASK, STEER_PROMPT = "mlp2/0", "is-not-none", "    if value is not"
BENCHES = ["bench_harvest.py", "bench_attribution.py", "bench_training.py", "bench_sparse_grad.py"]


def default_pair_dir(layer: int) -> str:
    """The cached default pair of ``layer`` (trained when absent, as discover would)."""
    from featcircuit import load_model
    from featcircuit.pairs import default_pair

    _, path = default_pair(load_model(), layer, progress=False)
    return str(path)


def quality_block(layer: int = 2, tokens: int = 8192) -> str:
    """``featcircuit evaluate`` of the default pair: one row per site and both spliced."""
    pair = default_pair_dir(layer)
    ev = json.loads(featcircuit(["evaluate", "--dicts", pair, "--tokens", str(tokens), "--json"]))
    s, d = ev["sites"], ev["downstream"]
    from featcircuit import load_model
    from featcircuit.sites import pair_sites

    hooks = {site.name: site.hook for site in pair_sites(load_model(), layer)}
    rows = ["| site | L0 | variance explained | cos-sim | dead | dense (>10%) | KL spliced | "
            "CE recovered vs zero | vs mean |", "|---|---|---|---|---|---|---|---|---|"]
    for k in ("resid", "mlp"):
        q, c = s[k], d[k]
        rows.append(f"| {k} (`{hooks[k]}`) | {q['l0']:.0f} | {q['variance_explained']:.3f} | "
                    f"{q['cos_sim']:.3f} | {q['dead_frac']:.3f} | {q['dense_frac']:.3f} | "
                    f"{c['kl_spliced']:.3f} | {c['recovered_vs_zero']:.3f} | {c['recovered_vs_mean']:.3f} |")
    b = d["both"]
    rows.append(f"| both spliced | | | | | | {b['kl_spliced']:.3f} | {b['recovered_vs_zero']:.3f} | "
                f"{b['recovered_vs_mean']:.3f} |")
    return (f"`featcircuit evaluate --dicts PAIR --tokens {tokens}` on the default layer-{layer} pair, "
            f"{s['resid']['n_tokens']:,} held-out tokens (BOS excluded):\n\n" + "\n".join(rows) +
            f"\n\nClean CE {d['ce_clean']:.3f} nats/token; with both dictionaries spliced "
            f"{b['ce_spliced']:.3f} (KL {b['kl_spliced']:.3f}).")


def layers_block(layers: str = "0,2") -> str:
    """``featcircuit evaluate --layers``: each layer's pair spliced, then all of them at once."""
    ev = json.loads(featcircuit(["evaluate", "--layers", layers, "--json"]))
    rows = ["| spliced | CE | KL | recovered vs zero | vs mean |", "|---|---|---|---|---|"]
    spliced = [(f"layer {r['layer']}, both", r["downstream"]["both"]) for r in ev["layers"]]
    spliced.append((f"all {len(ev['all']['sites'])} dictionaries at once", ev["all"]))
    for name, r in spliced:
        rows.append(f"| {name} | {r['ce_spliced']:.3f} | {r['kl_spliced']:.3f} | "
                    f"{r['recovered_vs_zero']:.3f} | {r['recovered_vs_mean']:.3f} |")
    each = sum(r["kl_spliced"] for _, r in spliced[:-1])
    together = ev["all"]["kl_spliced"]
    word = "exceeds" if together > each else "does not exceed"
    return (f"`featcircuit evaluate --layers {layers}` ({ev['n_tokens']:,} held-out tokens, clean CE "
            f"{ev['ce_clean']:.3f}):\n\n" + "\n".join(rows) +
            f"\n\nThe KL of all of them spliced together ({together:.4f}) {word} the sum of the layers' own "
            f"({each:.4f}).")


def steer_block() -> str:
    """Three interventions on one feature: the task's logit difference, KL, greedy text."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, (what, flags) in enumerate(STEERS):
            out = Path(tmp) / f"{k}.json"
            featcircuit(["steer", STEER_FEATURE, "--task", STEER_TASK, "--prompt", STEER_PROMPT, *flags,
                         "--out", str(out)])
            rows.append((what, json.loads(out.read_text())))
    first = rows[0][1]
    ta = first["typical_activation"]
    head = (f"| intervention on `{STEER_FEATURE}` (typical activation {ta['mean_active']:.2f}, fires on "
            f"{ta['freq']:.1%} of tokens) | logit diff. | Δ | KL at the answer | "
            "greedy text from the prompt |")
    lines = [f"`featcircuit steer {STEER_FEATURE} --task {STEER_TASK} --prompt {STEER_PROMPT!r} …` on "
             f"the default layer-2 pair ({first['task']['pairs']} pairs, clean logit difference "
             f"{first['task']['before']:+.2f}):", "", head, "|---|---|---|---|---|"]
    for what, r in rows:
        t, g = r["task"], r["generation"]
        if r["mode"] == "add":
            what = f"{what} (add {r['value']:.2f}·d_j)"
        text = "unchanged" if g["after"] == g["before"] else "`" + g["after"][:48].replace("\n", "\\n") + "…`"
        lines.append(f"| {what} | {t['after']:+.2f} | {t['delta']:+.2f} | {r['next_token_task']['kl']:.3f} | "
                     f"{text} |")
    rose = ", ".join(f"`{x['token']}`" for x in first["next_token_task"]["rose"][:2])
    lines += ["", f"Tokens that rose most at the answer when the feature is added ({rows[0][0]}): {rose}."]
    return "\n".join(lines)


def _output(args: list[str], env: dict | None = None) -> str:
    """A script's printout (the home folder as ``~``); exits on failure."""
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                       env=None if env is None else {**os.environ, **env})
    if r.returncode != 0:
        sys.exit(f"readme_blocks: {args[0]} failed:\n{r.stderr[-2000:]}")
    return r.stdout.strip().replace(str(Path.home()), "~")


def bench_block() -> str:
    """The benchmarks' own printouts, one after the other."""
    outs = [f"=== {b}\n" + _output([str(ROOT / "benchmarks" / b)]) for b in BENCHES]
    return "```\n" + "\n".join(outs) + "\n```"


def _script(args: list[str], env: dict | None = None) -> str:
    """A benchmark's printout under its ``$ command`` line (paths relative to the repository)."""
    pin = " ".join(f"{k}={v}" for k, v in (env or {}).items())
    shown = f"$ {pin + ' ' if pin else ''}.venv/bin/python {' '.join(args)}"
    return shown + "\n" + _output(args, env).replace(str(ROOT) + "/", "")


def scale_block() -> str:
    """``benchmarks/bench_scale.py``: Pythia-70m/160m shapes, 4k–32k features, memory with tokens."""
    return "```\n" + _script(["benchmarks/bench_scale.py", "--growth", "8192", "32768"]) + "\n```"


def dist_block() -> str:
    """``benchmarks/dist_vs_single.py``: two torchrun ranks against one process, the pairs compared."""
    return "```\n" + _script(["benchmarks/dist_vs_single.py"], env={"OMP_NUM_THREADS": "1"}) + "\n```"


def peer_block() -> str:
    """The table of ``docs/scale/peer_saelens.json`` (``benchmarks/peer_saelens/run.py`` writes it in
    its own venv, with SAELens installed; this block only formats the file)."""
    d = json.loads((ROOT / "docs" / "scale" / "peer_saelens.json").read_text())
    rows = ["| model | site | d_in → d_sae | train rows | featcircuit tok/s | SAELens tok/s | ratio | "
            "held-out FVE featcircuit / SAELens |", "|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        model = r["model"] + (" (random weights)" if r.get("random_weights") else "")
        rows.append(f"| {model} | {r['site']} | {r['d_in']:,} → {r['d_sae']:,} | {r['train_rows']:,} | "
                    f"{r['featcircuit_tok_s']:,.0f} | {r['saelens_tok_s']:,.0f} | "
                    f"{r['featcircuit_tok_s'] / r['saelens_tok_s']:.1f}× | "
                    f"{r['featcircuit_fve']:.3f} / {r['saelens_fve']:.3f} |")
    a = d["args"]
    head = (f"`benchmarks/peer_saelens/run.py` ({d['rows'][0]['saelens']}, {d['threads']} threads, "
            f"TopK k = {a['k']}, batch {a['batch']:,}, the same harvested activations for both trainers, "
            f"{d['rows'][0]['heldout_rows']:,} held-out tokens; `docs/scale/peer_saelens.json`):")
    return head + "\n\n" + "\n".join(rows)


BLOCKS = {"quality": quality_block, "layers": layers_block, "steer": steer_block, "bench": bench_block,
          "scale": scale_block, "dist": dist_block, "peer": peer_block}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(BLOCKS), help=f"comma-separated: {', '.join(BLOCKS)}")
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n]
    bad = [n for n in names if n not in BLOCKS]
    if bad:
        sys.exit(f"readme_blocks: unknown block {bad[0]!r}; known: {', '.join(BLOCKS)}")
    readme = ROOT / "README.md"
    for n in names:
        body = BLOCKS[n]()
        readme.write_text(replace_block(readme.read_text(), n, body))
        print(f"updated {readme} (block {n})", flush=True)


if __name__ == "__main__":
    main()
