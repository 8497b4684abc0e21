"""transformers calling conventions on `SoloForCausalLM`, text-only and with image patches.

Each test compares a convention (tuple outputs, `inputs_embeds` generation, continuing from a
cache, assisted decoding, beams and `num_return_sequences`, resizing the vocabulary) against the
plain call it must agree with, on the tiny random model of test_hf_model.py.
"""

from __future__ import annotations

import pytest
import torch
from hf_tiny import PAD, TOLERANCE, collate, make_sample, mixed_samples, tiny_config
from transformers import DynamicCache

from solo.hf import SoloForCausalLM

STEPS = 5


@pytest.fixture(scope="module")
def model() -> SoloForCausalLM:
    torch.manual_seed(0)
    return SoloForCausalLM(tiny_config()).eval()


def image_sample(seed: int = 0):
    """A prompt with two images followed by text (the case where patches matter)."""
    return make_sample(torch.Generator().manual_seed(seed), 3, [(2, 3), (1, 2)], 4)


def text_sample(seed: int = 0):
    return make_sample(torch.Generator().manual_seed(seed), 9, [], 0)


SAMPLES = {"text": text_sample, "image": image_sample}


def greedy(model, batch, steps: int = STEPS, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            **batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=PAD, **kwargs
        )


@pytest.mark.parametrize("kind", SAMPLES)
def test_return_dict_false_gives_the_output_fields_as_a_tuple(model, kind):
    batch = collate([SAMPLES[kind]()])
    labels = batch["input_ids"].clone()
    with torch.no_grad():
        expected = model(**batch, labels=labels)
        as_tuple = model(**batch, labels=labels, return_dict=False)
        without_loss = model(**batch, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], expected.loss, rtol=0, atol=0)
    torch.testing.assert_close(as_tuple[1], expected.logits, rtol=0, atol=0)
    torch.testing.assert_close(without_loss[0], expected.logits, rtol=0, atol=0)
    # The base model too, as MistralModel does.
    with torch.no_grad():
        hidden = model.model(**batch, return_dict=False)[0]
    torch.testing.assert_close(hidden, model.model(**batch).last_hidden_state, rtol=0, atol=0)


@pytest.mark.parametrize("kind", SAMPLES)
def test_generate_from_inputs_embeds_equals_generate_from_ids(model, kind):
    batch = collate([SAMPLES[kind]()])
    expected = greedy(model, batch)[:, batch["input_ids"].shape[1] :]
    with torch.no_grad():
        embeds = model.get_input_embeddings()(batch.pop("input_ids"))
    calls = []
    hook = model.model.embed_vision_patch.register_forward_hook(lambda module, args, out: calls.append(1))
    try:
        from_embeds = greedy(model, {**batch, "inputs_embeds": embeds})
    finally:
        hook.remove()
    # Decoder-only generate returns only the new tokens when it starts from embeddings.
    assert from_embeds.tolist() == expected.tolist()
    assert len(calls) == (1 if kind == "image" else 0)  # patches added once, at the first step


@pytest.mark.parametrize("kind", SAMPLES)
@pytest.mark.parametrize("cache_name", ["past_key_values", "cache"])
def test_generation_continues_from_a_cache(model, kind, cache_name):
    """Chat-style reuse: prefill the first turn, then generate after a follow-up with that cache."""
    first = SAMPLES[kind]()
    follow_up = make_sample(torch.Generator().manual_seed(5), 4, [], 0)[0][1:]  # text only, no BOS
    full = (first[0] + follow_up, first[1] + [-1] * len(follow_up), first[2])
    full_batch = collate([full])
    expected = greedy(model, full_batch)

    prefix_batch = collate([first])
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(**prefix_batch, past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == len(first[0])
    continued = greedy(model, full_batch, **{cache_name: cache})
    assert continued.tolist() == expected.tolist()


@pytest.mark.parametrize("kind", SAMPLES)
def test_assisted_decoding_with_a_draft_model_equals_greedy(model, kind):
    torch.manual_seed(1)
    draft = SoloForCausalLM(tiny_config(num_hidden_layers=1)).eval()
    batch = collate([SAMPLES[kind]()])
    expected = greedy(model, batch)
    assisted = greedy(model, batch, assistant_model=draft)
    assert assisted.tolist() == expected.tolist()


def test_beam_search_with_images_gives_each_sample_its_own_beams(model):
    samples = mixed_samples(seed=3)
    batch = collate(samples, padding_side="left")
    beams = dict(num_beams=3, num_return_sequences=2)
    batched = greedy(model, batch, **beams)
    assert batched.shape[0] == 2 * len(samples)
    for row, sample in enumerate(samples):
        alone = greedy(model, collate([sample]), **beams)
        assert batched[2 * row : 2 * row + 2, -STEPS:].tolist() == alone[:, -STEPS:].tolist()


def test_sampled_return_sequences_with_images_start_from_their_own_prompt(model):
    samples = [image_sample(0), image_sample(1)]
    batch = collate(samples, padding_side="left")
    with torch.no_grad():
        expected = [model(**collate([sample])).logits[0, -1] for sample in samples]
        out = model.generate(
            **batch, max_new_tokens=2, do_sample=True, num_return_sequences=3, pad_token_id=PAD,
            return_dict_in_generate=True, output_logits=True,
        )
    for row in range(6):
        torch.testing.assert_close(out.logits[0][row], expected[row // 3], atol=TOLERANCE, rtol=0)


def test_resize_token_embeddings_keeps_image_logits_and_saves(tmp_path):
    torch.manual_seed(0)
    model = SoloForCausalLM(tiny_config()).eval()
    batch = collate([image_sample()])
    with torch.no_grad():
        before = model(**batch).logits
    old_size = before.shape[-1]
    model.resize_token_embeddings(old_size + 8, mean_resizing=False)
    assert model.config.vocab_size == old_size + 8
    assert model.get_output_embeddings().weight.shape[0] == old_size + 8
    with torch.no_grad():
        after = model(**batch).logits
    assert after.shape[-1] == old_size + 8
    torch.testing.assert_close(after[..., :old_size], before, rtol=0, atol=0)
    model.save_pretrained(tmp_path)
    reloaded = SoloForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, after, rtol=0, atol=0)
