"""Pretraining checkpoints: megatron-core ``torch_dist`` dist-checkpoints, written atomically
(``iter_N.tmp`` renamed into place, then ``latest`` pointed at it), the last N kept.

The format (directory names, ``latest``, the completeness marker ``solo_complete.json`` with every
file's size and SHA-256, verification, resolution, the tensor reader) is solo.checkpoints'; every
checkpoint gets the marker, written last, before the rename. Resume (``restore``) loads model,
optimizer, schedule, RNG and data position from the newest checkpoint in ``checkpoint.save`` that
verifies (marker present, every file there at its size and checksum, metadata and common state
readable); a newer one that does not is
skipped with a warning naming it and why, and when none verifies the run stops with one message.
A new stage starts from ``checkpoint.init_from`` (verified the same way) with its schedule reset.
A resumed run keeps the LR schedule it was started with, even if the recipe's length or LRs
changed since (it warns, and says how to restart the schedule on purpose).
A run holds the lock on ``checkpoint.save`` (solo.outputs.output_lock; released by the OS when it
dies, so a crashed run never blocks its restart): a second live run on the same directory is refused.

Checkpoint directories are trusted input: megatron-core and torch unpickle parts of them on load
(``common.pt``, the ``.metadata`` of torch.distributed.checkpoint), like any PyTorch checkpoint.

Formats and cost: model weights always reshard (any TP/PP/DP). The distributed optimizer's state is
saved ``dp_reshardable`` by default: every data-parallel rank writes and reads only its own shard
(megatron-core's fully-parallel save/load wrappers spread the replicated tensors too), with no
gather. It loads at any DP size but only at the saved TP/PP. ``checkpoint.fully_reshardable=true``
writes the ``fully_reshardable`` form instead (the whole fp32 state gathered per TP shard on DP
rank 0: tens of GB of host memory at 7B), which loads at any TP/PP; use it for the save before a
planned TP/PP change. Loading reads the format from the checkpoint. Saves can run asynchronously
(``checkpoint.async_save``): training continues while a background process writes, and the
checkpoint is renamed into place and ``latest`` updated only once every rank has finished.

Every checkpoint carries the run's config (so its model architecture), and the tokenizer the run
used is kept in ``SAVE_DIR/tokenizer`` (what ``solo convert mcore-to-hf`` exports with).
``check_init_from`` refuses, before any model is built, an ``init_from`` that is a Hugging Face
directory or whose architecture differs from the recipe's; ``load_init_weights`` loads weights
at any TP/PP, re-padding the vocabulary rows when the TP (hence the padding) differs.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

from megatron_patch.config import ARCH_DEFAULTS, ARCH_FIELDS, Config, ConfigError
from megatron_patch.model.state_dict_mapping import VOCAB_KEYS
from solo.checkpoints import (
    TOKENIZER_DIR,
    CheckpointError,
    CheckpointReader,
    iteration_dir,
    newest_valid,
    nothing_to_resume,
    prepare_tmp_dir,
    publish_checkpoint,
    read_latest,
    resolve_checkpoint_dir,
    verify_checkpoint,
    write_complete_marker,
)

logger = logging.getLogger("megatron_patch.checkpointing")

TRAIN_COMMAND = "python -m megatron_patch.train"


def unwrap(model):
    inner = model.module
    return getattr(inner, "module", inner)  # Float16Module


# ----------------------------------------------------------------------------------------------
# Checkpoints: torch_dist (reshardable), atomic "latest", keep-last-N
# ----------------------------------------------------------------------------------------------


def _agree(value):
    """Rank 0's value on every rank (decisions about files are taken once, by rank 0)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def find_resume_checkpoint(save: Optional[str]) -> Optional[int]:
    """The iteration to resume from in ``save`` (None: nothing there, start fresh); collective.

    Skipped checkpoints are logged; if checkpoints exist but none verifies, raises CheckpointError.
    """
    if not save:
        return None
    found = None
    if dist.get_rank() == 0:
        try:
            found = newest_valid(save, verify_checkpoint)
        except OSError as exc:  # never leave the other ranks waiting on a rank-0 traceback
            found = (None, [f"{save}: cannot be read ({exc})"])
    iteration, skipped = _agree(found)
    if dist.get_rank() == 0:
        for item in skipped:
            logger.warning("skipping checkpoint %s", item)
    if iteration is None and skipped:
        raise nothing_to_resume(save, skipped)
    return iteration


class SaveDirLock:
    """The lock on a save directory for the whole run (solo.outputs.output_lock, the one rule of
    every output), held by rank 0 (collective); released when the run ends or dies."""

    def __init__(self, save: Optional[str]):
        from contextlib import ExitStack

        from solo.outputs import OutputError, output_lock

        self.stack = ExitStack()
        error = None
        if save and dist.get_rank() == 0:
            try:  # any failure here is reported on every rank, never left as a rank-0 traceback
                self.stack.enter_context(output_lock(save, TRAIN_COMMAND))
                os.makedirs(save, exist_ok=True)
            except OutputError as exc:
                error = f"checkpoint.save {exc}"
            except OSError as exc:
                error = f"checkpoint.save {save} cannot be written ({exc}); choose a writable directory"
        error = _agree(error)
        if error:
            self.release()
            raise CheckpointError(error)

    def release(self) -> None:
        self.stack.close()

    def __del__(self) -> None:  # train() holds it in a local: freed when train() returns
        self.release()


def _topology() -> Dict[str, int]:
    from megatron.core import parallel_state as ps

    return dict(
        tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(),
    )


def _rng_object(is_loading: bool):
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state = None
    if not is_loading:
        state = dict(
            cpu=torch.get_rng_state(),
            cuda=torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            tracker=tensor_parallel.get_cuda_rng_tracker().get_states(),
        )
    topo = _topology()
    return ShardedObject(
        "rng_state",
        state,
        (topo["pp"], topo["tp"], topo["dp"]),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank()),
        replica_id=0,
    )


DP_RESHARDABLE, FULLY_RESHARDABLE = "dp_reshardable", "fully_reshardable"


def _sharded_state(model, optimizer, *, is_loading: bool, with_optimizer: bool, with_rng: bool,
                   optimizer_format: str = DP_RESHARDABLE):
    model_sd = unwrap(model).sharded_state_dict()
    state: Dict[str, Any] = {"model": model_sd}
    if with_optimizer:
        # Only megatron's distributed optimizer (GPU) reads this; see the module docstring.
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata={"distrib_optim_sharding_type": optimizer_format}
        )
    if with_rng:
        state["rng_state"] = _rng_object(is_loading)
    return state


def _parallel_group():
    """The ranks that hold replicas of the same shards: data-parallel (with context-parallel)."""
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_group(with_context_parallel=True)


def _save_strategy():
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    # Every replica writes a share of the replicated tensors, not DP rank 0 alone.
    return FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy("torch_dist"), _parallel_group())


def _load_strategy(ckpt_dir: str):
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper

    # Each replica reads a share and exchanges it, instead of every rank reading everything.
    return FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(ckpt_dir), _parallel_group())


class AsyncSaves:
    """Asynchronous checkpoint writes in flight (megatron-core's AsyncCallsQueue); one at a time.

    ``poll()`` each step finalizes a finished save (rename into place, point ``latest``, prune);
    ``wait()`` blocks until none is in flight (before the next save and before exit)."""

    def __init__(self):
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.queue = AsyncCallsQueue()

    def schedule(self, request) -> None:
        self.queue.schedule_async_request(request)

    def poll(self) -> None:
        self.queue.maybe_finalize_async_calls(blocking=False)

    def wait(self) -> None:
        self.queue.maybe_finalize_async_calls(blocking=True)


def save_checkpoint(cfg: Config, model, optimizer, scheduler, iteration: int, consumed: int,
                    async_saves: Optional[AsyncSaves] = None) -> None:
    """Write iter_N atomically: into iter_N.tmp, rename, then point 'latest' at it. With
    ``async_saves`` the write continues in the background and the rename happens when it is done."""
    from megatron.core import dist_checkpointing

    if async_saves is not None:
        async_saves.wait()  # one save in flight at a time; keeps keep_last and 'latest' ordered
    save = cfg.checkpoint.save
    tmp = iteration_dir(save, iteration) + ".tmp"
    rank = dist.get_rank()
    if rank == 0:
        prepare_tmp_dir(save, iteration)
    dist.barrier()
    optimizer_format = FULLY_RESHARDABLE if cfg.checkpoint.fully_reshardable else DP_RESHARDABLE
    state = _sharded_state(model, optimizer, is_loading=False, with_optimizer=True, with_rng=True,
                           optimizer_format=optimizer_format)
    state.update(
        iteration=iteration,
        consumed_samples=consumed,
        scheduler=scheduler.state_dict(),
        topology=_topology(),
        optimizer_format=optimizer_format,
        config=cfg.to_dict(),
    )
    request = dist_checkpointing.save(
        state, tmp, sharded_strategy=_save_strategy(), async_sharded_save=async_saves is not None
    )
    finalize = lambda: _publish(cfg, tmp, iteration)  # noqa: E731
    if async_saves is not None:
        request.add_finalize_fn(finalize)
        async_saves.schedule(request)
        return
    dist.barrier()
    finalize()
    dist.barrier()


def _publish(cfg: Config, tmp: str, iteration: int) -> None:
    """Rank 0: mark a complete checkpoint, move it into place, point 'latest' at it, prune old ones."""
    if dist.get_rank() == 0:
        write_complete_marker(tmp)
        final = publish_checkpoint(cfg.checkpoint.save, iteration, cfg.checkpoint.keep_last)
        _keep_tokenizer(cfg)
        logger.info("saved checkpoint %s", final)


def _tokenizer_source(cfg: Config) -> Optional[str]:
    """The run's tokenizer: model.tokenizer (set from the packs when unset), else init_from's."""
    if cfg.model.tokenizer:
        return cfg.model.tokenizer
    if cfg.checkpoint.init_from:  # a SAVE_DIR, or one of its iter_* directories
        for root in (cfg.checkpoint.init_from, os.path.dirname(os.path.abspath(cfg.checkpoint.init_from))):
            if os.path.isdir(os.path.join(root, TOKENIZER_DIR)):
                return os.path.join(root, TOKENIZER_DIR)
    return None


def _keep_tokenizer(cfg: Config) -> None:
    """Copy the tokenizer/processor files into SAVE_DIR/tokenizer once (atomically)."""
    from solo.hf_checkpoint import copy_tokenizer_files

    source, target = _tokenizer_source(cfg), os.path.join(cfg.checkpoint.save, TOKENIZER_DIR)
    if source is None or os.path.isdir(target) or os.path.abspath(source) == os.path.abspath(target):
        return
    staging = target + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)
    copy_tokenizer_files(source, staging)
    os.replace(staging, target)


def load_checkpoint(cfg: Config, ckpt_dir: str, model, optimizer, *, with_optimizer: bool, restore_rng: bool) -> dict:
    from megatron.core import dist_checkpointing, tensor_parallel

    common = dist_checkpointing.load_common_state_dict(ckpt_dir)
    saved, now = common.get("topology") or {}, _topology()
    same_topology = saved == now
    with_rng = restore_rng and same_topology
    # Checkpoints written before the format was recorded used the fully reshardable form.
    optimizer_format = common.get("optimizer_format", FULLY_RESHARDABLE)
    model_parallel_changed = (saved.get("tp"), saved.get("pp")) != (now["tp"], now["pp"])
    if (with_optimizer and optimizer_format == DP_RESHARDABLE and model_parallel_changed
            and optimizer.config.use_distributed_optimizer):
        raise ConfigError(
            f"{ckpt_dir} holds the distributed optimizer in the {DP_RESHARDABLE} format, which loads "
            f"only at the TP/PP it was saved with (TP={saved.get('tp')} PP={saved.get('pp')}; now "
            f"TP={now['tp']} PP={now['pp']}). Resume once at the saved TP/PP with "
            f"checkpoint.fully_reshardable=true (its next save then loads at any TP/PP), or start a new "
            f"checkpoint.save from its weights alone (checkpoint.init_from=THIS_DIR, "
            f"checkpoint.init_load_optimizer=false)."
        )
    state = _sharded_state(model, optimizer, is_loading=True, with_optimizer=with_optimizer, with_rng=with_rng,
                           optimizer_format=optimizer_format)
    loaded = dist_checkpointing.load(state, ckpt_dir, sharded_strategy=_load_strategy(ckpt_dir))
    unwrap(model).load_state_dict(loaded["model"])
    if with_optimizer:
        optimizer.load_state_dict(loaded["optimizer"])
    else:
        # Mixed precision keeps fp32 main copies made from the random init when the optimizer was
        # built; without this, the first optimizer step would copy them back over the loaded weights.
        optimizer.reload_model_params()
    if with_rng:
        rng = loaded["rng_state"]
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(rng["tracker"])
    return common


# The LR/WD schedule's shape as megatron-core's OptimizerParamScheduler records it (steps in samples).
SCHEDULE_KEYS = ("max_lr", "min_lr", "lr_warmup_steps", "lr_decay_steps", "lr_decay_style",
                 "start_wd", "end_wd", "wd_incr_steps", "wd_incr_style")


def restore_schedule(cfg: Config, scheduler, saved: Dict[str, Any]) -> Optional[str]:
    """Put the checkpoint's schedule (shape and position) into `scheduler`.

    Returns a warning when the recipe now describes another schedule (e.g. a changed
    training.train_iters, which would otherwise re-stretch the cosine and jump the LR), else None.
    """
    current = scheduler.state_dict()
    changed = {key: (saved[key], current[key]) for key in SCHEDULE_KEYS if saved.get(key) != current[key]}
    # megatron-core's own switch: take every schedule value from the checkpoint.
    scheduler.override_opt_param_scheduler, scheduler.use_checkpoint_opt_param_scheduler = False, True
    scheduler.num_steps = 0  # load_state_dict advances by the saved count
    scheduler.load_state_dict(saved)
    scheduler.step(increment=0)
    if not changed:
        return None
    gbs = cfg.data.global_batch_size
    described = ", ".join(
        f"{key}={old / gbs:g} iterations (recipe now {new / gbs:g})" if key.endswith("_steps")
        else f"{key}={old} (recipe now {new})"
        for key, (old, new) in changed.items()
    )
    return (
        f"resuming {cfg.checkpoint.save} keeps the schedule this run started with: {described}. To restart "
        f"the schedule on purpose, start a new stage from it: checkpoint.init_from={cfg.checkpoint.save} "
        "checkpoint.save=NEW_DIR (add checkpoint.init_load_optimizer=true to keep the optimizer state)"
    )


def check_init_from(cfg: Config) -> None:
    """Before building the model: refuse an init_from that is a Hugging Face directory, or whose
    model config differs from the recipe's (the first differing field is named)."""
    src = cfg.checkpoint.init_from
    if not src or read_latest(cfg.checkpoint.save) is not None:
        return
    if os.path.isfile(os.path.join(src, "config.json")) and any(n.endswith(".safetensors") for n in os.listdir(src)):
        raise ConfigError(
            f"checkpoint.init_from={src} is a Hugging Face checkpoint; convert it first with "
            f"`solo convert hf-to-mcore --hf {src} --out DIR` and set checkpoint.init_from=DIR"
        )
    try:
        ckpt_dir = resolve_checkpoint_dir(src)
    except CheckpointError as error:
        raise ConfigError(f"checkpoint.init_from: {error}") from error
    from megatron.core import dist_checkpointing

    saved = (dist_checkpointing.load_common_state_dict(ckpt_dir).get("config") or {}).get("model") or {}
    saved = {**ARCH_DEFAULTS, **saved} if saved else saved
    for field in ARCH_FIELDS:
        ours, theirs = getattr(cfg.model, field), saved.get(field)
        if field not in saved or (field == "vocab_size" and ours is None):
            continue
        numbers = isinstance(ours, (int, float)) and isinstance(theirs, (int, float))
        if not (math.isclose(ours, theirs, rel_tol=1e-9) if numbers else ours == theirs):
            raise ConfigError(
                f"model.{field}={ours} but the checkpoint.init_from checkpoint {ckpt_dir} has {field}={theirs}; "
                f"set model.{field}={theirs} (or start from a checkpoint of this architecture)"
            )


def load_init_weights(model, ckpt_dir: str) -> None:
    """Model weights only, at any TP/PP. Vocabulary tensors whose padded row count differs from
    the checkpoint's (another TP or divisor) are read whole and re-padded with zero rows; extra
    states a converted checkpoint does not carry are left at their defaults."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    reader = CheckpointReader(ckpt_dir)
    object_keys = {name.split("/shard_")[0] for name in reader.metadata if "/shard_" in name}
    inner = unwrap(model)
    request, repad = {}, {}
    for name, item in inner.sharded_state_dict().items():
        key = getattr(item, "key", None)
        if isinstance(item, ShardedObject) and key not in object_keys:
            continue
        if key in VOCAB_KEYS and reader.shape(key) is not None and reader.shape(key)[0] != item.global_shape[0]:
            repad[name] = item
            continue
        request[name] = item
    loaded = dist_checkpointing.load(request, ckpt_dir)
    state = {name: loaded[name] for name in request}  # load() also returns the common state
    for name, item in repad.items():
        full = reader.read(item.key)
        start, count = item.global_offset[0], item.local_shape[0]
        local = torch.zeros(item.local_shape, dtype=item.data.dtype)
        rows = max(0, min(count, full.shape[0] - start))
        local[:rows] = full[start:start + rows]
        state[name] = local.to(item.data.device)
    missing, unexpected = inner.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"{ckpt_dir}: weights missing {missing[:3]}, unexpected {unexpected[:3]}")


def restore(cfg: Config, model, optimizer, scheduler) -> tuple[int, int, Optional[int]]:
    """Resume from checkpoint.save, else start from checkpoint.init_from (schedule reset), else
    from the initialisation. Returns (iteration, consumed_samples, latest saved iteration)."""
    rank = dist.get_rank()
    latest = find_resume_checkpoint(cfg.checkpoint.save)
    if latest is not None:
        common = load_checkpoint(
            cfg, iteration_dir(cfg.checkpoint.save, latest), model, optimizer, with_optimizer=True, restore_rng=True
        )
        warning = restore_schedule(cfg, scheduler, common["scheduler"])
        if rank == 0 and warning:
            logger.warning(warning)
        if rank == 0:
            logger.info("resumed from %s at iteration %d (%d samples)", cfg.checkpoint.save,
                        common["iteration"], common["consumed_samples"])
        return common["iteration"], common["consumed_samples"], latest
    if cfg.checkpoint.init_from:
        found = None
        if rank == 0:
            try:
                found = (resolve_checkpoint_dir(cfg.checkpoint.init_from), None)
            except CheckpointError as exc:
                found = (None, f"checkpoint.init_from: {exc}")
        src, error = _agree(found)
        if error:
            raise CheckpointError(error)
        if cfg.checkpoint.init_load_optimizer:
            load_checkpoint(cfg, src, model, optimizer, with_optimizer=True, restore_rng=False)
        else:
            load_init_weights(model, src)
            optimizer.reload_model_params()  # see load_checkpoint
        if rank == 0:
            logger.info("initialised from %s (schedule reset, optimizer %s)", src,
                        "kept" if cfg.checkpoint.init_load_optimizer else "reset")
    scheduler.step(increment=0)
    return 0, 0, None
