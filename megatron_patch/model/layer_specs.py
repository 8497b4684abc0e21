"""Transformer-layer specs for the SOLO model, one function per backend.

* ``te`` (GPU): megatron-core's TE spec; ``TEDotProductAttention`` takes packed THD batches
  (``PackedSeqParams`` with per-document ``cu_seqlens``) and ``config.window_size``.
* ``flex`` (GPU without TE): megatron-core's local spec with the core attention replaced by
  ``attention.FlexPackedAttention`` (PyTorch's ``flex_attention`` under a per-micro-batch block mask).
* ``local`` (CPU): the local spec with ``attention.PackedDotProductAttention`` (SDPA per document).

All take identical inputs (a THD ``PackedSeqParams``), so the data path does not depend on the
backend; ``flex`` and ``local`` have the same parameters (their checkpoints are interchangeable).
"""

from __future__ import annotations

import copy

import torch
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_patch.config import BACKENDS
from megatron_patch.model.attention import FlexPackedAttention, PackedDotProductAttention

try:
    import transformer_engine  # noqa: F401

    HAVE_TE = True
except ImportError:  # CPU machines and GPU machines without the [gpu] extra
    HAVE_TE = False


def uses_packed_attention(spec: ModuleSpec) -> bool:
    """Whether a layer spec's core attention is the local backend's."""
    return spec.submodules.self_attention.submodules.core_attention is PackedDotProductAttention


def uses_flex_attention(spec: ModuleSpec) -> bool:
    """Whether a layer spec's core attention is the flex backend's."""
    return spec.submodules.self_attention.submodules.core_attention is FlexPackedAttention


def solo_layer_spec_local() -> ModuleSpec:
    """megatron-core's local spec (RMSNorm) with per-document packed core attention."""
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm"))
    spec.submodules.self_attention.submodules.core_attention = PackedDotProductAttention
    return spec


def solo_layer_spec_te() -> ModuleSpec:
    """megatron-core's Transformer Engine spec: fused norms+linears, THD packed flash attention."""
    if not HAVE_TE:
        raise RuntimeError(
            "model.backend=te needs Transformer Engine: pip install -e '.[gpu]' on a CUDA machine, "
            "or set model.backend=local"
        )
    return get_gpt_layer_with_transformer_engine_spec()


def solo_layer_spec_flex() -> ModuleSpec:
    """megatron-core's local spec (RMSNorm) with flex_attention packed core attention."""
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm"))
    spec.submodules.self_attention.submodules.core_attention = FlexPackedAttention
    return spec


def resolve_backend(backend: str = "auto") -> str:
    """``auto``: TE on a GPU with TE installed, else flex on a GPU, else local (CPU)."""
    if backend == "auto":
        if torch.cuda.is_available():
            return "te" if HAVE_TE else "flex"
        return "local"
    return backend


def solo_layer_spec(backend: str = "auto") -> ModuleSpec:
    """Pick the layer spec: ``te``, ``flex``, ``local``, or ``auto`` (see :func:`resolve_backend`)."""
    backend = resolve_backend(backend)
    if backend == "te":
        return solo_layer_spec_te()
    if backend == "flex":
        return solo_layer_spec_flex()
    if backend == "local":
        return solo_layer_spec_local()
    raise ValueError(f"model.backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
