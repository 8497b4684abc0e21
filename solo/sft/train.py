"""The SFT training loop on Accelerate (DDP, DeepSpeed ZeRO-2/3) for `SoloForCausalLM`.

One optimizer step = `micro_batches` micro-batches per rank of `micro_batch_packs` packed rows.
The loss is normalised per token over the whole step (all micro-batches, all ranks): each
micro-batch's summed token loss is divided by the step's global count of loss tokens, so a step
weights every assistant token the same however the tokens fall into rows and ranks.

Running the same command again resumes from the newest checkpoint in `checkpoint.save`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from contextlib import ExitStack, contextmanager
from datetime import timedelta

import torch

from solo.checkpoints import iteration_dir
from solo.metrics import MetricsWriter
from solo.outputs import check_output_dir, claim_output_dir, output_lock
from solo.processes import GracefulStop, ignore_sigterm
from solo.recipe import ConfigError
from solo.sft import checkpoint as ckpt
from solo.sft.data import (
    DATA_DIR,
    DataError,
    StepDataset,
    check_packed_dir,
    is_packed_dir,
    pack_instruction_files,
    plan_steps,
    read_report,
)
from solo.sft.export import COMMAND, EXPORT_DIR, export_hf
from solo.sft.recipe import SFTConfig

logger = logging.getLogger("solo.sft")


class NonFiniteLossError(RuntimeError):
    """A non-finite loss (caught before the step's update) or gradient norm; nothing of the step is saved."""


def build_accelerator(cfg: SFTConfig):
    """An Accelerator that is really distributed on CPU too (gloo), checked against the launcher's WORLD_SIZE."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    # Without an explicit backend on CPU, accelerate silently runs every rank as a lone main process.
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    backend = "gloo" if expected > 1 and not torch.cuda.is_available() else None
    # The main process prepares the data while the others wait in a barrier: allow it hours.
    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend=backend, timeout=timedelta(hours=6))])
    if accelerator.num_processes != expected:
        raise ConfigError(
            f"the launcher started {expected} processes but the Accelerator sees {accelerator.num_processes}: the run "
            "is not really distributed (on CPU: no use_cpu/MULTI_CPU in the accelerate config; DDP needs "
            "ACCELERATE_USE_CPU=1 with a MULTI_GPU-style config, DeepSpeed must not set ACCELERATE_USE_CPU)"
        )
    return accelerator


def on_main(accelerator, function):
    """``function()`` run by the main process only; every process returns its result, or raises the
    error it raised (a user-facing ValueError or OSError), so no process is left waiting in a barrier."""
    from accelerate.utils import broadcast_object_list

    box = [None, None]
    if accelerator.is_main_process:
        try:
            box[0] = function()
        except (ValueError, OSError) as error:
            box[1] = error
    broadcast_object_list(box)
    if box[1] is not None:
        raise box[1]
    return box[0]


@contextmanager
def hold_save_dir(accelerator, cfg: SFTConfig):
    """For the whole run, before anything is read or written there: the lock on checkpoint.save (a
    second run on it is refused), checkpoint.save new or a previous SFT save, and its `hf` export
    replaceable — checked now, not after training."""
    with ExitStack() as stack:
        def claim() -> None:
            save = cfg.checkpoint.save
            stack.enter_context(output_lock(save, COMMAND))
            claim_output_dir(save, COMMAND)
            check_output_dir(os.path.join(save, EXPORT_DIR), command=COMMAND, inputs=[cfg.model.path], overwrite=True)

        on_main(accelerator, claim)
        yield


def prepare_data(cfg: SFTConfig, tokenizer, accelerator) -> str:
    """The packed directory to train on: the given one, or instruction files packed into SAVE/data (main process)."""
    path = cfg.data.path
    if is_packed_dir(path):
        check_packed_dir(path, tokenizer, cfg.data.max_length)
        return path
    inputs = [p.strip() for p in path.split(",") if p.strip()]
    for item in inputs:
        if not os.path.exists(item):
            raise DataError(f"data.path: {item} does not exist (give instruction files or a packed directory)")
    output = os.path.join(cfg.checkpoint.save, DATA_DIR)

    def pack() -> None:
        report = pack_instruction_files(inputs, cfg.data.format, output, cfg.model.path, max_length=cfg.data.max_length,
                                        image_root=cfg.data.image_root, workers=cfg.data.workers,
                                        progress=cfg.logging.progress)
        if report["documents_rejected"]:
            kinds = ", ".join(f"{k} ×{v}" for k, v in report["rejected_by_kind"].items())
            logger.warning("%d of %d samples rejected before training (%s); each with its reason in %s/report.json",
                           report["documents_rejected"], report["documents_in"], kinds, output)

    on_main(accelerator, pack)
    return output


def decay_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: norms (and biases, if any) are 1-D and get none."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, cfg: SFTConfig, total_steps: int) -> float:
    """Linear warm-up over `warmup_steps`, then cosine from `lr` to `min_lr` at `total_steps` (optimizer steps)."""
    t = cfg.training
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, total_steps - t.warmup_steps)
    return t.min_lr + (t.lr - t.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _configure_deepspeed(accelerator, cfg: SFTConfig, micro_batches: int) -> None:
    """Put the recipe's batch shape and clipping into the DeepSpeed config (precision stays the json's)."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    config = plugin.deepspeed_config
    for key, value in (("train_micro_batch_size_per_gpu", cfg.training.micro_batch_packs),
                       ("gradient_accumulation_steps", micro_batches),
                       ("gradient_clipping", cfg.training.clip_grad)):
        config[key] = value
    config["train_batch_size"] = cfg.training.micro_batch_packs * micro_batches * accelerator.num_processes
    if config.get("zero_optimization", {}).get("stage") == 3:
        config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True  # for the export


def _all_reduce(values: list[float], device, op=torch.distributed.ReduceOp.SUM) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor, op=op)
    return tensor.tolist()


def train(cfg: SFTConfig) -> dict:
    """Run (or resume) the SFT job described by `cfg`; returns a summary."""
    accelerator = build_accelerator(cfg)
    with hold_save_dir(accelerator, cfg):
        return _train(cfg, accelerator)


def _train(cfg: SFTConfig, accelerator) -> dict:
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from data_prep.reader import PackedReader
    from solo.hf import SoloForCausalLM

    rank, world = accelerator.process_index, accelerator.num_processes
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    torch.manual_seed(cfg.training.seed)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    if tokenizer.pad_token_id is None:
        raise ConfigError(f"model.path: the tokenizer in {cfg.model.path} has no pad token; "
                          "create it with `solo create`")

    data_dir = prepare_data(cfg, tokenizer, accelerator)
    reader = PackedReader(data_dir)
    report = read_report(data_dir)
    if len(reader) == 0:
        raise DataError(f"{data_dir} holds no packs "
                        f"(all {report['documents_in']} samples rejected: see its report.json)")
    plan = plan_steps(len(reader), report["pieces"], cfg.training.samples_per_step, world,
                      cfg.training.micro_batch_packs, cfg.training.epochs, cfg.training.seed)
    total_steps = plan.total_steps
    last_step = min(total_steps, cfg.training.max_steps) if cfg.training.max_steps else total_steps

    model = SoloForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32,
                                            attn_implementation=cfg.model.attn_implementation)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    optimizer = torch.optim.AdamW(decay_groups(model, cfg.training.weight_decay), lr=cfg.training.lr,
                                  betas=(cfg.training.adam_beta1, cfg.training.adam_beta2), eps=cfg.training.adam_eps)
    raw_optimizer = optimizer  # its param groups are the ones every wrapper steps with
    accelerator.gradient_accumulation_steps = plan.micro_batches
    _configure_deepspeed(accelerator, cfg, plan.micro_batches)
    model, optimizer = accelerator.prepare(model, optimizer)

    start_step = 0
    latest, skipped = on_main(accelerator, lambda: ckpt.find_resume(cfg.checkpoint.save))
    for item in skipped if accelerator.is_main_process else []:
        logger.warning("skipping checkpoint %s", item)
    if latest is not None:
        start_step = ckpt.load(accelerator, iteration_dir(cfg.checkpoint.save, latest), plan)
        logger.info("resumed from %s at step %d", iteration_dir(cfg.checkpoint.save, latest), start_step)
    metrics = MetricsWriter(cfg.checkpoint.save, is_main=accelerator.is_main_process, resumed_step=start_step,
                            tensorboard=cfg.logging.tensorboard, wandb_project=cfg.logging.wandb_project,
                            run_config=cfg.to_dict(), world_size=world)
    if accelerator.is_main_process:
        logger.info("%d packs (%d samples, %d rejected), %d packs per step (%d ranks × %d micro-batches × %d), "
                    "%d steps (%d in the schedule)", len(reader), report["pieces"], report["documents_rejected"],
                    plan.packs_per_step, world, plan.micro_batches, plan.micro_batch_packs, last_step, total_steps)

    dataset = StepDataset(reader, plan, rank, start_step, last_step, tokenizer.pad_token_id)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=cfg.data.num_workers,
                                         worker_init_fn=ignore_sigterm)
    batches = iter(loader)
    order = plan.order()
    progress = tqdm(total=last_step, initial=start_step, desc="sft", unit="step",
                    disable=not (accelerator.is_main_process and cfg.logging.progress))
    model.train()
    step = start_step
    interrupted = False
    with GracefulStop() as graceful:
        while step < last_step:
            lr = lr_at(step, cfg, total_steps)
            for group in raw_optimizer.param_groups:
                group["lr"] = lr
            record = train_step(accelerator, model, optimizer, [next(batches) for _ in range(plan.micro_batches)],
                                cfg, tokenizer.pad_token_id, step, lr)
            step = record["step"]
            record["consumed_samples"] = _consumed_samples(reader, order, step * plan.packs_per_step)
            record["packs"] = [int(i) for i in order[(step - 1) * plan.packs_per_step: step * plan.packs_per_step]]
            if accelerator.is_main_process and step % cfg.logging.log_interval == 0:
                metrics.write(record)
                progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
            progress.update(1)
            stop_now = _all_reduce([float(graceful.requested)], accelerator.device,
                                   op=torch.distributed.ReduceOp.MAX)[0] > 0
            if step % cfg.checkpoint.save_interval == 0 or step == last_step or stop_now:
                ckpt.save(accelerator, cfg, step, plan)
            if stop_now:
                interrupted = True
                logger.warning("SIGTERM: saved step %d; run the same command to continue", step)
                break
    progress.close()
    if not interrupted and step == last_step:
        export_dir = export_hf(accelerator, model, cfg)
        if accelerator.is_main_process:
            logger.info("exported the fine-tuned model to %s", export_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"step": step, "last_step": last_step, "interrupted": interrupted}


def train_step(accelerator, model, optimizer, micro: list[dict], cfg: SFTConfig, pad_token_id: int, step: int,
               lr: float) -> dict:
    """One optimizer step (step ``step + 1``) on this rank's micro-batches, at the learning rate ``lr``
    the optimizer's param groups were given; returns its metrics record. The loss is normalised per token over
    the whole step (see the module docstring). Raises NonFiniteLossError before a non-finite update."""
    started = time.perf_counter()
    device = accelerator.device
    is_deepspeed = accelerator.state.deepspeed_plugin is not None
    world = accelerator.num_processes
    local = [sum(int((b["labels"] != -100).sum()) for b in micro),
             sum(int((b["input_ids"] != pad_token_id).sum()) for b in micro)]
    loss_tokens, useful_tokens = _all_reduce(local, device)
    scale = len(micro) * world / max(loss_tokens, 1.0)
    loss_sum = 0.0
    for batch in micro:
        batch = {k: v.to(device) for k, v in batch.items()}
        with accelerator.accumulate(model):
            # num_items_in_batch=1: the model returns the summed token loss; the scale normalises it per step.
            out = model(**batch, num_items_in_batch=1)
            finite = _all_reduce([float(torch.isfinite(out.loss.detach()))], device,
                                 op=torch.distributed.ReduceOp.MIN)[0]
            if finite < 1:
                raise NonFiniteLossError(
                    f"non-finite loss at step {step + 1}; the step was not applied. Resume from the last checkpoint "
                    "with a lower training.lr, or check the data of this step (metrics.jsonl lists its packs)")
            accelerator.backward(out.loss * scale)
            loss_sum += float(out.loss.detach())
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.training.clip_grad) \
                    if cfg.training.clip_grad > 0 or is_deepspeed else None
                if grad_norm is not None and not math.isfinite(float(grad_norm)):
                    raise NonFiniteLossError(f"non-finite gradient norm at step {step + 1}; stopped without saving it: "
                                             "the same command resumes from the last checkpoint (lower training.lr)")
                optimizer.step()
                optimizer.zero_grad()
    loss_total = _all_reduce([loss_sum], device)[0]
    elapsed = time.perf_counter() - started
    return {
        "step": step + 1,
        "loss": loss_total / max(loss_tokens, 1.0),
        "lr": lr,
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "tokens_per_s": useful_tokens / elapsed,
        "loss_tokens": int(loss_tokens),
    }


def _consumed_samples(reader, order, consumed_packs: int) -> int:
    """Samples (document pieces) in the first `consumed_packs` packs of the run's order."""
    return int(reader.documents_per_pack[order[:consumed_packs]].sum())
