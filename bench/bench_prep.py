"""Preparation benchmark: images/s per core of `solo-data pack` vs SOLO's preprocessing, and bytes/image.

Both paths get the same photo-like JPEGs at SOLO's image-size mix (`data_prep.synthetic`).

* ours: the whole pack path in one process (`--workers 1`): read the caption JSONL, read and fully
  decode each image (verification), compute its grid, tokenise, lay out, pack, write the original
  bytes to the IndexedDataset files, report.
* SOLO's path, re-implemented from its description: decode → RGB → SOLO
  resize (bilinear) → ToTensor (÷255) → ImageNet Normalize → unfold into 32×32 patches → float16 →
  write the patches to disk. Tokenising is left out of this path, which favours SOLO.

One thread each (torch.set_num_threads(1)), so both figures are per core. Goals: ≥ 3× images/s,
≤ 1/10 bytes per image.

    python bench/bench_prep.py [--images 200]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from data_prep.encode import EncodeOptions
from data_prep.pack import PackConfig, run_pack
from data_prep.sources import SourceOptions
from data_prep.synthetic import SOLO_IMAGE_SIZES, jpeg_bytes, photo_like
from solo.hf.image_processing_solo import IMAGENET_MEAN, IMAGENET_STD, PATCH_SIZE, solo_resize_size
from solo.tiny import make_base_tokenizer
from solo.tokenizer import extend_tokenizer


def make_images(folder: str, count: int) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    paths = []
    for index in range(count):
        width, height = SOLO_IMAGE_SIZES[index % len(SOLO_IMAGE_SIZES)]
        path = os.path.join(folder, f"{index:05d}.jpg")
        with open(path, "wb") as handle:
            handle.write(jpeg_bytes(photo_like(width, height, seed=index)))
        paths.append(path)
    return paths


def solo_preprocess(paths: list[str], out_path: str) -> tuple[float, int]:
    """SOLO's image path (decode → resize → normalise → fp16 patches → disk). Returns (seconds, bytes)."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    written = 0
    start = time.perf_counter()
    with open(out_path, "wb") as out:
        for path in paths:
            image = Image.open(path).convert("RGB")
            width, height = solo_resize_size(*image.size)
            image = image.resize((width, height), Image.Resampling.BILINEAR)
            tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255.0
            tensor = (tensor - mean) / std
            rows, cols = height // PATCH_SIZE, width // PATCH_SIZE
            patches = tensor.unfold(1, PATCH_SIZE, PATCH_SIZE).unfold(2, PATCH_SIZE, PATCH_SIZE)
            patches = patches.permute(1, 2, 0, 3, 4).reshape(rows * cols, -1)  # (c, y, x) inside a patch
            data = patches.numpy().astype(np.float16).tobytes()
            out.write(data)
            written += len(data)
    return time.perf_counter() - start, written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200, help="images (default 200)")
    parser.add_argument("--seq-length", type=int, default=32768)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        paths = make_images(os.path.join(root, "images"), args.images)
        extend_tokenizer(make_base_tokenizer()).save_pretrained(os.path.join(root, "tokenizer"))
        with open(os.path.join(root, "captions.jsonl"), "w") as handle:
            for index, path in enumerate(paths):
                caption = f"a synthetic photo number {index} with shapes"
                handle.write(json.dumps({"image": path, "caption": caption}) + "\n")
        for path in paths:  # warm the page cache for both paths alike
            open(path, "rb").read()

        solo_seconds, solo_bytes = solo_preprocess(paths, os.path.join(root, "solo_patches.bin"))
        config = PackConfig(inputs=[os.path.join(root, "captions.jsonl")], output=os.path.join(root, "packed"),
                            tokenizer=os.path.join(root, "tokenizer"), source=SourceOptions(format="caption"),
                            encode=EncodeOptions(seq_length=args.seq_length), workers=1, progress=False)
        # Warm-up on one image: imports and first-call costs are paid once per process, not per image.
        with open(os.path.join(root, "one.jsonl"), "w") as handle:
            handle.write(json.dumps({"image": paths[0], "caption": "warm-up"}) + "\n")
        warm = PackConfig(inputs=[os.path.join(root, "one.jsonl")], output=os.path.join(root, "warm"),
                          tokenizer=config.tokenizer, source=config.source, encode=config.encode, progress=False)
        run_pack(warm)
        start = time.perf_counter()
        report = run_pack(config)  # everything: tokenizer load, read, decode, tokenise, pack, write, report
        ours_seconds = time.perf_counter() - start
        jpeg_total = sum(os.path.getsize(path) for path in paths)

    ours_rate, solo_rate = args.images / ours_seconds, args.images / solo_seconds
    fit_fp16 = report["patches"] * 3072 * 2
    print(f"images: {args.images} photo-like JPEGs, sizes cycling {SOLO_IMAGE_SIZES}")
    print(f"SOLO path (decode→resize→normalise→fp16 patches→disk): {solo_rate:8.1f} images/s per core")
    print(f"solo-data pack --workers 1 (whole pack path):         {ours_rate:8.1f} images/s per core")
    print(f"speed ratio ours/SOLO: {ours_rate / solo_rate:.2f}x (goal >= 3x)")
    print(f"bytes/image ours (original JPEG): {report['image_bytes'] / args.images:,.0f}  "
          f"(JPEG files {jpeg_total / args.images:,.0f})")
    print(f"bytes/image SOLO fp16 patches ('solo' grid): {solo_bytes / args.images:,.0f}  "
          f"-> ours/SOLO = {report['image_bytes'] / solo_bytes:.4f} (goal <= 0.1)")
    print(f"bytes/image fp16 patches at our 'fit' grid: {fit_fp16 / args.images:,.0f}  "
          f"-> ours/fp16 = {report['image_bytes'] / fit_fp16:.4f}")
    if not math.isclose(report["documents_packed"], args.images):
        print(f"warning: {report['documents_rejected']} documents rejected: {report['rejected'][:3]}")


if __name__ == "__main__":
    main()
