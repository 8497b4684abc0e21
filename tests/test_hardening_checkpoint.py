"""Training resume survives a bad checkpoint; two runs never share a save directory. The trainings run
in this process (`helpers.train_in_process`) except the one the lock test must see running beside it."""

import logging
import os
import shutil
import signal
import subprocess
import time

import pytest

from helpers import REPO, latest, metrics, train_cmd, train_in_process, training_env

from solo.checkpoints import CheckpointError, _newest_valid, resolve_checkpoint_dir, verify_checkpoint

TWO_CHECKPOINTS = ["training.train_iters=4", "checkpoint.save_interval=2", "checkpoint.keep_last=3"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A save directory with two good checkpoints: iter_0000002 and iter_0000004."""
    save = tmp_path_factory.mktemp("hardening_ckpt") / "save"
    assert train_in_process(save, *TWO_CHECKPOINTS) == 0
    assert sorted(p.name for p in save.glob("iter_*")) == ["iter_0000002", "iter_0000004"]
    return save


def _truncate(path):
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) // 2)


def _flip_middle(path):
    """Same size, other bytes in the middle: what a size check cannot see (bit rot, a bad copy)."""
    with open(path, "r+b") as handle:
        handle.seek(os.path.getsize(path) // 2)
        data = handle.read(64)
        handle.seek(os.path.getsize(path) // 2)
        handle.write(bytes(255 - b for b in data))


def _largest_shard(ckpt):
    return max(ckpt.glob("*.distcp"), key=os.path.getsize)


CORRUPTIONS = {
    "a .distcp shard changed at the same size": lambda ckpt: _flip_middle(_largest_shard(ckpt)),
    "truncated .distcp": lambda ckpt: _truncate(next(ckpt.glob("*.distcp"))),
    "missing metadata": lambda ckpt: (ckpt / ".metadata").unlink(),
    "truncated common.pt": lambda ckpt: _truncate(ckpt / "common.pt"),
    "garbage common.pt of the same size": lambda ckpt: (ckpt / "common.pt").write_bytes(
        b"\0" * os.path.getsize(ckpt / "common.pt")),
    "no completeness marker (save cut short)": lambda ckpt: (ckpt / "solo_complete.json").unlink(),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_verify_names_each_corruption_and_resume_picks_the_previous_checkpoint(saved, tmp_path, corruption):
    save = tmp_path / "save"
    shutil.copytree(saved, save)
    assert verify_checkpoint(str(save / "iter_0000004")) is None
    CORRUPTIONS[corruption](save / "iter_0000004")
    assert verify_checkpoint(str(save / "iter_0000004")) is not None
    iteration, skipped = _newest_valid(str(save))
    assert iteration == 2 and len(skipped) == 1 and "iter_0000004" in skipped[0]


def test_garbage_latest_file_and_missing_iteration_dir_are_skipped(saved, tmp_path):
    save = tmp_path / "save"
    shutil.copytree(saved, save)
    (save / "latest_checkpointed_iteration.txt").write_text("\x00garbage")
    assert _newest_valid(str(save)) == (4, [f"{save}/latest_checkpointed_iteration.txt: not an iteration number"])
    (save / "latest_checkpointed_iteration.txt").write_text("6")  # names a directory that is gone
    iteration, skipped = _newest_valid(str(save))
    assert iteration == 4 and "iter_0000006" in skipped[0] and "missing" in skipped[0]


def test_one_resolver_for_init_from_eval_and_export(saved, tmp_path):
    """init_from, the demo's evaluation and `solo convert mcore-to-hf [--iteration N]` resolve alike."""
    save = tmp_path / "save"
    shutil.copytree(saved, save)
    assert resolve_checkpoint_dir(str(save)) == str(save / "iter_0000004")
    assert resolve_checkpoint_dir(str(save), 2) == str(save / "iter_0000002")
    assert resolve_checkpoint_dir(str(save / "iter_0000002"), 2) == str(save / "iter_0000002")
    with pytest.raises(CheckpointError, match=r"no complete iteration 3; available: \[2, 4\]"):
        resolve_checkpoint_dir(str(save), 3)
    with pytest.raises(CheckpointError, match="is iter_0000002, not iteration 4"):
        resolve_checkpoint_dir(str(save / "iter_0000002"), 4)
    CORRUPTIONS["truncated common.pt"](save / "iter_0000004")
    assert resolve_checkpoint_dir(str(save)) == str(save / "iter_0000002")  # the newest that verifies
    with pytest.raises(CheckpointError, match="iter_0000004 does not verify"):
        resolve_checkpoint_dir(str(save), 4)  # asked for by number: refused, never swapped silently
    with pytest.raises(CheckpointError, match="not a megatron-core checkpoint"):
        resolve_checkpoint_dir(str(save / "iter_0000004"))


def test_a_shard_changed_at_the_same_size_is_named_by_mcore_to_hf(saved, tmp_path, capsys):
    from solo.cli import main as solo_main

    save = tmp_path / "save"
    shutil.copytree(saved, save)
    shard = _largest_shard(save / "iter_0000004")
    _flip_middle(shard)
    args = ["convert", "mcore-to-hf", "--ckpt", str(save / "iter_0000004"), "--tokenizer", str(save / "tokenizer"),
            "--out", str(tmp_path / "hf")]
    assert solo_main(args) == 2
    err = capsys.readouterr().err
    assert f"{shard.name} does not match the checksum written with it" in err
    assert "weights_only" not in err and "Traceback" not in err and not (tmp_path / "hf").exists()


def test_resume_falls_back_with_a_warning_and_fails_cleanly_when_nothing_is_valid(saved, tmp_path, capsys, caplog):
    save = tmp_path / "save"
    shutil.copytree(saved, save)
    CORRUPTIONS["a .distcp shard changed at the same size"](save / "iter_0000004")
    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    for ckpt in broken.glob("iter_*"):
        (ckpt / "common.pt").unlink()
    caplog.set_level(logging.INFO)
    code = train_in_process(save, "training.train_iters=5", "checkpoint.save_interval=100")
    out = caplog.text + capsys.readouterr().err
    assert code == 0, out[-4000:]
    assert "skipping checkpoint" in out and "iter_0000004" in out
    assert "resumed from" in out and "at iteration 2" in out
    assert [r["step"] for r in metrics(save)] == [1, 2, 3, 4, 5] and latest(save) == 5

    code = train_in_process(broken, *TWO_CHECKPOINTS)
    err = capsys.readouterr().err
    assert code == 2, (caplog.text + err)[-4000:]
    assert "no valid checkpoint in" in err and "iter_0000002" in err
    assert "Traceback" not in err


@pytest.mark.e2e
def test_a_second_run_on_the_same_save_directory_is_refused_and_a_dead_runs_lock_does_not_block(tmp_path, capsys):
    save = tmp_path / "save"
    first = subprocess.Popen(train_cmd(save, "training.train_iters=500", "checkpoint.save_interval=1000",
                                       "training.step_sleep_s=0.2"),
                             cwd=REPO, env=training_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        deadline = time.time() + 180
        while not (save / "metrics.jsonl").exists():
            assert first.poll() is None and time.time() < deadline, "first run did not start training"
            time.sleep(0.1)
        assert train_in_process(save, "training.train_iters=2") == 2
        err = capsys.readouterr().err
        assert "is in use by a running `python -m megatron_patch.train" in err
        assert f"pid {first.pid}" in err
        assert first.poll() is None  # the first run went on untouched
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # dies holding the lock
        first.wait(timeout=30)
    assert train_in_process(save, "training.train_iters=1") == 0  # the lock of a dead run does not block the restart
    assert latest(save) == 1
