"""Prefill/decode disaggregation (`--pd prefill=1,decode=1`) on the CPU, the two engines talking
over gloo: greedy output equals HF transformers' (so the unified server's) streamed and not, with
chunked prefills and concurrent requests; the prefill engine makes exactly the first token of each
request and the decode engine the rest; usage counts stay right; a client that leaves frees its
slot and the KV on both sides; killing either engine ends the requests in flight with an error
within 2 s, and the server exits 1 with no shared memory left. Llama (GQA) and DeepSeek (MLA)."""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine_harness import hf_greedy
from lightllm_async.ipc import Region, SlotState, total_stats
from lightllm_async.ipc.shm import SHM_DIR
from lightllm_async.tokenizer import load_tokenizer
from lightllm_async.tools.make_random_model import make_random_model
from serverproc import (
    ServerProcess,
    TimedStream,
    completion_text,
    concurrently,
    leave_streams_early,
    random_completions,
    sampled_bodies,
    stream_text,
    stream_token_ids,
    token_ids_by_count,
    wait_until,
)

WORDS = ("the", "model", "token", "stream", "cache", "expert", "router", "latent", "query", "brown", "fox")
NEW_TOKENS = 16


def _server(path: str, *extra: str) -> ServerProcess:
    return ServerProcess(
        "--model", path, "--device", "cpu", "--pd", "prefill=1,decode=1", "--max-model-len", "512",
        "--max-running-requests", "8", "--num-slots", "24", "--max-num-batched-tokens", "32",
        "--cpu-threads", "1", *extra,
    )  # fmt: skip


@pytest.fixture(scope="module", params=["tiny", "deepseek-v2-tiny"])
def pd(request, tmp_path_factory):
    path = make_random_model(request.param, str(tmp_path_factory.mktemp(request.param)), "float32", seed=4)
    srv = _server(path)
    try:
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        yield srv, hf, load_tokenizer(path), path
        assert srv.stop() == 0
    finally:
        if srv.proc.poll() is None:
            srv.kill_tree()
    assert _shm_files(srv) == []


def _shm_files(srv: ServerProcess) -> list[str]:
    base = srv.region_name
    return sorted(f for f in os.listdir(SHM_DIR) if f == base or f.startswith(f"sem.{base}-"))


def _metric(srv: ServerProcess, name: str) -> dict[str, float]:
    """The samples of metric `name` by their label value ("" for one without labels)."""
    out = {}
    for line in srv.request("GET", "/metrics")[2].splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            key, value = line.rsplit(" ", 1)
            out[key[len(name) :].strip("{}").split('"')[1] if "{" in key else ""] = float(value)
    return out


def test_greedy_through_prefill_then_decode_equals_hf_transformers(pd):
    srv, hf, tok, _ = pd
    generated = "lightllm_async:replica_generation_tokens_total"
    before = _metric(srv, generated)
    rng = random.Random(5)
    texts = [" ".join(rng.choices(WORDS, k=n)) for n in (1, 6, 60)]  # 60 words: several 32-token chunks
    for text in texts:
        assert stream_token_ids(srv, text, NEW_TOKENS) == hf_greedy(hf, tok.encode(text), NEW_TOKENS)
        body = {"prompt": text, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}
        status, _, plain = srv.request("POST", "/v1/completions", body)
        assert status == 200, plain
        assert plain["choices"][0]["text"] == stream_text(srv, {**body, "stream": True})
        usage = plain["usage"]
        assert (usage["prompt_tokens"], usage["completion_tokens"]) == (len(tok.encode(text)), NEW_TOKENS)
    after = _metric(srv, generated)
    made = {k: after[k] - before.get(k, 0) for k in after}
    # the prefill engine sampled each request's first token, the decode engine the others
    assert made == {"0": 3 * 3, "1": 3 * 3 * (NEW_TOKENS - 1)}, made
    sent = _metric(srv, "lightllm_async:kv_transfer_sent_tokens_total")
    assert sent and sent == _metric(srv, "lightllm_async:kv_transfer_received_tokens_total")


def test_concurrent_requests_each_equal_the_request_alone(pd):
    srv, *_ = pd
    bodies = random_completions(WORDS, 10, 8, 1)
    alone = [completion_text(srv, b) for b in bodies]
    assert concurrently(lambda b: completion_text(srv, b), bodies) == alone


def test_sampled_requests_with_logprobs_penalties_and_choices_equal_the_unified_servers(pd):
    """Seeded sampling is a function of (seed, position), so the decode engine continues exactly
    where the unified engine would; log-probabilities flow through the slot's ring across the
    handoff; a request with penalties runs whole on the prefill engine (they read every position
    fed in its own row, which a received prefix never is)."""
    srv, _, _, path = pd
    bodies = sampled_bodies()
    with_pd = [srv.request("POST", "/v1/completions", b)[2] for b in bodies]
    one = ServerProcess(
        "--model", path, "--device", "cpu", "--max-model-len", "512", "--max-running-requests", "8",
        "--num-slots", "24", "--max-num-batched-tokens", "32", "--cpu-threads", "1",
    )  # fmt: skip
    try:
        unified = [one.request("POST", "/v1/completions", b)[2] for b in bodies]
    finally:
        assert one.stop() == 0
    for got, want in zip(with_pd, unified, strict=True):
        assert [c["text"] for c in got["choices"]] == [c["text"] for c in want["choices"]]
        for key in ("prompt_tokens", "completion_tokens"):  # cached tokens: each server's own history
            assert got["usage"][key] == want["usage"][key]
        for c, w in zip(got["choices"], want["choices"], strict=True):
            if w["logprobs"] is not None:
                assert c["logprobs"]["tokens"] == w["logprobs"]["tokens"]
                assert c["logprobs"]["token_logprobs"] == pytest.approx(
                    w["logprobs"]["token_logprobs"], abs=1e-4
                )


def test_the_first_token_streams_from_the_prefill_engine_before_the_decode_engine_runs(pd):
    srv, hf, tok, _ = pd
    region = Region.attach(srv.region_name)
    decode_pid = region.replica_pid(1)
    region.close()
    text = "the router and the expert"
    want = hf_greedy(hf, tok.encode(text), 8)
    os.kill(decode_pid, signal.SIGSTOP)  # the decode engine cannot run a step
    try:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        body = {"inputs": text, "parameters": {"max_new_tokens": 8, "do_sample": False, "ignore_eos": True}}
        conn.request("POST", "/generate_stream", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        first = resp.readline()
        assert first.startswith(b"data:") and json.loads(first[5:])["token"]["id"] == want[0]
    finally:
        os.kill(decode_pid, signal.SIGCONT)
    events = [json.loads(line[5:]) for line in resp if line.startswith(b"data:")]
    conn.close()
    # the engine publishes the count, then the state: a reader between them sees the finish later
    rest = token_ids_by_count(events, count=1)
    assert events[-1]["finished"]
    assert [want[0], *rest] == want


def test_a_repeated_prompt_reports_the_prefill_engines_cached_tokens(pd):
    srv, _, tok, _ = pd
    body = {"prompt": " ".join(["brown fox"] * 20), "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    first = srv.request("POST", "/v1/completions", body)[2]
    again = srv.request("POST", "/v1/completions", body)[2]
    assert again["choices"][0]["text"] == first["choices"][0]["text"]
    n = len(tok.encode(body["prompt"]))
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == n - 1  # all but the last
    assert again["usage"]["completion_tokens"] == 4


def _stats(region: Region):
    return total_stats([region.replica_stats(k) for k in range(region.num_replicas)])


def test_a_client_leaving_mid_stream_frees_its_slot_and_the_kv_on_both_engines(pd):
    srv, *_ = pd
    region = Region.attach(srv.region_name)
    try:
        assert wait_until(lambda: _stats(region).num_running == 0, 30)
        free_slots = region.num_free_slots()
        free_kv = [region.replica_stats(k).kv_tokens_free for k in range(2)]
        generated = _stats(region).generation_tokens_total
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
        body = {"prompt": "the brown fox " * 20, "max_tokens": 300, "ignore_eos": True, "stream": True}
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        for _ in range(5):  # tokens from the decode engine
            assert resp.readline().startswith(b"data: ")
            resp.readline()
        assert region.num_free_slots() == free_slots - 1
        assert region.replica_stats(1).kv_tokens_free < free_kv[1]
        conn.sock.close()
        conn.close()
        assert wait_until(lambda: region.num_free_slots() == free_slots, 10)
        assert wait_until(lambda: [region.replica_stats(k).kv_tokens_free for k in range(2)] == free_kv, 10)
        assert _stats(region).num_running == 0
        assert _stats(region).generation_tokens_total - generated < body["max_tokens"]
    finally:
        region.close()


def test_requests_aborted_at_every_stage_leak_nothing(pd):
    """Many clients leave at random moments (during the prompt, the transfer, the decode): every
    slot and KV token comes back on both engines."""
    srv, *_ = pd
    region = Region.attach(srv.region_name)
    try:
        assert wait_until(lambda: _stats(region).num_running == 0, 30)
        free_slots = region.num_free_slots()
        free_kv = [region.replica_stats(k).kv_tokens_free for k in range(2)]
        leave_streams_early(srv.port, WORDS)
        assert wait_until(lambda: region.num_free_slots() == free_slots, 15)
        assert wait_until(lambda: [region.replica_stats(k).kv_tokens_free for k in range(2)] == free_kv, 15)
        body = {"prompt": "the model", "max_tokens": 3, "ignore_eos": True}
        assert srv.request("POST", "/v1/completions", body)[2]["usage"]["completion_tokens"] == 3
    finally:
        region.close()


def test_two_prefill_and_two_decode_engines_serve_concurrent_requests_like_one_request_at_a_time(tiny_path):
    """Four transfer pairs, each numbered and received in its own order: output equals each request
    alone (and, per the tests above, HF's), and every engine takes a share."""
    srv = ServerProcess(
        "--model", tiny_path, "--device", "cpu", "--pd", "prefill=2,decode=2", "--max-model-len", "512",
        "--max-running-requests", "8", "--num-slots", "48", "--max-num-batched-tokens", "32",
        "--cpu-threads", "1",
    )  # fmt: skip
    try:
        rng = random.Random(11)
        bodies = [
            {"prompt": " ".join(rng.choices(WORDS, k=rng.choice([2, 9, 40, 100]))),
             "max_tokens": rng.randint(2, 30), "temperature": 0, "ignore_eos": True}
            for _ in range(32)
        ]  # fmt: skip

        def text(body):
            status, _, resp = srv.request("POST", "/v1/completions", body)
            assert status == 200, resp
            return resp["choices"][0]["text"]

        alone = [text(b) for b in bodies[:8]]
        assert concurrently(text, bodies)[:8] == alone
        made = _metric(srv, "lightllm_async:replica_generation_tokens_total")
        assert made["0"] + made["1"] == 40  # one token a request on the prefill engines
        assert made["0"] and made["1"] and made["2"] and made["3"], made
        assert sum(made.values()) == sum(b["max_tokens"] for b in [*bodies, *bodies[:8]])
    finally:
        assert srv.stop() == 0
    assert _shm_files(srv) == []


# ---------------------------------------------------------------- an engine dies


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return make_random_model("tiny", str(tmp_path_factory.mktemp("tiny-kill")), "float32", seed=4)


@pytest.mark.parametrize("victim", ["decode", "prefill"])
def test_a_killed_engine_ends_the_requests_in_flight_within_2s_and_the_server_exits_1(tiny_path, victim):
    # small chunks: prompts take many steps, so requests sit in every stage when the kill comes
    srv = _server(tiny_path, "--max-num-batched-tokens", "8")
    try:
        region = Region.attach(srv.region_name)
        pids = [region.replica_pid(k) for k in range(2)]
        rng = random.Random(victim)

        def stream(n_words: int) -> TimedStream:
            prompt = " ".join(rng.choices(WORDS, k=n_words))  # distinct: no prompt waits for another's
            return TimedStream(srv, {"prompt": prompt, "max_tokens": 150, "ignore_eos": True, "stream": True})

        streams = [stream(20) for _ in range(3)]
        k = 1 if victim == "decode" else 0
        assert wait_until(lambda: region.replica_stats(1).num_running > 0, 30)  # decoding
        if victim == "decode":  # stopped, it receives nothing: the next handoffs stay mid-transfer
            os.kill(pids[1], signal.SIGSTOP)
        streams += [stream(100) for _ in range(3)]  # and long prompts (~300 tokens), 8 tokens a step
        assert wait_until(lambda: region.replica_stats(0).num_running > 0, 30, interval=0.002)
        if victim == "decode":
            handed_off = lambda: any(region.control(i)[0] == SlotState.HANDOFF for i in range(24))  # noqa: E731
            assert wait_until(handed_off, 30)
        region.close()
        os.kill(pids[k], signal.SIGKILL)
        killed = time.monotonic()
        for s in streams:
            s.join(15)
        delays = [s.ended_after(killed) for s in streams]
        assert all(d < 2.0 for d in delays), delays
        # a short prompt's 150 tokens may all be out before the server has failed it (on a loaded
        # machine, even before the kill): such a stream is not lost; the long prompts, in the
        # prefill engine at the kill, cannot finish
        done = [s.events[-1][1] == "[DONE]" and "error" not in json.loads(s.events[-2][1]) for s in streams]
        assert not any(done[3:]), delays
        errors = [s.error for s, ok in zip(streams, done, strict=True) if not ok]
        # the reader names the dead replica; or the decode engine, whose receive from a killed
        # prefill engine failed first, names the transfer and both replicas
        assert all(f"replica {k}" in e or "stopping" in e for e in errors), "\n".join(errors)
        assert srv.proc.wait(15) == 1
        # (a prefill engine killed while tqdm's multiprocessing lock exists leaves the resource
        # tracker a semaphore to clean up, which it does and says so after this line)
        assert "stopped (exit 1)" in srv.text_log()
        assert _shm_files(srv) == []
    finally:
        if srv.proc.poll() is None:
            srv.kill_tree()
