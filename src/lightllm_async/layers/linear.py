"""Linear layers whose weights a loader fills (`models/weights.py`).

Fused projections (q|k|v, gate|up) are one matrix here and several tensors in checkpoints: a
`MergedLinear` names its parts and copies each into its rows. Tensor parallelism will shard
these same classes (column: split rows, row: split columns) in the weight loader, not in models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Linear(nn.Module):
    """y = x W^T (+ b). Weights are allocated empty, for a loader to fill."""

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
        return F.linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    """Several projections of the same input stacked along the output dimension."""

    def __init__(self, in_features: int, part_sizes: dict[str, int], bias: bool, dtype, device):
        super().__init__(in_features, sum(part_sizes.values()), bias, dtype, device)
        self.offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for name, size in part_sizes.items():
            self.offsets[name] = (start, start + size)
            start += size

    def load_part(self, part: str, kind: str, tensor: Tensor) -> None:
        """Copy `tensor` into the rows of `part` in the "weight" or the "bias"."""
        lo, hi = self.offsets[part]
        target = self.weight if kind == "weight" else self.bias
        if tensor.shape[0] != hi - lo:
            raise ValueError(f"{part}.{kind}: expected {hi - lo} rows, got {tuple(tensor.shape)}")
        target.data[lo:hi].copy_(tensor)

    def split(self, y: Tensor) -> list[Tensor]:
        return list(y.split([hi - lo for lo, hi in self.offsets.values()], dim=-1))
