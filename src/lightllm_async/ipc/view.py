"""What either process may do with a region: read the header, close, unlink.

The writers live in the two views built on this one, FrontendRegion and EngineRegion, so that a
process holds only the methods of the fields it owns (ARCHITECTURE.md §2).
"""

from __future__ import annotations

import atexit
import os
import time
from collections.abc import Callable
from types import TracebackType
from typing import TypeVar

from lightllm_async.ipc import atomics, shm
from lightllm_async.ipc.core import RegionCore
from lightllm_async.ipc.layout import ENGINE_STATE, ERROR_TEXT_BYTES, HEARTBEAT, STATS_SEQ, Header
from lightllm_async.ipc.types import EngineState, EngineStats

_View = TypeVar("_View", bound="RegionView")  # `with Region.create(...) as r:` keeps r's view type


class RegionView(RegionCore):
    """One process's mapping of a region, with the reads anyone may do; no writer methods."""

    _owner_cleanup: Callable[[], None] | None = None

    def _register_owner(self) -> None:
        """Unlink the region when this process exits (and on __exit__): it created the region."""
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
        self._release_views()
        self._mm.close()
        self._sem_engine.close()
        self._sem_frontend.close()

    def __enter__(self: _View) -> _View:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Close; the creator also unlinks."""
        if self._owner_cleanup is not None:
            self.unlink()
        self.close()

    def num_free_slots(self) -> int:
        """Free slots (exact when no one is allocating at the same moment)."""
        return atomics.slot_stack_count(self._mm, self._layout.stack_off)

    # ---- header ----

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
