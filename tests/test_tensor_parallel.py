"""Tensor parallelism, the model half (issue 13): a model sharded over two ranks (two processes,
gloo on the CPU, fp32) gives the logits and greedy tokens of the whole model, every rank the same
bits, through prefill, a mixed step (decodes beside a later prefill chunk) and decode-only steps.

Each rank loads the same full random checkpoint and keeps its shard. The variants cover grouped
KV heads, attention biases, tied embeddings and a vocabulary that two ranks cannot share evenly
(Llama/Qwen2), and MLA with shared + routed experts (DeepSeek V2 without q_lora_rank, its shared
experts apart and fused into the routed ones; V3 with q_lora_rank and an untied padded head).
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import os
import re
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightllm_async.config import EngineConfig, ModelConfig
from lightllm_async.layers.linear import ColumnParallelLinear, RowParallelLinear
from lightllm_async.layers.parallel import SINGLE, TPGroup
from lightllm_async.models.deepseek import MLAKVCache
from lightllm_async.models.llama import ForwardContext, KVCache, LlamaForCausalLM
from lightllm_async.models.weights import load_weights, random_weights
from lightllm_async.runner.model_runner import ModelRunner, model_family
from lightllm_async.tools.make_random_model import shape_config

WORLD = 2
SPAWN_TIMEOUT_S = 120
ROW = 64  # cache rows per request: request r's token at position p is in row r * ROW + p


def _variant(name: str) -> tuple[ModelConfig, dict]:
    """(config, extra model arguments) of a variant."""
    llama, v2 = shape_config("tiny", "float32"), shape_config("deepseek-v2-tiny", "float32")
    return {
        "llama": (llama, {}),
        "qwen2-bias-tied-vocab-509": (
            dataclasses.replace(
                llama,
                architecture="Qwen2ForCausalLM",
                attention_bias=True,
                tie_word_embeddings=True,
                vocab_size=509,
            ),
            {},
        ),
        "deepseek-v2": (v2, {}),
        "deepseek-v2-fused-shared": (v2, {"fuse_shared_experts": True}),
        "deepseek-v3-vocab-511": (
            dataclasses.replace(shape_config("deepseek-v3-tiny", "float32"), vocab_size=511),
            {},
        ),
    }[name]


VARIANTS = [
    "llama",
    "qwen2-bias-tied-vocab-509",
    "deepseek-v2",
    "deepseek-v2-fused-shared",
    "deepseek-v3-vocab-511",
]


def _ctx(parts: list[tuple[int, int, int]], device: str = "cpu") -> ForwardContext:
    """A step of requests (row, cached tokens, new tokens), logits for every new token; host
    lengths as the runner gives them (no query lengths in a decode-only step)."""
    positions = [p for _, cached, new in parts for p in range(cached, cached + new)]
    q_lens = [new for _, _, new in parts]
    decode_only = all(n == 1 for n in q_lens)

    def t(values, dtype=torch.int64) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=device)

    return ForwardContext(
        positions=t(positions),
        kv_slots=t([row * ROW + p for row, cached, new in parts for p in range(cached, cached + new)]),
        req_to_token=t([[row * ROW + p for p in range(ROW)] for row in range(4)], torch.int32),
        req_idx=t([row for row, _, _ in parts], torch.int32),
        q_start=t([0, *itertools.accumulate(q_lens)], torch.int32),
        seq_lens=t([cached + new for _, cached, new in parts], torch.int32),
        logits_idx=t(range(len(positions))),
        decode_only=decode_only,
        host_seq_lens=tuple(cached + new for _, cached, new in parts),
        host_q_lens=None if decode_only else tuple(q_lens),
    )


def build(name: str, tp: TPGroup, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(model, KV cache of 4 requests) of variant `name` for `tp`: every rank loads the same full
    random checkpoint (made on the CPU) and keeps its shard."""
    cfg, extra = _variant(name)
    model_cls, kv_cls = model_family(cfg)
    model = model_cls(cfg, dtype, torch.device(device), tp=tp, **extra)
    load_weights(model, random_weights(cfg, seed=13, dtype=dtype))
    return model, kv_cls.allocate(cfg, 4 * ROW, dtype, device, tp=tp)


# three requests: a prefill (request 2 its first chunk); decodes beside request 2's second chunk;
# then three decode-only steps
STEPS = [[(0, 0, 11), (1, 0, 1), (2, 0, 5)], [(0, 11, 1), (1, 1, 1), (2, 5, 7)]]
STEPS += [[(0, 12 + k, 1), (1, 2 + k, 1), (2, 12 + k, 1)] for k in range(3)]


def run_steps(
    name: str, tp: TPGroup, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[list[torch.Tensor], list[list[int]]]:
    """`STEPS` through the model of `name` built for `tp`, each decode fed the greedy token of
    the step before: (logits of every step on the CPU, greedy tokens of every step)."""
    model, kv = build(name, tp, device, dtype)
    vocab = model.cfg.vocab_size
    prompts = [torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(n)) for n in (11, 1, 12)]
    logits, greedy, last = [], [], [None, None, None]
    for parts in STEPS:
        ids = [prompts[r][c : c + n] if last[r] is None else last[r] for r, c, n in parts]
        out = model(torch.cat(ids).to(device), _ctx(parts, device), kv).cpu()  # [T, V]
        ends = list(itertools.accumulate(n for _, _, n in parts))
        tokens = [int(out[end - 1].argmax()) for end in ends]
        for (r, c, n), token in zip(parts, tokens, strict=True):
            if c + n >= len(prompts[r]):  # the prompt is in: sample from here on
                last[r] = torch.tensor([token])
        logits.append(out)
        greedy.append(tokens)
    return logits, greedy


def column_then_row_with_biases(tp: TPGroup) -> torch.Tensor:
    """A column-parallel then a row-parallel linear, both with biases (no model here has a
    row-parallel one), each rank keeping the shards their `tp_dims` name: [5, 10] -> [5, 6]."""
    g = torch.Generator().manual_seed(3)
    full = {
        "col.weight": torch.randn(24, 10, generator=g),
        "col.bias": torch.randn(24, generator=g),
        "row.weight": torch.randn(6, 24, generator=g),
        "row.bias": torch.randn(6, generator=g),
    }
    layers = {
        "col": ColumnParallelLinear(10, 24, True, torch.float32, "cpu", tp),
        "row": RowParallelLinear(24, 6, True, torch.float32, "cpu", tp),
    }
    for name, tensor in full.items():
        owner, attr = name.split(".")
        dim = layers[owner].tp_dims.get(attr)
        getattr(layers[owner], attr).data.copy_(tensor if dim is None else tp.shard(tensor, dim))
    return layers["row"](layers["col"](torch.randn(5, 10, generator=g)))


def _rank_main(rank: int, rendezvous: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo on 127.0.0.1, whatever the hostname
    dist.init_process_group(
        "gloo",
        init_method=f"file://{rendezvous}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=SPAWN_TIMEOUT_S),
    )
    try:
        tp = TPGroup(rank, WORLD, dist.group.WORLD)
        results = {name: run_steps(name, tp) for name in VARIANTS}
        results["column-then-row"] = column_then_row_with_biases(tp)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Every variant's steps on each of the two ranks, run in two processes."""
    out = tmp_path_factory.mktemp("tp")
    context = mp.start_processes(
        _rank_main, args=(str(out / "rendezvous"), str(out)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    try:
        while not context.join(timeout=1):
            assert time.monotonic() < deadline, "the ranks did not finish"
    finally:
        for p in context.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("name", VARIANTS)
def test_two_ranks_give_the_single_rank_logits_and_greedy_tokens(ranks, name):
    want_logits, want_tokens = run_steps(name, SINGLE)
    got_logits, got_tokens = ranks[0][name]
    assert got_tokens == want_tokens
    for got, want in zip(got_logits, want_logits, strict=True):
        assert got.shape == want.shape  # [T, V]: the whole vocabulary, the padding dropped
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("name", VARIANTS)
def test_every_rank_gets_the_same_logits_bits(ranks, name):
    (logits0, tokens0), (logits1, tokens1) = ranks[0][name], ranks[1][name]
    assert tokens0 == tokens1
    assert all(torch.equal(a, b) for a, b in zip(logits0, logits1, strict=True))


def test_row_parallel_bias_is_added_once_after_the_sum(ranks):
    want = column_then_row_with_biases(SINGLE)
    for rank in ranks:
        torch.testing.assert_close(rank["column-then-row"], want, rtol=1e-5, atol=1e-5)


def test_split_gives_a_rank_its_share_or_names_what_does_not_divide():
    assert TPGroup(1, 4).split(8, "num_heads") == 2
    assert SINGLE.split(7, "num_heads") == 7
    with pytest.raises(
        ValueError, match=re.escape("num_kv_heads (6) is not divisible by the tensor-parallel size 4")
    ):
        TPGroup(0, 4).split(6, "num_kv_heads")


@pytest.mark.parametrize(
    "shape, changes, size, what",
    [
        ("tiny", {"num_kv_heads": 1}, 2, "num_kv_heads (1)"),  # no KV-head replication
        ("tiny", {}, 3, "num_heads (4)"),
        ("tiny", {"num_kv_heads": 4, "intermediate_size": 150}, 4, "intermediate_size (150)"),
        ("deepseek-v3-tiny", {}, 3, "num_heads (4)"),
        ("deepseek-v3-tiny", {"moe_intermediate_size": 30}, 4, "moe_intermediate_size (30)"),
    ],
)
def test_a_shape_the_ranks_cannot_share_evenly_is_refused(shape, changes, size, what):
    cfg = dataclasses.replace(shape_config(shape, "float32"), **changes)
    model_cls, kv_cls = model_family(cfg)
    with pytest.raises(
        ValueError, match=re.escape(f"{what} is not divisible by the tensor-parallel size {size}")
    ):
        model_cls(cfg, torch.float32, torch.device("cpu"), tp=TPGroup(0, size))
    if shape == "tiny" and "num_kv_heads" in what:
        with pytest.raises(ValueError, match="num_kv_heads"):
            kv_cls.allocate(cfg, 8, torch.float32, "cpu", tp=TPGroup(0, size))


def test_each_rank_loads_its_rows_of_every_split_tensor():
    """Rank 1 of 2: its rows of each q/k/v part (biases too) and of gate/up, its columns of o_proj
    and down, its half of the vocabulary (254 of 509 tokens and a zero padding row); the norms whole."""
    cfg, _ = _variant("qwen2-bias-tied-vocab-509")
    full = dict(random_weights(cfg, seed=1, dtype=torch.float32))
    model = LlamaForCausalLM(cfg, torch.float32, torch.device("cpu"), tp=TPGroup(1, 2))
    load_weights(model, full.items())
    layer = model.layers[1]

    def hf(name: str) -> torch.Tensor:
        return full[f"model.layers.1.{name}"]

    def rows(t: torch.Tensor) -> torch.Tensor:
        return t[t.shape[0] // 2 :]

    assert torch.equal(
        layer.attn.qkv.weight, torch.cat([rows(hf(f"self_attn.{p}_proj.weight")) for p in "qkv"])
    )
    assert torch.equal(layer.attn.qkv.bias, torch.cat([rows(hf(f"self_attn.{p}_proj.bias")) for p in "qkv"]))
    assert torch.equal(layer.attn.o_proj.weight, hf("self_attn.o_proj.weight")[:, 32:])  # 2 heads of 16
    gate_up = [rows(hf("mlp.gate_proj.weight")), rows(hf("mlp.up_proj.weight"))]
    assert torch.equal(layer.mlp.gate_up.weight, torch.cat(gate_up))
    assert torch.equal(layer.mlp.down.weight, hf("mlp.down_proj.weight")[:, 80:])
    assert torch.equal(layer.input_norm.weight, hf("input_layernorm.weight"))
    embed = full["model.embed_tokens.weight"]
    assert model.embed.weight.shape == (255, cfg.hidden_size) and model.embed.start == 255
    assert torch.equal(model.embed.weight[:254], embed[255:])
    assert not model.embed.weight[254:].any()
    assert model.lm_head is None  # tied: the head projects onto the same rows


def test_kv_cache_bytes_per_rank():
    """A rank caches its own KV heads; MLA's latent is whole on every rank."""
    llama, v3 = shape_config("tiny", "float32"), shape_config("deepseek-v3-tiny", "float32")
    two = TPGroup(0, 2)
    assert KVCache.bytes_per_token(llama, torch.float32, two) * 2 == KVCache.bytes_per_token(
        llama, torch.float32
    )
    assert KVCache.allocate(llama, 8, torch.float32, "cpu", tp=two).k[0].shape == (8, 1, llama.head_dim)
    assert MLAKVCache.bytes_per_token(v3, torch.float32, two) == MLAKVCache.bytes_per_token(v3, torch.float32)
    assert MLAKVCache.allocate(v3, 8, torch.float32, "cpu", tp=two).kv[0].shape == (8, MLAKVCache.width(v3))


def test_model_runner_builds_its_rank_of_model_and_cache(tiny_llama_path):
    """No step runs (that would wait for the other rank): the runner's model and cache are the
    rank's shards."""
    cfg = EngineConfig(
        model_path=tiny_llama_path, device="cpu", dtype="float32", max_model_len=64, kv_cache_tokens=256
    )
    runner = ModelRunner(cfg, tp=TPGroup(1, 2))
    assert runner.model.tp == TPGroup(1, 2)
    assert runner.kv.k[0].shape == (257, 1, runner.model_cfg.head_dim)  # + the graph sink slot
    assert runner.model.layers[0].attn.num_heads == runner.model_cfg.num_heads // 2
