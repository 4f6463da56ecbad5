"""GGUF's 4-bit block types read as groups of 32: `w = scale * code + min`, code in 0..15.

Q4_0 (`d * (q - 8)`), Q4_1 (`d * q + m`) and Q4_K (`d * sc * q - dmin * m` per 32-wide sub-block
of a 256-wide super-block) all have that form, so one int4 kernel with a scale and a zero per
group of 32 runs each of them. The codes are the file's; scale and min are float32 products of its
fp16 and 6-bit factors, computed as `gguf.quants` dequantizes (the same operations in the same
order), so `scale * code + min` gives the gguf package's float32 weights bit for bit.

Numpy only, like the rest of formats/: the tokenizer's process never loads torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GROUP = 32  # inputs per scale/min
Q4_0, Q4_1, Q4_K = 2, 3, 12  # ggml type ids
INT4_TYPES = {Q4_0: "Q4_0", Q4_1: "Q4_1", Q4_K: "Q4_K"}


@dataclass(frozen=True)
class Int4Groups:
    """A [rows, cols] matrix in groups of GROUP along its columns."""

    codes: np.ndarray  # [rows, cols] uint8, 0..15
    scale: np.ndarray  # [rows, cols / GROUP] float32
    min: np.ndarray  # [rows, cols / GROUP] float32

    def dequantize(self) -> np.ndarray:
        """float32 [rows, cols]."""
        rows, cols = self.codes.shape
        groups = self.codes.reshape(rows, cols // GROUP, GROUP).astype(np.float32)
        return (groups * self.scale[..., None] + self.min[..., None]).reshape(rows, cols)

    def map_rows(self, fn) -> Int4Groups:
        """The same groups with `fn` applied to the rows of each array (a row permutation)."""
        return Int4Groups(fn(self.codes), fn(self.scale), fn(self.min))


def int4_groups(raw: np.ndarray, ggml_type: int) -> Int4Groups:
    """Decode `raw` (uint8 [rows, row_bytes], as `GGUFFile.raw` gives a matrix) of a 4-bit type."""
    rows = raw.shape[0]
    if ggml_type == Q4_K:
        return _q4_k(raw.reshape(-1, 144), rows)
    head = 2 if ggml_type == Q4_0 else 4
    blocks = raw.reshape(-1, head + 16)  # [rows * cols / 32, fp16 d (, fp16 m), 16 bytes of codes]
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)[:, 0]
    if ggml_type == Q4_0:
        low = d * np.float32(-8)  # d * (q - 8) = d * q - 8 d, exactly (a fp16 d times a 4-bit int)
    elif ggml_type == Q4_1:
        low = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)[:, 0]
    else:
        raise ValueError(f"ggml type {ggml_type} is not a 4-bit type we read ({INT4_TYPES})")
    codes = _nibbles(blocks[:, head:])  # [blocks, 32]: low nibbles are 0..15, high ones 16..31
    return Int4Groups(codes.reshape(rows, -1), d.reshape(rows, -1), low.reshape(rows, -1))


def _q4_k(blocks: np.ndarray, rows: int) -> Int4Groups:
    """Q4_K super-blocks of 256: fp16 d, fp16 dmin, 12 bytes of 6-bit (scale, min) x 8, then 128
    bytes holding four 64-wide chunks, each two sub-blocks (low nibbles, then high)."""
    from gguf.quants import Q4_K as GGUF_Q4_K  # its 6-bit unpacking; needed only for this type

    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, m = GGUF_Q4_K.get_scale_min(blocks[:, 4:16].copy())
    scale = d * sc.astype(np.float32)  # [n, 8], as gguf computes them
    low = -(dmin * m.astype(np.float32))
    codes = _nibbles(blocks[:, 16:].reshape(-1, 32))  # [n * 4, 64]: sub-blocks 2j, 2j+1
    return Int4Groups(codes.reshape(rows, -1), scale.reshape(rows, -1), low.reshape(rows, -1))


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """[n, b] bytes -> [n, 2b] codes: the low nibbles, then the high ones."""
    return np.concatenate([packed & np.uint8(0x0F), packed >> np.uint8(4)], axis=-1)
