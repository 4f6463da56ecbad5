"""DeepSeek on the GPU without the engine process (no IPC wheels needed): tiny random V2/V3 models
through the Triton kernels, greedy, batched prompts, decode replayed from CUDA graphs, against HF
transformers on the same card, and graphs on against graphs off.

    PYTHONPATH=src python perf/deepseek_gpu_check.py
"""

from __future__ import annotations

import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM

from lightllm_async.batch import Batch, ScheduledReq
from lightllm_async.config import EngineConfig
from lightllm_async.runner.model_runner import ModelRunner
from lightllm_async.tools.make_random_model import shape_config, write_model
from lightllm_async.types import SamplingParams

MAX_LEN = 256


def greedy(runner: ModelRunner, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Prefill all prompts in one step, then n - 1 decode-only steps (the CUDA-graph path)."""
    params = SamplingParams(max_new_tokens=n, temperature=0.0)
    outs: list[list[int]] = [[] for _ in prompts]
    for step in range(n):
        items = []
        for r, p in enumerate(prompts):
            if step == 0:
                start, toks = 0, tuple(p)
            else:
                start, toks = len(p) + step - 1, (outs[r][-1],)
            slots = tuple(r * MAX_LEN + start + i for i in range(len(toks)))
            items.append(ScheduledReq(r, 0, 0, r, start, toks, slots, True, params, step))
            runner.req_to_token[r, start : start + len(toks)] = torch.tensor(slots, dtype=torch.int32)
        sampled = runner.execute(Batch(items=tuple(items), step=step))
        for r, t in enumerate(sampled.token_ids):
            outs[r].append(t)
    return outs


def main() -> int:
    ok = True
    for shape in ("deepseek-v2-tiny", "deepseek-v3-tiny"):
        for dtype in ("float32", "bfloat16"):
            cfg = shape_config(shape, dtype)
            path = write_model(cfg, tempfile.mkdtemp(), seed=6, device="cuda")
            base = EngineConfig(
                model_path=path,
                device="cuda",
                dtype=dtype,
                max_model_len=MAX_LEN,
                kv_cache_tokens=4 * MAX_LEN,
                max_running_requests=4,
            )
            g = torch.Generator().manual_seed(2)
            prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist() for n in (1, 13, 90, 40)]
            graphs = ModelRunner(base)
            assert graphs.graphs is not None
            with_graphs = greedy(graphs, prompts, 24)
            eager = greedy(ModelRunner(base.replace(disable_cuda_graph=True)), prompts, 24)
            same = with_graphs == eager
            print(f"{shape} {dtype}: graphs on == off: {same}")
            ok &= same
            if dtype == "float32":
                hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
                for p, out in zip(prompts, with_graphs, strict=True):
                    ids = torch.tensor([p], device="cuda")
                    ref = hf.generate(
                        ids,
                        attention_mask=torch.ones_like(ids),
                        max_new_tokens=24,
                        do_sample=False,
                        eos_token_id=None,
                        pad_token_id=0,
                    )[0, len(p) :].tolist()
                    print(f"  prompt {len(p):3d}: equals HF: {out == ref}")
                    ok &= out == ref
    print("ALL OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
