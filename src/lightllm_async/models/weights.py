"""Checkpoint tensors into a model's parameters, row by row of its family's table
(`models/registry.py`): q/k/v and gate/up go into the rows of their merged linears, and a model
with tied embeddings takes no lm_head. The model files hold only modules and forward passes; a
module that rearranges its weights once they are all in (DeepSeek's MoE fusing its shared
experts into the routed ones) does it in a `finish_loading()` method, which runs last.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from lightllm_async.config import ModelConfig
from lightllm_async.layers.quantized import Int4Linear, Int4Weight
from lightllm_async.models.checkpoint import CheckpointTensor
from lightllm_async.models.registry import checkpoint_tensors


def load_weights(model: nn.Module, weights: Iterable[tuple[str, Tensor | Int4Weight]]) -> None:
    """Copy HF-named tensors into `model` (which has a `cfg: ModelConfig`). Every tensor the table
    lists for that config must come exactly once, in its shape, and nothing else may come. Then
    each module's `finish_loading()`, where it has one, runs once."""
    wanted = {t.hf: t for t in checkpoint_tensors(model.cfg)}
    for name, tensor in weights:
        spec = wanted.pop(name, None)
        if spec is None:
            arch = model.cfg.architecture
            raise ValueError(f"unexpected tensor {name!r}: not in the {arch} table, or given twice")
        _copy_into(model, spec, tensor)
    if wanted:
        raise ValueError(f"checkpoint lacks {len(wanted)} tensors, e.g. {sorted(wanted)[:4]}")
    for module in list(model.modules()):  # a copy: finish_loading may drop submodules
        if hasattr(module, "finish_loading"):
            module.finish_loading()


def _copy_into(model: nn.Module, spec: CheckpointTensor, tensor: Tensor) -> None:
    if tuple(tensor.shape) != spec.shape:
        raise ValueError(f"{spec.hf}: shape {tuple(tensor.shape)}, expected {spec.shape}")
    owner, _, attr = spec.param.rpartition(".")
    module = model.get_submodule(owner)
    if isinstance(module, Int4Linear):  # a 4-bit weight kept packed (layers/quantized.py)
        module.load_part(spec.part, attr, tensor)
        return
    if isinstance(tensor, Int4Weight):  # a 4-bit tensor for a float parameter
        tensor = tensor.dequantize()
    if spec.part is None:
        getattr(module, attr).data.copy_(tensor)
    else:
        module.load_part(spec.part, attr, tensor)  # a MergedLinear: its rows for this part


def random_weights(
    cfg: ModelConfig, seed: int, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> Iterator[tuple[str, Tensor]]:
    """A random checkpoint of `cfg`, one tensor at a time in checkpoint order: normal(0, 0.02),
    norm weights 1 + normal(0, 0.02). The same seed and device give the same tensors."""
    gen = torch.Generator(device=device).manual_seed(seed)
    for spec in checkpoint_tensors(cfg):
        t = torch.randn(spec.shape, generator=gen, device=device, dtype=torch.float32).mul_(0.02)
        if spec.norm:
            t.add_(1.0)
        yield spec.hf, t.to(dtype)
