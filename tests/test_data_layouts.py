"""Every dataset of SOLO's stages, in its release layout, packs with one `solo-data pack` command.

One test per row of the README table "Datasets as downloaded". Each fixture is a tiny copy of the
layout its source of truth defines (img2dataset's writers, the MMC4 README, the OBELICS card,
LLaVA's JSON, LLaMA-Factory's mllm_demo.json, BiT's and timm's synset files, the ImageNet-21K
winter21 release and Alibaba-MIIL's 21K-P folders). The packs are decoded back to text, with each
image named by the fixture file its stored bytes came from, and compared with what the record says;
the accounting must be exact: in == packed + rejected, dropped images counted by reason.
"""

import gzip
import io
import json
import os
import tarfile
import zipfile

import numpy as np
import pytest
import zstandard
from PIL import Image

from data_prep.cli import main as solo_data
from data_prep.reader import PackedReader


def picture(seed, fmt="JPEG", width=48, height=40):
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


class Images:
    """Fixture images by name; a decoded pack names each of its images by the bytes stored."""

    def __init__(self):
        self.by_bytes = {}

    def make(self, name, seed, fmt="JPEG"):
        data = picture(seed, fmt)
        self.by_bytes[data] = name
        return data

    def write(self, path, seed, fmt="JPEG"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.make(path.name, seed, fmt))
        return path


def add_member(archive, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def run_pack(tokenizer_dir, inputs, output, fmt, *extra, seq_length=512):
    argv = ["pack", *map(str, inputs), "--format", fmt, "--tokenizer", tokenizer_dir, "--seq-length",
            str(seq_length), "--output", str(output), "--no-progress", *map(str, extra)]
    assert solo_data(argv) == 0
    with open(os.path.join(output, "report.json")) as handle:
        report = json.load(handle)
    assert report["documents_in"] == report["documents_packed"] + report["documents_rejected"]
    return report


def decode(directory, tokenizer, images):
    """{(input, record): text} with each image as <NAME> and each message's text decoded, BOS/EOS dropped."""
    reader = PackedReader(directory)
    start, patch, row_sep, end = tokenizer.convert_tokens_to_ids(["<vision>", "<vpatch>", "<vrow_sep>", "</vision>"])
    pieces = {}
    for index in range(len(reader)):
        pack = reader.get(index, decode_images=False)
        tokens, cu = pack["tokens"].tolist(), pack["cu_seqlens"].tolist()
        stored = iter(reader.image_bytes(index))
        for doc, (input_index, number, piece) in enumerate(reader.doc_origin(index).tolist()):
            parts, run = [], []
            for token in tokens[cu[doc]:cu[doc + 1]]:
                if token == start:
                    parts.append(tokenizer.decode(run))
                    run = []
                    parts.append(f"<{images.by_bytes[next(stored)]}>")
                elif token not in (patch, row_sep, end, tokenizer.bos_token_id, tokenizer.eos_token_id):
                    run.append(token)
            parts.append(tokenizer.decode(run))
            pieces.setdefault((input_index, number), {})[piece] = "".join(parts)
    return {key: "".join(value[n] for n in sorted(value)) for key, value in pieces.items()}


def reasons(report):
    return sorted((item["input"], item["reason"]) for item in report["rejected"])


# --------------------------------------------------------------------------- ImageNet-21K


@pytest.mark.parametrize("outer", ["winter21_whole.tar.gz", "winter21_whole.tar"])
def test_imagenet21k_winter21_tar_of_tars_with_bit_class_files(tmp_path, tokenizer_dir, tokenizer, outer):
    """image-net.org's winter21 release: one tar of per-synset tars (`n01440764.tar` holding
    `n01440764_NNN.JPEG`), streamed, never extracted; names from BiT's aligned id + lemma files."""
    images = Images()
    inner = {}
    for synset, seeds in (("n01440764", (1, 2)), ("n01443537", (3,))):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as archive:
            for seed in seeds:
                add_member(archive, f"{synset}_{seed}.JPEG", images.make(f"{synset}_{seed}", seed))
        inner[f"{synset}.tar"] = buffer.getvalue()
    with tarfile.open(tmp_path / outer, "w:gz" if outer.endswith(".gz") else "w") as archive:
        for name, data in inner.items():
            add_member(archive, name, data)
    (tmp_path / "imagenet21k_wordnet_ids.txt").write_text("n01440764\nn01443537\nn01484850\n")
    (tmp_path / "imagenet21k_wordnet_lemmas.txt").write_text(
        "tench, Tinca tinca\ngoldfish, Carassius auratus\ngreat white shark, white shark\n")
    report = run_pack(tokenizer_dir, [tmp_path / outer], tmp_path / "packed", "imagenet",
                      "--class-map", tmp_path / "imagenet21k_wordnet_ids.txt",
                      "--class-names", tmp_path / "imagenet21k_wordnet_lemmas.txt")
    assert decode(tmp_path / "packed", tokenizer, images) == {
        (0, 0): "<n01440764_1>tench, Tinca tinca", (0, 1): "<n01440764_2>tench, Tinca tinca",
        (0, 2): "<n01443537_3>goldfish, Carassius auratus"}
    assert (report["documents_in"], report["documents_packed"], report["documents_rejected"]) == (3, 3, 0)


def test_imagenet21k_p_class_folders_given_relative(tmp_path, tokenizer_dir, tokenizer, monkeypatch):
    """Alibaba-MIIL's ImageNet-21K-P: `imagenet21k_train/<synset>/<synset>_N.JPEG`, packed from its
    parent folder with a relative path (the README's command), names from timm's synset→lemma file."""
    images = Images()
    for synset, seed in (("n01440764", 1), ("n01440764", 2), ("n01443537", 3)):
        images.write(tmp_path / "imagenet21k_train" / synset / f"{synset}_{seed}.JPEG", seed)
    (tmp_path / "imagenet21k_train" / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "imagenet_synset_to_lemma.txt").write_text("n01440764\ttench, Tinca tinca\nn01443537\tgoldfish\n")
    monkeypatch.chdir(tmp_path)
    report = run_pack(tokenizer_dir, ["imagenet21k_train"], "packed", "imagenet",
                      "--class-map", "imagenet_synset_to_lemma.txt")
    assert decode(tmp_path / "packed", tokenizer, images) == {
        (0, 0): "<n01440764_1.JPEG>tench, Tinca tinca", (0, 1): "<n01440764_2.JPEG>tench, Tinca tinca",
        (0, 2): "<n01443537_3.JPEG>goldfish"}
    assert report["documents_rejected"] == 0


@pytest.mark.parametrize("content", ["n01440764\nn01443537\n", '["n01440764", "n01443537"]',
                                     '{"0": "n01440764", "1": "n01443537"}'])
def test_class_map_without_names_is_refused(tmp_path, tokenizer_dir, capsys, content):
    """timm's imagenet21k_goog_synsets.txt alone (ids, no names) would caption every image with its id."""
    (tmp_path / "n01440764").mkdir()
    (tmp_path / "n01440764" / "x.JPEG").write_bytes(picture(1))
    (tmp_path / "imagenet21k_goog_synsets.txt").write_text(content)
    argv = ["pack", str(tmp_path / "n01440764"), "--format", "imagenet", "--tokenizer", tokenizer_dir,
            "--seq-length", "256", "--output", str(tmp_path / "out"), "--class-map",
            str(tmp_path / "imagenet21k_goog_synsets.txt")]
    assert solo_data(argv) == 2
    error = capsys.readouterr().err
    assert "imagenet21k_goog_synsets.txt gives no class names" in error and "--class-names" in error
    assert not (tmp_path / "out").exists()


def test_class_map_json_forms(tmp_path):
    from data_prep.sources import load_class_map

    forms = {"names.json": {"n01440764": "tench", "n01443537": "goldfish"},
             "lists.json": {"n01440764": ["tench", "Tinca tinca"], "n01443537": ["goldfish"]},
             "keras.json": {"0": ["n01440764", "tench"], "1": ["n01443537", "goldfish"]}}
    expected = {"names.json": ("tench", "goldfish"), "lists.json": ("tench, Tinca tinca", "goldfish"),
                "keras.json": ("tench", "goldfish")}
    for name, tree in forms.items():
        (tmp_path / name).write_text(json.dumps(tree))
        mapping = load_class_map(str(tmp_path / name))
        assert (mapping["n01440764"], mapping["n01443537"]) == expected[name]
        assert (mapping["0"], mapping["1"]) == expected[name]  # .cls indices: the file's order
    (tmp_path / "ids.txt").write_text("n01440764\nn01443537\n")
    (tmp_path / "lemmas.txt").write_text("tench\n")
    with pytest.raises(ValueError, match="2 synset ids but --class-names .* has 1 lines"):
        load_class_map(str(tmp_path / "ids.txt"), str(tmp_path / "lemmas.txt"))


# --------------------------------------------------------------------------- img2dataset outputs


def img2dataset_meta(key, url, caption, status="success", error=None):
    """The columns img2dataset writes for every URL it tried (writer.py + downloader.py)."""
    ok = status == "success"
    return {"url": url, "caption": caption, "key": key, "status": status, "error_message": error,
            "width": 48 if ok else None, "height": 40 if ok else None, "original_width": 48 if ok else None,
            "original_height": 40 if ok else None, "exif": None, "sha256": None}


CC3M = [("000000000", "http://cc3m.example/a.jpg", "a dog on a beach", "success", None),
        ("000000001", "http://cc3m.example/b.jpg", "a dead link", "failed_to_download", "HTTP Error 404"),
        ("000000002", "http://cc3m.example/c.jpg", "a red car", "success", None)]


def write_side_files(folder, shard, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([img2dataset_meta(*row) for row in rows]), folder / f"{shard}.parquet")
    (folder / f"{shard}_stats.json").write_text(json.dumps({"count": len(rows), "successes": 2}))


@pytest.mark.parametrize("encode_format", ["jpg", "webp"])
def test_img2dataset_webdataset_output(tmp_path, tokenizer_dir, tokenizer, encode_format):
    """`--output_format webdataset`: NNNNN.tar (KEY.jpg/.webp + KEY.txt + KEY.json, successes only),
    and beside it NNNNN.parquet (every URL tried) and NNNNN_stats.json, which are not records."""
    images = Images()
    out = tmp_path / "cc3m"
    out.mkdir()
    with tarfile.open(out / "00000.tar", "w") as archive:
        for key, url, caption, status, error in CC3M:
            if status == "success":
                add_member(archive, f"{key}.{encode_format}",
                           images.make(key, int(key), "WEBP" if encode_format == "webp" else "JPEG"))
                add_member(archive, f"{key}.txt", caption.encode())
                add_member(archive, f"{key}.json", json.dumps(img2dataset_meta(key, url, caption)).encode())
    write_side_files(out, "00000", CC3M)
    report = run_pack(tokenizer_dir, [out], tmp_path / "packed", "caption")
    assert decode(tmp_path / "packed", tokenizer, images) == {
        (0, 0): "<000000000>a dog on a beach", (0, 1): "<000000002>a red car"}
    assert report["documents_in"] == 2 and report["documents_rejected"] == 0


def test_img2dataset_parquet_output_webp_with_failed_rows(tmp_path, tokenizer_dir, tokenizer):
    """`--output_format parquet --encode_format webp`: one row per URL, the image in a `webp` column,
    null where the download failed (that row is rejected as failed upstream, with its URL)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = Images()
    out = tmp_path / "laion"
    out.mkdir()
    rows = []
    for key, url, caption, status, error in CC3M:
        ok = status == "success"
        rows.append({"key": key, "webp": images.make(key, int(key), "WEBP") if ok else None,
                     "txt": caption if ok else None, **img2dataset_meta(key, url, caption, status, error)})
    pq.write_table(pa.Table.from_pylist(rows), out / "00000.parquet")
    (out / "00000_stats.json").write_text("{}")
    report = run_pack(tokenizer_dir, [out], tmp_path / "packed", "caption")
    assert decode(tmp_path / "packed", tokenizer, images) == {
        (0, 0): "<000000000>a dog on a beach", (0, 2): "<000000002>a red car"}
    assert reasons(report) == [("00000.parquet:row 1", "image 'http://cc3m.example/b.jpg': download failed upstream, "
                                "the row has no image bytes (failed_to_download: HTTP Error 404)")]
    assert report["rejected_by_kind"] == {"download failed upstream, the row has no image bytes": 1}


def test_img2dataset_files_output(tmp_path, tokenizer_dir, tokenizer):
    """`--output_format files`: NNNNN/KEY.png + KEY.txt + KEY.json per success; NNNNN.parquet and
    NNNNN_stats.json beside the folder."""
    images = Images()
    out = tmp_path / "datacomp"
    for shard, rows in (("00000", CC3M), ("00001", [("000010000", "http://x.example/d.png", "a blue boat",
                                                      "success", None)])):
        (out / shard).mkdir(parents=True)
        for key, url, caption, status, error in rows:
            if status == "success":
                (out / shard / f"{key}.png").write_bytes(images.make(key, int(key), "PNG"))
                (out / shard / f"{key}.txt").write_text(caption)
                (out / shard / f"{key}.json").write_text(json.dumps(img2dataset_meta(key, url, caption)))
        write_side_files(out, shard, rows)
    report = run_pack(tokenizer_dir, [out], tmp_path / "packed", "caption")
    assert decode(tmp_path / "packed", tokenizer, images) == {
        (0, 0): "<000000000>a dog on a beach", (0, 1): "<000000002>a red car", (1, 0): "<000010000>a blue boat"}
    assert report["documents_in"] == 3 and report["documents_rejected"] == 0

    from data_prep.sources import expand_inputs

    assert expand_inputs([str(out / "00001")], "caption") == [str(out / "00001")]  # one shard folder given
    (tmp_path / "demo" / "images").mkdir(parents=True)  # a JSONL beside a folder of images is not this layout
    (tmp_path / "demo" / "images" / "0.jpg").write_bytes(picture(0))
    (tmp_path / "demo" / "captions.jsonl").write_text('{"image": "images/0.jpg", "caption": "c"}\n')
    assert expand_inputs([str(tmp_path / "demo")], "caption") == [str(tmp_path / "demo" / "captions.jsonl")]


# --------------------------------------------------------------------------- interleaved


def mmc4_document(url, sentences, images):
    """An MMC4 line (README: url, text_list, image_info [{image_name, raw_url, matched_text_index,
    matched_sim}], similarity_matrix, could_have_url_duplicate)."""
    return {"url": url, "text_list": sentences, "could_have_url_duplicate": 0,
            "similarity_matrix": [[0.2] * len(sentences) for _ in images],
            "image_info": [{"image_name": name, "raw_url": f"http://img.example/{name}", "matched_text_index": index,
                            "matched_sim": 0.3} for name, index in images]}


@pytest.mark.parametrize("missing", ["drop", "reject"])
def test_mmc4_zipped_shard_with_downloaded_images(tmp_path, tokenizer_dir, tokenizer, missing):
    """MMC4 ships `docs_shard_N_v2.jsonl.zip` (read in place) and images downloaded by name; a dead
    image is dropped from its document (counted) or, with --missing-images reject, rejects it."""
    images = Images()
    images.write(tmp_path / "images" / "a1b2.jpg", 1)
    images.write(tmp_path / "images" / "c3d4.jpg", 2)
    lines = [mmc4_document("http://news.example/1", ["A cat sat.", "It purred.", "The end."],
                           [("a1b2.jpg", 1), ("dead.jpg", 2)]),
             mmc4_document("http://news.example/2", ["Boats.", "More boats."], [("c3d4.jpg", 0)])]
    with zipfile.ZipFile(tmp_path / "docs_shard_0_v2.jsonl.zip", "w") as archive:
        archive.writestr("docs_shard_0_v2.jsonl", "".join(json.dumps(line) + "\n" for line in lines))
    report = run_pack(tokenizer_dir, [tmp_path / "docs_shard_0_v2.jsonl.zip"], tmp_path / "packed", "interleaved",
                      "--image-root", tmp_path / "images", "--missing-images", missing)
    documents = decode(tmp_path / "packed", tokenizer, images)
    if missing == "drop":
        assert documents == {(0, 0): "A cat sat.<a1b2.jpg>It purred. The end.", (0, 1): "<c3d4.jpg>Boats. More boats."}
        assert report["images_dropped"] == 1 and report["documents_rejected"] == 0
        assert report["images_dropped_by_reason"] == {"missing image file": 1}
    else:
        assert documents == {(0, 1): "<c3d4.jpg>Boats. More boats."}
        assert report["images_dropped"] == 0
        assert reasons(report) == [("docs_shard_0_v2.jsonl.zip!docs_shard_0_v2.jsonl:1",
                                    f"missing image file 'dead.jpg' (looked in {tmp_path / 'images'})")]


def test_obelics_parquet_with_images_from_img2dataset(tmp_path, tokenizer_dir, tokenizer):
    """OBELICS rows (card: images [url | null], metadata, general_metadata, texts [str | null]) with
    their images fetched by img2dataset (webdataset output); --image-index finds them by URL."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = Images()
    urls = ["http://o.example/1.jpg", "http://o.example/2.jpg", "http://o.example/3.jpg"]
    index = tmp_path / "obelics_images"
    index.mkdir()
    with tarfile.open(index / "00000.tar", "w") as archive:
        for key, seed in (("000000000", 1), ("000000002", 3)):
            add_member(archive, f"{key}.jpg", images.make(f"img{seed}", seed))
            add_member(archive, f"{key}.txt", b"")
    write_side_files(index, "00000", [("000000000", urls[0], None, "success", None),
                                      ("000000001", urls[1], None, "failed_to_download", "timeout"),
                                      ("000000002", urls[2], None, "success", None)])
    rows = [{"images": [urls[0], None, urls[1]], "texts": [None, "First paragraph.", None],
             "metadata": json.dumps([{"document_url": "http://o.example/p1"}]), "general_metadata": "{}"},
            {"images": [None, urls[2]], "texts": ["Second page.", None], "metadata": "[]", "general_metadata": "{}"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train-00000-of-01335.parquet")
    report = run_pack(tokenizer_dir, [tmp_path / "train-00000-of-01335.parquet"], tmp_path / "packed",
                      "interleaved", "--image-index", index, "--workers", 2)  # workers share the run's index
    assert decode(tmp_path / "packed", tokenizer, images) == {
        (0, 0): "<img1>\n\nFirst paragraph.", (0, 1): "Second page.<img3>"}
    assert report["images_dropped_by_reason"] == {"download failed upstream": 1}
    assert report["documents_rejected"] == 0


# --------------------------------------------------------------------------- instruction data


def llava_turns(*values):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": value} for i, value in enumerate(values)]


def test_llava_pretrain_558k(tmp_path, tokenizer_dir, tokenizer):
    """LLaVA-Pretrain blip_laion_cc_sbu_558k.json with images/00453/004539375.jpg."""
    images = Images()
    images.write(tmp_path / "images" / "00453" / "004539375.jpg", 1)
    entries = [{"id": "004539375", "image": "00453/004539375.jpg", "conversations": llava_turns(
        "Render a clear and concise summary of the photo.\n<image>", "a mattress topper")}]
    (tmp_path / "blip_laion_cc_sbu_558k.json").write_text(json.dumps(entries))
    report = run_pack(tokenizer_dir, [tmp_path / "blip_laion_cc_sbu_558k.json"], tmp_path / "packed", "llava",
                      "--image-root", tmp_path / "images")
    assert decode(tmp_path / "packed", tokenizer, images) == {
        (0, 0): "Render a clear and concise summary of the photo.\n<004539375.jpg>a mattress topper"}
    assert report["documents_rejected"] == 0


def test_llava_1_5_mix665k_text_only_and_multi_image(tmp_path, tokenizer_dir, tokenizer):
    """llava_v1_5_mix665k.json: image items (coco/train2017/...), text-only ShareGPT items (no
    `image`), multi-image items (`image` a list); a placeholder/image mismatch names both counts."""
    images = Images()
    images.write(tmp_path / "data" / "coco" / "train2017" / "000000033471.jpg", 1)
    images.write(tmp_path / "data" / "gqa" / "images" / "2354786.jpg", 2)
    entries = [
        {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
         "conversations": llava_turns("<image>\nWhat are the colors of the bus?", "White and red.")},
        {"id": "i6IyJda_0", "model": "", "conversations": llava_turns("Summarize.", "A summary.")},
        {"id": "multi", "image": ["coco/train2017/000000033471.jpg", "gqa/images/2354786.jpg"],
         "conversations": llava_turns("<image>\n<image>\nWhich differs?", "The second.")},
        {"id": "bad", "image": "gqa/images/2354786.jpg",
         "conversations": llava_turns("<image>\n<image>\nTwo?", "One.")},
    ]
    (tmp_path / "llava_v1_5_mix665k.json").write_text(json.dumps(entries))
    report = run_pack(tokenizer_dir, [tmp_path / "llava_v1_5_mix665k.json"], tmp_path / "packed", "llava",
                      "--image-root", tmp_path / "data", "--template", "mistral", seq_length=1024)
    assert decode(tmp_path / "packed", tokenizer, images) == {  # Mistral-Instruct turns
        (0, 0): "[INST] <000000033471.jpg>What are the colors of the bus? [/INST] White and red.",
        (0, 1): "[INST] Summarize. [/INST] A summary.",
        (0, 2): "[INST] <000000033471.jpg><2354786.jpg>Which differs? [/INST] The second."}
    assert reasons(report) == [("llava_v1_5_mix665k.json:3 (id bad)", "2 <image> placeholders but 1 images")]


def test_sharegpt4v_and_sharegpt_leading_assistant_turn(tmp_path, tokenizer_dir, tokenizer):
    """ShareGPT4V (LLaVA layout, `image` under coco/...), and a ShareGPT dump whose conversation
    opens with an assistant turn: that orphan answer is dropped, as LLaVA's training does."""
    images = Images()
    images.write(tmp_path / "data" / "coco" / "train2017" / "000000000009.jpg", 1)
    sharegpt4v = [{"id": "000000000009", "image": "coco/train2017/000000000009.jpg", "conversations": llava_turns(
        "What do you see happening in this image?\n<image>", "Food in lunch boxes.")}]
    (tmp_path / "sharegpt4v_instruct_gpt4-vision_cap100k.json").write_text(json.dumps(sharegpt4v))
    report = run_pack(tokenizer_dir, [tmp_path / "sharegpt4v_instruct_gpt4-vision_cap100k.json"], tmp_path / "p1",
                      "llava", "--image-root", tmp_path / "data")
    assert decode(tmp_path / "p1", tokenizer, images) == {
        (0, 0): "What do you see happening in this image?\n<000000000009.jpg>Food in lunch boxes."}
    assert report["documents_rejected"] == 0

    dump = [{"id": "x1", "conversations": [{"from": "gpt", "value": "orphan answer"},
                                           {"from": "human", "value": "question"}, {"from": "gpt", "value": "reply"}]}]
    (tmp_path / "sharegpt.json").write_text(json.dumps(dump))
    run_pack(tokenizer_dir, [tmp_path / "sharegpt.json"], tmp_path / "p2", "sharegpt")
    assert decode(tmp_path / "p2", tokenizer, images) == {(0, 0): "questionreply"}


def test_llama_factory_multimodal_chat(tmp_path, tokenizer_dir, tokenizer):
    """LLaMA-Factory data/mllm_demo.json: {"messages": [{"content", "role"}], "images": [...]}, each
    <image> in the contents taking the next image."""
    images = Images()
    images.write(tmp_path / "mllm_demo_data" / "1.jpg", 1)
    images.write(tmp_path / "mllm_demo_data" / "2.jpg", 2)
    entries = [
        {"messages": [{"content": "<image>Who are they?", "role": "user"},
                      {"content": "They're Kane and Gretzka.", "role": "assistant"},
                      {"content": "What are they doing?<image>", "role": "user"},
                      {"content": "Celebrating.", "role": "assistant"}],
         "images": ["mllm_demo_data/1.jpg", "mllm_demo_data/2.jpg"]},
        {"messages": [{"content": "<image>Who is he?", "role": "user"}, {"content": "Kane.", "role": "assistant"}],
         "images": ["mllm_demo_data/1.jpg", "mllm_demo_data/2.jpg"]},
    ]
    (tmp_path / "mllm_demo.json").write_text(json.dumps(entries))
    report = run_pack(tokenizer_dir, [tmp_path / "mllm_demo.json"], tmp_path / "packed", "chat")
    assert decode(tmp_path / "packed", tokenizer, images) == {
        (0, 0): "<1.jpg>Who are they?They're Kane and Gretzka.What are they doing?<2.jpg>Celebrating."}
    assert reasons(report) == [("mllm_demo.json:1", "1 <image> placeholders but 2 images")]


# --------------------------------------------------------------------------- text and SOLO's own JSONL


def test_slimpajama_chunk_folders_searched_recursively(tmp_path, tokenizer_dir, tokenizer):
    """SlimPajama-627B: train/chunkN/example_train_M.jsonl.zst, {"text", "meta": {"redpajama_set_name"}}."""
    root = tmp_path / "SlimPajama-627B" / "train"
    texts = {("chunk1", 0): [("book one", "RedPajamaBook"), ("web one", "RedPajamaCommonCrawl")],
             ("chunk1", 1): [("wiki one", "RedPajamaWikipedia")],
             ("chunk2", 0): [("arxiv one", "RedPajamaArXiv"), ("c4 one", "RedPajamaC4")]}
    for (chunk, number), lines in texts.items():
        (root / chunk).mkdir(parents=True, exist_ok=True)
        raw = "".join(json.dumps({"text": text, "meta": {"redpajama_set_name": subset}}) + "\n"
                      for text, subset in lines)
        (root / chunk / f"example_train_{number}.jsonl.zst").write_bytes(
            zstandard.ZstdCompressor().compress(raw.encode()))
    (root / ".cache").mkdir()
    (root / ".cache" / "x.jsonl").write_text('{"text": "hidden"}\n')
    report = run_pack(tokenizer_dir, [root], tmp_path / "packed", "text", "--exclude-subset", "RedPajamaCommonCrawl",
                      "--exclude-subset", "RedPajamaC4")
    assert decode(tmp_path / "packed", tokenizer, Images()) == {(0, 0): "book one", (1, 0): "wiki one",
                                                                  (2, 0): "arxiv one"}
    assert report["filtered_by_subset"] == {"RedPajamaC4": 1, "RedPajamaCommonCrawl": 1}


def test_solo_processed_chat_jsonl(tmp_path, tokenizer_dir, tokenizer):
    """SOLO's processed data: OpenAI-chat JSONL lines, images as base64 data URLs."""
    import base64

    images = Images()
    data = images.make("inline", 5)
    url = "data:image/jpeg;base64," + base64.b64encode(data).decode()
    lines = [[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                           {"type": "text", "text": "Describe."}]},
              {"role": "assistant", "content": "Noise."}],
             {"messages": [{"role": "user", "content": "<image> is text here"},
                           {"role": "assistant", "content": "ok"}]}]
    with gzip.open(tmp_path / "solo_sft.jsonl.gz", "wt") as handle:
        handle.write("".join(json.dumps(line) + "\n" for line in lines))
    report = run_pack(tokenizer_dir, [tmp_path / "solo_sft.jsonl.gz"], tmp_path / "packed", "chat")
    assert decode(tmp_path / "packed", tokenizer, images) == {(0, 0): "<inline>Describe.Noise.",
                                                              (0, 1): "<image> is text hereok"}
    assert report["documents_rejected"] == 0


# --------------------------------------------------------------------------- one source on many machines


def test_shards_add_up_to_the_unsharded_output_and_mix_as_one_source(tmp_path, tokenizer_dir, tokenizer):
    """--shard I/N: whole files when there are at least N (3 tar shards over 2), else every N-th record
    of each file (5 lines over 3); the shards' documents and accounting add up to the unsharded run's,
    and a mixture glob over the shard directories is one source with one weight."""
    from data_prep.mixture import plan_mixture, read_mixture

    images = Images()
    shards = tmp_path / "cc3m"
    shards.mkdir()
    for shard in range(3):
        with tarfile.open(shards / f"{shard:05d}.tar", "w") as archive:
            for item in range(2):
                key = f"{shard:05d}{item:04d}"
                add_member(archive, f"{key}.jpg", images.make(key, 10 * shard + item))
                add_member(archive, f"{key}.txt", f"caption {key}".encode())
    (tmp_path / "captions.jsonl").write_text("".join(
        json.dumps({"image": f"cc3m_files/{n}.jpg", "caption": f"line {n}"}) + "\n" for n in range(5)))
    for n in range(4):  # the 5th image is missing: one rejection, in exactly one shard
        images.write(tmp_path / "cc3m_files" / f"{n}.jpg", 100 + n)
    for name, inputs, count in (("tars", [shards], 2), ("lines", [tmp_path / "captions.jsonl"], 3)):
        whole = run_pack(tokenizer_dir, inputs, tmp_path / name / "all", "caption")
        parts = [run_pack(tokenizer_dir, inputs, tmp_path / name / f"shard-{i}", "caption", "--shard", f"{i}/{count}")
                 for i in range(count)]
        decoded = [decode(tmp_path / name / f"shard-{i}", tokenizer, images) for i in range(count)]
        assert sum(len(part) for part in decoded) == len(decode(tmp_path / name / "all", tokenizer, images))
        assert {k: v for part in decoded for k, v in part.items()} == decode(tmp_path / name / "all", tokenizer, images)
        for field in ("documents_in", "documents_packed", "documents_rejected", "images"):
            assert sum(part[field] for part in parts) == whole[field], field
        assert all(part["documents_in"] > 0 for part in parts)
    assert whole["documents_rejected"] == 1 and whole["documents_packed"] == 4
    assert solo_data(["pack", str(shards), "--format", "caption", "--tokenizer", tokenizer_dir, "--seq-length",
                      "512", "--output", str(tmp_path / "bad"), "--shard", "2/2"]) == 2  # I must be < N

    mixture = tmp_path / "mix.yaml"
    mixture.write_text("datasets:\n  - {path: 'lines/shard-*', weight: 0.5}\n  - {path: [tars/all], weight: 0.5}\n")
    sources = read_mixture(str(mixture))
    packs = {path: len(PackedReader(path)) for path, _ in sources}
    assert [os.path.basename(path) for path, _ in sources] == ["shard-0", "shard-1", "shard-2", "all"]
    group = [(path, weight) for path, weight in sources if "lines" in path]
    assert sum(weight for _, weight in group) == pytest.approx(0.5)
    assert all(weight == pytest.approx(0.5 * packs[path] / sum(packs[p] for p, _ in group)) for path, weight in group)
    plan = plan_mixture(str(mixture), 2, epochs=1)
    assert sum(info["samples"] for info in plan["sources"]) == plan["samples"]


@pytest.mark.e2e
def test_prep_array_sbatch_submits_shards_then_plan(tmp_path, tokenizer_dir, tokenizer):
    """launch/prep_array.sbatch on a login node submits an N-task array and a plan job after it; each
    task packs its shard; the plan job reads the shards as one source."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(repo, "launch", "prep_array.sbatch")
    images = Images()
    for n in range(3):
        images.write(tmp_path / "data" / f"{n}.jpg", n)
    (tmp_path / "data" / "captions.jsonl").write_text("".join(
        json.dumps({"image": f"{n}.jpg", "caption": f"photo {n}"}) + "\n" for n in range(3)))
    pack_args = [str(tmp_path / "data"), "--format", "caption", "--tokenizer", tokenizer_dir, "--seq-length", "512"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/sbatch.log\necho 4242\n')
    (bin_dir / "sbatch").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": sys.executable, "PYTHONPATH": repo}
    for name in ("SLURM_ARRAY_TASK_ID", "SOLO_PREP_PLAN", "SLURM_SUBMIT_DIR"):
        env.pop(name, None)
    out = tmp_path / "packed"
    result = subprocess.run(["bash", script, "2", str(out), *pack_args], env=env, cwd=repo,
                            capture_output=True, text=True, check=True)
    assert "submitted array job 4242" in result.stdout
    array, plan = (tmp_path / "sbatch.log").read_text().splitlines()
    assert array.startswith(f"--parsable --array=0-1 {script} 2 {out} ") and array.endswith(" ".join(pack_args))
    assert "--dependency=afterok:4242" in plan and "SOLO_PREP_PLAN=1" in plan

    for task in (0, 1):  # what SLURM runs on the nodes
        subprocess.run(["bash", script, "2", str(out), *pack_args], cwd=repo, check=True, capture_output=True,
                       env={**env, "SLURM_ARRAY_TASK_ID": str(task), "SLURM_CPUS_PER_TASK": "1"})
    decoded = {**decode(out / "shard-00000", tokenizer, images), **decode(out / "shard-00001", tokenizer, images)}
    assert decoded == {(0, n): f"<{n}.jpg>photo {n}" for n in range(3)}
    result = subprocess.run(["bash", script, "2", str(out)], env={**env, "SOLO_PREP_PLAN": "1"}, cwd=repo,
                            capture_output=True, text=True, check=True)
    plan = json.loads((out / "mixture.plan.json").read_text())
    assert [os.path.basename(info["path"]) for info in plan["sources"]] == ["shard-00000", "shard-00001"]
    assert sum(info["weight"] for info in plan["sources"]) == pytest.approx(1.0)
    assert plan["samples"] == sum(info["packs"] for info in plan["sources"]) and "wrote" in result.stdout


@pytest.mark.parametrize("output_format", ["parquet", "files"])
def test_image_index_reads_img2dataset_parquet_and_files_outputs(tmp_path, output_format):
    """--image-index over img2dataset's other two layouts: images in the parquet's `jpg` column, or
    in `NNNNN/KEY.jpg`; MMC4's `raw_url` is looked up there too; a URL nobody fetched is missing."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_prep.sources import SourceOptions, iter_records, record_to_document

    index = tmp_path / "fetched"
    index.mkdir()
    rows = [("000000000", "http://m.example/a.jpg", None, "success", None),
            ("000000001", "http://m.example/b.jpg", None, "failed_to_download", "HTTP Error 403")]
    data = picture(7)
    if output_format == "parquet":
        pq.write_table(pa.Table.from_pylist([
            {"key": key, "jpg": data if status == "success" else None, "txt": None,
             **img2dataset_meta(key, url, caption, status, error)} for key, url, caption, status, error in rows]),
            index / "00000.parquet")
    else:
        (index / "00000").mkdir()
        (index / "00000" / "000000000.jpg").write_bytes(data)
        (index / "00000" / "000000000.json").write_text("{}")
        write_side_files(index, "00000", rows)
    document = mmc4_document("http://page.example", ["One.", "Two.", "Three."],
                             [("a.jpg", 0), ("b.jpg", 1), ("never.jpg", 2)])
    for info, url in zip(document["image_info"], ["http://m.example/a.jpg", "http://m.example/b.jpg",
                                                  "http://m.example/never.jpg"]):
        info["raw_url"] = url
    (tmp_path / "docs.jsonl").write_text(json.dumps(document) + "\n")
    options = SourceOptions(format="interleaved", image_index=str(index))
    (record,) = iter_records([str(tmp_path / "docs.jsonl")], options)
    converted = record_to_document(record, options)
    assert [s.image if s.is_image else s.text for s in converted.segments] == [data, "One. Two. Three."]
    assert converted.dropped_images == [
        "image 'http://m.example/b.jpg': download failed upstream (failed_to_download: HTTP Error 403)",
        "image 'http://m.example/never.jpg': not found in --image-index (no img2dataset parquet there lists the URL)"]
