"""DeepSeek V2/V3 (MLA + MoE) against HF transformers' DeepseekV2ForCausalLM / DeepseekV3ForCausalLM,
on tiny random models, fp32 on the CPU (every kernel op through its PyTorch reference).

Variants: V2 without q_lora_rank, YaRN scaling, greedy routing; V2 with group_limited_greedy;
V3 with q_lora_rank and noaux_tc (bias-corrected sigmoid, grouped), normalized and scaled weights.
The logits are checked with the model as built by default on the CPU (every decode fusion on but
the CUDA-only router GEMM; the shared experts a separate MLP), with the shared experts always fused
into fused_moe's experts, fused in steps of at most FUSED_SHARED_MAX_TOKENS tokens (the CUDA
default at these sizes; an MLP through views of the same rows above), and with every fusion off
(the layer as before them).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine_harness import generate, hf_greedy, model_runner
from lightllm_async.config import EngineConfig, ModelConfig
from lightllm_async.kernels import use_triton
from lightllm_async.kernels.testing import rel_err
from lightllm_async.models.deepseek import (
    ALWAYS,
    FUSED_SHARED_MAX_TOKENS,
    DeepseekForCausalLM,
    Experts,
    Fusions,
    MLAKVCache,
    MLAttention,
    MoE,
    mla_rope_cache,
    shared_fused_max_tokens,
)
from lightllm_async.models.llama import ForwardContext
from lightllm_async.models.loader import iter_weights, load_model_config
from lightllm_async.models.weights import load_weights, random_weights
from lightllm_async.runner.model_runner import ModelRunner
from lightllm_async.tools.make_random_model import shape_config, write_model

NEW_TOKENS = 16


def _variant(name: str) -> ModelConfig:
    if name == "v2-yarn-greedy":
        return shape_config("deepseek-v2-tiny", "float32")
    if name == "v2-group-limited":
        return dataclasses.replace(
            shape_config("deepseek-v2-tiny", "float32"),
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            num_experts_per_tok=3,
            routed_scaling_factor=1.5,
            rope_scaling=None,
        )
    if name == "v3-noaux-tc":
        return shape_config("deepseek-v3-tiny", "float32")
    if name == "v3-yarn-dense-only-first-2":
        return dataclasses.replace(
            shape_config("deepseek-v3-tiny", "float32"),
            first_k_dense_replace=2,
            rope_scaling={
                "rope_type": "yarn",
                "factor": 8.0,
                "original_max_position_embeddings": 64,
                "beta_fast": 32,
                "beta_slow": 1,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
            },
            max_position_embeddings=512,
        )
    raise AssertionError(name)


def _runner(path: str) -> ModelRunner:
    return ModelRunner(
        EngineConfig(
            model_path=path, device="cpu", max_model_len=256, kv_cache_tokens=2048, max_running_requests=4
        )
    )


@pytest.fixture(
    scope="module", params=["v2-yarn-greedy", "v2-group-limited", "v3-noaux-tc", "v3-yarn-dense-only-first-2"]
)
def model(request, tmp_path_factory):
    cfg = _variant(request.param)
    path = write_model(cfg, str(tmp_path_factory.mktemp(request.param)), seed=5)
    hf, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    return cfg, path, _runner(path), hf.eval(), info


KINDS = {  # model arguments of each way to build the same checkpoint
    "shared-fused": {"fuse_shared_experts": True},
    "shared-fused-small-steps": {"fuse_shared_experts": FUSED_SHARED_MAX_TOKENS},
    "unfused": {"fusions": Fusions.off()},
}


@pytest.fixture(scope="module")
def built(model) -> dict[str, DeepseekForCausalLM]:
    """The runner's model (built by default) and the same checkpoint built each way of KINDS."""
    cfg, path, runner, *_ = model
    nets = {"default": runner.model}
    for kind, extra in KINDS.items():
        net = DeepseekForCausalLM(cfg, torch.float32, torch.device("cpu"), **extra)
        load_weights(net, iter_weights(path))
        nets[kind] = net.eval()
    return nets


def test_shared_experts_are_fused_at_small_steps_on_cuda_only(model, built):
    cfg, *_ = model
    assert shared_fused_max_tokens(cfg, "cuda") == FUSED_SHARED_MAX_TOKENS  # experts < V2-Lite's
    assert shared_fused_max_tokens(cfg, "cpu") == 0
    big = dataclasses.replace(cfg, hidden_size=7168, moe_intermediate_size=2048)  # V3's: lost at every M
    assert shared_fused_max_tokens(big, "cuda") == 0
    assert built["default"].layers[-1].mlp.shared is not None  # on the CPU: a separate MLP
    small = built["shared-fused-small-steps"].layers[-1].mlp
    assert small.shared is None and small.fused_max_tokens == FUSED_SHARED_MAX_TOKENS
    assert small.experts.w13.shape[0] == cfg.n_routed_experts + cfg.n_shared_experts
    assert built["shared-fused"].layers[-1].mlp.fused_max_tokens == ALWAYS
    assert built["default"].layers[0].attn.w_in is not None and built["unfused"].layers[0].attn.w_in is None


def test_checkpoint_names_are_the_hf_ones(model):
    """transformers finds every tensor it needs under our names, and none it does not know."""
    *_, info = model
    assert not info["missing_keys"] and not info["unexpected_keys"], info


def test_greedy_equals_hf_batched_with_chunked_prefill(model, monkeypatch):
    cfg, _, runner, hf, _ = model
    calls = {"prefill": 0, "decode": 0}
    prefill, decode = MLAttention._prefill, MLAttention._decode

    def counted_prefill(self, *a):
        calls["prefill"] += 1
        return prefill(self, *a)

    def counted_decode(self, *a):
        calls["decode"] += 1
        return decode(self, *a)

    monkeypatch.setattr(MLAttention, "_prefill", counted_prefill)
    monkeypatch.setattr(MLAttention, "_decode", counted_decode)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist() for n in (1, 9, 37, 90)]
    # 16-token chunks: the long prompts' chunks share steps with the short ones' decodes, then
    # the decode-only steps take the absorbed path
    ours = generate(runner, prompts, NEW_TOKENS, max_num_batched_tokens=16)
    assert calls["prefill"] > 0 and calls["decode"] > 0, calls
    for prompt, out in zip(prompts, ours, strict=True):
        assert out == hf_greedy(hf, prompt, NEW_TOKENS)


def _ctx(positions: list[int], row_len: int, decode_only: bool) -> ForwardContext:
    t = len(positions)
    table = torch.zeros((1, 256), dtype=torch.int32)
    table[0, :row_len] = torch.arange(row_len, dtype=torch.int32)
    return ForwardContext(
        positions=torch.tensor(positions, dtype=torch.int64),
        kv_slots=torch.tensor(positions, dtype=torch.int64),
        req_to_token=table,
        req_idx=torch.zeros(1, dtype=torch.int32),
        q_start=torch.tensor([0, t], dtype=torch.int32),
        seq_lens=torch.tensor([row_len], dtype=torch.int32),
        logits_idx=torch.arange(t, dtype=torch.int64),
        decode_only=decode_only,
        host_seq_lens=(row_len,),
    )


@pytest.mark.parametrize("kind", ["default", *KINDS])
def test_logits_close_to_hf_prefill_and_absorbed_decode(model, built, kind):
    cfg, _, _, hf, _ = model
    net = built[kind]
    ids = torch.randint(3, cfg.vocab_size, (41,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids[None]).logits[0].float()  # [41, V]
    kv = MLAKVCache.allocate(cfg, 64, torch.float32, "cpu")
    prefill = net(ids[:40], _ctx(list(range(40)), 40, False), kv)  # decompressed path
    decode = net(ids[40:], _ctx([40], 41, True), kv)  # absorbed path over the latent cache
    torch.testing.assert_close(prefill, expected[:40], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(decode, expected[40:], atol=1e-4, rtol=1e-4)


def _step_ctx(parts: list[tuple[int, int, int]], with_host_q_lens: bool = True) -> ForwardContext:
    """A step of several requests: (row, cached tokens, new tokens) each; request `row` keeps its
    cache rows at row * 64 + position."""
    table = (torch.arange(4)[:, None] * 64 + torch.arange(64)[None, :]).to(torch.int32)
    positions = [p for _, cached, new in parts for p in range(cached, cached + new)]
    slots = [row * 64 + p for row, cached, new in parts for p in range(cached, cached + new)]
    q_lens = [new for _, _, new in parts]
    return ForwardContext(
        positions=torch.tensor(positions, dtype=torch.int64),
        kv_slots=torch.tensor(slots, dtype=torch.int64),
        req_to_token=table,
        req_idx=torch.tensor([row for row, _, _ in parts], dtype=torch.int32),
        q_start=torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32),
        seq_lens=torch.tensor([cached + new for _, cached, new in parts], dtype=torch.int32),
        logits_idx=torch.arange(len(positions), dtype=torch.int64),
        decode_only=all(n == 1 for n in q_lens),
        host_seq_lens=tuple(cached + new for _, cached, new in parts),
        host_q_lens=tuple(q_lens) if with_host_q_lens else None,
    )


@pytest.mark.parametrize("interpreted", [False, True], ids=["reference", "interpreter"])
def test_mixed_step_runs_decodes_absorbed_and_chunks_decompressed(model, monkeypatch, request, interpreted):
    """One step with two decodes and two prefill chunks (one of them a later chunk over a cached
    prefix), in interleaved order: the decodes take the absorbed path over the latent alone, the
    chunks decompress only their own contexts, and every logit equals HF's."""
    if interpreted:
        request.getfixturevalue("interpreter")
    cfg, _, runner, hf, _ = model
    net = runner.model
    gen = torch.Generator().manual_seed(7)
    seqs = [torch.randint(3, cfg.vocab_size, (n,), generator=gen) for n in (21, 10, 8, 13)]
    with torch.no_grad():
        expected = [hf(s[None]).logits[0].float() for s in seqs]
    kv = MLAKVCache.allocate(cfg, 4 * 64, torch.float32, "cpu")
    # before the step: requests 0 and 2 hold all but their last token, request 3 its first 5
    net(
        torch.cat([seqs[0][:20], seqs[2][:7], seqs[3][:5]]), _step_ctx([(0, 0, 20), (2, 0, 7), (3, 0, 5)]), kv
    )
    parts = [(0, 20, 1), (1, 0, 10), (2, 7, 1), (3, 5, 8)]
    ids = torch.cat([seqs[0][20:], seqs[1], seqs[2][7:], seqs[3][5:]])
    seen = []
    decode, prefill = MLAttention._decode, MLAttention._prefill
    monkeypatch.setattr(
        MLAttention, "_decode", lambda m, *a: seen.append(("decode", a[2].host_q_lens)) or decode(m, *a)
    )
    monkeypatch.setattr(
        MLAttention, "_prefill", lambda m, *a: seen.append(("prefill", a[1].host_q_lens)) or prefill(m, *a)
    )
    out = net(ids, _step_ctx(parts), kv)
    assert set(seen) == {("decode", (1, 1)), ("prefill", (10, 8))}
    want = torch.cat([expected[0][20:], expected[1], expected[2][7:], expected[3][5:]])
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    seen.clear()  # without the host query lengths the whole step is decompressed: the same logits
    torch.testing.assert_close(
        net(ids, _step_ctx(parts, with_host_q_lens=False), kv), want, atol=1e-4, rtol=1e-4
    )
    assert set(seen) == {("prefill", None)}


@pytest.mark.parametrize("kind", ["default", *KINDS])
def test_triton_kernels_in_the_interpreter_give_the_same_logits(model, built, interpreter, kind):
    """Every op through its Triton kernel (interpreted on the CPU): MLA store (fused with the
    latent's norm and the rope, or not) and decode, the prefill kernel over the decompressed cache
    (q.k and v head dims apart), fused MoE, rope, rms norm."""
    cfg, _, _, hf, _ = model
    net = built[kind]
    assert use_triton(torch.empty(1))
    ids = torch.randint(3, cfg.vocab_size, (13,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(ids[None]).logits[0].float()
    kv = MLAKVCache.allocate(cfg, 32, torch.float32, "cpu")
    prefill = net(ids[:12], _ctx(list(range(12)), 12, False), kv)
    decode = net(ids[12:], _ctx([12], 13, True), kv)
    torch.testing.assert_close(prefill, expected[:12], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(decode, expected[12:], atol=1e-4, rtol=1e-4)


def test_small_batch_decode_takes_the_triton_mla_products_in_the_interpreter(
    model, built, interpreter, monkeypatch
):
    """At <= GEMV_MAX_ROWS decode rows the default build absorbs W_UK with `mla_absorb_q` and has
    the MLA merge apply W_UV (the unfused build: two bmm), with the same logits as HF."""
    import lightllm_async.models.deepseek as deepseek

    cfg, _, _, hf, _ = model
    calls = []

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls.append((name, kwargs.get("w_uv") is not None))
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(deepseek, "mla_absorb_q", counted("absorb", deepseek.mla_absorb_q))
    monkeypatch.setattr(deepseek, "mla_decode_attention", counted("attend", deepseek.mla_decode_attention))
    ids = torch.randint(3, cfg.vocab_size, (9,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = hf(ids[None]).logits[0, -1].float()
    for kind, want in (("default", {("absorb", False), ("attend", True)}), ("unfused", {("attend", False)})):
        calls.clear()
        kv = MLAKVCache.allocate(cfg, 32, torch.float32, "cpu")
        built[kind](ids[:8], _ctx(list(range(8)), 8, False), kv)
        calls.clear()  # the prefill's
        decode = built[kind](ids[8:], _ctx([8], 9, True), kv)
        assert set(calls) == want and len(calls) == cfg.num_layers * len(want)
        torch.testing.assert_close(decode[0], expected, atol=1e-4, rtol=1e-4)


def _moe_pair(cfg: ModelConfig, fused_max_tokens: int) -> tuple[MoE, MoE]:
    """An MoE layer with its shared experts as a separate MLP and the same one fused up to
    `fused_max_tokens`, as loaded."""
    unfused = MoE(cfg, 0, torch.float32, "cpu")
    fused = MoE(cfg, fused_max_tokens, torch.float32, "cpu")
    for name, p in unfused.named_parameters():
        p.normal_(std=cfg.hidden_size**-0.5)
        fused.get_parameter(name).data[: p.shape[0]].copy_(p)  # experts: the first E of E + s
    fused.finish_loading()
    return unfused, fused


@pytest.mark.parametrize("kernels", ["ref", "interpreter"])
@pytest.mark.parametrize("shape", ["deepseek-v2-tiny", "deepseek-v3-tiny"])
@pytest.mark.parametrize("fused_max_tokens", [ALWAYS, 7])
def test_fused_shared_experts_give_the_separate_mlp_output(
    shape, kernels, fused_max_tokens, request, monkeypatch
):
    """Irregular sizes and three shared experts (V2 greedy, unscaled; V3 noaux_tc, whose routed
    scaling factor 2.5 must not reach the shared part). Fused up to 7 tokens: 1 and 7 run one
    fused_moe pass, 8 and 33 the routed rows and the shared experts through views of theirs."""
    if kernels == "interpreter":
        request.getfixturevalue("interpreter")
    cfg = dataclasses.replace(
        shape_config(shape, "float32"), hidden_size=40, moe_intermediate_size=24, n_shared_experts=3
    )
    torch.manual_seed(3)
    unfused, fused = _moe_pair(cfg, fused_max_tokens)
    assert fused.shared is None and fused.experts.w13.shape == (cfg.n_routed_experts + 3, 48, 40)
    views = []  # the token counts that took the shared experts as an MLP through views
    add_shared = Experts.add_shared
    monkeypatch.setattr(
        Experts, "add_shared", lambda self, out, x: views.append(len(x)) or add_shared(self, out, x)
    )
    for tokens in (1, 7, 8, 33):
        x = torch.randn(tokens, cfg.hidden_size)
        assert rel_err(fused(x), unfused(x)) < 1e-5
    assert views == ([] if fused_max_tokens == ALWAYS else [8, 33])


def test_kv_pool_holds_latent_plus_rope_key_per_token_and_layer(model):
    cfg, _, runner, _, _ = model
    width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert len(runner.kv.kv) == cfg.num_layers
    assert all(t.shape == (runner.num_kv_tokens + 1, width) for t in runner.kv.kv)  # + the graph sink
    assert MLAKVCache.bytes_per_token(cfg, torch.float32) == cfg.num_layers * width * 4
    assert MLAKVCache.bytes_per_token(cfg, torch.bfloat16) == cfg.num_layers * width * 2


def _config_json(tmp_path, **changes) -> str:
    cfg = shape_config("deepseek-v3-tiny", "float32")
    d = {**cfg.to_hf_dict(), **changes}
    os.makedirs(tmp_path, exist_ok=True)
    with open(os.path.join(tmp_path, "config.json"), "w") as f:
        json.dump(d, f)
    return str(tmp_path)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"topk_method": "mystery"}, "topk_method 'mystery' is not supported"),
        ({"topk_method": "greedy"}, "topk_method 'greedy' is not supported"),  # V3 routes by noaux_tc only
        (
            {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
            "rope scaling 'dynamic' is not supported",
        ),
        ({"rope_scaling": {"rope_type": "yarn"}}, "yarn rope scaling lacks"),
        ({"n_group": 3}, "needs n_group dividing n_routed_experts"),
        ({"scoring_func": "softmax"}, "scoring_func 'softmax'"),
        ({"attention_bias": True}, "attention_bias is not supported"),
        ({"moe_layer_freq": 2}, "moe_layer_freq 2 is not supported"),
        ({"kv_lora_rank": 0}, "kv_lora_rank"),
        ({"quantization_config": {"quant_method": "fp8"}}, "quantized checkpoints ('fp8') are not supported"),
    ],
)
def test_unsupported_config_is_refused_at_load(tmp_path, changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_model_config(_config_json(tmp_path, **changes))


def test_v2_refuses_noaux_tc(tmp_path):
    d = shape_config("deepseek-v2-tiny", "float32").to_hf_dict()
    d.update(topk_method="noaux_tc", scoring_func="sigmoid", n_group=2, topk_group=1)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(d, f)
    with pytest.raises(ValueError, match="DeepseekV2ForCausalLM: topk_method 'noaux_tc' is not supported"):
        load_model_config(str(tmp_path))


def test_config_round_trips_through_config_json():
    for shape in ("deepseek-v2-tiny", "deepseek-v3-tiny", "deepseek-v2-lite", "deepseek-v3"):
        cfg = shape_config(shape, "bfloat16")
        assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


def test_softmax_scale_follows_yarn_mscale():
    v3 = shape_config("deepseek-v3", "bfloat16")  # factor 40, mscale_all_dim 1
    m = 0.1 * 1.0 * torch.log(torch.tensor(40.0)).item() + 1.0
    assert v3.mla_softmax_scale == pytest.approx(192**-0.5 * m * m)
    assert shape_config("deepseek-v3-tiny").mla_softmax_scale == pytest.approx(32**-0.5)  # no YaRN


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["v2-yarn-greedy", "v3-noaux-tc"])
def test_cuda_deepseek_equals_hf_transformers(gpu, tmp_path, name):
    """The Triton kernels end to end (CUDA graphs for decode included) against transformers."""
    cfg = _variant(name)
    path = write_model(cfg, str(tmp_path), seed=6, device="cuda")
    runner = model_runner(path, "cuda", kv_cache_tokens=2048, max_running_requests=4)  # float32, as HF
    assert runner.graphs is not None
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist() for n in (1, 13, 90)]
    for prompt, out in zip(
        prompts, generate(runner, prompts, NEW_TOKENS, max_num_batched_tokens=32), strict=True
    ):
        assert out == hf_greedy(hf, prompt, NEW_TOKENS)


@pytest.mark.gpu
def test_cuda_mla_prefill_layer_makes_no_host_sync(gpu):
    """A mixed step through one MLA layer (the contexts packed from the host lengths, the
    decompressed prefill) never waits for the device: the runner can launch ahead of it."""
    cfg = _variant("v3-noaux-tc")
    attn = MLAttention(cfg, torch.float32, "cuda")
    for p in attn.parameters():
        p.normal_(0, 0.1)
    attn.finish_loading()
    positions = [*range(5, 12), 0, 1, 2, 3]  # a chunk after 5 cached tokens, then a 4-token prompt
    table = torch.zeros((3, 64), dtype=torch.int32, device="cuda")
    table[2, :12], table[0, :4] = torch.arange(12), torch.arange(20, 24)
    ctx = ForwardContext(
        positions=torch.tensor(positions, device="cuda"),
        kv_slots=torch.tensor([*range(5, 12), 20, 21, 22, 23], device="cuda"),
        req_to_token=table,
        req_idx=torch.tensor([2, 0], dtype=torch.int32, device="cuda"),
        q_start=torch.tensor([0, 7, 11], dtype=torch.int32, device="cuda"),
        seq_lens=torch.tensor([12, 4], dtype=torch.int32, device="cuda"),
        logits_idx=torch.tensor([6, 10], device="cuda"),
        decode_only=False,
        host_seq_lens=(12, 4),
    )
    kv = torch.randn(32, MLAKVCache.width(cfg), device="cuda")
    x = torch.randn(len(positions), cfg.hidden_size, device="cuda")
    cos_sin = mla_rope_cache(cfg, "cuda")
    first = attn(x, ctx, cos_sin, kv.clone())  # compiles the kernels
    fresh = dataclasses.replace(ctx)  # a new step: its contexts not packed yet
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = attn(x, fresh, cos_sin, kv)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, first)


def _rows_ctx(parts: list[tuple[int, int]], row: int, device: str) -> ForwardContext:
    """A step of requests (cached tokens, new tokens), request b's cache rows at b * row + p."""
    positions = [p for cached, new in parts for p in range(cached, cached + new)]
    q_lens = [new for _, new in parts]
    decode_only = all(n == 1 for n in q_lens)

    def t(values, dtype=torch.int64):
        return torch.tensor(values, dtype=dtype, device=device)

    return ForwardContext(
        positions=t(positions),
        kv_slots=t([b * row + p for b, (c, n) in enumerate(parts) for p in range(c, c + n)]),
        req_to_token=t([[b * row + p for p in range(row)] for b in range(len(parts))], torch.int32),
        req_idx=t(range(len(parts)), torch.int32),
        q_start=t([0, *itertools.accumulate(q_lens)], torch.int32),
        seq_lens=t([c + n for c, n in parts], torch.int32),
        logits_idx=t(range(len(positions))),
        decode_only=decode_only,
        host_seq_lens=tuple(c + n for c, n in parts),
        host_q_lens=None if decode_only else tuple(q_lens),
    )


@pytest.mark.gpu
def test_cuda_fused_decode_layer_equals_unfused_at_v2_lite_shape(gpu):
    """Every decode fusion (merged projection, mla_kv_store, W_UV into o_proj's input, the
    router's one GEMM, the shared experts fused up to 8 tokens and through views above) against
    the layer without them, bfloat16 at DeepSeek-V2-Lite's shape (2 layers: dense, MoE), same
    weights and cache: decode steps of 1, 8, 9 and 64 requests, and a prefill step; the logits
    and the cache rows the step wrote agree to bf16 rounding."""
    cfg = dataclasses.replace(shape_config("deepseek-v2-lite", "bfloat16"), num_layers=2)
    nets = []
    for fusions in (Fusions(), Fusions.off()):
        net = DeepseekForCausalLM(cfg, torch.bfloat16, torch.device("cuda"), fusions=fusions)
        load_weights(net, random_weights(cfg, seed=4, dtype=torch.bfloat16, device="cuda"))
        nets.append(net.eval())
    assert nets[0].layers[1].mlp.gate.weight.dtype == torch.bfloat16  # the one-GEMM router
    row, g = 128, torch.Generator(device="cuda").manual_seed(0)
    for parts in ([(90, 1)], [(70, 1)] * 8, [(33, 1)] * 9, [(100, 1)] * 64, [(0, 37), (20, 50)]):
        kv = MLAKVCache.allocate(cfg, len(parts) * row, torch.bfloat16, "cuda")
        for pool in kv.kv:
            pool.normal_(generator=g)
        kvs = [kv, MLAKVCache([pool.clone() for pool in kv.kv])]
        ids = torch.randint(3, cfg.vocab_size, (sum(n for _, n in parts),), device="cuda", generator=g)
        ctx = _rows_ctx(parts, row, "cuda")
        fused, unfused = (net(ids, ctx, kv) for net, kv in zip(nets, kvs, strict=True))
        assert rel_err(fused, unfused) < 3e-2, parts
        assert (fused.argmax(-1) == unfused.argmax(-1)).float().mean() > 0.9, parts
        for a, b in zip(kvs[0].kv, kvs[1].kv, strict=True):
            assert rel_err(a[ctx.kv_slots], b[ctx.kv_slots]) < 1e-2, parts


@pytest.mark.gpu
def test_cuda_fused_decode_step_replays_in_a_cuda_graph(gpu):
    """The fused decode layer (the router's float32-output GEMM, W_UV's bmm into a strided out,
    mla_kv_store, the shared experts fused at 1 token and through views at 9) captured in a CUDA
    graph and replayed gives the eager step's logits and cache rows, bf16 at V2-Lite's shape (to
    bf16 rounding: cuBLAS may choose other algorithms in a capture)."""
    cfg = dataclasses.replace(shape_config("deepseek-v2-lite", "bfloat16"), num_layers=2)
    net = DeepseekForCausalLM(cfg, torch.bfloat16, torch.device("cuda"))
    load_weights(net, random_weights(cfg, seed=5, dtype=torch.bfloat16, device="cuda"))
    row, g = 128, torch.Generator(device="cuda").manual_seed(1)
    for parts in ([(90, 1)], [(33, 1)] * 9):
        kv = MLAKVCache.allocate(cfg, len(parts) * row, torch.bfloat16, "cuda")
        for pool in kv.kv:
            pool.normal_(generator=g)
        captured = MLAKVCache([pool.clone() for pool in kv.kv])
        ids = torch.randint(3, cfg.vocab_size, (len(parts),), device="cuda", generator=g)
        ctx = dataclasses.replace(_rows_ctx(parts, row, "cuda"), host_seq_lens=None)  # as in a graph
        eager = net(ids, ctx, kv)  # also compiles the kernels outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = net(ids, ctx, captured)
        graph.replay()
        assert rel_err(out, eager) < 1e-2
        for a, b in zip(kv.kv, captured.kv, strict=True):
            assert rel_err(a[ctx.kv_slots], b[ctx.kv_slots]) < 1e-2


def test_kv_sizing_reserves_the_mla_prefill_decompression():
    """The KV cache is sized after the activation reserve: for MLA that must hold the per-head k
    and k_nope|v of a whole chunked prompt's context, which grows with max_model_len."""
    from lightllm_async.runner.model_runner import activation_reserve

    m = shape_config("deepseek-v3", "bfloat16")
    short, long = (
        EngineConfig(model_path="x", max_num_batched_tokens=8192, max_model_len=n) for n in (4096, 8192)
    )
    per_token = m.num_heads * (2 * m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim) * 4
    assert activation_reserve(long, m) - activation_reserve(short, m) == 4096 * per_token
    assert activation_reserve(short, m) > (8192 + 4096) * per_token
