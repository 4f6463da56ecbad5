"""The DeepSeek V2/V3 checkpoint table: each tensor's HF name (as in the released checkpoints),
shape, and the parameter of `models/deepseek.py` it fills. Torch-free.

Unlike Llama's, the rows differ between layers (a dense MLP in the first `first_k_dense_replace`
layers, routed + shared experts after) and repeat per expert, so the table expands them itself; it
answers the same `tensors(cfg)` as a `CheckpointTable`. Per-expert gate/up/down tensors fill
slices of the layer's stacked `experts.w13` [E, 2I, H] and `experts.w2` [E, H, I] (part
"gate.E", "up.E", "down.E"). There are no GGUF names: DeepSeek loads from HF folders only.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightllm_async.config import ModelConfig
from lightllm_async.models.checkpoint import CheckpointTensor


def _t(hf: str, shape: tuple[int, ...], param: str, part: str | None = None, norm: bool = False):
    return CheckpointTensor(hf=hf, gguf="", shape=shape, param=param, part=part, rope_heads=None, norm=norm)


def _mlp(prefix: str, param: str, hidden: int, inter: int) -> list[CheckpointTensor]:
    """A SiLU MLP's three tensors: gate/up into a merged gate_up, then down."""
    return [
        _t(f"{prefix}.gate_proj.weight", (inter, hidden), f"{param}.gate_up.weight", part="gate"),
        _t(f"{prefix}.up_proj.weight", (inter, hidden), f"{param}.gate_up.weight", part="up"),
        _t(f"{prefix}.down_proj.weight", (hidden, inter), f"{param}.down.weight"),
    ]


def _layer(cfg: ModelConfig, i: int) -> list[CheckpointTensor]:
    h, n = cfg.hidden_size, cfg.num_heads
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    hf, p = f"model.layers.{i}", f"layers.{i}"
    a, pa = f"{hf}.self_attn", f"{p}.attn"
    rows = [_t(f"{hf}.input_layernorm.weight", (h,), f"{p}.input_norm.weight", norm=True)]
    if cfg.q_lora_rank is None:
        rows.append(_t(f"{a}.q_proj.weight", (n * qk, h), f"{pa}.q_proj.weight"))
    else:
        r = cfg.q_lora_rank
        rows += [
            _t(f"{a}.q_a_proj.weight", (r, h), f"{pa}.q_a_proj.weight"),
            _t(f"{a}.q_a_layernorm.weight", (r,), f"{pa}.q_a_layernorm.weight", norm=True),
            _t(f"{a}.q_b_proj.weight", (n * qk, r), f"{pa}.q_b_proj.weight"),
        ]
    rank = cfg.kv_lora_rank
    rows += [
        _t(
            f"{a}.kv_a_proj_with_mqa.weight",
            (rank + cfg.qk_rope_head_dim, h),
            f"{pa}.kv_a_proj_with_mqa.weight",
        ),
        _t(f"{a}.kv_a_layernorm.weight", (rank,), f"{pa}.kv_a_layernorm.weight", norm=True),
        _t(
            f"{a}.kv_b_proj.weight",
            (n * (cfg.qk_nope_head_dim + cfg.v_head_dim), rank),
            f"{pa}.kv_b_proj.weight",
        ),
        _t(f"{a}.o_proj.weight", (h, n * cfg.v_head_dim), f"{pa}.o_proj.weight"),
    ]
    m, pm = f"{hf}.mlp", f"{p}.mlp"
    if i < cfg.first_k_dense_replace:
        rows += _mlp(m, pm, h, cfg.intermediate_size)
    else:
        e_all, inter = cfg.n_routed_experts, cfg.moe_intermediate_size
        rows.append(_t(f"{m}.gate.weight", (e_all, h), f"{pm}.gate.weight"))
        if cfg.topk_method == "noaux_tc":
            rows.append(
                _t(f"{m}.gate.e_score_correction_bias", (e_all,), f"{pm}.gate.e_score_correction_bias")
            )
        for e in range(e_all):
            x = f"{m}.experts.{e}"
            rows += [
                _t(f"{x}.gate_proj.weight", (inter, h), f"{pm}.experts.w13", part=f"gate.{e}"),
                _t(f"{x}.up_proj.weight", (inter, h), f"{pm}.experts.w13", part=f"up.{e}"),
                _t(f"{x}.down_proj.weight", (h, inter), f"{pm}.experts.w2", part=f"down.{e}"),
            ]
        if cfg.n_shared_experts:
            rows += _mlp(f"{m}.shared_experts", f"{pm}.shared", h, inter * cfg.n_shared_experts)
    rows.append(_t(f"{hf}.post_attention_layernorm.weight", (h,), f"{p}.post_norm.weight", norm=True))
    return rows


@dataclass(frozen=True)
class DeepseekTable:
    """Answers `tensors(cfg)` like a `CheckpointTable`, for DeepseekV2/V3ForCausalLM."""

    def tensors(self, cfg: ModelConfig) -> list[CheckpointTensor]:
        """Every tensor a checkpoint of `cfg` holds, in checkpoint order."""
        v, h = cfg.vocab_size, cfg.hidden_size
        out = [_t("model.embed_tokens.weight", (v, h), "embed.weight")]
        for i in range(cfg.num_layers):
            out += _layer(cfg, i)
        out.append(_t("model.norm.weight", (h,), "norm.weight", norm=True))
        if not cfg.tie_word_embeddings:
            out.append(_t("lm_head.weight", (v, h), "lm_head.weight"))
        return out


DEEPSEEK = DeepseekTable()
