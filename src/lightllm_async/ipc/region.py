"""Opening a region: the frontend creates it, engines attach to it; each gets its own view."""

from __future__ import annotations

import os

from lightllm_async.ipc import atomics, shm
from lightllm_async.ipc.engine_side import EngineRegion
from lightllm_async.ipc.frontend_side import FrontendRegion
from lightllm_async.ipc.layout import MAGIC, MAGIC_OFF, Header, Layout
from lightllm_async.ipc.types import RegionSpec


class Region:
    """One server instance's shared memory: slot table, submit rings, token arenas, semaphores.

    Not a region itself but the two ways to open one, each returning the view of the process that
    opens it: `Region.create` gives the frontend a FrontendRegion, `Region.attach(name, replica)`
    gives engine replica `replica` an EngineRegion bound to its own ring and header section. Each
    view has the writer methods of its own side only, so a field keeps its one writer by
    construction (see layout.py for which side owns which field). A process that plays both
    sides, as tests do, creates the region and attaches a second view.
    """

    @staticmethod
    def create(instance_id: str, spec: RegionSpec) -> FrontendRegion:
        """Create `/lla-<instance_id>` and its semaphores (one per engine replica and the
        frontend's), mode 0600, after removing the regions of dead owners. FileExistsError if a
        live one has the name. Unlinked at exit of this process."""
        name = shm.region_name(instance_id)
        shm.remove_stale()
        layout = Layout.of(spec)
        mm = shm.create_memory(name, layout.total_size)
        try:
            sems = shm.create_semaphores(name, layout.spec.num_replicas)
        except BaseException:
            mm.close()
            shm.unlink_all(name, layout.spec.num_replicas)
            raise
        region = FrontendRegion(name, mm, layout, sems)
        region._init_contents(os.getpid())
        region._register_owner()
        return region

    @staticmethod
    def attach(name: str, replica: int = 0) -> EngineRegion:
        """Map an existing region by name ('/lla-<id>') as engine replica `replica` (IndexError
        if the region has no such replica)."""
        name = name if name.startswith("/") else "/" + name
        mm = shm.attach_memory(name)
        try:
            if atomics.load_acquire_u64(mm, MAGIC_OFF) != MAGIC:  # pairs with create's release
                raise ValueError(f"{name} is not an initialized lightllm-async region")
            layout = Layout.from_header(Header.from_buffer_copy(mm, 0))
            layout.engine_off(replica)  # IndexError for a replica the region does not have
            sems = shm.attach_semaphores(name, replica)
        except BaseException:
            mm.close()
            raise
        return EngineRegion(name, mm, layout, sems, replica)
