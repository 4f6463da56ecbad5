"""ARCHITECTURE.md §7 as a test: server -> frontend | engine -> runner -> models -> layers -> kernels
-> ipc -> config/types. Frontend and engine never import each other; the frontend, the engine loop,
the scheduler, the KV pools, ipc and the tokenizer never import torch. Imports are read from the
source (AST), relative ones resolved, so a lazy import inside a function counts too; every part of
the package is named, tools and formats included.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "src" / "lightllm_async"

# Every part of the package and the parts it may import from (besides itself), top to bottom.
# `base` is the bottom: config.py, types.py, batch.py and the C extension.
ALLOWED = {
    "server": {"frontend", "engine", "runner", "models", "tokenizer", "ipc", "formats", "base"},
    "tools": {"models", "tokenizer", "formats", "base"},
    "frontend": {"ipc", "tokenizer", "base"},
    "engine": {"runner", "models", "layers", "kernels", "ipc", "base"},
    "runner": {"models", "layers", "kernels", "base"},
    "models": {"layers", "kernels", "formats", "base"},
    "layers": {"kernels", "base"},
    "kernels": {"base"},
    "ipc": {"base"},
    "tokenizer": {"formats", "base"},
    "formats": {"base"},
    "base": set(),
}
# What each top-level name in the package is: a new module or package must be placed here.
PARTS = {
    "server": "server",
    "systemd": "server",  # the command's talk with its supervisor
    "tools": "tools",
    "frontend": "frontend",
    "engine": "engine",
    "runner": "runner",
    "models": "models",
    "layers": "layers",
    "kernels": "kernels",
    "ipc": "ipc",
    "tokenizer": "tokenizer",
    "formats": "formats",
    "config": "base",
    "types": "base",
    "batch": "base",
    "_atomics": "base",
    "_gemv": "kernels",  # the compiled half of kernels/cpu_gemv.py
    "__init__": "base",
}
TORCH_FREE = [
    "frontend",
    "ipc",
    "engine/scheduler.py",
    "engine/kv_pool.py",
    "engine/kv_manager.py",
    "engine/radix_cache.py",
    "engine/request.py",
    "engine/engine.py",
    "tokenizer.py",
    "formats",
    "config.py",
    "types.py",
    "batch.py",
]


def part_of(module: str) -> str:
    """'lightllm_async.engine.scheduler' -> 'engine'; 'lightllm_async' -> 'base'."""
    parts = module.split(".")
    return PARTS[parts[1] if len(parts) > 1 else "__init__"]


def imports_of(path: pathlib.Path, module: str = "") -> set[str]:
    """Absolute names of every module `path` imports; relative imports are resolved against
    `module` (the importing module's dotted name)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from . import x` names modules
    return found


def modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        yield ".".join(rel.parts).removesuffix(".__init__"), path


def test_every_part_of_the_package_has_a_layer():
    names = {p.name.split(".")[0] for p in PKG.iterdir() if p.name != "__pycache__"}
    names = {n.removesuffix(".py") for n in names}
    assert names <= set(PARTS), f"place these in PARTS: {sorted(names - set(PARTS))}"


def test_relative_imports_are_resolved():
    """The checker itself: a relative import counts like an absolute one."""
    path = PKG / "frontend" / "app.py"
    found = imports_of(path, "lightllm_async.frontend.app")
    assert "lightllm_async.frontend.service" in found


@pytest.mark.parametrize("module,path", list(modules()), ids=lambda x: str(x) if isinstance(x, str) else "")
def test_imports_follow_the_architecture(module, path):
    here = part_of(module)
    for imp in imports_of(path, module):
        if not imp.startswith("lightllm_async.") or not _is_module(imp):
            continue
        there = part_of(imp)
        if there != here:
            assert there in ALLOWED[here], f"{module} ({here}) imports {imp} ({there})"


def _is_module(name: str) -> bool:
    """`from pkg import x` adds pkg.x, which may name an object rather than a module."""
    rel = pathlib.Path(*name.split(".")[1:])
    return (PKG / rel).is_dir() or (PKG / rel).with_suffix(".py").exists() or len(name.split(".")) <= 2


@pytest.mark.parametrize("part", TORCH_FREE)
def test_torch_free_parts_never_import_torch(part):
    target = PKG / part
    files = sorted(target.rglob("*.py")) if target.is_dir() else [target]
    assert files
    for path in files:
        bad = {
            i
            for i in imports_of(path, "lightllm_async.x")
            if i == "torch" or i.startswith(("torch.", "transformers"))
        }
        assert not bad, f"{path.relative_to(PKG)} imports {bad}"
