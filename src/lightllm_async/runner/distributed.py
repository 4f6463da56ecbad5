"""Joining an engine group's ranks over torch.distributed: NCCL on CUDA, gloo on the CPU."""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import threading
import time
from urllib.parse import urlsplit

import torch
import torch.distributed as dist

from lightllm_async.config import EngineConfig
from lightllm_async.layers.parallel import SINGLE, FusedAllReduceNorm, SymmetricAllReduce, TPGroup

log = logging.getLogger(__name__)

# A rank that waits longer than this for its peers at start (loading, capturing) gives up.
INIT_TIMEOUT = datetime.timedelta(minutes=30)
# The step-record broadcast across hosts waits as long as the server idles.
PLAN_TIMEOUT = datetime.timedelta(days=365)
_plan_group = None
# Ranks on several hosts beat in the rendezvous store this often; one whose beat stops for
# HEARTBEAT_TIMEOUT_S (a host that vanished without closing its sockets: power, network) ends
# the others, which no collective would: the plan broadcast waits PLAN_TIMEOUT, NCCL longer.
HEARTBEAT_S = 0.2
HEARTBEAT_TIMEOUT_S = 5.0
# All-reduces up to this size (a decode step's activations: batch 128 x hidden 8192 in bf16 is
# 2 MiB) go through symmetric memory; larger ones (prefill) through NCCL. LLA_TP_ALLREDUCE=nccl
# sends every one through NCCL.
SYMMETRIC_MAX_BYTES = 4 << 20
# All-reduces of up to this many rows (a decode step's), with the residual add and RMSNorm that
# follow every row-parallel output of a layer or alone, run as one push-based kernel over symmetric
# memory (kernels/allreduce_norm.py; LLA_TP_ALLREDUCE=symm keeps them apart). On 2 H200s
# (2026-11-30, perf/allreduce_norm_gpu_check.py, bf16, hidden 4096, in a CUDA graph) it took 3.88 us
# at 1 row and 7.07 at 100 (torch's one-shot + rms_norm: 8.50 and 15.63; the sums alone 3.51 and
# 6.34 against 6.80 and 13.39).
FUSED_NORM_MAX_ROWS = 128


def init_tensor_parallel(cfg: EngineConfig) -> TPGroup:
    """The group of this engine's ranks; SINGLE (no torch.distributed) for one rank."""
    if cfg.tp_size == 1:
        return SINGLE
    device = torch.device(cfg.device)  # placed by engine/process.py place_replica
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend, init_method=cfg.dist_init, rank=cfg.tp_rank, world_size=cfg.tp_size, timeout=INIT_TIMEOUT
    )
    log.info("rank %d of %d joined (%s, %s)", cfg.tp_rank, cfg.tp_size, backend, device)
    if cfg.nnodes > 1:  # every rank creates it, in the same order
        global _plan_group
        _plan_group = dist.new_group(backend="gloo", timeout=PLAN_TIMEOUT)
        watch_group(cfg.dist_init, cfg.tp_rank, cfg.tp_size, "TP")
    return TPGroup(rank=cfg.tp_rank, size=cfg.tp_size, group=dist.group.WORLD)


def with_small_all_reduce(
    tp: TPGroup, dtype: torch.dtype, device: torch.device, nnodes: int, hidden: int
) -> TPGroup:
    """`tp` with the symmetric-memory all-reduce for activations of `dtype`, and the fused
    all-reduce + RMSNorm for rows of `hidden`, where they apply (several ranks of one host on
    CUDA; LLA_TP_ALLREDUCE=fused, the default, =symm for the all-reduce alone, =nccl for
    neither). Every rank calls it at the same point: building the buffers is collective."""
    if tp.size == 1 or device.type != "cuda" or nnodes > 1:
        return tp
    mode = os.environ.get("LLA_TP_ALLREDUCE", "fused")
    if mode not in ("symm", "fused"):
        return tp
    small = SymmetricAllReduce.create(tp.group, dtype, device, SYMMETRIC_MAX_BYTES)
    fused = None
    if mode == "fused":
        fused = FusedAllReduceNorm.create(tp.group, dtype, device, hidden, FUSED_NORM_MAX_ROWS)
    return dataclasses.replace(tp, small=small, fused=fused)


def plan_group():
    """The gloo group that carries step records between hosts (None on one host)."""
    return _plan_group


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def watch_group(
    init_url: str, rank: int, world: int, name: str, timeout_s: float = HEARTBEAT_TIMEOUT_S
) -> None:
    """Start this rank's heartbeat thread in the group whose rendezvous store is at `init_url`
    (tcp://host:port, hosted by rank 0): it beats a counter every HEARTBEAT_S and watches the
    other ranks'; when one stops moving for `timeout_s`, or the store does not answer for that
    long (rank 0's host is gone), it logs why and ends the process with exit 1 at once (a
    collective of this rank may be blocked on the peer), for the server and its supervisor."""
    parts = urlsplit(init_url)
    store = dist.TCPStore(
        parts.hostname, parts.port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s)
    )
    args = (store, rank, world, name, timeout_s)
    threading.Thread(target=_watch, args=args, name=f"{name.lower()}-peers", daemon=True).start()


def _watch(store, rank: int, world: int, name: str, timeout_s: float) -> None:
    seen: dict[int, tuple[int, float]] = {}  # peer: (its count, when it last moved)
    try:
        while True:
            store.add(f"{name}/beat/{rank}", 1)
            now = time.monotonic()
            for peer in (p for p in range(world) if p != rank):
                count = store.add(f"{name}/beat/{peer}", 0)
                if peer not in seen or seen[peer][0] != count:
                    seen[peer] = (count, now)
                elif now - seen[peer][1] > timeout_s:
                    raise RuntimeError(f"{name} group rank {peer} stopped beating for {timeout_s:g} s")
            time.sleep(HEARTBEAT_S)
    except Exception as exc:  # noqa: BLE001 - the store (rank 0) is gone, or a peer is
        log.error("a %s peer is gone (%s); exiting so the server stops for its supervisor", name, exc)
        logging.shutdown()
        os._exit(1)
