"""The compiled atomics (lightllm_async._atomics) against the pure-Python reference and by hand."""

from __future__ import annotations

import mmap
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightllm_async.ipc import atomics, atomics_ref

SIZE = 64
U32, U64 = 2**32, 2**64


def _native():
    """The compiled module. In CI (or with LLA_REQUIRE_C=1) a missing build fails instead of skipping."""
    if atomics.native is None:
        if os.environ.get("LLA_REQUIRE_C") == "1" or os.environ.get("CI"):
            pytest.fail("lightllm_async._atomics is not built")
        pytest.skip("lightllm_async._atomics is not built (pip install --no-build-isolation .)")
    return atomics.native


@pytest.fixture(params=["native", "ref"])
def impl(request):
    return _native() if request.param == "native" else atomics_ref


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
    native = _native()
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
    native = _native()
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
    native = _native()
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
