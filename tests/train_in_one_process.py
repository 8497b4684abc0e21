"""Several trainer runs one after another in ONE process:

    python tests/train_in_one_process.py '[["--config", RECIPE, "checkpoint.save=DIR", ...], ...]'

Each run is what `python -m megatron_patch.train ARGS` does (``megatron_patch.train.main``), minus the
process start: what a run compiles (flex attention, the SwiGLU and cross-entropy fusions) is compiled
once for all, which on a GPU is most of a short run's time. Between runs the model-parallel state is
torn down and each run's process group takes a free port of its own. Stops at the first run that
fails; prints ``RUN i rc=N`` after each and exits with the failing run's code.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def resume_sequence(root: Path, config: str, *overrides: str) -> dict:
    """The runs that check saving and resuming, by save directory: ``full`` trains 3 steps (saves at 2
    and 3); ``split`` trains 1 step and stops (a dp_reshardable save), resumes for 1 step saving
    fully_reshardable, then resumes to step 3. Steps 2 and 3 of ``split`` were taken right after a
    load of each format, so they equal ``full``'s only if model, optimizer, schedule, RNG and data
    position came back."""
    full, split = root / "full", root / "split"
    base = ["--config", config, *overrides, "training.train_iters=3", "checkpoint.save_interval=2"]
    return {
        "full": [base + [f"checkpoint.save={full}"]],
        "split": [base + [f"checkpoint.save={split}", "training.exit_after_iters=1"],
                  base + [f"checkpoint.save={split}", "training.exit_after_iters=1",
                          "checkpoint.fully_reshardable=true"],
                  base + [f"checkpoint.save={split}"]],
    }


def main(runs: list) -> int:
    from megatron.core import parallel_state

    from megatron_patch import train

    for i, argv in enumerate(runs):
        os.environ.pop("MASTER_PORT", None)  # init_distributed then picks a free one
        code = train.main(argv)
        parallel_state.destroy_model_parallel()
        print(f"RUN {i} rc={code}", flush=True)
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))
