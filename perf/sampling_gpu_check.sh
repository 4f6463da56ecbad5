#!/usr/bin/env bash
# One device call (see ../shared/DEVICE.md; carry .whl): the sampling features of issue 11 on CUDA —
# the runner's GPU tests (graphs on and off with penalties, biases and log-probabilities) and the
# sampler's CPU-side suites run on the GPU box's Python, then the CPU sampler tests for good measure.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
rm -rf /tmp/site /tmp/lla
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-build-isolation --no-deps --target /tmp/lla . >"$OUT/build.log" 2>&1 || {
  tail -30 "$OUT/build.log"; exit 1; }
export PYTHONPATH=/tmp/lla:/tmp/site NCCL_NVLS_ENABLE=0 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_runner_gpu.py tests/test_sampler_processing.py \
  tests/test_logprobs.py tests/test_sampling_engine.py >"$OUT/pytest_sampling.log" 2>&1
echo "pytest exit $?"; tail -25 "$OUT/pytest_sampling.log"
