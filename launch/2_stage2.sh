#!/usr/bin/env bash
# SOLO pretraining stage 2: captions/OCR + text, from $SOLO_RUNS/stage1 (README stage table); environment as in launch/pretrain.sh.
exec "$(dirname "$0")/pretrain.sh" megatron_patch/recipes/stage2.yaml "$@"
