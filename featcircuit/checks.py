"""Shared validators: every bad option answered before any model is loaded or anything computed.

1. scalar options (``strict_int``, ``finite_float``, seeds, devices) are parsed strictly: ASCII
   digits only (``１２`` and ``²`` are not numbers here), bounded size, finite floats; each
   failure is a :class:`~featcircuit.errors.UserError` naming the value and what is accepted;
   ``arg_type`` turns a validator into an argparse ``type=`` so the parser reports it;
2. files that come from outside the process are read with bounds (:mod:`featcircuit.readers`):
   ``read_json_file`` checks that the path is a regular file, caps its size, its nesting depth and
   its integers' digits, and rejects NaN/Infinity, before ``json.loads`` builds anything;
3. output folders (``check_out_dir``, ``staged_output``): a non-empty folder that featcircuit
   did not write is refused unless ``force``; a run writes into a fresh hidden sibling folder
   and swaps it in only when complete; an old output is deleted only when every file in it was
   written by featcircuit (listed in its ``.featcircuit-out.json``), otherwise it is kept aside;
4. ``folder_lock`` serialises concurrent runs on one cache or output folder with ``flock`` on a
   hidden lock file beside it;
5. ``check_tokens_available`` bounds a token budget by the bytes of the data source (a
   byte-level tokenizer makes at most one token per byte, plus one BOS per document and per
   context), so an impossible ``--tokens`` fails at once instead of after the tokenization.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import UserError
from .readers import parse_json_text, read_json_file, read_text_file

MAX_SEED = 2**63 - 1
MARKER = ".featcircuit-out.json"
STAGING = ".featcircuit-staging"
_INT_RE = re.compile(r"[+-]?[0-9]{1,30}")
_FLOAT_RE = re.compile(r"[+-]?([0-9]{1,30}(\.[0-9]{0,30})?|\.[0-9]{1,30})([eE][+-]?[0-9]{1,4})?")
_DEVICE_RE = re.compile(r"(auto|cpu|cuda)(:[0-9]{1,3})?")


def _show(value: Any, limit: int = 40) -> str:
    """``repr`` of a user value, cut to one short line."""
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 4] + "...'"


# ---- 1. scalar options -----------------------------------------------------------------------


def strict_int(value: str | int, name: str, lo: int | None = None, hi: int | None = None) -> int:
    """An integer written in ASCII digits within ``[lo, hi]``; UserError naming ``name`` if not."""
    if isinstance(value, bool):
        raise UserError(f"{name} {value!r} is not an integer")
    if isinstance(value, str):
        if not _INT_RE.fullmatch(value.strip()):
            raise UserError(f"{name} {_show(value)} is not an integer: expected ASCII digits"
                            + (f" in {lo}..{hi}" if lo is not None and hi is not None else ""))
        value = int(value.strip())
    if not isinstance(value, int):
        raise UserError(f"{name} {_show(value)} is not an integer")
    if lo is not None and value < lo or hi is not None and value > hi:
        rng = (f"{lo}..{hi}" if lo is not None and hi is not None
               else f">= {lo}" if lo is not None else f"<= {hi}")
        raise UserError(f"{name} {value} is out of range: expected an integer {rng}")
    return value


def positive_int(value: str | int, name: str, hi: int = 2**40) -> int:
    """An integer >= 1 (and at most ``hi``)."""
    return strict_int(value, name, 1, hi)


def nonneg_int(value: str | int, name: str, hi: int = 2**40) -> int:
    """An integer >= 0 (and at most ``hi``)."""
    return strict_int(value, name, 0, hi)


def seed(value: str | int, name: str = "--seed") -> int:
    """A random seed in 0..2**63-1 (what ``torch.manual_seed`` accepts)."""
    return strict_int(value, name, 0, MAX_SEED)


def finite_float(value: str | float, name: str, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False) -> float:
    """A finite float in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``); no nan, inf or ``1_0``."""
    if isinstance(value, bool):
        raise UserError(f"{name} {value!r} is not a number")
    if isinstance(value, str):
        if not _FLOAT_RE.fullmatch(value.strip()):
            raise UserError(f"{name} {_show(value)} is not a finite number: expected e.g. 0.5 or 1e-3")
        value = float(value.strip())
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{name} {_show(value)} is not a finite number")
    value = float(value)
    if not math.isfinite(value):
        raise UserError(f"{name} {_show(value)} is not a finite number")
    low_bad = lo is not None and (value <= lo if lo_open else value < lo)
    if low_bad or (hi is not None and value > hi):
        lo_s = "" if lo is None else f"{'>' if lo_open else '>='} {lo:g}"
        hi_s = "" if hi is None else f"<= {hi:g}"
        raise UserError(f"{name} {value:g} is out of range: expected a number "
                        f"{' and '.join(s for s in (lo_s, hi_s) if s)}")
    return value


def device(value: str, name: str = "--device") -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` for a CUDA device that exists here."""
    s = str(value).strip()
    if not _DEVICE_RE.fullmatch(s) or s.startswith(("auto:", "cpu:")):
        raise UserError(f"{name} {_show(value)} is not a device: expected auto, cpu, cuda or cuda:N")
    if s.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"{name} {s} asked for, but CUDA is not available here: use auto or cpu")
        n = torch.cuda.device_count()
        if ":" in s and int(s.split(":")[1]) >= n:
            raise UserError(f"{name} {s} does not exist: this machine has cuda:0..cuda:{n - 1}")
    return s


def choice(value: str, name: str, allowed: tuple[str, ...]) -> str:
    """``value`` if it is one of ``allowed``."""
    if value not in allowed:
        raise UserError(f"unknown {name} {_show(value)}: use {', '.join(allowed)}")
    return value


class DefaultInt(int):
    """An int option's default, told apart from the same value typed by the user."""


def is_default(value: Any) -> bool:
    """Whether ``value`` is an option's :class:`DefaultInt` default (not given on the command line)."""
    return type(value) is DefaultInt


def arg_type(check: Callable[..., Any], *args: Any, **kw: Any) -> Callable[[str], Any]:
    """An argparse ``type=`` running ``check(text, *args, **kw)``; its UserError is the parser's message."""
    import argparse

    def parse(text: str) -> Any:
        try:
            return check(text, *args, **kw)
        except UserError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = getattr(check, "__name__", "value")
    return parse


def check_prompts_file(path: str | Path, max_bytes: int = 16 << 20) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) of a ``--prompts`` jsonl of objects with string clean/corrupt/answer/wrong."""
    text = read_text_file(path, "prompts file", max_bytes)
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        row = parse_json_text(line, f"{path}:{i}", max_depth=4)
        if not isinstance(row, dict):
            raise UserError(f"{path}:{i} is not a JSON object with clean, corrupt, answer, wrong")
        for key in ("clean", "corrupt", "answer", "wrong"):
            if key not in row:
                raise UserError(f"{path}:{i} has no {key!r}: expected clean, corrupt, answer, wrong")
            if not isinstance(row[key], str) or not row[key]:
                raise UserError(f"{path}:{i}: {key!r} is {_show(row[key])}, expected a non-empty string")
        rows.append((i, row))
    if not rows:
        raise UserError(f"prompts file {str(path)!r} holds no prompts: expected one JSON object per line")
    return rows


def check_prompt_lengths(rows: list[tuple[int, dict[str, str]]], path: str | Path, model: str) -> None:
    """UserError when a prompt (plus BOS) is longer than the model's positions; loads only the tokenizer."""
    limit = model_context(model)
    if limit is None:
        return
    from .models import resolve_model_path

    target, _ = resolve_model_path(model)
    if not Path(target).is_dir():
        return
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(target)
    except Exception:  # an unreadable tokenizer: load_model gives the message
        return
    for i, row in rows:
        for key in ("clean", "corrupt"):
            n = len(tok(row[key], add_special_tokens=False)["input_ids"]) + 1
            if n > limit:
                raise UserError(f"{path}:{i}: the {key} prompt is {n:,} tokens with BOS, beyond the "
                                f"{limit} positions of model {model!r}: shorten it")


# ---- 3. output folders -----------------------------------------------------------------------


def _first_existing(p: Path) -> Path:
    p = Path(os.path.abspath(p))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _writable_parent(out: Path, flag: str) -> None:
    base = _first_existing(out.parent)
    if not base.is_dir():
        raise UserError(f"{flag} {str(out)!r} is under {str(base)!r}, which is a file, not a folder")
    if not os.access(base, os.W_OK | os.X_OK) or str(base).startswith(("/proc", "/sys", "/dev")):
        raise UserError(f"{flag} {str(out)!r}: cannot write in {str(base)!r} (read-only or no permission)")


def _owned_files(folder: Path) -> set[str] | None:
    """The files a featcircuit marker in ``folder`` lists, or None when there is no valid marker."""
    m = folder / MARKER
    if not m.is_file():
        return None
    try:
        d = parse_json_text(m.read_text(encoding="utf-8"), str(m), max_depth=4)
    except (OSError, UnicodeDecodeError, UserError):
        return None
    files = d.get("files") if isinstance(d, dict) else None
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return set(files) | {MARKER}


def _all_files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir()}


Known = set[str] | frozenset[str] | re.Pattern
"""Names an older featcircuit output folder (without a marker) may hold: a set, or a pattern."""


def foreign_files(folder: Path, known: Known = frozenset()) -> list[str]:
    """The entries of ``folder`` featcircuit did not write (not in its marker, or not ``known``), sorted."""
    owned = _owned_files(folder)
    if owned is not None:
        return sorted(_all_files(folder) - owned)
    names = sorted(os.listdir(folder))
    if isinstance(known, re.Pattern):
        return [n for n in names if not known.fullmatch(n)]
    return names if not known else [n for n in names if n not in known]


def is_featcircuit_output(folder: Path, known: Known = frozenset()) -> bool:
    """Whether every entry of ``folder`` was written by featcircuit (its marker, or only ``known`` names)."""
    return not foreign_files(folder, known)


def check_out_dir(out: str | Path, force: bool = False, flag: str = "--out",
                  known: Known = frozenset(), force_flag: str | None = "--force") -> Path:
    """``out`` if a run may write it: not a file, in a writable place; empty, featcircuit's or ``force``."""
    p = Path(out)
    if str(out) == "" or "\x00" in str(out):
        raise UserError(f"{flag} {_show(str(out))} is not a usable path")
    try:
        exists = p.exists()
        if exists and not p.is_dir():
            raise UserError(f"{flag} {str(p)!r} is an existing file: expected a folder path")
    except OSError as e:
        raise UserError(f"{flag} {str(p)!r} cannot be used: {e.strerror}") from None
    _writable_parent(p, flag)
    if exists:
        if not os.access(p, os.W_OK | os.X_OK):
            raise UserError(f"{flag} {str(p)!r} is not writable")
        foreign = foreign_files(p, known) if any(os.scandir(p)) and not force else []
        if foreign:
            hint = (f", or pass {force_flag} to replace it (its files are kept aside)"
                    if force_flag else "")
            raise UserError(f"{flag} {str(p)!r} holds files featcircuit did not write ({_show(foreign[0])}"
                            f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}): choose a new "
                            f"folder{hint}")
    return p


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(out: Path) -> None:
    """Remove hidden staging folders of ``out`` left by killed runs (ours only: they hold STAGING)."""
    for p in out.parent.glob(f".{out.name}.*.tmp"):
        stage = p / STAGING
        if not (p.is_dir() and stage.is_file()):
            continue
        try:
            pid = int(stage.read_text().strip() or "0")
        except (OSError, ValueError):
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def folder_lock(target: str | Path, wait: bool = True) -> Iterator[Path]:
    """An exclusive ``flock`` on ``.NAME.lock`` beside ``target`` (waiting; UserError if not ``wait``)."""
    import fcntl

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = target.parent / f".{target.name}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            if not wait:
                raise UserError(f"another featcircuit run is using {str(target)!r}: wait for it "
                                "to finish") from None
            print(f"featcircuit: waiting for another run using {target} to finish", file=sys.stderr)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield lock
    finally:
        os.close(fd)  # closing releases the lock


@contextlib.contextmanager
def staged_output(out: str | Path, force: bool = False, *, flag: str = "--out",
                  known: Known = frozenset(), lock: bool = True) -> Iterator[Path]:
    """Write a run's output folder as a unit: yields a fresh temporary folder to write into.

    Usage (discover, or any command producing a folder)::

        with staged_output(out, force=cfg.force) as tmp:
            ...write every file into tmp...
        # here `out` holds exactly what was written into tmp

    1. ``check_out_dir``: ``out`` must not be a file, must be writable, and must be empty,
       written by featcircuit (marker or only ``known`` names), or ``force`` must be given;
    2. an exclusive lock beside ``out`` serialises concurrent runs on it (``lock=False`` skips);
    3. the yielded folder is a hidden sibling ``.NAME.PID.RANDOM.tmp``; staging folders of
       killed runs are removed first;
    4. on success a marker ``.featcircuit-out.json`` listing every file is written, the old
       ``out`` is moved aside, the new one renamed into place; the old one is deleted only if
       every file in it was featcircuit's, otherwise kept as ``NAME.old-YYYYmmdd-HHMMSS``
       (and its path printed on stderr);
    5. on an exception (or a kill) ``out`` is left untouched and the temporary folder removed.
    """
    out = check_out_dir(out, force, flag, known)
    ctx = folder_lock(out) if lock else contextlib.nullcontext(out)
    with ctx:
        _clean_stale(out)
        tmp = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        os.mkdir(tmp)  # mode 0777 & ~umask, like any folder the user makes
        (tmp / STAGING).write_text(str(os.getpid()))
        try:
            yield tmp
            (tmp / STAGING).unlink()
            files = sorted(_all_files(tmp) - {MARKER})
            (tmp / MARKER).write_text(json.dumps({"written_by": "featcircuit", "files": files},
                                                 indent=1) + "\n")
            _swap_in(tmp, out, known)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # a no-op once renamed into place


def _swap_in(tmp: Path, out: Path, known: Known) -> None:
    if not out.exists():
        os.rename(tmp, out)
        return
    ours = is_featcircuit_output(out, known)
    if ours:
        aside = out.parent / f".{out.name}.{secrets.token_hex(4)}.old"
    else:
        aside = out.parent / f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}"
        while aside.exists():
            aside = aside.with_name(aside.name + "x")
    os.rename(out, aside)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(aside, out)
        raise
    if ours:
        shutil.rmtree(aside, ignore_errors=True)
    else:
        print(f"featcircuit: the files that were in {out} are kept in {aside}", file=sys.stderr)


# ---- 4. sizes against the data and the model ---------------------------------------------------


def check_data(source: str, split: str, flag: str = "--data") -> None:
    """UserError when ``split`` is unknown or a local ``source`` is missing (HF names pass through)."""
    from .data import BUILTIN_DATA, SPLITS

    if split not in SPLITS:
        raise UserError(f"unknown --split {_show(split)}: use one of {', '.join(SPLITS)}")
    if source == BUILTIN_DATA:
        return
    p = Path(source).expanduser()
    try:
        exists = p.exists()
    except (OSError, ValueError):
        exists = False
    if exists:
        if not (p.is_dir() or p.is_file()):
            raise UserError(f"{flag} {source!r} is not a regular file or folder")
        if p.is_file() and p.suffix != ".jsonl" and split == "heldout":
            raise UserError(f"{flag} {source!r} is one document and has no held-out split: use "
                            "--split all, or a folder or .jsonl of documents")
        return
    if source.startswith(("builtin:", ".", "/", "~")) or source.endswith((".txt", ".jsonl")) \
            or "\x00" in source:
        raise UserError(f"{flag} {_show(source)} not found: expected {BUILTIN_DATA}, a .txt file "
                        "or folder of text files, a .jsonl file or a HuggingFace dataset name")


def data_bytes(source: str, split: str) -> tuple[int, int] | None:
    """(bytes, documents) of a local data source's ``split``; None when unknown (HF datasets)."""
    from .data import _TEXT_SUFFIXES, BUILTIN_DATA, _split_of

    if source == BUILTIN_DATA:
        from . import corpus

        files = [f for f in corpus.stdlib_files() if split == "all" or f.split == split]
        return sum(f.path.stat().st_size for f in files), len(files)
    p = Path(source).expanduser()
    if p.is_dir():
        paths = [f for f in p.rglob("*") if f.is_file() and f.suffix in _TEXT_SUFFIXES
                 and (split == "all" or _split_of(f.relative_to(p).as_posix()) == split)]
        return sum(f.stat().st_size for f in paths), len(paths)
    if p.is_file():
        size = p.stat().st_size
        return size, max(1, size // 2) if p.suffix == ".jsonl" else 1
    return None


def check_tokens_available(source: str, split: str, n_tokens: int, n_ctx: int,
                           flag: str = "--tokens") -> None:
    """UserError when ``source`` cannot hold ``n_tokens`` tokens even at one token per byte."""
    got = data_bytes(source, split)
    if got is None:
        return
    size, docs = got
    # at most one token per byte, one separator per document, one BOS per context
    bound = size + docs
    bound += -(-bound // max(1, n_ctx - 1))
    if n_tokens > bound:
        raise UserError(f"{flag} {n_tokens:,} is more than {source!r} (split {split}) can hold: "
                        f"its {size:,} bytes make at most ~{bound:,} tokens")


def model_config(name_or_path: str) -> dict[str, Any]:
    """A model's config.json (built-in, local folder or HF cache) without loading it; {} if unknown."""
    from .models import _BUILTIN_ALIASES, BUILTIN_DIR

    if name_or_path in _BUILTIN_ALIASES:
        cfg: Path | None = BUILTIN_DIR / "config.json"
    elif Path(name_or_path).expanduser().is_dir():
        cfg = Path(name_or_path).expanduser() / "config.json"
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(name_or_path, "config.json")
            cfg = Path(hit) if isinstance(hit, str) else None
        except Exception:  # not a valid repo id: models.load_model gives the message
            cfg = None
    if cfg is None or not cfg.is_file():
        return {}
    try:
        d = read_json_file(cfg, "model config", max_bytes=4 << 20)
    except UserError:
        return {}
    return d if isinstance(d, dict) else {}


def _first_int(d: dict[str, Any], keys: tuple[str, ...]) -> int | None:
    for key in keys:
        v = d.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def model_context(name_or_path: str) -> int | None:
    """The positions a model supports, read from its config.json (None if unknown)."""
    return _first_int(model_config(name_or_path),
                      ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len"))


def model_sizes(name_or_path: str) -> dict[str, int | None]:
    """``n_layers``, ``d_model`` and ``n_ctx`` from a model's config.json (None where unknown)."""
    d = model_config(name_or_path)
    return {"n_layers": _first_int(d, ("num_hidden_layers", "n_layer", "num_layers", "n_layers")),
            "d_model": _first_int(d, ("hidden_size", "n_embd", "d_model")),
            "n_ctx": model_context(name_or_path)}


def check_layer_of(model: str, layer: int, flag: str = "--layer") -> None:
    """UserError when ``layer`` is not a block of ``model`` (when its config is readable)."""
    n = model_sizes(model)["n_layers"]
    if n is not None and not 0 <= layer < n:
        raise UserError(f"{flag} {layer} is out of range: model {model!r} has layers 0..{n - 1}")


def check_n_ctx(model: str, n_ctx: int, flag: str = "--n-ctx") -> None:
    """UserError when ``n_ctx`` exceeds the model's positions (read from its config, if local)."""
    limit = model_context(model)
    if limit is not None and n_ctx > limit:
        raise UserError(f"{flag} {n_ctx} is beyond the {limit} positions model {model!r} supports: "
                        f"use at most {limit}")


# ---- 5. discover ----------------------------------------------------------------------------------

DISCOVER_FILES = re.compile(r"[a-z_]+\.(json|graphml|dot|svg|png|html|txt|csv)|\..+\.tmp")
"""Names an older ``discover`` output folder (written before the marker existed) may hold."""
_TARGET_RE = re.compile(r"mlp:(0|[1-9][0-9]{0,8})")


def discover_out(cfg: Any) -> Path:
    """The folder ``discover`` writes: ``--out``, or featcircuit-out/MODEL-LLAYER."""
    from .models import canonical_name

    if cfg.out:
        return Path(cfg.out)
    name = Path(canonical_name(cfg.model)).name
    if getattr(cfg, "prompt", None) is not None:
        return Path(f"featcircuit-out/{name}-prompt")
    layers = getattr(cfg, "layers", None)
    tag = str(cfg.layer) if layers is None else "".join(c if c.isalnum() else "-" for c in str(layers))
    return Path(f"featcircuit-out/{name}-L{tag}")


def _check_target_range(cfg: Any) -> None:
    """--target mlp:J against the MLP dictionary's width: read from --dicts, or the default pair's config."""
    j = int(cfg.target.split(":")[1])
    if cfg.dicts is not None:
        try:
            d = read_json_file(Path(cfg.dicts) / "mlp" / "cfg.json", "dictionary config", 1 << 20, 16, 18)
        except UserError:
            return  # load_pair gives the message
        d_sae = d.get("d_sae") if isinstance(d, dict) else None
    else:
        from .training import TrainConfig

        d_model = model_sizes(cfg.model)["d_model"]
        d_sae = None if d_model is None else int(round(TrainConfig().width * d_model))
    if isinstance(d_sae, int) and not 0 <= j < d_sae:
        raise UserError(f"unknown target feature {cfg.target}: the MLP dictionary has features "
                        f"0..{d_sae - 1}")


def check_discover_options(cfg: Any) -> None:
    """The shared checks of ``discover``'s options: device, seed, model, layer, data, target, prompts, out."""
    from .models import resolve_model_path

    device(cfg.device)
    seed(cfg.seed)
    strict_int(cfg.layer, "--layer", 0)
    for name in ("tokens", "eval_tokens", "search_tokens", "candidates", "top_edges"):
        positive_int(getattr(cfg, name), f"--{name.replace('_', '-')}", 10**10)
    for name in ("tau", "node_threshold", "edge_threshold"):
        finite_float(getattr(cfg, name), f"--{name.replace('_', '-')}", 0.0)
    if cfg.target is not None and not _TARGET_RE.fullmatch(cfg.target):
        raise UserError(f"bad --target {_show(cfg.target)}: expected mlp:J with J an MLP feature "
                        "index in ASCII digits, e.g. mlp:123")
    if cfg.prompts:
        if cfg.metric != "ce":
            raise UserError(f"--metric {cfg.metric} cannot be combined with --prompts (which "
                            "measures the logit difference): drop one of them")
        rows = check_prompts_file(cfg.prompts)
    resolve_model_path(cfg.model)  # a missing model fails here, in a second
    check_layer_of(cfg.model, cfg.layer)
    if cfg.prompts:
        check_prompt_lengths(rows, cfg.prompts, cfg.model)
    if cfg.target is not None:
        _check_target_range(cfg)
    if not cfg.prompts:
        check_data(cfg.data, cfg.split)
        if not is_default(cfg.tokens):  # the default is a budget: small data just uses less
            check_tokens_available(cfg.data, cfg.split, cfg.tokens, 128)
    if cfg.dicts is not None and not Path(cfg.dicts).is_dir():
        raise UserError(f"--dicts {cfg.dicts!r} is not a folder: expected a pair folder with resid/ and mlp/")
    # the same rule as discover's staged_output(out, cfg.force): a folder without featcircuit's
    # marker needs --force (DISCOVER_FILES would accept pre-marker outputs; pass it to both or neither)
    check_out_dir(discover_out(cfg), getattr(cfg, "force", False),
                  force_flag="--force" if hasattr(cfg, "force") else None)
