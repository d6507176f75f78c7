"""Paired dictionary training: one harvest feeds the ``resid`` and ``mlp`` dictionaries of a layer.

1. harvest both sites of the layer for ``tokens`` tokens in one forward pass per batch (BOS
   positions dropped: their activations are outliers no feature should spend capacity on);
2. scale each site to unit mean squared norm (the scale is folded into the weights on save,
   so a saved dictionary takes raw activations);
3. shuffle with a seeded permutation per epoch — the whole harvest when it fits ``shuffle_rows``,
   else windows of shards streamed from a disk cache in bounded memory (:mod:`.shards`) — and
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
6. under ``torchrun`` (:mod:`.distributed`) each rank takes its contiguous share of every global
   batch; batch statistics (the FVU's variance, AuxK's) are reduced over ranks and gradients
   summed, so the ranks train the dictionaries one process trains with the same batch and seed;
   rank 0 checkpoints and writes.
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
from .distributed import Reducer
from .errors import UserError
from .io import atomic_save_state, load_state
from .shards import CacheRows, MemoryRows, RowStream, source_stats
from .sites import MLPParts, pair_sites
from .sparse_encoder import selected_pre, use_sparse_grad

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
    jacobian_tokens: int = 64
    """rows of each batch the Jacobian penalty is estimated on (an unbiased subsample; 64 keeps a
    step at about 1.25× a plain one, ``benchmarks/bench_jacobian.py``)"""
    shuffle_rows: int = 2**20
    """rows shuffled together: the whole harvest when it fits, else windows of shards this size
    (bounds training memory; see :mod:`featcircuit.shards`)"""

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
# (jacobian_tokens was 128 when Jacobian pairs were first cached: the key keeps that reference, so
# a pair cached then keeps its folder and one trained on the current default of 64 gets its own.)
_KEY_OPTIONAL = {"jacobian": 0.0, "jacobian_tokens": 128, "shuffle_rows": 2**20}


def config_key(cfg: TrainConfig) -> dict:
    """``asdict(cfg)`` without the later-added fields that hold their defaults (cache keys)."""
    d = asdict(cfg)
    plain = cfg.jacobian == 0  # then jacobian_tokens does not change training either
    fits = cfg.tokens <= min(cfg.shuffle_rows, _KEY_OPTIONAL["shuffle_rows"])
    for name, default in _KEY_OPTIONAL.items():
        if d[name] == default or (plain and name.startswith("jacobian")):
            del d[name]
        elif name == "shuffle_rows" and fits:  # one window either way: the same batches
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
          keep: dict | None = None, red: Reducer | None = None, n_global: int | None = None):
    """(loss, fvu, l0, fired mask [d_sae]) for one batch of scaled inputs ``x``.

    ``keep`` receives the codes (``acts``/``idx`` for topk, dense ``codes`` otherwise). With a
    reducer ``red`` (data-parallel ranks), ``x`` is this rank's share of a global batch of
    ``n_global`` rows: batch statistics are global, and the loss, fvu and l0 are this rank's
    terms of the global ones, so summing gradients over ranks gives the one-process gradient.
    """
    arch = d.cfg.architecture
    n_glob = len(x) if red is None or n_global is None else n_global
    amp = x.is_cuda and amp_enabled()
    sparse = use_sparse_grad(d, x.device)  # wide TopK on a CPU: the encoder's gradient from the picks
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp), \
            torch.set_grad_enabled(torch.is_grad_enabled() and not sparse):
        pre = d.pre_acts(x)  # the [B, d_in] @ [d_in, d_sae] matmul: bf16 on CUDA
    pre = pre.float()
    if arch == "topk":
        acts, idx = F.relu(pre).topk(d.cfg.k, dim=-1, sorted=False)
        if sparse:  # the same values, with gradients through the picked pre-activations only
            acts = F.relu(selected_pre(d, x, idx, pre))
        if keep is not None:
            keep.update(acts=acts, idx=idx)
        recon = d.decode_sparse(acts, idx)
        on = acts > 0
        # a scatter instead of fired[idx[on]] = True: no data-dependent shape, no host sync
        fired = torch.zeros(d.cfg.d_sae, device=x.device).index_add_(
            0, idx.flatten(), on.flatten().float()) > 0
        l0 = on.sum(-1).float().mean() if red is None else on.sum().float() / n_glob
    else:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and arch == "relu"):
            codes = d.encode(x)  # relu, or batchtopk in training mode
            if keep is not None:
                keep.update(codes=codes)
            recon = d.decode(codes)
        codes, recon = codes.float(), recon.float()
        fired = (codes > 0).any(0)
        on = codes > 0
        l0 = on.sum(-1).float().mean() if red is None else on.sum().float() / n_glob
        if arch == "batchtopk":  # inference threshold: EMA of the smallest kept activation
            with torch.no_grad():
                pos = codes[codes > 0]
                if pos.numel():
                    d.threshold.mul_(0.99).add_(0.01 * pos.min())
    err = x - recon
    total_var = _centered_sq(x, red, n_glob)
    fvu = err.pow(2).sum() / total_var
    loss = fvu
    if arch == "relu":
        w = (codes * d.W_dec.norm(dim=-1)).sum(-1)
        l1 = w.mean() if red is None else w.sum() / n_glob
        loss = loss + cfg.l1_coefficient * l1_scale * l1  # inputs have unit mean square norm
    elif cfg.auxk_alpha > 0 and (sync_free(x) or bool(dead.any())):
        # AuxK (Gao et al. 2024): dead latents try to explain the main reconstruction's error.
        # k_aux = d_in/2 as in the paper, capped at 4k: beyond that the sparse decode of the
        # auxiliary codes costs more than the main step on a CPU and dead latents revive as well.
        # On CUDA k_aux does not shrink to the number of dead latents (that needs a host sync):
        # the extra picks are live latents masked to -inf, whose relu is 0, so e_hat is the same.
        cap = min(x.shape[-1] // 2, 4 * d.cfg.k, d.cfg.d_sae)
        k_aux = cap if sync_free(x) else min(cap, int(dead.sum()))
        dead_pre = pre.masked_fill(~dead, -torch.inf)
        a_acts, a_idx = dead_pre.topk(k_aux, dim=-1, sorted=False)
        if sparse:  # live picks (CUDA's fixed k_aux) read -inf above: relu makes them 0, here too
            a_acts = selected_pre(d, x, a_idx, pre).masked_fill(~dead[a_idx], -torch.inf)
        e_hat = d.decode_sparse(F.relu(a_acts), a_idx) - d.b_dec
        e = err.detach()
        aux = (e_hat - e).pow(2).sum() / _centered_sq(e, red, n_glob)
        if sync_free(x):
            aux = aux * dead.any()
        loss = loss + cfg.auxk_alpha * aux.nan_to_num(0.0)
    return loss, fvu.detach(), l0.detach(), fired


SYNC_FREE: bool | None = None
"""Force the host-sync-free AuxK path on (True) or off (False); None: on for CUDA tensors."""


def sync_free(x: Tensor) -> bool:
    """Whether the step avoids host syncs (data-dependent sizes) for ``x``'s device."""
    return x.is_cuda if SYNC_FREE is None else SYNC_FREE


def amp_enabled() -> bool:
    """Whether CUDA training runs its wide matmuls in bf16 autocast (``FEATCIRCUIT_AMP=0``: off)."""
    import os

    return os.environ.get("FEATCIRCUIT_AMP", "1") != "0"


def _centered_sq(x: Tensor, red: Reducer | None, n: int) -> Tensor:
    """Σ‖x − mean‖² over the (global) batch; a constant of the loss, so no gradient flows."""
    if red is None:
        return (x - x.mean(0)).pow(2).sum()
    with torch.no_grad():
        mean = red.sum(x.detach().sum(0)) / n
        return red.sum((x.detach() - mean).pow(2).sum())


def _site_stats(source, red: Reducer | None) -> dict[str, tuple[float, Tensor]]:
    """Per site (input scale to unit mean squared norm, mean row) over all of the source's rows."""
    if isinstance(source, MemoryRows):  # as before streaming existed: bit-identical pairs
        return {k: (float(v.pow(2).sum(-1).mean().rsqrt()), v.mean(0)) for k, v in source.rows.items()}
    from . import distributed as D

    n = sum(source.shard_rows)
    shards = D.shard(range(len(source.shard_rows)), D.rank() if red else 0, red.world if red else 1)
    sums = source_stats(source, red, shards)
    return {k: (float((s2 / n).rsqrt()), (s1 / n).float()) for k, (s1, s2) in sums.items()}


def _same_config(saved, cfg: TrainConfig) -> bool:
    """Whether a saved config dict is ``cfg``, fields added later counting at their defaults."""
    if not isinstance(saved, dict):
        return False
    return {**asdict(TrainConfig()), **{k: v for k, v in saved.items()}} == asdict(cfg)


def check_config(cfg: TrainConfig) -> None:
    """UserError for an option no training can run with (before anything is harvested)."""
    if cfg.architecture not in ("topk", "relu", "batchtopk"):
        raise UserError(f"unknown architecture {cfg.architecture!r}: use topk, relu or batchtopk")
    if not (isinstance(cfg.jacobian, (int, float)) and math.isfinite(cfg.jacobian) and cfg.jacobian >= 0):
        raise UserError(f"--jacobian {cfg.jacobian!r} is invalid: expected a finite number >= 0 "
                        "(0 trains a plain pair)")
    if not (isinstance(cfg.jacobian_tokens, int) and cfg.jacobian_tokens >= 1):
        raise UserError(f"jacobian_tokens {cfg.jacobian_tokens!r} is invalid: expected an integer >= 1")
    if isinstance(cfg.tokens, int) and isinstance(cfg.batch_size, int) and cfg.tokens < cfg.batch_size:
        raise UserError(f"--tokens {cfg.tokens:,} is less than one batch of {cfg.batch_size:,}")
    if not (isinstance(cfg.shuffle_rows, int) and cfg.shuffle_rows >= 1):
        raise UserError(f"--shuffle-rows {cfg.shuffle_rows!r} is invalid: expected an integer >= 1")
    from . import distributed as D

    w = D.world()
    if w > 1:
        if cfg.architecture == "batchtopk" or cfg.jacobian > 0:
            raise UserError(f"data-parallel training ({w} ranks) supports topk and relu without "
                            "--jacobian; run batchtopk or a Jacobian pair in one process")
        if cfg.batch_size % w:
            raise UserError(f"--batch-size {cfg.batch_size} does not split evenly over {w} ranks")


def train_pair(model, layer: int, data: Tensor | None, config: TrainConfig | None = None, *,
               out: str | Path | None = None, ckpt_dir: str | Path | None = None,
               progress: bool = True, device: str | torch.device | None = None,
               acts: dict[str, Tensor] | None = None, acts_dir: str | Path | None = None,
               chunk_size: int = 64, stream_probe: list | None = None) -> Pair:
    """Train the ``resid`` and ``mlp`` dictionaries of ``layer`` on token contexts ``data``.

    ``out`` (a pair folder) receives the result; ``ckpt_dir`` makes the run resumable.
    ``acts`` skips the harvest (``{hook: [n, n_ctx, d]}`` as :func:`harvest` returns);
    ``acts_dir`` harvests into (or reads) a chunked cache there and streams it in bounded
    memory (``chunk_size`` sequences per shard). Under ``torchrun`` every rank calls this: each
    trains on its share of every global batch, gradients are summed, and rank 0 writes.
    ``stream_probe`` (a list) receives the row stream, for tests that bound its memory.
    """
    from . import distributed as D
    from .models import model_name

    cfg = config or TrainConfig()
    check_config(cfg)
    sites = pair_sites(model, layer)
    dev = torch.device(device) if device else next(model.parameters()).device
    if acts_dir is not None:
        if data is not None:
            n_seq = _check_data(data, cfg)
            harvest(model, data[:n_seq], [s.hook for s in sites], cache_dir=acts_dir,
                    chunk_size=chunk_size, progress=progress, load=False)
        source: CacheRows | MemoryRows = CacheRows(acts_dir, {s.name: s.hook for s in sites},
                                                   n_rows=cfg.tokens)
    else:
        if acts is None:
            if data is None:
                raise UserError("train_pair needs data, acts or acts_dir")
            n_seq = _check_data(data, cfg)
            acts = harvest(model, data[:n_seq], [s.hook for s in sites], progress=progress)
        source = MemoryRows({s.name: acts[s.hook][:, 1:].reshape(-1, s.width)[: cfg.tokens]
                             for s in sites})
    return _train_source(model, layer, source, cfg, out=out, ckpt_dir=ckpt_dir, progress=progress,
                         dev=dev, stream_probe=stream_probe, name=model_name(model), D=D)


def _check_data(data: Tensor | None, cfg: TrainConfig) -> int:
    if data is None:
        raise UserError("train_pair needs token contexts (data) or a harvested acts_dir")
    n_seq = -(-cfg.tokens // (data.shape[1] - 1))
    if len(data) < n_seq:
        raise UserError(f"training needs {cfg.tokens:,} tokens but the data holds only "
                        f"{len(data) * (data.shape[1] - 1):,} (BOS excluded): lower --tokens or add data")
    return n_seq


def _train_source(model, layer: int, source, cfg: TrainConfig, *, out, ckpt_dir, progress, dev,
                  stream_probe, name: str, D) -> Pair:
    """The training loop of :func:`train_pair` over a row source (memory or shards)."""
    sites = pair_sites(model, layer)
    world, rank = D.world(), D.rank()
    red = Reducer() if world > 1 else None
    n = sum(source.shard_rows)
    d_sae = int(round(cfg.width * sites[0].width))
    stats = _site_stats(source, red)
    dicts: dict[str, Dictionary] = {}
    scales: dict[str, float] = {}
    for i, s in enumerate(sites):
        scales[s.name] = stats[s.name][0]
        dc = DictConfig(d_in=s.width, d_sae=d_sae, architecture=cfg.architecture, k=cfg.k,
                        hook_name=s.hook, model_name=name, layer=layer, site=s.name,
                        l1_coefficient=cfg.l1_coefficient if cfg.architecture == "relu" else 0.0)
        d = Dictionary(dc, seed=cfg.seed + i).to(dev)
        with torch.no_grad():  # start the decoder bias at the data mean (scaled)
            d.b_dec.copy_(stats[s.name][1].to(dev) * scales[s.name])
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
        if not _same_config(st.get("config"), cfg) or st.get("n_rows") != n:
            raise UserError(f"checkpoint {ckpt} belongs to another training config; delete it or "
                            "use another --out")
        for k in dicts:
            dicts[k].load_state_dict(st["dicts"][k])
            opts[k].load_state_dict(st["opts"][k])
            last_fired[k] = st["last_fired"][k]
        step = st["step"]
        post = {k: tuple(v) for k, v in st.get("post", {}).items()}
    D.barrier()  # every rank has read the checkpoint before rank 0 may overwrite it

    if cfg.jacobian > 0:  # joint training: the MLP's weights on the training device
        from .jacobian import training_penalty
        from .sites import mlp_parts

        parts = MLPParts(*(t.to(dev) if isinstance(t, Tensor) else t for t in mlp_parts(model, layer)))
        ratio = scales["mlp"] / scales["resid"]  # J in the scaled units both dictionaries train in
        n_jac = min(cfg.jacobian_tokens, cfg.batch_size)
    jac_last = None
    dead_steps = max(1, cfg.dead_tokens // cfg.batch_size)
    stream = RowStream(source, cfg.batch_size, cfg.seed, cfg.shuffle_rows, rank, world)
    if stream_probe is not None:
        stream_probe.append(stream)
    live: dict[str, tuple[Tensor, Tensor]] = {}  # last step's (fvu, l0) as tensors: no host sync

    def metrics() -> dict[str, tuple[float, float]]:
        # a collective on every rank at the same steps; floats only when shown or saved
        add = (lambda t: t) if red is None else red.sum
        return {k: (float(add(fvu_t)), float(add(l0_t))) for k, (fvu_t, l0_t) in live.items()}

    bar = tqdm(total=total, initial=step, desc=f"train pair L{layer}",
               disable=not progress or rank != 0)
    for batch in stream.batches(step, total):
        l1_scale = min(1.0, (step + 1) / max(1, cfg.l1_warmup_frac * total))
        held = {k: {} for k in dicts} if cfg.jacobian > 0 else None
        pending = []
        for k, d in dicts.items():
            x = batch[k].to(dev, non_blocking=True) * scales[k]
            dead = (step - last_fired[k]) > dead_steps
            for g in opts[k].param_groups:
                g["lr"] = _lr(step, total, cfg, base_lr)
            loss, fvu, l0, fired = _loss(d, x, cfg, dead, l1_scale,
                                         keep=None if held is None else held[k], red=red,
                                         n_global=cfg.batch_size)
            if held is not None:
                pending.append(loss)
            else:
                opts[k].zero_grad(set_to_none=True)
                loss.backward()
                if red is not None:
                    red.grads(d.parameters())
                d.remove_gradient_parallel_to_decoder_directions()
                opts[k].step()
                d.set_decoder_norm_to_unit_norm()
            if red is not None:
                fired = red.max(fired.to(torch.int32)) > 0
            last_fired[k] = torch.where(fired, step + 1, last_fired[k])
            live[k] = (fvu, l0)
        if held is not None:  # one backward through both reconstructions and the penalty
            pen = training_penalty(parts, batch["resid"][:n_jac].to(dev), dicts["resid"],
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
        show = step % 10 == 0 or step == total
        save = ckpt is not None and (step % cfg.ckpt_every == 0 or step == total)
        if show or save:
            post = metrics()
        if show:
            bar.set_postfix_str(" ".join(f"{k}: L0 {l0:.0f} VE {1 - f:.3f}" for k, (f, l0) in post.items())
                                + ("" if jac_last is None else f" |J|₁ {jac_last:.2f}"))
        if save and rank == 0:
            atomic_save_state({"config": asdict(cfg), "n_rows": n, "step": step,
                               "dicts": {k: d.state_dict() for k, d in dicts.items()},
                               "opts": {k: o.state_dict() for k, o in opts.items()},
                               "last_fired": last_fired, "post": post}, ckpt)
    bar.close()
    if live:
        post = metrics()
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
    if out is not None and rank == 0:
        save_pair(pair.resid, pair.mlp, out,
                  extra_files={"train_config.json": json.dumps(asdict(cfg), indent=1)})
    D.barrier()  # the pair is on disk before any rank goes on to read it
    return pair
