"""What a new user meets first: fast `--help`, `stats` and `plan`, packs that can move, a wrong --format that fails,
and launchers that take the caller's relative paths."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.cli import main as solo_data
from data_prep.reader import PackedReader
from solo.tiny import make_base_tokenizer
from solo.tokenizer import extend_tokenizer

from helpers import REPO, jpeg, subprocess_env
HEAVY = ("torch", "transformers", "megatron")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tokenizer folder and a caption source of 12 images."""
    root = tmp_path_factory.mktemp("first_use")
    extend_tokenizer(make_base_tokenizer()).save_pretrained(root / "tokenizer")
    (root / "img").mkdir()
    rows = []
    for index in range(12):
        (root / "img" / f"{index}.jpg").write_bytes(jpeg(40 + 4 * index, 48, index))
        rows.append(json.dumps({"image": f"img/{index}.jpg", "caption": f"a photo number {index}"}))
    (root / "captions.jsonl").write_text("\n".join(rows) + "\n")
    return root


def pack_args(root: Path, output: Path, fmt: str = "caption", source: str = "captions.jsonl") -> list[str]:
    return ["pack", str(root / source), "--format", fmt, "--tokenizer", str(root / "tokenizer"),
            "--seq-length", "128", "--output", str(output), "--no-progress"]


def python_env() -> dict:
    return subprocess_env(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


@pytest.mark.e2e
def test_help_starts_without_the_model_stack():
    script = (
        "import sys\n"
        "from data_prep.cli import build_parser\n"
        "build_parser().format_help()\n"
        f"loaded = sorted({{name.split('.')[0] for name in sys.modules}} & set({HEAVY!r}))\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], env=python_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"--help imports {result.stdout.strip()}"
    help_text = subprocess.run([sys.executable, "-m", "data_prep.cli", "pack", "--help"], env=python_env(),
                               capture_output=True, text=True, timeout=120).stdout
    assert "imagenet" in help_text and "--resize-mode" in help_text


@pytest.mark.e2e
def test_stats_and_plan_start_without_the_model_stack(workspace, tmp_path):
    assert solo_data(pack_args(workspace, tmp_path / "packed")) == 0
    (tmp_path / "mixture.yaml").write_text("datasets:\n  - {path: packed, weight: 1}\n")
    script = (
        "import sys\n"
        "from data_prep.cli import main\n"
        f"assert main(['stats', {str(tmp_path / 'packed')!r}]) == 0\n"
        f"assert main(['plan', {str(tmp_path / 'mixture.yaml')!r}, '--global-batch', '2', '--epochs', '1']) == 0\n"
        f"print(sorted({{name.split('.')[0] for name in sys.modules}} & set({HEAVY!r})))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], env=python_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    printed = result.stdout.splitlines()
    assert printed[-1] == "[]", f"stats/plan import {printed[-1]}"
    assert "12 images" in result.stdout and "per source" in result.stdout  # stats
    assert "iterations" in result.stdout and (tmp_path / "mixture.plan.json").exists()  # plan
    # Piped into a reader that stops reading (`| head`): no traceback.
    piped = subprocess.run(f"{shlex.quote(sys.executable)} -m data_prep.cli stats "
                           f"{shlex.quote(str(tmp_path / 'packed'))} | true", shell=True,
                           env=python_env(), capture_output=True, text=True, timeout=120)
    assert piped.stderr == ""


def test_help_states_the_image_processor_defaults():
    from solo.hf.image_processing_solo import DEFAULT_MAX_PIXELS, RESIZE_MODES

    from data_prep.cli import build_parser

    pack_help = build_parser()._subparsers._group_actions[0].choices["pack"].format_help()
    assert str(DEFAULT_MAX_PIXELS) in pack_help
    assert all(mode in pack_help for mode in RESIZE_MODES)


def test_bad_resize_mode_is_refused_naming_the_choices(workspace, tmp_path, capsys):
    assert solo_data(pack_args(workspace, tmp_path / "out") + ["--resize-mode", "square"]) == 2
    assert "--resize-mode must be one of fit, solo, got 'square'" in capsys.readouterr().err


def test_wrong_format_fails_with_the_rejection_summary(workspace, tmp_path, capsys):
    output = tmp_path / "llava"
    assert solo_data(pack_args(workspace, output, fmt="llava")) == 2
    error = capsys.readouterr().err
    assert "nothing was packed" in error and "all 12 records were rejected" in error
    assert "12 of 12 records were rejected for one reason" in error
    assert "needs a 'conversations' list" in error and "Is --format llava the format of these inputs?" in error
    assert not (output / "metadata.json").exists()  # training cannot take it for data
    assert json.loads((output / "report.json").read_text())["documents_rejected"] == 12
    assert solo_data(pack_args(workspace, output, fmt="llava")) == 2  # the same command fails the same way


def test_mostly_rejected_source_warns_loudly(workspace, tmp_path, capsys):
    good = json.loads((workspace / "captions.jsonl").read_text().splitlines()[0])
    rows = [json.dumps(good)] + [json.dumps({"image": f"img/{i}.jpg"}) for i in range(3)]
    (workspace / "mostly_bad.jsonl").write_text("\n".join(rows) + "\n")
    assert solo_data(pack_args(workspace, tmp_path / "out", source="mostly_bad.jsonl")) == 0
    error = capsys.readouterr().err
    assert "WARNING: 3 of 4 records were rejected for one reason" in error
    assert "Is --format caption the format of these inputs?" in error
    assert PackedReader(tmp_path / "out").metadata["packs"] == 1


def test_packed_directory_moves_with_its_tokenizer(workspace, tmp_path):
    output = tmp_path / "packed"
    assert solo_data(pack_args(workspace, output)) == 0
    tokenizer_copy = tmp_path / "tokenizer_elsewhere"
    shutil.copytree(workspace / "tokenizer", tokenizer_copy)
    moved = tmp_path / "moved" / "captions"
    shutil.move(str(output), str(moved))
    shutil.rmtree(workspace / "tokenizer")  # the folder the packs were made from is gone
    try:
        reader = PackedReader(moved)
        assert reader.metadata["tokenizer"]["dir"] == "tokenizer"
        tokenizer = reader.load_tokenizer()
        assert len(tokenizer) == reader.metadata["tokenizer"]["vocab_size"] == 33029
        assert tokenizer.decode(reader[0]["tokens"]).startswith("<s><vision>")
        assert solo_data(["preview", str(moved), "--pack", "0", "--out", str(tmp_path / "p.html")]) == 0

        # A tokenizer swapped for another is refused by its digest.
        other = extend_tokenizer(make_base_tokenizer(vocab_size=32100))
        shutil.rmtree(moved / "tokenizer")
        other.save_pretrained(moved / "tokenizer")
        with pytest.raises(ValueError, match="is not the one the packs were made with"):
            PackedReader(moved).load_tokenizer()
    finally:
        if not (workspace / "tokenizer").exists():
            shutil.copytree(tokenizer_copy, workspace / "tokenizer")


@pytest.mark.e2e
def test_debug_launcher_takes_the_callers_relative_paths(workspace, tmp_path):
    """launch/debug_cpu.sh run from another folder, with DATA and SAVE relative to it."""
    caller = tmp_path / "caller"
    caller.mkdir()
    assert solo_data(pack_args(workspace, caller / "packs")) == 0
    env = python_env()
    env.update(NPROC="1", ITERS="1", DATA="packs", SAVE="run", SEQ="128", PYTHON=sys.executable)
    result = subprocess.run([str(REPO / "launch" / "debug_cpu.sh"), "checkpoint.save_interval=1000",
                             "data.global_batch_size=2"],
                            cwd=caller, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (caller / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1]
    assert records[0]["sample_ids"] and all(sample.startswith("packs#") for sample in records[0]["sample_ids"])
    assert not (REPO / "run").exists() and not (REPO / "packs").exists()
    # Only what a user can act on: no notes about GPU extras on CPU, no per-bucket parameter lists.
    output = result.stdout + result.stderr
    assert "Apex" not in output and "Transformer Engine" not in output and "bucket" not in output
    assert "step 1/1 | loss" in output


@pytest.mark.e2e
def test_create_says_in_one_line_which_weights_are_new(tmp_path):
    from solo.tiny import make_base_checkpoint

    base = make_base_checkpoint(tmp_path / "base")
    command = [sys.executable, "-m", "solo.cli", "create", "--base", base,
               "--out", str(tmp_path / "solo"), "--seed", "3"]
    result = subprocess.run(command, env=python_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out, err = result.stdout, result.stderr
    assert "LOAD REPORT" not in out + err and "MISSING" not in out + err
    assert "Setting accelerator to CPU" not in out + err  # DeepSpeed's note, imported via accelerate
    assert "new: the patch projection, N(0, 0.02) with seed 3" in out
