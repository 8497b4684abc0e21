#!/usr/bin/env bash
# SOLO pretraining stage 1: ImageNet-21K + SlimPajama from $SOLO_INIT (README stage table); environment as in launch/pretrain.sh.
exec "$(dirname "$0")/pretrain.sh" megatron_patch/recipes/stage1.yaml "$@"
