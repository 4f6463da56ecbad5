"""The atomics used by the shared-memory layout: the compiled `lightllm_async._atomics` when it can
be found, else the pure-Python reference (`atomics_ref`, not atomic across processes) with a warning.

Where to find the compiled module, in order: the package itself (an installed or in-place build);
then, when the package is imported from a source tree (`PYTHONPATH=src`), an installed copy of the
extension elsewhere on `sys.path` (site-packages, a `pip install --target` folder).
Set LLA_REQUIRE_C=1 to make a missing extension an ImportError instead of a fallback.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import warnings
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


def _load() -> ModuleType | None:
    try:
        from lightllm_async import _atomics

        return _atomics
    except ImportError:
        return _find_installed()


native: ModuleType | None = _load()
IS_NATIVE = native is not None
if native is None:
    if os.environ.get("LLA_REQUIRE_C") == "1":
        raise ImportError(
            "lightllm_async._atomics is not built (LLA_REQUIRE_C=1); run `pip install --no-build-isolation .`"
        )
    warnings.warn(
        "lightllm_async._atomics is not built: using the pure-Python atomics, which are NOT atomic "
        "between processes. Run `pip install --no-build-isolation .`.",
        RuntimeWarning,
        stacklevel=2,
    )
    from lightllm_async.ipc import atomics_ref as _impl
else:
    _impl = native

load_acquire_u32 = _impl.load_acquire_u32
load_acquire_u64 = _impl.load_acquire_u64
store_release_u32 = _impl.store_release_u32
store_release_u64 = _impl.store_release_u64
cas_u32 = _impl.cas_u32
cas_u64 = _impl.cas_u64
fetch_add_u32 = _impl.fetch_add_u32
fetch_add_u64 = _impl.fetch_add_u64
fence_seq_cst = _impl.fence_seq_cst
slot_stack_nbytes = _impl.slot_stack_nbytes
slot_stack_init = _impl.slot_stack_init
slot_stack_pop = _impl.slot_stack_pop
slot_stack_push = _impl.slot_stack_push
slot_stack_count = _impl.slot_stack_count
gather_acquire_u32 = _impl.gather_acquire_u32
gather_acquire_u64 = _impl.gather_acquire_u64
scatter_release_u32 = _impl.scatter_release_u32
spin_while_equal_u64 = _impl.spin_while_equal_u64
relay_start = _impl.relay_start
relay_stop = _impl.relay_stop
