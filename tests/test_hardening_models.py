"""Hostile tokenizers, chats, configs and weight files through `solo create`, `solo convert` and the
processor: no forged special ids, named errors instead of tracebacks, nothing sized by an absurd
config before it is checked against the weights, one chat rule for training and inference."""

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from data_prep.cli import main as solo_data
from data_prep.reader import PackedReader
from data_prep.synthetic import jpeg_bytes, photo_like
from solo.cli import main as solo_main
from solo.create import create_solo_checkpoint
from solo.hf.image_processing_solo import SoloImageProcessor
from solo.hf.processing_solo import VISION_TOKENS, SoloProcessor, VisionTokenIds
from solo.checkpoints import CheckpointError
from solo.hf_checkpoint import HFWeights, convert_hf_to_hf
from solo.tiny import make_base_tokenizer
from solo.tokenizer import extend_tokenizer

SOLO_TEXT = "<vpatch> <vision> <loc_5> </vision>"


@pytest.fixture(scope="module")
def solo_dir(base_dir, tmp_path_factory):
    return create_solo_checkpoint(base_dir, tmp_path_factory.mktemp("created") / "solo")


@pytest.fixture(scope="module")
def processor():
    return SoloProcessor(SoloImageProcessor(), extend_tokenizer(make_base_tokenizer()))


def solo_ids(tokenizer) -> set[int]:
    return set(tokenizer.convert_tokens_to_ids(list(VISION_TOKENS))) | set(tokenizer.all_special_ids)


def copy_base(base_dir: Path, target: Path, tokenizer=None, config=None) -> Path:
    shutil.copytree(base_dir, target)
    if tokenizer is not None:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (target / name).unlink(missing_ok=True)
        tokenizer.save_pretrained(target)
    if config is not None:
        path = target / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return target


def create_fails(base: Path, out: Path, capsys) -> str:
    assert solo_main(["create", "--base", str(base), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and not out.exists()
    return err


# --- forged tokens --------------------------------------------------------------------------------

@pytest.mark.parametrize("content", [
    [{"type": "text", "text": {"k": "</s>"}}],
    [{"type": "text", "text": ["<s>"]}],
    ["<s>"],
    {"text": "</s>"},
])
def test_chat_text_that_is_not_a_string_is_refused(processor, content):
    with pytest.raises(ValueError, match="message 0"):
        processor.apply_chat_template([{"role": "user", "content": content}])


def test_solo_tokens_held_as_ordinary_tokens_are_made_special_by_create(base_dir, tmp_path, capsys):
    ordinary = make_base_tokenizer()
    ordinary.add_tokens(list(VISION_TOKENS))  # SOLO's tokens as plain added tokens: text would match them
    with pytest.raises(ValueError, match="ordinary, non-special"):
        VisionTokenIds.from_tokenizer(ordinary)  # the processor and `solo-data pack` refuse it
    base = copy_base(base_dir, tmp_path / "base", tokenizer=ordinary)
    out = create_solo_checkpoint(base, tmp_path / "solo")
    from transformers import AutoProcessor

    made = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    assert made.tokenizer.convert_tokens_to_ids("<vision>") == 32000  # the ids stay where they were
    tokens = made(SOLO_TEXT)["input_ids"][0].tolist()
    assert tokens[0] == made.tokenizer.bos_token_id and not solo_ids(made.tokenizer) & set(tokens[1:])
    assert made.tokenizer.decode(tokens[1:]) == SOLO_TEXT


def test_odd_tokenizers_and_pickles_are_refused_by_name(base_dir, tmp_path, capsys):
    one = make_base_tokenizer()
    one.add_tokens(["<vpatch>"], special_tokens=True)
    assert "1 of the 1029 SOLO vision tokens" in create_fails(copy_base(base_dir, tmp_path / "one", one),
                                                              tmp_path / "o1", capsys)
    shuffled = make_base_tokenizer()
    shuffled.add_tokens([VISION_TOKENS[1], VISION_TOKENS[0], *VISION_TOKENS[2:]], special_tokens=True)
    assert "not at consecutive ids in SOLO's order" in create_fails(
        copy_base(base_dir, tmp_path / "shuffled", shuffled), tmp_path / "o2", capsys)
    no_eos = make_base_tokenizer()
    no_eos.eos_token = None
    assert "must define bos_token and eos_token" in create_fails(
        copy_base(base_dir, tmp_path / "no_eos", no_eos), tmp_path / "o3", capsys)
    pickled = copy_base(base_dir, tmp_path / "pickled")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    assert "pickled weights (pytorch_model.bin)" in create_fails(pickled, tmp_path / "o4", capsys)


# --- absurd configs are refused before anything is allocated --------------------------------------

def test_create_checks_the_config_against_the_weights_before_building_the_model(base_dir, tmp_path, capsys):
    layers = copy_base(base_dir, tmp_path / "layers", config={"num_hidden_layers": 500})
    assert "num_hidden_layers=500 but the weights hold layers 0..1" in create_fails(layers, tmp_path / "o1", capsys)
    wide = copy_base(base_dir, tmp_path / "wide", config={"hidden_size": 2**20, "intermediate_size": 2**22})
    assert "model.embed_tokens.weight has shape (32000, 64) but config.json implies (32000, 1048576)" in \
        create_fails(wide, tmp_path / "o2", capsys)
    negative = copy_base(base_dir, tmp_path / "negative", config={"num_attention_heads": -4})
    assert "num_attention_heads must be a positive integer, got -4" in create_fails(negative, tmp_path / "o3", capsys)


def test_convert_checks_layer_count_and_shapes_before_anything_else(solo_dir, tmp_path):
    from megatron_patch.convert import convert_hf_to_mcore

    absurd = copy_base(solo_dir, tmp_path / "absurd", config={"num_hidden_layers": 200_000})
    with pytest.raises(CheckpointError, match="num_hidden_layers=200000 but the weights hold layers 0..1"):
        convert_hf_to_mcore(absurd, tmp_path / "mcore")
    with pytest.raises(CheckpointError, match="num_hidden_layers=200000"):
        convert_hf_to_hf(absurd, tmp_path / "hf")
    # hf-to-hf: a tensor of the wrong shape is refused, nothing is written (it was copied with exit 0).
    bad = copy_base(solo_dir, tmp_path / "bad")
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"] = tensors["model.layers.1.mlp.down_proj.weight"][:, :-1].clone()
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model.layers.1.mlp.down_proj.weight has shape \(64, 127\) but "
                                              r"config.json implies \(64, 128\)"):
        convert_hf_to_hf(bad, tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "mcore").exists()


# --- malformed safetensors headers ----------------------------------------------------------------

def write_raw_safetensors(path: Path, header, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("header, problem", [
    ([1, 2, 3], "its header is a JSON list"),
    ({"w": {"dtype": "F32", "shape": [2]}}, "tensor 'w' lacks dtype, shape or data_offsets"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, "spans 8 bytes but shape [4] of F32 needs 16"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, "data_offsets [8, 0], not [start, end]"),
    ({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, "unsupported dtype 'Q4'"),
])
def test_malformed_safetensors_headers_are_named(base_dir, tmp_path, capsys, header, problem):
    directory = tmp_path / "weights"
    directory.mkdir()
    write_raw_safetensors(directory / "model.safetensors", header, bytes(16))
    with pytest.raises(CheckpointError) as error:
        HFWeights(directory)
    assert "model.safetensors is not a valid safetensors file" in str(error.value) and problem in str(error.value)
    base = copy_base(base_dir, tmp_path / "base")
    write_raw_safetensors(base / "model.safetensors", header, bytes(16))
    assert problem in create_fails(base, tmp_path / "out", capsys)


# --- one chat rule for the packer and the processor -----------------------------------------------

def test_consecutive_messages_of_one_role_are_one_turn_in_pack_and_processor(processor, tmp_path):
    image = jpeg_bytes(photo_like(64, 64, seed=4))
    (tmp_path / "img.jpg").write_bytes(image)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "system", "content": "Be kind."},
                {"role": "user", "content": [{"type": "image", "image": "img.jpg"},
                                             {"type": "text", "text": "first?"}]},
                {"role": "user", "content": "second?"},
                {"role": "assistant", "content": "one"}, {"role": "assistant", "content": "two"}]
    (tmp_path / "chat.jsonl").write_text(json.dumps(messages) + "\n")
    processor.tokenizer.save_pretrained(tmp_path / "tok")
    assert solo_data(["pack", str(tmp_path / "chat.jsonl"), "--format", "chat", "--template", "mistral",
                      "--tokenizer", str(tmp_path / "tok"), "--seq-length", "512", "--output", str(tmp_path / "out"),
                      "--no-progress"]) == 0
    packed = PackedReader(tmp_path / "out")[0]["tokens"].astype(np.int64).tolist()
    rendered = [dict(m, content=[{"type": "image"}, m["content"][1]]) if isinstance(m["content"], list) else m
                for m in messages]
    prompt = processor.apply_chat_template(rendered)
    assert prompt == "<s>[INST] Be brief.Be kind.\n\n<image>first?second? [/INST] onetwo</s>"
    assert packed == processor(prompt, images=[image])["input_ids"][0].tolist()
