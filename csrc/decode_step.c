/*
 * A whole decode step of a Llama-family model on the CPU, for the int4-packed weights of
 * `Int4Linear` (layers/quantized.py) and the int8 LM head of `Int8Head`: one Python call per step
 * (runner/cpu_native.py), no torch op inside. Part of the `_gemv` extension; the products are
 * csrc/gemv.c's kernels at its active instruction level.
 *
 *   decode_model_new(dims, floats, ptrs) -> capsule
 *       dims   (layers, hidden, heads, kv_heads, head_dim, inter, vocab, req_stride, bf16,
 *               threads, spin_us)
 *       floats (rms eps, attention scale)
 *       ptrs   embed [V, H], final norm [H], head w, head rs (0, 0: no head), cos_sin [P, D]
 *              float32, then 12 a layer: input norm, qkv w, qkv sm, o w, o sm, post norm, gate|up
 *              w, gate|up sm, down w, down sm, k cache, v cache
 *   decode_step(model, B, ids, positions, slots, req_to_token, req_idx, seq_lens, hidden, logits)
 *       B rows, one new token each: ids / positions / slots int64 [B]; req_to_token int32 [R,
 *       req_stride], req_idx / seq_lens int32 [B] (seq_lens counts the new token); writes the
 *       final normed hidden states float32 [B, H] to `hidden` and the head's float32 logits
 *       [B, V] to `logits` (either may be 0: not wanted).
 *
 * The activations, norm weights, embedding and KV cache are the model's dtype: bfloat16 (bf16
 * 1) or float32. In bfloat16 the step rounds where the eager path (models/llama.py with the
 * kernels' CPU paths) rounds: every product's output, the residual sums, the norms, rope, SiLU*mul
 * and the attention output; the arithmetic between is float32, as there. So the two differ only
 * by the order of float32 sums (norms, softmax), which moves a bfloat16 value by one step at a
 * near-tie now and then.
 *
 * Threads: `threads - 1` workers share every product's output tiles and the attention's (row, kv
 * head) units with the calling thread, claimed in chunks from an atomic counter, so a thread that
 * the OS deschedules leaves its remaining chunks to the others. Between phases the threads meet at
 * a barrier that spins for at most spin_us microseconds and then sleeps on a condition variable:
 * on a busy machine a waiting thread gives its core back instead of holding it (OpenMP's spinning
 * made the engine 20-80x slower there, issue 12).
 */
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "gemv.h"

#if defined(__x86_64__) || defined(__i386__)
#define STEP_X86 1
#include <immintrin.h>
#endif

#define MAX_GROUP 16  /* query heads per kv head */
#define MAX_DIM 256   /* head dim */
#define PHASES 5      /* barriers a layer: after q|k|v, attention, o, gate|up, down */
#define CHUNKS 8      /* chunks a thread of each product's tiles: balance against claims */

/* ---- barrier: spin briefly, then sleep ----------------------------------------------------- */

typedef struct {
    atomic_int count, sleepers;
    atomic_uint gen;
    int n, spin_us;
    pthread_mutex_t mu;
    pthread_cond_t cv;
} Barrier;

static inline void cpu_relax(void) {
#ifdef STEP_X86
    _mm_pause();
#endif
}

static double now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec * 1e-3;
}

/* The last of n to arrive opens the next generation and wakes the sleepers; the others spin up to
   spin_us, then sleep. (A sleeper registers before it reads gen, the opener writes gen before it
   reads the sleepers, both sequentially consistent: one of them sees the other.) */
static void barrier_wait(Barrier *b) {
    unsigned gen = atomic_load(&b->gen);
    if (atomic_fetch_add(&b->count, 1) == b->n - 1) {
        atomic_store(&b->count, 0);
        atomic_store(&b->gen, gen + 1);
        if (atomic_load(&b->sleepers) > 0) {
            pthread_mutex_lock(&b->mu);
            pthread_cond_broadcast(&b->cv);
            pthread_mutex_unlock(&b->mu);
        }
        return;
    }
    double until = -1.0;
    for (int i = 1;; i++) {
        if (atomic_load_explicit(&b->gen, memory_order_acquire) != gen)
            return;
        cpu_relax();
        if ((i & 31) == 0) {
            double t = now_us();
            if (until < 0)
                until = t + b->spin_us;
            else if (t >= until)
                break;
        }
    }
    pthread_mutex_lock(&b->mu);
    atomic_fetch_add(&b->sleepers, 1);
    while (atomic_load(&b->gen) == gen)
        pthread_cond_wait(&b->cv, &b->mu);
    atomic_fetch_sub(&b->sleepers, 1);
    pthread_mutex_unlock(&b->mu);
}

/* ---- the model ------------------------------------------------------------------------------ */

typedef struct {
    const void *in_norm, *post_norm; /* [H], the model's dtype */
    const uint8_t *qkv_w, *o_w, *gu_w, *down_w;
    const uint16_t *qkv_sm, *o_sm, *gu_sm, *down_sm;
    void *k_cache, *v_cache; /* [slots, Hk, D], the model's dtype */
} Layer;

typedef struct { /* one thread's own: what every thread computes alike, and its attention scratch */
    float *res, *h, *act; /* residual and normed rows [B, H], SiLU*mul [B, I] */
    int16_t *xq;          /* quantized activations [B, Kmax] */
    float *dx, *xs;       /* [B, Kmax / 32] */
    float *scores;        /* [group, cap_len] */
    int cap_len;
} Scratch;

typedef struct Model {
    int L, H, Hq, Hk, D, I, V, stride, bf16, nthreads, kmax, nqkv;
    float eps, scale;
    Layer *layers;
    const void *embed, *final_norm;
    const int8_t *head_w;
    const float *head_rs, *cos_sin;
    int cap_B;
    float *qkv, *att, *o, *gu, *down; /* shared outputs [B, N] */
    Scratch *scratch;
    atomic_int *counters; /* one a phase of the step: the next unclaimed tile / unit */
    /* the step's arguments */
    int B;
    const int64_t *ids, *pos, *slots;
    const int32_t *req_to_token, *req_idx, *seq_lens;
    float *hidden, *logits;
    /* workers */
    pthread_t *threads;
    Barrier bar;
    int quit, started;
} Model;

static inline float bf16_f(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f_bf16(float f) { /* round to nearest even (no NaN here) */
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFF + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

static inline float round_bf16(float f) { return bf16_f(f_bf16(f)); }

/* x[n] rounded to the model's dtype (bfloat16 values kept as float32) */
static inline void round_to_dtype(const Model *m, float *x, int n) {
    if (m->bf16)
        for (int i = 0; i < n; i++)
            x[i] = round_bf16(x[i]);
}

/* element i of a row of the model's dtype */
static inline float load_dt(const Model *m, const void *p, size_t i) {
    return m->bf16 ? bf16_f(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store_dt(const Model *m, void *p, size_t i, float v) {
    if (m->bf16)
        ((uint16_t *)p)[i] = f_bf16(v);
    else
        ((float *)p)[i] = v;
}

/* out = x / rms(x) * w for B rows of H, in float32 (the sum in double), rounded to the dtype */
static void rms_norm(const Model *m, const float *x, const void *w, float *out, int B) {
    int H = m->H;
    for (int b = 0; b < B; b++) {
        const float *xb = x + (size_t)b * H;
        double ss = 0.0;
        for (int i = 0; i < H; i++)
            ss += (double)xb[i] * xb[i];
        float r = 1.0f / sqrtf((float)(ss / H) + m->eps);
        for (int i = 0; i < H; i++)
            out[(size_t)b * H + i] = (xb[i] * r) * load_dt(m, w, i);
        round_to_dtype(m, out + (size_t)b * H, H);
    }
}

/* res += y, rounded to the dtype (the eager path's `x + residual` in the model's dtype) */
static void add_residual(const Model *m, float *res, const float *y, int n) {
    for (int i = 0; i < n; i++)
        res[i] += y[i];
    round_to_dtype(m, res, n);
}

static int chunk_of(const Model *m, int units) {
    if (m->nthreads == 1)
        return units;
    int c = units / (m->nthreads * CHUNKS);
    return c > 0 ? c : 1;
}

static inline int claim(Model *m, int phase, int chunk) {
    return atomic_fetch_add_explicit(&m->counters[phase], chunk, memory_order_relaxed);
}

/* This thread's share of y [B, N] = x W^T (x already quantized in s), rounded to the dtype. */
static void par_int4(Model *m, int phase, Scratch *s, const uint8_t *w, const uint16_t *sm, int K,
                     int N, float *y) {
    int tiles = (N + GEMV_TILE - 1) / GEMV_TILE, chunk = chunk_of(m, tiles);
    for (int t0; (t0 = claim(m, phase, chunk)) < tiles;) {
        int t1 = t0 + chunk < tiles ? t0 + chunk : tiles;
        gemv_int4_tiles(w, sm, s->xq, s->dx, s->xs, m->B, K, N, t0, t1, y, 0);
        int c0 = t0 * GEMV_TILE, c1 = t1 * GEMV_TILE < N ? t1 * GEMV_TILE : N;
        for (int b = 0; b < m->B; b++)
            round_to_dtype(m, y + (size_t)b * N + c0, c1 - c0);
    }
}

static void quantize_rows(const Model *m, Scratch *s, const float *x, int K) {
    gemv_quantize(x, 0, m->B, K, s->xq, s->dx, s->xs);
}

/* ---- attention: one row's kv head over its context ------------------------------------------ */

/* scores[h * n + t] = scale * q_h . k_t for the group's G query heads (q float32 [G, D]) */
static void scores_c(const Model *m, const float *q, int G, const void *kc, const int32_t *rows, int n,
                     int head, float *scores) {
    int D = m->D;
    size_t row = (size_t)m->Hk * D;
    for (int t = 0; t < n; t++) {
        float k[MAX_DIM];
        size_t at = (size_t)rows[t] * row + (size_t)head * D;
        for (int d = 0; d < D; d++)
            k[d] = load_dt(m, kc, at + d);
        for (int h = 0; h < G; h++) {
            float acc = 0.0f;
            for (int d = 0; d < D; d++)
                acc += q[h * D + d] * k[d];
            scores[h * n + t] = acc * m->scale;
        }
    }
}

/* o[h] = sum_t p[h * n + t] v_t for the group's heads (o float32 [G, D], zeroed here) */
static void values_c(const Model *m, const float *p, int G, const void *vc, const int32_t *rows, int n,
                     int head, float *o) {
    int D = m->D;
    size_t row = (size_t)m->Hk * D;
    memset(o, 0, sizeof(float) * G * D);
    for (int t = 0; t < n; t++) {
        size_t at = (size_t)rows[t] * row + (size_t)head * D;
        for (int d = 0; d < D; d++) {
            float v = load_dt(m, vc, at + d);
            for (int h = 0; h < G; h++)
                o[h * D + d] += p[h * n + t] * v;
        }
    }
}

#ifdef STEP_X86
#define TARGET_512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#define TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))

static inline TARGET_512 __m512 load16_512(const Model *m, const void *p, size_t at) {
    if (m->bf16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + at))), 16));
    return _mm512_loadu_ps((const float *)p + at);
}

static TARGET_512 void scores_512(const Model *m, const float *q, int G, const void *kc, const int32_t *rows,
                                  int n, int head, float *scores) {
    int D = m->D, J = D / 16;
    size_t row = (size_t)m->Hk * D;
    for (int t = 0; t < n; t++) {
        size_t at = (size_t)rows[t] * row + (size_t)head * D;
        __m512 k[MAX_DIM / 16];
        for (int j = 0; j < J; j++)
            k[j] = load16_512(m, kc, at + 16 * j);
        for (int h = 0; h < G; h++) {
            __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(q + h * D), k[0]);
            for (int j = 1; j < J; j++)
                acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + h * D + 16 * j), k[j], acc);
            scores[h * n + t] = _mm512_reduce_add_ps(acc) * m->scale;
        }
    }
}

static TARGET_512 void values_512(const Model *m, const float *p, int G, const void *vc, const int32_t *rows,
                                  int n, int head, float *o) {
    int D = m->D, J = D / 16;
    size_t row = (size_t)m->Hk * D;
    memset(o, 0, sizeof(float) * G * D);
    for (int t = 0; t < n; t++) {
        size_t at = (size_t)rows[t] * row + (size_t)head * D;
        for (int j = 0; j < J; j++) {
            __m512 v = load16_512(m, vc, at + 16 * j);
            for (int h = 0; h < G; h++) {
                float *oh = o + h * D + 16 * j;
                _mm512_storeu_ps(oh, _mm512_fmadd_ps(_mm512_set1_ps(p[h * n + t]), v, _mm512_loadu_ps(oh)));
            }
        }
    }
}

static inline TARGET_AVX2 __m256 load8_avx2(const Model *m, const void *p, size_t at) {
    if (m->bf16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + at))), 16));
    return _mm256_loadu_ps((const float *)p + at);
}

static TARGET_AVX2 void scores_avx2(const Model *m, const float *q, int G, const void *kc, const int32_t *rows,
                                    int n, int head, float *scores) {
    int D = m->D, J = D / 8;
    size_t row = (size_t)m->Hk * D;
    for (int t = 0; t < n; t++) {
        size_t at = (size_t)rows[t] * row + (size_t)head * D;
        __m256 k[MAX_DIM / 8];
        for (int j = 0; j < J; j++)
            k[j] = load8_avx2(m, kc, at + 8 * j);
        for (int h = 0; h < G; h++) {
            __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(q + h * D), k[0]);
            for (int j = 1; j < J; j++)
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + h * D + 8 * j), k[j], acc);
            __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
            s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            s = _mm_add_ss(s, _mm_movehdup_ps(s));
            scores[h * n + t] = _mm_cvtss_f32(s) * m->scale;
        }
    }
}

static TARGET_AVX2 void values_avx2(const Model *m, const float *p, int G, const void *vc, const int32_t *rows,
                                    int n, int head, float *o) {
    int D = m->D, J = D / 8;
    size_t row = (size_t)m->Hk * D;
    memset(o, 0, sizeof(float) * G * D);
    for (int t = 0; t < n; t++) {
        size_t at = (size_t)rows[t] * row + (size_t)head * D;
        for (int j = 0; j < J; j++) {
            __m256 v = load8_avx2(m, vc, at + 8 * j);
            for (int h = 0; h < G; h++) {
                float *oh = o + h * D + 8 * j;
                _mm256_storeu_ps(oh, _mm256_fmadd_ps(_mm256_set1_ps(p[h * n + t]), v, _mm256_loadu_ps(oh)));
            }
        }
    }
}
#endif /* STEP_X86 */

/* (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) of one head at `pos`, rounded to the dtype: the
   eager path's float32 products and sums (no fused multiply-add: this function has no vector
   target, so none is emitted) */
static void rope(const Model *m, float *x, int64_t pos) {
    int half = m->D / 2;
    const float *cs = m->cos_sin + (size_t)pos * m->D;
    float y[MAX_DIM];
    for (int i = 0; i < half; i++) {
        float a = x[i] * cs[i], b = x[i + half] * cs[half + i];
        float c = x[i + half] * cs[i], d = x[i] * cs[half + i];
        y[i] = a - b;
        y[i + half] = c + d;
    }
    memcpy(x, y, sizeof(float) * m->D);
    round_to_dtype(m, x, m->D);
}

/* Row b, kv head g: rope its k and its group's q, store k and v at the row's slot, attend over
   the row's context (its req_to_token row, seq_lens[b] tokens), write the group's heads of att. */
static void attend_unit(Model *m, Scratch *s, const Layer *ly, int b, int g) {
    int D = m->D, G = m->Hq / m->Hk, level = gemv_level();
    float *qkv = m->qkv + (size_t)b * m->nqkv;
    float *q = qkv + (size_t)g * G * D, *k = qkv + (size_t)m->Hq * D + g * D;
    float *v = qkv + (size_t)(m->Hq + m->Hk) * D + g * D;
    int64_t pos = m->pos[b];
    rope(m, k, pos);
    for (int h = 0; h < G; h++)
        rope(m, q + h * D, pos);
    size_t at = ((size_t)m->slots[b] * m->Hk + g) * D;
    for (int d = 0; d < D; d++) {
        store_dt(m, ly->k_cache, at + d, k[d]);
        store_dt(m, ly->v_cache, at + d, v[d]);
    }
    int n = m->seq_lens[b];
    const int32_t *rows = m->req_to_token + (size_t)m->req_idx[b] * m->stride;
    float *p = s->scores, o[MAX_GROUP * MAX_DIM];
#ifdef STEP_X86
    if (level >= 3 && D % 16 == 0)
        scores_512(m, q, G, ly->k_cache, rows, n, g, p);
    else if (level >= 2 && D % 8 == 0)
        scores_avx2(m, q, G, ly->k_cache, rows, n, g, p);
    else
#endif
        scores_c(m, q, G, ly->k_cache, rows, n, g, p);
    float inv[MAX_GROUP];
    for (int h = 0; h < G; h++) {
        float *ph = p + (size_t)h * n, mx = ph[0], sum = 0.0f;
        for (int t = 1; t < n; t++)
            mx = ph[t] > mx ? ph[t] : mx;
        for (int t = 0; t < n; t++) {
            ph[t] = expf(ph[t] - mx);
            sum += ph[t];
        }
        inv[h] = 1.0f / sum;
    }
#ifdef STEP_X86
    if (level >= 3 && D % 16 == 0)
        values_512(m, p, G, ly->v_cache, rows, n, g, o);
    else if (level >= 2 && D % 8 == 0)
        values_avx2(m, p, G, ly->v_cache, rows, n, g, o);
    else
#endif
        values_c(m, p, G, ly->v_cache, rows, n, g, o);
    float *out = m->att + (size_t)b * m->Hq * D + (size_t)g * G * D;
    for (int h = 0; h < G; h++)
        for (int d = 0; d < D; d++)
            out[h * D + d] = o[h * D + d] * inv[h];
    round_to_dtype(m, out, G * D);
}

/* ---- the step, as each thread runs it --------------------------------------------------------- */

static void sync_threads(Model *m) {
    if (m->nthreads > 1)
        barrier_wait(&m->bar);
}

static void run_step(Model *m, int tid) {
    Scratch *s = &m->scratch[tid];
    int B = m->B, H = m->H, I = m->I, QD = m->Hq * m->D;
    for (int b = 0; b < B; b++)
        for (int i = 0; i < H; i++)
            s->res[(size_t)b * H + i] = load_dt(m, m->embed, (size_t)m->ids[b] * H + i);
    for (int l = 0; l < m->L; l++) {
        const Layer *ly = &m->layers[l];
        int ph = l * PHASES;
        if (l > 0)
            add_residual(m, s->res, m->down, B * H);
        rms_norm(m, s->res, ly->in_norm, s->h, B);
        quantize_rows(m, s, s->h, H);
        par_int4(m, ph, s, ly->qkv_w, ly->qkv_sm, H, m->nqkv, m->qkv);
        sync_threads(m);
        int units = B * m->Hk;
        for (int u; (u = claim(m, ph + 1, 1)) < units;)
            attend_unit(m, s, ly, u / m->Hk, u % m->Hk);
        sync_threads(m);
        quantize_rows(m, s, m->att, QD);
        par_int4(m, ph + 2, s, ly->o_w, ly->o_sm, QD, H, m->o);
        sync_threads(m);
        add_residual(m, s->res, m->o, B * H);
        rms_norm(m, s->res, ly->post_norm, s->h, B);
        quantize_rows(m, s, s->h, H);
        par_int4(m, ph + 3, s, ly->gu_w, ly->gu_sm, H, 2 * I, m->gu);
        sync_threads(m);
        for (int b = 0; b < B; b++) { /* silu(gate) * up in float32, rounded once */
            const float *gate = m->gu + (size_t)b * 2 * I, *up = gate + I;
            float *a = s->act + (size_t)b * I;
            for (int i = 0; i < I; i++)
                a[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
        }
        round_to_dtype(m, s->act, B * I);
        quantize_rows(m, s, s->act, I);
        par_int4(m, ph + 4, s, ly->down_w, ly->down_sm, I, H, m->down);
        sync_threads(m);
    }
    add_residual(m, s->res, m->down, B * H);
    rms_norm(m, s->res, m->final_norm, s->h, B);
    if (tid == 0 && m->hidden != NULL)
        memcpy(m->hidden, s->h, sizeof(float) * B * H);
    if (m->head_w != NULL && m->logits != NULL) {
        quantize_rows(m, s, s->h, H);
        int tiles = (m->V + GEMV_TILE - 1) / GEMV_TILE, chunk = chunk_of(m, tiles);
        for (int t0; (t0 = claim(m, m->L * PHASES, chunk)) < tiles;) {
            int t1 = t0 + chunk < tiles ? t0 + chunk : tiles;
            gemv_int8_tiles(m->head_w, m->head_rs, s->xq, s->dx, m->B, H, m->V, t0, t1, m->logits, 0);
        }
    }
    sync_threads(m);
}

static void *worker(void *arg) {
    Model *m = ((Model **)arg)[0];
    int tid = (int)(intptr_t)((void **)arg)[1];
    free(arg);
    for (;;) {
        barrier_wait(&m->bar); /* the start of a step, or the end */
        if (m->quit)
            return NULL;
        run_step(m, tid);
    }
}

/* ---- memory ------------------------------------------------------------------------------------ */

static void free_buffers(Model *m) {
    free(m->qkv);
    free(m->att);
    free(m->o);
    free(m->gu);
    free(m->down);
    m->qkv = m->att = m->o = m->gu = m->down = NULL;
    for (int i = 0; i < m->nthreads && m->scratch; i++) {
        Scratch *s = &m->scratch[i];
        free(s->res);
        free(s->h);
        free(s->act);
        free(s->xq);
        free(s->dx);
        free(s->xs);
        s->res = s->h = s->act = s->dx = s->xs = NULL;
        s->xq = NULL;
    }
    m->cap_B = 0;
}

/* Room for B rows and contexts of n tokens; 0, or -1 when out of memory. */
static int reserve(Model *m, int B, int n) {
    int G = m->Hq / m->Hk;
    if (B > m->cap_B) {
        free_buffers(m);
        size_t f = sizeof(float) * B;
        m->qkv = malloc(f * m->nqkv);
        m->att = malloc(f * m->Hq * m->D);
        m->o = malloc(f * m->H);
        m->gu = malloc(f * 2 * m->I);
        m->down = malloc(f * m->H);
        int fail = !m->qkv || !m->att || !m->o || !m->gu || !m->down;
        for (int i = 0; i < m->nthreads; i++) {
            Scratch *s = &m->scratch[i];
            s->res = malloc(f * m->H);
            s->h = malloc(f * m->H);
            s->act = malloc(f * m->I);
            s->xq = malloc(sizeof(int16_t) * B * m->kmax);
            s->dx = malloc(f * (m->kmax / GEMV_GROUP));
            s->xs = malloc(f * (m->kmax / GEMV_GROUP));
            fail |= !s->res || !s->h || !s->act || !s->xq || !s->dx || !s->xs;
        }
        if (fail) {
            free_buffers(m);
            return -1;
        }
        m->cap_B = B;
    }
    for (int i = 0; i < m->nthreads; i++) {
        Scratch *s = &m->scratch[i];
        if (n > s->cap_len) {
            float *p = realloc(s->scores, sizeof(float) * G * (size_t)n);
            if (p == NULL)
                return -1;
            s->scores = p;
            s->cap_len = n;
        }
    }
    return 0;
}

static void model_free(PyObject *capsule) {
    Model *m = PyCapsule_GetPointer(capsule, "lightllm.decode_model");
    if (m == NULL)
        return;
    if (m->started > 0) {
        m->quit = 1;
        barrier_wait(&m->bar);
        for (int i = 0; i < m->started; i++)
            pthread_join(m->threads[i], NULL);
    }
    free_buffers(m);
    for (int i = 0; i < m->nthreads; i++)
        free(m->scratch[i].scores);
    pthread_mutex_destroy(&m->bar.mu);
    pthread_cond_destroy(&m->bar.cv);
    free(m->scratch);
    free(m->threads);
    free(m->counters);
    free(m->layers);
    free(m);
}

/* ---- the Python functions -------------------------------------------------------------------- */

static int read_ints(PyObject *seq, long long *out, int n, const char *what) {
    PyObject *fast = PySequence_Fast(seq, what);
    if (fast == NULL)
        return -1;
    if (PySequence_Fast_GET_SIZE(fast) != n) {
        PyErr_Format(PyExc_ValueError, "%s: expected %d values", what, n);
        Py_DECREF(fast);
        return -1;
    }
    for (int i = 0; i < n; i++) {
        out[i] = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(fast, i));
        if (out[i] == -1 && PyErr_Occurred()) {
            Py_DECREF(fast);
            return -1;
        }
    }
    Py_DECREF(fast);
    return 0;
}

PyObject *decode_model_new(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    long long d[11];
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "decode_model_new(dims, floats, ptrs)");
        return NULL;
    }
    if (read_ints(args[0], d, 11, "dims") < 0)
        return NULL;
    double f[2];
    for (int i = 0; i < 2; i++) {
        PyObject *item = PySequence_GetItem(args[1], i);
        f[i] = item != NULL ? PyFloat_AsDouble(item) : -1.0;
        Py_XDECREF(item);
        if (PyErr_Occurred())
            return NULL;
    }
    double eps = f[0], scale = f[1];
    int L = (int)d[0], H = (int)d[1], Hq = (int)d[2], Hk = (int)d[3], D = (int)d[4], I = (int)d[5];
    if (L <= 0 || H <= 0 || Hk <= 0 || Hq % Hk || Hq / Hk > MAX_GROUP || D <= 0 || D > MAX_DIM || D % 2 ||
        H % GEMV_GROUP || (Hq * D) % GEMV_GROUP || I % GEMV_GROUP || d[9] < 1 || d[9] > 64) {
        PyErr_SetString(PyExc_ValueError, "decode_model_new: a shape the C step does not run");
        return NULL;
    }
    int nptr = 5 + 12 * L;
    long long *p = malloc(sizeof(long long) * nptr);
    Model *m = calloc(1, sizeof(Model));
    if (p == NULL || m == NULL) {
        free(p);
        free(m);
        return PyErr_NoMemory();
    }
    if (read_ints(args[2], p, nptr, "ptrs") < 0) {
        free(p);
        free(m);
        return NULL;
    }
    *m = (Model){.L = L, .H = H, .Hq = Hq, .Hk = Hk, .D = D, .I = I, .V = (int)d[6], .stride = (int)d[7],
                 .bf16 = (int)d[8], .nthreads = (int)d[9], .eps = (float)eps, .scale = (float)scale};
    m->nqkv = (Hq + 2 * Hk) * D;
    m->kmax = H > Hq * D ? H : Hq * D;
    m->kmax = m->kmax > I ? m->kmax : I;
    m->embed = (void *)(intptr_t)p[0];
    m->final_norm = (void *)(intptr_t)p[1];
    m->head_w = (const int8_t *)(intptr_t)p[2];
    m->head_rs = (const float *)(intptr_t)p[3];
    m->cos_sin = (const float *)(intptr_t)p[4];
    m->layers = calloc(L, sizeof(Layer));
    m->scratch = calloc(m->nthreads, sizeof(Scratch));
    m->counters = calloc(L * PHASES + 1, sizeof(atomic_int));
    m->threads = calloc(m->nthreads, sizeof(pthread_t));
    m->bar.n = m->nthreads;
    m->bar.spin_us = (int)d[10];
    pthread_mutex_init(&m->bar.mu, NULL);
    pthread_cond_init(&m->bar.cv, NULL);
    PyObject *capsule = PyCapsule_New(m, "lightllm.decode_model", model_free);
    if (capsule == NULL || !m->layers || !m->scratch || !m->counters || !m->threads) {
        free(p);
        if (capsule == NULL) {
            free(m->layers);
            free(m->scratch);
            free(m->counters);
            free(m->threads);
            free(m);
            return PyErr_NoMemory();
        }
        Py_DECREF(capsule);
        return PyErr_NoMemory();
    }
    for (int l = 0; l < L; l++) {
        long long *q = p + 5 + 12 * l;
        m->layers[l] = (Layer){
            .in_norm = (void *)(intptr_t)q[0], .qkv_w = (void *)(intptr_t)q[1], .qkv_sm = (void *)(intptr_t)q[2],
            .o_w = (void *)(intptr_t)q[3], .o_sm = (void *)(intptr_t)q[4], .post_norm = (void *)(intptr_t)q[5],
            .gu_w = (void *)(intptr_t)q[6], .gu_sm = (void *)(intptr_t)q[7], .down_w = (void *)(intptr_t)q[8],
            .down_sm = (void *)(intptr_t)q[9], .k_cache = (void *)(intptr_t)q[10], .v_cache = (void *)(intptr_t)q[11],
        };
    }
    free(p);
    for (int i = 1; i < m->nthreads; i++) {
        void **arg = malloc(2 * sizeof(void *));
        if (arg == NULL)
            break;
        arg[0] = m;
        arg[1] = (void *)(intptr_t)i;
        if (pthread_create(&m->threads[i - 1], NULL, worker, arg) != 0) {
            free(arg);
            break;
        }
        m->started++;
    }
    if (m->started != m->nthreads - 1) { /* run with the threads that started */
        m->nthreads = m->started + 1;
        m->bar.n = m->nthreads; /* (no worker has reached the barrier with the old count: see below) */
    }
    return capsule;
}

PyObject *decode_step(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 10) {
        PyErr_SetString(PyExc_TypeError,
                        "decode_step(model, B, ids, positions, slots, req_to_token, req_idx, seq_lens, hidden, logits)");
        return NULL;
    }
    Model *m = PyCapsule_GetPointer(args[0], "lightllm.decode_model");
    if (m == NULL)
        return NULL;
    void *p[9];
    for (int i = 0; i < 9; i++) {
        p[i] = PyLong_AsVoidPtr(args[i + 1]);
        if (p[i] == NULL && PyErr_Occurred())
            return NULL;
    }
    int B = (int)(intptr_t)p[0];
    if (B <= 0 || B > 4096) {
        PyErr_SetString(PyExc_ValueError, "decode_step: B must be 1..4096");
        return NULL;
    }
    const int32_t *seq_lens = p[6];
    int longest = 1;
    for (int b = 0; b < B; b++) {
        if (seq_lens[b] < 1 || seq_lens[b] > m->stride) {
            PyErr_SetString(PyExc_ValueError, "decode_step: every context needs 1..req_stride tokens");
            return NULL;
        }
        longest = seq_lens[b] > longest ? seq_lens[b] : longest;
    }
    int err;
    Py_BEGIN_ALLOW_THREADS
    err = reserve(m, B, longest);
    if (err == 0) {
        m->B = B;
        m->ids = p[1];
        m->pos = p[2];
        m->slots = p[3];
        m->req_to_token = p[4];
        m->req_idx = p[5];
        m->seq_lens = seq_lens;
        m->hidden = p[7];
        m->logits = p[8];
        for (int i = 0; i <= m->L * PHASES; i++)
            atomic_store_explicit(&m->counters[i], 0, memory_order_relaxed);
        if (m->nthreads > 1)
            barrier_wait(&m->bar); /* the workers start (the barrier orders the writes above) */
        run_step(m, 0);
    }
    Py_END_ALLOW_THREADS
    if (err)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}
