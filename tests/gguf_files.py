"""Synthetic GGUF files written the way llama.cpp's convert_hf_to_gguf.py writes them."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from lightllm_async.models.loader import iter_weights, load_model_config


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, copied as the reference."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(
    src_dir: str,
    path: str,
    arch: str,
    *,
    rope_freqs: np.ndarray | None = None,
    rope_scaling: tuple[str, float] | None = None,
    types: dict[str, str] | None = None,
) -> None:
    """A llama.cpp-style GGUF of a HF folder: GGUF names, q/k rows permuted for arch llama,
    every tensor F32 (the folder's bf16 values convert exactly), but the matrices whose GGUF
    name has a key of `types` in it ({"ffn_": "Q4_1"}), quantized to that ggml type by the gguf
    package. rope_scaling: (type, factor)."""
    gguf = pytest.importorskip("gguf")
    cfg = load_model_config(src_dir)
    w = gguf.GGUFWriter(path, arch)
    if rope_scaling is not None:
        kind, factor = rope_scaling
        w.add_rope_scaling_type(gguf.RopeScalingType(kind))
        w.add_rope_scaling_factor(factor)
        w.add_rope_scaling_orig_ctx_len(cfg.max_position_embeddings)
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    with open(os.path.join(src_dir, "tokenizer.json")) as f:
        tok = json.load(f)
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    w.add_tokenizer_model("gpt2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if i < 3 else 1 for _, i in vocab])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    reverse = {
        v: k
        for k, v in {
            "token_embd": "model.embed_tokens",
            "output_norm": "model.norm",
            "output": "lm_head",
        }.items()
    }
    parts = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    for name, t in iter_weights(src_dir):
        a = t.numpy()
        base, kind = name.rsplit(".", 1)
        if base in reverse:
            gname = f"{reverse[base]}.{kind}"
        else:
            _, _, layer, rest = base.split(".", 3)
            gname = f"blk.{layer}.{parts[rest]}.{kind}"
        if arch == "llama" and ".attn_q." in gname:
            a = llama_cpp_permute(a, cfg.num_heads)
        elif arch == "llama" and ".attn_k." in gname:
            a = llama_cpp_permute(a, cfg.num_kv_heads)
        quant = next((t for key, t in (types or {}).items() if key in gname and a.ndim == 2), None)
        if quant is None:
            w.add_tensor(gname, np.ascontiguousarray(a))
        else:
            qtype = gguf.GGMLQuantizationType[quant]
            w.add_tensor(gname, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
