#!/usr/bin/env bash
# Every GPU check and benchmark of the project in one run, for a short lease on one H100/H200.
# Sections run under their own time limits, so one failure does not stop the rest; logs land in
# $OUT (or /tmp/gpu_suite) and a summary prints last. Run from the repository root:
#   bash benchmarks/gpu_suite.sh               # ours only
#   OURS_CMD="bash benchmarks/gpu_suite.sh" bash .anchor/run.sh   # beside TorchTitan (docs/benchmarks.md)
# Knobs: SUITE_SKIP (names: train_bf16 train_fp8 train_bf16_flash attention profile_bf16 profile_fp8 check_fp8_fsdp float8
# rmsnorm train_bf16_triton_norm),
# SUITE_STEPS (18),
# SUITE_BUDGET_S (seconds for the whole suite; sections shrink to fit).
set -u
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
LOGS=/tmp/gpu_suite
rm -rf "$LOGS"
mkdir -p "$LOGS"
# A lease brings back at most 8 files from $OUT: the logs travel as one archive.
RESULTS=${OUT:-/tmp/gpu_suite_out}
mkdir -p "$RESULTS"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$ROOT
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
STEPS=${SUITE_STEPS:-18}
BUDGET=${SUITE_BUDGET_S:-100000}  # seconds for the whole suite
SKIP=" ${SUITE_SKIP:-} "
SUMMARY=$LOGS/ours_summary.md
: >"$SUMMARY"

section() {  # section NAME LIMIT_SECONDS CMD...
  local name=$1 limit=$2
  shift 2
  if [[ "$SKIP" == *" $name "* ]]; then echo "[suite] $name skipped"; return 0; fi
  local left=$(( BUDGET - SECONDS ))
  (( left < limit )) && limit=$left
  if (( limit < 20 )); then echo "[suite] $name skipped: budget spent"; return 0; fi
  local t0=$SECONDS
  echo "[suite] $name: start (limit ${limit}s)"
  timeout -k 10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  echo "[suite] $name: rc=$rc after $(( SECONDS - t0 ))s"
  { echo "### $name (rc=$rc, $(( SECONDS - t0 ))s)"; grep -E '^\|' "$LOGS/$name.log"; echo; } >>"$SUMMARY"
  (( rc != 0 )) && tail -n 25 "$LOGS/$name.log"
  tar -czf "$RESULTS/ours_logs.tgz" -C "$LOGS" .  # after every section, in case a later one is cut off
  return 0
}

python3 -c 'import torch, triton; print("[suite] torch", torch.__version__, "triton", triton.__version__,
  "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no cuda")'

BENCH=(python3 benchmarks/throughput.py --config train_configs/llama3_8b_8layers_bench.toml --steps "$STEPS" --warmup 6)
PROFILE=(python3 benchmarks/profile_step.py --config train_configs/llama3_8b_8layers_bench.toml --warmup 6 --steps 3)
# Most informative first: a short lease that runs out still brings back the headline numbers.
section train_bf16 130 "${BENCH[@]}" --label "bf16 torch-rmsnorm" --json "$LOGS/train_bf16.json"
section train_fp8 130 "${BENCH[@]}" --label "float8 tensorwise triton-rmsnorm" --json "$LOGS/train_fp8.json" \
  --model.norm_type triton_rmsnorm --float8.enable --float8.recipe_name tensorwise
# model.sdpa_backend = auto prefers cuDNN attention on sm90: the same run with the flash kernel.
section train_bf16_flash 130 "${BENCH[@]}" --label "bf16 torch-rmsnorm flash-attention" \
  --json "$LOGS/train_bf16_flash.json" --model.sdpa_backend flash
section attention 60 python3 benchmarks/bench_attention.py --json "$LOGS/attention.json"
section profile_bf16 120 "${PROFILE[@]}" --label "bf16 torch-rmsnorm, kernel time by kind" \
  --json "$LOGS/profile_bf16.json"
section profile_fp8 120 "${PROFILE[@]}" --label "float8 tensorwise, kernel time by kind" \
  --json "$LOGS/profile_fp8.json" --model.norm_type triton_rmsnorm --float8.enable --float8.recipe_name tensorwise
section check_fp8_fsdp 90 python3 benchmarks/check_float8_fsdp.py
section float8 110 python3 benchmarks/bench_float8.py --quick --sections gemm,sweep --json "$LOGS/float8.json"
section rmsnorm 110 python3 benchmarks/bench_rmsnorm.py --sweep --json "$LOGS/rmsnorm.json"
section train_bf16_triton_norm 130 "${BENCH[@]}" --label "bf16 triton-rmsnorm (fused residual add)" \
  --json "$LOGS/train_bf16_triton_norm.json" --model.norm_type triton_rmsnorm

echo "[suite] summary"
cat "$SUMMARY"
tar -czf "$RESULTS/ours_logs.tgz" -C "$LOGS" . && echo "[suite] logs in $RESULTS/ours_logs.tgz"
