"""The embedded default model on this computer's CPU, as a newcomer meets it (issue 12), against
llama.cpp on the same GGUF file in the same run when `llama-cpp-python` is installed.

For each configuration (`--quantization:--dtype`) the whole server is started (`lightllm-async
--device cpu`) and measured over HTTP from a client on the same machine: time from the command
to "ready", prefill of a ~1000-token prompt (the first streamed token of a max_tokens=1
request), single-stream decode (128 tokens, after the first), and the aggregate rate of 8
concurrent streams of 64 tokens. llama.cpp runs in-process with as many threads as there are
cores, through its own C decode loop and C greedy sampler (perf/llama_cpp_loop.py; the old
`Llama.generate` way measured ~8% slower, perf/llama_cpp_variants.py): the same prompt's
prefill, and 128 greedy tokens.

    python perf/cpu_bench.py [--configs auto:auto,none:float32,none:bfloat16,auto:auto:compile] [--threads N]
        [--busy]
    python perf/cpu_bench.py --startup-only [--rounds N] [--busy]

`--startup-only` measures only the time from the command to "ready" for the default model (issue 12's
must-show 4), N rounds of three starts each: without the weight cache (--no-cache), with an empty
cache directory (cold: the packed weights are built and written) and with that directory again
(warm: read back), and prints where each start went: the command until the engine process's
entry (the frontend's start, its spawn of the engine, the engine's interpreter), the engine's
torch import, its model load, the rest of the engine (imports, KV cache, decode step), and the
frontend from the engine's ready to its own.

A config may add `:compile` (--cpu-compile), `:torch` (--cpu-step torch: torch's decode step
instead of the C one) and `:tN` (--cpu-threads N), e.g. auto:auto:torch,auto:auto:t2. `--busy`
keeps one core busy with another process (`while True: pass`) while the servers are measured.

The default runs the default server (`auto`: the GGUF's 4-bit weights packed, bfloat16) beside
the dequantized float32 reference and the dequantized bfloat16 one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from lightllm_async.models.loader import default_model_path  # noqa: E402

PORT = 8413
TEXT = "The keeper climbed the spiral stairs of the lighthouse every evening at dusk. "


def start(quantization: str, dtype: str, threads: int, flags: list[str]) -> tuple[subprocess.Popen, float]:
    cmd = [sys.executable, "-m", "lightllm_async.server", "--device", "cpu", "--port", str(PORT)]
    cmd += ["--quantization", quantization, "--dtype", dtype, *flags]
    cmd += ["--max-model-len", "2048", "--kv-cache-tokens", "16384"]
    cmd += ["--max-num-batched-tokens", "2048"] + (["--cpu-threads", str(threads)] if threads else [])
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "loaded in" in line:  # the engine's load line: what the weights are held in
            print(line.split("engine INFO ")[-1].strip())
        if "lightllm-async ready" in line:
            ready = time.perf_counter() - t0
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc, ready
    raise RuntimeError(f"server exited {proc.wait()}")


ENGINE_READY = re.compile(  # the engine's line (engine/process.py)
    r"ready ([\d.]+) s after the process's entry: torch imported in ([\d.]+) s, "
    r"the model loaded in ([\d.]+) s"
)


def start_phases(flags: list[str], env: dict[str, str]) -> dict[str, float]:
    """One start of the default server: seconds from the command to the engine's entry, then its
    torch import, model load and the rest, then the frontend's part, and the whole (`ready`)."""
    cmd = [sys.executable, "-m", "lightllm_async.server", "--device", "cpu", "--port", str(PORT), *flags]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    out: dict[str, float] = {}
    try:
        for line in proc.stdout:
            now = time.perf_counter() - t0
            if m := ENGINE_READY.search(line):
                total, torch_s, model_s = map(float, m.groups())
                out |= {"engine_ready": now, "entry": now - total, "torch": torch_s, "model": model_s}
                out["rest"] = total - torch_s - model_s
            if "lightllm-async ready" in line:
                out["ready"] = now
                if "engine_ready" in out:
                    out["frontend"] = now - out["engine_ready"]
                return out
        raise RuntimeError(f"server exited {proc.wait()}")
    finally:
        proc.terminate()
        proc.wait(30)


def startup(rounds: int) -> None:
    """--startup-only: `rounds` rounds of a start without the cache, a cold one, a warm one."""
    cols = ["entry", "torch", "model", "rest", "frontend", "ready"]
    print(f"{'round':<6}{'cache':<7}{'load':>6}" + "".join(f"{c:>10}" for c in cols))
    for r in range(1, rounds + 1):
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, LLA_CACHE_DIR=cache)
            for mode, flags in (("off", ["--no-cache"]), ("cold", []), ("warm", [])):
                load = os.getloadavg()[0]
                ph = start_phases(flags, env)
                cells = "".join(f"{ph[c]:>10.2f}" if c in ph else f"{'-':>10}" for c in cols)
                print(f"{r:<6}{mode:<7}{load:>6.2f}{cells}", flush=True)


def stream(prompt: str, tokens: int) -> tuple[float, float, int]:
    """(seconds to the first token, seconds in all, tokens) of one streamed completion."""
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    req = urllib.request.Request(
        f"http://127.0.0.1:{PORT}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    t0, first = time.perf_counter(), None
    with urllib.request.urlopen(req, timeout=900) as r:
        for line in r:
            if first is None and line.startswith(b"data: {"):
                first = time.perf_counter() - t0
    return first or 0.0, time.perf_counter() - t0, tokens


def ours(config: str, threads: int, prompt: str, prompt_tokens: int) -> dict:
    quantization, dtype, *extra = config.split(":")  # "compile": --cpu-compile
    flags = ["--cpu-compile"] if "compile" in extra else []
    flags += ["--cpu-step", "torch"] if "torch" in extra else []
    threads = next((int(e[1:]) for e in extra if e[:1] == "t" and e[1:].isdigit()), threads)
    proc, ready = start(quantization, dtype, threads, flags)
    try:
        stream("Hello", 4)  # warm-up
        prefill = min(stream(f"{i}. {prompt}", 1)[0] for i in range(2))  # new prompts: no cache hit
        first, total, n = stream("Tell me about lighthouses.", 128)
        out: list[tuple[float, float, int]] = []
        t0 = time.perf_counter()
        threads_ = [
            threading.Thread(target=lambda i=i: out.append(stream(f"Story number {i}:", 64)))
            for i in range(8)
        ]
        for t in threads_:
            t.start()
        for t in threads_:
            t.join()
        agg = 8 * 64 / (time.perf_counter() - t0)
    finally:
        proc.terminate()
        proc.wait(30)
    return {
        "engine": f"lightllm-async {':'.join([quantization, dtype, *extra])}",
        "ready_s": ready,
        "prefill_tok_s": prompt_tokens / prefill,
        "decode_tok_s": (n - 1) / (total - first),
        "8_streams_tok_s": agg,
    }


def llama_cpp(threads: int, prompt: str) -> dict | None:
    """llama.cpp's own loop (perf/llama_cpp_loop.py): the prompt's prefill after a warm-up, and
    128 greedy tokens (end-of-sequence ignored) timed from the first, as the server's streams are."""
    try:
        from llama_cpp_loop import LlamaLoop  # perf/ is on the path when run from there
    except ImportError:  # llama-cpp-python not installed
        return None
    t0 = time.perf_counter()
    llm = LlamaLoop(default_model_path(), threads)
    ready = time.perf_counter() - t0
    ids = llm.tokenize(prompt.encode())
    llm.prefill(ids[:32])  # warm-up: the thread pool, first-use allocations
    prefill = len(ids) / min(llm.prefill(ids) for _ in range(2))  # min of two, as ours
    decode = llm.generate(llm.tokenize(b"Tell me about lighthouses."), 128)
    llm.close()
    return {
        "engine": f"llama.cpp ({threads} threads, C loop)",
        "ready_s": ready,
        "prefill_tok_s": prefill,
        "decode_tok_s": decode,
        "8_streams_tok_s": float("nan"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--configs",
        default="auto:auto,none:float32,none:bfloat16",
        help="comma-separated --quantization:--dtype pairs, one server each; append :compile for "
        "--cpu-compile (e.g. auto:auto:compile)",
    )
    ap.add_argument("--threads", type=int, default=0, help="--cpu-threads (default: the server's)")
    ap.add_argument("--busy", action="store_true", help="keep one core busy with another process")
    ap.add_argument("--startup-only", action="store_true", help="only the time to ready, phase by phase")
    ap.add_argument("--rounds", type=int, default=3, help="--startup-only: rounds of three starts")
    args = ap.parse_args()
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy else None
    try:
        startup(args.rounds) if args.startup_only else run(args)
    finally:
        if busy is not None:
            busy.kill()


def run(args) -> None:
    from lightllm_async.tokenizer import load_tokenizer

    tok = load_tokenizer(default_model_path())
    prompt = TEXT * 64
    ids = tok.encode(prompt)
    prompt = tok.decode(ids[:1000])
    n = len(tok.encode(prompt))
    rows = [ours(c, args.threads, prompt, n) for c in args.configs.split(",")]
    ref = llama_cpp(args.threads or len(os.sched_getaffinity(0)), prompt)
    rows += [ref] if ref else []
    cores, load = len(os.sched_getaffinity(0)), os.getloadavg()[0]
    missing = "" if ref else "; llama-cpp-python not installed"
    busy = ", one core kept busy" if args.busy else ""
    print(
        f"\nSmolLM2-135M-Instruct (embedded GGUF), {cores} cores{busy}, prompt {n} tokens, "
        f"load {load:.1f}{missing}"
    )
    print(f"{'engine':<36}{'ready s':>9}{'prefill tok/s':>15}{'decode tok/s':>14}{'8 streams tok/s':>17}")
    for r in rows:
        print(
            f"{r['engine']:<36}{r['ready_s']:>9.1f}{r['prefill_tok_s']:>15.0f}{r['decode_tok_s']:>14.1f}"
            f"{r['8_streams_tok_s']:>17.1f}"
        )


if __name__ == "__main__":
    main()
