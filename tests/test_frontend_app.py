"""The whole ASGI app over a real shared-memory Region, with the real Engine on the other side.

The engine runs in a thread with a scripted runner (tests/engine_harness.py) that emits a fixed
script of tokens, so every response is known in advance. Requests go in as raw ASGI calls, which
lets a test disconnect mid-stream.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import threading
import time
from dataclasses import dataclass, field

import pytest

from engine_harness import LiveEngine
from lightllm_async.frontend.app import FrontendContext, create_app
from lightllm_async.ipc import Region, RegionSpec
from lightllm_async.types import FinishReason

SCRIPT_TEXT = " Hello! I am a tiny model, and this is my scripted answer: 42 🎉 done."
MAX_MODEL_LEN = 256
_ids = itertools.count()


@pytest.fixture(scope="module")
def tokenizer():
    from lightllm_async.models.loader import default_model_path
    from lightllm_async.tokenizer import load_tokenizer

    return load_tokenizer(default_model_path())


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    chunks: list[bytes] = field(default_factory=list)

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def json(self):
        return json.loads(self.body)

    def events(self, prefix: str = "data: ") -> list[str]:
        text = self.body.decode()
        assert text.endswith("\n\n"), text[-50:]
        parts = text[:-2].split("\n\n")
        assert all(p.startswith(prefix) for p in parts), parts
        return [p[len(prefix) :] for p in parts]


class Harness:
    """A region, a fake engine, the app with its lifespan running, and a raw ASGI client."""

    def __init__(
        self, tokenizer, num_slots: int = 8, eos_in_script: bool = False, prefix_cache: bool = True, **context
    ):
        self.tokenizer = tokenizer
        self.region = Region.create(
            f"fe-test-{os.getpid()}-{next(_ids)}",
            RegionSpec(num_slots=num_slots, max_tokens_per_slot=MAX_MODEL_LEN),
        )
        self.script = tokenizer.encode(SCRIPT_TEXT, add_special_tokens=False)
        if eos_in_script:
            self.script = self.script + [tokenizer.eos_token_ids[0]]
        self.engine = LiveEngine(self.region.name, self.script, MAX_MODEL_LEN, prefix_cache=prefix_cache)
        self.ctx = FrontendContext(
            region=self.region,
            tokenizer=tokenizer,
            served_model_name="test-model",
            max_model_len=MAX_MODEL_LEN,
            engine_alive=lambda: self.engine.alive,
            **context,  # more FrontendContext fields: edge, api_key
        )
        self.app = create_app(self.ctx)

    def script_text(self, n: int) -> str:
        ids = [self.script[i % len(self.script)] for i in range(n)]
        return self.tokenizer.decode(ids)

    async def __aenter__(self) -> Harness:
        self._life_in: asyncio.Queue = asyncio.Queue()
        self._life_out: asyncio.Queue = asyncio.Queue()
        self._life = asyncio.create_task(
            self.app({"type": "lifespan"}, self._life_in.get, self._life_out.put)
        )
        await self._life_in.put({"type": "lifespan.startup"})
        assert (await self._life_out.get())["type"] == "lifespan.startup.complete"
        return self

    async def __aexit__(self, *exc) -> None:
        await self._life_in.put({"type": "lifespan.shutdown"})
        assert (await asyncio.wait_for(self._life_out.get(), 5))["type"] == "lifespan.shutdown.complete"
        await self._life
        if self.engine.alive:
            self.engine.kill()
        self.engine.region.close()
        self.region.close()
        self.region.unlink()

    async def request(
        self, method: str, path: str, body=None, raw: bytes | None = None, disconnect_after: int | None = None
    ) -> Response:
        """One request; with disconnect_after=k the client goes away after k body chunks."""
        data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
        gone = asyncio.Event()
        sent_body = False
        resp = Response(0, {})

        async def receive():
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                # the body in two parts, as servers may deliver it
                half = len(data) // 2
                if half and not getattr(receive, "second", False):
                    receive.second = True
                    sent_body = False
                    return {"type": "http.request", "body": data[:half], "more_body": True}
                return {"type": "http.request", "body": data[half:] if half else data, "more_body": False}
            if disconnect_after == 0:  # gone right after sending the request
                await asyncio.sleep(0.02)
                gone.set()
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(msg):
            if gone.is_set():
                return  # uvicorn drops writes to a closed connection
            if msg["type"] == "http.response.start":
                resp.status = msg["status"]
                resp.headers = {k.decode(): v.decode() for k, v in msg["headers"]}
            else:
                if msg.get("body"):
                    resp.chunks.append(msg["body"])
                if disconnect_after is not None and len(resp.chunks) >= disconnect_after:
                    gone.set()
                if not msg.get("more_body", False):
                    gone.set()  # response complete: receive() now reports a disconnect

        scope = {
            "type": "http",
            "method": method,
            "path": path,
            "headers": [(b"content-type", b"application/json")],
            "query_string": b"",
            "http_version": "1.1",
            "asgi": {"version": "3.0"},
        }
        await asyncio.wait_for(self.app(scope, receive, send), 10)
        return resp

    async def wait_slots_free(self, timeout: float = 3.0) -> None:
        deadline = time.monotonic() + timeout
        while self.region.num_free_slots() != self.region.spec.num_slots:
            assert time.monotonic() < deadline, (
                f"{self.region.num_free_slots()} of {self.region.spec.num_slots} slots free"
            )
            await asyncio.sleep(0.005)


def run(coro):
    return asyncio.run(coro)


def chat_body(**kw):
    return {"model": "test-model", "messages": [{"role": "user", "content": "Say hi"}], **kw}


# ---------------------------------------------------------------- non-streaming


def test_chat_completion_returns_script_text_and_exact_usage(tokenizer):
    async def go():
        async with Harness(tokenizer) as h:
            r = await h.request("POST", "/v1/chat/completions", chat_body(max_tokens=7))
            assert r.status == 200, r.body
            out = r.json()
            assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
            assert out["model"] == "test-model" and isinstance(out["created"], int)
            choice = out["choices"][0]
            assert choice["message"] == {"role": "assistant", "content": h.script_text(7)}
            assert choice["finish_reason"] == "length"
            prompt_ids, params = h.engine.submitted[-1]
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": "Say hi"}], add_generation_prompt=True
            )
            assert prompt_ids == tokenizer.encode(text, add_special_tokens=False)
            assert params.max_new_tokens == 7
            assert out["usage"] == {
                "prompt_tokens": len(prompt_ids),
                "completion_tokens": 7,
                "total_tokens": len(prompt_ids) + 7,
                "prompt_tokens_details": {"cached_tokens": 0},
            }
            await h.wait_slots_free()

    run(go())


def test_completion_with_text_and_token_prompts(tokenizer):
    async def go():
        async with Harness(tokenizer) as h:
            r = await h.request("POST", "/v1/completions", {"prompt": "Once upon", "max_tokens": 5})
            assert r.status == 200, r.body
            out = r.json()
            assert out["object"] == "text_completion" and out["id"].startswith("cmpl-")
            assert out["choices"][0]["text"] == h.script_text(5)
            assert h.engine.submitted[-1][0] == tokenizer.encode("Once upon", add_special_tokens=True)
            r = await h.request("POST", "/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 3})
            assert r.status == 200 and h.engine.submitted[-1][0] == [5, 6, 7]
            assert r.json()["usage"] == {
                "prompt_tokens": 3,
                "completion_tokens": 3,
                "total_tokens": 6,
                "prompt_tokens_details": {"cached_tokens": 0},
            }
            r = await h.request("POST", "/v1/completions", {"prompt": [[9, 10]], "max_tokens": 1})
            assert r.status == 200 and h.engine.submitted[-1][0] == [9, 10]

    run(go())


def test_max_tokens_defaults_to_rest_of_context(tokenizer):
    async def go():
        async with Harness(tokenizer) as h:
            r = await h.request("POST", "/v1/completions", {"prompt": [1] * 200})
            assert r.status == 200, r.body
            assert h.engine.submitted[-1][1].max_new_tokens == MAX_MODEL_LEN - 200
            assert r.json()["usage"]["completion_tokens"] == MAX_MODEL_LEN - 200

    run(go())


def test_eos_stops_with_reason_stop_and_is_not_shown(tokenizer):
    async def go():
        async with Harness(tokenizer, eos_in_script=True) as h:
            r = await h.request("POST", "/v1/completions", {"prompt": "x", "max_tokens": 200})
            out = r.json()
            assert out["choices"][0]["finish_reason"] == "stop"
            assert out["choices"][0]["text"] == tokenizer.decode(h.script[:-1])
            assert out["usage"]["completion_tokens"] == len(h.script)  # eos counted, as vLLM does
            assert h.engine.submitted[-1][1].stop_ids == tuple(tokenizer.eos_token_ids)
            # ignore_eos: the eos id is not sent as a stop id; generation runs to max_tokens
            r = await h.request(
                "POST",
                "/v1/completions",
                {"prompt": "x", "max_tokens": len(h.script) + 3, "ignore_eos": True},
            )
            assert r.json()["choices"][0]["finish_reason"] == "length"
            assert h.engine.submitted[-1][1].stop_ids == ()

    run(go())


def test_stop_string_truncates_aborts_engine_and_frees_slot(tokenizer):
    async def go():
        async with Harness(tokenizer) as h:
            r = await h.request(
                "POST", "/v1/completions", {"prompt": "x", "max_tokens": 100, "stop": ["tiny", "zzz"]}
            )
            out = r.json()
            assert out["choices"][0] == {
                "index": 0,
                "text": " Hello! I am a ",
                "finish_reason": "stop",
                "logprobs": None,
            }
            # completion tokens: up to and including the token that completed the stop string
            n = next(i for i in range(1, 100) if "tiny" in h.script_text(i))
            assert out["usage"]["completion_tokens"] == n
            await h.wait_slots_free()
            assert h.engine.finished[-1][0] == FinishReason.ABORT

    run(go())


def test_native_generate(tokenizer):
    async def go():
        async with Harness(tokenizer) as h:
            r = await h.request("POST", "/generate", {"inputs": "Hi", "parameters": {"max_new_tokens": 6}})
            assert r.status == 200, r.body
            assert r.json() == {
                "generated_text": [h.script_text(6)],
                "count_output_tokens": 6,
                "finish_reason": "length",
                "prompt_tokens": len(tokenizer.encode("Hi")),
            }
            assert h.engine.submitted[-1][1].temperature == 0.0  # do_sample defaults to False
            r = await h.request(
                "POST",
                "/generate",
                {
                    "inputs": "Hi",
                    "parameters": {
                        "max_new_tokens": 50,
                        "stop_sequences": ["!"],
                        "do_sample": True,
                        "temperature": 0.7,
                        "top_k": 5,
                        "seed": 3,
                    },
                },
            )
            assert r.json()["generated_text"] == [" Hello"] and r.json()["finish_reason"] == "stop"
            params = h.engine.submitted[-1][1]
            assert (params.temperature, params.top_k, params.seed) == (pytest.approx(0.7), 5, 3)

    run(go())


# ---------------------------------------------------------------- streaming


def test_chat_stream_format_role_first_finish_last_usage_then_done(tokenizer):
    async def go():
        async with Harness(tokenizer) as h:
            r = await h.request(
                "POST",
                "/v1/chat/completions",
                chat_body(max_tokens=9, stream=True, stream_options={"include_usage": True}),
            )
            assert r.status == 200 and r.headers["content-type"] == "text/event-stream"
            events = r.events()
            assert events[-1] == "[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            assert all(c["object"] == "chat.completion.chunk" for c in chunks)
            assert len({c["id"] for c in chunks}) == 1
            assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
            usage = chunks[-1]
            assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 9
            body = chunks[1:-1]
            assert [c["choices"][0]["finish_reason"] for c in body[:-1]] == [None] * (len(body) - 1)
            assert body[-1]["choices"][0]["finish_reason"] == "length"
            text = "".join(c["choices"][0]["delta"].get("content") or "" for c in body)
            assert text == h.script_text(9)
            assert all("\ufffd" not in (c["choices"][0]["delta"].get("content") or "") for c in body)
            assert all("usage" not in c for c in chunks[:-1])

    run(go())


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_a_repeated_prompt_reports_its_cached_tokens_in_usage_and_metrics(tokenizer, prefix_cache):
    """vLLM's usage.prompt_tokens_details.cached_tokens, streamed or not; /metrics counts the
    prompt tokens looked up and found. With the cache off: 0 everywhere."""

    async def go():
        async with Harness(tokenizer, prefix_cache=prefix_cache) as h:
            body = chat_body(max_tokens=4)
            first = (await h.request("POST", "/v1/chat/completions", body)).json()["usage"]
            again = (await h.request("POST", "/v1/chat/completions", body)).json()["usage"]
            n = first["prompt_tokens"]
            assert first["prompt_tokens_details"] == {"cached_tokens": 0}
            # all but the last prompt token, which is computed again for its logits
            assert again["prompt_tokens_details"] == {"cached_tokens": n - 1 if prefix_cache else 0}
            stream = {"prompt": "Tell me a story", "max_tokens": 3, "stream": True}
            stream["stream_options"] = {"include_usage": True}
            usages = []
            for _ in range(2):
                r = await h.request("POST", "/v1/completions", stream)
                usages.append(json.loads(r.events()[-2])["usage"])
            m = usages[0]["prompt_tokens"]
            assert usages[0]["prompt_tokens_details"] == {"cached_tokens": 0}
            assert usages[1]["prompt_tokens_details"] == {"cached_tokens": m - 1 if prefix_cache else 0}
            text = (await h.request("GET", "/metrics")).body.decode()
            counters = {
                line.split()[0]: float(line.split()[1])
                for line in text.splitlines()
                if line.startswith("lightllm_async:prefix_cache_")
            }
            queried = 2 * n + 2 * m if prefix_cache else 0
            hits = (n - 1) + (m - 1) if prefix_cache else 0
            assert counters == {
                "lightllm_async:prefix_cache_queries_total": queried,
                "lightllm_async:prefix_cache_hits_total": hits,
            }

    run(go())


def test_completion_stream_with_stop_string(tokenizer):
    async def go():
        async with Harness(tokenizer) as h:
            r = await h.request(
                "POST", "/v1/completions", {"prompt": "x", "max_tokens": 60, "stream": True, "stop": "42"}
            )
            events = r.events()
            assert events[-1] == "[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            text = "".join(c["choices"][0]["text"] for c in chunks)
            assert text == SCRIPT_TEXT[: SCRIPT_TEXT.index("42")]
            assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
            assert "4" not in text.split(":")[-1]  # nothing of the stop string leaked
            await h.wait_slots_free()

    run(go())


def test_native_generate_stream_events(tokenizer):
    async def go():
        async with Harness(tokenizer) as h:
            r = await h.request(
                "POST", "/generate_stream", {"inputs": "Hi", "parameters": {"max_new_tokens": 5}}
            )
            events = [json.loads(e) for e in r.events(prefix="data:")]
            assert [e["token"]["id"] for e in events] == h.script[:5]
            assert [e["finished"] for e in events] == [False] * 4 + [True]
            assert events[-1]["finish_reason"] == "length"
            assert events[-1]["generated_text"] == h.script_text(5)
            assert "".join(e["token"]["text"] for e in events) == h.script_text(5)
            assert events[-1]["token"]["count_output_tokens"] == 5

    run(go())


# ---------------------------------------------------------------- capacity, disconnects, death


def test_all_slots_in_use_answers_503_with_retry_after(tokenizer):
    async def go():
        async with Harness(tokenizer, num_slots=2) as h:
            h.engine.pause()
            body = {"prompt": "x", "max_tokens": 5}
            busy = [asyncio.create_task(h.request("POST", "/v1/completions", body)) for _ in range(2)]
            while h.region.num_free_slots():
                await asyncio.sleep(0.002)
            r = await h.request("POST", "/v1/completions", body)
            assert r.status == 503 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] and r.json()["error"]["message"]
            h.engine.resume()
            assert [t.status for t in await asyncio.gather(*busy)] == [200, 200]
            await h.wait_slots_free()

    run(go())


@pytest.mark.parametrize(
    "path,body",
    [
        ("/v1/chat/completions", chat_body(max_tokens=200, stream=True)),
        ("/v1/completions", {"prompt": "x", "max_tokens": 200, "stream": True}),
        ("/generate_stream", {"inputs": "x", "parameters": {"max_new_tokens": 200}}),
        ("/v1/completions", {"prompt": "x", "max_tokens": 200}),  # non-streaming: disconnect at once
    ],
)
def test_client_disconnect_aborts_request_and_frees_slot(tokenizer, path, body):
    async def go():
        async with Harness(tokenizer) as h:
            h.engine.step_time = 0.005
            stream = body.get("stream") or path == "/generate_stream"
            r = await h.request("POST", path, body, disconnect_after=3 if stream else 0)
            assert len(h.engine.submitted) == 1
            await h.wait_slots_free(timeout=0.5)  # well before the 200 tokens would end (1 s)
            assert h.app.service.reader.num_active == 0
            ((reason, emitted),) = h.engine.finished
            assert reason == FinishReason.ABORT and emitted < 100
            if stream:
                assert len(r.chunks) == 3  # nothing was written after the disconnect

    run(go())


@pytest.mark.parametrize("stream", [True, False])
def test_a_disconnect_aborts_every_choice_of_n_and_frees_their_slots(tokenizer, stream):
    async def go():
        async with Harness(tokenizer) as h:
            h.engine.step_time = 0.005
            body = {"prompt": "x", "max_tokens": 200, "n": 3, "stream": stream}
            await h.request("POST", "/v1/completions", body, disconnect_after=4 if stream else 0)
            await h.wait_slots_free(timeout=0.5)
            assert len(h.engine.submitted) == 3 and h.app.service.reader.num_active == 0
            assert [r for r, _ in h.engine.finished] == [FinishReason.ABORT] * 3

    run(go())


def test_n_beyond_the_free_slots_is_a_503_that_leaves_nothing_running(tokenizer):
    async def go():
        async with Harness(tokenizer, num_slots=4) as h:
            h.engine.pause()
            body = {"prompt": "x", "max_tokens": 5}
            busy = asyncio.create_task(h.request("POST", "/v1/completions", {**body, "n": 2}))
            while h.region.num_free_slots() > 2:
                await asyncio.sleep(0.002)
            r = await h.request("POST", "/v1/completions", {**body, "n": 3})
            assert r.status == 503
            h.engine.resume()
            ok = await busy
            assert ok.status == 200 and [c["index"] for c in ok.json()["choices"]] == [0, 1]
            await h.wait_slots_free()
            assert h.app.service.reader.num_active == 0

    run(go())


def test_engine_death_ends_streams_with_error_event_and_requests_with_503(tokenizer):
    async def go():
        async with Harness(tokenizer) as h:
            h.engine.step_time = 0.005
            streaming = asyncio.create_task(
                h.request("POST", "/v1/chat/completions", chat_body(max_tokens=200, stream=True))
            )
            plain = asyncio.create_task(
                h.request("POST", "/v1/completions", {"prompt": "x", "max_tokens": 200})
            )
            await asyncio.sleep(0.05)
            t0 = time.monotonic()
            h.engine.kill()
            s, p = await asyncio.gather(streaming, plain)
            assert time.monotonic() - t0 < 0.9  # within the server's grace period
            events = s.events()
            assert events[-1] == "[DONE]"
            assert "error" in json.loads(events[-2])
            assert p.status == 503 and "error" in p.json()
            r = await h.request("GET", "/health")
            assert r.status == 503 and "error" in r.json()
            r = await h.request("POST", "/v1/completions", {"prompt": "x", "max_tokens": 2})
            assert r.status == 503

    run(go())


def test_health_and_models(tokenizer):
    async def go():
        async with Harness(tokenizer) as h:
            r = await h.request("GET", "/health")
            assert (r.status, r.json()) == (200, {})
            r = await h.request("GET", "/v1/models")
            out = r.json()
            assert out["object"] == "list" and out["data"][0]["id"] == "test-model"
            assert out["data"][0]["max_model_len"] == MAX_MODEL_LEN

    run(go())


def test_many_concurrent_requests_each_get_their_own_tokens(tokenizer):
    async def go():
        async with Harness(tokenizer, num_slots=16) as h:
            lens = [1 + (i * 7) % 23 for i in range(40)]
            sem = asyncio.Semaphore(16)

            async def one(n):
                async with sem:
                    return await h.request("POST", "/v1/completions", {"prompt": "x", "max_tokens": n})

            results = await asyncio.gather(*(one(n) for n in lens))
            for n, r in zip(lens, results, strict=True):
                assert r.json()["choices"][0]["text"] == h.script_text(n)
                assert r.json()["usage"]["completion_tokens"] == n
            await h.wait_slots_free()

    run(go())


# ---------------------------------------------------------------- bad input


BAD_REQUESTS = [
    ("/v1/chat/completions", b"{not json", None),
    ("/v1/chat/completions", b"[1, 2]", None),
    ("/v1/chat/completions", b'{"model": "m"}', "messages"),
    ("/v1/chat/completions", b'{"messages": "hi"}', "messages"),
    ("/v1/chat/completions", b'{"messages": []}', "messages"),
    ("/v1/chat/completions", b'{"messages": [{"content": "hi"}]}', "messages[0].role"),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
        "messages[0].content[0]",
    ),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}',
        "max_tokens",
    ),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": "5"}',
        "max_tokens",
    ),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -3}',
        "max_completion_tokens",
    ),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "x"}], "temperature": -0.5}',
        "temperature",
    ),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "top_p": 0}', "top_p"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "top_p": 1.5}', "top_p"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "top_k": -2}', "top_k"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "n": 0}', "n"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "n": 9}', "n"),  # > slots
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "best_of": 3}', "best_of"),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}',
        "top_logprobs",
    ),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "x"}], "logit_bias": {"1": 1e3}}',
        "logit_bias",
    ),
    ("/v1/completions", b'{"prompt": "x", "logprobs": 6}', "logprobs"),
    ("/v1/completions", b'{"prompt": "x", "logit_bias": {"99999999": 1}}', "logit_bias"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "stop": 5}', "stop"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "stream": "yes"}', "stream"),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}',
        "messages",
    ),
    ("/v1/completions", b'{"max_tokens": 5}', "prompt"),
    ("/v1/completions", b'{"prompt": []}', "prompt"),
    ("/v1/completions", b'{"prompt": ["a", "b"]}', "prompt"),
    ("/v1/completions", b'{"prompt": [1, "a"]}', "prompt"),
    ("/v1/completions", b'{"prompt": [-1]}', "prompt"),
    ("/v1/completions", b'{"prompt": [999999999]}', "prompt"),
    ("/v1/completions", b'{"prompt": 12}', "prompt"),
    ("/v1/completions", b'{"prompt": [1, 2], "max_tokens": 255}', "prompt"),
    ("/v1/completions", b'{"prompt": [1, 2], "temperature": 1e999}', "temperature"),
    ("/v1/completions", b'{"prompt": [1, 2], "max_tokens": 99999999999999999999999}', "prompt"),
    ("/v1/completions", b"", None),
    ("/generate", b'{"parameters": {}}', "inputs"),
    ("/generate", b'{"inputs": "x", "parameters": {"max_new_tokens": 0}}', "parameters.max_new_tokens"),
    ("/generate", b'{"inputs": "x", "parameters": {"top_p": 2}}', "parameters.top_p"),
    (
        "/generate",
        b'{"inputs": "x", "parameters": {"do_sample": true, "temperature": -1}}',
        "parameters.temperature",
    ),
    ("/generate", b'{"inputs": "x", "parameters": {"stop_sequences": [1]}}', "parameters.stop_sequences[0]"),
    ("/generate_stream", b'{"inputs": "x", "parameters": {"n": 3}}', "parameters.n"),
    ("/generate_stream", b'{"inputs": 5}', "inputs"),
]


def test_every_bad_request_is_a_400_with_an_error_object(tokenizer):
    async def go():
        async with Harness(tokenizer) as h:
            for path, raw, param in BAD_REQUESTS:
                r = await h.request("POST", path, raw=raw)
                assert r.status == 400, (path, raw, r.status, r.body)
                err = r.json()["error"]
                assert set(err) == {"message", "type", "param", "code"}, err
                assert err["type"] == "invalid_request_error" and err["message"], err
                assert err["param"] == param, (raw, err)
            assert h.engine.submitted == []
            assert h.region.num_free_slots() == h.region.spec.num_slots

    run(go())


def test_context_overflow_message_is_vllm_style(tokenizer):
    async def go():
        async with Harness(tokenizer) as h:
            r = await h.request("POST", "/v1/completions", {"prompt": [1] * 200, "max_tokens": 100})
            assert r.json()["error"]["message"] == (
                f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, you "
                "requested 300 tokens (200 in the prompt, 100 in the completion). Please reduce "
                "the length of the prompt or completion."
            )
            r = await h.request("POST", "/v1/completions", {"prompt": [1] * MAX_MODEL_LEN})
            assert r.status == 400 and "maximum context length" in r.json()["error"]["message"]

    run(go())


def test_unknown_fields_are_ignored_and_nulls_mean_default(tokenizer):
    async def go():
        async with Harness(tokenizer) as h:
            r = await h.request(
                "POST",
                "/v1/chat/completions",
                chat_body(
                    max_tokens=2,
                    frequency_penalty=0.0,
                    logit_bias=None,
                    user="u",
                    temperature=None,
                    top_p=None,
                    stop=None,
                    seed=None,
                    n=None,
                    stream_options=None,
                    tools=[],
                ),
            )
            assert r.status == 200, r.body

    run(go())


def test_unknown_route_404_and_wrong_method_405(tokenizer):
    async def go():
        async with Harness(tokenizer) as h:
            r = await h.request("GET", "/v1/nothing")
            assert r.status == 404 and r.json()["error"]["type"] == "invalid_request_error"
            r = await h.request("GET", "/v1/chat/completions")
            assert r.status == 405 and r.headers["allow"] == "POST" and "error" in r.json()
            r = await h.request("POST", "/health")
            assert r.status == 405

    run(go())


class _BrokenTokenizer:
    """The real tokenizer, except that encoding "boom" raises: an internal bug, not bad input."""

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def encode(self, text, add_special_tokens=True):
        if text == "boom":
            raise RuntimeError("tokenizer bug")
        return self._tok.encode(text, add_special_tokens=add_special_tokens)


def test_internal_bug_is_a_logged_500_and_the_server_keeps_serving(tokenizer, caplog):
    async def go():
        async with Harness(_BrokenTokenizer(tokenizer)) as h:
            r = await h.request("POST", "/v1/completions", {"prompt": "boom", "max_tokens": 2})
            assert r.status == 500 and r.json()["error"]["type"] == "internal_error"
            assert "tokenizer bug" not in r.body.decode()  # internals stay in the log
            r = await h.request("POST", "/v1/completions", {"prompt": "fine", "max_tokens": 2})
            assert r.status == 200

    run(go())
    assert any("tokenizer bug" in (rec.exc_text or "") for rec in caplog.records)


# ---------------------------------------------------------------- under uvicorn


def test_under_uvicorn_stream_then_disconnect_aborts_and_frees_slot(tokenizer):
    import http.client
    import socket

    import uvicorn

    h = Harness(tokenizer)
    h.engine.step_time = 0.005
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = uvicorn.Server(
        uvicorn.Config(
            h.app,
            host="127.0.0.1",
            port=port,
            loop="uvloop",
            http="httptools",
            lifespan="on",
            log_level="warning",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 5
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.01)

        def post(body):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})
            return conn, conn.getresponse()

        conn, r = post({"prompt": "hi", "max_tokens": 4})
        assert r.status == 200 and json.loads(r.read())["choices"][0]["text"] == h.script_text(4)
        conn, r = post({"prompt": "hi", "max_tokens": 200, "stream": True})
        assert r.status == 200 and r.getheader("content-type") == "text/event-stream"
        first = r.fp.readline()  # chunked transfer: size line, then the first event
        assert r.fp.readline().startswith(b"data: {"), first
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        deadline = time.monotonic() + 0.5  # the 200 tokens would take 1 s
        while h.region.num_free_slots() != h.region.spec.num_slots:
            assert time.monotonic() < deadline, "slot not freed after the client went away"
            time.sleep(0.005)
        assert h.engine.finished[-1][0] == FinishReason.ABORT
    finally:
        server.should_exit = True
        thread.join(5)
        h.engine.kill()
        h.engine.region.close()
        h.region.close()
        h.region.unlink()
    assert not thread.is_alive()


def _metric_values(text: str) -> dict[str, float]:
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line[:1] != "#"
    }


def test_metrics_count_a_known_workload_and_return_to_zero_after_cancellations(tokenizer, caplog):
    """Three requests to their length, one the client leaves: the per-request histograms and
    the success counter add up, under vLLM's names; the running and waiting gauges go back to 0.
    At debug level each request ends with one summary line, which never holds its text."""

    async def go():
        async with Harness(tokenizer) as h:
            h.engine.step_time = 0.005
            for _ in range(3):
                assert (
                    await h.request("POST", "/v1/completions", {"prompt": "x", "max_tokens": 5})
                ).status == 200
            body = {"prompt": "x", "max_tokens": 200, "stream": True}
            await h.request("POST", "/v1/completions", body, disconnect_after=3)
            await h.wait_slots_free(timeout=0.5)
            m = _metric_values((await h.request("GET", "/metrics")).body.decode())
            p = "lightllm_async:"
            assert m[f'{p}request_success_total{{finished_reason="length"}}'] == 3
            assert m[f'{p}request_success_total{{finished_reason="abort"}}'] == 1
            assert m[f"{p}e2e_request_latency_seconds_count"] == 4
            assert m[f"{p}request_queue_time_seconds_count"] == 3  # known at the finish: not the one left
            assert 0 <= m[f"{p}request_queue_time_seconds_sum"] < m[f"{p}e2e_request_latency_seconds_sum"]
            assert m[f"{p}time_to_first_token_seconds_count"] == 4
            assert m[f"{p}request_prompt_tokens_count"] == 4
            left = m[f"{p}request_generation_tokens_sum"] - 15  # the one that was left: a few tokens
            assert 1 <= left < 100
            assert m[f"{p}inter_token_latency_seconds_count"] == 3 * 4 + left - 1
            assert m[f"{p}num_requests_running"] == 0 and m[f"{p}num_requests_waiting"] == 0

    with caplog.at_level("DEBUG", logger="lightllm_async.frontend.service"):
        run(go())
    lines = [r.getMessage() for r in caplog.records if r.name == "lightllm_async.frontend.service"]
    assert sorted(line.split(":")[0] for line in lines) == ["request abort"] + ["request length"] * 3
    assert all("prompt tokens" in line and "generated" in line for line in lines)


def test_the_engine_logs_progress_while_busy_and_never_a_prompt(caplog):
    from lightllm_async.engine.engine import LOG_INTERVAL_S, Engine
    from lightllm_async.engine.scheduler import Scheduler, SchedulerConfig

    class Region:
        pass

    engine = Engine(Region(), Scheduler(SchedulerConfig(4, 64, 128, 1024)), runner=None)
    start = engine._logged[0]
    assert not engine.log_progress(start + LOG_INTERVAL_S + 1)  # idle: nothing to say
    engine._generated_tokens = 60
    engine._times = [4, 0.004, 0.008, 0.012, 0.002]  # 4 steps: 1/2/3/0.5 ms each
    with caplog.at_level("INFO", logger="lightllm_async.engine.engine"):
        assert not engine.log_progress(start + LOG_INTERVAL_S + 2)  # too soon after the last
        assert engine.log_progress(start + 2 * LOG_INTERVAL_S + 3)
    (line,) = caplog.messages
    assert line.startswith("prompt 0.0 tok/s, generation ") and "running 0, waiting 0" in line
    other = 1e3 * (LOG_INTERVAL_S + 2 - 0.026) / 4  # the window's wall time the phases do not cover
    assert line.endswith(
        f"4 steps, ms/step schedule/launch/device wait/outbox/other 1.00/2.00/3.00/0.50/{other:.2f} "
        "(waits: 0 with work 0 ms, 0 for work 0 ms)"
    )
