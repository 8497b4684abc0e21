#!/usr/bin/env bash
# SOLO instruction tuning (SFT) with Accelerate + DeepSpeed on this node (README "Instruction tuning").
#
#   MODEL=/ckpt/solo-stage3-hf DATA=/data/sft.json SAVE=/runs/sft launch/5_sft.sh [section.key=value ...]
#
#   MODEL              Hugging Face SOLO checkpoint to start from (required)
#   DATA               instruction file(s), comma-separated (LLaVA JSON, ShareGPT, OpenAI-chat JSONL), or a
#                      directory packed by `solo-data pack --template mistral` (required)
#   SAVE               run directory: checkpoints, metrics.jsonl, data/ (packed data + report.json), hf/ (export)
#   ACCELERATE_CONFIG  launch/accelerate/zero2.yaml (SOLO's setting), zero3.yaml or ddp.yaml
#   NPROC              processes (GPUs) on this node (8)
#   ITERS              optional cap on optimizer steps (the schedule still spans the whole run)
#   RECIPE             solo (SOLO's hyperparameters) or debug_cpu, or a recipe file (solo)
#   FORMAT             format of instruction files: llava, sharegpt or chat (default: the recipe's, llava)
# Running the same command again resumes from the newest checkpoint in SAVE.
# On CPU with ddp.yaml: ACCELERATE_USE_CPU=1 is set for you (a DeepSpeed config must not have it).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${MODEL:?set MODEL to a Hugging Face SOLO checkpoint}" "${DATA:?set DATA to instruction files or a packed directory}"
: "${SAVE:?set SAVE to the run directory}"
export MODEL DATA SAVE
CONFIG="${ACCELERATE_CONFIG:-launch/accelerate/zero2.yaml}"
ARGS=()
[[ -n "${FORMAT:-}" ]] && ARGS+=(data.format="$FORMAT")
[[ -n "${ITERS:-}" ]] && ARGS+=(training.max_steps="$ITERS")
EXTRA=()
if [[ "$CONFIG" == *ddp.yaml ]] && ! "${PYTHON:-python}" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export ACCELERATE_USE_CPU=1
  EXTRA=(--mixed_precision no)
fi

exec "${PYTHON:-python}" -m accelerate.commands.launch --config_file "$CONFIG" --num_processes "${NPROC:-8}" \
  --main_process_port "${MASTER_PORT:-29501}" "${EXTRA[@]}" \
  -m solo.sft --config "${RECIPE:-solo}" "${ARGS[@]}" "$@"
