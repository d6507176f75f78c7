"""The ``featcircuit`` command line: one sub-command per job, thin wrappers over the API.

Each command's options are one dataclass (``HarvestConfig``…) whose fields, types and
docstrings are its flags, choices and ``--help`` (:mod:`featcircuit.configs`). Bad input raises
:class:`~featcircuit.errors.UserError` anywhere below; ``main`` prints it as one line and exits
with code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NoReturn

from . import checks as C
from .checks import arg_type
from .configs import add_arguments, add_command, option
from .data import BUILTIN_DATA
from .errors import UserError
from .io import SAFETENSORS_TEMP
from .models import BUILTIN_NAME

POS = arg_type(C.positive_int, "value")
NONNEG = arg_type(C.nonneg_int, "value")
SEED = arg_type(C.seed, "seed")
NONNEG_FLOAT = arg_type(C.finite_float, "value", 0.0)
DEVICE = arg_type(C.device, "device")
PAIR_FILES = frozenset({"resid", "mlp", "train_config.json"})
_CACHE_RE = re.compile(r"manifest\.json|chunk_[0-9]{5}\.safetensors|\.chunk_[0-9]{5}\.safetensors\..*\.tmp"
                       r"|\.manifest\.json\..*\.tmp|" + SAFETENSORS_TEMP.pattern)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit code 2 (no usage block)."""

    def error(self, message: str) -> NoReturn:
        msg = " ".join(message.split())
        # "argument --epochs: --epochs -1 is ..." -> "--epochs -1 is ..."
        msg = re.sub(r"^argument (\S+?)(/\S+)?: (?:\1|value|seed|device) ", r"\1 ", msg)
        print(f"featcircuit: error: {msg} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


def _width(text: str | float, flag: str = "--width") -> float:
    """``--width``: a multiple of d_model such as 8 or 8x, in (0, 1024]."""
    return C.finite_float(str(text).removesuffix("x"), flag, 0.0, 1024.0, lo_open=True)


@dataclass(kw_only=True)
class ModelOptions:
    """Which model, on which device: the options of every command that loads the model."""

    model: str = BUILTIN_NAME
    """built-in name, HuggingFace name or local HF folder"""
    device: str = option("auto", check=C.device)
    """auto | cpu | cuda | cuda:N"""


def _add_model(p: argparse.ArgumentParser) -> None:
    add_arguments(p, ModelOptions)


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


@dataclass(kw_only=True)
class ModelInfoConfig(ModelOptions):
    """Architecture, parameter count and sites per layer."""

    json: bool = False
    """print JSON"""


def cmd_model_info(args: ModelInfoConfig) -> None:
    """``featcircuit model info``: print the model's architecture and its sites."""
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


@dataclass(kw_only=True)
class ModelTrainConfig:
    """Train the built-in model on the stdlib source."""

    out: str | None = None
    """output folder (default: the package's built-in model folder)"""
    steps: int = option(3000, check=C.positive_int, limits=(10**7,))
    """optimizer steps"""
    seed: int = option(0, check=C.seed)
    """random seed (initialisation and batch order)"""
    force: bool = False
    """replace an --out folder holding other files (they are moved aside, not deleted)"""


def cmd_model_train(args: ModelTrainConfig) -> None:
    """``featcircuit model train``: train the built-in model and print its held-out loss."""
    from .lm_training import MODEL_FILES, LMConfig, train_lm
    from .models import BUILTIN_DIR

    out = Path(args.out) if args.out else BUILTIN_DIR
    C.check_out_dir(out, args.force, known=MODEL_FILES)
    cfg = LMConfig(steps=args.steps, seed=args.seed)
    prov = train_lm(out, cfg, force=args.force)
    h = prov["heldout"]
    print(f"held-out CE {h['ce']:.3f} nats/token, top-1 {h['top1']:.3f} "
          f"(bigram {prov['baselines']['bigram']['ce']:.3f}, "
          f"unigram {prov['baselines']['unigram']['ce']:.3f})")
    print(f"wrote {out}")


@dataclass(kw_only=True)
class HarvestConfig(ModelOptions):
    """Cache the resid and mlp activations of one layer, or of several in one pass."""

    layer: int | None = option(None, check=C.nonneg_int)
    """the layer whose resid and mlp are cached (default: 2)"""
    layers: str | None = None
    """several layers in one pass: all, 0-3 or 1,3"""
    data: str = BUILTIN_DATA
    """builtin:stdlib, a .txt or .jsonl file, a folder of text files, or a HuggingFace dataset"""
    split: str = "heldout"
    """train | heldout | all"""
    tokens: int = option(C.DefaultInt(32768), check=C.positive_int, limits=(10**10,))
    """token budget"""
    n_ctx: int = option(128, check=C.strict_int, limits=(2, 1 << 20))
    """tokens per context"""
    batch_size: int = option(16, check=C.positive_int, limits=(1 << 16,))
    """sequences per forward pass"""
    chunk_size: int = option(64, check=C.positive_int, limits=(1 << 20,))
    """sequences per cache file (the unit a killed harvest resumes from)"""
    out: str | None = None
    """cache folder (resumable)"""


@dataclass(kw_only=True)
class EvaluateConfig(ModelOptions):
    """Quality of dictionaries on held-out tokens: a pair, several layers (each and all spliced at
    once) or one dictionary at any site."""

    dicts: list[str] | None = option(None, repeat=True)
    """pair folder (resid/ and mlp/) or one-dictionary folder (cfg.json); repeat for several layers"""
    layers: str | None = None
    """all | 0-3 | 1,3: these layers' pairs, each and all spliced at once (pairs from --dicts, else the
    cached default pairs, trained when absent)"""
    layer: int | None = option(None, check=C.nonneg_int)
    """default: the layer recorded in the dictionaries"""
    data: str = BUILTIN_DATA
    """builtin:stdlib, a .txt or .jsonl file, a folder of text files, or a HuggingFace dataset"""
    split: str = "heldout"
    """train | heldout | all"""
    tokens: int = option(C.DefaultInt(16384), check=C.positive_int, limits=(10**10,))
    """token budget"""
    json: bool = False
    """print JSON"""


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
        if D.world() == 1:  # a killed run's half-written chunks; the lock keeps other writers out
            from .io import clear_stale_temps
            clear_stale_temps(out)
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


@dataclass(kw_only=True)
class TrainPairConfig(ModelOptions):
    """Train the paired resid + mlp dictionaries of one layer (or of several, or one site)."""

    layer: int | None = option(None, check=C.nonneg_int)
    """default: 2"""
    layers: str | None = None
    """train every listed layer (all, 0-3 or 1,3) from one harvest into the default pair cache"""
    data: str = BUILTIN_DATA
    """builtin:stdlib, a .txt or .jsonl file, a folder of text files, or a HuggingFace dataset
    (its training split)"""
    arch: Literal["topk", "relu", "batchtopk"] = "topk"
    """dictionary architecture"""
    width: float = option(8.0, check=_width)
    """dictionary size as a multiple of d_model, e.g. 8x"""
    k: int = option(32, check=C.positive_int, limits=(1 << 20,))
    """active features per token (topk, batchtopk)"""
    l1: float = option(0.1, check=C.finite_float, limits=(0.0, 1e6))
    """L1 coefficient (relu)"""
    jacobian: float = option(0.0, check=C.finite_float, limits=(0.0, 1e6))
    """λ of the Jacobian sparsity penalty: train the pair jointly so resid→mlp links are sparse
    (0: plain pair)"""
    jacobian_tokens: int = option(64, check=C.positive_int, limits=(1 << 20,))
    """rows of each batch the Jacobian penalty is estimated on (an unbiased subsample)"""
    tokens: int = option(C.DefaultInt(1_000_000), check=C.positive_int, limits=(10**10,))
    """training tokens"""
    epochs: int = option(2, check=C.positive_int, limits=(10**4,))
    """passes over the tokens"""
    batch_size: int = option(1024, check=C.positive_int, limits=(1 << 20,))
    """tokens per optimizer step"""
    ckpt_every: int = option(200, check=C.positive_int, limits=(10**9,))
    """checkpoint every N steps (a killed run resumes from the last one)"""
    seed: int = option(0, check=C.seed)
    """random seed (initialisation and batch order)"""
    shuffle_rows: int = option(2**20, check=C.positive_int, limits=(1 << 40,))
    """rows shuffled together (bounds memory when the harvest is larger: windows of shards are
    streamed from disk)"""
    out: str | None = None
    """pair folder to write (resumable checkpoint beside it)"""
    site: str | None = None
    """train one dictionary at this site of --layer instead of the pair: attn_out | mlp_out | resid |
    mlp | a hook name"""


def cmd_train(args) -> None:
    from dataclasses import asdict

    from . import distributed as D
    from .data import load_tokens
    from .models import canonical_name, load_model
    from .training import TrainConfig, check_config, train_pair

    cfg = TrainConfig(architecture=args.arch, width=args.width, k=args.k, tokens=args.tokens,
                      epochs=args.epochs, batch_size=args.batch_size, l1_coefficient=args.l1,
                      seed=args.seed, ckpt_every=args.ckpt_every, jacobian=args.jacobian,
                      jacobian_tokens=args.jacobian_tokens, shuffle_rows=args.shuffle_rows)
    if getattr(args, "site", None) is not None:
        return _train_site(args, cfg)
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
        if D.world() == 1:  # a killed run's half-written temporaries; the lock keeps writers out
            from .io import clear_stale_temps
            for f in (out, ckpt):
                clear_stale_temps(f, recursive=True)
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


def _check_site_arg(site: str) -> str:
    """``--site``: a named site or something shaped like a hook name (checked on the model later)."""
    from .sites import NAMED_SITES

    if site in NAMED_SITES or re.fullmatch(r"(blocks\.\d+\.)?[a-z0-9_.]*hook_[a-z0-9_]+", site):
        return site
    raise UserError(f"--site {site!r} is not a site: use {', '.join(NAMED_SITES)} or a hook name "
                    "such as blocks.1.hook_resid_post")


def _train_site(args, cfg) -> None:
    """``train --site S --layer L``: one dictionary at one site, written as a one-dictionary folder."""
    from dataclasses import asdict

    from . import distributed as D
    from .data import load_tokens
    from .models import canonical_name, load_model, model_name
    from .site_training import SITE_FILES, TRAIN_CONFIG, train_site
    from .sites import resolve_site

    site = _check_site_arg(args.site)
    if cfg.jacobian:
        raise UserError(f"--jacobian {cfg.jacobian:g} needs the resid/mlp pair: drop --site or use 0")
    n_seq = -(-cfg.tokens // (cfg.n_ctx - 1))
    args.split = "train"
    precheck(args, tokens=n_seq * cfg.n_ctx, n_ctx=cfg.n_ctx)
    if cfg.tokens < cfg.batch_size:
        raise UserError(f"--tokens {cfg.tokens:,} is less than one batch of --batch-size "
                        f"{cfg.batch_size:,}: lower --batch-size or raise --tokens")
    name = canonical_name(args.model)
    tag = site if "hook_" not in site else site.replace(".", "_")
    out = Path(args.out or f"featcircuit-out/{Path(name).name}-L{args.layer}-{tag}")
    C.check_out_dir(out, known=SITE_FILES)
    with C.folder_lock(out):
        model = load_model(args.model, args.device)
        s = resolve_site(model, args.layer, site)
        d_sae = int(round(cfg.width * s.width))
        if cfg.architecture != "relu" and cfg.k > d_sae:
            raise UserError(f"--width {args.width:g} gives {d_sae} features ({s.hook} is {s.width} wide), "
                            f"fewer than --k {cfg.k}: raise --width or lower --k")
        try:  # a rerun of a finished command has nothing to do
            saved = C.read_json_file(out / TRAIN_CONFIG, "train config", max_bytes=1 << 20)
            dcfg = C.read_json_file(out / "cfg.json", "dictionary config", max_bytes=1 << 20)
            done = saved == asdict(cfg) and isinstance(dcfg, dict) and dcfg.get("hook_name") == s.hook \
                and dcfg.get("model_name") == model_name(model)
        except UserError:
            done = False
        if done:
            print(f"already trained: {out} holds this dictionary (same site and options); delete it to train again")
            return
        tokens = load_tokens(args.data, model, n_ctx=cfg.n_ctx, n_tokens=n_seq * cfg.n_ctx, split="train")
        t0 = time.time()
        ckpt = out.parent / f".{out.name}.ckpt"
        if D.world() == 1:  # a killed run's half-written temporaries; the lock keeps writers out
            from .io import clear_stale_temps
            for f in (out, ckpt):
                clear_stale_temps(f, recursive=True)
        train_site(model, s, tokens, cfg, out=out, ckpt_dir=ckpt)
    print(f"trained in {time.time() - t0:.0f}s; wrote the {s.name} dictionary of {model_name(model)} "
          f"layer {s.layer} ({s.hook}) to {out}; evaluate with `featcircuit evaluate --dicts {out}`")


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


def cmd_evaluate(args: EvaluateConfig) -> None:
    """``featcircuit evaluate``: reconstruction and downstream quality of a pair."""
    from .data import load_tokens
    from .dictionary import load_pair
    from .evaluation import NAN_REASONS, evaluate_layers, evaluate_pair, format_layers, format_quality
    from .io import strict_json
    from .models import load_model, model_name
    from .sites import check_layer, pair_sites, parse_layers

    folders = list(args.dicts or [])
    if not folders and args.layers is None:
        raise UserError("nothing to evaluate: pass --dicts FOLDER (a pair or one-dictionary folder) "
                        "or --layers all|0-3|1,3 (the cached default pairs)")
    for f in folders:
        if not Path(f).is_dir():
            raise UserError(f"--dicts {f!r} is not a folder: expected a pair folder with resid/ and mlp/ "
                            "or a dictionary folder with cfg.json")
    if args.layers is not None and args.layer is not None:
        raise UserError(f"--layer {args.layer} and --layers {args.layers!r}: pass one of them")
    args.dicts = None  # checked above, one folder at a time
    precheck(args, tokens=args.tokens)
    n = C.model_sizes(args.model)["n_layers"]
    if args.layers is not None and n is not None:
        parse_layers(n, args.layers)  # a bad spec fails before the model is loaded
    from .site_training import is_site_folder

    singles = [f for f in folders if is_site_folder(f)]
    if singles:
        if len(folders) > 1 or args.layers is not None:
            raise UserError(f"--dicts {singles[0]!r} is a one-dictionary folder: evaluate it alone, "
                            "without --layers or other --dicts")
        return _evaluate_site(args, singles[0])
    if len(folders) > 1 and args.layer is not None:
        raise UserError(f"--layer {args.layer} with {len(folders)} --dicts folders: each folder's layer is "
                        "read from it (choose some with --layers)")
    probes: dict = {}
    for f in folders:  # cheap, and checks the files before the model is loaded
        layer = load_pair(f).mlp.cfg.layer
        if layer < 0:
            if len(folders) > 1 or args.layer is None:
                raise UserError(f"the dictionaries at {f} record no layer: pass --layer")
            layer = args.layer
        if layer in probes:
            raise UserError(f"--dicts {probes[layer]!r} and {f!r} are both for layer {layer}: pass one per layer")
        probes[layer] = f
    for layer in probes:
        C.check_layer_of(args.model, layer, "--dicts layer")
    if args.layers is None and len(probes) == 1:  # one pair: the one-layer report, as always
        ((recorded, folder),) = probes.items()
        layer = recorded if args.layer is None else args.layer
        model = load_model(args.model, args.device)
        r, m = pair_sites(model, check_layer(model, layer))
        pair = load_pair(folder, expect_model=model_name(model), expect_layer=layer,
                         d_resid=r.width, d_mlp=m.width, device=next(model.parameters()).device)
        tokens = load_tokens(args.data, model, n_tokens=args.tokens, split=args.split)
        from .replacement import Replacement

        ev = evaluate_pair(Replacement(model, {layer: pair}), tokens)
        print(strict_json(ev, NAN_REASONS, indent=1) if args.json else format_quality(ev))
        return
    model = load_model(args.model, args.device)
    layers = parse_layers(model, args.layers) if args.layers is not None else sorted(probes)
    pairs = {}
    device = next(model.parameters()).device
    for layer in layers:
        r, m = pair_sites(model, layer)
        if layer in probes:
            pairs[layer] = load_pair(probes[layer], expect_model=model_name(model), expect_layer=layer,
                                     d_resid=r.width, d_mlp=m.width, device=device)
        else:
            from .pairs import default_pair

            pairs[layer], folder = default_pair(model, layer)
            print(f"layer {layer}: default pair {folder}", file=sys.stderr)
    unused = sorted(set(probes) - set(layers))
    if unused:
        print(f"note: --dicts for layer(s) {', '.join(map(str, unused))} are outside --layers "
              f"{args.layers} and not evaluated", file=sys.stderr)
    tokens = load_tokens(args.data, model, n_tokens=args.tokens, split=args.split)
    ev = evaluate_layers(model, pairs, tokens)
    print(strict_json(ev, NAN_REASONS, indent=1) if args.json else format_layers(ev))


def _evaluate_site(args, folder: str) -> None:
    """``evaluate --dicts FOLDER`` for a one-dictionary folder: its site's quality."""
    from .data import load_tokens
    from .dictionary import Dictionary
    from .evaluation import NAN_REASONS, evaluate_site, format_site
    from .io import strict_json
    from .models import load_model, model_name
    from .site_training import check_dict_site, load_dictionaries
    from .sites import resolve_site

    ((site_name, probe),) = load_dictionaries(folder).items()
    layer = probe.cfg.layer if args.layer is None else args.layer
    if probe.cfg.layer >= 0 and layer != probe.cfg.layer:
        raise UserError(f"--layer {layer} does not match the dictionary at {folder} (layer {probe.cfg.layer})")
    if layer < 0 and site_name in ("resid", "mlp", "attn_out", "mlp_out"):
        raise UserError(f"the dictionary at {folder} records no layer: pass --layer")
    args.layer = layer if layer >= 0 else None
    precheck(args)
    model = load_model(args.model, args.device)
    site = resolve_site(model, layer, site_name)
    check_dict_site(probe, site, model_name(model), folder)
    d = Dictionary.load(folder, device=next(model.parameters()).device)
    tokens = load_tokens(args.data, model, n_tokens=args.tokens, split=args.split)
    ev = evaluate_site(model, d, site, tokens)
    print(strict_json(ev, NAN_REASONS, indent=1) if args.json else format_site(ev))


def cmd_steer(args) -> None:
    from .steer import parse_feature, parse_positions

    ref = parse_feature(args.feature)  # every cheap check first: spec, positions, task, files
    positions = parse_positions(args.positions)
    if args.task is None and args.prompt is None:
        raise UserError("nothing to steer on: give --task NAME (`featcircuit tasks`) and/or --prompt TEXT")
    if args.task is not None:
        from .tasks import BUILTIN_TASKS

        if args.task not in BUILTIN_TASKS:
            raise UserError(f"--task {args.task!r} is unknown: built-in tasks are {', '.join(BUILTIN_TASKS)}")
    if args.scale is not None and args.value is not None:
        raise UserError(f"--scale {args.scale:g} and --value {args.value:g}: give one magnitude")
    scale = 1.0 if args.scale is None and args.value is None else args.scale
    if args.out is not None:
        out = Path(args.out)
        if out.is_dir():
            raise UserError(f"--out {args.out!r} is a folder: expected a .json file name")
        C._writable_parent(out, "--out")
    C.check_layer_of(args.model, ref.layer, f"feature {ref}: layer")
    folder, dicts = args.dicts, None
    args.dicts = None
    if scale is not None:
        args.split = args.split or "heldout"
    precheck(args, tokens=args.tokens if scale is not None else None)
    if folder is None and ref.site not in ("resid", "mlp"):
        raise UserError(f"feature {ref} is at site {ref.site}: pass --dicts FOLDER with its dictionary "
                        f"(train one with `featcircuit train --site {ref.site} --layer {ref.layer}`)")
    if folder is not None:
        from .site_training import load_dictionaries

        if not Path(folder).is_dir():
            raise UserError(f"--dicts {folder!r} is not a folder: expected a pair or one-dictionary folder")
        dicts = load_dictionaries(folder)
        if ref.site not in dicts:
            raise UserError(f"--dicts {folder!r} holds the {', '.join(dicts)} dictionary, not {ref.site}: "
                            f"feature {ref} needs a {ref.site} dictionary of layer {ref.layer}")
        d = dicts[ref.site]
        if d.cfg.layer >= 0 and d.cfg.layer != ref.layer:
            raise UserError(f"--dicts {folder!r} is for layer {d.cfg.layer}, but feature {ref} is at layer {ref.layer}")
        if ref.feature >= d.cfg.d_sae:
            raise UserError(f"feature {ref} is out of range: the dictionary at {folder} has features "
                            f"0..{d.cfg.d_sae - 1}")

    import torch

    from .data import load_tokens
    from .io import atomic_write_json, strict_json
    from .models import load_model, model_name
    from .sites import resolve_site
    from .steer import Steering, feature_activation, format_steer, steer

    model = load_model(args.model, args.device)
    device = next(model.parameters()).device
    site = resolve_site(model, ref.layer, ref.site)
    if dicts is not None:
        from .site_training import check_dict_site

        d = dicts[ref.site].to(device)
        check_dict_site(d, site, model_name(model), folder)
    else:
        from .pairs import default_pair

        pair, where = default_pair(model, ref.layer)
        d = getattr(pair, ref.site).to(device)
        print(f"dictionary: the default {ref.site} dictionary of layer {ref.layer} ({where})", file=sys.stderr)
        if ref.feature >= d.cfg.d_sae:
            raise UserError(f"feature {ref} is out of range: the default dictionary has features 0..{d.cfg.d_sae - 1}")
    task = None
    if args.task is not None:
        from .tasks import builtin_task

        task = builtin_task(args.task, model)
        if args.pairs is not None and args.pairs < len(task):
            task = task.subset(torch.arange(args.pairs))
    typical = None
    value = args.value
    if scale is not None:
        tokens = load_tokens(args.data, model, n_tokens=args.tokens, split=args.split)
        typical = feature_activation(model, d, site, ref.feature, tokens)
        if typical["mean_active"] <= 0:
            raise UserError(f"feature {ref} never fires on {typical['n_tokens']:,} {args.split} tokens, so it "
                            "has no typical activation to scale: pass an absolute --value")
        value = scale * typical["mean_active"]
    st = Steering(site, d, ref.feature, args.mode, float(value), positions)
    res = steer(model, st, task=task, prompt=args.prompt, max_new_tokens=args.max_new_tokens, top=args.top)
    if typical is not None:
        res["scale"] = scale
        res["typical_activation"] = typical
    res["model"] = model_name(model)
    print(strict_json(res, indent=1) if args.json else format_steer(res))
    if args.out is not None:
        print(f"wrote {atomic_write_json(args.out, res)}")


@dataclass(kw_only=True)
class TasksConfig(ModelOptions):
    """The built-in behaviours and the model's accuracy on each."""

    json: bool = False
    """print JSON"""


def cmd_tasks(args: TasksConfig) -> None:
    """``featcircuit tasks``: the built-in tasks and how the model does on them."""
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
        print(f"{r['task']:<12} {r['pairs']:>5} {r['heldout_pairs']:>8} {r['n_ctx']:>4} "
              f"{r['accuracy']:>8.3f} {r['logit_diff_clean']:>+8.2f} {r['logit_diff_corrupt']:>+10.2f}  "
              f"{'yes' if r['performs'] else 'NO ':<8}  {r['what']}")


@dataclass(kw_only=True)
class RenderConfig:
    """Re-render a saved graph.json with other thresholds."""

    graph: str = option(positional=True)
    """a graph.json written by discover"""
    output: str = option("circuit.svg", short="-o")
    """.svg, .png, .pdf or .dot"""
    top_edges: int | None = option(None, check=C.nonneg_int)
    """keep the N edges of largest |weight| left by the thresholds (default: all)"""
    node_threshold: float = option(0.0, check=C.finite_float, limits=(0.0,))
    """drop feature nodes whose |effect| is below this"""
    edge_threshold: float = option(0.0, check=C.finite_float, limits=(0.0,))
    """drop edges whose |weight| is below this"""


def cmd_render(args: RenderConfig) -> None:
    """``featcircuit render``: prune a saved graph and write it as SVG, PNG, PDF or DOT."""
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


@dataclass(kw_only=True)
class FeaturesConfig(ModelOptions):
    """Feature cards: top examples, activation bins, logit lens, token removal, density.

    For example, `featcircuit features --layer 2 --site mlp --feature 45` prints the card of MLP
    feature 45 of layer 2's pair (--json: the card as JSON).
    """

    layer: int = option(2, check=C.nonneg_int)
    """the layer whose pair holds the features"""
    site: Literal["mlp", "resid"] = "mlp"
    """which dictionary"""
    feature: list[int] = option(check=C.nonneg_int, limits=(1 << 30,))
    """feature index(es)"""
    dicts: str | None = None
    """pair folder; default: the cached default pair (trained when absent)"""
    data: str = BUILTIN_DATA
    """builtin:stdlib, a .txt or .jsonl file, a folder of text files, or a HuggingFace dataset"""
    split: str = "heldout"
    """train | heldout | all"""
    tokens: int = option(C.DefaultInt(32768), check=C.positive_int, limits=(10**10,))
    """token budget of the analysis pass"""
    top: int = option(10, check=C.positive_int, limits=(10**4,))
    """top-activating examples shown"""
    bins: int = option(8, check=C.positive_int, limits=(10**4,))
    """activation bins sampled"""
    removal_window: int = option(32, check=C.positive_int, limits=(10**5,))
    """earlier tokens dropped in turn"""
    removal: bool = option(True, help="skip the token-removal reruns")
    """rerun the top example with each earlier token dropped in turn (--no-removal skips it)"""
    label_tokens: int = option(0, check=C.nonneg_int, limits=(10**10,))
    """fit a rule label on this many tokens of the training split and score it on the analysed
    tokens (0: an unscored token label)"""
    json: bool = False
    """print the cards as JSON"""


def add_features_parser(subparsers) -> None:
    """Add ``featcircuit features`` to the CLI's sub-parsers."""
    add_command(subparsers, "features", FeaturesConfig, cmd_features)


def cmd_features(args: FeaturesConfig) -> None:
    """``featcircuit features``: print the cards of the given features."""
    from .cards import analyze_features, format_card
    from .data import load_tokens
    from .dictionary import load_pair
    from .models import load_model, model_name
    from .pairs import default_pair
    from .sites import check_layer, pair_sites

    precheck(args, tokens=args.tokens)
    model = load_model(args.model, args.device)
    layer = check_layer(model, args.layer)
    r, m = pair_sites(model, layer)
    if args.dicts:
        pair = load_pair(args.dicts, expect_model=model_name(model), expect_layer=layer, d_resid=r.width,
                         d_mlp=m.width, device=next(model.parameters()).device)
    else:
        pair, _ = default_pair(model, layer)
    d_sae = getattr(pair, args.site).cfg.d_sae
    bad = [f for f in args.feature if f >= d_sae]
    if bad:  # before any analysis pass
        raise UserError(f"--feature {bad[0]} is out of range: the {args.site} dictionary has "
                        f"features 0..{d_sae - 1}")
    tokens = load_tokens(args.data, model, n_tokens=args.tokens, split=args.split)
    from .replacement import Replacement

    rep = Replacement(model, {layer: pair})
    labels = None
    if args.label_tokens:
        from .labels import label_pair

        train = load_tokens(args.data, model, n_tokens=args.label_tokens, split="train")
        labels = label_pair(rep, train, tokens, features={args.site: args.feature},
                            progress=True)[args.site]
    cards = analyze_features(rep, tokens, args.site, args.feature, n_top=args.top,
                             n_bins=args.bins, removal=args.removal,
                             removal_window=args.removal_window, progress=True, labels=labels)
    if args.json:
        from .io import strict_json

        print(strict_json(cards, indent=1))  # NaN/inf become null + reason: strict readers parse it
    else:
        print("\n\n".join(format_card(c) for c in cards))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every sub-command."""
    parser = _Parser(
        prog="featcircuit",
        description="Paired sparse dictionaries on a model's residual stream and MLP, linked "
                    "feature to feature by exact attribution and ablation search.")
    sub = parser.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="inspect or train models").add_subparsers(
        dest="model_cmd", required=True)
    add_command(model, "info", ModelInfoConfig, cmd_model_info)
    add_command(model, "train", ModelTrainConfig, cmd_model_train)

    add_command(sub, "harvest", HarvestConfig, cmd_harvest)

    add_command(sub, "train", TrainPairConfig, cmd_train)

    add_command(sub, "evaluate", EvaluateConfig, cmd_evaluate)

    from .discover import DiscoverConfig, discover
    add_command(sub, "discover", DiscoverConfig, discover)

    p = sub.add_parser("steer", help="add or clamp one feature's decoder direction at its site: change "
                       "of a task's metric, of the next-token distribution, generated text before/after")
    p.add_argument("feature", help="feature id: mlp2/123, resid1/7, attn_out1/5, mlp_out0/3")
    _add_model(p)
    p.add_argument("--dicts", help="pair or one-dictionary folder (default for resid/mlp: the cached default pair)")
    p.add_argument("--mode", default="add", choices=("add", "clamp"),
                   help="add: a + v·d_j; clamp: set the feature's code to v (error term kept)")
    p.add_argument("--scale", type=arg_type(C.finite_float, "--scale", -1e6, 1e6),
                   help="v in units of the feature's typical activation (mean where it fires; default 1)")
    p.add_argument("--value", type=arg_type(C.finite_float, "--value", -1e9, 1e9), help="absolute v")
    p.add_argument("--positions", default="all",
                   help="all (every position after BOS, generated ones too) | last | indices such as 3,5,-1 "
                        "(a list that starts with a minus: --positions=-2,-1)")
    p.add_argument("--task", help="built-in task (`featcircuit tasks`): mean logit difference on its clean prompts")
    p.add_argument("--prompt", help="text: next-token change after it and greedy continuation")
    p.add_argument("--pairs", type=arg_type(C.positive_int, "--pairs", 10**6), help="use the first N task pairs")
    p.add_argument("--max-new-tokens", type=arg_type(C.nonneg_int, "--max-new-tokens", 1024), default=20)
    p.add_argument("--top", type=arg_type(C.positive_int, "--top", 1000), default=10,
                   help="tokens listed whose probability rose / fell most")
    p.add_argument("--data", default=BUILTIN_DATA, help="text for the typical activation (--scale)")
    p.add_argument("--split", default="heldout")
    p.add_argument("--tokens", type=arg_type(C.positive_int, "--tokens", 10**9), default=C.DefaultInt(8192),
                   help="tokens the typical activation is measured on")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--out", help="write the result as JSON to this file")
    p.set_defaults(func=cmd_steer)

    add_command(sub, "tasks", TasksConfig, cmd_tasks)
    add_command(sub, "render", RenderConfig, cmd_render)
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
