"""Named POSIX objects of a region: the shared memory `/lla-<id>` and its semaphores, one per
engine replica (`/lla-<id>-ew` for replica 0, `/lla-<id>-ew<k>` for replica k > 0: engine wake)
and one for the frontend (`/lla-<id>-fw`: frontend wake), all mode 0600.

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


def engine_sem_name(name: str, replica: int = 0) -> str:
    """The name of replica `replica`'s engine wake-up semaphore of region `name`."""
    return f"{name}-ew" if replica == 0 else f"{name}-ew{replica}"


def frontend_sem_name(name: str) -> str:
    return f"{name}-fw"


def sem_names(name: str, num_replicas: int = 1) -> list[str]:
    """Every semaphore name of region `name`: the engines' wake-ups, then the frontend's."""
    return [*(engine_sem_name(name, k) for k in range(num_replicas)), frontend_sem_name(name)]


_SEM_RE = re.compile(rf"sem\.({PREFIX}.+)-(?:ew\d*|fw)")  # a region's semaphore, by its file name


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


def create_semaphores(name: str, num_replicas: int) -> list[posix_ipc.Semaphore]:
    """The engines' semaphores, then the frontend's (sem_names' order). On an error, those
    created are unlinked again."""
    sems: list[posix_ipc.Semaphore] = []
    try:
        for s in sem_names(name, num_replicas):
            sems.append(posix_ipc.Semaphore(s, posix_ipc.O_CREX, mode=MODE, initial_value=0))
    except BaseException:
        for sem in sems:
            sem.close()
        unlink_all(name, num_replicas)
        raise
    return sems


def attach_semaphores(name: str, replica: int) -> tuple[posix_ipc.Semaphore, posix_ipc.Semaphore]:
    """(replica `replica`'s engine semaphore, the frontend's)."""
    return posix_ipc.Semaphore(engine_sem_name(name, replica)), posix_ipc.Semaphore(frontend_sem_name(name))


def unlink_all(name: str, num_replicas: int = 1) -> None:
    """Remove the semaphores, then the memory, of region `name`; missing ones are skipped."""
    for s in sem_names(name, num_replicas):
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


def read_owner(path: str) -> tuple[int, int] | None:
    """(owner pid, number of engine replicas) of the region file at `path`, or None if it is not
    (yet) a valid region."""
    try:
        with open(path, "rb") as f:
            data = f.read(ctypes.sizeof(Header))
    except OSError:
        return None
    if len(data) < ctypes.sizeof(Header):
        return None
    h = Header.from_buffer_copy(data)
    return (h.owner_pid, max(h.num_replicas, 1)) if h.magic == MAGIC else None


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
            if owner is not None and not pid_alive(owner[0]):
                unlink_all("/" + entry, owner[1])
                removed.append("/" + entry)
        elif (match := _SEM_RE.fullmatch(entry)) and not os.path.exists(os.path.join(SHM_DIR, match[1])):
            _ignore_missing(posix_ipc.unlink_semaphore, "/" + entry[len("sem.") :])
            removed.append("/" + entry[len("sem.") :])
    return removed
