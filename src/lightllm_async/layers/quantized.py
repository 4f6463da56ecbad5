"""Linear layers that keep 4-bit weights packed and multiply with torch's CPU weight-only kernel.

A 4-bit GGUF weight (Q4_0, Q4_1, Q4_K) is `w = scale * code + min` per group of 32 inputs
(`formats/gguf_int4.py`). `_weight_int4pack_mm_for_cpu` computes `w = (code - 8) * scale + zero`
per group from its packed codes, so zero = min + 8 * scale. The codes are kept as they are;
scale and zero are rounded to bfloat16, because the kernel takes them in its activation dtype and
its float32 path is 20-40x slower than its bfloat16 one (perf/cpu_linear_bench.py). That
rounding (relative 2^-9) and the bfloat16 activations are all that differs from the float32
dequantized weights.

One row (decode) reads 4.5 bits a weight instead of 32, and the kernel runs 2.6-7.5x as fast as
a float32 GEMV. At many rows (prefill) it is slower than even float32, while bfloat16 `F.linear`
runs 6-7x faster than float32: there the codes are unpacked to a bfloat16 matrix for the call and
dropped after (the kernel's own scale and zero; the products rounded to bfloat16).

Below UNPACK_ROWS rows, when the `_gemv` extension is built (`kernels/cpu_gemv.py`), a C kernel
replaces torch's: the activations are quantized to int16 per group of 32 and the products are
integer (AVX-512 VNNI), 2-3x as fast as `_weight_int4pack_mm_for_cpu` at 1-8 rows; scale and min
are float16 there (exact for Q4_0 and Q4_1), the float32 sums rounded once to the activations'
dtype. Without it, torch's kernel.

Models are not changed: `swap_int4_linears` replaces their `Linear` modules after construction,
and the weight loader (`models/weights.py`) hands these layers `Int4Weight`s.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightllm_async.kernels import cpu_gemv, cpu_shapes
from lightllm_async.layers.linear import Linear, MergedLinear

GROUP = 32
# From this many rows, unpacking to bfloat16 and `F.linear` beats torch's int4 kernel: the
# kernel's time grows ~60 us a row on SmolLM2's gate|up (3072 x 576), the unpacking costs ~3 ms
# at any count; at each of SmolLM2's four shapes the two cross between 48 and 64 rows (one core
# of a 4th-gen Xeon). `_gemv` grows ~35 us a row there: about even with unpacking at 64.
UNPACK_ROWS = 64


@dataclass(frozen=True)
class Int4Weight:
    """A checkpoint's [out, in] weight in groups of GROUP inputs: `w = scale * codes + min`."""

    codes: Tensor  # [out, in] uint8, 0..15
    scale: Tensor  # [out, in / GROUP] float32
    min: Tensor  # [out, in / GROUP] float32

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def dequantize(self) -> Tensor:
        """float32 [out, in], rounded as the GGUF dequantizers do (a product, then a sum)."""
        out_f, in_f = self.codes.shape
        groups = self.codes.view(out_f, in_f // GROUP, GROUP).float()
        return (groups * self.scale[..., None] + self.min[..., None]).view(out_f, in_f)

    def to(self, device) -> Int4Weight:
        return Int4Weight(self.codes.to(device), self.scale.to(device), self.min.to(device))


class Int4Linear(nn.Module):
    """y = x W^T (+ b), W held as int4 codes with a bfloat16 scale and zero per group of 32.

    Parts (q|k|v, gate|up) load into their rows as in `MergedLinear`; `finish_loading` packs the
    codes for the kernel once all are in. Any activation dtype goes in and comes back out; the
    matmul runs in bfloat16 (int16 activations, float32 sums in `_gemv`). The codes are held
    twice, 4 bits each: in the small-row kernel's layout, and as `nibbles` (code j in the low
    half of byte j, code j + in/2 in the high half) to unpack."""

    def __init__(self, in_features: int, part_sizes: dict[str, int], bias: bool, dtype, device):
        """`part_sizes`: the output rows of each part, in order ({"": out_features} for one)."""
        super().__init__()
        out_features = sum(part_sizes.values())
        if not self.supports(out_features, in_features):
            raise ValueError(f"the int4 kernel cannot run a [{out_features}, {in_features}] weight")
        self.in_features, self.out_features = in_features, out_features
        self.gemv = False  # finish_loading: whether `_gemv` runs the small row counts
        self.offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for name, size in part_sizes.items():
            self.offsets[name] = (start, start + size)
            start += size
        groups = in_features // GROUP
        nibbles = torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device)
        self.register_buffer("nibbles", nibbles)
        # float32 while loading; finish_loading turns them into the kernel's bfloat16 scale_zero
        self.register_buffer("scale", torch.empty(out_features, groups, device=device))
        self.register_buffer("min", torch.empty(out_features, groups, device=device))
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
            if bias
            else None
        )

    @staticmethod
    def supports(out_features: int, in_features: int) -> bool:
        """The kernel's shape limits: whole groups of inputs, outputs in blocks of 16."""
        return in_features % GROUP == 0 and out_features % 16 == 0 and out_features > 0

    @classmethod
    def like(cls, linear: Linear) -> Int4Linear:
        """An empty Int4Linear of `linear`'s shape, parts and bias."""
        out_f, in_f = linear.weight.shape
        parts = {"": out_f}
        if isinstance(linear, MergedLinear):
            parts = {name: hi - lo for name, (lo, hi) in linear.offsets.items()}
        return cls(in_f, parts, linear.bias is not None, linear.weight.dtype, linear.weight.device)

    def load_part(self, part: str | None, kind: str, tensor: Tensor | Int4Weight) -> None:
        """Copy the rows of `part` (None: all rows): an Int4Weight for "weight", floats for "bias"."""
        lo, hi = self.offsets[part] if part is not None else (0, self.out_features)
        if tensor.shape[0] != hi - lo:
            raise ValueError(f"{part}.{kind}: expected {hi - lo} rows, got {tuple(tensor.shape)}")
        if kind == "bias":
            self.bias.data[lo:hi].copy_(tensor)
            return
        if not isinstance(tensor, Int4Weight):
            raise TypeError(f"{part}.{kind}: Int4Linear loads 4-bit groups, not {type(tensor).__name__}")
        half = self.in_features // 2
        codes = tensor.codes.to(self.nibbles.device)
        self.nibbles[lo:hi] = codes[:, :half] | (codes[:, half:] << 4)
        self.scale[lo:hi].copy_(tensor.scale)
        self.min[lo:hi].copy_(tensor.min)

    def finish_loading(self) -> None:
        """Pack the codes in a small-row kernel's layout: `_gemv`'s (`gemv_w`, `gemv_sm`) where
        it is built on a CPU, else torch's (`packed`); scale and zero [in / GROUP, out, 2] bfloat16
        for unpacking."""
        scale_zero = torch.stack([self.scale, self.min + 8 * self.scale], -1).transpose(0, 1)
        self.register_buffer("scale_zero", scale_zero.contiguous().bfloat16())
        codes = torch.cat([self.nibbles & 15, self.nibbles >> 4], dim=1)  # [out, in]
        self.gemv = cpu_gemv.available() and codes.device.type == "cpu"
        if self.gemv:
            w, sm = cpu_gemv.pack_int4(codes, self.scale, self.min)
            self.register_buffer("gemv_w", w)
            self.register_buffer("gemv_sm", sm)
        else:
            self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(codes.int(), 1))
        del self.scale, self.min

    # what `finish_loading` leaves: the unpacking layout, then `_gemv`'s pair or torch's int4 pack
    PACKED_BUFFERS = ("nibbles", "scale_zero", "gemv_w", "gemv_sm", "packed")

    def load_packed(self, buffers: dict[str, Tensor]) -> None:
        """Take the buffers `finish_loading` left (a cached load: runner/weight_cache.py) instead
        of loading parts and packing them: `nibbles`, `scale_zero`, and `gemv_w` + `gemv_sm` or
        `packed`; the bias, a parameter, is not among them."""
        kernel = {"gemv_w", "gemv_sm"} if "gemv_w" in buffers else {"packed"}
        if set(buffers) != {"nibbles", "scale_zero", *kernel}:
            raise KeyError(f"packed Int4Linear buffers: got {sorted(buffers)}")
        if buffers["nibbles"].shape != self.nibbles.shape:
            raise ValueError(
                f"packed Int4Linear: nibbles {tuple(buffers['nibbles'].shape)}, expected "
                f"{tuple(self.nibbles.shape)}"
            )
        del self.scale, self.min
        for name, tensor in buffers.items():
            self.register_buffer(name, tensor)
        self.gemv = "gemv_w" in buffers

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[0] >= UNPACK_ROWS:
            y = cpu_shapes.linear(x.to(torch.bfloat16), self.unpacked())
        elif self.gemv:
            y = cpu_gemv.int4_mm(x, self.gemv_w, self.gemv_sm, self.out_features, _out_dtype(x))
        else:
            x16 = x.to(torch.bfloat16).contiguous()  # [T, in]
            y = torch._weight_int4pack_mm_for_cpu(x16, self.packed, GROUP, self.scale_zero)
        y = y.to(x.dtype)  # [T, out]
        return y if self.bias is None else y + self.bias

    def unpacked(self) -> Tensor:
        """The [out, in] weight the kernel multiplies by, `(code - 8) * scale + zero` in float32
        as it computes it, rounded to bfloat16 once. In place where it can: 2-3 ms for 3072 x 576
        on one core, where out-of-place ops (or a bfloat16 addcmul) took 5-8 ms."""
        out_f, in_f = self.out_features, self.in_features
        codes = torch.empty(out_f, in_f, dtype=torch.uint8, device=self.nibbles.device)
        torch.bitwise_and(self.nibbles, 15, out=codes[:, : in_f // 2])
        torch.bitwise_right_shift(self.nibbles, 4, out=codes[:, in_f // 2 :])
        w = codes.view(torch.int8).sub_(8).view(out_f, -1, GROUP).float()  # [out, in / G, G]
        scale, zero = self.scale_zero.transpose(0, 1).float().unbind(-1)  # [out, in / G] each
        w.mul_(scale[..., None]).add_(zero[..., None])
        return w.view(out_f, in_f).bfloat16()

    def split(self, y: Tensor) -> list[Tensor]:
        return list(y.split([hi - lo for lo, hi in self.offsets.values()], dim=-1))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of {GROUP}"


def _out_dtype(x: Tensor) -> torch.dtype:
    """What `_gemv` writes for x: its dtype where it can (no conversion after), else float32."""
    return x.dtype if x.dtype == torch.bfloat16 else torch.float32


def swap_int4_linears(model: nn.Module, names: Iterable[str]) -> list[str]:
    """Replace the `Linear` modules named `names` that the kernel can run by empty Int4Linears
    of the same shape, before the weights load; returns the names replaced."""
    swapped = []
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, Linear) or not Int4Linear.supports(*module.weight.shape):
            continue
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, Int4Linear.like(module))
        swapped.append(name)
    return swapped


# Below this many rows torch's int8 kernel beats bfloat16 `F.linear` on SmolLM2's 49152 x 576
# head (2.9 against 8.4 ms at one row, one core); its time grows ~2 ms a row, F.linear's hardly,
# and the two cross between 6 and 8 rows (perf/RESULTS.md, 2026-11-30). `_gemv`'s int8 kernel
# takes ~2 ms at 1-2 rows, ~4 at 8, 10-12 at 12-16, and crosses F.linear between 16 and 24 rows.
INT8PACK_HEAD_ROWS, GEMV_HEAD_ROWS = 6, 16
INT8_HEAD_ROWS = GEMV_HEAD_ROWS if cpu_gemv.available() else INT8PACK_HEAD_ROWS  # a CPU head's


class Int8Head(nn.Module):
    """The LM head `x W^T` with W [V, H] held as int8 with one bfloat16 scale per row, for
    decode-sized row counts (`_gemv`'s kernel with int16 activations and float32 logits where
    it is built, else `_weight_int8pack_mm` with bfloat16 activations and logits); from `rows`
    rows (16 with `_gemv`, 6 with torch's) the float weight it was made from (kept, not copied: a
    tied head shares it with the embedding lookup) and `F.linear`.

    Per-row scales re-round a GGUF Q8_0 matrix (one scale per 32 values): a row's step is its
    largest |w| / 127, so each weight moves by up to half of that (tests/test_quantized.py
    states the logit tolerance). One rank only: the head is not split for tensor parallelism."""

    def __init__(self, weight: Tensor, packed: dict[str, Tensor] | None = None):
        """`packed`: the buffers of an Int8Head of this weight (a cached load, runner/weight_cache.py),
        taken as they are instead of quantizing and packing the weight again."""
        super().__init__()
        self.weight = weight  # [V, H] the float head, a plain attribute: not a second parameter
        self.gemv = cpu_gemv.available() and weight.device.type == "cpu" and weight.shape[1] % GROUP == 0
        self.rows = GEMV_HEAD_ROWS if self.gemv else INT8PACK_HEAD_ROWS  # from here F.linear
        expected = {"gemv_w", "gemv_scale", "scale"} if self.gemv else {"codes", "scale"}
        if packed is not None and set(packed) != expected:
            raise KeyError(f"packed Int8Head buffers: got {sorted(packed)}, expected {sorted(expected)}")
        for name, tensor in (packed or self._pack(weight)).items():
            self.register_buffer(name, tensor)

    def _pack(self, weight: Tensor) -> dict[str, Tensor]:
        scale = (weight.abs().amax(dim=1).float() / 127).clamp_min(1e-12).bfloat16()  # [V]
        codes = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
        for lo in range(0, weight.shape[0], 2048):  # in slices that stay in cache: ~2x faster at load
            w = weight[lo : lo + 2048].float().div_(scale[lo : lo + 2048].float()[:, None])
            codes[lo : lo + 2048] = w.round_().clamp_(-127, 127)
        if not self.gemv:
            return {"codes": codes, "scale": scale}  # [V, H] int8
        # `_gemv`'s layout (int16 activations per group of 32) instead of torch's
        w, row_scale = cpu_gemv.pack_int8(codes, scale)
        return {"gemv_w": w, "gemv_scale": row_scale, "scale": scale}

    def logits(self, x: Tensor) -> Tensor:
        """[S, H] -> float32 [S, V]."""
        if x.shape[0] >= self.rows:
            return cpu_shapes.linear(x.to(self.weight.dtype), self.weight).float()
        if self.gemv:
            return cpu_gemv.int8_mm(x, self.gemv_w, self.gemv_scale, self.weight.shape[0])
        x16 = x.to(torch.bfloat16).contiguous()
        return torch.ops.aten._weight_int8pack_mm(x16, self.codes, self.scale).float()

    def dequantized(self) -> Tensor:
        """float32 [V, H]: the int8 weights times their row scales."""
        codes = self.codes if not self.gemv else self.gemv_w.permute(0, 3, 1, 2, 4)  # [V, H] (padded)
        codes = codes.reshape(-1, self.weight.shape[1])[: self.weight.shape[0]]
        return codes.float() * self.scale.float()[:, None]

    def extra_repr(self) -> str:
        kernel = "_gemv, int16 activations" if self.gemv else "torch's kernel"
        return f"{tuple(self.weight.shape)}, int8 with a scale per row below {self.rows} rows ({kernel})"


def pack_int8_head(model: nn.Module) -> None:
    """Give `model` (with `embed` and `lm_head`, None when tied) an Int8Head made from its head."""
    head = model.embed if model.lm_head is None else model.lm_head
    model.lm_head = Int8Head(head.weight)
