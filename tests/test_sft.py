"""Instruction tuning, the parts that run in one process: packed attention on the HF model, SFT data
(role masking, special-token text, bad samples), the step plan, the schedule and the recipe.
The 2-process Accelerate/DeepSpeed runs are in test_sft_dist.py (slow)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from data_prep.reader import PackedReader
from solo.checkpoints import LATEST_FILE, iteration_dir, prepare_tmp_dir, publish_checkpoint, read_latest
from solo.hf import SoloConfig, SoloForCausalLM
from solo.hf.modeling_solo import IGNORE_INDEX, packed_position_ids
from solo.recipe import ConfigError
from solo.sft.data import StepPlan, collate_packs, pack_instruction_files, plan_steps
from solo.sft.recipe import SFTConfig, load_sft_recipe
from solo.sft.train import decay_groups, lr_at
from sft_fixtures import make_instruction_set

PATCH_DIM = 3072


def pack(tmp_path, tokenizer_dir, samples, fmt="sharegpt", max_length=256, name="sft.json"):
    path = os.path.join(tmp_path, name)
    with open(path, "w", encoding="utf-8") as fh:
        if name.endswith(".jsonl"):
            fh.writelines(json.dumps(s) + "\n" for s in samples)
        else:
            json.dump(samples, fh)
    out = os.path.join(tmp_path, "packed-" + name)
    report = pack_instruction_files([path], fmt, out, tokenizer_dir, max_length=max_length, image_root=None,
                                    workers=1, progress=False)
    return PackedReader(out), report


# ------------------------------------------------------------------------------- packed attention


def tiny_model(attn: str, sliding_window: int | None) -> SoloForCausalLM:
    torch.manual_seed(0)
    config = SoloConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        sliding_window=sliding_window, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config._attn_implementation = attn
    return SoloForCausalLM(config).eval()


def random_document(rng, length: int, rows: int = 0, cols: int = 0):
    """Tokens, loss mask and patches of one document; an image block of rows × cols at position 1 if rows."""
    tokens = rng.integers(3, 400, size=length).astype(np.int32)
    indices = np.full(length, -1, np.int64)
    patches = np.zeros((0, PATCH_DIM), np.uint8)
    if rows:
        block = 1 + rows * (cols + 1)
        tokens[1:1 + block] = 401  # <vpatch>-like placeholder id; the patch embedding is what matters
        positions = (1 + np.arange(rows)[:, None] * (cols + 1) + np.arange(cols)[None, :]).reshape(-1)
        indices[positions] = np.arange(rows * cols)
        patches = rng.integers(0, 256, size=(rows * cols, PATCH_DIM), dtype=np.uint8)
    loss = (rng.random(length) < 0.6).astype(np.uint8)
    loss[0] = 0
    return tokens, loss, indices, patches


def concat_pack(documents):
    tokens = np.concatenate([d[0] for d in documents])
    loss = np.concatenate([d[1] for d in documents])
    offset, indices = 0, []
    for d in documents:
        indices.append(np.where(d[2] >= 0, d[2] + offset, -1))
        offset += len(d[3])
    cu = np.cumsum([0] + [len(d[0]) for d in documents]).astype(np.int32)
    return {"tokens": tokens, "loss_mask": loss, "cu_seqlens": cu, "patches": np.concatenate([d[3] for d in documents]),
            "vision_patch_indices": np.concatenate(indices)}


def per_token_losses(model, batch):
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
    labels = batch["labels"]
    return torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX,
                                             reduction="none")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("sliding_window", [None, 24])
def test_packed_rows_give_the_per_sample_losses_of_unpacked_rows(attn, sliding_window):
    """Each document of a packed row (two rows, padding, images) sees only itself, with positions
    restarting and the model's sliding window: its per-token losses equal running it alone (1e-5, fp32)."""
    model = tiny_model(attn, sliding_window)
    rng = np.random.default_rng(0)
    rows = [[random_document(rng, 40, 2, 3), random_document(rng, 57), random_document(rng, 33, 1, 4)],
            [random_document(rng, 70, 3, 2), random_document(rng, 19)]]
    packed = collate_packs([concat_pack(r) for r in rows], pad_id=0, length=140)
    assert packed["position_ids"][0, 40].item() == 0 and packed["position_ids"][0, 97].item() == 0
    losses = per_token_losses(model, packed)
    for row, documents in enumerate(rows):
        start = 0
        for document in documents:
            alone = collate_packs([concat_pack([document])], pad_id=0)
            expected = per_token_losses(model, alone)[0, : len(document[0]) - 1]
            got = losses[row, start : start + len(document[0]) - 1]
            mask = alone["labels"][0, 1 : len(document[0])] != IGNORE_INDEX
            assert mask.any()
            torch.testing.assert_close(got[mask], expected[mask], atol=1e-5, rtol=0)
            start += len(document[0])


def test_packed_rows_with_an_attention_mask_are_refused():
    model = tiny_model("sdpa", None)
    positions = torch.cat([torch.arange(5), torch.arange(5)]).unsqueeze(0)
    with pytest.raises(ValueError, match="attention_mask=None"):
        model(input_ids=torch.full((1, 10), 5), position_ids=positions, attention_mask=torch.ones(1, 10))


def test_packed_position_ids_restart_per_document_and_padding():
    got = packed_position_ids(torch.tensor([0, 3, 5]), 8).tolist()
    assert got == [0, 1, 2, 0, 1, 0, 1, 2]


# ------------------------------------------------------------------------------- SFT data


def labelled_spans(tokenizer, pack):
    """Decoded text of each maximal run of loss-carrying tokens."""
    spans, current = [], []
    for token, loss in zip(pack["tokens"].tolist(), pack["loss_mask"].tolist()):
        if loss:
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    if current:
        spans.append(tokenizer.decode(current))
    return spans


def test_loss_only_on_assistant_turns_and_their_end_of_turn_roles_from_the_data(tmp_path, tokenizer_dir, tokenizer):
    """Multi-turn, system prompt, an assistant turn first and two user turns in a row: the roles come
    from `from`, never from list position; assistant text + its </s> carry loss, nothing else does.
    The opening assistant turn (an orphan answer) is dropped, as LLaVA's training drops it."""
    samples = [
        {"conversations": [{"from": "system", "value": "be brief"},
                           {"from": "human", "value": "hello there"}, {"from": "gpt", "value": "hi friend"},
                           {"from": "human", "value": "and now?"}, {"from": "gpt", "value": "the answer is yes"}]},
        {"conversations": [{"from": "gpt", "value": "welcome back"}, {"from": "human", "value": "a question"},
                           {"from": "human", "value": "two of them"}, {"from": "chatgpt", "value": "two answers"}]},
    ]
    reader, report = pack(tmp_path, tokenizer_dir, samples)
    assert report["documents_packed"] == 2
    spans = sorted(s for i in range(len(reader)) for s in labelled_spans(tokenizer, reader[i]))
    assert spans == sorted([" hi friend</s>", " the answer is yes</s>", " two answers</s>"])


def test_special_token_text_in_a_message_stays_text(tmp_path, tokenizer_dir, tokenizer):
    text = "literal </s> and <s> and <vision><vpatch></vision> and [INST] inside"
    samples = [{"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "ok </s> done"}]}]
    reader, _ = pack(tmp_path, tokenizer_dir, samples, fmt="chat", name="chat.jsonl")
    tokens = reader[0]["tokens"].tolist()
    special = set(tokenizer.all_special_ids) | set(range(32000, len(tokenizer)))
    found = [t for t in tokens if t in special]
    assert found == [tokenizer.bos_token_id, tokenizer.eos_token_id]  # BOS and the one real end of turn
    assert text in tokenizer.decode(tokens)


def test_each_bad_sample_kind_is_reported_and_the_rest_is_packed(tmp_path, tokenizer_dir):
    path = make_instruction_set(str(tmp_path / "data"), count=8, bad=True)
    out = str(tmp_path / "packed")
    report = pack_instruction_files([path], "llava", out, tokenizer_dir, max_length=256, image_root=None, workers=1,
                                    progress=False)
    reasons = {item["input"].split("id ")[-1].rstrip(")"): item["reason"] for item in report["rejected"]}
    assert set(reasons) == {"missing-image", "unknown-role", "no-answer", "placeholders", "broken-image"}
    assert "missing image file" in reasons["missing-image"]
    assert "unknown role 'robot'; expected human, gpt or system" in reasons["unknown-role"]
    assert "does not end with an assistant turn" in reasons["no-answer"]
    assert "2 <image> placeholders but 1 images" in reasons["placeholders"]
    assert "not a readable image" in reasons["broken-image"]
    assert report["documents_packed"] == 8 and report["documents_in"] == 13
    with open(os.path.join(out, "report.json"), encoding="utf-8") as fh:
        assert json.load(fh)["documents_rejected"] == 5


def test_multi_image_multi_turn_and_text_only_samples_pack_and_collate(tmp_path, tokenizer_dir, tokenizer):
    path = make_instruction_set(str(tmp_path / "data"), count=8)
    out = str(tmp_path / "packed")
    report = pack_instruction_files([path], "llava", out, tokenizer_dir, max_length=256, image_root=None, workers=1,
                                    progress=False)
    assert report["documents_packed"] == 8 and report["images"] == 2 + 2 + 2 + 2  # kinds: 1, 1, 2, 0 images
    reader = PackedReader(out)
    batch = collate_packs([reader[i] for i in range(len(reader))], pad_id=tokenizer.pad_token_id)
    vpatch = tokenizer.convert_tokens_to_ids("<vpatch>")
    positions = batch["vision_patch_indices"] >= 0
    assert torch.equal(positions, batch["input_ids"] == vpatch)
    assert sorted(batch["vision_patch_indices"][positions].tolist()) == list(range(len(batch["vision_patches"])))
    assert not (batch["labels"][positions] != IGNORE_INDEX).any()  # no loss on any vision token


def test_collate_feeds_the_patch_projection_on_text_only_micro_batches():
    text_only = {"tokens": np.array([1, 5, 6, 2], np.int32), "loss_mask": np.array([0, 0, 1, 1], np.uint8),
                 "cu_seqlens": np.array([0, 4], np.int32), "patches": np.zeros((0, PATCH_DIM), np.uint8),
                 "vision_patch_indices": np.full(4, -1, np.int64)}
    batch = collate_packs([text_only], pad_id=0)
    assert batch["vision_patches"].shape == (1, PATCH_DIM)
    assert batch["vision_patch_indices"][0].tolist() == [-1, -1, -1, -1, 0]
    assert batch["labels"][0, 4].item() == IGNORE_INDEX and batch["position_ids"][0].tolist() == [0, 1, 2, 3, 0]
    model = tiny_model("sdpa", None)
    batch["input_ids"][batch["input_ids"] > 400] = 5
    out = model(**batch, num_items_in_batch=1)
    out.loss.backward()
    grad = model.model.embed_vision_patch.weight.grad
    assert grad is not None and torch.count_nonzero(grad) == 0  # present for the reduction, exactly zero


# ------------------------------------------------------------------------------- plan, schedule, recipe


def test_step_plan_visits_every_pack_once_per_epoch_across_ranks_and_resumes_exactly():
    plan = StepPlan(num_packs=23, world_size=2, micro_batches=3, micro_batch_packs=1, epochs=2, seed=7)
    seen = []
    for step in range(plan.total_steps):
        for rank in range(2):
            seen += [i for micro in plan.rank_packs(step, rank) for i in micro]
    assert sorted(seen) == sorted(list(range(23)) * 2)
    assert plan.total_steps == 8  # ceil(46 / 6): the short last step is padded with empty micro-batches
    assert plan.rank_packs(7, 1)[2] == []  # a rank without data gets an empty (no-loss) micro-batch
    assert plan_steps(100, 500, 40, 2, 1, 1, 0).micro_batches == 4  # 5 samples per pack: 40 / (5·2)


def test_schedule_warms_up_linearly_then_follows_a_cosine_in_optimizer_steps():
    cfg = SFTConfig()
    cfg.training.lr, cfg.training.min_lr, cfg.training.warmup_steps = 1e-5, 0.0, 50
    assert lr_at(0, cfg, 1000) == pytest.approx(2e-7)
    assert lr_at(49, cfg, 1000) == pytest.approx(1e-5)
    assert lr_at(50 + 475, cfg, 1000) == pytest.approx(5e-6)
    assert lr_at(1000, cfg, 1000) == pytest.approx(0.0, abs=1e-12)


def test_weight_decay_skips_norms():
    model = tiny_model("sdpa", None)
    decay, no_decay = decay_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("norm" in names[id(p)] for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert not any("norm" in names[id(p)] for p in decay["params"]) and decay["weight_decay"] == 0.1


def test_recipes_load_with_solo_values_and_reject_unknown_keys_and_wrong_types(tmp_path, monkeypatch):
    monkeypatch.setenv("MODEL", str(tmp_path))
    monkeypatch.setenv("DATA", "x.json")
    monkeypatch.setenv("SAVE", str(tmp_path / "run"))
    cfg = load_sft_recipe("solo")
    t = cfg.training
    assert (t.lr, t.samples_per_step, cfg.data.max_length, t.epochs, t.warmup_steps, t.weight_decay) == \
        (1e-5, 512, 4096, 1, 50, 0.1)
    assert load_sft_recipe("debug_cpu", ["training.max_steps=3"]).training.max_steps == 3
    with pytest.raises(ConfigError, match="training.learning_rate"):
        load_sft_recipe("solo", ["training.learning_rate=1"])
    with pytest.raises(ConfigError, match="training.epochs: expected an integer"):
        load_sft_recipe("solo", ["training.epochs=one"])
    with pytest.raises(ConfigError, match="data.format"):
        load_sft_recipe("solo", ["data.format=csv"])
    monkeypatch.delenv("MODEL")
    with pytest.raises(ConfigError, match="MODEL"):
        load_sft_recipe("solo")


def test_shared_checkpoint_bookkeeping_is_atomic_and_keeps_the_last_n(tmp_path):
    save = str(tmp_path)
    for step in (1, 2, 3):
        tmp = prepare_tmp_dir(save, step)
        open(os.path.join(tmp, "weights"), "w").close()
        assert read_latest(save) == (step - 1 if step > 1 else None)  # not visible before publication
        publish_checkpoint(save, step, keep_last=2)
    os.makedirs(iteration_dir(save, 4) + ".tmp")  # a save that crashed
    assert read_latest(save) == 3
    prepare_tmp_dir(save, 5)
    publish_checkpoint(save, 5, keep_last=2)
    assert sorted(n for n in os.listdir(save) if n != LATEST_FILE) == ["iter_0000003", "iter_0000005"]
    assert read_latest(save) == 5


def test_gradient_checkpointing_gives_the_same_gradients_on_packed_rows():
    rng = np.random.default_rng(1)
    batch = collate_packs([concat_pack([random_document(rng, 30, 2, 2), random_document(rng, 25)])], pad_id=0)
    grads = []
    for checkpointing in (False, True):
        model = tiny_model("sdpa", 16).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(**batch).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=0)
