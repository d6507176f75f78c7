"""Steering: push one dictionary feature at its site and read what the model does differently.

Two interventions on feature ``j`` of dictionary ``D`` at a site, at every position after BOS or
at chosen ones:

- **add**: ``a ← a + v·d_j`` with ``d_j = D.W_dec[j]`` the feature's decoder direction;
- **clamp**: ``a ← decode(c with c_j := v) + (a − decode(c))``, ``c = D.encode(a)``: the feature's
  code is set to ``v`` and the dictionary's error term is kept. ``decode`` is affine, so this is
  ``a + (v − c_j)·d_j`` exactly, which is how it is computed: clamping a feature to its own clean
  code (encoded from the same activations) changes nothing, bit for bit.

``v`` is absolute, or a multiple of the feature's *typical activation* (its mean code where it
fires, on held-out tokens: :func:`feature_activation`). :func:`steer` reports the change of a task's
metric (mean logit difference, :class:`~featcircuit.tasks.TaskPrompts`), of the next-token
distribution (KL(before ‖ after) and the tokens whose probability rose or fell most), and
greedy-generated text before and after. During generation the intervention stays on: ``all``
positions include the generated ones; chosen positions are indices into the prompt.

A feature is named like a graph node (``mlp2/123``, ``resid1/7``; DESIGN §7), and at the output
sites ``attn_out1/5``, ``mlp_out0/3``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .errors import UserError
from .sites import NAMED_SITES, Site

Mode = Literal["add", "clamp"]
MODES: tuple[str, ...] = ("add", "clamp")
_FEATURE_RE = re.compile(r"(resid|mlp|attn_out|mlp_out)(0|[1-9][0-9]{0,5})/(0|[1-9][0-9]{0,8})")
_FEATURE_HELP = "SITE{LAYER}/{FEATURE} such as mlp2/123, resid1/7, attn_out1/5 or mlp_out0/3"


@dataclass(frozen=True)
class FeatureRef:
    """A feature by site name, layer and index (``mlp2/123`` → ``("mlp", 2, 123)``)."""

    site: str
    layer: int
    feature: int

    def __str__(self) -> str:
        return f"{self.site}{self.layer}/{self.feature}"


def parse_feature(spec: str) -> FeatureRef:
    """Parse ``mlp2/123``-style feature ids (the graph's node ids, plus ``attn_out``/``mlp_out``)."""
    m = _FEATURE_RE.fullmatch(spec.strip()) if isinstance(spec, str) else None
    if m is None:
        if isinstance(spec, str) and spec.strip().endswith("/err"):
            raise UserError(f"feature {spec!r} is an error node, which has no decoder direction to "
                            f"steer: name a feature, {_FEATURE_HELP}")
        raise UserError(f"feature {spec!r} is not a feature id: expected {_FEATURE_HELP}")
    assert m.group(1) in NAMED_SITES
    return FeatureRef(m.group(1), int(m.group(2)), int(m.group(3)))


def parse_positions(spec: str | None) -> tuple[int, ...] | None:
    """``all`` (None: every position after BOS), ``last`` (-1) or indices ``3,5,-1``."""
    if spec is None or spec.strip().lower() == "all":
        return None
    text = spec.strip().lower()
    if text == "last":
        return (-1,)
    out = []
    for item in text.split(","):
        if not re.fullmatch(r"\s*-?\d{1,6}\s*", item):
            raise UserError(f"--positions {spec!r} is not a position list: use all, last or "
                            "indices such as 3,5,-1 (negative counts from the prompt's end)")
        out.append(int(item))
    return tuple(dict.fromkeys(out))


def resolve_positions(positions: Sequence[int] | None, length: int) -> list[int]:
    """Absolute positions in a prompt of ``length`` tokens (None: 1..length−1); UserError if outside."""
    if positions is None:
        return list(range(1, length))
    out = []
    for p in positions:
        q = p + length if p < 0 else p
        if not 0 <= q < length:
            raise UserError(f"position {p} is outside a prompt of {length} tokens: "
                            f"use -{length}..{length - 1}")
        out.append(q)
    return sorted(set(out))


@dataclass
class Steering:
    """One intervention: ``mode`` feature ``feature`` of ``dictionary`` at ``site`` with ``value``."""

    site: Site
    dictionary: Any  # any module with encode/decode and W_dec [d_sae, d_in]
    feature: int
    mode: Mode = "add"
    value: float = 1.0
    positions: Sequence[int] | None = None
    """absolute or negative indices; None = every position after BOS (generated ones included)"""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"steering mode {self.mode!r} is unknown: use {' or '.join(MODES)}")
        from .adapters import as_dictionary

        self.dictionary = as_dictionary(self.dictionary, self.site.width)  # any module with encode/decode
        d_sae = int(self.dictionary.W_dec.shape[0])
        if not isinstance(self.feature, int) or not 0 <= self.feature < d_sae:
            raise UserError(f"feature {self.feature} is out of range: the {self.site.name} dictionary of "
                            f"layer {self.site.layer} has features 0..{d_sae - 1}")
        if not isinstance(self.value, (int, float)) or not abs(float(self.value)) < float("inf"):
            raise UserError(f"steering value {self.value!r} is not a finite number")

    def direction(self) -> Tensor:
        """The feature's decoder direction ``W_dec[j]`` (unit norm for featcircuit dictionaries)."""
        return self.dictionary.W_dec[self.feature].detach()

    def delta(self, act: Tensor) -> Tensor:
        """The change ``[..., d]`` the intervention makes to activations ``act [..., d]``."""
        dirn = self.direction().to(device=act.device, dtype=act.dtype)
        if self.mode == "add":
            return torch.full(act.shape[:-1] + (1,), float(self.value), dtype=act.dtype,
                              device=act.device) * dirn
        code = self.dictionary.encode(act)[..., self.feature:self.feature + 1]
        return (float(self.value) - code) * dirn

    def hook(self):
        """A TransformerLens forward hook applying the intervention at the chosen positions."""
        def fn(act: Tensor, hook=None) -> Tensor:
            pos = resolve_positions(self.positions, act.shape[1])
            if not pos:
                return act
            out = act.clone()
            # the codes of every row, then the chosen positions: a matmul's last bits depend on its
            # shape on some CPUs, and a clamp to the code read from these activations must be a no-op
            out[:, pos] = act[:, pos] + self.delta(act)[:, pos]
            return out
        return fn

    def fwd_hooks(self) -> list[tuple[str, object]]:
        """``[(hook name, hook)]`` for ``model.run_with_hooks``."""
        if self.site.name == "resid" and self.site.hook.endswith(".hook_resid_mid"):
            return self._resid_mid_hooks()
        return [(self.site.hook, self.hook())]

    def _resid_mid_hooks(self) -> list[tuple[str, object]]:
        # In a TransformerBridge, a sequential block's hook_resid_mid is LN2's input: an edit there
        # reaches the MLP but not the residual skip, so the stream after the block would keep the
        # clean value. Steering the residual means editing what writes it: attention's output, with
        # resid_mid = resid_pre + attn_out read from the block's own input (exact, see the tests).
        layer = self.site.layer
        held: dict[str, Tensor] = {}

        def read(act: Tensor, hook=None) -> Tensor:
            held["pre"] = act
            return act

        def write(attn: Tensor, hook=None) -> Tensor:
            pos = resolve_positions(self.positions, attn.shape[1])
            if not pos:
                return attn
            mid = held.pop("pre") + attn
            out = attn.clone()
            out[:, pos] = attn[:, pos] + self.delta(mid)[:, pos]  # every row encoded: see hook()
            return out

        return [(f"blocks.{layer}.hook_resid_pre", read), (f"blocks.{layer}.hook_attn_out", write)]


@torch.no_grad()
def run_steered(model, tokens: Tensor, steering: Steering | None) -> Tensor:
    """Logits ``[n, ctx, vocab]`` of ``model`` on ``tokens`` with the intervention (None: clean)."""
    dev = next(model.parameters()).device
    if steering is None:
        return model(tokens.to(dev))
    return model.run_with_hooks(tokens.to(dev), fwd_hooks=steering.fwd_hooks())


@torch.no_grad()
def feature_activation(model, dictionary, site: Site, feature: int, tokens: Tensor, *,
                       batch_size: int = 16) -> dict:
    """The feature's firing frequency, mean code where it fires (its typical activation) and max."""
    from .activations import harvest

    acts = harvest(model, tokens, [site.hook], batch_size=batch_size, progress=False)[site.hook]
    rows = acts[:, 1:].reshape(-1, site.width).to(next(model.parameters()).device)
    codes = torch.cat([dictionary.encode(rows[i:i + 8192])[:, feature] for i in range(0, len(rows), 8192)])
    fired = codes > 0
    return {"freq": float(fired.float().mean()), "n_tokens": int(len(codes)),
            "mean_active": float(codes[fired].mean()) if bool(fired.any()) else 0.0,
            "max": float(codes.max()) if len(codes) else 0.0}


def encode_prompt(model, prompt: str) -> Tensor:
    """``[1, n]`` token ids of ``prompt`` with the BOS token first, as the corpus contexts have it."""
    from .data import tokenizer_of

    tok = tokenizer_of(model)
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise UserError("--prompt is empty after tokenization: give some text")
    return torch.tensor([[bos, *ids]], dtype=torch.long)


@torch.no_grad()
def generate(model, tokens: Tensor, steering: Steering | None, max_new_tokens: int = 20) -> Tensor:
    """Greedy continuation ``[1, n + max_new_tokens]`` of ``tokens [1, n]`` (full recompute per token).

    Negative ``positions`` are resolved against the prompt, so they stay on the prompt's tokens.
    """
    if steering is not None and steering.positions is not None:
        steering = Steering(steering.site, steering.dictionary, steering.feature, steering.mode,
                            steering.value, resolve_positions(steering.positions, tokens.shape[1]))
    out = tokens
    for _ in range(max_new_tokens):
        nxt = run_steered(model, out, steering)[:, -1].argmax(-1, keepdim=True).cpu()
        out = torch.cat([out, nxt], 1)
    return out


def _task_rows(model, task, steering: Steering | None, batch_size: int) -> tuple[Tensor, Tensor]:
    """(per-pair logit difference ``[n]``, last-position log-probs ``[n, vocab]``) of the clean prompts."""
    diffs, logps = [], []
    for s in range(0, len(task), batch_size):
        sub = task.subset(torch.arange(s, min(s + batch_size, len(task))))
        logits = run_steered(model, sub.clean, steering)
        diffs.append(sub.logit_diff(logits).double().cpu())
        logps.append(logits[:, -1].double().log_softmax(-1).cpu())
    return torch.cat(diffs), torch.cat(logps)


def next_token_change(model, before: Tensor, after: Tensor, top: int = 10) -> dict:
    """KL(before ‖ after) of last-position log-probs ``[n, vocab]`` and the tokens that rose or fell most."""
    from .data import tokenizer_of

    kl = (before.exp() * (before - after)).sum(-1).clamp_min(0)
    pb, pa = before.exp().mean(0), after.exp().mean(0)
    d = pa - pb
    tok = tokenizer_of(model)

    def rows(idx: Tensor) -> list[dict]:
        return [{"token": tok.decode([int(i)]), "id": int(i), "p_before": float(pb[i]),
                 "p_after": float(pa[i]), "delta": float(d[i])} for i in idx]

    k = min(top, len(d))
    return {"kl": float(kl.mean()), "kl_max": float(kl.max()), "n_prompts": int(len(kl)),
            "rose": rows(d.topk(k).indices), "fell": rows((-d).topk(k).indices)}


def steer(model, steering: Steering, *, task=None, prompt: str | None = None, max_new_tokens: int = 20,
          top: int = 10, batch_size: int = 32, progress: bool = True) -> dict:
    """What the intervention changes: the task metric, the next-token distribution, generated text.

    With ``task``: its mean logit difference (and accuracy) on the clean prompts before and after,
    and the next-token change at their last position. With ``prompt``: the next-token change at the
    prompt's last position and greedy text before and after (else the first task prompt is
    continued).
    """
    from .data import tokenizer_of

    if task is None and prompt is None:
        raise UserError("nothing to steer on: give a task (--task NAME) or a prompt (--prompt TEXT)")
    ptoks = encode_prompt(model, prompt) if prompt is not None else None
    limit = int(getattr(model.cfg, "n_ctx", 0) or 0)
    start_len = ptoks.shape[1] if ptoks is not None else task.clean.shape[1]
    if limit and start_len + max_new_tokens > limit:
        raise UserError(f"the prompt ({start_len} tokens with BOS) plus --max-new-tokens {max_new_tokens} "
                        f"exceeds the model's {limit} positions: shorten the prompt or generate fewer tokens")
    for length in ([ptoks.shape[1]] if ptoks is not None else []) + ([task.clean.shape[1]] if task else []):
        if steering.positions is not None:
            resolve_positions(steering.positions, length)  # a bad position fails before any forward
    out: dict = {"feature": f"{steering.site.name}{steering.site.layer}/{steering.feature}",
                 "site": {"name": steering.site.name, "layer": steering.site.layer,
                          "hook": steering.site.hook},
                 "mode": steering.mode, "value": float(steering.value),
                 "positions": "all" if steering.positions is None else list(steering.positions)}
    bar = tqdm(total=(2 if task is not None else 0) + (2 if ptoks is not None else 0) + 2, desc="steer",
               disable=not progress)
    if task is not None:
        d0, lp0 = _task_rows(model, task, None, batch_size)
        bar.update(1)
        d1, lp1 = _task_rows(model, task, steering, batch_size)
        bar.update(1)
        out["task"] = {"name": task.name, "pairs": len(task),
                       "metric": "mean logit difference (answer - wrong)",
                       "before": float(d0.mean()), "after": float(d1.mean()),
                       "delta": float((d1 - d0).mean()),
                       "accuracy_before": float((d0 > 0).double().mean()),
                       "accuracy_after": float((d1 > 0).double().mean())}
        out["next_token_task"] = next_token_change(model, lp0, lp1, top)
    if ptoks is not None:
        lp0 = run_steered(model, ptoks, None)[:, -1].double().log_softmax(-1).cpu()
        bar.update(1)
        lp1 = run_steered(model, ptoks, steering)[:, -1].double().log_softmax(-1).cpu()
        bar.update(1)
        out["next_token"] = next_token_change(model, lp0, lp1, top)
    start = ptoks if ptoks is not None else task.clean[:1]
    tok = tokenizer_of(model)
    n = start.shape[1]
    gen0 = generate(model, start, None, max_new_tokens)
    bar.update(1)
    gen1 = generate(model, start, steering, max_new_tokens)
    bar.update(1)
    bar.close()
    out["generation"] = {"prompt": tok.decode(start[0, 1:].tolist()), "max_new_tokens": max_new_tokens,
                         "before": tok.decode(gen0[0, n:].tolist()),
                         "after": tok.decode(gen1[0, n:].tolist()),
                         "before_ids": gen0[0, n:].tolist(), "after_ids": gen1[0, n:].tolist()}
    return out


def format_steer(res: dict) -> str:
    """A plain-text report of a :func:`steer` result."""
    pos = res["positions"] if res["positions"] == "all" else ",".join(map(str, res["positions"]))
    verb = "add" if res["mode"] == "add" else "clamp to"
    lines = [f"{res['feature']} ({res['site']['hook']}): {verb} {res['value']:.4g}"
             + (" × decoder direction" if res["mode"] == "add" else "") + f" at positions {pos}"]
    if "typical_activation" in res:
        t = res["typical_activation"]
        lines.append(f"typical activation {t['mean_active']:.4g} (fires on {t['freq']:.2%} of "
                     f"{t['n_tokens']:,} held-out tokens, max {t['max']:.4g})")
    if "task" in res:
        t = res["task"]
        lines += ["", f"task {t['name']} ({t['pairs']} pairs): logit difference {t['before']:+.3f} → "
                  f"{t['after']:+.3f} (Δ {t['delta']:+.3f}); accuracy {t['accuracy_before']:.3f} → "
                  f"{t['accuracy_after']:.3f}"]
    for key, what in (("next_token_task", "next token at the task prompts' last position (mean)"),
                      ("next_token", "next token after the prompt")):
        if key not in res:
            continue
        nt = res[key]
        lines += ["", f"{what}: KL(before ‖ after) {nt['kl']:.4f}"]
        for name in ("rose", "fell"):
            cells = ", ".join(f"{r['token']!r} {r['p_before']:.3f}→{r['p_after']:.3f}" for r in nt[name][:8])
            lines.append(f"  {name:<5} {cells}")
    g = res["generation"]
    lines += ["", f"greedy continuation of {g['prompt'][-60:]!r} ({g['max_new_tokens']} tokens)",
              f"  before: {g['before']!r}", f"  after:  {g['after']!r}"]
    return "\n".join(lines)
