"""Transformer-layer specs for the SOLO model, one function per backend.

* Transformer Engine (GPU): megatron-core's TE spec; ``TEDotProductAttention`` takes packed THD
  batches (``PackedSeqParams`` with per-document ``cu_seqlens``) and ``config.window_size``.
* local (CPU, or GPU without TE): megatron-core's local spec with the core attention replaced by
  :class:`PackedDotProductAttention`, which honours the same ``PackedSeqParams`` exactly (the stock
  local ``DotProductAttention`` rejects them, and a dense S x S block mask is O(S^2)).

Both see identical inputs, so the data path does not depend on the backend.
"""

from __future__ import annotations

import copy
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

try:
    import transformer_engine  # noqa: F401

    HAVE_TE = True
except ImportError:  # CPU machines and GPU machines without the [gpu] extra
    HAVE_TE = False


def _window_left(config: TransformerConfig) -> Optional[int]:
    """Keys a query may look back (exclusive of itself), TE convention; None = unlimited."""
    window = getattr(config, "window_size", None)
    if window is None or window[0] is None or window[0] < 0:
        return None
    if window[1] not in (0, None):
        raise ValueError(f"SOLO attention is causal: window_size right must be 0, got {window}")
    return int(window[0])


class PackedDotProductAttention(MegatronModule):
    """Causal core attention that runs ``F.scaled_dot_product_attention`` per document.

    Inputs follow megatron-core's core-attention contract: ``[s, b, heads, dim]`` tensors, or, for a
    packed THD batch (``packed_seq_params.qkv_format == "thd"``), ``[t, heads, dim]`` tensors whose
    documents are delimited by ``packed_seq_params.cu_seqlens_q``. No query attends across a
    document boundary; an optional sliding window (``config.window_size = (left, 0)``) limits each
    query to itself and the ``left`` previous keys; grouped-query attention uses SDPA's
    ``enable_gqa``. Output: ``[s, b, heads*dim]`` (``[t, heads*dim]`` for THD).

    Runs of consecutive short documents (together at most ``segment_tokens``) share one SDPA call
    under a block-causal mask of that small segment: hundreds of tiny documents per pack would
    otherwise cost one kernel launch each. Longer documents run alone with ``is_causal``.
    """

    segment_tokens: int = 256  # measured on CPU: 128-256 beat per-document calls; 512+ loses

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size > 1:
            raise ValueError(
                "PackedDotProductAttention does not implement context parallelism; "
                "set parallel.context_parallel_size=1"
            )
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(f"SOLO attention is causal; got attn_mask_type={attn_mask_type}")
        self.layer_number = layer_number
        self.softmax_scale = (
            softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        )
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.window_left = _window_left(config)

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_lengths: Optional[list] = None
    ) -> torch.Tensor:
        """One document, or a segment of several (``doc_lengths``): q [L, hq, d], k/v [L, hkv, d]
        -> [L, hq*d]."""
        length = q.shape[0]
        q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # [1, h, L, d]
        dropout_p = self.dropout_p if self.training else 0.0
        gqa = q.shape[1] != k.shape[1]
        if doc_lengths is not None and len(doc_lengths) > 1:
            pos = torch.arange(length, device=q.device)
            doc = torch.repeat_interleave(
                torch.arange(len(doc_lengths), device=q.device), torch.tensor(doc_lengths, device=q.device)
            )
            delta = pos[:, None] - pos[None, :]
            allowed = (doc[:, None] == doc[None, :]) & (delta >= 0)
            if self.window_left is not None:
                allowed &= delta <= self.window_left
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=allowed, dropout_p=dropout_p, scale=self.softmax_scale, enable_gqa=gqa
            )
        elif self.window_left is None or length <= self.window_left + 1:
            out = F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout_p, is_causal=True, scale=self.softmax_scale, enable_gqa=gqa
            )
        else:
            # Only documents longer than the window pay for an explicit band mask.
            pos = torch.arange(length, device=q.device)
            delta = pos[:, None] - pos[None, :]
            band = (delta >= 0) & (delta <= self.window_left)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=band, dropout_p=dropout_p, scale=self.softmax_scale, enable_gqa=gqa
            )
        return out.squeeze(0).transpose(0, 1).reshape(length, -1)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("PackedDotProductAttention does not take an attention bias")
        with tensor_parallel.get_cuda_rng_tracker().fork():  # TP-consistent dropout RNG
            if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
                cu = packed_seq_params.cu_seqlens_q
                if packed_seq_params.cu_seqlens_q_padded is not None:
                    cu = packed_seq_params.cu_seqlens_q_padded
                bounds = cu.tolist()
                if bounds[-1] != query.shape[0]:
                    raise ValueError(
                        f"cu_seqlens end at {bounds[-1]} but the packed row has {query.shape[0]} "
                        "tokens: every token (padding included) must belong to a document"
                    )
                outs = []
                first = 0
                while first < len(bounds) - 1:
                    last = first + 1  # documents [first, last) form one segment
                    while (
                        last < len(bounds) - 1
                        and bounds[last + 1] - bounds[first] <= self.segment_tokens
                    ):
                        last += 1
                    s, e = bounds[first], bounds[last]
                    if e > s:
                        lengths = [b - a for a, b in zip(bounds[first:last], bounds[first + 1:last + 1]) if b > a]
                        outs.append(self._attend(query[s:e], key[s:e], value[s:e], lengths))
                    first = last
                return torch.cat(outs, dim=0)
            # Unpacked [s, b, h, d]: each row is one causal document.
            rows = [
                self._attend(query[:, b], key[:, b], value[:, b]) for b in range(query.shape[1])
            ]
            return torch.stack(rows, dim=1)


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


def resolve_backend(backend: str = "auto") -> str:
    """``auto`` means TE on a GPU with TE installed, else local."""
    if backend == "auto":
        return "te" if (HAVE_TE and torch.cuda.is_available()) else "local"
    return backend


def solo_layer_spec(backend: str = "auto") -> ModuleSpec:
    """Pick the layer spec: ``te``, ``local``, or ``auto`` (TE when on GPU with TE installed)."""
    backend = resolve_backend(backend)
    if backend == "te":
        return solo_layer_spec_te()
    if backend == "local":
        return solo_layer_spec_local()
    raise ValueError(f"model.backend must be one of auto, te, local; got {backend!r}")
