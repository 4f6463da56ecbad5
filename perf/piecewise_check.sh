#!/usr/bin/env bash
# One device call (carry .whl): piecewise CUDA graphs for steps with prefill chunks.
#   bash perf/piecewise_check.sh           GPU tests (graphs on/off give the eager tokens), then the
#                                          mixed step (100 decodes at 1024 context + one 1024-token
#                                          prompt) with piecewise graphs and eagerly, same process,
#                                          at the DeepSeek-V2-Lite and Llama-3-8B shapes
#   PART=serve-ds bash perf/piecewise_check.sh   DeepSeek-V2-Lite shape served (100 clients, 1024 in,
#                                          N(128,128) out), piecewise graphs on and off, 1 client, HF generate
#   PART=shared bash perf/piecewise_check.sh     Llama-3-8B shape: the shared-prefix runs (cache and
#                                          --disable-prefix-cache), then the decode-heavy run (256 clients,
#                                          128 in, 1024 out): the native-API figures to re-take with the
#                                          fixed benchmark client (its "loop lag" row shows it is not the bound)
set -u
source perf/device_setup.sh
case "${PART:-check}" in
check)
  timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_runner_gpu.py tests/test_gpu.py \
    tests/test_kernels_attention.py >"$OUT/pytest_gpu.log" 2>&1
  echo "pytest -m gpu exit $?"; grep -E "passed|failed|Error" "$OUT/pytest_gpu.log" | tail -6
  for shape in deepseek-v2-lite llama3-8b; do
    timeout 240 python3 perf/decode_bench.py --shape $shape --batches 1 --context 1024 --mixed 100,1024 \
      --out "$OUT/mixed_$shape.json" >"$OUT/mixed_$shape.log" 2>&1
    echo "== $shape decode_bench exit $?"
    grep -E "captured|^mixed step|^ +[0-9.]+ ms" "$OUT/mixed_$shape.log" | cut -c1-120 | head -${TOP:-30}
  done
  timeout 200 python3 perf/prefill_attention_bench.py ${SWEEP:---sweep} >"$OUT/prefill_attn.log" 2>&1
  echo "prefill_attention_bench exit $?"; grep -vE "Error|^  [0-9]+x" "$OUT/prefill_attn.log" | tail -60
  ;;
serve-ds)
  d=/tmp/dsv2l
  mkdir -p $d
  python3 -c "from lightllm_async.tools.make_random_model import shape_config as s, write_config_files as c, \
write_tokenizer as t; m = s('deepseek-v2-lite', 'bfloat16'); c(m, '$d'); t(m, '$d')"
  for mode in ${MODES:-piecewise eager}; do
    flags=(); [ $mode = eager ] && flags=(--disable-piecewise-cuda-graph)
    python3 -m lightllm_async.server --model $d --load-format random --port 8000 --max-running-requests 128 \
      --max-num-batched-tokens ${CHUNK:-8192} "${flags[@]}" >"$OUT/ds_server_$mode.log" 2>&1 &
    srv=$!
    python3 perf/serve_bench.py --url http://127.0.0.1:8000 --wait-ready 400 --clients 100 --num-requests 500 \
      --input-len 1024 --warmup 100 --api native --tokenizer $d --out "$OUT/ds_serve_$mode.json" \
      >"$OUT/ds_serve_$mode.log" 2>&1
    echo "== $mode: serve_bench 100 clients exit $?"; tail -7 "$OUT/ds_serve_$mode.log"
    if [ $mode = piecewise ]; then
      python3 perf/serve_bench.py --url http://127.0.0.1:8000 --clients 1 --num-requests 8 --input-len 1024 \
        --warmup 2 --api native --tokenizer $d --out "$OUT/ds_serve1.json" >"$OUT/ds_serve1.log" 2>&1
      echo "1 client exit $?"; tail -4 "$OUT/ds_serve1.log"
    fi
    kill -INT $srv; wait $srv
    grep -E "captured|KV cache" "$OUT/ds_server_$mode.log" | cut -c1-200 | head -3
  done
  python3 perf/hf_baseline.py --model $d --random-weights --batch 100 --input-len 1024 --output-len 128 \
    --repeats 1 --dtype bfloat16 --out "$OUT/ds_hf.json" >"$OUT/ds_hf.log" 2>&1
  echo "hf_baseline exit $?"; tail -4 "$OUT/ds_hf.log"
  ;;
shared)
  d=/tmp/l3
  mkdir -p $d
  python3 -c "from lightllm_async.tools.make_random_model import shape_config as s, write_config_files as c, \
write_tokenizer as t; m = s('llama3-8b', 'bfloat16'); c(m, '$d'); t(m, '$d')"
  BENCH_ARGS="--id-low 3 --id-high 500 --tokenizer $d" timeout 300 bash perf/prefix_bench.sh 2000 100 128 100 300 \
    -- --model $d --load-format random --max-running-requests 128 2>&1 | grep -E "==|QPS|tokens/s|TTFT|TPOT|loop lag"
  python3 -m lightllm_async.server --model $d --load-format random --port 8000 --max-running-requests 256 \
    >"$OUT/srv256.log" 2>&1 &
  srv=$!
  timeout 240 python3 perf/serve_bench.py --url http://127.0.0.1:8000 --wait-ready 300 --clients 256 \
    --num-requests 512 --warmup 256 --input-len 128 --output-mean 1024 --output-std 0 --output-min 1024 \
    --output-max 1024 --api native --tokenizer $d --out "$OUT/serve256.json" >"$OUT/serve256.log" 2>&1
  echo "== decode-heavy: serve_bench exit $?"; tail -8 "$OUT/serve256.log"
  kill -INT $srv; wait $srv
  ;;
esac
