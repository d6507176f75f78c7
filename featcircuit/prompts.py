"""Clean/corrupt prompt pairs and their logit-difference metric (``--prompts file.jsonl``).

Each line: ``{"clean": "...", "corrupt": "...", "answer": " x", "wrong": " y"}``. Clean and
corrupt prompts must tokenize to the same length (as in activation patching); the metric is the
mean over pairs of ``logit[answer] − logit[wrong]`` at the last position.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .errors import UserError


@dataclass
class Prompts:
    """Tokenized prompt pairs (BOS first) with their answer and wrong-answer token ids."""

    clean: Tensor
    corrupt: Tensor
    answer: Tensor
    wrong: Tensor

    def metric(self, logits: Tensor, tokens: Tensor) -> Tensor:
        """Mean logit difference (answer − wrong) at the last position."""
        n = len(tokens)
        last = logits[:, -1]
        ans, wr = self.answer[:n].to(last.device), self.wrong[:n].to(last.device)
        return (last.gather(1, ans[:, None]) - last.gather(1, wr[:, None])).mean()


def load_prompts(path: str, model) -> Prompts:
    """Read and tokenize a prompts file; a UserError names the bad line."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"prompts file {path!r} not found: expected a .jsonl with clean, corrupt, answer, wrong")
    tok = model.tokenizer
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    rows = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            c, k, a, w = d["clean"], d["corrupt"], d["answer"], d["wrong"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{path}:{n} is not a JSON object with clean, corrupt, answer, wrong") from None
        ids = [tok(s, add_special_tokens=False)["input_ids"] for s in (c, k, a, w)]
        if len(ids[0]) != len(ids[1]):
            raise UserError(f"{path}:{n}: clean and corrupt prompts tokenize to {len(ids[0])} and "
                            f"{len(ids[1])} tokens; they must be the same length")
        if len(ids[2]) != 1 or len(ids[3]) != 1:
            raise UserError(f"{path}:{n}: answer and wrong must each be a single token")
        rows.append(([bos] + ids[0], [bos] + ids[1], ids[2][0], ids[3][0]))
    if not rows:
        raise UserError(f"prompts file {path!r} holds no prompts: expected one JSON object per line")
    lengths = {len(r[0]) for r in rows}
    if len(lengths) != 1:
        raise UserError(f"prompts in {path!r} have different token lengths {sorted(lengths)}; use one length per file")
    t = lambda k: torch.tensor([r[k] for r in rows], dtype=torch.long)  # noqa: E731
    return Prompts(t(0), t(1), t(2), t(3))
