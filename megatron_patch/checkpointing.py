"""Pretraining checkpoints: megatron-core ``torch_dist`` dist-checkpoints (reshardable), written
atomically (``iter_N.tmp`` renamed into place, then ``latest`` pointed at it), the last N kept.

Resume (``restore``) loads model, optimizer, schedule, RNG and data position from
``checkpoint.save``; a new stage starts from ``checkpoint.init_from`` with its schedule reset.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

from megatron_patch.config import Config
# Directory naming, the 'latest' pointer, atomic publication and pruning are shared with SFT.
from solo.checkpoints import (  # noqa: F401  (names kept importable from here)
    CKPT_PREFIX,
    LATEST_FILE,
    iteration_dir as _iter_dir,
    prepare_tmp_dir,
    prune_checkpoints as _prune_checkpoints,
    publish_checkpoint,
    read_latest,
)

logger = logging.getLogger("megatron_patch.checkpointing")


def unwrap(model):
    inner = model.module
    return getattr(inner, "module", inner)  # Float16Module


# ----------------------------------------------------------------------------------------------
# Checkpoints: torch_dist (reshardable), atomic "latest", keep-last-N
# ----------------------------------------------------------------------------------------------


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
    tmp = _iter_dir(save, iteration) + ".tmp"
    rank = dist.get_rank()
    if rank == 0:
        prepare_tmp_dir(save, iteration)
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
        final = publish_checkpoint(save, iteration, cfg.checkpoint.keep_last)
        logger.info("saved checkpoint %s", final)
    dist.barrier()


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
        load_checkpoint(cfg, src, model, optimizer, with_optimizer=cfg.checkpoint.init_load_optimizer,
                        restore_rng=False)
        if rank == 0:
            logger.info("initialised from %s (schedule reset, optimizer %s)", src,
                        "kept" if cfg.checkpoint.init_load_optimizer else "reset")
    scheduler.step(increment=0)
    return 0, 0, None

