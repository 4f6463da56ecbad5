"""The tensor-parallel group a model is built for, and its two collectives.

Every rank builds the same model with its `TPGroup`; the parallel layers (`layers/linear.py`,
`layers/embedding.py`) allocate their local shards and say which dim of which checkpoint tensor is
split (`tp_dims`), and `models/weights.py` gives each rank its slice (`TPGroup.shard`) of the full
tensors every rank reads. All ranks must run every forward in lockstep: the collectives are
blocking, and a rank that skips one hangs the others.

With size 1 (`SINGLE`) nothing here communicates or copies: the collectives return their input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

# all_gather_single is the name from torch 2.13 on; earlier versions have only the older one
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class TPGroup:
    """This process's place in a tensor-parallel group: `rank` of `size`, communicating over
    `group` (a torch.distributed ProcessGroup; None when size == 1)."""

    rank: int = 0
    size: int = 1
    group: Any = None
    # small all-reduces over symmetric memory (a one-shot kernel: each rank reads its peers'
    # buffers over NVLink), far less latency than NCCL's for a decode step's activations
    small: SymmetricAllReduce | None = None

    def all_reduce(self, x: Tensor) -> Tensor:
        """The sum of `x` over the ranks (in place through NCCL; a new tensor through symmetric
        memory): use the returned tensor. Every rank gets the same bits."""
        if self.size == 1:
            return x
        if self.small is not None and self.small.fits(x):
            return self.small(x)
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: Tensor, dim: int = -1) -> Tensor:
        """The ranks' shards concatenated along `dim`, rank 0 first."""
        if self.size == 1:
            return x
        out = x.new_empty((self.size * x.shape[0], *x.shape[1:]))  # the shards stacked on dim 0
        _all_gather_flat(out, x.contiguous(), group=self.group)
        dim %= x.dim()
        return out.view(self.size, *x.shape).movedim(0, dim).flatten(dim, dim + 1)

    def broadcast(self, x: Tensor, src: int = 0) -> Tensor:
        """Rank `src`'s `x` on every rank, in place."""
        if self.size > 1:
            dist.broadcast(x, src=src, group=self.group)
        return x

    def agree_min(self, n: int, device) -> int:
        """The least of the ranks' `n` (a count every rank must share, e.g. KV cache slots)."""
        if self.size == 1:
            return n
        t = torch.tensor([n], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())

    def split(self, n: int, what: str) -> int:
        """n // size: this rank's share of `what`, which must divide evenly."""
        if n % self.size:
            raise ValueError(f"{what} ({n}) is not divisible by the tensor-parallel size {self.size}")
        return n // self.size

    def shard(self, x: Tensor, dim: int) -> Tensor:
        """This rank's slice of a full tensor along `dim`: ceil(n / size) entries per rank, so
        where n does not divide the last ranks get fewer (a padded vocabulary), possibly none."""
        if self.size == 1:
            return x
        n = x.shape[dim]
        per_rank = -(-n // self.size)
        lo = min(self.rank * per_rank, n)
        return x.narrow(dim, lo, min(per_rank, n - lo))


SINGLE = TPGroup()


class SymmetricAllReduce:
    """One-shot all-reduce through torch's symmetric memory (torch.ops.symm_mem): the input is
    copied into this rank's registered buffer, and each rank sums every rank's buffer in rank
    order (the same bits everywhere). For tensors up to `max_bytes` of `dtype` on CUDA; CUDA-graph
    capturable. Built collectively by every rank of `group` (`create`), or None where the torch
    build or the machine lacks it."""

    def __init__(self, buf: Tensor, group_name: str):
        self.buf, self.group_name = buf, group_name

    @classmethod
    def create(cls, group, dtype: torch.dtype, device, max_bytes: int) -> SymmetricAllReduce | None:
        try:
            import torch.distributed._symmetric_memory as symm_mem

            name = group.group_name
            if hasattr(symm_mem, "enable_symm_mem_for_group"):
                symm_mem.enable_symm_mem_for_group(name)
            buf = symm_mem.empty(max_bytes // dtype.itemsize, dtype=dtype, device=device)
            symm_mem.rendezvous(buf, name)
            op = cls(buf, name)
            probe = torch.full((8,), 1.0, dtype=dtype, device=device)
            if not torch.equal(op(probe), torch.full_like(probe, float(dist.get_world_size(group)))):
                raise RuntimeError("a probe all-reduce gave a wrong sum")
            return op
        except Exception as exc:  # noqa: BLE001 - NCCL does every all-reduce then
            import logging

            logging.getLogger(__name__).warning(
                "symmetric-memory all-reduce unavailable (%r): NCCL only", exc
            )
            return None

    def fits(self, x: Tensor) -> bool:
        return x.dtype == self.buf.dtype and x.is_contiguous() and x.numel() <= self.buf.numel() and x.is_cuda

    def __call__(self, x: Tensor) -> Tensor:
        flat = x.view(-1)
        out = torch.empty_like(flat)
        torch.ops.symm_mem.one_shot_all_reduce_copy_out(
            self.buf[: flat.numel()], flat, "sum", self.group_name, out
        )
        return out.view_as(x)
