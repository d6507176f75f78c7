"""Config dataclasses as command lines: flags, choices, checks and help come from the fields."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Literal

import pytest

from featcircuit import checks as C
from featcircuit.cli import _Parser, build_parser
from featcircuit.configs import add_arguments, add_command, field_docs, from_args, option


@dataclass(kw_only=True)
class Base:
    """Options shared by commands."""

    device: str = option("auto", check=C.device)
    """where to run"""


@dataclass(kw_only=True)
class Demo(Base):
    """A demo command.

    It has a longer description.
    """

    path: str = option(positional=True)
    """the input file"""
    out: str = option("x.svg", short="-o")
    """output file"""
    mode: Literal["fast", "exact"] = "exact"
    """how to compute"""
    ids: list[int] = option(check=C.nonneg_int, limits=(100,))
    """one or more ids"""
    limit: int | None = option(None, check=C.positive_int, limits=(10,))
    ratio: float = 0.5
    verbose: bool = False
    """say more"""
    cache: bool = True
    """keep a cache"""
    hidden: int = option(7, cli=False)


def _parser() -> tuple[argparse.ArgumentParser, list]:
    parser = _Parser(prog="demo")
    ran: list = []
    add_command(parser.add_subparsers(dest="command", required=True), "demo", Demo, ran.append)
    return parser, ran


def test_fields_become_flags_and_the_command_gets_the_dataclass():
    parser, ran = _parser()
    args = parser.parse_args(["demo", "in.json", "-o", "o.png", "--mode", "fast", "--ids", "3", "4",
                              "--limit", "9", "--ratio", "0.25", "--verbose", "--no-cache",
                              "--device", "cpu"])
    args.func(args)
    assert ran == [Demo(path="in.json", out="o.png", mode="fast", ids=[3, 4], limit=9, ratio=0.25,
                        verbose=True, cache=False, device="cpu")]
    # defaults are the dataclass's; a field off the command line keeps its default
    args = parser.parse_args(["demo", "p", "--ids", "0"])
    cfg = from_args(Demo, args)
    assert cfg == Demo(path="p", ids=[0])
    assert cfg.hidden == 7 and not hasattr(args, "hidden")


@pytest.mark.parametrize("argv, fragment", [
    (["demo", "p", "--ids", "1", "--mode", "slow"], "invalid choice: 'slow'"),
    (["demo", "p", "--ids", "101"], "--ids 101 is out of range: expected an integer 0..100"),
    (["demo", "p", "--ids", "1", "--limit", "0"], "--limit 0 is out of range"),
    (["demo", "p", "--ids", "1", "--device", "tpu"], "--device 'tpu' is not a device"),
    (["demo", "p"], "the following arguments are required: --ids"),
    (["demo", "--ids", "1"], "the following arguments are required: path"),
    (["demo", "p", "--ids", "1", "--hidden", "3"], "unrecognized arguments: --hidden"),
])
def test_bad_values_are_one_line_errors_with_exit_code_2(argv, fragment, capsys):
    parser, ran = _parser()
    with pytest.raises(SystemExit) as e:
        parser.parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1 and ran == []


def test_help_is_the_docstrings_and_defaults():
    parser, _ = _parser()
    sub = parser._subparsers._group_actions[0]  # type: ignore[union-attr]
    assert sub.choices["demo"].description.startswith("A demo command.")
    assert [a.help for a in sub._choices_actions] == ["a demo command"]
    text = " ".join(sub.choices["demo"].format_help().split())
    for piece in ("the input file", "output file (default: x.svg)", "how to compute (default: exact)",
                  "{fast,exact}", "one or more ids", "say more", "--no-cache", "keep a cache",
                  "where to run (default: auto)", "-o OUT, --out OUT"):
        assert piece in text, piece
    assert "--hidden" not in text


def test_field_docs_reads_the_string_below_each_field_of_every_base():
    assert field_docs(Demo)["device"] == "where to run"
    assert field_docs(Demo)["ids"] == "one or more ids"
    assert "ratio" not in field_docs(Demo)


def test_every_cli_config_field_is_a_documented_flag():
    """The CLI's own configs: each field is a flag of its command whose help is the field's docstring."""
    from featcircuit import cli

    parser = build_parser()
    subs = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    from featcircuit.discover import DiscoverConfig

    commands = {"harvest": cli.HarvestConfig, "evaluate": cli.EvaluateConfig, "tasks": cli.TasksConfig,
                "render": cli.RenderConfig, "features": cli.FeaturesConfig, "discover": DiscoverConfig,
                "train": cli.TrainPairConfig}
    model = subs["model"]._subparsers._group_actions[0].choices
    commands |= {"info": cli.ModelInfoConfig, "model train": cli.ModelTrainConfig}
    for name, cls in commands.items():
        p = model[name.removeprefix("model ")] if name in ("info", "model train") else subs[name]
        actions = {a.dest: a for a in p._actions}
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            if not f.metadata.get("featcircuit.cli", {}).get("cli", True):  # kept off the command line
                assert f.name not in actions, (name, f.name)
                continue
            assert f.name in actions, (name, f.name)
            doc = f.metadata.get("featcircuit.cli", {}).get("help") or docs.get(f.name)
            assert doc, f"{name}: field {f.name} has no docstring"
            assert actions[f.name].help.startswith(doc.replace("%", "%%")), (name, f.name)


def test_a_library_config_can_be_mixed_in_with_exclusions():
    """How `train` and `discover` adopt it: shared options plus a library dataclass, some fields left out."""
    from featcircuit.training import TrainConfig

    parser = _Parser(prog="t")
    add_arguments(parser, Base)
    add_arguments(parser, TrainConfig, exclude={"lr"})
    args = parser.parse_args(["--width", "4", "--k", "8", "--device", "cpu"])
    cfg = from_args(TrainConfig, args)
    assert (cfg.width, cfg.k, cfg.lr) == (4.0, 8, None) and from_args(Base, args).device == "cpu"
    assert "--lr" not in parser.format_help()
    assert "active features per token" in " ".join(parser.format_help().split())
