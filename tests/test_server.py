"""End to end through the real process tree: HTTP -> shared memory -> engine -> back, SmolLM2 on the CPU."""

from __future__ import annotations

import http.client
import json
import random

import pytest

from serverproc import check_disconnect_frees_slot_and_kv, concurrently, stream_text, stream_token_ids


def test_server_greedy_token_ids_equal_hf_transformers(smollm2_server, smollm2_reference):
    from lightllm_async.models.loader import default_model_path
    from lightllm_async.tokenizer import load_tokenizer

    tok = load_tokenizer(default_model_path())
    for prompt_ids, expected in smollm2_reference:
        text = tok.decode(prompt_ids, skip_special_tokens=False)
        assert tok.encode(text) == prompt_ids  # the server will see exactly these ids
        assert stream_token_ids(smollm2_server, text, 64) == expected


def test_32_concurrent_streams_each_equal_the_same_request_alone(smollm2_server):
    rng = random.Random(7)
    words = [
        "sun",
        "river",
        "stone",
        "cloud",
        "apple",
        "tiger",
        "music",
        "paper",
        "glass",
        "winter",
        "garden",
        "signal",
    ]
    bodies = [
        {
            "prompt": " ".join(rng.choice(words) for _ in range(rng.randint(1, 60))),
            "max_tokens": rng.randint(4, 40),
            "temperature": 0,
            "ignore_eos": True,
        }
        for _ in range(32)
    ]

    together = concurrently(lambda b: stream_text(smollm2_server, b), bodies)
    alone = [stream_text(smollm2_server, b) for b in bodies]
    assert together == alone


def test_raw_sse_chat_stream_format(smollm2_server):
    conn = http.client.HTTPConnection("127.0.0.1", smollm2_server.port, timeout=60)
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "stream": True}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/event-stream")
    raw = resp.read().decode()
    blocks = [b for b in raw.split("\n\n") if b]
    assert all(b.startswith("data: ") for b in blocks)
    assert blocks[-1] == "data: [DONE]"
    first = json.loads(blocks[0][6:])
    assert first["choices"][0]["delta"]["role"] == "assistant"
    last = json.loads(blocks[-2][6:])
    assert last["choices"][0]["finish_reason"] in ("stop", "length")


def test_openai_client_chat_and_completions(smollm2_server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=smollm2_server.url + "/v1", api_key="none")
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=20, temperature=0)
    assert chat.choices[0].message.role == "assistant" and "Paris" in chat.choices[0].message.content
    assert chat.usage.completion_tokens <= 20 and chat.usage.total_tokens == (
        chat.usage.prompt_tokens + chat.usage.completion_tokens
    )
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    comp = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert comp.usage.prompt_tokens > 0 and comp.usage.completion_tokens == 8
    parts = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True
    )
    assert "".join(p.choices[0].text for p in parts if p.choices) == comp.choices[0].text


def test_seeded_sampling_is_reproducible_and_stop_strings_cut(smollm2_server):
    body = {
        "prompt": "Once upon a time",
        "max_tokens": 24,
        "temperature": 0.9,
        "top_p": 0.9,
        "top_k": 50,
        "seed": 1234,
    }
    a = smollm2_server.request("POST", "/v1/completions", body)[2]["choices"][0]["text"]
    b = smollm2_server.request("POST", "/v1/completions", body)[2]["choices"][0]["text"]
    assert a == b
    greedy = {"prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}
    full = smollm2_server.request("POST", "/v1/completions", greedy)[2]["choices"][0]["text"]
    stop = full.strip().split()[1]
    cut = smollm2_server.request("POST", "/v1/completions", {**greedy, "stop": [stop]})[2]["choices"][0]
    assert cut["finish_reason"] == "stop" and stop not in cut["text"] and full.startswith(cut["text"])


BAD_REQUESTS = [
    ("/v1/chat/completions", b"{not json"),
    ("/v1/chat/completions", json.dumps({"max_tokens": 5}).encode()),  # no messages
    ("/v1/chat/completions", json.dumps({"messages": "hello"}).encode()),  # wrong type
    ("/v1/completions", json.dumps({"prompt": "x", "max_tokens": 0}).encode()),
    ("/v1/completions", json.dumps({"prompt": "x", "max_tokens": "ten"}).encode()),
    ("/v1/completions", json.dumps({"prompt": "x", "temperature": -1}).encode()),
    ("/generate", json.dumps({"parameters": {}}).encode()),
]


@pytest.mark.parametrize("path,raw", BAD_REQUESTS)
def test_bad_input_gets_4xx_error_object_and_server_keeps_serving(smollm2_server, path, raw):
    status, _, body = smollm2_server.request("POST", path, raw=raw)
    assert 400 <= status < 500
    assert isinstance(body["error"]["message"], str) and body["error"]["type"]
    ok = smollm2_server.request("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
    assert ok[0] == 200


def test_prompt_longer_than_context_is_400_with_the_limit(smollm2_server):
    status, _, body = smollm2_server.request("POST", "/v1/completions", {"prompt": "hello " * 2000})
    assert status == 400
    assert body["error"]["message"].startswith("This model's maximum context length is 1024 tokens")


def test_unknown_route_404_and_health(smollm2_server):
    assert smollm2_server.request("GET", "/nope")[0] == 404
    assert smollm2_server.request("GET", "/health")[0] == 200


def test_disconnect_mid_stream_frees_slot_and_kv_tokens(smollm2_server):
    body = {"prompt": "Tell me a long story", "max_tokens": 900, "ignore_eos": True}
    check_disconnect_frees_slot_and_kv(smollm2_server, body)


def test_metrics_expose_engine_gauges_and_http_counts(smollm2_server):
    before = smollm2_server.request("GET", "/metrics")
    assert before[0] == 200 and before[1]["content-type"].startswith("text/plain")
    assert smollm2_server.request("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 3})[0] == 200
    text = smollm2_server.request("GET", "/metrics")[2]

    def value(name: str) -> float:
        line = next(line for line in text.splitlines() if line.startswith(name))
        return float(line.rsplit(" ", 1)[1])

    assert value("lightllm_async:kv_cache_tokens_total") == 16384
    assert value("lightllm_async:engine_alive") == 1.0
    assert value("lightllm_async:generation_tokens_total") >= 3
    assert value('lightllm_async:http_requests_total{route="/v1/completions",status="200"}') >= 1
