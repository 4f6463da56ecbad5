"""The compiled atomics (lightllm_async._atomics) against the pure-Python reference (atomics_ref,
the specification, kept here in tests/) and by hand."""

from __future__ import annotations

import importlib.util
import mmap
import os
import random
import select
import struct
import sys
import threading
import time

import numpy as np
import posix_ipc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import atomics_ref
import lightllm_async
from lightllm_async.ipc import atomics

SIZE = 64
U32, U64 = 2**32, 2**64


native = atomics.native  # the compiled module (importing ipc.atomics fails without it)


@pytest.fixture(params=["native", "ref"])
def impl(request):
    """Each hand-written check holds for the compiled module and for its specification alike."""
    return native if request.param == "native" else atomics_ref


def test_import_fails_without_the_compiled_module(monkeypatch):
    """No silent fallback to the reference, which is not atomic between processes."""
    monkeypatch.delattr(lightllm_async, "_atomics", raising=False)
    monkeypatch.setitem(sys.modules, "lightllm_async._atomics", None)  # its import raises
    monkeypatch.setattr(sys, "path", [])  # no installed copy to find either
    spec = importlib.util.spec_from_file_location("atomics_without_c", atomics.__file__)
    with pytest.raises(ImportError, match="not built"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


def _outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except Exception as e:  # noqa: BLE001 - the exception type is the outcome
        return ("raise", type(e))


# ---- by hand: each function does what its name says ----


def test_cas_swaps_only_on_match(impl):
    buf = mmap.mmap(-1, SIZE)
    impl.store_release_u32(buf, 4, 7)
    assert impl.cas_u32(buf, 4, 8, 9) is False
    assert impl.load_acquire_u32(buf, 4) == 7
    assert impl.cas_u32(buf, 4, 7, 9) is True
    assert impl.load_acquire_u32(buf, 4) == 9
    assert impl.cas_u64(buf, 8, 0, U64 - 1) is True
    assert impl.load_acquire_u64(buf, 8) == U64 - 1
    assert buf[0:4] == b"\0" * 4 and buf[16:] == b"\0" * (SIZE - 16)


def test_fetch_add_returns_old_and_wraps(impl):
    buf = mmap.mmap(-1, SIZE)
    assert impl.fetch_add_u32(buf, 0, 5) == 0
    assert impl.fetch_add_u32(buf, 0, -6) == 5
    assert impl.load_acquire_u32(buf, 0) == U32 - 1
    assert impl.fetch_add_u32(buf, 0, 2) == U32 - 1
    assert impl.load_acquire_u32(buf, 0) == 1
    impl.store_release_u64(buf, 8, U64 - 1)
    assert impl.fetch_add_u64(buf, 8, 3) == U64 - 1
    assert impl.load_acquire_u64(buf, 8) == 2


def test_bounds_alignment_and_ranges_are_checked(impl):
    buf = mmap.mmap(-1, SIZE)
    for off in (-4, SIZE, SIZE - 2):
        with pytest.raises(ValueError):
            impl.load_acquire_u32(buf, off)
    with pytest.raises(ValueError):
        impl.load_acquire_u64(buf, 4)
    with pytest.raises(ValueError):
        impl.store_release_u32(buf, 2, 1)
    with pytest.raises(OverflowError):
        impl.store_release_u32(buf, 0, U32)
    with pytest.raises(OverflowError):
        impl.cas_u64(buf, 0, -1, 0)
    with pytest.raises(BufferError):
        impl.load_acquire_u32(b"\0" * 8, 0)
    assert buf[:] == b"\0" * SIZE
    buf.close()  # no export left behind by the failed calls


def test_slot_stack_pops_in_order_then_lifo(impl):
    n = 7
    buf = mmap.mmap(-1, 8 + impl.slot_stack_nbytes(n))
    impl.slot_stack_init(buf, 8, n)
    assert [impl.slot_stack_pop(buf, 8) for _ in range(3)] == [0, 1, 2]
    assert impl.slot_stack_count(buf, 8) == n - 3
    impl.slot_stack_push(buf, 8, 1)
    impl.slot_stack_push(buf, 8, 0)
    assert impl.slot_stack_pop(buf, 8) == 0
    rest = [impl.slot_stack_pop(buf, 8) for _ in range(n - 2)]
    assert rest == [1, 3, 4, 5, 6] and impl.slot_stack_pop(buf, 8) == -1
    assert impl.slot_stack_count(buf, 8) == 0
    with pytest.raises(ValueError):
        impl.slot_stack_push(buf, 8, n)


# ---- the compiled module against the reference, on the same sequences of calls ----

_offsets = st.integers(-9, SIZE + 9)
_values = st.one_of(
    st.integers(0, 9),
    st.integers(0, U32 - 1),
    st.integers(0, U64 - 1),
    st.integers(-(2**64), 2**65),
    st.just(U32 - 1),
    st.just(U64 - 1),
)
_ops = st.one_of(
    st.tuples(st.sampled_from(["load_acquire_u32", "load_acquire_u64"]), _offsets),
    st.tuples(
        st.sampled_from(["store_release_u32", "store_release_u64", "fetch_add_u32", "fetch_add_u64"]),
        _offsets,
        _values,
    ),
    st.tuples(st.sampled_from(["cas_u32", "cas_u64"]), _offsets, _values, _values),
)


@settings(max_examples=300, deadline=None)
@given(init=st.binary(min_size=SIZE, max_size=SIZE), ops=st.lists(_ops, max_size=40))
def test_native_matches_reference_on_word_ops(init, ops):
    a, b = mmap.mmap(-1, SIZE), mmap.mmap(-1, SIZE)
    a[:] = b[:] = init
    for name, *args in ops:
        assert _outcome(getattr(native, name), a, *args) == _outcome(getattr(atomics_ref, name), b, *args)
        assert a[:] == b[:], (name, args)


_stack_ops = st.lists(
    st.one_of(st.just(("pop",)), st.just(("count",)), st.tuples(st.just("push"), st.integers(-1, 40))),
    max_size=80,
)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 33), off=st.sampled_from([0, 8, 12, 16]), ops=_stack_ops)
def test_native_matches_reference_on_slot_stack(n, off, ops):
    size = 16 + native.slot_stack_nbytes(n)
    a, b = mmap.mmap(-1, size), mmap.mmap(-1, size)
    init = _outcome(native.slot_stack_init, a, off, n)
    assert init == _outcome(atomics_ref.slot_stack_init, b, off, n)
    for op, *args in ops:
        fn = "slot_stack_" + op
        expected = _outcome(getattr(atomics_ref, fn), b, off, *args)
        assert _outcome(getattr(native, fn), a, off, *args) == expected
        assert a[:] == b[:], (op, args)


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 40), data=st.data())
def test_slot_stack_hands_out_each_free_slot_once(n, data):
    """Against a model: pops return free slots only, pushes of held slots come back, none lost."""
    buf = mmap.mmap(-1, native.slot_stack_nbytes(n))
    native.slot_stack_init(buf, 0, n)
    free, held = list(range(n - 1, -1, -1)), []  # model: top of stack at the end
    for _ in range(data.draw(st.integers(0, 120))):
        if held and data.draw(st.booleans()):
            idx = held.pop(data.draw(st.integers(0, len(held) - 1)))
            native.slot_stack_push(buf, 0, idx)
            free.append(idx)
        else:
            got = native.slot_stack_pop(buf, 0)
            assert got == (free.pop() if free else -1)
            if got >= 0:
                held.append(got)
        assert native.slot_stack_count(buf, 0) == len(free)


# ---- many slots at once, the idle spin, the wake-up relay ----


def _words(buf, base: int, stride: int, idx, fmt: str) -> list[int]:
    return [struct.unpack_from(fmt, buf, base + int(i) * stride)[0] for i in idx]


def test_scatter_and_gather_touch_exactly_the_indexed_words(impl):
    rng = random.Random(11)
    buf = mmap.mmap(-1, 4096)
    base, stride = 40, 24  # 8-aligned addresses for the u64 gather too
    idx = np.array(rng.sample(range(167), 37), np.int64)
    values = np.array([rng.randrange(U32) for _ in idx], np.uint32)
    impl.scatter_release_u32(buf, base, stride, idx, values)
    expected = bytearray(4096)
    for i, v in zip(idx.tolist(), values.tolist(), strict=True):
        struct.pack_into("=I", expected, base + i * stride, v)
    assert buf[:] == bytes(expected)
    out32, out64 = np.zeros(len(idx), np.uint32), np.zeros(len(idx), np.uint64)
    impl.gather_acquire_u32(buf, base, stride, idx, out32)
    impl.gather_acquire_u64(buf, base, stride, idx, out64)
    assert out32.tolist() == values.tolist()
    assert out64.tolist() == _words(buf, base, stride, idx, "=Q")
    impl.gather_acquire_u32(buf, base, stride, np.empty(0, np.int64), np.empty(0, np.uint32))


@pytest.mark.parametrize(
    ("base", "stride", "idx", "values", "error"),
    [
        (0, 8, [0, 3, 512], np.uint32, ValueError),  # the last address is past the end
        (0, 8, [0, -1], np.uint32, ValueError),
        (2, 8, [0, 1], np.uint32, ValueError),  # misaligned
        (4096, 8, [], np.uint32, ValueError),  # the base alone is outside
        (0, 8, [0, 1], np.float32, TypeError),  # values of the right size but not integers
        (0, 8, [0, 1], np.uint64, TypeError),  # values of the wrong width
        (0, 8, np.array([0.0, 1.0]), np.uint32, TypeError),  # indices must be int64
    ],
)
def test_scatter_checks_every_address_before_writing_any(impl, base, stride, idx, values, error):
    buf = mmap.mmap(-1, 4096)
    idx = np.asarray(idx, np.float64 if isinstance(idx, np.ndarray) else np.int64)
    with pytest.raises(error):
        impl.scatter_release_u32(buf, base, stride, idx, np.full(len(idx), 7, values))
    with pytest.raises(ValueError):  # one value too few
        impl.scatter_release_u32(buf, 0, 8, np.arange(3, dtype=np.int64), np.ones(2, np.uint32))
    assert buf[:] == b"\0" * 4096
    buf.close()  # no export left behind by the failed calls


def test_spin_returns_when_the_word_changes_or_the_time_is_up(impl):
    buf = mmap.mmap(-1, SIZE)
    assert impl.spin_while_equal_u64(buf, 8, 1, 10**9) is True  # differs already
    t0 = time.monotonic()
    assert impl.spin_while_equal_u64(buf, 8, 0, 3_000_000) is False
    assert time.monotonic() - t0 >= 0.003
    timer = threading.Timer(0.02, impl.store_release_u64, (buf, 8, 5))
    timer.start()
    t0 = time.monotonic()
    assert impl.spin_while_equal_u64(buf, 8, 0, 5 * 10**9) is True  # (the GIL is not held)
    assert time.monotonic() - t0 < 2
    timer.join()


def _readable(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def test_relay_turns_semaphore_posts_into_eventfd_wakeups(impl):
    name = f"/lla-test-relay-{os.getpid()}-{random.randrange(10**9)}"
    sem = posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode=0o600, initial_value=0)
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    flag = mmap.mmap(-1, SIZE)
    relay = impl.relay_start(name, efd, flag, 12)
    try:
        assert not _readable(efd, 0.05)  # no post, no wake-up
        sem.release()
        assert _readable(efd, 5) and os.eventfd_read(efd) == 1
        assert impl.load_acquire_u32(flag, 12) == 1  # raised before the eventfd was written
        impl.store_release_u32(flag, 12, 0)
        for _ in range(500):  # a burst: surplus posts are absorbed, at least one wake-up comes
            sem.release()
        assert _readable(efd, 5)
        deadline = time.monotonic() + 5
        while sem.value and time.monotonic() < deadline:
            time.sleep(0.001)
        assert sem.value == 0 and 1 <= os.eventfd_read(efd) <= 500
        impl.relay_stop(relay)
        impl.relay_stop(relay)  # idempotent
        left = sem.value  # the stop's own post, unless the relay took it on its way out
        sem.release()
        assert not _readable(efd, 0.05) and sem.value == left + 1  # stopped: nobody takes posts
        assert impl.load_acquire_u32(flag, 12) == 1
        with pytest.raises(OSError):
            impl.relay_start(name + "-missing", efd, flag, 12)
        with pytest.raises(ValueError):
            impl.relay_start(name, efd, flag, SIZE)  # the flag must lie inside the buffer
    finally:
        impl.relay_stop(relay)
        flag.close()  # the stopped relay holds no export of it
        os.close(efd)
        sem.unlink()
        sem.close()
