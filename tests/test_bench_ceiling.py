"""perf/kernel_bench.py's streaming read, the bandwidth ceiling that perf/mla_moe_bench.py
--mla-ceiling times beside a kernel: it must read every word of its buffer exactly once, whatever
the grid, or the ceiling it gives is not the ceiling of those bytes."""

import importlib.util
import os
import sys

import pytest

PERF = os.path.join(os.path.dirname(__file__), "..", "perf")


@pytest.mark.parametrize("nbytes, programs", [(4 * 2048 * 3, 3), (4 * 5000 + 8, 2), (4 * 777, 7), (4 * 2048, 16)])
def test_the_ceiling_read_reads_every_word_once(interpreter, nbytes, programs):
    import torch

    import lightllm_async.kernels  # noqa: F401  (Triton in interpreter mode before the bench imports it)

    spec = importlib.util.spec_from_file_location("kernel_bench", os.path.join(PERF, "kernel_bench.py"))
    bench = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("kernel_bench", bench)
    spec.loader.exec_module(bench)
    gen = torch.Generator().manual_seed(nbytes)
    x = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)
    out = torch.zeros(programs + 1, dtype=torch.int32)
    bench.read_launch(x, out, programs, block=256)
    words = x.view(torch.int32).long()
    total = int(out.long().sum()) % 2**32  # each program's int32 sum wraps; so does this one
    assert total == int(words.sum()) % 2**32
    assert int(out[programs:].abs().sum()) == 0  # no program past the grid it chose
