# Sourced by the device scripts (perf/*gpu_check.sh): install the carried wheels (.whl) and this
# tree into fresh folders (a warm machine keeps the last call's install: never run stale code),
# set the environment every run needs, and name the card. Stops the script if the build fails.
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
rm -rf /tmp/site /tmp/lla
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-build-isolation --no-deps --target /tmp/lla . >"$OUT/build.log" 2>&1 || {
  tail -30 "$OUT/build.log"; exit 1; }
export PYTHONPATH=/tmp/lla:/tmp/site NCCL_NVLS_ENABLE=0 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
# At the end of the script that sourced this, $OUT's files go into one archive, $OUT/out_<pid>.tgz
# (each script of a call its own): a device call brings back at most 8 files (unpack here with
# `tar xzf .../out_*.tgz -C /tmp/dev`). KEEP_OUT=1 leaves them as they are.
bundle_out() {
  [ "${KEEP_OUT:-0}" = 1 ] && return
  (cd "$OUT" && ls | grep -v '^out_[0-9]*\.tgz$' | tar czf "out_$$.tgz" -T - --remove-files 2>/dev/null)
}
trap bundle_out EXIT
