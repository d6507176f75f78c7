"""Harvest: activations at several hooks from one forward pass per batch.

1. the forward stops after the last block any requested hook lives in (``stop_at_layer``);
2. batches are written as they finish — into memory, or into a disk cache of chunk files
   (``chunk_00000.safetensors`` …) beside a ``manifest.json`` that names the tokens, hooks and
   model they belong to; under ``torchrun`` rank r computes chunks r, r+W, … and training
   streams the chunks back in bounded memory (:mod:`featcircuit.shards`);
3. each chunk is written atomically, so a killed harvest leaves only whole chunks, and a rerun
   with the same manifest skips them and computes only the rest; the manifest is read with
   bounded size and depth and must equal the expected one key for key;
4. every chunk is checked for NaN/inf as it is computed and as it is read back.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, overload

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .errors import UserError
from .io import atomic_save_safetensors, atomic_write_text
from .sites import hook_layer, n_layers

MANIFEST_VERSION = 1


def tokens_digest(tokens: Tensor) -> str:
    """A short SHA-256 of a token tensor (shape and values), to tie caches to their data."""
    h = hashlib.sha256(str(tuple(tokens.shape)).encode())
    h.update(tokens.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def stop_layer(model, hooks: Sequence[str]) -> int | None:
    """The block after the last one the hooks live in, or None when a hook needs the full model."""
    layers = [hook_layer(h) for h in hooks]
    if any(lay is None for lay in layers):
        return None
    last = max(layers) + 1  # type: ignore[type-var]
    return None if last >= n_layers(model) else last


@torch.no_grad()
def _forward(model, batch: Tensor, hooks: Sequence[str], stop: int | None) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}

    def saver(name: str):
        # Key by the requested name: aliases (hook_resid_pre) fire as their target (hook_in).
        def save(act: Tensor, hook) -> None:
            a = act.detach().to("cpu")
            out[name] = a.float() if a.dtype in (torch.float16, torch.bfloat16) else a
        return save

    model.run_with_hooks(batch, fwd_hooks=[(h, saver(h)) for h in hooks], stop_at_layer=stop,
                         return_type=None)
    missing = [h for h in hooks if h not in out]
    if missing:
        raise UserError(f"hook(s) {missing} did not fire: check the names with `featcircuit model info`")
    return out


@overload
def harvest(model, tokens: Tensor, hooks: Sequence[str], *, batch_size: int = ...,
            cache_dir: str | Path | None = ..., chunk_size: int = ..., progress: bool = ...,
            load: Literal[True] = ...) -> dict[str, Tensor]: ...
@overload
def harvest(model, tokens: Tensor, hooks: Sequence[str], *, batch_size: int = ...,
            cache_dir: str | Path | None = ..., chunk_size: int = ..., progress: bool = ...,
            load: bool = ...) -> dict[str, Tensor] | None: ...
def harvest(model, tokens: Tensor, hooks: Sequence[str], *, batch_size: int = 16,
            cache_dir: str | Path | None = None, chunk_size: int = 64,
            progress: bool = True, load: bool = True) -> dict[str, Tensor] | None:
    """Activations ``{hook: [n_seq, n_ctx, width]}`` (on the CPU; half precisions as float32).

    With ``cache_dir``, chunks of ``chunk_size`` sequences are saved there and reused; a killed
    run resumes from the last whole chunk. ``load=False`` only fills the cache and returns None
    (memory stays one chunk); under ``torchrun`` each rank then computes its own chunks.
    """
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise UserError(f"tokens must be a non-empty [n_seq, n_ctx] tensor, got shape {tuple(tokens.shape)}")
    for name, v in (("batch_size", batch_size), ("chunk_size", chunk_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UserError(f"{name} {v!r} is invalid: expected an integer >= 1")
    hooks = list(dict.fromkeys(hooks))
    unknown = [h for h in hooks if h not in model.hook_dict]
    if unknown:
        raise UserError(f"unknown hook {unknown[0]!r}: see `featcircuit model info` for the sites")
    stop = stop_layer(model, hooks)
    device = next(model.parameters()).device
    if cache_dir is None:
        if not load:
            raise UserError("harvest(load=False) needs a cache_dir to write the chunks to")
        parts: dict[str, list[Tensor]] = {h: [] for h in hooks}
        for i in tqdm(range(0, len(tokens), batch_size), desc="harvest", disable=not progress,
                      unit="batch"):
            acts = _forward(model, tokens[i:i + batch_size].to(device), hooks, stop)
            for h in hooks:
                parts[h].append(acts[h])
        return {h: torch.cat(v) for h, v in parts.items()}
    return _harvest_cached(model, tokens, hooks, stop, device, Path(cache_dir), batch_size,
                           chunk_size, progress, load)


def _check_finite(acts: dict[str, Tensor], what: str) -> None:
    for h, a in acts.items():
        if a.is_floating_point() and not bool(torch.isfinite(a).all()):
            raise UserError(f"{what} holds NaN or infinite values at {h}: the model or the "
                            "cache is broken (delete the cache and rerun)")


MANIFEST_KEYS = ("version", "model", "hooks", "n_seq", "n_ctx", "tokens", "chunk_size")


def read_manifest(cache: str | Path) -> dict | None:
    """The manifest of an activation cache folder, None when there is none; UserError if malformed."""
    from .readers import read_json_file

    cache = Path(cache)
    man_path = cache / "manifest.json"
    if not (man_path.exists() or man_path.is_symlink()):
        return None
    try:
        old = read_json_file(man_path, "activation cache manifest", max_bytes=1 << 20, max_depth=4)
    except UserError as e:
        raise UserError(f"{e}: delete {cache} or use another cache folder") from None
    if not isinstance(old, dict) or set(old) != set(MANIFEST_KEYS):
        raise UserError(f"activation cache manifest {man_path} is not a featcircuit manifest "
                        f"(expected keys {', '.join(MANIFEST_KEYS)}): delete {cache} or use another folder")
    return old


def _manifest(model, tokens: Tensor, hooks: list[str], chunk_size: int) -> dict:
    from .models import model_name

    return {"version": MANIFEST_VERSION, "model": model_name(model), "hooks": hooks,
            "n_seq": int(tokens.shape[0]), "n_ctx": int(tokens.shape[1]),
            "tokens": tokens_digest(tokens), "chunk_size": chunk_size}


def _harvest_cached(model, tokens, hooks, stop, device, cache: Path, batch_size, chunk_size,
                    progress, load: bool = True) -> dict[str, Tensor] | None:
    from safetensors.torch import load_file

    from . import distributed as D

    man = _manifest(model, tokens, hooks, chunk_size)
    man_path = cache / "manifest.json"
    if D.is_writer():
        old = read_manifest(cache)
        if old is not None:
            if old != man:
                diff = [k for k in man if old.get(k) != man[k]]
                raise UserError(f"activation cache {cache} was made for other {', '.join(diff)}: "
                                "use another cache folder or delete this one")
        else:
            atomic_write_text(man_path, json.dumps(man, indent=1))
    D.barrier()  # the manifest is checked (or written) before any rank adds chunks
    n_chunks = -(-len(tokens) // chunk_size)
    mine = D.shard(range(n_chunks))  # every chunk with one plain process
    todo = [c for c in mine if not (cache / f"chunk_{c:05d}.safetensors").exists()]
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc="harvest", unit="chunk",
               disable=not progress or not D.is_writer())
    for c in todo:
        chunk = tokens[c * chunk_size:(c + 1) * chunk_size]
        parts: dict[str, list[Tensor]] = {h: [] for h in hooks}
        for i in range(0, len(chunk), batch_size):
            acts = _forward(model, chunk[i:i + batch_size].to(device), hooks, stop)
            for h in hooks:
                parts[h].append(acts[h])
        done = {h: torch.cat(v) for h, v in parts.items()}
        _check_finite(done, f"the model's activations for chunk {c}")
        atomic_save_safetensors(done, cache / f"chunk_{c:05d}.safetensors")
        bar.update(1)
    bar.close()
    D.barrier()  # every rank's chunks are on disk
    if not load:
        return None
    out: dict[str, list[Tensor]] = {h: [] for h in hooks}
    for c in range(n_chunks):
        path = cache / f"chunk_{c:05d}.safetensors"
        try:
            d = load_file(path)
        except Exception:
            raise UserError(f"activation cache chunk {path} is corrupt: delete it and rerun") from None
        if set(d) != set(hooks):
            raise UserError(f"activation cache chunk {path} holds {sorted(d)[:3]}, expected "
                            f"{hooks}: delete it and rerun")
        _check_finite(d, f"activation cache chunk {path}")
        for h in hooks:
            out[h].append(d[h])
    return {h: torch.cat(v) for h, v in out.items()}
