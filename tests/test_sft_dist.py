"""Instruction tuning under `accelerate launch` with 2 CPU processes (gloo): plain DDP, DeepSpeed ZeRO-2
and ZeRO-3, on a tiny SOLO model and a tiny generated instruction set that includes bad samples.
Every run must really be distributed (world_size 2 in each metrics line), its loss must fall and its
export must load with the Auto classes and generate; SIGTERM and kill -9 followed by the same command
must give the losses of an uninterrupted run, step for step. Slow: each launch takes tens of seconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from solo.checkpoints import read_latest
from solo.metrics import read_metrics
from helpers import free_port, subprocess_env
from sft_fixtures import make_instruction_set, make_tiny_solo

pytestmark = [pytest.mark.slow, pytest.mark.e2e]  # every test here starts processes
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
RESUME_STEPS = 8  # room for SIGTERM and kill -9 to land mid-run


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    return {"model": make_tiny_solo(str(root)), "data": make_instruction_set(str(root / "data"), count=24, bad=True),
            "root": root}


def launch(assets, config: str, save: str, *overrides: str) -> subprocess.Popen:
    """`accelerate launch --config_file launch/accelerate/<config>.yaml --num_processes 2 -m solo.sft ...`."""
    env = subprocess_env(OMP_NUM_THREADS="1", MODEL=assets["model"], DATA=assets["data"], SAVE=save)
    args = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"launch/accelerate/{config}.yaml",
            "--num_processes", "2", "--main_process_port", str(free_port())]
    if config == "ddp":  # CPU DDP: a MULTI_GPU-style config with ACCELERATE_USE_CPU (see CPU_NOTES)
        env["ACCELERATE_USE_CPU"] = "1"
        args += ["--mixed_precision", "no"]
    args += ["-m", "solo.sft", "--config", "debug_cpu", f"training.max_steps={STEPS}", *overrides]
    log = open(os.path.join(os.path.dirname(save), os.path.basename(save) + ".log"), "ab")
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def run(assets, config: str, save: str, *overrides: str) -> list[dict]:
    process = launch(assets, config, save, *overrides)
    rc = process.wait(timeout=900)
    assert rc == 0, open(save + ".log", encoding="utf-8", errors="replace").read()[-4000:]
    return read_metrics(save)


def check_run(records: list[dict], save: str, steps: int = STEPS) -> None:
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert all(r["world_size"] == 2 for r in records)  # really distributed: never a silent single process
    assert records[-1]["loss"] < records[0]["loss"] - 0.5
    with open(os.path.join(save, "data", "report.json"), encoding="utf-8") as fh:
        report = json.load(fh)
    assert report["documents_rejected"] == 5 and report["documents_packed"] == 24  # bad samples reported, rest trained


def check_export_generates(export: str, image: str) -> None:
    """The export has the foundation's layout, loads through the Auto classes and generates."""
    from transformers import AutoModelForCausalLM, AutoProcessor

    for name in ("model.safetensors", "config.json", "modeling_solo.py", "configuration_solo.py",
                 "processing_solo.py", "image_processing_solo.py", "processor_config.json", "tokenizer.json",
                 "chat_template.jinja"):
        assert os.path.exists(os.path.join(export, name)), name

    processor = AutoProcessor.from_pretrained(export, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True, dtype=torch.float32)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is this?"}]}]
    inputs = processor(processor.apply_chat_template(messages), images=[image])
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    new_tokens = out[0, inputs["input_ids"].shape[1]:]
    assert 1 <= len(new_tokens) <= 4 and processor.decode(new_tokens) is not None


def test_ddp_two_processes_through_the_launcher_train_and_export(assets):
    """launch/5_sft.sh with ddp.yaml on CPU: the launcher supplies ACCELERATE_USE_CPU and fp32 itself."""
    save = str(assets["root"] / "ddp")
    env = subprocess_env(OMP_NUM_THREADS="1", MODEL=assets["model"], DATA=assets["data"], SAVE=save,
               ACCELERATE_CONFIG="launch/accelerate/ddp.yaml", NPROC="2", RECIPE="debug_cpu", ITERS=str(STEPS),
               MASTER_PORT=str(free_port()), PYTHON=sys.executable)
    env.pop("ACCELERATE_USE_CPU", None)
    result = subprocess.run(["launch/5_sft.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    records = read_metrics(save)
    check_run(records, save)
    check_export_generates(os.path.join(save, "hf"), os.path.join(os.path.dirname(assets["data"]), "images", "red.jpg"))


@pytest.fixture(scope="module")
def zero2_reference(assets):
    save = str(assets["root"] / "zero2")
    return save, run(assets, "zero2", save, "checkpoint.save_interval=2", f"training.max_steps={RESUME_STEPS}")


def test_deepspeed_zero2_two_processes_train_and_export(assets, zero2_reference):
    save, records = zero2_reference
    check_run(records, save, RESUME_STEPS)
    with open(os.path.join(save, "hf", "config.json"), encoding="utf-8") as fh:
        assert json.load(fh)["dtype"] == "bfloat16"  # precision from ds_zero2.json
    check_export_generates(os.path.join(save, "hf"), os.path.join(os.path.dirname(assets["data"]), "images", "red.jpg"))


def test_deepspeed_zero3_two_processes_train_and_export_gathered_weights(assets):
    save = str(assets["root"] / "zero3")
    records = run(assets, "zero3", save)
    check_run(records, save)
    from safetensors.torch import load_file

    weights = load_file(os.path.join(save, "hf", "model.safetensors"))
    assert weights["model.embed_tokens.weight"].shape == (33029, 64)  # gathered, not ZeRO-3 shards
    assert weights["model.embed_vision_patch.weight"].shape == (64, 3072)
    check_export_generates(os.path.join(save, "hf"), os.path.join(os.path.dirname(assets["data"]), "images", "red.jpg"))


def _wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_resume_after_sigterm_and_after_kill_9_equals_an_uninterrupted_run(assets, zero2_reference):
    _, reference = zero2_reference
    save = str(assets["root"] / "zero2-interrupted")
    overrides = ("checkpoint.save_interval=1", f"training.max_steps={RESUME_STEPS}")

    process = launch(assets, "zero2", save, *overrides)
    _wait_for(lambda: len(read_metrics(save)) >= 2, process, "step 2")
    os.killpg(process.pid, signal.SIGTERM)  # as a scheduler does: every process of the job
    process.wait(timeout=300)
    stopped = read_latest(save)
    assert stopped is not None and 2 <= stopped < RESUME_STEPS - 1
    assert read_metrics(save)[-1]["step"] == stopped  # finished its step, saved it, stopped

    process = launch(assets, "zero2", save, *overrides)
    _wait_for(lambda: (read_latest(save) or 0) >= stopped + 1 and len(read_metrics(save)) >= stopped + 1,
              process, "a step after the resume")
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)

    records = run(assets, "zero2", save, *overrides)
    assert [r["step"] for r in records] == list(range(1, RESUME_STEPS + 1))
    checkpoints = sorted(n for n in os.listdir(save) if n.startswith("iter_"))
    assert checkpoints == [f"iter_{RESUME_STEPS - 1:07d}", f"iter_{RESUME_STEPS:07d}"]  # keep_last 2, no .tmp
    for got, want in zip(records, reference):
        assert got["packs"] == want["packs"]  # same data at every step: nothing repeated or skipped
        assert got["loss"] == want["loss"], (got["step"], got["loss"], want["loss"])
        assert got["lr"] == want["lr"]


def test_a_non_finite_loss_stops_the_run_before_the_weights_change(assets, tmp_path):
    """One process (no launcher): an absurd learning rate blows the weights up; the run stops with a
    clear message at the first non-finite loss and leaves only checkpoints of finite steps."""
    save = str(tmp_path / "nan")
    env = subprocess_env(OMP_NUM_THREADS="1", MODEL=assets["model"], DATA=assets["data"], SAVE=save)
    env.pop("WORLD_SIZE", None)
    result = subprocess.run([sys.executable, "-m", "solo.sft", "--config", "debug_cpu", "training.lr=1e30",
                             "training.warmup_steps=0", "training.clip_grad=0", "checkpoint.save_interval=1",
                             "training.max_steps=4"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 3, result.stderr[-3000:]
    assert "non-finite loss at step" in result.stderr
    records = read_metrics(save)
    assert all(np.isfinite(r["loss"]) for r in records)
    assert read_latest(save) == len(records)  # every logged step saved; the failed one was never applied
