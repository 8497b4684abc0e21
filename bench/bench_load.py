"""Loading benchmark: images/s per core of `PackedReader` (decode the stored bytes + patchify).

Packs photo-like JPEGs at SOLO's image-size mix (`data_prep.synthetic.SOLO_IMAGE_SIZES`), then
reads every pack in one process and one thread, as a DataLoader worker would. Goal: ≥ 40 images/s
per core (an 8×H100 run needs ≈ 170–250 images/s in total). Also prints the cost of the same reads
without image decoding, to show where the time goes.

    python bench/bench_load.py [--images 200] [--passes 2]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from data_prep.encode import EncodeOptions
from data_prep.pack import PackConfig, run_pack
from data_prep.reader import PackedReader
from data_prep.sources import SourceOptions
from data_prep.synthetic import SOLO_IMAGE_SIZES, jpeg_bytes, photo_like
from solo.tiny import make_base_tokenizer
from solo.tokenizer import extend_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--passes", type=int, default=2, help="read every pack this many times (default 2)")
    parser.add_argument("--resize-mode", default="fit", choices=("fit", "solo"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        extend_tokenizer(make_base_tokenizer()).save_pretrained(os.path.join(root, "tokenizer"))
        os.makedirs(os.path.join(root, "images"))
        with open(os.path.join(root, "captions.jsonl"), "w") as handle:
            for index in range(args.images):
                width, height = SOLO_IMAGE_SIZES[index % len(SOLO_IMAGE_SIZES)]
                path = os.path.join(root, "images", f"{index:05d}.jpg")
                with open(path, "wb") as image_file:
                    image_file.write(jpeg_bytes(photo_like(width, height, seed=index)))
                handle.write(json.dumps({"image": path, "caption": f"photo {index}"}) + "\n")
        output = os.path.join(root, "packed")
        run_pack(PackConfig(inputs=[os.path.join(root, "captions.jsonl")], output=output,
                            tokenizer=os.path.join(root, "tokenizer"), source=SourceOptions(format="caption"),
                            encode=EncodeOptions(seq_length=32768, resize_mode=args.resize_mode), progress=False))
        reader = PackedReader(output)
        reader[0]  # open the files once

        start = time.perf_counter()
        images = patches = 0
        for _ in range(args.passes):
            for index in range(len(reader)):
                pack = reader[index]
                images += len(reader.image_layout(index))
                patches += len(pack["patches"])
        decode_seconds = time.perf_counter() - start

        start = time.perf_counter()
        for _ in range(args.passes):
            for index in range(len(reader)):
                reader.get(index, decode_images=False)
        plain_seconds = time.perf_counter() - start

    rate = images / decode_seconds
    print(f"{len(reader)} packs of 32,768 tokens, {images // args.passes} images per pass "
          f"(sizes cycling {SOLO_IMAGE_SIZES}), resize mode {args.resize_mode}")
    print(f"reader with decode + patchify: {rate:8.1f} images/s per core "
          f"({patches / decode_seconds:,.0f} patches/s) — goal >= 40, ratio {rate / 40:.1f}x")
    print(f"reader without image decoding: {images / plain_seconds:8.1f} images/s "
          f"(tokens, loss mask, boundaries, patch indices only)")


if __name__ == "__main__":
    main()
