"""torch.distributed plumbing: one code path for one process and for ``torchrun`` ranks.

1. :func:`init` joins the process group ``torchrun`` describes in the environment (``RANK``,
   ``WORLD_SIZE``, ``MASTER_ADDR``…; gloo on CPU, NCCL on CUDA) and is a no-op in a plain
   process, where :func:`rank` is 0 and :func:`world` is 1;
2. :class:`Reducer` sums tensors over ranks (identity with one process), which is all the
   data-parallel trainer needs: global batch statistics and gradient all-reduce;
3. :func:`shard` gives each rank its slice of a sequence of work items (token batches, cache
   chunks); :mod:`featcircuit.sharded_edges` reduces per-rank edge tables into the table one
   process computes on all the tokens (sums added, maxima maxed, rows in the same order);
4. only rank 0 writes files (:func:`is_writer`); the others wait at :func:`barrier`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import UserError


def active() -> bool:
    """Whether this process is one rank of an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if active() else 0


def world() -> int:
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if active() else 1


def is_writer() -> bool:
    """Whether this process writes the shared outputs (rank 0)."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op with one process)."""
    if active() and world() > 1:
        dist.barrier()


def init(device: str | torch.device | None = None) -> bool:
    """Join the process group ``torchrun`` set up in the environment; False in a plain process.

    The backend is NCCL for a CUDA device and gloo otherwise; with CUDA each rank takes the
    GPU ``LOCAL_RANK``.
    """
    if active():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    from .models import resolve_device

    cuda = resolve_device(device if device is not None else "cpu").type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group("nccl" if cuda else "gloo")
    except (RuntimeError, ValueError) as e:
        raise UserError(f"could not join the torchrun process group ({e}); run under "
                        "`torchrun --nproc-per-node N -m featcircuit ...`") from None
    return True


def shutdown() -> None:
    """Leave the process group (no-op with one process)."""
    if active():
        dist.destroy_process_group()


def shard(items: Sequence, r: int | None = None, w: int | None = None) -> list:
    """The items rank ``r`` of ``w`` handles: every w-th one from index r (round robin)."""
    r = rank() if r is None else r
    w = world() if w is None else w
    return list(items[r::w])


class Reducer:
    """Sums over the ranks of a process group; the identity with one process."""

    def __init__(self) -> None:
        self.world = world()
        self.on = self.world > 1
        # NCCL reduces GPU tensors only: CPU tensors (data statistics) travel through the GPU
        self.via = (torch.device("cuda", torch.cuda.current_device())
                    if self.on and dist.get_backend() == "nccl" else None)

    def _reduce(self, t: Tensor, op) -> Tensor:
        if not self.on:
            return t
        out = t.detach().clone()
        if self.via is not None and out.device.type != "cuda":
            moved = out.to(self.via)
            dist.all_reduce(moved, op=op)
            return moved.to(t.device)
        dist.all_reduce(out, op=op)
        return out

    def sum(self, t: Tensor) -> Tensor:
        """``t`` summed over ranks (a new tensor; autograd is not tracked through it)."""
        return self._reduce(t, dist.ReduceOp.SUM)

    def max(self, t: Tensor) -> Tensor:
        """Element-wise maximum over ranks."""
        return self._reduce(t, dist.ReduceOp.MAX)

    def grads(self, params) -> None:
        """Sum each parameter's gradient over ranks in place (one flat all-reduce)."""
        if not self.on:
            return
        ps = [p for p in params if p.grad is not None]
        if not ps:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in ps])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        i = 0
        for p in ps:
            n = p.grad.numel()
            p.grad.copy_(flat[i:i + n].view_as(p.grad))
            i += n
