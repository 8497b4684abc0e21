"""SOLO pretraining on megatron-core primitives (the pip wheel has no ``megatron.training``).

    torchrun [torchrun args] -m megatron_patch.train --config RECIPE [section.key=value ...]

Resume = run the same command again: if ``checkpoint.save`` holds a checkpoint, model, optimizer,
LR schedule, RNG (same topology) and data position are restored and training continues with the
next unseen sample. A new stage starts from ``checkpoint.init_from`` (a previous stage's SAVE_DIR)
with its schedule reset and its optimizer state kept only if ``checkpoint.init_load_optimizer``.

Per step: one log line and one ``SAVE_DIR/metrics.jsonl`` record (step, loss, text/image losses,
lr, grad_norm, tokens_per_s, consumed_samples, sample_ids, mfu on GPU).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import sys
import time
from functools import partial
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_patch import compat
from megatron_patch.checkpointing import (
    AsyncSaves, SaveDirLock, check_init_from, restore, save_checkpoint, unwrap,
)
from megatron_patch.config import Config, ConfigError, load_config, padded_vocab_size
from megatron_patch.preflight import PreflightError, check_attention
from solo.checkpoints import CheckpointError
from solo.metrics import MetricsWriter
from solo.processes import GracefulStop, ignore_sigterm

logger = logging.getLogger("megatron_patch.train")

# Peak dense bf16 TFLOP/s per GPU, for MFU when logging.flops_peak_tflops is unset.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "B200": 2250.0}


# ----------------------------------------------------------------------------------------------
# Set-up
# ----------------------------------------------------------------------------------------------


def init_distributed(cfg: Config) -> None:
    from megatron.core import parallel_state, tensor_parallel

    if not dist.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:  # a process of its own (no launcher): any free port
            from solo.processes import free_local_port

            os.environ["MASTER_PORT"] = str(free_local_port())
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    p = cfg.parallel
    world = dist.get_world_size()
    model_parallel = p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
    if world % model_parallel:
        raise ConfigError(
            f"world size {world} is not divisible by TP*PP*CP = {model_parallel}; "
            "change NPROC/--nproc_per_node or the parallel sizes"
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        context_parallel_size=p.context_parallel_size,
    )
    dp = parallel_state.get_data_parallel_world_size()
    if cfg.data.global_batch_size % (cfg.data.micro_batch_size * dp):
        raise ConfigError(
            f"data.global_batch_size={cfg.data.global_batch_size} must be a multiple of "
            f"data.micro_batch_size*DP = {cfg.data.micro_batch_size}*{dp}"
        )
    # Host RNGs too (as Megatron-LM does): on GPU megatron-core seeds only the CUDA generators.
    random.seed(cfg.training.seed)
    np.random.seed(cfg.training.seed)
    torch.manual_seed(cfg.training.seed)
    tensor_parallel.model_parallel_cuda_manual_seed(cfg.training.seed)


def resolve_tokenizer_fields(cfg: Config) -> None:
    """vocab_size and pad id come from the tokenizer (never hard-coded): model.tokenizer if set,
    else the tokenizer the packed data was made with (all blended directories must agree)."""
    from megatron_patch.data import open_reader, packed_directories

    try:
        readers = [open_reader(p, None) for p in packed_directories(cfg.data.path)]
    except (OSError, ValueError) as exc:  # a missing path, a broken mixture YAML: the user's to fix
        raise ConfigError(f"data.path: {exc}") from None
    for reader in readers:
        if reader.seq_length > cfg.data.seq_length:
            raise ConfigError(
                f"{reader.directory} was packed to {reader.seq_length} tokens, more than "
                f"data.seq_length={cfg.data.seq_length}; repack or raise data.seq_length"
            )
    digests = {r.tokenizer_info.get("digest") for r in readers}
    if len(digests) > 1:
        raise ConfigError(f"the blended packed directories were made with different tokenizers: "
                          f"{[r.tokenizer_dir for r in readers]}")
    if cfg.model.tokenizer:
        from transformers import AutoTokenizer

        tokenizer_dir, tok = cfg.model.tokenizer, AutoTokenizer.from_pretrained(cfg.model.tokenizer)
    elif readers:  # the copy inside the packed directory, checked against its recorded digest
        tokenizer_dir, tok = readers[0].tokenizer_dir, readers[0].load_tokenizer()
    else:
        if cfg.model.vocab_size is None:
            raise ConfigError("no tokenizer to size the vocabulary: set model.tokenizer (or model.vocab_size)")
        return
    cfg.model.tokenizer = tokenizer_dir  # kept beside the checkpoints (checkpointing._keep_tokenizer)
    cfg.model.vocab_size = len(tok)
    if cfg.data.pad_token_id is None:
        if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
            raise ConfigError(
                f"tokenizer {tokenizer_dir} has no pad token distinct from EOS (SOLO's pad=EOS "
                "meant EOS was never learned); extend it or set data.pad_token_id"
            )
        cfg.data.pad_token_id = tok.pad_token_id


def build_model(cfg: Config):
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_patch.model import SoloGPTModel, build_transformer_config, solo_layer_spec
    from megatron_patch.model.layer_specs import resolve_backend

    if cfg.parallel.sequence_parallel and resolve_backend(cfg.model.backend) != "te":
        raise ConfigError("parallel.sequence_parallel=true needs the Transformer Engine backend "
                          "(megatron-core's torch norms refuse it); set it to false on CPU")
    tconfig = build_transformer_config(cfg.model, cfg.parallel, cfg.training)
    vocab = padded_vocab_size(
        cfg.model.vocab_size, cfg.model.make_vocab_size_divisible_by, cfg.parallel.tensor_model_parallel_size
    )
    model = SoloGPTModel(
        config=tconfig,
        transformer_layer_spec=solo_layer_spec(cfg.model.backend),
        vocab_size=vocab,
        max_sequence_length=cfg.data.seq_length,
        rotary_base=cfg.model.rope_theta,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        real_vocab_size=cfg.model.vocab_size,
        image_attention=cfg.model.image_attention,
        vision_positions=cfg.model.vision_positions,
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if cfg.training.bf16:
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(tconfig, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        overlap_param_gather=cfg.parallel.overlap_param_gather and use_distributed_optimizer(cfg),
        use_distributed_optimizer=use_distributed_optimizer(cfg),
    )
    model = DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=model)
    return model, tconfig


def use_distributed_optimizer(cfg: Config) -> bool:
    """CPU fallback, in one place: megatron's distributed optimizer refuses CPU tensors, so on CPU
    the (non-distributed) megatron optimizer runs, with compat's CPU grad clipping."""
    return cfg.optimizer.use_distributed_optimizer and torch.cuda.is_available()


def build_optimizer(cfg: Config, model):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o = cfg.optimizer
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=cfg.training.bf16,
        params_dtype=torch.bfloat16 if cfg.training.bf16 else torch.float32,
        use_distributed_optimizer=use_distributed_optimizer(cfg),
        overlap_param_gather=model.ddp_config.overlap_param_gather,
    )
    optimizer = get_megatron_optimizer(opt_config, [model])
    # Short (debug/test) runs may end inside the warm-up; megatron-core needs decay > warm-up.
    decay_iters = max(o.lr_decay_iters or cfg.training.train_iters, o.warmup_iters + 1)
    gbs = cfg.data.global_batch_size
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_iters * gbs,
        lr_decay_steps=decay_iters * gbs,
        lr_decay_style=o.decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=decay_iters * gbs,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )
    return optimizer, scheduler


# ----------------------------------------------------------------------------------------------
# Forward step and loss
# ----------------------------------------------------------------------------------------------


def loss_func(loss_mask: torch.Tensor, image_doc: torch.Tensor, nan: bool, output_tensor: torch.Tensor):
    """Sum of token losses on the loss mask, and the token count (megatron-core's per-token mode:
    the schedules sum counts over micro-batches and finalize_model_grads over DP ranks, then scale
    gradients by 1/count). A micro-batch without loss tokens returns 0 and 0, never NaN."""
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.reshape(-1).float()
    if nan:
        losses = losses * float("nan")
    total = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    img = image_doc.reshape(-1).float() * mask
    txt = mask - img
    detached = losses.detach()
    report = torch.stack(
        [total.detach(), mask.sum(), (detached * img).sum(), img.sum(), (detached * txt).sum(), txt.sum()]
    )
    return total, num_tokens, {"report": report}


def forward_step(state: dict, data_iterator: Iterator, model):
    batch = next(data_iterator)
    state["batches"].append(batch)
    output = run_model(model, batch, _device())
    to = partial(torch.Tensor.to, device=_device(), non_blocking=True)
    return output, partial(loss_func, to(batch["loss_mask"]), to(batch["image_doc"]), state["nan"])


def run_model(model, batch: Dict[str, Any], device: torch.device, labels: bool = True):
    """The model on one collated micro-batch (``data.collate_packed``): per-token losses against its
    labels, or with ``labels=False`` the logits."""
    from megatron_patch.data import packed_seq_params

    # Pinned host memory (the loader's pin_memory on GPU) makes these copies asynchronous.
    to = partial(torch.Tensor.to, device=device, non_blocking=True)
    psp = packed_seq_params(batch)
    psp.cu_seqlens_q = psp.cu_seqlens_kv = to(batch["cu_seqlens"])
    return model(
        input_ids=to(batch["tokens"]),
        position_ids=None,
        attention_mask=None,
        labels=to(batch["labels"]) if labels else None,
        packed_seq_params=psp,
        patches=to(batch["patches"]),
        vision_patch_indices=to(batch["vision_patch_indices"]),
        patch_positions=to(batch["patch_positions"]),
        image_layout=to(batch["image_layout"]),
    )


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------


def count_parameters(model, exclude: Optional[str] = None) -> int:
    """Parameters summed over TP and PP ranks (one model replica), optionally skipping names."""
    from megatron.core import parallel_state as ps

    local = sum(p.numel() for n, p in unwrap(model).named_parameters() if not (exclude and exclude in n))
    t = torch.tensor([local], dtype=torch.float64, device=_device())
    dist.all_reduce(t, group=ps.get_model_parallel_group())
    return int(t.item())


def attention_pairs(doc_lengths, window: Optional[int]) -> float:
    """Query-key pairs that causal attention computes over documents of these lengths, each query
    seeing itself and at most ``window`` earlier keys of its own document (None: all of them)."""
    n = np.asarray(doc_lengths, dtype=np.float64)
    span = n if window is None else np.minimum(n, window + 1)  # keys of the queries past the first span
    return float((span * (span + 1) / 2 + (n - span) * span).sum())


def step_flops(cfg: Config, n_matmul_params: int, n_projection_params: int, tokens: int, patches: int,
               pairs: float) -> float:
    """Megatron convention, forward + backward = 3 x forward: 2 FLOPs per weight per token (the patch
    projection's per patch), and per layer 2·2·h per query-key pair (QKᵀ and PV; ``attention_pairs``)."""
    m = cfg.model
    attention = 12.0 * m.num_layers * m.hidden_size * pairs
    return 6.0 * (n_matmul_params * tokens + n_projection_params * patches) + attention


def peak_flops_per_device(cfg: Config) -> Optional[float]:
    if not torch.cuda.is_available():
        return None
    if cfg.logging.flops_peak_tflops:
        return cfg.logging.flops_peak_tflops * 1e12
    name = torch.cuda.get_device_name()
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


# ----------------------------------------------------------------------------------------------
# Loop
# ----------------------------------------------------------------------------------------------


def _grads_finite(model) -> bool:
    # A sum is non-finite iff some element is (or it overflows, which is as fatal), and unlike
    # isfinite(...).all() it needs no temporary the size of the whole gradient buffer.
    for buffer in list(model.buffers) + list(model.expert_parallel_buffers):
        if not torch.isfinite(buffer.grad_data.sum(dtype=torch.float32)):
            return False
    return True


def _device() -> torch.device:
    """Where collective-communication tensors live (NCCL needs CUDA tensors, gloo CPU ones)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def build_data_iterator(cfg: Config, consumed: int) -> Iterator:
    """This DP rank's micro-batches from sample ``consumed`` on. Within a tensor-parallel group only
    TP rank 0 reads and decodes them (the ranks need the same batch) and broadcasts; every pipeline
    stage reads its own."""
    from megatron.core import parallel_state as ps

    from megatron_patch.data import GlobalBatchSampler, build_train_dataset, collate_packed

    d = cfg.data
    cache_dir = d.cache_dir or (os.path.join(cfg.checkpoint.save, "data_cache") if cfg.checkpoint.save else None)
    dataset = build_train_dataset(
        d.path, max(cfg.training.train_iters * d.global_batch_size, 1), d.seq_length, d.pad_token_id, d.seed,
        cache_dir, synthetic_vocab_size=cfg.model.vocab_size, synthetic_num_packs=d.synthetic_samples,
        synthetic_num_classes=d.synthetic_classes,
    )
    loader = None
    if ps.get_tensor_model_parallel_rank() == 0:
        sampler = GlobalBatchSampler(len(dataset), consumed, d.micro_batch_size, ps.get_data_parallel_rank(),
                                     ps.get_data_parallel_world_size())
        # Its own generator: iter(loader) draws a base seed, which from the global RNG would shift the
        # dropout masks of a resumed run (the checkpoint's RNG state is restored before this runs).
        loader = iter(torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, collate_fn=collate_packed, num_workers=d.num_workers,
            persistent_workers=d.num_workers > 0, worker_init_fn=ignore_sigterm,
            pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(d.seed),
        ))
    if ps.get_tensor_model_parallel_world_size() == 1:
        return loader
    return broadcast_batches(loader)


def broadcast_batches(loader: Optional[Iterator]) -> Iterator[Dict[str, Any]]:
    """Micro-batches of TP rank 0's ``loader`` on every rank of its tensor-parallel group: a small
    header (keys, shapes, dtypes, plain values) then each tensor, broadcast on the device. The other
    ranks pass ``None`` and decode no images. Ends when TP rank 0's loader does."""
    from megatron.core import parallel_state as ps

    group, src = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_src_rank()
    device = _device()
    while True:
        header: List[Any] = [None]
        if loader is not None:
            batch = next(loader, None)
            if batch is not None:
                header[0] = (
                    {k: (tuple(v.shape), v.dtype) for k, v in batch.items() if isinstance(v, torch.Tensor)},
                    {k: v for k, v in batch.items() if not isinstance(v, torch.Tensor)},
                )
        dist.broadcast_object_list(header, src=src, group=group)
        if header[0] is None:
            return
        shapes, out = header[0]
        for key, (shape, dtype) in shapes.items():
            tensor = (batch[key].to(device, non_blocking=True) if loader is not None
                      else torch.empty(shape, dtype=dtype, device=device))
            if tensor.numel():
                dist.broadcast(tensor, src=src, group=group)
            out[key] = tensor
        yield out


def global_loss_report(reports: list) -> torch.Tensor:
    """[loss sum, tokens, image-doc loss sum, tokens, text-doc loss sum, tokens] over the global
    batch, on every rank (last-stage, TP-rank-0 ranks contribute)."""
    from megatron.core import parallel_state as ps

    report = torch.zeros(6, dtype=torch.float64, device=_device())
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
        for r in reports:
            report += r["report"].to(report)
    dist.all_reduce(report)
    return report.cpu()


def all_true(flag: bool) -> bool:
    t = torch.tensor([1.0 if flag else 0.0], device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0)


def any_true(flag: bool) -> bool:
    return not all_true(not flag)


def gather_step_samples(batches: list, window: Optional[int]) -> tuple[list, float, int, int]:
    """Sample ids of the whole global batch (DP-rank order), the causal query-key pairs of its real
    documents under the sliding ``window`` (``attention_pairs``), its real (non-padding) token count
    and its image patches."""
    from megatron.core import parallel_state as ps

    ids = [s for b in batches for s in b["sample_ids"]]
    pairs = sum(attention_pairs(b["doc_lengths"], window) for b in batches)
    real = sum(b["real_tokens"] for b in batches)
    patches = sum(int(b["patches"].shape[0]) for b in batches)
    gathered: List[Any] = [None] * dist.get_world_size()
    first_of_dp_replica = ps.get_tensor_model_parallel_rank() == 0 and ps.get_pipeline_model_parallel_rank() == 0
    dist.all_gather_object(gathered, (first_of_dp_replica, ps.get_data_parallel_rank(), ids, pairs, real, patches))
    all_ids, total_pairs, total_real, total_patches = [], 0.0, 0, 0
    for first, _, rank_ids, rank_pairs, rank_real, rank_patches in sorted(gathered, key=lambda g: g[1]):
        if first:
            all_ids.extend(rank_ids)
            total_pairs += rank_pairs
            total_real += rank_real
            total_patches += rank_patches
    return all_ids, total_pairs, total_real, total_patches


def log_step(record: dict, train_iters: int) -> None:
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    logger.info(
        "step %d/%d | loss %.4f | text %s | image %s | lr %.3e | grad_norm %s | %.0f tok/s%s%s",
        record["step"], train_iters, record["loss"], fmt(record["text_loss"], ".4f"),
        fmt(record["image_loss"], ".4f"), record["lr"], fmt(record["grad_norm"], ".3f"), record["tokens_per_s"],
        f" | mfu {record['mfu']:.1%}" if "mfu" in record else "", " | SKIPPED" if record["skipped"] else "",
    )


class NonFiniteStep(RuntimeError):
    """A non-finite loss or gradient with ``training.on_nonfinite=stop``: the step's update was not applied."""


def train_step(cfg: Config, model, optimizer, scheduler, data_iter: Iterator, num_microbatches: int,
               iteration: int, consumed: int, mfu=None) -> Dict[str, Any]:
    """One optimizer step on the next global batch (step ``iteration + 1``); returns its metrics record.

    A non-finite loss or gradient is found before the optimizer can apply it: the step is skipped
    (``training.on_nonfinite=skip``) or :class:`NonFiniteStep` is raised. ``mfu(tokens, patches,
    pairs, seconds)``, when given, adds the step's model FLOPs utilisation."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    d, t = cfg.data, cfg.training
    step_start = time.perf_counter()
    state = {"batches": [], "nan": t.inject_nan_at_step == iteration + 1}
    model.zero_grad_buffer()
    optimizer.zero_grad()
    reports = get_forward_backward_func()(
        forward_step_func=partial(forward_step, state),
        data_iterator=data_iter,
        model=[model],
        num_microbatches=num_microbatches,
        seq_length=d.seq_length * d.micro_batch_size,  # one THD row per micro-batch
        micro_batch_size=1,
        forward_only=False,
    )
    report = global_loss_report(reports)
    lr = optimizer.param_groups[0]["lr"]  # the LR this step's update uses (warm-up starts at 0)
    # Detected in the step that produces it, before the optimizer can apply it.
    skipped, grad_norm = False, None
    if not all_true(math.isfinite(report[0].item()) and _grads_finite(model)):
        msg = (f"non-finite loss or gradient at step {iteration + 1} (loss sum {report[0].item()}); "
               f"samples on rank {dist.get_rank()}: {[b['sample_ids'] for b in state['batches']]}")
        if t.on_nonfinite == "stop":
            raise NonFiniteStep(msg)
        skipped = True
        if dist.get_rank() == 0:
            logger.warning("%s: step skipped", msg)
    else:
        update_ok, grad_norm, _ = optimizer.step()
        skipped = not update_ok
        if update_ok:
            scheduler.step(increment=d.global_batch_size)
    if t.step_sleep_s:
        time.sleep(t.step_sleep_s)

    elapsed = time.perf_counter() - step_start
    sample_ids, pairs, tokens, patches = gather_step_samples(state["batches"], cfg.model.sliding_window)
    n_loss = report[1].item()
    record = dict(
        step=iteration + 1,
        loss=report[0].item() / n_loss if n_loss else 0.0,
        text_loss=report[4].item() / report[5].item() if report[5].item() else None,
        image_loss=report[2].item() / report[3].item() if report[3].item() else None,
        loss_tokens=int(n_loss),
        lr=lr,
        grad_norm=float(grad_norm) if grad_norm is not None else None,
        tokens_per_s=tokens / elapsed,
        step_time_s=elapsed,
        consumed_samples=consumed + d.global_batch_size,
        skipped=skipped,
        sample_ids=sample_ids,
    )
    if mfu is not None:
        record["mfu"] = mfu(tokens, patches, pairs, elapsed)  # real tokens, not padding
    return record


def train(cfg: Config) -> int:
    """Run (or resume) training as configured. Returns the process exit code."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads

    if cfg.training.bf16 and not torch.cuda.is_available():
        raise ConfigError("training.bf16=true needs CUDA (megatron-core's bf16 optimizer only wraps CUDA "
                          "tensors); set training.bf16=false on CPU")
    resolve_tokenizer_fields(cfg)
    check_init_from(cfg)
    if cfg.training.train_iters is None:
        from megatron_patch.data import iterations_for_tokens

        cfg.training.train_iters = iterations_for_tokens(
            cfg.data.path, cfg.training.train_tokens, cfg.data.global_batch_size
        )
    init_distributed(cfg)
    save_lock = SaveDirLock(cfg.checkpoint.save)  # noqa: F841 (held while train() runs; freed on return)
    rank = dist.get_rank()
    if torch.cuda.is_available():
        # Versions, then one attention call at the recipe's shapes before any data or checkpoint is touched.
        check_attention(cfg)
    if rank == 0 and cfg.training.train_tokens is not None:
        logger.info("training.train_tokens=%.4g -> %d iterations", cfg.training.train_tokens, cfg.training.train_iters)
    model, tconfig = build_model(cfg)
    optimizer, scheduler = build_optimizer(cfg, model)
    tconfig.finalize_model_grads_func = finalize_model_grads
    tconfig.no_sync_func = model.no_sync

    iteration, consumed, last_saved = restore(cfg, model, optimizer, scheduler)
    # Background checkpoint writes need megatron-core's GPU staging; CPU runs save synchronously.
    async_saves = AsyncSaves() if cfg.checkpoint.async_save and torch.cuda.is_available() else None
    data_iter = build_data_iterator(cfg, consumed)
    d, t = cfg.data, cfg.training
    num_microbatches = d.global_batch_size // (d.micro_batch_size * ps.get_data_parallel_world_size())
    metrics = MetricsWriter(
        cfg.checkpoint.save, is_main=dist.get_rank() == 0, resumed_step=iteration,
        tensorboard=cfg.logging.tensorboard, wandb_project=cfg.logging.wandb_project, run_config=cfg.to_dict(),
    )
    n_params = count_parameters(model)
    n_projection = n_params - count_parameters(model, exclude="vision_patch_projection")  # runs on patches only
    n_matmul = count_parameters(model, exclude="word_embeddings") - n_projection  # lookups are not matmuls
    peak = peak_flops_per_device(cfg)
    if rank == 0:
        logger.info("model: %.2fM parameters; %d micro-batches per step", n_params / 1e6, num_microbatches)

    def mfu(tokens: int, patches: int, pairs: float, seconds: float) -> float:
        flops = step_flops(cfg, n_matmul, n_projection, tokens, patches, pairs)
        return flops / seconds / (peak * dist.get_world_size())

    run_start_iteration = iteration
    model.train()
    with GracefulStop(sigterm=cfg.checkpoint.sigterm_save) as graceful:
        while iteration < t.train_iters:
            if async_saves is not None:
                async_saves.poll()
            try:
                record = train_step(cfg, model, optimizer, scheduler, data_iter, num_microbatches, iteration,
                                    consumed, mfu if peak else None)
            except NonFiniteStep as error:
                if rank == 0:
                    logger.error("%s: stopping without updating the weights (last checkpoint: %s). "
                                 "Set training.on_nonfinite=skip to skip such steps.", error, last_saved)
                if async_saves is not None:
                    async_saves.wait()
                dist.barrier()
                return 3
            iteration, consumed = record["step"], record["consumed_samples"]
            metrics.write(record)
            if rank == 0 and iteration % t.log_interval == 0:
                log_step(record, t.train_iters)

            sigterm = any_true(graceful.requested)
            stop = sigterm or (t.exit_after_iters is not None and iteration - run_start_iteration >= t.exit_after_iters)
            if cfg.checkpoint.save and (iteration % cfg.checkpoint.save_interval == 0 or stop
                                        or iteration == t.train_iters):
                _sync_params(model)
                save_checkpoint(cfg, model, optimizer, scheduler, iteration, consumed, async_saves)
                last_saved = iteration
            if stop:
                if rank == 0:
                    logger.info("stopping at iteration %d (%s)", iteration,
                                "SIGTERM" if sigterm else "exit_after_iters")
                break

    if t.train_iters == 0 and cfg.checkpoint.save and last_saved is None:
        save_checkpoint(cfg, model, optimizer, scheduler, 0, 0)  # materialise the initial weights
    if async_saves is not None:
        async_saves.wait()  # the last checkpoint is complete and in place before the process exits
    dist.barrier()
    return 0


def _sync_params(model) -> None:
    """With overlapped parameter all-gather the model's weights are updated lazily (during the next
    forward); gather them now so that a checkpoint holds this step's weights."""
    if getattr(model, "use_forward_hook", False):
        model.start_param_sync(force_sync=True)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_patch.train",
        description="SOLO pretraining on megatron-core. Launch with torchrun for several processes. "
        "Re-running the same command resumes from checkpoint.save.",
    )
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. megatron_patch/recipes/debug_cpu.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. training.train_iters=10")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
    )
    # megatron-core's INFO lines (its FSDP detection, every DDP/optimizer config field, each
    # gradient bucket's parameter list, on every process) bury the step lines; keep its warnings.
    logging.getLogger("megatron.core").setLevel(logging.WARNING)
    compat.quiet_cpu_notices()
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    compat.apply()
    try:
        with compat.device_scope():
            code = train(cfg)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except PreflightError as exc:
        print(f"preflight: {exc}", file=sys.stderr)
        return 2
    except CheckpointError as exc:
        print(f"checkpoint error: {exc}", file=sys.stderr)
        return 2
    dist.destroy_process_group()
    return code

