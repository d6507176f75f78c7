"""Config dataclasses that are also their command's ``--help`` (as sparsify's configs are).

A command's options are one dataclass; :func:`add_command` turns it into a sub-command and hands
the command the dataclass back, filled from the command line.

1. *Flags*: each field is a flag of the same name (``eval_tokens`` → ``--eval-tokens``); its
   default is the field's default; its help is the field's docstring (the string literal right
   below the field) followed by the default. A field without a default is a required flag.
2. *Types*: the annotation chooses the parsing. ``bool`` is a switch (``--name``, or
   ``--no-name`` when the default is True); ``Literal["a", "b"]`` gives the choices; ``list[X]``
   takes one or more values; ``X | None`` parses X; ``int`` and ``float`` parse as such.
3. *Checks*: :func:`option` adds what a type cannot say: ``check(text, flag, *limits)``, one of
   :mod:`featcircuit.checks`' validators, parses the value, and its UserError becomes the
   parser's one-line message (exit code 2); also another flag name, a short alias, a positional
   argument, or a field kept off the command line.
4. :func:`add_arguments` and :func:`from_args` are the two halves, for a parser that mixes
   several dataclasses (shared model options plus a library config such as ``TrainConfig``).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from collections.abc import Callable, Collection
from functools import cache
from typing import Any, Literal, TypeVar, get_args, get_origin

from .checks import arg_type

T = TypeVar("T")
_KEY = "featcircuit.cli"


def option(default: Any = dataclasses.MISSING, *, check: Callable[..., Any] | None = None,
           limits: tuple[Any, ...] = (), flag: str | None = None, short: str | None = None,
           positional: bool = False, cli: bool = True, help: str | None = None,
           repeat: bool = False) -> Any:
    """A dataclass field with command-line details (see the module docstring, step 3).

    ``check(text, flag, *limits)`` parses a typed value (``checks.positive_int``, ``checks.device``…);
    ``flag`` replaces the flag name made from the field's; ``short`` adds an alias such as ``-o``;
    ``positional`` makes it a positional argument; ``cli=False`` keeps it off the command line;
    ``help`` replaces the field's docstring; ``repeat`` makes a ``list`` field a flag given once per
    value (``--dicts A --dicts B``) instead of one flag with several values.
    """
    meta = {_KEY: {"check": check, "limits": tuple(limits), "flag": flag, "short": short,
                   "positional": positional, "cli": cli, "help": help, "repeat": repeat}}
    return dataclasses.field(default=default, metadata=meta)


@cache
def _module_classes(filename: str) -> dict[str, ast.ClassDef]:
    """The top-level classes of a source file, parsed once (``inspect.getsource`` of a class
    parses its whole module each time: ~0.1 s a class, on every command's start)."""
    with open(filename, encoding="utf-8") as fh:
        tree = ast.parse(fh.read())
    return {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}


def _class_def(klass: type) -> ast.ClassDef | None:
    """The class statement of ``klass`` (None without source, e.g. built in a REPL)."""
    try:
        filename = inspect.getsourcefile(klass)
        if filename and klass.__qualname__ == klass.__name__:
            node = _module_classes(filename).get(klass.__name__)
            if node is not None:
                return node
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
    except (OSError, TypeError, SyntaxError):
        return None
    return tree.body[0] if tree.body and isinstance(tree.body[0], ast.ClassDef) else None


@cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` of a dataclass and its bases: the string literal below each field."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        node = _class_def(klass)
        body = node.body if node is not None else []
        for stmt, nxt in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[stmt.target.id] = " ".join(inspect.cleandoc(nxt.value.value).split())
    return docs


def _unwrap_optional(tp: Any) -> Any:
    """``X`` for ``X | None`` (or ``Optional[X]``), else ``tp``."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _flag(f: dataclasses.Field) -> str:
    meta = f.metadata.get(_KEY, {})
    return meta.get("flag") or "--" + f.name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, cls: type, *, exclude: Collection[str] = ()) -> None:
    """Add a flag (or positional argument) to ``parser`` for every field of dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata.get(_KEY, {})
        if f.name in exclude or not meta.get("cli", True):
            continue
        tp = _unwrap_optional(hints[f.name])
        flag = _flag(f)
        text = meta.get("help") or docs.get(f.name)
        kw: dict[str, Any] = {}
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required:
            default = None
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = f.default
        if tp is bool:
            if default is True:  # a switch that turns a default-on behaviour off
                flag = "--no-" + flag.removeprefix("--")
                kw.update(action="store_false")
            else:
                kw.update(action="store_true")
        else:
            lists = [tp] if get_origin(tp) is list else [a for a in get_args(tp) if get_origin(a) is list]
            if lists:  # list[X] (or list[X] | None): several values, or one per repeated flag
                if meta.get("repeat"):
                    kw["action"] = "append"
                else:
                    kw["nargs"] = "+"
                tp = get_args(lists[0])[0]
            if get_origin(tp) is Literal:
                kw["choices"] = get_args(tp)
            check = meta.get("check")
            if check is not None:
                kw["type"] = arg_type(check, flag, *meta.get("limits", ()))
            elif tp in (int, float):
                kw["type"] = tp
            if default is not None and not isinstance(default, list):
                text = f"{text} (default: {default})" if text else f"default: {default}"
        if text:
            kw["help"] = text.replace("%", "%%")  # argparse formats help with %
        if meta.get("positional"):
            parser.add_argument(f.name, **kw)
            continue
        if required:
            kw["required"] = True
        else:
            kw["default"] = default
        names = [meta["short"], flag] if meta.get("short") else [flag]
        parser.add_argument(*names, dest=f.name, **kw)


def from_args(cls: type[T], args: argparse.Namespace) -> T:
    """The dataclass ``cls`` from parsed arguments (fields off the command line keep their defaults)."""
    given = vars(args)
    return cls(**{f.name: given[f.name] for f in dataclasses.fields(cls)  # type: ignore[arg-type]
                  if f.init and f.name in given})


def add_command(subparsers: Any, name: str, cls: type[T], run: Callable[[T], object],
                **parser_kw: Any) -> argparse.ArgumentParser:
    """Sub-command ``name`` whose flags are ``cls``'s fields and which calls ``run(cls(...))``.

    Its description is ``cls``'s docstring; the first line, lower-case without the full stop,
    is its line in the parent command's list (as argparse writes its own lines).
    """
    doc = inspect.cleandoc(cls.__doc__ or "")
    first = doc.split("\n", 1)[0].rstrip(".")
    p = subparsers.add_parser(name, help=first[:1].lower() + first[1:], description=doc or None, **parser_kw)
    add_arguments(p, cls)
    p.set_defaults(func=lambda args: run(from_args(cls, args)))
    return p
