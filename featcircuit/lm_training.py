"""Trains the built-in model: a byte-level BPE tokenizer and a small GPT-NeoX on the stdlib.

1. tokenizer: byte-level BPE (HuggingFace ``tokenizers``) on the train split, ``<|endoftext|>``
   as BOS/EOS/pad;
2. data: every train file tokenized, joined with ``<|endoftext|>``, packed into contexts that
   start with BOS (:func:`featcircuit.data.pack`);
3. model: GPT-NeoX (parallel attention + MLP, rotary), AdamW with linear warm-up and cosine decay,
   batches drawn from a seeded permutation so that a resumed run sees the same batches;
4. checkpoints every ``ckpt_every`` steps (model, optimizer, step) written atomically as
   safetensors with a JSON structure (never pickle), so a killed run resumes where it stopped;
5. the result saved in HuggingFace format with ``provenance.json`` (seed, steps, tokens, Python
   version, corpus hash) and held-out metrics next to unigram/bigram baselines, written into a
   fresh folder that replaces ``out_dir`` only when complete (:func:`featcircuit.checks.staged_output`:
   a folder holding files featcircuit did not write is refused unless ``force``, never deleted).
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import corpus
from .checks import check_out_dir, staged_output
from .data import pack
from .errors import UserError
from .io import atomic_save_state, atomic_write_text, load_state

EOT = "<|endoftext|>"
MODEL_FILES = frozenset({"config.json", "generation_config.json", "model.safetensors",
                         "provenance.json", "tokenizer.json", "tokenizer_config.json",
                         "special_tokens_map.json"})
"""What a model folder written by :func:`train_lm` holds (an older one without a marker)."""


@dataclass
class LMConfig:
    """How the built-in model is made; every field is recorded in ``provenance.json``."""

    vocab_size: int = 4096
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_mlp: int = 512
    n_ctx: int = 128
    rotary_pct: float = 0.25
    batch_size: int = 32
    steps: int = 3000
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.1
    seed: int = 0
    ckpt_every: int = 100


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``texts``, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT,
                                   unk_token=EOT, pad_token=EOT, model_max_length=1 << 20)


def encode_docs(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens."""
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def build_model(cfg: LMConfig, bos_id: int):
    """A freshly initialised GPT-NeoX of the configured size."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    hf_cfg = GPTNeoXConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, intermediate_size=cfg.d_mlp,
        # rotary_pct is the spelling every transformers >= 4.40 accepts (5.x maps it onto
        # rope_parameters); 5.x's typed signature no longer lists it
        max_position_embeddings=4 * cfg.n_ctx, rotary_pct=cfg.rotary_pct,  # type: ignore[call-arg]
        use_parallel_residual=True, hidden_act="gelu", bos_token_id=bos_id, eos_token_id=bos_id,
        pad_token_id=bos_id, tie_word_embeddings=False, attention_dropout=0.0, hidden_dropout=0.0)
    return GPTNeoXForCausalLM(hf_cfg)


def _lr_at(step: int, cfg: LMConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


@torch.no_grad()
def lm_metrics(model, contexts: torch.Tensor, batch_size: int = 64) -> dict[str, float]:
    """Mean next-token cross-entropy (nats) and top-1 accuracy over ``contexts``."""
    tot_loss, tot_correct, n = 0.0, 0, 0
    for i in range(0, len(contexts), batch_size):
        b = contexts[i:i + batch_size]
        logits = model(b).logits[:, :-1]
        tgt = b[:, 1:]
        tot_loss += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="sum").item()
        tot_correct += (logits.argmax(-1) == tgt).sum().item()
        n += tgt.numel()
    return {"ce": tot_loss / n, "top1": tot_correct / n, "n_tokens": n}


def ngram_baselines(train: torch.Tensor, test: torch.Tensor, vocab: int) -> dict[str, dict]:
    """Unigram and add-one-free interpolated bigram baselines fitted on ``train`` contexts.

    Both predict the same targets as :func:`lm_metrics` (positions 1.. of each context). The
    bigram is interpolated with the unigram (weight chosen on the test split's best of a small
    grid is *not* done: a fixed 0.9/0.1 mix, so the baseline is honest, not tuned on test).
    """
    def pairs(ctx):
        return ctx[:, :-1].reshape(-1), ctx[:, 1:].reshape(-1)

    prev, nxt = pairs(train)
    uni = torch.bincount(nxt, minlength=vocab).double() + 0.5
    uni = uni / uni.sum()
    big = torch.zeros(vocab * vocab, dtype=torch.float64)
    big.index_add_(0, prev * vocab + nxt, torch.ones_like(nxt, dtype=torch.float64))
    big = big.view(vocab, vocab)
    row = big.sum(1, keepdim=True)
    p_big = torch.where(row > 0, big / row.clamp_min(1), uni)
    p_big = 0.9 * p_big + 0.1 * uni
    tp, tn = pairs(test)
    return {
        "unigram": {"ce": float(-uni[tn].log().mean()), "top1": float((uni.argmax() == tn).double().mean())},
        "bigram": {"ce": float(-p_big[tp, tn].log().mean()),
                   "top1": float((p_big.argmax(1)[tp] == tn).double().mean())},
    }


def train_lm(out_dir: str | Path, cfg: LMConfig | None = None, ckpt_dir: str | Path | None = None,
             progress: bool = True, force: bool = False) -> dict:
    """Train the built-in model into ``out_dir`` (HF format), resuming from ``ckpt_dir`` if present.

    Returns the provenance dict that is also written to ``out_dir/provenance.json``.
    """
    cfg = cfg or LMConfig()
    out_dir = check_out_dir(out_dir, force, known=MODEL_FILES)  # before any work
    ckpt_dir = Path(ckpt_dir) if ckpt_dir else out_dir.parent / f".{out_dir.name}.ckpt"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    torch.manual_seed(cfg.seed)

    files = corpus.stdlib_files()
    chash = corpus.corpus_hash(files)
    tok_path = ckpt_dir / "tokenizer"
    from transformers import PreTrainedTokenizerFast
    if (tok_path / "tokenizer.json").exists():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_path)
    else:
        tokenizer = train_tokenizer(corpus.read_texts(files, "train"), cfg.vocab_size)
        tmp = ckpt_dir / "tokenizer.tmp"
        tokenizer.save_pretrained(tmp)
        tmp.rename(tok_path)
    bos = tokenizer.bos_token_id
    train = pack(encode_docs(tokenizer, corpus.read_texts(files, "train")), cfg.n_ctx, bos)
    heldout = pack(encode_docs(tokenizer, corpus.read_texts(files, "heldout")), cfg.n_ctx, bos)

    model = build_model(cfg, bos)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95),
                            weight_decay=cfg.weight_decay)
    step, elapsed = 0, 0.0
    ckpt = ckpt_dir / "state.safetensors"  # never pickle: an old or planted state.pt is not read
    if ckpt.exists():
        try:
            state = load_state(ckpt)
        except ValueError as e:
            raise UserError(f"{e}: delete it to start over") from None
        if state.get("cfg") != asdict(cfg) or state.get("corpus_hash") != chash:
            raise UserError(f"checkpoint {ckpt} was made with another config or corpus; "
                            "delete it to start over")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, elapsed = state["step"], state.get("elapsed", 0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    per_epoch = len(train) // cfg.batch_size
    # The batch order is a pure function of (seed, epoch), so a resumed run sees the same data.
    def batch_at(s: int) -> torch.Tensor:
        epoch, i = divmod(s, per_epoch)
        perm = torch.randperm(len(train), generator=gen.manual_seed(cfg.seed * 1000 + epoch))
        return train[perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]]

    model.train()
    t_run = time.time()
    bar = tqdm(total=cfg.steps, initial=step, desc="train LM", disable=not progress)
    ema = None
    while step < cfg.steps:
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        b = batch_at(step)
        loss = model(b, labels=b).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.3f}")
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            atomic_save_state({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                               "cfg": asdict(cfg), "corpus_hash": chash,
                               "elapsed": elapsed + time.time() - t_run}, ckpt)
    bar.close()
    elapsed += time.time() - t_run
    model.eval()

    metrics = lm_metrics(model, heldout)
    baselines = ngram_baselines(train, heldout, cfg.vocab_size)
    prov = {
        "config": asdict(cfg), "steps": step, "train_tokens_seen": step * cfg.batch_size * cfg.n_ctx,
        "train_tokens": int(train.numel()), "heldout_tokens": int(heldout.numel()),
        "n_files": len(files), "heldout_files": [f.rel for f in files if f.split == "heldout"],
        "python": platform.python_version(), "corpus_hash": chash, "torch": torch.__version__,
        "train_seconds": round(elapsed, 1), "total_seconds_last_run": round(time.time() - t0, 1),
        "heldout": metrics, "baselines": baselines,
        "n_params": sum(p.numel() for p in model.parameters()),
    }
    with staged_output(out_dir, force, known=MODEL_FILES) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_text(tmp / "provenance.json", json.dumps(prov, indent=1))
    return prov
