"""The table of perf/r1_shape_check.sh: the DeepSeek-V3/R1 per-layer shape at TP=2, two layer
counts, and the 61-layer figures they imply. The extrapolation assumes a step's time is a fixed
part (embedding, head, sampling, host) plus one share per MoE layer measured as the difference of
the two runs; it is arithmetic on measured numbers, not a run of the full model."""

from __future__ import annotations

import argparse
import os

from multi_gpu_table import load as summary  # the serve_bench JSON's summary, or None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out-dir", required=True)
    p.add_argument("--moe", default="2 6", help="the MoE layer counts run (3 dense layers each)")
    args = p.parse_args()
    ks = [int(k) for k in args.moe.split()]
    rows = {}
    print(f"{'layers':<8}{'MoE':>4}{'b1 TPOT ms':>11}{'ref TPOT p50':>13}{'TPOT p99':>9}{'TTFT p50':>9}"
          f"{'TTFT p99':>9}{'QPS':>7}{'out tok/s':>10}")  # fmt: skip
    for k in ks:
        n = 3 + k
        b1, ref = (
            summary(os.path.join(args.out_dir, f"r1_b1_{n}.json")),
            summary(os.path.join(args.out_dir, f"r1_ref_{n}.json")),
        )
        if not b1 or not ref:
            print(f"{n:<8}{k:>4}  (missing)")
            continue
        rows[k] = (b1["tpot_ms"]["p50"], ref["tpot_ms"]["p50"])
        print(
            f"{n:<8}{k:>4}{b1['tpot_ms']['p50']:>11.2f}{ref['tpot_ms']['p50']:>13.2f}{ref['tpot_ms']['p99']:>9.1f}"
            f"{ref['ttft_ms']['p50']:>9.0f}{ref['ttft_ms']['p99']:>9.0f}{ref['qps']:>7.2f}"
            f"{ref['output_tokens_per_s']:>10.0f}"
        )
    if len(rows) >= 2:
        (k0, (a0, r0)), (k1, (a1, r1)) = sorted(rows.items())[0], sorted(rows.items())[-1]
        per_b1, per_ref = (a1 - a0) / (k1 - k0), (r1 - r0) / (k1 - k0)
        full_b1, full_ref = a0 + (58 - k0) * per_b1, r0 + (58 - k0) * per_ref
        print(
            f"\none MoE layer at TP=2: {per_b1:.3f} ms at batch 1, {per_ref:.3f} ms per step under the "
            f"reference workload (the difference of the two runs over {k1 - k0} layers)"
        )
        print(
            f"EXTRAPOLATED, not run: 61 layers (3 dense + 58 MoE) at TP=2 would step in {full_b1:.1f} ms at "
            f"batch 1 and {full_ref:.1f} ms under the reference load (and would need ~1.3 TB: it fits no "
            "2-GPU host); at TP=8 each GPU reads a quarter of each layer's weights, so a memory-bound "
            f"decode step would approach {full_b1 / 4:.1f}-{full_b1 / 2:.1f} ms at batch 1 (a quarter of "
            "the bytes; all-reduce latency and fixed costs do not shrink)"
        )


if __name__ == "__main__":
    main()
