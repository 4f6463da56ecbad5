"""Configuration resolved once at start and passed down as frozen objects.

Nothing here imports torch: the frontend and the scheduler read these too.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")  # what kernels/rotary.py's rope_cache computes


def rope_type(rope_scaling: dict[str, Any] | None) -> str:
    """The kind of a rope_scaling dict ("default" for None), from `rope_type` or the legacy `type`."""
    if rope_scaling is None:
        return "default"
    return rope_scaling.get("rope_type", rope_scaling.get("type", "default"))


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family model, whatever file it came from."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False  # Qwen2 has q/k/v biases
    # None for plain rope; {"rope_type": "linear", "factor"}; or Llama-3's {"rope_type": "llama3",
    # "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    rope_scaling: dict[str, Any] | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"

    def __post_init__(self) -> None:
        # refused here, at load, rather than when an engine builds its rope cache
        if rope_type(self.rope_scaling) not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope scaling {rope_type(self.rope_scaling)!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Build from a HF config.json dictionary."""
        archs = cfg.get("architectures") or ["LlamaForCausalLM"]
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {arch!r}; supported: {SUPPORTED_ARCHITECTURES}")
        num_heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=cfg.get("rope_theta", 10000.0),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", arch == "Qwen2ForCausalLM")),
            rope_scaling=cfg.get("rope_scaling"),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF config.json equivalent, used to build a transformers reference."""
        d = {
            "architectures": [self.architecture],
            "model_type": {
                "LlamaForCausalLM": "llama",
                "MistralForCausalLM": "mistral",
                "Qwen2ForCausalLM": "qwen2",
            }[self.architecture],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids)
            if len(self.eos_token_ids) != 1
            else self.eos_token_ids[0],
            "torch_dtype": self.torch_dtype,
        }
        if self.architecture == "LlamaForCausalLM":
            d["attention_bias"] = self.attention_bias
        if self.rope_scaling is not None:
            d["rope_scaling"] = self.rope_scaling
        return d


@dataclass(frozen=True)
class EngineConfig:
    """What the engine process needs to know; built by the CLI, never edited."""

    model_path: str
    device: str = "auto"  # "auto" (cuda when present), "cpu" or "cuda[:N]"
    dtype: str = "auto"  # "auto", "float32", "bfloat16", "float16"
    load_format: str = "auto"  # "auto": the checkpoint; "random": random weights of its shape
    max_model_len: int = 2048
    max_running_requests: int = 64
    num_slots: int = 256
    max_num_batched_tokens: int = 2048  # per step: prefill chunk budget
    kv_cache_tokens: int = 0  # 0: derive from memory
    gpu_memory_utilization: float = 0.85
    disable_cuda_graph: bool = False
    seed: int = 0
    fail_after_steps: int = 0  # test hook: the device fails after N steps (runner/failing.py)
    dummy_step_time: float = 0.0  # --model dummy: seconds per step

    def replace(self, **kw: Any) -> EngineConfig:
        return dataclasses.replace(self, **kw)


@dataclass(frozen=True)
class ServerConfig:
    """Everything the CLI resolved; the engine part is passed to engine processes."""

    engine: EngineConfig
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str = "default"
    instance_id: str = field(default_factory=lambda: f"{os.getpid()}")
    log_level: str = "info"
    # The HTTP edge (frontend/edge.py, frontend/http_server.py)
    allowed_hosts: tuple[str, ...] = ()  # Host names answered besides loopback ones; "*": any
    allowed_origins: tuple[str, ...] = ()  # CORS origins; "*": any; none: no CORS headers
    max_connections: int = 1000  # open connections; beyond, 503 (0: no cap)
    read_timeout: float = 30.0  # seconds for a request's head, and again for its body
    shutdown_timeout: float = 30.0  # seconds in-flight requests may take after SIGTERM/SIGINT
