"""Attribution shared out over torch.distributed ranks, and the reduction of their edge tables.

Each rank attributes its share of the token batches (:func:`featcircuit.distributed.shard`);
:func:`merge_edge_tables` reduces the per-rank :class:`~featcircuit.attribution.EdgeTable` s into
the table one process computes over all tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed
from torch import Tensor

from . import distributed as D
from .attribution import ERR, EdgeTable, attribute_edges
from .errors import UserError


def merge_edge_tables(tables: Sequence):
    """One :class:`~featcircuit.attribution.EdgeTable` from tables over disjoint token sets.

    Sums (weight, |weight|, count, behavioural weight) add, ``max_abs`` takes the maximum and
    ``n_tokens`` adds; rows come out sorted by (dst, src) with the error source last, as
    :func:`~featcircuit.attribution.attribute_edges` orders them.
    """
    if not tables:
        raise UserError("merge_edge_tables needs at least one table")
    t0 = tables[0]
    for t in tables[1:]:
        if (t.layer, t.d_resid, t.d_mlp) != (t0.layer, t0.d_resid, t0.d_mlp):
            raise UserError("edge tables of different layers or dictionaries cannot be merged")
        if (t.behav_weight is None) != (t0.behav_weight is None):
            raise UserError("edge tables with and without behavioural weights cannot be merged")
    d_r = t0.d_resid
    keys = torch.cat([t.dst * (d_r + 1) + torch.where(t.src == ERR, d_r, t.src) for t in tables])
    uniq, inv = torch.unique(keys, return_inverse=True)
    n = len(uniq)

    def add(name: str) -> Tensor:
        vals = torch.cat([getattr(t, name).double() for t in tables])
        return torch.zeros(n, dtype=torch.float64).index_add_(0, inv, vals)

    max_abs = torch.zeros(n, dtype=torch.float64).scatter_reduce_(
        0, inv, torch.cat([t.max_abs.double() for t in tables]), reduce="amax", include_self=False)
    count = torch.zeros(n, dtype=torch.long).index_add_(0, inv, torch.cat([t.count for t in tables]))
    dst, src = uniq // (d_r + 1), uniq % (d_r + 1)
    src = torch.where(src == d_r, ERR, src)
    return EdgeTable(t0.layer, d_r, t0.d_mlp, src, dst, add("weight"), add("abs_weight"), count,
                     max_abs, sum(t.n_tokens for t in tables),
                     add("behav_weight") if t0.behav_weight is not None else None, dict(t0.meta))


def attribute_edges_sharded(rep, tokens: Tensor, *, batch_size: int = 16, **kw):
    """:func:`~featcircuit.attribution.attribute_edges` with the token batches shared out over
    the ranks and the per-rank tables merged; every rank gets the whole table."""
    starts = list(range(0, len(tokens), batch_size))
    mine = D.shard(starts)
    if mine:
        idx = torch.cat([torch.arange(s, min(s + batch_size, len(tokens))) for s in mine])
        local = attribute_edges(rep, tokens[idx], batch_size=batch_size, **kw)
    else:  # more ranks than batches: this rank contributes an empty table
        local = attribute_edges(rep, tokens[:0], batch_size=batch_size, **kw)
    if D.world() == 1:
        return local
    gathered: list = [None] * D.world()
    torch.distributed.all_gather_object(gathered, local.to_dict())
    return merge_edge_tables([EdgeTable.from_dict(d) for d in gathered])
