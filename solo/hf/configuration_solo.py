"""Configuration of a SOLO model: a Mistral (or Llama) decoder that also reads raw image patches.

Shipped next to exported checkpoints as `trust_remote_code` code, so it imports only the standard
library, torch and transformers, and sibling modules relatively.

Compatibility with the released SOLO-7B: its `config.json` says `model_type: "mistral"`,
`architectures: ["SoloForCausalLM"]` and `vision_patch_size: 32`. `SoloConfig.from_pretrained`
reads such a directory (and plain Mistral or Llama directories, to start a SOLO model from a
text LLM) without the "model of type mistral to instantiate a model of type solo" warning,
because SoloConfig is a strict superset of those configurations.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import MistralConfig

from .native_vision import check_switches

# model_type values whose config.json a SoloConfig can read as is (SOLO-7B declares "mistral").
_COMPATIBLE_MODEL_TYPES = ("mistral", "llama")


class SoloConfig(MistralConfig):
    """A `MistralConfig` plus the patch-embedding fields of a SOLO model.

    Args (beyond MistralConfig's):
        vision_patch_size: side of a square image patch in pixels (32 for SOLO-7B).
        num_channels: colour channels per pixel (3, RGB).
        image_attention: ``causal`` (SOLO) or ``bidirectional`` (an image block's tokens see each
            other both ways); see `native_vision`.
        vision_positions: ``sequential`` (SOLO) or ``2d`` (rotary row/column sections for patches);
            see `native_vision` for the exact rule.

    A patch enters the model as a flat vector of `num_channels * vision_patch_size**2` values
    (3072 for SOLO-7B) in (channel, y, x) order, through one bias-free linear layer.

    A Llama backbone is the same network with `sliding_window=None` (full causal attention):
    Llama and Mistral share layer names and maths as long as Llama's optional biases are off.

    Sliding window, SOLO-7B's semantics: `sliding_window=W` in `config.json` and in the constructor
    means that a token sees itself and the W tokens before it (W+1 keys), as in SOLO's released
    modeling code and its Megatron pretraining (flash-attn `window_size=(W, W)` under a causal mask).
    transformers' Mistral code (masks, flash-attention window, sliding caches) reads the attribute
    `sliding_window` as the number of keys INCLUDING the query, so the attribute holds W+1 and
    `to_dict` writes W back; `attention_window` gives W. A released SOLO-7B `config.json` with
    `sliding_window: 4096` therefore gives SOLO-7B's function (4,097 keys).
    """

    model_type = "solo"

    vision_patch_size: int = 32
    num_channels: int = 3
    image_attention: str = "causal"
    vision_positions: str = "sequential"

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if self.sliding_window is not None:
            if not isinstance(self.sliding_window, int) or self.sliding_window < 1:
                raise ValueError(f"sliding_window must be a positive int or None, got {self.sliding_window!r}")
            self.sliding_window = self.sliding_window + 1  # SOLO's W earlier tokens -> W+1 keys (see class doc)
        if not isinstance(self.vision_patch_size, int) or self.vision_patch_size < 1:
            raise ValueError(f"vision_patch_size must be a positive int, got {self.vision_patch_size!r}")
        if not isinstance(self.num_channels, int) or self.num_channels < 1:
            raise ValueError(f"num_channels must be a positive int, got {self.num_channels!r}")
        check_switches(self.image_attention, self.vision_positions)
        # Llama checkpoints with biases would load with their bias weights silently dropped.
        for flag in ("attention_bias", "mlp_bias"):
            if getattr(self, flag, False):
                raise ValueError(
                    f"{flag}=True is not supported: SOLO layers are Mistral layers without biases. "
                    "Only bias-free Llama backbones can be used."
                )

    @property
    def attention_window(self) -> int | None:
        """Earlier tokens a query sees (SOLO-7B's `sliding_window` number), None for full attention."""
        return None if self.sliding_window is None else self.sliding_window - 1

    def to_dict(self) -> dict[str, Any]:
        """The config as `config.json` holds it: SOLO-7B's window number, and `rope_theta` also at the
        top level (SOLO's released code and transformers < 5 read only that; without it they silently
        use 10,000)."""
        output = super().to_dict()
        if output.get("sliding_window") is not None:
            output["sliding_window"] = output["sliding_window"] - 1
        rope = output.get("rope_parameters")
        if isinstance(rope, dict) and "rope_theta" in rope:
            output["rope_theta"] = rope["rope_theta"]
        return output

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch vector: num_channels * vision_patch_size ** 2."""
        return self.num_channels * self.vision_patch_size * self.vision_patch_size

    @classmethod
    def get_config_dict(
        cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Read a config dict, accepting released SOLO-7B ("mistral") and Llama configs as SOLO ones."""
        config_dict, unused_kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        source_type = config_dict.get("model_type")
        if source_type in _COMPATIBLE_MODEL_TYPES:
            config_dict = dict(config_dict)
            if source_type == "llama" and "sliding_window" not in config_dict:
                # Llama attends to the full causal context; Mistral's default window would be wrong.
                config_dict["sliding_window"] = None
            config_dict["model_type"] = cls.model_type
        return config_dict, unused_kwargs


# Makes `save_pretrained` copy this file next to the weights and record it in `auto_map`.
SoloConfig.register_for_auto_class()

__all__ = ["SoloConfig"]
