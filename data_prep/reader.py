"""Random-access reader of a packed directory (the input of the megatron-core training dataset).

    r = PackedReader(directory)
    len(r)                      # number of packs
    r[i] -> dict(tokens=int32[L], loss_mask=uint8[L], cu_seqlens=int32[D+1],
                 patches=uint8[N, 3072], vision_patch_indices=int64[L])

L <= r.seq_length (no padding is stored). `loss_mask[t] = 1` means token t is a training target
(predicted from position t-1 of the same document). `vision_patch_indices[t]` is -1 for every token
that is not a `<vpatch>`, else the row of `patches` holding that patch. Patches are decoded from
the stored image bytes and cut by the shared image processor at the recorded grid. The format is
described in `data_prep.packed_format`.

The files are megatron-core IndexedDatasets, read here with numpy (`IndexedFile`): megatron-core's
own reader imports torch and all of megatron.core (about 6 s of CPU), which `solo-data stats` and
`plan` must not pay. The image processor (torch, transformers) loads on the first decoded image.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Optional

import numpy as np

from .packed_format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    IMAGES_PREFIX,
    METADATA_FILE,
    PER_PACK_PREFIXES,
    tokenizer_fingerprint,
    vpatch_positions,
)


class IndexedFile:
    """One megatron-core IndexedDataset (`PREFIX.idx` + `PREFIX.bin`, index version 1), read-only.

    The `.idx` holds a 9-byte magic, `<Q` version, `<B` dtype code, `<Q` item count, `<Q` document
    count, then int32 item lengths, int64 item byte offsets into `.bin` and int64 document indices.
    Item i is `.bin[offset_i : offset_i + length_i * itemsize]` as that dtype. Checked against
    megatron-core's `IndexedDataset` item for item in the tests.
    """

    MAGIC = b"MMIDIDX\x00\x00"
    HEADER = struct.Struct("<9sQBQQ")
    DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
              8: np.uint16}

    def __init__(self, prefix: str):
        index_path, data_path = prefix + ".idx", prefix + ".bin"
        for path in (index_path, data_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} is missing: the packed directory is incomplete; repack it")
        index_size = os.path.getsize(index_path)
        with open(index_path, "rb") as handle:
            header = handle.read(self.HEADER.size)
        if len(header) < self.HEADER.size or header[:9] != self.MAGIC:
            raise ValueError(f"{index_path} is not a megatron-core index file (bad header); repack the directory")
        _, version, code, items, documents = self.HEADER.unpack(header)
        if version != 1 or code not in self.DTYPES:
            raise ValueError(f"{index_path}: unsupported index version {version} or dtype code {code}")
        if index_size < self.HEADER.size + items * 12 + documents * 8:
            raise ValueError(f"{index_path} is truncated ({index_size} bytes for {items} items); repack the directory")
        self.dtype = np.dtype(self.DTYPES[code])
        index = np.memmap(index_path, mode="r", dtype=np.uint8)
        offset = self.HEADER.size
        self.sequence_lengths = np.frombuffer(index, np.int32, items, offset)
        self.sequence_pointers = np.frombuffer(index, np.int64, items, offset + items * 4)
        self.document_indices = np.frombuffer(index, np.int64, documents, offset + items * 12)
        data_size = os.path.getsize(data_path)
        end = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize if items else 0
        if end > data_size:
            raise ValueError(f"{data_path} is truncated ({data_size} bytes, the index needs {end}); "
                             "repack the directory")
        # numpy cannot memory-map an empty file (a text-only source has no image bytes at all).
        self._data = np.memmap(data_path, mode="r", dtype=np.uint8) if data_size else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, item: int) -> np.ndarray:
        """Item `item` as a read-only view of the mapped file."""
        start = int(self.sequence_pointers[item])
        return self._data[start:start + int(self.sequence_lengths[item]) * self.dtype.itemsize].view(self.dtype)


class PackedReader:
    """Reads packs of a `solo-data pack` output directory; safe to use from DataLoader workers."""

    def __init__(self, directory: str):
        self.directory = os.fspath(directory)
        metadata_path = os.path.join(self.directory, METADATA_FILE)
        if not os.path.isdir(self.directory):
            raise FileNotFoundError(f"packed directory {self.directory} " + (
                "is a file, not a directory" if os.path.exists(self.directory) else "does not exist"))
        if not os.path.exists(metadata_path):
            raise FileNotFoundError(
                f"{self.directory} has no {METADATA_FILE}: not a packed directory, or its pack run has not "
                "finished (rerun the same `solo-data pack` command to complete it)"
            )
        with open(metadata_path, encoding="utf-8") as handle:
            self.metadata = json.load(handle)
        if self.metadata.get("format") != FORMAT_NAME or self.metadata.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{self.directory}: unsupported format {self.metadata.get('format')!r} "
                             f"version {self.metadata.get('format_version')!r}; "
                             f"expected {FORMAT_NAME} v{FORMAT_VERSION}")
        self.seq_length: int = self.metadata["seq_length"]
        self.tokenizer_info: dict = self.metadata["tokenizer"]
        # Relative to the directory (its own copy); packs written before that recorded an absolute path.
        self.tokenizer_dir: str = os.path.join(self.directory, self.tokenizer_info["dir"])
        self.resize_mode: str = self.metadata["resize_mode"]
        # The decoded-pixel cap the images were accepted under: a larger --max-image-pixels must read back.
        self.max_pixels: int = self.metadata["max_pixels"]
        # The per-image patch budget (--max-patches) the grids were made under (None: packed before it existed).
        self.max_patches: Optional[int] = self.metadata.get("max_patches")
        self.vision_patch_id: int = self.tokenizer_info["vision_patch_id"]
        self._datasets = self._image_processor = None

    @property
    def image_processor(self):
        if self._image_processor is None:
            from solo.hf.image_processing_solo import SoloImageProcessor

            budget = {} if self.max_patches is None else {"max_patches": self.max_patches}
            self._image_processor = SoloImageProcessor(resize_mode=self.resize_mode, max_pixels=self.max_pixels,
                                                       **budget)
        return self._image_processor

    def load_tokenizer(self):
        """The tokenizer the packs were made with, checked against the digest recorded at packing."""
        from transformers import AutoTokenizer

        if not os.path.isdir(self.tokenizer_dir):
            raise FileNotFoundError(
                f"{self.directory}: the tokenizer folder {self.tokenizer_dir} recorded at packing is missing; "
                "repack with this version of solo-data (packs keep a copy of their tokenizer)"
            )
        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)
        expected = self.tokenizer_info.get("digest")
        if expected is not None and tokenizer_fingerprint(tokenizer) != expected:
            raise ValueError(
                f"{self.directory}: the tokenizer in {self.tokenizer_dir} (digest {tokenizer_fingerprint(tokenizer)}) "
                f"is not the one the packs were made with (digest {expected}); restore it or repack"
            )
        return tokenizer

    @property
    def datasets(self) -> dict:
        if self._datasets is None:  # opened lazily, so a reader pickles cheaply into workers
            names = PER_PACK_PREFIXES + (IMAGES_PREFIX,)
            self._datasets = {name: IndexedFile(os.path.join(self.directory, name)) for name in names}
            if len(self._datasets["tokens"]) != self.metadata["packs"]:
                raise ValueError(f"{self.directory}: tokens has {len(self._datasets['tokens'])} packs, "
                                 f"metadata says {self.metadata['packs']}")
        return self._datasets

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_datasets"] = state["_image_processor"] = None
        return state

    def __len__(self) -> int:
        return self.metadata["packs"]

    # ---- cheap per-pack metadata (index files only, no .bin reads) -----------------------------

    @property
    def pack_lengths(self) -> np.ndarray:
        """Tokens per pack."""
        return np.array(self.datasets["tokens"].sequence_lengths, dtype=np.int64)

    @property
    def documents_per_pack(self) -> np.ndarray:
        return np.array(self.datasets["cu_seqlens"].sequence_lengths, dtype=np.int64) - 1

    @property
    def images_per_pack(self) -> np.ndarray:
        return np.diff(np.array(self.datasets[IMAGES_PREFIX].document_indices, dtype=np.int64))

    @property
    def image_bytes_per_image(self) -> np.ndarray:
        return np.array(self.datasets[IMAGES_PREFIX].sequence_lengths, dtype=np.int64)

    # ---- one pack ---------------------------------------------------------------------------

    def _check(self, index: int) -> int:
        if not -len(self) <= index < len(self):
            raise IndexError(f"pack {index} out of range for {len(self)} packs")
        return index % len(self) if len(self) else index

    def image_layout(self, index: int) -> np.ndarray:
        """(offset of `<vision>`, rows, cols) per image of pack `index`, int32 [n_images, 3]."""
        return np.array(self.datasets["image_layout"][self._check(index)], dtype=np.int32).reshape(-1, 3)

    def image_bytes(self, index: int) -> list[bytes]:
        """The stored (original, encoded) bytes of the images of pack `index`, in token order."""
        index = self._check(index)
        images = self.datasets[IMAGES_PREFIX]
        first, last = int(images.document_indices[index]), int(images.document_indices[index + 1])
        return [images[int(item)].tobytes() for item in range(first, last)]

    def doc_origin(self, index: int) -> np.ndarray:
        """(input index, record number, piece number) per document piece of pack `index`."""
        return np.array(self.datasets["doc_origin"][self._check(index)], dtype=np.int64).reshape(-1, 3)

    def get(self, index: int, decode_images: bool = True) -> dict[str, np.ndarray]:
        from solo.hf.image_processing_solo import PATCH_DIM  # torch: only where packs are decoded

        index = self._check(index)
        data = self.datasets
        # Copies, never views of the mapped files.
        tokens = np.array(data["tokens"][index], dtype=np.int32)
        loss_mask = np.array(data["loss_mask"][index], dtype=np.uint8)
        cu_seqlens = np.array(data["cu_seqlens"][index], dtype=np.int32)
        layout = self.image_layout(index)
        indices = np.full(len(tokens), -1, dtype=np.int64)
        patch_blocks = []
        next_patch = 0
        blobs = self.image_bytes(index) if decode_images else [None] * len(layout)
        for image_number, ((offset, rows, cols), blob) in enumerate(zip(layout.tolist(), blobs)):
            positions = vpatch_positions(offset, rows, cols)
            if positions[-1] >= len(tokens) or np.any(tokens[positions] != self.vision_patch_id):
                raise ValueError(f"{self.directory}: pack {index} image {image_number} layout "
                                 "does not match its tokens")
            indices[positions] = np.arange(next_patch, next_patch + rows * cols)
            next_patch += rows * cols
            if decode_images:
                patches, grid = self.image_processor.patchify(blob, name=f"pack {index} image {image_number}")
                if grid != (rows, cols):
                    raise ValueError(f"{self.directory}: pack {index} image {image_number} decodes to grid {grid}, "
                                     f"recorded {(rows, cols)}; the image processor changed since packing")
                patch_blocks.append(patches)
        if decode_images:
            patches = np.concatenate(patch_blocks) if patch_blocks else np.zeros((0, PATCH_DIM), np.uint8)
        else:
            patches = np.zeros((0, PATCH_DIM), np.uint8)
        return {"tokens": tokens, "loss_mask": loss_mask, "cu_seqlens": cu_seqlens,
                "patches": patches, "vision_patch_indices": indices, "image_layout": layout}

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self.get(index)
