"""--dp N: N engine replicas behind one frontend and one region.

The region: each replica has its own submit ring, semaphore and header section, and an engine
view attached as replica k sees only those. The frontend: the least-outstanding-work chooser.
The server (`--model dummy`): requests spread over the replicas and all complete; a replica's
death fails its own requests only, then the server exits 1 without leaving shared memory; a
replica that cannot start ends the start with exit 1.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import random
import signal
import threading
import time
import uuid

import pytest

from lightllm_async import systemd
from lightllm_async.config import rank_device
from lightllm_async.frontend import reader as reader_mod
from lightllm_async.frontend.balance import LeastOutstanding
from lightllm_async.frontend.reader import EngineDead, Reader
from lightllm_async.ipc import EngineState, EngineStats, Op, Region, RegionSpec, RingRecord
from lightllm_async.ipc.shm import SHM_DIR
from lightllm_async.types import FinishReason, SamplingParams
from serverproc import ServerProcess, TimedStream, concurrently, stream_text, stream_token_ids, wait_until
from test_lifecycle import alive, children_of

PARAMS = SamplingParams(max_new_tokens=4)


def _uid() -> str:
    return f"dp{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _shm_files(name: str) -> list[str]:
    base = name.lstrip("/")
    return sorted(f for f in os.listdir(SHM_DIR) if f == base or f.startswith(f"sem.{base}-"))


@pytest.fixture
def three():
    """(frontend view, [engine view of replica 0, 1, 2]) of a region with three replicas."""
    front = Region.create(_uid(), RegionSpec(num_slots=7, max_tokens_per_slot=16, num_replicas=3))
    engines = [Region.attach(front.name, replica=k) for k in range(3)]
    yield front, engines
    for e in engines:
        e.close()
    front.close()
    front.unlink()


# ---------------------------------------------------------------- the region


def test_an_engine_attached_as_replica_k_drains_only_what_was_queued_on_k(three):
    front, engines = three
    a = front.start_request([1, 2], PARAMS, replica=2)
    b = front.start_request([3], PARAMS, replica=0)
    c = front.start_request([4, 5, 6], PARAMS, replica=2)
    assert [front.owner(s) for s, _ in (a, b, c)] == [2, 0, 2]
    assert engines[1].drain_ring() == []
    assert engines[2].drain_ring() == [RingRecord(*a, Op.SUBMIT), RingRecord(*c, Op.SUBMIT)]
    assert engines[0].drain_ring() == [RingRecord(*b, Op.SUBMIT)]
    # an abort goes to the ring of the replica that runs the request, and to no other
    assert engines[2].set_running(c[0])
    assert front.abort(*c) and front.abort(*b)
    assert engines[2].drain_ring() == [RingRecord(*c, Op.ABORT)]
    assert engines[0].drain_ring() == [RingRecord(*b, Op.ABORT)]
    assert engines[1].drain_ring() == []
    # the slot table is shared: every view sees replica 2's output of slot c
    engines[2].append_tokens(c[0], [9])
    assert engines[2].finish(c[0], FinishReason.ABORT)
    assert front.read_output(c[0]).tokens == [9] and engines[0].control(c[0]) == engines[2].control(c[0])


def test_a_freed_slot_may_go_to_another_replica_under_its_next_generation(three):
    front, engines = three
    slot, gen = front.start_request([1], PARAMS, replica=1)
    assert engines[1].drain_ring() == [RingRecord(slot, gen, Op.SUBMIT)]
    assert engines[1].set_running(slot) and engines[1].finish(slot, FinishReason.STOP)
    assert front.free_slot(slot, gen)
    while (ref := front.alloc_slot()) != (slot, gen + 1):
        assert ref is not None
    front.write_request(slot, [2, 3], PARAMS)
    front.submit(slot, gen + 1, replica=0)
    assert front.owner(slot) == 0
    assert engines[0].drain_ring() == [RingRecord(slot, gen + 1, Op.SUBMIT)]
    assert engines[1].drain_ring() == []
    assert engines[1].read_request(slot, gen) is None  # replica 1's old reference is stale


def test_each_replica_writes_only_its_own_section_and_the_frontend_adds_them_up(three):
    front, engines = three
    assert front.num_replicas == 3 and [e.replica for e in engines] == [0, 1, 2]
    engines[1].set_engine_state(EngineState.READY)
    engines[1].beat()
    engines[1].set_engine_stats(EngineStats(num_running=2, kv_tokens_total=100, generation_tokens_total=7))
    engines[2].set_engine_stats(EngineStats(num_running=3, kv_tokens_total=50, generation_tokens_total=1))
    assert [front.replica_state(k) for k in range(3)] == [EngineState.STARTING, EngineState.READY, 0]
    assert front.heartbeats() == (0, 1, 0) and engines[1].heartbeat == 1 and engines[0].heartbeat == 0
    assert front.engine_state == EngineState.STARTING  # READY only once every replica is
    assert engines[1].engine_state == EngineState.READY  # an engine's view: its own
    assert engines[1].engine_stats().num_running == 2 and engines[0].engine_stats() == EngineStats()
    total = front.engine_stats()
    assert (total.num_running, total.kv_tokens_total, total.generation_tokens_total) == (5, 150, 8)
    engines[0].set_engine_state(EngineState.READY)
    engines[2].set_engine_state(EngineState.READY)
    assert front.engine_state == EngineState.READY
    engines[2].set_engine_state(EngineState.ERROR, "CUDA error: an illegal memory access")
    assert front.engine_state == EngineState.ERROR
    assert front.error_text == "replica 2: CUDA error: an illegal memory access"
    assert engines[2].error_text == "CUDA error: an illegal memory access" and engines[1].error_text == ""
    assert front.replica_pid(2) == os.getpid() and front.replica_pid(0) == os.getpid()


def test_a_submit_wakes_the_sleeping_replica_it_was_queued_on_and_no_other(three):
    front, engines = three
    woke: list = []
    waiter = threading.Thread(target=lambda: woke.append(engines[1].wait_engine(10.0, spin=0)))
    waiter.start()
    time.sleep(0.2)  # asleep on its semaphore, idle flag set
    started = time.monotonic()
    front.start_request([1], PARAMS, replica=1)
    waiter.join(5)
    assert woke == [True] and time.monotonic() - started < 1.0
    assert [e._sem_engine.value for e in engines] == [0, 0, 0]  # the post was taken by replica 1
    assert engines[0].drain_ring() == [] and len(engines[1].drain_ring()) == 1


def test_a_step_of_any_replica_moves_the_readers_notify_count(three):
    front, engines = three
    seq = front.set_frontend_busy(True)
    engines[2].notify_frontend()  # busy reader: counted, not posted
    assert front.set_frontend_busy(False) == seq + 1
    assert not front.wait_frontend(0.0)
    engines[0].notify_frontend()  # idle reader: posted
    assert front.wait_frontend(1.0)


def test_replica_semaphores_are_private_and_removed_with_the_region():
    front = Region.create(_uid(), RegionSpec(num_slots=2, max_tokens_per_slot=8, num_replicas=3))
    base = front.name.lstrip("/")
    expected = sorted([base, f"sem.{base}-ew", f"sem.{base}-ew1", f"sem.{base}-ew2", f"sem.{base}-fw"])
    assert _shm_files(front.name) == expected
    assert all(os.stat(os.path.join(SHM_DIR, f)).st_mode & 0o777 == 0o600 for f in expected)
    with pytest.raises(IndexError):
        Region.attach(front.name, replica=3)
    front.close()
    front.unlink()
    assert _shm_files(front.name) == []


def _create_and_die(instance_id: str) -> None:
    Region.create(instance_id, RegionSpec(num_slots=2, max_tokens_per_slot=8, num_replicas=4))
    os._exit(0)  # no atexit, no unlink: a crashed server


def test_the_next_start_removes_every_replica_semaphore_of_a_dead_owner():
    dead = _uid()
    child = mp.get_context("fork").Process(target=_create_and_die, args=(dead,))
    child.start()
    child.join(10)
    assert len(_shm_files(f"/lla-{dead}")) == 6  # the region, 4 engine semaphores, the frontend's
    fresh = Region.create(_uid(), RegionSpec(2, 8))
    try:
        assert _shm_files(f"/lla-{dead}") == []
    finally:
        fresh.close()
        fresh.unlink()


# ---------------------------------------------------------------- the frontend's choice


def test_equal_replicas_take_turns():
    chooser = LeastOutstanding(3)
    picks = []
    for _ in range(7):
        picks.append(chooser.pick())
        chooser.started(picks[-1])
    assert picks == [0, 1, 2, 0, 1, 2, 0] and chooser.outstanding == [3, 2, 2]


def test_the_replica_with_the_fewest_unfinished_requests_is_picked():
    chooser = LeastOutstanding(3)
    for replica, n in ((0, 3), (1, 1), (2, 2)):
        for _ in range(n):
            chooser.started(replica)
    assert chooser.pick() == 1
    chooser.started(1)
    assert chooser.pick() in (1, 2)  # both hold 2 now: the turn goes on after the last pick
    for _ in range(3):
        chooser.finished(0)
    assert chooser.pick() == 0  # the one that drained is next, whatever the turn


def test_the_pick_is_always_a_least_loaded_replica_under_random_churn():
    rng = random.Random(13)
    for n in (1, 2, 5):
        chooser, load = LeastOutstanding(n), [0] * n
        for _ in range(2000):
            if rng.random() < 0.55 or not any(load):
                k = chooser.pick()
                assert load[k] == min(load), (load, k)
                chooser.started(k)
                load[k] += 1
            else:
                k = rng.choice([i for i in range(n) if load[i]])
                chooser.finished(k)
                load[k] -= 1
            assert chooser.outstanding == load


async def _until_finished(h) -> list[int]:
    """Every token of `h` up to its finish. A `wait()` may return the tokens before the finish's
    wake-up arrived: its finish_reason is only final once set (RequestHandle.wait's note)."""
    tokens = await h.wait()
    while h.finish_reason is None and not h.engine_dead:
        tokens += await h.wait()
    return tokens


def test_the_reader_spreads_requests_and_a_dead_replica_fails_only_its_own(monkeypatch):
    monkeypatch.setattr(reader_mod, "LIVENESS_INTERVAL_S", 0.02)
    front = Region.create(_uid(), RegionSpec(num_slots=8, max_tokens_per_slot=16, num_replicas=2))
    engines = [Region.attach(front.name, replica=k) for k in range(2)]
    alive = [True, True]

    async def main() -> None:
        reader = Reader(front, lambda: all(alive), lambda: alive)
        await reader.start()
        try:
            handles = [reader.submit([1, 2], PARAMS) for _ in range(4)]
            assert [h.replica for h in handles] == [0, 1, 0, 1]
            assert [front.owner(h.slot) for h in handles] == [0, 1, 0, 1]
            for rec in engines[1].drain_ring():  # replica 1 runs its two: one token each
                assert engines[1].set_running(rec.slot)
                engines[1].append_tokens(rec.slot, [7])
            engines[1].notify_frontend()
            alive[0] = False  # replica 0 dies with its two requests
            await asyncio.sleep(0.2)
            assert [h.engine_dead for h in handles] == [True, False, True, False]
            assert reader.dead and reader._chooser.outstanding == [0, 2]
            with pytest.raises(EngineDead):
                reader.submit([1], PARAMS)  # the server is stopping: no new work
            for h in handles[1::2]:  # replica 1 goes on and finishes them
                assert engines[1].finish(h.slot, FinishReason.STOP)
            engines[1].notify_frontend()
            for h in handles[1::2]:
                assert await asyncio.wait_for(_until_finished(h), 2) == [7]
                assert h.finish_reason == FinishReason.STOP
            assert reader._chooser.outstanding == [0, 0] and reader.num_active == 0
        finally:
            await reader.stop()

    try:
        asyncio.run(asyncio.wait_for(main(), 10))
    finally:
        for e in engines:
            e.close()
        front.close()
        front.unlink()


def test_replica_k_of_m_ranks_each_takes_its_own_gpus():
    assert [rank_device("cuda", k) for k in range(3)] == ["cuda:0", "cuda:1", "cuda:2"]
    assert [rank_device("cuda:2", k) for k in range(2)] == ["cuda:2", "cuda:3"]  # counted from --device
    assert rank_device("cpu", 3) == "cpu"
    # the seam for tensor parallelism: replica k's M ranks on GPUs k*M .. k*M + M - 1
    assert [rank_device("cuda", 1, r, 4) for r in range(4)] == ["cuda:4", "cuda:5", "cuda:6", "cuda:7"]
    with pytest.raises(ValueError):
        rank_device("tpu", 0)
    with pytest.raises(ValueError):
        rank_device("cuda", 0, rank=2, ranks_per_replica=2)


def test_the_dp_flag_reaches_the_config():
    from lightllm_async.server import build_parser, resolve_config

    assert resolve_config(build_parser().parse_args(["--model", "dummy"])).dp == 1
    assert resolve_config(build_parser().parse_args(["--model", "dummy", "--dp", "3"])).dp == 3
    with pytest.raises(SystemExit):
        resolve_config(build_parser().parse_args(["--model", "dummy", "--dp", "0"]))


class _Proc:
    def __init__(self, alive: bool = True, exitcode: int | None = None):
        self._alive, self.exitcode, self.name = alive, exitcode, "lightllm-engine-1"

    def is_alive(self) -> bool:
        return self._alive


def test_the_start_waits_for_every_replica_and_fails_with_the_one_that_failed(caplog):
    from lightllm_async.server import _wait_ready

    front = Region.create(_uid(), RegionSpec(num_slots=2, max_tokens_per_slot=8, num_replicas=2))
    engines = [Region.attach(front.name, replica=k) for k in range(2)]
    try:
        procs = [[_Proc()], [_Proc()]]  # each replica's processes (one rank each)
        engines[0].set_engine_state(EngineState.READY)
        engines[1].set_engine_state(EngineState.READY)
        assert _wait_ready(front, procs)
        engines[1].set_engine_state(EngineState.ERROR, "CUDA error: invalid device ordinal")
        assert not _wait_ready(front, procs)
        assert "engine replica 1 failed to start: CUDA error: invalid device ordinal" in caplog.text
        engines[1].set_engine_state(EngineState.STARTING)
        dead = _Proc(alive=False, exitcode=-9)
        assert not _wait_ready(front, [[_Proc()], [dead]])  # died while loading
        assert f"engine replica 1 failed to start: {dead.name} exit code -9" in caplog.text
    finally:
        for e in engines:
            e.close()
        front.close()
        front.unlink()


def test_the_watchdog_stops_pinging_when_any_one_replica_stops_beating():
    now, beats, sent = [0.0], [0, 0, 0], []
    dog = systemd.Watchdog(1.0, lambda: tuple(beats), stale_after=2.0, send=sent.append, clock=lambda: now[0])

    def run(seconds: float, beating: tuple[int, ...]) -> int:
        """Tick every 1/8 s, the replicas in `beating` beating at every tick; the pings sent."""
        before = len(sent)
        for _ in range(int(seconds * 8)):
            now[0] += 0.125
            for k in beating:
                beats[k] += 1
            dog.tick()
        return len(sent) - before

    assert run(5, (0, 1, 2)) == 5
    assert run(5, (0, 2)) <= 3 and dog.stalled  # replica 1 wedged; the others busy: no more pings
    assert run(5, (0, 2)) == 0
    assert run(2, (0, 1, 2)) == 2 and not dog.stalled


# ---------------------------------------------------------------- the server, --model dummy


def _metric(srv: ServerProcess, name: str) -> dict[str, float]:
    """The samples of metric `name` by their label values ("" for one without labels)."""
    out = {}
    for line in srv.request("GET", "/metrics")[2].splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            key, value = line.rsplit(" ", 1)
            out[key[len(name) :].strip("{}").split('"')[1] if "{" in key else ""] = float(value)
    return out


def _region_files(srv: ServerProcess) -> list[str]:
    return _shm_files("/" + srv.region_name)


def test_two_replicas_serve_many_concurrent_requests_and_both_take_work():
    srv = ServerProcess("--model", "dummy", "--dp", "2", "--dummy-step-time", "0.005")
    try:
        assert len(_region_files(srv)) == 4  # the region, two engine semaphores, the frontend's
        region = Region.attach(srv.region_name)
        pids = [region.replica_pid(k) for k in range(2)]
        region.close()
        assert len(set(pids)) == 2 and set(pids) <= set(children_of(srv.proc.pid))
        rng = random.Random(21)
        words = ["sun", "river", "stone", "cloud", "apple", "tiger", "music", "paper"]
        bodies = [
            {
                "prompt": " ".join(rng.choice(words) for _ in range(rng.randint(1, 30))),
                "max_tokens": rng.randint(4, 40),
                "temperature": 0,
                "ignore_eos": True,
            }
            for _ in range(32)
        ]
        together = concurrently(lambda b: stream_text(srv, b), bodies)
        alone = [stream_text(srv, b) for b in bodies[:8]]
        assert together[:8] == alone and all(together)
        plain = srv.request("POST", "/v1/completions", bodies[0])
        assert plain[0] == 200 and plain[2]["choices"][0]["text"] == together[0]

        generated = _metric(srv, "lightllm_async:replica_generation_tokens_total")
        served = sum(b["max_tokens"] for b in [*bodies, *bodies[:8], bodies[0]])
        assert set(generated) == {"0", "1"} and sum(generated.values()) == served
        assert min(generated.values()) >= 0.1 * served, generated  # both replicas took a share
        assert _metric(srv, "lightllm_async:generation_tokens_total") == {"": served}
        assert _metric(srv, "lightllm_async:kv_cache_tokens_total") == {"": 2 * 64 * 4096}  # summed
        assert _metric(srv, "lightllm_async:engine_replicas") == {"": 2}
        assert srv.request("GET", "/health")[0] == 200
    finally:
        assert srv.stop() == 0
    assert _region_files(srv) == []


def test_a_killed_replica_fails_its_own_requests_at_once_then_the_server_exits_1_cleanly():
    srv = ServerProcess("--model", "dummy", "--dp", "2", "--dummy-step-time", "0.02")
    streams = [TimedStream(srv, {"prompt": "x", "max_tokens": 3000, "stream": True}) for _ in range(4)]
    running = "lightllm_async:replica_num_requests_running"
    assert wait_until(lambda: _metric(srv, running) == {"0": 2, "1": 2}, 10), _metric(srv, running)
    region = Region.attach(srv.region_name)
    pids = [region.replica_pid(k) for k in range(2)]
    region.close()
    os.kill(pids[1], signal.SIGKILL)
    killed = time.monotonic()
    for s in streams:
        s.join(15)
    lost = [s for s in streams if "replica 1" in s.error]
    others = [s for s in streams if s not in lost]
    assert len(lost) == 2 and all(s.ended_after(killed) < 2.0 for s in lost), [s.error for s in streams]
    for s in others:  # replica 0 kept streaming after the death, until the server stopped
        assert "stopping" in s.error
        assert sum(t > killed + 0.3 for t, _ in s.events[:-2]) > 5
    assert srv.proc.wait(10) == 1
    assert "engine replica 1" in srv.text_log() and srv.text_log().rstrip().endswith("stopped (exit 1)")
    assert _region_files(srv) == []
    assert wait_until(lambda: not alive(pids[0]), 5)  # the other replica was stopped too


def test_replicas_that_fail_at_start_end_the_start_with_exit_1_and_no_shared_memory():
    # a KV cache that cannot hold one request: the engines refuse it, after the frontend accepted it
    srv = ServerProcess("--model", "dummy", "--dp", "2", "--max-running-requests", "0")
    assert srv.proc.wait(30) == 1
    log = srv.text_log()
    assert "failed to start" in log and "cannot hold one request" in log, log
    assert "lightllm-async ready" not in log
    assert _region_files(srv) == []


# ---------------------------------------------------------------- on GPUs (skipped without them)


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _random_model(path) -> list[str]:
    from lightllm_async.tools.make_random_model import make_random_model

    model = make_random_model("smollm2-135m", str(path), dtype="float32", seed=5, device="cuda")
    return ["--model", model, "--dtype", "float32", "--max-model-len", "512"] + [
        "--gpu-memory-utilization",
        "0.2",
    ]


@pytest.mark.gpu
def test_on_two_gpus_each_replica_takes_its_own_and_the_output_equals_one_replicas(tmp_path):
    if _cuda_devices() < 2:
        pytest.skip("needs 2 CUDA devices")
    import torch

    args = [*_random_model(tmp_path), "--device", "cuda"]
    prompts = ["The quick brown fox", "def fibonacci(n):", "Paris is the capital of", "1, 2, 3,"] * 3
    free = [torch.cuda.mem_get_info(k)[0] for k in range(2)]
    srv = ServerProcess(*args, "--dp", "2")
    try:
        total = torch.cuda.mem_get_info(1)[1]
        used = [free[k] - torch.cuda.mem_get_info(k)[0] for k in range(2)]
        assert min(used) > 1 << 30, (used, total)  # each replica's weights and KV cache on its own GPU
        together = concurrently(lambda p: stream_token_ids(srv, p, 32), prompts)
        assert min(_metric(srv, "lightllm_async:replica_generation_tokens_total").values()) > 0
    finally:
        assert srv.stop() == 0
    one = ServerProcess(*args)
    try:
        assert together == [stream_token_ids(one, p, 32) for p in prompts]
    finally:
        assert one.stop() == 0


@pytest.mark.gpu
def test_a_replica_past_the_last_gpu_fails_the_start_and_the_other_is_stopped(tmp_path):
    gpus = _cuda_devices()
    if gpus < 1:
        pytest.skip("needs a CUDA device")
    srv = ServerProcess(*_random_model(tmp_path), "--device", f"cuda:{gpus - 1}", "--dp", "2")
    assert srv.proc.wait(120) == 1
    assert "engine replica 1 failed to start" in srv.text_log(), srv.text_log()
    assert _region_files(srv) == []
