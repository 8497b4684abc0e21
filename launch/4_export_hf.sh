#!/usr/bin/env bash
# Export the last pretraining stage (or any SAVE_DIR) to Hugging Face format.
#
#   CKPT       megatron-core SAVE_DIR or iter_* directory (default: $SOLO_RUNS/stage3)
#   OUT        output directory (default: $SOLO_RUNS/solo-hf)
#   ITERATION  export this iteration instead of the latest (optional)
#   LAYOUT     native (default) | solo7b (the released SOLO-7B layout)
#   SOLO_RUNS  root of the run's outputs (default: runs)
# Extra arguments go to `solo convert mcore-to-hf` (e.g. --dtype bfloat16 --overwrite).
set -euo pipefail
# Paths are the caller's (no change of directory); the code is this checkout's.
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
SOLO_RUNS="${SOLO_RUNS:-runs}"
CKPT="${CKPT:-$SOLO_RUNS/stage3}"
OUT="${OUT:-$SOLO_RUNS/solo-hf}"
ARGS=(--ckpt "$CKPT" --out "$OUT" --layout "${LAYOUT:-native}")
if [[ -n "${ITERATION:-}" ]]; then ARGS+=(--iteration "$ITERATION"); fi

exec "${PYTHON:-python}" -m solo.cli convert mcore-to-hf "${ARGS[@]}" "$@"
