#!/usr/bin/env bash
# One call on the lent GPU (see ../shared/DEVICE.md): install the carried wheels, build, then
#   correctness: GPU kernel tests, the CUDA server parity test (graphs on and off), decode benchmark
#   serve:       serving benchmark of a Llama-3-8B-shaped model against HF transformers generate
# Full logs and JSON go to $OUT; a short table is printed last.
#   kernels:     the DeepSeek kernels (MLA decode, fused MoE) against their references and ceilings
#   decode:      the decode benchmark alone
#   device run (carry .whl):  bash perf/gpu_check.sh correctness|serve|decode
set -u
part=${1:-correctness}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
rm -rf /tmp/site /tmp/lla  # a warm machine keeps the last call's install: never run stale code
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-build-isolation --no-deps --target /tmp/lla . >"$OUT/build.log" 2>&1 || {
  tail -30 "$OUT/build.log"; exit 1; }
export PYTHONPATH=/tmp/lla:/tmp/site NCCL_NVLS_ENABLE=0 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

case "$part" in
correctness)
  python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_attention.py tests/test_kernels_pointwise.py \
    tests/test_kernels_mla.py tests/test_kernels_moe.py tests/test_runner_gpu.py tests/test_model_parity.py \
    tests/test_gpu.py >"$OUT/pytest_gpu.log" 2>&1
  echo "pytest -m gpu exit $?"; tail -5 "$OUT/pytest_gpu.log"
  python3 perf/decode_bench.py --shape llama3-8b --batches 1,100 --max-running 512 --no-graph-baseline \
    --out "$OUT/decode.json" >"$OUT/decode.log" 2>&1
  echo "decode_bench exit $?"; tail -11 "$OUT/decode.log"
  ;;
serve)
  d=/tmp/l3
  mkdir -p $d
  python3 -c "from lightllm_async.tools.make_random_model import shape_config as s, write_config_files as c, \
write_tokenizer as t; m = s('llama3-8b', 'bfloat16'); c(m, '$d'); t(m, '$d')"
  for chunk in ${CHUNKS:-2048 8192}; do
    python3 -m lightllm_async.server --model $d --load-format random --port 8000 --max-running-requests 128 \
      --max-num-batched-tokens $chunk >"$OUT/server_$chunk.log" 2>&1 &
    srv=$!
    python3 perf/serve_bench.py --url http://127.0.0.1:8000 --wait-ready 300 --clients 100 --num-requests 500 \
      --input-len 1024 --warmup 100 --api native --tokenizer $d --out "$OUT/serve_$chunk.json" >"$OUT/serve_$chunk.log" 2>&1
    echo "serve_bench (--max-num-batched-tokens $chunk) exit $?"
    kill -INT $srv; wait $srv
    grep -E "captured|KV cache" "$OUT/server_$chunk.log" | head -3
    tail -9 "$OUT/serve_$chunk.log"
  done
  python3 perf/hf_baseline.py --model $d --random-weights --batch 100 --input-len 1024 --output-len 128 \
    --dtype bfloat16 --out "$OUT/hf_baseline.json" >"$OUT/hf.log" 2>&1
  echo "hf_baseline exit $?"
  tail -8 "$OUT/hf.log"
  ;;
kernels)
  python3 perf/mla_moe_bench.py >"$OUT/mla_moe.log" 2>&1
  echo "mla_moe_bench exit $?"; tail -30 "$OUT/mla_moe.log"
  ;;
decode)
  python3 perf/decode_bench.py --shape llama3-8b --batches 1,100 --max-running 512 \
    --out "$OUT/decode.json" >"$OUT/decode.log" 2>&1
  echo "decode_bench exit $?"; tail -7 "$OUT/decode.log"
  ;;
esac
