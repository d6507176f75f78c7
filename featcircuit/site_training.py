"""One dictionary at any site: training, its one-dictionary folder, and reading either folder kind.

:func:`featcircuit.training.train_pair` trains the resid/mlp pair of a layer; this module trains a
single dictionary at any :class:`~featcircuit.sites.Site` (``attn_out``, ``mlp_out``, ``resid``,
``mlp`` or a raw hook) with the same recipe — the same loss, learning-rate schedule, AuxK, unit-norm
decoder, seeded batches, resumable checkpoints and input scale folded in on save. Its folder is a
plain SAELens dictionary folder (``cfg.json`` + ``sae_weights.safetensors``) plus
``train_config.json``, so SAELens-style code reads it as is.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .activations import harvest
from .dictionary import CFG_FILE, WEIGHTS_FILE, DictConfig, Dictionary, _save_folder
from .errors import UserError
from .io import atomic_save_state, atomic_write_text, load_state
from .sites import Site
from .training import CKPT_FILE, TrainConfig, _loss, _lr

TRAIN_CONFIG = "train_config.json"
SITE_FILES = frozenset({CFG_FILE, WEIGHTS_FILE, TRAIN_CONFIG})


def train_site(model, site: Site, data: Tensor, config: TrainConfig | None = None, *,
               out: str | Path | None = None, ckpt_dir: str | Path | None = None,
               progress: bool = True, device: str | torch.device | None = None,
               acts: Tensor | None = None) -> Dictionary:
    """Train one dictionary on ``site``'s activations over token contexts ``data``.

    ``width`` is a multiple of the site's own width. ``out`` receives a one-dictionary folder;
    ``ckpt_dir`` makes the run resumable. ``acts [n, n_ctx, width]`` skips the harvest.
    """
    from .models import model_name

    cfg = config or TrainConfig()
    if cfg.architecture not in ("topk", "relu", "batchtopk"):
        raise UserError(f"unknown architecture {cfg.architecture!r}: use topk, relu or batchtopk")
    if cfg.jacobian:
        raise UserError(f"--jacobian {cfg.jacobian:g} needs a resid/mlp pair: a single-site "
                        "dictionary has no link to make sparse (use 0)")
    dev = torch.device(device) if device else next(model.parameters()).device
    n_seq = -(-cfg.tokens // (data.shape[1] - 1))
    if len(data) < n_seq:
        raise UserError(f"training needs {cfg.tokens:,} tokens but the data holds only "
                        f"{len(data) * (data.shape[1] - 1):,} (BOS excluded): lower --tokens or add data")
    if acts is None:
        acts = harvest(model, data[:n_seq], [site.hook], progress=progress)[site.hook]
    rows = acts[:, 1:].reshape(-1, site.width)[: cfg.tokens]
    n = len(rows)
    d_sae = int(round(cfg.width * site.width))
    scale = float(rows.pow(2).sum(-1).mean().rsqrt())
    if not (math.isfinite(scale) and scale > 0):
        raise UserError(f"the activations at {site.hook} are all zero or not finite: nothing to train on")
    dc = DictConfig(d_in=site.width, d_sae=d_sae, architecture=cfg.architecture, k=cfg.k,
                    hook_name=site.hook, model_name=model_name(model), layer=site.layer, site=site.name,
                    l1_coefficient=cfg.l1_coefficient if cfg.architecture == "relu" else 0.0)
    d = Dictionary(dc, seed=cfg.seed).to(dev)
    with torch.no_grad():  # start the decoder bias at the data mean (scaled), as train_pair does
        d.b_dec.copy_(rows.mean(0).to(dev) * scale)
    base_lr = cfg.lr or 2e-4 / math.sqrt(d_sae / 2**14)
    opt = torch.optim.Adam(d.parameters(), lr=base_lr, betas=(0.9, 0.999))
    steps_per_epoch = n // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    if total == 0:
        raise UserError(f"--tokens {cfg.tokens:,} is less than one batch of {cfg.batch_size:,}")
    last_fired = torch.zeros(d_sae, dtype=torch.long, device=dev)
    step, post = 0, None
    ckpt = Path(ckpt_dir) / CKPT_FILE if ckpt_dir else None
    if ckpt is not None and ckpt.exists():
        try:
            st = load_state(ckpt, device=dev)
        except ValueError as e:
            raise UserError(f"{e}: delete it to start over") from None
        if st.get("config") != asdict(cfg) or st.get("n_rows") != n or st.get("hook") != site.hook:
            raise UserError(f"checkpoint {ckpt} belongs to another training config or site; delete "
                            "it or use another --out")
        d.load_state_dict(st["dict"])
        opt.load_state_dict(st["opt"])
        last_fired, step = st["last_fired"], st["step"]
        post = tuple(st["post"]) if st.get("post") else None
    gen = torch.Generator()
    dead_steps = max(1, cfg.dead_tokens // cfg.batch_size)
    bar = tqdm(total=total, initial=step, desc=f"train {site.name} L{site.layer}", disable=not progress)
    while step < total:
        epoch, i = divmod(step, steps_per_epoch)
        # the same batches train_pair draws for this seed: a pure function of (seed, step)
        perm = torch.randperm(n, generator=gen.manual_seed(cfg.seed * 7919 + epoch))
        x = rows[perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]].to(dev) * scale
        for g in opt.param_groups:
            g["lr"] = _lr(step, total, cfg, base_lr)
        l1_scale = min(1.0, (step + 1) / max(1, cfg.l1_warmup_frac * total))
        loss, fvu, l0, fired = _loss(d, x, cfg, (step - last_fired) > dead_steps, l1_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        d.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        d.set_decoder_norm_to_unit_norm()
        last_fired[fired] = step + 1
        post = (float(fvu), float(l0))
        step += 1
        bar.update(1)
        if step % 10 == 0 or step == total:
            bar.set_postfix_str(f"L0 {post[1]:.0f} VE {1 - post[0]:.3f}")
        if ckpt is not None and (step % cfg.ckpt_every == 0 or step == total):
            atomic_save_state({"config": asdict(cfg), "n_rows": n, "hook": site.hook, "step": step,
                               "dict": d.state_dict(), "opt": opt.state_dict(),
                               "last_fired": last_fired, "post": list(post)}, ckpt)
    bar.close()
    d.eval()
    d.fold_input_scale(scale)
    d.cfg.training_tokens = int(total * cfg.batch_size)
    if post is not None:
        d.cfg.metrics = {"train_fvu_last": post[0], "train_l0_last": post[1]}
    for p in d.parameters():
        p.requires_grad_(False)
    if not all(bool(torch.isfinite(p).all()) for p in d.parameters()):
        raise UserError(f"training diverged: the {site.name} dictionary has NaN or infinite weights; "
                        "lower the learning rate or --l1, or check the activations")
    if out is not None:
        save_site_dict(d, out, config=cfg)
    return d


def save_site_dict(d: Dictionary, path: str | Path, config: TrainConfig | None = None) -> Path:
    """Write a one-dictionary folder (cfg.json, weights, optional train_config.json), all or nothing."""
    def write(folder: Path) -> None:
        d._write_into(folder)
        if config is not None:
            atomic_write_text(folder / TRAIN_CONFIG, json.dumps(asdict(config), indent=1))

    return _save_folder(Path(path), set(SITE_FILES), write)


def is_site_folder(path: str | Path) -> bool:
    """Whether ``path`` is a one-dictionary folder (``cfg.json`` at its top) rather than a pair."""
    return (Path(path) / CFG_FILE).is_file()


def load_dictionaries(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Dictionary]:
    """``{site name: dictionary}`` of a pair folder (resid/, mlp/) or a one-dictionary folder."""
    from .dictionary import load_pair

    p = Path(path)
    if is_site_folder(p):
        d = Dictionary.load(p, device=device)
        if not d.cfg.site:
            raise UserError(f"dictionary at {p} records no site in its cfg.json: set \"site\" "
                            "(resid, mlp, attn_out, mlp_out or a hook name)")
        return {d.cfg.site: d}
    pair = load_pair(p, device=device)
    return {"resid": pair.resid, "mlp": pair.mlp}


def check_dict_site(d: Dictionary, site: Site, model_name: str, path: str | Path) -> None:
    """UserError when ``d`` was not trained on ``site`` of model ``model_name`` (width, hook, model)."""
    if d.cfg.d_in != site.width:
        raise UserError(f"dictionary at {path} has d_in {d.cfg.d_in}, but {site.hook} is {site.width} wide")
    if d.cfg.model_name and d.cfg.model_name != model_name:
        raise UserError(f"dictionary at {path} is for model {d.cfg.model_name!r}, expected {model_name!r}")
    if d.cfg.hook_name and d.cfg.hook_name != site.hook:
        raise UserError(f"dictionary at {path} reads hook {d.cfg.hook_name!r}, expected {site.hook!r}")
