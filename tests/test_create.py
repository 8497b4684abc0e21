"""`solo create`: a base Mistral/Llama checkpoint becomes a SOLO checkpoint that Auto classes load."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoProcessor

from solo.cli import main as solo_main
from solo.create import CreateError, create_solo_checkpoint
from solo.tiny import make_base_checkpoint


@pytest.fixture(scope="module")
def solo_dir(base_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("created") / "solo"
    assert solo_main(["create", "--base", str(base_dir), "--out", str(out), "--seed", "7"]) == 0
    return out


def test_created_checkpoint_has_solo7b_vocab_and_mean_initialised_rows(base_dir, solo_dir):
    base = load_file(os.path.join(base_dir, "model.safetensors"))
    solo = load_file(os.path.join(solo_dir, "model.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert solo[name].shape[0] == 33029
        torch.testing.assert_close(solo[name][:32000], base[name], rtol=0, atol=0)
        expected_new = base[name].mean(dim=0).expand(1029, -1)
        torch.testing.assert_close(solo[name][32000:], expected_new)
    projection = solo["model.embed_vision_patch.weight"]
    assert projection.shape == (64, 3072)
    assert abs(projection.std().item() - 0.02) < 0.002 and abs(projection.mean().item()) < 0.002
    # Every base weight is carried over unchanged.
    for name, tensor in base.items():
        if name not in ("model.embed_tokens.weight", "lm_head.weight"):
            torch.testing.assert_close(solo[name], tensor, rtol=0, atol=0)
    config = json.loads((solo_dir / "config.json").read_text())
    assert config["vocab_size"] == 33029 and config["pad_token_id"] != config["eos_token_id"]


def test_projection_init_is_seeded(base_dir, tmp_path):
    first = create_solo_checkpoint(base_dir, tmp_path / "a", seed=3)
    second = create_solo_checkpoint(base_dir, tmp_path / "b", seed=3)
    third = create_solo_checkpoint(base_dir, tmp_path / "c", seed=4)
    key = "model.embed_vision_patch.weight"
    weights = [load_file(os.path.join(d, "model.safetensors"))[key] for d in (first, second, third)]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])


def test_text_logits_equal_the_base_model(base_dir, solo_dir):
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    solo = AutoModelForCausalLM.from_pretrained(solo_dir, trust_remote_code=True).eval()
    ids = torch.tensor([[1, 67, 405, 294, 263, 363, 16]])
    with torch.no_grad():
        expected = base(input_ids=ids).logits
        got = solo(input_ids=ids).logits
    torch.testing.assert_close(got[..., :32000], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.e2e
def test_auto_classes_load_without_this_package(solo_dir, tmp_path):
    """The exported directory carries its own code: a Python that cannot import `solo` still runs it."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 100, 3), dtype=np.uint8))
    image_path = tmp_path / "photo.png"
    image.save(image_path)
    prompt = "<s>[INST] <image>\nWhat is this? [/INST]"
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["solo"] = None  # make `import solo` fail, whatever is installed
        try:
            import solo
        except ImportError:
            pass
        else:
            raise SystemExit("solo is importable")
        import torch
        from transformers import AutoModelForCausalLM, AutoProcessor
        processor = AutoProcessor.from_pretrained({str(solo_dir)!r}, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained({str(solo_dir)!r}, trust_remote_code=True).eval()
        inputs = processor({prompt!r}, images=[{str(image_path)!r}])
        with torch.no_grad():
            logits = model(**inputs).logits
        torch.save({{"input_ids": inputs["input_ids"], "logits": logits}}, {str(tmp_path / "out.pt")!r})
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    remote = torch.load(tmp_path / "out.pt", weights_only=True)

    processor = AutoProcessor.from_pretrained(solo_dir, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(solo_dir, trust_remote_code=True).eval()
    inputs = processor(prompt, images=[str(image_path)])
    assert torch.equal(inputs["input_ids"], remote["input_ids"])
    assert (inputs["vision_patch_indices"] >= 0).sum() == 6  # 100x70 → 2 rows x 3 cols (closest aspect)
    with torch.no_grad():
        logits = model(**inputs).logits
    torch.testing.assert_close(logits, remote["logits"], rtol=0, atol=0)


def test_llama_base_is_supported(tmp_path):
    base = make_base_checkpoint(tmp_path / "llama", architecture="llama")
    out = create_solo_checkpoint(base, tmp_path / "solo")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "solo" and config["sliding_window"] is None


def test_bad_bases_give_clear_errors(base_dir, tmp_path, capsys):
    with pytest.raises(CreateError, match="is not a directory"):
        create_solo_checkpoint(tmp_path / "nope", tmp_path / "out")
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(CreateError, match="unsupported architecture model_type='gpt2'"):
        create_solo_checkpoint(gpt2, tmp_path / "out")
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((Path(base_dir) / name).read_bytes())
    with pytest.raises(CreateError, match="no tokenizer"):
        create_solo_checkpoint(no_tokenizer, tmp_path / "out")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("user data")
    assert solo_main(["create", "--base", str(base_dir), "--out", str(busy)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (busy / "keep.txt").read_text() == "user data"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".busy.tmp")]


def greedy_without_cache(model, inputs, steps: int) -> list[int]:
    """Reference decoding: re-run the whole sequence at every step and take the argmax."""
    ids, indices = inputs["input_ids"], inputs["vision_patch_indices"]
    new_tokens = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids, vision_patches=inputs["vision_patches"], vision_patch_indices=indices,
                           use_cache=False).logits
            token = int(logits[0, -1].argmax())
            new_tokens.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
            indices = torch.cat([indices, torch.tensor([[-1]])], dim=1)
    return new_tokens


def test_readme_generation_example_runs(solo_dir, tmp_path):
    """The README's usage snippet, on the created checkpoint: chat template → processor → generate."""
    image_path = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (60, 90, 3), dtype=np.uint8)).save(image_path)
    processor = AutoProcessor.from_pretrained(solo_dir, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(solo_dir, trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    inputs = processor(processor.apply_chat_template(messages), images=[str(image_path)])
    output = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    prompt_length = inputs["input_ids"].shape[1]
    assert torch.equal(output[0, :prompt_length], inputs["input_ids"][0])
    assert output[0, prompt_length:].tolist() == greedy_without_cache(model.eval(), inputs, steps=5)
    text = processor.decode(output[0], skip_special_tokens=True)
    assert text.startswith("[INST] What is this? [/INST]")


def test_batched_generation_after_reload_equals_one_by_one(solo_dir, tmp_path):
    """A saved and reloaded checkpoint left-pads batches (transformers 5 does not save padding_side)."""
    images = []
    for index, size in enumerate([(60, 90), (40, 40), (90, 50)]):
        images.append(tmp_path / f"image{index}.png")
        Image.fromarray(np.random.default_rng(index).integers(0, 256, (*size, 3), dtype=np.uint8)).save(images[-1])
    processor = AutoProcessor.from_pretrained(solo_dir, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(solo_dir, trust_remote_code=True).eval()
    prompts = [
        "<s>[INST] <image> and <image>: what differs between the two pictures? [/INST]",
        "<s>[INST] <image> cat? [/INST]",
    ]
    groups = [[str(images[0]), str(images[1])], [str(images[2])]]
    batch = processor(prompts, images=groups)
    assert batch["attention_mask"][1, 0] == 0 and batch["attention_mask"][1, -1] == 1  # left padding
    with torch.no_grad():
        batched = model.generate(**batch, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        for row, (prompt, group) in enumerate(zip(prompts, groups)):
            alone = model.generate(**processor(prompt, images=group), max_new_tokens=6, min_new_tokens=6,
                                   do_sample=False)
            assert batched[row, -6:].tolist() == alone[0, -6:].tolist()
