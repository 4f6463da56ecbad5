#!/usr/bin/env bash
# Issue 15, what 2 GPUs allow: the DeepSeek-V3/R1 per-layer shape (hidden 7168, 128 heads, MLA
# kv_lora 512, 256 routed experts top-8 + 1 shared, noaux_tc) at TP=2 on nvidia-h200-x2 (carry
# .whl), random bf16 weights made on the GPUs, the whole server. Two layer counts (3 dense + K MoE
# layers, K in $MOE, default "2 6"): the difference gives the time of one MoE layer, from which
# the 61-layer step is extrapolated (perf/r1_table.py: stated as an extrapolation, not a run).
# Per layer count: batch-1 TPOT (1 client, 128 in / 128 out) and the reference workload
# (100 clients, 1024 in, N(128,128) out).
set -u
source perf/device_setup.sh
for k in ${MOE:-2 6}; do
  n=$((3 + k)); d=/tmp/r1_$n; mkdir -p $d
  python3 -c "from lightllm_async.tools.make_random_model import shape_config as s, write_config_files as c, \
write_tokenizer as t; m = s('deepseek-v3', 'bfloat16', $n); c(m, '$d'); t(m, '$d')"
  python3 -m lightllm_async.server --model $d --load-format random --port 8000 --tp 2 --max-model-len 4096 \
    --max-running-requests 128 --max-num-batched-tokens 8192 >"$OUT/server_r1_$n.log" 2>&1 &
  srv=$!
  python3 perf/serve_bench.py --url http://127.0.0.1:8000 --wait-ready 400 --clients 1 --num-requests 4 \
    --input-len 128 --output-mean 128 --output-std 0 --output-min 128 --output-max 128 --warmup 1 --api native \
    --tokenizer $d --out "$OUT/r1_b1_$n.json" >"$OUT/r1_b1_$n.log" 2>&1
  echo "$n layers batch 1 exit $?"
  python3 perf/serve_bench.py --url http://127.0.0.1:8000 --clients 100 --num-requests ${REF_N:-300} --input-len 1024 \
    --warmup 50 --api native --tokenizer $d --out "$OUT/r1_ref_$n.json" >"$OUT/r1_ref_$n.log" 2>&1
  echo "$n layers reference workload exit $?"
  kill -INT $srv; wait $srv; echo "server exit $?"
  grep -E "Traceback|Error|memory|KV cache:|ms/step" "$OUT/server_r1_$n.log" | tail -3 | cut -c1-300
done
python3 perf/r1_table.py --out-dir "$OUT" --moe "${MOE:-2 6}"
