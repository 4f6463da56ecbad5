"""The one switch that routes every kernel op to Triton or to its PyTorch reference.

Triton is optional: without it every op runs its reference, which is also the CPU path and the
oracle the model is tested against. `LLA_KERNELS=ref` forces the references everywhere;
`TRITON_INTERPRET=1 LLA_KERNELS=triton` runs the Triton kernels on CPU tensors in the interpreter.
"""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor


def _gpu_visible() -> bool:
    if torch.version.cuda is None and torch.version.hip is None:
        return False  # a CPU build: answer without touching any driver
    return torch.cuda.is_available()


# triton.jit picks compiler or interpreter when it decorates, and triton.language decorates its own
# helpers (tl.sum, tl.cdiv, ...) when triton is imported. Without a GPU the interpreter is the only
# way triton runs at all, so choose it before the first import; on a GPU machine it stays opt-in.
if "triton" not in sys.modules and not _gpu_visible():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton
    import triton.language as tl

    jit = triton.jit
    HAS_TRITON = True
except ImportError:  # the kernel files still import: `@jit` and `tl.constexpr` need names only
    triton = None
    tl = SimpleNamespace(constexpr=Any)
    HAS_TRITON = False

    def jit(fn=None, **kwargs):
        return fn if fn is not None else (lambda f: f)


# whether triton was imported in interpreter mode, so that kernels can run on CPU tensors
INTERPRETED = HAS_TRITON and type(tl.sum).__name__ == "InterpretedFunction"

__all__ = ["HAS_TRITON", "INTERPRETED", "jit", "tl", "triton", "use_cpu_path", "use_triton"]


def use_triton(t: Tensor) -> bool:
    """Whether the op receiving `t` should launch its Triton kernel rather than its reference:
    never with LLA_KERNELS=ref or without triton; always for CUDA tensors; for CPU tensors with
    LLA_KERNELS=triton and TRITON_INTERPRET=1 (which must be set before triton is imported)."""
    mode = os.environ.get("LLA_KERNELS", "")
    if mode == "ref" or not HAS_TRITON:
        return False
    if t.is_cuda:
        return True
    return mode == "triton" and os.environ.get("TRITON_INTERPRET") == "1" and INTERPRETED


def use_cpu_path(t: Tensor) -> bool:
    """Whether an op that does not launch Triton should take its CPU path (fewer, fused torch
    ops in the tensor's own dtype) rather than its reference: for CPU tensors, unless
    LLA_KERNELS=ref asks for the references. Call it only where `use_triton(t)` is False."""
    return t.device.type == "cpu" and os.environ.get("LLA_KERNELS", "") != "ref"
