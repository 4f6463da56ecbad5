"""Shared memory between the frontend and the engines (ARCHITECTURE.md §2).

    from lightllm_async.ipc import Region, RegionSpec, Op

    front = Region.create(instance_id, spec)   # FrontendRegion: the frontend's writers
    engine = Region.attach(front.name, k)       # EngineRegion: engine replica k's writers

No torch here: the frontend imports this package.
"""

from lightllm_async.ipc.engine_side import EngineRegion
from lightllm_async.ipc.frontend_side import FrontendRegion
from lightllm_async.ipc.region import Region
from lightllm_async.ipc.types import (
    EngineState,
    EngineStats,
    HandoffView,
    Op,
    OutputView,
    RegionSpec,
    RequestView,
    RingRecord,
    SlotState,
    total_stats,
)

__all__ = [
    "EngineRegion",
    "EngineState",
    "EngineStats",
    "FrontendRegion",
    "Op",
    "OutputView",
    "Region",
    "RegionSpec",
    "HandoffView",
    "RequestView",
    "RingRecord",
    "SlotState",
    "total_stats",
]
