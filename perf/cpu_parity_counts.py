"""Greedy parity of the packed CPU path against the float32 dequantized reference on the five
parity prompts (tests/engine_harness.smollm2_prompts): how many of the first 32 new tokens equal
the reference's, and at the first difference the reference's top-two log-probability gap there
(teacher-forced on its own continuation) and the token each side chose.

    OMP_NUM_THREADS=1 PYTHONPATH=src:tests python perf/cpu_parity_counts.py
"""

from __future__ import annotations

from engine_harness import generate, generate_with_logprobs, model_runner, smollm2_prompts
from lightllm_async.config import EngineConfig
from lightllm_async.models.loader import default_model_path
from lightllm_async.runner.model_runner import ModelRunner
from lightllm_async.types import SamplingParams

NEW = 32


def main() -> None:
    path = default_model_path()
    packed = ModelRunner(EngineConfig(model_path=path, device="cpu", max_model_len=512, kv_cache_tokens=4096))
    ref = model_runner(path, max_model_len=512, kv_cache_tokens=4096)
    prompts = smollm2_prompts()
    expected, got = generate(ref, prompts, NEW), generate(packed, prompts, NEW)
    params = SamplingParams(max_new_tokens=1, temperature=0.0, prompt_logprobs=True, top_logprobs=2)
    seqs = [p + e for p, e in zip(prompts, expected, strict=True)]
    tops = generate_with_logprobs(ref, 512, [(s, params) for s in seqs])
    counts = []
    for i, (p, e, g, t) in enumerate(zip(prompts, expected, got, tops, strict=True)):
        n = next((j for j in range(NEW) if e[j] != g[j]), NEW)
        counts.append(n)
        if n == NEW:
            print(f"prompt {i}: all {NEW} equal")
            continue
        _, first, _, top_ids, top_lp = t
        row = len(p) + n - first  # the logprob row that predicts new token n
        gap = top_lp[row][0] - top_lp[row][1]
        print(
            f"prompt {i}: equal for {n}; reference top two there {[int(t) for t in top_ids[row]]}, "
            f"log-prob gap {gap:.3f}; packed chose {g[n]}, reference {e[n]}"
        )
    print("counts:", ", ".join(map(str, counts)))


if __name__ == "__main__":
    main()
