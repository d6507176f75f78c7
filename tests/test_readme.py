"""The README's Python API block runs as written against the current package (smaller budgets)."""

import re
from pathlib import Path

import featcircuit
from helpers import random_pair

README = Path(__file__).resolve().parents[1] / "README.md"


def _api_block() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_python_api_block_runs(builtin, monkeypatch, tmp_path):
    """Every call of the block exists with the arguments it is shown with; budgets are cut and the
    cached default pair is replaced by a random one of the same sites so the test needs no training."""
    code = _api_block()
    for old, new in (("n_tokens=16384", "n_tokens=512"), ("[:128]", "[:6]"), ("tokens[:16]", "tokens[:2]")):
        assert old in code, f"the README's API block no longer has {old!r}: update this test's budgets"
        code = code.replace(old, new)
    monkeypatch.setattr(featcircuit, "default_pair", lambda model, layer, **kw: (random_pair(model, layer),
                                                                                  tmp_path / "pair"))
    monkeypatch.setattr(featcircuit, "load_model", lambda name, *a, **kw: builtin)
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(code, str(README), "exec"), ns)  # noqa: S102 -- the README's own code
    assert ns["table"].behav_weight is not None and len(ns["table"]) > 0
    assert set(ns["eff"]) >= {"resid", "mlp", "resid_err", "mlp_err"}
    assert ns["res"].kept is not None and (tmp_path / "graph.json").is_file()
