"""The default dictionary pair of (model, layer): loaded from a cache folder, trained when absent.

The cache lives under ``$FEATCIRCUIT_CACHE`` (default ``~/.cache/featcircuit``) in
``pairs/{model}-L{layer}-{config hash}``; a training run checkpoints into the same folder, so
an interrupted ``discover`` resumes its training instead of starting over.

:func:`default_pairs` fills the folders of several layers from one harvest: one forward pass
per batch captures every missing layer's resid and mlp hooks into a chunked cache under
``acts/`` (resumable), each layer's pair is trained from it in bounded memory, and the cache
is deleted once every pair is saved.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from . import distributed as D
from .checks import folder_lock
from .data import BUILTIN_DATA, load_tokens
from .dictionary import Pair, load_pair
from .errors import UserError
from .models import model_name
from .sites import check_layer, n_layers, pair_sites
from .training import CKPT_FILE, TrainConfig, config_key, train_pair


def cache_root() -> Path:
    """The folder featcircuit caches trained pairs in."""
    return Path(os.environ.get("FEATCIRCUIT_CACHE", Path.home() / ".cache" / "featcircuit"))


def pair_dir(model, layer: int, config: TrainConfig, data: str = BUILTIN_DATA) -> Path:
    """Where the pair for (model, layer, config, data) is cached."""
    # config_key: fields added later (jacobian, …) at their defaults leave the key unchanged
    key = json.dumps({"cfg": config_key(config), "data": data}, sort_keys=True)
    h = hashlib.sha256(key.encode()).hexdigest()[:10]
    name = model_name(model).strip("/").replace("/", "_")
    return cache_root() / "pairs" / f"{name}-L{layer}-{h}"


def default_pair(model, layer: int, config: TrainConfig | None = None, data: str = BUILTIN_DATA,
                 progress: bool = True) -> tuple[Pair, Path]:
    """(pair, its folder): the cached default pair, trained with ``config`` on ``data`` when absent.

    Trained by :func:`default_pairs` (a harvest to disk, streamed), the one path every command
    takes: a pair trained in memory instead differs at float rounding (the harvest's batching), and
    over a full training run that grows into other features, so which command filled the cache
    first would decide the figures.
    """
    check_layer(model, layer)
    return default_pairs(model, [layer], config, data, progress=progress)[layer]


def parse_layers(spec: str, n: int) -> list[int]:
    """``all``, ``0-3``, ``1,3`` or ``0-1,3`` → sorted layer indices of an ``n``-layer model."""
    text = str(spec).strip()
    if text == "all":
        return list(range(n))
    out: set[int] = set()
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise UserError(f"--layers {spec!r} is invalid: expected all, a range such as 0-3, "
                            "or a list such as 1,3")
        lo, hi = int(m[1]), int(m[2] if m[2] is not None else m[1])
        if lo > hi or hi >= n:
            raise UserError(f"--layers {spec!r} is invalid: the model has layers 0..{n - 1}")
        out.update(range(lo, hi + 1))
    return sorted(out)


def _done(folder: Path) -> bool:
    return (folder / "pair" / "mlp" / "cfg.json").exists()


def each_default_pair(model, layers: Sequence[int], progress: bool = True) -> dict[int, tuple[Pair, Path]]:
    """``{layer: (pair, folder)}``: :func:`default_pair` of each layer in turn, as a discover run
    asks for them; a torchrun follower makes the same calls, so that the training of a pair not
    yet cached runs data-parallel with its barriers paired."""
    return {L: default_pair(model, L, progress=progress) for L in layers}


def _load(model, layer: int, folder: Path) -> tuple[Pair, Path]:
    r, m = pair_sites(model, layer)
    return load_pair(folder / "pair", expect_model=model_name(model), expect_layer=layer,
                     d_resid=r.width, d_mlp=m.width,
                     device=next(model.parameters()).device), folder / "pair"


def acts_dir(model, layers: list[int], config: TrainConfig, data: str) -> Path:
    """The harvest cache :func:`default_pairs` fills for ``layers`` (deleted when they are trained)."""
    key = json.dumps({"layers": layers, "tokens": config.tokens, "n_ctx": config.n_ctx,
                      "data": data}, sort_keys=True)
    h = hashlib.sha256(key.encode()).hexdigest()[:10]
    name = model_name(model).strip("/").replace("/", "_")
    return cache_root() / "acts" / f"{name}-{h}"


def default_pairs(model, layers, config: TrainConfig | None = None, data: str = BUILTIN_DATA,
                  progress: bool = True) -> dict[int, tuple[Pair, Path]]:
    """``{layer: (pair, folder)}``: cached pairs loaded, the missing ones trained from one harvest.

    Each pair lands in :func:`pair_dir` of its layer, where :func:`default_pair` finds it.
    Under ``torchrun`` every rank calls this: ranks harvest their own chunks and train
    data-parallel; rank 0 writes.
    """
    from .activations import harvest
    from .training import check_config

    layers = sorted({check_layer(model, int(lay)) for lay in layers})
    if not layers:
        raise UserError(f"no layers asked for: pick some of 0..{n_layers(model) - 1}")
    config = config or TrainConfig()
    check_config(config)
    result = {lay: _load(model, lay, pair_dir(model, lay, config, data))
              for lay in layers if _done(pair_dir(model, lay, config, data))}
    missing = [lay for lay in layers if lay not in result]
    if not missing:
        return result
    acts = acts_dir(model, missing, config, data)
    # one process: a second asking for the same pairs waits, then loads; ranks use barriers
    lock = folder_lock(acts) if D.world() == 1 else contextlib.nullcontext()
    with lock:
        todo = [lay for lay in missing if not _done(pair_dir(model, lay, config, data))]
        if todo:
            n_seq = -(-config.tokens // (config.n_ctx - 1))
            tokens = load_tokens(data, model, n_ctx=config.n_ctx, n_tokens=n_seq * config.n_ctx,
                                 split="train")
            if len(tokens) < n_seq:
                raise UserError(f"training needs {config.tokens:,} tokens but {data!r} holds only "
                                f"{len(tokens) * (config.n_ctx - 1):,} (BOS excluded): lower --tokens")
            hooks = [s.hook for lay in todo for s in pair_sites(model, lay)]
            harvest(model, tokens[:n_seq], hooks, cache_dir=acts, progress=progress, load=False)
            for lay in todo:
                folder = pair_dir(model, lay, config, data)
                torch.manual_seed(config.seed)
                train_pair(model, lay, None, config, out=folder / "pair", ckpt_dir=folder,
                           acts_dir=acts, progress=progress)
                if D.is_writer():
                    (folder / CKPT_FILE).unlink(missing_ok=True)
            D.barrier()
            if D.is_writer():  # every pair is saved: the harvest is spent
                shutil.rmtree(acts, ignore_errors=True)
        for lay in missing:
            result[lay] = _load(model, lay, pair_dir(model, lay, config, data))
    return dict(sorted(result.items()))
