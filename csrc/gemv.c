/*
 * lightllm_async._gemv: matrix-vector products for a few rows (CPU decode) on packed int4 / int8
 * weights, with integer dot products as llama.cpp does them.
 *
 * The activation rows are quantized to int16 per block of 32 inputs: dx = max|x| / 32767, xq =
 * round-half-even(x / dx), plus the float sum of the block xs (for int4's mins). The products of a
 * block are integer (AVX-512 VNNI vpdpwssd, AVX2 vpmaddwd, or plain C); each block's sum is scaled
 * in float32. (int8 activations, as llama.cpp's Q8 blocks, were tried first: twice the products per
 * instruction, but they moved SmolLM2's greedy answers off the float32 reference's; int16 ones
 * move an activation by at most max|x_block| / 65534, where bfloat16 moves it by up to |x| / 512.)
 *
 *   int4_mm(x, dtypes, M, K, w, sm, N, y)   y[M, N] = x[M, K] W^T,
 *       W[n, k] = scale[n, g] * code[n, k] + min[n, g], g = k / 32, code 0..15
 *   int8_mm(x, dtypes, M, K, w, rs, N, y)   y[M, N] = x[M, K] W^T, W[n, k] = rs[n] * code[n, k]
 *   level() -> int     the instruction set in use: 3 AVX-512 VNNI, 2 AVX2, 0 plain C
 *   set_level(n) -> int  use at most level n (tests run every path); returns the level now in use
 *
 * Every argument is an int: x, w, sm, rs and y are addresses (torch's data_ptr()); dtypes bit 0: x
 * is bfloat16 (else float32), bit 1: y is (rounded to nearest even; else float32); K is a multiple
 * of 32. The GIL is released while a product runs.
 *
 * Weight layouts (built once at load by kernels/cpu_gemv.py), in tiles of 16 output rows (N is
 * padded to a multiple of 16 in the packed arrays; only N columns of y are written):
 *
 *   int4 w   uint8 [N/16, K/32, 4 pairs, 16 rows, 4]: byte (p, r, j) of group g holds code
 *            8p + j of row r in its low nibble and code 8p + 4 + j in its high nibble: one 64-byte
 *            load holds 8 inputs of 16 rows, one 32-bit lane a row.
 *   int4 sm  fp16 [N/16, K/32, 2, 16]: the scales, then the mins, of the tile's 16 rows.
 *   int8 w   int8 [N/16, K/32, 8 chunks, 16 rows, 4]: inputs 4c..4c+3 of group g, row by row.
 *   int8 rs  float32 [N/16 * 16]: the scale of each row.
 *
 * A 32-bit lane of 4 codes, read as two 16-bit words, splits into the pairs (input 0, input 2) and
 * (1, 3) with shifts and masks; so the int16 activations of a group are stored in the order
 * x0 x2 x1 x3, x4 x6 x5 x7, ... and each pair is one 32-bit broadcast for vpdpwssd.
 *
 * The weights of a decode step (~90 MB for SmolLM2-135M) come from memory, not cache: the loops
 * prefetch PF_GROUPS groups ahead (prefetches do not fault past the end), ~1.5x on this machine.
 *
 * Error: each activation moves by at most dx / 2, so an output by at most the sum over blocks of
 * dx / 2 * sum |W[n, k]| over the block; the integer sums are exact, the rest is float32.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gemv.h"

#if defined(__x86_64__) || defined(__i386__)
#define GEMV_X86 1
#include <immintrin.h>
#endif

#define TILE 16
#define UNROLL _Pragma("GCC unroll 8") /* small constant loops: keep their arrays in registers */
#define GROUP 32
#ifndef PF_GROUPS
#define PF_GROUPS 16 /* prefetch distance in groups: 4 KB of int4 weights, 8 KB of int8 ones */
#endif
#define MB_MAX 4 /* rows of x per pass over a tile: its weights stay in L1 between passes */

static int detected_level = 0, active_level = 0;

/* ---- activation quantization (plain C; the AVX-512 one below gives the same numbers) ---------- */

#define QMAX 32767.0f
#define AMAX_MIN 1e-30f /* a block below this is zeros: QMAX / amax must stay finite */
static const int PAIR[4] = {0, 2, 1, 3}; /* input j of a 4-input chunk sits at 4c + PAIR[j] */

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, u;
    if (exp == 0x1F) {
        u = sign | 0x7F800000u | (man << 13);
    } else if (exp != 0) {
        u = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        u = sign;
    } else { /* subnormal: normalize */
        exp = 113;
        while (!(man & 0x400)) {
            man <<= 1;
            exp--;
        }
        u = sign | (exp << 23) | ((man & 0x3FF) << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static void quantize_row_c(const void *x, int bf16, int K, int16_t *xq, float *dx, float *xs) {
    float v[GROUP];
    for (int g = 0; g < K / GROUP; g++) {
        float amax = 0.0f, sum = 0.0f;
        for (int i = 0; i < GROUP; i++) {
            int k = g * GROUP + i;
            v[i] = bf16 ? bf16_to_float(((const uint16_t *)x)[k]) : ((const float *)x)[k];
            amax = fmaxf(amax, fabsf(v[i]));
            sum += v[i];
        }
        float inv = amax > AMAX_MIN ? QMAX / amax : 0.0f;
        for (int i = 0; i < GROUP; i++)
            xq[g * GROUP + (i & ~3) + PAIR[i & 3]] = (int16_t)nearbyintf(v[i] * inv);
        dx[g] = amax / QMAX;
        xs[g] = sum;
    }
}

static inline int32_t load_i32(const int16_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

static inline uint16_t float_to_bf16(float f) { /* round to nearest even (no NaN here) */
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFF + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

/* count outputs from `at` (an element index of y): float32, or bfloat16 when ybf */
static inline void store_vals(void *y, int ybf, size_t at, const float *vals, int count) {
    if (!ybf) {
        memcpy((float *)y + at, vals, sizeof(float) * count);
        return;
    }
    for (int i = 0; i < count; i++)
        ((uint16_t *)y)[at + i] = float_to_bf16(vals[i]);
}

static inline int tile_count(int t, int N) { return N - t * TILE < TILE ? N - t * TILE : TILE; }

/* ---- plain C kernels ------------------------------------------------------------------------ */

static void int4_tiles_c(const uint8_t *w, const uint16_t *sm, const int16_t *xq, const float *dx,
                         const float *xs, int M, int K, int N, int t0, int t1, void *y, int ybf) {
    int G = K / GROUP;
    for (int t = t0; t < t1; t++) {
        for (int m = 0; m < M; m++) {
            float acc[TILE] = {0};
            const uint8_t *wt = w + (size_t)t * G * 256;
            const uint16_t *st = sm + (size_t)t * G * 32;
            for (int g = 0; g < G; g++, wt += 256, st += 32) {
                const int16_t *xg = xq + (size_t)m * K + g * GROUP;
                for (int r = 0; r < TILE; r++) {
                    int32_t s = 0;
                    for (int p = 0; p < 4; p++)
                        for (int j = 0; j < 4; j++) {
                            uint8_t b = wt[p * 64 + r * 4 + j];
                            s += (b & 15) * xg[8 * p + PAIR[j]] + (b >> 4) * xg[8 * p + 4 + PAIR[j]];
                        }
                    acc[r] += (float)s * (half_to_float(st[r]) * dx[m * G + g]) +
                              half_to_float(st[16 + r]) * xs[m * G + g];
                }
            }
            store_vals(y, ybf, (size_t)m * N + t * TILE, acc, tile_count(t, N));
        }
    }
}

static void int8_tiles_c(const int8_t *w, const float *rs, const int16_t *xq, const float *dx, int M,
                         int K, int N, int t0, int t1, void *y, int ybf) {
    int G = K / GROUP;
    for (int t = t0; t < t1; t++) {
        for (int m = 0; m < M; m++) {
            float acc[TILE] = {0};
            const int8_t *wt = w + (size_t)t * G * 512;
            for (int g = 0; g < G; g++, wt += 512) {
                const int16_t *xg = xq + (size_t)m * K + g * GROUP;
                for (int r = 0; r < TILE; r++) {
                    int32_t s = 0;
                    for (int c = 0; c < 8; c++)
                        for (int j = 0; j < 4; j++)
                            s += wt[c * 64 + r * 4 + j] * xg[4 * c + PAIR[j]];
                    acc[r] += (float)s * dx[m * G + g];
                }
            }
            for (int r = 0; r < TILE; r++)
                acc[r] *= rs[t * TILE + r];
            store_vals(y, ybf, (size_t)m * N + t * TILE, acc, tile_count(t, N));
        }
    }
}

#ifdef GEMV_X86
/* ---- AVX2 ----------------------------------------------------------------------------------- */
#define TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))

static inline TARGET_AVX2 void store_tile_avx2(void *y, int ybf, size_t at, int count, __m256 lo, __m256 hi) {
    if (!ybf && count == TILE) {
        _mm256_storeu_ps((float *)y + at, lo);
        _mm256_storeu_ps((float *)y + at + 8, hi);
        return;
    }
    float tmp[TILE];
    _mm256_storeu_ps(tmp, lo);
    _mm256_storeu_ps(tmp + 8, hi);
    store_vals(y, ybf, at, tmp, count);
}

static TARGET_AVX2 void int4_tiles_avx2(const uint8_t *w, const uint16_t *sm, const int16_t *xq,
                                        const float *dx, const float *xs, int M, int K, int N, int t0,
                                        int t1, void *y, int ybf) {
    int G = K / GROUP;
    const __m256i low = _mm256_set1_epi16(0x000F);
    for (int t = t0; t < t1; t++) {
        for (int m = 0; m < M; m++) {
            __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
            const uint8_t *wt = w + (size_t)t * G * 256;
            const uint16_t *st = sm + (size_t)t * G * 32;
            for (int g = 0; g < G; g++, wt += 256, st += 32) {
                const int16_t *xg = xq + (size_t)m * K + g * GROUP;
                float d = dx[m * G + g], s = xs[m * G + g];
                UNROLL
                for (int p = 0; p < 4; p++)
                    _mm_prefetch((const char *)(wt + PF_GROUPS * 256 + 64 * p), _MM_HINT_T0);
                _mm_prefetch((const char *)(st + PF_GROUPS * 32), _MM_HINT_T0);
                UNROLL
                for (int h = 0; h < 2; h++) { /* rows 0-7, then 8-15 */
                    __m256i s32 = _mm256_setzero_si256();
                    UNROLL
                    for (int p = 0; p < 4; p++) {
                        __m256i b = _mm256_loadu_si256((const __m256i *)(wt + 64 * p + 32 * h));
                        const int16_t *x8 = xg + 8 * p; /* inputs 8p..8p+7 as pairs (0,2) (1,3) (4,6) (5,7) */
                        __m256i q0 = _mm256_and_si256(b, low), q1 = _mm256_and_si256(_mm256_srli_epi16(b, 8), low);
                        __m256i q2 = _mm256_and_si256(_mm256_srli_epi16(b, 4), low), q3 = _mm256_srli_epi16(b, 12);
                        s32 = _mm256_add_epi32(s32, _mm256_madd_epi16(q0, _mm256_set1_epi32(load_i32(x8))));
                        s32 = _mm256_add_epi32(s32, _mm256_madd_epi16(q1, _mm256_set1_epi32(load_i32(x8 + 2))));
                        s32 = _mm256_add_epi32(s32, _mm256_madd_epi16(q2, _mm256_set1_epi32(load_i32(x8 + 4))));
                        s32 = _mm256_add_epi32(s32, _mm256_madd_epi16(q3, _mm256_set1_epi32(load_i32(x8 + 6))));
                    }
                    __m256 sum = _mm256_cvtepi32_ps(s32);
                    __m256 sc = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(st + 8 * h)));
                    __m256 mn = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(st + 16 + 8 * h)));
                    acc[h] = _mm256_fmadd_ps(sum, _mm256_mul_ps(sc, _mm256_set1_ps(d)), acc[h]);
                    acc[h] = _mm256_fmadd_ps(mn, _mm256_set1_ps(s), acc[h]);
                }
            }
            store_tile_avx2(y, ybf, (size_t)m * N + t * TILE, tile_count(t, N), acc[0], acc[1]);
        }
    }
}

static TARGET_AVX2 void int8_tiles_avx2(const int8_t *w, const float *rs, const int16_t *xq,
                                        const float *dx, int M, int K, int N, int t0, int t1, void *y,
                                        int ybf) {
    int G = K / GROUP;
    for (int t = t0; t < t1; t++) {
        for (int m = 0; m < M; m++) {
            __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
            const int8_t *wt = w + (size_t)t * G * 512;
            for (int g = 0; g < G; g++, wt += 512) {
                const int16_t *xg = xq + (size_t)m * K + g * GROUP;
                __m256 d = _mm256_set1_ps(dx[m * G + g]);
                UNROLL
                for (int c = 0; c < 8; c++)
                    _mm_prefetch((const char *)(wt + PF_GROUPS * 512 + 64 * c), _MM_HINT_T0);
                UNROLL
                for (int h = 0; h < 2; h++) {
                    __m256i s32 = _mm256_setzero_si256();
                    UNROLL
                    for (int c = 0; c < 8; c++) {
                        __m256i b = _mm256_loadu_si256((const __m256i *)(wt + 64 * c + 32 * h));
                        __m256i q0 = _mm256_srai_epi16(_mm256_slli_epi16(b, 8), 8), q1 = _mm256_srai_epi16(b, 8);
                        s32 = _mm256_add_epi32(s32, _mm256_madd_epi16(q0, _mm256_set1_epi32(load_i32(xg + 4 * c))));
                        s32 = _mm256_add_epi32(s32, _mm256_madd_epi16(q1, _mm256_set1_epi32(load_i32(xg + 4 * c + 2))));
                    }
                    acc[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32), d, acc[h]);
                }
            }
            const float *r = rs + t * TILE;
            store_tile_avx2(y, ybf, (size_t)m * N + t * TILE, tile_count(t, N), _mm256_mul_ps(acc[0], _mm256_loadu_ps(r)),
                            _mm256_mul_ps(acc[1], _mm256_loadu_ps(r + 8)));
        }
    }
}

/* ---- AVX-512 VNNI ----------------------------------------------------------------------------- */
#define TARGET_512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

static TARGET_512 void quantize_row_512(const void *x, int bf16, int K, int16_t *xq, float *dx,
                                        float *xs) {
    const __m512i pair = _mm512_setr_epi32(0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15);
    for (int g = 0; g < K / GROUP; g++) {
        __m512 v0, v1;
        if (bf16) {
            const uint16_t *p = (const uint16_t *)x + g * GROUP;
            v0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
            v1 = _mm512_castsi512_ps(
                _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p + 16))), 16));
        } else {
            v0 = _mm512_loadu_ps((const float *)x + g * GROUP);
            v1 = _mm512_loadu_ps((const float *)x + g * GROUP + 16);
        }
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        float inv = amax > AMAX_MIN ? QMAX / amax : 0.0f;
        __m512 iv = _mm512_set1_ps(inv);
        /* cvtps_epi32 rounds half to even, as nearbyintf in the default rounding mode */
        __m512i q0 = _mm512_permutexvar_epi32(pair, _mm512_cvtps_epi32(_mm512_mul_ps(v0, iv)));
        __m512i q1 = _mm512_permutexvar_epi32(pair, _mm512_cvtps_epi32(_mm512_mul_ps(v1, iv)));
        _mm256_storeu_si256((__m256i *)(xq + g * GROUP), _mm512_cvtepi32_epi16(q0));
        _mm256_storeu_si256((__m256i *)(xq + g * GROUP + 16), _mm512_cvtepi32_epi16(q1));
        dx[g] = amax / QMAX;
        float tmp[GROUP], sum = 0.0f; /* the plain C sum's order: one value after another */
        _mm512_storeu_ps(tmp, v0);
        _mm512_storeu_ps(tmp + 16, v1);
        for (int i = 0; i < GROUP; i++)
            sum += tmp[i];
        xs[g] = sum;
    }
}

static inline TARGET_512 void store_tile_512(void *y, int ybf, size_t at, int count, __m512 v) {
    __mmask16 mask = (__mmask16)((1u << count) - 1);
    if (!ybf) {
        _mm512_mask_storeu_ps((float *)y + at, mask, v);
        return;
    }
    __m512i u = _mm512_castps_si512(v); /* to bfloat16, rounding to nearest even as float_to_bf16 */
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
    _mm256_mask_storeu_epi16((uint16_t *)y + at, mask, _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
}

/* MB rows of x against one tile; MB is a constant at each call, so the loops over it unroll and
   the accumulators stay in registers (two chains a row: vpdpwssd's latency) */
static inline __attribute__((always_inline)) TARGET_512 void int4_tile_512(
    const int MB, const uint8_t *wt, const uint16_t *st, const int16_t *xq, const float *dx, const float *xs,
    int K, int N, int t, void *y, int ybf) {
    int G = K / GROUP;
    const __m512i low = _mm512_set1_epi16(0x000F);
    __m512 acc[MB_MAX];
    UNROLL
    for (int m = 0; m < MB; m++)
        acc[m] = _mm512_setzero_ps();
    for (int g = 0; g < G; g++, wt += 256, st += 32) {
        __m512i a0[MB_MAX], a1[MB_MAX];
        UNROLL
        for (int p = 0; p < 4; p++) /* the weights stream from memory: ask for them ahead */
            _mm_prefetch((const char *)(wt + PF_GROUPS * 256 + 64 * p), _MM_HINT_T0);
        _mm_prefetch((const char *)(st + PF_GROUPS * 32), _MM_HINT_T0);
        UNROLL
        for (int m = 0; m < MB; m++)
            a0[m] = a1[m] = _mm512_setzero_si512();
        UNROLL
        for (int p = 0; p < 4; p++) {
            __m512i b = _mm512_loadu_si512((const void *)(wt + 64 * p));
            __m512i q0 = _mm512_and_si512(b, low), q1 = _mm512_and_si512(_mm512_srli_epi16(b, 8), low);
            __m512i q2 = _mm512_and_si512(_mm512_srli_epi16(b, 4), low), q3 = _mm512_srli_epi16(b, 12);
            UNROLL
            for (int m = 0; m < MB; m++) {
                const int16_t *x8 = xq + (size_t)m * K + g * GROUP + 8 * p;
                a0[m] = _mm512_dpwssd_epi32(a0[m], q0, _mm512_set1_epi32(load_i32(x8)));
                a1[m] = _mm512_dpwssd_epi32(a1[m], q1, _mm512_set1_epi32(load_i32(x8 + 2)));
                a0[m] = _mm512_dpwssd_epi32(a0[m], q2, _mm512_set1_epi32(load_i32(x8 + 4)));
                a1[m] = _mm512_dpwssd_epi32(a1[m], q3, _mm512_set1_epi32(load_i32(x8 + 6)));
            }
        }
        __m512 sc = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)st));
        __m512 mn = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(st + 16)));
        UNROLL
        for (int m = 0; m < MB; m++) {
            __m512 s = _mm512_cvtepi32_ps(_mm512_add_epi32(a0[m], a1[m]));
            acc[m] = _mm512_fmadd_ps(s, _mm512_mul_ps(sc, _mm512_set1_ps(dx[m * G + g])), acc[m]);
            acc[m] = _mm512_fmadd_ps(mn, _mm512_set1_ps(xs[m * G + g]), acc[m]);
        }
    }
    UNROLL
    for (int m = 0; m < MB; m++)
        store_tile_512(y, ybf, (size_t)m * N + t * TILE, tile_count(t, N), acc[m]);
}

static TARGET_512 void int4_tiles_512(const uint8_t *w, const uint16_t *sm, const int16_t *xq,
                                      const float *dx, const float *xs, int M, int K, int N, int t0, int t1,
                                      void *y, int ybf) {
    int G = K / GROUP;
    for (int t = t0; t < t1; t++) {
        const uint8_t *wt = w + (size_t)t * G * 256;
        const uint16_t *st = sm + (size_t)t * G * 32;
        for (int m = 0; m < M; m += MB_MAX) {
            const int16_t *xm = xq + (size_t)m * K;
                        void *ym = ybf ? (void *)((uint16_t *)y + (size_t)m * N) : (void *)((float *)y + (size_t)m * N);
            switch (M - m < MB_MAX ? M - m : MB_MAX) {
            case 1: int4_tile_512(1, wt, st, xm, dx + m * G, xs + m * G, K, N, t, ym, ybf); break;
            case 2: int4_tile_512(2, wt, st, xm, dx + m * G, xs + m * G, K, N, t, ym, ybf); break;
            case 3: int4_tile_512(3, wt, st, xm, dx + m * G, xs + m * G, K, N, t, ym, ybf); break;
            default: int4_tile_512(4, wt, st, xm, dx + m * G, xs + m * G, K, N, t, ym, ybf); break;
            }
        }
    }
}

static inline __attribute__((always_inline)) TARGET_512 void int8_tile_512(
    const int MB, const int8_t *wt, const float *rs, const int16_t *xq, const float *dx, int K, int N, int t,
    void *y, int ybf) {
    int G = K / GROUP;
    __m512 acc[MB_MAX];
    UNROLL
    for (int m = 0; m < MB; m++)
        acc[m] = _mm512_setzero_ps();
    for (int g = 0; g < G; g++, wt += 512) {
        __m512i a0[MB_MAX], a1[MB_MAX];
        UNROLL
        for (int c = 0; c < 8; c++)
            _mm_prefetch((const char *)(wt + PF_GROUPS * 512 + 64 * c), _MM_HINT_T0);
        UNROLL
        for (int m = 0; m < MB; m++)
            a0[m] = a1[m] = _mm512_setzero_si512();
        UNROLL
        for (int c = 0; c < 8; c++) {
            __m512i b = _mm512_loadu_si512((const void *)(wt + 64 * c));
            __m512i q0 = _mm512_srai_epi16(_mm512_slli_epi16(b, 8), 8), q1 = _mm512_srai_epi16(b, 8);
            UNROLL
            for (int m = 0; m < MB; m++) {
                const int16_t *x4 = xq + (size_t)m * K + g * GROUP + 4 * c;
                a0[m] = _mm512_dpwssd_epi32(a0[m], q0, _mm512_set1_epi32(load_i32(x4)));
                a1[m] = _mm512_dpwssd_epi32(a1[m], q1, _mm512_set1_epi32(load_i32(x4 + 2)));
            }
        }
        UNROLL
        for (int m = 0; m < MB; m++) {
            __m512 s = _mm512_cvtepi32_ps(_mm512_add_epi32(a0[m], a1[m]));
            acc[m] = _mm512_fmadd_ps(s, _mm512_set1_ps(dx[m * G + g]), acc[m]);
        }
    }
    __m512 r = _mm512_loadu_ps(rs + t * TILE);
    UNROLL
    for (int m = 0; m < MB; m++)
        store_tile_512(y, ybf, (size_t)m * N + t * TILE, tile_count(t, N), _mm512_mul_ps(acc[m], r));
}

static TARGET_512 void int8_tiles_512(const int8_t *w, const float *rs, const int16_t *xq, const float *dx,
                                      int M, int K, int N, int t0, int t1, void *y, int ybf) {
    int G = K / GROUP;
    for (int t = t0; t < t1; t++) {
        const int8_t *wt = w + (size_t)t * G * 512;
        for (int m = 0; m < M; m += MB_MAX) {
            const int16_t *xm = xq + (size_t)m * K;
            void *ym = ybf ? (void *)((uint16_t *)y + (size_t)m * N) : (void *)((float *)y + (size_t)m * N);
            switch (M - m < MB_MAX ? M - m : MB_MAX) {
            case 1: int8_tile_512(1, wt, rs, xm, dx + m * G, K, N, t, ym, ybf); break;
            case 2: int8_tile_512(2, wt, rs, xm, dx + m * G, K, N, t, ym, ybf); break;
            case 3: int8_tile_512(3, wt, rs, xm, dx + m * G, K, N, t, ym, ybf); break;
            default: int8_tile_512(4, wt, rs, xm, dx + m * G, K, N, t, ym, ybf); break;
            }
        }
    }
}
#endif /* GEMV_X86 */

/* ---- dispatch and the Python module -------------------------------------------------------------- */

static void detect(void) {
#ifdef GEMV_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
        __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        detected_level = 3;
    else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        detected_level = 2; /* every AVX2 CPU has F16C */
#endif
    active_level = detected_level;
}

int gemv_level(void) { return active_level; }

void gemv_quantize(const void *x, int bf16, int M, int K, int16_t *xq, float *dx, float *xs) {
    int G = K / GROUP;
    size_t row_bytes = (size_t)K * (bf16 ? 2 : 4);
    for (int m = 0; m < M; m++) {
        const void *xm = (const char *)x + m * row_bytes;
#ifdef GEMV_X86
        if (active_level >= 3) {
            quantize_row_512(xm, bf16, K, xq + (size_t)m * K, dx + m * G, xs + m * G);
            continue;
        }
#endif
        quantize_row_c(xm, bf16, K, xq + (size_t)m * K, dx + m * G, xs + m * G);
    }
}

void gemv_int4_tiles(const uint8_t *w, const uint16_t *sm, const int16_t *xq, const float *dx,
                     const float *xs, int M, int K, int N, int t0, int t1, void *y, int ybf) {
#ifdef GEMV_X86
    if (active_level >= 3)
        int4_tiles_512(w, sm, xq, dx, xs, M, K, N, t0, t1, y, ybf);
    else if (active_level >= 2)
        int4_tiles_avx2(w, sm, xq, dx, xs, M, K, N, t0, t1, y, ybf);
    else
#endif
        int4_tiles_c(w, sm, xq, dx, xs, M, K, N, t0, t1, y, ybf);
}

void gemv_int8_tiles(const int8_t *w, const float *rs, const int16_t *xq, const float *dx, int M,
                     int K, int N, int t0, int t1, void *y, int ybf) {
#ifdef GEMV_X86
    if (active_level >= 3)
        int8_tiles_512(w, rs, xq, dx, M, K, N, t0, t1, y, ybf);
    else if (active_level >= 2)
        int8_tiles_avx2(w, rs, xq, dx, M, K, N, t0, t1, y, ybf);
    else
#endif
        int8_tiles_c(w, rs, xq, dx, M, K, N, t0, t1, y, ybf);
}

/* The quantized rows: xq int16 [M, K] (pairs in vpdpwssd's order), then dx and xs [M, K / 32]; NULL when out of memory. */
static int16_t *quantize(const void *x, int bf16, int M, int K, float **dx, float **xs) {
    int G = K / GROUP;
    size_t qbytes = ((size_t)M * K * 2 + 63) & ~(size_t)63;
    int16_t *buf = malloc(qbytes + 2 * sizeof(float) * (size_t)M * G);
    if (buf == NULL)
        return NULL;
    *dx = (float *)((char *)buf + qbytes);
    *xs = *dx + (size_t)M * G;
    gemv_quantize(x, bf16, M, K, buf, *dx, *xs);
    return buf;
}

/* Eight ints: x, dtypes, M, K, w, scales, N, y. */
static int parse(PyObject *const *args, Py_ssize_t nargs, void **p) {
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "expected 8 int arguments: x, dtypes, M, K, w, scales, N, y");
        return -1;
    }
    for (int i = 0; i < 8; i++) {
        p[i] = PyLong_AsVoidPtr(args[i]);
        if (p[i] == NULL && PyErr_Occurred())
            return -1;
    }
    intptr_t M = (intptr_t)p[2], K = (intptr_t)p[3], N = (intptr_t)p[6];
    if (M < 0 || K <= 0 || K % GROUP || N < 0 || K > (1 << 24) || N > (1 << 28)) {
        PyErr_SetString(PyExc_ValueError, "bad shape: need M >= 0, N >= 0, K > 0 a multiple of 32");
        return -1;
    }
    return 0;
}

/* y = x W^T for int4 (`int8` 0: w, sm = float16 scale|min pairs) or int8 weights (`int8` 1: w,
   rs = a scale per row): quantize x's rows, then the tiles at the active instruction level. */
static PyObject *weight_mm(PyObject *const *args, Py_ssize_t nargs, int int8) {
    void *p[8];
    if (parse(args, nargs, p) < 0)
        return NULL;
    int bf16 = (intptr_t)p[1] & 1, ybf = ((intptr_t)p[1] >> 1) & 1;
    int M = (int)(intptr_t)p[2], K = (int)(intptr_t)p[3], N = (int)(intptr_t)p[6];
    int tiles = (N + TILE - 1) / TILE;
    float *dx, *xs;
    int16_t *xq = NULL;
    if (M == 0 || N == 0)
        Py_RETURN_NONE;
    Py_BEGIN_ALLOW_THREADS
    xq = quantize(p[0], bf16, M, K, &dx, &xs);
    if (xq != NULL && int8)
        gemv_int8_tiles(p[4], p[5], xq, dx, M, K, N, 0, tiles, p[7], ybf);
    else if (xq != NULL)
        gemv_int4_tiles(p[4], p[5], xq, dx, xs, M, K, N, 0, tiles, p[7], ybf);
    free(xq);
    Py_END_ALLOW_THREADS
    if (xq == NULL)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *int4_mm(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return weight_mm(args, nargs, 0);
}

static PyObject *int8_mm(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return weight_mm(args, nargs, 1);
}

static PyObject *level(PyObject *self, PyObject *unused) { return PyLong_FromLong(active_level); }

static PyObject *set_level(PyObject *self, PyObject *arg) {
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    active_level = n < detected_level ? (int)n : detected_level;
    if (active_level < 0)
        active_level = 0;
    return PyLong_FromLong(active_level);
}

#define FAST(name, doc) {#name, (PyCFunction)(void (*)(void))name, METH_FASTCALL, doc}

static PyMethodDef methods[] = {
    FAST(int4_mm, "int4_mm(x, dtypes, M, K, w, sm, N, y) -> None"),
    FAST(int8_mm, "int8_mm(x, dtypes, M, K, w, rs, N, y) -> None"),
    FAST(decode_model_new, "decode_model_new(dims, eps, ptrs) -> a model for decode_step (csrc/decode_step.c)"),
    FAST(decode_step, "decode_step(model, B, ids, pos, slots, req_to_token, req_idx, seq_lens, hidden, logits) -> None"),
    {"level", level, METH_NOARGS, "level() -> 3 (AVX-512 VNNI), 2 (AVX2) or 0 (plain C)"},
    {"set_level", set_level, METH_O, "set_level(n) -> the level now in use (at most the CPU's)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_gemv", "int4 / int8 weight products for a few rows, int8 activations",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__gemv(void) {
    detect();
    return PyModule_Create(&module);
}
