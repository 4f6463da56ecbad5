"""The table of perf/multi_gpu_check.sh: TP=1, TP=2 and DP=2 side by side with their rooflines.

`--bandwidth`: measure the card's copy bandwidth (bytes read + written per second of a large
device-to-device copy) and write it with the model's weight bytes to --out.
Otherwise: read the serve_bench JSONs in --out-dir and print the table. The decode step is the
server's TPOT p50 (whole process tree: HTTP, shared memory, scheduler, forward, sampling); its
roofline is the bytes one GPU must read per step (its share of the weights, its share of the KV
of the batch's contexts) over the measured bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os

from lightllm_async.models.loader import load_model_config


def weight_bytes(cfg) -> int:
    h, i, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    attn = h * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim + cfg.num_heads * cfg.head_dim * h
    per_layer = attn + 3 * h * i + 2 * h
    embed = cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2)
    return 2 * (layers * per_layer + embed + h)  # bf16


def kv_bytes_per_token(cfg) -> int:
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2


def measure_bandwidth() -> float:
    import torch

    x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    return 2 * x.numel() * 10 / (start.elapsed_time(end) / 1e3)


def measure_peer_bandwidth() -> float:
    """GPU 0 -> GPU 1 copy rate (bytes per second; NVLink where the host has it): what a KV
    transfer of --pd could reach at most."""
    import torch

    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda:0")
    y = torch.empty_like(x, device="cuda:1")
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize("cuda:0")
    torch.cuda.synchronize("cuda:1")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize("cuda:0")
    torch.cuda.synchronize("cuda:1")
    return x.numel() * 10 / (start.elapsed_time(end) / 1e3)


def load(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)["summary"]
    except (OSError, KeyError, ValueError):
        return None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bandwidth", action="store_true")
    p.add_argument("--model", required=True)
    p.add_argument("--out", default=None)
    p.add_argument("--out-dir", default=".")
    args = p.parse_args()
    cfg = load_model_config(args.model)
    if args.bandwidth:
        import torch

        bw = measure_bandwidth()
        peer = measure_peer_bandwidth() if torch.cuda.device_count() > 1 else 0.0
        with open(args.out, "w") as f:
            json.dump(
                {"copy_bytes_per_s": bw, "peer_bytes_per_s": peer, "weight_bytes": weight_bytes(cfg)}, f
            )
        print(
            f"copy bandwidth {bw / 1e9:.0f} GB/s, GPU0->GPU1 {peer / 1e9:.0f} GB/s, "
            f"weights {weight_bytes(cfg) / 1e9:.2f} GB"
        )
        return
    with open(os.path.join(args.out_dir, "bandwidth.json")) as f:
        measured = json.load(f)
    bw, peer = measured["copy_bytes_per_s"], measured.get("peer_bytes_per_s", 0.0)
    w, kv = weight_bytes(cfg), kv_bytes_per_token(cfg)
    print(
        f"\ncopy bandwidth {bw / 1e9:.0f} GB/s per GPU; weights {w / 1e9:.2f} GB; "
        "roof = bytes per GPU / bandwidth"
    )
    print(
        f"{'mode':<8}{'b1 TPOT ms':>12}{'roof ms':>9}{'x roof':>8}{'b100 TPOT':>11}{'roof ms':>9}"
        f"{'x roof':>8}{'b100 tok/s':>12}{'ref out tok/s':>14}{'ref QPS':>9}{'TTFT p50':>10}{'TPOT p99':>10}"
    )
    base = {}
    rows = (("tp1", "tp1", 1, 1, "ref"), ("tp2", "tp2", 2, 2, "ref"), ("tp2symm", "tp2symm", 2, 2, "ref"),
            ("tp2nccl", "tp2nccl", 2, 2, "ref"),
            ("dp2", "dp2", 1, 2, "ref"), ("dp2@200", "dp2", 1, 2, "ref200"), ("pd", "pd", 1, 1, "ref"),
            ("tp1@200", "tp1", 1, 1, "ref200"))  # fmt: skip
    for mode, files, shards, gpus, ref_name in rows:
        b1, b100 = (load(os.path.join(args.out_dir, f"{k}_{files}.json")) for k in ("b1", "b100"))
        ref = load(os.path.join(args.out_dir, f"{ref_name}_{files}.json"))
        if mode.endswith("@200"):
            b1 = b100 = None
        if b1 is None and b100 is None and ref is None:
            continue
        roof1 = w / shards / bw * 1e3
        # batch ~100 per engine (DP: 50 per GPU), contexts 128..384 tokens: mean 256
        per_engine = 100 / (gpus // shards)
        roof100 = (w / shards + per_engine * 256 * kv / shards) / bw * 1e3

        def cell(s, key, sub="p50", fmt="{:.2f}"):
            return fmt.format(s[key][sub]) if s and s.get(key) else "-"

        t1 = b1["tpot_ms"]["p50"] if b1 else None
        t100 = b100["tpot_ms"]["p50"] if b100 else None
        print(
            f"{mode:<8}{cell(b1, 'tpot_ms'):>12}{roof1:>9.2f}{(t1 / roof1 if t1 else 0):>8.2f}"
            f"{cell(b100, 'tpot_ms'):>11}{roof100:>9.2f}{(t100 / roof100 if t100 else 0):>8.2f}"
            f"{(b100['output_tokens_per_s'] if b100 else 0):>12.0f}"
            f"{(ref['output_tokens_per_s'] if ref else 0):>14.0f}{(ref['qps'] if ref else 0):>9.2f}"
            f"{cell(ref, 'ttft_ms', fmt='{:.0f}'):>10}{cell(ref, 'tpot_ms', 'p99', '{:.1f}'):>10}"
        )
        base[mode] = (t1, ref["output_tokens_per_s"] if ref else None)
    if "tp1" in base and "tp2" in base and base["tp1"][0] and base["tp2"][0]:
        print(f"TP=2 batch-1 step / TP=1: {base['tp2'][0] / base['tp1'][0]:.2f} (goal <= 0.65)")
    for other, what in (("tp2symm", "torch's one-shot all-reduce, then rms_norm"), ("tp2nccl", "NCCL only")):
        if other in base and "tp1" in base and base[other][0] and base["tp1"][0]:
            print(f"  (all-reduces through {what}: {base[other][0] / base['tp1'][0]:.2f})")
    for mode, what, one in (
        ("dp2", "100 clients", "tp1"),
        ("dp2@200", "200 clients, the same load per GPU", "tp1"),
        ("dp2@200", "200 clients on both", "tp1@200"),
    ):
        if one in base and mode in base and base[one][1] and base[mode][1]:
            print(
                f"DP=2 ({what}) reference-workload output throughput / one GPU ({one}): "
                f"{base[mode][1] / base[one][1]:.2f}x (goal >= 1.9)"
            )
    pd, dp = (load(os.path.join(args.out_dir, f"ref_{m}.json")) for m in ("pd", "dp2"))
    if pd and dp:
        print("\nreference workload (100 clients, 1024 in, N(128,128) out) on 2 GPUs:")
        print(
            f"{'':<22}{'TTFT p50':>9}{'TTFT p99':>9}{'TPOT p50':>9}{'TPOT p99':>9}{'out tok/s':>10}{'QPS':>6}"
        )
        for name, s in (("PD prefill=1,decode=1", pd), ("--dp 2", dp)):
            print(
                f"{name:<22}{s['ttft_ms']['p50']:>9.0f}{s['ttft_ms']['p99']:>9.0f}{s['tpot_ms']['p50']:>9.1f}"
                f"{s['tpot_ms']['p99']:>9.1f}{s['output_tokens_per_s']:>10.0f}{s['qps']:>6.2f}"
            )
        if peer:
            print(f"GPU0->GPU1 copy rate measured: {peer / 1e9:.0f} GB/s (KV transfer rates: the server log)")


if __name__ == "__main__":
    main()
