"""The SOLO model on megatron-core: packed attention, layer specs (TE / flex / local) and the GPTModel
composition."""

from megatron_patch.model.attention import PackedDotProductAttention
from megatron_patch.model.layer_specs import solo_layer_spec
from megatron_patch.model.model import SoloGPTModel, build_transformer_config

__all__ = ["PackedDotProductAttention", "SoloGPTModel", "build_transformer_config", "solo_layer_spec"]
