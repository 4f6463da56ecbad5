#!/usr/bin/env bash
# Device calls of 2026-11-30's third session (carry .whl), stage by stage (STAGES, space-separated):
#   tests    the GPU tests of what changed: MLA decode (fused merge, minimum chunk), the norm of the
#            experts' unsummed outputs, DeepSeek served with graphs, no compiles after capture
#   mla      perf/mla_split_bench.py: MLA decode at small batches, merge launch vs the last chunk
#   ds       DeepSeek-V2-Lite decode step at batch 1 and 64, three ways in separate processes:
#            now; without this session's fusions (the experts summed by a reduce, the router's
#            GEMM apart: "before"); DS_VARIANTS="name:ENV=V;ENV=V ..." picks others (e.g. min256:LLA_MLA_MIN_SPLIT=256)
#   l3       Llama-3-8B decode step at batch 1 and 256 (context 640, issue 10's decode-heavy case)
#            against the bytes roof and the bytes-or-FLOPs roof (the bf16 matmul rate measured too)
#   skinny   the GPU tests of the few-row projection kernel and of what launches it early (PDL), then
#            perf/skinny_linear_bench.py (SWEEP=1: its tile sweep) at the decode shapes
#   pdl      Llama-3-8B (PDL_SHAPES) decode step at batch 1, context 1024, at TPS="1 2" ranks, in
#            separate processes: projections through cuBLAS; through the skinny kernel launched
#            plainly; and launched with programmatic dependent launch (the default)
#   chain    2026-11-30 (fourth session): the GPU tests of the DeepSeek decode chain's Triton GEMVs
#            (W_UK absorb, W_UV in the MLA merge, the router's partial logits), then the
#            DeepSeek-V2-Lite step at CHAIN_BATCHES (1,8) in separate processes, CHAIN_VARIANTS
#            (name:ENV=V;ENV=V): now; "cublas" (those three through cuBLAS, as before); the in/out
#            projections through the skinny GEMV too (LLA_SKINNY_LINEAR=all); PDL off
#   tma      the prefill attention GPU tests (the tensor-descriptor experiment among them), then
#            perf/prefill_attention_bench.py (its rows print as measured: TMA beside the chosen blocks)
#   role     tests/test_pd_role_gpu.py: --role prefill (GPU 0) / decode (GPU 1) over NCCL, router
#   steady   2026-11-30 (sixth session): the serving figures again with serve_bench's steady protocol.
#            bf16 matmul rate first (the must-show's denominator, same call); then Llama-3-8B, 100
#            clients, 1024 in, N(128,128) out, one GPU at CHUNKS (1024 2048), both protocols where
#            BARRIER=1; its table is printed as each run ends. STEADY_RUNS ("tp1:1024:ENV=V;ENV=V ...")
#            adds runs before those, each server started with its environment
#   dp       the same workload on one GPU and through --dp 2 (x2 kind) at DP_CHUNK (2048): 100 clients,
#            and for DP also 200 (the load per GPU of one GPU's 100)
#            (DP_RUNS="tp1:1024 dp2:1024 dp2:512" sets the runs, mode:chunk; DP_CLIENTS the DP client counts)
#   prefix   perf/prefix_bench.sh's 2000-shared + 100-unique workload at PREFIX_CHUNKS (1024 2048),
#            cache on and off, one GPU
#   fp8      --kv-cache-dtype fp8: its GPU tests (attention over a float8 cache, the stores'
#            rounding, the runner's graphs; FP8_TESTS=0 skips), perf/fp8_decode_bench.py at the
#            chosen launch (FP8_KERNEL=0 skips), the Llama-3-8B decode step at batch 1 and 256
#            (context 640) with the cache in FP8_DECODE ("auto fp8"), then the 1024-in serve (steady,
#            one GPU, chunk 1024) in FP8_SERVE ("auto fp8"); " " skips a list
#   moe      fused MoE's direct launch (no alignment kernel at one token): its GPU tests and the
#            DeepSeek ones around it, then perf/mla_moe_bench.py at MOE_M (1,8), direct and aligned;
#            with STAGES="moe ds" DS_BATCHES=1 DS_VARIANTS="now: aligned:LLA_MOE_DIRECT_MAX_TOKENS=0"
#            the V2-Lite batch-1 step both ways
#   decheavy 2026-12-01 (thirteenth session): issue 10's decode-heavy serve (256 clients, 128 in, 1024
#            out, Llama-3-8B shape, --max-running-requests 256), once per DH_VARIANTS
#            ("name:ENV=V;ENV=V ...", default the decode attention's order on and off: LLA_DECODE_ORDER)
#   tpcheck  perf/tp_gpu_check.py (x2 kind): TP=2 against TP=1, the DeepSeek decode chain's kernels among them
#   moetune  2026-11-30 (ninth session): the V2-Lite MoE at one token tuned chained (--chain LAYERS
#            --sweep) into a copy of the shipped tuned file, which then replaces the installed one;
#            the DeepSeek-V2-Lite batch-1 step before and after, the MoE GPU tests and the bench row
#            with the new file; MLA_CASES (16-head 1k and b64 4k) swept chained (MLA_SWEEP=0 skips)
#   mlastages 2026-11-30 (ninth session): the MLA launch sweep, chained, with deeper pipelines over
#            smaller tiles among the launches, at the 16-head cases that miss 80% (SWEEP_SPLITS 2,4);
#            then the sweep's best at batch 64 x 1k (LLA_MLA_LAUNCH) against the default: the
#            DeepSeek-V2-Lite step at batch 1 and 64, and the MLA GPU tests under it
#   midrows  2026-11-30 (tenth session): decode at 50-256 rows. The decode attention GPU tests, then
#            the Llama-3-8B decode step at MID_BATCHES (50,100,256, context 256: the DP=2 replica's,
#            one GPU's and the decode-heavy batch) with its costliest kernels, MID_VARIANTS ways:
#            now, and with the attention's merge launched at one split too (LLA_DECODE_DIRECT=0).
#            (Its first form also timed skinny_linear extended to 128 rows against cuBLAS: removed,
#            perf/RESULTS.md.)
#   splits   2026-11-30 (tenth session): the decode attention GPU tests, then
#            perf/decode_splits_bench.py at SPLIT_SHAPES: decode attention at the server's batches
#            against the chunks per context (SPLIT_COUNTS), the heuristic's count beside them
#            (SPLIT_FP8=1: over a float8 cache);
#            SPLIT_STEP=1: the runner's GPU tests, then the Llama-3-8B decode step at SPLIT_BATCHES
#            (8,24,32,50; context 1024) with the chunk count now and as chosen before (pow2)
#   layers   2026-11-30 (ninth session): perf/mla_moe_bench.py --chain LAYERS (8): each MoE row (M = 1 with
#            LAYER_SWEEP, then MOE_M 8,64,256) and MLA row also timed as LAYERS calls over distinct data back to back in one
#            graph, as a decode step runs them; at one token the MoE's two GEMMs apart, with their
#            own tile sweeps (LAYER_SWEEP=1); MLA at LAYERS_MLA (4) layers
#   mlamerge 2026-12-01: the MLA decode rows chained (perf/mla_moe_bench.py --chain 4) at
#            MERGE_CASES (the six 16-head cases), each again without its chunk merge
#            (--mla-no-merge) and over one request table (--mla-shared-table), then at two cases
#            with contexts spread ctx * (1 -+ S), S in MERGE_SPREAD (0.5; " " skips). (Its first
#            form, "flat", also timed three forms of a flat launch, then removed: perf/RESULTS.md.)
#   mlaorder 2026-12-01 (twelfth session): the MLA GPU tests, then the MLA decode rows chained
#            (--chain 4) with and without the runner's order (--mla-order: requests longest first,
#            twice the chunks always / where the lengths spread) at ORDER_CASES, contexts spread
#            by each of ORDER_SPREADS (0 0.5), and at two cases by ORDER_MORE (0.25 0.9)
#   dsorder  the DeepSeek-V2-Lite decode step at DSO_BATCH (64; graphs up to DSO_MAX_RUNNING, 128),
#            context DSO_CONTEXT (2048) spread by each of DSO_SPREADS (0.5 0), the order ignored (LLA_MLA_SPREAD=never) and used (auto),
#            each in its own process
#   l3order  the decode attention GPU tests, then the Llama-3-8B decode step at L3O_BATCHES (64,256),
#            context L3O_CONTEXT (1024) spread by each of L3O_SPREADS (0.8 0), the runner's order
#            ignored (LLA_DECODE_ORDER=0) and used, each in its own process
#   gpusuite 2026-12-01 (fourteenth session): every GPU test, the files found by their `pytest.mark.gpu`
#            (naming them: `pytest -m gpu tests/` stops at collecting CPU-only modules whose imports the
#            device lacks, e.g. jsonschema). The whole suite takes more than one call (548 s ran 78 of
#            91 tests on an H200), so GPU_PART picks a part: "kernels" (the kernel files, the model
#            parity, test_gpu.py: ~450 s by that run) or "serving" (the runner, DeepSeek, TP/DP/PD, the
#            2-GPU ones skipping on one GPU: 19 passed and 10 skipped in 97 s); "all" runs both
set -u
STAGES=${STAGES:-"tests mla ds"}
source perf/device_setup.sh >/dev/null
l3_model() {  # the Llama-3-8B-shaped folder the servers load with --load-format random (made once a call)
  local d=/tmp/l3
  [ -f $d/config.json ] || { mkdir -p $d; python3 -c "from lightllm_async.tools.make_random_model import shape_config as s, \
write_config_files as c, write_tokenizer as t; m = s('llama3-8b', 'bfloat16'); c(m, '$d'); t(m, '$d')"; }
  echo $d
}
matmul_line() {  # the bf16 matmul rate, labelled $1, appended to $OUT/matmul.txt
  python3 -c "import sys; sys.path.insert(0, 'perf'); from decode_bench import matmul_rate; \
print(f'bf16 matmul$1: {matmul_rate(\"cuda\") / 1e12:.0f} TFLOP/s')" | tee -a "$OUT/matmul.txt"
}
decode_tests() {  # the decode attention GPU tests
  timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_attention.py -k decode \
    >"$OUT/decode_test.log" 2>&1
  echo "decode attention tests exit $?"; grep -E "passed|failed|Error" "$OUT/decode_test.log" | tail -4
}
for stage in $STAGES; do
  case $stage in
  gpusuite)
    files=$(grep -l "pytest.mark.gpu" tests/test_*.py)
    kernels=$(echo "$files" | grep -E "test_kernels_|test_model_parity|test_gpu\.py")
    case ${GPU_PART:-kernels} in
      kernels) files=$kernels ;;
      serving) files=$(echo "$files" | grep -vxF "$kernels") ;;
    esac
    timeout ${GPU_SUITE_S:-540} python3 -m pytest -q -m gpu -p no:cacheprovider -rs --durations=10 $files \
      >"$OUT/gpu_suite_${GPU_PART:-kernels}.log" 2>&1
    echo "gpu suite (${GPU_PART:-kernels}) exit $?"
    grep -E "passed|failed|FAILED|ERROR|SKIPPED" "$OUT/gpu_suite_${GPU_PART:-kernels}.log" | tail -16 ;;
  tests)
    timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_mla.py tests/test_kernels_pointwise.py \
      tests/test_kernels_moe.py tests/test_deepseek.py tests/test_runner_gpu.py -k "deepseek or mla or rms or compiles or routing" >"$OUT/pytest.log" 2>&1
    echo "pytest exit $?"; grep -E "passed|failed|Error" "$OUT/pytest.log" | tail -8 ;;
  mla)
    timeout 150 python3 perf/mla_split_bench.py --heads 16,128 --batches 1,4,16,64 --contexts 1024,4096 \
      >"$OUT/mla_split.log" 2>&1
    echo "mla_split exit $?"; sed -n '/microseconds per call/,$p' "$OUT/mla_split.log" ;;
  ds)
    before="LLA_DEEPSEEK_FUSE=in_proj,kv_store,shared,w_uv_out,router"
    variants=${DS_VARIANTS:-now: before:$before}
    for v in $variants; do
      name=${v%%:*}; envs=${v#*:}; envs=${envs//;/ }
      env $envs timeout 170 python3 perf/decode_bench.py --shape deepseek-v2-lite --batches ${DS_BATCHES:-1,64} --context 1024 \
        --top-kernels 14 --out "$OUT/ds_$name.json" >"$OUT/ds_$name.log" 2>&1
      echo "decode_bench $name exit $?"; grep -E "^ +(1|64) " "$OUT/ds_$name.log" | head -4
    done
    grep -A16 "kernels" "$OUT/ds_now.log" | head -20 ;;
  l3)
    timeout 200 python3 perf/decode_bench.py --shape llama3-8b --batches 1,256 --context 640 --max-running 256 \
      --out "$OUT/l3_b256.json" >"$OUT/l3_b256.log" 2>&1
    echo "decode_bench l3 exit $?"; grep -E "matmul|batch|^ +(1|256) " "$OUT/l3_b256.log" | head -8 ;;
  skinny)
    timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_skinny.py >"$OUT/skinny_test.log" 2>&1
    echo "skinny tests exit $?"; grep -E "passed|failed|Error" "$OUT/skinny_test.log" | tail -4
    timeout ${SKINNY_S:-120} python3 perf/skinny_linear_bench.py --rows ${ROWS:-1} ${SWEEP:+--sweep} >"$OUT/skinny.log" 2>&1
    echo "skinny bench exit $?"; sed -n '/microseconds per call/,$p' "$OUT/skinny.log" ;;
  pdl)
    for shape in ${PDL_SHAPES:-llama3-8b}; do
      for tp in ${TPS:-1 2}; do
        for v in ${PDL_VARIANTS:-cublas:LLA_SKINNY_LINEAR=0 plain:LLA_SKINNY_LINEAR=1;LLA_PDL=0 pdl:LLA_SKINNY_LINEAR=1}; do
          name=${v%%:*}; envs=${v#*:}; envs=${envs//;/ }; log="$OUT/pdl_${shape}_tp${tp}_$name.log"
          env $envs timeout 170 python3 perf/decode_bench.py --shape $shape --batches ${PDL_BATCHES:-1} --context 1024 \
            --max-running 8 --tp $tp --top-kernels 10 --out "${log%.log}.json" >"$log" 2>&1
          echo "$shape tp$tp $name exit $?"; grep -E "^ +[0-9]+ +True +True" "$log" | head -2
        done
      done
    done ;;
  chain)
    [ "${CHAIN_TESTS:-1}" = 1 ] && timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_mla.py tests/test_kernels_moe.py \
      tests/test_deepseek.py tests/test_runner_gpu.py -k "absorb or w_uv or router or routing or deepseek or compiles" \
      >"$OUT/chain_test.log" 2>&1 && echo "chain tests exit $?"
    grep -E "passed|failed|Error" "$OUT/chain_test.log" 2>/dev/null | tail -6
    old="LLA_DEEPSEEK_FUSE=in_proj,kv_store,shared,w_uv_out,router,expert_sum"
    for v in ${CHAIN_VARIANTS:-now: cublas:$old skall:LLA_SKINNY_LINEAR=all nopdl:LLA_PDL=0}; do
      name=${v%%:*}; envs=${v#*:}; envs=${envs//;/ }; log="$OUT/chain_$name.log"
      env $envs timeout 150 python3 perf/decode_bench.py --shape deepseek-v2-lite --batches ${CHAIN_BATCHES:-1,8} \
        --context 1024 --max-running 8 --top-kernels 24 --out "${log%.log}.json" >"$log" 2>&1
      echo "chain $name exit $?"; grep -E "^ +[0-9]+ +True +True" "$log" | head -2
    done ;;
  tma)
    timeout ${TMA_TEST_S:-150} python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_attention.py tests/test_kernels_mla.py ${TMA_TEST_K:+-k $TMA_TEST_K} \
      >"$OUT/tma_test.log" 2>&1
    echo "prefill tests exit $?"; grep -E "passed|failed|Error" "$OUT/tma_test.log" | tail -4
    timeout ${TMA_S:-200} python3 perf/prefill_attention_bench.py >"$OUT/prefill.log" 2>&1
    echo "prefill bench exit $?"; head -1 "$OUT/prefill.log"; grep "^  \. " "$OUT/prefill.log" | cut -c5- ;;
  role)
    timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_pd_role_gpu.py >"$OUT/role.log" 2>&1
    echo "role exit $?"; grep -E "passed|failed|Error|assert" "$OUT/role.log" | tail -12 ;;
  steady|dp)
    d=$(l3_model)
    [ $stage = steady ] && matmul_line ""
    if [ $stage = steady ]; then runs=${STEADY_RUNS:-}; for c in ${CHUNKS:-1024 2048}; do runs="$runs tp1:$c"; done
    else runs=${DP_RUNS:-"tp1:${DP_CHUNK:-2048} dp2:${DP_CHUNK:-2048}"}; fi
    for r in $runs; do  # mode:chunk[:ENV=V;ENV=V] (STEADY_RUNS="tp1:1024:LLA_DECODE_DIRECT=0" CHUNKS=1024)
      mode=${r%%:*}; chunk=${r#*:}; envs=""; [ "${chunk#*:}" != "$chunk" ] && { envs=${chunk#*:}; chunk=${chunk%%:*}; }
      envs=${envs//;/ }; flags=""; [ $mode = dp2 ] && flags="--dp 2"; sfx=${envs:+_${envs//[^A-Za-z0-9]/}}
      [ -n "$envs" ] && echo "== server env: $envs"
      env $envs python3 -m lightllm_async.server --model $d --load-format random --port 8000 --max-running-requests 128 \
        --max-num-batched-tokens $chunk $flags >"$OUT/server_${mode}_$chunk$sfx.log" 2>&1 &
      srv=$!
      clients="100"; [ $mode = dp2 ] && clients=${DP_CLIENTS:-"100 200"}
      protocols="steady"; [ "${BARRIER:-0}" = 1 ] && protocols="steady barrier"
      for n in $clients; do for proto in $protocols; do
        tag=${mode}_${chunk}_${n}_$proto$sfx
        timeout ${SERVE_S:-200} python3 perf/serve_bench.py --url http://127.0.0.1:8000 --wait-ready 300 --clients $n \
          --num-requests $((n * 8)) --input-len 1024 --warmup $n --api native --tokenizer $d --protocol $proto \
          --out "$OUT/serve_$tag.json" >"$OUT/serve_$tag.log" 2>&1
        echo "== $tag exit $?"; tail -7 "$OUT/serve_$tag.log"
      done; done
      kill -INT $srv; wait $srv
      grep -E "ms/step" "$OUT/server_${mode}_$chunk$sfx.log" | tail -1 | cut -c1-300
    done
    [ $stage = steady ] && matmul_line ", again after the runs" ;;
  prefix)
    d=$(l3_model)
    for chunk in ${PREFIX_CHUNKS:-1024 2048}; do
      echo "== prefix, chunk $chunk"
      LOG_DIR=$OUT/prefix_$chunk; mkdir -p $LOG_DIR
      LOG_DIR=$LOG_DIR BENCH_ARGS="--id-low 3 --id-high 500 --tokenizer $d" timeout ${PREFIX_S:-280} bash perf/prefix_bench.sh 2000 100 128 100 400 \
        -- --model $d --load-format random --max-running-requests 128 --max-num-batched-tokens $chunk 2>&1 \
        | grep -E "==|QPS|tokens/s|TTFT|TPOT"
    done ;;
  fp8)
    [ "${FP8_TESTS:-1}" = 1 ] && { timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider \
      tests/test_kernels_attention.py tests/test_runner_gpu.py \
      -k "fp8 or decode_attention_matches or prefill_attention_matches" >"$OUT/fp8_test.log" 2>&1
    echo "fp8 tests exit $?"; grep -E "passed|failed|Error" "$OUT/fp8_test.log" | tail -6; }
    [ "${FP8_KERNEL:-1}" = 1 ] && { timeout 150 python3 perf/fp8_decode_bench.py --warps 2 --block-n 128 --stages 2 \
      >"$OUT/fp8_decode.log" 2>&1; echo "fp8_decode_bench exit $?"; sed -n '/B x ctx/,$p' "$OUT/fp8_decode.log"; }
    for kvd in ${FP8_DECODE:-auto fp8}; do
      timeout 170 python3 perf/decode_bench.py --shape llama3-8b --batches 1,256 --context 640 --max-running 256 \
        --kv-cache-dtype $kvd --out "$OUT/l3_kv_$kvd.json" >"$OUT/l3_kv_$kvd.log" 2>&1
      echo "decode_bench kv $kvd exit $?"; grep -E "matmul|^ +(1|256) " "$OUT/l3_kv_$kvd.log" | head -4
    done
    d=$(l3_model)
    [ "${FP8_SERVE:-auto fp8}" != " " ] && python3 -c "import sys; sys.path.insert(0, 'perf'); \
from decode_bench import matmul_rate; print(f'bf16 matmul {matmul_rate(\"cuda\") / 1e12:.0f} TFLOP/s')" \
      | tee "$OUT/matmul.txt"
    for kvd in ${FP8_SERVE:-auto fp8}; do
      python3 -m lightllm_async.server --model $d --load-format random --port 8000 --max-running-requests 128 \
        --kv-cache-dtype $kvd >"$OUT/server_kv_$kvd.log" 2>&1 &
      srv=$!
      timeout ${SERVE_S:-200} python3 perf/serve_bench.py --url http://127.0.0.1:8000 --wait-ready 300 --clients 100 \
        --num-requests 800 --input-len 1024 --warmup 100 --api native --tokenizer $d --out "$OUT/serve_kv_$kvd.json" \
        >"$OUT/serve_kv_$kvd.log" 2>&1
      echo "== serve kv $kvd exit $?"; tail -7 "$OUT/serve_kv_$kvd.log"
      kill -INT $srv; wait $srv; grep -E "KV cache:" "$OUT/server_kv_$kvd.log" | head -1
    done ;;
  moe)
    timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_moe.py tests/test_deepseek.py \
      -k "direct or v2_lite or graph or fused_decode" >"$OUT/moe_test.log" 2>&1
    echo "moe tests exit $?"; grep -E "passed|failed|Error" "$OUT/moe_test.log" | tail -6
    timeout 150 python3 perf/mla_moe_bench.py --only moe --no-ref --moe-m ${MOE_M:-1,8} --moe-shapes \
      ${MOE_SHAPES:-v2-lite,v3} --no-layers >"$OUT/moe_direct.log" 2>&1
    echo "mla_moe_bench exit $?"; grep -E "copy|fused_moe" "$OUT/moe_direct.log" | cut -c1-150 ;;
  moetune)
    tuned=/tmp/lla/lightllm_async/kernels/tuned/moe_NVIDIA_H200.json
    ds_b1() { timeout 170 python3 perf/decode_bench.py --shape deepseek-v2-lite --batches 1 --context 1024 \
      --top-kernels 14 --out "$OUT/ds_$1.json" >"$OUT/ds_$1.log" 2>&1; echo "decode_bench $1 exit $?"
      grep -E "^ +1 " "$OUT/ds_$1.log" | head -2; }
    ds_b1 before
    cp $tuned "$OUT/moe_tuned.json"
    timeout 200 python3 perf/mla_moe_bench.py --only moe --no-ref --no-layers --chain ${LAYERS:-8} --moe-m 1 \
      --moe-shapes v2-lite --sweep --out "$OUT/moe_tuned.json" >"$OUT/moe_tune.log" 2>&1
    echo "moe tune exit $?"; grep -v "^    skip" "$OUT/moe_tune.log" | cut -c1-170
    cp "$OUT/moe_tuned.json" $tuned && python3 -c "import json; print(json.load(open('$tuned'))['shapes']['E=64,I=1408,H=2048']['1'])"
    timeout 120 python3 perf/mla_moe_bench.py --only moe --no-ref --no-layers --chain ${LAYERS:-8} --moe-m 1,8 \
      --moe-shapes v2-lite >"$OUT/moe_after.log" 2>&1
    echo "moe after exit $?"; grep -E "fused_moe|moe_" "$OUT/moe_after.log" | cut -c1-150
    ds_b1 after
    timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_moe.py tests/test_deepseek.py \
      -k "not v3_shape" >"$OUT/moe_test.log" 2>&1
    echo "moe tests exit $?"; grep -E "passed|failed|Error" "$OUT/moe_test.log" | tail -6
    [ "${MLA_SWEEP:-1}" = 1 ] || continue
    timeout 200 python3 perf/mla_moe_bench.py --only mla --no-ref --chain ${LAYERS_MLA:-4} --sweep \
      --mla-cases ${MLA_CASES:-16:64:1024,16:128:1024,16:64:4096} >"$OUT/mla_sweep.log" 2>&1
    echo "mla sweep exit $?"; grep -vE "^    \(|Error" "$OUT/mla_sweep.log" | cut -c1-150 ;;
  mlastages)
    LLA_MLA_SWEEP_SPLITS=${SWEEP_SPLITS:-2,4} timeout 220 python3 perf/mla_moe_bench.py --only mla --no-ref \
      --chain 4 --sweep --mla-cases 16:64:1024,16:128:1024,16:64:4096 >"$OUT/mla_ssweep.log" 2>&1
    echo "mla sweep exit $?"; grep -vE "^    _Launch|Error" "$OUT/mla_ssweep.log" | cut -c1-150
    launch=$(awk '/B=64 ctx=1024/{f=1} f && /best/{print $4, $5, $6, $7; exit}' "$OUT/mla_ssweep.log" | tr -d hnws | tr ' ' ,)
    echo "best launch at 64 x 1k: $launch"
    for v in default "best:LLA_MLA_LAUNCH=$launch"; do
      name=${v%%:*}; envs=""; [ $name = best ] && envs=${v#*:}
      env $envs timeout 100 python3 perf/decode_bench.py --shape deepseek-v2-lite --batches 1,64 --context 1024 \
        --out "$OUT/ds_$name.json" >"$OUT/ds_$name.log" 2>&1
      echo "decode_bench $name exit $?"; grep -E "^ +(1|64) " "$OUT/ds_$name.log" | head -4
    done
    LLA_MLA_LAUNCH=$launch timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_mla.py \
      tests/test_deepseek.py >"$OUT/mla_test.log" 2>&1
    echo "mla tests ($launch) exit $?"; grep -E "passed|failed|Error" "$OUT/mla_test.log" | tail -4 ;;
  layers)
    timeout ${LAYERS_S:-300} python3 perf/mla_moe_bench.py --only moe --no-ref --no-layers --chain ${LAYERS:-8} \
      --moe-m 1 $([ "${LAYER_SWEEP:-1}" = 1 ] && echo --sweep) >"$OUT/moe_chain1.log" 2>&1
    echo "moe chain M=1 exit $?"; grep -v "^    skip" "$OUT/moe_chain1.log" | cut -c1-150
    timeout ${LAYERS_S:-300} python3 perf/mla_moe_bench.py --only moe --no-ref --no-layers --chain ${LAYERS:-8} \
      --moe-m ${MOE_M:-8,64,256} >"$OUT/moe_chain.log" 2>&1
    echo "moe chain exit $?"; cut -c1-150 "$OUT/moe_chain.log"
    timeout ${LAYERS_S:-240} python3 perf/mla_moe_bench.py --only mla --no-ref --chain ${LAYERS_MLA:-4} \
      >"$OUT/mla_chain.log" 2>&1
    echo "mla chain exit $?"; cut -c1-150 "$OUT/mla_chain.log" ;;
  midrows)
    decode_tests
    for v in ${MID_VARIANTS:-now:LLA_DECODE_DIRECT=1 merge:LLA_DECODE_DIRECT=0}; do
      name=${v%%:*}; envs=${v#*:}; envs=${envs//;/ }; log="$OUT/mid_$name.log"
      env $envs timeout 200 python3 perf/decode_bench.py --shape llama3-8b --batches ${MID_BATCHES:-50,100,256} --context 256 \
        --max-running 256 --top-kernels 12 --out "${log%.log}.json" >"$log" 2>&1
      echo "decode $name exit $?"; grep -E "^ +[0-9]+ +True +True" "$log" | head -4
    done
    grep -A12 "^kernels of" "$OUT/mid_now.log" | cut -c1-110 ;;
  splits)
    decode_tests
    [ "${SPLIT_BENCH:-1}" = 1 ] && timeout ${SPLITS_S:-300} python3 perf/decode_splits_bench.py \
      --shapes ${SPLIT_SHAPES:-50x1100,64x1100,100x1100,128x1100,256x640,64x4096,50x270,100x270} \
      --splits ${SPLIT_COUNTS:-1,2,3,4,5,6,8} ${SPLIT_FP8:+--fp8} >"$OUT/decode_splits.log" 2>&1
    echo "decode_splits_bench exit $?"; sed -n '/a call (chained/,$p' "$OUT/decode_splits.log"
    [ "${SPLIT_STEP:-0}" = 1 ] || continue
    [ "${SPLIT_TESTS:-1}" = 1 ] && { timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_runner_gpu.py \
      >"$OUT/runner_test.log" 2>&1; echo "runner GPU tests exit $?"; grep -E "passed|failed|Error" "$OUT/runner_test.log" | tail -4; }
    for rule in now pow2; do  # the Llama-3-8B step with the chunk count now, and as chosen before (pow2)
      RULE=$rule timeout 200 python3 -c "
import os, runpy, sys, triton
import importlib
D = importlib.import_module('lightllm_async.kernels.decode_attention')  # the module (the package exports the function)
if os.environ['RULE'] == 'pow2':  # before 2026-11-30 (tenth session): the power of two at or above
    D._num_splits = lambda b, k, dev: min(32, triton.next_power_of_2(triton.cdiv(4 * D._num_sms(dev), b * k)))
import torch; print('chunks at batch 8, 24, 32, 50, 64:', [D._num_splits(b, 8, torch.device('cuda')) for b in (8, 24, 32, 50, 64)])
sys.argv = ['decode_bench.py', '--shape', 'llama3-8b', '--batches', '${SPLIT_BATCHES:-8,24,32,50}', '--context', '1024',
            '--max-running', '64', '--out', '$OUT/splitstep_$rule.json']
runpy.run_path('perf/decode_bench.py', run_name='__main__')" >"$OUT/splitstep_$rule.log" 2>&1
      echo "decode step, chunks $rule: exit $?"; grep -E "^chunks at|^ +[0-9]+ +True +True" "$OUT/splitstep_$rule.log"
    done ;;
  mlamerge)
    timeout ${MERGE_S:-300} python3 perf/mla_moe_bench.py --only mla --no-ref --chain 4 --mla-no-merge --mla-shared-table \
      --mla-cases ${MERGE_CASES:-16:64:1024,16:64:4096,16:64:8192,16:128:1024,16:128:4096,16:128:8192} \
      >"$OUT/mla_merge.log" 2>&1
    echo "mla bench exit $?"; cut -c1-150 "$OUT/mla_merge.log"
    for spread in ${MERGE_SPREAD:-0.5}; do
      timeout 150 python3 perf/mla_moe_bench.py --only mla --no-ref --chain 4 --mla-no-merge --mla-spread $spread \
        --mla-cases 16:64:1024,16:128:4096 >"$OUT/mla_merge_spread$spread.log" 2>&1
      echo "mla bench, spread $spread: exit $?"; grep -v "^NVIDIA\|^device\|^op" "$OUT/mla_merge_spread$spread.log" | cut -c1-150
    done ;;
  mlaorder)
    timeout ${ORDER_TEST_S:-200} python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_mla.py >"$OUT/mla_order_test.log" 2>&1
    echo "mla tests exit $?"; grep -E "passed|failed|Error" "$OUT/mla_order_test.log" | tail -6
    cases=${ORDER_CASES:-16:64:1024,16:64:4096,16:64:8192,16:128:1024,16:128:4096,16:128:8192}
    for spread in ${ORDER_SPREADS:-0 0.5}; do
      timeout ${ORDER_S:-150} python3 perf/mla_moe_bench.py --only mla --no-ref --chain 4 --mla-order --mla-spread $spread \
        --mla-cases $cases >"$OUT/mla_order_spread$spread.log" 2>&1
      echo "mla bench, spread $spread: exit $?"; grep "chained" "$OUT/mla_order_spread$spread.log" | cut -c1-150
    done
    for spread in ${ORDER_MORE:-0.25 0.9}; do
      timeout 100 python3 perf/mla_moe_bench.py --only mla --no-ref --chain 4 --mla-order --mla-spread $spread \
        --mla-cases 16:64:4096,16:128:4096 >"$OUT/mla_order_spread$spread.log" 2>&1
      echo "mla bench, spread $spread: exit $?"; grep "chained" "$OUT/mla_order_spread$spread.log" | cut -c1-150
    done ;;
  dsorder)
    for spread in ${DSO_SPREADS:-0.5 0}; do
      for mode in never auto; do
        log="$OUT/ds_order_${mode}_spread$spread.log"
        LLA_MLA_SPREAD=$mode timeout 170 python3 perf/decode_bench.py --shape deepseek-v2-lite --batches ${DSO_BATCH:-64} \
          --context ${DSO_CONTEXT:-2048} --context-spread $spread --top-kernels 8 --max-running ${DSO_MAX_RUNNING:-128} \
          --out "${log%.log}.json" >"$log" 2>&1
        echo "ds spread $spread $mode exit $?"; grep -E "^ +[0-9]+ +True" "$log" | head -2
      done
    done ;;
  l3order)
    decode_tests
    for spread in ${L3O_SPREADS:-0.8 0}; do
      for mode in 0 1; do
        log="$OUT/l3_order${mode}_spread$spread.log"
        LLA_DECODE_ORDER=$mode timeout 170 python3 perf/decode_bench.py --shape llama3-8b --batches ${L3O_BATCHES:-64,256} \
          --context ${L3O_CONTEXT:-1024} --context-spread $spread --max-running 256 --top-kernels 6 \
          --out "${log%.log}.json" >"$log" 2>&1
        echo "l3 spread $spread order $mode exit $?"; grep -E "^ +[0-9]+ +True" "$log" | head -4
      done
    done ;;
  decheavy)
    d=$(l3_model)
    for v in ${DH_VARIANTS:-order1:LLA_DECODE_ORDER=1 order0:LLA_DECODE_ORDER=0}; do
      name=${v%%:*}; envs=${v#*:}; envs=${envs//;/ }
      env $envs python3 -m lightllm_async.server --model $d --load-format random --port 8000 --max-running-requests 256 \
        >"$OUT/server_dh_$name.log" 2>&1 &
      srv=$!
      timeout ${DH_S:-240} python3 perf/serve_bench.py --url http://127.0.0.1:8000 --wait-ready 300 --clients 256 \
        --num-requests 512 --warmup 256 --input-len 128 --output-mean 1024 --output-std 0 --output-min 1024 \
        --output-max 1024 --api native --tokenizer $d --out "$OUT/serve_dh_$name.json" >"$OUT/serve_dh_$name.log" 2>&1
      echo "== decode-heavy $name ($envs): exit $?"; tail -7 "$OUT/serve_dh_$name.log"
      kill -INT $srv; wait $srv
      grep -E "ms/step" "$OUT/server_dh_$name.log" | tail -1 | cut -c1-300
    done ;;
  tpcheck)
    timeout ${TPCHECK_S:-200} python3 perf/tp_gpu_check.py >"$OUT/tp_gpu_check.log" 2>&1
    echo "tp_gpu_check exit $?"; tail -16 "$OUT/tp_gpu_check.log" ;;
  esac
done
