#!/usr/bin/env bash
# One device call (see ../shared/DEVICE.md; carry .whl): the sampling features of issue 11 on CUDA —
# the runner's GPU tests (graphs on and off with penalties, biases and log-probabilities) and the
# sampler's CPU-side suites run on the GPU box's Python, then the CPU sampler tests for good measure.
set -u
source perf/device_setup.sh
python3 -m pytest -q -p no:cacheprovider tests/test_runner_gpu.py tests/test_sampler_processing.py \
  tests/test_logprobs.py tests/test_sampling_engine.py >"$OUT/pytest_sampling.log" 2>&1
echo "pytest exit $?"; tail -25 "$OUT/pytest_sampling.log"
