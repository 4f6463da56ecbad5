"""Shared memory between the frontend and the engines (ARCHITECTURE.md §2).

    from lightllm_async.ipc import Region, RegionSpec, RequestParams, FinishReason, Op

No torch here: the frontend imports this package.
"""

from lightllm_async.ipc.region import Region
from lightllm_async.ipc.types import (
    MAX_STOP_IDS,
    EngineState,
    EngineStats,
    FinishReason,
    Op,
    OutputView,
    RegionSpec,
    RequestParams,
    RequestView,
    RingRecord,
    SlotState,
)

__all__ = [
    "MAX_STOP_IDS",
    "EngineState",
    "EngineStats",
    "FinishReason",
    "Op",
    "OutputView",
    "Region",
    "RegionSpec",
    "RequestParams",
    "RequestView",
    "RingRecord",
    "SlotState",
]
