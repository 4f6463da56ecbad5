"""Attention and KV-store kernels against their references: in the Triton interpreter on CPU
tensors at small irregular sizes, and compiled on CUDA at real sizes (marked gpu)."""

import importlib

import pytest
import torch

from lightllm_async.kernels import (
    decode_attention,
    decode_attention_ref,
    prefill_attention,
    prefill_attention_ref,
    store_kv,
    store_kv_ref,
    use_triton,
)
from lightllm_async.kernels.prefill_attention import _descriptors
from lightllm_async.kernels.testing import (
    TOLERANCE,
    nan_filled_allocations,
    rel_err,
)


def make_cache(seq_lens, kv_heads, head_dim, dtype, device, spare=37, v_dim=None, cache_dtype=None):
    """A cache and request table for requests of `seq_lens` tokens, their rows scattered at random;
    v has head dim `v_dim` (default: head_dim); the cache in `cache_dtype` (default: dtype), its
    values random in `dtype` first.

    Rows no request owns hold NaN, and every request's table row is padded past its length with
    pointers to them, so a kernel that reads outside a context gives NaN.
    """
    used, rows = sum(seq_lens), sum(seq_lens) + spare
    perm = torch.randperm(rows, device=device)
    v_dim = v_dim or head_dim
    k_cache = torch.full((rows, kv_heads, head_dim), float("nan"), dtype=dtype, device=device)
    v_cache = torch.full((rows, kv_heads, v_dim), float("nan"), dtype=dtype, device=device)
    k_cache[perm[:used]] = torch.randn(used, kv_heads, head_dim, dtype=dtype, device=device)
    v_cache[perm[:used]] = torch.randn(used, kv_heads, v_dim, dtype=dtype, device=device)
    if cache_dtype is not None:  # NaN survives: float8 e4m3fn has it
        k_cache, v_cache = k_cache.to(cache_dtype), v_cache.to(cache_dtype)
    num_rows, width = len(seq_lens) + 3, max(seq_lens, default=0) + 5
    pad = torch.randint(0, spare, (num_rows, width), device=device)
    req_to_token = perm[used:][pad].to(torch.int32)
    req_idx = torch.randperm(num_rows, device=device)[: len(seq_lens)].to(torch.int32)
    start = 0
    for b, n in enumerate(seq_lens):
        req_to_token[req_idx[b], :n] = perm[start : start + n].to(torch.int32)
        start += n
    seq_lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    return k_cache, v_cache, req_to_token, req_idx, seq_lens


def check_decode(seq_lens, heads, head_dim, dtype, device, num_splits=None, cache_dtype=None, order=None):
    """`order`: "longest" (the runner's: longest context first), a permutation, or None."""
    hq, hk = heads
    k_cache, v_cache, req_to_token, req_idx, lens = make_cache(
        seq_lens, hk, head_dim, dtype, device, cache_dtype=cache_dtype
    )
    q = torch.randn(len(seq_lens), hq, head_dim, dtype=dtype, device=device)
    args = (q, k_cache, v_cache, req_to_token, req_idx, lens, head_dim**-0.5)
    if order == "longest":
        order = sorted(range(len(seq_lens)), key=lambda b: -seq_lens[b])
    if order is not None:
        order = torch.tensor(order, dtype=torch.int32, device=device)
    with nan_filled_allocations():
        out = decode_attention(*args, num_splits=num_splits, order=order)
    ref = decode_attention_ref(*args)
    assert not out.isnan().any()
    assert rel_err(out, ref) < TOLERANCE[dtype]
    return out


def check_prefill(
    new_and_prefix,
    heads,
    head_dim,
    dtype,
    device,
    v_dim=None,
    new_kv=False,
    blocks=None,
    packed_kv=False,
    cache_dtype=None,
):
    """new_kv: the new tokens' k/v passed apart (v a strided view, as a fused projection leaves
    it), and their cache rows then overwritten with NaN: the kernel must read them apart (in q's
    dtype, as a projection gives them, where the cache is fp8)."""
    hq, hk = heads
    seq_lens = [new + prefix for new, prefix in new_and_prefix]
    k_cache, v_cache, req_to_token, req_idx, lens = make_cache(
        seq_lens, hk, head_dim, dtype, device, v_dim=v_dim, cache_dtype=cache_dtype
    )
    new = torch.tensor([0] + [n for n, _ in new_and_prefix], device=device)
    q_start = new.cumsum(0).to(torch.int32)
    q = torch.randn(int(q_start[-1]), hq, head_dim, dtype=dtype, device=device)
    args = (q, k_cache, v_cache, req_to_token, req_idx, q_start, lens, head_dim**-0.5)
    ref = prefill_attention_ref(*args)
    extra = {}
    if new_kv:
        rows = torch.cat(
            [
                req_to_token[req_idx[b], n - m : n].long()
                for b, (m, n) in enumerate(zip(new[1:], seq_lens, strict=True))
            ]
        )
        kv = torch.cat([k_cache[rows].to(dtype), v_cache[rows].to(dtype)], dim=-1)  # [T, Hk, D + Dv]
        extra = {"k_new": kv[..., :head_dim].contiguous(), "v_new": kv[..., head_dim:]}
        if packed_kv:  # k then v of a row, each [Hk, D] packed (a fused qkv projection's layout)
            both = torch.stack([k_cache[rows].to(dtype), v_cache[rows].to(dtype)], dim=1)  # [T, 2, Hk, D]
            extra = {"k_new": both[:, 0], "v_new": both[:, 1]}
        k_cache[rows], v_cache[rows] = float("nan"), float("nan")
    with nan_filled_allocations():
        out = prefill_attention(*args, **extra, blocks=blocks)
    assert out.shape == (q.shape[0], hq, v_dim or head_dim) and not out.isnan().any()
    assert rel_err(out, ref) < TOLERANCE[dtype]


def check_store_kv(num_tokens, kv_heads, head_dim, dtype, device):
    rows = 3 * num_tokens + 5
    k_cache = torch.full((rows, kv_heads, head_dim), float("nan"), dtype=dtype, device=device)
    v_cache = k_cache.clone()
    k, v = torch.randn(2, num_tokens, kv_heads, head_dim, dtype=dtype, device=device)
    slots = torch.randperm(rows, device=device)[:num_tokens]
    store_kv(k_cache, v_cache, k, v, slots)
    assert torch.equal(k_cache[slots], k) and torch.equal(v_cache[slots], v)
    untouched = torch.ones(rows, dtype=torch.bool, device=device)
    untouched[slots] = False
    assert k_cache[untouched].isnan().all() and v_cache[untouched].isnan().all()
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv_ref(k_ref, v_ref, k, v, slots)
    assert torch.equal(k_ref.nan_to_num(), k_cache.nan_to_num())


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads", [(4, 2), (3, 3), (8, 1)])
def test_decode_attention_matches_reference_in_interpreter(interpreter, heads, head_dim):
    check_decode([1, 17, 130], heads, head_dim, torch.float32, "cpu")


@pytest.mark.parametrize("num_splits", [1, 2, 3, 5, 16])
def test_decode_attention_merges_any_number_of_splits(interpreter, num_splits):
    check_decode([1, 33, 130, 7], (4, 2), 64, torch.float32, "cpu", num_splits=num_splits)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_attention_in_an_order_matches_reference_in_interpreter(interpreter, num_splits):
    """The runner's order (longest first) or any permutation moves requests between programs, never
    a result: each program reads, attends and writes the request the order names."""
    seq_lens = [1, 33, 130, 7, 0, 64]
    check_decode(seq_lens, (4, 2), 64, torch.float32, "cpu", num_splits=num_splits, order="longest")
    check_decode(seq_lens, (4, 2), 64, torch.float32, "cpu", num_splits=num_splits, order=[3, 5, 0, 2, 4, 1])


@pytest.mark.parametrize("direct", [True, False])
def test_decode_attention_with_one_split_writes_the_output_without_a_merge(interpreter, monkeypatch, direct):
    """One chunk per context: the split kernel writes the output itself and the merge is never
    launched (LLA_DECODE_DIRECT=0 keeps the merge); the same answers either way, empty context too."""
    import importlib

    D = importlib.import_module("lightllm_async.kernels.decode_attention")
    launched = []
    merge = D._decode_merge_kernel

    class Spy:
        def __getitem__(self, grid):
            launched.append(grid)
            return merge[grid]

    monkeypatch.setattr(D, "_decode_merge_kernel", Spy())
    monkeypatch.setattr(D, "DIRECT_ONE_SPLIT", direct)
    check_decode([1, 33, 130, 7, 0], (4, 2), 64, torch.float32, "cpu", num_splits=1)
    assert len(launched) == (0 if direct else 1)
    check_decode([1, 33, 130, 7, 0], (4, 2), 64, torch.float32, "cpu", num_splits=2)
    assert len(launched) == (1 if direct else 2)  # more splits: merged either way


def test_decode_chunks_per_context_are_four_programs_an_sm_rounded_down(monkeypatch):
    """The chunk count the card's timing chose (perf/decode_splits_bench.py): about four programs
    per SM, rounded down, 1 to 32; so one chunk (and no merge) from 34 requests at 8 kv heads."""
    import importlib

    D = importlib.import_module("lightllm_async.kernels.decode_attention")
    monkeypatch.setattr(D, "_num_sms", lambda device: 132)
    cuda = torch.device("cuda")
    got = {b: D._num_splits(b, 8, cuda) for b in (1, 4, 8, 16, 24, 33, 34, 50, 256)}
    assert got == {1: 32, 4: 16, 8: 8, 16: 4, 24: 2, 33: 2, 34: 1, 50: 1, 256: 1}
    assert D._num_splits(3, 2, cuda) == 32 and D._num_splits(9, 8, cuda) == 7  # any count, not a power of two
    assert D._num_splits(64, 8, torch.device("cpu")) == 4  # the interpreter's


FP8 = torch.float8_e4m3fn


@pytest.mark.parametrize("heads", [(4, 2), (8, 1)])
def test_decode_attention_reads_an_fp8_cache_in_interpreter(interpreter, heads):
    """--kv-cache-dtype fp8: the kernel widens each block it loads to q's dtype; against the
    reference over the same float8 values."""
    check_decode([1, 17, 130], heads, 64, torch.float32, "cpu", cache_dtype=FP8)
    check_decode([1, 33, 130, 7], heads, 64, torch.float32, "cpu", num_splits=16, cache_dtype=FP8)
    # bfloat16 queries: q and the widened blocks meet in float16 (QK_F16), as on a card
    check_decode([1, 17, 130], heads, 64, torch.bfloat16, "cpu", cache_dtype=FP8)


@pytest.mark.parametrize("new_kv", [False, True])
def test_prefill_attention_reads_an_fp8_cache_in_interpreter(interpreter, new_kv):
    """The cached prefix (and, gathering, the new tokens) from a float8 cache; with new_kv the new
    tokens' k/v in q's dtype beside it."""
    new_and_prefix = [(70, 0), (33, 20), (1, 5), (47, 16), (20, 70)]
    blocks = (32, 16, 4, 1, 0, 32) if new_kv else None
    check_prefill(
        new_and_prefix, (4, 2), 64, torch.float32, "cpu", new_kv=new_kv, blocks=blocks, cache_dtype=FP8
    )


def check_store_fp8(num_tokens, kv_heads, head_dim, dtype, device, exact_inputs=False):
    """store_kv and the rotary kernel's fused store into a float8 cache: exactly the slots, each
    value torch's float8 rounding of the input, or its neighbour (one step of the 3-bit mantissa;
    2^-9 among the subnormals) for at most 1% of them, and +-448 past the range. `exact_inputs`:
    values float8 holds exactly, so that no rounding is involved (the interpreter's conversion
    rounds 1.97 to 1.0: its mantissa carry is lost)."""
    from lightllm_async.kernels import rotary_emb, rotary_emb_ref

    rows = 3 * num_tokens + 5
    slots = torch.randperm(rows, device=device)[:num_tokens]
    k, v = torch.randn(2, num_tokens, kv_heads, head_dim, dtype=dtype, device=device) * 8
    if exact_inputs:
        k, v = k.to(FP8).to(dtype), v.to(FP8).to(dtype)
    k[0, 0, :3] = torch.tensor([1000.0, -1000.0, 448.0])  # saturated, then kept
    positions = torch.randint(0, 50, (num_tokens,), device=device)
    cos_sin = torch.randn(64, head_dim, dtype=torch.float32, device=device)
    for store in ("store_kv", "rotary"):
        k_cache = torch.full((rows, kv_heads, head_dim), float("nan"), device=device).to(FP8)
        v_cache = k_cache.clone()
        if store == "store_kv":
            store_kv(k_cache, v_cache, k, v, slots)
            k_in = k
            assert k_cache[slots[0], 0, :3].float().tolist() == [448.0, -448.0, 448.0]  # saturated
        else:
            q = torch.randn(num_tokens, 2 * kv_heads, head_dim, dtype=dtype, device=device)
            rotary_emb(q, k, positions, cos_sin, store=(k_cache, v_cache, v, slots))
            # the kernel rotates in float32 and stores that: against the float32 rotation, not
            # against k_out, which is rounded to `dtype` first (bf16 then float8: ~3% differ)
            k_in = rotary_emb_ref(q.float(), k.float(), positions, cos_sin)[1]
        for cache, x in ((k_cache, k_in), (v_cache, v)):
            if store == "rotary" and exact_inputs and cache is k_cache:
                continue  # the rotation makes values float8 does not hold: rounding again
            got, want = cache[slots].float(), x.float().clamp(-448, 448).to(FP8).float()
            step = torch.exp2(torch.floor(torch.log2(want.abs().clamp_min(2**-6))) - 3)
            assert ((got - want).abs() <= step).all(), store
            assert (got == want).float().mean() >= 0.99, store
        untouched = torch.ones(rows, dtype=torch.bool, device=device)
        untouched[slots] = False
        assert k_cache[untouched].float().isnan().all() and v_cache[untouched].float().isnan().all()


def test_kv_stores_round_into_an_fp8_cache_in_interpreter(interpreter):
    check_store_fp8(7, 2, 64, torch.float32, "cpu", exact_inputs=True)


def test_decode_attention_gives_zeros_for_an_empty_context(interpreter):
    out = check_decode([0, 17], (4, 2), 64, torch.float32, "cpu")
    assert torch.equal(out[0], torch.zeros_like(out[0]))


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(
    "new_and_prefix",
    [
        [(1, 0), (7, 10), (33, 97)],  # contexts 1, 17, 130; a decode-like single token
        [(16, 0), (0, 5), (17, 16), (1, 1)],  # block-sized, empty and one-past-block requests
        [(20, 14), (3, 31), (18, 47)],  # queries starting just short of a block edge
        [(1, 3)] * 9 + [(40, 0)],  # many short requests ahead of one long one
    ],
)
@pytest.mark.parametrize("new_kv", [False, True], ids=["cache", "new-kv"])
def test_prefill_attention_matches_reference_in_interpreter(interpreter, new_and_prefix, head_dim, new_kv):
    check_prefill(new_and_prefix, (4, 2), head_dim, torch.float32, "cpu", new_kv=new_kv)


@pytest.mark.parametrize("order", [0, 1, 2])  # grid (blocks, heads); (heads, blocks); reversed blocks
@pytest.mark.parametrize("head_dim", [48, 64])  # padded head dims: the new tokens' loads masked
def test_prefill_attention_new_kv_in_any_grid_order(interpreter, order, head_dim):
    """Query blocks of two key blocks each (BLOCK_M 32, BLOCK_N 16): the new tokens before a block
    are read in whole key blocks, unmasked; the requests' lengths (and cached prefixes, read in
    blocks of 16 or 32) cross both block edges."""
    new_and_prefix = [(70, 0), (33, 20), (1, 5), (16, 0), (47, 16), (20, 70)]
    for prefix_block in (16, 32):  # the cached prefix's blocks: those of the new tokens, or wider
        blocks = (32, 16, 4, 1, order, prefix_block)
        check_prefill(new_and_prefix, (4, 2), head_dim, torch.float32, "cpu", new_kv=True, blocks=blocks)


@pytest.mark.parametrize("order", [0, 2])
def test_prefill_attention_reads_the_new_keys_through_tensor_descriptors(interpreter, order):
    """The TMA experiment (`blocks`' 7th field): the new tokens' whole key blocks through tensor
    descriptors of k/v as [T, Hk * D] (packed heads, as a fused qkv projection leaves them)."""
    k = torch.zeros(40, 2, 2, 64)
    assert all(d is not None for d in _descriptors(k[:, 0], k[:, 1], 16))  # taken for this layout
    assert _descriptors(k[:, 0, :, :48], k[:, 1, :, :48], 16) == (None, None)  # padded heads: not
    new_and_prefix = [(70, 0), (33, 20), (1, 5), (47, 16), (20, 70)]
    blocks = (32, 16, 4, 1, order, 32, True)
    check_prefill(
        new_and_prefix, (4, 2), 64, torch.float32, "cpu", new_kv=True, blocks=blocks, packed_kv=True
    )


def test_prefill_attention_handles_mha_and_wide_gqa(interpreter):
    check_prefill([(5, 3), (20, 0)], (3, 3), 64, torch.float32, "cpu")
    check_prefill([(5, 3), (20, 0)], (8, 1), 64, torch.float32, "cpu")


def test_prefill_last_token_equals_decode(interpreter):
    seq_lens, heads, dim = [9, 40], (4, 2), 64
    k_cache, v_cache, req_to_token, req_idx, lens = make_cache(seq_lens, heads[1], dim, torch.float32, "cpu")
    q = torch.randn(2, heads[0], dim)
    q_start = torch.tensor([0, 1, 2], dtype=torch.int32)
    cache = (k_cache, v_cache, req_to_token, req_idx)
    out_prefill = prefill_attention(q, *cache, q_start, lens, 0.1)
    out_decode = decode_attention(q, *cache, lens, 0.1)
    assert rel_err(out_prefill, out_decode) < 1e-5


@pytest.mark.parametrize("num_tokens", [1, 7, 33])
@pytest.mark.parametrize("kv_heads, head_dim", [(2, 64), (3, 128)])
def test_store_kv_writes_exactly_the_slots_in_interpreter(interpreter, num_tokens, kv_heads, head_dim):
    check_store_kv(num_tokens, kv_heads, head_dim, torch.float32, "cpu")


# Head dims that are not powers of two (Phi-2 80, Qwen-1.8B and StableLM 96): the kernels pad the
# head dim to the next power of two and mask the padding, at irregular lengths and GQA ratios.
ODD_HEAD_DIMS = [80, 96]


@pytest.mark.parametrize("head_dim", ODD_HEAD_DIMS)
@pytest.mark.parametrize("heads", [(4, 2), (5, 5), (6, 1)])
def test_decode_attention_pads_odd_head_dims(interpreter, heads, head_dim):
    check_decode([1, 7, 13, 40], heads, head_dim, torch.float32, "cpu")


@pytest.mark.parametrize("head_dim", ODD_HEAD_DIMS)
@pytest.mark.parametrize("heads", [(4, 2), (5, 5), (6, 1)])
def test_prefill_attention_pads_odd_head_dims(interpreter, heads, head_dim):
    check_prefill([(1, 0), (7, 6), (13, 20), (1, 12)], heads, head_dim, torch.float32, "cpu")


# MLA's prefill attends with q.k head dim 192 and v head dim 128; the kernel takes any pair,
# v narrower or wider than q.k, each padded to its own power of two.
@pytest.mark.parametrize("qk_dim, v_dim", [(48, 32), (24, 40), (96, 64), (80, 16)])
@pytest.mark.parametrize("heads", [(4, 2), (5, 5)])
def test_prefill_attention_takes_a_v_head_dim_of_its_own(interpreter, heads, qk_dim, v_dim):
    check_prefill([(1, 0), (7, 6), (20, 14), (1, 12)], heads, qk_dim, torch.float32, "cpu", v_dim=v_dim)


@pytest.mark.parametrize(
    "new_and_prefix, heads, head_dim, v_dim",
    [
        ([(1, 0), (7, 10), (33, 97)], (4, 2), 64, None),  # a decode-like token, prefixes, GQA
        ([(16, 0), (0, 5), (17, 16), (1, 1)], (3, 3), 80, None),  # an empty request, MHA
        ([(1, 3)] * 9 + [(40, 0)], (8, 1), 128, None),  # many short requests, one long
        ([(1, 0), (7, 6), (20, 14)], (5, 5), 96, 64),  # MLA-like: v narrower than q.k
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_attention_cpu_path_matches_reference(
    monkeypatch, new_and_prefix, heads, head_dim, v_dim, dtype
):
    """Without Triton (the CPU), prefill runs torch's SDPA per request rather than the reference."""
    assert not use_triton(torch.empty(1)), "run without TRITON_INTERPRET: this is the CPU path"

    def not_the_reference(*_):
        raise AssertionError("the CPU path must not build every score")

    monkeypatch.setattr(
        importlib.import_module("lightllm_async.kernels.prefill_attention"),
        "prefill_attention_ref",
        not_the_reference,
    )
    check_prefill(new_and_prefix, heads, head_dim, dtype, "cpu", v_dim=v_dim)


@pytest.mark.parametrize("head_dim", ODD_HEAD_DIMS)
@pytest.mark.parametrize("num_tokens, kv_heads", [(1, 1), (7, 2), (13, 5)])
def test_store_kv_pads_odd_head_dims(interpreter, num_tokens, kv_heads, head_dim):
    check_store_kv(num_tokens, kv_heads, head_dim, torch.float32, "cpu")


@pytest.mark.gpu
def test_decode_attention_matches_reference_on_gpu(gpu):
    seq_lens = torch.randint(1, 4097, (64,)).tolist()
    seq_lens[:3] = [1, 4096, 4095]
    check_decode(seq_lens, (32, 8), 128, torch.bfloat16, "cuda")
    check_decode([4096] * 4, (32, 8), 128, torch.bfloat16, "cuda")
    check_decode(seq_lens, (32, 8), 128, torch.bfloat16, "cuda", num_splits=1)  # no merge: direct
    for batch in (64, 256):  # the runner's order, one chunk a context and several
        check_decode(
            torch.randint(1, 2000, (batch,)).tolist(), (32, 8), 128, torch.bfloat16, "cuda", order="longest"
        )
    check_decode(seq_lens, (32, 8), 128, torch.bfloat16, "cuda", order=torch.randperm(64).tolist())
    check_decode(seq_lens[:8], (32, 8), 64, torch.bfloat16, "cuda")
    for head_dim in ODD_HEAD_DIMS:
        check_decode(seq_lens[:8], (40, 8), head_dim, torch.bfloat16, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128])
def test_prefill_attention_matches_reference_on_gpu(gpu, head_dim):
    new_and_prefix = [(1000, 0), (1, 3000), (517, 100), (2048, 2048), (129, 127)]
    check_prefill(new_and_prefix, (32, 8), head_dim, torch.bfloat16, "cuda")
    check_prefill(new_and_prefix, (32, 8), head_dim, torch.bfloat16, "cuda", new_kv=True)


@pytest.mark.gpu
def test_prefill_attention_through_tensor_descriptors_on_gpu(gpu):
    """The TMA experiment at Llama-3-8B's heads: whole new-key blocks through TMA copies."""
    new_and_prefix = [(1000, 0), (1, 3000), (517, 100), (2048, 2048), (129, 127)]
    for blocks in ((128, 64, 8, 3, 2, 128, True), (128, 128, 8, 3, 2, 128, True)):
        check_prefill(
            new_and_prefix, (32, 8), 128, torch.bfloat16, "cuda", new_kv=True, blocks=blocks, packed_kv=True
        )


@pytest.mark.gpu
def test_prefill_attention_with_mla_head_dims_on_gpu(gpu):
    """DeepSeek V2/V3's decompressed prefill: 128 heads (MHA), q.k 192, v 128."""
    new_and_prefix = [(1000, 0), (1, 3000), (517, 100), (129, 127)]
    check_prefill(new_and_prefix, (128, 128), 192, torch.bfloat16, "cuda", v_dim=128)


@pytest.mark.gpu
def test_store_kv_writes_exactly_the_slots_on_gpu(gpu):
    check_store_kv(4099, 8, 128, torch.bfloat16, "cuda")
    check_store_kv(4099, 5, 80, torch.bfloat16, "cuda")


@pytest.mark.gpu
def test_decode_attention_replays_in_a_cuda_graph_with_new_lengths(gpu):
    seq_lens = [300, 1, 2048, 77]
    k_cache, v_cache, req_to_token, req_idx, lens = make_cache(seq_lens, 8, 128, torch.bfloat16, "cuda")
    q = torch.randn(4, 32, 128, dtype=torch.bfloat16, device="cuda")
    args = (q, k_cache, v_cache, req_to_token, req_idx, lens, 128**-0.5)
    decode_attention(*args)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(*args)
    for new_lens in ([150, 1, 2048, 77], [1, 1, 129, 3]):  # within each request's cached rows
        lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        q.normal_()
        graph.replay()
        assert rel_err(out, decode_attention_ref(*args)) < TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
def test_attention_over_an_fp8_cache_on_gpu(gpu):
    """--kv-cache-dtype fp8 at Llama-3-8B's heads: decode (splits merged), prefill gathering and
    with the new tokens apart (through TMA on Hopper), against the reference over the same
    float8 values; the stores round as torch does."""
    check_decode([1, 17, 1300, 4099], (32, 8), 128, torch.bfloat16, "cuda", cache_dtype=FP8)
    new_and_prefix = [(1000, 0), (1, 3000), (517, 100), (129, 127)]
    check_prefill(new_and_prefix, (32, 8), 128, torch.bfloat16, "cuda", cache_dtype=FP8)
    check_prefill(
        new_and_prefix, (32, 8), 128, torch.bfloat16, "cuda", new_kv=True, cache_dtype=FP8, packed_kv=True
    )
    check_store_fp8(4099, 8, 128, torch.bfloat16, "cuda")
