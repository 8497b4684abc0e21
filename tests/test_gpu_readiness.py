"""GPU readiness, checked on the CPU: the PyTorch-only flex attention path against the per-document
path, the always-run patch projection under overlapped gradient reduction, the start-up preflight's
messages, patch positions from the loader, recipes and the memory plan.

flex_attention runs forward-only on CPU (torch 2.13): backward, bf16 and the compiled kernels are
checked by tests/test_gpu.py on a GPU.
"""

import math

import numpy as np
import pytest
import torch

from megatron_patch import compat

compat.apply()

from megatron.core.packed_seq_params import PackedSeqParams  # noqa: E402
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402

from megatron_patch.data import collate_packed, make_training_sample, packed_seq_params  # noqa: E402
from megatron_patch.model import SoloGPTModel, build_transformer_config, solo_layer_spec  # noqa: E402
from megatron_patch.model.layer_specs import (  # noqa: E402
    FLEX_BLOCK,
    FlexPackedAttention,
    PackedDotProductAttention,
    document_mask_params,
    resolve_backend,
)
from test_megatron_model import PAD, VOCAB, documents, make_pack, megatron_world, text_document, tiny_config  # noqa: E402,F401


def _qkv(lengths, heads=4, groups=2, dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    cu = torch.tensor(np.cumsum([0] + lengths), dtype=torch.int32)
    return (torch.randn(t, heads, dim, generator=gen), torch.randn(t, groups, dim, generator=gen),
            torch.randn(t, groups, dim, generator=gen), cu)


# Documents crossing 128-token tiles, tiny ones, one longer than two tiles; row lengths that are and
# are not whole tiles.
LENGTHS = {
    "ragged": [3, 150, 7, 2, 2, 90, 1, 40],
    "whole-tiles": [200, 1, 55, 128, 128],
}


@pytest.mark.parametrize("window", [None, 5, 130], ids=["no-window", "window-5", "window-130"])
@pytest.mark.parametrize("lengths", list(LENGTHS.values()), ids=list(LENGTHS))
def test_flex_attention_forward_equals_per_document_path(megatron_world, lengths, window):
    cfg = tiny_config(sliding_window=window + 1 if window is not None else None)
    tc = build_transformer_config(cfg.model, cfg.parallel, cfg.training)
    reference = PackedDotProductAttention(tc, 1, AttnMaskType.causal, "self")
    flex = FlexPackedAttention(tc, 1, AttnMaskType.causal, "self")
    assert flex.window_left == reference.window_left == window  # both read config.window_size
    q, k, v, cu = _qkv(lengths)
    t = q.shape[0]
    thd = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=t, max_seqlen_kv=t)
    expected = reference(q, k, v, None, packed_seq_params=thd)
    out = flex(q[:, None], k[:, None], v[:, None], None, packed_seq_params=document_mask_params(cu, t, flex.window_left))
    assert out.shape == (t, 1, 4 * 16)
    assert (out[:, 0] - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("window", [None, 3, 200])
def test_flex_block_mask_is_exactly_the_document_window_mask(window):
    """Full tiles really are all-allowed, and every allowed pair lies in a full or partial tile."""
    lengths = [3, 150, 7, 2, 2, 90, 1, 40, 300]
    t = sum(lengths)
    cu = torch.tensor(np.cumsum([0] + lengths), dtype=torch.int32)
    params = document_mask_params(cu, t, window)
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    allowed = (doc[:, None] == doc[None, :]) & (j <= i)
    if window is not None:
        allowed &= i - j <= window
    # Reconstruct what flex computes: full tiles unmasked, partial tiles through mask_mod, others skipped.
    bm = params.block_mask
    n = -(-t // FLEX_BLOCK)
    tile_state = torch.zeros(n, n, dtype=torch.int8)  # 0 skipped, 1 partial, 2 full
    for state, num, idx in ((1, bm.kv_num_blocks, bm.kv_indices), (2, bm.full_kv_num_blocks, bm.full_kv_indices)):
        for row in range(n):
            for c in idx[0, 0, row, : num[0, 0, row]].tolist():
                assert tile_state[row, c] == 0, "a tile is listed twice"
                tile_state[row, c] = state
    per_token = tile_state.repeat_interleave(FLEX_BLOCK, 0).repeat_interleave(FLEX_BLOCK, 1)[:t, :t]
    mask_mod = bm.mask_mod(torch.zeros(()), torch.zeros(()), i.expand(t, t), j.expand(t, t))
    computed = (per_token == 2) | ((per_token == 1) & mask_mod)
    assert torch.equal(computed, allowed)
    assert not (allowed.logical_not() & (per_token == 2)).any(), "a full tile holds a masked pair"
    # Positions restart in every document (RoPE).
    assert torch.equal(params.position_ids, torch.cat([torch.arange(n) for n in lengths]))


def _model(backend, sliding_window):
    cfg = tiny_config(sliding_window)
    tc = build_transformer_config(cfg.model, cfg.parallel, cfg.training)
    torch.manual_seed(0)
    return SoloGPTModel(tc, solo_layer_spec(backend), VOCAB, 256, 10000.0).eval()


@pytest.mark.parametrize("sliding_window", [None, 6])
def test_flex_model_equals_local_model_on_a_packed_multimodal_row(megatron_world, sliding_window):
    """Same weights, one packed row of image and text documents plus padding: per-token losses
    of the flex model (forward) equal the CPU path's."""
    local = _model("local", sliding_window)
    flex = _model("flex", sliding_window)
    assert flex.flex_attention and not local.flex_attention
    flex.load_state_dict(local.state_dict())  # the same parameters: checkpoints interchange
    batch = collate_packed([dict(make_training_sample(make_pack(documents()), 160, PAD), sample_id="p")])
    kwargs = dict(input_ids=batch["tokens"], labels=batch["labels"], patches=batch["patches"],
                  vision_patch_indices=batch["vision_patch_indices"], patch_positions=batch["patch_positions"])
    with torch.no_grad():
        expected = local(packed_seq_params=packed_seq_params(batch), **kwargs)
        out = flex(packed_seq_params=packed_seq_params(batch), **kwargs)
    assert (out - expected).abs().max().item() < 1e-5


def test_auto_backend_keeps_the_cpu_path_on_cpu():
    assert resolve_backend("auto") == "local"
    assert resolve_backend("flex") == "flex"


def test_flex_rejects_what_it_cannot_do(megatron_world):
    cfg = tiny_config()
    tc = build_transformer_config(cfg.model, cfg.parallel, cfg.training)
    flex = FlexPackedAttention(tc, 1, AttnMaskType.causal, "self")
    q, k, v, cu = _qkv([4, 4])
    thd = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=8, max_seqlen_kv=8)
    with pytest.raises(ValueError, match="DocumentMaskParams"):
        flex(q[:, None], k[:, None], v[:, None], None, packed_seq_params=thd)
    with pytest.raises(ValueError, match="window"):
        flex(q[:, None], k[:, None], v[:, None], None, packed_seq_params=document_mask_params(cu, 8, 3))
    tc.attention_dropout = 0.1
    with pytest.raises(ValueError, match="dropout"):
        FlexPackedAttention(tc, 1, AttnMaskType.causal, "self")
