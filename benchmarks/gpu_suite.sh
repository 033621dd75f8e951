#!/usr/bin/env bash
# Every GPU check and benchmark of the project in one run, for a short lease on one H100/H200.
# Sections run under their own time limits, so one failure does not stop the rest; logs land in
# $OUT (or /tmp/gpu_suite) and a summary prints last. Run from the repository root:
#   bash benchmarks/gpu_suite.sh               # ours only
#   OURS_CMD="bash benchmarks/gpu_suite.sh" bash .anchor/run.sh   # beside TorchTitan (docs/benchmarks.md)
# Knobs: SUITE_SKIP (names: train_bf16 train_fp8 train_bf16_split train_fp8_split
# train_fp8_split_output_fp8 train_bf16_fused_adamw train_fp8_output_fp8 optimizer train_bf16_flash
# float8 rmsnorm check_fp8_fsdp attention train_fp8_recast_weight train_fp8_triton_norm
# train_bf16_triton_norm train_bf16_block_causal),
# SUITE_ONLY (the same names: run only these, in the suite's order),
# SUITE_CONFIG (the training config; default train_configs/llama3_8b_8layers_bench.toml; a dry run
# on CPU: SUITE_CONFIG=train_configs/debug_model.toml, the GPU-only benchmarks exit at once),
# SUITE_STEPS (18, at least 8: 6 warm-up steps + 2 timed),
# SUITE_BUDGET_S (seconds for the whole suite; sections shrink to fit; under the anchor, the limit it
# gives this command, read from its log line in $OUT/ours.log, caps it too).
# The allocator is left as the anchor runs TorchTitan (no PYTORCH_CUDA_ALLOC_CONF), so both peak
# memory figures come from the same allocator settings.
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
STEPS=${SUITE_STEPS:-18}
(( STEPS < 8 )) && STEPS=8  # 6 warm-up steps (compilation) and at least 2 timed ones
BUDGET=${SUITE_BUDGET_S:-100000}  # seconds for the whole suite
# Under the anchor our command runs with `limit Ns` (its log line): stop 15 s before that, so the
# last section's log and the summary still come back.
ANCHOR_LIMIT=$(grep -o 'start at +[0-9]*s, limit [0-9]*s' "${OUT:-/nonexistent}/ours.log" 2>/dev/null | tail -n 1 |
  sed 's/.*limit \([0-9]*\)s/\1/')
if [[ -n "$ANCHOR_LIMIT" ]] && (( ANCHOR_LIMIT - 15 < BUDGET )); then
  BUDGET=$(( ANCHOR_LIMIT - 15 ))
  echo "[suite] budget ${BUDGET}s (the anchor's limit for this command, less 15 s)"
fi
LAST_RC=0
SKIP=" ${SUITE_SKIP:-} "
ONLY=" ${SUITE_ONLY:-} "
SUMMARY=$LOGS/ours_summary.md
: >"$SUMMARY"

finish() {
  echo "[suite] summary"
  cat "$SUMMARY"
  tar -czf "$RESULTS/ours_logs.tgz" -C "$LOGS" . && echo "[suite] logs in $RESULTS/ours_logs.tgz"
}
RUNNING=""
# Stopped from outside (the anchor's timeout): stop the running section too (timeout passes the
# signal on to it; it runs in a process group of its own), then still write the summary.
on_stop() {
  [[ -n "$RUNNING" ]] && kill -TERM "$RUNNING" 2>/dev/null
  echo "[suite] stopped from outside"
  finish
  exit 143
}
trap on_stop TERM INT

section() {  # section NAME LIMIT_SECONDS CMD...: skipped when less than half its limit is left
  local name=$1 limit=$2
  shift 2
  if [[ "$SKIP" == *" $name "* ]]; then echo "[suite] $name skipped"; return 0; fi
  if [[ -n "${ONLY// }" && "$ONLY" != *" $name "* ]]; then echo "[suite] $name not in SUITE_ONLY"; return 0; fi
  local left=$(( BUDGET - SECONDS ))
  local needed=$(( limit / 2 > 20 ? limit / 2 : 20 ))
  (( left < limit )) && limit=$left
  if (( limit < needed )); then echo "[suite] $name skipped: ${left}s left, needs ${needed}s"; return 0; fi
  local t0=$SECONDS
  echo "[suite] $name: start (limit ${limit}s)"
  timeout -k 10 "$limit" "$@" >"$LOGS/$name.log" 2>&1 &
  RUNNING=$!
  wait "$RUNNING"
  local rc=$?
  RUNNING=""
  LAST_RC=$rc
  echo "[suite] $name: rc=$rc after $(( SECONDS - t0 ))s"
  { echo "### $name (rc=$rc, $(( SECONDS - t0 ))s)"
    grep -E '^\||copy bandwidth|CHECK FAILED|^best|^step ' "$LOGS/$name.log"; echo; } >>"$SUMMARY"
  (( rc != 0 )) && tail -n 25 "$LOGS/$name.log"
  tar -czf "$RESULTS/ours_logs.tgz" -C "$LOGS" .  # after every section, in case a later one is cut off
  return 0
}

python3 -c 'import torch, triton; print("[suite] torch", torch.__version__, "triton", triton.__version__,
  "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no cuda")'

CONFIG=${SUITE_CONFIG:-train_configs/llama3_8b_8layers_bench.toml}
BENCH=(python3 benchmarks/throughput.py --config "$CONFIG" --steps "$STEPS" --warmup 6)
# Most informative first: a short lease that runs out still brings back the headline numbers.
# The two headline runs also profile 3 more steps (kernel time by kind), in the same process.
section train_bf16 150 "${BENCH[@]}" --label "bf16" --json "$LOGS/train_bf16.json" --profile-steps 3 --profile-top 40
# auto = cuDNN attention first on sm90: if the bf16 run failed, the Float8 run uses the flash
# kernel rather than fail the same way.
ATTENTION=()
(( LAST_RC != 0 )) && ATTENTION=(--model.sdpa_backend flash) && echo "[suite] train_bf16 failed: train_fp8 uses flash"
section train_fp8 150 "${BENCH[@]}" --label "float8 tensorwise ${ATTENTION[*]}" --json "$LOGS/train_fp8.json" \
  --profile-steps 3 --profile-top 40 --float8.enable --float8.recipe_name tensorwise "${ATTENTION[@]}"
# Split master weights (training.master_weights = "split"): the model computes on bf16 parameters,
# no autocast casts; the optimizer keeps the fp32 value exactly. Same runs as the two above.
section train_bf16_split 150 "${BENCH[@]}" --label "bf16 split-master-weights ${ATTENTION[*]}" \
  --json "$LOGS/train_bf16_split.json" --profile-steps 3 --profile-top 40 --training.master_weights split \
  "${ATTENTION[@]}"
section train_fp8_split 130 "${BENCH[@]}" --label "float8 tensorwise split-master-weights ${ATTENTION[*]}" \
  --json "$LOGS/train_fp8_split.json" --float8.enable --float8.recipe_name tensorwise \
  --training.master_weights split "${ATTENTION[@]}"
section train_fp8_split_output_fp8 130 "${BENCH[@]}" \
  --label "float8 tensorwise split-master-weights, output layer too ${ATTENTION[*]}" \
  --json "$LOGS/train_fp8_split_output_fp8.json" --float8.enable --float8.recipe_name tensorwise \
  --float8.filter_fqns "[]" --training.master_weights split "${ATTENTION[@]}"
# optimizer.implementation = auto runs our Triton AdamW on CUDA: the same run with torch's fused one.
section train_bf16_fused_adamw 130 "${BENCH[@]}" --label "bf16 torch-fused-adamw" --optimizer.implementation fused \
  --json "$LOGS/train_bf16_fused_adamw.json"
# Float8 with the output projection (a sixth of the step's GEMM FLOPs) in fp8 too: not the default
# (TorchTitan also keeps it in high precision), measured to know what it would give.
section train_fp8_output_fp8 130 "${BENCH[@]}" --label "float8 tensorwise, output layer too ${ATTENTION[*]}" \
  --json "$LOGS/train_fp8_output_fp8.json" --float8.enable --float8.recipe_name tensorwise \
  --float8.filter_fqns "[]" "${ATTENTION[@]}"
section optimizer 90 python3 benchmarks/bench_optimizer.py --json "$LOGS/optimizer.json"
# model.sdpa_backend = auto prefers cuDNN attention on sm90: the same run with the flash kernel.
section train_bf16_flash 130 "${BENCH[@]}" --label "bf16 flash-attention" \
  --json "$LOGS/train_bf16_flash.json" --model.sdpa_backend flash
section float8 110 python3 benchmarks/bench_float8.py --quick --sections gemm,sweep --json "$LOGS/float8.json"
section rmsnorm 110 python3 benchmarks/bench_rmsnorm.py --json "$LOGS/rmsnorm.json"
section check_fp8_fsdp 90 python3 benchmarks/check_float8_fsdp.py
section attention 60 python3 benchmarks/bench_attention.py --json "$LOGS/attention.json"
# float8.save_fp8_weight = auto keeps the forward's fp8 W^T for backward on one GPU: the same run
# re-casting W in backward (the behaviour before it; the same bits, 1 B per weight element less).
section train_fp8_recast_weight 130 "${BENCH[@]}" --label "float8 tensorwise, weight re-cast in backward ${ATTENTION[*]}" \
  --json "$LOGS/train_fp8_recast_weight.json" --float8.enable --float8.recipe_name tensorwise \
  --float8.save_fp8_weight never "${ATTENTION[@]}"
section train_fp8_triton_norm 130 "${BENCH[@]}" --label "float8 tensorwise triton-rmsnorm ${ATTENTION[*]}" \
  --json "$LOGS/train_fp8_triton_norm.json" --model.norm_type triton_rmsnorm --float8.enable \
  --float8.recipe_name tensorwise "${ATTENTION[@]}"
section train_bf16_triton_norm 130 "${BENCH[@]}" --label "bf16 triton-rmsnorm (fused residual add)" \
  --json "$LOGS/train_bf16_triton_norm.json" --model.norm_type triton_rmsnorm
# the cost of per-document attention (docs/training.md): a mask rules flash out, cuDNN or efficient run
section train_bf16_block_causal 130 "${BENCH[@]}" --label "bf16 block-causal attention" \
  --json "$LOGS/train_bf16_block_causal.json" --model.attn_mask_type block_causal

finish
