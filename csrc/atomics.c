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
 *
 * Many slots at once (one call per engine step or frontend wake-up, instead of one per slot):
 *
 *   gather_acquire_u32/u64(buf, base, stride, idx, out)    out[i] = load_acquire(base + idx[i]*stride)
 *   scatter_release_u32(buf, base, stride, idx, values)     store_release(base + idx[i]*stride, values[i])
 *
 * `idx` is a C-contiguous buffer of int64 (numpy int64), `out`/`values` C-contiguous buffers of the
 * access width (numpy uint32/uint64) with as many items; every address is checked like a single one.
 *
 *   spin_while_equal_u64(buf, off, value, max_ns) -> bool   busy-wait (GIL released) until the u64 at
 *                                                           off (acquire) differs from value: True,
 *                                                           or max_ns pass: False
 *
 * Wake-up relay: a native thread that waits on a named POSIX semaphore and turns each post into a
 * write to an eventfd, which an asyncio loop watches with add_reader. It never takes the GIL, so a
 * wake-up reaches the loop without a GIL hand-off between two Python threads.
 *
 *   relay_start(sem_name, fd, buf, flag_off) -> relay ; relay_stop(relay)  (idempotent; also on
 *                                                                           garbage collection)
 *
 * After each post the relay takes the surplus posts (sem_trywait), release-stores 1 to the u32 flag
 * at buf+flag_off (the poster may skip posts while it is set: the reader clears it after reading,
 * see ipc/frontend_side.py), then writes the eventfd: the reader looks at everything published
 * before its read of the eventfd, so nothing announced is lost. The relay keeps a buffer export
 * while it runs. Stopping posts the semaphore once to wake it; that post may be left behind.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

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

/* ---- many slots at once ---------------------------------------------------------------------- */

/* A C-contiguous buffer of `n` items of `itemsize` bytes (n < 0: any count, returned in *n). */
static int
get_array(PyObject *obj, int writable, Py_ssize_t itemsize, Py_ssize_t *n, Py_buffer *view)
{
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0)
        return -1;
    const char *f = view->format ? view->format : "B";
    if (*f == '@' || *f == '=' || *f == '<')
        f++;
    if (view->itemsize != itemsize || f[0] == '\0' || f[1] != '\0' || !strchr("bBhHiIlLqQ", f[0])) {
        PyErr_Format(PyExc_TypeError, "expected integers of %zd bytes, got format %s of %zd bytes",
                     itemsize, view->format ? view->format : "B", view->itemsize);
        PyBuffer_Release(view);
        return -1;
    }
    Py_ssize_t count = view->len / itemsize;
    if (*n >= 0 && count != *n) {
        PyErr_Format(PyExc_ValueError, "expected %zd items, got %zd", *n, count);
        PyBuffer_Release(view);
        return -1;
    }
    *n = count;
    return 0;
}

/* Shared argument handling of gather/scatter: the region, base, stride, idx and the value array.
 * On success the caller releases the three views. */
static int
many_args(const char *name, PyObject *const *a, Py_ssize_t na, Py_ssize_t width, int values_writable,
          Py_buffer *buf, Py_buffer *idx, Py_buffer *vals, char **base, Py_ssize_t *stride, Py_ssize_t *n)
{
    if (check_nargs(name, na, 5))
        return -1;
    Py_ssize_t off = PyNumber_AsSsize_t(a[1], PyExc_OverflowError);
    if (off == -1 && PyErr_Occurred())
        return -1;
    *stride = PyNumber_AsSsize_t(a[2], PyExc_OverflowError);
    if (*stride == -1 && PyErr_Occurred())
        return -1;
    if (PyObject_GetBuffer(a[0], buf, PyBUF_WRITABLE) < 0)
        return -1;
    *n = -1;
    if (get_array(a[3], 0, 8, n, idx) < 0) {
        PyBuffer_Release(buf);
        return -1;
    }
    if (get_array(a[4], values_writable, width, n, vals) < 0) {
        PyBuffer_Release(idx);
        PyBuffer_Release(buf);
        return -1;
    }
    if (off < 0 || *stride < 0 || off > buf->len - width) {
        PyErr_Format(PyExc_ValueError, "base %zd or stride %zd does not fit a buffer of %zd bytes", off,
                     *stride, buf->len);
        goto fail;
    }
    /* every address first, all or nothing: off + ix*stride in [0, len - width], aligned */
    const int64_t *ix = (const int64_t *)idx->buf;
    Py_ssize_t max_ix = *stride ? (buf->len - width - off) / *stride : PY_SSIZE_T_MAX;
    for (Py_ssize_t i = 0; i < *n; i++) {
        if (ix[i] < 0 || ix[i] > max_ix) {
            PyErr_Format(PyExc_ValueError, "item %zd: index %lld is outside a buffer of %zd bytes", i,
                         (long long)ix[i], buf->len);
            goto fail;
        }
        if ((uintptr_t)((char *)buf->buf + off + (Py_ssize_t)ix[i] * *stride) % (uintptr_t)width) {
            PyErr_Format(PyExc_ValueError, "item %zd: index %lld is not %zd-byte aligned", i,
                         (long long)ix[i], width);
            goto fail;
        }
    }
    *base = (char *)buf->buf + off;
    return 0;
fail:
    PyBuffer_Release(vals);
    PyBuffer_Release(idx);
    PyBuffer_Release(buf);
    return -1;
}

#define DEFINE_MANY(BITS, T)                                                                        \
    static PyObject *gather_acquire_u##BITS(PyObject *m, PyObject *const *a, Py_ssize_t na)         \
    {                                                                                               \
        Py_buffer buf, idx, out; char *base; Py_ssize_t stride, n;                                  \
        if (many_args("gather_acquire_u" #BITS, a, na, sizeof(T), 1, &buf, &idx, &out, &base,       \
                      &stride, &n) < 0)                                                             \
            return NULL;                                                                            \
        const int64_t *ix = (const int64_t *)idx.buf;                                               \
        T *dst = (T *)out.buf;                                                                      \
        for (Py_ssize_t i = 0; i < n; i++)                                                          \
            dst[i] = __atomic_load_n((T *)(base + ix[i] * stride), __ATOMIC_ACQUIRE);               \
        PyBuffer_Release(&out); PyBuffer_Release(&idx); PyBuffer_Release(&buf);                     \
        Py_RETURN_NONE;                                                                             \
    }

DEFINE_MANY(32, uint32_t)
DEFINE_MANY(64, uint64_t)

static PyObject *
scatter_release_u32(PyObject *m, PyObject *const *a, Py_ssize_t na)
{
    Py_buffer buf, idx, vals; char *base; Py_ssize_t stride, n;
    if (many_args("scatter_release_u32", a, na, 4, 0, &buf, &idx, &vals, &base, &stride, &n) < 0)
        return NULL;
    const int64_t *ix = (const int64_t *)idx.buf;
    const uint32_t *src = (const uint32_t *)vals.buf;
    for (Py_ssize_t i = 0; i < n; i++)
        __atomic_store_n((uint32_t *)(base + ix[i] * stride), src[i], __ATOMIC_RELEASE);
    PyBuffer_Release(&vals); PyBuffer_Release(&idx); PyBuffer_Release(&buf);
    Py_RETURN_NONE;
}

static uint64_t
now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static inline void
cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static PyObject *
spin_while_equal_u64(PyObject *m, PyObject *const *a, Py_ssize_t na)
{
    Py_buffer v; char *p; uint64_t value, max_ns;
    if (check_nargs("spin_while_equal_u64", na, 4) || as_unsigned(a[2], 64, &value)
        || as_unsigned(a[3], 64, &max_ns) || get_ptr(a[0], a[1], 8, 8, &v, &p))
        return NULL;
    int changed = 0;
    Py_BEGIN_ALLOW_THREADS
    uint64_t deadline = now_ns() + max_ns;
    for (unsigned k = 0;; k++) {
        if (__atomic_load_n((uint64_t *)p, __ATOMIC_ACQUIRE) != value) {
            changed = 1;
            break;
        }
        if ((k & 63) == 0 && now_ns() >= deadline)
            break;
        cpu_relax();
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&v);
    return PyBool_FromLong(changed);
}

/* ---- wake-up relay: semaphore -> eventfd ------------------------------------------------------ */

#define RELAY_CAPSULE "lightllm_async._atomics.relay"

typedef struct {
    sem_t *sem;
    int fd;
    Py_buffer view;  /* holds the mapping while the thread runs */
    uint32_t *flag;
    int stop;     /* set (release) by relay_stop before its post */
    int running;  /* 1 between a successful start and the join */
    pthread_t thread;
} relay_t;

static void *
relay_main(void *arg)
{
    relay_t *r = (relay_t *)arg;
    const uint64_t one = 1;
    for (;;) {
        /* Checked before every wait: a stop whose post we absorbed below is seen here. */
        if (__atomic_load_n(&r->stop, __ATOMIC_ACQUIRE))
            break;
        if (sem_wait(r->sem) != 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (__atomic_load_n(&r->stop, __ATOMIC_ACQUIRE))
            break;
        while (sem_trywait(r->sem) == 0) {
        }
        __atomic_store_n(r->flag, 1, __ATOMIC_RELEASE);
        /* EAGAIN means the counter is already huge: the reader has a wake-up pending anyway. */
        ssize_t w;
        do {
            w = write(r->fd, &one, sizeof one);
        } while (w < 0 && errno == EINTR);
    }
    return NULL;
}

static void
relay_join(relay_t *r)
{
    if (!r->running)
        return;
    __atomic_store_n(&r->stop, 1, __ATOMIC_RELEASE);
    sem_post(r->sem);
    pthread_join(r->thread, NULL);
    r->running = 0;
    sem_close(r->sem);
}

static void
relay_destroy(PyObject *capsule)
{
    relay_t *r = (relay_t *)PyCapsule_GetPointer(capsule, RELAY_CAPSULE);
    if (r == NULL) {
        PyErr_Clear();
        return;
    }
    relay_join(r);  /* the thread never takes the GIL: joining while holding it cannot deadlock */
    if (r->view.obj != NULL)
        PyBuffer_Release(&r->view);
    PyMem_RawFree(r);
}

static PyObject *
relay_start(PyObject *m, PyObject *const *a, Py_ssize_t na)
{
    if (check_nargs("relay_start", na, 4))
        return NULL;
    const char *name = PyUnicode_AsUTF8(a[0]);
    if (name == NULL)
        return NULL;
    long fd = PyLong_AsLong(a[1]);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    if (fd < 0 || fd > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "bad file descriptor");
        return NULL;
    }
    relay_t *r = PyMem_RawCalloc(1, sizeof *r);
    if (r == NULL)
        return PyErr_NoMemory();
    r->fd = (int)fd;
    char *p;
    if (get_ptr(a[2], a[3], 4, 4, &r->view, &p) < 0) {
        PyMem_RawFree(r);
        return NULL;
    }
    r->flag = (uint32_t *)p;
    r->sem = sem_open(name, 0);
    if (r->sem == SEM_FAILED) {
        PyErr_SetFromErrnoWithFilename(PyExc_OSError, name);
        goto fail;
    }
    int err = pthread_create(&r->thread, NULL, relay_main, r);
    if (err != 0) {
        sem_close(r->sem);
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        goto fail;
    }
    r->running = 1;
    PyObject *capsule = PyCapsule_New(r, RELAY_CAPSULE, relay_destroy);
    if (capsule == NULL) {
        relay_join(r);
        goto fail;
    }
    return capsule;
fail:
    PyBuffer_Release(&r->view);
    PyMem_RawFree(r);
    return NULL;
}

static PyObject *
relay_stop(PyObject *m, PyObject *capsule)
{
    relay_t *r = (relay_t *)PyCapsule_GetPointer(capsule, RELAY_CAPSULE);
    if (r == NULL)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    relay_join(r);
    Py_END_ALLOW_THREADS
    if (r->view.obj != NULL)
        PyBuffer_Release(&r->view);  /* so that the mapping can be closed */
    Py_RETURN_NONE;
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
    FAST(gather_acquire_u32, "gather_acquire_u32(buf, base, stride, idx, out) -> None"),
    FAST(gather_acquire_u64, "gather_acquire_u64(buf, base, stride, idx, out) -> None"),
    FAST(scatter_release_u32, "scatter_release_u32(buf, base, stride, idx, values) -> None"),
    FAST(spin_while_equal_u64, "spin_while_equal_u64(buf, off, value, max_ns) -> bool (changed)"),
    FAST(relay_start, "relay_start(sem_name, fd, buf, flag_off) -> relay"),
    {"relay_stop", relay_stop, METH_O, "relay_stop(relay) -> None"},
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
