#!/usr/bin/env bash
# Run one pretraining recipe on this node with torchrun; the numbered launchers call this.
#
#   launch/pretrain.sh RECIPE [section.key=value ...]
#
#   NPROC_PER_NODE  GPUs on this node (GPUS_PER_NODE, 8)   NNODES     nodes in the job (1)
#   NODE_RANK       this node's rank (0)      MASTER_ADDR / MASTER_PORT  rendezvous (localhost / 29500)
#   SOLO_INIT, SOLO_DATA, SOLO_RUNS           paths the stage recipes read (see each recipe's header)
# Running the same command again resumes from the recipe's checkpoint.save directory.
# On a SLURM cluster use launch/slurm.sbatch instead (same recipes, one srun over all nodes).
# Relative paths in overrides are the caller's (no change of directory); RECIPE is a path from the
# caller's folder or from this checkout's root (megatron_patch/recipes/stage1.yaml).
# SIGTERM (a scheduler's preemption) saves a checkpoint and exits 0; see launch/torchrun_graceful.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
RECIPE="${1:?usage: launch/pretrain.sh RECIPE [section.key=value ...]}"
shift
# Sequence parallelism and the overlapped gradient/parameter collectives need the kernels queued in
# issue order on one hardware queue (what megatron-core asserts for TP communication overlap).
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
# The patch count, hence the size of every activation, changes each micro-batch: expandable
# segments keep the allocator from fragmenting the ~68 of 80 GiB the recipes plan for.
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
if [[ ! -f "$RECIPE" && -f "$ROOT/$RECIPE" ]]; then
  RECIPE="$ROOT/$RECIPE"
fi
source "$ROOT/launch/torchrun_graceful.sh"

run_torchrun \
  --nproc_per_node "${NPROC_PER_NODE:-${GPUS_PER_NODE:-8}}" --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
  --master_addr "${MASTER_ADDR:-localhost}" --master_port "${MASTER_PORT:-29500}" \
  -m megatron_patch.train --config "$RECIPE" "$@"
