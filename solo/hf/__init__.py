"""SOLO as native Hugging Face classes (named the transformers way).

Importing this package registers the classes with transformers' Auto factories in this process,
so `AutoConfig` / `AutoModelForCausalLM` resolve model_type "solo" without `trust_remote_code`.
Saved checkpoints also carry the code itself (`auto_map`), for environments without this package.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_solo import SoloConfig
from .image_processing_solo import ImageLoadError, SoloImageProcessor
from .modeling_solo import SoloForCausalLM, SoloModel, SoloPreTrainedModel
from .processing_solo import SoloProcessor

# exist_ok: re-importing (e.g. importlib.reload in a notebook) must not fail.
AutoConfig.register(SoloConfig.model_type, SoloConfig, exist_ok=True)
AutoModel.register(SoloConfig, SoloModel, exist_ok=True)
AutoModelForCausalLM.register(SoloConfig, SoloForCausalLM, exist_ok=True)

__all__ = [
    "ImageLoadError",
    "SoloConfig",
    "SoloForCausalLM",
    "SoloModel",
    "SoloImageProcessor",
    "SoloPreTrainedModel",
    "SoloProcessor",
]
