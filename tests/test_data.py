"""Packing, splits and bad data inputs."""

import json

import pytest
import torch

from featcircuit import UserError, load_tokens
from featcircuit.data import iter_texts, pack


def test_pack_layout():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    out = pack(docs, n_ctx=4, bos=0)
    # stream: 1 2 3 0 4 5 0 6 7 8 9 0 → bodies of 3
    assert out.tolist() == [[0, 1, 2, 3], [0, 0, 4, 5], [0, 0, 6, 7], [0, 8, 9, 0]]
    assert pack(docs, n_ctx=4, bos=0, n_tokens=8).tolist() == out[:2].tolist()
    assert pack([[1]], n_ctx=4, bos=0).shape == (0, 4)


def test_load_tokens_txt_folder_splits(neox, tmp_path):
    for i in range(60):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"def f{i}(x):\n    return x * {i}\n" * 5)
    train = list(iter_texts(str(tmp_path), "train"))
    held = list(iter_texts(str(tmp_path), "heldout"))
    every = list(iter_texts(str(tmp_path), "all"))
    assert len(train) + len(held) == len(every) == 60 and held and train
    assert not set(train) & set(held)
    toks = load_tokens(str(tmp_path), neox, n_ctx=32, split="all")
    assert (toks[:, 0] == neox.tokenizer.bos_token_id).all()
    expected = neox.tokenizer(every[0], add_special_tokens=False)["input_ids"][:31]
    assert toks[0, 1:].tolist() == expected


def test_load_tokens_jsonl_and_budget(neox, tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"text": f"x = {i}\n" * 30}) for i in range(20)))
    toks = load_tokens(str(p), neox, n_ctx=16, n_tokens=64, split="all")
    assert toks.shape == (4, 16) and toks.dtype == torch.long


def test_builtin_stdlib_splits(builtin):
    held = load_tokens("builtin:stdlib", builtin, n_ctx=64, n_tokens=4096, split="heldout")
    train = load_tokens("builtin:stdlib", builtin, n_ctx=64, n_tokens=4096, split="train")
    assert held.shape == train.shape == (64, 64)
    assert not torch.equal(held, train)


def _write(name, text):
    def make(d):
        (d / name).write_text(text)
        return str(d / name)
    return make


@pytest.mark.parametrize("make, match", [
    (lambda d: str(d / "missing.txt"), "not found"),
    (lambda d: (d / "empty").mkdir() or str(d / "empty"), "holds no text files"),
    (_write("e.txt", ""), "too little text"),
    (_write("b.jsonl", '{"text": "a"}\nnot json\n'), r"b.jsonl:2 is not a JSON object"),
    (_write("c.jsonl", '{"body": "a"}\n'), "'text' field"),
])
def test_bad_data(neox, tmp_path, make, match):
    with pytest.raises(UserError, match=match):
        load_tokens(make(tmp_path), neox, n_ctx=16, split="all")


def test_bad_split_and_budget(neox, tmp_path):
    (tmp_path / "a.txt").write_text("hello world " * 100)
    with pytest.raises(UserError, match="unknown split 'dev'"):
        load_tokens(str(tmp_path), neox, split="dev")
    with pytest.raises(UserError, match="n_tokens=8 is less than one context"):
        load_tokens(str(tmp_path), neox, n_ctx=16, n_tokens=8)
