/*
 * lightllm_async._atomics: atomic operations on addresses inside a Python buffer.
 *
 * Every function takes a writable buffer (mmap, memoryview, bytearray) and a byte offset into it.
 * The offset is checked against the buffer's length and the address against the natural alignment
 * of the access (ValueError otherwise). Values that do not fit the width raise OverflowError.
 *
 *   load_acquire_u32/u64(buf, off) -> int
 *   store_release_u32/u64(buf, off, value) -> None
 *   cas_u32/u64(buf, off, expected, desired) -> bool          (sequentially consistent)
 *   fetch_add_u32/u64(buf, off, delta) -> old value           (sequentially consistent, wraps;
 *                                                              a negative delta subtracts)
 *   fence_seq_cst() -> None                                   (full fence, for Dekker-style flags)
 *
 * Free-slot allocator: a Treiber stack over a region of the buffer. Layout at `off` (8-aligned):
 *
 *   u64 head    low 32 bits: index of the top free slot (0xFFFFFFFF: empty); high 32 bits: a tag
 *               bumped on every successful pop or push, so a head that was popped and pushed back
 *               in between (ABA) no longer compares equal.
 *   u32 n       capacity, written once by slot_stack_init
 *   u32 count   free slots; maintained after each pop/push, so only approximate while others run
 *   u32 next[n] next[i]: the index below i on the stack (0xFFFFFFFF at the bottom)
 *
 *   slot_stack_nbytes(n) -> int ; slot_stack_init(buf, off, n) ; slot_stack_pop(buf, off) -> int
 *   (-1 if empty) ; slot_stack_push(buf, off, idx) ; slot_stack_count(buf, off) -> int
 *
 * A push writes next[idx] and then publishes it with the release CAS on head; a pop reads head with
 * acquire, so the next[] it reads is the one written by the push that put the index there (a stale
 * next[] can only be read when head changed in between, and then the tagged CAS fails).
 * The caller must push only indices it popped (the slot table's state CAS guarantees that).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#define NIL 0xFFFFFFFFu
#define STACK_HDR 16

typedef struct {
    uint64_t head;
    uint32_t n;
    uint32_t count;
    uint32_t next[];
} slot_stack;

/* Borrow a writable view of `obj` and point `*out` at `off`, checking bounds and alignment.
 * On success the caller releases `view`. */
static int
get_ptr(PyObject *obj, PyObject *off_obj, Py_ssize_t size, Py_ssize_t align, Py_buffer *view,
        char **out)
{
    Py_ssize_t off = PyNumber_AsSsize_t(off_obj, PyExc_OverflowError);
    if (off == -1 && PyErr_Occurred())
        return -1;
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE) < 0)
        return -1;
    if (off < 0 || size > view->len || off > view->len - size) {
        PyErr_Format(PyExc_ValueError, "offset %zd (+%zd bytes) is outside a buffer of %zd bytes",
                     off, size, view->len);
        PyBuffer_Release(view);
        return -1;
    }
    char *p = (char *)view->buf + off;
    if ((uintptr_t)p % (uintptr_t)align != 0) {
        PyErr_Format(PyExc_ValueError, "offset %zd is not %zd-byte aligned", off, align);
        PyBuffer_Release(view);
        return -1;
    }
    *out = p;
    return 0;
}

/* An int in [0, 2**bits). */
static int
as_unsigned(PyObject *o, int bits, uint64_t *out)
{
    if (!PyLong_Check(o)) {
        PyErr_Format(PyExc_TypeError, "expected int, got %.100s", Py_TYPE(o)->tp_name);
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    if (bits == 32 && v > UINT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "value does not fit in 32 bits");
        return -1;
    }
    *out = v;
    return 0;
}

/* An int in [-2**(bits-1), 2**bits), reduced modulo 2**bits. */
static int
as_delta(PyObject *o, int bits, uint64_t *out)
{
    if (!PyLong_Check(o)) {
        PyErr_Format(PyExc_TypeError, "expected int, got %.100s", Py_TYPE(o)->tp_name);
        return -1;
    }
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (overflow > 0 && bits == 64)
        return as_unsigned(o, 64, out);
    long long lo = bits == 32 ? -(1LL << 31) : LLONG_MIN;
    if (overflow != 0 || v < lo || (bits == 32 && v > (long long)UINT32_MAX)) {
        PyErr_SetString(PyExc_OverflowError, "delta out of range");
        return -1;
    }
    *out = (uint64_t)v;
    return 0;
}

static int
check_nargs(const char *name, Py_ssize_t nargs, Py_ssize_t want)
{
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments (%zd given)", name, want, nargs);
        return -1;
    }
    return 0;
}

/* ---- loads, stores, CAS, fetch-add ------------------------------------------------------------ */

#define DEFINE_WIDTH(BITS, T)                                                                       \
    static PyObject *load_acquire_u##BITS(PyObject *m, PyObject *const *a, Py_ssize_t na)           \
    {                                                                                               \
        Py_buffer v; char *p;                                                                       \
        if (check_nargs("load_acquire_u" #BITS, na, 2) || get_ptr(a[0], a[1], sizeof(T), sizeof(T), &v, &p)) \
            return NULL;                                                                            \
        T x = __atomic_load_n((T *)p, __ATOMIC_ACQUIRE);                                            \
        PyBuffer_Release(&v);                                                                       \
        return PyLong_FromUnsignedLongLong(x);                                                      \
    }                                                                                               \
    static PyObject *store_release_u##BITS(PyObject *m, PyObject *const *a, Py_ssize_t na)          \
    {                                                                                               \
        Py_buffer v; char *p; uint64_t x;                                                           \
        if (check_nargs("store_release_u" #BITS, na, 3) || as_unsigned(a[2], BITS, &x)              \
            || get_ptr(a[0], a[1], sizeof(T), sizeof(T), &v, &p))                                   \
            return NULL;                                                                            \
        __atomic_store_n((T *)p, (T)x, __ATOMIC_RELEASE);                                           \
        PyBuffer_Release(&v);                                                                       \
        Py_RETURN_NONE;                                                                             \
    }                                                                                               \
    static PyObject *cas_u##BITS(PyObject *m, PyObject *const *a, Py_ssize_t na)                    \
    {                                                                                               \
        Py_buffer v; char *p; uint64_t e, d;                                                        \
        if (check_nargs("cas_u" #BITS, na, 4) || as_unsigned(a[2], BITS, &e)                        \
            || as_unsigned(a[3], BITS, &d) || get_ptr(a[0], a[1], sizeof(T), sizeof(T), &v, &p))   \
            return NULL;                                                                            \
        T expected = (T)e;                                                                          \
        int ok = __atomic_compare_exchange_n((T *)p, &expected, (T)d, 0, __ATOMIC_SEQ_CST,          \
                                             __ATOMIC_SEQ_CST);                                     \
        PyBuffer_Release(&v);                                                                       \
        return PyBool_FromLong(ok);                                                                 \
    }                                                                                               \
    static PyObject *fetch_add_u##BITS(PyObject *m, PyObject *const *a, Py_ssize_t na)              \
    {                                                                                               \
        Py_buffer v; char *p; uint64_t d;                                                           \
        if (check_nargs("fetch_add_u" #BITS, na, 3) || as_delta(a[2], BITS, &d)                     \
            || get_ptr(a[0], a[1], sizeof(T), sizeof(T), &v, &p))                                   \
            return NULL;                                                                            \
        T old = __atomic_fetch_add((T *)p, (T)d, __ATOMIC_SEQ_CST);                                 \
        PyBuffer_Release(&v);                                                                       \
        return PyLong_FromUnsignedLongLong(old);                                                    \
    }

DEFINE_WIDTH(32, uint32_t)
DEFINE_WIDTH(64, uint64_t)

static PyObject *
fence_seq_cst(PyObject *m, PyObject *unused)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}

/* ---- free-slot stack ------------------------------------------------------------------------- */

static uint64_t
pack(uint32_t tag, uint32_t idx)
{
    return ((uint64_t)tag << 32) | idx;
}

/* Map the stack at `off`, checking that its header and next[] array lie inside the buffer. */
static int
get_stack(PyObject *buf, PyObject *off, Py_buffer *view, slot_stack **out)
{
    char *p;
    if (get_ptr(buf, off, STACK_HDR, 8, view, &p) < 0)
        return -1;
    slot_stack *s = (slot_stack *)p;
    uint64_t need = STACK_HDR + 4 * (uint64_t)s->n;
    uint64_t have = (uint64_t)(((char *)view->buf + view->len) - p);
    if (need > have) {
        PyErr_Format(PyExc_ValueError, "slot stack of %u slots does not fit the buffer", s->n);
        PyBuffer_Release(view);
        return -1;
    }
    *out = s;
    return 0;
}

static PyObject *
slot_stack_nbytes(PyObject *m, PyObject *n_obj)
{
    uint64_t n;
    if (as_unsigned(n_obj, 32, &n) < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(STACK_HDR + 4 * n);
}

/* Not thread-safe: run once, before the region is shared. Pops then return 0, 1, 2, ... */
static PyObject *
slot_stack_init(PyObject *m, PyObject *const *a, Py_ssize_t na)
{
    Py_buffer v; char *p; uint64_t n;
    if (check_nargs("slot_stack_init", na, 3) || as_unsigned(a[2], 32, &n))
        return NULL;
    if (n >= NIL) {
        PyErr_SetString(PyExc_ValueError, "too many slots");
        return NULL;
    }
    if (get_ptr(a[0], a[1], (Py_ssize_t)(STACK_HDR + 4 * n), 8, &v, &p) < 0)
        return NULL;
    slot_stack *s = (slot_stack *)p;
    for (uint32_t i = 0; i < n; i++)
        __atomic_store_n(&s->next[i], i + 1 < n ? i + 1 : NIL, __ATOMIC_RELAXED);
    s->n = (uint32_t)n;
    __atomic_store_n(&s->count, (uint32_t)n, __ATOMIC_RELAXED);
    __atomic_store_n(&s->head, pack(0, n ? 0 : NIL), __ATOMIC_SEQ_CST);
    PyBuffer_Release(&v);
    Py_RETURN_NONE;
}

static PyObject *
slot_stack_pop(PyObject *m, PyObject *const *a, Py_ssize_t na)
{
    Py_buffer v; slot_stack *s;
    if (check_nargs("slot_stack_pop", na, 2) || get_stack(a[0], a[1], &v, &s))
        return NULL;
    uint64_t old = __atomic_load_n(&s->head, __ATOMIC_ACQUIRE);
    for (;;) {
        uint32_t idx = (uint32_t)old;
        if (idx == NIL) {
            PyBuffer_Release(&v);
            return PyLong_FromLong(-1);
        }
        if (idx >= s->n) {
            PyBuffer_Release(&v);
            PyErr_Format(PyExc_RuntimeError, "slot stack corrupted: head index %u", idx);
            return NULL;
        }
        uint32_t nxt = __atomic_load_n(&s->next[idx], __ATOMIC_RELAXED);
        uint64_t new = pack((uint32_t)(old >> 32) + 1, nxt);
        if (__atomic_compare_exchange_n(&s->head, &old, new, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            __atomic_fetch_sub(&s->count, 1, __ATOMIC_RELAXED);
            PyBuffer_Release(&v);
            return PyLong_FromUnsignedLong(idx);
        }
    }
}

static PyObject *
slot_stack_push(PyObject *m, PyObject *const *a, Py_ssize_t na)
{
    Py_buffer v; slot_stack *s; uint64_t idx;
    if (check_nargs("slot_stack_push", na, 3) || as_unsigned(a[2], 32, &idx)
        || get_stack(a[0], a[1], &v, &s))
        return NULL;
    if (idx >= s->n) {
        PyBuffer_Release(&v);
        PyErr_Format(PyExc_ValueError, "slot %llu out of range [0, %u)", (unsigned long long)idx, s->n);
        return NULL;
    }
    uint64_t old = __atomic_load_n(&s->head, __ATOMIC_ACQUIRE);
    for (;;) {
        __atomic_store_n(&s->next[idx], (uint32_t)old, __ATOMIC_RELAXED);
        uint64_t new = pack((uint32_t)(old >> 32) + 1, (uint32_t)idx);
        if (__atomic_compare_exchange_n(&s->head, &old, new, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            break;
    }
    __atomic_fetch_add(&s->count, 1, __ATOMIC_RELAXED);
    PyBuffer_Release(&v);
    Py_RETURN_NONE;
}

/* The count read as signed and clamped to [0, n]: it may dip below zero or above n for a moment
 * while pops and pushes race; it is exact when no one is allocating. */
static PyObject *
slot_stack_count(PyObject *m, PyObject *const *a, Py_ssize_t na)
{
    Py_buffer v; slot_stack *s;
    if (check_nargs("slot_stack_count", na, 2) || get_stack(a[0], a[1], &v, &s))
        return NULL;
    int32_t c = (int32_t)__atomic_load_n(&s->count, __ATOMIC_ACQUIRE);
    long n = (long)s->n;
    PyBuffer_Release(&v);
    return PyLong_FromLong(c < 0 ? 0 : (c > n ? n : c));
}

/* ---- module ---------------------------------------------------------------------------------- */

#define FAST(name, doc) {#name, (PyCFunction)(void (*)(void))name, METH_FASTCALL, doc}

static PyMethodDef methods[] = {
    FAST(load_acquire_u32, "load_acquire_u32(buf, off) -> int"),
    FAST(load_acquire_u64, "load_acquire_u64(buf, off) -> int"),
    FAST(store_release_u32, "store_release_u32(buf, off, value) -> None"),
    FAST(store_release_u64, "store_release_u64(buf, off, value) -> None"),
    FAST(cas_u32, "cas_u32(buf, off, expected, desired) -> bool"),
    FAST(cas_u64, "cas_u64(buf, off, expected, desired) -> bool"),
    FAST(fetch_add_u32, "fetch_add_u32(buf, off, delta) -> old"),
    FAST(fetch_add_u64, "fetch_add_u64(buf, off, delta) -> old"),
    {"fence_seq_cst", fence_seq_cst, METH_NOARGS, "fence_seq_cst() -> None"},
    {"slot_stack_nbytes", slot_stack_nbytes, METH_O, "slot_stack_nbytes(n) -> int"},
    FAST(slot_stack_init, "slot_stack_init(buf, off, n) -> None"),
    FAST(slot_stack_pop, "slot_stack_pop(buf, off) -> int (-1 if empty)"),
    FAST(slot_stack_push, "slot_stack_push(buf, off, idx) -> None"),
    FAST(slot_stack_count, "slot_stack_count(buf, off) -> int"),
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_atomics",
    .m_doc = "Atomic loads, stores, CAS and fetch-add on buffers, and a lock-free free-slot stack.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__atomics(void)
{
    return PyModule_Create(&module);
}
