"""The real Engine, stepped by hand or looping in a thread, over a real region and a scripted runner."""

from __future__ import annotations

import random
import time

import pytest

from engine_harness import EngineHarness, ScriptedRunner
from lightllm_async.batch import DeviceFailure
from lightllm_async.engine.engine import MAX_CONSECUTIVE_FAILURES, EngineBroken
from lightllm_async.types import FinishReason, SamplingParams


def expected(prompt: list[int], n: int) -> list[int]:
    return [ScriptedRunner.token(prompt[0], k) for k in range(n)]


def prompts(count: int, rng: random.Random) -> list[list[int]]:
    return [[rng.randrange(3, 900) for _ in range(rng.randrange(1, 90))] for _ in range(count)]


@pytest.fixture
def harness():
    made = []

    def make(runner=None, **kw) -> EngineHarness:
        h = EngineHarness(runner or ScriptedRunner(), **kw)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


def test_step_runs_requests_to_their_length_and_stop_token(harness):
    h = harness()
    rng = random.Random(1)
    ps = prompts(5, rng)
    stop_at = expected(ps[1], 9)[6]  # the 7th token of request 1 is a stop id
    refs = [h.submit(p, SamplingParams(max_new_tokens=9, temperature=0.0)) for p in ps]
    refs[1] = h.submit(ps[1], SamplingParams(max_new_tokens=9, stop_ids=(stop_at,)))
    outs = h.step_until_done(refs)
    for i, (p, out) in enumerate(zip(ps, outs, strict=True)):
        if i == 1:
            want = expected(p, 9)
            assert out.tokens == want[: want.index(stop_at) + 1] and out.finish_reason == FinishReason.STOP
        else:
            assert out.tokens == expected(p, 9) and out.finish_reason == FinishReason.LENGTH


def test_step_returns_false_only_when_there_is_nothing_to_do(harness):
    h = harness()
    assert h.engine.step() is False
    ref = h.submit([5, 6, 7], SamplingParams(max_new_tokens=2))
    assert h.engine.step() is True  # launched the prefill
    h.step_until_done([ref])
    assert h.engine.step() is False


def test_a_request_that_fails_ends_alone_and_the_others_finish_unchanged(harness):
    """Isolation: the culprit (it fails whenever its 4th token is sampled) gets ERROR; the requests
    that shared its steps are recomputed and produce exactly their own tokens."""
    rng = random.Random(2)
    ps = prompts(6, rng)
    culprit: list[int] = []  # its slot, once submitted
    h = harness(ScriptedRunner(fail=lambda it: it.slot in culprit and it.samples and it.num_output == 3))
    refs = [h.submit(p, SamplingParams(max_new_tokens=12)) for p in ps]
    culprit.append(refs[3][0])
    outs = h.step_until_done(refs)
    for i, (p, out) in enumerate(zip(ps, outs, strict=True)):
        if i == 3:
            assert out.finish_reason == FinishReason.ERROR
            assert out.tokens == expected(p, 3)  # what it produced before its failing step
        else:
            assert (out.tokens, out.finish_reason) == (expected(p, 12), FinishReason.LENGTH)
    stats = h.frontend.engine_stats()
    assert stats.kv_tokens_free == stats.kv_tokens_total and stats.num_running == 0
    # the engine goes on: a new request is served
    ref = h.submit([7, 8], SamplingParams(max_new_tokens=3))
    assert h.step_until_done([ref])[0].tokens == expected([7], 3)


def test_a_device_failure_ends_the_engine(harness):
    runner = ScriptedRunner()
    h = harness(runner)
    h.submit([4, 5, 6], SamplingParams(max_new_tokens=4))

    def broken(batch):
        raise DeviceFailure("CUDA error: an illegal memory access was encountered")

    runner.launch = broken
    with pytest.raises(DeviceFailure):
        h.engine.step()


def test_an_engine_whose_every_step_fails_gives_up(harness):
    h = harness(ScriptedRunner(fail=lambda item: True), num_slots=MAX_CONSECUTIVE_FAILURES + 4)
    for i in range(MAX_CONSECUTIVE_FAILURES + 2):
        h.submit([3 + i], SamplingParams(max_new_tokens=2))
    with pytest.raises(EngineBroken):
        for _ in range(10_000):
            h.engine.step()


def test_an_invalid_slot_fails_that_request_and_not_the_engine(harness):
    """A slot whose fields no validated frontend writes (top_p 5) is refused with ERROR on its own."""
    from lightllm_async.ipc.layout import PROMPT_LEN, REQUEST_FIELDS

    h = harness()
    good = h.submit([9, 9], SamplingParams(max_new_tokens=3))
    slot, gen = h.frontend.alloc_slot()
    h.frontend.write_request(slot, [4, 4], SamplingParams(max_new_tokens=3))
    fields = list(REQUEST_FIELDS.unpack_from(h.frontend._mm, h.frontend._layout.slot_off(slot) + PROMPT_LEN))
    fields[3] = 5.0  # top_p
    REQUEST_FIELDS.pack_into(h.frontend._mm, h.frontend._layout.slot_off(slot) + PROMPT_LEN, *fields)
    h.frontend.submit(slot, gen)
    bad, ok = h.step_until_done([(slot, gen), good])
    assert bad.finish_reason == FinishReason.ERROR and bad.tokens == []
    assert ok.tokens == expected([9], 3)


def test_abort_while_running_frees_the_request(harness):
    runner = ScriptedRunner()
    h = harness(runner)
    ref = h.submit([3, 4, 5], SamplingParams(max_new_tokens=200))
    for _ in range(5):
        h.engine.step()
    assert h.frontend.abort(*ref)
    out = h.step_until_done([ref])[0]
    assert out.finish_reason == FinishReason.ABORT and 0 < len(out.tokens) < 200
    stats = h.frontend.engine_stats()
    assert stats.kv_tokens_free == stats.kv_tokens_total


def test_run_loop_serves_until_stop_is_set(harness):
    h = harness()
    h.start()
    ref = h.submit([11, 12], SamplingParams(max_new_tokens=5))
    deadline = time.monotonic() + 5
    while not h.done(ref):
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert h.frontend.read_output(ref[0]).tokens == expected([11], 5)
    t0 = time.monotonic()
    h.stop()  # asserts the thread ended
    assert time.monotonic() - t0 < 1.0


def test_the_model_runner_calls_a_cuda_error_a_device_failure():
    """What the runner raises decides between isolating a request and ending the engine."""
    from lightllm_async.runner.model_runner import device_failures

    with pytest.raises(DeviceFailure), device_failures():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    with pytest.raises(ValueError), device_failures():
        raise ValueError("a bad row")


def test_a_signal_during_the_idle_wait_is_a_wake_up_not_an_error(harness):
    """The engine process stops on SIGTERM through a handler that sets engine.stop; the semaphore
    wait it interrupts must return, not raise."""
    import os
    import signal
    import threading

    h = harness()
    got = threading.Event()
    old = signal.signal(signal.SIGUSR1, lambda *_: got.set())
    try:
        threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGUSR1)).start()
        woke = h.engine_view.wait_engine(timeout=2.0, spin=0)
        assert got.is_set() and woke is False
    finally:
        signal.signal(signal.SIGUSR1, old)
