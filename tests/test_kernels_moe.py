"""Routed-expert MoE: the block alignment, the fused grouped GEMMs and the routing kernel against their
references (in the Triton interpreter on CPU tensors at small irregular sizes, compiled on CUDA at the
DeepSeek-V2-Lite and V3 shapes, marked gpu), and the routing against transformers' DeepSeek-V2 and V3
gates.

Tolerances (relative error in norm, kernels.testing.TOLERANCE): 1e-4 in float32, where kernel and
reference differ in summation order only; 1e-2 in bfloat16, where the kernel rounds each pair's down
projection to bf16 before the top-k sum while the reference sums in float32."""

import importlib

import pytest
import torch

from lightllm_async.kernels import (
    MoeConfig,
    fused_moe,
    fused_moe_ref,
    moe_align_block_size,
    moe_align_block_size_ref,
    select_experts,
    select_experts_ref,
)
from lightllm_async.kernels.moe_routing import MAX_PARTS, router_logits_parts, router_logits_parts_ref
from lightllm_async.kernels.testing import TOLERANCE, nan_filled_allocations, rel_err


def random_routing(num_tokens, num_experts, top_k, device, experts=None):
    """Distinct experts per token drawn from `experts` (default: all), random positive weights."""
    pool = torch.arange(num_experts) if experts is None else torch.tensor(experts)
    picks = torch.rand(num_tokens, len(pool)).argsort(dim=-1)[:, :top_k]
    topk_ids = pool[picks].to(device)
    topk_weights = torch.rand(num_tokens, top_k, device=device)
    return topk_weights, topk_ids


def check_alignment(topk_ids, num_experts, block_m, aligned):
    """The contract of moe_align_block_size, checked directly: every pair once, in its expert's
    group, groups in expert order and padded to whole blocks, each block tagged with its expert."""
    sorted_ids, expert_ids, num_padded = (t.cpu() for t in aligned)
    flat = topk_ids.flatten().cpu().long()
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    assert int(num_padded) == int(padded.sum())
    start = 0
    for e in range(num_experts):
        group = sorted_ids[start : start + padded[e]].long()
        pairs, pad = group[: counts[e]], group[counts[e] :]
        assert torch.equal(pairs, torch.nonzero(flat == e).flatten())  # in pair order
        assert (pad == flat.numel()).all()
        assert (expert_ids[start // block_m : (start + padded[e]) // block_m] == e).all()
        start += int(padded[e])


@pytest.mark.parametrize("block_m", [1, 16, 64])
@pytest.mark.parametrize(
    "num_tokens, num_experts, top_k, experts",
    [
        (1, 8, 2, None),
        (33, 8, 3, None),
        (7, 8, 2, [0, 5]),  # most experts idle, two crowded
        (100, 16, 3, None),  # pairs in several chunks of the interpreter's kernel (64)
        (70, 20, 1, [19]),  # every token on the last expert (blocks in two chunks); E not a power of 2
    ],
)
def test_moe_align_groups_pairs_by_expert_in_interpreter(
    interpreter, num_tokens, num_experts, top_k, experts, block_m
):
    _, topk_ids = random_routing(num_tokens, num_experts, top_k, "cpu", experts)
    for ids in (topk_ids, topk_ids.to(torch.int32)):
        aligned = moe_align_block_size(ids, num_experts, block_m)
        check_alignment(ids, num_experts, block_m, aligned)
        check_alignment(ids, num_experts, block_m, moe_align_block_size_ref(ids, num_experts, block_m))


def check_fused_moe(
    num_tokens, hidden, inter, num_experts, top_k, dtype, device, experts=None, config=None, direct=None
):
    x = torch.randn(num_tokens, hidden, dtype=dtype, device=device)
    # in place: at the V3 shape a temporary copy would be another 15 GB
    w13 = torch.randn(num_experts, 2 * inter, hidden, dtype=dtype, device=device).div_(hidden**0.5)
    w2 = torch.randn(num_experts, hidden, inter, dtype=dtype, device=device).div_(inter**0.5)
    topk_weights, topk_ids = random_routing(num_tokens, num_experts, top_k, device, experts)
    with nan_filled_allocations():
        out = fused_moe(x, w13, w2, topk_weights, topk_ids, config, direct=direct)
    ref = fused_moe_ref(x, w13, w2, topk_weights, topk_ids)
    assert out.shape == x.shape and out.dtype == dtype and not out.isnan().any()
    assert rel_err(out, ref) < TOLERANCE[dtype]
    return x, w13, w2, topk_weights, topk_ids, out


@pytest.mark.parametrize("top_k", [2, 3])
@pytest.mark.parametrize("num_tokens", [1, 7, 33])
def test_fused_moe_matches_reference_in_interpreter(interpreter, num_tokens, top_k):
    check_fused_moe(num_tokens, 64, 48, 8, top_k, torch.float32, "cpu")


@pytest.mark.parametrize(
    "config",
    [
        MoeConfig(16, 16, 16, group_m=2),  # several column blocks and row groups, K in three steps
        MoeConfig(32, 64, 64, group_m=1),  # tiles wider than I and hidden
    ],
)
def test_fused_moe_is_right_for_any_tiles_in_interpreter(interpreter, config):
    check_fused_moe(33, 40, 24, 8, 3, torch.float32, "cpu", config=config)


@pytest.mark.parametrize("num_tokens, top_k, experts", [(1, 3, None), (7, 2, None), (5, 2, [2, 6])])
def test_fused_moe_direct_launch_in_interpreter(interpreter, num_tokens, top_k, experts):
    """The GEMMs launched without the alignment kernel, a row block per pair (the default at one
    token), forced here at more tokens too, with experts shared between tokens: the same sums as
    the aligned launch."""
    x, w13, w2, weights, ids, out = check_fused_moe(
        num_tokens, 64, 48, 8, top_k, torch.float32, "cpu", experts=experts, direct=True
    )
    assert rel_err(out, fused_moe(x, w13, w2, weights, ids, direct=False)) < 1e-5


def test_fused_moe_launches_direct_by_default_at_one_token(interpreter, monkeypatch):
    """One token: no alignment kernel; two tokens: aligned."""
    module = importlib.import_module("lightllm_async.kernels.fused_moe")  # the package exports the function
    aligned = []
    real = module.moe_align_block_size
    monkeypatch.setattr(
        module, "moe_align_block_size", lambda ids, *a: aligned.append(ids.shape[0]) or real(ids, *a)
    )
    for num_tokens in (1, 2):
        check_fused_moe(num_tokens, 64, 48, 8, 3, torch.float32, "cpu")
    assert aligned == [2]


def test_fused_moe_with_crowded_and_idle_experts_in_interpreter(interpreter):
    check_fused_moe(33, 64, 48, 8, 2, torch.float32, "cpu", experts=[2, 7])


def test_fused_moe_of_one_expert_is_its_mlp(interpreter):
    """k = 1 with weight 1 on one expert: the plain gate/up/down MLP, independently of the reference."""
    x, w13, w2 = torch.randn(7, 64), torch.randn(4, 96, 64) / 8, torch.randn(4, 64, 48) / 7
    ids = torch.full((7, 1), 3)
    out = fused_moe(x, w13, w2, torch.ones(7, 1), ids)
    gate, up = (x @ w13[3].T).chunk(2, dim=-1)
    assert rel_err(out, (torch.nn.functional.silu(gate) * up) @ w2[3].T) < 1e-4


def test_fused_moe_matches_transformers_deepseek_experts(interpreter):
    """w13 and w2 are laid out as transformers' fused expert weights (gate rows, then up rows)."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts

    cfg = DeepseekV3Config(
        n_routed_experts=8, num_experts_per_tok=3, hidden_size=64, moe_intermediate_size=48
    )
    experts = DeepseekV3Experts(cfg)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(experts.down_proj, std=0.1)
    x = torch.randn(7, 64)
    topk_weights, topk_ids = random_routing(7, 8, 3, "cpu")
    with torch.no_grad():
        hf = experts(x, topk_ids, topk_weights)
    out = fused_moe(x, experts.gate_up_proj.detach(), experts.down_proj.detach(), topk_weights, topk_ids)
    assert rel_err(out, hf) < 1e-4


def hf_router(version, num_experts, top_k, hidden, **config):
    """transformers' own DeepSeek gate with random weights (and random correction bias for V3)."""
    if version == 2:
        from transformers import DeepseekV2Config
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter as Router

        cfg = DeepseekV2Config(
            n_routed_experts=num_experts, num_experts_per_tok=top_k, hidden_size=hidden, **config
        )
    else:
        from transformers import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter as Router

        cfg = DeepseekV3Config(
            n_routed_experts=num_experts, num_experts_per_tok=top_k, hidden_size=hidden, **config
        )
    router = Router(cfg)
    torch.nn.init.normal_(router.weight, std=hidden**-0.5)
    if version == 3:
        router.e_score_correction_bias.normal_(std=0.3)  # large enough to change the choice
    return router


def sort_by_expert(weights, ids):
    ids, order = ids.sort(dim=-1)
    return weights.gather(1, order), ids


@pytest.mark.parametrize("kernels", ["ref", "interpreter"])
@pytest.mark.parametrize(
    "version, config",
    [
        (2, dict(topk_method="greedy", routed_scaling_factor=1.0)),
        (2, dict(topk_method="greedy", routed_scaling_factor=16.0)),
        (2, dict(topk_method="group_limited_greedy", n_group=8, topk_group=3, routed_scaling_factor=16.0)),
        (3, dict(n_group=8, topk_group=4, norm_topk_prob=True, routed_scaling_factor=2.5)),
        (3, dict(n_group=4, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0)),
    ],
)
def test_select_experts_matches_transformers_deepseek_gates(version, config, kernels, request):
    if kernels == "interpreter":
        request.getfixturevalue("interpreter")
    num_experts, top_k, hidden = 64, 6, 32
    router = hf_router(version, num_experts, top_k, hidden, **config)
    hidden_states = torch.randn(57, hidden)
    with torch.no_grad():
        logits, hf_weights, hf_ids = router(hidden_states)
    weights, ids = select_experts(
        logits,
        top_k,
        config.get("topk_method", "noaux_tc"),
        config.get("n_group"),
        config.get("topk_group"),
        config.get("norm_topk_prob", False),
        config["routed_scaling_factor"],
        router.e_score_correction_bias if version == 3 else None,
    )
    assert weights.dtype == torch.float32 and ids.shape == (57, top_k)
    weights, ids = sort_by_expert(weights, ids.long())
    hf_weights, hf_ids = sort_by_expert(hf_weights, hf_ids)
    assert torch.equal(ids, hf_ids)
    torch.testing.assert_close(weights, hf_weights, rtol=1e-6, atol=1e-7)


def test_noaux_tc_chooses_by_biased_scores_and_weights_by_unbiased():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    bias = torch.tensor([10.0, 0.0, 0.0, 0.0])  # expert 0 is chosen only through its bias
    weights, ids = select_experts(logits, 2, "noaux_tc", 1, 1, False, 1.0, bias)
    weights, ids = sort_by_expert(weights, ids)
    assert ids.tolist() == [[0, 3]]
    torch.testing.assert_close(weights, logits.sigmoid()[:, [0, 3]])


def test_select_experts_refuses_an_unknown_method():
    with pytest.raises(ValueError, match="topk_method"):
        select_experts(torch.randn(3, 8), 2, "sinkhorn")


def check_routing(logits, top_k, method, n_group, topk_group, norm, scaling, bias, num_shared):
    """The kernel against the reference: the same set of experts per row (in any order), the same
    weight for each, and the shared experts last in order with weight exactly 1."""
    args = (logits, top_k, method, n_group, topk_group, norm, scaling, bias, num_shared)
    with nan_filled_allocations():
        weights, ids = select_experts(*args)
    ref_weights, ref_ids = select_experts_ref(*args)
    num_tokens, num_experts = logits.shape
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert ids.shape == weights.shape == (num_tokens, top_k + num_shared)
    assert ids.is_contiguous() and weights.is_contiguous()
    shared = torch.arange(num_experts, num_experts + num_shared, device=ids.device)
    assert torch.equal(ids[:, top_k:].long(), shared.expand(num_tokens, -1))
    assert torch.equal(weights[:, top_k:], torch.ones_like(weights[:, top_k:]))
    weights, ids = sort_by_expert(weights, ids.long())
    ref_weights, ref_ids = sort_by_expert(ref_weights, ref_ids)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-7)


def random_logits(num_tokens, num_experts, device, seed):
    """Router logits and a correction bias large enough to change noaux_tc's choice. Seeded: an
    exact tie, or a near one that the two computations' last bits order differently, would fail."""
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=gen, device=device)
    return logits, 0.3 * torch.randn(num_experts, generator=gen, device=device)


ROUTINGS = {  # name: (experts, top_k, method, n_group, topk_group)
    "v2-lite-greedy": (64, 6, "greedy", None, None),
    "v2-group-limited": (64, 6, "group_limited_greedy", 8, 3),
    "v3-noaux-tc": (256, 8, "noaux_tc", 8, 4),
    "odd-noaux-tc": (12, 3, "noaux_tc", 4, 2),  # groups of 3: padded lanes in every group
    "odd-group-limited": (12, 3, "group_limited_greedy", 4, 2),
}


@pytest.mark.parametrize("norm, scaling, num_shared", [(False, 1.0, 0), (True, 2.5, 1), (False, 16.0, 2)])
@pytest.mark.parametrize("num_tokens", [1, 7, 33])
@pytest.mark.parametrize("routing", ROUTINGS)
def test_routing_kernel_matches_reference_in_interpreter(
    interpreter, routing, num_tokens, norm, scaling, num_shared
):
    num_experts, top_k, method, n_group, topk_group = ROUTINGS[routing]
    logits, bias = random_logits(num_tokens, num_experts, "cpu", seed=num_tokens)
    bias = bias if method == "noaux_tc" else None
    check_routing(logits, top_k, method, n_group, topk_group, norm, scaling, bias, num_shared)


@pytest.mark.parametrize("routing", ROUTINGS)
def test_routing_kernel_breaks_ties_by_the_lowest_expert(interpreter, routing):
    """All choices equal: the lowest groups, then the lowest experts, in order."""
    num_experts, top_k, method, n_group, topk_group = ROUTINGS[routing]
    bias = torch.zeros(num_experts) if method == "noaux_tc" else None
    weights, ids = select_experts(
        torch.zeros(3, num_experts), top_k, method, n_group, topk_group, False, 1.0, bias
    )
    assert torch.equal(ids, torch.arange(top_k, dtype=torch.int32).expand(3, -1))
    score = 0.5 if method == "noaux_tc" else 1 / num_experts
    torch.testing.assert_close(weights, torch.full((3, top_k), score))


def test_routing_kernel_reads_strided_half_precision_logits(interpreter):
    # distinct values (k/8, exact in bf16): random bf16 logits tie often, and a tie may pick either
    order = torch.stack([torch.randperm(64, generator=torch.Generator().manual_seed(i)) for i in range(14)])
    logits = (order.float() / 8 - 4).bfloat16().view(7, 2, 64)[:, 0]  # rows 128 apart
    assert logits.stride(0) == 128
    check_routing(logits, 6, "greedy", None, None, True, 1.0, None, 2)


def check_router_parts(num_tokens, hidden, num_experts, dtype, device):
    """The partial logits sum to x @ W^T in float32, each part equals its hidden slice's product,
    and select_experts chooses from the parts as from their sum."""
    x = torch.randn(num_tokens, hidden + 5, dtype=dtype, device=device)[:, :hidden]  # strided rows
    weight = torch.randn(num_experts, hidden, dtype=dtype, device=device) / hidden**0.5
    with nan_filled_allocations():
        parts = router_logits_parts(x, weight)
    assert parts.dtype == torch.float32 and parts.shape[1:] == (num_tokens, num_experts)
    assert 1 <= parts.shape[0] <= MAX_PARTS
    split = -(-hidden // parts.shape[0])
    split = -(-split // 32) * 32 if device == "cpu" else -(-split // 128) * 128  # whole tiles
    ref = router_logits_parts_ref(x, weight, parts.shape[0], split)
    torch.testing.assert_close(parts, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parts.sum(0), x.float() @ weight.float().T, rtol=1e-4, atol=1e-4)
    logits = parts.sum(0)
    for method, n_group, topk_group in (("greedy", None, None), ("group_limited_greedy", 4, 2)):
        got = select_experts(parts, 3, method, n_group, topk_group, True, 1.5, None, 1)
        want = select_experts(logits, 3, method, n_group, topk_group, True, 1.5, None, 1)
        assert torch.equal(sort_by_expert(*got)[1], sort_by_expert(*want)[1])
        torch.testing.assert_close(sort_by_expert(*got)[0], sort_by_expert(*want)[0])


@pytest.mark.parametrize("num_tokens", [1, 6, 17])  # 17: a second tile of 16 rows
@pytest.mark.parametrize("hidden", [200, 1000])  # 7 parts of 32, then 16 parts of 64 (two tiles each)
def test_router_logits_parts_sum_to_the_logits_in_interpreter(interpreter, num_tokens, hidden):
    check_router_parts(num_tokens, hidden, 20, torch.float32, "cpu")  # 20 experts: two blocks of 16


def test_router_logits_parts_reference_path():
    check_router_parts(5, 200, 12, torch.float32, "cpu")


V2_LITE = dict(hidden=2048, inter=1408, num_experts=64, top_k=6)
V3 = dict(hidden=7168, inter=2048, num_experts=256, top_k=8)


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 7, 64, 257, 2048])
def test_fused_moe_matches_reference_at_v2_lite_shape_on_gpu(gpu, num_tokens):
    check_fused_moe(num_tokens, **V2_LITE, dtype=torch.bfloat16, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 3])
def test_fused_moe_direct_launch_at_v2_lite_shape_on_gpu(gpu, num_tokens):
    """The launch without alignment against the reference and the aligned launch, the 2 shared
    experts appended as V2-Lite's decode appends them (8 pairs a token)."""
    shape = dict(V2_LITE, top_k=8, num_experts=66)
    x, w13, w2, weights, ids, out = check_fused_moe(
        num_tokens, **shape, dtype=torch.bfloat16, device="cuda", direct=True
    )
    assert rel_err(out, fused_moe(x, w13, w2, weights, ids, direct=False)) < TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
def test_fused_moe_matches_reference_at_v3_shape_on_gpu(gpu):
    for num_tokens in (1, 5, 33):  # 22.5 GB of expert weights each time
        check_fused_moe(num_tokens, **V3, dtype=torch.bfloat16, device="cuda")
        torch.cuda.empty_cache()


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [V2_LITE, V3])
def test_router_logits_parts_match_reference_on_gpu(gpu, shape):
    for num_tokens in (1, 3, 8, 19):
        check_router_parts(num_tokens, shape["hidden"], shape["num_experts"], torch.bfloat16, "cuda")


@pytest.mark.gpu
def test_moe_align_matches_its_contract_on_gpu(gpu):
    for num_tokens, top_k, experts in ((1, 8, 256), (4099, 6, 64), (8192, 8, 256)):
        _, topk_ids = random_routing(num_tokens, experts, top_k, "cuda")
        for block_m in (16, 64):
            check_alignment(topk_ids, experts, block_m, moe_align_block_size(topk_ids, experts, block_m))


@pytest.mark.gpu
@pytest.mark.parametrize("routing, num_shared", [("v3-noaux-tc", 1), ("v2-lite-greedy", 2)])
def test_routing_kernel_matches_reference_on_gpu(gpu, routing, num_shared):
    num_experts, top_k, method, n_group, topk_group = ROUTINGS[routing]
    for num_tokens in (1, 2, 7, 64, 257, 512):
        logits, bias = random_logits(num_tokens, num_experts, "cuda", seed=num_tokens)
        check_routing(logits, top_k, method, n_group, topk_group, True, 2.5, bias, num_shared)


@pytest.mark.gpu
def test_routing_and_fused_moe_replay_in_a_cuda_graph(gpu):
    """Capture fails on a host sync, so this also proves routing and alignment never sync."""
    hidden, inter, num_experts, top_k = 1024, 256, 64, 6
    x = torch.randn(16, hidden, dtype=torch.bfloat16, device="cuda")
    logits = torch.randn(16, num_experts, device="cuda")
    bias = torch.randn(num_experts, device="cuda") * 0.1
    w13 = torch.randn(num_experts, 2 * inter, hidden, dtype=torch.bfloat16, device="cuda") / 32
    w2 = torch.randn(num_experts, hidden, inter, dtype=torch.bfloat16, device="cuda") / 16

    def step():
        weights, ids = select_experts(logits, top_k, "noaux_tc", 8, 4, True, 2.5, bias)
        return fused_moe(x, w13, w2, weights, ids), weights, ids

    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        step()  # compile outside the capture
    side.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, weights, ids = step()
    for _ in range(2):
        logits.normal_()
        x.normal_()
        graph.replay()
        assert rel_err(out, fused_moe_ref(x, w13, w2, weights, ids)) < TOLERANCE[torch.bfloat16]
