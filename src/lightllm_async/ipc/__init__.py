"""Shared memory between the frontend and the engines (ARCHITECTURE.md §2).

    from lightllm_async.ipc import Region, RegionSpec, Op

No torch here: the frontend imports this package.
"""

from lightllm_async.ipc.region import Region
from lightllm_async.ipc.types import (
    EngineState,
    EngineStats,
    Op,
    OutputView,
    RegionSpec,
    RequestView,
    RingRecord,
    SlotState,
)

__all__ = [
    "EngineState",
    "EngineStats",
    "Op",
    "OutputView",
    "Region",
    "RegionSpec",
    "RequestView",
    "RingRecord",
    "SlotState",
]
