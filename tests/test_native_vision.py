"""Native-VLM switches (image_attention, vision_positions): megatron-core and the exported HF model
compute the same function for every combination, the masks and positions are the documented ones,
KV-cache generation equals a full forward, and the switches travel through conversion."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from megatron_patch import compat

compat.apply()

from megatron_patch.config import Config, ConfigError, ModelConfig, validate  # noqa: E402
from megatron_patch.config import ARCH_DEFAULTS  # noqa: E402
from megatron_patch.convert import architecture, hf_architecture_config, model_config_from_hf  # noqa: E402
from megatron_patch.data import collate_packed, make_training_sample, packed_seq_params  # noqa: E402
from megatron_patch.model import SoloGPTModel, build_transformer_config, solo_layer_spec  # noqa: E402
from megatron_patch.model.state_dict_mapping import MAPPINGS  # noqa: E402
from solo.hf import SoloConfig, SoloForCausalLM  # noqa: E402
from solo.hf.native_vision import image_layout_from_patch_indices, rope_section_positions  # noqa: E402
from megatron_tiny import PAD, VOCAB, documents, make_pack, tiny_config  # noqa: E402

SWITCHES = [(a, p) for a in ("causal", "bidirectional") for p in ("sequential", "2d")]
WINDOW = 40  # longer than every image block, shorter than the longest document: the window is exercised


def megatron_model(image_attention, vision_positions, backend="local"):
    cfg = tiny_config(WINDOW)
    cfg.model.image_attention, cfg.model.vision_positions, cfg.model.backend = (
        image_attention, vision_positions, backend)
    tc = build_transformer_config(cfg.model, cfg.parallel, cfg.training)
    torch.manual_seed(0)
    model = SoloGPTModel(tc, solo_layer_spec(backend), VOCAB, 256, cfg.model.rope_theta,
                         image_attention=image_attention, vision_positions=vision_positions).eval()
    return model, cfg.model


def exported_hf(model, model_cfg: ModelConfig) -> SoloForCausalLM:
    """The HF model the converter writes for ``model``: its mapping table and its config fields."""
    fields = dataclasses.asdict(model_cfg)
    arch = architecture(fields)
    state = model.state_dict()
    hf_state = {}
    for mapping in MAPPINGS:
        for layer in range(arch.num_layers) if mapping.per_layer else [None]:
            key = mapping.mcore
            if layer is not None:
                local = dict(mapping.module_names).get("local")
                key = local.format(i=layer) if local else key.replace("layers.", f"layers.{layer}.")
            hf_state.update(zip(mapping.hf_names(layer), mapping.transform.to_hf(state[key], arch)))
    config = SoloConfig(**hf_architecture_config(fields, arch), max_position_embeddings=256, attn_implementation="sdpa")
    hf = SoloForCausalLM(config).eval()
    missing, unexpected = hf.load_state_dict(hf_state, strict=False)
    assert not unexpected and not [m for m in missing if "rotary" not in m], (missing, unexpected)
    return hf


def packed_row(pack=None):
    return collate_packed([dict(make_training_sample(pack or make_pack(documents()), 128, PAD), sample_id="p")])


def megatron_logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=batch["tokens"], packed_seq_params=packed_seq_params(batch), patches=batch["patches"],
                    vision_patch_indices=batch["vision_patch_indices"], image_layout=batch["image_layout"])
    return out.reshape(-1, out.shape[-1])[:, :VOCAB]


def hf_forward(hf, batch) -> torch.Tensor:
    """The HF model's logits on a packed row (position ids restarting per document, no cache)."""
    cu = batch["cu_seqlens"].long()
    position_ids = torch.cat([torch.arange(int(n)) for n in cu[1:] - cu[:-1]])[None]
    return hf(input_ids=batch["tokens"], position_ids=position_ids, vision_patches=batch["patches"],
              vision_patch_indices=batch["vision_patch_indices"], use_cache=False).logits[0]


def hf_logits(hf, batch) -> torch.Tensor:
    with torch.no_grad():
        return hf_forward(hf, batch)


@pytest.mark.parametrize("backend", ["local", "flex"])
@pytest.mark.parametrize("image_attention,vision_positions", SWITCHES)
def test_megatron_and_exported_hf_logits_agree_on_packed_rows_with_images(
    megatron_world, image_attention, vision_positions, backend
):
    model, model_cfg = megatron_model(image_attention, vision_positions, backend)
    hf = exported_hf(model, model_cfg)
    assert (hf.config.image_attention, hf.config.vision_positions) == (image_attention, vision_positions)
    batch = packed_row()
    assert len(batch["image_layout"]) == 3 and len(batch["cu_seqlens"]) == 7  # 5 documents + padding
    diff = (megatron_logits(model, batch) - hf_logits(hf, batch)).abs().max().item()
    assert diff <= 1e-5, f"megatron ({backend}) vs exported HF logits differ by {diff}"


@pytest.mark.usefixtures("megatron_world")
@pytest.mark.parametrize("image_attention,vision_positions", SWITCHES)
def test_megatron_greedy_generation_answers_each_prompt_as_the_exported_hf_model_does_alone(
    image_attention, vision_positions
):
    """megatron_patch.generate: each document's question (up to its first loss token, with its own
    patches) continued greedily, all prompts in one packed row per step, gives the tokens the exported
    HF model gives that prompt on its own, position by position."""
    from megatron_patch.generate import document_prompt, greedy_generate

    model, model_cfg = megatron_model(image_attention, vision_positions)
    hf = exported_hf(model, model_cfg)
    pack = make_pack(documents())
    prompts = [document_prompt(pack, doc) for doc in range(len(pack["cu_seqlens"]) - 1)]
    cu = pack["cu_seqlens"]
    for doc, prompt in enumerate(prompts):  # the question is the document up to its first loss token
        start = int(cu[doc])
        first_loss = start + int(np.flatnonzero(pack["loss_mask"][start:cu[doc + 1]])[0])
        assert prompt["tokens"].tolist() == pack["tokens"][start:first_loss].tolist()
        own = pack["vision_patch_indices"][start:first_loss]
        assert np.array_equal(prompt["patches"][prompt["vision_patch_indices"][own >= 0]],
                              pack["patches"][own[own >= 0]])
    eos, new_tokens = 2, 4
    generated = greedy_generate(model, prompts, eos, VOCAB, new_tokens)

    for prompt, tokens in zip(prompts, generated):
        expected = []
        for _ in range(new_tokens):
            ids = torch.as_tensor(prompt["tokens"].tolist() + expected)[None]
            vpi = torch.as_tensor(prompt["vision_patch_indices"].tolist() + [-1] * len(expected))[None]
            with torch.no_grad():
                logits = hf(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None],
                            vision_patches=torch.as_tensor(prompt["patches"]), vision_patch_indices=vpi,
                            use_cache=False).logits[0, -1, :VOCAB]
            token = int(logits.argmax())
            if token == eos:
                break
            expected.append(token)
        assert tokens == expected
    assert sum(map(len, generated)) > 0


def _first_image(batch):
    offset, rows, cols = batch["image_layout"][0].tolist()
    first_patch = offset + 1
    last_patch = offset + rows * (cols + 1) - 1
    return offset, first_patch, last_patch


@pytest.mark.parametrize("backend", ["local", "flex"])
@pytest.mark.parametrize("image_attention", ["causal", "bidirectional"])
def test_perturbing_the_last_patch_reaches_exactly_the_allowed_tokens(megatron_world, image_attention, backend):
    """Last patch of an image changed: under bidirectional the image's first patch (and everything
    of the block) sees it, nothing before <vision> does; under causal nothing before the patch does."""
    model, model_cfg = megatron_model(image_attention, "2d", backend)
    hf = exported_hf(model, model_cfg)
    pack = make_pack(documents())
    batch = packed_row(pack)
    offset, first_patch, last_patch = _first_image(batch)
    row = int(batch["vision_patch_indices"][0, last_patch])
    altered = dict(pack, patches=pack["patches"].copy())
    altered["patches"][row] = 255 - altered["patches"][row]
    batch2 = packed_row(altered)
    document_end = int(batch["cu_seqlens"][1])
    for logits in (megatron_logits, lambda m, b: hf_logits(hf, b)):
        runner = model if logits is megatron_logits else None
        changed = (logits(runner, batch) - logits(runner, batch2)).abs().amax(-1) > 1e-6
        changed = torch.nonzero(changed).reshape(-1).tolist()
        if image_attention == "bidirectional":
            assert changed[0] == offset and first_patch in changed, changed
        else:
            assert changed[0] == last_patch, changed
        assert changed[-1] < document_end, "another document saw the patch"


def test_native_training_gradients_match_the_exported_hf_model(megatron_world):
    """Backward through the local backend's image-block masks and 2-D rotary positions gives the HF
    model's gradients (same summed loss over the packed row)."""
    model, model_cfg = megatron_model("bidirectional", "2d")
    hf = exported_hf(model, model_cfg)
    batch = packed_row()
    mask = batch["loss_mask"][0]
    losses = model(input_ids=batch["tokens"], labels=batch["labels"], packed_seq_params=packed_seq_params(batch),
                   patches=batch["patches"], vision_patch_indices=batch["vision_patch_indices"],
                   image_layout=batch["image_layout"])
    (losses[0] * mask).sum().backward()
    logits = hf_forward(hf, batch)
    theirs = torch.nn.functional.cross_entropy(logits, batch["labels"][0], reduction="none")
    (theirs * mask).sum().backward()
    pairs = [(model.vision_patch_projection.weight, hf.model.embed_vision_patch.weight),
             (model.language_model.decoder.final_layernorm.weight, hf.model.norm.weight),
             (model.language_model.decoder.layers[0].mlp.linear_fc2.weight, hf.model.layers[0].mlp.down_proj.weight)]
    for ours, reference in pairs:
        scale = reference.grad.abs().max().item()
        assert scale > 0 and (ours.grad - reference.grad).abs().max().item() <= 1e-5 * max(scale, 1.0)


@pytest.mark.parametrize("image_attention,vision_positions", SWITCHES)
def test_cache_generation_equals_full_forward(image_attention, vision_positions):
    """Greedy generation with the KV cache gives, at every step, the logits of a full forward over
    the prompt and the tokens so far; a left-padded batch gives each row its own."""
    from hf_tiny import PAD as HF_PAD, collate, mixed_samples

    torch.manual_seed(0)
    hf = SoloForCausalLM(SoloConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=HF_PAD, bos_token_id=1, eos_token_id=2,
        sliding_window=12, image_attention=image_attention, vision_positions=vision_positions,
    )).eval()
    samples = mixed_samples()
    batch = collate(samples, padding_side="left")
    steps = 4
    with torch.no_grad():
        out = hf.generate(**batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=HF_PAD,
                          output_logits=True, return_dict_in_generate=True)
    step_logits = torch.stack(out.logits, dim=1)
    for row, (ids, _, patches) in enumerate(samples):
        generated = out.sequences[row, -steps:]
        alone = collate([samples[row]])
        full_ids = torch.cat([alone["input_ids"][0], generated])[None]
        indices = torch.cat([alone["vision_patch_indices"][0], torch.full((steps,), -1)])[None]
        with torch.no_grad():
            full = hf(input_ids=full_ids, vision_patches=patches, vision_patch_indices=indices, use_cache=False).logits
        diff = (full[0, len(ids) - 1 : len(ids) - 1 + steps] - step_logits[row]).abs().max().item()
        assert diff <= 1e-5, f"row {row}: cached generation differs from a full forward by {diff}"


def test_2d_positions_follow_the_documented_rule():
    """Two documents; the first has a 2x2 image after 3 text tokens, the second a 1x3 image."""
    vpi = torch.full((30,), -1)
    patch = 0
    for offset, rows, cols in ((3, 2, 2), (15, 1, 3)):
        for r in range(rows):
            for c in range(cols):
                vpi[offset + 1 + r * (cols + 1) + c] = patch
                patch += 1
    layout = image_layout_from_patch_indices(vpi)
    assert layout.tolist() == [[3, 2, 2], [15, 1, 3]]
    positions = torch.cat([torch.arange(13), torch.arange(17)])
    rows, cols = rope_section_positions(positions, layout).tolist()
    # <vision> at 3; grid (row, col) from 4; the row separator is column 2; </vision> at 3+2+max(1, 2) = 7.
    assert rows[:13] == [0, 1, 2, 3, 4, 4, 4, 5, 5, 7, 8, 9, 10]
    assert cols[:13] == [0, 1, 2, 3, 4, 5, 6, 4, 5, 7, 8, 9, 10]
    # Second document restarts at 0; <vision> at 2, one row of 3 patches, </vision> at 2+2+2 = 6.
    assert rows[13:20] == [0, 1, 2, 3, 3, 3, 6] and cols[13:20] == [0, 1, 2, 3, 4, 5, 6]
    assert rows[20:] == cols[20:] == list(range(7, 17))


def test_switches_travel_through_conversion_and_are_validated():
    fields = dict(model_config_from_hf(
        {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 128,
         "image_attention": "bidirectional", "vision_positions": "2d"}, vocab_size=VOCAB, divisible_by=128))
    assert (fields["image_attention"], fields["vision_positions"]) == ("bidirectional", "2d")
    exported = hf_architecture_config(fields, architecture(fields))
    assert (exported["image_attention"], exported["vision_positions"]) == ("bidirectional", "2d")
    # A config written before the switches existed is SOLO's.
    old = model_config_from_hf({"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
                                "intermediate_size": 128}, vocab_size=VOCAB, divisible_by=128)
    assert {k: old[k] for k in ARCH_DEFAULTS} == ARCH_DEFAULTS
    with pytest.raises(ValueError, match="vision_positions must be one of sequential, 2d"):
        SoloConfig(vision_positions="3d")
    cfg = Config(model=ModelConfig(image_attention="bidirectional", backend="te"))
    cfg.training.train_iters = 1
    with pytest.raises(ConfigError, match="model.backend=flex"):
        validate(cfg)
    cfg.model.backend, cfg.model.image_attention = "local", "both"
    with pytest.raises(ConfigError, match="model.image_attention must be one of causal, bidirectional"):
        validate(cfg)


def test_solo7b_layout_refuses_native_switches(tmp_path):
    from solo.checkpoints import CheckpointError
    from solo.hf_checkpoint import write_config

    config = SoloConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128,
                        vision_positions="2d").to_dict()
    with pytest.raises(CheckpointError, match="--layout native"):
        write_config(config, tmp_path, "solo7b")
    write_config(config, tmp_path, "native")
    assert SoloConfig.from_pretrained(tmp_path).vision_positions == "2d"
    default = tmp_path / "solo7b"
    default.mkdir()
    write_config(SoloConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2).to_dict(), default, "solo7b")
    assert "image_attention" not in (default / "config.json").read_text()  # the released layout, unchanged


def test_recorded_image_layout_is_checked_against_the_patches():
    pack = make_pack(documents())
    sample = make_training_sample(pack, 128, PAD)
    recorded = dict(pack, image_layout=sample["image_layout"].astype(np.int32))
    assert np.array_equal(make_training_sample(recorded, 128, PAD)["image_layout"], sample["image_layout"])
    shifted = dict(pack, image_layout=recorded["image_layout"] + np.array([1, 0, 0], np.int32))
    with pytest.raises(ValueError, match="image_layout does not match"):
        make_training_sample(shifted, 128, PAD)


GOLDEN = Path(__file__).resolve().parent / "assets" / "default_switch_outputs.safetensors"


def test_default_switches_are_bit_identical_to_the_outputs_before_them(megatron_world):
    """SOLO's switches (causal, sequential) compute exactly what the code before the switches did
    (commit 7945471 wrote the golden file, same tiny models and inputs): megatron-core per-token losses
    with and without a window, the HF model's logits and its greedy tokens. The file holds one-thread
    results: CPU kernels split their sums by thread count, so the comparison runs on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _compare_default_outputs_with_golden()
    finally:
        torch.set_num_threads(threads)


def _compare_default_outputs_with_golden():
    from hf_tiny import collate, mixed_samples, tiny_config as hf_tiny_config
    from megatron_tiny import per_token_losses, tiny_model

    golden = load_file(str(GOLDEN))
    batch = packed_row()
    for window, key in ((None, "mcore_losses_full_attention"), (6, "mcore_losses_window_6")):
        with torch.no_grad():
            assert torch.equal(per_token_losses(tiny_model(sliding_window=window), batch), golden[key]), key
    torch.manual_seed(0)
    hf = SoloForCausalLM(hf_tiny_config(sliding_window=12)).eval()
    inputs = collate(mixed_samples(), padding_side="left")
    with torch.no_grad():
        assert torch.equal(hf(**inputs).logits[:, -1], golden["hf_last_logits"])
        tokens = hf.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(tokens, golden["hf_greedy_tokens"])


@pytest.mark.parametrize("resize_mode", ["fit", "solo"])
def test_pack_max_patches_scales_images_down_with_exact_accounting(tmp_path, tokenizer_dir, resize_mode, capsys):
    """--max-patches N: every image's grid is the resize rule's at a budget of N patches (aspect kept),
    no image exceeds N, small images keep their grid; report.json counts the patches before and after,
    and the reader decodes the packs back at the recorded (reduced) grids."""
    import base64
    import io
    import json

    from PIL import Image

    from data_prep.cli import main as solo_data
    from data_prep.reader import PackedReader
    from solo.hf.image_processing_solo import resize_size

    budget = 16
    sizes = [(300, 200), (40, 40), (200, 330), (96, 64), (500, 90)]
    records = []
    for number, (width, height) in enumerate(sizes):
        buffer = io.BytesIO()
        pixels = np.random.default_rng(number).integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        records.append(json.dumps([{"role": "assistant", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": f"picture {number}"}]}]))
    (tmp_path / "chat.jsonl").write_text("\n".join(records) + "\n")
    argv = ["pack", str(tmp_path / "chat.jsonl"), "--format", "chat", "--tokenizer", tokenizer_dir, "--seq-length",
            "512", "--output", str(tmp_path / "out"), "--no-progress", "--resize-mode", resize_mode,
            "--max-patches", str(budget)]
    assert solo_data(argv) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())

    def grid(size, max_patches):
        width, height = resize_size(*size, resize_mode, max_patches)
        return height // 32, width // 32

    expected = [grid(size, budget) for size in sizes]
    before = [rows * cols for rows, cols in (grid(size, 1024) for size in sizes)]
    assert all(rows * cols <= budget for rows, cols in expected)
    assert expected[1] == grid(sizes[1], 1024), "an image within the budget keeps its grid"
    reader = PackedReader(tmp_path / "out")
    assert reader.max_patches == budget
    found = []
    for index in range(len(reader)):
        pack = reader[index]  # decodes every image at its recorded grid (checked by the reader)
        layout = reader.image_layout(index)
        assert pack["patches"].shape[0] == int((layout[:, 1] * layout[:, 2]).sum())
        found += [tuple(image) for image in layout[:, 1:].tolist()]
    assert sorted(found) == sorted(expected)
    assert report["patches"] == sum(rows * cols for rows, cols in expected)
    assert report["patches_before_max_patches"] == sum(before)
    assert report["images_scaled_down"] == sum(b > r * c for b, (r, c) in zip(before, expected)) >= 3

    assert solo_data(argv[:-1] + ["0"]) == 2
    assert "--max-patches must be from 1 to 1024" in capsys.readouterr().err
