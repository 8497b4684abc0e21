"""The shared image pipeline: resize rules, patch layout, and every kind of awkward input."""

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from solo.hf.image_processing_solo import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PATCH_DIM,
    ImageLoadError,
    SoloImageProcessor,
    fit_grid,
    image_to_patches,
    image_tokens_count,
    load_image,
    normalize_patches,
    patchify_array,
    resize_size,
    solo_resize_size,
    unpatchify,
)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    "size, grid, tokens",
    [((500, 375), (12, 16), 205), ((1920, 1080), (18, 32), 595), ((224, 224), (7, 7), 57)],
)
def test_solo_resize_reproduces_solo7b_examples(size, grid, tokens):
    width, height = solo_resize_size(*size)
    rows, cols = height // 32, width // 32
    assert (rows, cols) == grid
    assert image_tokens_count(rows, cols) == tokens
    _, got_grid = image_to_patches(noise_image(*size), resize_mode="solo")
    assert got_grid == grid


def test_solo_resize_formula_on_many_sizes():
    # SOLO's rule written independently: long side capped at 1024, short side truncated then rounded up.
    rng = np.random.default_rng(1)
    for width, height in rng.integers(16, 3000, size=(300, 2)):
        width, height = int(width), int(height)
        long_side, short_side = max(width, height), min(width, height)
        new_long = min(-(-long_side // 32) * 32, 1024)
        new_short = -(-int(new_long * short_side / long_side) // 32) * 32
        expected = (new_long, new_short) if width >= height else (new_short, new_long)
        assert solo_resize_size(width, height) == expected


def test_solo_resize_refuses_extreme_aspect_with_advice():
    with pytest.raises(ValueError, match="resize_mode='fit'"):
        solo_resize_size(1, 5000)


def test_fit_rule_keeps_aspect_within_budget_and_never_enlarges_beyond_rounding():
    rng = np.random.default_rng(2)
    sizes = [(int(w), int(h)) for w, h in rng.integers(1, 6000, size=(400, 2))]
    sizes += [(1, 5000), (5000, 1), (100000, 1), (1, 1), (31, 33), (1025, 1025), (4000, 3000)]
    for width, height in sizes:
        rows, cols = fit_grid(width, height)
        assert rows >= 1 and cols >= 1
        assert rows * cols <= 1024
        assert image_tokens_count(rows, cols) <= 1057
        # No side grows beyond rounding the image up to whole patches.
        assert cols <= max(1, math.ceil(width / 32)) and rows <= max(1, math.ceil(height / 32))
        # The aspect ratio is kept to within one patch per side, unless a side is pinned at one patch.
        if rows > 1 and cols > 1:
            assert (cols - 1) / (rows + 1) <= width / height <= (cols + 1) / (rows - 1)


def test_fit_rule_is_better_than_solo_on_thin_images():
    # SOLO stretches a 33x1000 strip to 64x1024 (~2x); the fit rule keeps one 32-px column.
    assert solo_resize_size(33, 1000) == (64, 1024)
    assert resize_size(33, 1000) == (32, 992)
    assert fit_grid(500, 375) == (12, 16)  # ordinary photos keep SOLO's grid when it fits exactly


def test_patch_flatten_order_matches_independent_formula():
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)  # 2 rows x 3 cols of patches
    patches = patchify_array(pixels)
    assert patches.shape == (6, PATCH_DIM) and patches.dtype == np.uint8
    for _ in range(200):
        row, col, c, y, x = (int(rng.integers(n)) for n in (2, 3, 3, 32, 32))
        assert patches[row * 3 + col, c * 1024 + y * 32 + x] == pixels[row * 32 + y, col * 32 + x, c]


def test_patches_round_trip_to_pixels():
    image = noise_image(96, 64, seed=4)  # already on the grid: no resampling
    patches, (rows, cols) = image_to_patches(image)
    assert (rows, cols) == (2, 3)
    np.testing.assert_array_equal(unpatchify(patches, rows, cols), np.asarray(image))


def test_normalize_patches_applies_imagenet_statistics_per_channel():
    patches = torch.zeros((1, PATCH_DIM), dtype=torch.uint8)
    patches[0, :1024] = 255  # red channel white, green and blue black
    normalised = normalize_patches(patches)
    assert normalised.dtype == torch.float32
    assert torch.allclose(normalised[0, 0], torch.tensor((1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]))
    assert torch.allclose(normalised[0, 1024], torch.tensor(-IMAGENET_MEAN[1] / IMAGENET_STD[1]))
    assert torch.allclose(normalised[0, 2047 + 1], torch.tensor(-IMAGENET_MEAN[2] / IMAGENET_STD[2]))
    with pytest.raises(TypeError):
        normalize_patches(patches.float())


# ---------------------------------------------------------------- awkward and bad inputs


def test_corrupt_jpeg_raises_typed_error_naming_input(tmp_path):
    data = bytearray(encode(noise_image(64, 64), "JPEG"))
    data[20:400] = b"\x00" * 380  # destroy the headers and the start of the scan
    path = tmp_path / "broken.jpg"
    path.write_bytes(bytes(data))
    with pytest.raises(ImageLoadError, match="broken.jpg"):
        load_image(path)


def test_truncated_png_raises_typed_error(tmp_path):
    data = encode(noise_image(128, 128), "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="cut.png"):
        load_image(path)


def test_zero_byte_file_raises_typed_error(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty.jpg.*0 bytes"):
        load_image(path)
    with pytest.raises(ImageLoadError, match="0 bytes"):
        load_image(b"", name="in-memory")


def test_one_by_5000_image_is_handled_by_fit_and_refused_clearly_by_solo():
    image = load_image(encode(Image.new("RGB", (1, 5000), (10, 200, 30)), "PNG"))
    patches, (rows, cols) = image_to_patches(image)
    assert (rows, cols) == (157, 1) and patches.shape == (157, PATCH_DIM)
    with pytest.raises(ValueError, match="aspect ratio"):
        image_to_patches(image, resize_mode="solo")


def test_decompression_bomb_is_refused(tmp_path):
    bomb = Image.new("1", (12000, 12000))  # 144 M pixels, a few hundred KB as PNG
    path = tmp_path / "bomb.png"
    bomb.save(path, optimize=False)
    assert path.stat().st_size < 5_000_000
    with pytest.raises(ImageLoadError, match="bomb.png.*decompression bomb"):
        load_image(path)


def test_cmyk_jpeg_converts_to_rgb():
    image = load_image(encode(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG", quality=95))
    assert image.mode == "RGB" and image.size == (40, 30)
    red, green, blue = np.asarray(image).reshape(-1, 3).mean(0)
    assert red > 200 and green < 60 and blue < 60  # cyan 0, magenta+yellow full → red


def test_16bit_png_scales_to_8bit():
    array = np.full((20, 30), 65535 // 2, dtype=np.uint16)
    array[:, :10] = 65535
    image = load_image(encode(Image.fromarray(array), "PNG"))
    assert image.mode == "RGB" and image.size == (30, 20)
    pixels = np.asarray(image)
    assert pixels[0, 0].tolist() == [255, 255, 255]
    assert pixels[0, 20].tolist() == [127, 127, 127]  # 32767 / 65535 * 255 = 127.5, rounded half-even


def test_palette_with_transparency_composites_on_white():
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.paste(1, (0, 0, 4, 8))
    loaded = load_image(encode(image, "PNG", transparency=0))  # index 0 (black) is transparent
    pixels = np.asarray(loaded)
    assert pixels[0, 0].tolist() == [255, 0, 0]
    assert pixels[0, 7].tolist() == [255, 255, 255]  # transparent → white, not the key colour black


def test_animated_gif_takes_first_frame():
    frames = [Image.new("RGB", (16, 16), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    pixels = np.asarray(load_image(data))
    assert pixels[8, 8].tolist() == [255, 0, 0]


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 10, 20))  # white band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90° clockwise turn
    loaded = load_image(encode(image, "JPEG", exif=exif.tobytes(), quality=95))
    assert loaded.size == (20, 40)
    pixels = np.asarray(loaded).mean(axis=2)
    assert pixels[2, 10] > 200 and pixels[38, 10] < 50  # the left band is now on top


def test_la_and_rgba_convert_deterministically():
    la = Image.new("LA", (4, 4), (100, 0))  # fully transparent grey
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 255))
    assert np.asarray(load_image(encode(la, "PNG")))[0, 0].tolist() == [255, 255, 255]
    assert np.asarray(load_image(encode(rgba, "PNG")))[0, 0].tolist() == [10, 20, 30]


def test_image_processor_batches_images_in_order():
    processor = SoloImageProcessor()
    first, second = noise_image(64, 32, 5), noise_image(32, 96, 6)
    out = processor([first, second])
    assert out["image_grids"].tolist() == [[1, 2], [3, 1]]
    assert out["vision_patches"].dtype == torch.uint8 and out["vision_patches"].shape == (5, PATCH_DIM)
    np.testing.assert_array_equal(out["vision_patches"][:2].numpy(), image_to_patches(first)[0])
