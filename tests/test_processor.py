"""Tokenizer extension, chat template and SoloProcessor layout."""

import numpy as np
import pytest
import torch
from PIL import Image

from solo.hf.image_processing_solo import SoloImageProcessor, image_to_patches
from solo.hf.processing_solo import VISION_TOKENS, SoloProcessor, VisionTokenIds
from solo.tiny import make_base_tokenizer
from solo.tokenizer import extend_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return extend_tokenizer(make_base_tokenizer())


@pytest.fixture(scope="module")
def processor(tokenizer):
    return SoloProcessor(SoloImageProcessor(), tokenizer)


def noise(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_vision_token_ids_equal_solo7b_for_a_32000_base(tokenizer):
    ids = tokenizer.convert_tokens_to_ids(["<vision>", "<vpatch>", "<vrow_sep>", "<vframe_sep>", "</vision>"])
    assert ids == [32000, 32001, 32002, 32003, 32004]
    assert tokenizer.convert_tokens_to_ids("<loc_1>") == 32005
    assert tokenizer.convert_tokens_to_ids("<loc_1024>") == 33028
    assert len(tokenizer) == 33029
    # Added tokens are atomic: the text form of an image block tokenises to the ids.
    assert tokenizer("<vision><vpatch></vision>", add_special_tokens=False)["input_ids"] == [32000, 32001, 32004]


def test_pad_is_a_real_token_distinct_from_eos(tokenizer):
    assert tokenizer.pad_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.pad_token_id < len(tokenizer)


def test_other_bases_get_tokens_appended_and_extension_is_idempotent():
    base = make_base_tokenizer(vocab_size=1000)
    extended = extend_tokenizer(base)
    assert extended.convert_tokens_to_ids("<vision>") == 1000
    assert len(extended) == 1000 + len(VISION_TOKENS)
    assert len(extend_tokenizer(extended)) == len(extended)


def test_chat_template_renders_mistral_turns_with_image_placeholders(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "Sure?"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<s>[INST] Be brief.\n\n<image>What is this? [/INST] A cat.</s>[INST] Sure? [/INST]"
    with pytest.raises(Exception, match="unknown role"):
        tokenizer.apply_chat_template([{"role": "robot", "content": "x"}], tokenize=False)


def test_processor_layout_of_one_image(processor, tokenizer):
    image = noise(96, 64)  # 2 rows x 3 cols, already on the grid
    out = processor("<image>\nDescribe.", images=[image])
    ids = VisionTokenIds.from_tokenizer(tokenizer)
    tokens = out["input_ids"][0].tolist()
    expected_block = [ids.start] + [ids.patch] * 3 + [ids.row_sep] + [ids.patch] * 3 + [ids.end]
    assert tokens[0] == tokenizer.bos_token_id
    assert tokens[1 : 1 + len(expected_block)] == expected_block
    assert tokenizer.decode(tokens[1 + len(expected_block) :]) == "\nDescribe."
    indices = out["vision_patch_indices"][0]
    assert indices[out["input_ids"][0] == ids.patch].tolist() == list(range(6))
    assert (indices[out["input_ids"][0] != ids.patch] == -1).all()
    np.testing.assert_array_equal(out["vision_patches"].numpy(), image_to_patches(image)[0])


def test_processor_batches_several_images_per_sample_and_samples(processor, tokenizer):
    images = [[noise(64, 32, 1)], [noise(32, 64, 2), noise(32, 32, 3)]]
    texts = ["One <image> here.", "<image> and <image> there, longer text to force padding."]
    out = processor(texts, images=images, padding_side="left")
    ids = VisionTokenIds.from_tokenizer(tokenizer)
    all_patches = [image_to_patches(image)[0] for group in images for image in group]
    np.testing.assert_array_equal(out["vision_patches"].numpy(), np.concatenate(all_patches))
    # Every <vpatch> points at its own image's patch, in order, globally across the batch.
    pointers = out["vision_patch_indices"][out["input_ids"] == ids.patch].tolist()
    assert pointers == list(range(len(out["vision_patches"])))
    # Left padding: the pad ids sit before the text and are masked out.
    first = out["input_ids"][0]
    pad_count = int((out["attention_mask"][0] == 0).sum())
    assert pad_count > 0 and (first[:pad_count] == tokenizer.pad_token_id).all()
    assert (out["attention_mask"][1] == 1).all()
    # The same samples one by one give the same unpadded tokens.
    single = processor(texts[0], images=images[0])
    assert single["input_ids"][0].tolist() == first[pad_count:].tolist()


def test_processor_rejects_placeholder_image_mismatch(processor):
    with pytest.raises(ValueError, match="1 <image> placeholders but 2 images"):
        processor("<image> only one", images=[noise(32, 32), noise(32, 32)])
    with pytest.raises(ValueError, match="2 <image> placeholders but 1 images"):
        processor("<image><image>", images=[noise(32, 32)])


def test_legacy_solo7b_prompt_form(processor, tokenizer):
    image = noise(64, 64)
    text = "<s>[INST] <image>\nWhat is shown? [/INST]"
    out = processor(text, images=[image], legacy_solo7b=True)
    tokens = out["input_ids"][0].tolist()
    ids = VisionTokenIds.from_tokenizer(tokenizer)
    block = [ids.start, ids.patch, ids.patch, ids.row_sep, ids.patch, ids.patch, ids.start]  # closed by <vision>
    assert tokens[: len(block)] == block
    assert tokens[len(block)] == tokenizer.bos_token_id  # image block before BOS
    assert tokenizer.decode(tokens[len(block) + 1 :]) == "[INST] What is shown? [/INST]"
    assert out["vision_patch_indices"][0, : len(block)].tolist() == [-1, 0, 1, -1, 2, 3, -1]


def test_processor_reports_bad_image_by_name(processor, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="bad.png"):
        processor("<image>", images=[str(bad)])


def test_text_only_batch_has_empty_patches(processor):
    out = processor(["hello", "hello there"])
    assert out["vision_patches"].shape == (0, 3072)
    assert (out["vision_patch_indices"] == -1).all()
    assert out["input_ids"].dtype == torch.long


def test_legacy_solo7b_opens_images_as_solo_did(processor):
    """SOLO-7B saw RGBA images with their alpha dropped and EXIF-rotated photos unrotated."""
    import io

    rgba = Image.new("RGBA", (64, 32), (10, 200, 30, 0))  # fully transparent green
    ours = processor("<image>", images=[rgba])["vision_patches"]
    legacy = processor("<image>", images=[rgba], legacy_solo7b=True)["vision_patches"]
    assert (ours == 255).all()  # composited on white
    assert legacy[:, :1024].eq(10).all() and legacy[:, 1024:2048].eq(200).all()  # colour kept, alpha dropped

    photo = Image.new("RGB", (64, 32), (0, 0, 0))
    exif = photo.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", exif=exif)
    rotated = processor("<image>", images=[buffer.getvalue()])
    unrotated = processor("<image>", images=[buffer.getvalue()], legacy_solo7b=True)
    assert rotated["vision_patches"].shape[0] == unrotated["vision_patches"].shape[0] == 2
    assert rotated["input_ids"].tolist() != unrotated["input_ids"].tolist()  # 2x1 vs 1x2 patch grid
