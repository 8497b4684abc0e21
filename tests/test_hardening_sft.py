"""SFT's save directory: locked for the run and checked before anything is trained (a running SFT's
lock, an export that cannot be replaced, nothing packable), and resume verifies its checkpoints by
checksum and falls back to the newest valid one.
In-process runs of `python -m solo.sft` on a tiny model: a few seconds each."""

import json
import logging
import os
import shutil
import subprocess
import threading
import time

import pytest

from sft_fixtures import make_instruction_set, make_tiny_solo
from solo.checkpoints import LATEST_FILE, iterations, read_latest
from solo.metrics import read_metrics
from solo.outputs import output_lock, write_marker
from solo.sft.__main__ import main as sft_main
from solo.sft.export import COMMAND


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft_hard")
    return {"model": make_tiny_solo(str(root)), "data": make_instruction_set(str(root / "data"), count=12)}


def sft(assets, save, *overrides, data=None):
    return sft_main(["--config", "debug_cpu", f"model.path={assets['model']}", f"data.path={data or assets['data']}",
                     f"checkpoint.save={save}", "data.workers=1", *overrides])


def test_sft_checks_its_save_directory_before_it_trains(assets, tmp_path, capsys):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep")
    assert sft(assets, user, "training.max_steps=1") == 2  # not an SFT save: refused, untouched
    assert "is not empty and is not an output of" in capsys.readouterr().err
    assert os.listdir(user) == ["notes.txt"]

    save = tmp_path / "save"
    with output_lock(save, COMMAND):  # what a running SFT holds for its whole run
        assert sft(assets, save, "training.max_steps=1") == 2
    assert "in use by a running" in capsys.readouterr().err and not save.exists()

    save.mkdir()  # an `hf` export that cannot be replaced is refused now, not after training
    write_marker(save, COMMAND)
    (save / "hf").mkdir()
    (save / "hf" / "model.safetensors").write_bytes(b"mine")
    assert sft(assets, save, "training.max_steps=1") == 2
    err = capsys.readouterr().err
    assert f"{save / 'hf'} is not a previous output" in err and "Traceback" not in err
    assert not (save / "data").exists() and not iterations(str(save))  # nothing packed, nothing trained

    bad = tmp_path / "bad.json"  # nothing packable is an error message, not a traceback
    bad.write_text(json.dumps([{"id": "x", "conversations": [{"from": "robot", "value": "hi"}]}]))
    assert sft(assets, tmp_path / "save2", data=bad) == 2
    err = capsys.readouterr().err
    assert "nothing was packed" in err and "Traceback" not in err


def test_sft_resume_skips_a_damaged_checkpoint_and_a_dangling_latest(assets, tmp_path, caplog):
    """`latest` naming a missing iteration and a checkpoint whose weights were cut short are
    skipped with a warning; the run resumes from the newest valid one and its steps line up."""
    save = tmp_path / "save"
    assert sft(assets, save, "training.max_steps=2", "checkpoint.save_interval=1", "checkpoint.keep_last=3") == 0
    assert iterations(str(save)) == [2, 1]
    weights = next((save / "iter_0000002").rglob("model.safetensors"))
    with open(weights, "r+b") as handle:
        handle.truncate(os.path.getsize(weights) // 2)
    (save / LATEST_FILE).write_text("7")
    shutil.rmtree(save / "hf")
    with caplog.at_level(logging.WARNING, logger="solo.sft"):
        assert sft(assets, save, "training.max_steps=3", "checkpoint.save_interval=1", "checkpoint.keep_last=3") == 0
    skipped = [r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage()]
    assert any("iter_0000007" in m and "missing" in m for m in skipped)
    assert any("iter_0000002" in m and "model.safetensors" in m for m in skipped)
    assert [r["step"] for r in read_metrics(str(save))][-2:] == [2, 3]  # resumed after step 1
    assert (save / "hf" / "config.json").exists()

    for step in iterations(str(save)):  # nothing valid left: one clear message, exit 2
        (save / f"iter_{step:07d}" / "solo_complete.json").unlink()
    assert sft(assets, save, "training.max_steps=4") == 2


def test_sft_saves_and_stops_when_its_launcher_dies(assets, tmp_path, monkeypatch):
    """kill -9 of the launcher leaves the trainer no signal: it notices the launcher is gone (here the
    process SOLO_LAUNCHER_PID names, as launch/torchrun_graceful.sh sets it), finishes its step,
    saves it and stops without exporting, instead of training on unattended."""
    launcher = subprocess.Popen(["sleep", "600"])
    monkeypatch.setenv("SOLO_LAUNCHER_PID", str(launcher.pid))
    save = tmp_path / "save"

    def kill_launcher_after_the_first_step() -> None:
        deadline = time.monotonic() + 300
        while not (save / "metrics.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        launcher.kill()
        launcher.wait()

    killer = threading.Thread(target=kill_launcher_after_the_first_step, daemon=True)
    killer.start()
    try:
        assert sft(assets, save, "training.epochs=400", "training.max_steps=600", "checkpoint.save_interval=1000") == 0
    finally:
        launcher.kill()
        killer.join()
    stopped = read_latest(str(save))
    assert stopped is not None and stopped < 600  # saved where it stopped, long before the end
    assert read_metrics(str(save))[-1]["step"] == stopped
    assert not (save / "hf").exists()  # an interrupted run exports nothing
