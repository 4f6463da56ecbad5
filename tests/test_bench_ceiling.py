"""The MLA measuring tools' own parts. perf/kernel_bench.py's streaming read, the bandwidth ceiling
that perf/mla_moe_bench.py --mla-ceiling times beside a kernel, must read every word of its buffer
exactly once, whatever the grid, or the ceiling it gives is not the ceiling of those bytes; and
perf/mla_timeline.py's source transform must still find what it probes in the kernels."""

import importlib.util
import os
import sys

import pytest

PERF = os.path.join(os.path.dirname(__file__), "..", "perf")


@pytest.mark.parametrize(
    "nbytes, programs", [(4 * 2048 * 3, 3), (4 * 5000 + 8, 2), (4 * 777, 7), (4 * 2048, 16)]
)
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


def test_the_timeline_probe_still_finds_what_it_probes(interpreter):
    """perf/mla_timeline.py rewrites the MLA split and merge kernels' source: a clock read after
    each one's PDL wait, a record before each return and at the end, a TIMES parameter. A kernel
    edit that moves what it looks for must fail here, not on the card."""
    import inspect

    import lightllm_async.kernels  # noqa: F401  (Triton in interpreter mode first)

    sys.path.insert(0, PERF)
    spec = importlib.util.spec_from_file_location("mla_timeline", os.path.join(PERF, "mla_timeline.py"))
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    module = probe.probed_module()
    kernels = importlib.import_module(probe.MODULE)
    for name in probe.PROBED:
        original = inspect.getsource(getattr(kernels, name).fn)
        probed = inspect.getsource(getattr(module, name).fn)
        returns = sum(line.strip() == "return" for line in original.splitlines())
        assert probed.count("_probe_record(TIMES, _t0, _t1, ") == returns + 1, name
        assert probed.count("_t1 = globaltimer()") == 1 and "    TIMES,\n):" in probed, name
        if name == "_mla_decode_split_kernel":  # its tile loop's first tile and end are timed
            assert "        _tf = tl.where(n == start, globaltimer(), _tf)" in probed
            assert probed.count("_tl = globaltimer()") == 1 and "_t1, _tf, _tl)" in probed
        # everything else is the kernel as it is, from its `def` on
        lines = original.splitlines()
        lines = lines[next(i for i, line in enumerate(lines) if line.startswith("def ")) :]
        extra = ("_probe_record", "globaltimer", "_tf = _t1")
        kept = [x for x in probed.splitlines()[1:] if not any(e in x for e in extra)]
        kept = [x for x in kept if x.strip() != "TIMES,"]
        assert kept == lines, name
