"""Named POSIX objects of a region: the shared memory `/lla-<id>` and its two semaphores
`/lla-<id>-ew` (engine wake) and `/lla-<id>-fw` (frontend wake), all mode 0600.

Order, so that a semaphore never outlives its memory: create memory then semaphores; unlink
semaphores then memory. On Linux they appear as /dev/shm/lla-<id> and /dev/shm/sem.lla-<id>-ew.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import re
from collections.abc import Callable

import posix_ipc

from lightllm_async.ipc.layout import MAGIC, Header

PREFIX = "lla-"
SHM_DIR = "/dev/shm"
MODE = 0o600
_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,200}")


def region_name(instance_id: str) -> str:
    if not _ID_RE.fullmatch(instance_id):
        raise ValueError(f"instance id must match {_ID_RE.pattern}, got {instance_id!r}")
    return f"/{PREFIX}{instance_id}"


def sem_names(name: str) -> tuple[str, str]:
    """(engine wake, frontend wake) semaphore names of region `name`."""
    return f"{name}-ew", f"{name}-fw"


def create_memory(name: str, size: int) -> mmap.mmap:
    """Create (exclusively) and map a zero-filled region; FileExistsError if the name is taken."""
    try:
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=MODE, size=size)
    except posix_ipc.ExistentialError as e:
        raise FileExistsError(errno.EEXIST, f"shared memory {name} exists", name) from e
    try:
        return mmap.mmap(shm.fd, size)
    finally:
        shm.close_fd()


def attach_memory(name: str) -> mmap.mmap:
    """Map an existing region whole; FileNotFoundError if there is none."""
    try:
        shm = posix_ipc.SharedMemory(name)
    except posix_ipc.ExistentialError as e:
        raise FileNotFoundError(errno.ENOENT, f"no shared memory {name}", name) from e
    try:
        return mmap.mmap(shm.fd, shm.size)
    finally:
        shm.close_fd()


def create_semaphores(name: str) -> tuple[posix_ipc.Semaphore, posix_ipc.Semaphore]:
    return tuple(  # type: ignore[return-value]
        posix_ipc.Semaphore(s, posix_ipc.O_CREX, mode=MODE, initial_value=0) for s in sem_names(name)
    )


def attach_semaphores(name: str) -> tuple[posix_ipc.Semaphore, posix_ipc.Semaphore]:
    return tuple(posix_ipc.Semaphore(s) for s in sem_names(name))  # type: ignore[return-value]


def unlink_all(name: str) -> None:
    """Remove the semaphores, then the memory, of region `name`; missing ones are skipped."""
    for s in sem_names(name):
        _ignore_missing(posix_ipc.unlink_semaphore, s)
    _ignore_missing(posix_ipc.unlink_shared_memory, name)


def _ignore_missing(fn: Callable[[str], None], name: str) -> None:
    with contextlib.suppress(posix_ipc.ExistentialError):
        fn(name)


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_owner(path: str) -> int | None:
    """The owner pid of the region file at `path`, or None if it is not (yet) a valid region."""
    try:
        with open(path, "rb") as f:
            data = f.read(ctypes.sizeof(Header))
    except OSError:
        return None
    if len(data) < ctypes.sizeof(Header):
        return None
    h = Header.from_buffer_copy(data)
    return h.owner_pid if h.magic == MAGIC else None


def remove_stale() -> list[str]:
    """Unlink regions whose owner process is dead, and semaphores whose region is gone.

    Regions without a valid header are left alone: one may be in the middle of its creation.
    Returns the names removed.
    """
    try:
        entries = os.listdir(SHM_DIR)
    except OSError:
        return []
    removed = []
    for entry in entries:
        if entry.startswith(PREFIX):
            owner = read_owner(os.path.join(SHM_DIR, entry))
            if owner is not None and not pid_alive(owner):
                unlink_all("/" + entry)
                removed.append("/" + entry)
        elif entry.startswith("sem." + PREFIX) and entry[-3:] in ("-ew", "-fw"):
            region = entry[len("sem.") : -3]
            if not os.path.exists(os.path.join(SHM_DIR, region)):
                _ignore_missing(posix_ipc.unlink_semaphore, "/" + entry[len("sem.") :])
                removed.append("/" + entry[len("sem.") :])
    return removed
