"""The atomics used by the shared-memory layout: the compiled `lightllm_async._atomics`, required.

There is no pure-Python fallback: one could not be atomic between processes, so a missing build
would show up as rare corruption under load instead of an error at import. tests/atomics_ref.py
is the specification the compiled module is tested against.

Where to find the compiled module, in order: the package itself (an installed or in-place build);
then, when the package is imported from a source tree (`PYTHONPATH=src`), an installed copy of the
extension elsewhere on `sys.path` (site-packages, a `pip install --target` folder).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from types import ModuleType

_NAME = "lightllm_async._atomics"


def _find_installed() -> ModuleType | None:
    """Load `_atomics` from another `lightllm_async` folder on sys.path (same ABI suffixes only)."""
    for entry in sys.path:
        folder = os.path.join(entry or ".", "lightllm_async")
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = os.path.join(folder, "_atomics" + suffix)
            if not os.path.isfile(path):
                continue
            spec = importlib.util.spec_from_file_location(_NAME, path)
            if spec is None or spec.loader is None:
                continue
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            sys.modules[_NAME] = module
            return module
    return None


def _load() -> ModuleType:
    try:
        from lightllm_async import _atomics

        return _atomics
    except ImportError:
        pass
    module = _find_installed()
    if module is None:
        raise ImportError(
            "lightllm_async._atomics is not built: run `pip install --no-build-isolation .` "
            "(or `-e .` in a source tree)"
        )
    return module


native: ModuleType = _load()

load_acquire_u32 = native.load_acquire_u32
load_acquire_u64 = native.load_acquire_u64
store_release_u32 = native.store_release_u32
store_release_u64 = native.store_release_u64
cas_u32 = native.cas_u32
cas_u64 = native.cas_u64
fetch_add_u32 = native.fetch_add_u32
fetch_add_u64 = native.fetch_add_u64
fence_seq_cst = native.fence_seq_cst
slot_stack_nbytes = native.slot_stack_nbytes
slot_stack_init = native.slot_stack_init
slot_stack_pop = native.slot_stack_pop
slot_stack_push = native.slot_stack_push
slot_stack_count = native.slot_stack_count
gather_acquire_u32 = native.gather_acquire_u32
gather_acquire_u64 = native.gather_acquire_u64
scatter_release_u32 = native.scatter_release_u32
spin_while_equal_u64 = native.spin_while_equal_u64
relay_start = native.relay_start
relay_stop = native.relay_stop
