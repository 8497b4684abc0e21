"""The SOLO model on megatron-core: layer specs (TE / local) and the GPTModel composition."""

from megatron_patch.model.layer_specs import PackedDotProductAttention, solo_layer_spec
from megatron_patch.model.model import SoloGPTModel, build_transformer_config

__all__ = ["PackedDotProductAttention", "SoloGPTModel", "build_transformer_config", "solo_layer_spec"]
