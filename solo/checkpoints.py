"""Checkpoint bookkeeping shared by pretraining, SFT and conversion (torch-free): iteration
directory names, the ``latest`` pointer, atomic publication (``iter_N.tmp`` renamed into place, then
``latest`` pointed at it), keep-last-N pruning, and the completeness marker (``solo_complete.json``:
every file's size and SHA-256, written last) with its verification and the choice of the newest
checkpoint that verifies. What goes inside a checkpoint is each stage's business.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Callable, Optional

from solo.outputs import write_json_atomic, write_text_atomic

CKPT_PREFIX = "iter_"
LATEST_FILE = "latest_checkpointed_iteration.txt"
TMP_SUFFIX = ".tmp"
COMPLETE_FILE = "solo_complete.json"


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


def _sha256(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def write_complete_marker(ckpt_dir: str) -> None:
    """List every file of a written checkpoint with its size and SHA-256; written last, so it means
    complete (and the checksums let a later reader see a file changed at the same size)."""
    files = {}
    for root, _, names in os.walk(ckpt_dir):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())  # on disk before the marker makes the checkpoint count
            files[os.path.relpath(path, ckpt_dir)] = {"bytes": os.path.getsize(path), "sha256": _sha256(path)}
    write_json_atomic(os.path.join(ckpt_dir, COMPLETE_FILE), {"files": files})


def verify_complete_marker(ckpt_dir: str) -> Optional[str]:
    """Why the files of ``ckpt_dir`` are not the ones its marker lists, or None if they all are."""
    if not os.path.isdir(ckpt_dir):
        return "the directory is missing"
    try:
        with open(os.path.join(ckpt_dir, COMPLETE_FILE), encoding="utf-8") as fh:
            files = json.load(fh)["files"]
        listed = {name: (int(entry["bytes"]), str(entry["sha256"])) for name, entry in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"no readable {COMPLETE_FILE} with sizes and checksums (the save did not finish)"
    for name, (size, _) in listed.items():  # sizes first: cheap, and the usual damage
        path = os.path.join(ckpt_dir, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        if os.path.getsize(path) != size:
            return f"{name} has {os.path.getsize(path)} bytes, {size} were written (truncated or changed)"
    for name, (_, digest) in listed.items():
        if _sha256(os.path.join(ckpt_dir, name)) != digest:
            return f"{name} does not match the checksum written with it (corrupted or changed on disk)"
    return None


def newest_valid(save: str, verify: Callable[[str], Optional[str]]) -> tuple[Optional[int], list[str]]:
    """The newest checkpoint of ``save`` that ``verify`` accepts (it returns why not, or None), and
    what was skipped on the way. ``latest`` is only a hint: a missing or garbage one is reported."""
    skipped = []
    latest = read_latest(save)
    latest_path = os.path.join(save, LATEST_FILE)
    if latest is None and os.path.exists(latest_path):
        skipped.append(f"{latest_path}: not an iteration number")
    found = iterations(save)
    if latest is not None and latest not in found:
        skipped.append(f"{iteration_dir(save, latest)} (named in {LATEST_FILE}): the directory is missing")
    for iteration in found:
        reason = verify(iteration_dir(save, iteration))
        if reason is None:
            return iteration, skipped
        skipped.append(f"{iteration_dir(save, iteration)}: {reason}")
    return None, skipped
