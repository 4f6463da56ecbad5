#!/usr/bin/env bash
# One device call on nvidia-h200-x2 (carry .whl): issue 13 on two GPUs of one host.
#   1. correctness: TP=2 against TP=1 through the server (tests/test_tp_gpu.py: fp32 greedy equal
#      with CUDA graphs; bf16 agreement reported)
#   2. Llama-3-8B shape, random bf16 weights, the whole server: TP=1, TP=2 (a decode step's
#      all-reduces in the fused push kernel, the default; tp2symm: torch's one-shot all-reduce over
#      symmetric memory; tp2nccl: all over NCCL) and DP=2, each with
#      one client (decode step at batch 1 = TPOT), 100 clients of 128 in / 256 out (batch ~100),
#      and the reference workload (100 clients, 1024 in, N(128,128) out) for throughput; DP=2 also
#      with 200 clients (the same load per GPU as one GPU's 100).
# A short table is printed last (perf/multi_gpu_table.py). Full logs and JSON go to $OUT.
# LLA_STEP_TIMING=1 adds the device's busy/idle per step to the engines' progress lines shown.
set -u
source perf/device_setup.sh

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  if [ "${MODEL_CHECK:-1}" = 1 ]; then
    timeout 150 python3 perf/tp_gpu_check.py >"$OUT/tp_gpu_check.log" 2>&1
    echo "tp_gpu_check exit $?"; tail -14 "$OUT/tp_gpu_check.log"
  fi
  timeout 360 python3 -m pytest -q -s -m gpu -p no:cacheprovider ${GPU_TESTS:-tests/test_tp_gpu.py tests/test_data_parallel.py} \
    >"$OUT/pytest_tp.log" 2>&1
  echo "pytest tp/dp gpu exit $?"; grep -E "passed|failed|Error|agree|Traceback|CUDA|NCCL" "$OUT/pytest_tp.log" | tail -${TEST_LINES:-8}
fi
[ "${ONLY_TESTS:-0}" = 1 ] && exit 0

d=/tmp/l3
mkdir -p $d
python3 -c "from lightllm_async.tools.make_random_model import shape_config as s, write_config_files as c, \
write_tokenizer as t; m = s('llama3-8b', 'bfloat16'); c(m, '$d'); t(m, '$d')"
python3 perf/multi_gpu_table.py --bandwidth --model $d --out "$OUT/bandwidth.json"

for mode in ${MODES:-tp1 tp2 tp2nccl dp2}; do
  allreduce=fused  # the default: a decode step's all-reduces (+ RMSNorm) in the push kernel
  case $mode in
    tp1) flags="" ;;
    tp2) flags="--tp 2" ;;
    tp2symm) flags="--tp 2"; allreduce=symm ;;  # torch's one-shot all-reduce, then rms_norm
    tp2nccl) flags="--tp 2"; allreduce=nccl ;;
    dp2) flags="--dp 2" ;;
    pd) flags="--pd prefill=1,decode=1" ;;
  esac
  LLA_TP_ALLREDUCE=$allreduce python3 -m lightllm_async.server --model $d --load-format random --port 8000 --max-running-requests 128 \
    --max-num-batched-tokens ${CHUNK:-1024} $flags >"$OUT/server_$mode.log" 2>&1 &
  srv=$!
  python3 perf/serve_bench.py --url http://127.0.0.1:8000 --wait-ready 400 --clients 1 --num-requests ${B1_N:-4} \
    --input-len 128 --output-mean 256 --output-std 0 --output-min 256 --output-max 256 --warmup 1 --api native \
    --tokenizer $d --out "$OUT/b1_$mode.json" >"$OUT/b1_$mode.log" 2>&1
  echo "$mode batch 1 exit $?"
  if [ "${QUICK:-0}" = 1 ]; then  # batch 1 only, and where its steps' time goes
    kill -INT $srv; wait $srv; grep -E "ms/step" "$OUT/server_$mode.log" | tail -2 | cut -c1-400; continue
  fi
  python3 perf/serve_bench.py --url http://127.0.0.1:8000 --clients 100 --num-requests 200 \
    --input-len 128 --output-mean 256 --output-std 0 --output-min 256 --output-max 256 --warmup 0 --api native \
    --tokenizer $d --out "$OUT/b100_$mode.json" >"$OUT/b100_$mode.log" 2>&1
  echo "$mode batch 100 exit $?"
  python3 perf/serve_bench.py --url http://127.0.0.1:8000 --clients 100 --num-requests 800 --input-len 1024 \
    --warmup 100 --api native --tokenizer $d --out "$OUT/ref_$mode.json" >"$OUT/ref_$mode.log" 2>&1
  echo "$mode reference workload exit $?"
  if [ $mode = dp2 ] || { [ $mode = tp1 ] && [ "${TP1_200:-0}" = 1 ]; }; then  # DP: the same load per GPU as one GPU's 100 clients
    python3 perf/serve_bench.py --url http://127.0.0.1:8000 --clients 200 --num-requests 1600 --input-len 1024 \
      --warmup 200 --api native --tokenizer $d --out "$OUT/ref200_$mode.json" >"$OUT/ref200_$mode.log" 2>&1
    echo "$mode reference workload, 200 clients, exit $?"
  fi
  kill -INT $srv; wait $srv
  echo "$mode server exit $?"; grep -E "Traceback|Error|symmetric" "$OUT/server_$mode.log" | head -4
  # where the steps' time went under the reference load (with LLA_STEP_TIMING=1: the device's own
  # busy/idle per step, each replica's and rank's; DP's question: do its GPUs idle at 50 clients each?)
  grep -E "ms/step" "$OUT/server_$mode.log" | tail -${PROGRESS_LINES:-3} | cut -c1-400
  [ $mode = pd ] && grep -E "KV (send|recv)" "$OUT/server_$mode.log" | tail -2 | sed 's/.*; KV/KV/' 
done
python3 perf/multi_gpu_table.py --out-dir "$OUT" --model $d
if [ -n "${PREFIX:-}" ]; then  # issue 10's shared-prefix workload on GPU 0: with and without the cache
  CUDA_VISIBLE_DEVICES=0 BENCH_ARGS="--id-low 3 --id-high 500 --tokenizer $d" bash perf/prefix_bench.sh $PREFIX -- --model $d --load-format random \
    --max-running-requests 128 --max-num-batched-tokens ${CHUNK:-1024} 2>&1 | grep -E "==|QPS|tokens/s|TTFT" | tee "$OUT/prefix.log"
fi
