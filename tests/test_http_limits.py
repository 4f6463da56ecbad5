"""Issue 8, one request must never take the server down: the limits on what a request may send.

In-process (the ASGI app over a real region and the fake engine of test_frontend_app): each
documented limit answers a 400 that names it, JSON nested ~1000 deep is a 400 (never a 500), a
body over the limit is a 413, a text prompt too large for the context is refused before it is
tokenized (the bound comes from the tokenizer), and tokenizing a large prompt leaves the event
loop free to answer /health.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time

import pytest

from asgi_client import JSON, call
from engine_harness import LiveEngine
from lightllm_async.frontend.app import FrontendContext, create_app
from lightllm_async.frontend.limits import (
    MAX_BODY_BYTES,
    MAX_CONTENT_PARTS,
    MAX_MESSAGES,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
)
from lightllm_async.ipc import Region, RegionSpec
from test_frontend_app import MAX_MODEL_LEN, Harness, Response


@pytest.fixture(scope="module")
def tokenizer():
    from lightllm_async.models.loader import default_model_path
    from lightllm_async.tokenizer import load_tokenizer

    return load_tokenizer(default_model_path())


def run(coro):
    return asyncio.run(coro)


def post(h: Harness, path: str, body) -> Response:
    return h.request("POST", path, raw=json.dumps(body).encode())


def chat(content="hi", n: int = 1, **kw):
    return {"messages": [{"role": "user", "content": content}] * n, **kw}


# ---------------------------------------------------------------- limits: 400s naming them


LIMITED = [
    (
        "/v1/completions",
        {"prompt": "x", "stop": [f"s{i}" for i in range(MAX_STOP_STRINGS + 1)]},
        "stop",
        str(MAX_STOP_STRINGS),
    ),
    (
        "/v1/chat/completions",
        chat(stop="y" * (MAX_STOP_STRING_CHARS + 1)),
        "stop",
        str(MAX_STOP_STRING_CHARS),
    ),
    (
        "/generate",
        {"inputs": "x", "parameters": {"stop_sequences": [str(i) for i in range(MAX_STOP_STRINGS + 1)]}},
        "parameters.stop_sequences",
        str(MAX_STOP_STRINGS),
    ),
    ("/v1/chat/completions", chat(n=MAX_MESSAGES + 1), "messages", str(MAX_MESSAGES)),
    (
        "/v1/chat/completions",
        chat(content=[{"type": "text", "text": "a"}] * (MAX_CONTENT_PARTS + 1)),
        "messages[0].content",
        str(MAX_CONTENT_PARTS),
    ),
    # a token-id prompt too long for the context is refused by its length, whatever its ids
    ("/v1/completions", {"prompt": [-1] * (MAX_MODEL_LEN + 7)}, "prompt", "maximum context length"),
    ("/v1/completions", {"prompt": [[5] * MAX_MODEL_LEN]}, "prompt", "maximum context length"),
]


def test_each_limit_is_a_400_that_names_it(tokenizer):
    async def go():
        async with Harness(tokenizer) as h:
            for path, body, param, named in LIMITED:
                r = await post(h, path, body)
                assert r.status == 400, (path, param, r.status, r.body[:200])
                err = r.json()["error"]
                assert err["param"] == param and named in err["message"], err
            # at the limits, the same requests are served
            r = await post(h, "/v1/completions", {"prompt": "x", "max_tokens": 2, "stop": ["s"] * 16})
            assert r.status == 200, r.body
            r = await post(h, "/v1/chat/completions", chat(max_tokens=1, stop="y" * MAX_STOP_STRING_CHARS))
            assert r.status == 200, r.body
            assert len(h.engine.submitted) == 2

    run(go())


@pytest.fixture
def server_recursion_limit():
    """msgspec's guard against deep nesting is the interpreter's recursion limit: 1000 in the
    server, but torch.compile (tests/test_cpu_compile.py, in the same pytest process) raises it."""
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)
    yield
    sys.setrecursionlimit(old)


@pytest.mark.parametrize("depth", [1000, 100_000])
def test_deeply_nested_json_is_a_400_not_a_500(tokenizer, depth, server_recursion_limit):
    nested = b"[" * depth + b"]" * depth
    bodies = [
        ("/v1/completions", b'{"prompt": ' + nested + b"}"),
        ("/v1/chat/completions", b'{"messages": [], "unknown": ' + nested + b"}"),
        (
            "/generate",
            b'{"inputs": "x", "parameters": {"x": ' + b'{"a":' * depth + b"1" + b"}" * depth + b"}}",
        ),
    ]

    async def go():
        async with Harness(tokenizer) as h:
            for path, raw in bodies:
                r = await h.request("POST", path, raw=raw)
                assert r.status == 400, (path, r.status, r.body[:200])
                assert "nested more deeply" in r.json()["error"]["message"]
            assert (await h.request("GET", "/health")).status == 200

    run(go())


def test_body_over_the_limit_is_a_413_before_it_is_read(tokenizer):
    async def go():
        async with Harness(tokenizer) as h:
            declared = (JSON, (b"content-length", str(MAX_BODY_BYTES + 1).encode()))
            r = await call(h.app, "POST", "/v1/completions", b'{"prompt": "x"}', declared)
            assert r.status == 413 and str(MAX_BODY_BYTES) in r.json()["error"]["message"]
            big = b'{"prompt": "' + b"a" * MAX_BODY_BYTES + b'"}'  # no content-length: counted
            r = await call(h.app, "POST", "/v1/completions", big)
            assert r.status == 413
            assert h.engine.submitted == []

    run(go())


# ---------------------------------------------------------------- prompt size before tokenizing


class _CountingTokenizer:
    """The real tokenizer, counting the characters it is asked to encode."""

    def __init__(self, tok):
        self._tok = tok
        self.encoded = 0

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def encode(self, text, add_special_tokens=True):
        self.encoded += len(text)
        return self._tok.encode(text, add_special_tokens=add_special_tokens)

    def encode_nogil(self, text, add_special_tokens=True):
        self.encoded += len(text)
        return self._tok.encode_nogil(text, add_special_tokens=add_special_tokens)


def test_prompt_too_large_for_the_context_is_refused_without_tokenizing(tokenizer):
    counting = _CountingTokenizer(tokenizer)
    per_token = tokenizer.max_bytes_per_token
    assert per_token is not None
    limit = MAX_MODEL_LEN * per_token
    over = "é" * (limit // 2 + 1)  # two bytes a character: over the limit by bytes, not characters

    async def go():
        async with Harness(counting) as h:
            counting.encoded = 0  # the harness encodes its script
            for path, body, param in [
                ("/v1/completions", {"prompt": over}, "prompt"),
                ("/v1/completions", {"prompt": [over]}, "prompt"),
                ("/generate", {"inputs": over}, "inputs"),
                ("/v1/chat/completions", chat(content=over), "messages"),
                ("/v1/chat/completions", chat(content=over[: len(over) // 4], n=4), "messages"),
            ]:
                r = await post(h, path, body)
                assert r.status == 400, (path, r.status, r.body[:200])
                err = r.json()["error"]
                assert err["param"] == param and f"{MAX_MODEL_LEN} tokens" in err["message"], err
            assert counting.encoded == 0
            # within the bound it is tokenized, and the context check decides
            r = await post(h, "/v1/completions", {"prompt": "é" * (limit // 2 - 1)})
            assert r.status == 400 and "maximum context length" in r.json()["error"]["message"]
            assert counting.encoded == limit // 2 - 1

    run(go())


def test_long_prompts_are_tokenized_off_the_event_loop(tokenizer):
    """Encoding a prompt of a few thousand characters takes milliseconds (2,000 tokens: ~4 ms on
    the 2-core VM), which the event loop would stall every stream for: from ENCODE_INLINE_CHARS
    on it runs in a thread. On a shared-prefix load the loop spent 42% of its time in inline
    encodes and clients saw TTFT p50 2.3-3.1 s for a server-side 0.1 s; in a thread, 0.9-1.7 s."""
    import threading

    from lightllm_async.frontend.service import ENCODE_INLINE_CHARS

    threads: list[tuple[int, bool]] = []

    class Recording(_CountingTokenizer):
        def encode(self, text, add_special_tokens=True):
            threads.append((len(text), threading.current_thread() is threading.main_thread()))
            return super().encode(text, add_special_tokens)

        def encode_nogil(self, text, add_special_tokens=True):
            threads.append((len(text), threading.current_thread() is threading.main_thread()))
            return super().encode_nogil(text, add_special_tokens)

    assert ENCODE_INLINE_CHARS <= 1024
    short, long = "hello " * 10, "hello " * 300  # 60 and 1800 characters

    async def go():
        async with Harness(Recording(tokenizer)) as h:
            threads.clear()
            for text in (
                short,
                long,
            ):  # the long one is too long for this model's context: a 400 after encoding
                r = await post(h, "/generate", {"inputs": text, "parameters": {"max_new_tokens": 1}})
                assert r.status == 200 or b"maximum context length" in r.body, r.body[:200]
        assert threads == [(len(short), True), (len(long), False)]

    run(go())


def test_max_bytes_per_token_bounds_the_text_of_every_encoding(tokenizer):
    bound = tokenizer.max_bytes_per_token
    rng = random.Random(11)
    alphabet = [" ", "\n", "\t", "a", "Z", "7", "é", "中", "🎉", "\u0301", "<|im_end|>", "ĠĠ"]
    texts = ["\n" + " " * 4099, " " * 257, "\n" * 1000, "<|im_end|>" * 7]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 3000))) for _ in range(30)]
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert len(text.encode()) <= len(ids) * bound
        assert tokenizer.encode_nogil(text, add_special_tokens=False) == ids


def test_max_bytes_per_token_is_none_when_the_pipeline_can_drop_text():
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, normalizers, pre_tokenizers

    from lightllm_async.tokenizer import Tokenizer

    def bound(normalizer=None, pre_tokenizer=None, model=None):
        backend = Backend(model or models.BPE(vocab={"a": 0, "bb": 1, "é": 2}, merges=[]))
        if normalizer is not None:
            backend.normalizer = normalizer
        if pre_tokenizer is not None:
            backend.pre_tokenizer = pre_tokenizer
        return Tokenizer(backend, special_tokens={}, eos_token_ids=()).max_bytes_per_token

    assert bound() == 4  # an unknown character stands for up to 4 bytes
    assert bound(normalizers.NFC()) == 16
    assert bound(normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])) == 4
    assert bound(pre_tokenizer=pre_tokenizers.Metaspace()) == 4
    assert bound(normalizers.Strip()) is None
    assert bound(normalizers.Replace(" ", "")) is None
    assert bound(pre_tokenizer=pre_tokenizers.WhitespaceSplit()) is None
    assert bound(pre_tokenizer=pre_tokenizers.Split(" ", "removed")) is None
    fused = models.BPE(vocab={"a": 0, "<unk>": 1}, merges=[], unk_token="<unk>", fuse_unk=True)
    assert bound(model=fused) is None


def test_health_answers_fast_while_a_large_prompt_tokenizes(tokenizer):
    """The prompt is tokenized in a thread that releases the GIL: the event loop keeps serving."""
    max_len = 400_000
    region = Region.create(f"edge-test-{os.getpid()}", RegionSpec(num_slots=2, max_tokens_per_slot=max_len))
    engine = LiveEngine(region.name, [5], max_len)
    ctx = FrontendContext(region, tokenizer, "m", max_len, lambda: engine.alive)
    app = create_app(ctx)
    prompt = "hello world, this is a test of the tokenizer. " * 30_000  # 1.4 MB: 0.7 s to tokenize here
    assert len(prompt.encode()) <= app.service.max_prompt_bytes

    async def go():
        body = json.dumps({"prompt": prompt, "max_tokens": 1}).encode()
        big = asyncio.create_task(call(app, "POST", "/v1/completions", body))
        # A probe every 20 ms; a blocked loop shows as a late answer (its lateness is the wait).
        waits, last = [], time.perf_counter()
        start = last
        while not big.done():
            await asyncio.sleep(0.02)
            r = await call(app, "GET", "/health")
            now = time.perf_counter()
            waits.append(now - last - 0.02)
            last = now
            assert r.status == 200
        assert (await big).status == 200
        return waits, time.perf_counter() - start

    try:
        waits, took = run(go())
    finally:
        engine.kill()
        region.close()
        region.unlink()
    assert max(waits) < 0.1, sorted(waits)[-5:]
    # The prompt took long enough that a loop blocked by its tokenizing would have shown a wait
    # past the bound above (a count of probes instead failed where tokenizers got faster: 8-9 of
    # the 10 it asked for, ~0.2 s for a 370 kB prompt on this CI's machine).
    assert took > 0.25 and len(waits) >= 5, (took, len(waits))
