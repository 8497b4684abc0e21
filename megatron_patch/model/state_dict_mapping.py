"""The one mapping between Hugging Face ``SoloForCausalLM`` weights and megatron-core checkpoint keys.

Both conversion directions and the tests read :data:`MAPPINGS`; nothing else spells these names.
Keys on the megatron-core side are the *dist-checkpoint* keys of :class:`SoloGPTModel`
(``sharded_state_dict``), which hold GLOBAL tensors whatever the TP/PP of the run that wrote them:

* per-layer weights are stacked along a leading layer axis (``...decoder.layers.<name>`` with global
  shape ``[num_layers, ...]``);
* norm weights are stored under Transformer Engine's names (``linear_qkv.layer_norm_weight``,
  ``mlp.linear_fc1.layer_norm_weight``) for BOTH backends: megatron-core maps the local spec's
  ``input_layernorm`` / ``pre_mlp_layernorm`` onto them, so one checkpoint serves both specs
  (:attr:`Mapping.module_names` records the module names of each spec);
* ``linear_qkv`` is fused per KV group ``[q_1..q_n, k, v]`` (n = heads / groups), ``linear_fc1`` is
  ``[gate; up]``, and the vocabulary tensors have padded rows (a multiple of divisor x TP).

Transforms are typed (:class:`Transform` subclasses) and exact: a round trip is bitwise.
This module imports only torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence, Tuple

import torch


@dataclass(frozen=True)
class Architecture:
    """The shape facts the transforms need (Mistral/Llama decoder)."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: int  # the tokenizer's; megatron-core rows may be padded beyond it

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class Transform:
    """HF tensors (in ``Mapping.hf`` order) <-> the one megatron-core tensor (one layer's slice)."""

    def to_mcore(self, tensors: Sequence[torch.Tensor], arch: Architecture, rows: int) -> torch.Tensor:
        raise NotImplementedError

    def to_hf(self, tensor: torch.Tensor, arch: Architecture) -> Tuple[torch.Tensor, ...]:
        raise NotImplementedError


class Direct(Transform):
    """Same tensor on both sides."""

    def to_mcore(self, tensors, arch, rows):
        return tensors[0]

    def to_hf(self, tensor, arch):
        return (tensor,)


class FusedQKV(Transform):
    """HF q/k/v projections <-> megatron-core's ``linear_qkv``, fused per KV group.

    megatron-core's RoPE is rotate-half like HF's, so no row permutation inside a head is needed.
    """

    def to_mcore(self, tensors, arch, rows):
        q, k, v = tensors
        groups, dim = arch.num_query_groups, arch.head_dim
        per_group = arch.num_attention_heads // groups
        hidden = q.shape[-1]
        fused = torch.cat(
            [q.reshape(groups, per_group * dim, hidden), k.reshape(groups, dim, hidden),
             v.reshape(groups, dim, hidden)],
            dim=1,
        )
        return fused.reshape(-1, hidden)

    def to_hf(self, tensor, arch):
        groups, dim = arch.num_query_groups, arch.head_dim
        per_group = arch.num_attention_heads // groups
        hidden = tensor.shape[-1]
        grouped = tensor.reshape(groups, (per_group + 2) * dim, hidden)
        q, k, v = grouped.split([per_group * dim, dim, dim], dim=1)
        return (q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden))


class GateUp(Transform):
    """HF gate_proj, up_proj <-> megatron-core SwiGLU ``linear_fc1 = [gate; up]``."""

    def to_mcore(self, tensors, arch, rows):
        return torch.cat(tensors, dim=0)

    def to_hf(self, tensor, arch):
        gate, up = tensor.chunk(2, dim=0)
        return (gate, up)


class VocabRows(Transform):
    """Embedding / LM-head rows: padded with zero rows to the checkpoint's row count, trimmed back to
    the tokenizer's vocabulary on the way out (padding rows are never used: no token has their id)."""

    def to_mcore(self, tensors, arch, rows):
        weight = tensors[0]
        if weight.shape[0] != arch.vocab_size:
            raise ValueError(f"has {weight.shape[0]} rows but the vocabulary has {arch.vocab_size} entries")
        if rows == weight.shape[0]:
            return weight
        padded = weight.new_zeros((rows,) + tuple(weight.shape[1:]))
        padded[: weight.shape[0]] = weight
        return padded

    def to_hf(self, tensor, arch):
        if tensor.shape[0] < arch.vocab_size:
            raise ValueError(f"has {tensor.shape[0]} rows, fewer than the tokenizer's {arch.vocab_size} entries")
        return (tensor[: arch.vocab_size],)


@dataclass(frozen=True)
class Mapping:
    """One megatron-core checkpoint tensor and the HF tensor(s) it corresponds to.

    ``hf`` names contain ``{i}`` for per-layer weights; ``module_names`` are the megatron-core
    *module* state-dict names per backend (``{i}`` = layer), for the reader's orientation and tests.
    """

    mcore: str
    hf: Tuple[str, ...]
    transform: Transform
    per_layer: bool
    module_names: Tuple[Tuple[str, str], ...] = ()

    def hf_names(self, layer: int | None = None) -> Tuple[str, ...]:
        return tuple(name.format(i=layer) for name in self.hf)


_LAYERS = "language_model.decoder.layers."
_HF_LAYER = "model.layers.{i}."

MAPPINGS: Tuple[Mapping, ...] = (
    Mapping("language_model.embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VocabRows(), False),
    Mapping("vision_patch_projection.weight", ("model.embed_vision_patch.weight",), Direct(), False),
    Mapping(
        _LAYERS + "self_attention.linear_qkv.layer_norm_weight", (_HF_LAYER + "input_layernorm.weight",),
        Direct(), True,
        module_names=(("local", _LAYERS + "{i}.input_layernorm.weight"),
                      ("te", _LAYERS + "{i}.self_attention.linear_qkv.layer_norm_weight")),
    ),
    Mapping(
        _LAYERS + "self_attention.linear_qkv.weight",
        tuple(_HF_LAYER + f"self_attn.{p}_proj.weight" for p in "qkv"), FusedQKV(), True,
    ),
    Mapping(_LAYERS + "self_attention.linear_proj.weight", (_HF_LAYER + "self_attn.o_proj.weight",), Direct(), True),
    Mapping(
        _LAYERS + "mlp.linear_fc1.layer_norm_weight", (_HF_LAYER + "post_attention_layernorm.weight",), Direct(), True,
        module_names=(("local", _LAYERS + "{i}.pre_mlp_layernorm.weight"),
                      ("te", _LAYERS + "{i}.mlp.linear_fc1.layer_norm_weight")),
    ),
    Mapping(
        _LAYERS + "mlp.linear_fc1.weight", (_HF_LAYER + "mlp.gate_proj.weight", _HF_LAYER + "mlp.up_proj.weight"),
        GateUp(), True,
    ),
    Mapping(_LAYERS + "mlp.linear_fc2.weight", (_HF_LAYER + "mlp.down_proj.weight",), Direct(), True),
    Mapping("language_model.decoder.final_layernorm.weight", ("model.norm.weight",), Direct(), False),
    Mapping("language_model.output_layer.weight", ("lm_head.weight",), VocabRows(), False),
)

# Checkpoint keys whose row count depends on the vocabulary padding (and so on TP).
VOCAB_KEYS: Tuple[str, ...] = tuple(m.mcore for m in MAPPINGS if isinstance(m.transform, VocabRows))


def expected_shapes(arch: Architecture, padded_rows: int, patch_dim: int) -> Dict[str, Tuple[int, ...]]:
    """Global shape of every megatron-core checkpoint tensor for ``arch`` (layer axis included)."""
    h, f, L = arch.hidden_size, arch.ffn_hidden_size, arch.num_layers
    qkv_rows = (arch.num_attention_heads + 2 * arch.num_query_groups) * arch.head_dim
    per_layer = {
        "self_attention.linear_qkv.layer_norm_weight": (h,),
        "self_attention.linear_qkv.weight": (qkv_rows, h),
        "self_attention.linear_proj.weight": (h, arch.num_attention_heads * arch.head_dim),
        "mlp.linear_fc1.layer_norm_weight": (h,),
        "mlp.linear_fc1.weight": (2 * f, h),
        "mlp.linear_fc2.weight": (h, f),
    }
    shapes = {_LAYERS + name: (L,) + shape for name, shape in per_layer.items()}
    shapes.update({
        "language_model.embedding.word_embeddings.weight": (padded_rows, h),
        "language_model.output_layer.weight": (padded_rows, h),
        "vision_patch_projection.weight": (h, patch_dim),
        "language_model.decoder.final_layernorm.weight": (h,),
    })
    return shapes
