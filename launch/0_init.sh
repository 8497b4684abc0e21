#!/usr/bin/env bash
# Stage 0: a SOLO model from a base LLM, as the megatron-core checkpoint stage 1 starts from.
#
#   BASE       local Hugging Face Mistral/Llama checkpoint (required)
#   SOLO_HF    where the HF SOLO model goes (default: $SOLO_RUNS/solo-init-hf)
#   SOLO_INIT  where the megatron-core checkpoint goes (default: $SOLO_RUNS/solo-init-megatron);
#              stage 1's recipe reads the same variable (checkpoint.init_from)
#   SOLO_RUNS  root of the run's outputs (default: runs)
# Extra arguments go to `solo create` (e.g. --seed 1 --resize-mode solo).
set -euo pipefail
# Paths are the caller's (no change of directory); the code is this checkout's.
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
BASE="${BASE:?set BASE to a local Hugging Face Mistral/Llama checkpoint directory}"
SOLO_RUNS="${SOLO_RUNS:-runs}"
SOLO_HF="${SOLO_HF:-$SOLO_RUNS/solo-init-hf}"
SOLO_INIT="${SOLO_INIT:-$SOLO_RUNS/solo-init-megatron}"

"${PYTHON:-python}" -m solo.cli create --base "$BASE" --out "$SOLO_HF" "$@"
exec "${PYTHON:-python}" -m solo.cli convert hf-to-mcore --hf "$SOLO_HF" --out "$SOLO_INIT"
