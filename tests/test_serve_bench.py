"""perf/serve_bench.py's steady-state accounting (`steady_window`) on made-up records, and the
prefix-cache simulation's protocols (perf/prefix_sim.py) on the real scheduler."""

import importlib.util
import os
import sys

import pytest

PERF = os.path.join(os.path.dirname(__file__), "..", "perf")


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(PERF, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return load("serve_bench")


def record(bench, index, start, ttft, e2e, tokens, prompt=100, error=None):
    """A request sent at `start` whose `tokens` tokens arrive one an event, evenly from ttft to e2e."""
    step = (e2e - ttft) / max(tokens - 1, 1)
    r = bench.Record(index, prompt, tokens, start=start, ttft=ttft, e2e=e2e, error=error)
    r.chunk_times = [ttft + i * step for i in range(tokens)]
    r.token_events = r.usage_tokens = tokens
    r.prompt_tokens = prompt
    return r


def test_steady_window_counts_only_what_arrived_between_the_counted_sends(bench):
    # warm-up 0-1 (the last ends at 11), counted 2-5 sent at 9, 12, 13, 15: the window is [11, 15]
    records = [
        record(bench, 0, 0.0, 1.0, 10.0, 10),  # ends at 10, before the window
        record(bench, 1, 1.0, 8.0, 10.0, 5),  # first token at 9 (outside), tokens 9, 9.5, .., 11: 1 inside
        record(bench, 2, 9.0, 1.0, 3.0, 3),  # sent before the window, not measured: 2 tokens inside
        record(bench, 3, 12.0, 1.0, 5.0, 5),  # 13..17: 13, 14, 15 inside; prompt inside
        record(bench, 4, 13.0, 1.0, 2.0, 2),  # 14, 15 inside, ends at 15
        record(bench, 5, 15.0, 5.0, 9.0, 2),  # first token at 20: nothing inside
        record(bench, 6, 12.5, 0.5, 0.9, 2),  # a tail request: 13.0, 13.4 inside, ends inside
    ]
    measured, window = bench.steady_window(records, warmup=2, counted=4)
    assert [r.index for r in measured] == [3, 4, 5]
    assert window["window_s"] == pytest.approx(4.0)
    assert window["output_tokens"] == pytest.approx(1 + 2 + 3 + 2 + 0 + 2)
    assert window["completed"] == 4  # ends at 11, 12, 15 and 13.4
    assert window["prompts"] == 3 and window["input_tokens"] == 3 * 100  # first tokens at 13, 14, 13
    s = bench.summarize(measured, 99.0, window)
    assert s["requests_ok"] == 3 and s["duration_s"] == pytest.approx(4.0)
    assert s["output_tokens_per_s"] == pytest.approx(10 / 4) and s["qps"] == pytest.approx(1.0)
    assert s["ttft_ms"]["p50"] == pytest.approx(1000.0)  # the measured requests' latencies


def test_steady_window_is_empty_while_the_warmup_drains(bench):
    # the warm-up's last request ends at 20, after every counted send: no steady window at all
    records = [record(bench, 0, 0.0, 1.0, 20.0, 5), record(bench, 1, 2.0, 1.0, 2.0, 2)]
    measured, window = bench.steady_window(records, warmup=1, counted=1)
    assert measured == [] and window["window_s"] == 0.0 and window["prompts"] == 0


def test_steady_window_ignores_failed_requests_and_survives_none_counted(bench):
    records = [record(bench, 0, 0.0, 1.0, 2.0, 2), record(bench, 1, 1.0, 1.0, 2.0, 2, error="HTTP 500")]
    measured, window = bench.steady_window(records, warmup=1, counted=1)
    assert [r.index for r in measured] == [1] and window["window_s"] == 0.0
    assert bench.summarize(measured, 5.0, window)["requests_failed"] == 1


def test_prefix_sim_protocols_run_the_real_scheduler():
    sim = load("prefix_sim")

    class Args:
        clients, requests, max_running, kv_tokens, warmup = 8, 16, 16, 100_000, 8
        shared, input_len, output_mean, output_std, output_min, output_max = 64, 16, 8, 0, 8, 8
        fp8_kv = False

    with_cache = sim.simulate(Args, 256, True)
    without = sim.simulate(Args, 256, False)
    barrier = sim.simulate(Args, 256, True, protocol="barrier")
    for r in (with_cache, without, barrier):
        assert r["qps"] > 0 and r["ttft_p50"] > 0 and r["tpot_p50"] > 0
    # the shared 64 tokens are computed once with the cache: its prompts' steps are shorter
    assert with_cache["ttft_p50"] < without["ttft_p50"]


def test_prefix_sim_host_floor_and_graph_buckets_lengthen_prefill_steps():
    """--host-ms: a step with prefill chunks lasts at least that long; --bucket: its rows are
    padded (computed) to a multiple. Either makes the first tokens later."""
    sim = load("prefix_sim")

    class Args:
        clients, requests, max_running, kv_tokens, warmup = 8, 16, 16, 100_000, 8
        shared, input_len, output_mean, output_std, output_min, output_max = 0, 16, 8, 0, 8, 8
        fp8_kv, host_ms, bucket = False, 0.0, 1

    plain = sim.simulate(Args, 256, True)
    Args.host_ms = 50.0
    floored = sim.simulate(Args, 256, True)
    assert floored["ttft_p50"] >= 50.0 > plain["ttft_p50"]
    Args.host_ms, Args.bucket = 0.0, 1 << 16  # a huge bucket: every prefill step computes 65536 rows
    padded = sim.simulate(Args, 256, True)
    assert padded["ttft_p50"] > 10 * plain["ttft_p50"]


def test_prefix_sim_reads_a_measured_gemm_table(tmp_path):
    """--gemm-table: perf/gemm_rows_bench.py's printed rows give the projections' time, linear
    between its rows, by its first row's cost a row below them (never under the weights' read),
    by its last row's above them."""
    sim = load("prefix_sim")
    table = tmp_path / "gemm_rows.log"
    table.write_text(
        "NVIDIA H200  bf16 matmul 8192^3: 762 TFLOP/s\n"
        "    M      qkv us        o us  gate_up us     down us   step ms  at the rate  ratio\n"
        "  256        22.3        17.7       103.3        55.1      6.40         4.69   1.35\n"
        "  512        41.3        27.9       186.0        92.9     11.20         9.38   1.19\n"
    )
    gemm = sim.read_gemm_table(str(table))
    assert gemm == [(256, 6.4e-3), (512, 11.2e-3)]
    assert sim.gemm_seconds(384, gemm) == pytest.approx(8.8e-3)
    assert sim.gemm_seconds(1024, gemm) == pytest.approx(22.4e-3)
    assert sim.gemm_seconds(200, gemm) == pytest.approx(5.0e-3)  # 25 us a row, as at 256
    assert sim.gemm_seconds(128, gemm) == sim.gemm_seconds(8, gemm) == sim.WEIGHTS_S  # 3.8 ms > 3.2
    assert sim.gemm_seconds(384, None) == max(sim.WEIGHTS_S, 384 * sim.TOKEN_S)
