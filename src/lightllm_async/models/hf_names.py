"""The HF tensor names and shapes of a Llama-family checkpoint, derived from its ModelConfig.

Torch-free: the random-model tool, the loader and the engine's memory planning all use it.
"""

from __future__ import annotations

from lightllm_async.config import ModelConfig


def layer_weight_shapes(cfg: ModelConfig, layer: int) -> list[tuple[str, tuple[int, ...]]]:
    """`[(name, shape)]` of decoder layer `layer`, shapes as torch stores them ([out, in])."""
    p = f"model.layers.{layer}."
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q_out, kv_out = cfg.num_heads * d, cfg.num_kv_heads * d
    shapes = [
        (p + "self_attn.q_proj.weight", (q_out, h)),
        (p + "self_attn.k_proj.weight", (kv_out, h)),
        (p + "self_attn.v_proj.weight", (kv_out, h)),
        (p + "self_attn.o_proj.weight", (h, q_out)),
        (p + "mlp.gate_proj.weight", (i, h)),
        (p + "mlp.up_proj.weight", (i, h)),
        (p + "mlp.down_proj.weight", (h, i)),
        (p + "input_layernorm.weight", (h,)),
        (p + "post_attention_layernorm.weight", (h,)),
    ]
    if cfg.attention_bias:
        shapes[3:3] = [
            (p + "self_attn.q_proj.bias", (q_out,)),
            (p + "self_attn.k_proj.bias", (kv_out,)),
            (p + "self_attn.v_proj.bias", (kv_out,)),
        ]
    return shapes


def weight_shapes(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor the model needs, in checkpoint order; `lm_head.weight` only when untied."""
    shapes = [("model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size))]
    for layer in range(cfg.num_layers):
        shapes += layer_weight_shapes(cfg, layer)
    shapes.append(("model.norm.weight", (cfg.hidden_size,)))
    if not cfg.tie_word_embeddings:
        shapes.append(("lm_head.weight", (cfg.vocab_size, cfg.hidden_size)))
    return shapes


def is_norm(name: str) -> bool:
    """RMSNorm weights (initialised near 1, not near 0)."""
    return name.endswith("norm.weight")
