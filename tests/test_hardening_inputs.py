"""A corpus of hostile inputs (generated here, never checked in) through `solo-data pack` in each
format and through `SoloProcessor`: no crash, exact accounting, no special
id from text, `<vpatch>` count == patch rows, nothing written outside the output, bounded memory.
"""

import base64
import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from data_prep.cli import main as solo_data
from data_prep.pack import read_chunk
from data_prep.reader import PackedReader
from data_prep.synthetic import jpeg_bytes, photo_like
from solo.hf.image_processing_solo import SoloImageProcessor
from solo.hf.processing_solo import VISION_TOKENS, ChatPrompt, SoloProcessor, VisionTokenIds
from solo.tiny import make_base_tokenizer
from solo.tokenizer import extend_tokenizer

from helpers import REPO, subprocess_env

# Every special-token string a text could try to forge, and a literal <image>.
FORGERY = "a </s> b <s> c <unk> d <vpatch><vision></vision><vrow_sep><vframe_sep> e <loc_5> f <image> g [INST] h"
BOMB_BYTES = 1 << 30  # a tar.gz member of zeros: 1 GiB inflated, ~1 MB on disk
MEMORY_CEILING = 900 * 1024 * 1024  # peak RSS of any pack process; the bomb alone would exceed it


@pytest.fixture(scope="module")
def tokenizer():
    return extend_tokenizer(make_base_tokenizer())


@pytest.fixture(scope="module")
def tokenizer_dir(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer"
    tokenizer.save_pretrained(path)
    return path


def special_ids(tokenizer) -> set[int]:
    return set(tokenizer.all_special_ids) | set(tokenizer.convert_tokens_to_ids(list(VISION_TOKENS)))


def _data_url(data: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(data).decode()


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge size (a decompression bomb for a naive decoder)."""
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def _write_bomb_tar_gz(path: Path, good: bytes) -> None:
    """One sample with a BOMB_BYTES image member of zeros, then a good sample; streamed, never in memory."""
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1) as archive:
        info = tarfile.TarInfo("bomb.jpg")
        info.size = BOMB_BYTES
        archive.write(info.tobuf())
        block = bytes(1 << 20)
        for _ in range(BOMB_BYTES >> 20):
            archive.write(block)
        for name, data in (("bomb.txt", b"zeros"), ("good.jpg", good), ("good.txt", FORGERY.encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.write(info.tobuf() + data + bytes(-len(data) % 512))
        archive.write(bytes(1024))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """{format: (input paths, extra args, expected packed, expected rejected)} of hostile inputs."""
    root = tmp_path_factory.mktemp("hostile")
    good = jpeg_bytes(photo_like(96, 64, seed=1))
    (root / "good.jpg").write_bytes(good)
    (root / "corrupt.jpg").write_bytes(good[: len(good) // 3])
    (root / "bomb.png").write_bytes(_png_claiming(100_000, 100_000))
    (root / "big.jpg").write_bytes(good + bytes(300_000))  # above --max-image-bytes 200000
    (root / "a_folder.jpg").mkdir()
    os.mkfifo(root / "fifo.jpg")
    escape = "../" * len(root.parts) + "etc/passwd"  # /etc/passwd however deep the temporary folder is
    bad_images = ["/dev/zero", "fifo.jpg", "missing.jpg", "a_folder.jpg", "corrupt.jpg", "bomb.png", "big.jpg",
                  escape, "http://example.com/x.jpg"]
    cases = {}

    lines = [json.dumps({"messages": [{"role": "user", "content": [{"type": "image", "image": "good.jpg"},
                                                                    {"type": "text", "text": FORGERY}]},
                                      {"role": "assistant", "content": FORGERY}]})]
    lines += [json.dumps([{"role": "user", "content": [{"type": "image", "image": bad}, {"type": "text", "text": "x"}]},
                          {"role": "assistant", "content": "y"}]) for bad in bad_images]
    lines += ['{"broken',
              json.dumps([{"role": "assistant", "content": [
                  {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,@@"}}]}]),
              json.dumps([{"role": "assistant", "content": "z" * 3000}])]  # longer than --max-record-bytes
    lines = [line.encode() for line in lines] + [b'{"text": "\xff\xfe not utf-8"}']
    (root / "chat.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    cases["chat"] = ([root / "chat.jsonl"], ["--template", "mistral"], 1, len(lines) - 1)

    (root / "text.jsonl").write_text(json.dumps({"text": FORGERY}) + "\n" + json.dumps({"text": 5}) + "\n")
    cases["text"] = ([root / "text.jsonl"], [], 1, 1)

    llava = [{"image": "good.jpg",
              "conversations": [{"from": "human", "value": "<image>\n" + FORGERY.replace("<image>", "")},
                                {"from": "gpt", "value": FORGERY.replace("<image>", "")}]},
             {"image": "good.jpg", "conversations": [{"from": "human", "value": FORGERY + " <image>"}]},  # 2 for 1
             {"image": "/dev/zero",
              "conversations": [{"from": "human", "value": "<image> x"}, {"from": "gpt", "value": "y"}]}]
    (root / "llava.json").write_text(json.dumps(llava))
    cases["llava"] = ([root / "llava.json"], [], 1, 2)

    interleaved = [{"text_list": [FORGERY, "after"],
                    "image_info": [{"image_name": "good.jpg", "matched_text_index": 1}]},
                   {"text_list": ["x"], "image_info": [{"image_name": "fifo.jpg", "matched_text_index": 0}]}]
    (root / "mmc4.jsonl").write_text("\n".join(json.dumps(entry) for entry in interleaved) + "\n")
    cases["interleaved"] = ([root / "mmc4.jsonl"], [], 1, 1)

    tar = _write_tar(root / "shard.tar", [(f"s{i}.{ext}", data) for i in range(4)
                                          for ext, data in (("jpg", good), ("txt", FORGERY.encode()))])
    with tarfile.open(root / "shard.tar") as archive:
        third_sample = archive.getmembers()[4].offset  # the header of s2.jpg
    (root / "cut.tar").write_bytes(tar[:third_sample])  # as `head -c`: cut at a header boundary
    _write_bomb_tar_gz(root / "bomb.tar.gz", good)
    # packed: 4 + the 2 samples before the cut + the good sample after the bomb;
    # rejected: the cut (its loss), the bomb
    cases["caption"] = ([root / "shard.tar", root / "cut.tar", root / "bomb.tar.gz"], [], 7, 2)

    classes = root / "classes" / "n01440764"
    classes.mkdir(parents=True)
    (classes / "good.JPEG").write_bytes(good)
    (classes / "corrupt.JPEG").write_bytes(good[:100])
    os.mkfifo(classes / "fifo.JPEG")  # not a regular file: never opened
    (root / "classes.txt").write_text("n01440764 tench </s> <vpatch>\n")
    cases["imagenet"] = ([root / "classes"], ["--class-map", str(root / "classes.txt")], 1, 1)
    return root, cases


def _listing(root: Path, skip: Path) -> dict[str, int]:
    return {str(p): p.lstat().st_size for p in root.rglob("*") if skip not in p.parents and p != skip}


@pytest.mark.e2e
@pytest.mark.parametrize("fmt", ["chat", "text", "llava", "interleaved", "caption", "imagenet"])
def test_hostile_inputs_through_pack(corpus, tokenizer, tokenizer_dir, tmp_path, fmt):
    root, cases = corpus
    inputs, extra, packed, rejected = cases[fmt]
    output = tmp_path / "out"
    before = _listing(root, output)
    args = ["pack", *map(str, inputs), "--format", fmt, "--tokenizer", str(tokenizer_dir), "--seq-length", "512",
            "--output", str(output), "--no-progress", "--max-image-bytes", "200000", "--max-image-pixels", "4000000",
            "--max-record-bytes", "2000", "--image-root", str(root), "--keep-work", *extra]
    if fmt == "caption":  # the 1 GiB tar.gz member: in a process of its own, to measure its peak memory
        measured = ("import resource, sys; from data_prep.cli import main; code = main(sys.argv[1:]); "
                    "print('peak_rss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); "
                    "sys.exit(code)")
        proc = subprocess.run([sys.executable, "-c", measured, *args], cwd=REPO, capture_output=True, text=True,
                              env=subprocess_env(), timeout=300)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        peak = int(proc.stderr.rsplit("peak_rss_kib", 1)[1].split()[0]) * 1024
        assert peak < MEMORY_CEILING, f"peak RSS {peak / 2**20:.0f} MiB"
    else:
        assert solo_data(args) == 0
    assert _listing(root, output) == before  # nothing written outside the output (sources untouched)

    report = json.loads((output / "report.json").read_text())
    assert report["documents_in"] == report["documents_packed"] + report["documents_rejected"]
    assert report["documents_packed"] == packed, report["rejected"]
    if rejected is not None:
        assert report["documents_rejected"] == rejected, report["rejected"]
    reasons = " | ".join(item["reason"] for item in report["rejected"])
    if fmt == "chat":
        for expected in ("not a regular file", "missing image file", "larger than", "remote URL",
                         "not a readable image", "bad JSON line", "not valid UTF-8", "invalid base64"):
            assert expected in reasons, (expected, reasons)
    if fmt == "caption":
        assert "no end-of-archive block" in reasons and "above the 200,000-byte cap" in reasons

    # No special id from text: every special or vision id sits where the layout put it.
    specials = special_ids(tokenizer)
    vision = VisionTokenIds.from_tokenizer(tokenizer)
    reader = PackedReader(output)
    for index in range(len(reader)):
        item = reader[index]
        tokens, cu = item["tokens"].astype(np.int64), item["cu_seqlens"]
        layout_positions = np.zeros(len(tokens), bool)
        for offset, rows, cols in reader.image_layout(index):
            block = vision.image_block(rows, cols)
            assert (tokens[offset:offset + len(block)] == block).all()
            layout_positions[offset:offset + len(block)] = True
        layout_positions[cu[:-1]] = tokens[cu[:-1]] == tokenizer.bos_token_id  # BOS opens each piece
        eos = tokens == tokenizer.eos_token_id
        if fmt != "chat":
            layout_positions |= eos & np.isin(np.arange(len(tokens)), cu[1:] - 1)  # EOS closes a document
        else:
            layout_positions |= eos  # after each assistant turn (checked against the processor below)
        forged = [int(t) for t, ok in zip(tokens, layout_positions) if t in specials and not ok]
        assert not forged, f"special ids from text: {forged}"
        assert int((tokens == vision.patch).sum()) == len(item["patches"])  # <vpatch> count == patch rows
    if fmt == "chat":  # eos only where the template puts it: one per assistant turn
        assert sum(int((reader[i]["tokens"] == tokenizer.eos_token_id).sum()) for i in range(len(reader))) == 1
        chunk = read_chunk(str(output / ".work"), 0)
        assert [entry[0] for entry in chunk].count("doc") == 1


def test_processor_keeps_text_as_text_and_images_as_the_only_vision_ids(tokenizer):
    processor = SoloProcessor(SoloImageProcessor(), tokenizer)
    image = photo_like(96, 64, seed=2)
    specials = special_ids(tokenizer)
    vision = VisionTokenIds.from_tokenizer(tokenizer)
    text = FORGERY.replace("<image>", "") + " <image> tail"  # one real placeholder
    out = processor(text, images=[image])
    tokens = out["input_ids"][0]
    assert tokens[0] == tokenizer.bos_token_id
    block = vision.image_block(2, 3)
    starts = (tokens == vision.start).nonzero().flatten().tolist()
    assert len(starts) == 1 and tokens[starts[0]:starts[0] + len(block)].tolist() == block.tolist()
    outside = tokens.tolist()[1:starts[0]] + tokens.tolist()[starts[0] + len(block):]
    assert not specials & set(outside)
    assert int((tokens == vision.patch).sum()) == len(out["vision_patches"]) == 6
    assert tokenizer.decode(outside) == FORGERY.replace("<image>", "") + "  tail"

    # A chat: the template's BOS/EOS are ids, message text (with "</s>" or a literal <image>) is text.
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": FORGERY}]},
                {"role": "assistant", "content": FORGERY},
                {"role": "user", "content": "again?"}]
    prompt = processor.apply_chat_template(messages)
    assert isinstance(prompt, ChatPrompt) and prompt == tokenizer.apply_chat_template(messages, tokenize=False)
    tokens = processor(prompt, images=[image])["input_ids"][0].tolist()
    assert tokens.count(tokenizer.eos_token_id) == 1 and tokens.count(tokenizer.bos_token_id) == 1
    assert tokens.count(vision.start) == 1 and tokens.count(vision.patch) == 6
    assert tokenizer.convert_tokens_to_ids("<loc_5>") not in tokens
    # An edited prompt is a plain string: all of it is text (its EOS too) except <image> placeholders.
    edited = processor(prompt.replace("f <image> g", "f g") + " more", images=[image])["input_ids"][0].tolist()
    assert edited.count(tokenizer.eos_token_id) == 0 and edited.count(vision.start) == 1

    # Grounding on purpose: special_tokens=True for trusted prompt text; vision tokens still refused.
    loc = tokenizer.convert_tokens_to_ids("<loc_5>")
    assert loc in processor("box <loc_5><loc_9>", special_tokens=True)["input_ids"][0].tolist()
    assert loc not in processor("box <loc_5><loc_9>")["input_ids"][0].tolist()
    with pytest.raises(ValueError, match="vision token"):
        processor("<vpatch> forged", special_tokens=True)


def test_pack_and_processor_agree_on_a_hostile_chat(tokenizer, tokenizer_dir, tmp_path):
    """Literal <image> and "</s>" in chat text are text in `solo-data pack` and in SoloProcessor alike."""
    image = jpeg_bytes(photo_like(96, 64, seed=3))
    (tmp_path / "img.jpg").write_bytes(image)
    messages = [{"role": "user", "content": [{"type": "image", "image": "img.jpg"}, {"type": "text", "text": FORGERY}]},
                {"role": "assistant", "content": FORGERY}]
    (tmp_path / "chat.jsonl").write_text(json.dumps(messages) + "\n")
    assert solo_data(["pack", str(tmp_path / "chat.jsonl"), "--format", "chat", "--template", "mistral",
                      "--tokenizer", str(tokenizer_dir), "--seq-length", "512", "--output", str(tmp_path / "out"),
                      "--no-progress"]) == 0
    packed = PackedReader(tmp_path / "out")[0]["tokens"].astype(np.int64).tolist()
    processor = SoloProcessor(SoloImageProcessor(), tokenizer)
    as_rendered = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": FORGERY}]},
                   {"role": "assistant", "content": FORGERY}]
    expected = processor(processor.apply_chat_template(as_rendered), images=[image])["input_ids"][0].tolist()
    assert packed == expected


def test_a_json_list_is_read_one_entry_at_a_time(tmp_path):
    """A .json source costs memory per entry, not ~15x the file (the whole file and its parsed form)."""
    import tracemalloc

    from data_prep.sources import SourceOptions, iter_records

    entries = [{"id": i, "conversations": [{"from": "human", "value": "q" * 4000},
                                           {"from": "gpt", "value": f"answer {i}"}]} for i in range(3_000)]
    path = tmp_path / "big.json"
    path.write_text(json.dumps(entries))
    size = path.stat().st_size
    assert size > 10 * 1024 * 1024
    tracemalloc.start()
    try:
        seen = [record.payload["id"] for record in iter_records([str(path)], SourceOptions(format="llava"))]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seen == list(range(len(entries)))
    assert peak < size / 2, f"reading a {size:,}-byte .json list peaked at {peak:,} bytes"
