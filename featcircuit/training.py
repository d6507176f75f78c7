"""Paired dictionary training: one harvest feeds the ``resid`` and ``mlp`` dictionaries of a layer.

1. harvest both sites of the layer for ``tokens`` tokens in one forward pass per batch (BOS
   positions dropped: their activations are outliers no feature should spend capacity on);
2. scale each site to unit mean squared norm (the scale is folded into the weights on save,
   so a saved dictionary takes raw activations);
3. shuffle with a seeded permutation per epoch (the whole harvest is the shuffling buffer) and
   train both dictionaries on the same rows: Adam, linear warm-up, linear decay over the last
   ``decay_frac`` of steps, unit-norm decoder rows, AuxK loss on dead latents (TopK/BatchTopK),
   decoder-norm-weighted L1 with warm-up (ReLU);
4. checkpoint atomically every ``ckpt_every`` steps (weights, optimizer, step, dead-latent
   counters, last metrics) as safetensors with a JSON structure, never pickle; a killed run
   resumes from the checkpoint and, since batches are a pure function of (seed, step), ends
   with the same weights as an uninterrupted one; a finished checkpoint resumes to the end at
   once (a rerun of a finished command writes the same pair again).
5. with ``jacobian`` = λ > 0 the two dictionaries train jointly on one loss, both
   reconstructions (+ AuxK / L1) + λ·mean_t ‖J_t‖₁, with ``J_t`` the Jacobian between the
   token's active resid and MLP codes (:mod:`featcircuit.jacobian`, in the scaled units the
   dictionaries train in) estimated on the first ``jacobian_tokens`` rows of each shuffled batch;
   the MLP dictionary still reconstructs the MLP activation of the *true* residual, and J is
   taken there (LayerNorm Jacobian exact at the true input). λ = 0 runs the plain steps above.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from .activations import harvest
from .dictionary import DictConfig, Dictionary, Pair, save_pair
from .errors import UserError
from .io import atomic_save_state, load_state
from .sites import MLPParts, pair_sites

CKPT_FILE = "train_state.safetensors"


@dataclass
class TrainConfig:
    """How a pair is trained. Each field is also a ``featcircuit train`` flag."""

    architecture: str = "topk"
    """topk | relu | batchtopk"""
    width: float = 8.0
    """dictionary size as a multiple of the *residual* width (both sites get the same size)"""
    k: int = 32
    """active features per token (topk, batchtopk)"""
    l1_coefficient: float = 0.1
    """L1 penalty on codes × decoder norms (relu only)"""
    tokens: int = 1_000_000
    """activation rows to train on (BOS excluded), each seen ``epochs`` times"""
    epochs: int = 2
    batch_size: int = 1024
    lr: float | None = None
    """Adam learning rate; None → 2e-4 / sqrt(d_sae / 2^14) (sparsify's rule)"""
    warmup_steps: int = 50
    decay_frac: float = 0.2
    l1_warmup_frac: float = 0.1
    auxk_alpha: float = 1 / 32
    dead_tokens: int = 200_000
    """a latent that has not fired for this many tokens counts as dead (AuxK)"""
    n_ctx: int = 128
    seed: int = 0
    ckpt_every: int = 200
    jacobian: float = 0.0
    """λ of the Jacobian sparsity penalty λ·mean_t ‖J_t‖₁ (0: plain pair; DESIGN §14)"""
    jacobian_tokens: int = 128
    """rows of each batch the Jacobian penalty is estimated on (an unbiased subsample)"""

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Inverse of ``asdict``; unknown keys are an error."""
        names = {f.name for f in fields(cls)}
        bad = sorted(set(d) - names)
        if bad:
            raise UserError(f"unknown training option {bad[0]!r}; known: {', '.join(sorted(names))}")
        return cls(**d)


# Fields added after pairs were first cached: left out of a config's key while they hold their
# default, so every pair cached before they existed keeps its folder (and checkpoints resume).
_KEY_OPTIONAL = {"jacobian": 0.0, "jacobian_tokens": 128}


def config_key(cfg: TrainConfig) -> dict:
    """``asdict(cfg)`` without the later-added fields that hold their defaults (cache keys)."""
    d = asdict(cfg)
    plain = cfg.jacobian == 0  # then jacobian_tokens does not change training either
    for name, default in _KEY_OPTIONAL.items():
        if d[name] == default or plain:
            del d[name]
    return d


def _lr(step: int, total: int, cfg: TrainConfig, base: float) -> float:
    if step < cfg.warmup_steps:
        return base * (step + 1) / cfg.warmup_steps
    decay_start = int(total * (1 - cfg.decay_frac))
    if step >= decay_start:
        return base * (total - step) / max(1, total - decay_start)
    return base


def _loss(d: Dictionary, x: Tensor, cfg: TrainConfig, dead: Tensor, l1_scale: float,
          keep: dict | None = None):
    """(total loss, fvu, l0, fired mask [d_sae]) for one batch of scaled inputs ``x``.

    ``keep`` receives the codes (``acts``/``idx`` for topk, dense ``codes`` otherwise).
    """
    arch = d.cfg.architecture
    pre = d.pre_acts(x)
    if arch == "topk":
        acts, idx = F.relu(pre).topk(d.cfg.k, dim=-1, sorted=False)
        if keep is not None:
            keep.update(acts=acts, idx=idx)
        recon = d.decode_sparse(acts, idx)
        fired = torch.zeros(d.cfg.d_sae, dtype=torch.bool, device=x.device)
        fired[idx[acts > 0]] = True
        l0 = (acts > 0).sum(-1).float().mean()
    else:
        codes = d.encode(x)  # relu, or batchtopk in training mode
        if keep is not None:
            keep.update(codes=codes)
        recon = d.decode(codes)
        fired = (codes > 0).any(0)
        l0 = (codes > 0).sum(-1).float().mean()
        if arch == "batchtopk":  # inference threshold: EMA of the smallest kept activation
            with torch.no_grad():
                pos = codes[codes > 0]
                if pos.numel():
                    d.threshold.mul_(0.99).add_(0.01 * pos.min())
    err = x - recon
    total_var = (x - x.mean(0)).pow(2).sum()
    fvu = err.pow(2).sum() / total_var
    loss = fvu
    if arch == "relu":
        l1 = (codes * d.W_dec.norm(dim=-1)).sum(-1).mean()
        loss = loss + cfg.l1_coefficient * l1_scale * l1  # inputs have unit mean square norm
    elif cfg.auxk_alpha > 0 and bool(dead.any()):
        # AuxK (Gao et al. 2024): dead latents try to explain the main reconstruction's error.
        # k_aux = d_in/2 as in the paper, capped at 4k: beyond that the sparse decode of the
        # auxiliary codes costs more than the main step on a CPU and dead latents revive as well.
        k_aux = min(x.shape[-1] // 2, 4 * d.cfg.k, int(dead.sum()))
        dead_pre = pre.masked_fill(~dead, -torch.inf)
        a_acts, a_idx = dead_pre.topk(k_aux, dim=-1, sorted=False)
        e_hat = d.decode_sparse(F.relu(a_acts), a_idx) - d.b_dec
        aux = (e_hat - err.detach()).pow(2).sum() / (err.detach() - err.detach().mean(0)).pow(2).sum()
        loss = loss + cfg.auxk_alpha * aux.nan_to_num(0.0)
    return loss, fvu.detach(), l0.detach(), fired


def train_pair(model, layer: int, data: Tensor, config: TrainConfig | None = None, *,
               out: str | Path | None = None, ckpt_dir: str | Path | None = None,
               progress: bool = True, device: str | torch.device | None = None,
               acts: dict[str, Tensor] | None = None) -> Pair:
    """Train the ``resid`` and ``mlp`` dictionaries of ``layer`` on token contexts ``data``.

    ``out`` (a pair folder) receives the result; ``ckpt_dir`` makes the run resumable.
    ``acts`` skips the harvest (``{hook: [n, n_ctx, d]}`` as :func:`harvest` returns).
    """
    from .models import model_name

    cfg = config or TrainConfig()
    if cfg.architecture not in ("topk", "relu", "batchtopk"):
        raise UserError(f"unknown architecture {cfg.architecture!r}: use topk, relu or batchtopk")
    if not (isinstance(cfg.jacobian, (int, float)) and math.isfinite(cfg.jacobian) and cfg.jacobian >= 0):
        raise UserError(f"--jacobian {cfg.jacobian!r} is invalid: expected a finite number >= 0 "
                        "(0 trains a plain pair)")
    if not (isinstance(cfg.jacobian_tokens, int) and cfg.jacobian_tokens >= 1):
        raise UserError(f"jacobian_tokens {cfg.jacobian_tokens!r} is invalid: expected an integer >= 1")
    sites = pair_sites(model, layer)
    dev = torch.device(device) if device else next(model.parameters()).device
    n_seq = -(-cfg.tokens // (data.shape[1] - 1))
    if len(data) < n_seq:
        raise UserError(f"training needs {cfg.tokens:,} tokens but the data holds only "
                        f"{len(data) * (data.shape[1] - 1):,} (BOS excluded): lower --tokens or add data")
    if acts is None:
        acts = harvest(model, data[:n_seq], [s.hook for s in sites], progress=progress)
    rows = {s.name: acts[s.hook][:, 1:].reshape(-1, s.width)[: cfg.tokens] for s in sites}
    n = len(rows["resid"])
    d_sae = int(round(cfg.width * sites[0].width))
    dicts: dict[str, Dictionary] = {}
    scales: dict[str, float] = {}
    for i, s in enumerate(sites):
        scales[s.name] = float(rows[s.name].pow(2).sum(-1).mean().rsqrt())
        dc = DictConfig(d_in=s.width, d_sae=d_sae, architecture=cfg.architecture, k=cfg.k,
                        hook_name=s.hook, model_name=model_name(model), layer=layer, site=s.name,
                        l1_coefficient=cfg.l1_coefficient if cfg.architecture == "relu" else 0.0)
        d = Dictionary(dc, seed=cfg.seed + i).to(dev)
        with torch.no_grad():  # start the decoder bias at the data mean (scaled)
            d.b_dec.copy_(rows[s.name].mean(0).to(dev) * scales[s.name])
        dicts[s.name] = d
    base_lr = cfg.lr or 2e-4 / math.sqrt(d_sae / 2**14)
    opts = {k: torch.optim.Adam(d.parameters(), lr=base_lr, betas=(0.9, 0.999)) for k, d in dicts.items()}
    steps_per_epoch = n // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    if total == 0:
        raise UserError(f"--tokens {cfg.tokens:,} is less than one batch of {cfg.batch_size:,}")
    last_fired = {k: torch.zeros(d_sae, dtype=torch.long, device=dev) for k in dicts}
    step = 0
    post: dict[str, tuple[float, float]] = {}
    # safetensors + JSON, never pickle: an old or planted train_state.pt is not read
    ckpt = Path(ckpt_dir) / CKPT_FILE if ckpt_dir else None
    if ckpt is not None and ckpt.exists():
        try:
            st = load_state(ckpt, device=dev)
        except ValueError as e:
            raise UserError(f"{e}: delete it to start over") from None
        if st.get("config") != asdict(cfg) or st.get("n_rows") != n:
            raise UserError(f"checkpoint {ckpt} belongs to another training config; delete it or "
                            "use another --out")
        for k in dicts:
            dicts[k].load_state_dict(st["dicts"][k])
            opts[k].load_state_dict(st["opts"][k])
            last_fired[k] = st["last_fired"][k]
        step = st["step"]
        post = {k: tuple(v) for k, v in st.get("post", {}).items()}

    if cfg.jacobian > 0:  # joint training: the MLP's weights on the training device
        from .jacobian import training_penalty
        from .sites import mlp_parts

        parts = MLPParts(*(t.to(dev) if isinstance(t, Tensor) else t for t in mlp_parts(model, layer)))
        ratio = scales["mlp"] / scales["resid"]  # J in the scaled units both dictionaries train in
        n_jac = min(cfg.jacobian_tokens, cfg.batch_size)
    jac_last = None
    gen = torch.Generator()
    dead_steps = max(1, cfg.dead_tokens // cfg.batch_size)
    bar = tqdm(total=total, initial=step, desc=f"train pair L{layer}", disable=not progress)
    while step < total:
        epoch, i = divmod(step, steps_per_epoch)
        perm = torch.randperm(n, generator=gen.manual_seed(cfg.seed * 7919 + epoch))
        idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
        post = {}
        l1_scale = min(1.0, (step + 1) / max(1, cfg.l1_warmup_frac * total))
        held = {k: {} for k in dicts} if cfg.jacobian > 0 else None
        pending = []
        for k, d in dicts.items():
            x = rows[k][idx].to(dev) * scales[k]
            dead = (step - last_fired[k]) > dead_steps
            for g in opts[k].param_groups:
                g["lr"] = _lr(step, total, cfg, base_lr)
            loss, fvu, l0, fired = _loss(d, x, cfg, dead, l1_scale, keep=None if held is None else held[k])
            if held is not None:
                pending.append(loss)
            else:
                opts[k].zero_grad(set_to_none=True)
                loss.backward()
                d.remove_gradient_parallel_to_decoder_directions()
                opts[k].step()
                d.set_decoder_norm_to_unit_norm()
            last_fired[k][fired] = step + 1
            post[k] = (float(fvu), float(l0))
        if held is not None:  # one backward through both reconstructions and the penalty
            pen = training_penalty(parts, rows["resid"][idx[:n_jac]].to(dev), dicts["resid"],
                                   dicts["mlp"], held["resid"], held["mlp"], ratio)
            total_loss = pending[0] + pending[1] + cfg.jacobian * pen
            for o in opts.values():
                o.zero_grad(set_to_none=True)
            total_loss.backward()
            for k, d in dicts.items():
                d.remove_gradient_parallel_to_decoder_directions()
                opts[k].step()
                d.set_decoder_norm_to_unit_norm()
            jac_last = float(pen.detach())
        step += 1
        bar.update(1)
        if step % 10 == 0 or step == total:
            bar.set_postfix_str(" ".join(f"{k}: L0 {l0:.0f} VE {1 - f:.3f}" for k, (f, l0) in post.items())
                                + ("" if jac_last is None else f" |J|₁ {jac_last:.2f}"))
        if ckpt is not None and (step % cfg.ckpt_every == 0 or step == total):
            atomic_save_state({"config": asdict(cfg), "n_rows": n, "step": step,
                               "dicts": {k: d.state_dict() for k, d in dicts.items()},
                               "opts": {k: o.state_dict() for k, o in opts.items()},
                               "last_fired": last_fired, "post": post}, ckpt)
    bar.close()
    for k, d in dicts.items():
        d.eval()
        d.fold_input_scale(scales[k])
        d.cfg.training_tokens = int(total * cfg.batch_size)
        if k in post:
            d.cfg.metrics = {"train_fvu_last": post[k][0], "train_l0_last": post[k][1]}
        if jac_last is not None:
            d.cfg.metrics.update(train_jacobian=cfg.jacobian, train_jacobian_l1_last=jac_last)
        for p in d.parameters():
            p.requires_grad_(False)
    for k, d in dicts.items():  # never save (or hand back) a diverged dictionary
        if not all(bool(torch.isfinite(p).all()) for p in d.parameters()):
            raise UserError(f"training diverged: the {k} dictionary has NaN or infinite weights; "
                            "lower the learning rate or --l1, or check the activations")
    pair = Pair(dicts["resid"], dicts["mlp"])
    if out is not None:
        save_pair(pair.resid, pair.mlp, out,
                  extra_files={"train_config.json": json.dumps(asdict(cfg), indent=1)})
    return pair
