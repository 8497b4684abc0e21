"""Checkpoint bookkeeping shared by pretraining and SFT (torch-free): iteration directory names,
the ``latest`` pointer, atomic publication (``iter_N.tmp`` renamed into place, then ``latest``
pointed at it) and keep-last-N pruning. What goes inside a checkpoint is each stage's business.
"""

from __future__ import annotations

import os
import shutil
from typing import Optional

from solo.outputs import write_text_atomic

CKPT_PREFIX = "iter_"
LATEST_FILE = "latest_checkpointed_iteration.txt"
TMP_SUFFIX = ".tmp"


def iteration_dir(save: str, iteration: int) -> str:
    """``SAVE/iter_0000042`` for iteration 42."""
    return os.path.join(save, f"{CKPT_PREFIX}{iteration:07d}")


def read_latest(save: Optional[str]) -> Optional[int]:
    """The iteration the ``latest`` file names, or None (no file, or not a number: it is a hint only)."""
    if not save:
        return None
    try:
        with open(os.path.join(save, LATEST_FILE), encoding="utf-8") as fh:
            return int(fh.read(64).strip())
    except (OSError, ValueError):
        return None


def iterations(save: str) -> list[int]:
    """Iterations of the published checkpoint directories in ``save``, newest first."""
    if not os.path.isdir(save):
        return []
    found = [name[len(CKPT_PREFIX):] for name in os.listdir(save) if name.startswith(CKPT_PREFIX)]
    return sorted((int(number) for number in found if number.isdigit()), reverse=True)


def prepare_tmp_dir(save: str, iteration: int) -> str:
    """Create an empty ``iter_N.tmp`` to write checkpoint ``iteration`` into (stale copies removed)."""
    final = iteration_dir(save, iteration)
    tmp = final + TMP_SUFFIX
    os.makedirs(save, exist_ok=True)
    for stale in (tmp, final):
        if os.path.exists(stale):
            shutil.rmtree(stale)
    os.makedirs(tmp)
    return tmp


def publish_checkpoint(save: str, iteration: int, keep_last: int) -> str:
    """Rename ``iter_N.tmp`` into place, point ``latest`` at it, prune; returns the final directory.

    Call once (main process) after every rank finished writing into the tmp directory.
    """
    final = iteration_dir(save, iteration)
    os.replace(final + TMP_SUFFIX, final)
    write_text_atomic(os.path.join(save, LATEST_FILE), str(iteration))
    prune_checkpoints(save, keep_last)
    return final


def prune_checkpoints(save: str, keep_last: int) -> None:
    """Keep the newest ``keep_last`` complete checkpoints; remove leftovers of saves that crashed."""
    for old in iterations(save)[keep_last:] if keep_last > 0 else []:
        shutil.rmtree(iteration_dir(save, old), ignore_errors=True)
    for name in os.listdir(save):
        if name.startswith(CKPT_PREFIX) and name.endswith(TMP_SUFFIX):
            shutil.rmtree(os.path.join(save, name), ignore_errors=True)
