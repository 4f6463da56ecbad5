"""MLA decode attention and the MLA cache store against their references: in the Triton interpreter
on CPU tensors at small irregular sizes, and compiled on CUDA at DeepSeek's sizes (marked gpu).

Tolerances (relative error in norm, kernels.testing.TOLERANCE): 1e-4 in float32, where the kernel
and the float32 reference differ only in summation order; 1e-2 in bfloat16, where the kernel rounds
the softmax weights to bf16 before the second product, as every flash-attention kernel does."""

import importlib

import pytest
import torch

from lightllm_async.kernels import (
    mla_decode_attention,
    mla_decode_attention_ref,
    mla_kv_store,
    mla_kv_store_ref,
    mla_store_kv,
    mla_store_kv_ref,
)
from lightllm_async.kernels.mla_decode_attention import lengths_spread, mla_absorb_q, mla_absorb_q_ref
from lightllm_async.kernels.rotary import rope_cache
from lightllm_async.kernels.testing import TOLERANCE, nan_filled_allocations, rel_err


def make_latent_cache(seq_lens, width, dtype, device, spare=37):
    """A [rows, width] latent cache and request table for requests of `seq_lens` tokens, their rows
    scattered at random. Rows no request owns hold NaN, and every request's table row is padded past
    its length with pointers to them, so a kernel that reads outside a context gives NaN."""
    used, rows = sum(seq_lens), sum(seq_lens) + spare
    perm = torch.randperm(rows, device=device)
    kv_cache = torch.full((rows, width), float("nan"), dtype=dtype, device=device)
    kv_cache[perm[:used]] = torch.randn(used, width, dtype=dtype, device=device)
    num_rows, table_width = len(seq_lens) + 3, max(seq_lens, default=0) + 5
    pad = torch.randint(0, spare, (num_rows, table_width), device=device)
    req_to_token = perm[used:][pad].to(torch.int32)
    req_idx = torch.randperm(num_rows, device=device)[: len(seq_lens)].to(torch.int32)
    start = 0
    for b, n in enumerate(seq_lens):
        req_to_token[req_idx[b], :n] = perm[start : start + n].to(torch.int32)
        start += n
    seq_lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    return kv_cache, req_to_token, req_idx, seq_lens


def check_mla_decode(seq_lens, heads, rank, rope, dtype, device, **launch):
    kv_cache, req_to_token, req_idx, lens = make_latent_cache(seq_lens, rank + rope, dtype, device)
    q_nope = torch.randn(len(seq_lens), heads, rank, dtype=dtype, device=device)
    q_pe = torch.randn(len(seq_lens), heads, rope, dtype=dtype, device=device)
    args = (q_nope, q_pe, kv_cache, req_to_token, req_idx, lens, (rank // 4 + rope) ** -0.5)
    with nan_filled_allocations():
        out = mla_decode_attention(*args, **launch)
    ref = mla_decode_attention_ref(*args)
    assert out.shape == (len(seq_lens), heads, rank) and out.dtype == dtype
    assert not out.isnan().any()
    assert rel_err(out, ref) < TOLERANCE[dtype]
    return out


@pytest.mark.parametrize(
    "heads, rank, rope",
    [(3, 32, 16), (16, 64, 16), (20, 48, 16)],  # heads under, at and over one block; a rank of 48
)
@pytest.mark.parametrize("seq_lens", [[300], [1, 17, 130, 300, 64]])
def test_mla_decode_matches_reference_in_interpreter(interpreter, seq_lens, heads, rank, rope):
    check_mla_decode(seq_lens, heads, rank, rope, torch.float32, "cpu")


@pytest.mark.parametrize("num_splits", [1, 2, 5, 16])  # 1 writes the output directly, no merge
def test_mla_decode_merges_any_number_of_splits(interpreter, num_splits):
    seq_lens = [1, 33, 130, 7, 0, 16, 17]  # one chunk, none, a chunk and one token
    check_mla_decode(seq_lens, 5, 32, 16, torch.float32, "cpu", num_splits=num_splits)


@pytest.mark.parametrize("min_split", [16, 40, 128, 1000])  # rounded up to the interpreter's 16-token blocks
def test_mla_decode_with_a_minimum_chunk_reads_only_the_chunks_a_context_reaches(interpreter, min_split):
    # 8 chunks at most; a short context fills fewer, and the ones past it hold NaN (never written)
    lens = [1, 33, 130, 7, 300]
    check_mla_decode(lens, 5, 32, 16, torch.float32, "cpu", num_splits=8, min_split=min_split)


def test_mla_launch_env_overrides_replace_the_cuda_defaults(monkeypatch):
    """LLA_MLA_MIN_SPLIT and LLA_MLA_LAUNCH (benchmarks: a launch per process) reach the CUDA
    launch of either head count; without them the defaults stand."""
    module = importlib.import_module("lightllm_async.kernels.mla_decode_attention")
    monkeypatch.delenv("LLA_MLA_MIN_SPLIT", raising=False)
    monkeypatch.delenv("LLA_MLA_LAUNCH", raising=False)
    assert module._env_overrides() == {}
    monkeypatch.setenv("LLA_MLA_MIN_SPLIT", "256")
    monkeypatch.setenv("LLA_MLA_LAUNCH", "16,32,4,5")
    env = module._env_overrides()
    assert env == {"min_split": 256, "block_h": 16, "block_n": 32, "num_warps": 4, "num_stages": 5}
    monkeypatch.setattr(module, "_ENV", env)
    cuda = torch.device("cuda", 0)
    for heads in (16, 128):
        launch = module._launch_config(heads, cuda, None)
        assert (launch.block_h, launch.block_n, launch.num_warps, launch.num_stages) == (16, 32, 4, 5)
        assert launch.min_split == 256
    monkeypatch.setattr(module, "_ENV", {})
    assert module._launch_config(16, cuda, None) == module._LAUNCH_FEW_HEADS


def test_mla_decode_gives_zeros_for_an_empty_context(interpreter):
    for splits in (1, 3):
        out = check_mla_decode([0, 17], 3, 32, 16, torch.float32, "cpu", num_splits=splits)
        assert torch.equal(out[0], torch.zeros_like(out[0]))


def test_mla_decode_with_absorbed_weights_equals_decompressed_attention(interpreter):
    """The contract the model relies on: attending over the latent with q_nope @ W_UK, then applying
    W_UV, is multi-head attention with keys [c_kv @ W_UK^T, k_pe] and values c_kv @ W_UV^T."""
    seq_lens, heads, rank, rope, nope, v_dim = [9, 70], 4, 32, 16, 24, 20
    kv_cache, req_to_token, req_idx, lens = make_latent_cache(seq_lens, rank + rope, torch.float32, "cpu")
    w_uk = torch.randn(heads, nope, rank) / rank**0.5  # kv_b_proj's key half, per head
    w_uv = torch.randn(heads, v_dim, rank) / rank**0.5  # kv_b_proj's value half, per head
    q_nope, q_pe = torch.randn(2, heads, nope), torch.randn(2, heads, rope)
    scale = (nope + rope) ** -0.5

    q_absorbed = torch.einsum("bhd,hdr->bhr", q_nope, w_uk)
    latent_out = mla_decode_attention(q_absorbed, q_pe, kv_cache, req_to_token, req_idx, lens, scale)
    out = torch.einsum("bhr,hvr->bhv", latent_out, w_uv)

    for b, n in enumerate(seq_lens):
        kv = kv_cache[req_to_token[req_idx[b], :n].long()]
        c_kv, k_pe = kv[:, :rank], kv[:, rank:]
        k = torch.cat([torch.einsum("sr,hdr->hsd", c_kv, w_uk), k_pe.expand(heads, n, rope)], dim=-1)
        v = torch.einsum("sr,hvr->hsv", c_kv, w_uv)
        q = torch.cat([q_nope[b], q_pe[b]], dim=-1)  # [H, nope + rope]
        probs = (torch.einsum("hd,hsd->hs", q, k) * scale).softmax(dim=-1)
        assert rel_err(out[b], torch.einsum("hs,hsv->hv", probs, v)) < 1e-4


def check_mla_store_kv(num_tokens, rank, rope, dtype, device):
    rows = 3 * num_tokens + 5
    kv_cache = torch.full((rows, rank + rope), float("nan"), dtype=dtype, device=device)
    # strided inputs, as slices of kv_a_proj's output [T, R + P] would be
    projected = torch.randn(num_tokens, rank + rope + 3, dtype=dtype, device=device)
    c_kv, k_pe = projected[:, :rank], projected[:, rank : rank + rope]
    slots = torch.randperm(rows, device=device)[:num_tokens]
    mla_store_kv(kv_cache, c_kv, k_pe.unsqueeze(1), slots)
    assert torch.equal(kv_cache[slots], torch.cat([c_kv, k_pe], dim=-1))
    untouched = torch.ones(rows, dtype=torch.bool, device=device)
    untouched[slots] = False
    assert kv_cache[untouched].isnan().all()
    ref = torch.full_like(kv_cache, float("nan"))
    mla_store_kv_ref(ref, c_kv, k_pe, slots)
    assert torch.equal(ref.nan_to_num(), kv_cache.nan_to_num())


@pytest.mark.parametrize("num_tokens", [1, 7, 33])
@pytest.mark.parametrize("rank, rope", [(32, 16), (48, 8)])
def test_mla_store_kv_writes_exactly_the_slots_in_interpreter(interpreter, num_tokens, rank, rope):
    check_mla_store_kv(num_tokens, rank, rope, torch.float32, "cpu")


def test_mla_store_then_decode_reads_the_stored_token(interpreter):
    """The new token, stored with mla_store_kv, takes part in the attention that follows."""
    seq_lens, heads, rank, rope = [5, 40], 3, 32, 16
    kv_cache, req_to_token, req_idx, lens = make_latent_cache(seq_lens, rank + rope, torch.float32, "cpu")
    last = req_to_token[req_idx.long(), lens.long() - 1].long()  # each request's newest row
    new = torch.randn(2, rank + rope)
    mla_store_kv(kv_cache, new[:, :rank], new[:, rank:], last)
    assert torch.equal(kv_cache[last], new)
    q_nope, q_pe = torch.randn(2, heads, rank), torch.randn(2, heads, rope)
    args = (q_nope, q_pe, kv_cache, req_to_token, req_idx, lens, 0.2)
    assert rel_err(mla_decode_attention(*args), mla_decode_attention_ref(*args)) < 1e-4


def check_mla_kv_store(num_tokens, heads, rank, rope, dtype, device):
    """The fused norm + rope + store against its reference: strided inputs (slices of one
    projection's output, as the model gives them), scattered slots, positions past a short table's
    start; exactly the slots' rows written, the rest untouched."""
    rows = 3 * num_tokens + 5
    cos_sin = rope_cache(rope, 4096, 10000.0, None, device)
    kv_cache = torch.full((rows, rank + rope), float("nan"), dtype=dtype, device=device)
    ref_cache = kv_cache.clone()
    # q | kv_a of one merged projection, 3 spare columns: both strided
    q_width = heads * (rope + 5)
    proj = torch.randn(num_tokens, q_width + rank + rope + 3, dtype=dtype, device=device)
    q_pe = proj[:, :q_width].view(num_tokens, heads, rope + 5)[:, :, 5:]
    kv_a = proj[:, q_width : q_width + rank + rope]
    weight = 1 + 0.1 * torch.randn(rank, dtype=dtype, device=device)
    positions = torch.randint(0, 4096, (num_tokens,), device=device)
    slots = torch.randperm(rows, device=device)[:num_tokens]
    args = (weight, 1e-6, positions, cos_sin)
    with nan_filled_allocations():
        q_out = mla_kv_store(q_pe, kv_a, *args, kv_cache, slots)
    q_ref = mla_kv_store_ref(q_pe, kv_a, *args, ref_cache, slots)
    assert q_out.shape == q_pe.shape and q_out.dtype == dtype
    assert rel_err(q_out, q_ref) < TOLERANCE[dtype]
    assert rel_err(kv_cache[slots], ref_cache[slots]) < TOLERANCE[dtype]
    untouched = torch.ones(rows, dtype=torch.bool, device=device)
    untouched[slots] = False
    assert kv_cache[untouched].isnan().all()
    assert not kv_cache[slots].isnan().any()


@pytest.mark.parametrize("num_tokens", [1, 7, 33])
@pytest.mark.parametrize("heads, rank, rope", [(3, 32, 16), (16, 48, 8), (5, 40, 12)])
def test_mla_kv_store_matches_reference_in_interpreter(interpreter, num_tokens, heads, rank, rope):
    check_mla_kv_store(num_tokens, heads, rank, rope, torch.float32, "cpu")


def test_mla_kv_store_bfloat16_in_interpreter(interpreter):
    check_mla_kv_store(9, 4, 64, 16, torch.bfloat16, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [16, 128, 8, 1])  # V2-Lite, V3 (one GPU), V2-Lite at TP 2 and 16
def test_mla_kv_store_matches_reference_on_gpu(gpu, heads):
    for tokens in (1, 64, 4099):
        check_mla_kv_store(tokens, heads, 512, 64, torch.bfloat16, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [16, 128])  # DeepSeek-V2-Lite, DeepSeek-V3 (one GPU, no TP)
def test_mla_decode_matches_reference_on_gpu(gpu, heads):
    seq_lens = torch.randint(1, 4097, (64,)).tolist()
    seq_lens[:3] = [1, 4096, 4095]
    check_mla_decode(seq_lens, heads, 512, 64, torch.bfloat16, "cuda")
    check_mla_decode([4096] * 4, heads, 512, 64, torch.bfloat16, "cuda")
    check_mla_decode(seq_lens[:8], heads, 512, 64, torch.bfloat16, "cuda", num_splits=1)
    check_mla_decode(seq_lens[:8], heads, 512, 64, torch.bfloat16, "cuda", num_splits=7)
    check_mla_decode(seq_lens[:8], heads, 512, 64, torch.bfloat16, "cuda", num_splits=64, min_split=256)
    other_block_h = 32 if heads <= 16 else 16  # the launch config of the other head count
    check_mla_decode(seq_lens[:8], heads, 512, 64, torch.bfloat16, "cuda", block_h=other_block_h)


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [16, 128, 8])  # V2-Lite, V3, V2-Lite at TP 2
def test_mla_absorb_q_and_w_uv_merge_match_references_on_gpu(gpu, heads):
    for batch in (1, 3, 8, 21):
        check_absorb_q(batch, heads, 128, 512, torch.bfloat16, "cuda")
    seq_lens = [1, 4096, 1000, 63, 64, 65, 2000, 7]
    for batch in (1, 2, 8):
        check_decode_w_uv(seq_lens[:batch], heads, 512, 64, 128, torch.bfloat16, "cuda")
    check_decode_w_uv(seq_lens, heads, 512, 64, 128, torch.bfloat16, "cuda", num_splits=1)


@pytest.mark.gpu
def test_mla_absorb_and_w_uv_merge_replay_in_a_cuda_graph(gpu):
    """The decode chain as the model runs it at batch 1-8 (absorb, split, merge with W_UV), captured
    once and replayed on new queries and lengths: under programmatic dependent launch the weights
    are read before each kernel waits, the step's data only after (a stale read would fail here)."""
    seq_lens = [300, 1, 2048, 77]
    kv_cache, req_to_token, req_idx, lens = make_latent_cache(seq_lens, 576, torch.bfloat16, "cuda")
    q_nope = torch.randn(4, 16, 128, dtype=torch.bfloat16, device="cuda")
    q_pe = torch.randn(4, 16, 64, dtype=torch.bfloat16, device="cuda")
    w_uk = torch.randn(16, 128, 512, dtype=torch.bfloat16, device="cuda") / 128**0.5
    w_uv = torch.randn(16, 512, 128, dtype=torch.bfloat16, device="cuda") / 512**0.5

    def chain():
        q_abs = mla_absorb_q(q_nope * 1.0, w_uk)  # the multiply: a kernel before, as the projection
        return mla_decode_attention(q_abs, q_pe, kv_cache, req_to_token, req_idx, lens, 192**-0.5, w_uv=w_uv)

    chain()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain()
    for new_lens in ([150, 1, 2048, 77], [1, 1, 129, 3]):
        lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        q_nope.normal_()
        q_pe.normal_()
        graph.replay()
        q_abs = mla_absorb_q_ref(q_nope, w_uk)
        o = mla_decode_attention_ref(q_abs, q_pe, kv_cache, req_to_token, req_idx, lens, 192**-0.5)
        ref = torch.einsum("bhr,hrv->bhv", o.float(), w_uv.float())
        assert rel_err(out, ref) < TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
def test_mla_store_kv_writes_exactly_the_slots_on_gpu(gpu):
    check_mla_store_kv(4099, 512, 64, torch.bfloat16, "cuda")


@pytest.mark.gpu
def test_mla_decode_replays_in_a_cuda_graph_with_new_lengths(gpu):
    seq_lens = [300, 1, 2048, 77]
    kv_cache, req_to_token, req_idx, lens = make_latent_cache(seq_lens, 576, torch.bfloat16, "cuda")
    q_nope = torch.randn(4, 16, 512, dtype=torch.bfloat16, device="cuda")
    q_pe = torch.randn(4, 16, 64, dtype=torch.bfloat16, device="cuda")
    args = (q_nope, q_pe, kv_cache, req_to_token, req_idx, lens, 192**-0.5)
    mla_decode_attention(*args)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mla_decode_attention(*args)
    for new_lens in ([150, 1, 2048, 77], [1, 1, 129, 3]):  # within each request's cached rows
        lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        q_nope.normal_()
        q_pe.normal_()
        graph.replay()
        assert rel_err(out, mla_decode_attention_ref(*args)) < TOLERANCE[torch.bfloat16]


def check_absorb_q(batch, heads, dim, rank, dtype, device):
    """The absorbed queries against their reference, from strided query rows (the q projection's
    output viewed per head, the rope dims after each head's no-rope ones)."""
    q = torch.randn(batch, heads, dim + 7, dtype=dtype, device=device)[:, :, :dim]
    w_uk = torch.randn(heads, dim, rank, dtype=dtype, device=device) / dim**0.5
    with nan_filled_allocations():
        out = mla_absorb_q(q, w_uk)
    assert out.shape == (batch, heads, rank) and out.dtype == dtype and out.is_contiguous()
    ref = mla_absorb_q_ref(q, w_uk)
    assert rel_err(out, ref) < TOLERANCE[dtype]
    bmm = torch.bmm(q.float().transpose(0, 1), w_uk.float()).transpose(0, 1)  # the model's unfused path
    assert rel_err(ref, bmm) < (1e-5 if dtype == torch.float32 else 4e-3)  # bf16: the output's rounding


@pytest.mark.parametrize("batch", [1, 5, 19])  # 19: a second tile of 16 rows
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mla_absorb_q_matches_reference_in_interpreter(interpreter, batch, dtype):
    check_absorb_q(batch, 3, 24, 48, dtype, "cpu")  # dims under a power of two, rank over a block


def check_decode_w_uv(seq_lens, heads, rank, rope, v_dim, dtype, device, **launch):
    """Attention with W_UV applied by the chunk merge (or after one chunk) equals the attention's
    latent output times W_UV per head."""
    kv_cache, req_to_token, req_idx, lens = make_latent_cache(seq_lens, rank + rope, dtype, device)
    q_nope = torch.randn(len(seq_lens), heads, rank, dtype=dtype, device=device)
    q_pe = torch.randn(len(seq_lens), heads, rope, dtype=dtype, device=device)
    w_uv = torch.randn(heads, rank, v_dim, dtype=dtype, device=device) / rank**0.5
    args = (q_nope, q_pe, kv_cache, req_to_token, req_idx, lens, (rank // 4 + rope) ** -0.5)
    with nan_filled_allocations():
        out = mla_decode_attention(*args, w_uv=w_uv, **launch)
    ref = torch.einsum("bhr,hrv->bhv", mla_decode_attention_ref(*args).float(), w_uv.float())
    assert out.shape == (len(seq_lens), heads, v_dim) and out.dtype == dtype and out.is_contiguous()
    assert not out.isnan().any()
    assert rel_err(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("num_splits", [1, 3])  # 1: no merge, W_UV applied after the kernel
def test_mla_decode_applies_w_uv_in_the_merge_in_interpreter(interpreter, num_splits):
    check_decode_w_uv([1, 40, 0, 130], 5, 32, 16, 24, torch.float32, "cpu", num_splits=num_splits)


def check_ordered(seq_lens, heads, device, dtype, order=None, w_uv_dim=None, rank=64, rope=16):
    """mla_decode_attention given an `order` (default: longest first, as the runner gives it)
    equals the reference, with the doubled cut always (no flag) and with either flag: the order
    and the cut move work between programs, never change a result."""
    kv_cache, req_to_token, req_idx, lens = make_latent_cache(seq_lens, rank + rope, dtype, device)
    q_nope = torch.randn(len(seq_lens), heads, rank, dtype=dtype, device=device)
    q_pe = torch.randn(len(seq_lens), heads, rope, dtype=dtype, device=device)
    if order is None:
        order = sorted(range(len(seq_lens)), key=lambda b: -seq_lens[b])
    order = torch.tensor(order, dtype=torch.int32, device=device)
    args = (q_nope, q_pe, kv_cache, req_to_token, req_idx, lens, (rank // 4 + rope) ** -0.5)
    ref = mla_decode_attention_ref(*args)
    w_uv = None
    if w_uv_dim is not None:
        w_uv = torch.randn(heads, rank, w_uv_dim, dtype=dtype, device=device) / rank**0.5
        ref = torch.einsum("bhr,hrv->bhv", ref.float(), w_uv.float())
    for flag in (None, 0, 1):
        spread = None if flag is None else torch.tensor([flag], dtype=torch.int32, device=device)
        with nan_filled_allocations():
            out = mla_decode_attention(*args, w_uv=w_uv, order=order, spread=spread)
        assert not out.isnan().any()
        assert rel_err(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize(
    "seq_lens",
    [
        [130, 2, 300, 64, 65, 1, 1],  # spread, padding rows of one token last
        [200, 201, 199, 200, 1],  # alike: with the flag 0, the programs past a context write an empty lse
        [0, 47, 300, 5],  # an empty context among them
    ],
)
@pytest.mark.parametrize("w_uv_dim", [None, 24])
def test_mla_decode_in_an_order_matches_reference_in_interpreter(interpreter, seq_lens, w_uv_dim):
    check_ordered(seq_lens, 5, "cpu", torch.float32, w_uv_dim=w_uv_dim)
    rng = torch.Generator().manual_seed(len(seq_lens))
    shuffled = torch.randperm(len(seq_lens), generator=rng).tolist()  # any permutation is correct
    check_ordered(seq_lens, 5, "cpu", torch.float32, order=shuffled, w_uv_dim=w_uv_dim)


@pytest.mark.parametrize(
    "seq_lens, spread",
    [
        ([4000] * 5, False),
        ([2000, 6000, 4000], True),  # the longest 1.5x the mean
        ([100, 130], False),  # 1.13x
        ([100, 140, 100], True),  # 1.24x
        ([7], False),
    ],
)
def test_mla_lengths_spread_where_the_longest_is_over_a_fifth_above_the_mean(seq_lens, spread):
    assert lengths_spread(max(seq_lens), sum(seq_lens), len(seq_lens)) is spread


def test_mla_ordered_launch_doubles_only_a_few_chunks_a_context():
    module = importlib.import_module("lightllm_async.kernels.mla_decode_attention")
    assert module._ordered_splits(2, "auto", True) == (4, True)  # halved unless the flag says spread
    assert module._ordered_splits(8, "auto", True) == (16, True)
    assert module._ordered_splits(8, "auto", False) == (16, False)  # no flag given: doubled always
    assert module._ordered_splits(8, "always", True) == (16, False)
    assert module._ordered_splits(2, "never", True) == (2, False)
    assert module._ordered_splits(1, "auto", True) == (1, False)  # one chunk: written directly, no merge
    assert module._ordered_splits(9, "auto", True) == (9, False)  # many short chunks already
    # a launch that may double one chunk (few heads, no W_UV merge): halved, it writes directly
    assert module._ordered_splits(1, "auto", True, one=True) == (2, True)
    assert module._ordered_splits(1, "always", True, one=True) == (2, False)
    assert module._ordered_splits(1, "never", True, one=True) == (1, False)
    assert module._ordered_splits(4, "auto", True, one=True) == (8, True)


class _LaunchSpy:
    """Stands in for a Triton kernel: records each launch's keyword arguments, then launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.parametrize("seq_lens", [[130, 2, 300, 64, 65, 1, 1], [200, 201, 199, 200, 1], [0, 47, 300, 5]])
def test_mla_decode_one_chunk_cut_is_doubled_in_an_order_and_merged_only_where_spread(
    interpreter, monkeypatch, seq_lens
):
    """Where the batch fills the card with one chunk a context, an ordered launch holds two. With
    the flag 0 the first writes the output and the merge exits; with 1 both are merged. Allocations
    are NaN-filled: an output left unwritten, or a merge of a chunk never written, shows as NaN."""
    module = importlib.import_module("lightllm_async.kernels.mla_decode_attention")
    monkeypatch.setattr(module, "_num_splits", lambda *args: 1)
    split = _LaunchSpy(module._mla_decode_split_kernel)
    merge = _LaunchSpy(module._mla_decode_merge_kernel)
    pair = _LaunchSpy(module._mla_decode_merge_pair_kernel)
    monkeypatch.setattr(module, "_mla_decode_split_kernel", split)
    monkeypatch.setattr(module, "_mla_decode_merge_kernel", merge)
    monkeypatch.setattr(module, "_mla_decode_merge_pair_kernel", pair)
    check_ordered(seq_lens, 5, "cpu", torch.float32)  # no flag, then flags 0 and 1
    assert [k["NUM_SPLITS"] for k in split.launches] == [2, 2, 2]
    assert [k["ADAPT"] for k in split.launches] == [False, True, True]
    assert len(merge.launches) == 1 and len(pair.launches) == 2  # doubled always: merged always
    split.launches.clear()
    merge.launches.clear()
    pair.launches.clear()
    check_ordered(seq_lens, 5, "cpu", torch.float32, w_uv_dim=24)  # the W_UV merge: one chunk, as before
    assert [k["NUM_SPLITS"] for k in split.launches] == [1, 1, 1] and not merge.launches and not pair.launches


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [16, 128])  # DeepSeek-V2-Lite (or V3 at TP 8), V3 on one GPU
def test_mla_decode_in_an_order_matches_reference_on_gpu(gpu, heads):
    # batch 64 and 100 cut 4 and 2 chunks a context at 16 heads: doubled, then halved where alike
    # and batch 200 one: doubled too at 16 heads, without W_UV (the merge exits where alike)
    for batch in (64, 100, 7, 200):
        spread = torch.randint(64, 6000, (batch,)).tolist()
        alike = [3000 + b % 7 for b in range(batch - 2)] + [1, 1]  # a graph bucket's padding rows
        for seq_lens in (spread, alike):
            check_ordered(seq_lens, heads, "cuda", torch.bfloat16, rank=512, rope=64)
            check_ordered(seq_lens, heads, "cuda", torch.bfloat16, rank=512, rope=64, w_uv_dim=128)
    shuffled = torch.randperm(64).tolist()
    lens = torch.randint(1, 5000, (64,)).tolist()
    check_ordered(lens, heads, "cuda", torch.bfloat16, shuffled, rank=512, rope=64)


@pytest.mark.gpu
@pytest.mark.parametrize("batch, with_w_uv", [(64, True), (200, False)])  # 4 chunks doubled; 1 doubled
def test_mla_decode_in_an_order_replays_in_a_cuda_graph_as_lengths_spread_and_even_out(gpu, batch, with_w_uv):
    """Captured once with the order and lengths of one step, replayed as the runner does: new
    lengths, their order and the spread flag written into the same buffers. The kernel doubles
    its cut or not on the device, per replay, as the flag says (at batch 200, one chunk: written
    directly, the merge exiting, or merged)."""
    kv_cache, req_to_token, req_idx, lens = make_latent_cache([6000] * batch, 576, torch.bfloat16, "cuda")
    q_nope = torch.randn(batch, 16, 512, dtype=torch.bfloat16, device="cuda")
    q_pe = torch.randn(batch, 16, 64, dtype=torch.bfloat16, device="cuda")
    w_uv = torch.randn(16, 512, 128, dtype=torch.bfloat16, device="cuda") / 512**0.5 if with_w_uv else None
    order = torch.arange(batch, dtype=torch.int32, device="cuda")
    flag = torch.zeros(1, dtype=torch.int32, device="cuda")
    args = (q_nope, q_pe, kv_cache, req_to_token, req_idx, lens, 192**-0.5)
    mla_decode_attention(*args, w_uv=w_uv, order=order, spread=flag)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mla_decode_attention(*args, w_uv=w_uv, order=order, spread=flag)
    spread = torch.randint(100, 6001, (batch,)).tolist()
    for new_lens in (spread, [4000] * batch, spread[::-1], [5] * (batch - 1) + [6000]):
        lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        order.copy_(torch.tensor(sorted(range(batch), key=lambda b: -new_lens[b]), dtype=torch.int32))
        flag.fill_(int(lengths_spread(max(new_lens), sum(new_lens), batch)))
        q_nope.normal_()
        graph.replay()
        ref = mla_decode_attention_ref(*args)
        if w_uv is not None:
            ref = torch.einsum("bhr,hrv->bhv", ref.float(), w_uv.float())
        assert rel_err(out, ref) < TOLERANCE[torch.bfloat16]
