"""Helpers for the tests that hold each kernel against its reference (no pytest import here)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from .backend import HAS_TRITON, INTERPRETED

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def rel_err(out: Tensor, ref: Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN anywhere in `out` gives NaN, which fails any bound."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def interpreter_skip_reason() -> str | None:
    """Why the Triton kernels cannot run on CPU tensors here, or None when they can.

    They can when triton was imported in interpreter mode: TRITON_INTERPRET=1 set beforehand, as
    `kernels.backend` does itself where no GPU is visible. On a CUDA machine that stays opt-in.
    """
    if not HAS_TRITON:
        return "triton is not installed"
    if not INTERPRETED:
        return "triton was imported without TRITON_INTERPRET=1: set it to run the interpreter tests"
    return None


def gpu_skip_reason() -> str | None:
    """Why the CUDA tests cannot run here, or None when they can."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1: real shapes are too slow in the interpreter"
    return None


def must_not_skip() -> bool:
    """In CI (env CI set, no GPU) the interpreter tests must run: a skip there is a failure."""
    return bool(os.environ.get("CI")) and not torch.cuda.is_available()


@contextmanager
def nan_filled_allocations() -> Iterator[None]:
    """Make torch.empty and torch.empty_like return NaN-filled floating tensors, so that an output
    element a kernel forgets to write shows up as NaN."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t: Tensor) -> Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = lambda *a, **kw: poison(empty(*a, **kw))
    torch.empty_like = lambda *a, **kw: poison(empty_like(*a, **kw))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like
