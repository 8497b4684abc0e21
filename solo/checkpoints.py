"""The checkpoint format, one module below everything that writes or reads checkpoints (pretraining's
runtime checkpointing, SFT, conversion, the demo's evaluation): iteration directory names, the
``latest`` pointer, atomic publication (``iter_N.tmp`` renamed into place, then ``latest`` pointed at
it), keep-last-N pruning, the completeness marker (``solo_complete.json``: every file's size and
SHA-256, written last) with its verification, the choice of the newest checkpoint that verifies,
and, for megatron-core ``torch_dist`` checkpoints, their verification, the resolution of a SAVE_DIR
or iter_* path to one verified checkpoint, and :class:`CheckpointReader` (one tensor, or one layer of
it, read straight from the files). What goes inside a checkpoint is each stage's business.

megatron-core is imported only by the functions that read its format, so SFT does not load it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from solo.outputs import write_json_atomic, write_text_atomic

logger = logging.getLogger("solo.checkpoints")

CKPT_PREFIX = "iter_"
LATEST_FILE = "latest_checkpointed_iteration.txt"
TMP_SUFFIX = ".tmp"
COMPLETE_FILE = "solo_complete.json"
TOKENIZER_DIR = "tokenizer"  # beside the iter_* directories, in converted and training SAVE_DIRs


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, converted or resumed from (or a save directory another run
    holds); the message names the input and what to do."""


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


def nothing_to_resume(save: str, skipped: list[str]) -> CheckpointError:
    """The error of a run whose ``save`` holds checkpoints of which none verifies (``skipped``: why)."""
    return CheckpointError(
        f"no valid checkpoint in {save} to resume from (" + "; ".join(skipped) + "). Move the damaged "
        "checkpoints away to start this run from the beginning, or choose another checkpoint.save")


# ----------------------------------------------------------------------------------------------
# megatron-core torch_dist checkpoints (pretraining's and conversion's)
# ----------------------------------------------------------------------------------------------


def verify_checkpoint(ckpt_dir: str) -> Optional[str]:
    """Why the megatron-core checkpoint ``ckpt_dir`` cannot be loaded, or None if it verifies (every
    file's checksum, then its metadata and common state; no tensor is deserialised)."""
    from megatron.core import dist_checkpointing

    reason = verify_complete_marker(ckpt_dir)
    if reason is not None:
        return reason
    try:
        dcp.FileSystemReader(ckpt_dir).read_metadata()
        common = dist_checkpointing.load_common_state_dict(ckpt_dir)
    except Exception as exc:  # any failure to read them means this checkpoint cannot be used
        return f"its metadata or common state is unreadable ({type(exc).__name__}: {str(exc)[:200]})"
    if not isinstance(common, dict) or "iteration" not in common:
        return "its common state has no iteration"
    return None


def _newest_valid(save: str) -> tuple[Optional[int], list[str]]:
    """The newest verifying megatron-core checkpoint of ``save`` and what was skipped on the way."""
    return newest_valid(save, verify_checkpoint)


def resolve_checkpoint_dir(path: str, iteration: Optional[int] = None) -> str:
    """A verified checkpoint: of a SAVE_DIR its newest verifying one (or ``iteration``), else ``path``
    itself as an iter_* directory (which must be ``iteration`` when that is given)."""
    path = os.fspath(path)
    available = iterations(path) if os.path.isdir(path) else []
    if available and iteration is None:
        iteration, skipped = _newest_valid(path)
        for item in skipped:
            logger.warning("skipping checkpoint %s", item)
        if iteration is None:
            raise CheckpointError(f"no valid checkpoint in {path} (" + "; ".join(skipped) + ")")
        return iteration_dir(path, iteration)
    if available:
        if iteration not in available:
            raise CheckpointError(f"{path} has no complete iteration {iteration}; available: {sorted(available)}")
        chosen = iteration_dir(path, iteration)
        reason = verify_checkpoint(chosen)
        if reason is not None:
            raise CheckpointError(f"{chosen} does not verify: {reason}; pick another iteration "
                                  f"(available: {sorted(available)})")
        return chosen
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    reason = verify_checkpoint(path)
    if reason is not None:
        raise CheckpointError(f"{path} is not a megatron-core checkpoint: neither a SAVE_DIR with iter_* "
                              f"checkpoints nor a valid checkpoint directory ({reason})")
    name = os.path.basename(os.path.normpath(path))
    if iteration is not None and name != f"{CKPT_PREFIX}{iteration:07d}":
        raise CheckpointError(f"{path} is {name}, not iteration {iteration}")
    return path


class CheckpointReader:
    """Reads slices of a ``torch_dist`` checkpoint's global tensors (e.g. one layer of a layer-stacked
    tensor) straight from its files with torch.distributed.checkpoint, whatever TP/PP wrote it.

    megatron-core's own loader needs the whole global tensor when running in one process, which
    would hold every layer at once; a planner that asks for one chunk keeps conversion streaming.
    """

    def __init__(self, iter_dir: str | os.PathLike):
        self.directory = str(iter_dir)
        self.metadata = dcp.FileSystemReader(self.directory).read_metadata().state_dict_metadata

    def shape(self, key: str) -> Optional[Tuple[int, ...]]:
        entry = self.metadata.get(key)
        return tuple(entry.size) if entry is not None and hasattr(entry, "size") else None

    def dtype(self, key: str) -> torch.dtype:
        return self.metadata[key].properties.dtype

    def read(self, key: str, layer: Optional[int] = None) -> torch.Tensor:
        """The whole tensor, or layer ``layer`` of a layer-stacked one (without the layer axis)."""
        shape = self.shape(key)
        if layer is None:
            data, offsets = torch.empty(shape, dtype=self.dtype(key)), (0,) * len(shape)
        else:
            data, offsets = torch.empty((1,) + shape[1:], dtype=self.dtype(key)), (layer,) + (0,) * (len(shape) - 1)
        dcp.load({key: data}, storage_reader=dcp.FileSystemReader(self.directory),
                 planner=_ChunkLoadPlanner({key: offsets}), no_dist=True)
        return data if layer is None else data[0]


class _ChunkLoadPlanner(DefaultLoadPlanner):
    """Loads each requested tensor as the chunk at ``offsets`` of the stored global tensor."""

    def __init__(self, offsets: Dict[str, Tuple[int, ...]]):
        super().__init__()
        self.offsets = offsets

    def create_local_plan(self) -> LoadPlan:
        items = []
        for fqn, tensor in self.state_dict.items():
            chunk = ChunkStorageMetadata(offsets=torch.Size(self.offsets[fqn]), sizes=tensor.size())
            items += create_read_items_for_chunk_list(fqn, self.metadata.state_dict_metadata[fqn], [chunk])
        return LoadPlan(items)

    def resolve_tensor(self, read_item) -> torch.Tensor:
        tensor = self.state_dict[read_item.dest_index.fqn]
        for dim, (offset, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            tensor = tensor.narrow(dim, offset, length)
        return tensor
