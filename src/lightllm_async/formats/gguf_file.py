"""A small, fast, torch-free reader for GGUF files: metadata, tensor table, raw tensor bytes.

`gguf.GGUFReader` builds a Python object per string of the vocabulary and takes ~2 s on a
135M model; this reads the same metadata in ~0.03 s (arrays of strings, the vocabulary and the
merges, are decoded only when read: the engine never reads them) and leaves tensor data in the
memory map until a tensor is asked for. The tokenizer (frontend process) uses it too, so it must
never import torch.

Layout (little-endian, GGUF v2/v3): magic "GGUF", u32 version, u64 tensor_count, u64 kv_count,
kv_count x (string key, u32 type, value), tensor_count x (string name, u32 n_dims, u64 dims[n_dims]
fastest-moving first, u32 ggml_type, u64 offset), then the data section at the next multiple of
`general.alignment` (default 32).
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lightllm_async.formats.gguf_int4 import INT4_TYPES, int4_groups

# GGUF scalar value types -> struct format
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_NUMPY = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "?",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}
_STRING, _ARRAY = 8, 9
_FLOAT_TYPES = {0: 4, 1: 2, 30: 2}  # ggml F32, F16, BF16 -> bytes per element
# (elements, bytes) of a block of the common quantized types, as gguf.GGML_QUANT_SIZES has them:
# known here so that reading a file's table does not import the gguf package (~0.1 s)
_QUANT_SIZES = {
    2: (32, 18),  # Q4_0
    3: (32, 20),  # Q4_1
    6: (32, 22),  # Q5_0
    7: (32, 24),  # Q5_1
    8: (32, 34),  # Q8_0
    10: (256, 84),  # Q2_K
    11: (256, 110),  # Q3_K
    12: (256, 144),  # Q4_K
    13: (256, 176),  # Q5_K
    14: (256, 210),  # Q6_K
}
_Q8_0 = 8


class StringArray(Sequence[str]):
    """A GGUF array of strings, decoded on first use: walking past the 49k tokens and 49k merges
    of a vocabulary takes ~15 ms, decoding them ~50 ms more, and only the tokenizer reads them."""

    def __init__(self, mm: mmap.mmap, pos: int, count: int) -> None:
        self._mm, self._pos, self._count = mm, pos, count  # the first string's length field
        self._items: list[str] | None = None

    def _decoded(self) -> list[str]:
        if self._items is None:
            mm, pos, items = self._mm, self._pos, []
            length = struct.Struct("<Q").unpack_from
            for _ in range(self._count):
                (n,) = length(mm, pos)
                items.append(mm[pos + 8 : pos + 8 + n].decode("utf-8", errors="replace"))
                pos += 8 + n
            self._items = items
        return self._items

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, i):  # an int or a slice, as a list's
        return self._decoded()[i]

    def __iter__(self) -> Iterator[str]:
        return iter(self._decoded())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"StringArray({len(self)} strings)"


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor lives. `shape` is in numpy/torch order (ggml dims reversed)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # absolute, from the start of the file

    @property
    def is_quantized(self) -> bool:
        return self.ggml_type not in _FLOAT_TYPES

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (the last, fastest-moving dimension) in the file."""
        block, type_size = _block_size(self.ggml_type)
        return self.shape[-1] // block * type_size

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape[:-1], dtype=np.int64)) * self.row_bytes


class GGUFFile:
    """An opened GGUF file: `metadata` (key -> value), `tensors` (in file order)."""

    def __init__(self, path: str) -> None:
        self.path = path
        with open(path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.metadata: dict[str, Any] = {}
        self.tensors: list[GGUFTensorInfo] = []
        self._parse()

    @property
    def architecture(self) -> str:
        return str(self.metadata["general.architecture"])

    def tensor_names(self) -> list[str]:
        return [t.name for t in self.tensors]

    def raw(self, info: GGUFTensorInfo) -> np.ndarray:
        """The stored bytes as uint8 `[*shape[:-1], row_bytes]`, a zero-copy view of the map."""
        data = np.frombuffer(self._mm, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        return data.reshape(*info.shape[:-1], info.row_bytes)

    def dequantize(self, info: GGUFTensorInfo) -> np.ndarray:
        """The tensor as a fresh, writable float32 array of `info.shape` (quantized types other
        than Q8_0, Q4_0 and Q4_1 need the gguf package)."""
        raw = self.raw(info)
        if info.ggml_type == 0:
            values = raw.view("<f4").copy()
        elif info.ggml_type == 1:
            values = raw.view("<f2").astype(np.float32)
        elif info.ggml_type == 30:  # bf16: the high half of a float32
            values = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
        elif info.ggml_type == _Q8_0:  # `d * q` per block of 32, as gguf.quants computes it
            blocks = raw.reshape(-1, 34)
            d = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # [n, 1]
            values = blocks[:, 2:].view(np.int8).astype(np.float32) * d
        elif info.ggml_type in INT4_TYPES:  # numpy over the whole tensor: gguf goes 16 rows at a time
            values = int4_groups(raw.reshape(-1, raw.shape[-1]), info.ggml_type).dequantize()
        else:
            gguf = _gguf()
            values = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(info.ggml_type))
        return values.astype(np.float32, copy=False).reshape(info.shape)  # a fresh array in each case

    # -- parsing ---------------------------------------------------------------------------

    def _parse(self) -> None:
        mm = self._mm
        if mm[:4] != b"GGUF":
            raise ValueError(f"{self.path} is not a GGUF file (bad magic {mm[:4]!r})")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", mm, 4)
        if version not in (2, 3):
            raise ValueError(f"{self.path}: GGUF version {version} is not supported (only 2 and 3)")
        pos = 24
        for _ in range(n_kv):
            key, pos = self._string(pos)
            (vtype,) = struct.unpack_from("<I", mm, pos)
            self.metadata[key], pos = self._value(pos + 4, vtype)
        entries = []
        for _ in range(n_tensors):
            name, pos = self._string(pos)
            (n_dims,) = struct.unpack_from("<I", mm, pos)
            dims = struct.unpack_from(f"<{n_dims}Q", mm, pos + 4)
            ggml_type, offset = struct.unpack_from("<IQ", mm, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            entries.append((name, tuple(reversed(dims)), ggml_type, offset))
        align = int(self.metadata.get("general.alignment", 32))
        data_start = (pos + align - 1) // align * align
        self.tensors = [GGUFTensorInfo(n, s, t, data_start + o) for n, s, t, o in entries]

    def _string(self, pos: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", self._mm, pos)
        raw = self._mm[pos + 8 : pos + 8 + n]
        return raw.decode("utf-8", errors="replace"), pos + 8 + n

    def _value(self, pos: int, vtype: int) -> tuple[Any, int]:
        if vtype in _SCALARS:
            (v,) = struct.unpack_from(_SCALARS[vtype], self._mm, pos)
            return v, pos + struct.calcsize(_SCALARS[vtype])
        if vtype == _STRING:
            return self._string(pos)
        if vtype != _ARRAY:
            raise ValueError(f"{self.path}: unknown GGUF value type {vtype}")
        etype, count = struct.unpack_from("<IQ", self._mm, pos)
        pos += 12
        if etype in _NUMPY:
            dt = np.dtype(_NUMPY[etype])
            arr = np.frombuffer(self._mm, dtype=dt, count=count, offset=pos)
            return arr.tolist(), pos + count * dt.itemsize
        if etype == _STRING:  # walked past now, decoded when read
            start, length = pos, struct.Struct("<Q").unpack_from
            for _ in range(count):
                pos += 8 + length(self._mm, pos)[0]
            return StringArray(self._mm, start, count), pos
        values = []
        for _ in range(count):
            v, pos = self._value(pos, etype)
            values.append(v)
        return values, pos


def _block_size(ggml_type: int) -> tuple[int, int]:
    """(elements, bytes) of one ggml block of this type."""
    if ggml_type in _FLOAT_TYPES:
        return 1, _FLOAT_TYPES[ggml_type]
    if ggml_type in _QUANT_SIZES:
        return _QUANT_SIZES[ggml_type]
    gguf = _gguf()
    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]


def _gguf():  # -> the gguf module
    """The gguf package, imported only for quantized data: reading metadata (the tokenizer) and
    float tensors works without it."""
    try:
        import gguf
    except ImportError as e:
        raise ImportError("reading quantized GGUF tensors needs the gguf package: `pip install gguf`") from e
    return gguf


def is_gguf(path: str) -> bool:
    """True for a file whose name ends in .gguf (what we accept as a GGUF model path)."""
    return str(path).lower().endswith(".gguf")
