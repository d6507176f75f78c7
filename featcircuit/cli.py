"""The ``featcircuit`` command line: one sub-command per job, thin wrappers over the API.

Bad input raises :class:`~featcircuit.errors.UserError` anywhere below; ``main`` prints it as
one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import sys
import time
from pathlib import Path

from . import checks as C
from .checks import arg_type
from .errors import UserError

POS = arg_type(C.positive_int, "value")
NONNEG = arg_type(C.nonneg_int, "value")
SEED = arg_type(C.seed, "seed")
NONNEG_FLOAT = arg_type(C.finite_float, "value", 0.0)
DEVICE = arg_type(C.device, "device")
PAIR_FILES = frozenset({"resid", "mlp", "train_config.json"})
_CACHE_RE = re.compile(r"manifest\.json|chunk_[0-9]{5}\.safetensors|\.chunk_[0-9]{5}\.safetensors\..*\.tmp"
                       r"|\.manifest\.json\..*\.tmp")


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit code 2 (no usage block)."""

    def error(self, message: str):  # type: ignore[override]
        msg = " ".join(message.split())
        # "argument --epochs: --epochs -1 is ..." -> "--epochs -1 is ..."
        msg = re.sub(r"^argument (\S+?)(/\S+)?: (?:\1|value|seed|device) ", r"\1 ", msg)
        print(f"featcircuit: error: {msg} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


def _width(text: str) -> float:
    """``--width``: a multiple of d_model such as 8 or 8x, in (0, 1024]."""
    return C.finite_float(text.removesuffix("x"), "--width", 0.0, 1024.0,
                          lo_open=True)


def _add_model(p: argparse.ArgumentParser) -> None:
    from .models import BUILTIN_NAME

    p.add_argument("--model", default=BUILTIN_NAME,
                   help=f"built-in name ({BUILTIN_NAME}), HuggingFace name or local HF folder")
    p.add_argument("--device", default="auto", type=DEVICE, help="auto | cpu | cuda | cuda:N")


def precheck(args, *, tokens: int | None = None, n_ctx: int = 128) -> None:
    """Checks shared by the commands, run before any model is loaded: model, layer, data, budget."""
    from .models import resolve_model_path

    resolve_model_path(args.model)  # a missing model fails here, in a second
    if getattr(args, "layer", None) is not None:
        C.check_layer_of(args.model, args.layer)
    limit = C.model_context(args.model)
    if limit is not None and n_ctx > limit:
        raise UserError(f"contexts of {n_ctx} tokens are beyond the {limit} positions model "
                        f"{args.model!r} supports")
    if getattr(args, "data", None) is not None:
        C.check_data(args.data, getattr(args, "split", "train"))
        # a default --tokens is a budget (small data just uses less); a typed one must fit
        if tokens is not None and not C.is_default(getattr(args, "tokens", None)):
            C.check_tokens_available(args.data, getattr(args, "split", "train"), tokens, n_ctx)
    if tokens is not None and tokens < n_ctx:
        raise UserError(f"--tokens {tokens} is less than one context of {n_ctx} tokens")
    dicts = getattr(args, "dicts", None)
    if dicts is not None and not Path(dicts).is_dir():
        raise UserError(f"--dicts {dicts!r} is not a folder: expected a pair folder with resid/ and mlp/")


def cmd_model_info(args) -> None:
    from .models import load_model, model_info
    from .sites import site_table

    precheck(args)
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
    from .lm_training import MODEL_FILES, LMConfig, train_lm
    from .models import BUILTIN_DIR

    out = Path(args.out) if args.out else BUILTIN_DIR
    C.check_out_dir(out, args.force, known=MODEL_FILES)
    cfg = LMConfig(steps=args.steps, seed=args.seed)
    prov = train_lm(out, cfg, force=args.force)
    h = prov["heldout"]
    print(f"held-out CE {h['ce']:.3f} nats/token, top-1 {h['top1']:.3f} "
          f"(bigram {prov['baselines']['bigram']['ce']:.3f}, unigram {prov['baselines']['unigram']['ce']:.3f})")
    print(f"wrote {out}")


def cmd_harvest(args) -> None:
    from . import distributed as D
    from .activations import harvest, read_manifest
    from .data import load_tokens
    from .models import canonical_name, load_model, model_name
    from .pairs import parse_layers
    from .sites import n_layers, pair_sites

    layers = _layers_arg(args)
    precheck(args, tokens=args.tokens, n_ctx=args.n_ctx)
    tag = f"L{args.layer}" if args.layers is None else \
        "L" + (_layers_tag(layers) if layers else re.sub(r"[^0-9,-]+", "", args.layers) or "all")
    out = Path(args.out or f"featcircuit-out/{canonical_name(args.model).strip('/').replace('/', '_')}"
                           f"-{tag}-acts")
    C.check_out_dir(out, known=_CACHE_RE)  # a cache folder, or a new one; nothing else
    read_manifest(out)  # a malformed manifest is rejected before the model is loaded
    D.init(args.device)  # under torchrun: each rank computes its own chunks
    model = load_model(args.model, args.device)
    if args.layers is not None:
        layers = parse_layers(args.layers, n_layers(model))
    tokens = load_tokens(args.data, model, n_ctx=args.n_ctx, n_tokens=args.tokens, split=args.split)
    sites = [s for lay in layers for s in pair_sites(model, lay)]
    t0 = time.time()
    lock = C.folder_lock(out) if D.world() == 1 else contextlib.nullcontext()
    with lock:  # two harvests into one cache run one after the other
        harvest(model, tokens, [s.hook for s in sites], cache_dir=out,
                batch_size=args.batch_size, chunk_size=args.chunk_size, load=False)
    dt = time.time() - t0
    if not D.is_writer():
        return
    where = f"layer {layers[0]}" if len(layers) == 1 else f"layers {_layers_tag(layers)}"
    print(f"harvested {tokens.numel():,} tokens in {dt:.1f}s from {model_name(model)} {where}")
    print(f"{'site':<6} {'hook':<28} {'width':>5} {'mean |x|':>9} {'max |x|':>9}")
    norms = _cache_norms(out, [s.hook for s in sites])  # chunk by chunk: memory stays one chunk
    for s in sites:
        mean, mx = norms[s.hook]
        print(f"{s.name:<6} {s.hook:<28} {s.width:>5} {mean:>9.2f} {mx:>9.2f}")
    print(f"wrote activation cache to {out}")


def _layers_arg(args) -> list[int]:
    """``--layers`` (checked against the model's config when readable) or ``[--layer]``."""
    from .pairs import parse_layers

    if args.layers is None:
        if args.layer is None:
            args.layer = 2
        return [args.layer]
    if args.layer is not None:
        raise UserError("--layer and --layers both given: use one")
    n = C.model_sizes(args.model)["n_layers"]
    return parse_layers(args.layers, n) if n is not None else []


def _layers_tag(layers: list[int]) -> str:
    return f"{layers[0]}-{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) else \
        ",".join(map(str, layers))


def _cache_norms(folder: Path, hooks: list[str]) -> dict[str, tuple[float, float]]:
    """(mean, max) of the row norms of each hook over a cache's chunks, one chunk in memory."""
    from safetensors import safe_open

    acc = {h: [0.0, 0, 0.0] for h in hooks}
    for path in sorted(folder.glob("chunk_*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for h in hooks:
                n = f.get_tensor(h).flatten(0, 1).norm(dim=-1)
                acc[h][0] += float(n.double().sum())
                acc[h][1] += n.numel()
                acc[h][2] = max(acc[h][2], float(n.max()))
    return {h: (s / max(c, 1), m) for h, (s, c, m) in acc.items()}


def cmd_train(args) -> None:
    from dataclasses import asdict

    from . import distributed as D
    from .data import load_tokens
    from .models import canonical_name, load_model
    from .training import TrainConfig, check_config, train_pair

    cfg = TrainConfig(architecture=args.arch, width=args.width, k=args.k, tokens=args.tokens,
                      epochs=args.epochs, batch_size=args.batch_size, l1_coefficient=args.l1,
                      seed=args.seed, ckpt_every=args.ckpt_every, jacobian=args.jacobian,
                      shuffle_rows=args.shuffle_rows)
    _layers_arg(args)  # a bad --layers fails here, before anything is loaded
    n_seq = -(-cfg.tokens // (cfg.n_ctx - 1))
    args.split = "train"
    precheck(args, tokens=n_seq * cfg.n_ctx, n_ctx=cfg.n_ctx)
    if cfg.tokens < cfg.batch_size:
        raise UserError(f"--tokens {cfg.tokens:,} is less than one batch of --batch-size "
                        f"{cfg.batch_size:,}: lower --batch-size or raise --tokens")
    d_model = C.model_sizes(args.model)["d_model"]
    if d_model is not None:
        d_sae = int(round(cfg.width * d_model))
        if d_sae < 1 or (cfg.architecture != "relu" and cfg.k > d_sae):
            raise UserError(f"--width {args.width:g} gives {d_sae} features (d_model {d_model}), "
                            f"fewer than --k {cfg.k}: raise --width or lower --k")
    D.init(args.device)  # under torchrun: data-parallel ranks; a plain process: no-op
    check_config(cfg)
    if args.layers is not None:
        if args.out is not None:
            raise UserError("--out is for one --layer; --layers writes each pair into the "
                            "featcircuit cache, where discover finds it")
        _train_layers(args, cfg)
        return
    name = canonical_name(args.model)
    out = Path(args.out or f"featcircuit-out/{Path(name).name}-L{args.layer}-pair")
    C.check_out_dir(out, known=PAIR_FILES)
    # ranks of one torchrun job coordinate by barriers; a file lock would deadlock them
    lock = C.folder_lock(out) if D.world() == 1 else contextlib.nullcontext()
    with lock:  # a second run on the same --out waits, then finds it done
        if _pair_done(out, asdict(cfg), name, args.layer):
            print(f"already trained: {out} holds this pair (same model, layer and options); "
                  "delete it to train again")
            return
        model = load_model(args.model, args.device)
        tokens = load_tokens(args.data, model, n_ctx=cfg.n_ctx, n_tokens=n_seq * cfg.n_ctx, split="train")
        t0 = time.time()
        ckpt = out.parent / f".{out.name}.ckpt"
        # several ranks stream their shares from one harvest cache instead of each holding all
        acts = ckpt / "acts" if D.world() > 1 else None
        train_pair(model, args.layer, tokens, cfg, out=out, ckpt_dir=ckpt, acts_dir=acts)
        if acts is not None and D.is_writer():  # the pair is saved: the ranks' harvest is spent
            shutil.rmtree(acts, ignore_errors=True)
    if D.is_writer():
        print(f"trained in {time.time() - t0:.0f}s; wrote the pair to {out} (resid/, mlp/); "
              f"evaluate with `featcircuit evaluate --dicts {out}`")


def _train_layers(args, cfg) -> None:
    """``train --layers``: every layer's pair from one harvest, into the default pair cache."""
    from . import distributed as D
    from .models import load_model
    from .pairs import default_pairs, parse_layers
    from .sites import n_layers

    model = load_model(args.model, args.device)
    layers = parse_layers(args.layers, n_layers(model))
    t0 = time.time()
    pairs = default_pairs(model, layers, cfg, data=args.data)
    if D.is_writer():
        print(f"{len(pairs)} pair(s) ready in {time.time() - t0:.0f}s:")
        for lay, (_, folder) in pairs.items():
            print(f"  layer {lay}: {folder}")
        print("discover and evaluate use them by default (same model, data and options)")


def _pair_done(out: Path, cfg: dict, model: str, layer: int) -> bool:
    """Whether ``out`` already holds the pair these options train (so a rerun has nothing to do)."""
    try:
        saved = C.read_json_file(out / "train_config.json", "train config", max_bytes=1 << 20)
        for site in ("resid", "mlp"):
            d = C.read_json_file(out / site / "cfg.json", "dictionary config", max_bytes=1 << 20)
            if not (isinstance(d, dict) and d.get("model_name") == model and d.get("layer") == layer):
                return False
    except UserError:
        return False
    # options added later count at their defaults, so an older pair folder stays "done"
    from dataclasses import asdict

    from .training import TrainConfig

    return isinstance(saved, dict) and {**asdict(TrainConfig()), **saved} == cfg


def cmd_evaluate(args) -> None:
    from .data import load_tokens
    from .dictionary import load_pair
    from .evaluation import NAN_REASONS, evaluate_pair, format_quality
    from .io import strict_json
    from .models import load_model, model_name
    from .sites import check_layer, pair_sites

    precheck(args, tokens=args.tokens)
    probe = load_pair(args.dicts)  # cheap, and checks the files before the model is loaded
    layer = probe.mlp.cfg.layer if args.layer is None else args.layer
    if layer < 0:
        raise UserError(f"the dictionaries at {args.dicts} record no layer: pass --layer")
    args.layer = layer
    precheck(args)
    model = load_model(args.model, args.device)
    r, m = pair_sites(model, check_layer(model, layer))
    pair = load_pair(args.dicts, expect_model=model_name(model), expect_layer=layer,
                     d_resid=r.width, d_mlp=m.width, device=next(model.parameters()).device)
    tokens = load_tokens(args.data, model, n_tokens=args.tokens, split=args.split)
    ev = evaluate_pair(model, pair, tokens, layer)
    print(strict_json(ev, NAN_REASONS, indent=1) if args.json else format_quality(ev))


def cmd_discover(args) -> None:
    from .discover import DiscoverConfig, discover

    cfg = DiscoverConfig(**{k: v for k, v in vars(args).items() if k in DiscoverConfig.__dataclass_fields__})
    discover(cfg)


def cmd_tasks(args) -> None:
    from .discover import print_json, tasks_table
    from .models import load_model
    from .tasks import TASK_VERSION

    rows = tasks_table(load_model(args.model, args.device))
    if args.json:
        print_json({"version": TASK_VERSION, "tasks": rows})
        return
    print(f"built-in tasks (version {TASK_VERSION}; pairs from the held-out split; accuracy = clean pairs "
          "with a positive logit difference)")
    print(f"{'task':<12} {'pairs':>5} {'held-out':>8} {'ctx':>4} {'accuracy':>8} {'LD clean':>8} "
          f"{'LD corrupt':>10}  performs  what")
    for r in rows:
        print(f"{r['task']:<12} {r['pairs']:>5} {r['heldout_pairs']:>8} {r['n_ctx']:>4} {r['accuracy']:>8.3f} "
              f"{r['logit_diff_clean']:>+8.2f} {r['logit_diff_corrupt']:>+10.2f}  {'yes' if r['performs'] else 'NO ':<8}  "
              f"{r['what']}")


def cmd_render(args) -> None:
    from .graph import RENDER_FORMATS, CircuitGraph

    out = Path(args.output)
    fmt = out.suffix.lstrip(".").lower()
    if fmt not in RENDER_FORMATS + ("dot",):
        raise UserError(f"-o {args.output!r}: the suffix must be one of "
                        f"{', '.join('.' + f for f in RENDER_FORMATS + ('dot',))}")
    try:
        if out.is_dir() or out.with_suffix(".dot").is_dir():
            raise UserError(f"-o {args.output!r} is a folder: expected a file name")
        if out.exists() and not out.is_file():
            raise UserError(f"-o {args.output!r} is not a regular file")
    except OSError as e:
        raise UserError(f"-o {args.output!r} cannot be used: {e.strerror}") from None
    C._writable_parent(out, "-o")
    g = CircuitGraph.load_json(args.graph).prune(node_threshold=args.node_threshold,
                                                  edge_threshold=args.edge_threshold, top_n=args.top_edges)
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

    parser = _Parser(
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
    p.add_argument("--steps", type=arg_type(C.positive_int, "--steps", 10**7), default=3000)
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--force", action="store_true",
                   help="replace an --out folder holding other files (they are moved aside, not deleted)")
    p.set_defaults(func=cmd_model_train)

    p = sub.add_parser("harvest", help="cache the resid and mlp activations of one layer")
    _add_model(p)
    p.add_argument("--layer", type=NONNEG, help="default: 2")
    p.add_argument("--layers", help="several layers in one pass: all, 0-3 or 1,3")
    p.add_argument("--data", default=BUILTIN_DATA)
    p.add_argument("--split", default="heldout")
    p.add_argument("--tokens", type=arg_type(C.positive_int, "--tokens", 10**10), default=C.DefaultInt(32768))
    p.add_argument("--n-ctx", type=arg_type(C.strict_int, "--n-ctx", 2, 1 << 20), default=128)
    p.add_argument("--batch-size", type=arg_type(C.positive_int, "--batch-size", 1 << 16), default=16)
    p.add_argument("--chunk-size", type=arg_type(C.positive_int, "--chunk-size", 1 << 20), default=64,
                   help="sequences per cache file (the unit a killed harvest resumes from)")
    p.add_argument("--out", help="cache folder (resumable)")
    p.set_defaults(func=cmd_harvest)

    p = sub.add_parser("train", help="train the paired resid + mlp dictionaries of one layer")
    _add_model(p)
    p.add_argument("--layer", type=NONNEG, help="default: 2")
    p.add_argument("--layers", help="train every listed layer (all, 0-3 or 1,3) from one harvest "
                                    "into the default pair cache")
    p.add_argument("--data", default=BUILTIN_DATA)
    p.add_argument("--arch", default="topk", choices=("topk", "relu", "batchtopk"))
    p.add_argument("--width", type=arg_type(_width), default=8.0,
                   help="dictionary size as a multiple of d_model, e.g. 8x")
    p.add_argument("--k", type=arg_type(C.positive_int, "--k", 1 << 20), default=32)
    p.add_argument("--l1", type=arg_type(C.finite_float, "--l1", 0.0, 1e6), default=0.1,
                   help="L1 coefficient (relu)")
    p.add_argument("--jacobian", type=arg_type(C.finite_float, "--jacobian", 0.0, 1e6), default=0.0,
                   help="λ of the Jacobian sparsity penalty: train the pair jointly so resid→mlp "
                        "links are sparse (0: plain pair)")
    p.add_argument("--tokens", type=arg_type(C.positive_int, "--tokens", 10**10), default=C.DefaultInt(1_000_000))
    p.add_argument("--epochs", type=arg_type(C.positive_int, "--epochs", 10**4), default=2)
    p.add_argument("--batch-size", type=arg_type(C.positive_int, "--batch-size", 1 << 20), default=1024)
    p.add_argument("--ckpt-every", type=arg_type(C.positive_int, "--ckpt-every", 10**9), default=200,
                   help="checkpoint every N steps (a killed run resumes from the last one)")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--shuffle-rows", type=arg_type(C.positive_int, "--shuffle-rows", 1 << 40),
                   default=2**20, help="rows shuffled together (bounds memory when the harvest "
                                       "is larger: windows of shards are streamed from disk)")
    p.add_argument("--out", help="pair folder to write (resumable checkpoint beside it)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="quality of a dictionary pair on held-out tokens")
    _add_model(p)
    p.add_argument("--dicts", required=True, help="pair folder (resid/ and mlp/)")
    p.add_argument("--layer", type=NONNEG, help="default: the layer recorded in the dictionaries")
    p.add_argument("--data", default=BUILTIN_DATA)
    p.add_argument("--split", default="heldout")
    p.add_argument("--tokens", type=arg_type(C.positive_int, "--tokens", 10**10), default=C.DefaultInt(16384))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    from .discover import DiscoverConfig
    d = DiscoverConfig()
    p = sub.add_parser("discover", help="the whole job: pair, edges, search, rendered circuit")
    _add_model(p)
    p.add_argument("--layer", type=NONNEG, default=d.layer)
    p.add_argument("--data", default=d.data)
    p.add_argument("--split", default=d.split)
    p.add_argument("--dicts", help="pair folder; default: the cached default pair (trained when absent)")
    p.add_argument("--target", help="explain one MLP feature, e.g. mlp:123")
    p.add_argument("--metric", default=d.metric, help="ce (next-token loss); --prompts gives logit difference")
    p.add_argument("--prompts", help="jsonl of clean/corrupt/answer/wrong for a logit-difference metric")
    p.add_argument("--tokens", type=arg_type(C.positive_int, "--tokens", 10**10), default=C.DefaultInt(d.tokens), help="attribution token budget")
    p.add_argument("--eval-tokens", type=arg_type(C.positive_int, "--eval-tokens", 10**10), default=d.eval_tokens)
    p.add_argument("--top-edges", type=arg_type(C.positive_int, "--top-edges", 10**6), default=d.top_edges, help="edges drawn in the graph")
    p.add_argument("--node-threshold", type=NONNEG_FLOAT, default=d.node_threshold)
    p.add_argument("--edge-threshold", type=NONNEG_FLOAT, default=d.edge_threshold)
    p.add_argument("--task", help="a built-in behaviour (`featcircuit tasks` lists them): logit difference "
                   "at the answer position of clean/corrupt pairs")
    p.add_argument("--search", default=d.search, help="acdc | none")
    p.add_argument("--tau", type=NONNEG_FLOAT, default=d.tau,
                   help="remove an edge when it moves D by less than tau × |m(M) − m(∅)| (relative)")
    p.add_argument("--tau-abs", type=NONNEG_FLOAT, default=d.tau_abs,
                   help="absolute τ in the metric's units (overrides --tau)")
    p.add_argument("--tau-sweep", default=d.tau_sweep,
                   help="comma-separated relative τ values: the faithfulness–size frontier")
    p.add_argument("--candidates", type=arg_type(C.positive_int, "--candidates", 10**7), default=d.candidates,
                   help="edges handed from the ranking to the search")
    p.add_argument("--ablation", default=d.ablation,
                   help="auto | zero | mean | patch (auto: patch from the corrupt prompt for a task, zero otherwise)")
    p.add_argument("--errors", default=d.errors, help="kept | ablated: error nodes outside or inside the scope")
    p.add_argument("--rank-by", default=d.rank_by,
                   help="auto | abs | net: candidate ranking (auto: the higher Spearman with single-edge Δ)")
    p.add_argument("--search-tokens", type=arg_type(C.positive_int, "--search-tokens", 10**10), default=d.search_tokens,
                   help="corpus mode: tokens for the search (and as many held out for scoring)")
    p.add_argument("--ln", default=d.ln, help="exact | frozen LayerNorm Jacobian")
    p.add_argument("--out", help="output folder (default featcircuit-out/MODEL-LLAYER)")
    p.add_argument("--force", action="store_true", help="replace an --out folder featcircuit did not write")
    p.add_argument("--seed", type=SEED, default=d.seed)
    p.set_defaults(func=cmd_discover)

    p = sub.add_parser("tasks", help="the built-in behaviours and the model's accuracy on each")
    _add_model(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("render", help="re-render a saved graph.json with other thresholds")
    p.add_argument("graph")
    p.add_argument("-o", "--output", default="circuit.svg", help=".svg, .png, .pdf or .dot")
    p.add_argument("--top-edges", type=NONNEG)
    p.add_argument("--node-threshold", type=NONNEG_FLOAT, default=0.0)
    p.add_argument("--edge-threshold", type=NONNEG_FLOAT, default=0.0)
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
        print(f"featcircuit: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except OSError as e:
        # Known bad input: a path the user named cannot be read or written (read-only folder,
        # a file where a folder is expected, a full disk). Other errors keep their traceback.
        if e.filename is None or isinstance(e, (ConnectionError, TimeoutError)):
            raise
        print(f"featcircuit: error: cannot use {str(e.filename)!r}: {e.strerror or type(e).__name__}",
              file=sys.stderr)
        return 2
    except MemoryError:
        print("featcircuit: error: out of memory: lower --tokens, --batch-size or the prompt length",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("featcircuit: interrupted (saved work is kept; rerun to resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
