#!/usr/bin/env bash
# CPU debug run of SOLO pretraining on megatron-core: a ~0.3M-parameter model, the synthetic image
# task unless DATA says otherwise. Running the same command again resumes from SAVE.
#
#   NPROC  processes (2)            TP  tensor-parallel size (1)    PP  pipeline-parallel size (1)
#   ITERS  training iterations (40) SAVE checkpoints + metrics.jsonl (runs/debug_cpu)
#   DATA   synthetic | a packed directory | a mixture YAML (synthetic)
# Extra arguments are recipe overrides, e.g.  launch/debug_cpu.sh data.global_batch_size=8
# PYTHON selects the interpreter (default: python of the active environment). Relative DATA and
# SAVE are the caller's paths (this script does not change directory); the code and recipe are
# this checkout's.
# SIGTERM saves a checkpoint and exits 0 (launch/torchrun_graceful.sh).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

NPROC="${NPROC:-2}"
TP="${TP:-1}"
PP="${PP:-1}"
ITERS="${ITERS:-40}"
SAVE="${SAVE:-runs/debug_cpu}"
DATA="${DATA:-synthetic}"
# One BLAS thread per process: oversubscribed CPU threads make steps 20-50x slower.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

DATA_ARGS=("data.path=$DATA")
if [[ "$DATA" != synthetic ]]; then
  # Real packs: vocabulary and pad id come from the packs' tokenizer, length from the packs.
  DATA_ARGS+=("data.pad_token_id=" "data.seq_length=${SEQ:-4096}")
fi

source "$ROOT/launch/torchrun_graceful.sh"
run_torchrun --standalone --nproc_per_node "$NPROC" -m megatron_patch.train \
  --config "$ROOT/megatron_patch/recipes/debug_cpu.yaml" \
  parallel.tensor_model_parallel_size="$TP" \
  parallel.pipeline_model_parallel_size="$PP" \
  training.train_iters="$ITERS" \
  checkpoint.save="$SAVE" \
  "${DATA_ARGS[@]}" "$@"
