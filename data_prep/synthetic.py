"""Synthetic, photo-like images and SOLO-like length mixes for benchmarks and tests (no downloads).

Random noise compresses badly and decodes unlike photos; these images are smooth gradients with a
few shapes, edges and mild noise, so JPEG sizes and decode costs resemble natural images.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

# SOLO's image-size mix, roughly: captions (CC3M/CapsFusion, downscaled to ≤1024 px on the long
# side), ImageNet (~500×375), Websight screenshots (wide), charts/documents (OCR sets).
SOLO_IMAGE_SIZES = ((500, 375), (640, 480), (1024, 768), (1024, 576), (375, 500), (768, 1024), (1280, 720),
                    (300, 225), (224, 224), (1024, 1024))


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.empty((height, width, 3), np.float32)
    for channel in range(3):
        fx, fy, phase = rng.uniform(0.5, 3.0), rng.uniform(0.5, 3.0), rng.uniform(0, 6.3)
        base[..., channel] = 128 + 90 * np.sin(fx * x / width * 6.3 + phase) * np.cos(fy * y / height * 6.3)
    base += rng.normal(0, 6, size=base.shape).astype(np.float32)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(8, max(9, width // 3))), y0 + int(rng.integers(8, max(9, height // 3)))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=color)
    return image


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def solo_like_lengths(count: int, seq_length: int, seed: int = 0) -> np.ndarray:
    """Document lengths (tokens, each ≤ seq_length) of a SOLO-like mix.

    Shares: captions with one image (220–700), ImageNet-style labels (60–1060), long text
    (SlimPajama-like, log-normal, split into seq_length pieces), interleaved documents (2–8 images
    with text) and SFT-like samples (300–3000).
    """
    rng = np.random.default_rng(seed)
    kinds = rng.choice(5, size=count, p=[0.40, 0.20, 0.15, 0.10, 0.15])
    lengths: list[int] = []
    for kind in kinds:
        if kind == 0:
            length = int(rng.integers(60, 600)) + int(rng.integers(10, 60))
        elif kind == 1:
            length = int(rng.integers(57, 1060)) + int(rng.integers(3, 12))
        elif kind == 2:
            length = int(np.clip(rng.lognormal(7.0, 1.2), 20, 400_000))
        elif kind == 3:
            length = (sum(int(rng.integers(60, 1060)) for _ in range(int(rng.integers(2, 9))))
                      + int(rng.integers(100, 2000)))
        else:
            length = int(rng.integers(300, 3000))
        while length > seq_length:  # over-long documents arrive as clean pieces
            lengths.append(seq_length)
            length -= seq_length - 1
        lengths.append(max(length, 2))
    return np.asarray(lengths, dtype=np.int64)
