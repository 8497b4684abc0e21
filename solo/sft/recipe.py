"""The SFT recipe: typed sections loaded by the shared `solo.recipe.load_recipe` (unknown keys and
wrong types are refused as in pretraining). `solo/sft/recipes/solo.yaml` holds SOLO's values.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional

from solo.recipe import ConfigError, check_choices, load_recipe

RECIPES_DIR = Path(__file__).parent / "recipes"


@dataclass
class ModelSection:
    path: str = ""  # a Hugging Face SOLO checkpoint (`solo create` output or a converted pretraining run)
    # flash_attention_2: GPU, varlen over the packed documents.
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    gradient_checkpointing: bool = False


@dataclass
class DataSection:
    path: str = ""  # instruction file(s) (comma-separated) or a directory packed by `solo-data pack --template mistral`
    format: Literal["llava", "sharegpt", "chat"] = "llava"  # of instruction files
    image_root: Optional[str] = None  # relative image paths resolve here (default: next to the file)
    max_length: int = 4096  # tokens per packed row
    workers: int = 1  # encoding workers of the preparation pass
    num_workers: int = 1  # DataLoader workers (image decoding) per rank


@dataclass
class TrainingSection:
    samples_per_step: int = 512  # target samples per optimizer step (the packs per step are derived)
    micro_batch_packs: int = 1  # packed rows per micro-batch per rank
    epochs: int = 1
    max_steps: Optional[int] = None  # cap on optimizer steps (the schedule still spans the full run)
    lr: float = 1e-5
    min_lr: float = 0.0
    warmup_steps: int = 50
    weight_decay: float = 0.1  # not on norms and biases
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # DeepSpeed: set gradient_clipping in its json to the same value
    seed: int = 42


@dataclass
class CheckpointSection:
    save: str = ""  # run directory: checkpoints (iter_*), metrics.jsonl, prepared data, final export (hf/)
    save_interval: int = 500  # optimizer steps
    keep_last: int = 2


@dataclass
class LoggingSection:
    log_interval: int = 1
    progress: bool = True
    tensorboard: bool = False
    wandb_project: Optional[str] = None


@dataclass
class SFTConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def to_dict(self) -> dict:
        return asdict(self)


def validate(cfg: SFTConfig) -> SFTConfig:
    """Check values the types cannot; each error names the key and what to do."""
    check_choices(cfg)
    if not cfg.model.path:
        raise ConfigError("model.path: set it to a Hugging Face SOLO checkpoint directory "
                          "(MODEL=... in launch/5_sft.sh)")
    if not os.path.isdir(cfg.model.path):
        raise ConfigError(f"model.path: {cfg.model.path} is not a directory")
    if not cfg.data.path:
        raise ConfigError("data.path: set it to an instruction file or a packed directory (DATA=...)")
    if not cfg.checkpoint.save:
        raise ConfigError("checkpoint.save: set the run directory (SAVE=...)")
    positive = {"data.max_length": cfg.data.max_length, "training.samples_per_step": cfg.training.samples_per_step,
                "training.micro_batch_packs": cfg.training.micro_batch_packs, "training.epochs": cfg.training.epochs,
                "checkpoint.save_interval": cfg.checkpoint.save_interval,
                "checkpoint.keep_last": cfg.checkpoint.keep_last,
                "training.lr": cfg.training.lr, "data.workers": cfg.data.workers}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    if cfg.training.max_steps is not None and cfg.training.max_steps <= 0:
        raise ConfigError(f"training.max_steps must be positive (or null), got {cfg.training.max_steps}")
    if cfg.training.warmup_steps < 0 or cfg.training.min_lr < 0 or cfg.training.clip_grad < 0:
        raise ConfigError("training.warmup_steps, training.min_lr and training.clip_grad must be >= 0")
    return cfg


def load_sft_recipe(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> SFTConfig:
    """Load and validate a recipe; a bare name (``solo``, ``debug_cpu``) means one of the packaged recipes."""
    candidate = Path(path)
    if not candidate.is_file() and not candidate.suffix and (RECIPES_DIR / f"{path}.yaml").exists():
        candidate = RECIPES_DIR / f"{path}.yaml"
    return validate(load_recipe(SFTConfig, candidate, overrides))
