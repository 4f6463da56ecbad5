"""GGUF (llama.cpp) Llama/Qwen2 checkpoints seen as HF ones: a ModelConfig and HF-named tensors,
the names mapped by the family's checkpoint table (`models/registry.py`).

Torch-free (numpy only); `loader.iter_weights` turns the arrays into tensors.

Two llama.cpp conventions are undone here:
- numpy shapes are ggml's dims reversed, so a `[ne0=in, ne1=out]` matrix reads as `[out, in]`,
  which is already torch's Linear layout: no transpose is needed.
- for arch "llama", `convert_hf_to_gguf.py` permutes the rows of q_proj/k_proj (weights and
  biases) from HF's rotate-half rope layout to ggml's interleaved one, per head:
  `w.reshape(n_head, 2, d/2, ...).swapaxes(1, 2)`. `unpermute_rows` is its exact inverse (the same
  as transformers' `_reverse_permute_weights`). Qwen2 is converted without the permutation.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from lightllm_async.config import ModelConfig
from lightllm_async.formats.gguf_file import GGUFFile, GGUFTensorInfo
from lightllm_async.formats.gguf_int4 import INT4_TYPES, Int4Groups, int4_groups
from lightllm_async.models.checkpoint import CheckpointTensor
from lightllm_async.models.registry import checkpoint_tensors

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_PERMUTED_ARCHS = {"llama"}  # archs whose q/k rows llama.cpp permutes

_SKIPPED = {"rope_freqs.weight"}  # folded into ModelConfig.rope_scaling


def gguf_model_config(gf: GGUFFile) -> ModelConfig:
    """The ModelConfig a GGUF file describes (arch llama or qwen2)."""
    arch = gf.architecture
    if arch not in _ARCHITECTURES:
        raise ValueError(
            f"{gf.path}: GGUF architecture {arch!r} is not supported; supported: {sorted(_ARCHITECTURES)}"
        )
    m = gf.metadata

    def key(name: str, default: Any = None) -> Any:
        return m.get(f"{arch}.{name}", default)

    hidden, num_heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(key("attention.key_length") or key("rope.dimension_count") or hidden // num_heads)
    theta = float(key("rope.freq_base", 10000.0))
    names = set(gf.tensor_names())
    return ModelConfig(
        architecture=_ARCHITECTURES[arch],
        vocab_size=int(key("vocab_size") or len(m["tokenizer.ggml.tokens"])),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_layers=int(key("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(key("attention.head_count_kv") or num_heads),
        head_dim=head_dim,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=theta,
        max_position_embeddings=int(key("context_length", 4096)),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        rope_scaling=_rope_scaling(gf, arch, head_dim, theta),
        bos_token_id=m.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=_eos_ids(m),
        torch_dtype=_float_dtype(gf),
    )


def _eos_ids(m: dict[str, Any]) -> tuple[int, ...]:
    keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
    ids = [int(m[k]) for k in keys if m.get(k) is not None]
    return tuple(dict.fromkeys(ids))


def _float_dtype(gf: GGUFFile) -> str:
    """The half type of an unquantized file; float32 when any tensor is quantized (dequantized)."""
    types = {t.ggml_type for t in gf.tensors}
    if any(t.is_quantized for t in gf.tensors):
        return "float32"
    return "bfloat16" if 30 in types else "float16" if 1 in types else "float32"


def _rope_scaling(gf: GGUFFile, arch: str, head_dim: int, theta: float) -> dict[str, Any] | None:
    m = gf.metadata
    kind = m.get(f"{arch}.rope.scaling.type")
    factor = m.get(f"{arch}.rope.scaling.factor")
    if kind == "linear" and factor:
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn" and factor:
        orig = int(m.get(f"{arch}.rope.scaling.original_context_length", 0))
        return {"rope_type": "yarn", "factor": float(factor), "original_max_position_embeddings": orig}
    freqs = next((t for t in gf.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:
        return llama3_scaling_from_factors(gf.dequantize(freqs), head_dim, theta)
    return None


def llama3_scaling_from_factors(factors: np.ndarray, head_dim: int, theta: float) -> dict[str, Any]:
    """Recover HF's llama3 rope_scaling from the per-frequency factors llama.cpp stores.

    llama.cpp precomputes them (`rope_freqs.weight`) instead of writing the parameters. Every
    Llama 3.x release uses low_freq_factor 1, high_freq_factor 4, original context 8192; the factor
    is the largest entry. Those are checked by recomputing the table, so a file made another way
    fails loudly instead of running with a wrong rope.
    """
    guess = {
        "rope_type": "llama3",
        "factor": float(factors.max()),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    if not np.allclose(llama3_factors(guess, head_dim, theta), factors, rtol=1e-4, atol=1e-5):
        raise ValueError("GGUF rope_freqs.weight does not match any llama3 rope scaling we know")
    return guess


def llama3_factors(scaling: dict[str, Any], head_dim: int, theta: float) -> np.ndarray:
    """The divisor llama3 scaling applies to each rope frequency (as convert_hf_to_gguf.py writes it)."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    factor, orig = scaling["factor"], scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelen = 2 * np.pi / freqs
    smooth = (orig / wavelen - low) / (high - low)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < orig / high, 1.0, np.where(wavelen > orig / low, factor, mid))
    return out.astype(np.float32)


def weight_plan(gf: GGUFFile, cfg: ModelConfig) -> list[tuple[GGUFTensorInfo, CheckpointTensor]]:
    """`[(tensor, its table row)]` in file order, without the tensors that only feed the config;
    raises if the file holds a tensor the table lacks or lacks one it lists."""
    rows = {t.gguf: t for t in checkpoint_tensors(cfg)}
    plan = [(info, rows.pop(info.name, None)) for info in gf.tensors if info.name not in _SKIPPED]
    unknown = [info.name for info, row in plan if row is None]
    if unknown:
        raise ValueError(f"{gf.path}: tensors {unknown[:3]} have no place in a {cfg.architecture}")
    if rows:
        raise KeyError(f"{gf.path}: {len(rows)} tensors missing, e.g. {sorted(rows)[:3]}")
    return plan


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (ggml interleaved rope -> HF rotate-half), per head."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def iter_gguf_arrays(
    gf: GGUFFile, cfg: ModelConfig, keep_int4: bool = False
) -> Iterator[tuple[str, np.ndarray | Int4Groups]]:
    """`(hf_name, array)` one tensor at a time, un-permuted: a float32 array, or with `keep_int4`
    the 4-bit matrices as their groups (`formats/gguf_int4.py`), which lose nothing."""
    permuted = gf.architecture in _PERMUTED_ARCHS
    for info, row in weight_plan(gf, cfg):
        if keep_int4 and _is_int4_matrix(info):
            w = int4_groups(gf.raw(info), info.ggml_type)
            if permuted and row.rope_heads is not None:
                w = w.map_rows(lambda a, n=row.rope_heads: unpermute_rows(a, n))
        else:
            w = gf.dequantize(info)
            if permuted and row.rope_heads is not None:
                w = unpermute_rows(w, row.rope_heads)
        yield row.hf, w


def int4_params(gf: GGUFFile, cfg: ModelConfig) -> dict[str, str]:
    """The model parameters whose every checkpoint tensor is a 4-bit matrix: `{param: type name}`
    (e.g. "layers.0.attn.qkv.weight": "Q4_1"; mixed types are joined with "+")."""
    types: dict[str, set[str | None]] = {}
    for info, row in weight_plan(gf, cfg):
        kind = INT4_TYPES[info.ggml_type] if _is_int4_matrix(info) else None
        types.setdefault(row.param, set()).add(kind)
    return {param: "+".join(sorted(t)) for param, t in types.items() if None not in t}


def _is_int4_matrix(info: GGUFTensorInfo) -> bool:
    return info.ggml_type in INT4_TYPES and len(info.shape) == 2
