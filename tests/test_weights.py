"""models/weights.py and the Llama table: every checkpoint tensor lands in its parameter (fused
ones in their rows), every parameter is filled, and a checkpoint that does not fit is refused."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lightllm_async.models.llama import LlamaForCausalLM
from lightllm_async.models.registry import checkpoint_tensors
from lightllm_async.models.weights import load_weights, random_weights
from lightllm_async.tools.make_random_model import shape_config


def tiny(**changes):
    return dataclasses.replace(shape_config("tiny", "float32"), **changes)


def nan_model(cfg) -> LlamaForCausalLM:
    """A model whose every parameter is NaN, so that one the loading misses shows."""
    model = LlamaForCausalLM(cfg, torch.float32, torch.device("cpu"))
    for p in model.parameters():
        p.data.fill_(float("nan"))
    return model


@pytest.mark.parametrize("changes", [{}, {"attention_bias": True}, {"tie_word_embeddings": True}])
def test_every_parameter_is_filled_from_its_checkpoint_tensor(changes):
    cfg = tiny(**changes)
    weights = dict(random_weights(cfg, seed=1, dtype=torch.float32))
    model = nan_model(cfg)
    load_weights(model, weights.items())
    assert not any(p.isnan().any() for p in model.parameters())

    def hf(name: str) -> torch.Tensor:
        return weights[f"model.layers.2.{name}"]

    layer = model.layers[2]
    qkv = [hf(f"self_attn.{p}_proj.weight") for p in "qkv"]
    assert torch.equal(layer.attn.qkv.weight, torch.cat(qkv))
    gate_up = [hf("mlp.gate_proj.weight"), hf("mlp.up_proj.weight")]
    assert torch.equal(layer.mlp.gate_up.weight, torch.cat(gate_up))
    assert torch.equal(layer.attn.o_proj.weight, hf("self_attn.o_proj.weight"))
    assert torch.equal(layer.mlp.down.weight, hf("mlp.down_proj.weight"))
    assert torch.equal(layer.input_norm.weight, hf("input_layernorm.weight"))
    assert torch.equal(layer.post_norm.weight, hf("post_attention_layernorm.weight"))
    if cfg.attention_bias:
        biases = [hf(f"self_attn.{p}_proj.bias") for p in "qkv"]
        assert torch.equal(layer.attn.qkv.bias, torch.cat(biases))
    assert torch.equal(model.embed.weight, weights["model.embed_tokens.weight"])
    assert torch.equal(model.norm.weight, weights["model.norm.weight"])
    assert (model.lm_head is None) == cfg.tie_word_embeddings == ("lm_head.weight" not in weights)
    if model.lm_head is not None:
        assert torch.equal(model.lm_head.weight, weights["lm_head.weight"])


def test_table_names_each_tensor_once_in_both_namings():
    tensors = checkpoint_tensors(tiny(attention_bias=True))
    assert len({t.hf for t in tensors}) == len({t.gguf for t in tensors}) == len(tensors) == 3 * 12 + 3
    assert {(t.param, t.part) for t in tensors if t.part} >= {("layers.0.attn.qkv.bias", "k")}


def test_a_missing_tensor_is_named():
    cfg = tiny()
    gone = "model.layers.1.mlp.up_proj.weight"
    weights = [(n, t) for n, t in random_weights(cfg, 0, torch.float32) if n != gone]
    with pytest.raises(ValueError, match=r"lacks 1 tensors.*layers\.1\.mlp\.up_proj"):
        load_weights(nan_model(cfg), weights)


@pytest.mark.parametrize(
    "extra",
    ["lm_head.weight", "model.layers.0.self_attn.q_proj.bias", "model.layers.0.input_layernorm.weight"],
)
def test_an_unexpected_or_repeated_tensor_is_refused(extra):
    cfg = tiny(tie_word_embeddings=True)  # no lm_head, no biases
    weights = list(random_weights(cfg, 0, torch.float32))
    with pytest.raises(ValueError, match="unexpected tensor"):
        load_weights(nan_model(cfg), [*weights, (extra, torch.zeros(cfg.hidden_size))])


def test_a_tensor_of_the_wrong_shape_is_refused():
    cfg = tiny()
    k_name = "model.layers.0.self_attn.k_proj.weight"
    weights = [(n, t.T if n == k_name else t) for n, t in random_weights(cfg, 0, torch.float32)]
    with pytest.raises(ValueError, match=r"k_proj\.weight: shape \(64, 32\), expected \(32, 64\)"):
        load_weights(nan_model(cfg), weights)
