"""One metrics writer for every training stage: a ``metrics.jsonl`` line per step (pretraining and
SFT write the same format), plus optional TensorBoard / Weights & Biases mirrors. Only the main
process writes; on resume the records of steps after the checkpoint resumed from are dropped.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from solo.recipe import ConfigError

METRICS_FILE = "metrics.jsonl"


class MetricsWriter:
    def __init__(
        self,
        directory: Optional[str],
        *,
        is_main: bool,
        resumed_step: int = 0,
        tensorboard: bool = False,
        wandb_project: Optional[str] = None,
        run_config: Optional[dict[str, Any]] = None,
        world_size: Optional[int] = None,
    ):
        # Recorded in every line when given: a run that silently fell back to one process shows it.
        self.world_size = world_size
        self.path = self.tb = self.wandb = None
        if not is_main:
            return
        if directory:
            os.makedirs(directory, exist_ok=True)
            self.path = os.path.join(directory, METRICS_FILE)
            if os.path.exists(self.path):  # drop records of steps after the checkpoint resumed from
                with open(self.path, encoding="utf-8") as fh:
                    keep = [ln for ln in fh if ln.strip() and json.loads(ln)["step"] <= resumed_step]
                with open(self.path, "w", encoding="utf-8") as fh:
                    fh.writelines(keep)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError as exc:
                    raise ConfigError("logging.tensorboard=true needs the tensorboard package: "
                                      "pip install tensorboard (or set logging.tensorboard=false)") from exc
                self.tb = SummaryWriter(os.path.join(directory, "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError as exc:
                raise ConfigError("logging.wandb_project needs the wandb package: pip install wandb") from exc
            self.wandb = wandb.init(project=wandb_project, config=run_config or {}, resume="allow")

    def write(self, record: dict[str, Any]) -> None:
        """Append one step's record (it must have ``step``)."""
        if self.world_size is not None:
            record = {**record, "world_size": self.world_size}
        if self.path:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, record["step"])
        if self.wandb:
            self.wandb.log(scalars, step=record["step"])


def read_metrics(directory: str) -> list[dict[str, Any]]:
    """The records of ``directory/metrics.jsonl`` (empty when there is none)."""
    path = os.path.join(directory, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
