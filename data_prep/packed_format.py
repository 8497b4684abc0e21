"""The packed on-disk format (version 1): megatron-core IndexedDatasets, one item per pack.

A packed directory holds these `IndexedDataset` prefixes (each a `.bin` + `.idx` pair written by
`megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder`); item i of every per-pack file
belongs to pack i:

================  ======  ======================================================================
prefix            dtype   item i
================  ======  ======================================================================
tokens            uint16  token ids of pack i, no padding (int32 when the vocabulary is ≥ 65,500)
loss_mask         uint8   1 where the token is a training target, per token
cu_seqlens        int32   document boundaries within the pack: 0, end of doc 1, …, len(tokens)
image_layout      int32   per image of the pack: (offset of its `<vision>` token, rows, cols)
doc_origin        int64   per document piece: (input index, record number in that input, piece)
images            uint8   ONE ITEM PER IMAGE: the image's original encoded bytes (JPEG/PNG/…);
                          its `document_indices` group the images by pack (pack i owns items
                          document_indices[i] … document_indices[i+1]-1, in token order)
================  ======  ======================================================================

`metadata.json` (written last: its presence marks a complete directory) records the format
version, `seq_length`, the tokenizer (directory, vocabulary size, bos/eos/pad and vision token
ids), the image `resize_mode`, the template and loss rule, and the run's input fingerprint.
`report.json` holds the run's accounting. Patches are not stored: the reader decodes each image
and patchifies it with the shared processor at the recorded grid, so the `<vpatch>` tokens of an
image at offset o with C columns sit at o + 1 + r·(C + 1) + c, numbered in raster order.
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np

FORMAT_NAME = "solo-packed"
FORMAT_VERSION = 1
PER_PACK_PREFIXES = ("tokens", "loss_mask", "cu_seqlens", "image_layout", "doc_origin")
IMAGES_PREFIX = "images"
METADATA_FILE = "metadata.json"
REPORT_FILE = "report.json"


def token_dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size < 65500 else np.int32


def write_json_atomic(path: str, data) -> None:
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _as_tensor(array: np.ndarray):
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only buffers: the builder copies anyway
        return torch.from_numpy(np.ascontiguousarray(array))


def import_indexed_dataset():
    """megatron-core's IndexedDataset module, without its import-time notes about missing GPU extras."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


class PackWriter:
    """Appends packs to the IndexedDatasets of a packed directory (from scratch, deterministic)."""

    def __init__(self, directory: str, vocab_size: int):
        indexed_dataset = import_indexed_dataset()
        IndexedDatasetBuilder, get_bin_path = indexed_dataset.IndexedDatasetBuilder, indexed_dataset.get_bin_path
        self.directory = directory
        dtypes = {"tokens": token_dtype(vocab_size), "loss_mask": np.uint8, "cu_seqlens": np.int32,
                  "image_layout": np.int32, "doc_origin": np.int64, IMAGES_PREFIX: np.uint8}
        self.builders = {name: IndexedDatasetBuilder(get_bin_path(os.path.join(directory, name)), dtype=dtype)
                         for name, dtype in dtypes.items()}
        self.packs = 0

    def add_pack(self, tokens: np.ndarray, loss_mask: np.ndarray, cu_seqlens: np.ndarray,
                 image_layout: np.ndarray, doc_origin: np.ndarray, images: list[bytes]) -> None:
        for name, array in (("tokens", tokens), ("loss_mask", loss_mask), ("cu_seqlens", cu_seqlens),
                            ("image_layout", image_layout.reshape(-1)), ("doc_origin", doc_origin.reshape(-1))):
            self.builders[name].add_item(_as_tensor(array))
            self.builders[name].end_document()
        image_builder = self.builders[IMAGES_PREFIX]
        for data in images:
            image_builder.add_item(_as_tensor(np.frombuffer(data, dtype=np.uint8)))
        image_builder.end_document()
        self.packs += 1

    def finalize(self) -> None:
        get_idx_path = import_indexed_dataset().get_idx_path
        for name, builder in self.builders.items():
            builder.finalize(get_idx_path(os.path.join(self.directory, name)))
        for name in self.builders:  # on disk before metadata.json declares the directory complete
            for path in (get_idx_path(os.path.join(self.directory, name)), os.path.join(self.directory, name + ".bin")):
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
