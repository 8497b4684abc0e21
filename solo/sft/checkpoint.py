"""SFT checkpoints: Accelerate's `save_state` (model, optimizer, RNG of every rank; DeepSpeed's own
sharded format under ZeRO) plus `trainer_state.json` (step, data plan), written into `iter_N.tmp`
and published atomically with the shared bookkeeping of `solo.checkpoints` (``latest``, keep-last-N).
"""

from __future__ import annotations

import json
import os

from solo.checkpoints import iteration_dir, prepare_tmp_dir, publish_checkpoint
from solo.outputs import write_json_atomic

STATE_FILE = "trainer_state.json"


def _plan_fields(plan) -> dict:
    return {"num_packs": plan.num_packs, "packs_per_step": plan.packs_per_step, "epochs": plan.epochs,
            "seed": plan.seed, "world_size": plan.world_size}


def save(accelerator, cfg, step: int, plan) -> str:
    """Write checkpoint `step` (every rank takes part); returns its final directory."""
    save_dir = cfg.checkpoint.save
    tmp = iteration_dir(save_dir, step) + ".tmp"
    if accelerator.is_main_process:
        prepare_tmp_dir(save_dir, step)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp, safe_serialization=True)
    accelerator.wait_for_everyone()
    final = iteration_dir(save_dir, step)
    if accelerator.is_main_process:
        write_json_atomic(os.path.join(tmp, STATE_FILE), {"step": step, "plan": _plan_fields(plan),
                                                          "config": cfg.to_dict()})
        publish_checkpoint(save_dir, step, cfg.checkpoint.keep_last)
    accelerator.wait_for_everyone()
    return final


def load(accelerator, directory: str, plan) -> int:
    """Restore model, optimizer and RNG from `directory`; returns the step to continue after.

    The data plan must be the one the checkpoint was written with, or the data position would
    not mean the same samples.
    """
    with open(os.path.join(directory, STATE_FILE), encoding="utf-8") as fh:
        state = json.load(fh)
    saved, current = state["plan"], _plan_fields(plan)
    if saved != current:
        changed = ", ".join(f"{k}: {saved.get(k)} -> {v}" for k, v in current.items() if saved.get(k) != v)
        raise ValueError(f"cannot resume from {directory}: the data plan changed ({changed}); resume with the "
                         "same data, recipe and number of processes, or start a new run in another checkpoint.save")
    accelerator.load_state(directory)
    return int(state["step"])
