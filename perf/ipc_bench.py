"""The shared-memory channel against the ZMQ channel that vLLM and SGLang use, both end to end.

Every transport runs the same experiment: a frontend on an asyncio loop (uvloop, as the server)
and a separate engine process (spawned) running a no-op loop. Per step the engine takes the new
requests, emits one token for each running request, finishes those that reached max_new_tokens,
and publishes the step.

  shm          the real frontend machinery: `frontend.reader.Reader` (the helper thread that waits on
               the semaphore and hands each wake-up to the loop, one `RequestHandle` per request)
               over the `FrontendRegion` that `Region.create` returns; the engine attaches its
               `EngineRegion` by name and uses it as engine.py does.
  zmq-msgpack  pyzmq PUSH/PULL over ipc://, one socket each way, built like vLLM's AsyncLLM: requests
               and per-step output batches are msgspec Structs (array_like) encoded with msgpack; a
               zmq.asyncio task decodes each batch and fills per-request collectors (asyncio.Event).
  zmq-pickle   the same with pickled dataclasses (SGLang's send_pyobj).

A request is realistic: 100 prompt token ids and a full set of sampling parameters.

  Round trip: submit -> engine picks it up -> one token published (and finished) -> the asyncio task
  wakes with it; closed loop with K requests in flight (1, 64, 1024). p50/p99/max and requests/s.
  Streaming: B requests (1, 64, 256, 1024) stream T tokens each, one per request per engine step;
  tokens/s delivered to the B consumer tasks, from the submits to the last token.
  Both also report the frontend process's CPU time (all its threads: the relay, zmq's I/O threads)
  per request or per token: the transport's cost, whatever pace the no-op engine reaches.

An idle engine of either kind busy-waits `--spin` seconds (the server's default, 1 ms) before it
sleeps; `--spin 0` makes both sleep at once, as vLLM's engine core does. Each row runs `--repeat`
times, interleaved across transports, and the median run is shown; `--wait-quiet S` first waits
for idle CPUs (other jobs on a shared machine).

    python perf/ipc_bench.py --wait-quiet 120          # full run, ~8 min on 2 cores
    python perf/ipc_bench.py --spin 0 --batches ""     # round trips with sleeping engines
    python perf/ipc_bench.py --quick --repeat 1        # smoke test, ~15 s
    python perf/ipc_bench.py --out perf/out/ipc_bench.json --transports shm,zmq-msgpack
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import multiprocessing as mp
import os
import pickle
import platform
import sys
import tempfile
import time
from typing import Any

import msgspec
import numpy as np
import uvloop
import zmq
import zmq.asyncio

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from lightllm_async.frontend.reader import Reader  # noqa: E402
from lightllm_async.ipc import EngineState, Op, Region, RegionSpec  # noqa: E402
from lightllm_async.ipc.engine_side import ENGINE_SPIN_S  # noqa: E402
from lightllm_async.types import FinishReason, SamplingParams  # noqa: E402

PROMPT_LEN = 100
TOKEN = 1234  # what the no-op engine emits
STOP_IDS = (2, 128001, 128009)


# Token ids as the tokenizer hands them over: built before the clock starts.
PROMPTS = [[(i * 7919 + k * 104729) % 32000 + 3 for k in range(PROMPT_LEN)] for i in range(256)]


def prompt_ids(i: int) -> list[int]:
    return PROMPTS[i % len(PROMPTS)]


# ---------------------------------------------------------------- wire format of the ZMQ baseline


class SamplingParamsMsg(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    logprobs: int | None = None


class EngineRequest(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParamsMsg
    arrival_time: float


class EngineOutput(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    request_id: str
    new_token_ids: list[int]
    finish_reason: int = 0


class EngineOutputs(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    outputs: list[EngineOutput]
    timestamp: float = 0.0


@dataclasses.dataclass
class PySamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None


@dataclasses.dataclass
class PyRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: PySamplingParams
    arrival_time: float


@dataclasses.dataclass
class PyOutputs:
    outputs: list[tuple[str, list[int], int]]  # (request id, new token ids, finish reason)
    timestamp: float = 0.0


class Codec:
    """Request and output-batch (de)serialization of one ZMQ flavour."""

    def __init__(self, kind: str):
        self.kind = kind
        if kind == "msgpack":
            self._enc = msgspec.msgpack.Encoder()
            self._req_dec = msgspec.msgpack.Decoder(EngineRequest)
            self._out_dec = msgspec.msgpack.Decoder(EngineOutputs)

    def request(self, rid: str, prompt: list[int], max_tokens: int) -> bytes:
        if self.kind == "msgpack":
            sp = SamplingParamsMsg(max_tokens, 0.7, 0.9, 40, 0.05, 1234, stop_token_ids=list(STOP_IDS))
            return self._enc.encode(EngineRequest(rid, prompt, sp, time.time()))
        sp = PySamplingParams(max_tokens, 0.7, 0.9, 40, 0.05, 1234, stop_token_ids=list(STOP_IDS))
        return pickle.dumps(PyRequest(rid, prompt, sp, time.time()), pickle.HIGHEST_PROTOCOL)

    def decode_request(self, data: bytes) -> tuple[str, int]:
        """(request id, max_tokens), after decoding the whole request as an engine would."""
        r = self._req_dec.decode(data) if self.kind == "msgpack" else pickle.loads(data)
        return r.request_id, r.sampling_params.max_tokens

    def outputs(self, items: list[tuple[str, int, int]]) -> bytes:
        if self.kind == "msgpack":
            outs = [EngineOutput(rid, [tok], fin) for rid, tok, fin in items]
            return self._enc.encode(EngineOutputs(outs, time.time()))
        return pickle.dumps(
            PyOutputs([(rid, [tok], fin) for rid, tok, fin in items], time.time()), pickle.HIGHEST_PROTOCOL
        )

    def decode_outputs(self, data: bytes) -> list[tuple[str, list[int], int]]:
        if self.kind == "msgpack":
            return [
                (o.request_id, o.new_token_ids, o.finish_reason) for o in self._out_dec.decode(data).outputs
            ]
        return pickle.loads(data).outputs


# ---------------------------------------------------------------- engine processes (no-op loops)


def shm_engine(name: str, gate: int, stop: Any, spin: float) -> None:
    """The no-op engine over an EngineRegion: what engine.py does around the runner, nothing else."""
    region = Region.attach(name)
    region.set_engine_state(EngineState.READY)
    slots = np.empty(0, np.int64)  # running requests' slots, and tokens each has still to emit
    tokens = np.full(region.spec.num_slots, TOKEN, np.int32)
    left = np.empty(0, np.int64)
    started = False
    while not stop.value:
        new = [
            (rec.slot, view.params.max_new_tokens)
            for rec in region.drain_ring()
            if rec.op == Op.SUBMIT and (view := region.read_request(rec.slot, rec.gen)) is not None
        ]
        for slot, _ in new:
            region.set_running(slot)
        if new:
            slots = np.concatenate([slots, np.array([s for s, _ in new], np.int64)])
            left = np.concatenate([left, np.array([n for _, n in new], np.int64)])
        if not slots.size or (not started and slots.size < gate):
            region.wait_engine(0.05, spin=spin)
            continue
        started = True
        region.append_step(slots, tokens[: slots.size])
        left -= 1
        if not left.all():
            for slot in slots[left == 0].tolist():
                region.finish(slot, FinishReason.LENGTH)
            slots, left = slots[left > 0], left[left > 0]
        region.notify_frontend()
    region.close()


def zmq_engine(in_addr: str, out_addr: str, codec_kind: str, gate: int, spin: float) -> None:
    """The same loop behind PULL (requests in) and PUSH (one output batch per step out)."""
    codec = Codec(codec_kind)
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.connect(in_addr)
    push.connect(out_addr)
    push.send(b"ready")
    running: dict[str, int] = {}
    started = False
    while True:
        if not running or (not started and len(running) < gate):
            deadline = time.perf_counter() + spin  # the shm engine's idle policy: spin, then sleep
            while not pull.poll(0) and time.perf_counter() < deadline:
                pass
            pull.poll(50)
        while True:
            try:
                data = pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            if not data:  # stop
                ctx.destroy(linger=0)
                return
            rid, max_tokens = codec.decode_request(data)
            running[rid] = max_tokens
        if not running or (not started and len(running) < gate):
            continue
        started = True
        items = []
        for rid in running:
            running[rid] -= 1
            items.append((rid, TOKEN, int(FinishReason.LENGTH) if running[rid] == 0 else 0))
        for rid, _, fin in items:
            if fin:
                del running[rid]
        push.send(codec.outputs(items))


# ---------------------------------------------------------------- frontends


class ShmTransport:
    """Frontend side over the real Reader; one engine process per experiment."""

    def __init__(self, num_slots: int, max_tokens: int, gate: int, spin: float):
        spawn = mp.get_context("spawn")
        spec = RegionSpec(num_slots=num_slots, max_tokens_per_slot=max_tokens)
        self.region = Region.create(f"ipcbench-{os.getpid()}-{time.monotonic_ns()}", spec)
        self._stop = spawn.RawValue("i", 0)  # a plain shared int: cheap to poll every loop
        self.proc = spawn.Process(
            target=shm_engine, args=(self.region.name, gate, self._stop, spin), daemon=True
        )
        self.params = {}

    async def start(self) -> None:
        self.proc.start()
        while self.region.engine_state != EngineState.READY:
            await asyncio.sleep(0.01)
        self.reader = Reader(self.region, self.proc.is_alive)
        await self.reader.start()

    async def submit(self, i: int, max_tokens: int):
        params = self.params.get(max_tokens)
        if params is None:
            params = self.params[max_tokens] = SamplingParams(
                max_new_tokens=max_tokens, temperature=0.7, top_p=0.9, top_k=40, seed=1234,
                stop_ids=STOP_IDS, min_p=0.05,
            )  # fmt: skip
        handle = self.reader.submit(prompt_ids(i), params)
        assert handle is not None, "out of slots"
        return handle

    @staticmethod
    async def wait(handle) -> tuple[int, bool]:
        tokens = await handle.wait()
        return len(tokens), handle.finish_reason is not None

    async def close(self) -> None:
        await self.reader.stop()
        self._stop.value = 1
        self.proc.join(5)
        self.region.close()
        self.region.unlink()


class Collector:
    """vLLM's RequestOutputCollector in miniature: outputs merge until the consumer takes them."""

    __slots__ = ("count", "finished", "event")

    def __init__(self) -> None:
        self.count = 0
        self.finished = False
        self.event = asyncio.Event()

    def put(self, n: int, finished: bool) -> None:
        self.count += n
        self.finished = self.finished or finished
        self.event.set()

    async def wait(self) -> tuple[int, bool]:
        if not (self.count or self.finished):
            await self.event.wait()
        self.event.clear()
        n, self.count = self.count, 0
        return n, self.finished


class ZmqTransport:
    """Frontend side of the ZMQ baseline: zmq.asyncio sockets, an output task, collectors."""

    def __init__(self, codec_kind: str, gate: int, spin: float):
        self._dir = tempfile.mkdtemp(prefix="ipcbench-")
        self.in_addr = f"ipc://{self._dir}/in"
        self.out_addr = f"ipc://{self._dir}/out"
        self.codec = Codec(codec_kind)
        self.collectors: dict[str, Collector] = {}
        spawn = mp.get_context("spawn")
        self.proc = spawn.Process(
            target=zmq_engine, args=(self.in_addr, self.out_addr, codec_kind, gate, spin), daemon=True
        )

    async def start(self) -> None:
        self.ctx = zmq.asyncio.Context()
        self.push, self.pull = self.ctx.socket(zmq.PUSH), self.ctx.socket(zmq.PULL)
        self.push.bind(self.in_addr)
        self.pull.bind(self.out_addr)
        self.proc.start()
        assert await self.pull.recv() == b"ready"
        self._task = asyncio.create_task(self._output_loop())

    async def _output_loop(self) -> None:
        collectors, decode = self.collectors, self.codec.decode_outputs
        while True:
            for rid, tokens, fin in decode(await self.pull.recv()):
                c = collectors[rid]
                c.put(len(tokens), bool(fin))
                if fin:
                    del collectors[rid]

    async def submit(self, i: int, max_tokens: int) -> Collector:
        rid = f"req-{i}"
        c = self.collectors[rid] = Collector()
        await self.push.send(self.codec.request(rid, prompt_ids(i), max_tokens))
        return c

    @staticmethod
    async def wait(c: Collector) -> tuple[int, bool]:
        return await c.wait()

    async def close(self) -> None:
        self._task.cancel()
        await self.push.send(b"")
        self.proc.join(5)
        self.ctx.destroy(linger=0)


TRANSPORTS = ("shm", "zmq-msgpack", "zmq-pickle")


def make_transport(name: str, num_slots: int, max_tokens: int, gate: int, spin: float = ENGINE_SPIN_S):
    if name == "shm":
        return ShmTransport(num_slots, max_tokens, gate, spin)
    return ZmqTransport(name.removeprefix("zmq-"), gate, spin)


# ---------------------------------------------------------------- experiments


async def round_trip(t, inflight: int, total: int, first_id: int = 0) -> dict:
    """Closed loop: `inflight` tasks each submit, wait for the one token, repeat."""
    lat = np.zeros(total)
    next_i = iter(range(total))

    async def worker() -> None:
        for i in next_i:
            t0 = time.perf_counter()
            h = await t.submit(first_id + i, 1)
            done = False
            while not done:
                n, done = await t.wait(h)
            lat[i] = time.perf_counter() - t0

    start, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(inflight)))
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    us = lat * 1e6
    return {
        "p50_us": float(np.percentile(us, 50)),
        "p99_us": float(np.percentile(us, 99)),
        "max_us": float(us.max()),
        "req_per_s": total / elapsed,
        "frontend_cpu_us_per_req": cpu / total * 1e6,  # all of this process's threads
    }


async def stream(t, batch: int, tokens_each: int) -> dict:
    """`batch` requests of `tokens_each` tokens, all running together; tokens/s to the consumers."""
    received = 0

    async def consume(h) -> None:
        nonlocal received
        done = False
        while not done:
            n, done = await t.wait(h)
            received += n

    start, cpu = time.perf_counter(), time.process_time()
    handles = [await t.submit(i, tokens_each) for i in range(batch)]
    await asyncio.gather(*(consume(h) for h in handles))
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert received == batch * tokens_each, (received, batch * tokens_each)
    return {
        "tokens_per_s": received / elapsed,
        "frontend_cpu_ns_per_token": cpu / received * 1e9,  # all of this process's threads
        "tokens": received,
        "seconds": elapsed,
    }


async def run_one(name: str, kind: str, size: int, quick: bool, spin: float) -> dict:
    if kind == "round_trip":
        slots, max_tokens, gate = max(size, 1), PROMPT_LEN + 2, 1
    else:
        tokens_each = stream_tokens(size, quick)
        slots, max_tokens, gate = size, PROMPT_LEN + tokens_each + 1, size
    t = make_transport(name, slots, max_tokens, gate, spin)
    await t.start()
    try:
        if kind == "round_trip":
            await round_trip(t, min(size, 8), 200 if quick else 1000, first_id=10**7)  # warm up
            return await round_trip(t, size, round_trip_count(size, quick))
        return await stream(t, size, tokens_each)
    finally:
        await t.close()


def round_trip_count(inflight: int, quick: bool) -> int:
    n = {1: 5000, 64: 20000, 1024: 30000}.get(inflight, 20000)
    return max(n // 10, inflight * 2) if quick else n


def stream_tokens(batch: int, quick: bool) -> int:
    total = 40000 if quick else (300_000 if batch < 64 else 3_000_000)
    return max(total // batch, 20)


# ---------------------------------------------------------------- report


def fmt_table(results: list[dict]) -> str:
    lines = []
    rt = [r for r in results if r["kind"] == "round_trip"]
    if rt:
        lines += ["Round trip (submit -> 1 token -> asyncio task awake), closed loop", ""]
        lines.append(
            f"{'in flight':>9}  {'transport':<12}{'p50 us':>9}{'p99 us':>9}{'max us':>9}{'req/s':>9}"
            f"{'p50 vs shm':>12}{'frontend CPU us/req':>21}"
        )
        for size in sorted({r["size"] for r in rt}):
            rows = [r for r in rt if r["size"] == size]
            base = next((r["p50_us"] for r in rows if r["transport"] == "shm"), None)
            for r in rows:
                ratio = f"{r['p50_us'] / base:.1f}x" if base else ""
                latency = f"{r['p50_us']:>9.0f}{r['p99_us']:>9.0f}{r['max_us']:>9.0f}"
                lines.append(
                    f"{size:>9}  {r['transport']:<12}{latency}{r['req_per_s']:>9.0f}{ratio:>12}"
                    f"{r['frontend_cpu_us_per_req']:>21.1f}"
                )
        lines.append("")
    st = [r for r in results if r["kind"] == "stream"]
    if st:
        lines += ["Token streaming (B requests, one token each per engine step, to B asyncio tasks)", ""]
        lines.append(
            f"{'B':>9}  {'transport':<12}{'tokens/s':>11}{'shm vs this':>13}{'frontend CPU ns/token':>23}"
        )
        for size in sorted({r["size"] for r in st}):
            rows = [r for r in st if r["size"] == size]
            base = next((r["tokens_per_s"] for r in rows if r["transport"] == "shm"), None)
            for r in rows:
                ratio = f"{base / r['tokens_per_s']:.1f}x" if base else ""
                lines.append(
                    f"{size:>9}  {r['transport']:<12}{r['tokens_per_s']:>11.0f}{ratio:>13}"
                    f"{r['frontend_cpu_ns_per_token']:>23.0f}"
                )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller counts: a smoke test")
    p.add_argument("--transports", default=",".join(TRANSPORTS))
    p.add_argument("--inflight", default="1,64,1024", help="round-trip rows (empty: none)")
    p.add_argument("--batches", default="1,64,256,1024", help="streaming rows (empty: none)")
    p.add_argument(
        "--spin",
        type=float,
        default=ENGINE_SPIN_S,
        help="seconds an idle engine (either kind) busy-waits before it sleeps; 0: sleep at once",
    )
    p.add_argument("--repeat", type=int, default=3, help="runs of each row; the median run is shown")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        help="before each run, wait up to this many seconds for idle CPUs (shared machines)",
    )
    p.add_argument("--out", default="perf/out/ipc_bench.json")
    return p.parse_args(argv)


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def wait_quiet(max_wait: float) -> float:
    """Wait until the CPUs were >= 90% idle for 2 s in a row (other jobs share small machines);
    returns the idle fraction seen last."""

    def snap() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v)

    deadline, streak, idle = time.monotonic() + max_wait, 0, 0.0
    while time.monotonic() < deadline and streak < 2:
        i0, t0 = snap()
        time.sleep(1.0)
        i1, t1 = snap()
        idle = (i1 - i0) / max(t1 - t0, 1)
        streak = streak + 1 if idle >= 0.9 else 0
    return idle


KEY = {"round_trip": "p50_us", "stream": "tokens_per_s"}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    transports = args.transports.split(",")
    plan = [("round_trip", k) for k in _ints(args.inflight)] + [("stream", b) for b in _ints(args.batches)]
    results = []
    for kind, size in plan:
        runs: dict[str, list[dict]] = {name: [] for name in transports}
        for rep in range(args.repeat):  # interleaved, so a disturbance hits every transport alike
            for name in transports:
                idle = wait_quiet(args.wait_quiet) if args.wait_quiet else None
                r = uvloop.run(run_one(name, kind, size, args.quick, args.spin))
                runs[name].append({**r, "idle_before": idle})
                figures = ", ".join(f"{k} {v:.0f}" for k, v in r.items())
                print(f"  {kind:<10} {size:>5} {name:<12} rep {rep} {figures}", file=sys.stderr, flush=True)
        for name in transports:
            by_key = sorted(runs[name], key=lambda r: r[KEY[kind]])
            median = by_key[len(by_key) // 2]
            results.append({"kind": kind, "size": size, "transport": name, **median, "repeats": runs[name]})
    table = fmt_table(results)
    print(table)
    meta = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "zmq": zmq.zmq_version(),
        "pyzmq": zmq.__version__,
        "msgspec": msgspec.__version__,
        "quick": args.quick,
        "repeat": args.repeat,
        "engine_spin_s": args.spin,
    }
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": results, "table": table}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
