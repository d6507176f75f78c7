"""Training rows streamed from shards in bounded memory, shuffled across shards.

A *row source* is a list of shards, each a block of activation rows per site (``resid``,
``mlp``) that can be loaded on its own: the chunk files of a harvest cache on disk
(:class:`CacheRows`), or one in-memory tensor per site (:class:`MemoryRows`).

Batches are a pure function of (seed, epoch, step), so a killed run resumes exactly and any
number of data-parallel ranks sees the same global batches:

1. epoch ``e`` draws a shard order from ``seed·7919 + e`` and cuts it into *windows* of
   consecutive shards holding at most ``shuffle_rows`` rows (one shard at least);
2. a window's rows, concatenated in shard-index order, are permuted (window 0 with the epoch's
   generator seed, window ``w`` with seed ``+ 1_000_003·w``); the epoch's stream is the
   windows one after another and step ``i`` takes stream rows ``[i·B, (i+1)·B)`` (a last
   partial batch is dropped);
3. rank ``r`` of ``W`` takes its ``B/W`` contiguous rows of every batch and loads, window by
   window, only those rows: it holds at most one window's share, one shard and one batch;
4. when the whole source fits one window the order is exactly the old in-memory one
   (``randperm(n)`` per epoch), so results of small runs do not change.

``rows_held`` / ``max_rows_held`` count the rows a stream holds at once (tests bound them).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from .errors import UserError

WINDOW_SEED_STRIDE = 1_000_003


class MemoryRows:
    """Rows already in memory: ``{site: [n, width]}`` as one shard."""

    def __init__(self, rows: dict[str, Tensor]):
        self.rows = rows
        self.sites = list(rows)
        self.shard_rows = [len(next(iter(rows.values())))]
        self.widths = {k: v.shape[-1] for k, v in rows.items()}

    def load(self, i: int) -> dict[str, Tensor]:
        """Shard ``i``'s rows per site."""
        return self.rows


class CacheRows:
    """The rows of a harvest cache folder: chunk files of ``[seqs, n_ctx, width]`` per hook.

    ``sites`` maps a site name to its hook; BOS positions are dropped and the rows cut at
    ``n_rows`` in chunk order, as the in-memory path cuts them.
    """

    def __init__(self, folder: str | Path, sites: dict[str, str], n_rows: int | None = None):
        from .activations import read_manifest

        self.folder = Path(folder)
        man = read_manifest(self.folder)
        if man is None:
            raise UserError(f"{self.folder} holds no activation cache (no manifest.json)")
        missing = [h for h in sites.values() if h not in man["hooks"]]
        if missing:
            raise UserError(f"activation cache {self.folder} holds no {missing[0]!r}: harvest it first")
        self.site_hooks = dict(sites)
        self.sites = list(sites)
        per_seq = man["n_ctx"] - 1
        n_chunks = -(-man["n_seq"] // man["chunk_size"])
        total = man["n_seq"] * per_seq
        n_rows = total if n_rows is None else n_rows
        if n_rows > total:
            raise UserError(f"activation cache {self.folder} holds {total:,} rows, fewer than "
                            f"the {n_rows:,} asked for")
        sizes, left = [], n_rows
        for c in range(n_chunks):
            seqs = min(man["chunk_size"], man["n_seq"] - c * man["chunk_size"])
            take = min(left, seqs * per_seq)
            if take <= 0:
                break
            sizes.append(take)
            left -= take
        self.shard_rows = sizes
        self.files = [self.folder / f"chunk_{c:05d}.safetensors" for c in range(len(sizes))]
        self.widths: dict[str, int] = {}

    def load(self, i: int) -> dict[str, Tensor]:
        """Shard ``i``'s rows per site (only the hooks asked for are read)."""
        from safetensors import safe_open

        path = self.files[i]
        out = {}
        try:
            with safe_open(str(path), framework="pt") as f:
                for site, hook in self.site_hooks.items():
                    a = f.get_tensor(hook)
                    out[site] = a[:, 1:].reshape(-1, a.shape[-1])[: self.shard_rows[i]]
        except (OSError, RuntimeError, ValueError, KeyError):
            raise UserError(f"activation cache chunk {path} is missing or corrupt: delete it and "
                            "rerun the harvest") from None
        for site, a in out.items():
            if len(a) != self.shard_rows[i] or not bool(torch.isfinite(a).all()):
                raise UserError(f"activation cache chunk {path} holds a short or non-finite "
                                f"{site} block: delete it and rerun the harvest")
        return out


class RowStream:
    """Seeded, resumable batches of one rank's rows from a row source (see the module doc)."""

    def __init__(self, source, batch_size: int, seed: int, shuffle_rows: int,
                 rank: int = 0, world: int = 1):
        if batch_size % world:
            raise UserError(f"--batch-size {batch_size} does not split evenly over {world} ranks")
        if shuffle_rows < 1:
            raise UserError(f"shuffle_rows {shuffle_rows!r} is invalid: expected an integer >= 1")
        self.src = source
        self.B, self.seed, self.cap = batch_size, seed, shuffle_rows
        self.rank, self.world = rank, world
        self.b = batch_size // world
        self.n = sum(source.shard_rows)
        self.offsets = torch.tensor([0] + list(source.shard_rows)).cumsum(0)
        self.steps_per_epoch = self.n // batch_size
        self.rows_held = 0
        self.max_rows_held = 0

    def _hold(self, delta: int) -> None:
        self.rows_held += delta
        self.max_rows_held = max(self.max_rows_held, self.rows_held)

    def windows(self, epoch: int) -> list[list[int]]:
        """The shard windows of ``epoch`` in stream order (shard indices sorted in each)."""
        n_sh = len(self.src.shard_rows)
        if self.n <= self.cap:
            return [list(range(n_sh))]
        order = torch.randperm(n_sh, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
        out: list[list[int]] = []
        cur: list[int] = []
        rows = 0
        for s in order.tolist():
            r = self.src.shard_rows[s]
            if cur and rows + r > self.cap:
                out.append(sorted(cur))
                cur, rows = [], 0
            cur.append(s)
            rows += r
        out.append(sorted(cur))
        return out

    def _window_perm(self, epoch: int, w: int, size: int) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 7919 + epoch + WINDOW_SEED_STRIDE * w)
        return torch.randperm(size, generator=g)

    def _load_window(self, shards: list[int], perm: Tensor, pos: Tensor) -> dict[str, Tensor]:
        """Rows at window-local stream positions ``pos`` (ascending), loaded shard by shard."""
        local = perm[pos]  # index into the window's shard-ordered rows
        sizes = torch.tensor([self.src.shard_rows[s] for s in shards])
        starts = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)[:-1]])
        which = torch.searchsorted(starts, local, right=True) - 1
        out: dict[str, Tensor] | None = None
        self._hold(len(pos))
        for j, s in enumerate(shards):
            sel = torch.nonzero(which == j).flatten()
            if len(sel) == 0:
                continue
            block = self.src.load(s)
            self._hold(self.src.shard_rows[s])
            if out is None:
                out = {k: torch.empty(len(pos), v.shape[-1], dtype=v.dtype) for k, v in block.items()}
            rows = local[sel] - starts[j]
            for k, v in block.items():
                out[k][sel] = v[rows]
            del block
            self._hold(-self.src.shard_rows[s])
        if out is None:  # nothing of this rank's in the window
            out = {k: torch.empty(0, 0) for k in self.src.sites}
        return out

    def batches(self, start_step: int, total_steps: int) -> Iterator[dict[str, Tensor]]:
        """This rank's ``{site: [B/W, width]}`` for steps ``start_step … total_steps-1``."""
        spe = self.steps_per_epoch
        if spe == 0:
            raise UserError(f"{self.n:,} rows are less than one batch of {self.B:,}")
        step = start_step
        while step < total_steps:
            epoch, first = divmod(step, spe)
            last = min(spe, first + (total_steps - step))  # steps of this epoch to run
            if isinstance(self.src, MemoryRows):  # one shard, already in memory: index, no copy
                perm = self._window_perm(epoch, 0, self.n)
                for i in range(first, last):
                    sel = perm[i * self.B + self.rank * self.b: i * self.B + (self.rank + 1) * self.b]
                    yield {k: v[sel] for k, v in self.src.rows.items()}
                    step += 1
                continue
            wins = self.windows(epoch)
            bounds = [0]
            for sh in wins:
                bounds.append(bounds[-1] + sum(self.src.shard_rows[s] for s in sh))
            held: dict[int, tuple[Tensor, dict[str, Tensor]]] = {}  # window -> (positions, rows)
            for i in range(first, last):
                lo, hi = i * self.B + self.rank * self.b, i * self.B + (self.rank + 1) * self.b
                pieces = []
                for w in range(len(wins)):
                    a, z = max(lo, bounds[w]), min(hi, bounds[w + 1])
                    if a >= z:
                        continue
                    if w not in held:
                        held.update(self._open(epoch, w, wins[w], bounds, first, last))
                    pos, rows = held[w]
                    sel = torch.searchsorted(pos, torch.arange(a, z))
                    pieces.append({k: v[sel] for k, v in rows.items()})
                    if bounds[w + 1] <= hi:  # this rank is done with the window: free it first
                        self._hold(-len(held.pop(w)[0]))
                batch = pieces[0] if len(pieces) == 1 else {
                    k: torch.cat([p[k] for p in pieces]) for k in pieces[0]}
                yield batch
                step += 1
            for w in list(held):
                self._hold(-len(held.pop(w)[0]))

    def _open(self, epoch: int, w: int, shards: list[int], bounds: list[int], first: int,
              last: int) -> dict[int, tuple[Tensor, dict[str, Tensor]]]:
        """Load window ``w``: the stream positions this rank reads there, and their rows."""
        lo_w, hi_w = bounds[w], bounds[w + 1]
        pos = torch.arange(lo_w, min(hi_w, last * self.B))
        pos = pos[(pos >= first * self.B) & ((pos % self.B) // self.b == self.rank)]
        if len(pos) == 0:
            return {w: (pos, {k: torch.empty(0) for k in self.src.sites})}
        perm = self._window_perm(epoch, w, hi_w - lo_w)  # one window: the old seed·7919 + epoch
        return {w: (pos, self._load_window(shards, perm, pos - lo_w))}


def source_stats(source, reducer=None,
                 shards: Sequence[int] | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """Per site (Σ row, Σ ‖row‖²) in float64 over ``shards`` (all by default), summed over ranks."""
    sums: dict[str, list[Tensor]] = {}
    idx = range(len(source.shard_rows)) if shards is None else shards
    for i in idx:
        for k, v in source.load(i).items():
            v = v.double()
            s = sums.setdefault(k, [torch.zeros(v.shape[-1], dtype=torch.float64),
                                    torch.zeros((), dtype=torch.float64)])
            s[0] += v.sum(0)
            s[1] += v.pow(2).sum()
    out = {}
    if not sums:  # more ranks than shards: this rank adds zeros of the right widths
        sums = {k: [torch.zeros(v.shape[-1], dtype=torch.float64), torch.zeros((), dtype=torch.float64)]
                for k, v in source.load(0).items()}
    for k in source.sites:
        s1, s2 = sums[k]
        if reducer is not None:
            s1, s2 = reducer.sum(s1), reducer.sum(s2)
        out[k] = (s1, s2)
    return out
