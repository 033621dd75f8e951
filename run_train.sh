#!/usr/bin/env bash
# Single-node launch: NGPU processes with torchrun; extra arguments go to the trainer.
#
#   NGPU=8 CONFIG_FILE=train_configs/llama3_8b.toml ./run_train.sh --training.steps 100
#
# Environment:
#   NGPU         processes (GPUs) on this node, default 1 (on a CPU-only machine: CPU processes, gloo)
#   CONFIG_FILE  training TOML, default ./train_configs/debug_model.toml
#   LOG_RANK     ranks whose output is shown, e.g. 0 or 0,7 (torchrun --local-ranks-filter), default 0
#   LOG_DIR      if set, every rank's stdout/stderr is also written to files under this folder
#   SKIP_CONFIG_CHECK=1  start torchrun without the one-process config check first
#   DRY_RUN=1    print the torchrun command instead of running it (no config check either)
# Multi-node runs: multinode_trainer.slurm (Slurm), see docs/operations.md.
set -euo pipefail

NGPU=${NGPU:-1}
CONFIG_FILE=${CONFIG_FILE:-./train_configs/debug_model.toml}
LOG_RANK=${LOG_RANK:-0}
DRY_RUN=${DRY_RUN:-0}
SKIP_CONFIG_CHECK=${SKIP_CONFIG_CHECK:-0}
LOG_DIR=${LOG_DIR:-}

if ! [[ "${NGPU}" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: NGPU=${NGPU}: must be a positive integer (processes on this node)" >&2
  exit 2
fi
if [[ ! -f "${CONFIG_FILE}" ]]; then
  echo "error: CONFIG_FILE=${CONFIG_FILE}: no such file (see train_configs/)" >&2
  exit 2
fi

# Freed blocks of different sizes can be merged: fewer fragmentation OOMs on long runs with varying
# shapes. No effect on CPU.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

# c10d rendezvous on localhost port 0: torchrun picks a free port, so two jobs on one node do not
# collide. --tee 3 keeps every rank's stdout and stderr in torchrun's log folder as well.
command=(torchrun --nproc-per-node="${NGPU}" --rdzv-backend=c10d --rdzv-endpoint="localhost:0"
  --local-ranks-filter="${LOG_RANK}" --role=rank --tee=3)
if [[ -n "${LOG_DIR}" ]]; then
  command+=(--log-dir="${LOG_DIR}")  # per-rank log files: LOG_DIR/<run id>/attempt_N/<rank>/std{out,err}.log
fi
command+=(-m torchtitan_like.train --config "${CONFIG_FILE}" "$@")

if [[ "${DRY_RUN}" == "1" ]]; then
  printf '%q ' "${command[@]}"
  printf '\n'
  exit 0
fi
# One process runs the trainer's start-up checks for NGPU processes first (a few seconds, no process
# group, no model): a config mistake then prints one error line and the script exits 2, where under
# torchrun every rank would print it and torchrun would exit 1.
if [[ "${SKIP_CONFIG_CHECK}" != "1" ]]; then
  WORLD_SIZE="${NGPU}" python3 -m torchtitan_like.train --check-config --config "${CONFIG_FILE}" "$@"
fi
exec "${command[@]}"
