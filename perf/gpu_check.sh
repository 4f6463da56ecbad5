#!/usr/bin/env bash
# One call on the lent GPU (see ../shared/DEVICE.md): install the carried wheels, build, then
#   correctness: GPU kernel tests, the CUDA server parity test (graphs on and off), decode benchmark
#   serve:       serving benchmark of a Llama-3-8B-shaped model against HF transformers generate
# Full logs and JSON go to $OUT; a short table is printed last.
#   kernels:     the DeepSeek kernels (MLA decode, fused MoE) against their references and ceilings
#   decode:      the decode benchmark alone
#   deepseek-tune: DeepSeek GPU tests, the MoE tile sweep (JSON for kernels/tuned/), MLA decode rows
#   deepseek:    DeepSeek-V2-Lite shape (random bf16 weights made on the device): decode step against
#                its roofline, the serving benchmark (100 clients, then 1 client), HF generate
#   device run (carry .whl):  bash perf/gpu_check.sh correctness|serve|decode
set -u
part=${1:-correctness}
source perf/device_setup.sh

case "$part" in
correctness)
  python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_attention.py tests/test_kernels_pointwise.py \
    tests/test_kernels_mla.py tests/test_kernels_moe.py tests/test_runner_gpu.py tests/test_model_parity.py \
    tests/test_gpu.py tests/test_data_parallel.py >"$OUT/pytest_gpu.log" 2>&1
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
  for chunk in ${CHUNKS:-1024 2048}; do
    python3 -m lightllm_async.server --model $d --load-format random --port 8000 --max-running-requests 128 \
      --max-num-batched-tokens $chunk >"$OUT/server_$chunk.log" 2>&1 &
    srv=$!
    python3 perf/serve_bench.py --url http://127.0.0.1:8000 --wait-ready 300 --clients 100 --num-requests 800 \
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
deepseek)
  timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_moe.py tests/test_deepseek.py \
    >"$OUT/pytest_gpu.log" 2>&1
  echo "pytest -m gpu exit $?"; grep -E "passed|failed|Error" "$OUT/pytest_gpu.log" | tail -5
  d=/tmp/dsv2l
  mkdir -p $d
  python3 -c "from lightllm_async.tools.make_random_model import shape_config as s, write_config_files as c, \
write_tokenizer as t; m = s('deepseek-v2-lite', 'bfloat16'); c(m, '$d'); t(m, '$d')"
  python3 perf/decode_bench.py --shape deepseek-v2-lite --batches 1,64 --context 1024 \
    --out "$OUT/ds_decode.json" >"$OUT/ds_decode.log" 2>&1
  echo "decode_bench exit $?"; tail -6 "$OUT/ds_decode.log"
  python3 -m lightllm_async.server --model $d --load-format random --port 8000 --max-running-requests 128 \
    --max-num-batched-tokens ${CHUNK:-8192} >"$OUT/ds_server.log" 2>&1 &
  srv=$!
  python3 perf/serve_bench.py --url http://127.0.0.1:8000 --wait-ready 400 --clients 100 --num-requests 800 \
    --input-len 1024 --warmup 100 --api native --tokenizer $d --out "$OUT/ds_serve.json" >"$OUT/ds_serve.log" 2>&1
  echo "serve_bench 100 clients exit $?"; tail -9 "$OUT/ds_serve.log"
  python3 perf/serve_bench.py --url http://127.0.0.1:8000 --clients 1 --num-requests 8 --input-len 1024 \
    --warmup 2 --api native --tokenizer $d --out "$OUT/ds_serve1.json" >"$OUT/ds_serve1.log" 2>&1
  echo "serve_bench 1 client exit $?"; tail -9 "$OUT/ds_serve1.log"
  kill -INT $srv; wait $srv
  grep -E "captured|KV cache" "$OUT/ds_server.log" | head -3
  python3 perf/hf_baseline.py --model $d --random-weights --batch 100 --input-len 1024 --output-len 128 \
    --repeats 1 --dtype bfloat16 --out "$OUT/ds_hf.json" >"$OUT/ds_hf.log" 2>&1
  echo "hf_baseline exit $?"
  tail -8 "$OUT/ds_hf.log"
  ;;
deepseek-tune)
  timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_attention.py tests/test_kernels_mla.py \
    tests/test_kernels_moe.py tests/test_kernels_moe_tuned.py tests/test_deepseek.py tests/test_runner_gpu.py \
    >"$OUT/pytest_gpu.log" 2>&1
  echo "pytest -m gpu exit $?"; grep -E "passed|failed|Error" "$OUT/pytest_gpu.log" | tail -8
  timeout 60 python3 perf/deepseek_gpu_check.py >"$OUT/ds_check.log" 2>&1
  echo "deepseek_gpu_check exit $?"; tail -2 "$OUT/ds_check.log"
  timeout 90 python3 perf/mla_moe_bench.py --only mla --no-ref >"$OUT/mla.log" 2>&1
  echo "mla exit $?"; grep -E "^mla|copy:" "$OUT/mla.log"
  for ms in 1,8,64 256,1024,8192; do
    timeout 200 python3 perf/mla_moe_bench.py --only moe --sweep --no-ref --moe-m $ms --out "$OUT/moe_tuned.json" \
      >>"$OUT/moe.log" 2>&1
    echo "moe sweep $ms exit $?"
  done
  grep -E "^fused_moe|best|^moe layer|select_experts" "$OUT/moe.log" | cut -c1-150
  ;;
decode)
  python3 perf/decode_bench.py --shape llama3-8b --batches 1,100 --max-running 512 \
    --out "$OUT/decode.json" >"$OUT/decode.log" 2>&1
  echo "decode_bench exit $?"; tail -7 "$OUT/decode.log"
  ;;
esac
