"""Write a HF-format model folder with random weights in the shape of a real model.

    python -m lightllm_async.tools.make_random_model --shape tiny --out /tmp/tiny
    python -m lightllm_async.tools.make_random_model --shape llama3-8b --out /data/l3 --device cuda

The folder holds config.json, model.safetensors (sharded above 4 GiB, with an index),
tokenizer.json, tokenizer_config.json (a ChatML template) and generation_config.json, and loads
with transformers' AutoModelForCausalLM / AutoTokenizer as well as with our loader and tokenizer.
Token ids 0, 1, 2 are <|endoftext|>, <|im_start|> (bos), <|im_end|> (eos) for every shape.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import random
from typing import Any

from tokenizers import Tokenizer

from lightllm_async.config import ModelConfig
from lightllm_async.models.registry import checkpoint_tensors

MAX_SHARD_BYTES = 4 << 30
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
BOS_ID, EOS_ID, PAD_ID = 1, 2, 0
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_COMMON = dict(bos_token_id=BOS_ID, eos_token_ids=(EOS_ID,))
SHAPES: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=160,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        **_COMMON,
    ),
    "smollm2-135m": ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        **_COMMON,
    ),
    "llama3-8b": ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        **_COMMON,
    ),
    "qwen2-7b": ModelConfig(
        architecture="Qwen2ForCausalLM",
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=32768,
        tie_word_embeddings=False,
        attention_bias=True,
        **_COMMON,
    ),
    # DeepSeek. The tiny ones are for tests: V2 without q_lora_rank and with YaRN scaling, V3 with
    # q_lora_rank and noaux_tc grouped routing.
    "deepseek-v2-tiny": ModelConfig(
        architecture="DeepseekV2ForCausalLM",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=160,
        num_layers=3,
        num_heads=4,
        num_kv_heads=4,
        head_dim=32,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        max_position_embeddings=512,  # YaRN: factor x original
        tie_word_embeddings=False,
        rope_scaling={
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 128,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
        },
        q_lora_rank=None,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=16,
        v_head_dim=24,
        first_k_dense_replace=1,
        n_shared_experts=2,
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        topk_method="greedy",
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        **_COMMON,
    ),
    "deepseek-v3-tiny": ModelConfig(
        architecture="DeepseekV3ForCausalLM",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=160,
        num_layers=3,
        num_heads=4,
        num_kv_heads=4,
        head_dim=32,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        q_lora_rank=48,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=16,
        v_head_dim=24,
        first_k_dense_replace=1,
        n_shared_experts=1,
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        topk_method="noaux_tc",
        n_group=2,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        **_COMMON,
    ),
    "deepseek-v2-lite": ModelConfig(
        architecture="DeepseekV2ForCausalLM",
        vocab_size=102400,
        hidden_size=2048,
        intermediate_size=10944,
        num_layers=27,
        num_heads=16,
        num_kv_heads=16,
        head_dim=192,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        max_position_embeddings=163840,
        tie_word_embeddings=False,
        rope_scaling={
            "rope_type": "yarn",
            "factor": 40.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
        },
        q_lora_rank=None,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        first_k_dense_replace=1,
        n_shared_experts=2,
        n_routed_experts=64,
        num_experts_per_tok=6,
        moe_intermediate_size=1408,
        topk_method="greedy",
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        **_COMMON,
    ),
    # the full per-layer shape; pick the layer count with --num-layers so that it fits one GPU
    "deepseek-v3": ModelConfig(
        architecture="DeepseekV3ForCausalLM",
        vocab_size=129280,
        hidden_size=7168,
        intermediate_size=18432,
        num_layers=61,
        num_heads=128,
        num_kv_heads=128,
        head_dim=192,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        max_position_embeddings=163840,
        tie_word_embeddings=False,
        rope_scaling={
            "rope_type": "yarn",
            "factor": 40.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        first_k_dense_replace=3,
        n_shared_experts=1,
        n_routed_experts=256,
        num_experts_per_tok=8,
        moe_intermediate_size=2048,
        topk_method="noaux_tc",
        n_group=8,
        topk_group=4,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        **_COMMON,
    ),
}


def shape_config(shape: str, dtype: str = "bfloat16", num_layers: int | None = None) -> ModelConfig:
    """The ModelConfig of a named shape, with the dtype and an optional layer-count override."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {sorted(SHAPES)}")
    cfg = dataclasses.replace(SHAPES[shape], torch_dtype=dtype)
    return dataclasses.replace(cfg, num_layers=num_layers) if num_layers else cfg


def make_random_model(
    shape: str,
    out_dir: str,
    dtype: str = "bfloat16",
    seed: int = 0,
    num_layers: int | None = None,
    device: str = "cpu",
) -> str:
    """Write a random model folder for `shape` into `out_dir` and return `out_dir`."""
    return write_model(shape_config(shape, dtype, num_layers), out_dir, seed=seed, device=device)


def write_model(cfg: ModelConfig, out_dir: str, seed: int = 0, device: str = "cpu") -> str:
    """Write a complete random model folder for any `cfg` (dtype from `cfg.torch_dtype`)."""
    os.makedirs(out_dir, exist_ok=True)
    write_config_files(cfg, out_dir)
    write_tokenizer(cfg, out_dir)
    write_random_weights(cfg, out_dir, seed=seed, device=device)
    return out_dir


def write_config_files(cfg: ModelConfig, out_dir: str) -> None:
    """config.json and generation_config.json (HF format)."""
    hf = {**cfg.to_hf_dict(), "pad_token_id": PAD_ID, "hidden_act": "silu", "use_cache": True}
    if cfg.architecture == "Qwen2ForCausalLM":
        hf.update(use_sliding_window=False, max_window_layers=cfg.num_layers)
    _write_json(os.path.join(out_dir, "config.json"), hf)
    gen = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}
    _write_json(os.path.join(out_dir, "generation_config.json"), gen)


def write_tokenizer(cfg: ModelConfig, out_dir: str) -> None:
    """tokenizer.json + tokenizer_config.json. Vocabularies of 49152+ reuse SmolLM2's real
    tokenizer when its GGUF is installed; smaller ones get a byte-level BPE trained here."""
    backend = _smollm2_tokenizer() if cfg.vocab_size >= 49152 else None
    if backend is None:
        backend = train_tiny_tokenizer(min(cfg.vocab_size, 512))
    backend.save(os.path.join(out_dir, "tokenizer.json"))
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKENS[BOS_ID],
        "eos_token": SPECIAL_TOKENS[EOS_ID],
        "pad_token": SPECIAL_TOKENS[PAD_ID],
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg.max_position_embeddings,
        "chat_template": CHAT_TEMPLATE,
    }
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), tok_cfg)


def _smollm2_tokenizer() -> Tokenizer | None:
    from lightllm_async.formats.gguf_file import GGUFFile
    from lightllm_async.formats.gguf_tokenizer import build_gguf_tokenizer
    from lightllm_async.models.loader import default_model_path

    try:
        path = default_model_path()
    except FileNotFoundError:
        return None
    return build_gguf_tokenizer(GGUFFile(path).metadata)


def train_tiny_tokenizer(vocab_size: int) -> Tokenizer:
    """A byte-level BPE with `vocab_size` entries (ids 0-2 special), trained deterministically on
    built-in text; any UTF-8 text still encodes, through the 256 byte tokens."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_training_text(), trainer)
    return tok


_WORDS = (  # noqa: SIM905 (a paragraph reads better than a list of 150 strings)
    "the of and to in is was for that with as on by at from this be are or it an which have not has had "
    "model token server request response stream batch cache memory kernel tensor layer attention head "
    "query key value rotary position embedding norm weight bias matrix vector softmax sample temperature "
    "prompt completion chat user assistant system message content role hello world python function "
    "return class import def self print list dict string number value error time data file path config "
    "engine scheduler process thread queue slot shared ring buffer page prefix tree node leaf evict "
    "reference count generate decode encode byte unicode character space line newline tab quick brown "
    "fox jumps over lazy dog because people think little great small large first last long short high "
    "low good new old right left after before under between through during without within against among "
    "language learning"
).split()


def _training_text() -> list[str]:
    """Fixed pseudo-random sentences and code over `_WORDS` (same text on every machine)."""
    rng = random.Random(1234)
    lines = []
    for i in range(400):
        words = rng.choices(_WORDS, k=rng.randint(5, 14))
        lines.append(
            " ".join(words).capitalize() + rng.choice([".", "?", "!", ",", ":"]) + f" {i} {i * 37 % 1000}"
        )
        lines.append(f"def {words[0]}_{words[1]}(x, y={i}):\n    return x * {rng.randint(0, 99)} + y\n")
    return lines


def write_random_weights(
    cfg: ModelConfig, out_dir: str, seed: int = 0, device: str = "cpu", max_shard_bytes: int = MAX_SHARD_BYTES
) -> list[str]:
    """Random tensors (`models.weights.random_weights`) in `cfg.torch_dtype`, written one shard at
    a time; returns the files written."""
    import torch
    from safetensors.torch import save_file

    from lightllm_async.models.weights import random_weights

    dtype = getattr(torch, cfg.torch_dtype)
    shapes = [(t.hf, t.shape) for t in checkpoint_tensors(cfg)]
    shards = plan_shards(shapes, dtype.itemsize, max_shard_bytes)
    names = _shard_file_names(len(shards))
    tensors = random_weights(cfg, seed, dtype, device)  # in checkpoint order, as the shards are
    for file, shard in zip(names, shards, strict=True):
        chunk = {name: t.cpu().contiguous() for name, t in itertools.islice(tensors, len(shard))}
        save_file(chunk, os.path.join(out_dir, file), metadata={"format": "pt"})
    if len(shards) > 1:
        _write_index(out_dir, names, shards, dtype.itemsize)
    return names


def plan_shards(
    shapes: list[tuple[str, tuple[int, ...]]], itemsize: int, max_bytes: int = MAX_SHARD_BYTES
) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Greedy split of the tensors, in order, into shards of at most `max_bytes` (one tensor
    larger than that gets a shard of its own)."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = _numel(shape) * itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def _shard_file_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _write_index(
    out_dir: str, files: list[str], shards: list[list[tuple[str, tuple[int, ...]]]], itemsize: int
) -> None:
    weight_map = {name: file for file, shard in zip(files, shards, strict=True) for name, _ in shard}
    total = sum(_numel(shape) * itemsize for shard in shards for _, shape in shard)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    _write_json(os.path.join(out_dir, "model.safetensors.index.json"), index)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _write_json(path: str, obj: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", required=True, choices=sorted(SHAPES))
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-layers", type=int, default=None, help="override the shape's layer count")
    p.add_argument("--device", default="cpu", help="where to draw the random numbers (cpu, cuda)")
    a = p.parse_args(argv)
    out = make_random_model(a.shape, a.out, a.dtype, a.seed, a.num_layers, a.device)
    print(f"wrote {a.shape} ({a.dtype}) to {out}")


if __name__ == "__main__":
    main()
