"""Offline throughput of HF transformers `generate` on one batch: the baseline for serve_bench.py.

One process, one static batch: `--batch` random prompts of `--input-len` tokens each (same length,
so no padding), greedy, exactly `--output-len` new tokens per sequence (min = max new tokens, so
EOS never ends one early). Reports output tokens/s (batch * output_len / generate time), prefill
time (a separate generate of one new token) and time per decode step ((total - prefill) /
(output_len - 1)). The median of `--repeats` timed runs, after one short warm-up generate.

    # the 8B shape with random weights built on the GPU (only config.json is read):
    python perf/hf_baseline.py --model /data/l3 --random-weights --batch 100 --input-len 1024 \
        --output-len 128 --out hf_baseline.json
    # CPU smoke test:
    python -m lightllm_async.tools.make_random_model --shape tiny --out /tmp/tiny --dtype float32
    python perf/hf_baseline.py --model /tmp/tiny --device cpu --dtype float32 --batch 2 \
        --input-len 16 --output-len 8

Needs only torch, transformers and the standard library.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedModel

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def load_model(args: argparse.Namespace) -> PreTrainedModel:
    """The model on `args.device`; with --random-weights built there from config.json alone."""
    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    attn = {"attn_implementation": args.attn_implementation} if args.attn_implementation else {}
    if args.random_weights:
        cfg = AutoConfig.from_pretrained(args.model, **attn)
        torch.manual_seed(args.seed)
        with device:  # allocate and initialise on the target device: no 16 GB host round trip
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, **attn).to(device)
    return model.eval()


def make_prompts(args: argparse.Namespace, vocab_size: int) -> torch.Tensor:
    """[batch, input_len] random ids from [id_low, id_high), shrunk to fit a small vocabulary."""
    high = min(args.id_high, vocab_size)
    low = min(args.id_low, high // 2)
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(low, high, (args.batch, args.input_len), generator=gen)
    return ids.to(args.device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.inference_mode()
def timed_generate(
    model: PreTrainedModel, ids: torch.Tensor, new_tokens: int, args: argparse.Namespace
) -> float:
    """Seconds for one greedy generate of exactly `new_tokens` tokens per sequence."""
    gen_cfg = GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=model.generation_config.eos_token_id,
        pad_token_id=model.generation_config.pad_token_id or 0,
        cache_implementation=args.cache_implementation,
    )
    mask = torch.ones_like(ids)
    sync(args.device)
    start = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)
    sync(args.device)
    elapsed = time.perf_counter() - start
    if out.shape != (ids.shape[0], ids.shape[1] + new_tokens):
        raise RuntimeError(f"generate returned {tuple(out.shape)}, expected {new_tokens} new tokens")
    return elapsed


def measure(model: PreTrainedModel, ids: torch.Tensor, args: argparse.Namespace) -> dict:
    timed_generate(model, ids, min(4, args.output_len), args)  # warm-up: kernels, allocator, caches
    prefill = statistics.median(timed_generate(model, ids, 1, args) for _ in range(args.repeats))
    total = statistics.median(timed_generate(model, ids, args.output_len, args) for _ in range(args.repeats))
    steps = max(args.output_len - 1, 1)
    return {
        "generate_s": total,
        "prefill_s": prefill,
        "decode_step_ms": (total - prefill) / steps * 1e3,
        "output_tokens_per_s": args.batch * args.output_len / total,
        "decode_tokens_per_s": args.batch * steps / max(total - prefill, 1e-9),
        "prefill_tokens_per_s": args.batch * args.input_len / prefill,
    }


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({torch.get_num_threads()} threads)"


def print_table(args: argparse.Namespace, r: dict) -> None:
    print(f"\nHF transformers generate: {args.model} ({r['params_b']:.2f} B params, {args.dtype})")
    print(f"  on {r['device']}, torch {r['versions']['torch']}, transformers {r['versions']['transformers']}")
    print(f"  batch {args.batch}, input {args.input_len}, output {args.output_len}, median of {args.repeats}")
    print(f"  generate          {r['generate_s']:10.3f} s")
    print(f"  output tokens/s   {r['output_tokens_per_s']:10.1f}")
    print(f"  prefill           {r['prefill_s'] * 1e3:10.1f} ms   ({r['prefill_tokens_per_s']:.0f} tokens/s)")
    print(f"  decode step       {r['decode_step_ms']:10.2f} ms   ({r['decode_tokens_per_s']:.0f} tokens/s)")
    if r["peak_memory_gib"] is not None:
        print(f"  peak GPU memory   {r['peak_memory_gib']:10.1f} GiB")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="local HF folder (config.json, weights unless random)")
    p.add_argument("--random-weights", action="store_true", help="random init from config.json")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each kind; the median counts")
    p.add_argument("--id-low", type=int, default=1000, help="prompt ids are drawn from [low, high)")
    p.add_argument("--id-high", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attn-implementation", default=None, help="sdpa, eager, ... (default: HF's)")
    p.add_argument("--cache-implementation", default=None, help="e.g. static (default: dynamic)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=None, help="write config and results as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args)
    ids = make_prompts(args, model.config.vocab_size)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    result = measure(model, ids, args)
    result["device"] = device_name(args.device)
    result["params_b"] = sum(p.numel() for p in model.parameters()) / 1e9
    result["peak_memory_gib"] = (
        torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
    )
    result["versions"] = {"torch": torch.__version__, "transformers": sys.modules["transformers"].__version__}
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": vars(args), "results": result}, f, indent=1)
    print_table(args, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
