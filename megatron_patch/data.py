"""Packed multimodal pretraining data on ``megatron.core.datasets``.

* :class:`PackedDataset` (a ``MegatronDataset``) turns one packed directory (read through
  ``data_prep.reader.PackedReader``) into fixed-length training samples: epoch-shuffled,
  deterministic given the seed, padded to ``seq_length`` with the pad id as an extra padding
  document, next-token labels and a loss mask that never crosses a document boundary.
* Mixtures (a YAML listing packed directories with weights) are blended by megatron-core's
  ``BlendedMegatronDatasetBuilder`` (compiled blending helpers, cached indices).
* :func:`collate_packed` turns a micro-batch of samples into ONE packed THD row: documents of all
  samples are concatenated, ``cu_seqlens`` offset per sample, and every sample's patch indices
  offset by the patches of the samples before it (SOLO corrupted patch lookup at micro-batch > 1).
* :class:`SyntheticImageTask` is a reader with the same contract that generates a small image
  classification + text-pattern task; the debug recipe and the tests train on it.

Reader contract (``data_prep.reader.PackedReader``): ``len(r)``; ``r[i]`` is a dict with
``tokens`` int32[L], ``loss_mask`` uint8[L] (1: token t is a target, predicted from position t-1),
``cu_seqlens`` int32[D+1] (document boundaries, 0 .. L), ``patches`` uint8[N, 3072],
``vision_patch_indices`` int64[L] (-1 for non-patch tokens, else a row of ``patches``), and
optionally ``image_layout`` int32[n_images, 3] (offset of ``<vision>``, rows, cols: what the packer
records; read back from ``vision_patch_indices`` when a reader has none), which the native-VLM
switches (``model.image_attention``, ``model.vision_positions``) use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import BlendedMegatronDatasetConfig
from megatron.core.datasets.megatron_dataset import MegatronDataset
from megatron.core.packed_seq_params import PackedSeqParams

from solo.hf.image_processing_solo import PATCH_DIM


SYNTHETIC = "synthetic"


# ----------------------------------------------------------------------------------------------
# Synthetic task (same contract as PackedReader)
# ----------------------------------------------------------------------------------------------


class SyntheticImageTask:
    """Deterministic packs of tiny image-classification documents and text-pattern documents.

    Image document: ``<bos> <vision> (C <vpatch>, <vrow_sep>)*R-1, C <vpatch> </vision> <cls_c> <eos>``
    where the patches' colour identifies class c: the class token is only predictable from the
    pixels. Text document: ``<bos>`` then an arithmetic token sequence (predictable from context),
    ``<eos>``. Loss on the class token, text tokens and eos; none on the image block.
    Token ids (the synthetic vocabulary, not the SOLO tokenizer's): 0 pad, 1 bos, 2 eos,
    3 <vision>, 4 <vpatch>, 5 <vrow_sep>, 6 </vision>, 10+c class c, 32.. text tokens.
    """

    PAD, BOS, EOS, VISION, VPATCH, VROW_SEP, VISION_END, CLASS0, TEXT0 = 0, 1, 2, 3, 4, 5, 6, 10, 32

    def __init__(self, num_packs: int, seq_length: int, num_classes: int = 4, vocab_size: int = 128, seed: int = 0):
        if self.CLASS0 + num_classes > self.TEXT0 or vocab_size <= self.TEXT0 + 8:
            raise ValueError("synthetic task: need num_classes <= 22 and vocab_size > 40")
        self.num_packs, self.seq_length = num_packs, seq_length
        self.num_classes, self.vocab_size, self.seed = num_classes, vocab_size, seed
        colours = np.random.default_rng(seed + 10_007).integers(20, 236, size=(num_classes, 3))
        self.colours = colours.astype(np.int64)

    def __len__(self) -> int:
        return self.num_packs

    def _image_doc(self, rng, patches: List[np.ndarray], n_before: int):
        """tokens, loss mask, patch indices of one image document; its image is at offset 1."""
        rows, cols = int(rng.integers(1, 3)), int(rng.integers(1, 3))
        cls = int(rng.integers(self.num_classes))
        tokens, vpi = [self.BOS, self.VISION], [-1, -1]
        for r in range(rows):
            for _ in range(cols):
                noise = rng.integers(-12, 13, size=(3, 1024))
                pix = np.clip(self.colours[cls][:, None] + noise, 0, 255).astype(np.uint8)
                vpi.append(n_before + len(patches))
                patches.append(pix.reshape(PATCH_DIM))
                tokens.append(self.VPATCH)
            if r < rows - 1:
                tokens.append(self.VROW_SEP)
                vpi.append(-1)
        tokens += [self.VISION_END, self.CLASS0 + cls, self.EOS]
        vpi += [-1, -1, -1]
        loss = [0] * (len(tokens) - 2) + [1, 1]
        return tokens, loss, vpi, (rows, cols)

    def _text_doc(self, rng):
        length = int(rng.integers(4, 12))
        span = self.vocab_size - self.TEXT0
        start, step = int(rng.integers(span)), int(rng.integers(1, 4))
        body = [self.TEXT0 + (start + k * step) % span for k in range(length)]
        tokens = [self.BOS] + body + [self.EOS]
        return tokens, [0] + [1] * (len(tokens) - 1), [-1] * len(tokens)

    def __getitem__(self, idx: int) -> Dict[str, np.ndarray]:
        if not 0 <= idx < self.num_packs:
            raise IndexError(idx)
        rng = np.random.default_rng(self.seed * 1_000_003 + idx)
        tokens, loss, vpi, cu, patches, layout = [], [], [], [0], [], []
        # Fill to roughly 70-100% of the pack, like real packs.
        budget = int(self.seq_length * rng.uniform(0.7, 1.0))
        while True:
            patches_new: List[np.ndarray] = []
            grid = None
            if rng.uniform() < 0.6:
                t, m, v, grid = self._image_doc(rng, patches_new, len(patches))
            else:
                t, m, v = self._text_doc(rng)
            if len(tokens) + len(t) > budget:
                break
            if grid is not None:
                layout.append((len(tokens) + 1, *grid))
            tokens += t
            loss += m
            vpi += v
            patches += patches_new
            cu.append(len(tokens))
        if not tokens:  # budget smaller than one document: a lone short text document
            tokens, loss, vpi = [self.BOS, self.TEXT0, self.EOS], [0, 1, 1], [-1, -1, -1]
            cu = [0, 3]
        return dict(
            tokens=np.asarray(tokens, dtype=np.int32),
            loss_mask=np.asarray(loss, dtype=np.uint8),
            cu_seqlens=np.asarray(cu, dtype=np.int32),
            patches=np.asarray(patches, dtype=np.uint8).reshape(-1, PATCH_DIM),
            vision_patch_indices=np.asarray(vpi, dtype=np.int64),
            image_layout=np.asarray(layout, dtype=np.int32).reshape(-1, 3),
        )


# ----------------------------------------------------------------------------------------------
# Sample construction
# ----------------------------------------------------------------------------------------------


def make_training_sample(pack: Dict[str, np.ndarray], seq_length: int, pad_token_id: int) -> Dict[str, np.ndarray]:
    """One pack -> fixed-length sample with next-token labels.

    ``labels[t] = tokens[t+1]``; ``loss_mask[t] = pack.loss_mask[t+1]``, except at the last token of
    every document (its next token starts another document). Padding (to ``seq_length``) forms its
    own document with loss 0. Raises ValueError on a malformed or over-length pack.
    """
    tokens = np.asarray(pack["tokens"], dtype=np.int64)
    length = tokens.shape[0]
    if length > seq_length:
        raise ValueError(
            f"pack of {length} tokens exceeds data.seq_length={seq_length}: repack the data with "
            "this limit (over-length packs are never truncated silently)"
        )
    cu = np.asarray(pack["cu_seqlens"], dtype=np.int64)
    if length == 0 or cu[0] != 0 or cu[-1] != length or np.any(np.diff(cu) <= 0):
        raise ValueError(f"bad cu_seqlens {cu.tolist()} for a pack of {length} tokens")
    target = np.asarray(pack["loss_mask"], dtype=np.float32)
    vpi = np.asarray(pack["vision_patch_indices"], dtype=np.int64)
    patches = np.asarray(pack["patches"], dtype=np.uint8).reshape(-1, PATCH_DIM)
    if target.shape[0] != length or vpi.shape[0] != length:
        raise ValueError("tokens, loss_mask and vision_patch_indices must have the same length")
    used = vpi[vpi >= 0]
    if used.size and used.max() >= patches.shape[0]:
        raise ValueError(f"vision_patch_indices reference patch {used.max()} of {patches.shape[0]}")
    layout = image_layout(pack, vpi)

    labels = np.full(seq_length, pad_token_id, dtype=np.int64)
    loss_mask = np.zeros(seq_length, dtype=np.float32)
    labels[: length - 1] = tokens[1:]
    loss_mask[: length - 1] = target[1:]
    loss_mask[cu[1:-1] - 1] = 0.0  # the first token of a document is nobody's target

    # Which tokens belong to a document that carries an image (for split loss logging).
    doc_of_token = np.repeat(np.arange(len(cu) - 1), np.diff(cu))
    doc_has_image = np.zeros(len(cu) - 1, dtype=bool)
    np.logical_or.at(doc_has_image, doc_of_token, vpi >= 0)
    image_doc = np.zeros(seq_length, dtype=bool)
    image_doc[:length] = doc_has_image[doc_of_token]

    out_tokens = np.full(seq_length, pad_token_id, dtype=np.int64)
    out_tokens[:length] = tokens
    out_vpi = np.full(seq_length, -1, dtype=np.int64)
    out_vpi[:length] = vpi
    # The real documents (the MFU's attention work), before padding joins as a document.
    doc_lengths = np.diff(cu).tolist()
    real_tokens = int(length)
    if length < seq_length:
        cu = np.append(cu, seq_length)
    return dict(
        tokens=out_tokens,
        labels=labels,
        loss_mask=loss_mask,
        image_doc=image_doc,
        cu_seqlens=cu.astype(np.int32),
        patches=patches,
        vision_patch_indices=out_vpi,
        doc_lengths=doc_lengths,
        real_tokens=real_tokens,
        image_layout=layout,
    )


def image_layout(pack: Dict[str, np.ndarray], vpi: np.ndarray) -> np.ndarray:
    """int64 [n_images, 3] (offset of ``<vision>``, rows, cols) of a pack: its recorded
    ``image_layout``, checked against the patch positions, else read from ``vision_patch_indices``."""
    from data_prep.packed_format import vpatch_positions

    if pack.get("image_layout") is None:
        from solo.hf.native_vision import image_layout_from_patch_indices

        return image_layout_from_patch_indices(torch.as_tensor(vpi)).numpy()
    layout = np.asarray(pack["image_layout"], dtype=np.int64).reshape(-1, 3)
    recorded = [vpatch_positions(*image) for image in layout.tolist()]
    recorded = np.concatenate(recorded) if recorded else np.zeros(0, np.int64)
    if not np.array_equal(np.sort(recorded), np.flatnonzero(vpi >= 0)):
        raise ValueError("image_layout does not match the patch positions of vision_patch_indices")
    return layout


def collate_packed(samples: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Micro-batch of samples -> one THD row ``[1, B*S]`` with consistent patch indices.

    Also computed here, on the loader's CPU workers rather than on the GPU: ``patch_positions``
    (the row positions of patch tokens, so the model needs no ``torch.nonzero`` host sync) and
    ``real_tokens`` and ``doc_lengths`` (tokens that are not padding and the real documents' lengths,
    for tokens/s and MFU)."""
    tokens, labels, loss_mask, image_doc, vpi, patches, cu, layout = [], [], [], [], [], [], [0], []
    offset_tokens = offset_patches = 0
    for s in samples:
        tokens.append(torch.as_tensor(s["tokens"]))
        labels.append(torch.as_tensor(s["labels"]))
        loss_mask.append(torch.as_tensor(s["loss_mask"]))
        image_doc.append(torch.as_tensor(s["image_doc"]))
        v = torch.as_tensor(s["vision_patch_indices"]).clone()
        v[v >= 0] += offset_patches
        vpi.append(v)
        p = torch.as_tensor(s["patches"])
        patches.append(p)
        cu.extend((torch.as_tensor(s["cu_seqlens"][1:], dtype=torch.int64) + offset_tokens).tolist())
        images = torch.as_tensor(s["image_layout"], dtype=torch.int64).reshape(-1, 3).clone()
        images[:, 0] += offset_tokens
        layout.append(images)
        offset_tokens += len(s["tokens"])
        offset_patches += p.shape[0]
    cu_t = torch.tensor(cu, dtype=torch.int32)
    vpi_row = torch.cat(vpi)
    return dict(
        tokens=torch.cat(tokens)[None],
        labels=torch.cat(labels)[None],
        loss_mask=torch.cat(loss_mask)[None],
        image_doc=torch.cat(image_doc)[None],
        vision_patch_indices=vpi_row[None],
        patch_positions=torch.nonzero(vpi_row >= 0).reshape(-1),
        patches=torch.cat(patches) if patches else torch.zeros(0, PATCH_DIM, dtype=torch.uint8),
        cu_seqlens=cu_t,
        max_seqlen=int((cu_t[1:] - cu_t[:-1]).max()),
        sample_ids=[str(s["sample_id"]) for s in samples],
        doc_lengths=[n for s in samples for n in s["doc_lengths"]],
        real_tokens=sum(int(s.get("real_tokens", len(s["tokens"]))) for s in samples),
        image_layout=torch.cat(layout),
    )


def packed_seq_params(batch: Dict[str, Any]) -> PackedSeqParams:
    cu = batch["cu_seqlens"]
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=batch["max_seqlen"],
        max_seqlen_kv=batch["max_seqlen"],
    )


# ----------------------------------------------------------------------------------------------
# megatron.core.datasets integration
# ----------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class PackedDatasetConfig(BlendedMegatronDatasetConfig):
    """megatron-core dataset config plus what packed samples need."""

    pad_token_id: int
    synthetic_num_packs: int = 4096
    synthetic_num_classes: int = 4
    synthetic_vocab_size: int = 128


def open_reader(path: str, config: PackedDatasetConfig):
    if path == SYNTHETIC:
        return SyntheticImageTask(
            num_packs=config.synthetic_num_packs,
            seq_length=config.sequence_length,
            num_classes=config.synthetic_num_classes,
            vocab_size=config.synthetic_vocab_size,
            seed=config.random_seed,
        )
    from data_prep.reader import PackedReader

    return PackedReader(path)


class PackedDataset(MegatronDataset):
    """Training samples from one packed directory (megatron-core mid-level dataset).

    ``indices`` are the packs of this split; ``num_samples`` (from the builder) may exceed them, in
    which case the packs are repeated in freshly shuffled epochs. Sample i is deterministic in
    (seed, i), so resuming at ``consumed_samples`` neither repeats nor skips a sample.
    """

    def __init__(self, dataset, dataset_path, indices, num_samples, index_split, config):
        super().__init__(dataset, dataset_path, indices, num_samples, index_split, config)
        if len(indices) == 0:
            raise ValueError(f"packed dataset {dataset_path} has no packs in split {index_split.name}")
        total = len(indices) if num_samples is None else max(int(num_samples), 1)
        epochs = -(-total // len(indices))
        rng = np.random.RandomState(config.random_seed)
        order = [rng.permutation(len(indices)) for _ in range(epochs)]
        self.sample_index = np.asarray(indices)[np.concatenate(order)[:total]]

    @staticmethod
    def numel_low_level_dataset(low_level_dataset) -> int:
        return len(low_level_dataset)

    @staticmethod
    def build_low_level_dataset(dataset_path: str, config: PackedDatasetConfig):
        return open_reader(dataset_path, config)

    @staticmethod
    def _key_config_attributes() -> List[str]:
        return ["random_seed", "sequence_length", "split", "pad_token_id"]

    def __len__(self) -> int:
        return len(self.sample_index)

    def __getitem__(self, idx: int) -> Dict[str, Any]:
        pack_id = int(self.sample_index[idx])
        sample = make_training_sample(self.dataset[pack_id], self.config.sequence_length, self.config.pad_token_id)
        sample["sample_id"] = f"{self.dataset_path}#{pack_id}"
        return sample


def read_mixture(path: str) -> tuple[list[str], list[float]]:
    """Mixture YAML -> (paths, weights), read by `data_prep.mixture.read_mixture` (format documented there)."""
    from data_prep.mixture import read_mixture as read_sources

    sources = read_sources(path, keep_as_is=(SYNTHETIC,))
    return [source for source, _ in sources], [weight for _, weight in sources]


def packed_directories(data_path: str) -> list[str]:
    """The packed directories behind data.path (none for the synthetic task)."""
    if data_path.endswith((".yaml", ".yml")):
        paths = read_mixture(data_path)[0]
    else:
        paths = [data_path]
    return [p for p in paths if p != SYNTHETIC]


def iterations_for_tokens(data_path: str, tokens: float, global_batch_size: int) -> int:
    """Iterations that draw about ``tokens`` non-pad tokens from the packs (weighted by the mixture),
    the rule of `solo-data plan --tokens`: ceil(ceil(tokens / E[tokens per pack]) / global batch)."""
    import math

    from data_prep.reader import PackedReader

    if data_path.endswith((".yaml", ".yml")):
        paths, weights = read_mixture(data_path)
    else:
        paths, weights = [data_path], [1.0]
    total = sum(weights)
    per_pack = 0.0
    for path, weight in zip(paths, weights):
        lengths = PackedReader(path).pack_lengths
        if len(lengths) == 0:
            raise ValueError(f"{path} holds no packs")
        per_pack += weight / total * float(lengths.mean())
    return math.ceil(math.ceil(tokens / per_pack) / global_batch_size)


def build_train_dataset(
    data_path: str,
    num_samples: int,
    seq_length: int,
    pad_token_id: int,
    seed: int,
    cache_dir: Optional[str],
    synthetic_vocab_size: int = 128,
    synthetic_num_packs: int = 4096,
    synthetic_num_classes: int = 4,
    is_built_on_rank: Callable[[], bool] = lambda: True,
):
    """The training split for a packed dir, ``synthetic``, or a mixture YAML (blended)."""
    if data_path.endswith((".yaml", ".yml")):
        paths, weights = read_mixture(data_path)
        blend = (paths, weights)
    else:
        blend = ([data_path], None)
    config = PackedDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        split="100,0,0",
        path_to_cache=cache_dir,
        pad_token_id=pad_token_id,
        synthetic_vocab_size=synthetic_vocab_size,
        synthetic_num_packs=synthetic_num_packs,
        synthetic_num_classes=synthetic_num_classes,
    )
    train, _, _ = BlendedMegatronDatasetBuilder(
        PackedDataset, [num_samples, 0, 0], is_built_on_rank, config
    ).build()
    return train


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Deterministic micro-batches for one data-parallel rank, starting at ``consumed_samples``.

    Global step k covers samples [k*G, (k+1)*G); within it, micro-batch m of DP rank r holds
    samples k*G + m*B*DP + r*B + [0, B). Same global batch at any DP size.
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int):
        self.total, self.consumed = total_samples, consumed_samples
        self.mbs, self.rank, self.size = micro_batch_size, dp_rank, dp_size

    def __iter__(self):
        step = self.mbs * self.size
        start = self.consumed
        while start + step <= self.total:
            first = start + self.rank * self.mbs
            yield list(range(first, first + self.mbs))
            start += step

    def __len__(self) -> int:
        return max(0, (self.total - self.consumed) // (self.mbs * self.size))
