"""Instruction tuning (SFT) of the Hugging Face SOLO model with Accelerate + DeepSpeed.

``accelerate launch --config_file launch/accelerate/<config>.yaml -m solo.sft --config RECIPE [key=value ...]``
"""
