"""Pure-Python reference of the `lightllm_async._atomics` extension: same functions, same layout,
same errors.

It is the specification the C extension is tested against (tests/test_ipc_atomics.py), not a
stand-in for it: the package requires the compiled module. Each operation runs under one
process-local lock, so it is atomic between threads of one process but NOT between processes: a
compare-and-swap here is a read followed by a write.
"""

from __future__ import annotations

import contextlib
import ctypes
import operator
import os
import struct
import threading
import time
from typing import Any

import numpy as np
import posix_ipc

NIL = 0xFFFFFFFF
STACK_HDR = 16
_LOCK = threading.RLock()
_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")
_WIDTH = {32: _U32, 64: _U64}
_SSIZE_MAX = 2**63 - 1


def _offset(off: Any) -> int:
    off = operator.index(off)
    if not -_SSIZE_MAX - 1 <= off <= _SSIZE_MAX:
        raise OverflowError("offset does not fit in a C ssize_t")
    return off


def _view(buf: Any, off: Any, size: int, align: int) -> tuple[memoryview, int]:
    """A byte view of `buf` and the checked offset (bounds first, then alignment).

    The caller releases the view (`with mv:`), so a raised error does not keep an mmap exported.
    """
    off = _offset(off)
    with memoryview(buf) as whole:
        if whole.readonly:
            raise BufferError("Object is not writable.")
        mv = whole.cast("B")
    try:
        if off < 0 or size > mv.nbytes or off > mv.nbytes - size:
            raise ValueError(f"offset {off} (+{size} bytes) is outside a buffer of {mv.nbytes} bytes")
        if (ctypes.addressof(ctypes.c_char.from_buffer(mv)) + off) % align:
            raise ValueError(f"offset {off} is not {align}-byte aligned")
    except BaseException:
        mv.release()
        raise
    return mv, off


def _unsigned(v: Any, bits: int) -> int:
    if not isinstance(v, int):
        raise TypeError(f"expected int, got {type(v).__name__}")
    if v < 0 or v >= 1 << bits:
        raise OverflowError(f"value does not fit in {bits} bits")
    return v


def _delta(v: Any, bits: int) -> int:
    if not isinstance(v, int):
        raise TypeError(f"expected int, got {type(v).__name__}")
    if not -(1 << (bits - 1)) <= v < 1 << bits:
        raise OverflowError("delta out of range")
    return v % (1 << bits)


def _load(buf: Any, off: Any, bits: int) -> int:
    with _LOCK:
        mv, off = _view(buf, off, bits // 8, bits // 8)
        with mv:
            return _WIDTH[bits].unpack_from(mv, off)[0]


def _store(buf: Any, off: Any, value: Any, bits: int) -> None:
    value = _unsigned(value, bits)
    with _LOCK:
        mv, off = _view(buf, off, bits // 8, bits // 8)
        with mv:
            _WIDTH[bits].pack_into(mv, off, value)


def _cas(buf: Any, off: Any, expected: Any, desired: Any, bits: int) -> bool:
    expected, desired = _unsigned(expected, bits), _unsigned(desired, bits)
    with _LOCK:
        mv, off = _view(buf, off, bits // 8, bits // 8)
        with mv:
            if _WIDTH[bits].unpack_from(mv, off)[0] != expected:
                return False
            _WIDTH[bits].pack_into(mv, off, desired)
            return True


def _fetch_add(buf: Any, off: Any, delta: Any, bits: int) -> int:
    delta = _delta(delta, bits)
    with _LOCK:
        mv, off = _view(buf, off, bits // 8, bits // 8)
        with mv:
            old = _WIDTH[bits].unpack_from(mv, off)[0]
            _WIDTH[bits].pack_into(mv, off, (old + delta) % (1 << bits))
            return old


def load_acquire_u32(buf: Any, off: int) -> int:
    return _load(buf, off, 32)


def load_acquire_u64(buf: Any, off: int) -> int:
    return _load(buf, off, 64)


def store_release_u32(buf: Any, off: int, value: int) -> None:
    _store(buf, off, value, 32)


def store_release_u64(buf: Any, off: int, value: int) -> None:
    _store(buf, off, value, 64)


def cas_u32(buf: Any, off: int, expected: int, desired: int) -> bool:
    return _cas(buf, off, expected, desired, 32)


def cas_u64(buf: Any, off: int, expected: int, desired: int) -> bool:
    return _cas(buf, off, expected, desired, 64)


def fetch_add_u32(buf: Any, off: int, delta: int) -> int:
    return _fetch_add(buf, off, delta, 32)


def fetch_add_u64(buf: Any, off: int, delta: int) -> int:
    return _fetch_add(buf, off, delta, 64)


def fence_seq_cst() -> None:
    with _LOCK:
        pass


# ---- free-slot stack: [u64 head = tag << 32 | top][u32 n][u32 count][u32 next[n]] ----


def slot_stack_nbytes(n: int) -> int:
    return STACK_HDR + 4 * _unsigned(n, 32)


def _stack(buf: Any, off: Any) -> tuple[memoryview, int, int]:
    """The view, offset and capacity of the stack at `off`, checked to fit the buffer."""
    mv, off = _view(buf, off, STACK_HDR, 8)
    n = _U32.unpack_from(mv, off + 8)[0]
    if STACK_HDR + 4 * n > mv.nbytes - off:
        mv.release()
        raise ValueError(f"slot stack of {n} slots does not fit the buffer")
    return mv, off, n


def slot_stack_init(buf: Any, off: int, n: int) -> None:
    n = _unsigned(n, 32)
    if n >= NIL:
        raise ValueError("too many slots")
    with _LOCK:
        mv, off = _view(buf, off, STACK_HDR + 4 * n, 8)
        with mv:
            for i in range(n):
                _U32.pack_into(mv, off + STACK_HDR + 4 * i, i + 1 if i + 1 < n else NIL)
            _U32.pack_into(mv, off + 8, n)
            _U32.pack_into(mv, off + 12, n)
            _U64.pack_into(mv, off, 0 if n else NIL)


def _add_count(mv: memoryview, off: int, delta: int) -> None:
    _U32.pack_into(mv, off + 12, (_U32.unpack_from(mv, off + 12)[0] + delta) & NIL)


def slot_stack_pop(buf: Any, off: int) -> int:
    with _LOCK:
        mv, off, n = _stack(buf, off)
        with mv:
            head = _U64.unpack_from(mv, off)[0]
            idx, tag = head & NIL, head >> 32
            if idx == NIL:
                return -1
            if idx >= n:
                raise RuntimeError(f"slot stack corrupted: head index {idx}")
            nxt = _U32.unpack_from(mv, off + STACK_HDR + 4 * idx)[0]
            _U64.pack_into(mv, off, ((tag + 1) & NIL) << 32 | nxt)
            _add_count(mv, off, -1)
            return idx


def slot_stack_push(buf: Any, off: int, idx: int) -> None:
    idx = _unsigned(idx, 32)
    with _LOCK:
        mv, off, n = _stack(buf, off)
        with mv:
            if idx >= n:
                raise ValueError(f"slot {idx} out of range [0, {n})")
            head = _U64.unpack_from(mv, off)[0]
            _U32.pack_into(mv, off + STACK_HDR + 4 * idx, head & NIL)
            _U64.pack_into(mv, off, (((head >> 32) + 1) & NIL) << 32 | idx)
            _add_count(mv, off, 1)


def slot_stack_count(buf: Any, off: int) -> int:
    """Free slots, read as signed and clamped to [0, n]; exact while no one allocates."""
    with _LOCK:
        mv, off, n = _stack(buf, off)
        with mv:
            c = _U32.unpack_from(mv, off + 12)[0]
        c = c - (1 << 32) if c >= 1 << 31 else c
        return max(0, min(c, n))


# ---- many slots at once ----


def _index_array(idx: Any) -> np.ndarray:
    with memoryview(idx) as m:
        if m.itemsize != 8 or m.format.lstrip("@=<") not in tuple("lLqQ"):
            raise TypeError(f"expected integers of 8 bytes, got format {m.format} of {m.itemsize} bytes")
    return np.asarray(idx).reshape(-1)


def _int_array(a: Any, width: int, n: int) -> np.ndarray:
    with memoryview(a) as m:
        if m.itemsize != width or m.format.lstrip("@=<") not in tuple("bBhHiIlLqQ"):
            raise TypeError(
                f"expected integers of {width} bytes, got format {m.format} of {m.itemsize} bytes"
            )
        if m.nbytes // width != n:
            raise ValueError(f"expected {n} items, got {m.nbytes // width}")
    return np.asarray(a).reshape(-1)


def _addresses(buf: Any, base: Any, stride: Any, idx: Any, width: int) -> list[int]:
    """The checked byte offsets base + idx[i] * stride (all or nothing, as the C version)."""
    base, stride = _offset(base), _offset(stride)
    with memoryview(buf) as m:
        nbytes = m.nbytes
    if base < 0 or stride < 0 or base > nbytes - width:
        raise ValueError(f"base {base} or stride {stride} does not fit a buffer of {nbytes} bytes")
    offs = []
    for i, k in enumerate(_index_array(idx).tolist()):
        if k < 0:
            raise ValueError(f"item {i}: index {k} is outside a buffer of {nbytes} bytes")
        offs.append(base + k * stride)
        _view(buf, offs[-1], width, width)[0].release()
    return offs


def _gather(buf: Any, base: Any, stride: Any, idx: Any, out: Any, bits: int) -> None:
    with _LOCK:
        offs = _addresses(buf, base, stride, idx, bits // 8)
        dst = _int_array(out, bits // 8, len(offs))
        with memoryview(out) as m:
            if m.readonly:
                raise BufferError("Object is not writable.")
        for i, off in enumerate(offs):
            dst[i] = _load(buf, off, bits)


def gather_acquire_u32(buf: Any, base: int, stride: int, idx: Any, out: Any) -> None:
    _gather(buf, base, stride, idx, out, 32)


def gather_acquire_u64(buf: Any, base: int, stride: int, idx: Any, out: Any) -> None:
    _gather(buf, base, stride, idx, out, 64)


def scatter_release_u32(buf: Any, base: int, stride: int, idx: Any, values: Any) -> None:
    with _LOCK:
        offs = _addresses(buf, base, stride, idx, 4)
        src = _int_array(values, 4, len(offs))
        for off, v in zip(offs, src.tolist(), strict=True):
            _store(buf, off, v & 0xFFFFFFFF, 32)


def spin_while_equal_u64(buf: Any, off: int, value: int, max_ns: int) -> bool:
    value, max_ns = _unsigned(value, 64), _unsigned(max_ns, 64)
    deadline = time.monotonic_ns() + max_ns
    while True:
        if _load(buf, off, 64) != value:
            return True
        if time.monotonic_ns() >= deadline:
            return False
        time.sleep(0)


# ---- wake-up relay: semaphore -> eventfd, in a Python thread ----


class _Relay:
    def __init__(self, sem_name: str, fd: int, buf: Any, flag_off: int):
        _view(buf, flag_off, 4, 4)[0].release()  # checked like the C version
        try:
            self._sem = posix_ipc.Semaphore(sem_name)
        except posix_ipc.ExistentialError as e:
            raise FileNotFoundError(2, "No such file or directory", sem_name) from e
        self._fd, self._buf, self._flag_off = fd, buf, flag_off
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="wake-relay", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:  # checked before every wait: a stop post absorbed below is seen here
            self._sem.acquire()
            if self._stop:
                return
            while self._sem.value > 0:
                try:
                    self._sem.acquire(0)
                except posix_ipc.BusyError:
                    break
            store_release_u32(self._buf, self._flag_off, 1)
            with contextlib.suppress(BlockingIOError):  # the counter is huge: a wake-up is pending
                os.eventfd_write(self._fd, 1)

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop = True
        self._sem.release()
        self._thread.join()
        self._thread = None
        self._sem.close()
        self._buf = None


def relay_start(sem_name: str, fd: int, buf: Any, flag_off: int) -> _Relay:
    return _Relay(sem_name, fd, buf, flag_off)


def relay_stop(relay: _Relay) -> None:
    relay.stop()
