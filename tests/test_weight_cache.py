"""The on-disk cache of a GGUF's packed weights (runner/weight_cache.py): a start that reads it holds
and serves exactly what a load from the GGUF gives; a corrupt, foreign or stale entry is rebuilt;
the cache can be turned off; its files are private."""

from __future__ import annotations

import logging
import os
import pathlib
import stat

import pytest
import torch

from engine_harness import generate, smollm2_prompts
from gguf_files import write_gguf
from lightllm_async.config import EngineConfig
from lightllm_async.layers.quantized import Int4Linear, Int8Head
from lightllm_async.models.loader import default_model_path
from lightllm_async.runner import weight_cache
from lightllm_async.runner.model_runner import ModelRunner
from lightllm_async.server import build_parser, resolve_config
from lightllm_async.tools import make_random_model as mrm

pytest.importorskip("gguf")

# some matrices 4-bit (packed), one Q8_0 (its layer stays float), a 4-bit untied head (int8)
MIX = {"attn_q": "Q4_0", "attn_k": "Q4_0", "attn_v": "Q8_0", "attn_output": "Q4_1", "ffn_": "Q4_1"}


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("tiny")
    src = mrm.write_model(mrm.shape_config("tiny", "float32"), str(folder / "hf"), seed=11)
    path = str(folder / "tiny.gguf")
    write_gguf(src, path, "llama", types=MIX)
    return path


def runner(path: str, cache_dir: str, **kw) -> ModelRunner:
    cfg = EngineConfig(model_path=path, device="cpu", max_model_len=128, kv_cache_tokens=512, **kw)
    return ModelRunner(cfg.replace(weight_cache_dir=cache_dir))


def entries(cache_dir: str) -> list[str]:
    return (
        sorted(n for n in os.listdir(cache_dir) if n.endswith(".safetensors"))
        if os.path.isdir(cache_dir)
        else []
    )


def assert_same_model(got: ModelRunner, want: ModelRunner) -> None:
    """The same tensors bit for bit, the same kernels chosen, the head tied as it was."""
    a, b = weight_cache.packed_state(got.model), weight_cache.packed_state(want.model)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    kinds = [(type(m).__name__, getattr(m, "gemv", None)) for m in got.model.modules()]
    assert kinds == [(type(m).__name__, getattr(m, "gemv", None)) for m in want.model.modules()]
    tied = got.model.lm_head is None or got.model.lm_head.weight is got.model.embed.weight
    assert tied == (want.model.lm_head is None or want.model.lm_head.weight is want.model.embed.weight)


def test_a_start_from_the_cache_holds_what_a_load_from_the_gguf_holds(tiny_gguf, tmp_path, caplog):
    plain = runner(tiny_gguf, "")
    cold = runner(tiny_gguf, str(tmp_path))  # writes the entry
    assert len(entries(str(tmp_path))) == 1
    with caplog.at_level(logging.INFO):
        warm = runner(tiny_gguf, str(tmp_path))
    assert "packed weights read from" in caplog.text
    assert any(isinstance(m, Int4Linear) for m in warm.model.modules())
    assert isinstance(warm.model.lm_head, Int8Head)  # the untied 4-bit head, int8 in bfloat16
    for other in (cold, warm):
        assert_same_model(other, plain)
    prompts = [[5, 9, 13, 2, 7] * 3, [11, 3]]
    assert generate(warm, prompts, 6) == generate(plain, prompts, 6)


def test_smollm2_from_the_cache_answers_as_from_the_gguf(tmp_path, caplog):
    """The default model: tied int8 head, every linear packed for `_gemv`, the C decode step."""
    try:
        path = default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    plain = runner(path, "")
    runner(path, str(tmp_path))
    with caplog.at_level(logging.INFO):
        warm = runner(path, str(tmp_path))
    assert "packed weights read from" in caplog.text
    assert_same_model(warm, plain)
    assert type(warm.cpu_decode) is type(plain.cpu_decode)
    prompts = smollm2_prompts()[:2]
    assert generate(warm, prompts, 12) == generate(plain, prompts, 12)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_a_corrupt_entry_is_rebuilt(tiny_gguf, tmp_path, caplog, damage):
    plain = runner(tiny_gguf, "")
    runner(tiny_gguf, str(tmp_path))
    (name,) = entries(str(tmp_path))
    path = os.path.join(tmp_path, name)
    data = pathlib.Path(path).read_bytes()
    bad = {"garbage": os.urandom(len(data)), "truncated": data[: len(data) // 2], "empty": b""}[damage]
    pathlib.Path(path).write_bytes(bad)
    with caplog.at_level(logging.WARNING):
        rebuilt = runner(tiny_gguf, str(tmp_path))
    assert "rebuilding it" in caplog.text
    assert_same_model(rebuilt, plain)
    assert pathlib.Path(path).read_bytes() == data  # written again, whole
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert_same_model(runner(tiny_gguf, str(tmp_path)), plain)
    assert "packed weights read from" in caplog.text


def test_an_entry_of_another_key_is_not_used(tiny_gguf, tmp_path, caplog):
    """A file under this key's name that holds another key (or a hash collision) is a miss."""
    plain = runner(tiny_gguf, "")
    first = runner(tiny_gguf, str(tmp_path))
    key = weight_cache.cache_key(tiny_gguf, first.dtype, ["layers.0.mlp.down"])
    (name,) = entries(str(tmp_path))
    other = weight_cache.WeightCache(str(tmp_path), key)
    other.store(weight_cache.packed_state(first.model))
    os.replace(other.path, os.path.join(tmp_path, name))
    with caplog.at_level(logging.WARNING):
        assert_same_model(runner(tiny_gguf, str(tmp_path)), plain)
    assert "another model's weights" in caplog.text


def test_a_changed_gguf_misses_and_its_old_entry_is_removed(tiny_gguf, tmp_path):
    runner(tiny_gguf, str(tmp_path))
    (old,) = entries(str(tmp_path))
    st = os.stat(tiny_gguf)
    os.utime(tiny_gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    try:
        runner(tiny_gguf, str(tmp_path))
        (new,) = entries(str(tmp_path))
        assert new != old
    finally:
        os.utime(tiny_gguf, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_no_cache_dir_reads_and_writes_nothing(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("LLA_CACHE_DIR", raising=False)
    runner(tiny_gguf, "")
    assert os.listdir(tmp_path) == []

    def cache_dir(*flags: str) -> str:
        args = build_parser().parse_args(["--model", tiny_gguf, *flags])
        return resolve_config(args).engine.weight_cache_dir

    assert cache_dir() == os.path.join(tmp_path, "lightllm-async", "weights")
    assert cache_dir("--no-cache") == ""
    assert cache_dir("--cache-dir", str(tmp_path / "c")) == os.path.join(tmp_path, "c", "weights")
    monkeypatch.setenv("LLA_CACHE_DIR", "off")
    assert cache_dir() == ""
    monkeypatch.setenv("LLA_CACHE_DIR", str(tmp_path / "d"))
    assert cache_dir() == os.path.join(tmp_path, "d", "weights")


def test_the_cache_is_private_and_a_shared_directory_is_not_used(tiny_gguf, tmp_path, caplog):
    private = tmp_path / "private" / "weights"
    runner(tiny_gguf, str(private))
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o700
    (name,) = entries(str(private))
    assert stat.S_IMODE(os.stat(private / name).st_mode) == 0o600
    assert not [n for n in os.listdir(private) if n.startswith(".tmp-")]
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)  # as a umask would not
    with caplog.at_level(logging.WARNING):
        runner(tiny_gguf, str(shared))
    assert "not a private directory" in caplog.text and entries(str(shared)) == []


def test_writers_at_once_leave_one_whole_entry(tiny_gguf, tmp_path):
    """Servers that start together all miss and all write: each writes a file of its own and
    renames it into place, so the entry is whole whoever wins, and no temporary file stays."""
    import threading

    loaded = runner(tiny_gguf, "")
    key = weight_cache.cache_key(tiny_gguf, loaded.dtype, ["some.layer"])
    state = weight_cache.packed_state(loaded.model)
    writers = [
        threading.Thread(target=weight_cache.WeightCache(str(tmp_path), key).store, args=(state,))
        for _ in range(4)
    ]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    assert len(entries(str(tmp_path))) == 1 and not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]
    got = weight_cache.WeightCache(str(tmp_path), key).load()
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)


def test_an_entry_of_another_dtype_stays_beside_this_one(tiny_gguf, tmp_path):
    """Two servers loading one GGUF differently (here bfloat16 and float32 activations) do not
    evict each other's entry."""
    runner(tiny_gguf, str(tmp_path))
    runner(tiny_gguf, str(tmp_path), dtype="float32")
    assert len(entries(str(tmp_path))) == 2
