"""Linear layers whose weights a loader fills (`models/weights.py`), replicated or tensor-parallel.

Each multiplies through `kernels.skinny_linear.linear`: cuBLAS, or at decode's few rows on CUDA a
Triton kernel that starts reading its weight while the kernel before it finishes.

Fused projections (q|k|v, gate|up) are one matrix here and several tensors in checkpoints: a
`MergedLinear` names its parts and copies each into its rows. Tensor parallelism shards these
classes, never the models: a column-parallel layer holds a slice of the output rows (of each part)
and computes its slice of the output with no communication; a row-parallel layer holds the matching
slice of the input columns and sums its partial products over the ranks. Each class says in
`tp_dims` which dim of which checkpoint tensor is split across ranks (counted from the end, so that
it reads the same for one matrix and a stack of experts); the loader slices by it.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from lightllm_async.kernels.skinny_linear import linear
from lightllm_async.layers.parallel import SINGLE, TPGroup


class Linear(nn.Module):
    """y = x W^T (+ b), the whole matrix on every rank. Weights are allocated empty, for a loader
    to fill."""

    tp_dims: ClassVar[dict[str, int]] = {}  # replicated: no tensor is split

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype, device):
        super().__init__()
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=dtype, device=device), requires_grad=False
        )
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
            if bias
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


class ColumnParallelLinear(Linear):
    """Output features split across ranks: rank r holds rows [r*n/size, (r+1)*n/size) of the
    weight (and bias) and returns that slice of y."""

    tp_dims: ClassVar[dict[str, int]] = {"weight": -2, "bias": -1}

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype, device, tp: TPGroup = SINGLE):
        super().__init__(in_features, tp.split(out_features, "output features"), bias, dtype, device)


class MergedLinear(ColumnParallelLinear):
    """Several projections of the same input stacked along the output dimension, each split
    across ranks as a column-parallel layer: a rank holds its slice of every part."""

    def __init__(
        self, in_features: int, part_sizes: dict[str, int], bias: bool, dtype, device, tp: TPGroup = SINGLE
    ):
        local = {name: tp.split(size, f"{name} rows") for name, size in part_sizes.items()}
        super().__init__(in_features, sum(local.values()), bias, dtype, device)
        self.offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for name, size in local.items():
            self.offsets[name] = (start, start + size)
            start += size

    def load_part(self, part: str, kind: str, tensor: Tensor) -> None:
        """Copy `tensor` (this rank's rows of the part) into the rows of `part` in the "weight"
        or the "bias"."""
        lo, hi = self.offsets[part]
        target = self.weight if kind == "weight" else self.bias
        if tensor.shape[0] != hi - lo:
            raise ValueError(f"{part}.{kind}: expected {hi - lo} rows, got {tuple(tensor.shape)}")
        target.data[lo:hi].copy_(tensor)

    def split(self, y: Tensor) -> list[Tensor]:
        return list(y.split([hi - lo for lo, hi in self.offsets.values()], dim=-1))


class RowParallelLinear(Linear):
    """Input features split across ranks: rank r holds columns [r*n/size, (r+1)*n/size) of the
    weight, multiplies its slice of x (a column-parallel layer's output) and the partial products
    are summed over the ranks, then the bias (whole on every rank) is added once.

    `reduce=False` leaves the sum to the caller, who can then add several row-parallel outputs
    and reduce once (an MoE's routed and shared experts); such a layer takes no bias."""

    tp_dims: ClassVar[dict[str, int]] = {"weight": -1}

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype,
        device,
        tp: TPGroup = SINGLE,
        reduce: bool = True,
    ):
        if bias and not reduce:
            raise ValueError("a row-parallel layer whose caller reduces cannot add a bias")
        super().__init__(tp.split(in_features, "input features"), out_features, bias, dtype, device)
        self.tp, self.reduce = tp, reduce

    def forward(self, x: Tensor) -> Tensor:
        if self.tp.size == 1:
            return linear(x, self.weight, self.bias)
        y = linear(x, self.weight)
        if self.reduce:
            y = self.tp.all_reduce(y)
        return y if self.bias is None else y + self.bias
