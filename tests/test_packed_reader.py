"""The packed directory's numpy reader: the same items as megatron-core's reader, damage named."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from data_prep.cli import main as solo_data
from data_prep.packed_format import (IMAGES_PREFIX, PER_PACK_PREFIXES, image_span, import_indexed_dataset,
                                    vpatch_positions)
from data_prep.reader import IndexedFile, PackedReader
from data_prep.stats import compute_stats
from solo.hf.image_processing_solo import image_tokens_count
from helpers import jpeg


@pytest.fixture(scope="module")
def packed(tmp_path_factory, tokenizer_dir):
    """Two packed directories: captions with images, and text only (an empty images.bin)."""
    root = tmp_path_factory.mktemp("packed_reader")
    captions = [{"image": f"img{i}.jpg", "caption": f"picture {i} " * (1 + i % 4)} for i in range(9)]
    for i in range(9):
        (root / f"img{i}.jpg").write_bytes(jpeg(40 + 9 * i, 70 - 3 * i, i))
    (root / "captions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in captions))
    (root / "text.jsonl").write_text("".join(json.dumps({"text": "word " * (5 + 7 * i)}) + "\n" for i in range(11)))
    for name, fmt in (("captions", "caption"), ("text", "text")):
        assert solo_data(["pack", str(root / f"{name}.jsonl"), "--format", fmt, "--tokenizer", tokenizer_dir,
                          "--seq-length", "96", "--output", str(root / name), "--no-progress"]) == 0
    return root


@pytest.mark.parametrize("name", ["captions", "text"])
def test_numpy_reader_reads_what_megatron_core_reads(packed, name):
    indexed_dataset = import_indexed_dataset()
    for prefix in PER_PACK_PREFIXES + (IMAGES_PREFIX,):
        path = str(packed / name / prefix)
        ours = IndexedFile(path)
        bin_size = (packed / name / f"{prefix}.bin").stat().st_size
        theirs = indexed_dataset.IndexedDataset(path, mmap=bin_size > 0)
        assert ours.dtype == np.dtype(theirs.index.dtype) and len(ours) == len(theirs)
        assert np.array_equal(ours.sequence_lengths, theirs.sequence_lengths)
        assert np.array_equal(ours.document_indices, theirs.document_indices)
        for item in range(len(theirs)):
            assert ours[item].dtype == theirs[item].dtype and np.array_equal(ours[item], theirs[item])
    images = IndexedFile(str(packed / name / IMAGES_PREFIX))
    assert (len(images) == 9) if name == "captions" else (len(images) == 0 and images.document_indices[-1] == 0)


def test_damaged_files_are_named_by_stats(packed, tmp_path, capsys):
    def damaged(case, file, change):
        directory = tmp_path / case
        shutil.copytree(packed / "captions", directory)
        change(directory / file)
        assert solo_data(["stats", str(directory)]) == 2
        return capsys.readouterr().err

    def truncate(size):
        return lambda path: path.write_bytes(path.read_bytes()[:size])

    error = damaged("magic", "tokens.idx", lambda path: path.write_bytes(b"not an index" + path.read_bytes()))
    assert "tokens.idx is not a megatron-core index file (bad header); repack" in error
    assert "loss_mask.idx is truncated" in damaged("short_index", "loss_mask.idx", truncate(40))
    assert "images.bin is truncated" in damaged("short_data", "images.bin", truncate(100))
    assert "doc_origin.bin is missing" in damaged("missing", "doc_origin.bin", lambda path: path.unlink())
    assert "solo-data stats: error:" in damaged("header_only", "cu_seqlens.idx", truncate(20))


def test_image_span_is_the_processors_token_count(packed, tokenizer):
    rows, cols = np.meshgrid(np.arange(1, 33), np.arange(1, 33))
    assert np.array_equal(image_span(rows, cols), [[image_tokens_count(r, c) for r, c in zip(*line)]
                                                   for line in zip(rows, cols)])
    assert vpatch_positions(10, 2, 3).tolist() == [11, 12, 13, 15, 16, 17]  # <vision> at 10, <vrow_sep> at 14
    reader = PackedReader(packed / "captions")
    vision_ids = tokenizer.convert_tokens_to_ids(["<vision>", "<vpatch>", "<vrow_sep>", "</vision>"])
    vision_tokens = sum(int(np.isin(reader[i]["tokens"], vision_ids).sum()) for i in range(len(reader)))
    sources = compute_stats(str(packed / "captions"))["sources"]
    assert sum(source["vision_tokens"] for source in sources) == vision_tokens > 0
