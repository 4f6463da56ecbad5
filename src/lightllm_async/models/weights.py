"""Checkpoint tensors into a model's parameters, row by row of its family's table
(`models/registry.py`): q/k/v and gate/up go into the rows of their merged linears, and a model
with tied embeddings takes no lm_head. The model files hold only modules and forward passes; a
module that rearranges its weights once they are all in (DeepSeek's MoE fusing its shared
experts into the routed ones) does it in a `finish_loading()` method, which runs last.

Tensor parallelism: every rank reads the same full checkpoint tensors and keeps its slice of
those its module splits. A module's `tp_dims` (`layers/linear.py`, `layers/embedding.py`) names the
split dim of each of its tensors; the model's `tp` gives the rank. Tensors of modules that split
nothing are copied whole, replicated on every rank.
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
    lists for that config must come exactly once, in its full shape, and nothing else may come;
    a rank of a tensor-parallel model (`model.tp`) keeps its shard of each tensor its module
    splits. Then each module's `finish_loading()`, where it has one, runs once."""
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
    dim = getattr(module, "tp_dims", {}).get(attr)
    if dim is not None:
        tensor = model.tp.shard(tensor, dim)
    if spec.part is not None:
        module.load_part(spec.part, attr, tensor)  # a MergedLinear or the experts: this part's rows
        return
    target = getattr(module, attr).data
    if dim is not None and tensor.shape[dim] < target.shape[dim]:  # a rank's padding rows
        target.narrow(dim, tensor.shape[dim], target.shape[dim] - tensor.shape[dim]).zero_()
        target = target.narrow(dim, 0, tensor.shape[dim])
    target.copy_(tensor)


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
