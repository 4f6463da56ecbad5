"""Int4 and int8 weight products for a few rows on the CPU (decode), with integer dot products.

The C kernels (`csrc/gemv.c`, the `_gemv` extension) quantize each activation row to int16 per
block of 32 inputs, `x ~ dx * xq` with dx = max|x_block| / 32767, and sum integer products with
the weights' codes (AVX-512 VNNI vpdpwssd, AVX2 or plain C), as llama.cpp does with int8 blocks.
(int8 activations halve the instructions but moved SmolLM2's greedy answers off the float32
reference; perf/RESULTS.md.) The weights are packed once at load in tiles of 16 output rows
(`pack_int4`, `pack_int8`; the layouts are in csrc/gemv.c).

Error against the float weights: each activation moves by at most dx / 2, so an output by at most
`sum over blocks of dx / 2 * sum |W[n, k]|` over the block (`activation_bound`); the integer
sums are exact and the float sums float32. Int4 scales and mins are held as float16: exact for
Q4_0 and Q4_1 (the file's own float16s), rounded by up to 2^-11 relative for Q4_K.

Under torch.compile the products are custom ops (`torch.ops.lightllm.int4_mm`, `int8_mm`) with
fake implementations, so inductor calls them without a graph break; eager calls the extension
directly: the dispatcher's way into a Python kernel costs ~5 µs more a call (a `Library`-defined
op measured no cheaper), of a product's ~15-90 µs.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    from lightllm_async import _gemv as native
except ImportError:  # not built: the callers keep torch's kernels
    native = None

GROUP = 32
TILE = 16
QMAX = 32767  # the activations' int16 range


def available() -> bool:
    """The extension is built (it runs on any CPU: plain C where no vector path fits)."""
    return native is not None


def describe() -> str:
    """For the load line: which kernel runs the small products."""
    isa = {3: "AVX-512 VNNI", 2: "AVX2"}.get(native.level(), "plain C") if native else None
    return f"_gemv ({isa}, int16 activations)" if isa else "torch's kernels"


# -- references -------------------------------------------------------------------------------


def int4_mm_ref(x: Tensor, codes: Tensor, scale: Tensor, min: Tensor) -> Tensor:
    """float64 [M, N] = x [M, K] W^T, W = scale * codes + min per group of 32 (the float weights)."""
    n, k = codes.shape
    w = codes.view(n, k // GROUP, GROUP).double() * scale.double()[..., None] + min.double()[..., None]
    return x.double() @ w.view(n, k).T


def quantize_rows_ref(x: Tensor) -> tuple[Tensor, Tensor]:
    """What the kernels multiply by (in input order): (xq int16 [M, K], dx float32 [M, K / 32])."""
    m, k = x.shape
    v = x.float().view(m, k // GROUP, GROUP)
    amax = v.abs().amax(-1)
    inv = torch.where(amax > 1e-30, QMAX / amax, torch.zeros_like(amax))  # tinier blocks: zeros
    xq = torch.round(v * inv[..., None]).to(torch.int16)  # round half to even, as the kernels
    return xq.view(m, k), amax / QMAX


def activation_bound(x: Tensor, w: Tensor) -> Tensor:
    """The largest |change| of x W^T [M, N] when each activation moves by half its block's step."""
    m, k = x.shape
    half_step = (x.float().view(m, k // GROUP, GROUP).abs().amax(-1) / (2 * QMAX)).double()  # [M, K / 32]
    abs_sums = w.double().abs().view(w.shape[0], k // GROUP, GROUP).sum(-1)  # [N, K / 32]
    return half_step @ abs_sums.T


# -- packing, once at load --------------------------------------------------------------------


def _pad_rows(t: Tensor) -> Tensor:
    pad = -t.shape[0] % TILE
    return t if pad == 0 else torch.cat([t, t.new_zeros(pad, *t.shape[1:])])


def pack_int4(codes: Tensor, scale: Tensor, min: Tensor) -> tuple[Tensor, Tensor]:
    """codes uint8 [N, K] (0..15), scale and min [N, K / 32] -> (w uint8 [N/16, K/32, 4, 16, 4],
    sm float16 [N/16, K/32, 2, 16]), N padded to whole tiles."""
    n, k = codes.shape
    # four codes (j) as one int32, so that the shift and the transpose move 4 bytes at a time
    # (~4x faster at load): codes are at most 15, so `<< 4` stays inside each byte
    c = _pad_rows(codes.to(torch.uint8).contiguous()).view(torch.int32)
    c = c.view(-1, TILE, k // GROUP, 4, 2)  # [T, r, g, p, half] of 4 codes each
    nib = c[..., 0] | (c[..., 1] << 4)  # [T, r, g, p]
    w = nib.permute(0, 2, 3, 1).contiguous().view(torch.uint8).view(-1, k // GROUP, 4, TILE, 4)
    sm = torch.stack([_pad_rows(scale.float()), _pad_rows(min.float())], -1).half()  # [N, G, 2]
    sm = sm.view(-1, TILE, k // GROUP, 2).permute(0, 2, 3, 1).contiguous()  # [T, g, 2, r]
    return w, sm


def pack_int8(codes: Tensor, row_scale: Tensor) -> tuple[Tensor, Tensor]:
    """codes int8 [N, K], row_scale [N] -> (w int8 [N/16, K/32, 8, 16, 4], float32 [N/16 * 16])."""
    n, k = codes.shape
    c = _pad_rows(codes.to(torch.int8).contiguous()).view(torch.int32).view(-1, TILE, k // GROUP, 8)
    w = c.permute(0, 2, 3, 1).contiguous().view(torch.int8).view(-1, k // GROUP, 8, TILE, 4)
    return w, _pad_rows(row_scale.float().contiguous())


# -- the products ----------------------------------------------------------------------------


def _call(fn, x: Tensor, w: Tensor, scales: Tensor, n: int, out_dtype: torch.dtype) -> Tensor:
    if x.dtype not in _DTYPES:
        x = x.float()
    x = x.contiguous()
    m, k = x.shape
    y = torch.empty(m, n, dtype=out_dtype)
    dtypes = _DTYPES[x.dtype] | 2 * _DTYPES[out_dtype]
    if torch.autograd._profiler_enabled():  # a row in torch.profiler's tables (perf/cpu_step_profile.py)
        with torch.profiler.record_function(f"_gemv.{fn.__name__}"):
            fn(x.data_ptr(), dtypes, m, k, w.data_ptr(), scales.data_ptr(), n, y.data_ptr())
    else:
        fn(x.data_ptr(), dtypes, m, k, w.data_ptr(), scales.data_ptr(), n, y.data_ptr())
    return y


_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


@torch.library.custom_op("lightllm::int4_mm", mutates_args=())
def _int4_mm_op(x: Tensor, w: Tensor, sm: Tensor, n: int, out_dtype: torch.dtype) -> Tensor:
    return _call(native.int4_mm, x, w, sm, n, out_dtype)


@_int4_mm_op.register_fake
def _(x: Tensor, w: Tensor, sm: Tensor, n: int, out_dtype: torch.dtype) -> Tensor:
    return x.new_empty((x.shape[0], n), dtype=out_dtype)


@torch.library.custom_op("lightllm::int8_mm", mutates_args=())
def _int8_mm_op(x: Tensor, w: Tensor, rs: Tensor, n: int, out_dtype: torch.dtype) -> Tensor:
    return _call(native.int8_mm, x, w, rs, n, out_dtype)


@_int8_mm_op.register_fake
def _(x: Tensor, w: Tensor, rs: Tensor, n: int, out_dtype: torch.dtype) -> Tensor:
    return x.new_empty((x.shape[0], n), dtype=out_dtype)


def int4_mm(x: Tensor, w: Tensor, sm: Tensor, n: int, out_dtype: torch.dtype = torch.float32) -> Tensor:
    """[M, n] = x [M, K] W^T for `pack_int4`'s (w, sm); x and the result float32 or bfloat16."""
    if torch.compiler.is_compiling():
        return _int4_mm_op(x, w, sm, n, out_dtype)
    return _call(native.int4_mm, x, w, sm, n, out_dtype)


def int8_mm(x: Tensor, w: Tensor, rs: Tensor, n: int, out_dtype: torch.dtype = torch.float32) -> Tensor:
    """[M, n] = x [M, K] W^T for `pack_int8`'s (w, rs); x and the result float32 or bfloat16."""
    if torch.compiler.is_compiling():
        return _int8_mm_op(x, w, rs, n, out_dtype)
    return _call(native.int8_mm, x, w, rs, n, out_dtype)
