"""`lightllm-async`: the one command. Creates the shared region, starts the engines, serves HTTP.

`--dp N` starts N engine replicas behind the one frontend and region; `--tp M` makes each replica M
processes (rank 0 schedules, ranks 1..M-1 follow its step records; replica k's ranks on GPUs
k*M .. k*M+M-1, see config.rank_device). HTTP is served once every replica is ready, and
/health answers 200 only while every engine process runs. With `--nnodes` > 1 the ranks span
hosts: node 0 serves HTTP, the others run their engine ranks only (`serve_node`).

Exit status: 0 after SIGINT/SIGTERM (once the requests in flight have drained), 1 when an engine
process died or failed to start (so a systemd unit with Restart=on-failure brings the server
back). When a replica dies, its requests end with an error at once, those of the others may go
on for ENGINE_DEATH_GRACE_S, then end with an error too, and the server exits 1. The last log
line says which. Under systemd it sends READY=1, WATCHDOG=1 (while every replica's heartbeat
moves) and STOPPING=1 (see systemd.py); `lightllm-async systemd-unit [flags]` prints a unit that
runs it with `flags`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import multiprocessing as mp
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from lightllm_async import systemd
from lightllm_async.config import EngineConfig, ServerConfig

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

    from lightllm_async.ipc import FrontendRegion, RegionSpec

log = logging.getLogger("lightllm_async")

# After an engine died: how long the requests in flight on the other replicas may go on before
# they end with an error too (the dead one's end at once) and the server exits.
ENGINE_DEATH_GRACE_S = 1.0


def build_parser(**kwargs) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lightllm-async",
        description="Serve an LLM over an OpenAI-compatible API. `lightllm-async systemd-unit "
        "[flags]` prints a systemd unit that serves with those flags.",
        **kwargs,
    )
    p.add_argument(
        "--model",
        default=None,
        help="local HF folder, .gguf file, or 'dummy' (default: the embedded SmolLM2-135M-Instruct)",
    )
    p.add_argument("--served-model-name", default=None, help="model name in the API (default: from --model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA when present), cpu, cuda, cuda:N; with --dp/--tp, the engines take the GPUs from it",
    )
    p.add_argument(
        "--dp",
        type=int,
        default=1,
        help="data parallelism: engine replicas, each with its own model copy, KV cache and GPU, behind "
        "one HTTP frontend; a request goes to the replica with the fewest requests in flight",
    )
    p.add_argument(
        "--pd",
        type=_pd_split,
        default=None,
        metavar="prefill=N,decode=M",
        help="prefill/decode disaggregation: N prefill engines run prompts and sample the first "
        "token, then move the request's KV (layer by layer, torch.distributed send/recv: NCCL, gloo "
        "on the CPU) to one of M decode engines, which generate the rest; each engine on its own "
        "GPU (in order). Not with --dp, --tp or --nnodes",
    )
    p.add_argument(
        "--role",
        choices=["prefill", "decode", "router"],
        default=None,
        help="prefill/decode disaggregation across servers (hosts): a prefill or decode server (one "
        "engine, rank --pd-rank of the --pd-world engines of every prefill and decode server, which "
        "meet at --master-addr:--master-port and move KV as --pd does), or the router (the HTTP "
        "frontend that pairs them: --prefill, --decode; it loads only the tokenizer)",
    )
    p.add_argument("--pd-rank", type=int, default=-1, help="--role prefill|decode: this engine's rank")
    p.add_argument("--pd-world", type=int, default=0, help="--role prefill|decode: prefill + decode servers")
    p.add_argument(
        "--prefill", type=_names, default=(), help="--role router: the prefill servers' URLs, comma-separated"
    )
    p.add_argument(
        "--decode", type=_names, default=(), help="--role router: the decode servers' URLs, comma-separated"
    )
    p.add_argument(
        "--pd-upstream-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="--role router: a prefill or decode server that sends nothing for this long during a "
        "request (connecting, its answer's head, or between two events of its stream) is hung: the "
        "request ends with an error and the server's half is dropped. A stream that goes on sending "
        "is never cut; keep it above a prompt's longest queueing and prefill (default 60)",
    )
    p.add_argument(
        "--pd-secret",
        default=None,
        help="--role: a secret the router sends and the role servers require on their internal "
        "endpoints (default: $LLA_PD_SECRET; prefer it: the command line is visible to all users)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="activations and float weights; auto: bfloat16 on CUDA, and on the CPU bfloat16 with "
        "packed 4-bit weights, float32 without",
    )
    p.add_argument(
        "--quantization",
        default="auto",
        choices=["auto", "none", "int4"],
        help="auto: a GGUF's 4-bit weights (Q4_0, Q4_1, Q4_K) stay packed on the CPU and run through "
        "torch's int4 kernel, dequantized elsewhere; none: every weight dequantized (the float "
        "reference); int4: packed, or an error where they cannot be",
    )
    p.add_argument(
        "--load-format",
        default="auto",
        choices=["auto", "random"],
        help="random: random weights of the model's shape (benchmarks without checkpoints)",
    )
    p.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="context length: prompt + output (default: the model's, at most 4096)",
    )
    p.add_argument("--max-running-requests", type=int, default=64, help="requests decoded together")
    p.add_argument(
        "--num-slots",
        type=int,
        default=256,
        help="request slots in shared memory: requests in flight, queued included",
    )
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="tokens per step (prefill chunk); default 1024 on a GPU (measured against 2048: the same "
        "throughput, half the TPOT p99 beside long prompts, prefix-cache hits sooner), 2048 on the CPU "
        "(an 1,800-token prompt's first token 13%% sooner there); perf/RESULTS.md, 2026-11-30",
    )
    p.add_argument("--kv-cache-tokens", type=int, default=0, help="KV cache size in tokens (0: from memory)")
    p.add_argument(
        "--kv-cache-dtype",
        choices=["auto", "fp8", "fp8_e4m3"],
        default="auto",
        help="auto: the model's dtype; fp8 (or fp8_e4m3, vLLM's other name): float8 e4m3, half the bytes per "
        "token (Llama-family on CUDA)",
    )
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--disable-cuda-graph", action="store_true")
    p.add_argument(
        "--disable-piecewise-cuda-graph",
        action="store_true",
        help="run steps with prefill chunks eagerly (CUDA graphs cover only decode-only steps)",
    )
    p.add_argument(
        "--disable-prefix-cache", action="store_true", help="compute every prompt in full (no prefix cache)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--tp",
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="tensor parallel: N engine processes per replica, one per GPU, each holding 1/N of every "
        "layer (on the CPU, N processes over gloo)",
    )
    p.add_argument(
        "--nnodes", type=int, default=1, help="hosts the --tp ranks span (each runs --tp/--nnodes of them)"
    )
    p.add_argument(
        "--node-rank",
        type=int,
        default=0,
        help="this host's index among --nnodes; node 0 serves HTTP, the others run engine ranks only",
    )
    p.add_argument("--master-addr", default="127.0.0.1", help="node 0's address for torch.distributed")
    p.add_argument(
        "--master-port", type=int, default=0, help="node 0's rendezvous port (needed with --nnodes > 1)"
    )
    p.add_argument(
        "--cpu-threads",
        type=int,
        default=0,
        help="the engine's compute threads on the CPU (default: the cores this process may use, less "
        "one for the HTTP frontend, at least 1); idle threads sleep rather than spin",
    )
    p.add_argument(
        "--cpu-compile",
        action="store_true",
        help="on the CPU, compile the decode step with torch.compile (faster steps; the first start "
        "takes minutes before ready, later ones less from inductor's cache)",
    )
    p.add_argument(
        "--cpu-step",
        choices=("auto", "c", "torch"),
        default="auto",
        help="on the CPU, how decode steps run: 'c' one C call a step (int4-packed Llama-family models; "
        "csrc/decode_step.c), 'torch' torch ops (eager, or compiled with --cpu-compile); 'auto' (default): "
        "C where the model is packed and the extension built, unless --cpu-compile is given",
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="where a GGUF's weights, once unpacked and repacked for the CPU kernels, are kept for the "
        "next start (default: $LLA_CACHE_DIR, else $XDG_CACHE_HOME/lightllm-async, else "
        "~/.cache/lightllm-async; LLA_CACHE_DIR=off: none)",
    )
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the weight cache")
    p.add_argument("--dummy-step-time", type=float, default=0.0, help="seconds per step with --model dummy")
    p.add_argument(
        "--allowed-hosts",
        type=_names,
        default=(),
        help="comma-separated Host names answered besides loopback ones ('*': any); without it, a "
        "server bound to a loopback address answers only loopback names, others answer any",
    )
    p.add_argument(
        "--allowed-origins",
        type=_names,
        default=(),
        help="comma-separated origins allowed by CORS ('*': any); without it, no CORS headers",
    )
    p.add_argument(
        "--max-connections", type=int, default=1000, help="open connections; beyond, 503 (0: no cap)"
    )
    p.add_argument(
        "--read-timeout",
        type=float,
        default=30.0,
        help="seconds a client has to send a request's headers, and again its body (then 408)",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds in-flight requests may take to finish after SIGTERM/SIGINT",
    )
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer <key>' on every route but /health, /metrics and "
        "/openapi.json (default: $LLA_API_KEY; prefer it: the command line is visible to all users)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--fail-after-steps", type=int, default=0, help=argparse.SUPPRESS)  # test hook
    return p


def _pd_split(text: str) -> tuple[int, int]:
    """`prefill=N,decode=M` -> (N, M)."""
    try:
        parts = dict(kv.split("=", 1) for kv in text.split(","))
        n, m = int(parts.pop("prefill")), int(parts.pop("decode"))
    except (KeyError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"expected prefill=N,decode=M, got {text!r}") from exc
    if parts or n < 1 or m < 1:
        raise argparse.ArgumentTypeError(f"expected prefill=N,decode=M with N, M >= 1, got {text!r}")
    return n, m


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


def resolve_config(args: argparse.Namespace) -> ServerConfig:
    """Turn CLI arguments into the frozen config, reading the model's own limits."""
    from lightllm_async.ipc.types import MAX_REPLICAS
    from lightllm_async.models.loader import default_model_path, load_model_config

    model = args.model or default_model_path()
    if model == "dummy":
        model_len, name = 4096, "dummy"
    else:
        model_len = load_model_config(model).max_position_embeddings
        name = os.path.basename(os.path.normpath(model)).removesuffix(".gguf")
    max_model_len = args.max_model_len or min(model_len, 4096)
    if args.max_model_len and args.max_model_len > model_len:
        raise SystemExit(f"--max-model-len {args.max_model_len} exceeds the model's {model_len}")
    if args.read_timeout <= 0:
        raise SystemExit("--read-timeout must be more than 0 seconds")
    if not 1 <= args.dp <= MAX_REPLICAS:
        raise SystemExit(f"--dp must be in [1, {MAX_REPLICAS}], got {args.dp}")
    if args.tp < 1:
        raise SystemExit("--tp must be at least 1")
    if args.nnodes < 1 or args.tp % args.nnodes:
        raise SystemExit(f"--tp {args.tp} must be a multiple of --nnodes {args.nnodes}")
    if not 0 <= args.node_rank < args.nnodes:
        raise SystemExit(f"--node-rank must be in [0, {args.nnodes})")
    if args.nnodes > 1 and not 0 < args.master_port < 65536:
        raise SystemExit("--nnodes > 1 needs --master-port (and --master-addr: node 0's address)")
    if args.nnodes > 1 and args.dp > 1:
        raise SystemExit("--dp with --nnodes > 1 is not supported: run one server per host instead")
    kv_dtype = "auto" if args.kv_cache_dtype == "auto" else "fp8"  # fp8_e4m3: vLLM's other name
    if kv_dtype == "fp8":
        if args.device == "cpu":
            raise SystemExit("--kv-cache-dtype fp8 needs CUDA: the CPU's decode paths read a float KV cache")
        if args.pd is not None or args.role is not None:  # the KV moves as the other side's bytes
            raise SystemExit("--kv-cache-dtype fp8 is not supported with --pd or --role yet")
    pd_prefill, dp = 0, args.dp
    role_fields = _role_fields(args, model)
    if args.pd is not None:
        if args.dp > 1 or args.tp > 1 or args.nnodes > 1:
            raise SystemExit("--pd is not supported with --dp, --tp or --nnodes yet")
        if model == "dummy":
            raise SystemExit("--pd needs a model (the dummy one has no KV cache to move)")
        pd_prefill, dp = args.pd[0], sum(args.pd)
        if dp > MAX_REPLICAS:
            raise SystemExit(f"--pd: at most {MAX_REPLICAS} engines in all")
    engine = EngineConfig(
        model_path=model,
        device=args.device,
        dtype=args.dtype,
        quantization=args.quantization,
        load_format=args.load_format,
        max_model_len=max_model_len,
        max_running_requests=args.max_running_requests,
        num_slots=args.num_slots,
        max_num_batched_tokens=max(
            default_chunk(args.device)
            if args.max_num_batched_tokens is None
            else args.max_num_batched_tokens,
            1,
        ),
        kv_cache_tokens=args.kv_cache_tokens,
        kv_cache_dtype=kv_dtype,
        gpu_memory_utilization=args.gpu_memory_utilization,
        disable_cuda_graph=args.disable_cuda_graph,
        disable_piecewise_graph=args.disable_piecewise_cuda_graph,
        disable_prefix_cache=args.disable_prefix_cache,
        seed=args.seed,
        fail_after_steps=args.fail_after_steps,
        cpu_threads=args.cpu_threads,
        cpu_compile=args.cpu_compile,
        cpu_step=args.cpu_step,
        weight_cache_dir=_weight_cache_dir(args),
        dummy_step_time=args.dummy_step_time,
        tp_size=args.tp,
        nnodes=args.nnodes,
        **role_fields,
    )
    return ServerConfig(
        engine=engine,
        dp=dp,
        pd_prefill=pd_prefill,
        host=args.host,
        port=args.port,
        served_model_name=args.served_model_name or name,
        log_level=args.log_level,
        allowed_hosts=args.allowed_hosts,
        allowed_origins=args.allowed_origins,
        max_connections=max(args.max_connections, 0),
        read_timeout=args.read_timeout,
        shutdown_timeout=max(args.shutdown_timeout, 0.0),
        api_key=args.api_key or os.environ.get("LLA_API_KEY") or None,
        node_rank=args.node_rank,
        master_addr=args.master_addr,
        master_port=args.master_port,
        role=args.role or "",
        pd_secret=args.pd_secret or os.environ.get("LLA_PD_SECRET") or None,
        router_prefill=args.prefill,
        router_decode=args.decode,
        pd_upstream_timeout=args.pd_upstream_timeout,
    )


def _weight_cache_dir(args: argparse.Namespace) -> str:
    """The weight cache's directory ("": none), from --no-cache, --cache-dir or the environment."""
    from lightllm_async.config import default_cache_dir

    if args.no_cache:
        return ""
    base = args.cache_dir if args.cache_dir is not None else default_cache_dir()
    return os.path.join(os.path.abspath(base), "weights") if base else ""


def _role_fields(args: argparse.Namespace, model: str) -> dict:
    """--role prefill|decode: the engine's place in the PD group; checks every --role's flags."""
    if args.role is None:
        return {}
    if args.pd is not None or args.dp > 1 or args.tp > 1 or args.nnodes > 1:
        raise SystemExit("--role is not supported with --pd, --dp, --tp or --nnodes")
    if args.role == "router":
        if not args.prefill or not args.decode:
            raise SystemExit("--role router needs --prefill URL[,URL...] and --decode URL[,URL...]")
        if not args.pd_upstream_timeout > 0:
            raise SystemExit("--pd-upstream-timeout must be a positive number of seconds")
        return {}
    if model == "dummy":
        raise SystemExit("--role prefill|decode needs a model (the dummy one has no KV cache to move)")
    if args.pd_world < 2 or not 0 <= args.pd_rank < args.pd_world:
        raise SystemExit("--role prefill|decode needs --pd-world N >= 2 and --pd-rank in [0, N)")
    if not 0 < args.master_port < 65536:
        raise SystemExit("--role prefill|decode needs --master-port (and --master-addr): rank 0's rendezvous")
    return dict(
        pd_role=args.role,
        pd_init=f"tcp://{args.master_addr}:{args.master_port}",
        pd_world=args.pd_world,
        pd_rank=args.pd_rank,
    )


def _wait_ready(region: FrontendRegion, groups: list[list[BaseProcess]]) -> bool:
    """Until every replica reports READY (True; its rank 0 is ready once all its ranks have joined
    and loaded), or one fails or one of its processes dies first (False, logged)."""
    from lightllm_async.ipc import EngineState

    while True:
        for k, group in enumerate(groups):
            state = region.replica_state(k)
            dead = next((p for p in group if not p.is_alive()), None)
            if state == EngineState.ERROR or dead is not None:
                which = "engine" if len(groups) == 1 else f"engine replica {k}"
                error = region.replica_error(k) or f"{dead.name} exit code {dead.exitcode}"
                log.error("%s failed to start: %s", which, error)
                return False
        if all(region.replica_state(k) == EngineState.READY for k in range(len(groups))):
            return True
        time.sleep(0.01)


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _engine_processes(cfg: ServerConfig, region_name: str | None) -> list[list[BaseProcess]]:
    """This host's engine processes, one list per replica: rank 0 first (where it is on this
    host), then the ranks that follow its step records. Each replica's ranks join their own
    torch.distributed group (on one host, at a free port of its own)."""
    eng, spawn = cfg.engine, mp.get_context("spawn")
    local = eng.tp_size // eng.nnodes
    groups = []
    pd_init = f"tcp://127.0.0.1:{_free_port()}" if cfg.pd_prefill else ""
    for k in range(cfg.dp):
        dist_init = ""
        if eng.tp_size > 1:
            dist_init = f"tcp://{cfg.master_addr}:{cfg.master_port or _free_port()}"
        role = ("prefill" if k < cfg.pd_prefill else "decode") if cfg.pd_prefill else ""
        group = []
        for rank in range(cfg.node_rank * local, (cfg.node_rank + 1) * local):
            name = "lightllm-engine" if cfg.dp == 1 else f"lightllm-engine-{k}"
            name = f"lightllm-{role}-{k}" if role else name
            name += f"-rank{rank}" if eng.tp_size > 1 else ""
            target = _engine_entry if rank == 0 else _follower_entry
            rank_cfg = eng.replace(tp_rank=rank, dist_init=dist_init)
            if role:
                rank_cfg = rank_cfg.replace(pd_role=role, pd_init=pd_init, pd_world=cfg.dp)
            args = (rank_cfg, region_name, cfg.log_level, k)
            group.append(spawn.Process(target=target, args=args, name=name, daemon=True))
        groups.append(group)
    return groups


def region_spec(cfg: ServerConfig) -> RegionSpec:
    """The region a configuration needs: its slots, its replicas' rings, and under tensor
    parallelism on one host a step channel per replica."""
    from lightllm_async.engine.process import step_record_bytes
    from lightllm_async.ipc import RegionSpec

    eng = cfg.engine
    spec = RegionSpec(num_slots=eng.num_slots, max_tokens_per_slot=eng.max_model_len, num_replicas=cfg.dp)
    if eng.tp_size == 1 or eng.nnodes > 1:  # across hosts the records are broadcast
        return spec
    return dataclasses.replace(
        spec, step_channels=cfg.dp, step_followers=eng.tp_size - 1, step_record=step_record_bytes(eng)
    )


def serve(cfg: ServerConfig) -> int:
    from lightllm_async.ipc import Region

    eng = cfg.engine
    if cfg.node_rank > 0:
        return serve_node(cfg)
    if cfg.role == "router":
        return serve_router(cfg)
    # The port first: taken, we stop before loading anything; held, no socket the engines open
    # meanwhile (a rendezvous store, NCCL's bootstrap, their client ends) can land on it.
    try:
        listener = _listen_socket(cfg.host, cfg.port)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", cfg.host, cfg.port, exc.strerror or exc)
        return 1
    region = Region.create(cfg.instance_id, region_spec(cfg))  # the frontend's view; engines attach theirs
    groups = _engine_processes(cfg, region.name)
    procs = [p for group in groups for p in group]
    exit_code = 1
    try:
        for proc in procs:
            proc.start()
        # The engines import torch and load (seconds) meanwhile: the frontend's own imports and
        # its tokenizer come after their start, not before.
        from lightllm_async.frontend.app import FrontendContext
        from lightllm_async.frontend.edge import EdgePolicy
        from lightllm_async.frontend.http_server import build_server  # noqa: F401 - imported now, used when ready
        from lightllm_async.models.loader import default_model_path
        from lightllm_async.tokenizer import load_tokenizer

        tok_path = default_model_path() if eng.model_path == "dummy" else eng.model_path
        tokenizer = load_tokenizer(tok_path)
        if not _wait_ready(region, groups):
            return 1
        ctx = FrontendContext(
            region=region,
            tokenizer=tokenizer,
            served_model_name=cfg.served_model_name,
            max_model_len=eng.max_model_len,
            engine_alive=_all_alive(procs),
            edge=EdgePolicy.for_bind(cfg.host, cfg.allowed_hosts, cfg.allowed_origins),
            api_key=cfg.api_key,
            replicas_alive=lambda: [all(p.is_alive() for p in group) for group in groups],
            pd_prefill=cfg.pd_prefill,
            pd_role=cfg.role,
            pd_rank=eng.pd_rank,
            pd_world=eng.pd_world,
            pd_secret=cfg.pd_secret,
        )
        exit_code = _serve_http(cfg, ctx, groups, listener)
    except KeyboardInterrupt:  # SIGINT or SIGTERM before HTTP serving began
        systemd.notify("STOPPING=1")
        exit_code = 0
    finally:
        _stop_engines(groups)
        listener.close()
        region.close()
        region.unlink()
        log.info("stopped (exit %d)", exit_code)
    return exit_code


def serve_router(cfg: ServerConfig) -> int:
    """--role router: HTTP only, over the prefill and decode servers (frontend/router.py). Exit 0
    after SIGINT/SIGTERM; the role servers' deaths do not stop it (it answers 503 meanwhile)."""
    from lightllm_async.frontend.app import FrontendContext
    from lightllm_async.frontend.edge import EdgePolicy
    from lightllm_async.frontend.router import RemoteReader
    from lightllm_async.tokenizer import load_tokenizer

    try:
        listener = _listen_socket(cfg.host, cfg.port)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", cfg.host, cfg.port, exc.strerror or exc)
        return 1
    try:
        remote = RemoteReader(
            cfg.router_prefill,
            cfg.router_decode,
            cfg.engine.max_model_len,
            cfg.pd_secret,
            cfg.pd_upstream_timeout,
        )
        ctx = FrontendContext(
            region=None,
            tokenizer=load_tokenizer(cfg.engine.model_path),
            served_model_name=cfg.served_model_name,
            max_model_len=cfg.engine.max_model_len,
            engine_alive=remote.has_pair,
            edge=EdgePolicy.for_bind(cfg.host, cfg.allowed_hosts, cfg.allowed_origins),
            api_key=cfg.api_key,
            pd_role="router",
            pd_secret=cfg.pd_secret,
            remote=remote,
            max_choices=cfg.engine.num_slots,
        )
        log.info("router: prefill servers %s, decode servers %s", cfg.router_prefill, cfg.router_decode)
        return _serve_http(cfg, ctx, [], listener)
    except KeyboardInterrupt:
        return 0
    finally:
        listener.close()


def _all_alive(procs: list[BaseProcess]) -> Callable[[], bool]:
    """Whether every engine process runs (once serving, every one has reported READY)."""
    if len(procs) == 1:
        return procs[0].is_alive  # called for each request: no wrapper in the way
    return lambda: all(proc.is_alive() for proc in procs)


def serve_node(cfg: ServerConfig) -> int:
    """A host other than node 0: its engine ranks only (no HTTP, no region). Exit 0 when they all
    stop cleanly (rank 0 stopped them), 1 when one fails (e.g. its peers died), so that a
    supervisor restarts the node with node 0."""
    groups = _engine_processes(cfg, None)
    procs = [p for group in groups for p in group]
    log.info(
        "node %d: engine ranks %s, rendezvous at %s", cfg.node_rank, [p.name for p in procs], cfg.master_addr
    )
    for proc in procs:
        proc.start()
    try:
        while all(p.is_alive() for p in procs):
            time.sleep(0.1)
        for p in procs:
            p.join(5)
        failed = [p for p in procs if p.exitcode != 0]
        for p in failed:
            log.error("engine process %s exited with %s", p.name, p.exitcode)
        return 1 if failed else 0
    except KeyboardInterrupt:
        return 0
    finally:
        _stop_engines(groups)


def default_chunk(device: str) -> int:
    """--max-num-batched-tokens by default: 1024 where the engine runs on a GPU, 2048 on the CPU.
    Measured 2026-11-30 (perf/RESULTS.md): on an H200 (Llama-3-8B shape, 100 clients) 1024 against
    2048 gives the same throughput, TPOT p99 31 instead of 55 ms beside long prompts and prefix
    hits' first tokens sooner; on this project's 2-core CPU with the default model a 1,800-token
    prompt's first token takes 2.10 s at 1024 against 1.83 s at 2048 (the second chunk's masked
    attention reads the whole context, and a step more). "auto" asks the CUDA driver, without
    torch, whether it sees a GPU, as the engine's torch will."""
    if device == "cpu":
        return 2048
    if device == "auto" and not cuda_present():
        return 2048
    return 1024


def cuda_present() -> bool:
    """Whether the CUDA driver sees a device (CUDA_VISIBLE_DEVICES honoured): cuInit and
    cuDeviceGetCount through ctypes, in milliseconds and without importing torch."""
    import ctypes

    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    return lib.cuInit(0) == 0 and lib.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0


def _listen_socket(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) as uvicorn binds it (SO_REUSEADDR; IPv6 for an IPv6
    address), not yet listening: nothing is accepted before the engines are ready."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _serve_http(cfg: ServerConfig, ctx, groups: list[list[BaseProcess]], sock: socket.socket) -> int:
    """Run uvicorn until a signal and the drain after it (0) or an engine's death (1)."""
    from lightllm_async.frontend.app import create_app
    from lightllm_async.frontend.http_server import ClientLimits, build_server

    limits = ClientLimits(read_timeout=cfg.read_timeout, max_connections=cfg.max_connections)
    hooks = _systemd_hooks(cfg, ctx.region)
    server = build_server(
        create_app(ctx), cfg.host, cfg.port, cfg.log_level, limits, cfg.shutdown_timeout, hooks
    )
    died = threading.Event()
    threading.Thread(target=_watch, args=(server, groups, died), daemon=True).start()
    try:
        server.run(sockets=[sock])
    except SystemExit:  # uvicorn could not listen, or the app failed to start
        return 1
    return 1 if died.is_set() or not server.started else 0


def _engine_entry(eng: EngineConfig, region_name: str, log_level: str, replica: int) -> None:
    from lightllm_async.engine.process import run_engine

    run_engine(eng, region_name, log_level, replica)


def _follower_entry(eng: EngineConfig, region_name: str | None, log_level: str, replica: int) -> None:
    from lightllm_async.engine.process import run_follower

    run_follower(eng, region_name, log_level, replica)


def _systemd_hooks(cfg: ServerConfig, region: FrontendRegion):
    """The ready line and READY=1 once uvicorn listens, WATCHDOG=1 while every engine replica's
    heartbeat moves (when systemd asked for a watchdog), STOPPING=1 when a signal starts the drain."""
    from lightllm_async.engine.engine import IDLE_WAIT_S
    from lightllm_async.frontend.http_server import Hooks

    url = f"http://{cfg.host}:{cfg.port}"

    def serving() -> None:
        log.info("lightllm-async ready: %s (model %s)", url, cfg.served_model_name)
        systemd.notify(f"READY=1\nSTATUS=serving {cfg.served_model_name} on {url}")

    def draining() -> None:
        systemd.notify("STOPPING=1\nSTATUS=draining requests in flight")

    interval = systemd.watchdog_interval()
    if interval is None or region is None:  # a router has no engine heartbeats to watch
        return Hooks(serving=serving, draining=draining)
    # An idle engine beats every IDLE_WAIT_S, a busy one every step: a few idle beats missed is a wedge.
    watchdog = systemd.Watchdog(interval, region.heartbeats, stale_after=max(interval, 4 * IDLE_WAIT_S))
    log.info("systemd watchdog: a ping every %.1f s while every engine's heartbeat moves", interval)
    return Hooks(serving=serving, tick=watchdog.tick, draining=draining)


def _watch(server, groups: list[list[BaseProcess]], died: threading.Event) -> None:
    """Stop the server when an engine process (any rank of any replica) dies: the frontend has
    ended the dead replica's requests; the server's drain ends the others' after
    ENGINE_DEATH_GRACE_S."""
    procs = [(k, p) for k, group in enumerate(groups) for p in group]
    while not server.should_exit:
        for k, proc in procs:
            if not proc.is_alive():
                which = "engine process" if len(groups) == 1 else f"engine replica {k}"
                which += f" {proc.name} (pid {proc.pid})"
                log.error(
                    "%s died (exit code %s); stopping so a supervisor can restart", which, proc.exitcode
                )
                systemd.notify(f"STATUS={which} died (exit code {proc.exitcode})")
                died.set()
                server.engine_died(ENGINE_DEATH_GRACE_S)
                return
        time.sleep(0.05)


def _stop_engines(groups: list[list[BaseProcess]]) -> None:
    """SIGTERM to every replica's first process at once (rank 0 finishes its step and tells its
    other ranks to stop), then to the others left (a rank stuck in a collective with a dead
    peer), then SIGKILL to any left."""
    started = [[p for p in group if p.pid is not None] for group in groups]
    deadline = time.monotonic() + 5
    for stage in ([g[:1] for g in started], [g[1:] for g in started]):
        for proc in (p for g in stage for p in g):
            if proc.is_alive():
                proc.terminate()
        for proc in (p for g in stage for p in g):
            proc.join(max(deadline - time.monotonic(), 0))
        deadline = time.monotonic() + 2
    for proc in (p for g in started for p in g):
        if proc.is_alive():
            proc.kill()
            proc.join(2)


def systemd_unit(argv: list[str]) -> int:
    """`lightllm-async systemd-unit [flags]`: print a unit whose ExecStart serves with `flags`
    (checked as the server would parse them); --api-key is left out, for the EnvironmentFile."""
    p = build_parser(allow_abbrev=False)
    p.prog = "lightllm-async systemd-unit"
    p.add_argument("--watchdog-sec", type=int, default=60, help="the unit's WatchdogSec (default 60)")
    args = p.parse_args(argv)
    flags, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--api-key", "--watchdog-sec"):
            skip = True
        elif not a.startswith(("--api-key=", "--watchdog-sec=")):
            flags.append(a)
    if os.path.basename(sys.argv[0]) == "lightllm-async":
        command = [os.path.abspath(sys.argv[0])]
    else:
        command = [sys.executable, "-m", "lightllm_async.server"]
    print(systemd.unit_text([*command, *flags], flags, args.shutdown_timeout, args.watchdog_sec), end="")
    if args.api_key:
        print("--api-key is not in the unit: put LLA_API_KEY=<key> in its EnvironmentFile", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["systemd-unit"]:
        return systemd_unit(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    cfg = resolve_config(args)
    # SIGTERM takes the same path as Ctrl-C: before serving it interrupts the start; while serving,
    # DrainingServer drains the requests in flight, then `finally` cleans up. SIGINT too, even where
    # it was inherited ignored (a script's `lightllm-async &`: a shell without job control ignores
    # it in background jobs): Python keeps an ignored SIGINT ignored, so until uvicorn installed its
    # handlers at the start of serving, a `kill -INT` while loading was lost and the server served on.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return serve(cfg)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
