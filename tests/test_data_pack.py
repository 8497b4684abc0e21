"""`solo-data pack` invariants: limits, boundaries, loss masks, patches, splitting, bad inputs, accounting.

Every packed document is checked against an independent re-implementation of the token layout
(BOS, text tokens / image blocks, EOS) built here from the source records with literal formulas:
the image block and the (c, y, x) raster cut of the patches are written out here, not taken from
the production layout functions, so a layout change there fails these tests. Only the patch grid
comes from the image processor's `fit_grid` (its rule is tested on literal sizes in
test_image_processing.py).
"""

import base64
import io
import json
import tarfile
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image

from data_prep.cli import main as solo_data
from data_prep.encode import plan_pieces
from data_prep.reader import PackedReader
from solo.hf.image_processing_solo import fit_grid


def image_bytes(width, height, seed, fmt="JPEG"):
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


def data_url(data):
    return "data:image/jpeg;base64," + base64.b64encode(data).decode()


def pack(tokenizer_dir, inputs, output, seq_length, fmt="chat", extra=()):
    argv = ["pack", *map(str, inputs), "--format", fmt, "--tokenizer", tokenizer_dir,
            "--seq-length", str(seq_length), "--output", str(output), "--no-progress", *extra]
    assert solo_data(argv) == 0
    with open(output / "report.json") as handle:
        return json.load(handle)


class Vision:
    """The vision token ids, looked up by name."""

    def __init__(self, tokenizer):
        self.start, self.patch, self.row_sep, self.end = tokenizer.convert_tokens_to_ids(
            ["<vision>", "<vpatch>", "<vrow_sep>", "</vision>"])


def literal_image_block(tokenizer, rows, cols):
    """<vision>, rows of cols <vpatch> separated by <vrow_sep> (none after the last), </vision>."""
    ids = Vision(tokenizer)
    block = [ids.start]
    for row in range(rows):
        block += [ids.patch] * cols + ([ids.row_sep] if row < rows - 1 else [])
    return block + [ids.end]


def literal_patches(data):
    """Decode, resize to the fit grid (bilinear), cut 32x32 patches in raster order, each (c, y, x)."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    rows, cols = fit_grid(image.width, image.height)
    if image.size != (cols * 32, rows * 32):
        image = image.resize((cols * 32, rows * 32), Image.Resampling.BILINEAR)
    pixels = np.asarray(image)
    patches = [pixels[r * 32:(r + 1) * 32, c * 32:(c + 1) * 32, :].transpose(2, 0, 1).reshape(-1)
               for r in range(rows) for c in range(cols)]
    return np.stack(patches), (rows, cols)


def expected_document(tokenizer, segments, loss_roles=("assistant",)):
    """Our layout rule, written independently: BOS, segments, EOS; loss on trainable text and EOS."""
    tokens, loss, patches = [tokenizer.bos_token_id], [0], []
    for role, kind, value in segments:
        if kind == "image":
            image_patches, (rows, cols) = literal_patches(value)
            block = literal_image_block(tokenizer, rows, cols)
            tokens += block
            loss += [0] * len(block)
            patches.append(image_patches)
        else:
            text_ids = tokenizer(value, add_special_tokens=False)["input_ids"]
            tokens += text_ids
            loss += [int(role in loss_roles)] * len(text_ids)
    tokens.append(tokenizer.eos_token_id)
    loss.append(1)
    return np.array(tokens), np.array(loss), (np.concatenate(patches) if patches else np.zeros((0, 3072), np.uint8))


def check_packed(directory, tokenizer, expected, seq_length):
    """Check every pack invariant and that each record's pieces reassemble to `expected[record]`."""
    reader = PackedReader(directory)
    ids = Vision(tokenizer)
    vision_ids = [ids.start, ids.patch, ids.row_sep, ids.end]
    report = json.load(open(f"{directory}/report.json"))
    pieces = defaultdict(dict)
    total_tokens = 0
    for index in range(len(reader)):
        pack = reader[index]
        tokens, loss, cu, vpi, patches = (pack[k] for k in ("tokens", "loss_mask", "cu_seqlens",
                                                             "vision_patch_indices", "patches"))
        assert tokens.dtype == np.int32 and loss.dtype == np.uint8 and cu.dtype == np.int32
        assert vpi.dtype == np.int64 and patches.dtype == np.uint8 and patches.shape[1] == 3072
        assert len(tokens) <= seq_length == reader.seq_length
        assert cu[0] == 0 and cu[-1] == len(tokens) and np.all(np.diff(cu) > 0)
        assert np.array_equal(vpi >= 0, tokens == ids.patch)
        assert np.array_equal(vpi[vpi >= 0], np.arange(len(patches)))  # each patch used once, in order
        assert not loss[np.isin(tokens, vision_ids)].any()  # never loss on vision tokens
        total_tokens += len(tokens)
        for doc, origin in enumerate(reader.doc_origin(index)):
            span = slice(cu[doc], cu[doc + 1])
            doc_tokens, doc_loss, doc_vpi = tokens[span], loss[span], vpi[span]
            assert doc_tokens[0] == tokenizer.bos_token_id and doc_loss[0] == 0
            assert (doc_tokens == ids.start).sum() == (doc_tokens == ids.end).sum()  # whole image blocks only
            starts, ends = np.flatnonzero(doc_tokens == ids.start), np.flatnonzero(doc_tokens == ids.end)
            assert np.all(starts < ends)
            doc_patches = patches[doc_vpi[doc_vpi >= 0]]
            key = (int(origin[0]), int(origin[1]))
            assert int(origin[2]) not in pieces[key], "a piece was packed twice"
            pieces[key][int(origin[2])] = (doc_tokens, doc_loss, doc_patches)
    assert total_tokens == report["tokens"] and len(reader) == report["packs"]
    assert report["documents_in"] == report["documents_packed"] + report["documents_rejected"]
    assert report["documents_packed"] == len(pieces)
    for key, (want_tokens, want_loss, want_patches) in expected.items():
        got = pieces.pop(key)
        assert sorted(got) == list(range(len(got)))
        ordered = [got[number] for number in range(len(got))]
        for number, (piece_tokens, _, _) in enumerate(ordered):
            is_last = number == len(ordered) - 1
            assert (piece_tokens[-1] == tokenizer.eos_token_id) == is_last  # EOS only where the document ends
        body = np.concatenate([ordered[0][0]] + [t[1:] for t, _, _ in ordered[1:]])  # drop repeated BOS
        body_loss = np.concatenate([ordered[0][1]] + [m[1:] for _, m, _ in ordered[1:]])
        assert np.array_equal(body, want_tokens), f"record {key}: tokens differ"
        assert np.array_equal(body_loss, want_loss), f"record {key}: loss mask differs"
        assert np.array_equal(np.concatenate([p for _, _, p in ordered]), want_patches), f"record {key}: patches"
    assert not pieces, f"packed documents nobody expected: {sorted(pieces)}"
    return reader, report


def test_pack_invariants_patches_loss_and_accounting(tmp_path, tokenizer_dir, tokenizer):
    rng = np.random.default_rng(0)
    records, expected, source_images = [], {}, []
    for number in range(60):
        kind = number % 4
        image = image_bytes(int(rng.integers(20, 200)), int(rng.integers(20, 200)), seed=number)
        if kind == 0:  # caption
            segments = [("assistant", "image", image), ("assistant", "text", f"caption {number} of a cat")]
        elif kind == 1:  # question/answer: user turn carries no loss
            segments = [("user", "image", image), ("user", "text", f"what is in picture {number}?"),
                        ("assistant", "text", "the answer is yes")]
        elif kind == 2:  # text only
            segments = [("assistant", "text", "the quick brown fox " * int(rng.integers(1, 20)))]
        else:  # two images, interleaved
            other = image_bytes(int(rng.integers(20, 120)), int(rng.integers(20, 120)), seed=1000 + number)
            segments = [("assistant", "text", "before"), ("assistant", "image", image),
                        ("assistant", "text", "between"), ("assistant", "image", other), ("assistant", "text", "end")]
        messages = []
        for role, kind_, value in segments:
            item = ({"type": "text", "text": value} if kind_ == "text"
                    else {"type": "image_url", "image_url": {"url": data_url(value)}})
            if messages and messages[-1]["role"] == role:
                messages[-1]["content"].append(item)
            else:
                messages.append({"role": role, "content": [item]})
        records.append(json.dumps(messages))
        source_images += [value for _, kind_, value in segments if kind_ == "image"]
        expected[(0, number)] = expected_document(tokenizer, segments)
    (tmp_path / "chat.jsonl").write_text("\n".join(records) + "\n")
    report = pack(tokenizer_dir, [tmp_path / "chat.jsonl"], tmp_path / "out", 512)
    reader, report = check_packed(tmp_path / "out", tokenizer, expected, 512)
    assert report["documents_in"] == 60 and report["documents_rejected"] == 0
    assert report["images"] == len(source_images) == 60  # 15 captions, 15 questions, 15 with two images
    assert report["documents_split"] == 0 and report["fill"] > 0.9
    assert reader.images_per_pack.sum() == 60 and reader.documents_per_pack.sum() == 60
    # images are stored as their original bytes (no re-encoding), each exactly once
    stored = sorted(bytes(b) for i in range(len(reader)) for b in reader.image_bytes(i))
    assert stored == sorted(source_images)
    assert report["image_bytes"] == sum(map(len, source_images)) == reader.image_bytes_per_image.sum()


def test_split_of_overlong_text_and_many_image_documents(tmp_path, tokenizer_dir, tokenizer):
    long_text = " ".join(f"word{i}" for i in range(400))  # hundreds of tokens, limit 64
    images = [image_bytes(64, 64, seed=s) for s in range(8)]  # 2x2 grid: 7 tokens each
    segments_many = []
    for index, data in enumerate(images):
        segments_many += [("assistant", "image", data), ("assistant", "text", f"picture {index} shows noise")]
    segments_text = [("assistant", "text", long_text)]
    segments_images_only = [("assistant", "image", data) for data in images] + [("assistant", "text", "eight")]
    lines = []
    for segments in (segments_text, segments_many, segments_images_only):
        content = [{"type": "text", "text": v} if k == "text"
                   else {"type": "image_url", "image_url": {"url": data_url(v)}}
                   for _, k, v in segments]
        lines.append(json.dumps([{"role": "assistant", "content": content}]))
    (tmp_path / "long.jsonl").write_text("\n".join(lines) + "\n")
    expected = {(0, n): expected_document(tokenizer, s)
                for n, s in enumerate((segments_text, segments_many, segments_images_only))}
    for seq_length in (24, 64):
        output = tmp_path / f"out{seq_length}"
        report = pack(tokenizer_dir, [tmp_path / "long.jsonl"], output, seq_length)
        reader, report = check_packed(output, tokenizer, expected, seq_length)
        # at 64 the images-only document (8 x 7 image tokens + text) still fits whole
        assert report["documents_split"] == (3 if seq_length == 24 else 2) and report["pieces"] > 6
        assert report["documents_rejected"] == 0 and report["max_pack_length"] <= seq_length
        vision = Vision(tokenizer)
        # the trailing-image rule: a piece that still has text never ends with an image block
        for index in range(len(reader)):
            pack_ = reader.get(index, decode_images=False)
            for end in pack_["cu_seqlens"][1:]:
                if pack_["tokens"][end - 1] == vision.end:
                    doc_start = pack_["cu_seqlens"][np.searchsorted(pack_["cu_seqlens"], end) - 1]
                    piece = pack_["tokens"][doc_start:end]
                    text = ~np.isin(piece[1:], [vision.start, vision.patch, vision.row_sep, vision.end])
                    assert not text.any(), "piece with text ends with an image"


def test_plan_pieces_rule():
    # body of 20 tokens, images at [3, 10) and [12, 19); pieces hold BOS + body (+ EOS at the end)
    spans = [(3, 10), (12, 19)]
    assert plan_pieces(20, spans, 1, 22) == [(0, 20, True)]
    pieces = plan_pieces(20, spans, 1, 10)
    assert pieces[-1][2] and all(not last for *_, last in pieces[:-1])
    assert [p[:2] for p in pieces] == [(0, 3), (3, 12), (12, 20)]  # never inside an image block
    for start, end, last in pieces:
        assert 1 + end - start + (1 if last else 0) <= 10
        assert not any(s < start < e or s < end < e for s, e in spans)
    assert pieces[0][1] == 3  # piece (0, 10) would end with the image: it moves to the next piece
    with pytest.raises(RuntimeError):
        plan_pieces(20, [(0, 15)], 1, 10)  # an image longer than the limit cannot be split


def test_every_bad_input_is_rejected_with_a_reason(tmp_path, tokenizer_dir, tokenizer):
    good = image_bytes(60, 40, seed=1)
    jpeg = image_bytes(120, 90, seed=2)
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "ok.jpg").write_bytes(good)

    def image(url):
        return {"type": "image_url", "image_url": {"url": url}}

    cases = [
        ("good", [{"role": "assistant", "content": [image("ok.jpg"), {"type": "text", "text": "fine"}]}], None),
        ("corrupt", [{"role": "assistant", "content": [image(data_url(b"\xff\xd8\xff garbage bytes"))]}],
         "not a readable image"),
        ("truncated", [{"role": "assistant", "content": [image(data_url(jpeg[: len(jpeg) // 2]))]}],
         "cannot decode image"),
        ("oversized", [{"role": "assistant", "content": [image(data_url(image_bytes(300, 300, 3)))]}],
         "exceeds the decoded-pixel cap"),
        ("unknown role", [{"role": "narrator", "content": "x"}], "unknown role 'narrator'"),
        ("empty doc", [{"role": "assistant", "content": []}], "empty document"),
        ("empty text", [{"role": "assistant", "content": "   "}], "empty document"),
        ("missing file", [{"role": "assistant", "content": [image("nowhere/gone.jpg")]}], "missing image file"),
        ("empty file", [{"role": "assistant", "content": [image("empty.jpg")]}], "empty file (0 bytes)"),
        ("bad base64", [{"role": "assistant", "content": [image("data:image/jpeg;base64,@@@")]}], "invalid base64"),
        ("remote", [{"role": "assistant", "content": [image("http://example.com/a.jpg")]}], "remote URL"),
        ("good2", [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], None),
    ]
    lines = [json.dumps(messages).encode() for _, messages, _ in cases]
    lines.insert(3, b'{"role": "assistant", "content": [broken json')  # bad JSON line
    lines.insert(5, '[{"role": "assistant", "content": "caf\u00e9"}]'.encode("latin-1"))  # non-UTF-8
    (tmp_path / "bad.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    report = pack(tokenizer_dir, [tmp_path / "bad.jsonl"], tmp_path / "out", 256,
                  extra=["--max-image-pixels", "40000"])
    reasons = {item["input"]: item["reason"] for item in report["rejected"]}
    assert report["documents_in"] == len(lines) == 14
    assert report["documents_packed"] == 2 and report["documents_rejected"] == 12
    kinds = report["rejected_by_kind"]
    assert sum(kinds.values()) == 12 and kinds["empty document"] == 2
    assert kinds["bad JSON line"] == kinds["missing image file"] == kinds["not valid UTF-8 text"] == 1
    assert "bad JSON line" in reasons["bad.jsonl:4"]
    assert "not valid UTF-8" in reasons["bad.jsonl:6"]
    expected_reasons = [reason for _, _, reason in cases if reason]
    line_of = [i + 1 for i, line in enumerate(lines) if line in [json.dumps(m).encode() for _, m, r in cases if r]]
    for line, reason in zip(line_of, expected_reasons):
        assert reason in reasons[f"bad.jsonl:{line}"], (line, reasons)
    reader = PackedReader(tmp_path / "out")  # the run completed
    assert reader.max_pixels == 40000  # images are read back under the cap they were accepted with
    assert sum(len(reader[i]["patches"]) for i in range(len(reader))) > 0


def test_truncated_tar_shard_keeps_earlier_samples(tmp_path, tokenizer_dir):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for index in range(6):
            for ext, data in (("jpg", image_bytes(50, 50, index)), ("txt", f"caption {index}".encode())):
                info = tarfile.TarInfo(f"{index:04d}.{ext}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    raw = buffer.getvalue()
    (tmp_path / "shard.tar").write_bytes(raw[: int(len(raw) * 0.7)])
    report = pack(tokenizer_dir, [tmp_path / "shard.tar"], tmp_path / "out", 256, fmt="caption")
    assert report["documents_packed"] >= 3 and report["documents_rejected"] == 1
    assert "truncated or corrupt" in report["rejected"][0]["reason"]
    assert report["documents_in"] == report["documents_packed"] + report["documents_rejected"]


def test_mistral_template_matches_chat_template_and_masks_user(tmp_path, tokenizer_dir, tokenizer):
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "image_url",
                                              "image_url": {"url": data_url(image_bytes(64, 32, 5))}},
                                             {"type": "text", "text": "what is it?"}]},
                {"role": "assistant", "content": "noise"},
                {"role": "user", "content": "sure?"},
                {"role": "assistant", "content": "yes"}]
    ending_with_user = messages[:2]
    (tmp_path / "sft.jsonl").write_text(json.dumps(messages) + "\n" + json.dumps(ending_with_user) + "\n")
    for loss_on_user in (False, True):  # user turns carry no loss unless configured
        output = tmp_path / f"out{loss_on_user}"
        report = pack(tokenizer_dir, [tmp_path / "sft.jsonl"], output, 256,
                      extra=["--template", "mistral"] + (["--loss-on-user"] if loss_on_user else []))
        assert report["documents_rejected"] == 1 and "assistant turn" in report["rejected"][0]["reason"]
        pack_ = PackedReader(output)[0]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
        block = tokenizer.decode(literal_image_block(tokenizer, 1, 2))
        assert tokenizer.decode(pack_["tokens"]) == rendered.replace("<image>", block)
        trained = tokenizer.decode(pack_["tokens"][pack_["loss_mask"] == 1])
        eos = tokenizer.eos_token
        # exactly the tokens the inference processor makes of the rendered conversation
        from solo.hf.image_processing_solo import SoloImageProcessor
        from solo.hf.processing_solo import SoloProcessor

        processor = SoloProcessor(SoloImageProcessor(), tokenizer)
        prompt = processor.apply_chat_template(messages)  # knows its template markers: </s> ends a turn
        assert prompt == rendered
        expected = processor(text=prompt, images=[image_bytes(64, 32, 5)])["input_ids"][0].numpy()
        assert np.array_equal(pack_["tokens"], expected)
        if loss_on_user:  # a user token that starts with the marker's space is trained as a user token
            assert trained == f"what is it? noise{eos} sure? yes{eos}"
        else:
            assert trained == f" noise{eos} yes{eos}"


def test_subset_filter_is_accounted_apart_from_rejections(tmp_path, tokenizer_dir):
    lines = [{"text": f"book {i}", "meta": {"redpajama_set_name": "RedPajamaBook"}} for i in range(3)]
    lines += [{"text": f"crawl {i}", "meta": {"redpajama_set_name": "RedPajamaCommonCrawl"}} for i in range(4)]
    lines += [{"text": f"c4 {i}", "meta": {"redpajama_set_name": "RedPajamaC4"}} for i in range(2)]
    lines += [{"meta": {"redpajama_set_name": "RedPajamaBook"}}]  # no text: rejected
    (tmp_path / "slim.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    report = pack(tokenizer_dir, [tmp_path / "slim.jsonl"], tmp_path / "out", 64, fmt="text",
                  extra=["--exclude-subset", "RedPajamaCommonCrawl", "--exclude-subset", "RedPajamaC4"])
    assert report["filtered_by_subset"] == {"RedPajamaC4": 2, "RedPajamaCommonCrawl": 4}
    assert report["documents_filtered"] == 6
    assert (report["documents_in"], report["documents_packed"], report["documents_rejected"]) == (4, 3, 1)
    reader = PackedReader(tmp_path / "out")
    assert reader.images_per_pack.sum() == 0 and reader[0]["patches"].shape == (0, 3072)


def test_best_fit_packer_reaches_fill_targets_with_bounded_memory():
    from data_prep.packing import BestFitPacker
    from data_prep.synthetic import solo_like_lengths

    for seq_length, target in ((32768, 0.995), (4096, 0.99)):
        lengths = solo_like_lengths(40_000, seq_length, seed=3)
        packer = BestFitPacker(seq_length, window_items=4096, carry_packs=64)
        packs, held = [], 0
        for index, length in enumerate(lengths.tolist()):
            packs += packer.add(length, index)
            held = max(held, len(packer._window) + sum(len(p.items) for p in packer._open.values()))
        packs += packer.flush()
        assert sorted(i for p in packs for _, _, i in p.items) == list(range(len(lengths)))  # each once
        assert max(p.length for p in packs) <= seq_length
        fill = lengths.sum() / (len(packs) * seq_length)
        assert fill >= target, (seq_length, fill)
        # held at any time: one window plus the carried packs' documents, not the dataset
        assert held <= 4096 + 64 * max(len(p.items) for p in packs) < len(lengths)


def test_interleaved_and_imagenet_sources_pack_end_to_end(tmp_path, tokenizer_dir, tokenizer):
    images = {f"i{n}.png": image_bytes(40 + 10 * n, 64, seed=100 + n, fmt="PNG") for n in range(4)}
    for name, data in images.items():
        (tmp_path / name).write_bytes(data)
    mmc4 = {"text_list": ["A first sentence.", "A second one.", "The end."],
            "image_info": [{"image_name": "i0.png", "matched_text_index": 1},
                           {"image_name": "i1.png", "matched_text_index": 1},
                           {"image_name": "i2.png", "matched_text_index": 2}]}
    (tmp_path / "mmc4.jsonl").write_text(json.dumps(mmc4) + "\n")
    pack(tokenizer_dir, [tmp_path / "mmc4.jsonl"], tmp_path / "mmc4", 256, fmt="interleaved")
    segments = [("assistant", "text", "A first sentence."), ("assistant", "image", images["i0.png"]),
                ("assistant", "image", images["i1.png"]), ("assistant", "text", "A second one."),
                ("assistant", "image", images["i2.png"]), ("assistant", "text", "The end.")]
    check_packed(tmp_path / "mmc4", tokenizer, {(0, 0): expected_document(tokenizer, segments)}, 256)

    (tmp_path / "map.txt").write_text("n01440764 tench\nn01443537 goldfish\n")
    with tarfile.open(tmp_path / "in21k-0000.tar", "w") as archive:
        for key, name in (("n01443537_5", "i3.png"), ("n01440764_9", "i0.png")):
            info = tarfile.TarInfo(f"{key}.png")
            info.size = len(images[name])
            archive.addfile(info, io.BytesIO(images[name]))
    pack(tokenizer_dir, [tmp_path / "in21k-0000.tar"], tmp_path / "in21k", 256, fmt="imagenet",
         extra=["--class-map", str(tmp_path / "map.txt")])
    expected = {(0, 0): expected_document(tokenizer, [("assistant", "image", images["i3.png"]),
                                                      ("assistant", "text", "goldfish")]),
                (0, 1): expected_document(tokenizer, [("assistant", "image", images["i0.png"]),
                                                      ("assistant", "text", "tench")])}
    check_packed(tmp_path / "in21k", tokenizer, expected, 256)
