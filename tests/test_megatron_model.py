"""SoloGPTModel, packed attention, packed samples and the loss, in one process (gloo, world size 1).

The properties SOLO got wrong are checked directly: documents of a pack never see each other and
restart their positions; micro-batch > 1 keeps every sample's patches; a micro-batch without loss
tokens adds nothing (and no NaN) to a step.
"""

import math

import numpy as np
import pytest
import torch

from megatron_patch import compat

compat.apply()

from megatron.core.packed_seq_params import PackedSeqParams  # noqa: E402

from megatron_patch.data import (  # noqa: E402
    GlobalBatchSampler,
    build_train_dataset,
    collate_packed,
    make_training_sample,
    read_mixture,
)
from megatron_patch.model import PackedDotProductAttention, SoloGPTModel, build_transformer_config, solo_layer_spec  # noqa: E402
from megatron_tiny import (  # noqa: E402
    PAD,
    VOCAB,
    documents,
    image_document,
    make_pack,
    per_token_losses,
    text_document,
    tiny_config,
    tiny_model,
)


def test_packed_equals_separate_documents_with_images(megatron_world):
    model = tiny_model()
    docs = documents()
    seq = 128
    packed = collate_packed([dict(make_training_sample(make_pack(docs), seq, PAD), sample_id="p")])
    with torch.no_grad():
        losses = per_token_losses(model, packed)
    mask = packed["loss_mask"][0]
    start = 0
    for i, doc in enumerate(docs):
        alone = collate_packed([dict(make_training_sample(make_pack([doc]), len(doc[0]), PAD), sample_id="a")])
        with torch.no_grad():
            ref = per_token_losses(model, alone)
        n = len(doc[0])
        m = alone["loss_mask"][0]
        assert torch.equal(mask[start:start + n], m), f"loss mask of document {i} changed by packing"
        assert m.sum() > 0
        diff = ((losses[start:start + n] - ref) * m).abs().max().item()
        assert diff <= 1e-5, f"document {i}: packed vs alone differ by {diff}"
        start += n
    # Padding is its own document with no loss.
    assert mask[start:].sum() == 0 and packed["cu_seqlens"][-1] == seq


def test_patches_change_the_loss_only_of_their_document(megatron_world):
    """The patch projection is really applied, and only where the document's patches are."""
    model = tiny_model()
    docs = documents()
    pack = make_pack(docs)
    batch = collate_packed([dict(make_training_sample(pack, 128, PAD), sample_id="p")])
    altered = dict(pack, patches=pack["patches"].copy())
    altered["patches"][6:8] = 255 - altered["patches"][6:8]  # the third document's image
    batch2 = collate_packed([dict(make_training_sample(altered, 128, PAD), sample_id="p")])
    with torch.no_grad():
        a, b = per_token_losses(model, batch), per_token_losses(model, batch2)
    cu = batch["cu_seqlens"].tolist()
    changed = [(a[s:e] - b[s:e]).abs().max().item() > 1e-6 for s, e in zip(cu[:-1], cu[1:])]
    assert changed == [False, False, True, False, False, False]


def test_microbatch_of_two_equals_two_microbatches_of_one(megatron_world):
    """Patch indices of the second sample must be offset by the first sample's patches."""
    model = tiny_model()
    rng = np.random.default_rng(5)
    s0 = dict(make_training_sample(make_pack([image_document(rng, 2, 2, 0), text_document(rng, 6)]), 64, PAD),
              sample_id="0")
    s1 = dict(make_training_sample(make_pack([text_document(rng, 3), image_document(rng, 1, 3, 0)]), 64, PAD),
              sample_id="1")
    both = collate_packed([s0, s1])
    assert both["patches"].shape[0] == 7
    assert both["vision_patch_indices"][0, 64:].max() == 6  # offset by the 4 patches of s0
    with torch.no_grad():
        joint = per_token_losses(model, both)
        one = per_token_losses(model, collate_packed([s0]))
        two = per_token_losses(model, collate_packed([s1]))
    assert (joint - torch.cat([one, two])).abs().max().item() <= 1e-5


@pytest.mark.parametrize("segment_tokens", [0, 16, 512], ids=["per-document", "mixed", "one-segment"])
def test_sliding_window_attention_matches_dense_reference(megatron_world, segment_tokens):
    cfg = tiny_config(sliding_window=5)  # each query sees itself and 5 earlier keys (SOLO-7B's semantics)
    tc = build_transformer_config(cfg.model, cfg.parallel, cfg.training)
    from megatron.core.transformer.enums import AttnMaskType

    attn = PackedDotProductAttention(tc, 1, AttnMaskType.causal, "self")
    attn.segment_tokens = segment_tokens
    torch.manual_seed(0)
    lengths = [3, 11, 7, 2, 2, 9]
    t = sum(lengths)
    q, k, v = torch.randn(t, 4, 16), torch.randn(t, 2, 16), torch.randn(t, 2, 16)
    cu = torch.tensor(np.cumsum([0] + lengths), dtype=torch.int32)
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=11, max_seqlen_kv=11)
    out = attn(q, k, v, None, packed_seq_params=psp)
    # Dense reference: one t x t mask allowing same-document, causal, within-window pairs.
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    allowed = (doc[:, None] == doc[None, :]) & (j <= i) & (i - j <= 5)
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, kk) / math.sqrt(16)
    scores = scores.masked_fill(~allowed, float("-inf"))
    ref = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vv).reshape(t, -1)
    assert (out - ref).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="PackedDotProductAttention does not take an attention bias"):
        attn(q, k, v, None, attention_bias=torch.zeros(1), packed_seq_params=psp)


def test_training_sample_shift_and_document_boundaries():
    pack = make_pack([text_document(np.random.default_rng(0), 3), text_document(np.random.default_rng(1), 2)])
    s = make_training_sample(pack, 12, PAD)
    toks = pack["tokens"]
    assert s["labels"][:8].tolist() == toks[1:].tolist()
    # doc 1 = positions 0..4, doc 2 = 5..8; position 4 would predict doc 2's <bos>: never a target.
    assert s["loss_mask"].tolist() == [1, 1, 1, 1, 0, 1, 1, 1, 0, 0, 0, 0]
    assert s["cu_seqlens"].tolist() == [0, 5, 9, 12]  # padding is a document of its own
    assert s["tokens"][9:].tolist() == [PAD] * 3
    with pytest.raises(ValueError, match="exceeds data.seq_length"):
        make_training_sample(pack, 8, PAD)
    bad = dict(pack, vision_patch_indices=pack["vision_patch_indices"].copy())
    bad["vision_patch_indices"][2] = 0  # no patches in this pack
    with pytest.raises(ValueError, match="reference patch"):
        make_training_sample(bad, 12, PAD)


def test_zero_loss_microbatch_contributes_nothing(megatron_world, tmp_path):
    """Through megatron-core's schedule and per-token loss: a step with a micro-batch that has no
    loss tokens is finite and has exactly the gradients of the other micro-batch alone."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_patch import train as train_mod

    cfg = tiny_config()
    cfg.data.pad_token_id = PAD
    cfg.data.seq_length = 64
    model, tconfig = train_mod.build_model(cfg)
    tconfig.finalize_model_grads_func = finalize_model_grads
    tconfig.no_sync_func = model.no_sync
    rng = np.random.default_rng(3)
    live = dict(make_training_sample(make_pack([image_document(rng, 2, 2, 0)]), 64, PAD), sample_id="live")
    dead = dict(make_training_sample(make_pack([text_document(rng, 5)]), 64, PAD), sample_id="dead")
    dead["loss_mask"][:] = 0

    def grads(batches):
        model.zero_grad_buffer()
        state = {"batches": [], "nan": False}
        reports = get_forward_backward_func()(
            forward_step_func=lambda it, m: train_mod.forward_step(state, it, m),
            data_iterator=iter([collate_packed([b]) for b in batches]), model=[model],
            num_microbatches=len(batches), seq_length=64, micro_batch_size=1, forward_only=False,
        )
        flat = torch.cat([b.grad_data.clone() for b in model.buffers])
        return flat, sum(r["report"] for r in reports)

    g_both, rep_both = grads([dead, live])
    g_live, rep_live = grads([live])
    assert torch.isfinite(g_both).all() and torch.isfinite(rep_both).all()
    assert rep_both[1] == rep_live[1] > 0
    assert torch.allclose(g_both, g_live, atol=1e-7, rtol=1e-5)
    g_dead, rep_dead = grads([dead])
    assert rep_dead[1] == 0 and torch.isfinite(g_dead).all() and (g_dead == 0).all()


def test_dataset_is_deterministic_and_blends_by_weight(megatron_world, tmp_path):
    ds1 = build_train_dataset("synthetic", 40, 64, PAD, 7, str(tmp_path / "c1"), synthetic_num_packs=30)
    ds2 = build_train_dataset("synthetic", 40, 64, PAD, 7, str(tmp_path / "c2"), synthetic_num_packs=30)
    assert len(ds1) == 40
    ids = [ds1[i]["sample_id"] for i in range(40)]
    assert ids == [ds2[i]["sample_id"] for i in range(40)]
    assert len(set(ids[:30])) == 30, "the first epoch visits every pack once"
    mix = tmp_path / "mix.yaml"
    mix.write_text("datasets:\n  - {path: synthetic, weight: 0.75}\n  - {path: synthetic, weight: 0.25}\n")
    paths, weights = read_mixture(str(mix))
    assert paths == ["synthetic", "synthetic"] and weights == [0.75, 0.25]
    blended = build_train_dataset(str(mix), 200, 64, PAD, 7, str(tmp_path / "c3"), synthetic_num_packs=30)
    share = np.mean([blended[i]["dataset_id"] == 0 for i in range(200)])
    assert abs(share - 0.75) < 0.02


def test_each_epoch_is_a_fresh_permutation_fixed_by_the_seed(megatron_world, tmp_path):
    packs, epochs = 12, 4
    def pack_order(seed, cache):
        ds = build_train_dataset("synthetic", packs * epochs, 64, PAD, seed, str(tmp_path / cache),
                                 synthetic_num_packs=packs)
        return [int(ds[i]["sample_id"].rsplit("#", 1)[1]) for i in range(packs * epochs)]

    order = pack_order(7, "a")
    per_epoch = [order[e * packs : (e + 1) * packs] for e in range(epochs)]
    for epoch in per_epoch:
        assert sorted(epoch) == list(range(packs)), "every epoch visits every pack exactly once"
    assert len({tuple(epoch) for epoch in per_epoch}) == epochs, "each epoch has its own shuffle"
    assert per_epoch[0] != list(range(packs)), "shuffled, not in file order"
    assert pack_order(7, "b") == order, "same seed, same order"
    assert pack_order(8, "c") != order, "another seed, another order"


@pytest.mark.parametrize("dp_size", [1, 2, 4])
@pytest.mark.parametrize("micro_batch", [1, 2, 3])
def test_global_batch_sampler_splits_every_global_batch_across_ranks(dp_size, micro_batch):
    global_batch, steps, consumed = 24, 3, 24  # resumed after one step
    total = global_batch * (steps + 1)
    per_rank = [list(GlobalBatchSampler(total, consumed, micro_batch, rank, dp_size)) for rank in range(dp_size)]
    for rank, batches in enumerate(per_rank):
        assert all(len(batch) == micro_batch for batch in batches)
        assert len(batches) == len(GlobalBatchSampler(total, consumed, micro_batch, rank, dp_size))
    seen = [sample for batches in per_rank for batch in batches for sample in batch]
    assert len(seen) == len(set(seen)), "ranks never share a sample"
    assert sorted(seen) == list(range(consumed, total)), "every sample after consumed_samples, none before"
    # Independent of DP: global step k is samples [k*G, (k+1)*G), in the order of DP=1 micro-batches.
    micro_steps_per_global = global_batch // (micro_batch * dp_size)
    for step in range(steps):
        in_order = []
        for m in range(micro_steps_per_global):
            for rank in range(dp_size):
                in_order += per_rank[rank][step * micro_steps_per_global + m]
        start = consumed + step * global_batch
        assert in_order == list(range(start, start + global_batch))


@pytest.mark.parametrize("recompute", ["full", "selective"])
def test_activation_recompute_gives_identical_gradients(megatron_world, recompute):
    from megatron_patch import train as train_mod

    def grads(mode, state=None):
        cfg = tiny_config()
        cfg.training.recompute = mode
        cfg.data.pad_token_id, cfg.data.seq_length = PAD, 128
        model, _ = train_mod.build_model(cfg)
        inner = train_mod.unwrap(model)
        if state is not None:
            inner.load_state_dict(state)
        model.train()
        batch = collate_packed([dict(make_training_sample(make_pack(documents()), 128, PAD), sample_id="p")])
        losses = per_token_losses(inner, batch)
        (losses * batch["loss_mask"][0]).sum().backward()
        return {n: p.main_grad.clone() for n, p in inner.named_parameters()}, inner.state_dict()

    ref, state = grads("none")
    got, _ = grads(recompute, state)
    assert ref.keys() == got.keys()
    for name in ref:
        assert torch.equal(ref[name], got[name]), name


def test_matches_hf_solo_model_on_a_packed_row(megatron_world):
    """Same weights, same packed row: the megatron-core model and the HF SoloForCausalLM agree.

    The HF model keeps documents apart through position ids that restart per document; this pins
    RMSNorm, SwiGLU, GQA, RoPE, the sliding window and the patch embedding to the HF definition
    (the one SOLO-7B's released weights use). Weight mapping at TP=1: fused QKV per KV group, fc1 =
    [gate; up].
    """
    from solo.hf.configuration_solo import SoloConfig
    from solo.hf.modeling_solo import SoloForCausalLM

    window = 6
    model = tiny_model(sliding_window=window)
    cfg = tiny_config(window).model
    hf = SoloForCausalLM(SoloConfig(
        vocab_size=VOCAB, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
        sliding_window=window, tie_word_embeddings=False, max_position_embeddings=256,
        attn_implementation="sdpa",
    )).eval()
    lm = model.language_model
    heads, groups = cfg.num_attention_heads, cfg.num_query_groups
    dim = cfg.hidden_size // heads
    sd = {
        "model.embed_tokens.weight": lm.embedding.word_embeddings.weight,
        "model.embed_vision_patch.weight": model.vision_patch_projection.weight,
        "model.norm.weight": lm.decoder.final_layernorm.weight,
        "lm_head.weight": lm.output_layer.weight,
    }
    for i, layer in enumerate(lm.decoder.layers):
        qkv = layer.self_attention.linear_qkv.weight.view(groups, heads // groups + 2, dim, -1)
        q, k, v = qkv[:, :-2], qkv[:, -2], qkv[:, -1]
        gate, up = layer.mlp.linear_fc1.weight.chunk(2)
        p = f"model.layers.{i}."
        sd.update({
            p + "self_attn.q_proj.weight": q.reshape(heads * dim, -1),
            p + "self_attn.k_proj.weight": k.reshape(groups * dim, -1),
            p + "self_attn.v_proj.weight": v.reshape(groups * dim, -1),
            p + "self_attn.o_proj.weight": layer.self_attention.linear_proj.weight,
            p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
            p + "mlp.down_proj.weight": layer.mlp.linear_fc2.weight,
            p + "input_layernorm.weight": layer.input_layernorm.weight,
            p + "post_attention_layernorm.weight": layer.pre_mlp_layernorm.weight,
        })
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    assert not unexpected and not [m for m in missing if "rotary" not in m], (missing, unexpected)

    batch = collate_packed([dict(make_training_sample(make_pack(documents()), 128, PAD), sample_id="p")])
    with torch.no_grad():
        ours = per_token_losses(model, batch)
        cu = batch["cu_seqlens"].long()
        position_ids = torch.cat([torch.arange(int(n)) for n in cu[1:] - cu[:-1]])[None]
        # transformers builds its block-causal "packed" mask from restarting position ids only
        # without a cache, hence use_cache=False.
        logits = hf(input_ids=batch["tokens"], position_ids=position_ids, vision_patches=batch["patches"],
                    vision_patch_indices=batch["vision_patch_indices"], use_cache=False).logits[0]
        theirs = torch.nn.functional.cross_entropy(logits.float(), batch["labels"][0], reduction="none")
    mask = batch["loss_mask"][0] > 0
    assert mask.sum() > 20
    diff = (ours - theirs)[mask].abs().max().item()
    assert diff <= 1e-4, f"megatron vs HF per-token loss differ by {diff}"


def test_non_integer_rope_theta_reaches_the_rotary_embedding(megatron_world):
    """rope_theta 100.9 stays 100.9 (megatron-core's int-typed rotary_base used to get int(100.9) = 100,
    an export differing from the trained model); the frequencies equal the HF model's."""
    from solo.hf.configuration_solo import SoloConfig
    from solo.hf.modeling_solo import SoloForCausalLM

    cfg = tiny_config()
    tc = build_transformer_config(cfg.model, cfg.parallel, cfg.training)
    ours = SoloGPTModel(tc, solo_layer_spec("local"), VOCAB, 256, 100.9).language_model.rotary_pos_emb.inv_freq
    hf = SoloForCausalLM(SoloConfig(
        vocab_size=VOCAB, hidden_size=cfg.model.hidden_size, intermediate_size=cfg.model.ffn_hidden_size,
        num_hidden_layers=1, num_attention_heads=cfg.model.num_attention_heads,
        num_key_value_heads=cfg.model.num_query_groups, rope_theta=100.9, max_position_embeddings=256,
    )).model.rotary_emb.inv_freq
    assert torch.equal(ours.cpu(), hf.cpu())


def test_memory_plan_parameter_count_is_exact(megatron_world):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "memory_plan.py"
    spec = importlib.util.spec_from_file_location("memory_plan", path)
    memory_plan = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(memory_plan)
    model = tiny_model()
    counts = memory_plan.parameter_count(tiny_config().model, VOCAB)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["patch_projection"] == model.vision_patch_projection.weight.numel()


def test_mfu_attention_counts_windowed_causal_pairs_of_real_documents():
    """The MFU's attention FLOPs count the causal query-key pairs inside each real document and its
    sliding window (megatron_patch.train.attention_pairs, which bench/bench_train_gpu.py uses too);
    padding, which becomes a document of its own for attention, does not count."""
    from megatron_patch.train import attention_pairs

    text = lambda n: ([5] * n, [1] * n, [-1] * n, [])  # noqa: E731
    sample = make_training_sample(make_pack([text(3), text(5)]), 16, PAD)
    assert sample["cu_seqlens"].tolist() == [0, 3, 8, 16]  # the padding document is there for attention
    assert sample["doc_lengths"] == [3, 5]
    other = make_training_sample(make_pack([text(4)]), 16, PAD)
    batch = collate_packed([dict(sample, sample_id="a"), dict(other, sample_id="b")])
    assert batch["doc_lengths"] == [3, 5, 4]
    # Without a window a document of n tokens has 1 + 2 + ... + n pairs.
    assert attention_pairs(batch["doc_lengths"], None) == 6 + 15 + 10
    # One long document, window 3: query i sees min(i + 1, 4) keys, 1 + 2 + 3 + 4 * 7 for 10 tokens.
    assert attention_pairs([10], 3) == 34
    # Many short documents inside the window: it changes nothing (50 * 1 + 20 * 3 + 10).
    short = [1] * 50 + [2] * 20 + [4]
    assert attention_pairs(short, 3) == attention_pairs(short, None) == 120
    assert attention_pairs([10] + short, 3) == 34 + 120


def test_trainer_step_counts_windowed_pairs_tokens_and_patches(megatron_world):
    """What the trainer's MFU is computed from (gather_step_samples, step_flops), on a step of two
    micro-batches: pairs under the window, real tokens and image patches, counted by hand."""
    from megatron_patch.train import gather_step_samples, step_flops

    rng = np.random.default_rng(0)
    image = image_document(rng, 1, 2, 0)  # BOS, image start, 2 patches, 7 caption tokens
    assert len(image[0]) == 11
    first = make_training_sample(make_pack([text_document(rng, 8), image]), 32, PAD)  # 10 + 11 tokens
    second = make_training_sample(make_pack([text_document(rng, 0)] * 3), 32, PAD)  # 3 x 2 tokens
    batches = [collate_packed([dict(first, sample_id="a")]), collate_packed([dict(second, sample_id="b")])]
    ids, pairs, tokens, patches = gather_step_samples(batches, window=3)
    assert ids == ["a", "b"] and tokens == 21 + 6 and patches == 2
    assert pairs == (1 + 2 + 3 + 4 * 7) + (1 + 2 + 3 + 4 * 8) + 3 * (1 + 2)
    cfg = tiny_config()  # 2 layers, hidden 64
    assert step_flops(cfg, 1000, 50, tokens, patches, pairs) == 6 * (1000 * 27 + 50 * 2) + 12 * 2 * 64 * pairs
