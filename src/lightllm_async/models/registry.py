"""Which checkpoint table each architecture reads. Torch-free.

A second family (say DeepSeek, in `deepseek.py` with its table in `deepseek_names.py`) adds its
architectures here; the loader, the GGUF reader, the tools and `weights.py` need no other change.
"""

from __future__ import annotations

from lightllm_async.config import ModelConfig
from lightllm_async.models.checkpoint import CheckpointTable, CheckpointTensor
from lightllm_async.models.deepseek_names import DEEPSEEK, DeepseekTable
from lightllm_async.models.llama_names import LLAMA

TABLES: dict[str, CheckpointTable | DeepseekTable] = {
    "LlamaForCausalLM": LLAMA,
    "MistralForCausalLM": LLAMA,
    "Qwen2ForCausalLM": LLAMA,
    "DeepseekV2ForCausalLM": DEEPSEEK,
    "DeepseekV3ForCausalLM": DEEPSEEK,
}


def checkpoint_tensors(cfg: ModelConfig) -> list[CheckpointTensor]:
    """Every tensor a checkpoint of `cfg` holds, in checkpoint order."""
    table = TABLES.get(cfg.architecture)
    if table is None:
        raise ValueError(f"no checkpoint table for {cfg.architecture!r}; known: {sorted(TABLES)}")
    return table.tensors(cfg)
