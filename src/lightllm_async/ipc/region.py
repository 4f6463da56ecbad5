"""A region's life: create (frontend), attach (engines), close, unlink; header reads."""

from __future__ import annotations

import atexit
import os
import time
from collections.abc import Callable
from types import TracebackType

from lightllm_async.ipc import atomics, shm
from lightllm_async.ipc.engine_side import EngineSide
from lightllm_async.ipc.frontend_side import FrontendSide
from lightllm_async.ipc.layout import (
    ENGINE_STATE,
    ERROR_TEXT_BYTES,
    HEARTBEAT,
    MAGIC,
    MAGIC_OFF,
    STATS_SEQ,
    Header,
    Layout,
)
from lightllm_async.ipc.types import EngineState, EngineStats, RegionSpec


class Region(FrontendSide, EngineSide):
    """One server instance's shared memory: slot table, submit ring, token arenas, semaphores.

    The frontend creates it (`Region.create`) and uses the FrontendSide methods; engine rank 0
    attaches by name (`Region.attach(region.name)`) and uses the EngineSide methods. See layout.py
    for which process writes which field.
    """

    _owner_cleanup: Callable[[], None] | None = None

    @classmethod
    def create(cls, instance_id: str, spec: RegionSpec) -> Region:
        """Create `/lla-<instance_id>` and its semaphores, mode 0600, after removing the regions of
        dead owners. FileExistsError if a live one has the name. Unlinked at exit of this process."""
        name = shm.region_name(instance_id)
        shm.remove_stale()
        layout = Layout.of(spec)
        mm = shm.create_memory(name, layout.total_size)
        try:
            sems = shm.create_semaphores(name)
        except BaseException:
            mm.close()
            shm.unlink_all(name)
            raise
        region = cls(name, mm, layout, sems)
        region._init_contents(os.getpid())
        region._register_owner()
        return region

    @classmethod
    def attach(cls, name: str) -> Region:
        """Map an existing region by name ('/lla-<id>')."""
        name = name if name.startswith("/") else "/" + name
        mm = shm.attach_memory(name)
        try:
            if atomics.load_acquire_u64(mm, MAGIC_OFF) != MAGIC:  # pairs with create's release
                raise ValueError(f"{name} is not an initialized lightllm-async region")
            layout = Layout.from_header(Header.from_buffer_copy(mm, 0))
            sems = shm.attach_semaphores(name)
        except BaseException:
            mm.close()
            raise
        return cls(name, mm, layout, sems)

    def _init_contents(self, owner_pid: int) -> None:
        self._layout.write_header(self._header, owner_pid)
        atomics.slot_stack_init(self._mm, self._layout.stack_off, self.spec.num_slots)
        atomics.store_release_u64(self._mm, MAGIC_OFF, MAGIC)  # publishes all of the above

    def _register_owner(self) -> None:
        pid, name = os.getpid(), self.name

        def cleanup() -> None:
            if os.getpid() == pid:  # not in a forked child that happens to run atexit
                shm.unlink_all(name)

        atexit.register(cleanup)
        self._owner_cleanup = cleanup

    def unlink(self) -> None:
        """Remove the region's names (memory and both semaphores). Mappings stay valid until closed."""
        shm.unlink_all(self.name)
        if self._owner_cleanup is not None:
            atexit.unregister(self._owner_cleanup)
            self._owner_cleanup = None

    def close(self) -> None:
        """Unmap and close the semaphores of this process; idempotent. Does not unlink."""
        if self._mm.closed:
            return
        for relay in list(self._relays):  # each holds an export of the mapping
            self.stop_wake_relay(relay)
        self._release_views()
        self._mm.close()
        self._sem_engine.close()
        self._sem_frontend.close()

    def __enter__(self) -> Region:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Close; the creator also unlinks."""
        if self._owner_cleanup is not None:
            self.unlink()
        self.close()

    # ---- header, read by anyone ----

    @property
    def owner_pid(self) -> int:
        return self._header.owner_pid

    @property
    def engine_state(self) -> EngineState:
        return EngineState(atomics.load_acquire_u32(self._mm, ENGINE_STATE))

    @property
    def engine_pid(self) -> int:
        """Pid of the last process that called set_engine_state (0 before); read after engine_state."""
        self.engine_state  # noqa: B018  acquire, so the pid written before it is visible
        return self._header.engine_pid

    @property
    def error_text(self) -> str:
        """The error the engine reported with its last state change ("" if none)."""
        self.engine_state  # noqa: B018  acquire, pairs with set_engine_state's release
        n = min(self._header.error_len, ERROR_TEXT_BYTES)
        off = Header.error_text.offset
        return self._mm[off : off + n].decode(errors="replace")

    @property
    def heartbeat(self) -> int:
        return atomics.load_acquire_u64(self._mm, HEARTBEAT)

    def engine_stats(self) -> EngineStats:
        """The engine's last published stats snapshot (all zero before the first); never torn.

        A writer descheduled mid-write keeps the count odd: spin, then yield the core, and if it
        stays odd past a deadline (a dead engine), return this reader's last consistent snapshot.
        """
        deadline = None
        while True:
            for _ in range(1000):
                seq = atomics.load_acquire_u64(self._mm, STATS_SEQ)
                values = tuple(self._header.stats)
                atomics.fence_seq_cst()  # the value loads above stay before the re-check
                if seq % 2 == 0 and atomics.load_acquire_u64(self._mm, STATS_SEQ) == seq:
                    self._last_stats = EngineStats(*values)
                    return self._last_stats
            now = time.monotonic()
            deadline = deadline or now + 0.05
            if now > deadline:
                return getattr(self, "_last_stats", EngineStats())
            time.sleep(0.0001)
