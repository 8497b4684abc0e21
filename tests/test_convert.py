"""`solo convert`: HF <-> megatron-core (bitwise, any TP/PP through the training loader), the
released SOLO-7B layout, the SOLO-7B window semantics, and clear errors on bad inputs."""

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from helpers import (
    REPO,
    captured_output,
    run_training,
    subprocess_env,
    train_in_process,
)

TINY_ARCH = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=4",
             "model.num_query_groups=2", "model.vocab_size=33029", "model.sliding_window=4096"]


def env():
    return subprocess_env(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def _check(proc, expect_rc):
    if expect_rc is not None and proc.returncode != expect_rc:
        raise AssertionError(f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def solo_process(*args, expect_rc=0):
    """`python -m solo.cli convert ARGS` in a process of its own."""
    return _check(subprocess.run([sys.executable, "-m", "solo.cli", "convert", *map(str, args)], cwd=REPO,
                                 env=env(), capture_output=True, text=True, timeout=300), expect_rc)


def solo(*args, expect_rc=0):
    """`solo convert ARGS` through the command's own entry point (`solo.cli.main`) in this process: the
    same parsing, conversion and exit status as `solo_process`, without the ~7 s a fresh interpreter
    spends importing torch, transformers and megatron-core (the `mcore` fixture runs it as a process)."""
    from solo.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["convert", *map(str, args)])
    return _check(subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue()), expect_rc)


def tensors(directory):
    out = {}
    for file in Path(directory).glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            out.update({k: handle.get_tensor(k) for k in handle.keys()})
    return out


def assert_same_weights(a, b):
    ta, tb = tensors(a), tensors(b)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def solo_hf(work):
    """A tiny random SOLO model (33,029-entry vocabulary: padded rows at every TP) from `solo create`."""
    from solo.create import create_solo_checkpoint
    from solo.tiny import make_base_checkpoint

    make_base_checkpoint(work / "base")
    return create_solo_checkpoint(work / "base", work / "solo", seed=3)


@pytest.fixture(scope="module")
def mcore(work, solo_hf):
    solo_process("hf-to-mcore", "--hf", solo_hf, "--out", work / "mcore")
    return work / "mcore"


def test_mapping_table_names_every_tensor_of_the_megatron_model():
    """The table's keys and shapes are exactly the dist-checkpoint tensors of SoloGPTModel, and its
    module names exist in the local spec's state dict."""
    from megatron_patch import compat

    compat.apply()
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from megatron_patch.config import Config, ModelConfig
    from megatron_patch.convert import architecture, single_process_group
    from megatron_patch.model import SoloGPTModel, build_transformer_config, solo_layer_spec
    from megatron_patch.model.state_dict_mapping import MAPPINGS, expected_shapes

    model_cfg = dict(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
                     vocab_size=100)
    cfg = Config(model=ModelConfig(**model_cfg, backend="local"))
    cfg.training.bf16 = False
    with single_process_group(), compat.device_scope():
        parallel_state.initialize_model_parallel(1, 1)
        try:
            tensor_parallel.model_parallel_cuda_manual_seed(1)
            model = SoloGPTModel(build_transformer_config(cfg.model, cfg.parallel, cfg.training),
                                 solo_layer_spec("local"), 128, 64, 10000.0)
            sharded = model.sharded_state_dict()
            module_names = set(model.state_dict())
        finally:
            parallel_state.destroy_model_parallel()
    shapes = {}
    for item in sharded.values():
        if not isinstance(item, ShardedObject):
            shapes[item.key] = tuple(getattr(item, "global_shape", None) or ())
    expected = expected_shapes(architecture(model_cfg), 128, 3072)
    assert set(shapes) == set(expected) == {m.mcore for m in MAPPINGS}
    for key, shape in shapes.items():
        if shape:  # factories (fc1) carry no shape before they are built
            assert shape == expected[key], key
    for mapping in MAPPINGS:
        for backend, name in mapping.module_names:
            if backend == "local":
                assert name.format(i=1) in module_names
    assert not dist.is_initialized()


@pytest.mark.e2e
def test_round_trip_tp1_is_bitwise_and_export_loads_and_generates(work, solo_hf, mcore):
    from transformers import AutoModelForCausalLM, AutoProcessor

    out = work / "back_tp1"
    solo("mcore-to-hf", "--ckpt", mcore, "--out", out)
    assert_same_weights(solo_hf, out)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "solo" and config["vocab_size"] == 33029 and config["rope_theta"] == 10000.0
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    assert type(model).__name__ == "SoloForCausalLM"
    from PIL import Image

    image = Image.new("RGB", (64, 32), (200, 30, 30))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this?"}]}]
    inputs = processor(processor.apply_chat_template(messages), images=[image])
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 4


@pytest.mark.e2e
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)],
                         ids=["tp2", "pp2", "tp2pp2"])
def test_round_trip_through_training_at_any_tp_pp_is_bitwise(work, solo_hf, mcore, tp, pp):
    """HF -> mcore (vocab padded for TP=1) -> loaded by training at TP/PP (other padding) and saved
    there -> HF: identical weights. The exporter needs no --tokenizer: training kept it."""
    save = work / f"run_tp{tp}pp{pp}"
    run_training(save, *TINY_ARCH, f"parallel.tensor_model_parallel_size={tp}",
                 f"parallel.pipeline_model_parallel_size={pp}",
          "training.train_iters=0", f"checkpoint.init_from={mcore}", nproc=tp * pp)
    assert (save / "tokenizer" / "tokenizer.json").is_file()
    out = work / f"back_tp{tp}pp{pp}"
    solo("mcore-to-hf", "--ckpt", save, "--out", out)
    assert_same_weights(solo_hf, out)


def _hf_loss(model, samples):
    """Per-token loss of the HF model over packed samples (documents kept apart by position ids)."""
    from megatron_patch.data import collate_packed

    total, count = 0.0, 0.0
    for sample in samples:
        batch = collate_packed([sample])
        cu = batch["cu_seqlens"].long()
        position_ids = torch.cat([torch.arange(int(n)) for n in cu[1:] - cu[:-1]])[None]
        with torch.no_grad():
            logits = model(input_ids=batch["tokens"], position_ids=position_ids, vision_patches=batch["patches"],
                           vision_patch_indices=batch["vision_patch_indices"], use_cache=False).logits[0]
        losses = torch.nn.functional.cross_entropy(logits.float(), batch["labels"][0], reduction="none")
        mask = batch["loss_mask"][0].float()
        total += float((losses * mask).sum())
        count += float(mask.sum())
    return total / count


@pytest.mark.e2e
def test_converted_checkpoint_trains_and_trained_model_exports(work, solo_hf, mcore):
    """Training at TP=2 from the converted checkpoint: its first-step loss equals the HF model's on
    the same packed multimodal batch; the checkpoint after one step exports (no --tokenizer) to a
    model whose loss on the second batch equals training's second-step loss, and it generates."""
    from megatron_patch.convert import single_process_group
    from megatron_patch.data import build_train_dataset
    from solo.hf import SoloForCausalLM

    save = work / "trained_tp2"
    run_training(save, *TINY_ARCH, "parallel.tensor_model_parallel_size=2", "training.train_iters=2",
          "checkpoint.save_interval=1", f"checkpoint.init_from={mcore}", nproc=2)
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    with single_process_group():
        dataset = build_train_dataset("synthetic", 8, 128, 0, 1234, str(work / "data_cache"),
                                      synthetic_vocab_size=33029, synthetic_num_packs=2048, synthetic_num_classes=4)
        samples = [dataset[i] for i in range(8)]
    assert [s["sample_id"] for s in samples] == records[0]["sample_ids"] + records[1]["sample_ids"]

    initial = SoloForCausalLM.from_pretrained(solo_hf, dtype=torch.float32).eval()
    assert abs(_hf_loss(initial, samples[:4]) - records[0]["loss"]) <= 1e-5

    out = work / "trained_hf"
    solo("mcore-to-hf", "--ckpt", save, "--iteration", "1", "--out", out)
    exported = SoloForCausalLM.from_pretrained(out).eval()
    assert abs(_hf_loss(exported, samples[4:]) - records[1]["loss"]) <= 1e-5
    prompt = torch.tensor([[1, 3, 4, 4, 6]])
    generated = exported.generate(input_ids=prompt, vision_patches=torch.from_numpy(samples[0]["patches"][:2]),
                                  vision_patch_indices=torch.tensor([[-1, -1, 0, 1, -1]]), max_new_tokens=3,
                                  do_sample=False)
    assert generated.shape == (1, 8)


def test_training_refuses_hf_directory_and_other_architecture(work, solo_hf, mcore):
    other = [a for a in TINY_ARCH if "ffn" not in a] + ["model.ffn_hidden_size=96"]
    with captured_output() as hf_dir:
        assert train_in_process(work / "refused_hf", *TINY_ARCH, f"checkpoint.init_from={solo_hf}") == 2
    assert "solo convert hf-to-mcore --hf" in hf_dir.getvalue()
    with captured_output() as arch:
        assert train_in_process(work / "refused_arch", *other, f"checkpoint.init_from={mcore}") == 2
    assert "model.ffn_hidden_size=96" in arch.getvalue() and "ffn_hidden_size=128" in arch.getvalue()


def _released_layout(work, solo_hf, rope_theta=1e6):
    """Our tiny model in the released SOLO-7B layout, with a non-default rope_theta."""
    released = work / "released"
    if released.exists():
        return released
    released.mkdir()
    config = json.loads((Path(solo_hf) / "config.json").read_text())
    for key in ("auto_map", "rope_parameters"):
        config.pop(key)
    config.update(model_type="mistral", rope_theta=rope_theta, transformers_version="4.40.0")
    (released / "config.json").write_text(json.dumps(config))
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(Path(solo_hf) / name, released / name)
    return released


def test_released_solo7b_layout_converts_both_ways(work, solo_hf):
    from transformers import AutoModelForCausalLM, PretrainedConfig

    released = _released_layout(work, solo_hf)
    native = work / "native"
    solo("hf-to-hf", "--hf", released, "--out", native)
    model = AutoModelForCausalLM.from_pretrained(native, trust_remote_code=True)
    assert type(model).__name__ == "SoloForCausalLM" and model.config.rope_parameters["rope_theta"] == 1e6
    assert_same_weights(released, native)
    _evaluated_with_solo_preprocessing(native)

    solo("hf-to-mcore", "--hf", released, "--out", work / "released_mcore")
    back = work / "released_back"
    solo("mcore-to-hf", "--ckpt", work / "released_mcore", "--out", back, "--layout", "solo7b")
    assert_same_weights(released, back)
    config = json.loads((back / "config.json").read_text())
    assert config["model_type"] == "mistral" and config["architectures"] == ["SoloForCausalLM"]
    assert "auto_map" not in config and not (back / "modeling_solo.py").exists()
    assert config["sliding_window"] == 4096
    # A config class that knows only the top-level field (as SOLO's code / older transformers).
    assert PretrainedConfig.from_json_file(str(back / "config.json")).rope_theta == 1e6


def _evaluated_with_solo_preprocessing(native):
    """A converted SOLO-7B's processor (AutoProcessor, and so `solo eval`) has SOLO-7B's preprocessing:
    its resize rule (1920x1080 → a 32x18 grid, 576 patches; the default 'fit' rule gives 1,008) and its
    way of opening images (alpha dropped, not composited on white)."""
    from PIL import Image

    from solo.eval.runner import _open_images, load_model
    from solo.eval.samples import Sample

    _, processor = load_model(str(native), torch.device("cpu"))
    settings = processor.image_processor
    assert (settings.resize_mode, settings.legacy_image_opening) == ("solo", True)
    buffer = io.BytesIO()
    Image.new("RGBA", (1920, 1080), (10, 200, 30, 0)).save(buffer, format="PNG")
    ((_, image),), _ = _open_images([Sample(row=0, id="0", image=buffer.getvalue())], settings)
    out = processor(processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}]),
                    images=[image])
    assert out["vision_patches"].shape[0] == 576
    assert out["vision_patches"][:, :1024].eq(10).all()  # SOLO-7B kept the colour of transparent pixels


@pytest.mark.e2e
def test_bad_inputs_give_clear_errors(work, solo_hf, mcore):
    from megatron_patch.convert import convert_hf_to_mcore, convert_mcore_to_hf
    from solo.checkpoints import CheckpointError
    from solo.outputs import OutputError

    # Through the command line once (its main: exit status 2 and the message); then the functions themselves.
    (work / "occupied").mkdir(exist_ok=True)
    (work / "occupied" / "x").write_text("x")
    assert "not empty" in solo("hf-to-mcore", "--hf", solo_hf, "--out", work / "occupied", expect_rc=2).stderr
    with pytest.raises(CheckpointError, match="solo create"):  # a plain text LLM
        convert_hf_to_mcore(work / "base", work / "e1")
    broken = work / "broken"
    shutil.copytree(solo_hf, broken)
    with open(broken / "model.safetensors", "r+b") as fh:
        fh.truncate(os.path.getsize(broken / "model.safetensors") - 100)
    with pytest.raises(CheckpointError, match="truncated"):
        convert_hf_to_mcore(broken, work / "e2")
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        convert_hf_to_mcore(broken, work / "e3")
    with pytest.raises(CheckpointError, match=r"no complete iteration 5; available: \[0\]"):
        convert_mcore_to_hf(mcore, work / "e4", iteration=5)
    with pytest.raises(CheckpointError, match="32000 entries.*33029"):  # tokenizer does not match the vocabulary
        convert_mcore_to_hf(mcore, work / "e5", tokenizer_dir=work / "base")
    with pytest.raises(CheckpointError, match="not a megatron-core checkpoint"):
        convert_mcore_to_hf(work / "base", work / "e6")
    with pytest.raises(OutputError, match="--overwrite refused"):  # never replaces what it did not write
        convert_mcore_to_hf(mcore, work / "base", overwrite=True)
    assert not any((work / f"e{i}").exists() for i in range(1, 7))


@pytest.mark.e2e
def test_killed_conversion_leaves_nothing_that_looks_complete(work, solo_hf):
    out = work / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "solo.cli", "convert", "hf-to-mcore", "--hf", str(solo_hf),
                             "--out", str(out)], cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(work.glob(".killed.tmp-*")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()


@pytest.mark.parametrize("engine", ["hf", "megatron"])
def test_window_edge_follows_solo7b(engine):
    """sliding_window=W: a query sees itself and W earlier tokens (SOLO-7B). On W+2 tokens through
    one layer, position W still depends on token 0, position W+1 no longer does; checked against a
    direct masked-attention computation of the same layer."""
    W = 4
    ids = torch.tensor([[5, 9, 11, 13, 17, 19]])  # W + 2 tokens
    other = ids.clone()
    other[0, 0] = 7
    if engine == "hf":
        from solo.hf import SoloConfig, SoloForCausalLM

        torch.manual_seed(0)
        model = SoloForCausalLM(SoloConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, sliding_window=W,
                                           max_position_embeddings=64, attn_implementation="sdpa")).eval()
        with torch.no_grad():
            a, b = model(input_ids=ids).logits[0], model(input_ids=other).logits[0]
            # Independent: the same layer with an explicit (W+1)-key band mask (eager attention).
            model.config._attn_implementation = "eager"
            band = torch.ones(6, 6).tril() * torch.ones(6, 6).triu(-W)
            mask = torch.where(band > 0, 0.0, float("-inf"))[None, None]
            ref = model(input_ids=ids, attention_mask=mask).logits[0]
        torch.testing.assert_close(a, ref, atol=1e-5, rtol=0)
    else:
        from megatron_patch import compat

        compat.apply()
        from megatron.core.transformer.enums import AttnMaskType

        from megatron_patch.config import Config, ModelConfig
        from megatron_patch.convert import single_process_group
        from megatron_patch.model import PackedDotProductAttention, build_transformer_config

        cfg = Config(model=ModelConfig(num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=2,
                                       num_query_groups=1, vocab_size=32, sliding_window=W, backend="local"))
        cfg.training.bf16 = False
        with single_process_group(), compat.device_scope():
            from megatron.core import parallel_state, tensor_parallel

            parallel_state.initialize_model_parallel(1, 1)
            tensor_parallel.model_parallel_cuda_manual_seed(1)
            try:
                attention = PackedDotProductAttention(build_transformer_config(cfg.model, cfg.parallel, cfg.training),
                                                      1, AttnMaskType.causal, "self")
                torch.manual_seed(0)
                q, k, v = torch.randn(6, 1, 2, 16), torch.randn(6, 1, 1, 16), torch.randn(6, 1, 1, 16)
                out = attention(q, k, v, None)[:, 0]
                v2 = v.clone()
                v2[0] += 1.0  # token 0's value: reaches exactly the queries that see token 0
                out2 = attention(q, k, v2, None)[:, 0]
            finally:
                parallel_state.destroy_model_parallel()
        i, j = torch.arange(6)[:, None], torch.arange(6)[None, :]
        allowed = (j <= i) & (i - j <= W)
        scores = torch.einsum("qhd,kd->hqk", q[:, 0], k[:, 0, 0]) / 4.0
        ref = torch.einsum("hqk,kd->qhd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v[:, 0, 0])
        torch.testing.assert_close(out, ref.reshape(6, -1), atol=1e-5, rtol=0)
        a, b = out, out2
    changed = [(a[t] - b[t]).abs().max().item() > 1e-6 for t in range(6)]
    assert changed == [True] * (W + 1) + [False]


def test_native_switches_travel_through_conversion_and_are_checked_against_the_recipe(work, solo_hf):
    """image_attention / vision_positions: config fields (no new weights) carried HF -> megatron-core -> HF, and
    a checkpoint whose switches differ from the recipe's is refused like any other architecture field."""
    from megatron_patch.checkpointing import check_init_from
    from megatron_patch.config import Config, ConfigError, ModelConfig
    from solo.hf import SoloForCausalLM

    native = work / "solo_native"
    shutil.copytree(solo_hf, native)
    config = json.loads((native / "config.json").read_text())
    config.update(image_attention="bidirectional", vision_positions="2d")
    (native / "config.json").write_text(json.dumps(config))
    solo("hf-to-mcore", "--hf", native, "--out", work / "mcore_native")
    solo("mcore-to-hf", "--ckpt", work / "mcore_native", "--out", work / "native_back")
    assert_same_weights(native, work / "native_back")
    back = SoloForCausalLM.from_pretrained(work / "native_back").config
    assert (back.image_attention, back.vision_positions) == ("bidirectional", "2d")

    arch = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
                vocab_size=33029, sliding_window=4096, backend="local")
    recipe = Config(model=ModelConfig(**arch, image_attention="bidirectional", vision_positions="2d"))
    recipe.checkpoint.init_from = str(work / "mcore_native")
    check_init_from(recipe)  # the same switches: accepted
    recipe.model.vision_positions = "sequential"
    with pytest.raises(ConfigError, match="model.vision_positions=sequential .* has vision_positions=2d"):
        check_init_from(recipe)
