"""Greedy generation on a megatron-core SOLO checkpoint, on one process (TP=PP=1).

    model, cfg = load_model(SAVE_DIR)
    prompts = [document_prompt(pack, doc) for ...]          # or any one-document packs
    tokens = greedy_generate(model, prompts, eos_id, cfg.model.vocab_size, max_new_tokens=8)

A prompt is a pack of one document in the data module's reader contract (``tokens``,
``vision_patch_indices``, ``patches``; optionally ``image_layout``). At every decoding step the
unfinished prompts, each with the tokens generated so far, go through the data module's own sample
construction and collate (``make_training_sample``, ``collate_packed``: ``cu_seqlens``, patch-index
offsets, the image layout the native-VLM switches read) into one packed row, so a step is one
forward pass with per-document attention, exactly the inputs training sees.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
import torch


def load_model(ckpt: str):
    """The trained SoloGPTModel of a SAVE_DIR (or iter_* dir) in eval mode, and its Config, on one
    process (TP=PP=1, whatever the parallel sizes it was saved at)."""
    from megatron.core import dist_checkpointing

    from megatron_patch import compat
    from megatron_patch.checkpointing import unwrap
    from megatron_patch.config import Config
    from megatron_patch.train import build_model, init_distributed
    from solo.checkpoints import resolve_checkpoint_dir
    from solo.recipe import build_dataclass

    ckpt_dir = resolve_checkpoint_dir(ckpt)
    compat.apply()
    common = dist_checkpointing.load_common_state_dict(ckpt_dir)
    cfg = build_dataclass(Config, common["config"])
    cfg.parallel.tensor_model_parallel_size = cfg.parallel.pipeline_model_parallel_size = 1
    cfg.data.global_batch_size = cfg.data.micro_batch_size
    cfg.training.recompute = "none"
    init_distributed(cfg)
    model, _ = build_model(cfg)
    model = unwrap(model)
    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, ckpt_dir)
    model.load_state_dict(state["model"])
    model.eval()
    return model, cfg


def document_prompt(pack: Dict[str, np.ndarray], doc: int) -> Dict[str, np.ndarray]:
    """Document ``doc`` of a pack up to its first token with loss (its question: picture block and
    text), as a one-document pack of its own: its patches only, its patch indices counted from 0."""
    cu = pack["cu_seqlens"]
    start, end = int(cu[doc]), int(cu[doc + 1])
    answer_at = start + int(np.flatnonzero(pack["loss_mask"][start:end])[0])
    vpi = np.asarray(pack["vision_patch_indices"][start:answer_at], dtype=np.int64)
    used = vpi[vpi >= 0]
    first = int(used.min()) if len(used) else 0
    return dict(
        tokens=np.asarray(pack["tokens"][start:answer_at], dtype=np.int64),
        patches=pack["patches"][first:first + len(used)],
        vision_patch_indices=np.where(vpi >= 0, vpi - first, -1),
    )


def _continued(prompt: Dict[str, np.ndarray], generated: List[int]) -> Dict[str, np.ndarray]:
    """The prompt followed by the tokens generated for it, as a training sample of exactly its length."""
    from megatron_patch.data import make_training_sample

    new = np.asarray(generated, dtype=np.int64)
    tokens = np.concatenate([np.asarray(prompt["tokens"], dtype=np.int64), new])
    pack = dict(
        tokens=tokens,
        loss_mask=np.zeros(len(tokens), dtype=np.uint8),
        cu_seqlens=np.asarray([0, len(tokens)], dtype=np.int64),
        patches=prompt["patches"],
        vision_patch_indices=np.concatenate([prompt["vision_patch_indices"], np.full(len(new), -1, np.int64)]),
        image_layout=prompt.get("image_layout"),
    )
    return make_training_sample(pack, len(tokens), pad_token_id=0)  # no padding: the pad id is never used


def greedy_generate(model, prompts: Sequence[Dict[str, np.ndarray]], eos_id: int, vocab_size: int,
                    max_new_tokens: int) -> List[List[int]]:
    """Greedy continuation of each prompt until ``eos_id`` (not included) or ``max_new_tokens``;
    ``vocab_size`` is the tokenizer's (padded vocabulary rows are never chosen)."""
    from megatron_patch.data import collate_packed
    from megatron_patch.train import run_model

    device = next(model.parameters()).device
    generated: List[List[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(max_new_tokens):
        active = [i for i in range(len(prompts)) if not done[i]]
        if not active:
            break
        samples = [dict(_continued(prompts[i], generated[i]), sample_id=i) for i in active]
        batch = collate_packed(samples)
        with torch.no_grad():
            logits = run_model(model, batch, device, labels=False)
        last = logits[0, batch["cu_seqlens"][1:].long() - 1, :vocab_size]
        for i, token in zip(active, last.argmax(-1).tolist()):
            if token == eos_id:
                done[i] = True
            else:
                generated[i].append(token)
    return generated
