"""SFT data: instruction files → packed rows (through data preparation), their order, and collation.

* `pack_instruction_files`: instruction files (LLaVA / ShareGPT / OpenAI-chat) go through
  `solo-data pack`'s pipeline — the same converters, the `mistral` chat template and image layout
  as `SoloProcessor`, best-fit-decreasing packing to `data.max_length` — into `SAVE/data`, once,
  on the main process, before training. Every rejected sample is listed with its reason in
  `SAVE/data/report.json`; all ranks then read the same packs, so none can skip a sample alone.
  A directory already packed by `solo-data pack --template mistral` is used as it is.
* `StepPlan`: which packs each rank reads at each optimizer step: a seeded permutation per epoch,
  cut into steps of `packs_per_step`; a function of the step alone, so resuming at step k reads
  exactly what an uninterrupted run reads (no sample repeated or skipped).
* `collate_packs`: packed rows → model inputs. Position ids restart at each document and there is
  no attention_mask, so the model attends within documents only; labels are the tokens where the
  loss mask is set (assistant text and its end-of-turn), -100 elsewhere.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from solo.hf.image_processing_solo import PATCH_DIM
from solo.hf.modeling_solo import IGNORE_INDEX, packed_position_ids

DATA_DIR = "data"  # under checkpoint.save


class DataError(ValueError):
    """Training data that cannot be used as given (the message names it and says what to do)."""


def is_packed_dir(path: str) -> bool:
    from data_prep.packed_format import METADATA_FILE

    return os.path.isdir(path) and os.path.exists(os.path.join(path, METADATA_FILE))


def pack_instruction_files(paths: list[str], fmt: str, output: str, tokenizer_dir: str, *, max_length: int,
                           image_root: str | None, workers: int, progress: bool) -> dict:
    """Convert, encode (mistral template) and pack instruction files into `output`; returns the report.

    Running it again on a complete output returns its report; an interrupted one resumes.
    """
    from data_prep.encode import EncodeOptions
    from data_prep.pack import PackConfig, run_pack
    from data_prep.sources import SourceOptions

    config = PackConfig(
        inputs=paths, output=output, tokenizer=tokenizer_dir,
        source=SourceOptions(format=fmt, image_root=image_root),
        encode=EncodeOptions(seq_length=max_length, template="mistral"),
        workers=workers, progress=progress,
    )
    return run_pack(config)


def check_packed_dir(path: str, tokenizer, max_length: int) -> None:
    """Refuse packs made for another tokenizer, template or longer rows."""
    from data_prep.pack import tokenizer_fingerprint
    from data_prep.reader import PackedReader

    metadata = PackedReader(path).metadata
    if metadata.get("template") != "mistral":
        raise DataError(f"{path} was packed with --template {metadata.get('template')}; SFT data must be packed "
                        "with --template mistral (the chat template of SoloProcessor)")
    if metadata["seq_length"] > max_length:
        raise DataError(f"{path} holds packs of up to {metadata['seq_length']} tokens, above data.max_length "
                        f"{max_length}; repack with --seq-length {max_length} or raise data.max_length")
    digest = metadata["tokenizer"].get("digest")
    if digest != tokenizer_fingerprint(tokenizer):
        raise DataError(f"{path} was packed with the tokenizer in {metadata['tokenizer']['dir']}, which differs from "
                        "the model's; repack with --tokenizer pointing at model.path")


def read_report(path: str) -> dict:
    from data_prep.packed_format import REPORT_FILE

    with open(os.path.join(path, REPORT_FILE), encoding="utf-8") as fh:
        return json.load(fh)


@dataclass(frozen=True)
class StepPlan:
    """The packs of every optimizer step: ``packs_per_step = world_size × micro_batches × micro_batch_packs``.

    Epoch e visits the packs in `np.random.default_rng((seed, e)).permutation`; the epochs are
    concatenated and cut into steps. The last step may be short: its missing rows are empty
    (no tokens, no loss), so every rank runs the same number of micro-batches.
    """

    num_packs: int
    world_size: int
    micro_batches: int  # per rank per step (gradient accumulation)
    micro_batch_packs: int
    epochs: int
    seed: int

    @property
    def packs_per_step(self) -> int:
        return self.world_size * self.micro_batches * self.micro_batch_packs

    @property
    def total_steps(self) -> int:
        return math.ceil(self.num_packs * self.epochs / self.packs_per_step)

    def order(self) -> np.ndarray:
        return np.concatenate([np.random.default_rng((self.seed, epoch)).permutation(self.num_packs)
                               for epoch in range(self.epochs)])

    def rank_packs(self, step: int, rank: int, order: np.ndarray | None = None) -> list[list[int]]:
        """Pack indices of each micro-batch of ``rank`` at ``step`` (0-based); empty where the run ran out."""
        order = self.order() if order is None else order
        start = step * self.packs_per_step
        micro = []
        for m in range(self.micro_batches):
            # Interleave ranks per micro-batch so short last steps spread over every rank.
            first = start + (m * self.world_size + rank) * self.micro_batch_packs
            micro.append([int(i) for i in order[first:first + self.micro_batch_packs]])
        return micro


def plan_steps(num_packs: int, num_documents: int, samples_per_step: int, world_size: int, micro_batch_packs: int,
               epochs: int, seed: int) -> StepPlan:
    """A StepPlan whose steps hold ``samples_per_step`` samples on average (at least one pack per rank)."""
    per_pack = num_documents / max(num_packs, 1)
    micro_batches = max(1, round(samples_per_step / (per_pack * world_size * micro_batch_packs)))
    return StepPlan(num_packs, world_size, micro_batches, micro_batch_packs, epochs, seed)


def collate_packs(packs: list[dict[str, np.ndarray]], pad_id: int,
                  length: int | None = None) -> dict[str, torch.Tensor]:
    """Rows of packs (`PackedReader` items) → input_ids, position_ids, labels, vision_patches, vision_patch_indices.

    Rows are right-padded to ``length`` (default: the longest row); padding is one more document of
    pad tokens without loss. An empty list gives one row of a single pad token (no loss), which
    keeps a rank without data in step with the others.

    Every micro-batch feeds the patch projection: one without images gets a zero patch on one extra
    padding position at the end of its first row (no loss, nothing attends to it, so its gradient is
    exactly zero). Every rank then produces a gradient for every parameter, which DeepSpeed ZeRO's
    bucketed reductions and DDP require (a rank that skipped the projection would desynchronise them).
    """
    if not packs:
        packs = [{"tokens": np.array([pad_id], np.int32), "loss_mask": np.zeros(1, np.uint8),
                  "cu_seqlens": np.array([0, 1], np.int32), "patches": np.zeros((0, PATCH_DIM), np.uint8),
                  "vision_patch_indices": np.full(1, -1, np.int64)}]
    length = length or max(len(p["tokens"]) for p in packs)
    if not any(len(p["patches"]) for p in packs):
        first = packs[0]
        packs = [{"tokens": np.append(first["tokens"], pad_id).astype(np.int32),
                  "loss_mask": np.append(first["loss_mask"], 0).astype(np.uint8),
                  "cu_seqlens": np.append(first["cu_seqlens"], len(first["tokens"]) + 1).astype(np.int32),
                  "patches": np.zeros((1, PATCH_DIM), np.uint8),
                  "vision_patch_indices": np.append(first["vision_patch_indices"], 0)}] + packs[1:]
        length = max(length, len(packs[0]["tokens"]))
    rows = len(packs)
    input_ids = torch.full((rows, length), pad_id, dtype=torch.long)
    labels = torch.full((rows, length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((rows, length), dtype=torch.long)
    patch_indices = torch.full((rows, length), -1, dtype=torch.long)
    patches, offset = [], 0
    for row, pack in enumerate(packs):
        n = len(pack["tokens"])
        if n > length:
            raise DataError(f"a pack of {n} tokens does not fit rows of {length}")
        tokens = torch.from_numpy(pack["tokens"].astype(np.int64))
        input_ids[row, :n] = tokens
        labels[row, :n] = torch.where(torch.from_numpy(pack["loss_mask"].astype(bool)), tokens, IGNORE_INDEX)
        position_ids[row] = packed_position_ids(torch.from_numpy(pack["cu_seqlens"]), length)
        indices = torch.from_numpy(pack["vision_patch_indices"])
        patch_indices[row, :n] = torch.where(indices >= 0, indices + offset, indices)
        offset += len(pack["patches"])
        patches.append(torch.from_numpy(pack["patches"]))
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "labels": labels,
        "vision_patches": torch.cat(patches),
        "vision_patch_indices": patch_indices,
    }


class StepDataset(torch.utils.data.Dataset):
    """Micro-batch m of a rank's steps from ``first_step`` on, as collated tensors (for a DataLoader)."""

    def __init__(self, reader, plan: StepPlan, rank: int, first_step: int, last_step: int, pad_id: int):
        self.reader, self.plan, self.rank, self.pad_id = reader, plan, rank, pad_id
        order = plan.order()
        self.micro = [packs for step in range(first_step, last_step) for packs in plan.rank_packs(step, rank, order)]

    def __len__(self) -> int:
        return len(self.micro)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return collate_packs([self.reader[i] for i in self.micro[index]], self.pad_id)
