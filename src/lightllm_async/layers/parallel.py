"""Tensor-parallel groups (placeholder until the sharded layers land): one rank, no collectives."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1
    group: Any = None


SINGLE = TPGroup()
