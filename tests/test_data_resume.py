"""Determinism (byte-identical output for any worker count) and kill -9 + rerun = uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from data_prep.encode import EncodeOptions
from data_prep.pack import PackConfig, run_pack
from data_prep.reader import PackedReader
from data_prep.sources import SourceOptions
from data_prep.synthetic import jpeg_bytes, photo_like
from solo.tiny import make_base_tokenizer
from solo.tokenizer import extend_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ_LENGTH = 1024


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    extend_tokenizer(make_base_tokenizer()).save_pretrained(root / "tokenizer")
    (root / "images").mkdir()
    lines = []
    for index in range(480):
        if index % 5 == 4:
            lines.append(json.dumps({"image": f"images/{index}.jpg", "caption": ""}))  # rejected: empty caption
            continue
        width, height = (480, 360) if index % 2 else (360, 200)
        (root / "images" / f"{index}.jpg").write_bytes(jpeg_bytes(photo_like(width, height, seed=index)))
        lines.append(json.dumps({"image": f"images/{index}.jpg", "caption": f"photo {index} " + "of a scene " * (index % 40)}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def config(root, output, workers=1, chunk_size=256):
    return PackConfig(inputs=[str(root / "captions.jsonl")], output=str(output), tokenizer=str(root / "tokenizer"),
                      source=SourceOptions(format="caption"), encode=EncodeOptions(seq_length=SEQ_LENGTH),
                      workers=workers, chunk_size=chunk_size, window_items=64, progress=False)


def files_of(directory):
    names = sorted(name for name in os.listdir(directory) if not name.startswith("."))
    return {name: open(os.path.join(directory, name), "rb").read() for name in names}


def command(root, output):
    return [sys.executable, "-m", "data_prep.cli", "pack", str(root / "captions.jsonl"), "--format", "caption",
            "--tokenizer", str(root / "tokenizer"), "--seq-length", str(SEQ_LENGTH), "--output", str(output),
            "--workers", "2", "--chunk-size", "8", "--window", "64", "--no-progress"]


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory):
    output = tmp_path_factory.mktemp("reference") / "out"
    report = run_pack(config(source, output))
    assert report["documents_in"] == 480 and report["documents_rejected"] == 96
    assert report["packs"] > 10  # several windows and packs, so ordering matters
    return output


def test_same_inputs_give_byte_identical_output(source, reference, tmp_path):
    run_pack(config(source, tmp_path / "again", workers=1, chunk_size=7))  # other chunking, same bytes
    assert files_of(tmp_path / "again") == files_of(reference)
    # a finished run is not redone; changed settings on the same output are refused
    run_pack(config(source, tmp_path / "again"))
    assert files_of(tmp_path / "again") == files_of(reference)
    changed = config(source, tmp_path / "again")
    changed.encode = EncodeOptions(seq_length=SEQ_LENGTH, resize_mode="solo")
    with pytest.raises(FileExistsError):
        run_pack(changed)


def _wait_for_chunks(work_dir, count, process, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.fail(f"pack finished (rc {process.returncode}) before it could be killed")
        if os.path.isdir(work_dir) and sum(name.endswith(".pkl") for name in os.listdir(work_dir)) >= count:
            return
        time.sleep(0.01)
    pytest.fail("pack made no progress")


def test_kill_9_then_rerun_is_byte_identical(source, reference, tmp_path):
    output = tmp_path / "killed"
    work_dir = output / ".work"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for kill_after_chunks in (3, 20):  # early, then again later in a resumed run
        process = subprocess.Popen(command(source, output), cwd=REPO, env=env, start_new_session=True,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for_chunks(work_dir, kill_after_chunks, process)
        os.killpg(process.pid, signal.SIGKILL)  # the whole process group: main process and workers
        process.wait()
        assert process.returncode == -signal.SIGKILL
        assert not (output / "metadata.json").exists()
    done_before = sum(name.endswith(".pkl") for name in os.listdir(work_dir))
    assert 20 <= done_before < 60  # 60 chunks in all: the run was really interrupted
    finished = subprocess.run(command(source, output), cwd=REPO, env=env, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert not work_dir.exists()
    assert files_of(output) == files_of(reference)  # K=2 after two kills == K=1 uninterrupted
    report = json.load(open(output / "report.json"))
    assert report["documents_in"] == report["documents_packed"] + report["documents_rejected"] == 480
    assert len(PackedReader(output)) == report["packs"]


def test_two_runs_never_write_the_same_output(tmp_path):
    from data_prep.pack import _lock_output

    first = _lock_output(str(tmp_path))
    with pytest.raises(FileExistsError, match="another solo-data pack is running"):
        _lock_output(str(tmp_path))
    first.close()  # released (the OS also releases it when the holder is killed)
    _lock_output(str(tmp_path)).close()
