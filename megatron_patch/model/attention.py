"""Core attention for packed rows (the local and flex backends) and what it needs per micro-batch.

* :class:`PackedDotProductAttention` (``local``, CPU): honours megatron-core's THD
  ``PackedSeqParams`` exactly by running SDPA per document (the stock local ``DotProductAttention``
  rejects them, and a dense S x S block mask is O(S^2)).
* :class:`FlexPackedAttention` (``flex``, GPU without TE): PyTorch's ``flex_attention`` under a
  document + sliding-window block mask that :func:`document_mask_params` builds once per
  micro-batch on the device (no host sync, no per-document loop, no S x S mask).
* :class:`DocumentRotaryEmbedding`: RoPE positions that restart per document (megatron-core's
  unfused THD RoPE syncs with the host per call), and the 2-D positions of ``vision_positions=2d``.

Both attentions see the same documents and window (``config.window_size``), and the native-VLM
``image_attention=bidirectional`` blocks. ``layer_specs`` puts them into megatron-core's ModuleSpecs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from solo.hf.native_vision import column_frequencies


def _window_left(config: TransformerConfig) -> Optional[int]:
    """Keys a query may look back (exclusive of itself), TE convention; None = unlimited."""
    window = getattr(config, "window_size", None)
    if window is None or window[0] is None or window[0] < 0:
        return None
    if window[1] not in (0, None):
        raise ValueError(f"SOLO attention is causal: window_size right must be 0, got {window}")
    return int(window[0])


def _masked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, **kwargs) -> torch.Tensor:
    """SDPA under an explicit mask, [1, h, L, d] tensors. Grouped K/V heads are repeated to the query
    heads first: on a GPU, PyTorch's memory-efficient kernel takes a mask but not ``enable_gqa``,
    which would leave the math kernel and its full L x L scores."""
    if k.shape[1] != q.shape[1]:
        k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kwargs)


class _CausalCoreAttention(MegatronModule):
    """megatron-core's core-attention constructor contract, as both packed attentions take it:
    causal masks only, no context parallelism, the window from ``config.window_size``."""

    context_parallel_error = ""  # what each backend says when context parallelism is asked for

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
            raise ValueError(self.context_parallel_error)
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(f"SOLO attention is causal; got attn_mask_type={attn_mask_type}")
        self.layer_number = layer_number
        self.softmax_scale = (
            softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        )
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.window_left = _window_left(config)

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
        """megatron-core's core-attention call; the mask is causal and per document, never an argument."""
        if attention_bias is not None:
            raise ValueError(f"{type(self).__name__} does not take an attention bias")
        return self._attend_batch(query, key, value, packed_seq_params)

    def _attend_batch(self, query, key, value, packed_seq_params):
        raise NotImplementedError


class PackedDotProductAttention(_CausalCoreAttention):
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
    context_parallel_error = ("PackedDotProductAttention does not implement context parallelism; "
                              "set parallel.context_parallel_size=1")

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_lengths: Optional[list] = None,
        image_blocks: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """One document, or a segment of several (``doc_lengths``): q [L, hq, d], k/v [L, hkv, d]
        -> [L, hq*d]. ``image_blocks`` [L] (``image_attention=bidirectional``): the image block of
        each token (-1 outside one); a block's tokens also see each other both ways."""
        length = q.shape[0]
        q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # [1, h, L, d]
        dropout_p = self.dropout_p if self.training else 0.0
        gqa = q.shape[1] != k.shape[1]
        has_blocks = image_blocks is not None and bool((image_blocks >= 0).any())
        if has_blocks or (doc_lengths is not None and len(doc_lengths) > 1):
            pos = torch.arange(length, device=q.device)
            lengths = doc_lengths if doc_lengths else [length]
            doc = torch.repeat_interleave(
                torch.arange(len(lengths), device=q.device), torch.tensor(lengths, device=q.device)
            )
            delta = pos[:, None] - pos[None, :]
            allowed = (doc[:, None] == doc[None, :]) & (delta >= 0)
            if self.window_left is not None:
                allowed &= delta <= self.window_left
            if has_blocks:
                allowed |= (image_blocks[:, None] == image_blocks[None, :]) & (image_blocks[:, None] >= 0)
            out = _masked_sdpa(q, k, v, allowed, dropout_p=dropout_p, scale=self.softmax_scale)
        elif self.window_left is None or length <= self.window_left + 1:
            out = F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout_p, is_causal=True, scale=self.softmax_scale, enable_gqa=gqa
            )
        else:
            # Only documents longer than the window pay for an explicit band mask.
            pos = torch.arange(length, device=q.device)
            delta = pos[:, None] - pos[None, :]
            band = (delta >= 0) & (delta <= self.window_left)
            out = _masked_sdpa(q, k, v, band, dropout_p=dropout_p, scale=self.softmax_scale)
        return out.squeeze(0).transpose(0, 1).reshape(length, -1)

    def _attend_packed(self, query, key, value, cu: torch.Tensor, image_blocks: Optional[torch.Tensor] = None):
        """[t, heads, dim] documents delimited by ``cu`` -> [t, heads*dim], in segments (class doc)."""
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
                blocks = None if image_blocks is None else image_blocks[s:e]
                outs.append(self._attend(query[s:e], key[s:e], value[s:e], lengths, blocks))
            first = last
        return torch.cat(outs, dim=0)

    def _attend_batch(self, query, key, value, packed_seq_params):
        with tensor_parallel.get_cuda_rng_tracker().fork():  # TP-consistent dropout RNG
            if isinstance(packed_seq_params, DocumentMaskParams):
                # Native-VLM switches: one packed row [t, 1, heads, dim] (sbhd, per-token RoPE).
                rows = (query.squeeze(1), key.squeeze(1), value.squeeze(1))
                out = self._attend_packed(*rows, packed_seq_params.cu_seqlens_q, packed_seq_params.image_blocks)
                return out.unsqueeze(1)
            if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
                cu = packed_seq_params.cu_seqlens_q
                if packed_seq_params.cu_seqlens_q_padded is not None:
                    cu = packed_seq_params.cu_seqlens_q_padded
                return self._attend_packed(query, key, value, cu)
            # Unpacked [s, b, h, d]: each row is one causal document.
            rows = [
                self._attend(query[:, b], key[:, b], value[:, b]) for b in range(query.shape[1])
            ]
            return torch.stack(rows, dim=1)


# ----------------------------------------------------------------------------------------------
# flex backend: PyTorch-only packed attention for GPUs without Transformer Engine
# ----------------------------------------------------------------------------------------------

FLEX_BLOCK = 128  # flex_attention's sparse block size (its kernels' tile on H100/A100)


@dataclass
class DocumentMaskParams(PackedSeqParams):
    """What the flex backend (and the local one under the native-VLM switches) hands every layer of
    one micro-batch, built once by :func:`document_mask_params`. ``qkv_format="sbhd"`` on purpose:
    megatron-core then applies RoPE with the per-token frequencies of
    :class:`DocumentRotaryEmbedding` instead of its THD path."""

    block_mask: Optional[object] = None  # torch.nn.attention.flex_attention.BlockMask (flex only)
    position_ids: Optional[torch.Tensor] = None  # [t] position of each token inside its document
    window_left: Optional[int] = None
    image_blocks: Optional[torch.Tensor] = None  # [t] image block of each token, -1 outside (bidirectional)


def document_mask_params(
    cu_seqlens: torch.Tensor, total: int, window_left: Optional[int],
    image_blocks: Optional[torch.Tensor] = None, block_mask: bool = True,
) -> DocumentMaskParams:
    """Document-causal (+ sliding-window) flex block mask and per-document positions for one packed
    row of ``total`` tokens delimited by ``cu_seqlens``; device tensor ops only (no host sync).
    ``image_blocks`` ([t], -1 outside an image block) opens each image block both ways
    (``image_attention=bidirectional``); ``block_mask=False`` skips the flex mask (local backend).

    Block (i, j) of the ``FLEX_BLOCK``-tiled score matrix is *full* when every query of tile i may see
    every key of tile j (one document, keys all before the queries, all within the window) and
    *partial* when some may (the mask function decides per element there). Documents are contiguous,
    so a tile's documents are the range between its first and last token's document; image blocks
    too, so two tiles share one when their ranges of image numbers meet.
    """
    from torch.nn.attention.flex_attention import BlockMask

    device = cu_seqlens.device
    cu = cu_seqlens.to(torch.int64)
    pos = torch.arange(total, device=device)
    doc = torch.searchsorted(cu[1:], pos, right=True)  # document of each token
    positions = pos - cu[doc]
    if not block_mask:
        return DocumentMaskParams(
            qkv_format="sbhd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens, max_seqlen_q=total,
            max_seqlen_kv=total, position_ids=positions, window_left=window_left, image_blocks=image_blocks,
        )
    n_blocks = -(-total // FLEX_BLOCK)
    # Padded to whole tiles so the mask function never reads past the end (-1: no document).
    doc_padded = torch.full((n_blocks * FLEX_BLOCK,), -1, dtype=torch.int64, device=device)
    doc_padded[:total] = doc
    start = torch.arange(n_blocks, device=device) * FLEX_BLOCK
    end = torch.clamp(start + FLEX_BLOCK, max=total) - 1  # last token of each tile
    first_doc, last_doc = doc[start], doc[end]
    q_first, q_last = start[:, None], end[:, None]
    k_first, k_last = start[None, :], end[None, :]
    any_allowed = (
        (first_doc[:, None] <= last_doc[None, :]) & (first_doc[None, :] <= last_doc[:, None]) & (k_first <= q_last)
    )
    all_allowed = (
        (first_doc[:, None] == last_doc[:, None]) & (first_doc[None, :] == last_doc[None, :])
        & (first_doc[:, None] == first_doc[None, :]) & (k_last <= q_first)
    )
    if window_left is not None:
        any_allowed &= q_first - k_last <= window_left
        all_allowed &= q_last - k_first <= window_left
    if image_blocks is not None:
        blocks_padded = torch.full((n_blocks * FLEX_BLOCK,), -1, dtype=torch.int64, device=device)
        blocks_padded[:total] = image_blocks
        tiles = blocks_padded.view(n_blocks, FLEX_BLOCK)
        lowest = torch.where(tiles >= 0, tiles, total).amin(dim=-1)
        highest = tiles.amax(dim=-1)
        any_allowed |= (
            (highest[:, None] >= 0) & (highest[None, :] >= 0)
            & (lowest[:, None] <= highest[None, :]) & (lowest[None, :] <= highest[:, None])
        )
    partial = any_allowed & ~all_allowed

    def to_kv_blocks(blocks: torch.Tensor):
        counts = blocks.sum(dim=-1, dtype=torch.int32)
        # Stable sort puts each row's selected tiles first, in increasing order, as flex expects.
        indices = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return counts[None, None], indices[None, None]

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = (doc_padded[q_idx] == doc_padded[kv_idx]) & (q_idx >= kv_idx)
        if window_left is not None:
            allowed = allowed & (q_idx - kv_idx <= window_left)
        if image_blocks is not None:
            allowed = allowed | ((blocks_padded[q_idx] == blocks_padded[kv_idx]) & (blocks_padded[q_idx] >= 0))
        return allowed

    kv_num, kv_idx = to_kv_blocks(partial)
    full_num, full_idx = to_kv_blocks(all_allowed)
    mask = BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod, seq_lengths=(total, total)
    )
    return DocumentMaskParams(
        qkv_format="sbhd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens, max_seqlen_q=total,
        max_seqlen_kv=total, block_mask=mask, position_ids=positions, window_left=window_left,
        image_blocks=image_blocks,
    )


_COMPILED_FLEX = None


def _flex_attention():
    """flex_attention, compiled on CUDA (eager flex materialises the whole score matrix); eager on
    CPU, where torch 2.13 runs it forward-only and compiling it is not supported everywhere."""
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention

    if not torch.cuda.is_available():
        return flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


class FlexPackedAttention(_CausalCoreAttention):
    """Causal core attention for packed documents with PyTorch's ``flex_attention`` (GPU, no TE).

    Takes the :class:`DocumentMaskParams` that ``SoloGPTModel`` builds once per micro-batch (passed
    by megatron-core as ``packed_seq_params``) and ``[t, 1, heads, dim]`` query/key/value (one packed
    row); returns ``[t, 1, heads*dim]``. Same function as :class:`PackedDotProductAttention`: no
    query sees another document, the window comes from ``config.window_size`` the same way, GQA
    runs natively. No attention dropout (flex has none; SOLO uses 0).
    """

    context_parallel_error = ("the flex backend does not implement context parallelism; "
                              "set parallel.context_parallel_size=1")

    def __init__(self, config: TransformerConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        if self.dropout_p:
            raise ValueError(f"the flex backend has no attention dropout (got {self.dropout_p}); "
                             "use backend te or local")

    def _attend_batch(self, query, key, value, packed_seq_params):
        if not isinstance(packed_seq_params, DocumentMaskParams) or packed_seq_params.block_mask is None:
            raise ValueError("FlexPackedAttention needs the DocumentMaskParams that SoloGPTModel builds "
                             "(document_mask_params); call it through SoloGPTModel with packed rows")
        if packed_seq_params.window_left != self.window_left:
            raise ValueError(f"block mask built for window {packed_seq_params.window_left}, "
                             f"layer configured with {self.window_left}")
        if query.dim() != 4 or query.shape[1] != 1:
            raise ValueError(f"FlexPackedAttention takes one packed row [t, 1, heads, dim]; got {tuple(query.shape)}")
        if not query.is_cuda and torch.is_grad_enabled() and query.requires_grad:
            raise ValueError("model.backend=flex trains only on a GPU (flex_attention has no backward on the "
                             "CPU); use model.backend=local (or auto) on the CPU")
        total = query.shape[0]
        q, k, v = (x.squeeze(1).transpose(0, 1).unsqueeze(0) for x in (query, key, value))  # [1, h, t, d]
        out = _flex_attention()(
            q, k, v, block_mask=packed_seq_params.block_mask, scale=self.softmax_scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )
        return out.squeeze(0).transpose(0, 1).reshape(total, 1, -1)


class DocumentRotaryEmbedding(torch.nn.Module):
    """megatron-core's ``RotaryEmbedding`` read at per-document positions (flex backend).

    ``SoloGPTModel`` sets :attr:`position_ids` ([t], restarting at 0 in every document) before each
    forward; megatron-core then applies ``[t, 1, 1, dim]`` frequencies in one elementwise op instead
    of splitting the row by ``cu_seqlens`` on the host in every layer. ``vision_positions=2d`` sets
    ``[2, t]`` (row and column section, ``solo.hf.native_vision``): the odd frequencies turn by the
    column section. No parameters or buffers of its own, so checkpoints are unchanged.
    """

    def __init__(self, base: torch.nn.Module):
        super().__init__()
        object.__setattr__(self, "base", base)  # not a submodule: keeps state-dict names unchanged
        self.position_ids: Optional[torch.Tensor] = None

    def get_rotary_seq_len(self, *args, **kwargs) -> int:
        return self.base.get_rotary_seq_len(*args, **kwargs)

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group=None) -> torch.Tensor:
        if self.position_ids is None:
            raise RuntimeError("DocumentRotaryEmbedding: position_ids were not set for this forward")
        freqs = self.base(max_seq_len, offset=offset, packed_seq=False, cp_group=cp_group)  # [s, 1, 1, d]
        if self.position_ids.dim() == 1:
            return freqs.index_select(0, self.position_ids)
        row, col = (freqs.index_select(0, section) for section in self.position_ids)
        # Rotate-half layout: dims [f, f] of d/2 frequencies each (megatron-core's default).
        column = column_frequencies(freqs.shape[-1] // 2, device=freqs.device).repeat(2)
        return torch.where(column, col, row)
