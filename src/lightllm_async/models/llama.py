"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM): one file, variants by config.

Every op goes through `kernels/`, so one switch turns this model into its own PyTorch oracle.
Forward metadata arrives as an explicit `ForwardContext`, never through globals. Parameters are
allocated empty; `models/weights.py` fills them from a checkpoint by the family's table
(`models/llama_names.py`), so nothing here knows a checkpoint name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor, nn

from lightllm_async.config import ModelConfig
from lightllm_async.kernels import (
    decode_attention,
    decode_attention_rows,
    prefill_attention,
    rms_norm,
    rope_cache,
    rotary_emb,
    silu_and_mul,
)
from lightllm_async.layers.embedding import VocabEmbedding
from lightllm_async.layers.linear import MergedLinear, RowParallelLinear
from lightllm_async.layers.parallel import SINGLE, TPGroup


@dataclass(frozen=True)
class PackedContexts:
    """The step's requests' whole contexts (cached prefix + new tokens) packed one request after
    another, N = sum(seq_lens) tokens: what attention reads over a temporary copy of the
    context, laid out in that order (MLA's prefill decompresses the latent cache into one)."""

    rows: Tensor  # [N] int64, the KV-cache row of each packed token
    req_to_token: Tensor  # [B, max(seq_lens)] int32, request b's packed indices in position order
    req_idx: Tensor  # [B] int32, 0..B-1: request b's row of req_to_token


@dataclass(frozen=True)
class ForwardContext:
    """Where this step's tokens sit: T new tokens from B requests."""

    positions: Tensor  # [T] int64, absolute position of each new token
    kv_slots: Tensor  # [T] int64, cache row receiving each new token's k and v
    req_to_token: Tensor  # [max_running, max_model_len] int32, cache rows of each request
    req_idx: Tensor  # [B] int32, each request's row in req_to_token
    q_start: Tensor  # [B + 1] int32, cumulative new-token offsets
    seq_lens: Tensor  # [B] int32, tokens in the cache after this step (prefix + new)
    logits_idx: Tensor  # [S] int64, which of the T tokens need logits
    decode_only: bool  # every request has exactly one new token
    # seq_lens as the host knows them; None only where they change under a fixed context
    # (CUDA-graph replays, which are decode-only), so `packed` is not for those steps
    host_seq_lens: tuple[int, ...] | None = None
    # new tokens of each request as the host knows them; None in decode-only steps (all 1) and CUDA graphs
    host_q_lens: tuple[int, ...] | None = None
    # decode-only CPU steps (`with_decode_rows`): each request's context rows [B, L] int64, L the
    # longest, padded with its first row; the mask [B, 1, 1, L] True where a row is its own, or
    # None when every context has L rows. Attention then runs one batched op with no host values.
    decode_rows: Tensor | None = None
    decode_mask: Tensor | None = None
    # decode-only steps where the runner orders them (CUDA): [B] int32, the requests by context
    # length, longest first, for split attention kernels to start the longest contexts' chunks first
    decode_order: Tensor | None = None
    decode_spread: Tensor | None = None  # with decode_order: [1] int32, nonzero where the lengths spread
    # Where attention leaves a forward captured in pieces (runner/piecewise.py): called instead of
    # the attention with (fn, inputs, out_tail, args); None: attention runs in line (`attend`).
    cut: Callable[..., Tensor] | None = None

    def attend(self, fn: Callable[..., Tensor], inputs: tuple[Tensor, ...], out_tail: tuple[int, ...], *args):
        """`fn(*inputs, self, *args)`: a layer's attention, the one part of a forward whose work
        depends on the step's host lengths. `inputs` are [T, ...] tensors; the result is [T,
        *out_tail] of inputs[0]'s dtype. Under a piecewise capture (`cut`), the call is where one
        CUDA graph ends and the next begins, and `fn` runs eagerly between their replays."""
        if self.cut is None:
            return fn(*inputs, self, *args)
        return self.cut(fn, inputs, out_tail, args)

    def with_decode_rows(self, always_mask: bool = False) -> ForwardContext:
        """This decode-only context with `decode_rows` and `decode_mask` (see there), built from
        the host lengths: what the CPU's batched decode attention reads (also under torch.compile,
        which a per-request loop over host values would break into pieces). `always_mask`: a
        mask even where no row is padding (one compiled graph for both cases)."""
        if not self.decode_only or self.host_seq_lens is None or not all(self.host_seq_lens):
            raise ValueError("decode rows need a decode-only step whose host lengths are known and > 0")
        width = max(self.host_seq_lens)
        table = self.req_to_token.index_select(0, self.req_idx)[:, :width]  # [B, L] int32
        if not always_mask and all(n == width for n in self.host_seq_lens):
            return dataclasses.replace(self, decode_rows=table.long(), decode_mask=None)
        own = torch.arange(width, device=table.device)[None, :] < self.seq_lens[:, None]  # [B, L]
        rows = torch.where(own, table, table[:, :1]).long()
        return dataclasses.replace(self, decode_rows=rows, decode_mask=own[:, None, None, :])

    @cached_property  # once per step, whichever layer asks first (the instance has a __dict__)
    def packed(self) -> PackedContexts:
        """The requests' contexts packed, built on the device with no host sync: the host
        lengths give the sizes, the device tensors the values."""
        if self.host_seq_lens is None:
            raise ValueError("packing the contexts needs host_seq_lens")
        num_reqs, total = len(self.host_seq_lens), sum(self.host_seq_lens)
        device, seq_lens = self.seq_lens.device, self.seq_lens.long()
        starts = seq_lens.cumsum(0) - seq_lens  # [B] each request's first packed index
        req = torch.arange(num_reqs, device=device).repeat_interleave(seq_lens, output_size=total)  # [N]
        pos = torch.arange(total, device=device) - starts[req]  # [N] position within its request
        rows = self.req_to_token[self.req_idx.long()[req], pos].long()
        width = torch.arange(max(self.host_seq_lens, default=0), device=device)
        table = (starts[:, None] + width[None, :]).to(torch.int32)  # [B, max_len]
        return PackedContexts(rows, table, torch.arange(num_reqs, dtype=torch.int32, device=device))

    @cached_property  # once per step, as `packed`
    def by_query_len(self) -> QuerySplit:
        """The step's one-token requests (decodes) apart from those with more (prefill chunks),
        each part with its token indices and a context of its requests alone, built on the device
        with no host sync (the host lengths give the sizes). Attention that treats a decode
        differently from a prefill (MLA) runs each part its own way in a mixed step."""
        if self.host_seq_lens is None or self.host_q_lens is None:
            raise ValueError("splitting a step by query length needs its host lengths")
        q_lens = self.host_q_lens
        single = [b for b, n in enumerate(q_lens) if n == 1]
        multi = [b for b, n in enumerate(q_lens) if n != 1]
        device = self.q_start.device
        if single == list(range(len(single))):  # the scheduler's order: the decode run first
            return self._split_in_order(len(single), sum(q_lens[b] for b in multi))
        q_len = (self.q_start[1:] - self.q_start[:-1]).long()  # [B]
        order = torch.argsort((q_len != 1).to(torch.int8), stable=True)  # single requests first
        reqs_single, reqs_multi = order[: len(single)], order[len(single) :]
        num_multi_tokens = sum(q_lens[b] for b in multi)
        len_multi = q_len[reqs_multi]
        starts_multi = len_multi.cumsum(0) - len_multi  # [Bm] first index within the multi part
        owner = torch.arange(len(multi), device=device).repeat_interleave(
            len_multi, output_size=num_multi_tokens
        )
        tokens_multi = self.q_start[reqs_multi].long()[owner] + (
            torch.arange(num_multi_tokens, device=device) - starts_multi[owner]
        )
        q_start_multi = torch.cat([len_multi.new_zeros(1), len_multi.cumsum(0)]).to(torch.int32)

        q_start_single = torch.arange(len(single) + 1, dtype=torch.int32, device=device)
        return QuerySplit(
            self.q_start[reqs_single].long(),
            self._part(reqs_single, single, q_start_single),
            tokens_multi,
            self._part(reqs_multi, multi, q_start_multi),
        )

    def _split_in_order(self, num_single: int, num_multi_tokens: int) -> QuerySplit:
        """`by_query_len` where the one-token requests come first: each part is a slice."""
        num_reqs = len(self.host_q_lens)
        singles, multis = slice(0, num_single), slice(num_single, num_reqs)
        return QuerySplit(
            singles,
            self._part(singles, range(num_single), self.q_start[: num_single + 1]),
            slice(num_single, num_single + num_multi_tokens),
            self._part(multis, range(num_single, num_reqs), self.q_start[num_single:] - num_single),
        )

    def _part(self, reqs: Tensor | slice, rows: Sequence[int], q_start: Tensor) -> ForwardContext:
        """The context of some of this step's requests: `rows` on the host, `reqs` on the device."""
        q_lens = self.host_q_lens
        return dataclasses.replace(
            self,
            req_idx=self.req_idx[reqs],
            q_start=q_start,
            seq_lens=self.seq_lens[reqs],
            decode_only=all(q_lens[b] == 1 for b in rows),
            host_seq_lens=tuple(self.host_seq_lens[b] for b in rows),
            host_q_lens=tuple(q_lens[b] for b in rows),
            decode_order=None,  # the step's order, not the part's
            decode_spread=None,
        )


@dataclass(frozen=True)
class QuerySplit:
    """A step's requests in two parts: one new token each, and more (see `by_query_len`). The
    parts' contexts keep the step's positions, kv_slots and logits_idx (they index its tokens);
    their req_idx, q_start, seq_lens and host lengths are the part's own."""

    # [Bs] int64, the step's token index of each one-token request (a slice where they lead)
    single_tokens: Tensor | slice
    single: ForwardContext
    # [Tm] int64, the step's token indices of the other requests, in order (or a slice)
    multi_tokens: Tensor | slice
    multi: ForwardContext


@dataclass(frozen=True)
class KVCache:
    """One pool per layer: [num_token_slots, kv_heads, head_dim] for keys and for values; under
    tensor parallelism, a rank's pool holds its own kv_heads / size heads."""

    k: list[Tensor]
    v: list[Tensor]

    @classmethod
    def allocate(cls, cfg: ModelConfig, num_tokens: int, dtype, device, tp: TPGroup = SINGLE) -> KVCache:
        shape = (num_tokens, tp.split(cfg.num_kv_heads, "num_kv_heads"), cfg.head_dim)
        return cls(
            k=[torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)],
            v=[torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)],
        )

    def layers(self) -> list[Tensor]:
        """Every pool, in layer order (k then v): what moves a request's KV (runner/kv_transfer.py)."""
        return [t for kv in zip(self.k, self.v, strict=True) for t in kv]

    @staticmethod
    def bytes_per_token(cfg: ModelConfig, dtype, tp: TPGroup = SINGLE) -> int:
        """Bytes one token takes in one rank's pools."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * cfg.num_layers * tp.split(cfg.num_kv_heads, "num_kv_heads") * cfg.head_dim * itemsize


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype, device):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype, device=device), requires_grad=False)
        self.eps = eps

    def forward(self, x: Tensor, residual: Tensor | None = None):
        return rms_norm(x, self.weight, self.eps, residual)

    def reduce_add(self, x: Tensor, residual: Tensor, tp: TPGroup) -> tuple[Tensor, Tensor]:
        """forward(sum of `x` over the ranks of `tp`, residual): `x` is a row-parallel layer's
        unreduced output, and the all-reduce, the add and the norm run as one fused kernel where
        `tp` has one (`TPGroup.all_reduce_norm`)."""
        if tp.size == 1:
            return self(x, residual)
        return tp.all_reduce_norm(x, residual, self.weight, self.eps)


class Attention(nn.Module):
    """Grouped-query attention over this rank's heads (all of them with one rank): q|k|v column-
    parallel by head, o_proj row-parallel and unreduced: the output is this rank's partial sum,
    reduced by the norm that follows (`RMSNorm.reduce_add`)."""

    def __init__(self, cfg: ModelConfig, dtype, device, tp: TPGroup = SINGLE):
        super().__init__()
        self.num_heads = tp.split(cfg.num_heads, "num_heads")
        self.num_kv_heads = tp.split(cfg.num_kv_heads, "num_kv_heads")
        self.head_dim = cfg.head_dim
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv = MergedLinear(
            cfg.hidden_size, {"q": q, "k": kv, "v": kv}, cfg.attention_bias, dtype, device, tp
        )
        self.o_proj = RowParallelLinear(q, cfg.hidden_size, False, dtype, device, tp, reduce=False)
        self.scale = cfg.head_dim**-0.5

    def forward(self, x: Tensor, ctx: ForwardContext, cos_sin: Tensor, k_cache: Tensor, v_cache: Tensor):
        t = x.shape[0]
        q, k, v = self.qkv.split(self.qkv(x))
        q = q.view(t, self.num_heads, self.head_dim)  # [T, Hq, D]
        k = k.view(t, self.num_kv_heads, self.head_dim)  # [T, Hk, D]
        v = v.view(t, self.num_kv_heads, self.head_dim)
        q, k = rotary_emb(q, k, ctx.positions, cos_sin, store=(k_cache, v_cache, v, ctx.kv_slots))
        # k and v go along (stored already) for prefill: the kernel reads the new tokens' there,
        # contiguous, rather than gathering them back from the cache
        o = ctx.attend(self._attend, (q, k, v), q.shape[1:], k_cache, v_cache)
        return self.o_proj(o.reshape(t, self.num_heads * self.head_dim))

    def _attend(
        self, q: Tensor, k: Tensor, v: Tensor, ctx: ForwardContext, k_cache: Tensor, v_cache: Tensor
    ) -> Tensor:
        if ctx.decode_rows is not None:
            return decode_attention_rows(q, k_cache, v_cache, ctx.decode_rows, ctx.decode_mask, self.scale)
        if ctx.decode_only:
            return decode_attention(
                q, k_cache, v_cache, ctx.req_to_token, ctx.req_idx, ctx.seq_lens, self.scale,
                order=ctx.decode_order,
            )  # fmt: skip
        q_lens = ctx.host_q_lens
        if q_lens is None or 1 not in q_lens or all(n == 1 for n in q_lens):
            return prefill_attention(
                q, k_cache, v_cache, ctx.req_to_token, ctx.req_idx, ctx.q_start, ctx.seq_lens, self.scale,
                k_new=k, v_new=v,
            )  # fmt: skip
        # Mixed: the decodes through the decode kernel, which reads each context once for a
        # group of query heads and splits long ones; in the prefill kernel each would take a
        # block of query rows alone (an H200 spent 17 of a 44 ms step on 100 decodes that way).
        split = ctx.by_query_len
        o = torch.empty_like(q)
        dec, pre, c = split.single_tokens, split.multi_tokens, split.single
        o[dec] = decode_attention(q[dec], k_cache, v_cache, c.req_to_token, c.req_idx, c.seq_lens, self.scale)
        c = split.multi
        o[pre] = prefill_attention(
            q[pre], k_cache, v_cache, c.req_to_token, c.req_idx, c.q_start, c.seq_lens, self.scale,
            k_new=k[pre], v_new=v[pre],
        )  # fmt: skip
        return o


class MLP(nn.Module):
    """SiLU-gated MLP, the intermediate dim split across ranks (gate|up by rows, down by columns);
    its output is this rank's partial sum, as the attention's."""

    def __init__(self, cfg: ModelConfig, dtype, device, tp: TPGroup = SINGLE):
        super().__init__()
        inter = cfg.intermediate_size
        tp.split(inter, "intermediate_size")
        self.gate_up = MergedLinear(cfg.hidden_size, {"gate": inter, "up": inter}, False, dtype, device, tp)
        self.down = RowParallelLinear(inter, cfg.hidden_size, False, dtype, device, tp, reduce=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(silu_and_mul(self.gate_up(x)))  # [T, 2I] -> [T, I] -> [T, H]


class DecoderLayer(nn.Module):
    """x in is the previous layer's MLP output, a partial sum over the ranks (the embedding, whole,
    in the first layer, where residual is None); x out is this layer's, a partial sum too."""

    def __init__(self, cfg: ModelConfig, dtype, device, tp: TPGroup = SINGLE):
        super().__init__()
        self.tp = tp
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.attn = Attention(cfg, dtype, device, tp)
        self.post_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.mlp = MLP(cfg, dtype, device, tp)

    def forward(self, x, residual, ctx, cos_sin, k_cache, v_cache):
        if residual is None:
            residual, h = x, self.input_norm(x)
        else:
            h, residual = self.input_norm.reduce_add(x, residual, self.tp)  # norm(x + residual), x + residual
        h = self.attn(h, ctx, cos_sin, k_cache, v_cache)
        h, residual = self.post_norm.reduce_add(h, residual, self.tp)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    """Token ids in, logits of the requested positions out.

    Built for one rank of a tensor-parallel group `tp` (a whole model when it has one rank): every
    rank must run each forward with the same inputs, and all get the same logits."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, tp: TPGroup = SINGLE):
        super().__init__()
        self.cfg, self.tp = cfg, tp
        self.embed = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, dtype, device, tp)
        self.layers = nn.ModuleList(DecoderLayer(cfg, dtype, device, tp) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else VocabEmbedding(cfg.vocab_size, cfg.hidden_size, dtype, device, tp)
        )
        cos_sin = rope_cache(
            cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling, device
        )
        self.register_buffer("cos_sin", cos_sin, persistent=False)  # [max_pos, D], float32

    @torch.inference_mode()
    def forward(self, input_ids: Tensor, ctx: ForwardContext, kv: KVCache) -> Tensor:
        return self.head_logits(self.hidden(input_ids, ctx, kv))  # [S, V] float32

    def hidden(self, input_ids: Tensor, ctx: ForwardContext, kv: KVCache) -> Tensor:
        """The final hidden states [S, H] of the tokens that need logits (`ctx.logits_idx`)."""
        return self.hidden_states(input_ids, ctx, kv).index_select(0, ctx.logits_idx)  # [S, H]

    def hidden_states(self, input_ids: Tensor, ctx: ForwardContext, kv: KVCache) -> Tensor:
        """The final (normed) hidden states of every token, [T, H]: what a piecewise capture records."""
        x = self.embed(input_ids)  # [T, H]
        residual = None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, ctx, self.cos_sin, kv.k[i], kv.v[i])
        x, _ = self.norm.reduce_add(x, residual, self.tp)  # x: the last MLP's partial sum
        return x

    def head_logits(self, x: Tensor) -> Tensor:
        """[S, H] -> float32 [S, V]."""
        head = self.embed if self.lm_head is None else self.lm_head  # anything with `logits`
        return head.logits(x)
