"""The native Hugging Face SOLO model (solo/hf): forward, loss, generation, export and loading.

Everything runs on a tiny random model (hidden 64, 2 layers) built here; no downloads.
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

from solo.hf import SoloConfig, SoloForCausalLM

from hf_tiny import (
    FIRST_TEXT_ID,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PAD,
    PATCH_DIM,
    TINY,
    TOLERANCE,
    VISION,
    VOCAB_SIZE,
    collate,
    make_sample,
    mixed_samples,
    tiny_config,
)


@pytest.fixture(scope="module")
def model() -> SoloForCausalLM:
    torch.manual_seed(0)
    return SoloForCausalLM(tiny_config()).eval()


def normalise_by_contract(patches: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3072) in (c, y, x) order → x/255 then ImageNet mean/std of channel index // 1024."""
    channel = torch.arange(PATCH_DIM) // 1024
    mean = torch.tensor(IMAGENET_MEAN)[channel]
    std = torch.tensor(IMAGENET_STD)[channel]
    return (patches.float() / 255.0 - mean) / std


def test_patch_position_input_is_vpatch_embedding_plus_projected_normalised_patch(model):
    batch = collate(mixed_samples())
    captured = {}

    def capture(module, args, kwargs):
        captured["embeds"] = (args[0] if args else kwargs["hidden_states"]).detach()

    handle = model.model.layers[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        handle.remove()

    embed = model.model.embed_tokens.weight.detach()
    projection = model.model.embed_vision_patch.weight.detach()
    expected = embed[batch["input_ids"]].clone()
    indices = batch["vision_patch_indices"]
    is_patch = indices >= 0
    expected[is_patch] += normalise_by_contract(batch["vision_patches"])[indices[is_patch]] @ projection.T
    assert torch.equal(captured["embeds"][~is_patch], expected[~is_patch])
    torch.testing.assert_close(captured["embeds"], expected, atol=1e-6, rtol=1e-6)


def test_changing_a_patch_changes_logits_only_from_its_position_on(model):
    batch = collate(mixed_samples())
    with torch.no_grad():
        base = model(**batch).logits
        changed_patches = batch["vision_patches"].clone()
        changed_patches[4] = 255 - changed_patches[4]
        changed = model(**{**batch, "vision_patches": changed_patches}).logits
    assert base.shape == (3, batch["input_ids"].shape[1], VOCAB_SIZE)
    assert torch.isfinite(base[batch["attention_mask"].bool()]).all()
    position = int((batch["vision_patch_indices"][0] == 4).nonzero())
    assert torch.equal(base[0, :position], changed[0, :position])
    assert (base[0, position:] - changed[0, position:]).abs().amax(dim=-1).min() > 1e-4
    assert torch.equal(base[1:], changed[1:])


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_batch_gives_each_sample_the_logits_it_gets_alone(model, padding_side):
    samples = mixed_samples(seed=1)
    batch = collate(samples, padding_side)
    # Left padding needs positions that start at each sample's first real token, as generate uses.
    position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batched = model(**batch, position_ids=position_ids).logits
        for row, sample in enumerate(samples):
            alone = model(**collate([sample])).logits[0]
            real = batch["attention_mask"][row].bool()
            torch.testing.assert_close(batched[row][real], alone, atol=TOLERANCE, rtol=0)


def test_uint8_patches_equal_pre_normalised_float_patches(model):
    batch = collate(mixed_samples())
    with torch.no_grad():
        from_uint8 = model(**batch).logits
        from_float = model(**{**batch, "vision_patches": normalise_by_contract(batch["vision_patches"])}).logits
        # Raw pixel values passed as floats are NOT normalised again: they give other logits.
        from_raw_float = model(**{**batch, "vision_patches": batch["vision_patches"].float()}).logits
    torch.testing.assert_close(from_uint8, from_float, atol=1e-6, rtol=0)
    assert not torch.allclose(from_uint8, from_raw_float, atol=1e-3)


def test_loss_is_mean_next_token_cross_entropy_over_labelled_tokens(model):
    batch = collate(mixed_samples())
    labels = batch["input_ids"].clone()
    labels[(batch["vision_patch_indices"] >= 0) | (batch["attention_mask"] == 0)] = -100
    labels[labels >= VISION] = -100
    with torch.no_grad():
        output = model(**batch, labels=labels)
    log_probs = output.logits.float().log_softmax(-1)
    terms = [
        -log_probs[b, t - 1, labels[b, t]]
        for b in range(labels.shape[0])
        for t in range(1, labels.shape[1])
        if labels[b, t] != -100
    ]
    torch.testing.assert_close(output.loss, torch.stack(terms).mean(), atol=1e-5, rtol=1e-5)

    # Two micro-batches normalised by the global token count add up to the full-batch loss.
    first, second = ({k: v[rows] for k, v in batch.items() if k != "vision_patches"} for rows in ([0], [1, 2]))
    n_first = int((batch["vision_patch_indices"][0] >= 0).sum())
    first["vision_patches"] = batch["vision_patches"][:n_first]
    second["vision_patches"] = batch["vision_patches"][n_first:]
    second["vision_patch_indices"] = torch.where(
        second["vision_patch_indices"] >= 0, second["vision_patch_indices"] - n_first, -1
    )
    total = len(terms)
    with torch.no_grad():
        split = sum(
            model(**part, labels=part_labels, num_items_in_batch=total).loss
            for part, part_labels in ((first, labels[[0]]), (second, labels[[1, 2]]))
        )
    torch.testing.assert_close(split, output.loss, atol=1e-5, rtol=1e-5)


def test_batch_without_label_tokens_gives_zero_loss_and_finite_gradients():
    torch.manual_seed(0)
    model = SoloForCausalLM(tiny_config())
    batch = collate(mixed_samples())
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, 0] = batch["input_ids"][:, 0]  # the first position is never a target after the shift
    loss = model(**batch, labels=labels).loss
    assert loss.item() == 0.0
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def greedy_without_cache(model, sample, steps: int) -> list[int]:
    """Reference decoding: re-run the full sequence (with its patches) for every new token."""
    ids, indices, patches = sample
    ids, indices = list(ids), list(indices)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(
                input_ids=torch.tensor([ids]),
                vision_patches=patches,
                vision_patch_indices=torch.tensor([indices]),
                use_cache=False,
            ).logits
            ids.append(int(logits[0, -1].argmax()))
            indices.append(-1)
    return ids[len(sample[0]) :]


def generate(model, batch, steps: int, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            **batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=PAD, **kwargs
        )


def test_generate_with_image_matches_decoding_without_cache(model):
    sample = mixed_samples()[0]
    output = generate(model, collate([sample]), steps=6)
    assert output[0, len(sample[0]) :].tolist() == greedy_without_cache(model, sample, steps=6)


def test_generate_projects_patches_once_not_per_decode_step(model):
    calls = []
    handle = model.model.embed_vision_patch.register_forward_hook(lambda module, args, out: calls.append(args[0].shape))
    try:
        generate(model, collate(mixed_samples(), padding_side="left"), steps=6)
    finally:
        handle.remove()
    total_patches = sum(sample[2].shape[0] for sample in mixed_samples())
    assert calls == [torch.Size([total_patches, PATCH_DIM])]


def test_left_padded_batched_generation_equals_generating_each_sample_alone(model):
    samples = mixed_samples(seed=2)
    batch = collate(samples, padding_side="left")
    batched = generate(model, batch, steps=6)
    for row, sample in enumerate(samples):
        alone = generate(model, collate([sample]), steps=6)
        assert batched[row, -6:].tolist() == alone[0, -6:].tolist()


def test_multiple_return_sequences_see_their_own_patches(model):
    samples = mixed_samples()[::2]  # two samples with images, different patch counts
    batch = collate(samples, padding_side="left")
    with torch.no_grad():
        expected_first_logits = [model(**collate([sample])).logits[0, -1] for sample in samples]
        output = model.generate(
            **batch,
            max_new_tokens=1,
            do_sample=True,
            num_return_sequences=2,
            pad_token_id=PAD,
            return_dict_in_generate=True,
            output_logits=True,
        )
    first_step = output.logits[0]  # (batch * 2, vocab), rows in sample order
    for row in range(4):
        torch.testing.assert_close(first_step[row], expected_first_logits[row // 2], atol=TOLERANCE, rtol=0)


def _inconsistent_inputs(batch):
    """(name, changed inputs, regex the error must match) for each kind of inconsistency."""
    n, width = batch["vision_patches"].shape
    b, s = batch["input_ids"].shape
    return {
        "index_beyond_patches": (
            {"vision_patches": batch["vision_patches"][:-1]},
            rf"refers to patch {n - 1} .*\({n - 1}, {width}\)",
        ),
        "patches_without_indices": ({"vision_patch_indices": None}, rf"\({n}, {width}\).*without vision_patch_indices"),
        "wrong_patch_width": (
            {"vision_patches": batch["vision_patches"][:, :768]},
            rf"\(num_patches, {width}\).*\({n}, 768\)",
        ),
        "indices_shape": (
            {"vision_patch_indices": batch["vision_patch_indices"][:, :-1]},
            rf"\({b}, {s - 1}\).*\({b}, {s}\)",
        ),
        "indices_without_patches": ({"vision_patches": None}, r"point at patches .*vision_patches is None"),
        "swapped": (
            {"vision_patches": batch["vision_patch_indices"], "vision_patch_indices": batch["vision_patches"]},
            r"integer tensor.*swapped",
        ),
    }


@pytest.mark.parametrize("case", list(_inconsistent_inputs(collate(mixed_samples()))))
def test_inconsistent_vision_inputs_raise_errors_naming_shapes(model, case):
    batch = collate(mixed_samples())
    batch["vision_patches"] = normalise_by_contract(batch["vision_patches"])  # float, like released SOLO
    change, message = _inconsistent_inputs(batch)[case]
    with pytest.raises((ValueError, TypeError), match=message):
        model(**{**batch, **change})


# Runs in a fresh interpreter that cannot import `solo`: the checkpoint must carry its own code.
REMOTE_LOAD_SCRIPT = textwrap.dedent(
    """
    import sys
    model_dir, inputs_path, outputs_path, *site_dirs = sys.argv[1:]
    sys.path.extend(site_dirs)
    try:
        import solo
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("solo is importable here: " + solo.__file__)
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
    assert not type(model).__module__.startswith("solo"), type(model).__module__
    inputs = load_file(inputs_path)
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    save_file({"logits": logits.contiguous(), "generated": generated.contiguous()}, outputs_path)
    """
)


@pytest.mark.e2e
def test_export_loads_with_trust_remote_code_where_solo_is_not_installed(model, tmp_path):
    export_dir = tmp_path / "export"
    model.save_pretrained(export_dir)
    files = {path.name for path in export_dir.iterdir()}
    assert {"model.safetensors", "config.json", "modeling_solo.py", "configuration_solo.py"} <= files
    assert "image_processing_solo.py" in files  # relative import of normalize_patches travels along
    config = json.loads((export_dir / "config.json").read_text())
    assert config["model_type"] == "solo"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_solo.SoloConfig",
        "AutoModelForCausalLM": "modeling_solo.SoloForCausalLM",
    }
    assert set(load_file(export_dir / "model.safetensors")) == set(model.state_dict())

    batch = collate(mixed_samples(), padding_side="left")  # uint8 patches: exercises normalisation
    save_file(batch, tmp_path / "inputs.safetensors")
    with torch.no_grad():
        expected_logits = model(**batch).logits
    expected_generated = generate(model, batch, steps=4)

    # In this process the Auto classes resolve "solo" to our classes without remote code.
    assert type(AutoConfig.from_pretrained(export_dir)) is SoloConfig
    assert type(AutoModelForCausalLM.from_pretrained(export_dir)) is SoloForCausalLM

    env = {
        "PATH": os.environ.get("PATH", ""),
        "HF_MODULES_CACHE": str(tmp_path / "hf_modules"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HOME": str(tmp_path),
    }
    # -I: no PYTHONPATH, no cwd on sys.path; -S: no .pth files, so the editable install of solo
    # is invisible. The script then adds only the site-packages directories.
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", REMOTE_LOAD_SCRIPT, str(export_dir), str(tmp_path / "inputs.safetensors"),
         str(tmp_path / "outputs.safetensors"), *site.getsitepackages()],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = load_file(tmp_path / "outputs.safetensors")
    torch.testing.assert_close(outputs["logits"], expected_logits, atol=1e-6, rtol=0)
    assert torch.equal(outputs["generated"], expected_generated)


def test_released_solo_style_checkpoint_directory_loads(model, tmp_path):
    # What the released SOLO-7B ships: model_type "mistral", architectures ["SoloForCausalLM"],
    # vision_patch_size, legacy rope_theta, no auto_map, safetensors with the same weight names.
    released = tmp_path / "released"
    released.mkdir()
    config = {
        "architectures": ["SoloForCausalLM"],
        "model_type": "mistral",
        "vision_patch_size": 32,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.40.0",
        "use_cache": True,
        **{k: v for k, v in TINY.items() if k != "pad_token_id"},
    }
    (released / "config.json").write_text(json.dumps(config))
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, released / "model.safetensors", metadata={"format": "pt"})

    loaded, info = SoloForCausalLM.from_pretrained(released, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert loaded.config.vision_patch_size == 32 and loaded.config.attention_window == 4096
    with_config = SoloForCausalLM.from_pretrained(released, config=SoloConfig.from_pretrained(released))

    batch = collate(mixed_samples())
    with torch.no_grad():
        expected = model(**batch).logits
        for candidate in (loaded.eval(), with_config.eval()):
            torch.testing.assert_close(candidate(**batch).logits, expected, atol=0, rtol=0)


@pytest.mark.parametrize("backbone", ["mistral", "llama"])
def test_text_llm_checkpoint_starts_a_solo_model_with_identical_text_logits(backbone, tmp_path):
    torch.manual_seed(0)
    if backbone == "mistral":
        text_model = MistralForCausalLM(MistralConfig(**TINY))
    else:
        text_model = LlamaForCausalLM(LlamaConfig(**TINY))
    text_model.eval().save_pretrained(tmp_path / backbone)

    solo_model, info = SoloForCausalLM.from_pretrained(tmp_path / backbone, output_loading_info=True)
    assert sorted(info["missing_keys"]) == ["model.embed_vision_patch.weight"] and not info["unexpected_keys"]
    # Llama attends to the whole causal context: no Mistral sliding window may sneak in.
    assert solo_model.config.attention_window == (None if backbone == "llama" else 4096)

    text_ids = torch.randint(FIRST_TEXT_ID, VISION, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(solo_model.eval()(input_ids=text_ids).logits, text_model(text_ids).logits,
                                   atol=1e-6, rtol=0)


def test_generation_continuing_a_cache_sees_an_image_in_the_continued_part(model):
    """A cache of a text prefix, continued by `generate` over the rest of the prompt that holds an
    image: the continued window's patches are the ones at its positions (not the prompt's start)."""
    from transformers import DynamicCache

    generator = torch.Generator().manual_seed(5)
    ids, indices, patches = make_sample(generator, 6, [(2, 3)], 3)
    prefix = 4  # text only: the image starts later, inside the continued window
    assert all(i == -1 for i in indices[:prefix]) and any(i >= 0 for i in indices[prefix:])
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.tensor([ids[:prefix]]), cache=cache, use_cache=True)
    continued = generate(model, collate([(ids, indices, patches)]), steps=4, cache=cache)
    assert continued[0, len(ids):].tolist() == greedy_without_cache(model, (ids, indices, patches), steps=4)


def test_shift_labels_give_the_loss_of_the_labels_they_shift(model):
    batch = collate(mixed_samples(), padding_side="right")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    with torch.no_grad():
        expected = model(**batch, labels=labels).loss
        other = model(**batch, labels=labels.roll(1, dims=1)).loss
        got = model(**batch, shift_labels=shifted).loss
    assert got is not None and torch.allclose(got, expected) and not torch.allclose(got, other)
    with torch.no_grad():  # as in transformers' loss: given both, the shifted labels are the ones used
        assert torch.allclose(model(**batch, labels=labels.roll(1, dims=1), shift_labels=shifted).loss, expected)
    with pytest.raises(ValueError, match="shift_labels have shape"):
        model(**batch, shift_labels=shifted[:, 1:])
