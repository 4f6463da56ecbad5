"""Prefill/decode disaggregation across servers (`--role prefill|decode|router`), as three process
trees on one host, the engines talking over gloo: greedy output through the router equals the
unified server's (OpenAI and native APIs, streamed and not, concurrent requests; sampled
requests with log-probabilities and penalties too), the prefill server makes the first token
and the decode server the rest; clients that leave at any stage leak nothing on either server
and hold back no later transfer; a killed decode or prefill server ends the router's requests
with an error within 2 s, the router answers 503 until both are back, the survivor exits 1
with no shared memory left, and the restarted pair serves again; a stopped (hung) decode or
prefill server ends them with an error within the router's --pd-upstream-timeout + 2 s, the
router answers 503 while it stays silent, and once it answers the pair serves again with nothing
leaked. Llama (GQA) and DeepSeek (MLA); test_pd_role_gpu.py runs these helpers on two GPUs."""

from __future__ import annotations

import json
import os
import random
import signal
import time

import pytest

from lightllm_async.ipc.shm import SHM_DIR
from lightllm_async.tools.make_random_model import make_random_model
from serverproc import (
    ServerProcess,
    TimedStream,
    concurrently,
    free_port,
    leave_streams_early,
    sampled_bodies,
    token_ids_by_count,
    wait_until,
)

WORDS = ("the", "model", "token", "stream", "cache", "expert", "router", "latent", "query", "brown", "fox")
SECRET = "test-secret"
COMMON = (
    "--device", "cpu", "--max-model-len", "512", "--max-running-requests", "8", "--num-slots", "24",
    "--cpu-threads", "1",
)  # fmt: skip


def _role_args(
    path: str, role: str, rank: int, port: int, master: int, chunk: int, common: tuple[str, ...]
) -> tuple[str, ...]:
    return (
        "--model", path, *common, "--max-num-batched-tokens", str(chunk), "--role", role,
        "--pd-rank", str(rank), "--pd-world", "2", "--master-port", str(master), "--pd-secret", SECRET,
        "--port", str(port),
    )  # fmt: skip


def _pair(
    path: str,
    ports: tuple[int, int],
    chunk: int = 32,
    common: tuple[str, ...] = COMMON,
    envs: tuple[dict, dict] = ({}, {}),
    ready_timeout: float = 180.0,
) -> list[ServerProcess]:
    """A prefill server (rank 0, which hosts the group's rendezvous) and a decode server, started
    together: each waits for the other to join the group. `common`: their device and limits;
    `envs`: each one's environment (on CUDA, the GPU it sees: test_pd_role_gpu.py)."""
    master = free_port()
    args = [
        (_role_args(path, "prefill", 0, ports[0], master, chunk, common), envs[0]),
        (_role_args(path, "decode", 1, ports[1], master, chunk, common), envs[1]),
    ]
    return concurrently(
        lambda a: ServerProcess(*a[0], port=int(a[0][-1]), env=a[1], ready_timeout=ready_timeout), args
    )


def _router(path: str, ports: tuple[int, int], *extra: str, max_len: int = 512) -> ServerProcess:
    return ServerProcess(
        "--role", "router", "--model", path, "--max-model-len", str(max_len), "--pd-secret", SECRET,
        "--prefill", f"http://127.0.0.1:{ports[0]}", "--decode", f"http://127.0.0.1:{ports[1]}", *extra,
    )  # fmt: skip


def _shm_files(srv: ServerProcess) -> list[str]:
    base = srv.region_name
    return sorted(f for f in os.listdir(SHM_DIR) if f == base or f.startswith(f"sem.{base}-"))


def _metric(srv: ServerProcess, name: str) -> float:
    for line in srv.request("GET", "/metrics")[2].splitlines():
        if line.startswith(f"lightllm_async:{name} "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def _stop_all(*servers: ServerProcess) -> None:
    for s in servers:
        if s.proc.poll() is None:
            s.proc.send_signal(signal.SIGTERM)
    for s in servers:
        try:
            s.proc.wait(30)
        except Exception:  # noqa: BLE001
            s.kill_tree()


@pytest.fixture(scope="module", params=["tiny", "deepseek-v2-tiny"])
def role(request, tmp_path_factory):
    """(router, prefill server, decode server, unified server), all on one model."""
    path = make_random_model(request.param, str(tmp_path_factory.mktemp(request.param)), "float32", seed=4)
    ports = (free_port(), free_port())
    started = concurrently(
        lambda f: f(),
        [
            lambda: _pair(path, ports),
            lambda: _router(path, ports),
            lambda: ServerProcess("--model", path, *COMMON, "--max-num-batched-tokens", "32"),
        ],
    )
    (p, d), router, unified = started
    servers = (router, p, d, unified)
    try:
        assert wait_until(lambda: router.request("GET", "/health")[0] == 200, 10)
        yield servers
        _stop_all(router, p, d, unified)
        assert [s.proc.returncode for s in servers] == [0, 0, 0, 0]
    finally:
        for s in servers:
            if s.proc.poll() is None:
                s.kill_tree()
    assert _shm_files(p) == _shm_files(d) == []


def _native(srv: ServerProcess, text: str, n: int, stream: bool):
    body = {"inputs": text, "parameters": {"max_new_tokens": n, "do_sample": False, "ignore_eos": True}}
    if stream:
        return token_ids_by_count([json.loads(e) for e in srv.stream("/generate_stream", body)])
    status, _, out = srv.request("POST", "/generate", body)
    assert status == 200, out
    return out["generated_text"][0], out["count_output_tokens"], out["prompt_tokens"]


def _openai(srv: ServerProcess, kind: str, text: str, n: int, stream: bool):
    if kind == "chat":
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": text}]}
    else:
        path, body = "/v1/completions", {"prompt": text}
    body.update(max_tokens=n, temperature=0, ignore_eos=True)
    if stream:
        events = srv.stream(path, {**body, "stream": True, "stream_options": {"include_usage": True}})
        assert events[-1] == "[DONE]", events[-3:]
        chunks = [json.loads(e) for e in events[:-1]]
        key = "delta" if kind == "chat" else None
        parts = [(c["choices"][0][key].get("content") or "") if key else c["choices"][0]["text"]
                 for c in chunks if c["choices"]]  # fmt: skip
        usage = chunks[-1]["usage"]
        return "".join(parts), usage["prompt_tokens"], usage["completion_tokens"]
    status, _, out = srv.request("POST", path, body)
    assert status == 200, out
    c = out["choices"][0]
    text_out = c["message"]["content"] if kind == "chat" else c["text"]
    return text_out, out["usage"]["prompt_tokens"], out["usage"]["completion_tokens"]


def test_greedy_through_the_router_equals_the_unified_server_on_every_api(role):
    router, p, d, unified = role
    rng = random.Random(7)
    calls = []
    for i in range(12):  # every API, streamed and not, prompts of one word to several chunks
        text = " ".join(rng.choices(WORDS, k=rng.choice([1, 7, 60])))
        n = rng.randint(2, 20)
        api = ["completions", "chat", "native"][i % 3]
        calls.append((api, text, n, i % 2 == 0))

    def run(srv):
        def one(call):
            api, text, n, stream = call
            return _native(srv, text, n, stream) if api == "native" else _openai(srv, api, text, n, stream)

        return one

    sent = _metric(p, "kv_transfer_sent_tokens_total")
    want = [run(unified)(c) for c in calls]
    got = concurrently(run(router), calls)
    assert got == want
    # every request went through the handoff: the decode server received what the prefill one sent
    assert wait_until(
        lambda: (
            _metric(d, "kv_transfer_received_tokens_total") == _metric(p, "kv_transfer_sent_tokens_total")
        ),
        10,
    )
    assert _metric(p, "kv_transfer_sent_tokens_total") > sent
    assert _metric(p, "generation_tokens_total") > 0 and _metric(d, "generation_tokens_total") > 0


def test_sampled_requests_with_logprobs_penalties_and_one_token_equal_the_unified_servers(role):
    """Seeded sampling goes on on the decode server where the unified engine would; a token's
    log-probabilities come from the server that made it; penalties run whole on the prefill
    server (its finish comes from there), as does a request of one token."""
    router, _, _, unified = role
    bodies = sampled_bodies()
    got = concurrently(lambda b: router.request("POST", "/v1/completions", b)[2], bodies)
    for g, b in zip(got, bodies, strict=True):
        w = unified.request("POST", "/v1/completions", b)[2]
        assert [c["text"] for c in g["choices"]] == [c["text"] for c in w["choices"]]
        assert g["usage"]["completion_tokens"] == w["usage"]["completion_tokens"]
        for c, wc in zip(g["choices"], w["choices"], strict=True):
            if wc["logprobs"] is not None:
                assert c["logprobs"]["tokens"] == wc["logprobs"]["tokens"]
                assert c["logprobs"]["token_logprobs"] == pytest.approx(
                    wc["logprobs"]["token_logprobs"], abs=1e-4
                )


def _idle(srv: ServerProcess, slots: int = 24) -> bool:
    return _metric(srv, "request_slots_free") == slots and _metric(srv, "num_requests_running") == 0


def test_clients_leaving_at_every_stage_leak_nothing_and_hold_back_no_later_transfer(role):
    """Clients leave during the prompt, the handoff and the decode: both servers get every slot
    and KV token back, and later requests are served (a handoff the decode server never heard
    of would hold back every later transfer of the pair)."""
    router, p, d, _ = role
    assert wait_until(lambda: _idle(p) and _idle(d), 30)
    kv = [_metric(s, "kv_cache_tokens_free") for s in (p, d)]
    leave_streams_early(router.port, WORDS)
    assert wait_until(lambda: _idle(p) and _idle(d), 15)
    assert wait_until(lambda: [_metric(s, "kv_cache_tokens_free") for s in (p, d)] == kv, 15)
    body = {"prompt": "the model", "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    assert (
        concurrently(
            lambda b: router.request("POST", "/v1/completions", b, timeout=20)[2]["usage"][
                "completion_tokens"
            ],
            [body] * 4,
        )
        == [5] * 4
    )
    assert _metric(p, "kv_transfer_sent_tokens_total") == _metric(d, "kv_transfer_received_tokens_total")


def test_a_router_killed_mid_flight_leaves_no_request_nor_transfer_behind(role):
    """The role servers see the router go: the prefill server drops what it computes and gives
    the decode server whatever its engine handed off; nothing stays taken, no transfer of the
    pair is left unannounced (the next requests through another router are served)."""
    router, p, d, _ = role
    second = ServerProcess(*router.proc.args[5:])  # the same flags, on a port of its own
    sent = _metric(p, "kv_transfer_sent_tokens_total")
    rng = random.Random(5)
    bodies = [{"prompt": " ".join(rng.choices(WORDS, k=rng.randint(1, 120))), "max_tokens": 20,
               "ignore_eos": True, "stream": True} for _ in range(12)]  # fmt: skip
    streams = [TimedStream(second, b) for b in bodies]
    assert wait_until(lambda: _metric(p, "kv_transfer_sent_tokens_total") > sent, 10, interval=0.002)
    time.sleep(0.05)
    second.kill_tree()
    for s in streams:
        s.join(5)
    assert wait_until(lambda: _idle(p) and _idle(d), 15)
    assert wait_until(
        lambda: (
            _metric(p, "kv_transfer_sent_tokens_total") == _metric(d, "kv_transfer_received_tokens_total")
        ),
        5,
    )
    body = {"prompt": "the model", "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    got = concurrently(lambda b: router.request("POST", "/v1/completions", b, timeout=20)[2], [body] * 4)
    assert [g["usage"]["completion_tokens"] for g in got] == [5] * 4


def test_internal_endpoints_need_the_secret_and_a_role_server(role):
    router, p, d, unified = role
    call = {"prompt_ids": [1, 2], "params": {}, "decode_rank": 1, "decode_url": d.url, "id": "x"}
    assert p.request("POST", "/internal/pd/prefill", call)[0] == 403
    assert p.request("GET", "/internal/pd/info")[0] == 403
    assert unified.request("GET", "/internal/pd/info")[0] == 404
    assert router.request("GET", "/internal/pd/info")[0] == 404


# ---------------------------------------------------------------- a server dies


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return make_random_model("tiny", str(tmp_path_factory.mktemp("tiny-kill")), "float32", seed=4)


def _streams_in_every_stage(router, p, d, seed: str, decode_tokens: int = 400) -> list[TimedStream]:
    """Streams decoding on d (`decode_tokens` long), then long prompts (~300 tokens) running on p."""
    rng = random.Random(seed)

    def stream(n_words: int, n: int) -> TimedStream:
        prompt = " ".join(rng.choices(WORDS, k=n_words))  # distinct: no prompt waits for another's
        return TimedStream(router, {"prompt": prompt, "max_tokens": n, "ignore_eos": True, "stream": True})

    streams = [stream(20, decode_tokens) for _ in range(3)]
    assert wait_until(lambda: _metric(d, "num_requests_running") > 0, 30)  # decoding
    streams += [stream(100, 150) for _ in range(3)]
    assert wait_until(lambda: _metric(p, "num_requests_running") > 0, 30, interval=0.002)
    return streams


def _kill_mid_stream(router, p, d, victim: str, decode_tokens: int = 400) -> None:
    """Streams in every stage (decoding on d, prompts on p), then SIGKILL the victim's process
    tree: every stream ends with an error naming a server within 2 s, the router refuses new
    requests with 503, the survivor exits 1 (its engine saw its peer go) leaving no shared memory.
    `decode_tokens`: enough that the decoding streams outlast the prompts' start (test_pd_role_gpu)."""
    streams = _streams_in_every_stage(router, p, d, victim, decode_tokens)
    dead, survivor = (d, p) if victim == "decode" else (p, d)
    dead.kill_tree()
    killed = time.monotonic()
    for s in streams:
        s.join(15)
    delays = [s.ended_after(killed) for s in streams]
    assert all(dl < 2.0 for dl in delays), delays
    errors = [s.error for s in streams]
    assert all("server" in e for e in errors), "\n".join(errors)
    assert any(f"{victim} server" in e for e in errors), "\n".join(errors)
    status, _, out = router.request("POST", "/v1/completions", {"prompt": "x", "max_tokens": 2})
    assert status == 503 and "server" in out["error"]["message"], out
    assert survivor.proc.wait(15) == 1
    assert "stopped (exit 1)" in survivor.text_log()
    assert _shm_files(survivor) == []
    assert router.request("GET", "/health")[0] == 503


def test_a_killed_decode_then_prefill_server_ends_the_routers_requests_within_2s_and_503_until_back(
    tiny_path,
):
    ports = (free_port(), free_port())
    # small chunks: prompts take many steps, so requests sit in every stage when the kill comes
    p, d = _pair(tiny_path, ports, chunk=8)
    router = _router(tiny_path, ports, "--pd-upstream-timeout", str(HANG_TIMEOUT_S))
    servers = [router, p, d]
    try:
        assert wait_until(lambda: router.request("GET", "/health")[0] == 200, 10)
        _kill_mid_stream(router, p, d, "decode")
        # both back: the router serves again (the killed server's region is removed by the next
        # start on the host: a SIGKILLed process cannot unlink it)
        p, d = _pair(tiny_path, ports, chunk=8)
        servers += [p, d]
        assert _shm_files(servers[2]) == []
        assert wait_until(lambda: router.request("GET", "/health")[0] == 200, 10)
        body = {"prompt": "the model", "max_tokens": 5, "ignore_eos": True}
        status, _, out = router.request("POST", "/v1/completions", body)
        assert status == 200 and out["usage"]["completion_tokens"] == 5, out
        _kill_mid_stream(router, p, d, "prefill")
    finally:
        _stop_all(*servers)


# ---------------------------------------------------------------- a server hangs

HANG_TIMEOUT_S = 3.0  # the router's --pd-upstream-timeout here: above any silence of a loaded CI box


def _leaks(p: ServerProcess, d: ServerProcess) -> list[float]:
    """Both servers idle: their free KV tokens (every slot back, nothing running)."""
    assert wait_until(lambda: _idle(p) and _idle(d), 30)
    return [_metric(s, "kv_cache_tokens_free") for s in (p, d)]


def _stop_mid_stream(router, p, d, victim: str) -> None:
    """Streams in every stage, then SIGSTOP the victim's HTTP process (its engine runs on: a
    stopped engine would stop beating in the group, and its peer would exit as for a kill): every
    stream the victim held (or a prompt whose handoff waits on it) ends with an error within
    timeout + 2 s, none hangs; the router answers 503 while it stays stopped. SIGCONT: the router
    serves again, both servers get every slot and KV token back, every transfer was announced."""
    kv = _leaks(p, d)
    streams = _streams_in_every_stage(router, p, d, f"stop-{victim}")
    stopped = d if victim == "decode" else p
    os.kill(stopped.proc.pid, signal.SIGSTOP)
    at = time.monotonic()
    try:
        assert wait_until(lambda: router.request("GET", "/health")[0] == 503, HANG_TIMEOUT_S + 2)
        for s in streams:
            s.join(HANG_TIMEOUT_S + 60)  # one on the other server may finish in its own time
        assert not any(s.is_alive() for s in streams)
        endings = [_ending(s) for s in streams]
        assert "hung" not in endings, endings
        failed = [s for s, e in zip(streams, endings, strict=True) if e == "error"]
        assert failed, "no stream was on the stopped server"
        ends = [round(s.ended_after(at), 2) for s in failed]
        assert max(ends) < HANG_TIMEOUT_S + 2, ends
        errors = [s.error for s in failed]
        assert all("server" in e for e in errors), "\n".join(errors)
        assert any(f"{victim} server" in e for e in errors), "\n".join(errors)
        status, _, out = router.request("POST", "/v1/completions", {"prompt": "x", "max_tokens": 2})
        assert status == 503 and f"{victim} server" in out["error"]["message"], out
        assert router.request("GET", "/health")[0] == 503
    finally:
        os.kill(stopped.proc.pid, signal.SIGCONT)
    assert wait_until(lambda: router.request("GET", "/health")[0] == 200, 10)
    assert _leaks(p, d) == kv
    assert _metric(p, "kv_transfer_sent_tokens_total") == _metric(d, "kv_transfer_received_tokens_total")
    body = {"prompt": "the model", "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    got = concurrently(lambda b: router.request("POST", "/v1/completions", b, timeout=20)[2], [body] * 4)
    assert [g["usage"]["completion_tokens"] for g in got] == [5] * 4


def _ending(s: TimedStream) -> str:
    """How a stream ended: done, error (an error event then [DONE], or a refusal), or hung (the
    client gave up on it)."""
    last = s.events[-1][1] if s.events else ""
    if last == "[DONE]":
        return "error" if "error" in json.loads(s.events[-2][1]) else "done"
    return "error" if last.startswith("{") and "error" in json.loads(last) else "hung"


def test_a_stopped_decode_then_prefill_server_ends_the_routers_requests_in_time_and_503_until_it_answers(
    tiny_path,
):
    """A role server alive but silent (SIGSTOP) must not hang the router's clients: its requests
    end with an error once it sent nothing for --pd-upstream-timeout, a stream that goes on sending
    is never cut, and once it answers again the pair serves with nothing leaked on either side."""
    ports = (free_port(), free_port())
    p, d = _pair(tiny_path, ports)
    router = _router(tiny_path, ports, "--pd-upstream-timeout", str(HANG_TIMEOUT_S))
    try:
        assert wait_until(lambda: router.request("GET", "/health")[0] == 200, 10)
        _stop_mid_stream(router, p, d, "decode")
        _stop_mid_stream(router, p, d, "prefill")
    finally:
        _stop_all(router, p, d)
    assert [s.proc.returncode for s in (router, p, d)] == [0, 0, 0]
    assert _shm_files(p) == _shm_files(d) == []
