"""Compile the DeepSeek kernels for Hopper (sm_90a) on a machine without a GPU, and print what each
launch config costs: registers per thread, local-memory stack (spills), shared memory, and whether
the products became tensor-core instructions (mma.sync, or wgmma from 64-row tiles).

    python perf/sm90_compile_check.py [mla|moe|allreduce|skinny|prefill|fp8]

The interpreter tests prove the arithmetic; this proves the kernels also compile for the card at
the real shapes and shows which configs spill. It uses Triton's compiler directly (ASTSource with
the divisibility-by-16 hints that a real launch gives pointers and strides), and the cuobjdump that
ships with Triton's NVIDIA backend; written against Triton 3.9, and runs under 3.6 too.

The card runs Triton 3.6, whose counts differ: the 16-head MLA split kernel takes 234-254
registers there against 200-201 here (2026-12-01), the float8 decode launch 255 with no spill
against 255 and a 664-byte spill here. For the card's figures, compile with its version:

    python -m venv --system-site-packages /tmp/t36 && /tmp/t36/bin/pip install triton==3.6.0
    /tmp/t36/bin/python perf/sm90_compile_check.py mla
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
import triton  # noqa: E402  before the kernels, so that kernels.backend keeps the compiler
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
M, F, A, S = (
    importlib.import_module(f"lightllm_async.kernels.{name}")
    for name in ("mla_decode_attention", "fused_moe", "moe_align", "mla_store_kv")
)
AR = importlib.import_module("lightllm_async.kernels.allreduce_norm")
SK = importlib.import_module("lightllm_async.kernels.skinny_linear")

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
ALIGNED_INTS = {"N_OUT", "K", "num_heads"}  # besides strides: multiples of 16 at DeepSeek's shapes


def report(name: str, fn, types: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 3) -> None:
    params = fn.arg_names
    sig = {p: "constexpr" if p in constexprs else types.get(p, "i32") for p in params}
    aligned = [
        i for i, p in enumerate(params) if sig[p][0] == "*" or p.startswith("stride") or p in ALIGNED_INTS
    ]
    src = ASTSource(
        fn, sig, constexprs={(params.index(k),): v for k, v in constexprs.items()},
        attrs={(i,): [["tt.divisibility", 16]] for i in aligned},
    )  # fmt: skip
    kernel = triton.compile(
        src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True).stdout
    regs, stack = re.search(r"REG:(\d+)", usage).group(1), re.search(r"STACK:(\d+)", usage).group(1)
    ptx = LAST_PTX[0] = kernel.asm["ptx"]
    mma = "wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else "-"
    print(f"{name:<52} regs {regs:>3}  stack {stack:>5}  smem {kernel.metadata.shared:>6}  {mma}", flush=True)


def mla() -> None:
    bf16 = "*bf16"
    types = dict(Q_NOPE=bf16, Q_PE=bf16, KV_CACHE=bf16, OUT=bf16, MID_O="*fp32", MID_LSE="*fp32",
                 REQ_TO_TOKEN="*i32", REQ_IDX="*i32", SEQ_LENS="*i32", ORDER="*i32", SPREAD="*i32",
                 qk_scale="fp32")  # fmt: skip
    launches = (
        (16, 16, 4, 2),
        (16, 32, 4, 2),
        (16, 32, 8, 3),
        (16, 64, 4, 2),
        (32, 32, 8, 2),
        (64, 32, 8, 2),
    )
    # splits 8 / 1 without an order; "8o": 8 chunks at most, given an order, halved where alike;
    # "2o": a one-chunk cut doubled (halved where alike: the output written directly)
    for bh, bn, warps, stages in launches:
        for splits in (8, 1, "8o", "2o"):
            shape = dict(KV_LORA_RANK=512, ROPE_DIM=64, BLOCK_R=512, BLOCK_P=64, PRECISION="tf32")
            order = splits in ("8o", "2o")
            n = int(splits[0]) if order else splits
            consts = dict(
                shape, NUM_SPLITS=n, MIN_SPLIT=bn, DIRECT=n == 1, BLOCK_H=bh, BLOCK_N=bn, PDL=True,
                HAS_ORDER=order, ADAPT=order,
            )  # fmt: skip
            name = f"mla split h{bh} n{bn} warps{warps} stages{stages} splits{splits}"
            report(name, M._mla_decode_split_kernel, types, consts, warps, stages)
    merge_types = dict(MID_O="*fp32", MID_LSE="*fp32", OUT=bf16)
    merge_consts = dict(KV_LORA_RANK=512, NUM_SPLITS=5, BLOCK_S=8, BLOCK_R=512, PDL=True)
    report("mla merge", M._mla_decode_merge_kernel, merge_types, merge_consts)
    merge_types["SPREAD"] = "*i32"
    report("mla merge of a doubled one-chunk cut", M._mla_decode_merge_pair_kernel, merge_types,
           dict(KV_LORA_RANK=512, BLOCK_H=4, BLOCK_R=512, PDL=True))  # fmt: skip
    report("mla store_kv", S._mla_store_kv_kernel, dict(KV_CACHE=bf16, C_KV=bf16, K_PE=bf16, SLOTS="*i64"),
           dict(KV_LORA_RANK=512, ROPE_DIM=64, BLOCK_R=512, BLOCK_P=64))  # fmt: skip


def moe() -> None:
    report("moe align", A._moe_align_kernel,
           dict(TOPK_IDS="*i64", SORTED_IDS="*i32", EXPERT_IDS="*i32", NUM_PADDED="*i32"),
           dict(BLOCK_M=16, BLOCK_E=256, BLOCK=4096, PDL=True))  # fmt: skip
    types = dict(A="*bf16", B="*bf16", C="*bf16", TOPK_WEIGHTS="*fp32", SORTED_IDS="*i32", EXPERT_IDS="*i32",
                 NUM_PADDED="*i32")  # fmt: skip
    configs = (F.MoeConfig(16, 64, 128, 1, 4, 4), F.MoeConfig(32, 64, 128, 8, 4, 3),
               F.MoeConfig(64, 128, 64, 8, 8, 3), F.MoeConfig(128, 128, 64, 8, 8, 3))  # fmt: skip
    for c in configs:
        for gate_up in (True, False):
            tiles = dict(BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, GROUP_M=c.group_m)
            consts = dict(
                tiles,
                A_ROWS_PER_PAIR=not gate_up,
                DIRECT=c.block_m == 16,  # as fused_moe launches one token's pairs
                GATE_UP=gate_up,
                MUL_WEIGHT=not gate_up,
                PRECISION="tf32",
                PDL=True,
            )
            kind = "gate_up" if gate_up else "down"
            name = f"moe {kind} {c.block_m}x{c.block_n}x{c.block_k} warps{c.num_warps} "
            report(
                name + f"stages{c.num_stages}", F._moe_gemm_kernel, types, consts, c.num_warps, c.num_stages
            )


def allreduce() -> None:
    """The tensor-parallel all-reduce (+ RMSNorm) kernel, per dtype and rank, with and without the norm."""
    for dt, wide in (("bf16", False), ("fp32", True)):
        types = dict(X=f"*{dt}", R=f"*{dt}", W=f"*{dt}", OUT=f"*{dt}", R_OUT=f"*{dt}", BUFFERS="*i64",
                     COUNT="*i32", eps="fp32")  # fmt: skip
        for rank in (0, 1):
            for norm in (True, False):
                consts = dict(
                    RANK=rank,
                    WORLD=2,
                    WIDE=wide,
                    HAS_RESIDUAL=norm,
                    HAS_NORM=norm,
                    BLOCK=4096,
                    PDL=True,
                )
                name = f"allreduce {dt} rank{rank} norm {norm}"
                report(name, AR._allreduce_add_rms_norm_kernel, types, consts, 8, 1)


def skinny() -> None:
    """The few-row projection kernel at its measured tiles, with the PDL prologue (gdc_wait)."""
    types = dict(X="*bf16", W="*bf16", B="*bf16", Y="*bf16")
    for (n, k), c in SK.MEASURED.items():
        consts = dict(HAS_BIAS=False, PRECISION="tf32", PDL=True, BLOCK_M=16, BLOCK_N=c.block_n,
                      BLOCK_K=c.block_k)  # fmt: skip
        name = f"skinny {n}x{k} {c.block_n}x{c.block_k} warps{c.num_warps} stages{c.num_stages}"
        report(name, SK._skinny_linear_kernel, types, consts, c.num_warps, c.num_stages)


def prefill() -> None:
    """Prefill attention with the new tokens' k/v passed apart (Llama-3-8B heads, bf16), at the
    chosen blocks, with and without the tensor-descriptor (TMA) reads of their whole key blocks;
    `tma` says whether the PTX holds TMA copies (cp.async.bulk.tensor)."""
    P = importlib.import_module("lightllm_async.kernels.prefill_attention")
    types = {n: "*bf16" for n in ("Q", "K_CACHE", "V_CACHE", "OUT", "K_NEW", "V_NEW")}
    types.update({n: "*i32" for n in ("REQ_TO_TOKEN", "REQ_IDX", "Q_START", "SEQ_LENS")}, qk_scale="fp32")
    for block_m, block_n, warps, stages in ((128, 64, 8, 3), (128, 128, 8, 3)):
        for tma in (False, True):
            desc = f"tensordesc<bf16[{block_n}, 128]>" if tma else "constexpr"
            consts = dict(GROUP=4, HEAD_DIM=128, V_DIM=128, PRECISION="tf32", BLOCK_M=block_m,
                          BLOCK_N=block_n, BLOCK_NP=128, BLOCK_D=128, BLOCK_DV=128, NEW_KV=True,
                          ORDER=2, TMA=tma)  # fmt: skip
            if not tma:
                consts.update(KN_DESC=None, VN_DESC=None)
            name = f"prefill {block_m}x{block_n} w{warps} s{stages} tma={tma}"
            all_types = {**types, "KN_DESC": desc, "VN_DESC": desc}
            report(name, P._prefill_kernel, all_types, consts, warps, stages)
            print(f"    TMA copies in the PTX: {'cp.async.bulk.tensor' in LAST_PTX[0]}")


def fp8() -> None:
    """--kv-cache-dtype fp8 (Llama-3-8B heads, bf16 activations, float8 e4m3 caches): the stores
    (store_kv, the rotary kernel's fused one) and the attention kernels that widen what they load;
    `cvt` says whether the PTX converts with the hardware's float8 instructions."""
    D, R, P = (
        importlib.import_module(f"lightllm_async.kernels.{n}")
        for n in ("decode_attention", "rotary", "prefill_attention")
    )
    St = importlib.import_module("lightllm_async.kernels.store_kv")
    cache = {"K_CACHE": "*fp8e4nv", "V_CACHE": "*fp8e4nv"}
    ints = {n: "*i32" for n in ("REQ_TO_TOKEN", "REQ_IDX", "Q_START", "SEQ_LENS")}
    report("store_kv into fp8", St._store_kv_kernel, {"K": "*bf16", "V": "*bf16", "SLOTS": "*i64", **cache},
           dict(BLOCK_H=8, BLOCK_D=128))  # fmt: skip
    print(f"    float8 cvt in the PTX: {'e4m3' in LAST_PTX[0]}")
    types = {n: "*bf16" for n in ("Q", "K", "Q_OUT", "K_OUT", "V")}
    report("rotary + store into fp8", R._rotary_kernel,
           {**types, "POS": "*i64", "COS_SIN": "*fp32", "SLOTS": "*i64", **cache},
           dict(STORE=True, BLOCK_HQ=32, BLOCK_HK=8, BLOCK_HALF=64, PDL=True))  # fmt: skip
    print(f"    float8 cvt in the PTX: {'e4m3' in LAST_PTX[0]}")
    # at decode_attention.LAUNCH[1] (fp8) and LAUNCH[2] (bf16): several chunks, and one (written
    # directly) in the runner's order, as a batch over 33 runs at 8 kv heads
    dec = {"Q": "*bf16", **ints, "ORDER": "*i32", "MID_O": "*fp32", "MID_LSE": "*fp32", "OUT": "*bf16",
           "qk_scale": "fp32"}  # fmt: skip
    bf16_cache = {"K_CACHE": "*bf16", "V_CACHE": "*bf16"}
    for name, kv, launch in (("fp8", cache, D.LAUNCH[1]), ("bf16", bf16_cache, D.LAUNCH[2])):
        for splits, order in ((8, False), (1, True)):
            consts = dict(GROUP=4, HEAD_DIM=128, NUM_SPLITS=splits, DIRECT=splits == 1, PRECISION="tf32",
                          BLOCK_G=16, BLOCK_N=launch["block_n"], BLOCK_D=128, QK_F16=launch["f16"],
                          HAS_ORDER=order, PDL=True)  # fmt: skip
            tag = f"decode split over {name}, {splits} chunks{' ordered' if order else ''}"
            report(tag, D._decode_split_kernel, {**dec, **kv}, consts, launch["warps"], launch["stages"])
    types = {n: "*bf16" for n in ("Q", "OUT", "K_NEW", "V_NEW")}
    desc = "tensordesc<bf16[128, 128]>"
    report("prefill 128x128 TMA, prefix from fp8", P._prefill_kernel,
           {**types, **cache, **ints, "qk_scale": "fp32", "KN_DESC": desc, "VN_DESC": desc},
           dict(GROUP=4, HEAD_DIM=128, V_DIM=128, PRECISION="tf32", BLOCK_M=128, BLOCK_N=128, BLOCK_NP=128,
                BLOCK_D=128, BLOCK_DV=128, NEW_KV=True, ORDER=2, TMA=True), 8, 3)  # fmt: skip


LAST_PTX = [""]

if __name__ == "__main__":
    which = sys.argv[1:] or ["mla", "moe", "allreduce", "skinny", "prefill", "fp8"]
    parts = {"mla": mla, "moe": moe, "allreduce": allreduce, "skinny": skinny, "prefill": prefill, "fp8": fp8}
    for part in which:
        parts[part]()
