#!/usr/bin/env bash
# Single-node launch: NGPU processes with torchrun, extra arguments passed to the trainer.
#   NGPU=8 CONFIG_FILE=train_configs/llama3_8b.toml ./run_train.sh --training.steps 100
# LOG_RANK picks which ranks' output is shown (torchrun --local-ranks-filter), default 0.
set -euo pipefail

NGPU=${NGPU:-1}
CONFIG_FILE=${CONFIG_FILE:-./train_configs/debug_model.toml}
LOG_RANK=${LOG_RANK:-0}
# Fewer fragmentation OOMs on long runs (no effect on CPU).
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

exec torchrun --nproc-per-node="${NGPU}" --rdzv-backend c10d --rdzv-endpoint="localhost:0" \
  --local-ranks-filter "${LOG_RANK}" --role rank --tee 3 \
  -m torchtitan_like.train --config "${CONFIG_FILE}" "$@"
