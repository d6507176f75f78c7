"""Atomic file writes: write to a temporary name in the same folder, then rename.

1. a killed process leaves either the old file or the new one, never half of one (its temporary
   file, ``.<name>.<random>.tmp``, is swept by :func:`clear_stale_temps` when the run resumes);
2. the file gets the usual mode (0666 & ~umask, 0644 by default) after it is written, since
   writers such as safetensors recreate the temporary file with mode 0600;
3. JSON is written strictly (:func:`strict_json`): a NaN or infinity becomes ``null`` and its
   place is listed with a reason under ``"null_reasons"``, so strict readers (browsers, jq,
   other languages) can read every file featcircuit writes.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic(path: str | Path, write: Callable[[str], None], own_folder: bool = False) -> Path:
    """``write(tmp)``, then rename ``tmp`` to ``path``. ``own_folder``: ``tmp`` lies inside a
    private temporary folder of the same name pattern, for writers that make temporaries of their
    own beside their target (safetensors), which a kill would otherwise leave in ``path``'s folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = None
    if own_folder:
        folder = tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        tmp = os.path.join(folder, path.name)
    else:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    try:
        write(tmp)
        # mkstemp makes 0600 and some writers recreate the file: give it the usual permissions
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    return path


_TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")  # tempfile.mkstemp(prefix=".NAME.", suffix=".tmp")
SAFETENSORS_TEMP = re.compile(r"\.tmp[A-Za-z0-9]{6}")
"""The temporary safetensors' own ``save_file`` writes beside its target (earlier versions of
:func:`atomic_save_safetensors` let it write into the target's folder, and a kill mid-write left
one there)."""


def clear_stale_temps(folder: str | Path, recursive: bool = False) -> int:
    """Delete the temporary files a killed :func:`_atomic` write left in ``folder`` (and below it
    with ``recursive``); return how many.

    Only names of :func:`_atomic`'s pattern go (``.NAME.`` + mkstemp's 8 characters + ``.tmp``:
    files, and :func:`atomic_save_safetensors`' folders), and :data:`SAFETENSORS_TEMP`'s files.
    Call it only while no other process writes into ``folder``: under the folder's lock, before
    a resumed run starts (a concurrent writer's temporary would be deleted under it).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    glob = folder.rglob if recursive else folder.glob
    dirs = [p for p in glob(".*.tmp") if p.is_dir() and _TEMP_NAME.fullmatch(p.name)]
    for p in dirs:  # atomic_save_safetensors' private folders, with whatever a kill left inside
        shutil.rmtree(p, ignore_errors=True)
    files = [p for p in glob(".*.tmp") if p.is_file() and _TEMP_NAME.fullmatch(p.name)]
    files += [p for p in glob(".tmp*") if p.is_file() and SAFETENSORS_TEMP.fullmatch(p.name)]
    for p in files:
        p.unlink(missing_ok=True)
    return len(dirs) + len(files)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    def write(tmp: str) -> None:
        Path(tmp).write_text(text)

    return _atomic(path, write)


def atomic_save_torch(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to ``path`` atomically."""
    return _atomic(path, lambda t: torch.save(obj, t))


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path,
                            metadata: dict[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file`` to ``path`` atomically.

    safetensors writes through a temporary of its own (``.tmpXXXXXX`` beside its target), which
    a kill mid-write left in the folder, where a resumed harvest refused it as a file featcircuit
    did not write: it writes inside :func:`_atomic`'s own folder (no copy of the tensors in
    memory, as bytes would be).
    """
    from safetensors.torch import save_file

    return _atomic(path, lambda t: save_file({k: v.contiguous() for k, v in tensors.items()}, t,
                                             metadata=metadata), own_folder=True)


def _finite(obj: Any, path: str, reasons: dict[str, str], why: dict[str, str]) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        key = path.rsplit(".", 1)[-1]
        reasons[path or "."] = why.get(path, why.get(key, f"the value was {obj} (not a finite number)"))
        return None
    if isinstance(obj, dict):
        return {k: _finite(v, f"{path}.{k}" if path else str(k), reasons, why) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v, f"{path}[{i}]", reasons, why) for i, v in enumerate(obj)]
    return obj


def strict_json(obj: Any, reasons: dict[str, str] | None = None, **dumps_kw: Any) -> str:
    """JSON text with every NaN/inf replaced by null and explained under a top-level ``null_reasons``.

    ``reasons`` maps a dotted path (``downstream.both.recovered_vs_zero``) or a bare key name to
    the explanation written for it; others get "the value was nan (not a finite number)".
    """
    found: dict[str, str] = {}
    clean = _finite(obj, "", found, reasons or {})
    if found:
        if isinstance(clean, dict):
            clean = {**clean, "null_reasons": {**clean.get("null_reasons", {}), **found}}
        else:
            clean = {"value": clean, "null_reasons": found}
    return json.dumps(clean, allow_nan=False, **dumps_kw)


def atomic_write_json(path: str | Path, obj: Any, reasons: dict[str, str] | None = None,
                      indent: int | None = 1) -> Path:
    """Write ``obj`` as strict JSON (see :func:`strict_json`) to ``path`` atomically."""
    return atomic_write_text(path, strict_json(obj, reasons, indent=indent) + "\n")


# ---- checkpoints without pickle ------------------------------------------------------------------
# A training state (nested dicts/lists of tensors, numbers, strings) is saved as one safetensors
# file: the tensors by generated names, the structure as JSON in the file's metadata. Loading
# never runs code, whatever the file holds.

_STATE_KEY = "featcircuit_state"


def _pack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().cpu().clone().contiguous()  # clone: no shared storage
        return {"__tensor__": name}
    if isinstance(obj, dict):
        for k in obj:
            if isinstance(k, bool) or not isinstance(k, (str, int)):
                raise TypeError(f"checkpoint dict key {k!r} must be a str or int")
        return {"__dict__": [[k, _pack(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_pack(v, tensors) for v in obj], "tuple": isinstance(obj, tuple)}
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": repr(obj)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} without pickle")


def _unpack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {k: _unpack(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            items = [_unpack(v, tensors) for v in obj["__list__"]]
            return tuple(items) if obj.get("tuple") else items
        if "__float__" in obj:
            return float(obj["__float__"])
        raise ValueError("unknown checkpoint node")
    return obj


def atomic_save_state(state: dict[str, Any], path: str | Path) -> Path:
    """Save a training state (tensors, numbers, strings, nested) as one safetensors file, atomically."""
    tensors: dict[str, torch.Tensor] = {}
    structure = json.dumps(_pack(state, tensors))
    return atomic_save_safetensors(tensors, path, metadata={_STATE_KEY: structure})


def load_state(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Read :func:`atomic_save_state`'s file; ValueError when it is not one (never unpickles)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        structure = json.loads(meta[_STATE_KEY])
        state = _unpack(structure, tensors)
    except Exception as e:  # the reader raises several types for bad bytes
        raise ValueError(f"{path} is not a featcircuit checkpoint ({type(e).__name__})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a featcircuit checkpoint")
    return state
