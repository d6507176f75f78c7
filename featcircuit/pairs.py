"""The default dictionary pair of (model, layer): loaded from a cache folder, trained when absent.

The cache lives under ``$FEATCIRCUIT_CACHE`` (default ``~/.cache/featcircuit``) in
``pairs/{model}-L{layer}-{config hash}``; a training run checkpoints into the same folder, so
an interrupted ``discover`` resumes its training instead of starting over.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from .checks import folder_lock
from .data import BUILTIN_DATA, load_tokens
from .dictionary import Pair, load_pair
from .models import model_name
from .sites import check_layer, pair_sites
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
    """(pair, its folder): the cached default pair, trained with ``config`` on ``data`` when absent."""
    check_layer(model, layer)
    config = config or TrainConfig()
    folder = pair_dir(model, layer, config, data)
    r, m = pair_sites(model, layer)
    device = next(model.parameters()).device
    if (folder / "pair" / "mlp" / "cfg.json").exists():
        return load_pair(folder / "pair", expect_model=model_name(model), expect_layer=layer,
                         d_resid=r.width, d_mlp=m.width, device=device), folder / "pair"
    # a second process asking for the same pair waits for the first, then loads its result
    with folder_lock(folder):
        if (folder / "pair" / "mlp" / "cfg.json").exists():
            return load_pair(folder / "pair", expect_model=model_name(model), expect_layer=layer,
                             d_resid=r.width, d_mlp=m.width, device=device), folder / "pair"
        n_seq = -(-config.tokens // (config.n_ctx - 1))
        tokens = load_tokens(data, model, n_ctx=config.n_ctx, n_tokens=n_seq * config.n_ctx,
                             split="train")
        torch.manual_seed(config.seed)
        pair = train_pair(model, layer, tokens, config, out=folder / "pair", ckpt_dir=folder,
                          progress=progress)
        (folder / CKPT_FILE).unlink(missing_ok=True)  # the pair is saved; the checkpoint is spent
    return pair, folder / "pair"
