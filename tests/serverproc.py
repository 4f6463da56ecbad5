"""Start `lightllm-async` as a real process tree for end-to-end tests, and talk to it."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m lightllm_async.server ...` in its own process group, with its log captured."""

    def __init__(
        self, *args: str, env: dict[str, str] | None = None, ready_timeout: float = 180.0, port: int = 0
    ):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "lightllm_async.server", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        self.log: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()
        if not self._ready.wait(ready_timeout):
            self.kill_tree()
            raise RuntimeError("server did not become ready:\n" + self.text_log())

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line)
            if "lightllm-async ready" in line:
                self._ready.set()
        self._ready.set()  # exited: let the waiter look at the log

    def text_log(self) -> str:
        return "".join(self.log)

    @property
    def region_name(self) -> str:
        return f"lla-{self.proc.pid}"

    def request(self, method: str, path: str, body=None, raw: bytes | None = None, timeout=120):
        """(status, headers, parsed JSON or text) for one plain HTTP request."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, dict(r.headers), _parse(r.read())
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), _parse(e.read())

    def stream(self, path: str, body, timeout=120) -> list[str]:
        """The `data:` payloads of an SSE response, in order."""
        req = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        events = []
        with urllib.request.urlopen(req, timeout=timeout) as r:
            for line in r:
                line = line.decode().rstrip("\r\n")
                if line.startswith("data:"):
                    events.append(line[5:].strip())
        return events

    def stop(self, sig=signal.SIGTERM, timeout=30.0) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill_tree(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


def stream_token_ids(srv: ServerProcess, prompt: str, n: int) -> list[int]:
    """Greedy token ids through LightLLM's /generate_stream, which names each token's id."""
    events = srv.stream(
        "/generate_stream",
        {"inputs": prompt, "parameters": {"max_new_tokens": n, "do_sample": False, "ignore_eos": True}},
    )
    return token_ids_by_count([json.loads(e) for e in events])


def token_ids_by_count(events: list[dict], count: int = 0) -> list[int]:
    """The new token ids of /generate_stream events (after `count` tokens already read): a finish
    seen after the last token's event comes as one more event, finished, repeating that token with
    its count unchanged, so tokens are counted by count_output_tokens, not by events."""
    ids = []
    for e in events:
        tok = e["token"]
        if tok["count_output_tokens"] > count:
            ids.append(tok["id"])
            count = tok["count_output_tokens"]
        else:
            assert e["finished"] and tok["count_output_tokens"] == count, e
    return ids


def stream_text(srv: ServerProcess, body) -> str:
    """The text of a streamed /v1/completions (`body` without "stream"), checked to end in [DONE]."""
    events = srv.stream("/v1/completions", {**body, "stream": True})
    assert events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    return "".join(c["choices"][0]["text"] for c in chunks if c["choices"])


def concurrently(fn, items: list) -> list:
    """`fn(item)` for every item, each in its own thread, all at once; the results in order."""
    results: list = [None] * len(items)
    errors: list[BaseException] = []

    def one(i):
        try:
            results[i] = fn(items[i])
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    if errors:
        raise errors[0]
    assert not any(t.is_alive() for t in threads), "a request did not finish"
    return results


def check_disconnect_frees_slot_and_kv(srv: ServerProcess, body) -> None:
    """Start the streamed completion `body` (long enough to outlast the test), read a few events,
    go away, and check that the engine aborted it early and gave back its slot and every KV token,
    and that the next request is served."""
    from lightllm_async.ipc import Region

    region = Region.attach(srv.region_name)
    try:
        stats = region.engine_stats
        assert wait_until(lambda: stats().num_running == 0, 30)
        free_slots, free_kv = region.num_free_slots(), stats().kv_tokens_free
        generated = stats().generation_tokens_total
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
        conn.request(
            "POST",
            "/v1/completions",
            json.dumps({**body, "stream": True}),
            {"Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        for _ in range(5):
            assert resp.readline().startswith(b"data: ")
            resp.readline()
        assert region.num_free_slots() == free_slots - 1
        assert stats().kv_tokens_free < free_kv
        conn.sock.close()  # the client goes away mid-stream
        conn.close()
        assert wait_until(lambda: region.num_free_slots() == free_slots, 10)
        assert wait_until(lambda: stats().kv_tokens_free == free_kv, 10)
        assert stats().num_running == 0
        assert stats().generation_tokens_total - generated < body["max_tokens"]  # aborted, not finished
        again = srv.request(
            "POST", "/v1/completions", {"prompt": body["prompt"], "max_tokens": 3, "ignore_eos": True}
        )
        assert again[0] == 200 and again[2]["usage"]["completion_tokens"] == 3, again
        assert wait_until(lambda: stats().kv_tokens_free == free_kv, 10)
    finally:
        region.close()


def leave_streams_early(port: int, words: list[str], n: int = 12, seed: int = 3) -> None:
    """`n` clients that start a streamed completion (1-120 random words, 200 tokens) and leave
    at different moments: after 0-3 event lines and a pause of 0-40 ms, closing the socket."""
    rng = random.Random(seed)

    def leave_early(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        body = {"prompt": " ".join(rng.choices(words, k=rng.randint(1, 120))), "max_tokens": 200,
                "ignore_eos": True, "stream": True}  # fmt: skip
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        for _ in range(i % 4):
            resp.readline()
        time.sleep(0.01 * (i % 5))
        conn.sock.close()
        conn.close()

    concurrently(leave_early, list(range(n)))


def sampled_bodies(prompt: str = "the brown fox and the latent query") -> list[dict]:
    """Completions of 12 tokens that take every sampling path: seeded top-p with logprobs, `n`,
    penalties, and a one-token request."""
    base = {"prompt": prompt, "max_tokens": 12, "ignore_eos": True}
    return [
        {**base, "temperature": 1.2, "top_p": 0.9, "seed": 77, "logprobs": 2},
        {**base, "temperature": 0.8, "seed": 5, "n": 2},
        {**base, "temperature": 0, "presence_penalty": 0.7, "frequency_penalty": 0.3},
        {**base, "temperature": 0, "max_tokens": 1, "logprobs": 1},
    ]


def random_completions(words, n: int, seed: int, min_tokens: int = 1) -> list[dict]:
    """`n` greedy /v1/completions bodies of 2, 9 or 40 random `words` and min_tokens..20 tokens."""
    rng = random.Random(seed)
    return [
        {"prompt": " ".join(rng.choices(words, k=rng.choice([2, 9, 40]))),
         "max_tokens": rng.randint(min_tokens, 20), "temperature": 0, "ignore_eos": True}
        for _ in range(n)
    ]  # fmt: skip


def completion_text(srv: ServerProcess, body) -> str:
    """The text of a non-streamed /v1/completions, checked to hold max_tokens tokens."""
    status, _, resp = srv.request("POST", "/v1/completions", body)
    assert status == 200, resp
    assert resp["usage"]["completion_tokens"] == body["max_tokens"]
    return resp["choices"][0]["text"]


def kill_mid_stream(srv: ServerProcess, pid: int, streams: int = 3, after: float = 0.5) -> tuple[float, list]:
    """Start `streams` long completions, SIGKILL `pid` (an engine process) `after` seconds in, wait
    for the streams to end: (seconds from the kill until the last ended, each stream's events)."""
    results: list = []

    def streamer():
        results.append(srv.stream("/v1/completions", {"prompt": "x", "max_tokens": 3000, "stream": True}))

    threads = [threading.Thread(target=streamer) for _ in range(streams)]
    for t in threads:
        t.start()
    time.sleep(after)
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    for t in threads:
        t.join(10)
    return time.monotonic() - killed, results


class TimedStream(threading.Thread):
    """A streamed completion, each `data:` payload with the time it arrived."""

    def __init__(self, srv: ServerProcess, body: dict):
        super().__init__(daemon=True)
        self.srv, self.body, self.events = srv, body, []
        self.start()

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.srv.port, timeout=60)
        conn.request("POST", "/v1/completions", json.dumps(self.body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:  # refused: sent after the death
            self.events.append((time.monotonic(), resp.read().decode()))
        for line in resp:
            if line.startswith(b"data:"):
                self.events.append((time.monotonic(), line[5:].strip().decode()))
        conn.close()

    def ended_after(self, since: float) -> float:
        """Seconds from `since` (a time.monotonic(): a kill, a stop) until the stream's last event."""
        return self.events[-1][0] - since

    @property
    def error(self) -> str:
        """The error message that ended the stream (a refusal's body, or the last event before [DONE])."""
        if self.events[-1][1] != "[DONE]":
            return json.loads(self.events[-1][1])["error"]["message"]
        return json.loads(self.events[-2][1])["error"]["message"]


def _parse(raw: bytes):
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


def wait_until(pred, timeout=10.0, interval=0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(interval)
    return pred()
