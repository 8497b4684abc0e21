"""`solo-data plan` (mixtures), `solo-data stats` and `solo-data preview` on real packed directories."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from data_prep.cli import main as solo_data
from data_prep.mixture import largest_remainder, plan_mixture
from data_prep.preview import pack_segments
from data_prep.reader import PackedReader
from data_prep.stats import compute_stats
from solo.hf.image_processing_solo import image_to_patches, load_image, unpatchify
from solo.tiny import make_base_tokenizer
from solo.tokenizer import extend_tokenizer


def jpeg(width, height, seed):
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools")
    tokenizer = extend_tokenizer(make_base_tokenizer())
    tokenizer.save_pretrained(root / "tokenizer")
    (root / "img").mkdir()
    captions = []
    for index in range(30):
        (root / "img" / f"{index}.jpg").write_bytes(jpeg(40 + index * 3, 50, index))
        captions.append(json.dumps({"image": f"img/{index}.jpg", "caption": f"caption number {index}"}))
    (root / "a.jsonl").write_text("\n".join(captions[:20]) + "\n")
    (root / "b.jsonl").write_text("\n".join(captions[20:]) + "\n")
    (root / "text.jsonl").write_text("".join(json.dumps({"text": "word " * (5 + 7 * i)}) + "\n" for i in range(40)))
    common = ["--tokenizer", str(root / "tokenizer"), "--seq-length", "128", "--no-progress"]
    assert solo_data(["pack", str(root / "a.jsonl"), str(root / "b.jsonl"), "--format", "caption",
                      "--output", str(root / "captions"), *common]) == 0
    assert solo_data(["pack", str(root / "text.jsonl"), "--format", "text",
                      "--output", str(root / "text"), *common]) == 0
    return root


def test_plan_counts_add_up_and_follow_weights(packed, capsys):
    (packed / "mix.yaml").write_text("datasets:\n  - {path: captions, weight: 3}\n  - {path: text, weight: 1}\n")
    captions, text = PackedReader(packed / "captions"), PackedReader(packed / "text")
    plan = plan_mixture(str(packed / "mix.yaml"), 4, epochs=2)
    total = len(captions) + len(text)
    assert plan["iterations"] == -(-2 * total // 4) and plan["samples"] == plan["iterations"] * 4
    counts = [source["samples"] for source in plan["sources"]]
    assert sum(counts) == plan["samples"] and abs(counts[0] - 0.75 * plan["samples"]) < 1
    assert plan["sources"][1]["natural_weight"] == pytest.approx(len(text) / total)
    written = json.load(open(packed / "mix.plan.json"))
    assert written["iterations"] == plan["iterations"]

    tokens_plan = plan_mixture(str(packed / "mix.yaml"), 4, tokens=5000, output=str(packed / "t.json"))
    per_pack = 0.75 * captions.pack_lengths.mean() + 0.25 * text.pack_lengths.mean()
    assert tokens_plan["samples"] >= 5000 / per_pack > tokens_plan["samples"] - 4
    assert solo_data(["plan", str(packed / "mix.yaml"), "--global-batch", "4", "--epochs", "1"]) == 0
    assert "iterations" in capsys.readouterr().out
    assert largest_remainder(10, [1, 1, 1]) == [4, 3, 3]


def test_stats_histograms_and_per_source_counts(packed):
    stats = compute_stats(str(packed / "captions"))
    report = json.load(open(packed / "captions" / "report.json"))
    assert sum(row["packs"] for row in stats["length_histogram"]) == stats["packs"] == report["packs"]
    assert sum(row["packs"] for row in stats["fill_histogram"]) == stats["packs"]
    assert [s["documents"] for s in stats["sources"]] == [20, 10]  # per input file
    assert [s["images"] for s in stats["sources"]] == [20, 10]
    assert sum(s["tokens"] for s in stats["sources"]) == report["tokens"]
    assert sum(s["vision_tokens"] for s in stats["sources"]) == report["vision_tokens"]
    assert sum(s["loss_tokens"] for s in stats["sources"]) == report["loss_tokens"]
    # An image of R x C patches is R*C <vpatch> + (R-1) <vrow_sep> + <vision> + </vision> tokens.
    reader = PackedReader(packed / "captions")
    layouts = np.concatenate([reader.image_layout(i) for i in range(len(reader))])
    assert sum(s["vision_tokens"] for s in stats["sources"]) == int((layouts[:, 1] * (layouts[:, 2] + 1) + 1).sum())
    assert sum(s["patches"] for s in stats["sources"]) == int((layouts[:, 1] * layouts[:, 2]).sum())


def test_stats_cli_prints_the_same_numbers(packed, capsys):
    assert solo_data(["stats", str(packed / "text"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    stats = compute_stats(str(packed / "text"))
    assert printed == json.loads(json.dumps(stats))
    (source,) = stats["sources"]
    assert source["documents"] == 40 and source["images"] == 0 and source["vision_tokens"] == 0
    assert source["tokens"] == int(PackedReader(packed / "text").pack_lengths.sum()) == stats["tokens"]
    # Plain text: every token but the BOS that starts each piece is a training target (text and EOS).
    report = json.load(open(packed / "text" / "report.json"))
    assert source["pieces"] == report["pieces"] > source["documents"]  # long documents were split
    assert source["loss_tokens"] == source["tokens"] - source["pieces"]
    assert solo_data(["stats", str(packed / "text")]) == 0
    text = capsys.readouterr().out
    assert f"{stats['packs']} packs of ≤ 128 tokens, {stats['tokens']:,} tokens" in text
    assert f"40 docs, {source['pieces']} pieces" in text


def test_preview_shows_the_images_and_marks_loss(packed, tmp_path):
    from transformers import AutoTokenizer

    reader = PackedReader(packed / "captions")
    tokenizer = AutoTokenizer.from_pretrained(packed / "tokenizer")
    documents = pack_segments(reader, 0, tokenizer)
    origins = reader.doc_origin(0)
    for document, origin in zip(documents, origins):
        image_runs = [run for run in document["runs"] if run[0] == "image"]
        assert len(image_runs) == 1
        record = int(origin[1]) + (20 if origin[0] == 1 else 0)
        patches, (rows, cols) = image_to_patches(load_image(packed / "img" / f"{record}.jpg"))
        drawn = np.asarray(image_runs[0][1])
        assert image_runs[0][2:] == (rows, cols) and drawn.shape == (rows * 32, cols * 32, 3)
        inside = unpatchify(patches, rows, cols)
        assert np.array_equal(drawn[1:31, 1:31], inside[1:31, 1:31])  # the pixels, grid lines aside
        trained = "".join(run[1] for run in document["runs"] if run[0] == "text" and run[2])
        assert trained == f"caption number {record}</s>"
    for name in ("p.png", "p.html"):
        assert solo_data(["preview", str(packed / "captions"), "--pack", "0", "--out", str(tmp_path / name)]) == 0
    picture = Image.open(tmp_path / "p.png")
    assert picture.width == 1100 and picture.height > 100
    page = (tmp_path / "p.html").read_text()
    assert page.count("<img") == reader.images_per_pack[0] and page.count("class=loss>") >= len(documents)
    assert solo_data(["preview", str(packed / "captions"), "--pack", "999", "--out", str(tmp_path / "x.png")]) == 2
