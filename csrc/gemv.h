/*
 * The kernels of csrc/gemv.c for other C files of the `_gemv` extension (csrc/decode_step.c):
 * the activation quantization and the tiled int4 / int8 products at the active instruction level.
 * Layouts and error bounds are described at the top of gemv.c.
 */
#ifndef LIGHTLLM_GEMV_H
#define LIGHTLLM_GEMV_H

#include <Python.h>
#include <stdint.h>

#define GEMV_TILE 16
#define GEMV_GROUP 32

/* 3 AVX-512 VNNI, 2 AVX2, 0 plain C: what gemv_* run now (set_level lowers it for tests) */
int gemv_level(void);

/* M rows of x [M, K] (float32, or bfloat16 when bf16) -> xq int16 [M, K] in the kernels' pair
   order, dx and xs float32 [M, K / 32] */
void gemv_quantize(const void *x, int bf16, int M, int K, int16_t *xq, float *dx, float *xs);

/* tiles t0..t1-1 (16 output columns each) of y [M, N] = x W^T; y float32, or bfloat16 when ybf */
void gemv_int4_tiles(const uint8_t *w, const uint16_t *sm, const int16_t *xq, const float *dx,
                     const float *xs, int M, int K, int N, int t0, int t1, void *y, int ybf);
void gemv_int8_tiles(const int8_t *w, const float *rs, const int16_t *xq, const float *dx, int M,
                     int K, int N, int t0, int t1, void *y, int ybf);

/* csrc/decode_step.c: the whole decode step of a Llama-family model (its Python functions) */
PyObject *decode_model_new(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *decode_step(PyObject *self, PyObject *const *args, Py_ssize_t nargs);

#endif
