"""Entry point of an engine process: attach to the region, load, report ready, loop."""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import traceback

from lightllm_async.config import EngineConfig
from lightllm_async.ipc import EngineState, Region

log = logging.getLogger("lightllm_async.engine")


def _make_runner(cfg: EngineConfig):
    if cfg.model_path == "dummy":
        from lightllm_async.runner.dummy import DummyRunner

        runner = DummyRunner(cfg)
    else:
        from lightllm_async.runner.distributed import init_tensor_parallel, rank_device
        from lightllm_async.runner.model_runner import ModelRunner

        tp = init_tensor_parallel(cfg)
        cfg = cfg.replace(device=rank_device(cfg))
        runner = ModelRunner(cfg, progress=_progress_bar(), tp=tp)
    if cfg.fail_after_steps:
        from lightllm_async.runner.failing import FailingRunner

        return FailingRunner(runner, cfg.fail_after_steps)
    return runner


def _progress_bar():
    from tqdm import tqdm

    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc="Loading weights", unit="tensor", file=sys.stderr, leave=False)
        bar.update(1)
        if done == total:
            bar.close()

    return update


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent() -> None:
    """Have the kernel kill this process when its parent dies, even by SIGKILL (Linux only).

    Without it a `kill -9` of the server leaves the engine running, holding the GPU. The kernel
    sends the signal when the parent's thread that started us ends: the server starts engines
    from its main thread. A parent that died before the call is caught by comparing pids.
    """
    parent = multiprocessing.parent_process()
    if parent is None or not sys.platform.startswith("linux"):
        return  # not a multiprocessing child (a test running the engine in-process)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
    if os.getppid() != parent.pid:
        os._exit(1)


def cpu_threads(requested: int) -> int:
    """The engine's intra-op threads: `requested`, or the cores this process may run on less one,
    which the HTTP frontend (and a client on the same machine) needs; at least 1."""
    if requested > 0:
        return requested
    return max(1, len(os.sched_getaffinity(0)) - 1)


def configure_threads(cfg: EngineConfig) -> int | None:
    """Before torch loads: idle OpenMP workers sleep instead of spinning at barriers (an engine
    that spins takes the cores its own frontend and clients need, and on a busy machine every
    barrier then waits for a descheduled spinner: 20-80x slower, issue 12). Then the thread count.
    The dummy model loads no torch: None."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if cfg.model_path == "dummy":
        return None
    import torch

    threads = cpu_threads(cfg.cpu_threads)
    torch.set_num_threads(threads)
    return threads


def run_engine(cfg: EngineConfig, region_name: str, log_level: str = "info") -> None:
    """Target of the engine process. Exits non-zero with the error written to the region."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server process decides when we stop
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s engine %(levelname)s %(message)s")
    threads = configure_threads(cfg)
    if threads is not None:
        log.info("%d CPU thread(s), OMP_WAIT_POLICY=%s", threads, os.environ["OMP_WAIT_POLICY"])
    from lightllm_async.engine.engine import Engine
    from lightllm_async.engine.scheduler import Scheduler, SchedulerConfig

    region = Region.attach(region_name)
    region.set_engine_state(EngineState.STARTING)  # makes our pid visible while loading
    leader = None
    try:
        runner = _make_runner(cfg)
        if cfg.tp_size > 1:
            from lightllm_async.engine.tensor_parallel import LeaderRunner

            runner = leader = LeaderRunner(runner, _step_writer(cfg, region))
        scheduler = Scheduler(
            SchedulerConfig(
                max_running_requests=cfg.max_running_requests,
                max_num_batched_tokens=cfg.max_num_batched_tokens,
                max_model_len=cfg.max_model_len,
                kv_cache_tokens=runner.num_kv_tokens,
                enable_prefix_cache=not cfg.disable_prefix_cache,
            )
        )
        engine = Engine(region, scheduler, runner)
        # The server stops us with SIGTERM: finish the step in hand, then leave the loop.
        signal.signal(signal.SIGTERM, lambda *_: engine.stop.set())
        engine.publish_stats()
        region.set_engine_state(EngineState.READY)
        engine.run()
        if leader is not None:
            leader.stop_followers()
    except BaseException as exc:  # noqa: BLE001 - report whatever killed us, then die
        text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        log.error("engine failed: %s\n%s", text, traceback.format_exc())
        region.set_engine_state(EngineState.ERROR, text)
        region.notify_frontend()
        sys.exit(1)
    finally:
        if region is not None:
            region.close()


def _step_writer(cfg: EngineConfig, region):
    """Rank 0's end of the step records: the region's channel on one host, a broadcast across hosts."""
    if cfg.nnodes == 1:
        from lightllm_async.ipc.steps import StepWriter

        return StepWriter(region.step_channel(cfg.replica))
    from lightllm_async.runner.distributed import plan_group
    from lightllm_async.runner.plan_broadcast import BroadcastWriter

    return BroadcastWriter(plan_group(), step_record_bytes(cfg))


def step_record_bytes(cfg: EngineConfig) -> int:
    """The largest step record of an engine configured so."""
    from lightllm_async.batch import max_prefix_slots
    from lightllm_async.ipc.steps import record_bytes

    return record_bytes(
        cfg.max_running_requests,
        max(cfg.max_num_batched_tokens, cfg.max_running_requests),
        max_prefix_slots(cfg.max_model_len, cfg.max_num_batched_tokens),
    )


def run_follower(cfg: EngineConfig, region_name: str | None, log_level: str = "info") -> None:
    """Target of the process of tensor-parallel rank cfg.tp_rank >= 1: load its shards, then run
    what rank 0 publishes (in the group's step channel of region `region_name` on rank 0's host;
    by broadcast when the ranks span hosts, with no region). Exits 1 on any error (logged); the
    server sees the death and stops, as for rank 0's."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        level=log_level.upper(), format=f"%(asctime)s engine rank {cfg.tp_rank} %(levelname)s %(message)s"
    )
    configure_threads(cfg)
    from lightllm_async.engine.tensor_parallel import Follower

    region = Region.attach(region_name) if cfg.nnodes == 1 else None
    try:
        runner = _make_runner(cfg)  # joins the group first: a broadcast plan needs its group
        if region is not None:
            from lightllm_async.ipc.steps import StepReader

            reader = StepReader(region.step_channel(cfg.replica), cfg.tp_rank)
        else:
            from lightllm_async.runner.distributed import plan_group
            from lightllm_async.runner.plan_broadcast import BroadcastReader

            reader = BroadcastReader(plan_group(), step_record_bytes(cfg))
        follower = Follower(reader, runner)
        signal.signal(signal.SIGTERM, lambda *_: follower.stop.set())
        follower.run()
        log.info("rank %d stops after %d steps", cfg.tp_rank, follower.steps)
    except BaseException:  # noqa: BLE001 - whatever killed us, logged; the server notices the exit
        log.error("engine rank %d failed:\n%s", cfg.tp_rank, traceback.format_exc())
        sys.exit(1)
    finally:
        if region is not None:
            region.close()
