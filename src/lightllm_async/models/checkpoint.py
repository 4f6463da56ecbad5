"""What a model family's checkpoint table is: one row per tensor, naming it in HF and in GGUF files,
giving its shape and the model parameter it fills.

Torch-free: the loader, the GGUF reader, the random-model tool and the weight loading
(`models/weights.py`) all read the same rows, so checkpoint names live in the tables alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lightllm_async.config import ModelConfig

LAYER = "{layer}"  # in a row's names: the row stands for one tensor per decoder layer


@dataclass(frozen=True)
class TensorSpec:
    """One row of a table, `{layer}` standing for the layer index in its names."""

    hf: str  # HF name, e.g. "model.layers.{layer}.self_attn.q_proj.weight"
    gguf: str  # llama.cpp name, e.g. "blk.{layer}.attn_q.weight"
    shape: tuple[str, ...]  # the table's dims by name, in torch order ([out, in] for a matrix)
    param: str  # the model parameter it fills, e.g. "layers.{layer}.attn.qkv.weight"
    part: str | None = None  # the part of a merged parameter it fills ("q" of q|k|v), if any
    when: Callable[[ModelConfig], bool] | None = None  # present only in the configs it accepts
    rope_heads: str | None = None  # dim counting the rope heads in these rows (llama.cpp permutes them)
    norm: bool = False  # a norm weight: random weights start near 1, not near 0


@dataclass(frozen=True)
class CheckpointTensor:
    """A row resolved for one config and layer: what the loaders and the tools use."""

    hf: str
    gguf: str
    shape: tuple[int, ...]
    param: str
    part: str | None
    rope_heads: int | None
    norm: bool


@dataclass(frozen=True)
class CheckpointTable:
    """A family's rows and the dims their shapes name. Per-layer rows must be consecutive: the
    checkpoint order is the rows before them, every layer's rows, then the rows after them."""

    dims: Callable[[ModelConfig], dict[str, int]]
    rows: tuple[TensorSpec, ...]

    def tensors(self, cfg: ModelConfig) -> list[CheckpointTensor]:
        """Every tensor a checkpoint of `cfg` holds, in checkpoint order."""
        dims = self.dims(cfg)
        rows = [r for r in self.rows if r.when is None or r.when(cfg)]
        per_layer = [r for r in rows if LAYER in r.hf]
        out: list[CheckpointTensor] = []
        for row in rows:
            if LAYER not in row.hf:
                out.append(_resolve(row, dims, ""))
            elif row is per_layer[0]:
                out += [_resolve(r, dims, str(i)) for i in range(cfg.num_layers) for r in per_layer]
        return out


def _resolve(row: TensorSpec, dims: dict[str, int], layer: str) -> CheckpointTensor:
    return CheckpointTensor(
        hf=row.hf.replace(LAYER, layer),
        gguf=row.gguf.replace(LAYER, layer),
        shape=tuple(dims[d] for d in row.shape),
        param=row.param.replace(LAYER, layer),
        part=row.part,
        rope_heads=None if row.rope_heads is None else dims[row.rope_heads],
        norm=row.norm,
    )
