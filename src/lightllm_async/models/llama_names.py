"""The Llama family's checkpoint table (Llama 2/3, Mistral, Qwen2, SmolLM): each tensor's HF name,
llama.cpp GGUF name, shape, and the parameter of `models/llama.py` it fills. Torch-free.

q/k/v fill the rows of one merged `attn.qkv` and gate/up those of `mlp.gate_up`; with tied
embeddings a checkpoint has no lm_head (the model multiplies by `embed`).
"""

from __future__ import annotations

from typing import Any

from lightllm_async.config import ModelConfig
from lightllm_async.models.checkpoint import LAYER, CheckpointTable, TensorSpec


def _dims(cfg: ModelConfig) -> dict[str, int]:
    return {
        "vocab": cfg.vocab_size,
        "hidden": cfg.hidden_size,
        "inter": cfg.intermediate_size,
        "q": cfg.num_heads * cfg.head_dim,
        "kv": cfg.num_kv_heads * cfg.head_dim,
        "heads": cfg.num_heads,
        "kv_heads": cfg.num_kv_heads,
    }


def _biased(cfg: ModelConfig) -> bool:
    return cfg.attention_bias


def _untied(cfg: ModelConfig) -> bool:
    return not cfg.tie_word_embeddings


def _layer(hf: str, gguf: str, shape: tuple[str, ...], param: str, **kw: Any) -> TensorSpec:
    """A per-layer row, its names given below each naming's layer prefix."""
    hf, gguf, param = f"model.layers.{LAYER}.{hf}", f"blk.{LAYER}.{gguf}", f"layers.{LAYER}.{param}"
    return TensorSpec(hf, gguf, shape, param, **kw)


# HF name, GGUF name, shape, parameter; a _layer row's names are below model.layers.N, blk.N, layers.N
# fmt: off
LLAMA = CheckpointTable(
    dims=_dims,
    rows=(
        TensorSpec("model.embed_tokens.weight", "token_embd.weight", ("vocab", "hidden"), "embed.weight"),
        _layer("self_attn.q_proj.weight", "attn_q.weight", ("q", "hidden"), "attn.qkv.weight", part="q",
               rope_heads="heads"),
        _layer("self_attn.k_proj.weight", "attn_k.weight", ("kv", "hidden"), "attn.qkv.weight", part="k",
               rope_heads="kv_heads"),
        _layer("self_attn.v_proj.weight", "attn_v.weight", ("kv", "hidden"), "attn.qkv.weight", part="v"),
        _layer("self_attn.q_proj.bias", "attn_q.bias", ("q",), "attn.qkv.bias", part="q", when=_biased,
               rope_heads="heads"),
        _layer("self_attn.k_proj.bias", "attn_k.bias", ("kv",), "attn.qkv.bias", part="k", when=_biased,
               rope_heads="kv_heads"),
        _layer("self_attn.v_proj.bias", "attn_v.bias", ("kv",), "attn.qkv.bias", part="v", when=_biased),
        _layer("self_attn.o_proj.weight", "attn_output.weight", ("hidden", "q"), "attn.o_proj.weight"),
        _layer("mlp.gate_proj.weight", "ffn_gate.weight", ("inter", "hidden"), "mlp.gate_up.weight",
               part="gate"),
        _layer("mlp.up_proj.weight", "ffn_up.weight", ("inter", "hidden"), "mlp.gate_up.weight",
               part="up"),
        _layer("mlp.down_proj.weight", "ffn_down.weight", ("hidden", "inter"), "mlp.down.weight"),
        _layer("input_layernorm.weight", "attn_norm.weight", ("hidden",), "input_norm.weight", norm=True),
        _layer("post_attention_layernorm.weight", "ffn_norm.weight", ("hidden",), "post_norm.weight",
               norm=True),
        TensorSpec("model.norm.weight", "output_norm.weight", ("hidden",), "norm.weight", norm=True),
        TensorSpec("lm_head.weight", "output.weight", ("vocab", "hidden"), "lm_head.weight",
                   when=_untied),
    ),
)
# fmt: on
