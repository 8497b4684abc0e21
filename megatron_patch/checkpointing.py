"""Pretraining checkpoints: megatron-core ``torch_dist`` dist-checkpoints (reshardable), written
atomically (``iter_N.tmp`` renamed into place, then ``latest`` pointed at it), the last N kept.

Resume (``restore``) loads model, optimizer, schedule, RNG and data position from
``checkpoint.save``; a new stage starts from ``checkpoint.init_from`` with its schedule reset.
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

from megatron_patch.config import Config

logger = logging.getLogger("megatron_patch.checkpointing")

CKPT_PREFIX = "iter_"
LATEST_FILE = "latest_checkpointed_iteration.txt"
TOKENIZER_DIR = "tokenizer"


def unwrap(model):
    inner = model.module
    return getattr(inner, "module", inner)  # Float16Module


# ----------------------------------------------------------------------------------------------
# Checkpoints: torch_dist (reshardable), atomic "latest", keep-last-N
# ----------------------------------------------------------------------------------------------


def _iter_dir(save: str, iteration: int) -> str:
    return os.path.join(save, f"{CKPT_PREFIX}{iteration:07d}")


def read_latest(save: Optional[str]) -> Optional[int]:
    if not save:
        return None
    path = os.path.join(save, LATEST_FILE)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return int(fh.read().strip())


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


def _sharded_state(model, optimizer, *, is_loading: bool, with_optimizer: bool, with_rng: bool):
    model_sd = unwrap(model).sharded_state_dict()
    state: Dict[str, Any] = {"model": model_sd}
    if with_optimizer:
        # fully_reshardable: the distributed optimizer's state loads at any TP/PP/DP (GPU path).
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata={"distrib_optim_sharding_type": "fully_reshardable"}
        )
    if with_rng:
        state["rng_state"] = _rng_object(is_loading)
    return state


def save_checkpoint(cfg: Config, model, optimizer, scheduler, iteration: int, consumed: int) -> None:
    """Write iter_N atomically: into iter_N.tmp, rename, then point 'latest' at it."""
    from megatron.core import dist_checkpointing

    save = cfg.checkpoint.save
    final = _iter_dir(save, iteration)
    tmp = final + ".tmp"
    rank = dist.get_rank()
    if rank == 0:
        os.makedirs(save, exist_ok=True)
        for stale in (tmp, final):
            if os.path.exists(stale):
                shutil.rmtree(stale)
        os.makedirs(tmp)
    dist.barrier()
    state = _sharded_state(model, optimizer, is_loading=False, with_optimizer=True, with_rng=True)
    state.update(
        iteration=iteration,
        consumed_samples=consumed,
        scheduler=scheduler.state_dict(),
        topology=_topology(),
        config=cfg.to_dict(),
    )
    dist_checkpointing.save(state, tmp)
    dist.barrier()
    if rank == 0:
        os.replace(tmp, final)
        latest_tmp = os.path.join(save, LATEST_FILE + ".tmp")
        with open(latest_tmp, "w", encoding="utf-8") as fh:
            fh.write(str(iteration))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(latest_tmp, os.path.join(save, LATEST_FILE))
        _keep_tokenizer(cfg)
        _prune_checkpoints(save, cfg.checkpoint.keep_last)
        logger.info("saved checkpoint %s", final)
    dist.barrier()


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


def _prune_checkpoints(save: str, keep_last: int) -> None:
    iters = sorted(
        int(name[len(CKPT_PREFIX):])
        for name in os.listdir(save)
        if name.startswith(CKPT_PREFIX) and name[len(CKPT_PREFIX):].isdigit()
    )
    for old in iters[:-keep_last]:
        shutil.rmtree(_iter_dir(save, old), ignore_errors=True)
    for name in os.listdir(save):  # leftovers of a save that crashed
        if name.startswith(CKPT_PREFIX) and name.endswith(".tmp"):
            shutil.rmtree(os.path.join(save, name), ignore_errors=True)


def load_checkpoint(cfg: Config, ckpt_dir: str, model, optimizer, *, with_optimizer: bool, restore_rng: bool) -> dict:
    from megatron.core import dist_checkpointing, tensor_parallel

    common = dist_checkpointing.load_common_state_dict(ckpt_dir)
    same_topology = common.get("topology") == _topology()
    with_rng = restore_rng and same_topology
    state = _sharded_state(model, optimizer, is_loading=True, with_optimizer=with_optimizer, with_rng=with_rng)
    loaded = dist_checkpointing.load(state, ckpt_dir)
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


def resolve_checkpoint_dir(path: str) -> str:
    """A SAVE_DIR (follow its 'latest') or an iter_* directory."""
    latest = read_latest(path)
    if latest is not None:
        return _iter_dir(path, latest)
    if os.path.exists(os.path.join(path, "metadata.json")):
        return path
    raise FileNotFoundError(f"{path} is neither a SAVE_DIR with {LATEST_FILE} nor a checkpoint directory")



def check_init_from(cfg: Config) -> None:
    """Before building the model: refuse an init_from that is a Hugging Face directory, or whose
    model config differs from the recipe's (the first differing field is named)."""
    from megatron_patch.config import ConfigError

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
    except FileNotFoundError as error:
        raise ConfigError(f"checkpoint.init_from: {error}") from error
    from megatron.core import dist_checkpointing

    from megatron_patch.convert import ARCH_FIELDS

    saved = (dist_checkpointing.load_common_state_dict(ckpt_dir).get("config") or {}).get("model") or {}
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

    from megatron_patch.convert import CheckpointReader
    from megatron_patch.model.state_dict_mapping import VOCAB_KEYS

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
    latest = read_latest(cfg.checkpoint.save)
    if latest is not None:
        common = load_checkpoint(
            cfg, _iter_dir(cfg.checkpoint.save, latest), model, optimizer, with_optimizer=True, restore_rng=True
        )
        scheduler.num_steps = common["scheduler"]["num_steps"]
        scheduler.step(increment=0)
        if rank == 0:
            logger.info("resumed from %s at iteration %d (%d samples)", cfg.checkpoint.save,
                        common["iteration"], common["consumed_samples"])
        return common["iteration"], common["consumed_samples"], latest
    if cfg.checkpoint.init_from:
        src = resolve_checkpoint_dir(cfg.checkpoint.init_from)
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

