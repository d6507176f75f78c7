"""The built-in corpus: the Python standard library's own source, found through ``sysconfig``.

1. list ``*.py`` under the stdlib path in sorted order, skipping tests, site-packages and
   generated files (tables produced by scripts rather than written by people);
2. split into train and held-out *by file*, by a stable hash of the relative path, so the split
   does not depend on the machine's file order;
3. hash the corpus (paths and bytes), so a consumer can tell whether its stdlib is the one a
   figure was measured on.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

# Folders that are tests, vendored packages or generated code rather than hand-written source.
_SKIP_TOP = {"site-packages", "test", "idle_test", "lib2to3/tests", "pydoc_data", "encodings",
             "__phello__", "ensurepip", "turtledemo"}
_SKIP_PREFIX = ("_sysconfigdata", "config-")
HELDOUT_EVERY = 20  # about 5% of files are held out


@dataclass(frozen=True)
class CorpusFile:
    """One source file of the corpus: its path relative to the stdlib root and its split."""

    rel: str
    path: Path
    split: str  # "train" or "heldout"


def stdlib_root() -> Path:
    """The standard library folder of the running Python."""
    return Path(sysconfig.get_paths()["stdlib"])


def _split_of(rel: str) -> str:
    h = int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "little")
    return "heldout" if h % HELDOUT_EVERY == 0 else "train"


def _skipped(rel: str) -> bool:
    parts = rel.split("/")
    if parts[0] in _SKIP_TOP or parts[0].startswith(_SKIP_PREFIX):
        return True
    return any(p in ("test", "tests", "idle_test") or p.startswith("test_") for p in parts)


def stdlib_files(root: Path | None = None) -> list[CorpusFile]:
    """All corpus files, sorted by relative path, each with its split."""
    root = root or stdlib_root()
    found = []
    for d, dirs, names in os.walk(root):  # skipped folders are pruned, never walked (site-packages)
        rel_d = Path(d).relative_to(root).as_posix()
        dirs[:] = [x for x in dirs if not _skipped(x if rel_d == "." else f"{rel_d}/{x}")]
        found += [Path(d) / n for n in names if n.endswith(".py")]
    out = []
    for f in sorted(found):
        rel = f.relative_to(root).as_posix()
        if not _skipped(rel):
            out.append(CorpusFile(rel, f, _split_of(rel)))
    return out


def read_texts(files: list[CorpusFile], split: str | None = None) -> list[str]:
    """The texts of the files of one split (all when ``split`` is None), in corpus order."""
    return [f.path.read_text(encoding="utf-8", errors="replace")
            for f in files if split is None or f.split == split]


def corpus_hash(files: list[CorpusFile]) -> str:
    """SHA-256 over relative paths, splits and bytes: equal hashes mean the same corpus."""
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.rel}\0{f.split}\0".encode())
        h.update(f.path.read_bytes())
    return h.hexdigest()
