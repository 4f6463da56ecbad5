"""tools/make_random_model.py: folders that transformers, our loader and our tokenizer all read."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from safetensors import safe_open

from lightllm_async.models.loader import default_model_path, iter_weights, load_model_config
from lightllm_async.models.registry import checkpoint_tensors
from lightllm_async.tokenizer import load_tokenizer
from lightllm_async.tools import make_random_model as mrm


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    return mrm.make_random_model("tiny", str(tmp_path_factory.mktemp("tiny")), dtype="bfloat16", seed=0)


def _assert_transformers_agrees(path: str, dtype: torch.dtype) -> None:
    """transformers loads the folder with no missing or extra weights, holding our values."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    ref = model.state_dict()
    ours = dict(iter_weights(path, dtype))
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    assert set(ref) - tied == set(ours)
    for name, tensor in ours.items():
        assert torch.equal(tensor, ref[name]), name
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 300]])).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()


def test_tiny_loads_with_transformers_and_our_loader(tiny_dir):
    assert load_model_config(tiny_dir) == mrm.shape_config("tiny")
    _assert_transformers_agrees(tiny_dir, torch.bfloat16)


def test_tiny_tokenizer_round_trips_text(tiny_dir):
    tok = load_tokenizer(tiny_dir)
    assert tok.vocab_size <= load_model_config(tiny_dir).vocab_size
    for text in ["Hello world, the model said 42.", "naïve 中文 😀\n\tcode()", ""]:
        assert tok.decode(tok.encode(text)) == text
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.encode(rendered)[0] == tok.bos_token_id == 1 and tok.eos_token_ids == (2,)


@pytest.mark.parametrize("variant", ["qwen2-bias", "llama3-rope", "tied"])
def test_variants_load_with_transformers(tmp_path, variant):
    base = mrm.shape_config("tiny", dtype="float32")
    cfg = {
        "qwen2-bias": dataclasses.replace(base, architecture="Qwen2ForCausalLM", attention_bias=True),
        "llama3-rope": dataclasses.replace(base, rope_scaling=mrm.SHAPES["llama3-8b"].rope_scaling),
        "tied": dataclasses.replace(base, tie_word_embeddings=True, num_layers=1),
    }[variant]
    path = mrm.write_model(cfg, str(tmp_path), seed=7)
    assert load_model_config(path) == cfg
    _assert_transformers_agrees(path, torch.float32)


@pytest.mark.parametrize(
    "shape,expect",
    [
        (
            "llama3-8b",
            dict(
                vocab_size=128256,
                hidden_size=4096,
                intermediate_size=14336,
                num_hidden_layers=32,
                num_attention_heads=32,
                num_key_value_heads=8,
                max_position_embeddings=8192,
            ),
        ),
        (
            "qwen2-7b",
            dict(
                vocab_size=152064,
                hidden_size=3584,
                intermediate_size=18944,
                num_hidden_layers=28,
                num_attention_heads=28,
                num_key_value_heads=4,
                max_position_embeddings=32768,
            ),
        ),
        (
            "smollm2-135m",
            dict(
                vocab_size=49152,
                hidden_size=576,
                intermediate_size=1536,
                num_hidden_layers=30,
                num_attention_heads=9,
                num_key_value_heads=3,
                max_position_embeddings=8192,
            ),
        ),
    ],
)
def test_real_shapes_write_configs_transformers_reads(tmp_path, shape, expect):
    from transformers import AutoConfig

    cfg = mrm.shape_config(shape)
    mrm.write_config_files(cfg, str(tmp_path))
    ref = AutoConfig.from_pretrained(str(tmp_path))
    assert {k: getattr(ref, k) for k in expect} == expect
    assert load_model_config(str(tmp_path)) == cfg
    rope = ref.rope_parameters
    if shape == "llama3-8b":
        assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0 and rope["rope_theta"] == 500000.0
        assert (rope["low_freq_factor"], rope["high_freq_factor"]) == (1.0, 4.0)
        assert rope["original_max_position_embeddings"] == 8192
    if shape == "qwen2-7b":
        assert ref.model_type == "qwen2" and cfg.attention_bias and rope["rope_theta"] == 1e6


def test_big_vocab_shapes_reuse_smollm2_tokenizer(tmp_path):
    try:
        gguf_path = default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    mrm.write_tokenizer(mrm.shape_config("llama3-8b"), str(tmp_path))
    ours, real = load_tokenizer(str(tmp_path)), load_tokenizer(gguf_path)
    text = "The  2 quick foxes 😀 <|im_end|>"
    assert ours.encode(text) == real.encode(text) and ours.vocab_size == 49152


def test_seed_fixes_weights_and_statistics(tmp_path):
    cfg = mrm.shape_config("tiny", dtype="float32")
    for name, seed in (("a", 11), ("b", 11), ("c", 12)):
        os.makedirs(tmp_path / name)
        mrm.write_random_weights(cfg, str(tmp_path / name), seed=seed)
    read = {n: _load(tmp_path / n / "model.safetensors") for n in "abc"}
    assert all(torch.equal(read["a"][k], read["b"][k]) for k in read["a"])
    assert not torch.equal(read["a"]["lm_head.weight"], read["c"]["lm_head.weight"])
    norms = torch.cat([t for k, t in read["a"].items() if k.endswith("norm.weight")])
    mats = torch.cat([t.flatten() for k, t in read["a"].items() if not k.endswith("norm.weight")])
    assert abs(norms.mean().item() - 1) < 0.01 and abs(mats.std().item() - 0.02) < 0.001


def _load(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)


def test_cli_overrides_layers_and_dtype(tmp_path):
    mrm.main(
        ["--shape", "tiny", "--out", str(tmp_path), "--num-layers", "1", "--dtype", "float32", "--seed", "4"]
    )
    assert json.loads((tmp_path / "config.json").read_text())["num_hidden_layers"] == 1
    tensors = _load(tmp_path / "model.safetensors")
    assert set(tensors) == {t.hf for t in checkpoint_tensors(load_model_config(str(tmp_path)))}
    assert all(t.dtype == torch.float32 for t in tensors.values())


def test_plan_shards_respects_limit_and_order():
    shapes = [(f"t{i}", (n,)) for i, n in enumerate([3, 5, 2, 11, 1, 7, 7])]
    shards = mrm.plan_shards(shapes, itemsize=2, max_bytes=16)
    assert [n for shard in shards for n, _ in shard] == [n for n, _ in shapes]
    assert [[s[0] for _, s in shard] for shard in shards] == [[3, 5], [2], [11], [1, 7], [7]]
