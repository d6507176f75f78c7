"""Text → packed token contexts.

Every context is ``[BOS] + n_ctx-1 tokens`` of one stream in which documents are joined by
BOS (which is also EOS for the models we use), as SAELens and sparsify pack their data.
Sources: ``builtin:stdlib`` (the stdlib corpus, split by file), a ``.txt`` file or a folder of
text files, a ``.jsonl`` file with a ``text`` field, or a HuggingFace dataset name.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from .errors import UserError

BUILTIN_DATA = "builtin:stdlib"
SPLITS = ("train", "heldout", "all")
_TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".text"}
_ACCEPTED = (f"{BUILTIN_DATA}, a .txt file or folder of text files, a .jsonl file with a "
             "'text' field, or a HuggingFace dataset name")


def pack(docs: Iterable[list[int]], n_ctx: int, bos: int, n_tokens: int | None = None) -> torch.Tensor:
    """Join ``docs`` with ``bos`` and cut into ``[n, n_ctx]`` contexts that each start with ``bos``.

    The tail that does not fill a context is dropped. With ``n_tokens``, stop after
    ``ceil(n_tokens / n_ctx)`` contexts (documents past that point are never read).
    """
    if n_ctx < 2:
        raise UserError(f"n_ctx={n_ctx} is too small: need at least 2 (BOS plus one token)")
    body = n_ctx - 1
    want = None if n_tokens is None else -(-n_tokens // n_ctx)
    stream: list[int] = []
    for d in docs:
        stream.extend(d)
        stream.append(bos)
        if want is not None and len(stream) >= want * body:
            break
    n = len(stream) // body if want is None else min(want, len(stream) // body)
    if n == 0:
        return torch.empty(0, n_ctx, dtype=torch.long)
    t = torch.tensor(stream[: n * body], dtype=torch.long).view(n, body)
    return torch.cat([torch.full((n, 1), bos, dtype=torch.long), t], dim=1)


def _split_of(key: str) -> str:
    # The same rule as the built-in corpus: a stable hash of the document's name.
    from .corpus import HELDOUT_EVERY

    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return "heldout" if h % HELDOUT_EVERY == 0 else "train"


def _keep(key: str, split: str) -> bool:
    return split == "all" or _split_of(key) == split


def iter_texts(source: str, split: str = "train") -> Iterator[str]:
    """The documents of ``source`` that belong to ``split``, in a deterministic order."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    if source == BUILTIN_DATA:
        from . import corpus

        files = corpus.stdlib_files()
        if not files:
            raise UserError(f"{BUILTIN_DATA}: no Python source found under {corpus.stdlib_root()}")
        for f in files:
            if split == "all" or f.split == split:
                yield f.path.read_text(encoding="utf-8", errors="replace")
        return
    p = Path(source).expanduser()
    if p.is_dir():
        paths = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in _TEXT_SUFFIXES)
        if not paths:
            raise UserError(f"data folder {source!r} holds no text files "
                            f"({', '.join(sorted(_TEXT_SUFFIXES))})")
        for path in paths:
            if _keep(path.relative_to(p).as_posix(), split):
                yield _read(path)
        return
    if p.is_file():
        if p.suffix == ".jsonl":
            yield from _iter_jsonl(p, split)
        else:
            if split == "heldout":
                raise UserError(f"data file {source!r} is one document and has no held-out "
                                "split: use --split all, or a folder or .jsonl of documents")
            yield _read(p)
        return
    if source.startswith(("builtin:", ".", "/", "~")) or source.endswith((".txt", ".jsonl")):
        raise UserError(f"data source {source!r} not found: expected {_ACCEPTED}")
    yield from _iter_hf_dataset(source, split)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise UserError(f"cannot read data file {str(path)!r}: {e.strerror}") from e


def _iter_jsonl(path: Path, split: str) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                text = row["text"]
            except (json.JSONDecodeError, TypeError, KeyError):
                raise UserError(f"{path}:{i} is not a JSON object with a 'text' field") from None
            if not isinstance(text, str):
                raise UserError(f"{path}:{i}: 'text' is {type(text).__name__}, expected a string")
            if _keep(f"{path.name}:{i}", split):
                yield text


def _iter_hf_dataset(name: str, split: str) -> Iterator[str]:
    from .models import _hub_reachable

    try:
        import datasets
    except ImportError:
        raise UserError(f"data source {name!r} looks like a HuggingFace dataset but the "
                        "'datasets' package is not installed (pip install datasets)") from None
    hf_split = {"train": "train", "heldout": "validation", "all": "train"}[split]
    if not _hub_reachable():
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        ds = datasets.load_dataset(name, split=hf_split, streaming=True)
        for row in ds:
            yield row["text"]
    except Exception as e:  # datasets raises many types for "not there"
        raise UserError(f"data source {name!r} is not available (not a local file, not a "
                        f"cached or reachable HuggingFace dataset with a 'text' column: "
                        f"{type(e).__name__}); expected {_ACCEPTED}") from None


def tokenizer_of(model_or_tokenizer):
    """The tokenizer of a TransformerBridge, or the argument itself if it is one."""
    tok = getattr(model_or_tokenizer, "tokenizer", None)
    return tok if tok is not None else model_or_tokenizer


def load_tokens(source: str, model, n_ctx: int = 128, n_tokens: int | None = None,
                split: str = "train") -> torch.Tensor:
    """Packed contexts ``[n, n_ctx]`` (BOS first) of ``source`` tokenized with ``model``'s tokenizer."""
    tok = tokenizer_of(model)
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if bos is None:
        raise UserError("the model's tokenizer has neither a BOS nor an EOS token to start contexts with")
    if n_tokens is not None and n_tokens < n_ctx:
        raise UserError(f"n_tokens={n_tokens} is less than one context of n_ctx={n_ctx}")
    docs = (tok(t, add_special_tokens=False)["input_ids"] for t in iter_texts(source, split))
    out = pack(docs, n_ctx, bos, n_tokens)
    if len(out) == 0:
        raise UserError(f"data source {source!r} (split {split}) holds too little text for one "
                        f"context of {n_ctx} tokens")
    return out
