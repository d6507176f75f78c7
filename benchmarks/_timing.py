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


def training_step(dct, x, cfg, dead, opt) -> Callable[[], None]:
    """One whole training step of dictionary ``dct`` on rows ``x``, as the trainer takes it."""
    from featcircuit.training import _loss

    def step() -> None:
        loss, *_ = _loss(dct, x, cfg, dead, 1.0)
        opt.zero_grad()
        loss.backward()
        dct.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        dct.set_decoder_norm_to_unit_norm()

    return step
