#!/usr/bin/env bash
# Multi-turn chat (issue 10): perf/multiturn_bench.py against the server with the prefix cache and
# with --disable-prefix-cache, one after the other. Bench flags before `--`, server flags after.
#   this CPU (the default model): bash perf/multiturn_bench.sh --clients 4 --turns 4 -- --device cpu
#   GPU: bash perf/multiturn_bench.sh --clients 64 --turns 6 --user-words 80 --max-tokens 128 -- --model DIR
set -u
bench=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do bench+=("$1"); shift; done
[ $# -gt 0 ] && shift
port=${PORT:-8432}
for mode in cache no-cache; do
  flags=(); [ $mode = no-cache ] && flags=(--disable-prefix-cache)
  python3 -m lightllm_async.server --port $port "$@" "${flags[@]}" >"/tmp/multiturn_server_$mode.log" 2>&1 &
  srv=$!
  for _ in $(seq 600); do curl -sf http://127.0.0.1:$port/health >/dev/null && break; sleep 1; done
  echo "== $mode"
  python3 perf/multiturn_bench.py --url http://127.0.0.1:$port "${bench[@]}"
  kill -INT $srv; wait $srv
done
