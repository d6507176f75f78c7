"""Bounded reads of files that come from outside the process (DESIGN §10).

1. :func:`read_text_file`: the path must be a regular file (not a folder, device or pipe) of at
   most ``max_bytes``, read with that cap whatever ``stat`` said, and valid UTF-8;
2. :func:`parse_json_text`: the nesting depth is counted on the raw text before ``json.loads``
   builds anything, integers are capped in digits and NaN/Infinity are rejected;
3. :func:`read_json_file`: both. Each failure is one :class:`~featcircuit.errors.UserError`
   naming the file and what is accepted.
"""

from __future__ import annotations

import json
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import UserError

_JSON_TOKEN_RE = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _bounded_int(max_digits: int) -> Callable[[str], int]:
    def parse(s: str) -> int:
        if len(s.lstrip("-")) > max_digits:
            raise ValueError(f"an integer of {len(s.lstrip('-'))} digits (at most {max_digits} accepted)")
        return int(s)
    return parse


def parse_json_text(text: str, what: str, max_depth: int = 64, max_digits: int = 30) -> Any:
    """``json.loads`` capping nesting depth and integer size, no NaN/Infinity; UserError naming ``what``."""
    depth = deepest = 0
    for m in _JSON_TOKEN_RE.finditer(text):
        c = m.group()
        if c in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > max_depth:
                    raise UserError(f"{what} is nested more than {max_depth} levels deep: "
                                    "not a featcircuit file")
        elif c in "]}":
            depth -= 1
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_int=_bounded_int(max_digits))
    except json.JSONDecodeError as e:
        raise UserError(f"{what} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except (ValueError, RecursionError) as e:
        raise UserError(f"{what} is not accepted: {str(e).splitlines()[0][:120]}") from None


def read_text_file(path: str | Path, what: str, max_bytes: int) -> str:
    """The UTF-8 text of a regular file of at most ``max_bytes``; UserError naming ``what`` otherwise."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise UserError(f"{what} {p} not found") from None
    except OSError as e:
        raise UserError(f"cannot read {what} {p}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise UserError(f"{what} {p} is a folder: expected a file")
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{what} {p} is not a regular file (a device or pipe)")
    if st.st_size > max_bytes:
        raise UserError(f"{what} {p} is {st.st_size:,} bytes: at most {max_bytes:,} accepted")
    try:
        with open(p, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except OSError as e:
        raise UserError(f"cannot read {what} {p}: {e.strerror}") from None
    if len(data) > max_bytes:
        raise UserError(f"{what} {p} is over {max_bytes:,} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {p} is not UTF-8 text (byte {e.start}): is it a binary file?") from None


def read_json_file(path: str | Path, what: str, max_bytes: int = 256 << 20, max_depth: int = 64,
                   max_digits: int = 30) -> Any:
    """A JSON file read with the bounds of :func:`read_text_file` and :func:`parse_json_text`."""
    return parse_json_text(read_text_file(path, what, max_bytes), f"{what} {path}",
                           max_depth, max_digits)
