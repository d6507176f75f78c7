"""Loading models: the built-in model, any HuggingFace name, or a local HuggingFace folder.

Everything goes through ``TransformerBridge.boot_transformers`` so the built-in default
exercises the same code path as ``EleutherAI/pythia-70m-deduped``. Names that are neither a
folder nor in the HuggingFace cache are only fetched when the Hub answers; offline they fail
at once with a one-line :class:`UserError` instead of minutes of retries.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

from .errors import UserError

BUILTIN_NAME = "stdlib-neox"
BUILTIN_DIR = Path(__file__).parent / "builtin" / BUILTIN_NAME
_BUILTIN_ALIASES = {BUILTIN_NAME, "builtin", f"builtin:{BUILTIN_NAME}"}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cpu``/``cuda``/``cuda:N`` as given."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {str(device)!r} asked for but CUDA is not available; "
                        "use --device cpu or auto")
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"device {str(device)!r} is not supported; use auto, cpu or cuda")
    return dev


def canonical_name(name_or_path: str) -> str:
    """The name recorded in dictionaries and graphs: the built-in name, a hub name or a path."""
    if name_or_path in _BUILTIN_ALIASES:
        return BUILTIN_NAME
    p = Path(name_or_path)
    if p.is_dir() and p.resolve() == BUILTIN_DIR.resolve():
        return BUILTIN_NAME
    return str(p.resolve()) if p.is_dir() else name_or_path


def builtin_provenance() -> dict:
    """How the built-in model was made (``provenance.json`` shipped beside its weights)."""
    path = BUILTIN_DIR / "provenance.json"
    if not path.exists():
        raise UserError(f"the built-in model is missing from {BUILTIN_DIR}: reinstall featcircuit "
                        "or run `featcircuit model train`")
    return json.loads(path.read_text())


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or ""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _in_hf_cache(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # invalid repo id etc.
        return False


def resolve_model_path(name_or_path: str) -> tuple[str, bool]:
    """(what to pass to ``boot_transformers``, whether it must load offline)."""
    if name_or_path in _BUILTIN_ALIASES:
        if not (BUILTIN_DIR / "config.json").exists():
            raise UserError(f"the built-in model is missing from {BUILTIN_DIR}: reinstall "
                            "featcircuit or run `featcircuit model train`")
        return str(BUILTIN_DIR), True
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise UserError(f"model folder {name_or_path!r} has no config.json: expected a "
                            "HuggingFace model folder (config.json, weights, tokenizer)")
        return str(p), True
    if _in_hf_cache(name_or_path):
        return name_or_path, True
    if not _hub_reachable():
        raise UserError(
            f"model {name_or_path!r} is not available locally (not a folder, not in the "
            f"HuggingFace cache) and the Hub cannot be reached: pass a local HF folder with "
            f"--model PATH, or use the built-in '{BUILTIN_NAME}'")
    return name_or_path, False


def load_model(name_or_path: str = BUILTIN_NAME, device: str | torch.device = "auto",
               dtype: torch.dtype = torch.float32):
    """A ``TransformerBridge`` (HF numerics, eval mode, frozen weights) for a name or folder."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a 1-second "Loading weights" bar is noise on every command
    hf_logging.set_verbosity_error()
    target, offline = resolve_model_path(name_or_path)
    dev = resolve_device(device)
    old = os.environ.get("HF_HUB_OFFLINE")
    if offline:  # never let a local load wander onto the network
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        model = TransformerBridge.boot_transformers(target, device=str(dev), dtype=dtype)
    except OSError as e:
        raise UserError(f"could not load model {name_or_path!r}: {str(e).splitlines()[0]}") from e
    except (KeyError, ValueError, NotImplementedError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"model {name_or_path!r} is not supported by TransformerLens: {msg}") from e
    finally:
        if offline:
            if old is None:
                os.environ.pop("HF_HUB_OFFLINE", None)
            else:
                os.environ["HF_HUB_OFFLINE"] = old
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.featcircuit_name = canonical_name(name_or_path)
    return model


def model_name(model) -> str:
    """The canonical name a loaded model was booted from."""
    return getattr(model, "featcircuit_name", None) or str(getattr(model.cfg, "model_name", "?"))


def model_info(model) -> dict:
    """Architecture summary: name, sizes, parallel or sequential blocks, parameter count."""
    from .sites import is_parallel

    cfg = model.cfg
    hf_cfg = model.original_model.config
    return {
        "name": model_name(model), "architecture": type(model.original_model).__name__,
        "n_layers": cfg.n_layers, "d_model": cfg.d_model, "d_mlp": cfg.d_mlp,
        "n_heads": cfg.n_heads, "d_vocab": cfg.d_vocab, "n_ctx": cfg.n_ctx, "act_fn": cfg.act_fn,
        "normalization": cfg.normalization_type,
        "blocks": "parallel attention+MLP" if is_parallel(model) else "sequential",
        "positional": getattr(cfg, "positional_embedding_type", "?"),
        "n_params": sum(p.numel() for p in model.original_model.parameters()),
        "hf_model_type": getattr(hf_cfg, "model_type", "?"),
    }
