"""Shared timing helper for the benchmarks: best of n runs after one warm-up."""

from __future__ import annotations

import time
from collections.abc import Callable


def best_time(fn: Callable[[], object], repeats: int = 3, warmup: bool = True) -> float:
    """Fastest wall time of ``repeats`` calls of ``fn`` (seconds)."""
    if warmup:
        fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best
