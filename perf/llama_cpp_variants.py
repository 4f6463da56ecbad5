"""Why llama.cpp (llama-cpp-python) measured slow here: its prefill and greedy decode on the
embedded GGUF, timed per variant of the way it is driven (issue 12's baseline).

Each variant prints prefill tok/s of the ~1000-token prompt (decode of the whole prompt plus one
sampled token, after a warm-up) and decode tok/s of 128 greedy tokens timed from the first, as
`cpu_bench.py` times our server's streams. Variants:

    hl        `Llama.eval` + `Llama.generate` (cpu_bench.py's old way: logits to numpy, Python sampling)
    hl-cold   the same, but prefill is the first evaluation after load (cpu_bench.py's old order)
    ll        llama.cpp's own loop through the C API: `llama_decode` of one token, the greedy sampler
              chain in C (`llama_sampler_sample`), as llama-cli / llama-bench do
    ll-fa0    ll with flash attention off (llama-cpp-python's `Llama` default; the C default is auto)
    ll-t1     ll with 1 thread
    ll-nommap ll with the weights read into memory instead of mmap
    ll-ub256  ll with n_ubatch 256 (prefill micro-batch)

    OMP_WAIT_POLICY / GOMP_SPINCOUNT are read by the OpenMP runtime at load: set them in the
    environment of the whole command, e.g. `OMP_WAIT_POLICY=PASSIVE python perf/llama_cpp_variants.py`.

    python perf/llama_cpp_variants.py [--variants hl,ll,...] [--rounds N] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import llama_cpp as L
from llama_cpp_loop import LlamaLoop  # perf/ is on the path when run from there

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from lightllm_async.models.loader import default_model_path  # noqa: E402

TEXT = "The keeper climbed the spiral stairs of the lighthouse every evening at dusk. "
QUESTION = b"Tell me about lighthouses."


class HighLevel:
    """`Llama.eval` and `Llama.generate`: the way cpu_bench.py drove llama.cpp before."""

    def __init__(self, threads: int):
        self.llm = L.Llama(model_path=default_model_path(), n_ctx=2048, n_threads=threads, verbose=False)

    def tokenize(self, text: bytes) -> list[int]:
        return self.llm.tokenize(text)

    def close(self) -> None:
        self.llm.close()

    def prefill(self, ids: list[int]) -> float:
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(ids)
        return time.perf_counter() - t0

    def generate(self, ids: list[int], n: int) -> float:
        count, first = 0, 0.0
        for _ in self.llm.generate(ids, top_k=1, temp=0.0, reset=True):
            count += 1
            if count == 1:
                first = time.perf_counter()
            if count == n:
                break
        return (count - 1) / (time.perf_counter() - first)


def make(variant: str, threads: int):
    base = variant.removesuffix("-cold")
    if base == "hl":
        return HighLevel(threads)
    kw = {
        "ll": {},
        "ll-fa0": {"flash": 0},
        "ll-t1": {},
        "ll-nommap": {"mmap": False},
        "ll-ub256": {"ubatch": 256},
    }
    return LlamaLoop(default_model_path(), 1 if base == "ll-t1" else threads, **kw[base])


def measure(variant: str, threads: int, prompt: bytes) -> tuple[float, float, int]:
    eng = make(variant, threads)
    ids = eng.tokenize(prompt)
    if not variant.endswith("-cold"):
        eng.prefill(ids[:32])  # warm-up: thread pool, page faults, first-use allocations
    prefill = len(ids) / min(eng.prefill(ids) for _ in range(1 if variant.endswith("-cold") else 2))
    decode = eng.generate(eng.tokenize(QUESTION), 128)
    eng.close()
    return prefill, decode, len(ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--variants", default="hl-cold,hl,ll,ll-fa0,ll-t1,ll-nommap,ll-ub256")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = ap.parse_args()
    from lightllm_async.tokenizer import load_tokenizer

    tok = load_tokenizer(default_model_path())
    prompt = tok.decode(tok.encode(TEXT * 64)[:1000]).encode()
    env = {
        k: os.environ[k] for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_PROC_BIND") if k in os.environ
    }
    print(f"threads {args.threads}, env {env or '-'}")
    print(f"{'round':<6}{'variant':<11}{'load':>6}{'prompt':>8}{'prefill tok/s':>15}{'decode tok/s':>14}")
    for r in range(1, args.rounds + 1):
        for v in args.variants.split(","):
            load = os.getloadavg()[0]
            prefill, decode, n = measure(v, args.threads, prompt)
            print(f"{r:<6}{v:<11}{load:>6.2f}{n:>8}{prefill:>15.0f}{decode:>14.1f}", flush=True)


if __name__ == "__main__":
    main()
