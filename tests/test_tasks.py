"""Built-in tasks: well-formed pairs from the held-out split, performed by the built-in model."""

import json

import pytest
import torch

from featcircuit.errors import UserError
from featcircuit.tasks import (
    BUILTIN_TASKS,
    MIN_PAIRS,
    TaskPrompts,
    builtin_task,
    load_prompts,
    task_performance,
)


@pytest.fixture(scope="module")
def tasks(builtin):
    return {name: builtin_task(name, builtin) for name in BUILTIN_TASKS}


def test_pairs_are_well_formed(builtin, tasks):
    tok = builtin.tokenizer
    for name, t in tasks.items():
        assert len(t) >= MIN_PAIRS, name
        assert t.clean.shape == t.corrupt.shape and t.clean.shape[1] == BUILTIN_TASKS[name][1]
        assert (t.clean[:, 0] == tok.bos_token_id).all()
        diff = (t.clean != t.corrupt).sum(1)
        assert (diff >= 1).all(), name
        if name != "self-attr":  # a renamed attribute may occur several times
            assert (diff == 1).all(), name
        assert (t.answer != t.wrong).all()
        assert 0 < int(t.split.sum()) < len(t)  # search and held-out halves, from different files
        for k in range(0, len(t), 17):  # the corrupt prompt is what its text tokenizes to
            ids = tok(tok.decode(t.corrupt[k, 1:].tolist()), add_special_tokens=False)["input_ids"]
            assert ids == t.corrupt[k, 1:].tolist()


def test_generation_is_deterministic(builtin, tasks):
    again = builtin_task("bracket", builtin)
    t = tasks["bracket"]
    assert torch.equal(again.clean, t.clean) and torch.equal(again.corrupt, t.corrupt)
    assert torch.equal(again.answer, t.answer) and torch.equal(again.split, t.split)


def test_the_model_performs_every_builtin_task(builtin, tasks):
    for name, t in tasks.items():
        p = task_performance(builtin, t)
        assert p["performs"], p
        assert p["logit_diff_clean"] > p["logit_diff_corrupt"] + 1, p


def test_metric_is_the_logit_difference_at_the_last_position(builtin, tasks):
    t = tasks["quote"].subset(torch.arange(5))
    logits = builtin(t.clean)
    want = torch.stack([logits[k, -1, t.answer[k]] - logits[k, -1, t.wrong[k]] for k in range(5)])
    torch.testing.assert_close(t.logit_diff(logits), want)
    assert float(t.metric(logits)) == pytest.approx(float(want.mean()), abs=1e-6)


def test_jsonl_round_trip(builtin, tasks, tmp_path):
    t = tasks["docstring"].subset(torch.arange(4))
    p = tmp_path / "p.jsonl"
    p.write_text(t.to_jsonl(builtin.tokenizer))
    back = load_prompts(str(p), builtin)
    assert torch.equal(back.clean, t.clean) and torch.equal(back.corrupt, t.corrupt)
    assert torch.equal(back.answer, t.answer) and torch.equal(back.wrong, t.wrong)


@pytest.mark.parametrize("line, match", [
    ("not json", "is not a JSON object"),
    (json.dumps({"clean": "a", "corrupt": "a"}), "is not a JSON object"),
    (json.dumps({"clean": "x = (1", "corrupt": "x = [1, 2, 3", "answer": ")", "wrong": "]"}), "same length"),
    (json.dumps({"clean": "x", "corrupt": "y", "answer": 3, "wrong": "]"}), "must be strings"),
])
def test_bad_prompt_files(builtin, tmp_path, line, match):
    p = tmp_path / "bad.jsonl"
    p.write_text(line + "\n")
    with pytest.raises(UserError, match=match):
        load_prompts(str(p), builtin)


def test_halves_need_two_pairs():
    one = TaskPrompts("t", torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long),
                      torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.long))
    with pytest.raises(UserError, match="all in one split"):
        one.halves()
