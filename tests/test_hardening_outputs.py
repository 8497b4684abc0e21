"""No data loss from --overwrite, and clean errors instead of tracebacks."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.cli import main as solo_data
from data_prep.synthetic import jpeg_bytes, photo_like
from solo.cli import main as solo_main

from helpers import REPO, subprocess_env, train_in_process


def caption_source(folder: Path, count: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(count):
        (folder / f"{index}.jpg").write_bytes(jpeg_bytes(photo_like(64, 32, seed=index)))
        lines.append(json.dumps({"image": f"{index}.jpg", "caption": f"picture {index}"}))
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "captions.jsonl"


def pack_args(source, tokenizer_dir, output, *extra):
    return ["pack", str(source), "--format", "caption", "--tokenizer", str(tokenizer_dir), "--seq-length", "256",
            "--output", str(output), "--no-progress", *extra]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_create_overwrite_never_destroys_the_base_or_its_parent(base_dir, tmp_path, capsys):
    parent = tmp_path / "models"
    base = parent / "base"
    shutil.copytree(base_dir, base)
    before = snapshot(parent)
    for out, conflict in ((base, "contains the input"), (parent, "contains the input"),
                          (base / "solo", "is inside the input")):
        assert solo_main(["create", "--base", str(base), "--out", str(out), "--overwrite"]) == 2
        assert conflict in capsys.readouterr().err
    assert snapshot(parent) == before
    (tmp_path / "a_file").write_text("x")
    assert solo_main(["create", "--base", str(base), "--out", str(tmp_path / "a_file")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    foreign = tmp_path / "foreign"  # a non-empty directory some other tool wrote
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert solo_main(["create", "--base", str(base), "--out", str(foreign), "--overwrite"]) == 2
    assert "not a previous output of `solo create`" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "keep me"
    out = tmp_path / "solo"  # its own output is replaced
    assert solo_main(["create", "--base", str(base), "--out", str(out)]) == 0
    assert solo_main(["create", "--base", str(base), "--out", str(out), "--overwrite", "--seed", "3"]) == 0


def test_pack_overwrite_never_deletes_sources_or_foreign_folders(tokenizer_dir, tmp_path, capsys):
    data = tmp_path / "data"
    source = caption_source(data)
    before = snapshot(data)
    for given, output, conflict in ((source, data, "contains the input"), (source, tmp_path, "contains the input"),
                                    (data, data / "packed", "is inside the input")):  # a folder of shards
        assert solo_data(pack_args(given, tokenizer_dir, output, "--overwrite")) == 2
        assert conflict in capsys.readouterr().err
    assert snapshot(data) == before and not (data / "packed").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    assert solo_data(pack_args(source, tokenizer_dir, foreign, "--overwrite")) == 2
    assert "not a previous output of `solo-data pack`" in capsys.readouterr().err
    assert (foreign / "thesis.tex").read_text() == "years of work"
    output = tmp_path / "packed"
    assert solo_data(pack_args(source, tokenizer_dir, output)) == 0
    assert solo_data(pack_args(source, tokenizer_dir, output, "--overwrite", "--seq-length", "128")) == 0
    assert json.loads((output / "metadata.json").read_text())["seq_length"] == 128


@pytest.mark.e2e
def test_disk_full_gives_the_same_message_in_pack_and_create(base_dir, tokenizer_dir, small_disk, tmp_path):
    source = caption_source(tmp_path / "data", count=40)
    env = subprocess_env()
    filler = small_disk / "filler"
    # create fills the disk while safetensors writes the weights (1000 KiB free; the tiny model is larger);
    # pack while it writes its packs (64 KiB free).
    for free, command in ((1000, [sys.executable, "-m", "solo.cli", "create", "--base", str(base_dir), "--out",
                                  str(small_disk / "solo")]),
                          (64, [sys.executable, "-m", "data_prep.cli",
                                *pack_args(source, tokenizer_dir, small_disk / "packed")])):
        filler.write_bytes(b"\0" * (3 * 1024 * 1024 - free * 1024))
        proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert (f"no space left on {small_disk}" in proc.stderr
                and "free space and run the same command again" in proc.stderr)
        assert "Traceback" not in proc.stderr
    assert not (small_disk / "solo").exists()  # nothing half-written looks like a checkpoint
    assert not [name for name in os.listdir(small_disk) if name.startswith(".solo")]  # its staging is gone


def test_corrupt_safetensors_is_named(base_dir, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(base_dir, base)
    weights = base / "model.safetensors"
    intact = weights.read_bytes()
    for broken in (intact[: len(intact) // 2], b"\xff" * 64, intact[:4]):
        weights.write_bytes(broken)
        assert solo_main(["create", "--base", str(base), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert "model.safetensors is not a valid safetensors file" in err


@pytest.mark.parametrize("text, message", [
    ("datasets: [{path: a, weight: 1}", "is not valid YAML"),
    ("datasets:\n  - {path: a, weight: .inf}\n", "finite number > 0, got inf"),
    ("datasets:\n  - {path: a, weight: abc}\n", "finite number > 0, got 'abc'"),
    ("datasets:\n  - {path: a, weight: true}\n", "finite number > 0, got True"),
    ("datasets:\n  - {path: a, weight: 1, wieght: 2}\n", "unknown key(s) ['wieght']"),
    ("datasets:\n  - {path: missing, weight: 1}\n", "packed directory"),
    ("sets: []\n", "needs a non-empty 'datasets' list"),
])
def test_mixture_errors_are_clear(tmp_path, capsys, text, message):
    mixture = tmp_path / "mix.yaml"
    mixture.write_text(text)
    assert solo_data(["plan", str(mixture), "--global-batch", "2", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert message in err
    if "packed directory" in message:
        assert "does not exist" in err and "metadata.json" not in err


def test_plan_refuses_infinite_epochs(tokenizer_dir, tmp_path, capsys):
    output = tmp_path / "packed"
    assert solo_data(pack_args(caption_source(tmp_path / "data"), tokenizer_dir, output)) == 0
    mixture = tmp_path / "mix.yaml"
    mixture.write_text(f"datasets:\n  - {{path: {output}, weight: 1}}\n")
    for amount in (["--epochs", "inf"], ["--epochs", "nan"], ["--tokens", "inf"]):
        assert solo_data(["plan", str(mixture), "--global-batch", "2", *amount]) == 2
        assert "must be a finite number > 0" in capsys.readouterr().err


def test_training_names_a_missing_data_path_and_a_broken_mixture(tmp_path, capsys):
    broken = tmp_path / "mix.yaml"
    broken.write_text("datasets:\n  - {path: somewhere, weight: .inf}\n")
    cases = ((tmp_path / "no_such_packs", "does not exist"), (broken, "finite number > 0, got inf"))
    for number, (data, message) in enumerate(cases):  # `python -m megatron_patch.train`, in this process
        code = train_in_process(tmp_path / f"run{number}", f"data.path={data}", "data.pad_token_id=")
        err = capsys.readouterr().err
        assert code == 2, err[-2000:]
        assert message in err and "Traceback" not in err
