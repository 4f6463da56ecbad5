"""Kernel launches per decoder layer of a DeepSeek decode step, counted on the CPU.

The model runs with its Triton kernels (the interpreter on CPU tensors), inside a
TorchDispatchMode that counts every aten op that would launch a kernel on a GPU (views, empty
allocations and other metadata ops excluded) and a hook that counts each Triton launch (and hides
the interpreter's own torch ops). Counts are per layer kind: the dense first layer and an MoE
layer. The shape is DeepSeek-V2-Lite's with smaller matrices (hidden, intermediate sizes, vocab):
the launch sequence depends on the structure (heads, latent, rope, experts, top-k, shared
experts), not on the matrix sizes; `--full` keeps every dim (slow: interpreted GEMMs).

Counts are of aten ops at the dispatcher, so they approximate what a CUDA graph replays: a cuBLAS
call can launch more than one kernel (split-K), and an op may copy a non-contiguous input on CUDA
where the CPU does not.

    OMP_NUM_THREADS=1 PYTHONPATH=src python perf/ds_launch_count.py --batches 1,64
    LLA_DEEPSEEK_FUSE=none ... : the layer without its fusions (models/deepseek.Fusions), as before
"""

from __future__ import annotations

import os

os.environ.setdefault("LLA_KERNELS", "triton")  # before the kernels import triton (backend.py)

import argparse  # noqa: E402
import collections  # noqa: E402
import dataclasses  # noqa: E402

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from lightllm_async.kernels.backend import INTERPRETED, triton  # noqa: E402
from lightllm_async.models.deepseek import (  # noqa: E402
    DeepseekForCausalLM,
    Fusions,
    MLAKVCache,
    shared_fused_max_tokens,
)
from lightllm_async.models.llama import ForwardContext  # noqa: E402
from lightllm_async.models.weights import load_weights, random_weights  # noqa: E402
from lightllm_async.tools.make_random_model import shape_config  # noqa: E402

# aten ops that launch nothing on a GPU: views, allocations, metadata
NO_LAUNCH = {
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias",
    "lift_fresh", "_to_copy_noop", "size", "stride", "is_same_size", "_local_scalar_dense_noop",
    "resize_", "_unsafe_view",
}  # fmt: skip


class LaunchCounter(TorchDispatchMode):
    """Counts launches by (layer kind, op name) while `layer` names the running layer."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.layer = "other"
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd"):
            with self:  # linear, reshape, ...: count what they decompose into
                return func.decompose(*args, **kwargs)
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if not self.paused and not func.is_view and name not in NO_LAUNCH:
            # addbmm is one addmm per batch, on CUDA as on the CPU
            self.counts[self.layer][f"aten.{name}"] += args[1].shape[0] if name.startswith("addbmm") else 1
        return out


def hook_triton(counter: LaunchCounter) -> None:
    """Count each interpreted Triton launch once, and none of the torch ops the interpreter runs."""
    from triton.runtime.interpreter import InterpretedFunction

    run = InterpretedFunction.run

    def counted(self, *args, **kwargs):
        counter.counts[counter.layer][f"triton.{self.fn.__name__}"] += 1
        counter.paused += 1
        try:
            return run(self, *args, **kwargs)
        finally:
            counter.paused -= 1

    InterpretedFunction.run = counted


def small_v2_lite(full: bool, num_layers: int):
    """DeepSeek-V2-Lite's structure in `num_layers` layers (the first dense); without
    `full`, smaller hidden/intermediate/vocab sizes (the attention dims, experts and top-k kept)."""
    cfg = dataclasses.replace(shape_config("deepseek-v2-lite", "bfloat16"), num_layers=num_layers)
    if full:
        return cfg
    return dataclasses.replace(
        cfg, vocab_size=256, hidden_size=256, intermediate_size=192, moe_intermediate_size=64
    )


def decode_ctx(batch: int, context: int) -> ForwardContext:
    """A decode-only step of `batch` requests, request b's rows at b * (context + 1) + position."""
    row = context + 1
    table = (torch.arange(batch)[:, None] * row + torch.arange(row)[None, :]).to(torch.int32)
    return ForwardContext(
        positions=torch.full((batch,), context, dtype=torch.int64),
        kv_slots=torch.arange(batch, dtype=torch.int64) * row + context,
        req_to_token=table,
        req_idx=torch.arange(batch, dtype=torch.int32),
        q_start=torch.arange(batch + 1, dtype=torch.int32),
        seq_lens=torch.full((batch,), context + 1, dtype=torch.int32),
        logits_idx=torch.arange(batch, dtype=torch.int64),
        decode_only=True,
        host_seq_lens=(context + 1,) * batch,
    )


def count_step(model: DeepseekForCausalLM, batch: int, context: int) -> dict[str, collections.Counter]:
    cfg, dtype = model.cfg, model.embed.weight.dtype
    kv = MLAKVCache.allocate(cfg, batch * (context + 1), dtype, "cpu")
    for pool in kv.kv:
        pool.normal_()
    ids = torch.randint(0, cfg.vocab_size, (batch,))
    counter = LaunchCounter()
    hook_triton(counter)
    hooks = []
    for i, layer in enumerate(model.layers):
        kind = "dense" if i < cfg.first_k_dense_replace else "moe"
        hooks.append(layer.register_forward_pre_hook(lambda m, a, kind=kind: setattr(counter, "layer", kind)))
        hooks.append(layer.register_forward_hook(lambda m, a, o: setattr(counter, "layer", "other")))
    ctx = decode_ctx(batch, context)
    with counter:
        model(ids, ctx, kv)
    for h in hooks:
        h.remove()
    return counter.counts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--context", type=int, default=40)
    ap.add_argument("--dtype", default="bfloat16", help="bfloat16 as served (the router casts)")
    ap.add_argument("--full", action="store_true", help="every dim of V2-Lite (slow)")
    ap.add_argument("--verbose", action="store_true", help="the ops of each layer kind")
    args = ap.parse_args()
    assert INTERPRETED and triton is not None, "needs triton in interpreter mode (no GPU visible)"
    cfg = small_v2_lite(args.full, num_layers=2)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    fusions = Fusions.from_env()
    # the choices the model makes on CUDA: the shared experts fused at small steps; the router's
    # one GEMM has no CPU kernel (torch.mm with out_dtype), so it is counted as the CPU runs it and
    # taken off the MoE layer's count in the CUDA column
    fused_max = shared_fused_max_tokens(cfg, "cuda") if fusions.shared else 0
    router_gemm = fusions.router and dtype in (torch.bfloat16, torch.float16)
    model = DeepseekForCausalLM(cfg, dtype, torch.device("cpu"), fused_max, fusions=fusions)
    load_weights(model, random_weights(cfg, seed=0, dtype=dtype))
    fuse = os.environ.get("LLA_DEEPSEEK_FUSE", "all")
    print(f"LLA_DEEPSEEK_FUSE={fuse}; launches per layer of a decode step (27 layers: 1 dense + 26 MoE)")
    cols = ["batch", "dense layer", "MoE layer (CPU)", "MoE layer (CUDA)", "step (CUDA)"]
    print("".join(f"{c:>18}" for c in cols))
    for batch in (int(b) for b in args.batches.split(",")):
        counts = count_step(model, batch, args.context)
        dense, moe = (sum(counts[k].values()) for k in ("dense", "moe"))
        moe_cuda = moe - router_gemm
        step = dense + 26 * moe_cuda + sum(counts["other"].values())
        print("".join(f"{v:>18}" for v in (batch, dense, moe, moe_cuda, step)))
        if args.verbose:
            for kind in ("dense", "moe", "other"):
                print(f"  {kind}: " + ", ".join(f"{n} x{c}" for n, c in counts[kind].items()))


if __name__ == "__main__":
    main()
