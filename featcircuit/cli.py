"""The ``featcircuit`` command line: one sub-command per job, thin wrappers over the API.

Bad input raises :class:`~featcircuit.errors.UserError` anywhere below; ``main`` prints it as
one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import UserError


def _add_model(p: argparse.ArgumentParser) -> None:
    from .models import BUILTIN_NAME

    p.add_argument("--model", default=BUILTIN_NAME,
                   help=f"built-in name ({BUILTIN_NAME}), HuggingFace name or local HF folder")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")


def cmd_model_info(args) -> None:
    from .models import load_model, model_info
    from .sites import site_table

    model = load_model(args.model, args.device)
    info = model_info(model)
    if args.json:
        print(json.dumps({**info, "sites": site_table(model)}, indent=1))
        return
    for k, v in info.items():
        print(f"{k:>14}: {v:,}" if isinstance(v, int) else f"{k:>14}: {v}")
    print("\nsites (resid = the residual the MLP reads; mlp = MLP hidden after the nonlinearity)")
    print(f"{'layer':>5}  {'resid hook':<28} {'width':>5}  {'mlp hook':<26} {'width':>5}")
    for r in site_table(model):
        print(f"{r['layer']:>5}  {r['resid']:<28} {r['d_resid']:>5}  {r['mlp']:<26} {r['d_mlp']:>5}")


def cmd_model_train(args) -> None:
    from .lm_training import LMConfig, train_lm
    from .models import BUILTIN_DIR

    out = Path(args.out) if args.out else BUILTIN_DIR
    cfg = LMConfig(steps=args.steps, seed=args.seed)
    prov = train_lm(out, cfg)
    h = prov["heldout"]
    print(f"held-out CE {h['ce']:.3f} nats/token, top-1 {h['top1']:.3f} "
          f"(bigram {prov['baselines']['bigram']['ce']:.3f}, unigram {prov['baselines']['unigram']['ce']:.3f})")
    print(f"wrote {out}")


def cmd_harvest(args) -> None:
    from .activations import harvest
    from .data import load_tokens
    from .models import load_model, model_name
    from .sites import pair_sites

    model = load_model(args.model, args.device)
    tokens = load_tokens(args.data, model, n_ctx=args.n_ctx, n_tokens=args.tokens, split=args.split)
    sites = pair_sites(model, args.layer)
    out = Path(args.out or f"featcircuit-out/{model_name(model).replace('/', '_')}-L{args.layer}-acts")
    t0 = time.time()
    acts = harvest(model, tokens, [s.hook for s in sites], cache_dir=out, batch_size=args.batch_size)
    dt = time.time() - t0
    print(f"harvested {tokens.numel():,} tokens in {dt:.1f}s from {model_name(model)} layer {args.layer}")
    print(f"{'site':<6} {'hook':<28} {'width':>5} {'mean |x|':>9} {'max |x|':>9}")
    for s in sites:
        n = acts[s.hook].flatten(0, 1)[:, :].norm(dim=-1)
        print(f"{s.name:<6} {s.hook:<28} {s.width:>5} {n.mean():>9.2f} {n.max():>9.2f}")
    print(f"wrote activation cache to {out}")


def cmd_train(args) -> None:
    from .data import load_tokens
    from .models import load_model, model_name
    from .training import TrainConfig, train_pair

    model = load_model(args.model, args.device)
    cfg = TrainConfig(architecture=args.arch, width=args.width, k=args.k, tokens=args.tokens,
                      epochs=args.epochs, batch_size=args.batch_size, l1_coefficient=args.l1,
                      seed=args.seed)
    n_seq = -(-cfg.tokens // (cfg.n_ctx - 1))
    tokens = load_tokens(args.data, model, n_ctx=cfg.n_ctx, n_tokens=n_seq * cfg.n_ctx, split="train")
    out = Path(args.out or f"featcircuit-out/{Path(model_name(model)).name}-L{args.layer}-pair")
    t0 = time.time()
    train_pair(model, args.layer, tokens, cfg, out=out, ckpt_dir=out.parent / f".{out.name}.ckpt")
    print(f"trained in {time.time() - t0:.0f}s; wrote the pair to {out} (resid/, mlp/); "
          f"evaluate with `featcircuit evaluate --dicts {out}`")


def cmd_evaluate(args) -> None:
    from .data import load_tokens
    from .dictionary import load_pair
    from .evaluation import evaluate_pair, format_quality
    from .models import load_model, model_name

    model = load_model(args.model, args.device)
    probe = load_pair(args.dicts)
    layer = probe.mlp.cfg.layer if args.layer is None else args.layer
    pair = load_pair(args.dicts, expect_model=model_name(model), expect_layer=layer,
                     device=next(model.parameters()).device)
    tokens = load_tokens(args.data, model, n_tokens=args.tokens, split=args.split)
    ev = evaluate_pair(model, pair, tokens, layer)
    print(json.dumps(ev, indent=1) if args.json else format_quality(ev))


def cmd_discover(args) -> None:
    from .discover import DiscoverConfig, discover

    cfg = DiscoverConfig(**{k: v for k, v in vars(args).items() if k in DiscoverConfig.__dataclass_fields__})
    discover(cfg)


def cmd_render(args) -> None:
    from .graph import CircuitGraph

    g = CircuitGraph.load_json(args.graph).prune(node_threshold=args.node_threshold,
                                                  edge_threshold=args.edge_threshold, top_n=args.top_edges)
    out = Path(args.output)
    if out.suffix == ".dot":
        g.save_dot(out)
        print(f"wrote {out}")
        return
    res = g.render(out)
    print(f"wrote {res}" if res else f"graphviz `dot` not found: wrote {out.with_suffix('.dot')}; "
          f"render it with `dot -T{out.suffix[1:]} {out.with_suffix('.dot')} -o {out}`")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every sub-command."""
    from .data import BUILTIN_DATA

    parser = argparse.ArgumentParser(
        prog="featcircuit",
        description="Paired sparse dictionaries on a model's residual stream and MLP, linked "
                    "feature to feature by exact attribution and ablation search.")
    sub = parser.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="inspect or train models").add_subparsers(dest="model_cmd", required=True)
    p = model.add_parser("info", help="architecture, parameter count and sites per layer")
    _add_model(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_model_info)
    p = model.add_parser("train", help="train the built-in model on the stdlib source")
    p.add_argument("--out", help="output folder (default: the package's built-in model folder)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_model_train)

    p = sub.add_parser("harvest", help="cache the resid and mlp activations of one layer")
    _add_model(p)
    p.add_argument("--layer", type=int, default=2)
    p.add_argument("--data", default=BUILTIN_DATA)
    p.add_argument("--split", default="heldout")
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--n-ctx", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", help="cache folder (resumable)")
    p.set_defaults(func=cmd_harvest)

    p = sub.add_parser("train", help="train the paired resid + mlp dictionaries of one layer")
    _add_model(p)
    p.add_argument("--layer", type=int, default=2)
    p.add_argument("--data", default=BUILTIN_DATA)
    p.add_argument("--arch", default="topk", help="topk | relu | batchtopk")
    p.add_argument("--width", type=lambda s: float(s.rstrip("x")), default=8.0,
                   help="dictionary size as a multiple of d_model, e.g. 8x")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--l1", type=float, default=0.1, help="L1 coefficient (relu)")
    p.add_argument("--tokens", type=int, default=1_000_000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="pair folder to write (resumable checkpoint beside it)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="quality of a dictionary pair on held-out tokens")
    _add_model(p)
    p.add_argument("--dicts", required=True, help="pair folder (resid/ and mlp/)")
    p.add_argument("--layer", type=int, help="default: the layer recorded in the dictionaries")
    p.add_argument("--data", default=BUILTIN_DATA)
    p.add_argument("--split", default="heldout")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    from .discover import DiscoverConfig
    d = DiscoverConfig()
    p = sub.add_parser("discover", help="the whole job: pair, edges, search, rendered circuit")
    _add_model(p)
    p.add_argument("--layer", type=int, default=d.layer)
    p.add_argument("--data", default=d.data)
    p.add_argument("--split", default=d.split)
    p.add_argument("--dicts", help="pair folder; default: the cached default pair (trained when absent)")
    p.add_argument("--target", help="explain one MLP feature, e.g. mlp:123")
    p.add_argument("--metric", default=d.metric, help="ce (next-token loss); --prompts gives logit difference")
    p.add_argument("--prompts", help="jsonl of clean/corrupt/answer/wrong for a logit-difference metric")
    p.add_argument("--tokens", type=int, default=d.tokens, help="attribution token budget")
    p.add_argument("--eval-tokens", type=int, default=d.eval_tokens)
    p.add_argument("--top-edges", type=int, default=d.top_edges, help="edges drawn in the graph")
    p.add_argument("--node-threshold", type=float, default=d.node_threshold)
    p.add_argument("--edge-threshold", type=float, default=d.edge_threshold)
    p.add_argument("--search", default=d.search, help="acdc | none")
    p.add_argument("--tau", type=float, default=d.tau, help="remove an edge when its ΔKL < tau")
    p.add_argument("--candidates", type=int, default=d.candidates, help="edges the search tests")
    p.add_argument("--ablation", default=d.ablation, help="zero | mean")
    p.add_argument("--search-tokens", type=int, default=d.search_tokens)
    p.add_argument("--ln", default=d.ln, help="exact | frozen LayerNorm Jacobian")
    p.add_argument("--out", help="output folder (default featcircuit-out/MODEL-LLAYER)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.set_defaults(func=cmd_discover)

    p = sub.add_parser("render", help="re-render a saved graph.json with other thresholds")
    p.add_argument("graph")
    p.add_argument("-o", "--output", default="circuit.svg", help=".svg, .png, .pdf or .dot")
    p.add_argument("--top-edges", type=int)
    p.add_argument("--node-threshold", type=float, default=0.0)
    p.add_argument("--edge-threshold", type=float, default=0.0)
    p.set_defaults(func=cmd_render)

    from .features import add_features_parser
    add_features_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``featcircuit`` console script."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"featcircuit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("featcircuit: interrupted (saved work is kept; rerun to resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
