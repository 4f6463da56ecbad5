"""Entry point of an engine process: attach to the region as its replica, load, report ready, loop."""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import time
import traceback

from lightllm_async.config import EngineConfig, rank_device
from lightllm_async.ipc import EngineState, Region

log = logging.getLogger("lightllm_async.engine")


def _make_runner(cfg: EngineConfig, show_progress: bool = True):
    """The runner of this rank; with several ranks, the group is joined first (the model's
    sharded layers need it)."""
    if cfg.model_path == "dummy":
        from lightllm_async.runner.dummy import DummyRunner

        runner = DummyRunner(cfg)
    else:
        from lightllm_async.runner.distributed import init_tensor_parallel
        from lightllm_async.runner.model_runner import ModelRunner

        tp = init_tensor_parallel(cfg)
        runner = ModelRunner(cfg, progress=_progress_bar() if show_progress else None, tp=tp)
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


def cpu_threads(requested: int, num_replicas: int = 1) -> int:
    """The engine's intra-op threads: `requested`, or the cores this process may run on less one,
    which the HTTP frontend (and a client on the same machine) needs, shared by the engine
    replicas (--dp); at least 1."""
    if requested > 0:
        return requested
    return max(1, (len(os.sched_getaffinity(0)) - 1) // num_replicas)


def configure_threads(cfg: EngineConfig, num_replicas: int = 1) -> int | None:
    """Before torch loads: idle OpenMP workers sleep instead of spinning at barriers (an engine
    that spins takes the cores its own frontend and clients need, and on a busy machine every
    barrier then waits for a descheduled spinner: 20-80x slower, issue 12). Then the thread count.
    The dummy model loads no torch: None."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if cfg.model_path == "dummy":
        return None
    import torch

    threads = cpu_threads(cfg.cpu_threads, num_replicas)
    torch.set_num_threads(threads)
    _leave_out_triton(cfg)
    return threads


def _leave_out_triton(cfg: EngineConfig) -> None:
    """An engine on the CPU runs no Triton kernel (kernels/backend.py routes CPU tensors to the
    references and CPU paths unless LLA_KERNELS=triton asks for the interpreter), and importing
    triton takes ~0.25 s of its start (issue 12): have `import triton` fail in this process, as
    where it is not installed. Not under --cpu-compile (inductor looks for triton)."""
    import torch

    on_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    if on_cpu and not cfg.cpu_compile and os.environ.get("LLA_KERNELS") != "triton":
        sys.modules.setdefault("triton", None)


def place_replica(cfg: EngineConfig, replica: int, num_replicas: int) -> EngineConfig:
    """This rank's config (--dp, --tp): on CUDA, replica k's ranks run on GPUs k*tp .. k*tp+tp-1 of
    this host (config.rank_device; "auto" means CUDA when present; across hosts, each host's
    ranks from its first GPU), which also becomes this process's current CUDA device, so that
    what uses "the current device" (CUDA graphs, Triton launches, NCCL, memory queries) means it.
    With one replica of one rank, or the dummy model, the config stays as given."""
    if (num_replicas == 1 and cfg.tp_size == 1) or cfg.model_path == "dummy":
        return cfg
    import torch

    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    local = cfg.tp_size // cfg.nnodes  # this host's ranks of the group
    device = rank_device(device, replica, cfg.tp_rank % local, local)
    if device != "cpu":
        torch.cuda.set_device(device)
    return cfg.replace(device=device)


def run_engine(cfg: EngineConfig, region_name: str, log_level: str = "info", replica: int = 0) -> None:
    """Target of the process of engine replica `replica`. Exits non-zero with the error written to
    the replica's section of the region."""
    started = time.perf_counter()
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server process decides when we stop
    region = Region.attach(region_name, replica)
    region.set_engine_state(EngineState.STARTING)  # makes our pid visible while loading
    name = "engine" if region.num_replicas == 1 else f"engine {replica}"
    if cfg.pd_role:
        name = f"{cfg.pd_role} engine {replica}"
    leader = None
    logging.basicConfig(level=log_level.upper(), format=f"%(asctime)s {name} %(levelname)s %(message)s")
    try:
        threads = configure_threads(cfg, region.num_replicas)
        torch_s = time.perf_counter() - started  # torch imported (where it is)
        if threads is not None:
            log.info("%d CPU thread(s), OMP_WAIT_POLICY=%s", threads, os.environ["OMP_WAIT_POLICY"])
        from lightllm_async.engine.engine import Engine
        from lightllm_async.engine.scheduler import Scheduler, SchedulerConfig

        cfg = place_replica(cfg, replica, region.num_replicas)
        runner = _make_runner(cfg, show_progress=replica == 0)
        load_s = getattr(runner, "load_seconds", 0.0)
        if cfg.tp_size > 1:
            from lightllm_async.engine.tensor_parallel import LeaderRunner

            runner = leader = LeaderRunner(runner, _step_writer(cfg, region, replica))
        scheduler = Scheduler(
            SchedulerConfig(
                max_running_requests=cfg.max_running_requests,
                max_num_batched_tokens=cfg.max_num_batched_tokens,
                max_model_len=cfg.max_model_len,
                kv_cache_tokens=runner.num_kv_tokens,
                # a decode replica admits what it receives as a cached prefix
                enable_prefix_cache=not cfg.disable_prefix_cache or cfg.pd_role == "decode",
            )
        )
        engine = Engine(region, scheduler, runner, _pd_side(cfg, region, scheduler, runner, replica))
        # The server stops us with SIGTERM: finish the step in hand, then leave the loop.
        signal.signal(signal.SIGTERM, lambda *_: engine.stop.set())
        engine.publish_stats()
        region.set_engine_state(EngineState.READY)
        if threads is not None:  # a model (the dummy one loads no torch): where the start went
            total = time.perf_counter() - started
            log.info(
                "ready %.2f s after the process's entry: torch imported in %.2f s, the model loaded in "
                "%.2f s, the rest (imports, KV cache, decode step) %.2f s",
                total, torch_s, load_s, total - torch_s - load_s,
            )  # fmt: skip
        if "torch" in sys.modules and sys.modules["torch"].cuda.is_initialized():
            from lightllm_async.kernels.backend import log_compiles

            log_compiles(log)
        profile_path = os.environ.get("LIGHTLLM_ASYNC_PROFILE")  # a diagnosis aid (README)
        if profile_path:
            _run_profiled(engine, f"{profile_path}.{replica}")
        else:
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
        region.close()


def _run_profiled(engine, path: str) -> None:
    """Run the step loop under cProfile and write its stats to `path` (pstats format) when it ends:
    where a step's host time goes, in the server as it is driven (LIGHTLLM_ASYNC_PROFILE=prefix)."""
    import cProfile

    profiler = cProfile.Profile()
    try:
        profiler.runcall(engine.run)
    finally:
        profiler.dump_stats(path)
        log.info("profile of the step loop written to %s", path)


def _pd_side(cfg: EngineConfig, region, scheduler, runner, replica: int):
    """--pd: this replica's half of the handoff, after joining the group of every prefill and
    decode engine (None without --pd)."""
    if not cfg.pd_role:
        return None
    from lightllm_async.engine.disagg import DecodeSide, PrefillSide
    from lightllm_async.runner.kv_transfer import (
        KVReceiver,
        KVSender,
        bytes_per_token,
        init_pd_group,
        watch_peers,
    )

    pools = runner.kv.layers()
    rank = replica if cfg.pd_rank < 0 else cfg.pd_rank
    init_pd_group(cfg, rank, pools[0].device)
    log.info("%s replica: %d bytes of KV per token transferred", cfg.pd_role, bytes_per_token(pools))
    if cfg.pd_rank >= 0:  # --role: the peers are other servers, which nobody here watches
        watch_peers(cfg, rank)
    if cfg.pd_role == "prefill":
        return PrefillSide(region, KVSender(pools), rank)
    return DecodeSide(region, scheduler, KVReceiver(pools))


def _step_writer(cfg: EngineConfig, region, replica: int):
    """Rank 0's end of the step records: its replica's channel in the region on one host, a
    broadcast over the group's gloo plan group across hosts."""
    if cfg.nnodes == 1:
        from lightllm_async.ipc.steps import StepWriter

        return StepWriter(region.step_channel(replica))
    from lightllm_async.engine.plan_broadcast import BroadcastWriter
    from lightllm_async.runner.distributed import plan_group

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


def run_follower(
    cfg: EngineConfig, region_name: str | None, log_level: str = "info", replica: int = 0
) -> None:
    """Target of the process of tensor-parallel rank cfg.tp_rank >= 1 of replica `replica`: load
    its shards, then run what rank 0 publishes (in the replica's step channel of region
    `region_name` on rank 0's host; by broadcast, with no region, when the ranks span hosts).
    Exits 1 on any error (logged); the server sees the death and stops, as for rank 0's."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    name = f"engine rank {cfg.tp_rank}" if replica == 0 else f"engine {replica} rank {cfg.tp_rank}"
    logging.basicConfig(level=log_level.upper(), format=f"%(asctime)s {name} %(levelname)s %(message)s")
    region = Region.attach(region_name, replica) if cfg.nnodes == 1 else None
    try:
        configure_threads(cfg, region.num_replicas if region is not None else 1)
        from lightllm_async.engine.tensor_parallel import Follower

        cfg = place_replica(cfg, replica, region.num_replicas if region is not None else 1)
        runner = _make_runner(cfg, show_progress=False)  # joins the group: a broadcast plan needs it
        if region is not None:
            from lightllm_async.ipc.steps import CPU_SPIN_S, SPIN_S, StepReader

            spin = SPIN_S if cfg.device.startswith("cuda") else CPU_SPIN_S
            reader = StepReader(region.step_channel(replica), cfg.tp_rank, spin)
        else:
            from lightllm_async.engine.plan_broadcast import BroadcastReader
            from lightllm_async.runner.distributed import plan_group

            reader = BroadcastReader(plan_group(), step_record_bytes(cfg))
        follower = Follower(reader, runner)
        signal.signal(signal.SIGTERM, lambda *_: follower.stop.set())
        follower.run()
        log.info("rank %d stops after %d steps", cfg.tp_rank, follower.steps)
        if region is None:
            # Across hosts rank 0 said stop and may be gone already, with the rendezvous store it
            # hosted: nothing is left to do, and interpreter teardown (process-group destructors)
            # must not turn a clean stop into a failed exit on a peer that vanished.
            logging.shutdown()
            os._exit(0)
    except BaseException:  # noqa: BLE001 - whatever killed us, logged; the server notices the exit
        log.error("engine rank %d failed:\n%s", cfg.tp_rank, traceback.format_exc())
        sys.exit(1)
    finally:
        if region is not None:
            region.close()
