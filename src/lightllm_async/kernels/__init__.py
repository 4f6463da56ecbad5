"""Kernel ops: each a PyTorch reference (`<op>_ref`, the specification and the CPU path), a Triton
kernel and a launcher `<op>()` that routes through `backend.use_triton`."""

from .backend import use_triton
from .decode_attention import decode_attention, decode_attention_ref, decode_attention_rows
from .fused_moe import MoeConfig, fused_moe, fused_moe_ref
from .mla_decode_attention import mla_decode_attention, mla_decode_attention_ref
from .mla_kv_store import mla_kv_store, mla_kv_store_ref
from .mla_store_kv import mla_store_kv, mla_store_kv_ref
from .moe_align import moe_align_block_size, moe_align_block_size_ref
from .moe_routing import select_experts, select_experts_ref
from .prefill_attention import prefill_attention, prefill_attention_ref
from .rms_norm import rms_norm, rms_norm_ref
from .rotary import rope_cache, rotary_emb, rotary_emb_ref
from .silu_and_mul import silu_and_mul, silu_and_mul_ref
from .store_kv import store_kv, store_kv_ref

__all__ = [
    "MoeConfig",
    "decode_attention",
    "decode_attention_ref",
    "decode_attention_rows",
    "fused_moe",
    "fused_moe_ref",
    "mla_decode_attention",
    "mla_decode_attention_ref",
    "mla_kv_store",
    "mla_kv_store_ref",
    "mla_store_kv",
    "mla_store_kv_ref",
    "moe_align_block_size",
    "moe_align_block_size_ref",
    "prefill_attention",
    "prefill_attention_ref",
    "rms_norm",
    "rms_norm_ref",
    "rope_cache",
    "rotary_emb",
    "rotary_emb_ref",
    "select_experts",
    "select_experts_ref",
    "silu_and_mul",
    "silu_and_mul_ref",
    "store_kv",
    "store_kv_ref",
    "use_triton",
]
