"""What a ``discover`` run works on: its behaviour (task halves or corpus slices), the τ sweep
it was asked for, and how its printed summaries show numbers."""

from __future__ import annotations

from .errors import UserError


def behaviour(cfg, model):
    """(task or None, search behaviour, held-out behaviour, performance row)."""
    from .data import load_tokens
    from .tasks import builtin_task, load_prompts, task_performance

    if cfg.task or cfg.prompts:
        task = builtin_task(cfg.task, model) if cfg.task else load_prompts(cfg.prompts, model)
        perf = task_performance(model, task)
        s, h = task.halves()
        return task, s, h, perf
    n_ctx = 128
    n_seq = max(2, -(-cfg.search_tokens // n_ctx))
    toks = load_tokens(cfg.data, model, n_ctx=n_ctx, n_tokens=2 * n_seq * n_ctx, split=cfg.split)
    if len(toks) < 2:
        raise UserError(f"data {cfg.data!r} ({cfg.split}) holds too little text for a search and a "
                        "held-out slice")
    half = len(toks) // 2
    return None, toks[:half], toks[half:], None


def parse_sweep(s: str | None) -> tuple[float, ...]:
    """The relative τ values of ``--tau-sweep`` (comma-separated), checked."""
    if not s:
        return ()
    try:
        vals = tuple(float(v) for v in s.split(","))
    except ValueError:
        raise UserError(f"bad --tau-sweep {s!r}: expected comma-separated numbers, "
                        "e.g. 0.001,0.01,0.05") from None
    if not all(0 <= v < 1e6 for v in vals):  # also rejects nan
        raise UserError(f"bad --tau-sweep {s!r}: every value must be a finite number >= 0")
    return vals


def fmt(v, spec: str = ".3f") -> str:
    """A number for the printed summaries; ``n/a`` for None."""
    return "n/a" if v is None else format(v, spec)
