"""A model of the MLA decode launch's balance: chunks of a step's contexts list-scheduled onto the
card's program slots, the way the GPU hands out a grid's programs in order as slots free up.

    python perf/mla_split_sim.py [--spreads 0,0.25,0.5,0.9] [--seed 0]

Each program costs a fixed part plus a time per 64-token tile; a slot takes the next program of
the grid when its last one ends. Printed per batch x context x spread (contexts drawn from
ctx * (1 -+ spread)), in microseconds: the ideal (every slot busy to the end), the plain cut
(every context into S chunks, S = slots // batch, requests in batch order), the plain cut doubled
(2S), and the doubled cut with the requests longest first (what the runner's order gives the
kernel where the lengths spread). A chunk merge's cost is added where a context has more than one
chunk. The constants are the H200's (16 heads, two programs an SM: 2.47 us a tile an SM, fitted to
the chained figures of 2026-11-30); this chose the launch of 2026-12-01, then the card measured it
(perf/RESULTS.md).
"""

from __future__ import annotations

import argparse
import heapq
import random

SLOTS = 264  # 132 SMs x 2 programs
TILE_US = 4.94  # a 64-token tile, per program, two programs sharing an SM
PROGRAM_US = 2.0  # a program's start, queries and partial store


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def chunks(lens: list[int], splits: int, block: int = 64) -> list[int]:
    """Each context cut into at most `splits` chunks of whole blocks, in grid order."""
    out = []
    for n in lens:
        size = max(block, cdiv(cdiv(n, splits), block) * block)
        out.extend(min(size, n - s * size) for s in range(min(cdiv(n, size), splits)))
    return out


def makespan(pieces: list[int]) -> float:
    slots = [0.0] * SLOTS
    end = 0.0
    for n in pieces:
        t = heapq.heappop(slots) + PROGRAM_US + TILE_US * cdiv(n, 64)
        end = max(end, t)
        heapq.heappush(slots, t)
    return end


def with_merge(pieces: list[int], batch: int) -> float:
    return makespan(pieces) + (1.5 + 0.009 * len(pieces) if len(pieces) > batch else 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spreads", default="0,0.25,0.5,0.9")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    print(f"{'batch x ctx':>12} {'spread':>6} {'ideal':>7} {'plain':>7} {'2x':>7} {'2x, longest first':>18}")
    for batch in (64, 128):
        for ctx in (1024, 4096, 8192):
            for spread in (float(s) for s in args.spreads.split(",")):
                lens = [max(1, int(ctx * (1 + spread * (2 * rng.random() - 1)))) for _ in range(batch)]
                s = max(1, min(64, SLOTS // batch))
                ideal = sum(cdiv(n, 64) for n in lens) * TILE_US / SLOTS
                plain = with_merge(chunks(lens, s), batch)
                doubled = with_merge(chunks(lens, 2 * s), batch)
                ordered = with_merge(chunks(sorted(lens, reverse=True), 2 * s), batch)
                times = f"{ideal:7.1f} {plain:7.1f} {doubled:7.1f} {ordered:18.1f}"
                print(f"{batch:>5} x {ctx:<5} {spread:>6} {times}")


if __name__ == "__main__":
    main()
