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

`tokenizer/` holds the tokenizer the packs were made with (what training and preview load), so
a packed directory is self-contained: it can be moved, copied or mounted elsewhere.
`metadata.json` (written last: its presence marks a complete directory) records the format
version, `seq_length`, the tokenizer (`dir`: its folder relative to the packed directory, `digest`
checked when it is loaded, `source_dir` it was copied from, vocabulary size, bos/eos/pad and
vision token ids), the image `resize_mode`, the template and loss rule, and the run's input fingerprint.
`report.json` holds the run's accounting. Patches are not stored: the reader decodes each image
and patchifies it with the shared processor at the recorded grid. An image at offset o with R rows
and C columns spans `image_span(R, C)` tokens (`<vision>`, R rows of C `<vpatch>` with a `<vrow_sep>`
after each row but the last, `</vision>`); its `<vpatch>` tokens sit at o + 1 + r·(C + 1) + c,
numbered in raster order. This module needs only numpy (the readers of `solo-data stats` and `plan`
start without torch); a test holds `image_span` equal to the processor's `image_tokens_count`.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings

import numpy as np

FORMAT_NAME = "solo-packed"
FORMAT_VERSION = 1
PER_PACK_PREFIXES = ("tokens", "loss_mask", "cu_seqlens", "image_layout", "doc_origin")
IMAGES_PREFIX = "images"
METADATA_FILE = "metadata.json"
TOKENIZER_DIR = "tokenizer"  # the tokenizer's copy inside a packed directory
REPORT_FILE = "report.json"


def tokenizer_fingerprint(tokenizer) -> str:
    """Digest of what decides the tokens: the fast tokenizer's serialisation and its special ids.

    (Hashing the directory would read a whole checkpoint when --tokenizer points at one.)
    """
    digest = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    special = [len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
               getattr(tokenizer, "chat_template", None)]
    digest.update(json.dumps(special).encode())
    return digest.hexdigest()[:32]


def image_span(rows, cols):
    """Tokens an image of rows × cols patches spans in a pack; elementwise on numpy arrays."""
    return rows * (cols + 1) + 1


def vpatch_positions(offset: int, rows: int, cols: int) -> np.ndarray:
    """Positions of an image's `<vpatch>` tokens in its pack, in raster order."""
    return (offset + 1 + np.arange(rows)[:, None] * (cols + 1) + np.arange(cols)[None, :]).reshape(-1)


def token_dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size < 65500 else np.int32


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
    """Appends packs to the IndexedDatasets of a packed directory; deterministic and resumable.

    Next to the data it appends, in `side_dir`, one fixed-size record per pack and one per image
    (the item lengths the builders keep in memory), so that a killed run can be resumed from a
    checkpoint: `checkpoint()` flushes everything and returns the sizes to record; a new writer
    given that state truncates the files back to it and rebuilds the builders' lists.
    """

    SIDE_PACKS = "packs.side"  # int64 per pack: lengths of tokens, loss_mask, cu_seqlens, layout, origin; images
    SIDE_IMAGES = "images.side"  # int64 per image: byte length
    PACK_FIELDS = 6

    def __init__(self, directory: str, vocab_size: int, side_dir: str, resume: dict | None = None):
        indexed_dataset = import_indexed_dataset()
        self.directory = directory
        dtypes = {"tokens": token_dtype(vocab_size), "loss_mask": np.uint8, "cu_seqlens": np.int32,
                  "image_layout": np.int32, "doc_origin": np.int64, IMAGES_PREFIX: np.uint8}
        self.builders = {}
        side_packs, side_images = (os.path.join(side_dir, name) for name in (self.SIDE_PACKS, self.SIDE_IMAGES))
        if resume is None:
            for name, dtype in dtypes.items():
                self.builders[name] = indexed_dataset.IndexedDatasetBuilder(self._bin(name), dtype=dtype)
            self.packs = self.images = 0
            self.side_packs, self.side_images = open(side_packs, "wb"), open(side_images, "wb")
            return
        self.packs, self.images = resume["packs"], resume["images"]
        self.side_packs = self._reopen(side_packs, self.packs * self.PACK_FIELDS * 8)
        self.side_images = self._reopen(side_images, self.images * 8)
        records = np.fromfile(side_packs, dtype=np.int64, count=self.packs * self.PACK_FIELDS)
        records = records.reshape(-1, self.PACK_FIELDS)
        image_lengths = np.fromfile(side_images, dtype=np.int64, count=self.images)
        per_pack_indices = list(range(self.packs + 1))
        for column, (name, dtype) in enumerate(dtypes.items()):
            # The builder opens (and empties) its file; write into a scratch file, then swap in the
            # real one, cut back to the checkpoint.
            builder = indexed_dataset.IndexedDatasetBuilder(os.path.join(side_dir, f"scratch-{name}.bin"), dtype=dtype)
            builder.data_file.close()
            builder.data_file = self._reopen(self._bin(name), resume["bin_sizes"][name])
            if name == IMAGES_PREFIX:
                builder.sequence_lengths = image_lengths.tolist()
                builder.document_indices = [0] + np.cumsum(records[:, column]).tolist()
            else:
                builder.sequence_lengths = records[:, column].tolist()
                builder.document_indices = list(per_pack_indices)
            self.builders[name] = builder

    def _bin(self, name: str) -> str:
        return os.path.join(self.directory, name + ".bin")

    @staticmethod
    def _reopen(path: str, size: int):
        handle = open(path, "r+b")
        if os.path.getsize(path) < size:
            raise RuntimeError(f"{path} is shorter than its checkpoint; rerun with --overwrite")
        handle.truncate(size)
        handle.seek(size)
        return handle

    def add_pack(self, tokens: np.ndarray, loss_mask: np.ndarray, cu_seqlens: np.ndarray,
                 image_layout: np.ndarray, doc_origin: np.ndarray, images: list[bytes]) -> None:
        arrays = (("tokens", tokens), ("loss_mask", loss_mask), ("cu_seqlens", cu_seqlens),
                  ("image_layout", image_layout.reshape(-1)), ("doc_origin", doc_origin.reshape(-1)))
        for name, array in arrays:
            self.builders[name].add_item(_as_tensor(array))
            self.builders[name].end_document()
        image_builder = self.builders[IMAGES_PREFIX]
        for data in images:
            image_builder.add_item(_as_tensor(np.frombuffer(data, dtype=np.uint8)))
        image_builder.end_document()
        record = [array.size for _, array in arrays] + [len(images)]
        self.side_packs.write(np.asarray(record, dtype=np.int64).tobytes())
        self.side_images.write(np.asarray([len(data) for data in images], dtype=np.int64).tobytes())
        self.packs += 1
        self.images += len(images)

    def checkpoint(self) -> dict:
        """Flush every file and return the state a resumed writer needs."""
        for handle in [builder.data_file for builder in self.builders.values()] + [self.side_packs, self.side_images]:
            handle.flush()
        return {"packs": self.packs, "images": self.images,
                "bin_sizes": {name: builder.data_file.tell() for name, builder in self.builders.items()}}

    def finalize(self) -> None:
        self.side_packs.close()
        self.side_images.close()
        get_idx_path = import_indexed_dataset().get_idx_path
        for name, builder in self.builders.items():
            builder.finalize(get_idx_path(os.path.join(self.directory, name)))
        for name in self.builders:  # on disk before metadata.json declares the directory complete
            for path in (get_idx_path(os.path.join(self.directory, name)), os.path.join(self.directory, name + ".bin")):
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
