"""SOLO as a native Hugging Face model: one Mistral/Llama decoder reading text tokens and raw image patches.

There is no vision encoder. A patch position's input embedding is

    E[<vpatch>] + W · normalise(patch)

where E is the token embedding, `<vpatch>` the placeholder token at that position, and W the
bias-free linear layer `model.embed_vision_patch` (patch_dim → hidden). Weight names are those of
the released SOLO-7B (`model.embed_tokens.weight`, `model.layers.*` as in Mistral, `model.norm.weight`,
`model.embed_vision_patch.weight`, `lm_head.weight`), so its safetensors load unchanged.

Patch inputs (names as in the released SOLO code):
  * `vision_patches`: (N_total, patch_dim), flat over the whole batch, one row per patch, each
    row in (channel, y, x) order. uint8 pixels are normalised in the model (ImageNet mean/std, see
    `normalize_patches`); a floating tensor is taken as ALREADY normalised, which is what the
    released SOLO code passes (normalised bf16).
  * `vision_patch_indices`: (B, S) integers; -1 at non-patch positions, else the row of
    `vision_patches` that goes there.

This file is shipped next to exported checkpoints as `trust_remote_code` code: it imports only
torch, transformers and sibling modules (relatively).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.mistral.modeling_mistral import MistralModel, MistralPreTrainedModel, MistralRotaryEmbedding
from transformers.utils import can_return_tuple

from .configuration_solo import SoloConfig
from .image_processing_solo import normalize_patches
from .native_vision import (
    column_frequencies,
    image_block_ids,
    image_layout_from_patch_indices,
    image_position_shift,
    rope_section_positions,
)

IGNORE_INDEX = -100  # label value that carries no loss (the Hugging Face convention)
NO_PATCH = -1  # vision_patch_indices value of a position that holds no patch

# transformers 5.x renamed the key/value cache argument from `past_key_values` to `cache`. Our
# forward signatures name both (generate() checks its kwargs against them, and passes `cache` in
# 5.24) and hand the backbone whichever name it takes.
_BACKBONE_CACHE_ARG = "cache" if "cache" in inspect.signature(MistralModel.forward).parameters else "past_key_values"
_OUTPUT_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _merge_cache_arguments(past_key_values: Cache | None, cache: Cache | None) -> Cache | None:
    """Return the one cache given either as `past_key_values` (SOLO name) or `cache` (transformers 5 name)."""
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the key/value cache as either `past_key_values` or `cache`, not both")
    return past_key_values if past_key_values is not None else cache


def check_vision_inputs(
    vision_patches: torch.Tensor | None,
    vision_patch_indices: torch.Tensor | None,
    sequence_shape: tuple[int, int],
    patch_dim: int,
) -> bool:
    """Validate patch inputs; return whether any position holds a patch.

    Raises a ValueError/TypeError naming the shapes unless: indices are an integer (B, S) tensor
    matching the token sequence; no value is below -1; patches are a 2-D (N, patch_dim) uint8 or
    floating tensor; every index is < N; patch positions have patches to point to. It costs one
    device sync; during generation the model gets patches only at prefill, never per decode step.
    """
    if vision_patch_indices is None:
        if vision_patches is not None and vision_patches.numel() > 0:
            raise ValueError(
                f"vision_patches of shape {tuple(vision_patches.shape)} were given without vision_patch_indices; "
                "pass a (batch, seq_len) tensor with -1 at text positions and the patch row elsewhere"
            )
        return False
    if vision_patch_indices.is_floating_point() or vision_patch_indices.dtype == torch.bool:
        raise TypeError(
            f"vision_patch_indices must be an integer tensor, got {vision_patch_indices.dtype} "
            f"(shape {tuple(vision_patch_indices.shape)}); were vision_patches and vision_patch_indices swapped?"
        )
    if tuple(vision_patch_indices.shape) != tuple(sequence_shape):
        raise ValueError(
            f"vision_patch_indices has shape {tuple(vision_patch_indices.shape)} but the token sequence is "
            f"{tuple(sequence_shape)} (batch, seq_len); they must match position for position"
        )
    if vision_patch_indices.numel() == 0:
        return False
    lowest, highest = int(vision_patch_indices.min()), int(vision_patch_indices.max())
    if lowest < NO_PATCH:
        raise ValueError(f"vision_patch_indices must be >= -1 (-1 marks text positions), found {lowest}")
    if highest == NO_PATCH:
        return False
    if vision_patches is None:
        raise ValueError(
            f"vision_patch_indices of shape {tuple(vision_patch_indices.shape)} point at patches "
            f"(max index {highest}) but vision_patches is None"
        )
    if vision_patches.dim() != 2 or vision_patches.shape[-1] != patch_dim:
        raise ValueError(
            f"vision_patches must have shape (num_patches, {patch_dim}) = (N, num_channels * patch_size**2), "
            f"got {tuple(vision_patches.shape)}"
        )
    if vision_patches.dtype != torch.uint8 and not vision_patches.is_floating_point():
        raise TypeError(
            f"vision_patches must be uint8 pixels or already-normalised floats, got {vision_patches.dtype}"
        )
    if highest >= vision_patches.shape[0]:
        raise ValueError(
            f"vision_patch_indices refers to patch {highest} but vision_patches has shape "
            f"{tuple(vision_patches.shape)} (only {vision_patches.shape[0]} patches); indices are global "
            "over the batch's flat patch tensor, so offset each sample's indices by the patches before it"
        )
    return True


class SoloPreTrainedModel(MistralPreTrainedModel):
    """Base class tying SOLO models to `SoloConfig`; weight init and attention backends as Mistral's."""

    config: SoloConfig
    config_class = SoloConfig
    base_model_prefix = "model"


class SoloRotaryEmbedding(MistralRotaryEmbedding):
    """Mistral's rotary embedding, read at two-section positions under ``vision_positions=2d``.

    `SoloModel.forward` sets :attr:`section_positions` ((2, B, S): row and column section, see
    `native_vision`) around the backbone call; frequency i turns by the column section when i is
    odd, else by the row section. Unset, it is Mistral's. No weights of its own.
    """

    section_positions: torch.Tensor | None = None

    def forward(self, x, position_ids):
        if self.section_positions is None:
            return super().forward(x, position_ids)
        inv_freq = self.inv_freq.to(device=x.device, dtype=torch.float)
        row, col = (p[..., None].float() * inv_freq for p in self.section_positions.to(x.device))
        freqs = torch.where(column_frequencies(inv_freq.shape[0], device=x.device), col, row)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


class SoloModel(SoloPreTrainedModel, MistralModel):
    """The SOLO decoder: `MistralModel` plus `embed_vision_patch`, a bias-free patch_dim → hidden linear.

    Returns hidden states (no LM head). See the module docstring for the patch inputs.
    """

    def __init__(self, config: SoloConfig):
        super().__init__(config)
        self.embed_vision_patch = nn.Linear(config.patch_dim, config.hidden_size, bias=False)
        if config.vision_positions == "2d":
            self.rotary_emb = SoloRotaryEmbedding(config)
        # MistralModel.__init__ already ran post_init; run it again so the new layer gets the
        # library's N(0, initializer_range) init (layers initialised before are skipped).
        self.post_init()

    def project_patches(self, vision_patches: torch.Tensor) -> torch.Tensor:
        """(N, patch_dim) uint8 pixels or pre-normalised floats → (N, hidden) patch embeddings W·patch."""
        weight = self.embed_vision_patch.weight
        vision_patches = vision_patches.to(weight.device)
        if vision_patches.dtype == torch.uint8:
            # Normalise in fp32 (exact ImageNet statistics), then run the layer in the model's dtype.
            vision_patches = normalize_patches(vision_patches, dtype=torch.float32)
        return self.embed_vision_patch(vision_patches.to(weight.dtype))

    def add_patch_embeddings(
        self,
        inputs_embeds: torch.Tensor,
        vision_patches: torch.Tensor | None,
        vision_patch_indices: torch.Tensor | None,
    ) -> torch.Tensor:
        """Return `inputs_embeds` with W·normalise(patch) added at every position whose index is >= 0.

        Positions with index -1 are returned bit-for-bit unchanged. Validates the inputs first.
        """
        has_patches = check_vision_inputs(
            vision_patches, vision_patch_indices, tuple(inputs_embeds.shape[:2]), self.config.patch_dim
        )
        if not has_patches:
            return inputs_embeds
        indices = vision_patch_indices.to(device=inputs_embeds.device, dtype=torch.long)
        is_patch = indices >= 0
        patch_embeds = self.project_patches(vision_patches).to(inputs_embeds.dtype)
        # Gather with -1 clamped to row 0, then keep the sum only where there really is a patch:
        # static shapes, and text positions are never touched.
        gathered = patch_embeds[indices.clamp(min=0)]
        return torch.where(is_patch.unsqueeze(-1), inputs_embeds + gathered, inputs_embeds)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        vision_patches: torch.Tensor | None = None,
        vision_patch_indices: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cache: Cache | None = None,
        rope_deltas: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        """Embed tokens, add patch embeddings at patch positions, run the Mistral decoder.

        If `inputs_embeds` is given instead of `input_ids`, the patch embeddings are added to it.
        `cache` (the transformers 5 name) is accepted as an alias of `past_key_values`;
        `return_dict=False` gives a tuple, as Mistral does. Under `image_attention=bidirectional`
        the image blocks of this call attend both ways; under `vision_positions=2d` the rotary
        positions follow `native_vision` (`rope_deltas` (B, 1): added to the positions of a step
        whose earlier images are in the cache; `generate` passes it).
        """
        cache = _merge_cache_arguments(past_key_values, cache)
        if is_packed(attention_mask, position_ids, cache):
            use_cache = False  # a new cache would switch off the per-document masks (and cannot continue a pack)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        inputs_embeds = self.add_patch_embeddings(inputs_embeds, vision_patches, vision_patch_indices)
        layouts = None
        if vision_patch_indices is not None and (
            self.config.image_attention == "bidirectional" or self.config.vision_positions == "2d"
        ):
            layouts = [image_layout_from_patch_indices(row) for row in vision_patch_indices]
        if self.config.image_attention == "bidirectional" and layouts and any(len(lay) for lay in layouts):
            attention_mask = self._image_block_mask(inputs_embeds, attention_mask, cache, position_ids, layouts)
        if self.config.vision_positions == "2d":
            self.rotary_emb.section_positions = self._section_positions(
                inputs_embeds, position_ids, cache, rope_deltas, layouts
            )
        kwargs[_BACKBONE_CACHE_ARG] = cache
        try:
            return super().forward(
                input_ids=None,
                attention_mask=attention_mask,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                **kwargs,
            )
        finally:
            if self.config.vision_positions == "2d":
                self.rotary_emb.section_positions = None

    def _image_block_mask(self, inputs_embeds, attention_mask, cache, position_ids, layouts):
        """The model's causal (packed, windowed) mask with each image block opened both ways:
        transformers' `block_sequence_ids` overlay, over this call's tokens after the cached ones."""
        if self.config._attn_implementation not in ("sdpa", "eager", "flex_attention"):
            raise ValueError(
                f"image_attention=bidirectional needs attn_implementation sdpa, eager or flex_attention "
                f"(got {self.config._attn_implementation!r}, which cannot take an image-block mask)"
            )
        length = inputs_embeds.shape[1]
        blocks = torch.stack([image_block_ids(layout, length) for layout in layouts])
        past = cache.get_seq_length() if cache is not None else 0
        if past:
            blocks = F.pad(blocks, (past, 0), value=-1)
        mask_function = create_causal_mask if self.config.sliding_window is None else create_sliding_window_causal_mask
        return mask_function(
            config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache,
            position_ids=position_ids, block_sequence_ids=blocks,
        )

    @staticmethod
    def _section_positions(inputs_embeds, position_ids, cache, rope_deltas, layouts) -> torch.Tensor:
        """(2, B, S) row/column section positions of this call (`native_vision.rope_section_positions`)."""
        batch, length = inputs_embeds.shape[:2]
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(past, past + length, device=inputs_embeds.device)[None]
        position_ids = position_ids.to(inputs_embeds.device).expand(batch, length)
        if rope_deltas is not None:
            position_ids = position_ids + rope_deltas.to(position_ids.device).reshape(batch, 1)
        no_images = torch.zeros(0, 3, dtype=torch.long, device=inputs_embeds.device)
        return torch.stack([
            rope_section_positions(position_ids[b], layouts[b] if layouts else no_images) for b in range(batch)
        ], dim=1)


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor | None, num_items_in_batch: int | torch.Tensor | None = None,
    *, shift_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy: logits at t predict labels at t+1; labels == -100 carry no loss.

    `shift_labels` (transformers' name, e.g. from context-parallel splitting) are labels already
    shifted: logits at t predict `shift_labels` at t. When given they are used (and `labels` not), as
    transformers' causal-LM loss does.
    Returns the mean over labelled tokens, or the sum divided by `num_items_in_batch` when given
    (per-token normalisation across micro-batches, as the HF Trainer passes it). A batch without
    any labelled token gives 0 (finite, attached to the graph, zero gradient) instead of NaN.
    """
    if labels is None and shift_labels is None:
        raise ValueError("causal_lm_loss needs labels or shift_labels")
    if shift_labels is None:
        shift_logits = logits[:, :-1, :].float()
        shift_labels = labels[:, 1:]
    else:
        shift_logits = logits.float()
    shift_labels = shift_labels.to(shift_logits.device)
    total = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    if num_items_in_batch is None:
        num_items_in_batch = (shift_labels != IGNORE_INDEX).sum()
    if isinstance(num_items_in_batch, torch.Tensor):
        denominator = num_items_in_batch.to(total.device).clamp(min=1)
    else:
        denominator = max(int(num_items_in_batch), 1)
    return total / denominator


class SoloForCausalLM(SoloPreTrainedModel, GenerationMixin):
    """SOLO with a language-model head: text + image patches in, next-token logits (and loss) out."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: SoloConfig):
        super().__init__(config)
        self.model = SoloModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        vision_patches: torch.Tensor | None = None,
        vision_patch_indices: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits for every position (or the last `logits_to_keep`), and the loss when `labels` are given.

        Args:
            input_ids: (B, S) token ids; each patch position holds the `<vpatch>` token.
            attention_mask: (B, S) 1 for real tokens, 0 for padding.
            vision_patches: (N_total, patch_dim) patches of the whole batch; uint8 pixels (normalised
                here) or already-normalised floats (used as given, as released SOLO passes them).
            vision_patch_indices: (B, S) -1 at non-patch positions, else the row of `vision_patches`.
            position_ids, past_key_values (alias `cache`), inputs_embeds, use_cache: as in Mistral.
            labels: (B, S), shifted inside; -100 marks tokens without loss. Loss is the mean over
                labelled tokens (0, not NaN, when there are none); pass `num_items_in_batch` to
                divide the sum by a global token count instead. `shift_labels=` (keyword, as
                transformers names it): labels already shifted, used instead of `labels` when given.
            logits_to_keep: if > 0, compute logits only for the last that many positions.
            return_dict: False gives the output as a tuple (loss first when there is one).
        """
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        shift_labels = kwargs.pop("shift_labels", None)
        cache = _merge_cache_arguments(past_key_values, cache)
        supervised = labels is not None or shift_labels is not None
        if supervised and not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
            raise ValueError("labels need logits for every position; do not combine them with logits_to_keep")
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            vision_patches=vision_patches,
            vision_patch_indices=vision_patch_indices,
            position_ids=position_ids,
            past_key_values=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,  # fields by name below; `can_return_tuple` makes the tuple if asked
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            keep = slice(-logits_to_keep, None) if logits_to_keep > 0 else slice(None)
            logits = self.lm_head(hidden_states[:, keep, :])
        else:
            logits = self.lm_head(hidden_states[:, logits_to_keep, :])

        loss = None
        if supervised:
            for name, given in (("labels", labels), ("shift_labels", shift_labels)):
                if given is not None and tuple(given.shape) != tuple(logits.shape[:2]):
                    raise ValueError(
                        f"{name} have shape {tuple(given.shape)} but the sequence is {tuple(logits.shape[:2])}"
                    )
            loss = causal_lm_loss(logits, labels, num_items_in_batch, shift_labels=shift_labels)

        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{_OUTPUT_CACHE_FIELD: getattr(outputs, _OUTPUT_CACHE_FIELD, None)},
        )

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        vision_patches: torch.Tensor | None = None,
        vision_patch_indices: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Generation inputs for one step; patches go in only for steps that contain patch positions.

        `vision_patch_indices` given to `generate` cover the prompt. A step feeds the positions
        [cached, cached + step_len) of the sequence; the matching slice of the indices is passed
        only if it contains a patch. With a cache that means the prefill alone: patches are
        projected once and never during decode steps (SOLO re-projected them every step).
        `generate(inputs_embeds=...)` works the same way: the prompt's embeddings go in at the
        first step, with the patch embeddings added to them there.
        """
        model_inputs = super().prepare_inputs_for_generation(input_ids, inputs_embeds=inputs_embeds, **kwargs)
        if vision_patch_indices is None:
            if vision_patches is not None:
                raise ValueError("generate() got vision_patches without vision_patch_indices")
            return model_inputs
        step_inputs = model_inputs.get("inputs_embeds")
        if step_inputs is None:
            step_inputs = model_inputs["input_ids"]
        step_len = step_inputs.shape[1]
        cache = model_inputs.get("cache", model_inputs.get("past_key_values"))
        start = cache.get_seq_length() if cache is not None else 0
        window = vision_patch_indices[:, start : start + step_len]
        if window.shape[1] < step_len:
            # Generated tokens are never patches.
            pad = window.new_full((window.shape[0], step_len - window.shape[1]), NO_PATCH)
            window = torch.cat([window, pad], dim=1)
        if bool((window >= 0).any()):
            model_inputs["vision_patches"] = vision_patches
            model_inputs["vision_patch_indices"] = window
        if self.config.vision_positions == "2d" and start > 0:
            # Text after the cached images continues after their largest 2-D position.
            model_inputs["rope_deltas"] = torch.stack([
                -image_position_shift(image_layout_from_patch_indices(row[:start])) for row in vision_patch_indices
            ]).reshape(-1, 1)
        return model_inputs

    def _expand_inputs_for_generation(
        self,
        expand_size: int = 1,
        is_encoder_decoder: bool = False,
        input_ids: torch.LongTensor | None = None,
        **model_kwargs: Any,
    ) -> tuple[torch.LongTensor | None, dict[str, Any]]:
        # Beams / num_return_sequences repeat each row of the batch. `vision_patches` is flat over
        # the batch and indexed globally, so repeating the rows of the indices is enough: repeating
        # the patches too would point every index at the wrong patch.
        vision_patches = model_kwargs.pop("vision_patches", None)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        if vision_patches is not None:
            model_kwargs["vision_patches"] = vision_patches
        return input_ids, model_kwargs


# ----------------------------------------------------------------------------------------------
# Packed sequences: several documents in one row, each attending only to itself.
#
# A packed row is given as `position_ids` that restart at 0 at every document start, with
# `attention_mask=None`. transformers then derives the documents from the restarts and builds the
# model's own mask (causal, and the sliding window with the model's semantics) per document: a
# block-diagonal mask for sdpa/eager, varlen (cu_seqlens) kernels for flash-attention. Rotary
# positions restart with the position ids. An attention_mask or a key/value cache would switch that
# detection off and let documents attend to each other: packed rows run without a cache, and an
# attention_mask with them is refused.
# ----------------------------------------------------------------------------------------------


def packed_position_ids(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    """(length,) position ids restarting at each boundary of `cu_seqlens` = [0, end_1, ..., end_D].

    Positions from `cu_seqlens[-1]` to `length` (padding) count up from 0 as one more document.
    """
    cu_seqlens = cu_seqlens.to(torch.long)
    ends = cu_seqlens[1:]
    if int(cu_seqlens[0]) != 0 or bool((ends[1:] < ends[:-1]).any()) or int(cu_seqlens[-1]) > length:
        raise ValueError(f"cu_seqlens must rise from 0 to at most {length}, got {cu_seqlens.tolist()}")
    if int(cu_seqlens[-1]) < length:
        cu_seqlens = torch.cat([cu_seqlens, cu_seqlens.new_tensor([length])])
    positions = torch.arange(length, dtype=torch.long)
    starts = cu_seqlens[:-1].repeat_interleave(torch.diff(cu_seqlens))
    return positions - starts


def is_packed(attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None, cache: Cache | None) -> bool:
    """Whether the rows are packed (position ids restart between attended tokens, no cache given).

    Packed rows with an attention_mask are refused: the mask would let documents attend to each other.
    """
    if position_ids is None or cache is not None or position_ids.shape[-1] < 2:
        return False
    if attention_mask is not None and attention_mask.dim() != 2:
        return False  # a caller's own 4-D mask says itself which tokens see each other
    restarts = torch.diff(position_ids, dim=-1) != 1
    if attention_mask is not None:
        attended = attention_mask.bool()
        restarts = restarts & attended[:, 1:] & attended[:, :-1]
    if not bool(restarts.any()):
        return False
    if attention_mask is not None:
        raise ValueError(
            "position_ids restart inside a row (packed documents) but an attention_mask was given: with a mask, "
            "documents would attend to each other. Pass attention_mask=None for packed rows; the per-document "
            "mask is built from position_ids"
        )
    return True


# Makes `save_pretrained` copy this file (and its relative imports) next to the weights and write
# `auto_map`, so `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` works anywhere.
SoloForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "SoloForCausalLM",
    "SoloModel",
    "SoloPreTrainedModel",
    "causal_lm_loss",
    "check_vision_inputs",
    "is_packed",
    "packed_position_ids",
]
