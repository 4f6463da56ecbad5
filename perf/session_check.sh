#!/usr/bin/env bash
# One device call (carry .whl), 2026-11-30's second session: the DeepSeek decode fusions' GPU tests
# and their step time on/off in one process, then the Llama-3-8B 1024-in serve at chunk 2048 beside
# the bf16 matmul rate measured in the same call (perf/prefill_attention_bench.py prints it).
set -u
source perf/device_setup.sh >/dev/null
timeout 170 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_mla.py tests/test_deepseek.py \
  tests/test_runner_gpu.py -k "deepseek or mla or fused or compiles" >"$OUT/pytest.log" 2>&1
echo "pytest exit $?"; grep -E "passed|failed|Error" "$OUT/pytest.log" | tail -6
timeout 150 python3 perf/decode_bench.py --shape deepseek-v2-lite --batches 1,64 --context 1024 --compare-fusions \
  --out "$OUT/ds_fuse.json" >"$OUT/ds_fuse.log" 2>&1
echo "decode_bench exit $?"; grep -iE "fusion|ms|roof" "$OUT/ds_fuse.log" | tail -12
timeout 60 python3 perf/prefill_attention_bench.py >"$OUT/pa.log" 2>&1; echo "pa exit $?"; cat "$OUT/pa.log" | tail -7
d=/tmp/l3; mkdir -p $d
python3 -c "from lightllm_async.tools.make_random_model import shape_config as s, write_config_files as c, \
write_tokenizer as t; m = s('llama3-8b', 'bfloat16'); c(m, '$d'); t(m, '$d')"
python3 -m lightllm_async.server --model $d --load-format random --port 8000 --max-running-requests 128 \
  --max-num-batched-tokens 2048 >"$OUT/server_2048.log" 2>&1 &
srv=$!
timeout 150 python3 perf/serve_bench.py --url http://127.0.0.1:8000 --wait-ready 300 --clients 100 --num-requests 500 \
  --input-len 1024 --warmup 100 --api native --tokenizer $d --out "$OUT/serve_2048.json" >"$OUT/serve_2048.log" 2>&1
echo "serve_bench exit $?"; tail -8 "$OUT/serve_2048.log"
kill -INT $srv; wait $srv
grep -h "compiled a Triton" "$OUT/server_2048.log" | cut -c1-200 | head -3
