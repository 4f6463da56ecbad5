"""A GGUF model's weights as loaded and packed, kept on disk so that the next start reads one file.

Loading the default model (issue 12) decodes the GGUF's 4-bit blocks, repacks them twice (the
unpacking layout and `_gemv`'s), dequantizes the Q8_0 embedding to bfloat16 and quantizes it again
for the int8 LM head: ~0.6-1 s on a 2-core machine, where reading the result back takes ~0.1 s.

The cached file is the model's `state_dict()` after packing (safetensors: no pickle, its header
checked on read; the int8 head's float weight left out where it is the embedding's). It is named
by a hash of everything that decides those bytes (`cache_key`): the GGUF's path, size, mtime and inode,
CACHE_VERSION, the dtype, the packed layers, whether `_gemv` is built, torch's version. The key is
also stored in the file and compared on read. A missing, unreadable, corrupt or mismatching file
is a miss: the model is loaded from the GGUF and the file written again.

Writes go to a private temporary file (0600) in the directory (0700, owned by us, or the cache is
not used) and are renamed into place, so two servers starting at once each write a whole file
and a reader never sees half of one. Entries of the same GGUF path under another key (the file
changed, a new version of this code or of torch) are removed when a new one is written; those of
another dtype or packing stay, for a server that loads it that way.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import stat
import tempfile
import time

import torch
from torch import Tensor, nn

from lightllm_async.kernels import cpu_gemv
from lightllm_async.layers.quantized import Int4Linear, Int8Head

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when packing, or what the model holds after it, changes
_VARIANT = ("source", "dtype", "packed", "gemv")  # servers may load one GGUF in several ways at once
_HEAD_WEIGHT = "lm_head.weight"  # an untied head's float weight (Int8Head keeps it as an attribute)


def cache_key(model_path: str, dtype: torch.dtype, packed: list[str]) -> dict[str, str]:
    """What decides the packed weights of `model_path` loaded in `dtype` with the layers `packed`."""
    st = os.stat(model_path)
    return {
        "version": str(CACHE_VERSION),
        "source": os.path.realpath(model_path),
        "size": str(st.st_size),
        "mtime_ns": str(st.st_mtime_ns),
        "inode": str(st.st_ino),
        "dtype": str(dtype),
        "packed": hashlib.sha256("\n".join(sorted(packed)).encode()).hexdigest(),
        "gemv": str(cpu_gemv.available()),
        "torch": torch.__version__,
    }


class WeightCache:
    """One model's entry in `directory` (a private directory: see the module's docstring)."""

    def __init__(self, directory: str, key: dict[str, str]):
        self.directory, self.key = directory, json.dumps(key, sort_keys=True)
        variant = json.dumps({k: key[k] for k in _VARIANT}, sort_keys=True)
        # every entry of this GGUF path loaded this way, whichever file and version it was made from
        self.prefix = f"{hashlib.sha256(variant.encode()).hexdigest()[:16]}-"
        self.path = os.path.join(
            directory, f"{self.prefix}{hashlib.sha256(self.key.encode()).hexdigest()[:32]}.safetensors"
        )

    def load(self) -> dict[str, Tensor] | None:
        """The cached state, or None (a miss: absent, unreadable, corrupt, another key)."""
        if not os.path.exists(self.path) or not _private_dir(self.directory, create=False):
            return None
        from safetensors import safe_open

        try:
            with safe_open(self.path, framework="pt") as f:
                if (f.metadata() or {}).get("key") != self.key:
                    log.warning("weight cache %s holds another model's weights: rebuilding it", self.path)
                    return None
                return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - not a dict
        except Exception as exc:  # noqa: BLE001 - whatever is wrong with the file, it is rebuilt
            log.warning("weight cache %s is unreadable (%s): rebuilding it", self.path, exc)
            return None

    def store(self, state: dict[str, Tensor]) -> None:
        """Write `state` as this key's entry (atomically), and drop this GGUF's other entries. A
        failure is logged, never raised: the server runs as well without the cache."""
        from safetensors.torch import save_file

        tmp = None
        try:
            if not _private_dir(self.directory, create=True):
                return
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".safetensors")
            os.close(fd)
            save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata={"key": self.key})
            os.replace(tmp, self.path)
            tmp = None
            self._remove_stale()
        except Exception as exc:  # noqa: BLE001 - a full disk, a read-only home: serve without it
            log.warning("could not write the weight cache in %s: %s", self.directory, exc)
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)

    def _remove_stale(self) -> None:
        """This GGUF's entries under other keys, and temporary files left by a killed writer."""
        now = time.time()
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            stale = name.startswith(self.prefix) and path != self.path
            stale_tmp = name.startswith(".tmp-")
            with contextlib.suppress(OSError):  # another server removed it first
                if stale or (stale_tmp and now - os.stat(path).st_mtime > 3600):
                    os.unlink(path)


def packed_state(model: nn.Module) -> dict[str, Tensor]:
    """What a cache entry holds of a loaded, packed model: its state_dict, without the int8 head's
    float weight where that is the embedding's (tied)."""
    state = dict(model.state_dict())
    head = getattr(model, "lm_head", None)
    if isinstance(head, Int8Head):
        if head.weight is model.embed.weight:
            state.pop(_HEAD_WEIGHT, None)
        else:  # a Parameter is in the state_dict already; a plain tensor is not
            state[_HEAD_WEIGHT] = head.weight
    return state


def restore(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Put a cache entry into a freshly built `model` whose int4 layers are swapped in (as for a
    load from the GGUF) and which has no weights yet: afterwards it holds what loading and
    packing would have given it. Raises KeyError/ValueError where the entry does not fit
    (the model is then half-restored: build another)."""
    rest = dict(state)
    for name, module in model.named_modules():
        if isinstance(module, Int4Linear):
            names = Int4Linear.PACKED_BUFFERS
            buffers = {n: state[f"{name}.{n}"] for n in names if f"{name}.{n}" in state}
            module.load_packed(buffers)  # its buffers' names now those of the entry
    head = {k.removeprefix("lm_head."): rest.pop(k) for k in list(rest) if k.startswith("lm_head.")}
    head_weight = head.pop("weight", None)
    if head:  # an int8 head: the float weight is the embedding's when tied
        model.lm_head = None
    missing, unexpected = model.load_state_dict(rest, strict=False, assign=True)
    if missing or unexpected:
        raise KeyError(f"weight cache entry: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if head:
        model.lm_head = Int8Head(model.embed.weight if head_weight is None else head_weight, packed=head)
    got = packed_state(model)
    if got.keys() != state.keys() or any(got[k].shape != state[k].shape for k in state):
        raise ValueError("weight cache entry does not match the model's shapes")


def _private_dir(path: str, create: bool) -> bool:
    """Whether `path` is a directory only we can write (made 0700 where we create it); logged when not."""
    try:
        if create:
            os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.stat(path)
    except OSError as exc:
        if create:
            log.warning("weight cache directory %s: %s", path, exc)
        return False
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        log.warning("weight cache directory %s is not a private directory of this user: not used", path)
        return False
    return True
