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
from lightllm_async.ipc.layout import ENGINE_STATE, ERROR_TEXT_BYTES, HEARTBEAT, STATS_SEQ, EngineSection
from lightllm_async.ipc.types import EngineState, EngineStats, total_stats

_View = TypeVar("_View", bound="RegionView")  # `with Region.create(...) as r:` keeps r's view type


class RegionView(RegionCore):
    """One process's mapping of a region, with the reads anyone may do; no writer methods.

    Header reads come per engine replica (`replica_state(k)`, ...) and as the properties of one
    engine: on an engine's view (`replica` = k) they are its own replica's; on the frontend's
    (`replica` None) they cover every replica where that adds up (engine_state, error_text,
    engine_stats) and are replica 0's where it does not (engine_pid, heartbeat).
    """

    _owner_cleanup: Callable[[], None] | None = None
    replica: int | None = None  # the engine replica this view belongs to; None: the frontend's

    def _register_owner(self) -> None:
        """Unlink the region when this process exits (and on __exit__): it created the region."""
        pid, name = os.getpid(), self.name

        replicas = self.num_replicas

        def cleanup() -> None:
            if os.getpid() == pid:  # not in a forked child that happens to run atexit
                shm.unlink_all(name, replicas)

        atexit.register(cleanup)
        self._owner_cleanup = cleanup

    def unlink(self) -> None:
        """Remove the region's names (memory and every semaphore). Mappings stay valid until closed."""
        shm.unlink_all(self.name, self.num_replicas)
        if self._owner_cleanup is not None:
            atexit.unregister(self._owner_cleanup)
            self._owner_cleanup = None

    def close(self) -> None:
        """Unmap and close the semaphores of this process; idempotent. Does not unlink."""
        if self._mm.closed:
            return
        self._release_views()
        self._mm.close()
        for sem in self._sems:
            sem.close()

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

    # ---- header: the engine replicas' sections ----

    @property
    def owner_pid(self) -> int:
        return self._header.owner_pid

    @property
    def num_replicas(self) -> int:
        return self._layout.spec.num_replicas

    def replica_state(self, replica: int) -> EngineState:
        off = self._layout.engine_off(replica) + ENGINE_STATE
        return EngineState(atomics.load_acquire_u32(self._mm, off))

    def replica_pid(self, replica: int) -> int:
        """Pid of the last process that called set_engine_state for `replica` (0 before)."""
        self.replica_state(replica)  # acquire, so the pid written before it is visible
        return self._engines[replica].engine_pid

    def replica_error(self, replica: int) -> str:
        """The error `replica` reported with its last state change ("" if none)."""
        self.replica_state(replica)  # acquire, pairs with set_engine_state's release
        n = min(self._engines[replica].error_len, ERROR_TEXT_BYTES)
        off = self._layout.engine_off(replica) + EngineSection.error_text.offset
        return self._mm[off : off + n].decode(errors="replace")

    def replica_heartbeat(self, replica: int) -> int:
        return atomics.load_acquire_u64(self._mm, self._layout.engine_off(replica) + HEARTBEAT)

    def heartbeats(self) -> tuple[int, ...]:
        """Every replica's heartbeat, by replica."""
        return tuple(self.replica_heartbeat(k) for k in range(self.num_replicas))

    def replica_stats(self, replica: int) -> EngineStats:
        """`replica`'s last published stats snapshot (all zero before the first); never torn.

        A writer descheduled mid-write keeps the count odd: spin, then yield the core, and if it
        stays odd past a deadline (a dead engine), return this reader's last consistent snapshot.
        """
        section, seq_off = self._engines[replica], self._layout.engine_off(replica) + STATS_SEQ
        last = self._last_stats
        deadline = None
        while True:
            for _ in range(1000):
                seq = atomics.load_acquire_u64(self._mm, seq_off)
                values = tuple(section.stats)
                atomics.fence_seq_cst()  # the value loads above stay before the re-check
                if seq % 2 == 0 and atomics.load_acquire_u64(self._mm, seq_off) == seq:
                    last[replica] = EngineStats(*values)
                    return last[replica]
            now = time.monotonic()
            deadline = deadline or now + 0.05
            if now > deadline:
                return last.get(replica, EngineStats())
            time.sleep(0.0001)

    # ---- header: this view's engine (see the class docstring) ----

    def _replicas(self) -> range:
        k = self.replica
        return range(self.num_replicas) if k is None else range(k, k + 1)

    @property
    def engine_state(self) -> EngineState:
        """ERROR if a replica reported one, READY once every replica did, else STARTING."""
        states = [self.replica_state(k) for k in self._replicas()]
        if len(states) == 1:
            return states[0]
        if EngineState.ERROR in states:
            return EngineState.ERROR
        return EngineState.READY if all(s == EngineState.READY for s in states) else EngineState.STARTING

    @property
    def engine_pid(self) -> int:
        return self.replica_pid(self.replica or 0)

    @property
    def error_text(self) -> str:
        """The first error a replica reported ("" if none), naming the replica if there are several."""
        for k in self._replicas():
            if text := self.replica_error(k):
                return f"replica {k}: {text}" if self.num_replicas > 1 and self.replica is None else text
        return ""

    @property
    def heartbeat(self) -> int:
        return self.replica_heartbeat(self.replica or 0)

    def engine_stats(self) -> EngineStats:
        """The stats snapshot of this view's replica; on the frontend's, the sum over replicas."""
        return total_stats([self.replica_stats(k) for k in self._replicas()])
