"""SFT checkpoints: Accelerate's `save_state` (model, optimizer, RNG of every rank; DeepSpeed's own
sharded format under ZeRO) plus `trainer_state.json` (step, data plan), written into `iter_N.tmp`
and published atomically with the shared bookkeeping of `solo.checkpoints` (``latest``, keep-last-N,
the completeness marker with every file's checksum). Resume takes the newest checkpoint that
verifies; a newer one that does not is skipped with a warning naming it and why.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from solo.checkpoints import (
    iteration_dir,
    newest_valid,
    nothing_to_resume,
    prepare_tmp_dir,
    publish_checkpoint,
    verify_complete_marker,
    write_complete_marker,
)
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
        write_complete_marker(tmp)
        publish_checkpoint(save_dir, step, cfg.checkpoint.keep_last)
    accelerator.wait_for_everyone()
    return final


def _read_state(directory: str) -> dict:
    with open(os.path.join(directory, STATE_FILE), encoding="utf-8") as fh:
        return json.load(fh)


def verify(directory: str) -> Optional[str]:
    """Why the SFT checkpoint ``directory`` cannot be resumed from, or None if it verifies."""
    reason = verify_complete_marker(directory)
    if reason is not None:
        return reason
    try:
        state = _read_state(directory)
        int(state["step"]), dict(state["plan"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"its {STATE_FILE} is unreadable ({type(error).__name__}: {error})"
    return None


def find_resume(save: str) -> tuple[Optional[int], list[str]]:
    """The step of the newest verifying checkpoint in ``save`` (None: start fresh) and the ones
    skipped on the way; CheckpointError when checkpoints exist but none verifies."""
    step, skipped = newest_valid(save, verify)
    if step is None and skipped:
        raise nothing_to_resume(save, skipped)
    return step, skipped


def load(accelerator, directory: str, plan) -> int:
    """Restore model, optimizer and RNG from `directory`; returns the step to continue after.

    The data plan must be the one the checkpoint was written with, or the data position would
    not mean the same samples.
    """
    state = _read_state(directory)
    saved, current = state["plan"], _plan_fields(plan)
    if saved != current:
        changed = ", ".join(f"{k}: {saved.get(k)} -> {v}" for k, v in current.items() if saved.get(k) != v)
        raise ValueError(f"cannot resume from {directory}: the data plan changed ({changed}); resume with the "
                         "same data, recipe and number of processes, or start a new run in another checkpoint.save")
    accelerator.load_state(directory)
    return int(state["step"])
