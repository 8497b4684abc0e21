"""Launcher exit status: a graceful preemption exits 0; killing the launcher
alone stops the training processes too."""

import os
import signal
import subprocess
import time

import pytest

from helpers import REPO, latest, metrics, training_env

pytestmark = [pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds processes through /proc"),
              pytest.mark.e2e]  # every test here starts processes


def launch(save, log):
    """launch/debug_cpu.sh on 2 processes, slow enough to be interrupted mid-run (output to `log`)."""
    environment = dict(training_env(), SAVE=str(save), ITERS="500", NPROC="2")
    with open(log, "w") as handle:
        return subprocess.Popen(["bash", "launch/debug_cpu.sh", "training.step_sleep_s=0.2",
                                 "checkpoint.save_interval=1000"],
                                cwd=REPO, env=environment, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)


def wait_for_steps(save, proc, steps=2, timeout=180):
    deadline = time.time() + timeout
    while not (save / "metrics.jsonl").exists() or len(metrics(save)) < steps:
        assert proc.poll() is None and time.time() < deadline, "the run did not start training"
        time.sleep(0.1)


def processes_started_by(launcher_pid):
    """Live processes that carry this launcher's SOLO_LAUNCHER_PID (torchrun and its workers)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as handle:
                environ = handle.read().split(b"\0")
            with open(f"/proc/{name}/stat", "rb") as handle:
                zombie = handle.read().rsplit(b")", 1)[1].split()[0] == b"Z"
        except OSError:
            continue
        if f"SOLO_LAUNCHER_PID={launcher_pid}".encode() in environ and not zombie:
            found.append(int(name))
    return found


def test_sigterm_to_the_launcher_saves_and_exits_0(tmp_path):
    save = tmp_path / "save"
    proc = launch(save, tmp_path / "log")
    try:
        wait_for_steps(save, proc)
        os.killpg(proc.pid, signal.SIGTERM)  # the launcher's process group, as a scheduler signals a job
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = (tmp_path / "log").read_text()
    assert proc.returncode == 0, out[-3000:]
    assert "(SIGTERM)" in out and latest(save) is not None and latest(save) >= 2
    assert not processes_started_by(proc.pid)


def test_killing_the_launcher_alone_stops_the_training(tmp_path):
    save = tmp_path / "save"
    proc = launch(save, tmp_path / "log")
    try:
        wait_for_steps(save, proc)
        assert processes_started_by(proc.pid)  # torchrun and its two workers
        proc.kill()  # kill -9 of the launcher only: torchrun and the workers get no signal
        proc.wait(timeout=30)
        deadline = time.time() + 120
        while processes_started_by(proc.pid):
            assert time.time() < deadline, "training processes outlived their launcher"
            time.sleep(0.2)
    finally:
        for pid in processes_started_by(proc.pid):
            os.kill(pid, signal.SIGKILL)
    assert latest(save) is not None  # they stopped the graceful way: a checkpoint was saved
