"""Typed sections at fixed addresses in one device buffer, filled through a host mirror by one copy.

A CUDA graph reads its inputs at the addresses it was captured with, so a step's inputs must land
in the same device tensors every step. Putting every input in one buffer lets one host-to-device
copy carry the whole step: the written parts of the sections, with the unused tails between them
when those are short (copying a few KiB more costs less than starting another copy).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

_ALIGN = 256  # bytes: every section starts on a boundary that any dtype and any kernel accepts
# Written ranges closer than this are copied as one span: at ~25 GB/s a gap this wide costs about
# as much copy time as the few microseconds of launching a separate copy.
_MERGE_GAP = 64 << 10
_NUMPY = {
    torch.int64: np.int64,
    torch.int32: np.int32,
    torch.float32: np.float32,
    torch.bool: np.bool_,
}


class Staging:
    """Named 1-D sections of fixed capacity; `put` writes one into the host mirror, `upload`
    copies what this step put to the device, normally in one copy.

    Two host mirrors alternate, because a step is written while the previous step's copy may
    still be queued on the device (overlapped steps). Before a mirror is reused, the copy that read
    it two uploads ago must have finished: `put` waits for it, which under the engine's
    launch/collect protocol (collect N-1 before launch N+1) has always happened already.
    """

    def __init__(self, sections: dict[str, tuple[torch.dtype, int]], device: torch.device):
        self.device = device
        self._layout: dict[str, tuple[torch.dtype, int, int]] = {}  # name -> dtype, offset, capacity
        offset = 0
        for name, (dtype, capacity) in sections.items():
            self._layout[name] = (dtype, offset, capacity)
            offset += -(-capacity * dtype.itemsize // _ALIGN) * _ALIGN
        self.nbytes = offset
        self._device = torch.zeros(offset, dtype=torch.uint8, device=device)
        pin = device.type == "cuda"
        self._host = [torch.zeros(offset, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        self._host_views = [{name: self._numpy_section(h, name) for name in self._layout} for h in self._host]
        # Marks, per mirror, the end of the last copy that read it (made once, recorded each upload).
        self._copied = [torch.cuda.Event() for _ in range(2)] if device.type == "cuda" else None
        self._flip = 0
        self._written: list[tuple[int, int]] = []  # byte ranges put since the last upload
        self._begun = False

    def _numpy_section(self, host: Tensor, name: str) -> np.ndarray:
        dtype, offset, capacity = self._layout[name]
        return host[offset : offset + capacity * dtype.itemsize].numpy().view(_NUMPY[dtype])

    def capacity(self, name: str) -> int:
        return self._layout[name][2]

    def put(self, name: str, values: Sequence[int] | Sequence[float]) -> Tensor:
        """Write `values` at the start of section `name`; returns the device view [len(values)],
        which holds them once `upload` has been enqueued."""
        if not self._begun:
            self._begin()
        dtype, offset, capacity = self._layout[name]
        n = len(values)
        if n > capacity:
            raise ValueError(f"{n} values overflow the {capacity} of input section {name!r}")
        if n:
            self._host_views[self._flip][name][:n] = values
            self._written.append((offset, offset + n * dtype.itemsize))
        return self.view(name, n)

    def view(self, name: str, n: int) -> Tensor:
        """The device tensor of the first `n` entries of a section: the same memory every step."""
        dtype, offset, _ = self._layout[name]
        return self._device[offset : offset + n * dtype.itemsize].view(dtype)

    def upload(self) -> None:
        """Copy what was put since the last upload (normally one copy); asynchronous on CUDA."""
        host = self._host[self._flip]
        for start, end in self.spans():
            self._device[start:end].copy_(host[start:end], non_blocking=True)
        if self._copied is not None:
            self._copied[self._flip].record()
        self._flip ^= 1
        self._written = []
        self._begun = False

    def spans(self) -> list[tuple[int, int]]:
        """The byte ranges the next upload copies: what was put, merged across short gaps."""
        spans: list[tuple[int, int]] = []
        for start, end in sorted(self._written):
            if spans and start - spans[-1][1] < _MERGE_GAP:
                spans[-1] = (spans[-1][0], max(spans[-1][1], end))
            else:
                spans.append((start, end))
        return spans

    def _begin(self) -> None:
        if self._copied is not None:
            self._copied[self._flip].synchronize()  # the copy that last read this mirror (long done)
        self._begun = True
