"""The one switch that routes every kernel op to Triton or to its PyTorch reference.

Triton is optional: without it every op runs its reference, which is also the CPU path and the
oracle the model is tested against. `LLA_KERNELS=ref` forces the references everywhere;
`TRITON_INTERPRET=1 LLA_KERNELS=triton` runs the Triton kernels on CPU tensors in the interpreter.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import sys
from collections.abc import Callable
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

    HAS_TRITON = True

    def jit(fn=None, **kwargs):
        """`triton.jit`, keeping `do_not_specialize_on_alignment` only where this Triton has it
        (from 3.2; without it a kernel still runs, it may compile once more per alignment)."""
        if "do_not_specialize_on_alignment" in kwargs and not _ALIGNMENT_KNOB:
            kwargs.pop("do_not_specialize_on_alignment")
        return triton.jit(fn, **kwargs) if fn is not None else triton.jit(**kwargs)

    _ALIGNMENT_KNOB = "do_not_specialize_on_alignment" in inspect.signature(triton.jit).parameters
except ImportError:  # the kernel files still import: `@jit` and `tl.constexpr` need names only
    triton = None
    tl = SimpleNamespace(constexpr=Any)
    HAS_TRITON = False

    def jit(fn=None, **kwargs):
        return fn if fn is not None else (lambda f: f)


# whether triton was imported in interpreter mode, so that kernels can run on CPU tensors
INTERPRETED = HAS_TRITON and type(tl.sum).__name__ == "InterpretedFunction"

__all__ = [
    "HAS_TRITON",
    "INTERPRETED",
    "jit",
    "log_compiles",
    "on_compile",
    "pdl",
    "pdl_launch",
    "pdl_wait",
    "tl",
    "triton",
    "use_cpu_path",
    "use_triton",
]


def log_compiles(log: logging.Logger) -> bool:
    """From now on, log each Triton kernel this process compiles, with the argument types it was
    specialized for: after start-up every compile is a stall of 0.1-1 s in the middle of serving
    (an integer argument that became 1 or a multiple of 16, a new block size), so a steady server
    should log none. False where this Triton has no compile hook."""
    return on_compile(lambda text: log.warning("compiled a Triton kernel while serving: %s", text[:600]))


def on_compile(callback: Callable[[str], None] | None) -> bool:
    """Call `callback` with the kernel's name, launch options and argument types each time this
    process compiles a Triton kernel (None: stop). False where this Triton has no compile hook."""
    knobs = getattr(triton, "knobs", None)
    if knobs is None or not hasattr(knobs.runtime, "jit_post_compile_hook"):
        return False

    def hook(*, repr: str, **_: Any) -> None:  # noqa: A002 - Triton's keyword
        callback(repr)

    knobs.runtime.jit_post_compile_hook = None if callback is None else hook
    return True


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


@functools.cache
def _pdl_on(index: int) -> bool:
    if os.environ.get("LLA_PDL", "1") == "0" or torch.version.hip is not None:
        return False  # off, or ROCm (whose capability numbers are not NVIDIA's)
    if torch.cuda.get_device_capability(index)[0] < 9:
        return False
    try:  # Triton >= 3.3: the griddepcontrol wrappers and the launch option
        from triton.backends.nvidia.compiler import CUDAOptions

        return hasattr(tl.extra.cuda, "gdc_wait") and "launch_pdl" in CUDAOptions.__dataclass_fields__
    except (ImportError, AttributeError):
        return False


def pdl(t: Tensor) -> bool:
    """Whether kernels on `t`'s device use programmatic dependent launch (Hopper and later, a
    Triton that has it, LLA_PDL not 0): a kernel launched with `launch_pdl=True` may start while
    the kernel before it in the stream still runs, and must `gdc_wait()` before it reads anything
    that kernel (or any earlier one) wrote; a kernel that calls `gdc_launch_dependents()` lets its
    successor start from then on. Never in the interpreter."""
    return (
        t.is_cuda
        and HAS_TRITON
        and not INTERPRETED
        and _pdl_on(torch.cuda.current_device() if t.device.index is None else t.device.index)
    )


@jit
def pdl_wait(PDL: tl.constexpr):
    """In a kernel launched with `pdl_launch`: wait for the kernel before it (its writes visible),
    then let the next kernel start. Every program calls it before it touches anything the step's
    earlier kernels wrote (only constant data, weights, may be read before); nothing without PDL."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def pdl_launch(t: Tensor) -> dict[str, bool]:
    """A kernel's launch options for `pdl(t)`: its PDL constexpr (the kernel then calls gdc_wait
    before it reads or writes anything the kernels before it touch, and gdc_launch_dependents
    after, so that the next kernel can get going) and Triton's launch_pdl."""
    return {"PDL": True, "launch_pdl": True} if pdl(t) else {"PDL": False}


def use_cpu_path(t: Tensor) -> bool:
    """Whether an op that does not launch Triton should take its CPU path (fewer, fused torch
    ops in the tensor's own dtype) rather than its reference: for CPU tensors, unless
    LLA_KERNELS=ref asks for the references. Call it only where `use_triton(t)` is False."""
    return t.device.type == "cpu" and os.environ.get("LLA_KERNELS", "") != "ref"
