/*
 * A whole decode step of a Llama-family model on the CPU, for the int4-packed weights of
 * `Int4Linear` (layers/quantized.py) and the int8 LM head of `Int8Head`: one Python call per step
 * (runner/cpu_native.py), no torch op inside. Part of the `_gemv` extension; the products are
 * csrc/gemv.c's kernels at its active instruction level.
 *
 *   decode_model_new(dims, floats, ptrs) -> capsule
 *       dims   (layers, hidden, heads, kv_heads, head_dim, inter, vocab, req_stride, bf16,
 *               threads, spin_us, positions in cos_sin, KV cache slots)
 *       floats (rms eps, attention scale)
 *       ptrs   embed [V, H], final norm [H], head w, head rs (0, 0: no head), cos_sin [P, D]
 *              float32, then 12 a layer: input norm, qkv w, qkv sm, o w, o sm, post norm, gate|up
 *              w, gate|up sm, down w, down sm, k cache, v cache
 *   decode_step(model, B, ids, positions, slots, req_to_token, req_idx, seq_lens, hidden, logits)
 *       B rows, one new token each: ids / positions / slots int64 [B]; req_to_token int32 [R,
 *       req_stride], req_idx / seq_lens int32 [B] (seq_lens counts the new token; ids, positions,
 *       slots and seq_lens are checked against the model's sizes: ValueError); writes the
 *       final normed hidden states float32 [B, H] to `hidden` and the head's float32 logits
 *       [B, V] to `logits` (either may be 0: not wanted).
 *
 * The activations, norm weights, embedding and KV cache are the model's dtype: bfloat16 (bf16
 * 1) or float32. In bfloat16 the step rounds where the eager path (models/llama.py with the
 * kernels' CPU paths) rounds: every product's output, the residual sums, the norms, rope, SiLU*mul
 * and the attention output; the arithmetic between is float32, as there. So the two differ only
 * by the order of float32 sums (norms, softmax) and, at the AVX-512 level, a vector exp within ~2
 * ulp of expf (softmax, SiLU), which moves a bfloat16 value by one step at a near-tie now and then.
 *
 * Error: the products are gemv.c's (int16 activations per block of 32: see its bound); the rest is
 * float32 with those roundings. Rows are independent: a request's logits do not depend on the
 * other rows of its step, nor on the number of threads (each tile and attention unit is computed
 * whole by the thread that claims it).
 *
 * Threads: `threads - 1` workers share the work with the calling thread. A step is a sequence of
 * phases (per layer: q|k|v tiles, attention units of one row and kv head, o tiles, gate|up units of
 * 32 columns of gate and of up with their SiLU*mul and its quantization, down tiles; then the head's
 * tiles); each thread claims chunks of the open phase's units from an atomic counter tagged with
 * the phase's number, and whichever finishes the phase's last unit runs the short serial part
 * between phases (residual, norm, the activations' quantization) and opens the next one. Nobody
 * waits for a thread that holds no unit: a worker the OS has descheduled, or one still asleep,
 * is simply not missed, and the calling thread runs the step alone if it must. A thread with
 * nothing to claim spins at most spin_us microseconds for the next phase, then sleeps on a
 * condition variable, so on a busy machine it gives its core back (OpenMP's spinning barriers
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
#define CHUNKS 8      /* chunks a thread of each product's tiles: balance against claims */

/* ---- the phase board: which phase is open, its next unit, its finished units ------------------- */

typedef struct {
    _Alignas(64) atomic_uint seq;  /* the open phase's number, counting on across steps */
    _Alignas(64) atomic_ullong claim; /* (seq << 32) | the open phase's next unclaimed unit */
    _Alignas(64) atomic_int done;  /* units of the open phase finished */
    atomic_int sleepers;
    int spin_us;
    pthread_mutex_t mu;
    pthread_cond_t cv;
} Board;

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

/* Wait until the open phase is no longer `seq`: spin up to spin_us, then sleep. (A sleeper
   registers before it reads seq, an opener writes seq before it reads the sleepers, both
   sequentially consistent: one of them sees the other, so no wake-up is lost.) */
static void wait_past(Board *b, unsigned seq) {
    double until = -1.0;
    for (int i = 1;; i++) {
        if (atomic_load_explicit(&b->seq, memory_order_acquire) != seq)
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
    while (atomic_load(&b->seq) == seq)
        pthread_cond_wait(&b->cv, &b->mu);
    atomic_fetch_sub(&b->sleepers, 1);
    pthread_mutex_unlock(&b->mu);
}

/* Open phase number `seq` (after everything its units read is written) and wake the sleepers. */
static void open_seq(Board *b, unsigned seq) {
    atomic_store_explicit(&b->done, 0, memory_order_relaxed);
    atomic_store_explicit(&b->claim, (unsigned long long)seq << 32, memory_order_release);
    atomic_store(&b->seq, seq);
    if (atomic_load(&b->sleepers) > 0) {
        pthread_mutex_lock(&b->mu);
        pthread_cond_broadcast(&b->cv);
        pthread_mutex_unlock(&b->mu);
    }
}

/* The first of up to `chunk` units of phase `seq` for this thread, or -1: none left, or the phase
   is no longer open (a thread that read `seq` before it closed claims nothing). */
static int claim_units(Board *b, unsigned seq, int units, int chunk) {
    unsigned long long v = atomic_load_explicit(&b->claim, memory_order_acquire);
    for (;;) {
        if ((unsigned)(v >> 32) != seq || (int)(uint32_t)v >= units)
            return -1;
        if (atomic_compare_exchange_weak_explicit(&b->claim, &v, v + (unsigned)chunk, memory_order_acq_rel,
                                                  memory_order_acquire))
            return (int)(uint32_t)v;
    }
}

/* ---- the model ------------------------------------------------------------------------------ */

typedef struct {
    const void *in_norm, *post_norm; /* [H], the model's dtype */
    const uint8_t *qkv_w, *o_w, *gu_w, *down_w;
    const uint16_t *qkv_sm, *o_sm, *gu_sm, *down_sm;
    void *k_cache, *v_cache; /* [slots, Hk, D], the model's dtype */
} Layer;

typedef struct { /* one thread's attention scratch */
    float *scores; /* [group, cap_len] */
    int cap_len;
} Scratch;

enum { QKV, ATTN, O, GATE_UP, DOWN, PER_LAYER }; /* the phases of a layer; then the head's */

typedef struct Model {
    int L, H, Hq, Hk, D, I, V, stride, bf16, nthreads, kmax, nqkv;
    long long max_pos, num_slots; /* rows of cos_sin, of each KV cache pool */
    float eps, scale;
    Layer *layers;
    const void *embed, *final_norm;
    const int8_t *head_w;
    const float *head_rs, *cos_sin;
    int cap_B;
    float *res, *h, *act;              /* residual, normed rows [B, H], SiLU*mul [B, I] */
    int16_t *xq;                       /* the next product's quantized activations [B, Kmax] */
    float *dx, *xs;                    /* [B, Kmax / 32] */
    int16_t *aq;                       /* SiLU*mul quantized, by the gate|up units [B, I] */
    float *adx, *axs;                  /* [B, I / 32] */
    float *qkv, *att, *o, *gu, *down;  /* outputs [B, N] */
    Scratch *scratch;                  /* one a thread */
    /* the step: its arguments, its first phase's number, its phases */
    int B;
    const int64_t *ids, *pos, *slots;
    const int32_t *req_to_token, *req_idx, *seq_lens;
    float *hidden, *logits;
    atomic_uint base;
    atomic_int phases;
    /* workers */
    Board board;
    pthread_t *threads;
    atomic_int quit;
    int started;
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

#ifdef STEP_X86
/* x[i] (+ y[i]) rounded to bfloat16 as f_bf16 does, 16 at a time (exact: the same bits) */
static __attribute__((target("avx512f"))) int add_round_512(float *x, const float *y, int n) {
    const __m512i half = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1), hi = _mm512_set1_epi32((int)0xFFFF0000);
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 v = _mm512_loadu_ps(x + i);
        if (y != NULL)
            v = _mm512_add_ps(v, _mm512_loadu_ps(y + i));
        __m512i u = _mm512_castps_si512(v);
        u = _mm512_add_epi32(u, _mm512_add_epi32(half, _mm512_and_si512(_mm512_srli_epi32(u, 16), one)));
        _mm512_storeu_ps(x + i, _mm512_castsi512_ps(_mm512_and_si512(u, hi)));
    }
    return i;
}
#endif

/* x[n] (+ y[n]) rounded to the model's dtype (bfloat16 values kept as float32) */
static inline void add_round(const Model *m, float *x, const float *y, int n) {
    int i = 0;
#ifdef STEP_X86
    if (m->bf16 && gemv_level() >= 3)
        i = add_round_512(x, y, n);
#endif
    for (; i < n; i++) {
        float v = y != NULL ? x[i] + y[i] : x[i];
        x[i] = m->bf16 ? round_bf16(v) : v;
    }
}

static inline void round_to_dtype(const Model *m, float *x, int n) {
    if (m->bf16)
        add_round(m, x, NULL, n);
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
static void add_residual(const Model *m, float *res, const float *y, int n) { add_round(m, res, y, n); }

/* tiles [t0, t1) of y [B, N] = x W^T (x quantized in m->xq, or in m->aq when act: SiLU*mul's),
   rounded to the dtype */
static void int4_tiles(Model *m, const uint8_t *w, const uint16_t *sm, int K, int N, float *y, int t0, int t1,
                       int act) {
    if (act)
        gemv_int4_tiles(w, sm, m->aq, m->adx, m->axs, m->B, K, N, t0, t1, y, 0);
    else
        gemv_int4_tiles(w, sm, m->xq, m->dx, m->xs, m->B, K, N, t0, t1, y, 0);
    int c0 = t0 * GEMV_TILE, c1 = t1 * GEMV_TILE < N ? t1 * GEMV_TILE : N;
    for (int b = 0; b < m->B; b++)
        round_to_dtype(m, y + (size_t)b * N + c0, c1 - c0);
}

static void quantize_rows(Model *m, const float *x, int K) { gemv_quantize(x, 0, m->B, K, m->xq, m->dx, m->xs); }

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

/* lane i = the sum of v[i]'s lanes, for 16 vectors at once (a transposing tree: ~45 instructions
   where 16 separate reductions take ~130) */
static inline TARGET_512 __m512 hsum16_512(const __m512 *v) {
    __m512 a[8], b[4];
    for (int i = 0; i < 8; i++) /* per 128-bit lane: [x0+x2, y0+y2, x1+x3, y1+y3] of v[2i], v[2i+1] */
        a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) { /* per 128-bit lane: the 4-lane sums of v[4i..4i+3] */
        __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
        b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    __m512 d0 = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], 0x88), _mm512_shuffle_f32x4(b[0], b[1], 0xDD));
    __m512 d1 = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], 0x88), _mm512_shuffle_f32x4(b[2], b[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(d0, d1, 0x88), _mm512_shuffle_f32x4(d0, d1, 0xDD));
}

/* Blocks of 16 keys: each key row converted to float32 once, then per head 16 products of D
   lanes and one tree reduction for the 16 scores; the last partial block key by key. */
static TARGET_512 void scores_512(const Model *m, const float *q, int G, const void *kc, const int32_t *rows,
                                  int n, int head, float *scores) {
    int D = m->D, J = D / 16;
    size_t row = (size_t)m->Hk * D;
    __m512 sc = _mm512_set1_ps(m->scale);
    int t = 0;
    for (; t + 16 <= n; t += 16) {
        __m512 k[16][MAX_DIM / 16];
        for (int i = 0; i < 16; i++) {
            size_t at = (size_t)rows[t + i] * row + (size_t)head * D;
            for (int j = 0; j < J; j++)
                k[i][j] = load16_512(m, kc, at + 16 * j);
        }
        for (int h = 0; h < G; h++) {
            __m512 part[16];
            for (int i = 0; i < 16; i++) {
                part[i] = _mm512_mul_ps(_mm512_loadu_ps(q + h * D), k[i][0]);
                for (int j = 1; j < J; j++)
                    part[i] = _mm512_fmadd_ps(_mm512_loadu_ps(q + h * D + 16 * j), k[i][j], part[i]);
            }
            _mm512_storeu_ps(scores + (size_t)h * n + t, _mm512_mul_ps(hsum16_512(part), sc));
        }
    }
    for (; t < n; t++) {
        size_t at = (size_t)rows[t] * row + (size_t)head * D;
        for (int h = 0; h < G; h++) {
            __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(q + h * D), load16_512(m, kc, at));
            for (int j = 1; j < J; j++)
                acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + h * D + 16 * j), load16_512(m, kc, at + 16 * j), acc);
            scores[h * n + t] = _mm512_reduce_add_ps(acc) * m->scale;
        }
    }
}

/* G heads of D = 16 * J lanes, both constant at each call: the accumulators stay in registers */
static inline __attribute__((always_inline)) TARGET_512 void values_fixed_512(
    const int G, const int J, const Model *m, const float *p, const void *vc, const int32_t *rows, int n, int head,
    float *o) {
    size_t row = (size_t)m->Hk * m->D;
    __m512 acc[MAX_GROUP][4];
    for (int h = 0; h < G; h++)
        for (int j = 0; j < J; j++)
            acc[h][j] = _mm512_setzero_ps();
    for (int t = 0; t < n; t++) {
        size_t at = (size_t)rows[t] * row + (size_t)head * m->D;
        __m512 v[4];
        for (int j = 0; j < J; j++)
            v[j] = load16_512(m, vc, at + 16 * j);
        for (int h = 0; h < G; h++) {
            __m512 w = _mm512_set1_ps(p[(size_t)h * n + t]);
            for (int j = 0; j < J; j++)
                acc[h][j] = _mm512_fmadd_ps(w, v[j], acc[h][j]);
        }
    }
    for (int h = 0; h < G; h++)
        for (int j = 0; j < J; j++)
            _mm512_storeu_ps(o + h * 16 * J + 16 * j, acc[h][j]);
}

static TARGET_512 void values_512(const Model *m, const float *p, int G, const void *vc, const int32_t *rows,
                                  int n, int head, float *o) {
    int D = m->D, J = D / 16;
    if (J == 4 && G <= 6) { /* head dim 64 (SmolLM2, Llama 3.2 1B: group 3, 4) */
        switch (G) {
        case 1: values_fixed_512(1, 4, m, p, vc, rows, n, head, o); return;
        case 2: values_fixed_512(2, 4, m, p, vc, rows, n, head, o); return;
        case 3: values_fixed_512(3, 4, m, p, vc, rows, n, head, o); return;
        case 4: values_fixed_512(4, 4, m, p, vc, rows, n, head, o); return;
        case 5: values_fixed_512(5, 4, m, p, vc, rows, n, head, o); return;
        default: values_fixed_512(6, 4, m, p, vc, rows, n, head, o); return;
        }
    }
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

/* e^x, 16 lanes: Cephes' expf (x = n ln2 + r, |r| <= ln2 / 2, a degree-7 polynomial, then 2^n by
   vscalefps); within ~2 ulp of expf. The AVX-512 step's softmax and SiLU use it, the other levels
   libm's expf: a bfloat16 rounding rarely sees the difference (tests/test_cpu_native.py). */
static inline TARGET_512 __m512 exp_512(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-103.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 y = _mm512_set1_ps(1.9875691500E-4f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507E-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073E-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894E-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459E-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201E-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(y, n);
}

/* p[0..n) = e^(p - max p) in place; returns their sum */
static TARGET_512 float softmax_num_512(float *p, int n) {
    __m512 mx = _mm512_set1_ps(-INFINITY);
    int t = 0;
    for (; t + 16 <= n; t += 16)
        mx = _mm512_max_ps(mx, _mm512_loadu_ps(p + t));
    __mmask16 tail = (__mmask16)((1u << (n - t)) - 1);
    mx = _mm512_mask_max_ps(mx, tail, mx, _mm512_maskz_loadu_ps(tail, p + t));
    __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx)), sum = _mm512_setzero_ps();
    for (t = 0; t + 16 <= n; t += 16) {
        __m512 e = exp_512(_mm512_sub_ps(_mm512_loadu_ps(p + t), m));
        _mm512_storeu_ps(p + t, e);
        sum = _mm512_add_ps(sum, e);
    }
    if (tail) {
        __m512 e = exp_512(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, p + t), m));
        _mm512_mask_storeu_ps(p + t, tail, e);
        sum = _mm512_mask_add_ps(sum, tail, sum, e);
    }
    return _mm512_reduce_add_ps(sum);
}

/* a[i] = silu(gate[i]) * up[i] for n a multiple of 16 */
static TARGET_512 void silu_mul_512(float *a, const float *gate, const float *up, int n) {
    for (int i = 0; i < n; i += 16) {
        __m512 g = _mm512_loadu_ps(gate + i);
        __m512 e = exp_512(_mm512_sub_ps(_mm512_setzero_ps(), g));
        __m512 s = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
        _mm512_storeu_ps(a + i, _mm512_mul_ps(s, _mm512_loadu_ps(up + i)));
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
#ifdef STEP_X86
        if (level >= 3) {
            inv[h] = 1.0f / softmax_num_512(ph, n);
            continue;
        }
#endif
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

/* ---- the step: phases, their units, and what runs between them --------------------------------- */

static inline int tiles_of(int n) { return (n + GEMV_TILE - 1) / GEMV_TILE; }

/* Phase k of the step (layer k / PER_LAYER, or the head at L * PER_LAYER): its units, and how
   many a claim takes (a thread's share in CHUNKS pieces, for balance against the claims' cost). */
static int units_of(const Model *m, int k, int *chunk) {
    int n;
    switch (k >= m->L * PER_LAYER ? -1 : k % PER_LAYER) {
    case QKV: n = tiles_of(m->nqkv); break;
    case ATTN: *chunk = 1; return m->B * m->Hk;
    case O: n = tiles_of(m->H); break;
    case GATE_UP: n = m->I / GEMV_GROUP; break; /* 32 columns of gate and of up each */
    case DOWN: n = tiles_of(m->H); break;
    default: n = tiles_of(m->V); break;
    }
    int c = n / (m->nthreads * CHUNKS);
    *chunk = m->nthreads == 1 ? n : c > 0 ? c : 1;
    return n;
}

/* Units u0..u1 of gate|up: columns [32u, 32u + 32) of gate and of up, then silu(gate) * up there
   in float32, rounded once, and quantized (one block of 32 a row: the same numbers as quantizing
   whole rows) for the down product. */
static void gate_up_units(Model *m, const Layer *ly, int u0, int u1) {
    int I = m->I, G = I / GEMV_GROUP, per = GEMV_GROUP / GEMV_TILE;
    int4_tiles(m, ly->gu_w, ly->gu_sm, m->H, 2 * I, m->gu, per * u0, per * u1, 0);
    int4_tiles(m, ly->gu_w, ly->gu_sm, m->H, 2 * I, m->gu, I / GEMV_TILE + per * u0, I / GEMV_TILE + per * u1, 0);
    for (int b = 0; b < m->B; b++) {
        const float *gate = m->gu + (size_t)b * 2 * I, *up = gate + I;
        float *a = m->act + (size_t)b * I;
        int i0 = u0 * GEMV_GROUP, i1 = u1 * GEMV_GROUP;
#ifdef STEP_X86
        if (gemv_level() >= 3) {
            silu_mul_512(a + i0, gate + i0, up + i0, i1 - i0);
            i0 = i1;
        }
#endif
        for (int i = i0; i < i1; i++)
            a[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
        round_to_dtype(m, a + u0 * GEMV_GROUP, (u1 - u0) * GEMV_GROUP);
        for (int u = u0; u < u1; u++)
            gemv_quantize(a + u * GEMV_GROUP, 0, 1, GEMV_GROUP, m->aq + (size_t)b * I + u * GEMV_GROUP,
                          m->adx + (size_t)b * G + u, m->axs + (size_t)b * G + u);
    }
}

static void run_units(Model *m, int tid, int k, int u0, int u1) {
    if (k >= m->L * PER_LAYER) {
        gemv_int8_tiles(m->head_w, m->head_rs, m->xq, m->dx, m->B, m->H, m->V, u0, u1, m->logits, 0);
        return;
    }
    const Layer *ly = &m->layers[k / PER_LAYER];
    switch (k % PER_LAYER) {
    case QKV: int4_tiles(m, ly->qkv_w, ly->qkv_sm, m->H, m->nqkv, m->qkv, u0, u1, 0); break;
    case ATTN:
        for (int u = u0; u < u1; u++)
            attend_unit(m, &m->scratch[tid], ly, u / m->Hk, u % m->Hk);
        break;
    case O: int4_tiles(m, ly->o_w, ly->o_sm, m->Hq * m->D, m->H, m->o, u0, u1, 0); break;
    case GATE_UP: gate_up_units(m, ly, u0, u1); break;
    case DOWN: int4_tiles(m, ly->down_w, ly->down_sm, m->I, m->H, m->down, u0, u1, 1); break;
    }
}

/* The serial part after phase k (k = -1: the step's start) and before k + 1: what the next
   phase's units read. Run by the thread that finished phase k's last unit. */
static void between(Model *m, int k) {
    int B = m->B, H = m->H;
    int l = k < 0 ? -1 : k / PER_LAYER, kind = k < 0 ? DOWN : k % PER_LAYER;
    if (k >= m->L * PER_LAYER)
        return; /* the head: done */
    switch (kind) {
    case ATTN: quantize_rows(m, m->att, m->Hq * m->D); break;
    case O:
        add_residual(m, m->res, m->o, B * H);
        rms_norm(m, m->res, m->layers[l].post_norm, m->h, B);
        quantize_rows(m, m->h, H);
        break;
    case DOWN: /* the end of layer l (or the embedding, l = -1): the next layer's input, or the last norm */
        if (l < 0)
            for (int b = 0; b < B; b++)
                for (int i = 0; i < H; i++)
                    m->res[(size_t)b * H + i] = load_dt(m, m->embed, (size_t)m->ids[b] * H + i);
        else
            add_residual(m, m->res, m->down, B * H);
        if (l + 1 < m->L) {
            rms_norm(m, m->res, m->layers[l + 1].in_norm, m->h, B);
        } else {
            rms_norm(m, m->res, m->final_norm, m->h, B);
            if (m->hidden != NULL)
                memcpy(m->hidden, m->h, sizeof(float) * B * H);
        }
        if (l + 1 < m->L || m->phases > m->L * PER_LAYER)
            quantize_rows(m, m->h, H);
        break;
    }
}

/* Take part in the steps: claim and run the open phase's units; whoever finishes a phase runs
   what comes between and opens the next. The calling thread (main) returns at its step's end. */
static void take_part(Model *m, int tid, int main) {
    Board *bd = &m->board;
    for (;;) {
        unsigned seq = atomic_load_explicit(&bd->seq, memory_order_acquire);
        int k = (int)(seq - atomic_load_explicit(&m->base, memory_order_relaxed));
        int phases = atomic_load_explicit(&m->phases, memory_order_relaxed);
        if (main && k == phases)
            return;
        if (atomic_load_explicit(&m->quit, memory_order_relaxed))
            return;
        int chunk = 1, units = k >= 0 && k < phases ? units_of(m, k, &chunk) : 0;
        int u0 = units > 0 ? claim_units(bd, seq, units, chunk) : -1;
        if (u0 < 0) { /* nothing to claim: wait for the next phase (or step) */
            wait_past(bd, seq);
            continue;
        }
        int u1 = u0 + chunk < units ? u0 + chunk : units;
        run_units(m, tid, k, u0, u1);
        if (atomic_fetch_add_explicit(&bd->done, u1 - u0, memory_order_acq_rel) + (u1 - u0) == units) {
            between(m, k);
            open_seq(bd, seq + 1);
        }
    }
}

static void *worker(void *arg) {
    Model *m = ((Model **)arg)[0];
    int tid = (int)(intptr_t)((void **)arg)[1];
    free(arg);
    take_part(m, tid, 0);
    return NULL;
}

/* ---- memory ------------------------------------------------------------------------------------ */

static void free_buffers(Model *m) {
    float **f[] = {&m->res, &m->h, &m->act, &m->dx, &m->xs, &m->adx, &m->axs, &m->qkv, &m->att, &m->o, &m->gu, &m->down};
    for (size_t i = 0; i < sizeof(f) / sizeof(f[0]); i++) {
        free(*f[i]);
        *f[i] = NULL;
    }
    free(m->xq);
    free(m->aq);
    m->xq = m->aq = NULL;
    m->cap_B = 0;
}

/* Room for B rows and contexts of n tokens (while no worker runs); 0, or -1 when out of memory. */
static int reserve(Model *m, int B, int n) {
    int G = m->Hq / m->Hk;
    if (B > m->cap_B) {
        free_buffers(m);
        size_t f = sizeof(float) * B;
        m->res = malloc(f * m->H);
        m->h = malloc(f * m->H);
        m->act = malloc(f * m->I);
        m->xq = malloc(sizeof(int16_t) * B * m->kmax);
        m->dx = malloc(f * (m->kmax / GEMV_GROUP));
        m->xs = malloc(f * (m->kmax / GEMV_GROUP));
        m->aq = malloc(sizeof(int16_t) * B * m->I);
        m->adx = malloc(f * (m->I / GEMV_GROUP));
        m->axs = malloc(f * (m->I / GEMV_GROUP));
        m->qkv = malloc(f * m->nqkv);
        m->att = malloc(f * m->Hq * m->D);
        m->o = malloc(f * m->H);
        m->gu = malloc(f * 2 * m->I);
        m->down = malloc(f * m->H);
        if (!m->res || !m->h || !m->act || !m->xq || !m->dx || !m->xs || !m->aq || !m->adx || !m->axs || !m->qkv ||
            !m->att || !m->o || !m->gu || !m->down) {
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
        atomic_store(&m->quit, 1);
        open_seq(&m->board, atomic_load(&m->board.seq) + 1); /* wake them: they see quit */
        for (int i = 0; i < m->started; i++)
            pthread_join(m->threads[i], NULL);
    }
    free_buffers(m);
    for (int i = 0; i < m->nthreads && m->scratch != NULL; i++)
        free(m->scratch[i].scores);
    pthread_mutex_destroy(&m->board.mu);
    pthread_cond_destroy(&m->board.cv);
    free(m->scratch);
    free(m->threads);
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
    long long d[13];
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "decode_model_new(dims, floats, ptrs)");
        return NULL;
    }
    if (read_ints(args[0], d, 13, "dims") < 0)
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
    m->max_pos = d[11];
    m->num_slots = d[12];
    m->kmax = H > Hq * D ? H : Hq * D;
    m->kmax = m->kmax > I ? m->kmax : I;
    m->embed = (void *)(intptr_t)p[0];
    m->final_norm = (void *)(intptr_t)p[1];
    m->head_w = (const int8_t *)(intptr_t)p[2];
    m->head_rs = (const float *)(intptr_t)p[3];
    m->cos_sin = (const float *)(intptr_t)p[4];
    m->layers = calloc(L, sizeof(Layer));
    m->scratch = calloc(m->nthreads, sizeof(Scratch));
    m->threads = calloc(m->nthreads, sizeof(pthread_t));
    m->board.spin_us = (int)d[10];
    pthread_mutex_init(&m->board.mu, NULL);
    pthread_cond_init(&m->board.cv, NULL);
    PyObject *capsule = PyCapsule_New(m, "lightllm.decode_model", model_free);
    if (capsule == NULL || !m->layers || !m->scratch || !m->threads) {
        free(p);
        if (capsule == NULL) {
            free(m->layers);
            free(m->scratch);
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
    m->nthreads = m->started + 1; /* the threads that started (all, unless the OS refused) */
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
    const int64_t *ids = p[1], *pos = p[2], *slots = p[3];
    int longest = 1;
    for (int b = 0; b < B; b++) {
        if (seq_lens[b] < 1 || seq_lens[b] > m->stride) {
            PyErr_SetString(PyExc_ValueError, "decode_step: every context needs 1..req_stride tokens");
            return NULL;
        }
        if (ids[b] < 0 || ids[b] >= m->V || pos[b] < 0 || pos[b] >= m->max_pos || slots[b] < 0 ||
            slots[b] >= m->num_slots) {
            PyErr_SetString(PyExc_ValueError, "decode_step: a token id, position or KV slot out of range");
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
        atomic_store(&m->phases, m->L * PER_LAYER + (m->head_w != NULL && m->logits != NULL));
        unsigned first = atomic_load(&m->board.seq) + 1;
        atomic_store_explicit(&m->base, first, memory_order_relaxed); /* published by open_seq */
        between(m, -1);
        open_seq(&m->board, first);
        take_part(m, 0, 1);
    }
    Py_END_ALLOW_THREADS
    if (err)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}
