"""Typed training configuration, loaded from a YAML recipe plus dotted ``key=value`` overrides.

Every recipe in ``megatron_patch/recipes/`` must load through :func:`load_config`: unknown keys,
wrong types, values outside a field's ``Literal`` choices and inconsistent sizes are rejected at
start-up with a message naming the key. Beside the model config: the fields that define the
architecture (:data:`ARCH_FIELDS`, what a checkpoint carries) and the padded vocabulary size.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, get_args

from solo.recipe import ConfigError, check_choices, load_recipe

# auto: te on a GPU with Transformer Engine, else flex (PyTorch flex_attention) on a GPU, else local (CPU).
Backend = Literal["auto", "te", "flex", "local"]
BACKENDS = get_args(Backend)


def native_backend_message(image_attention: str, vision_positions: str) -> str:
    """Why Transformer Engine cannot run the native-VLM switches, and what to use instead."""
    return (
        f"model.image_attention={image_attention} / model.vision_positions={vision_positions} need "
        "model.backend=flex (GPU, PyTorch flex_attention) or local (CPU): Transformer Engine's packed THD "
        "attention is causal per document with sequential RoPE and cannot express image blocks or 2-D positions"
    )


@dataclass
class ModelConfig:
    """Mistral/Llama-style decoder; defaults are Mistral-7B's."""

    num_layers: int = 32
    hidden_size: int = 4096
    ffn_hidden_size: int = 14336
    num_attention_heads: int = 32
    num_query_groups: int = 8
    # Derived from the tokenizer (model.tokenizer, else the one the packed data was made with);
    # set explicitly only for the synthetic task.
    vocab_size: Optional[int] = None
    tokenizer: Optional[str] = None
    make_vocab_size_divisible_by: int = 128
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    sliding_window: Optional[int] = 4096  # SOLO-7B semantics: a token sees itself + 4096 earlier ones
    init_method_std: float = 0.02
    # Dropout probabilities (Mistral and SOLO train without: 0). Resume restores the RNG, so a run
    # with dropout continues bitwise.
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    backend: Backend = "auto"
    # Native-VLM switches; SOLO's are the defaults. solo/hf/native_vision.py has the exact rules and
    # the choices (validate checks them there: that file ships with exported models, imports no config).
    # Either non-default needs backend flex (GPU) or local (CPU): Transformer Engine cannot express them.
    image_attention: str = "causal"  # or bidirectional (an image block's tokens see each other)
    vision_positions: str = "sequential"  # or 2d (rotary row/column sections for patches)


# ModelConfig fields that define the architecture (what the checkpoint carries and training checks).
ARCH_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
               "vocab_size", "rope_theta", "rms_norm_eps", "sliding_window", "image_attention", "vision_positions")
# Architecture fields added later, with the value a checkpoint that lacks them was trained with (SOLO's).
ARCH_DEFAULTS = {field: getattr(ModelConfig, field) for field in ("image_attention", "vision_positions")}


def padded_vocab_size(vocab_size: int, divisible_by: int, tp_size: int = 1) -> int:
    """Embedding rows: the tokenizer's vocab rounded up so every TP shard is equal and aligned."""
    multiple = divisible_by * tp_size
    return ((vocab_size + multiple - 1) // multiple) * multiple


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    sequence_parallel: bool = False  # shard norms/dropout activations over TP (te backend, TP > 1)
    # Overlap the gradient reduce-scatter with backward / the parameter all-gather with the next
    # forward (megatron-core DDP; the all-gather overlap needs the distributed optimizer).
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False


@dataclass
class DataConfig:
    # A packed directory, a mixture YAML (blend), or "synthetic" (the debug image task).
    path: str = "synthetic"
    seq_length: int = 32768
    micro_batch_size: int = 1
    global_batch_size: int = 128
    pad_token_id: Optional[int] = None  # required unless model.tokenizer gives one
    seed: int = 1234
    num_workers: int = 0
    cache_dir: Optional[str] = None  # megatron-core dataset index cache; default SAVE/data_cache
    synthetic_samples: int = 4096
    synthetic_classes: int = 4


@dataclass
class OptimizerConfig:
    lr: float = 5e-5
    min_lr: float = 5e-6
    warmup_iters: int = 200
    decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    lr_decay_iters: Optional[int] = None  # default: training.train_iters
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = True  # GPU only; CPU falls back (see megatron_patch.train)


@dataclass
class TrainingConfig:
    # Exactly one of: iterations, or a token budget (non-pad tokens) from which the iterations
    # are computed at start-up from the packs' recorded lengths (as `solo-data plan --tokens`).
    train_iters: Optional[int] = None
    train_tokens: Optional[float] = None
    seed: int = 1234
    bf16: bool = True
    recompute: Literal["none", "selective", "full"] = "full"
    # full only: uniform = checkpoint every group of recompute_num_layers layers (all layers
    # recomputed); block = recompute only the first recompute_num_layers layers of each pipeline
    # stage and keep the rest's activations (faster, more memory: see bench/memory_plan.py).
    recompute_method: Literal["uniform", "block"] = "uniform"
    recompute_num_layers: int = 1
    log_interval: int = 1
    on_nonfinite: Literal["stop", "skip"] = "stop"
    exit_after_iters: Optional[int] = None  # stop (with a save) after this many iterations this run
    # Testing hooks: make the loss of this global step non-finite / sleep per step (SIGTERM tests).
    inject_nan_at_step: Optional[int] = None
    step_sleep_s: float = 0.0


@dataclass
class CheckpointConfig:
    save: Optional[str] = None  # SAVE_DIR: checkpoints, metrics.jsonl; resume from here if present
    save_interval: int = 100
    keep_last: int = 3
    # Start a new stage from a previous stage's checkpoint (a SAVE_DIR or an iter_* dir). Used only
    # when `save` holds no checkpoint yet. The schedule (iteration, LR, consumed samples) restarts.
    init_from: Optional[str] = None
    init_load_optimizer: bool = False  # keep the previous stage's optimizer state (else reset)
    sigterm_save: bool = True
    # Distributed optimizer format: false = dp_reshardable (each DP rank writes/reads its own shard;
    # loads at any DP but only at the saved TP/PP), true = fully_reshardable (gathers the fp32 state
    # per TP shard on one rank; loads at any TP/PP): set it for the save before a TP/PP change.
    fully_reshardable: bool = False
    async_save: bool = True  # write checkpoints in the background (GPU; synchronous on CPU)


@dataclass
class LoggingConfig:
    tensorboard: bool = False
    wandb_project: Optional[str] = None
    flops_peak_tflops: Optional[float] = None  # per GPU; for MFU (default: bf16 dense of the GPU)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def validate(cfg: Config) -> None:
    """Cross-field checks; raise ConfigError naming the keys to fix."""
    m, p, d, t, o = cfg.model, cfg.parallel, cfg.data, cfg.training, cfg.optimizer
    check_choices(cfg)
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError("model.hidden_size must be divisible by model.num_attention_heads")
    if m.num_attention_heads % m.num_query_groups:
        raise ConfigError("model.num_attention_heads must be divisible by model.num_query_groups")
    if m.num_query_groups % p.tensor_model_parallel_size:
        raise ConfigError(
            f"parallel.tensor_model_parallel_size={p.tensor_model_parallel_size} must divide "
            f"model.num_query_groups={m.num_query_groups}"
        )
    if m.num_layers % p.pipeline_model_parallel_size:
        raise ConfigError("parallel.pipeline_model_parallel_size must divide model.num_layers")
    if p.context_parallel_size != 1:
        raise ConfigError(
            f"parallel.context_parallel_size={p.context_parallel_size}: context parallelism is not supported yet "
            "(packed THD rows would need per-rank partitioning and 2*CP-aligned documents); use 1 and scale "
            "with tensor/pipeline/data parallelism"
        )
    if (m.image_attention, m.vision_positions) != (ModelConfig.image_attention, ModelConfig.vision_positions):
        from solo.hf.native_vision import check_switches  # the choices, declared once (imports torch)

        try:
            check_switches(m.image_attention, m.vision_positions, where="model.")
        except ValueError as error:
            raise ConfigError(str(error)) from error
        if m.backend == "te":
            raise ConfigError(native_backend_message(m.image_attention, m.vision_positions))
    if p.overlap_param_gather and not o.use_distributed_optimizer:
        raise ConfigError("parallel.overlap_param_gather needs optimizer.use_distributed_optimizer=true")
    if (t.train_iters is None) == (t.train_tokens is None):
        raise ConfigError("set exactly one of training.train_iters and training.train_tokens")
    if t.train_tokens is not None and d.path == "synthetic":
        raise ConfigError("training.train_tokens needs packed data (their recorded lengths); "
                          "data.path=synthetic takes training.train_iters")
    layers_per_stage = m.num_layers // p.pipeline_model_parallel_size
    if t.recompute == "full" and not 1 <= t.recompute_num_layers <= layers_per_stage:
        raise ConfigError(f"training.recompute_num_layers={t.recompute_num_layers} must be between 1 and the "
                          f"layers per pipeline stage ({layers_per_stage})")
    if o.lr_decay_iters is not None and o.lr_decay_iters <= o.warmup_iters:
        raise ConfigError("optimizer.lr_decay_iters must exceed optimizer.warmup_iters")
    if o.min_lr > o.lr:
        raise ConfigError("optimizer.min_lr must not exceed optimizer.lr")
    if d.global_batch_size % d.micro_batch_size:
        raise ConfigError("data.global_batch_size must be a multiple of data.micro_batch_size")
    if d.path == "synthetic" and (d.pad_token_id is None or m.vocab_size is None):
        raise ConfigError("data.path=synthetic needs data.pad_token_id and model.vocab_size")
    # For packed data the tokenizer (vocab size, pad id) defaults to the one the packs were made with.
    for key in ("hidden_dropout", "attention_dropout"):
        if not 0.0 <= getattr(m, key) < 1.0:
            raise ConfigError(f"model.{key} must be in [0, 1); got {getattr(m, key)}")
    if m.sliding_window is not None and m.sliding_window < 1:
        raise ConfigError("model.sliding_window must be >= 1 or null")
    if cfg.checkpoint.keep_last < 1:
        raise ConfigError("checkpoint.keep_last must be >= 1")


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML recipe, apply ``section.key=value`` overrides (values parsed as YAML), validate."""
    cfg = load_recipe(Config, path, overrides)
    # A relative data.path that names a file next to the recipe (e.g. mixtures/stage1.yaml) is
    # resolved there; otherwise relative paths are relative to the working directory.
    beside = Path(path).resolve().parent / cfg.data.path
    if not os.path.isabs(cfg.data.path) and not os.path.exists(cfg.data.path) and beside.exists():
        cfg.data.path = str(beside)
    validate(cfg)
    return cfg
