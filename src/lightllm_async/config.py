"""Configuration resolved once at start and passed down as frozen objects.

Nothing here imports torch: the frontend and the scheduler read these too.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

DEEPSEEK_ARCHITECTURES = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    *DEEPSEEK_ARCHITECTURES,
)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")  # what kernels/rotary.py's rope_cache computes
DEEPSEEK_ROPE_TYPES = ("default", "yarn")  # what models/deepseek.py's mla_rope_cache computes
# expert routing each DeepSeek architecture defines (its reference code refuses the others)
DEEPSEEK_TOPK_METHODS = {
    "DeepseekV2ForCausalLM": ("greedy", "group_limited_greedy"),
    "DeepseekV3ForCausalLM": ("noaux_tc",),
}
_SCORING = {"greedy": "softmax", "group_limited_greedy": "softmax", "noaux_tc": "sigmoid"}


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
    # DeepSeek V2/V3 (MLA + MoE); unused by the Llama family. rope_scaling may then be YaRN:
    # {"rope_type": "yarn", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
    # "mscale", "mscale_all_dim"}. head_dim is qk_nope_head_dim + qk_rope_head_dim there.
    q_lora_rank: int | None = None  # None: one q_proj (V2-Lite); else q_a_proj -> norm -> q_b_proj
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = True  # the checkpoints' rope dims come in (x0, x1), (x2, x3) pairs
    first_k_dense_replace: int = 0  # the first k layers have a dense MLP, the rest MoE
    n_shared_experts: int = 0
    n_routed_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    topk_method: str = "greedy"
    n_group: int | None = None
    topk_group: int | None = None
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        # refused here, at load, rather than when an engine builds its rope cache
        if self.is_deepseek:
            self._check_deepseek()
        elif rope_type(self.rope_scaling) not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope scaling {rope_type(self.rope_scaling)!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )

    @property
    def is_deepseek(self) -> bool:
        return self.architecture in DEEPSEEK_ARCHITECTURES

    def _check_deepseek(self) -> None:
        arch, kind = self.architecture, rope_type(self.rope_scaling)
        if kind not in DEEPSEEK_ROPE_TYPES:
            raise ValueError(
                f"{arch}: rope scaling {kind!r} is not supported; supported: {', '.join(DEEPSEEK_ROPE_TYPES)}"
            )
        if kind == "yarn":
            missing = [
                k for k in ("factor", "original_max_position_embeddings") if k not in self.rope_scaling
            ]
            if missing:
                raise ValueError(f"{arch}: yarn rope scaling lacks {missing}")
            if self.rope_scaling.get("attention_factor") is not None:
                raise ValueError(
                    f"{arch}: yarn attention_factor is not supported (mscale/mscale_all_dim are)"
                )
        dims = dict(
            kv_lora_rank=self.kv_lora_rank,
            qk_nope_head_dim=self.qk_nope_head_dim,
            qk_rope_head_dim=self.qk_rope_head_dim,
            v_head_dim=self.v_head_dim,
            n_routed_experts=self.n_routed_experts,
            num_experts_per_tok=self.num_experts_per_tok,
            moe_intermediate_size=self.moe_intermediate_size,
        )
        bad = [k for k, v in dims.items() if not v or v < 0]
        if bad:
            raise ValueError(f"{arch}: {', '.join(bad)} must be positive")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"{arch}: qk_rope_head_dim {self.qk_rope_head_dim} must be even")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ValueError(f"{arch}: q_lora_rank must be positive or null")
        if self.attention_bias:
            raise ValueError(f"{arch}: attention_bias is not supported")
        methods = DEEPSEEK_TOPK_METHODS[arch]
        if self.topk_method not in methods:
            raise ValueError(
                f"{arch}: topk_method {self.topk_method!r} is not supported; supported: {methods}"
            )
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError(f"{arch}: num_experts_per_tok {self.num_experts_per_tok} > n_routed_experts")
        if self.topk_method != "greedy":
            g, tg = self.n_group, self.topk_group
            if not g or not tg or self.n_routed_experts % g or tg > g:
                raise ValueError(
                    f"{arch}: topk_method {self.topk_method!r} needs n_group dividing n_routed_experts "
                    f"({self.n_routed_experts}) and 1 <= topk_group <= n_group; got {g}, {tg}"
                )
        if not 0 <= self.first_k_dense_replace <= self.num_layers or self.n_shared_experts < 0:
            raise ValueError(f"{arch}: bad first_k_dense_replace or n_shared_experts")

    @property
    def mla_softmax_scale(self) -> float:
        """DeepSeek's attention scale: (nope + rope dims)^-0.5, times mscale^2 under YaRN, where
        mscale = 0.1 * mscale_all_dim * ln(factor) + 1 (as DeepSeek's and transformers' code)."""
        scale = (self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5
        if rope_type(self.rope_scaling) != "default":
            mscale_all_dim = self.rope_scaling.get("mscale_all_dim") or 0
            factor = self.rope_scaling["factor"]
            if mscale_all_dim and factor > 1:
                m = 0.1 * mscale_all_dim * math.log(factor) + 1.0
                scale = scale * m * m
        return scale

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
        extra = _deepseek_fields(arch, cfg) if arch in DEEPSEEK_ARCHITECTURES else {}
        rope_scaling = cfg.get("rope_scaling")
        if rope_scaling is None and isinstance(cfg.get("rope_parameters"), dict):  # transformers 5
            params = {k: v for k, v in cfg["rope_parameters"].items() if k != "rope_theta"}
            rope_scaling = params if rope_type(params) != "default" else None
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=(extra["qk_nope_head_dim"] + extra["qk_rope_head_dim"])
            if extra
            else cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", arch == "Qwen2ForCausalLM")),
            rope_scaling=rope_scaling,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
            **extra,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF config.json equivalent, used to build a transformers reference."""
        d = {
            "architectures": [self.architecture],
            "model_type": {
                "LlamaForCausalLM": "llama",
                "MistralForCausalLM": "mistral",
                "Qwen2ForCausalLM": "qwen2",
                "DeepseekV2ForCausalLM": "deepseek_v2",
                "DeepseekV3ForCausalLM": "deepseek_v3",
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
        if self.is_deepseek:
            d.update(
                q_lora_rank=self.q_lora_rank,
                kv_lora_rank=self.kv_lora_rank,
                qk_nope_head_dim=self.qk_nope_head_dim,
                qk_rope_head_dim=self.qk_rope_head_dim,
                v_head_dim=self.v_head_dim,
                first_k_dense_replace=self.first_k_dense_replace,
                n_shared_experts=self.n_shared_experts,
                n_routed_experts=self.n_routed_experts,
                num_experts_per_tok=self.num_experts_per_tok,
                moe_intermediate_size=self.moe_intermediate_size,
                topk_method=self.topk_method,
                scoring_func=_SCORING[self.topk_method],
                n_group=self.n_group,
                topk_group=self.topk_group,
                norm_topk_prob=self.norm_topk_prob,
                routed_scaling_factor=self.routed_scaling_factor,
                moe_layer_freq=1,
                attention_bias=self.attention_bias,
                num_nextn_predict_layers=0,
            )
            del d["head_dim"]  # transformers derives it (the rope dim) itself
            if self.architecture == "DeepseekV3ForCausalLM":
                d["rope_interleave"] = self.rope_interleave
        return d


def _deepseek_fields(arch: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """The DeepSeek part of a config.json; settings the model cannot honour raise ValueError."""
    default_method = "noaux_tc" if arch == "DeepseekV3ForCausalLM" else "greedy"
    method = cfg.get("topk_method") or default_method
    scoring = cfg.get("scoring_func")
    if scoring is not None and method in _SCORING and scoring != _SCORING[method]:
        raise ValueError(f"{arch}: scoring_func {scoring!r} with topk_method {method!r} is not supported")
    if cfg.get("moe_layer_freq", 1) != 1:
        raise ValueError(f"{arch}: moe_layer_freq {cfg['moe_layer_freq']} is not supported (only 1)")
    quant = cfg.get("quantization_config")
    if quant:  # e.g. the released V3/R1 weights: fp8 blocks with weight_scale_inv tensors
        raise ValueError(
            f"{arch}: quantized checkpoints ({quant.get('quant_method', quant)!r}) are not supported; "
            "convert the weights to bfloat16 first"
        )
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{arch}: hidden_act {cfg['hidden_act']!r} is not supported (only silu)")
    n_routed = cfg.get("n_routed_experts") or cfg.get("num_local_experts") or cfg.get("num_experts") or 0
    return dict(
        q_lora_rank=cfg.get("q_lora_rank"),
        kv_lora_rank=cfg.get("kv_lora_rank", 0),
        qk_nope_head_dim=cfg.get("qk_nope_head_dim", 0),
        qk_rope_head_dim=cfg.get("qk_rope_head_dim", 0),
        v_head_dim=cfg.get("v_head_dim", 0),
        # transformers' V2 always interleaves; its V3 reads rope_interleave (default true)
        rope_interleave=bool(cfg.get("rope_interleave", True)) if arch == "DeepseekV3ForCausalLM" else True,
        first_k_dense_replace=cfg.get("first_k_dense_replace") or 0,
        n_shared_experts=cfg.get("n_shared_experts") or 0,
        n_routed_experts=n_routed,
        num_experts_per_tok=cfg.get("num_experts_per_tok") or 0,
        moe_intermediate_size=cfg.get("moe_intermediate_size", 0),
        topk_method=method,
        n_group=cfg.get("n_group"),
        topk_group=cfg.get("topk_group"),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
    )


@dataclass(frozen=True)
class EngineConfig:
    """What the engine process needs to know; built by the CLI, never edited."""

    model_path: str
    device: str = "auto"  # "auto" (cuda when present), "cpu" or "cuda[:N]"
    dtype: str = "auto"  # "auto", "float32", "bfloat16", "float16"
    # "auto": a GGUF's 4-bit weights kept packed on the CPU, dequantized elsewhere; "none":
    # every weight dequantized (the float reference); "int4": packed, or an error (runner/model_runner.py)
    quantization: str = "auto"
    load_format: str = "auto"  # "auto": the checkpoint; "random": random weights of its shape
    max_model_len: int = 2048
    max_running_requests: int = 64
    num_slots: int = 256
    max_num_batched_tokens: int = 1024  # per step: prefill chunk budget (the CLI: server.default_chunk)
    kv_cache_tokens: int = 0  # 0: derive from memory
    # "auto": the model's dtype; "fp8": float8 e4m3 with no scale (values past +-448 saturate),
    # half the bytes a decode reads and twice the tokens; Llama-family models on CUDA (runner)
    kv_cache_dtype: str = "auto"
    gpu_memory_utilization: float = 0.85
    disable_cuda_graph: bool = False
    # steps with prefill chunks run eagerly instead of replaying piecewise graphs (runner/piecewise.py)
    disable_piecewise_graph: bool = False
    disable_prefix_cache: bool = False
    seed: int = 0
    fail_after_steps: int = 0  # test hook: the device fails after N steps (runner/failing.py)
    dummy_step_time: float = 0.0  # --model dummy: seconds per step
    cpu_threads: int = 0  # the engine's torch intra-op threads (0: the cores left after the frontend)
    cpu_compile: bool = False  # CPU decode steps by torch.compile, compiled before ready (runner/cpu_step.py)
    # CPU decode steps: "auto" the C step (runner/cpu_native.py) where the model is int4-packed and the
    # extension built, else torch's (compiled with cpu_compile); "c" the C step or an error; "torch" never C
    cpu_step: str = "auto"
    # where a GGUF's packed weights are cached between starts (runner/weight_cache.py); "": not cached
    weight_cache_dir: str = ""
    # Tensor parallelism: this process is rank `tp_rank` of `tp_size` (its replica's group), which
    # meet at `dist_init` (a torch.distributed init_method URL)
    tp_size: int = 1
    tp_rank: int = 0
    dist_init: str = ""
    nnodes: int = 1  # hosts the ranks span: above 1, step records are broadcast (engine/plan_broadcast.py)
    # Prefill/decode disaggregation (--pd; engine/disagg.py): this replica's role ("prefill",
    # "decode"; "" without --pd), and the group of every prefill and decode engine (rank = replica)
    pd_role: str = ""
    pd_init: str = ""
    pd_world: int = 0
    # --role prefill|decode: this engine's rank in that group, whose other members are engines of
    # other servers (watched by heartbeats: runner/kv_transfer.watch_peers); -1: the replica index
    pd_rank: int = -1

    def replace(self, **kw: Any) -> EngineConfig:
        return dataclasses.replace(self, **kw)


def default_cache_dir() -> str:
    """$LLA_CACHE_DIR ("off": none), else $XDG_CACHE_HOME/lightllm-async, else ~/.cache/lightllm-async."""
    env = os.environ.get("LLA_CACHE_DIR")
    if env is not None:
        return "" if env in ("", "off") else env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lightllm-async")


def rank_device(device: str, replica: int, rank: int = 0, ranks_per_replica: int = 1) -> str:
    """The device of rank `rank` of data-parallel replica `replica`, from the --device given
    (with "auto" already resolved to "cuda" or "cpu"): replica k's ranks take the GPUs
    k * ranks_per_replica ... k * ranks_per_replica + ranks_per_replica - 1, counted from the GPU
    --device names ("cuda" is GPU 0; "cuda:2" starts them at GPU 2). "cpu" stays "cpu".
    Tensor parallelism (--tp) passes its rank and ranks per replica here."""
    if device == "cpu":
        return device
    kind, _, index = device.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {device!r}")
    if not 0 <= rank < ranks_per_replica or replica < 0:
        raise ValueError(f"no rank {rank} of {ranks_per_replica} in replica {replica}")
    return f"cuda:{int(index or 0) + replica * ranks_per_replica + rank}"


@dataclass(frozen=True)
class ServerConfig:
    """Everything the CLI resolved; the engine part is passed to engine processes (each of the
    `dp` data-parallel replicas runs one with it, see rank_device)."""

    engine: EngineConfig
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str = "default"
    instance_id: str = field(default_factory=lambda: f"{os.getpid()}")
    dp: int = 1  # data-parallel engine replicas behind the one frontend (--dp)
    # --pd prefill=N,decode=M: replicas 0..N-1 prefill, N..N+M-1 decode (then dp = N + M); 0: off
    pd_prefill: int = 0
    log_level: str = "info"
    # The HTTP edge (frontend/edge.py, frontend/http_server.py)
    allowed_hosts: tuple[str, ...] = ()  # Host names answered besides loopback ones; "*": any
    allowed_origins: tuple[str, ...] = ()  # CORS origins; "*": any; none: no CORS headers
    max_connections: int = 1000  # open connections; beyond, 503 (0: no cap)
    read_timeout: float = 30.0  # seconds for a request's head, and again for its body
    shutdown_timeout: float = 30.0  # seconds in-flight requests may take after SIGTERM/SIGINT
    api_key: str | None = field(default=None, repr=False)  # --api-key / LLA_API_KEY; never in a repr
    # Ranks across hosts (engine.nnodes > 1): this host's index, and where rank 0's rendezvous is
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0  # 0: a free port (one host only)
    # --role prefill|decode|router ("": none); the secret of the internal endpoints; a router's servers
    role: str = ""
    pd_secret: str | None = field(default=None, repr=False)
    router_prefill: tuple[str, ...] = ()
    router_decode: tuple[str, ...] = ()
    # --role router: seconds a role server may stay silent during a request (each of connecting,
    # the response's head, every gap between its events) before the request fails as hung
    pd_upstream_timeout: float = 60.0
