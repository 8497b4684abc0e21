#!/usr/bin/env bash
# SOLO pretraining stage 3: annealing, from $SOLO_RUNS/stage2 (README stage table); environment as in launch/pretrain.sh.
exec "$(dirname "$0")/pretrain.sh" megatron_patch/recipes/stage3.yaml "$@"
