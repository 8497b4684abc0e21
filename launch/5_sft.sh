#!/usr/bin/env bash
# SOLO instruction tuning (SFT) with Accelerate + DeepSpeed on this node (docs/sft.md).
#
#   MODEL=/ckpt/solo-stage3-hf DATA=/data/sft.json SAVE=/runs/sft launch/5_sft.sh [section.key=value ...]
#
#   MODEL              Hugging Face SOLO checkpoint to start from (required)
#   DATA               instruction file(s), comma-separated (LLaVA JSON, ShareGPT, OpenAI-chat JSONL), or a
#                      directory packed by `solo-data pack --template mistral` (required)
#   SAVE               run directory: checkpoints, metrics.jsonl, data/ (packed data + report.json), hf/ (export)
#   ACCELERATE_CONFIG  launch/accelerate/zero2.yaml (SOLO's setting), zero3.yaml or ddp.yaml
#   NPROC              processes (GPUs) on this node (GPUS_PER_NODE, 8)
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   several nodes: run this on each (1, 0, localhost, 29501)
#   ITERS              optional cap on optimizer steps (the schedule still spans the whole run)
#   RECIPE             solo (SOLO's hyperparameters) or debug_cpu, or a recipe file (solo)
#   FORMAT             format of instruction files: llava, sharegpt or chat (default: the recipe's, llava)
# Running the same command again resumes from the newest checkpoint in SAVE.
# On CPU with ddp.yaml: ACCELERATE_USE_CPU=1 is set for you (a DeepSpeed config must not have it).
set -euo pipefail
: "${MODEL:?set MODEL to a Hugging Face SOLO checkpoint}" "${DATA:?set DATA to instruction files or a packed directory}"
: "${SAVE:?set SAVE to the run directory}"
# Paths are the caller's: made absolute before moving to the checkout (the accelerate configs name
# their DeepSpeed json relative to it).
MODEL="$(realpath -m "$MODEL")" SAVE="$(realpath -m "$SAVE")"
IFS=, read -ra PARTS <<< "$DATA"
DATA="$(for part in "${PARTS[@]}"; do realpath -m "$part"; done | paste -sd, -)"
cd "$(dirname "$0")/.."
export MODEL DATA SAVE
# Batches of varying length: expandable segments keep the CUDA allocator from fragmenting.
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
CONFIG="${ACCELERATE_CONFIG:-launch/accelerate/zero2.yaml}"
ARGS=()
[[ -n "${FORMAT:-}" ]] && ARGS+=(data.format="$FORMAT")
[[ -n "${ITERS:-}" ]] && ARGS+=(training.max_steps="$ITERS")
EXTRA=()
if [[ "$CONFIG" == *ddp.yaml ]] && ! "${PYTHON:-python}" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export ACCELERATE_USE_CPU=1
  EXTRA=(--mixed_precision no)
fi

PER_NODE="${NPROC:-${GPUS_PER_NODE:-8}}" NNODES="${NNODES:-1}"
if (( NNODES > 1 )); then
  EXTRA+=(--num_machines "$NNODES" --machine_rank "${NODE_RANK:-0}" --main_process_ip "${MASTER_ADDR:?set MASTER_ADDR}")
fi
exec "${PYTHON:-python}" -m accelerate.commands.launch --config_file "$CONFIG" \
  --num_processes "$((PER_NODE * NNODES))" --main_process_port "${MASTER_PORT:-29501}" "${EXTRA[@]}" \
  -m solo.sft --config "${RECIPE:-solo}" "${ARGS[@]}" "$@"
