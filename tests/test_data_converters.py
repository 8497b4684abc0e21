"""Source converters on small generated fixtures of every source kind (no downloads)."""

import base64
import gzip
import io
import json
import tarfile

import lz4.frame
import numpy as np
import pytest
import zstandard
from PIL import Image

from data_prep.schema import RejectedInput
from data_prep.sources import (
    FilteredOut,
    SourceOptions,
    expand_inputs,
    iter_records,
    load_class_map,
    record_to_document,
)


def jpeg(width=40, height=30, seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def convert_all(paths, options):
    documents, rejected, filtered = [], [], []
    for record in iter_records(expand_inputs([str(p) for p in paths], options.format), options):
        try:
            documents.append((record, record_to_document(record, options)))
        except RejectedInput as error:
            rejected.append((record.name, error.reason))
        except FilteredOut as error:
            filtered.append(error.subset)
    return documents, rejected, filtered


def layout(document):
    return [("image" if s.is_image else s.role, None if s.is_image else s.text) for s in document.segments]


def add_tar_member(archive, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def test_imagenet_tar_shards_and_class_folders(tmp_path):
    (tmp_path / "mapping.txt").write_text("n01440764 tench, Tinca_tinca\nn01443537 gold-fish\n")
    class_map = load_class_map(str(tmp_path / "mapping.txt"))
    with tarfile.open(tmp_path / "shard-0.tar", "w") as archive:
        add_tar_member(archive, "n01440764_1.JPEG", jpeg(seed=1))
        add_tar_member(archive, "n01443537_7.JPEG", jpeg(seed=2))
        add_tar_member(archive, "n99999999_1.JPEG", jpeg(seed=3))  # not in the map
        add_tar_member(archive, "sample_9.jpg", jpeg(seed=4))
        add_tar_member(archive, "sample_9.cls", b"1")  # webdataset class index
    options = SourceOptions(format="imagenet", class_map=class_map)
    documents, rejected, _ = convert_all([tmp_path / "shard-0.tar"], options)
    assert [layout(d) for _, d in documents] == [
        [("image", None), ("assistant", "tench, Tinca tinca")],
        [("image", None), ("assistant", "gold fish")],
        [("image", None), ("assistant", "gold fish")],
    ]
    assert documents[0][1].segments[0].image == jpeg(seed=1)
    assert rejected == [("shard-0.tar:n99999999_1", "class 'n99999999' is not in the class map")]

    for synset, seed in (("n01443537", 5), ("n01440764", 6)):
        (tmp_path / "folders" / synset).mkdir(parents=True)
        (tmp_path / "folders" / synset / f"{synset}_{seed}.JPEG").write_bytes(jpeg(seed=seed))
    documents, rejected, _ = convert_all([tmp_path / "folders"], options)
    assert [d.segments[1].text for _, d in documents] == ["tench, Tinca tinca", "gold fish"]  # sorted folders
    assert documents[1][1].segments[0].image == jpeg(seed=5)
    assert not rejected

    # --max-image-bytes refuses an image file before reading it, and an inline (data URL) image too.
    small = SourceOptions(format="imagenet", class_map=class_map, max_image_bytes=100)
    documents, rejected, _ = convert_all([tmp_path / "folders"], small)
    assert not documents and len(rejected) == 2
    assert all("above --max-image-bytes 100" in reason for _, reason in rejected)
    (tmp_path / "chat.jsonl").write_text(json.dumps([{"role": "assistant", "content": [
        {"type": "image_url",
         "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(jpeg(seed=7)).decode()}},
        {"type": "text", "text": "x"}]}]) + "\n")
    documents, rejected, _ = convert_all([tmp_path / "chat.jsonl"], SourceOptions(format="chat", max_image_bytes=100))
    assert not documents and "above --max-image-bytes 100" in rejected[0][1]


def test_caption_webdataset_jsonl_and_parquet(tmp_path):
    with tarfile.open(tmp_path / "cc3m-000.tar", "w") as archive:
        add_tar_member(archive, "000/a.jpg", jpeg(seed=1))
        add_tar_member(archive, "000/a.txt", "a dog on a beach".encode())
        add_tar_member(archive, "000/b.jpg", jpeg(seed=2))
        add_tar_member(archive, "000/b.json", json.dumps({"caption": "a red car"}).encode())
        add_tar_member(archive, "000/c.txt", b"caption without image")
    documents, rejected, _ = convert_all([tmp_path / "cc3m-000.tar"], SourceOptions(format="caption"))
    assert [layout(d) for _, d in documents] == [[("image", None), ("assistant", "a dog on a beach")],
                                                 [("image", None), ("assistant", "a red car")]]
    assert documents[1][1].segments[0].image == jpeg(seed=2)
    assert rejected == [("cc3m-000.tar:000/c", "sample has no image member (members: txt)")]

    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "x.png").write_bytes(jpeg(seed=3))
    (tmp_path / "caps.jsonl").write_text(json.dumps({"image": "images/x.png", "caption": "  x marks the spot "}) + "\n")
    documents, _, _ = convert_all([tmp_path / "caps.jsonl"], SourceOptions(format="caption"))
    assert layout(documents[0][1]) == [("image", None), ("assistant", "x marks the spot")]



def test_caption_parquet_with_inline_bytes_and_paths(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "x.png").write_bytes(jpeg(seed=3))
    table = pa.table({"image": [{"bytes": jpeg(seed=4), "path": "p.jpg"}, {"bytes": None, "path": "images/x.png"}],
                      "caption": ["inline bytes", "by path"]})
    pq.write_table(table, tmp_path / "caps.parquet")
    documents, rejected, _ = convert_all([tmp_path / "caps.parquet"], SourceOptions(format="caption"))
    assert [d.segments[0].image for _, d in documents] == [jpeg(seed=4), jpeg(seed=3)]
    assert [d.segments[1].text for _, d in documents] == ["inline bytes", "by path"]


def test_interleaved_mmc4_and_obelics(tmp_path):
    for name, seed in (("i0.jpg", 1), ("i1.jpg", 2)):
        (tmp_path / name).write_bytes(jpeg(seed=seed))
    mmc4 = {"text_list": ["First sentence.", "Second one.", "Third."],
            "image_info": [{"image_name": "i0.jpg", "matched_text_index": 1},
                           {"image_name": "i1.jpg", "matched_text_index": 0}]}
    obelics = {"texts": ["Intro", None, "After the image"], "images": [None, "i0.jpg", None]}
    with open(tmp_path / "docs.jsonl", "w") as handle:
        handle.write(json.dumps(mmc4) + "\n" + json.dumps(obelics) + "\n")
    documents, rejected, _ = convert_all([tmp_path / "docs.jsonl"], SourceOptions(format="interleaved"))
    assert not rejected
    assert layout(documents[0][1]) == [("image", None), ("assistant", "First sentence."), ("image", None),
                                       ("assistant", "Second one. Third.")]
    assert [s.image for s in documents[0][1].segments if s.is_image] == [jpeg(seed=2), jpeg(seed=1)]
    assert layout(documents[1][1]) == [("assistant", "Intro"), ("image", None), ("assistant", "\n\nAfter the image")]


@pytest.mark.parametrize("suffix", ["", ".gz", ".zst", ".lz4"])
def test_text_jsonl_compressed_with_subset_filter(tmp_path, suffix):
    lines = [{"text": "kept book text", "meta": {"redpajama_set_name": "RedPajamaBook"}},
             {"text": "web crawl", "meta": {"redpajama_set_name": "RedPajamaCommonCrawl"}},
             {"text": "c4 text", "meta": {"redpajama_set_name": "RedPajamaC4"}},
             {"text": "wiki text", "meta": {"redpajama_set_name": "RedPajamaWikipedia"}}]
    raw = "".join(json.dumps(line) + "\n" for line in lines).encode()
    compress = {"": lambda b: b, ".gz": gzip.compress, ".zst": zstandard.ZstdCompressor().compress,
                ".lz4": lz4.frame.compress}[suffix]
    path = tmp_path / f"chunk_0.jsonl{suffix}"
    path.write_bytes(compress(raw))
    options = SourceOptions(format="text", exclude_subsets=("RedPajamaCommonCrawl", "RedPajamaC4"))
    documents, rejected, filtered = convert_all([path], options)
    assert [d.segments[0].text for _, d in documents] == ["kept book text", "wiki text"]
    assert filtered == ["RedPajamaCommonCrawl", "RedPajamaC4"] and not rejected


def test_llava_json_roles_and_placeholders(tmp_path):
    (tmp_path / "coco").mkdir()
    (tmp_path / "coco" / "1.jpg").write_bytes(jpeg(seed=1))
    entries = [
        {"id": "a", "image": "coco/1.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "Noise."}]},
        {"id": "b", "image": "coco/1.jpg", "conversations": [  # no placeholder: image goes first
            {"from": "human", "value": "Describe."}, {"from": "gpt", "value": "Pixels."}]},
        {"id": "c", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"id": "d", "conversations": [{"from": "robot", "value": "beep"}]},
    ]
    (tmp_path / "llava.json").write_text(json.dumps(entries))
    documents, rejected, _ = convert_all([tmp_path / "llava.json"], SourceOptions(format="llava"))
    assert [layout(d) for _, d in documents] == [
        [("image", None), ("user", "What is shown?"), ("assistant", "Noise.")],
        [("image", None), ("user", "Describe."), ("assistant", "Pixels.")],
        [("user", "Hi"), ("assistant", "Hello")],
    ]
    assert documents[0][1].segments[0].role == "user"
    assert rejected == [("llava.json:3 (id d)", "unknown role 'robot'; expected human, gpt or system")]


def test_openai_chat_jsonl_solo_interchange_format(tmp_path):
    data_url = "data:image/jpeg;base64," + base64.b64encode(jpeg(seed=7)).decode()  # SOLO's form
    (tmp_path / "local.jpg").write_bytes(jpeg(seed=8))
    lines = [
        [{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": data_url}},
                                           {"type": "text", "text": "a caption"}]}],
        {"conversations": [{"role": "user", "content": "question"}, {"role": "assistant", "content": "answer"}]},
        {"role": "assistant", "content": [{"type": "image", "image": "local.jpg"}]},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"},
                      {"role": "assistant", "content": "a"}]},
    ]
    with lz4.frame.open(tmp_path / "solo.jsonl.lz4", "wb") as handle:
        handle.write("".join(json.dumps(line) + "\n" for line in lines).encode())
    documents, rejected, _ = convert_all([tmp_path / "solo.jsonl.lz4"], SourceOptions(format="chat"))
    assert not rejected
    assert documents[0][1].segments[0].image == jpeg(seed=7)
    assert layout(documents[1][1]) == [("user", "question"), ("assistant", "answer")]
    assert documents[2][1].segments[0].image == jpeg(seed=8)
    assert layout(documents[3][1]) == [("system", "be brief"), ("user", "q"), ("assistant", "a")]


def test_unreadable_json_file_is_one_rejected_record(tmp_path):
    (tmp_path / "broken.json").write_text('[{"id": 1, "conversations": [')
    documents, rejected, _ = convert_all([tmp_path / "broken.json"], SourceOptions(format="llava"))
    assert not documents and len(rejected) == 1 and rejected[0][1].startswith("file is not valid JSON")


def test_folder_of_webdataset_shards_skips_img2dataset_side_files(tmp_path):
    shards = tmp_path / "capsfusion"
    shards.mkdir()
    for index in (1, 0):
        with tarfile.open(shards / f"0000{index}.tar", "w") as archive:
            add_tar_member(archive, f"0000{index}0000.jpg", jpeg(seed=index))
            add_tar_member(archive, f"0000{index}0000.txt", f"caption {index}".encode())
        (shards / f"0000{index}_stats.json").write_text('{"count": 1}')
        (shards / f"0000{index}.parquet").write_bytes(b"PAR1 metadata rows")
    assert expand_inputs([str(shards)], "caption") == [str(shards / "00000.tar"), str(shards / "00001.tar")]
    documents, rejected, _ = convert_all([shards], SourceOptions(format="caption"))
    assert [d.segments[1].text for _, d in documents] == ["caption 0", "caption 1"] and not rejected
