"""DeepSeek V2/V3 (and R1, the V3 architecture): multi-head latent attention (MLA) and
routed + shared experts (MoE). Modules and forward only, written against `kernels/` like llama.py;
the checkpoint table is `models/deepseek_names.py`.

MLA caches per token and layer only the normed latent c_kv [kv_lora_rank] and the rotated rope key
k_pe [qk_rope_head_dim], one row of a [slots, R + P] pool (`MLAKVCache`).
- Steps that are not decode-only (prefill chunks, possibly mixed with decodes): the latent of
  every cached token of the step's requests (gathered once per step: `ForwardContext.packed`) is
  decompressed through kv_b_proj into per-head k_nope and v, and `prefill_attention` runs over
  that temporary expanded cache, q.k head dim nope + rope (192), v head dim v_head_dim (128).
- Decode-only steps: W_UK is absorbed into the no-rope query (q_nope @ W_UK per head), so that
  `mla_decode_attention` attends over the latent cache directly; W_UV is applied to its output.

The loader calls each module's `finish_loading` once every weight is in (`models/weights.py`); they
prepare what forward reads. Rope: the checkpoints lay the rope dims out in interleaved pairs; finish_loading
de-interleaves the rows of the q and kv_a projections that produce q_pe and k_pe (the same
permutation for both, so their dot products are unchanged), so that the neox `rotary_emb` rotates
them with no permutation at run time. It also copies W_UK and W_UV^T out of kv_b_proj for the
absorbed decode. YaRN scales the cos/sin table by its attention factor and the softmax scale by
mscale^2.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, fields
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightllm_async.config import ModelConfig, rope_type
from lightllm_async.kernels import (
    cpu_shapes,
    fused_moe,
    mla_decode_attention,
    mla_kv_store,
    mla_store_kv,
    prefill_attention,
    rope_cache,
    rotary_emb,
    select_experts,
    silu_and_mul,
    use_triton,
)
from lightllm_async.kernels.mla_decode_attention import mla_absorb_q
from lightllm_async.kernels.moe_routing import router_logits_parts
from lightllm_async.kernels.skinny_linear import linear
from lightllm_async.layers.embedding import VocabEmbedding
from lightllm_async.layers.linear import ColumnParallelLinear, Linear, MergedLinear, RowParallelLinear
from lightllm_async.layers.parallel import SINGLE, TPGroup
from lightllm_async.models.llama import ForwardContext, RMSNorm


@dataclass(frozen=True)
class MLAKVCache:
    """One pool per layer: [num_token_slots, kv_lora_rank + qk_rope_head_dim] (latent, rope key).
    The latent is shared by all heads, so under tensor parallelism every rank holds all of it:
    `tp` changes nothing here, and is taken only to answer as `KVCache` does."""

    kv: list[Tensor]

    @staticmethod
    def width(cfg: ModelConfig) -> int:
        return cfg.kv_lora_rank + cfg.qk_rope_head_dim

    @classmethod
    def allocate(cls, cfg: ModelConfig, num_tokens: int, dtype, device, tp: TPGroup = SINGLE) -> MLAKVCache:
        shape = (num_tokens, cls.width(cfg))
        return cls(kv=[torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)])

    def layers(self) -> list[Tensor]:
        """Every pool, in layer order: what moves a request's KV (runner/kv_transfer.py)."""
        return list(self.kv)

    @classmethod
    def bytes_per_token(cls, cfg: ModelConfig, dtype, tp: TPGroup = SINGLE) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return cfg.num_layers * cls.width(cfg) * itemsize


@dataclass(frozen=True)
class Fusions:
    """The decode layer's launch-saving fusions, all on by default: at batch 1 the layer's time is
    the fixed cost of its ~25 launches, not its bytes (perf/RESULTS.md, DeepSeek-V2-Lite's decode
    step at 2.8x its roofline). `from_env` reads LLA_DEEPSEEK_FUSE: "all" (default), "none" (the
    layer as before them), or the names to keep on, comma-separated; perf/decode_bench.py
    --compare-fusions times both ways in one process."""

    in_proj: bool = True  # q_proj (q_a_proj with q_lora) and kv_a_proj_with_mqa: one GEMM of x
    kv_store: bool = True  # kv_a norm, rope of k_pe and q_pe, cache store: one kernel (mla_kv_store)
    shared: bool = True  # shared experts inside fused_moe at small M where measured to pay
    w_uv_out: bool = True  # W_UV's bmm writes o_proj's [B, n * v] input itself (no copy)
    router: bool = True  # the router's float32 logits from one GEMM of bf16 x (CUDA; `Router`)
    expert_sum: bool = True  # the experts' outputs summed by the next norm (`MoE`; one rank)
    # decode at <= GEMV_MAX_ROWS rows (Triton), so that the step stays one chain of kernels that
    # start early (programmatic dependent launch), where cuBLAS's cannot:
    mla_gemv: bool = True  # W_UK's per-head product one kernel, W_UV's inside the chunk merge
    # the router's logits as partial sums over hidden slices, which select_experts adds up
    router_parts: bool = True

    @classmethod
    def off(cls) -> Fusions:
        """Every fusion off: the layer as before them."""
        return cls(**{f.name: False for f in fields(cls)})

    @classmethod
    def from_env(cls) -> Fusions:
        value = os.environ.get("LLA_DEEPSEEK_FUSE", "all")
        names = {f.name for f in fields(cls)}
        chosen = names if value == "all" else set() if value == "none" else set(value.split(","))
        if chosen - names:
            raise ValueError(f"LLA_DEEPSEEK_FUSE={value!r}: not all, none, or some of {sorted(names)}")
        return cls(**{name: name in chosen for name in names})


GEMV_MAX_ROWS = 8  # rows up to which the mla_gemv and router_parts fusions run (a shape decision)
ALWAYS = sys.maxsize  # fused_max_tokens: the shared experts always inside fused_moe
# Shared experts inside the routed experts' fused_moe pass up to this many tokens (a host decision
# per step, so one per captured CUDA graph): on an H200 (perf/RESULTS.md, 2026-11-29, CUDA-graph
# replays of the MoE layer) that gained 4-6% at V2-Lite's shape with M <= 8 (and 4 of the layer's
# launches) and lost 3-11% from M = 64, and lost at V3's shape at every M.
FUSED_SHARED_MAX_TOKENS = 8
V2_LITE_EXPERT = 2048 * 1408  # hidden x moe_intermediate_size of V2-Lite, where it was measured


def shared_fused_max_tokens(cfg: ModelConfig, device) -> int:
    """Up to how many tokens a step runs the shared experts inside fused_moe by default:
    FUSED_SHARED_MAX_TOKENS on CUDA where the experts are no larger than V2-Lite's, else 0 (never).
    Not on the CPU: its fused_moe (the reference) loops over the chosen experts, so each shared
    expert there costs more ops than the dense MLP of all of them."""
    small = cfg.hidden_size * cfg.moe_intermediate_size <= V2_LITE_EXPERT
    cuda = torch.device(device).type == "cuda"
    return FUSED_SHARED_MAX_TOKENS if cfg.n_shared_experts and small and cuda else 0


def _share_rows(*linears: Linear) -> Tensor:
    """One [sum of out, in] matrix whose row blocks the linears' weights become views of (so that
    the loader fills it through them, and nothing is held twice): one GEMM for several projections
    of the same input."""
    first = linears[0].weight
    merged = first.new_empty(sum(lin.weight.shape[0] for lin in linears), first.shape[1])
    start = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight = nn.Parameter(merged[start : start + rows], requires_grad=False)
        start += rows
    return merged


def _yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def mla_rope_cache(cfg: ModelConfig, device) -> Tensor:
    """cos_sin [max_pos, rope_dim] float32 (cos | sin halves) for plain rope or YaRN; under YaRN
    both are multiplied by its attention factor, as transformers' DeepSeek rotary embeddings do."""
    dim, theta, rs = cfg.qk_rope_head_dim, float(cfg.rope_theta), cfg.rope_scaling
    if rope_type(rs) == "default":
        return rope_cache(dim, cfg.max_position_embeddings, theta, None, device)
    # YaRN, the same float32 operations as transformers' _compute_yarn_parameters
    factor = rs["factor"]
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        attention_factor = _yarn_get_mscale(factor, mscale) / _yarn_get_mscale(factor, mscale_all_dim)
    else:
        attention_factor = _yarn_get_mscale(factor)
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1
    orig = rs["original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    pos_freqs = theta ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extra_factor = 1 - ramp
    inv_freq = interpolation * (1 - extra_factor) + extrapolation * extra_factor
    freqs = torch.arange(cfg.max_position_embeddings, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
    cos_sin = torch.cat([freqs.cos() * attention_factor, freqs.sin() * attention_factor], dim=-1)
    return cos_sin.to(device)


class MLAttention(nn.Module):
    """Multi-head latent attention; `finish_loading` must run once the checkpoint is in.

    Under tensor parallelism a rank runs its num_heads / size heads (`self.n`): the q projection
    and kv_b_proj column-parallel by head, o_proj row-parallel; the latent (kv_a_proj_with_mqa,
    its norm, the cache) is the same on every rank."""

    def __init__(self, cfg: ModelConfig, dtype, device, tp: TPGroup = SINGLE, fusions: Fusions = Fusions()):
        super().__init__()
        self.fusions = fusions
        self.n = tp.split(cfg.num_heads, "num_heads")  # this rank's heads
        self.nope, self.rope = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.v_dim, self.rank = cfg.v_head_dim, cfg.kv_lora_rank
        self.qk_dim = self.nope + self.rope
        h, heads = cfg.hidden_size, cfg.num_heads
        if cfg.q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(h, heads * self.qk_dim, False, dtype, device, tp)
        else:
            self.q_a_proj = Linear(h, cfg.q_lora_rank, False, dtype, device)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, dtype, device)
            self.q_b_proj = ColumnParallelLinear(
                cfg.q_lora_rank, heads * self.qk_dim, False, dtype, device, tp
            )
        self.q_lora = cfg.q_lora_rank is not None
        self.kv_a_proj_with_mqa = Linear(h, self.rank + self.rope, False, dtype, device)
        self.kv_a_layernorm = RMSNorm(self.rank, cfg.rms_norm_eps, dtype, device)
        # q_proj's (q_a_proj's) rows and kv_a_proj_with_mqa's, one matrix: both read x. Under tensor
        # parallelism q_proj holds this rank's heads and kv_a all its rows: the same on every rank.
        q_in = self.q_a_proj if self.q_lora else self.q_proj
        self.q_in_rows = q_in.weight.shape[0]
        w_in = _share_rows(q_in, self.kv_a_proj_with_mqa) if fusions.in_proj else None
        self.register_buffer("w_in", w_in, persistent=False)  # [q rows + R + P, H] or None
        self.kv_b_proj = ColumnParallelLinear(
            self.rank, heads * (self.nope + self.v_dim), False, dtype, device, tp
        )
        # unreduced: the norm that follows reduces it (`RMSNorm.reduce_add`)
        self.o_proj = RowParallelLinear(heads * self.v_dim, h, False, dtype, device, tp, reduce=False)
        self.scale = cfg.mla_softmax_scale
        self.rope_interleave = cfg.rope_interleave
        # kv_b_proj's two halves for the absorbed decode, each laid out as its bmm reads it
        w_uk = torch.empty(self.n, self.nope, self.rank, dtype=dtype, device=device)
        w_uv = torch.empty(self.n, self.rank, self.v_dim, dtype=dtype, device=device)
        self.register_buffer("w_uk", w_uk, persistent=False)  # [n, nope, R]: W_UK
        self.register_buffer("w_uv", w_uv, persistent=False)  # [n, R, v]: W_UV transposed

    @torch.no_grad()
    def finish_loading(self) -> None:
        """Derive forward's weights from the loaded checkpoint. Run it exactly once per load: the
        first step permutes rows in place, so a second run would scramble them. De-interleave the
        rope rows of the q projection (per head, the last qk_rope_head_dim rows) and of
        kv_a_proj_with_mqa (its last rows): the same permutation of q_pe and k_pe leaves their dot
        products unchanged and gives them the halves layout `rotary_emb` rotates. Then copy W_UK
        and W_UV^T out of kv_b_proj."""
        if self.rope_interleave:
            # (x0, x1), (x2, x3), ... -> (x0, x2, ...), (x1, x3, ...)
            perm = torch.cat([torch.arange(0, self.rope, 2), torch.arange(1, self.rope, 2)])
            q_w = (self.q_b_proj if self.q_lora else self.q_proj).weight.view(self.n, self.qk_dim, -1)
            q_w[:, self.nope :] = q_w[:, self.nope :][:, perm.to(q_w.device)]
            kv_w = self.kv_a_proj_with_mqa.weight
            kv_w[self.rank :] = kv_w[self.rank :][perm.to(kv_w.device)]
        w = self.kv_b_proj.weight.view(self.n, self.nope + self.v_dim, self.rank)
        self.w_uk.copy_(w[:, : self.nope])
        self.w_uv.copy_(w[:, self.nope :].transpose(1, 2))

    def forward(self, x: Tensor, ctx: ForwardContext, cos_sin: Tensor, kv_cache: Tensor) -> Tensor:
        t = x.shape[0]
        q, kv_a = self._project(x)
        q_nope, q_pe = q.view(t, self.n, self.qk_dim).split([self.nope, self.rope], dim=-1)
        if self.fusions.kv_store:
            norm = self.kv_a_layernorm
            q_pe = mla_kv_store(
                q_pe, kv_a, norm.weight, norm.eps, ctx.positions, cos_sin, kv_cache, ctx.kv_slots
            )
        else:
            c_kv, k_pe = kv_a.split([self.rank, self.rope], dim=-1)
            c_kv = self.kv_a_layernorm(c_kv)  # [T, R], read in place from the strided slice
            # rotary_emb reads the strided slices and writes new contiguous tensors
            q_pe, k_pe = rotary_emb(q_pe, k_pe.view(t, 1, self.rope), ctx.positions, cos_sin)
            mla_store_kv(kv_cache, c_kv, k_pe.view(t, self.rope), ctx.kv_slots)
        o = ctx.attend(self._attend, (q_nope, q_pe), (self.n, self.v_dim), kv_cache)
        return self.o_proj(o.reshape(t, self.n * self.v_dim))

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(q [T, n * qk], kv_a [T, R + P]) of the normed input; slices of one GEMM's output
        (strided rows) with the merged projection."""
        if self.w_in is not None:
            q, kv_a = linear(x, self.w_in).split([self.q_in_rows, self.rank + self.rope], dim=-1)
        else:
            q, kv_a = (self.q_a_proj if self.q_lora else self.q_proj)(x), self.kv_a_proj_with_mqa(x)
        if self.q_lora:
            q = self.q_b_proj(self.q_a_layernorm(q))
        return q, kv_a

    def _attend(self, q_nope: Tensor, q_pe: Tensor, ctx: ForwardContext, kv_cache: Tensor) -> Tensor:
        if ctx.decode_only:
            return self._decode(q_nope, q_pe, ctx, kv_cache)
        if ctx.host_q_lens is None or 1 not in ctx.host_q_lens:
            return self._prefill(torch.cat([q_nope, q_pe], dim=-1), ctx, kv_cache)
        # mixed: decodes absorbed over the latent, prefill chunks over their decompressed context
        split = ctx.by_query_len
        o = q_nope.new_empty(q_nope.shape[0], self.n, self.v_dim)
        dec = split.single_tokens
        o[dec] = self._decode(q_nope[dec], q_pe[dec], split.single, kv_cache)
        pre = split.multi_tokens
        if split.multi.host_q_lens:
            o[pre] = self._prefill(torch.cat([q_nope[pre], q_pe[pre]], dim=-1), split.multi, kv_cache)
        return o

    def _decode(self, q_nope: Tensor, q_pe: Tensor, ctx: ForwardContext, kv_cache: Tensor) -> Tensor:
        cache = (kv_cache, ctx.req_to_token, ctx.req_idx, ctx.seq_lens, self.scale)
        order, spread = ctx.decode_order, ctx.decode_spread
        if self.fusions.mla_gemv and q_nope.shape[0] <= GEMV_MAX_ROWS and use_triton(q_nope):
            q_abs = mla_absorb_q(q_nope, self.w_uk)  # [B, n, R]
            # [B, n, v] contiguous, as o_proj reads it
            return mla_decode_attention(q_abs, q_pe, *cache, w_uv=self.w_uv, order=order, spread=spread)
        q_abs = torch.bmm(q_nope.transpose(0, 1), self.w_uk).transpose(0, 1)  # [B, n, R], strided
        o = mla_decode_attention(q_abs, q_pe, *cache, order=order, spread=spread)  # [B, n, R] latents
        if not self.fusions.w_uv_out:
            return torch.bmm(o.transpose(0, 1), self.w_uv).transpose(0, 1)  # [B, n, v], strided
        # written as o_proj reads it: [B, n, v] contiguous, through a [n, B, v] view (cuBLAS's
        # strided batch), where a transposed result would cost a copy in forward's reshape
        out = o.new_empty(o.shape[0], self.n, self.v_dim)
        torch.bmm(o.transpose(0, 1), self.w_uv, out=out.transpose(0, 1))
        return out

    def _prefill(self, q: Tensor, ctx: ForwardContext, kv_cache: Tensor) -> Tensor:
        # The cached rows of every request of the step (packed once per step, for all layers),
        # decompressed into a temporary per-head k/v cache in that packed order.
        packed = ctx.packed
        c_kv, k_pe = kv_cache.index_select(0, packed.rows).split([self.rank, self.rope], dim=-1)
        kv = self.kv_b_proj(c_kv).view(-1, self.n, self.nope + self.v_dim)  # [N, n, nope + v]
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, None, :].expand(-1, self.n, -1)], dim=-1)  # [N, n, qk]
        return prefill_attention(
            q, k, v, packed.req_to_token, packed.req_idx, ctx.q_start, ctx.seq_lens, self.scale
        )  # [T, n, v]: v read in place, as a strided view of kv


class MLP(nn.Module):
    """SiLU-gated MLP, the intermediate dim split across ranks. `reduce=False` (the MoE's shared
    experts) leaves the sum over ranks to the caller."""

    def __init__(self, hidden: int, inter: int, dtype, device, tp: TPGroup = SINGLE, reduce: bool = True):
        super().__init__()
        tp.split(inter, "the MLP's intermediate size")
        self.gate_up = MergedLinear(hidden, {"gate": inter, "up": inter}, False, dtype, device, tp)
        self.down = RowParallelLinear(inter, hidden, False, dtype, device, tp, reduce)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(silu_and_mul(self.gate_up(x)))


class Router(nn.Module):
    """The gate. The router logits are computed in float32, as transformers does. With
    `one_gemm` on CUDA in a 16-bit model dtype, the weight is kept in that dtype (the loader gives
    it so: nothing is lost) and the logits come from one GEMM with float32 output (the products of
    16-bit values are exact in float32, and cuBLAS sums in float32): one launch instead of a cast
    of x then a float32 GEMM. Otherwise the weight is kept in float32, converted once when loaded
    (`copy_` casts), not at every step."""

    def __init__(
        self, cfg: ModelConfig, device, dtype=torch.float32, one_gemm: bool = False, parts: bool = False
    ):
        super().__init__()
        e = cfg.n_routed_experts
        one_gemm = (
            one_gemm and torch.device(device).type == "cuda" and dtype in (torch.bfloat16, torch.float16)
        )
        self.weight = nn.Parameter(
            torch.empty(e, cfg.hidden_size, dtype=dtype if one_gemm else torch.float32, device=device),
            requires_grad=False,
        )
        self.e_score_correction_bias = (
            nn.Parameter(torch.empty(e, dtype=torch.float32, device=device), requires_grad=False)
            if cfg.topk_method == "noaux_tc"
            else None
        )

        # with one_gemm: at <= GEMV_MAX_ROWS tokens, partial logits from one Triton launch
        # (`router_logits_parts`), which select_experts sums
        self.parts = parts and one_gemm

    def logits(self, x: Tensor) -> Tensor:
        """[T, H] -> [T, E] float32, or [P, T, E] partial sums (select_experts adds them up)."""
        if self.parts and x.shape[0] <= GEMV_MAX_ROWS and x.stride(1) == 1:
            return router_logits_parts(x, self.weight)
        if self.weight.dtype == torch.float32:
            return F.linear(x.float(), self.weight)
        return torch.mm(x, self.weight.t(), out_dtype=torch.float32)


class Experts(nn.Module):
    """The experts stacked for fused_moe: w13 [E + s, 2I, H] (gate rows, then up), w2 [E + s, H, I].
    Experts [0, E) are the routed ones; with fused shared experts, [E, E + s) are the s shared
    ones (`fill_shared`), else s = 0. Under tensor parallelism every rank holds every expert, its
    intermediate dim split: I = moe_intermediate_size / size (gate and up rows, down columns), so
    the experts' output on a rank is a partial sum."""

    # the split dim of a checkpoint's per-expert gate/up [I, H] (into w13) and down [H, I] (into w2)
    tp_dims: ClassVar[dict[str, int]] = {"w13": -2, "w2": -1}

    def __init__(self, cfg: ModelConfig, num_shared: int, dtype, device, tp: TPGroup = SINGLE):
        super().__init__()
        e, h = cfg.n_routed_experts + num_shared, cfg.hidden_size
        i = tp.split(cfg.moe_intermediate_size, "moe_intermediate_size")
        self.inter, self.num_routed = i, cfg.n_routed_experts
        self.w13 = nn.Parameter(torch.empty(e, 2 * i, h, dtype=dtype, device=device), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(e, h, i, dtype=dtype, device=device), requires_grad=False)

    def load_part(self, part: str, kind: str, tensor: Tensor) -> None:
        """part "gate.E" / "up.E" fill expert E's rows of w13, "down.E" its w2 (this rank's
        slice of each)."""
        which, e = part.split(".")
        e = int(e)
        if which == "gate":
            self.w13.data[e, : self.inter].copy_(tensor)
        elif which == "up":
            self.w13.data[e, self.inter :].copy_(tensor)
        else:
            self.w2.data[e].copy_(tensor)

    def fill_shared(self, mlp: MLP) -> None:
        """Experts [E, E + s) from the shared experts' dense MLP of intermediate s*I: chunk j of
        its gate rows, its up rows and its down columns is expert E + j. The MLP is
        (silu(x G^T) * x U^T) D^T, elementwise in the intermediate dim, so it is the sum of its
        s chunks, each an expert of intermediate I. A rank's MLP holds a slice s*I of the
        intermediate dim and its experts slices I: the same chunking of what it holds."""
        e, i = self.num_routed, self.inter
        s, h = self.w13.shape[0] - e, self.w13.shape[2]
        gate_up = mlp.gate_up.weight.data.view(2, s, i, h)  # gate rows, then up rows
        self.w13.data[e:].view(s, 2, i, h).copy_(gate_up.transpose(0, 1))
        self.w2.data[e:].copy_(mlp.down.weight.data.view(h, s, i).transpose(0, 1))

    def add_shared(self, out: Tensor, x: Tensor) -> Tensor:
        """out += the shared experts' MLP of x, through views of their rows [E, E + s) of w13 and
        w2 (no copy of the weights): one GEMM of x by every shared gate/up row, one SiLU-and-mul,
        then the s down products summed into `out` (addbmm: s GEMMs accumulating in place)."""
        e, i = self.num_routed, self.inter
        s, h = self.w13.shape[0] - e, self.w13.shape[2]
        gate_up = cpu_shapes.linear(x, self.w13[e:].view(s * 2 * i, h))  # [T, s * 2I]: expert j's gate, up
        act = silu_and_mul(gate_up.view(-1, 2 * i)).view(-1, s, i)  # [T, s, I]
        return out.addbmm_(act.transpose(0, 1), self.w2[e:].transpose(1, 2))  # [s, T, I] @ [s, I, H]


class MoE(nn.Module):
    """Routed experts plus shared experts. With `fused_max_tokens` > 0, the shared experts become
    experts E..E+s-1 of the routed ones (`finish_loading`, once the weights are in): a step of at
    most that many tokens chooses them for every token with weight 1, one fused_moe pass instead
    of fused_moe and a separate dense MLP; a larger step runs fused_moe over the first E experts
    and the shared ones as a dense MLP through views of the same rows (`Experts.add_shared`).
    With 0 they stay a separate MLP (`shared`).

    Under tensor parallelism the router is the same on every rank (so is its input, so every rank
    picks the same experts); the experts' intermediate dims are split, and the routed and shared
    partial sums are added, and the output is this rank's partial sum: the norm that follows
    reduces it over the ranks (`RMSNorm.reduce_add`)."""

    def __init__(
        self,
        cfg: ModelConfig,
        fused_max_tokens: int,
        dtype,
        device,
        tp: TPGroup = SINGLE,
        router_one_gemm: bool = False,
        sum_in_norm: bool = False,
        router_parts: bool = False,
    ):
        super().__init__()
        self.cfg, self.tp = cfg, tp
        # the routed experts' outputs left unsummed, [T, k (+ s), H], where nothing else adds to
        # them: the norm that follows sums them (`rms_norm` of parts), one launch fewer. One rank
        # only: under tensor parallelism that norm is the all-reduce's.
        self.sum_in_norm = sum_in_norm and tp.size == 1
        self.gate = Router(cfg, device, dtype, router_one_gemm, router_parts)
        self.num_fused = cfg.n_shared_experts if fused_max_tokens > 0 else 0
        self.fused_max_tokens = fused_max_tokens
        self.experts = Experts(cfg, self.num_fused, dtype, device, tp)
        inter = cfg.moe_intermediate_size * cfg.n_shared_experts
        self.shared = (
            MLP(cfg.hidden_size, inter, dtype, device, tp, reduce=False) if cfg.n_shared_experts else None
        )
        # transformers' V2 never normalizes the top-k weights; DeepSeek-V2's own code does when
        # norm_topk_prob, and then skips the scaling factor (see select_experts)
        v2 = cfg.architecture == "DeepseekV2ForCausalLM"
        self.norm_topk_prob = cfg.norm_topk_prob
        self.scaling = 1.0 if v2 and cfg.norm_topk_prob else cfg.routed_scaling_factor

    def finish_loading(self) -> None:
        """With fused shared experts: move the loaded shared MLP into the experts, drop the MLP."""
        if self.num_fused:
            self.experts.fill_shared(self.shared)
            self.shared = None

    def forward(self, x: Tensor) -> Tensor:
        cfg = self.cfg
        fused = self.num_fused if x.shape[0] <= self.fused_max_tokens else 0  # shared experts fused
        logits = self.gate.logits(x)  # [T, E] float32, as the reference
        # [T, k + fused]: the routed experts, then the fused shared ones (weight 1, unscaled)
        weights, ids = select_experts(
            logits,
            cfg.num_experts_per_tok,
            cfg.topk_method,
            cfg.n_group,
            cfg.topk_group,
            self.norm_topk_prob,
            self.scaling,
            self.gate.e_score_correction_bias,
            num_shared=fused,
        )
        experts = self.experts
        if fused or not self.num_fused:
            parts = self.sum_in_norm and self.shared is None  # nothing to add: the norm sums them
            out = fused_moe(x, experts.w13, experts.w2, weights, ids, sum_experts=not parts)
        else:  # the routed experts' rows only, then the shared ones as an MLP
            e = experts.num_routed
            out = experts.add_shared(fused_moe(x, experts.w13[:e], experts.w2[:e], weights, ids), x)
        if self.shared is not None:
            out = out + self.shared(x)
        return out


class DecoderLayer(nn.Module):
    """As Llama's: x in and out are partial sums over the ranks (the whole embedding at first); the
    MoE's output may be the unsummed experts' ([T, k, H], `MoE.sum_in_norm`), which the next
    layer's input norm (or the final norm) sums."""

    def __init__(
        self, cfg: ModelConfig, index: int, fusions: Fusions, fused_max_tokens: int, dtype, device, tp=SINGLE
    ):
        super().__init__()
        self.tp = tp
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.attn = MLAttention(cfg, dtype, device, tp, fusions)
        self.post_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        dense = index < cfg.first_k_dense_replace
        self.mlp = (
            MLP(cfg.hidden_size, cfg.intermediate_size, dtype, device, tp, reduce=False)
            if dense
            else MoE(
                cfg,
                fused_max_tokens,
                dtype,
                device,
                tp,
                fusions.router,
                fusions.expert_sum,
                fusions.router_parts,
            )
        )

    def forward(self, x, residual, ctx, cos_sin, kv_cache):
        if residual is None:
            residual, h = x, self.input_norm(x)
        else:
            h, residual = self.input_norm.reduce_add(x, residual, self.tp)
        h = self.attn(h, ctx, cos_sin, kv_cache)
        h, residual = self.post_norm.reduce_add(h, residual, self.tp)
        return self.mlp(h), residual


class DeepseekForCausalLM(nn.Module):
    """Token ids in, logits of the requested positions out (DeepseekV2/V3ForCausalLM).

    `fuse_shared_experts`: run the shared experts inside the routed experts' fused_moe pass
    (`MoE`): True in every step, False (or 0) never, an int N in steps of at most N tokens; None
    (default) in steps of at most `shared_fused_max_tokens(cfg, device)` tokens (with
    `fusions.shared`; else never): on an H200 (perf/RESULTS.md,
    `perf/mla_moe_bench.py --only moe`) fusing gained 4-6% of the MoE layer's time at V2-Lite's
    shape with M <= 8 tokens and lost 3-11% everywhere else (V3's shape at every M, V2-Lite's from
    M = 64): the shared experts' rows then outnumber any routed expert's, and the routed experts'
    tiles do not suit them.

    `fusions`: the decode layer's launch-saving fusions (`Fusions`); None reads LLA_DEEPSEEK_FUSE.
    `tp`: built for one rank of a tensor-parallel group, as `LlamaForCausalLM`."""

    def __init__(
        self,
        cfg: ModelConfig,
        dtype: torch.dtype,
        device: torch.device,
        fuse_shared_experts: bool | int | None = None,
        tp: TPGroup = SINGLE,
        fusions: Fusions | None = None,
    ):
        super().__init__()
        self.cfg, self.tp = cfg, tp
        self.fusions = fusions = fusions if fusions is not None else Fusions.from_env()
        if fuse_shared_experts is None:
            fused_max = shared_fused_max_tokens(cfg, device) if fusions.shared else 0
        else:
            fused_max = ALWAYS if fuse_shared_experts is True else int(fuse_shared_experts)
        self.embed = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, dtype, device, tp)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, fusions, fused_max, dtype, device, tp) for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else VocabEmbedding(cfg.vocab_size, cfg.hidden_size, dtype, device, tp)
        )
        self.register_buffer("cos_sin", mla_rope_cache(cfg, device), persistent=False)  # [max_pos, P]

    @torch.inference_mode()
    def forward(self, input_ids: Tensor, ctx: ForwardContext, kv: MLAKVCache) -> Tensor:
        x = self.hidden_states(input_ids, ctx, kv).index_select(0, ctx.logits_idx)
        return self.head_logits(x)  # [S, V] float32

    def hidden_states(self, input_ids: Tensor, ctx: ForwardContext, kv: MLAKVCache) -> Tensor:
        """The final (normed) hidden states of every token, [T, H], as Llama's."""
        x = self.embed(input_ids)  # [T, H]
        residual = None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, ctx, self.cos_sin, kv.kv[i])
        x, _ = self.norm.reduce_add(x, residual, self.tp)  # x: the last MLP's partial sum
        return x

    def head_logits(self, x: Tensor) -> Tensor:
        """[S, H] -> float32 [S, V]."""
        head = self.embed if self.lm_head is None else self.lm_head
        return head.logits(x)
