"""SOLO as native Hugging Face classes (named the transformers way).

Getting any class from this package (`from solo.hf import SoloForCausalLM`) registers the classes
with transformers' Auto factories in this process, so `AutoConfig` / `AutoModelForCausalLM`
resolve model_type "solo" without `trust_remote_code`. Saved checkpoints also carry the code itself
(`auto_map`), for environments without this package.

The classes load on first use: importing a light submodule (`solo.hf.image_processing_solo`, which
data preparation uses) does not import the model stack, so `solo-data --help` starts fast.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ImageLoadError": "image_processing_solo",
    "SoloConfig": "configuration_solo",
    "SoloForCausalLM": "modeling_solo",
    "SoloImageProcessor": "image_processing_solo",
    "SoloModel": "modeling_solo",
    "SoloPreTrainedModel": "modeling_solo",
    "SoloProcessor": "processing_solo",
}
__all__ = sorted(_EXPORTS)

_registered = False


def _register_auto_classes() -> None:
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from .configuration_solo import SoloConfig
    from .modeling_solo import SoloForCausalLM, SoloModel

    # exist_ok: re-importing (e.g. importlib.reload in a notebook) must not fail.
    AutoConfig.register(SoloConfig.model_type, SoloConfig, exist_ok=True)
    AutoModel.register(SoloConfig, SoloModel, exist_ok=True)
    AutoModelForCausalLM.register(SoloConfig, SoloForCausalLM, exist_ok=True)
    _registered = True


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    _register_auto_classes()
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
