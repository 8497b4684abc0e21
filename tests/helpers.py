"""What several test modules share: free ports, the environment of a subprocess that imports this
checkout, independent subprocesses started at once, training runs of the debug recipe, and tiny input
files (images, parquet, a multiple-choice task). Fixtures built from these live in conftest.py."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from solo.processes import free_local_port

REPO = Path(__file__).resolve().parents[1]
DEBUG_RECIPE = str(REPO / "megatron_patch" / "recipes" / "debug_cpu.yaml")

_PORTS_GIVEN: set = set()
_PORTS_LOCK = threading.Lock()


def free_port() -> int:
    """A free local port, never one this test session handed out before (runs overlap: a port given to a
    process that has not bound it yet looks free)."""
    with _PORTS_LOCK:
        while True:
            port = free_local_port()
            if port not in _PORTS_GIVEN:
                _PORTS_GIVEN.add(port)
                return port


def subprocess_env(**extra: str) -> dict[str, str]:
    """This process's environment with the checkout first on PYTHONPATH (a subprocess imports the code
    under test, not an installed copy), plus `extra`."""
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)


def run_together(commands: list[list[str]], envs: list[dict], timeout: float = 600,
                 **popen) -> list[subprocess.CompletedProcess]:
    """`subprocess.run(command, env=env, capture_output=True, text=True, **popen)` for every command and
    its environment (each its own: a training process binds MASTER_PORT), all started before any is
    waited for. A single-process run (training, conversion, a CLI that fails at its checks) spends most
    of its time importing torch and friends on one CPU core, so on a 2-core machine two of them together
    take about the time of one. Output goes to files, so a chatty process never blocks on a full pipe."""
    assert len(envs) == len(commands)
    files = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in commands]
    procs = [subprocess.Popen(command, env=env, stdout=out, stderr=err, text=True, **popen)
             for command, env, (out, err) in zip(commands, envs, files)]
    try:
        for proc in procs:
            proc.wait(timeout=timeout)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    results = []
    for command, proc, (out, err) in zip(commands, procs, files):
        out.seek(0), err.seek(0)
        results.append(subprocess.CompletedProcess(command, proc.returncode, out.read(), err.read()))
        out.close(), err.close()
    return results


# Training runs of the debug recipe (`python -m megatron_patch.train`, or torchrun for nproc > 1).

def train_cmd(save, *overrides, nproc=1):
    if nproc == 1:
        launcher = [sys.executable, "-m", "megatron_patch.train"]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                    "--master_port", str(free_port()), "-m", "megatron_patch.train"]
    return launcher + ["--config", DEBUG_RECIPE, f"checkpoint.save={save}", *overrides]


def training_env() -> dict[str, str]:
    # never inherit a port another test's process group holds
    return subprocess_env(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))


def run_training(save, *overrides, nproc=1, expect_rc=0, timeout=300):
    proc = subprocess.run(train_cmd(save, *overrides, nproc=nproc), cwd=REPO, env=training_env(),
                          capture_output=True, text=True, timeout=timeout)
    if expect_rc is not None and proc.returncode != expect_rc:
        raise AssertionError(f"rc={proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def train_in_process(save, *overrides) -> int:
    """What `python -m megatron_patch.train --config DEBUG_RECIPE checkpoint.save=SAVE OVERRIDES` does, in
    this process (a gloo group of one, torn down after): for runs whose point is not the process (which
    checkpoint a resume picks, what a locked or broken save directory says), without the seconds a
    fresh interpreter spends importing. Returns the exit code; the run prints to this process's
    stdout/stderr (capsys) and logs through `logging` (caplog)."""
    import signal

    import pytest
    import torch
    import torch.distributed as dist

    from megatron_patch import train

    sigterm = signal.getsignal(signal.SIGTERM)  # the run installs its save-and-exit handler
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 in `training_env`: the same arithmetic as a training process
    with pytest.MonkeyPatch.context() as patch:
        for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                            ("MASTER_PORT", str(free_port()))):
            patch.setenv(name, value)
        try:
            return train.main(["--config", DEBUG_RECIPE, f"checkpoint.save={save}", *map(str, overrides)])
        finally:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
            if dist.is_initialized():  # main leaves it when a run stops on an error
                dist.destroy_process_group()
            signal.signal(signal.SIGTERM, sigterm)
            torch.set_num_threads(threads)


@contextlib.contextmanager
def captured_output():
    """Everything the code inside prints or logs (INFO and up), as one text: `buffer.getvalue()`. What
    `capture_output=True` gives of a training process, for a run in this process."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            yield buffer
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def metrics(save):
    with open(Path(save) / "metrics.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def latest(save):
    path = Path(save) / "latest_checkpointed_iteration.txt"
    return int(path.read_text()) if path.exists() else None


# Tiny input files.

def jpeg(width: int, height: int, seed: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def png(colour=(200, 30, 30), size=(40, 32)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def hf_image(data: bytes) -> dict:
    """An image cell of a Hugging Face parquet file."""
    return {"bytes": data, "path": None}


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


TASK_COLOURS = {"red": (220, 30, 30), "green": (30, 190, 40), "blue": (30, 40, 220), "yellow": (235, 215, 30)}
TASK_SIZES = [(32, 32), (64, 32), (32, 64), (64, 64), (96, 32)]  # different token counts: real padding in a batch


def write_colour_task(folder: Path, count: int, seed: int) -> Path:
    """A multiple-choice JSONL: "What colour is the square?" over solid-colour images of varied sizes."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(TASK_COLOURS)
    with open(folder / "task.jsonl", "w", encoding="utf-8") as handle:
        for index in range(count):
            colour = names[index % len(names)]  # balanced answers: any fixed preference scores 25%
            size = TASK_SIZES[int(rng.integers(len(TASK_SIZES)))]
            pixels = np.clip(np.array(TASK_COLOURS[colour]) + rng.integers(-20, 21, (size[1], size[0], 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{index}.png")
            record = {"id": f"q{index}", "image": f"{index}.png", "question": "What colour is the square?",
                      "options": names, "answer": "ABCD"[index % 4],
                      "category": "warm" if index % 4 in (0, 3) else "cold"}
            handle.write(json.dumps(record) + "\n")
    return folder / "task.jsonl"
