"""The step record across hosts (engine/plan_broadcast.py) and rank 0's end of it: records and
keepalives reach a follower in another process (gloo), a follower's death is noticed by an idle
rank 0's keepalives, and a record that fails to go out ends the engine (issue 13: any rank's
death ends the server)."""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import socket
import time

import pytest

from lightllm_async.batch import Batch, DeviceFailure, ScheduledReq
from lightllm_async.engine.tensor_parallel import LeaderRunner
from lightllm_async.types import SamplingParams

RECORD = 4096


def _batch(step: int) -> Batch:
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    it = ScheduledReq(3, 1, 0, 0, step, (step, 7), (40 + step, 41 + step), True, params, step)
    return Batch((it,), step)


def _rank(rank: int, port: int, out) -> None:
    """Rank 0 sends two records, idles past a keepalive, stops, then keeps idling (its follower
    has left): how long until a keepalive raised. Rank 1 reports what each next() gave."""
    import torch.distributed as dist

    from lightllm_async.engine import plan_broadcast as pb

    timeout = datetime.timedelta(seconds=60)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timeout
    )
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=1))
    if rank == 1:
        reader, got = pb.BroadcastReader(group, RECORD), []
        while True:
            try:
                batch = reader.next(timeout=0.0)
            except TimeoutError:
                got.append("keepalive")
                continue
            if batch is None:
                break
            got.append((batch.step, batch.items[0].token_ids))
        _report(out, got)
        os._exit(0)  # gone without a word, as a killed host
    writer = pb.BroadcastWriter(group, RECORD)
    writer.publish(_batch(5))
    writer.idle()  # too soon after a record: nothing goes out
    writer.publish(_batch(6))
    time.sleep(pb.KEEPALIVE_S)
    writer.idle()
    writer.stop()
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < 20:
            time.sleep(pb.KEEPALIVE_S)
            writer.idle()
        _report(out, "no keepalive raised")
    except RuntimeError:
        _report(out, time.monotonic() - t0)
    os._exit(0)


def _report(out, value) -> None:
    out.put(value)
    out.close()
    out.join_thread()  # before os._exit: the queue's feeder thread sends it


def test_records_and_keepalives_cross_and_a_gone_follower_fails_rank0s_keepalive():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    outs = [ctx.Queue(), ctx.Queue()]
    procs = [ctx.Process(target=_rank, args=(r, port, outs[r]), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    try:
        assert outs[1].get(timeout=120) == [(5, (5, 7)), (6, (6, 7)), "keepalive"]
        noticed = outs[0].get(timeout=60)
        assert isinstance(noticed, float), noticed
        assert noticed < 5 * 0.5  # a few keepalives at most
    finally:
        for p in procs:
            p.kill()
            p.join(5)


class _Runner:
    num_kv_tokens = 16

    def __init__(self):
        self.launched: list[Batch] = []

    def launch(self, batch: Batch):
        self.launched.append(batch)
        return batch


class _BrokenWriter:
    def publish(self, batch: Batch) -> None:
        raise RuntimeError("Connection closed by peer [127.0.0.1]:4242")


def test_a_record_that_fails_to_reach_the_followers_is_a_device_failure_and_nothing_launches():
    # Not an ordinary step failure, which the engine would retry request by request: the ranks
    # are out of step for good (seen: rank 0 ended both requests, then idled on with its peer gone).
    runner = _Runner()
    with pytest.raises(DeviceFailure, match="Connection closed by peer"):
        LeaderRunner(runner, _BrokenWriter()).launch(_batch(1))
    assert runner.launched == []
