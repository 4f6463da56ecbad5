"""ARCHITECTURE.md §7 as a test: server -> frontend | engine -> runner -> models -> layers -> kernels
-> ipc -> config/types. Frontend and engine never import each other; the frontend, the scheduler,
the KV pools, ipc and the tokenizer never import torch. Imports are read from the source (AST), so
a lazy import inside a function counts too.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "src" / "lightllm_async"

# Which packages each part may import from this project (besides itself).
LAYERS = ["server", "frontend", "engine", "runner", "models", "layers", "kernels", "ipc", "base"]
ALLOWED = {
    "server": set(LAYERS),
    "frontend": {"ipc", "base"},
    "engine": {"runner", "models", "layers", "kernels", "ipc", "base"},
    "runner": {"models", "layers", "kernels", "ipc", "base"},
    "models": {"layers", "kernels", "ipc", "base"},
    "layers": {"kernels", "ipc", "base"},
    "kernels": {"ipc", "base"},
    "ipc": {"base"},
    "base": {"base"},
    "tools": set(LAYERS),
}
TORCH_FREE = [
    "frontend",
    "ipc",
    "engine/scheduler.py",
    "engine/kv_pool.py",
    "engine/request.py",
    "tokenizer.py",
    "config.py",
    "batch.py",
]


def part_of(module: str) -> str:
    """'lightllm_async.engine.scheduler' -> 'engine'; top-level modules other than server -> 'base'."""
    parts = module.split(".")
    if len(parts) < 2:
        return "base"
    name = parts[1]
    return name if name in ALLOWED else "base"


def imports_of(path: pathlib.Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        yield ".".join(rel.parts).removesuffix(".__init__"), path


@pytest.mark.parametrize("module,path", list(modules()), ids=lambda x: str(x) if isinstance(x, str) else "")
def test_imports_follow_the_architecture(module, path):
    here = part_of(module) if module != "lightllm_async.server" else "server"
    for imp in imports_of(path):
        if not imp.startswith("lightllm_async."):
            continue
        there = "server" if imp == "lightllm_async.server" else part_of(imp)
        if there in ("tools",) or there == here:
            continue
        assert there in ALLOWED[here], f"{module} ({here}) imports {imp} ({there})"


@pytest.mark.parametrize("part", TORCH_FREE)
def test_torch_free_parts_never_import_torch(part):
    target = PKG / part
    files = sorted(target.rglob("*.py")) if target.is_dir() else [target]
    assert files
    for path in files:
        bad = {i for i in imports_of(path) if i == "torch" or i.startswith(("torch.", "transformers"))}
        assert not bad, f"{path.relative_to(PKG)} imports {bad}"
