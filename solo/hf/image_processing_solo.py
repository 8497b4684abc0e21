"""The one SOLO image pipeline: open → RGB → resize to the patch grid → uint8 patches.

Data preparation, training and inference all call this module, so the patch layout cannot drift
between them. It is also shipped next to exported checkpoints as `trust_remote_code` code, so it
imports only the standard library, numpy, PIL, torch and transformers.

Patch layout (SOLO-7B compatible): raster (row-major) patch order; inside the 3 * 32 * 32 vector the
order is channel, then y, then x (index = c * 1024 + y * 32 + x). Patches stay uint8 until they
reach the model or the accelerator, where `normalize_patches` applies ImageNet mean/std in float.
"""

from __future__ import annotations

import functools
import io
import math
import os
import warnings
from typing import BinaryIO, Iterable, Union

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

PATCH_SIZE = 32
MAX_IMAGE_SIDE = 1024  # SOLO's MAX_RESOLUTION: the long side never exceeds this
MAX_PATCHES = (MAX_IMAGE_SIDE // PATCH_SIZE) ** 2  # 1024
NUM_CHANNELS = 3
PATCH_DIM = NUM_CHANNELS * PATCH_SIZE * PATCH_SIZE  # 3072
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Decoded-pixel cap against decompression bombs; 8K x 8K is far beyond anything useful at a
# 1024-px budget but below what could exhaust a data-prep worker's memory.
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024
RESIZE_MODES = ("fit", "solo")

ImageSource = Union[str, os.PathLike, bytes, bytearray, BinaryIO, Image.Image]


class ImageLoadError(ValueError):
    """An image could not be used: corrupt, truncated, empty, too large or degenerate.

    The message always names the input so that a data-prep report or a user can find it.
    """

    def __init__(self, source_name: str, reason: str):
        self.source_name = source_name
        self.reason = reason
        super().__init__(f"{source_name}: {reason}")


def _source_name(source: ImageSource, name: str | None) -> str:
    if name is not None:
        return name
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    return getattr(source, "name", None) or f"<{type(source).__name__}>"


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB deterministically (transparent areas become white)."""
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        # A palette with a transparent index must go through RGBA, or the key colour shows.
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit greyscale: scale to 8 bits by the type's full range, not by clipping.
        array = np.asarray(image, dtype=np.float64)
        # 32-bit "I" images are usually 16-bit data widened; scale larger ranges by their maximum.
        top = 65535.0 if image.mode.startswith("I;16") or array.max() <= 65535 else float(array.max())
        array = np.clip(np.round(array / top * 255.0), 0, 255).astype(np.uint8)
        image = Image.fromarray(array, mode="L")
    elif image.mode == "F":
        array = np.clip(np.round(np.asarray(image, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)
        image = Image.fromarray(array, mode="L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def load_image(
    source: ImageSource, *, name: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
    legacy_solo7b: bool = False,
) -> Image.Image:
    """Open an image from a path, bytes, a binary file or a PIL image and return it as RGB.

    Applies EXIF orientation, takes the first frame of animations, converts every mode to RGB
    deterministically, and refuses images whose decoded size exceeds `max_pixels`.
    `legacy_solo7b=True` opens images as SOLO-7B was trained on them: EXIF orientation ignored and
    a plain PIL `convert("RGB")` (transparency dropped, not composited on white).
    Raises `ImageLoadError` (naming the input) for empty, corrupt, truncated or oversized images.
    """
    label = _source_name(source, name)
    if isinstance(source, Image.Image):
        image = source
    else:
        if isinstance(source, (bytes, bytearray)):
            if len(source) == 0:
                raise ImageLoadError(label, "empty file (0 bytes); re-download or drop it")
            stream: BinaryIO = io.BytesIO(source)
        elif isinstance(source, (str, os.PathLike)):
            try:
                if os.path.getsize(source) == 0:
                    raise ImageLoadError(label, "empty file (0 bytes); re-download or drop it")
                with open(source, "rb") as handle:
                    stream = io.BytesIO(handle.read())
            except OSError as error:
                raise ImageLoadError(label, f"cannot read file ({error.strerror or error})") from error
        else:
            stream = source
        try:
            with warnings.catch_warnings():
                # PIL warns above MAX_IMAGE_PIXELS and errors at 2x; we apply our own cap instead.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(stream)
        except Image.DecompressionBombError as error:
            raise ImageLoadError(label, f"decompression bomb refused ({error})") from error
        except Exception as error:  # PIL raises many types for undecodable input
            raise ImageLoadError(label, f"not a readable image ({type(error).__name__}: {error})") from error
    width, height = image.size
    if width * height > max_pixels:
        raise ImageLoadError(
            label,
            f"{width}x{height} = {width * height} pixels exceeds the decoded-pixel cap of {max_pixels} "
            "(possible decompression bomb); downscale it first or raise max_pixels",
        )
    if width < 1 or height < 1:
        raise ImageLoadError(label, f"image has no pixels ({width}x{height})")
    try:
        if getattr(image, "is_animated", False):
            image.seek(0)
        previous = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never grey pixels
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image.load()
                if not legacy_solo7b:
                    image = ImageOps.exif_transpose(image)
                if getattr(image, "n_frames", 1) > 1:
                    image = image.copy()  # detach from the remaining frames
                image = image.convert("RGB") if legacy_solo7b else _to_rgb(image)
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous
    except ImageLoadError:
        raise
    except Exception as error:
        raise ImageLoadError(label, f"cannot decode image ({type(error).__name__}: {error})") from error
    return image


# The preprocessing SOLO-7B was trained and evaluated with: its resize rule and its way of opening
# images. A processor written for a converted SOLO-7B carries them, so it is evaluated as released.
SOLO7B_SETTINGS = {"resize_mode": "solo", "legacy_image_opening": True}


def solo_resize_size(width: int, height: int, max_side: int = MAX_IMAGE_SIDE) -> tuple[int, int]:
    """SOLO's resize rule, bit for bit: returns (new_width, new_height), multiples of 32.

    new_long = min(ceil(long / 32) * 32, max_side); new_short = ceil(int(new_long * short / long) / 32) * 32,
    max_side = 1024 in SOLO. It stretches thin images and gives a zero side beyond ~1024:1, which raises here.
    """
    long_side, short_side = max(width, height), min(width, height)
    new_long = min(math.ceil(long_side / PATCH_SIZE) * PATCH_SIZE, max_side)
    new_short = math.ceil(int(new_long * short_side / long_side) / PATCH_SIZE) * PATCH_SIZE
    if new_short == 0:
        raise ValueError(
            f"image of {width}x{height} has an aspect ratio beyond what the 'solo' resize rule handles "
            "(its short side rounds to 0 patches); use resize_mode='fit'"
        )
    return (new_long, new_short) if width >= height else (new_short, new_long)


def fit_grid(width: int, height: int, max_patches: int = MAX_PATCHES) -> tuple[int, int]:
    """The patch grid (rows, cols) of the default 'fit' rule.

    Scale the image by ONE factor (never up) so that its area fits the patch budget; take the
    grids whose sides are that size rounded down or up (at least one patch each) and keep the one
    closest to the image's aspect ratio (ties: more patches). If none fits the budget — in patches,
    or in tokens (at most SOLO's 1,057 per image, which bounds thin images too) — shrink the factor
    a little and try again. So no side is enlarged by more than rounding up to the patch grid, and
    the aspect ratio is kept to within one patch per side.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image has no pixels ({width}x{height})")
    side = int(math.isqrt(max_patches))
    max_tokens = image_tokens_count(side, side)
    aspect = math.log(width / height)
    scale = min(1.0, math.sqrt(max_patches / (width * height)) * PATCH_SIZE)
    while True:
        rows_f, cols_f = height * scale / PATCH_SIZE, width * scale / PATCH_SIZE
        candidates = [
            (abs(math.log(cols / rows) - aspect), -rows * cols, rows, cols)
            for rows in {max(1, math.floor(rows_f)), max(1, math.ceil(rows_f))}
            for cols in {max(1, math.floor(cols_f)), max(1, math.ceil(cols_f))}
            if rows * cols <= max_patches and image_tokens_count(rows, cols) <= max_tokens
        ]
        if candidates:
            _, _, rows, cols = min(candidates)
            return rows, cols
        scale *= 0.995


def check_max_patches(max_patches: int) -> int:
    """`max_patches` if it is a patch budget the resize rules take (1 … 1024), else ValueError."""
    if isinstance(max_patches, bool) or not isinstance(max_patches, int) or not 1 <= max_patches <= MAX_PATCHES:
        raise ValueError(f"max_patches must be an integer from 1 to {MAX_PATCHES}, got {max_patches!r}")
    return max_patches


def resize_size(width: int, height: int, resize_mode: str = "fit", max_patches: int = MAX_PATCHES) -> tuple[int, int]:
    """Target (width, height) in pixels, multiples of 32, for `resize_mode` 'fit' (default) or 'solo'.

    `max_patches` (a per-stage visual-token budget, default 1,024 = no change) scales images down,
    aspect kept, until their grid holds at most that many patches: 'fit' is `fit_grid` at that budget;
    'solo' is SOLO's rule with the largest long side (a multiple of 32, at most 1,024) whose grid fits.
    """
    check_max_patches(max_patches)
    if resize_mode == "solo":
        for max_side in range(MAX_IMAGE_SIDE, 0, -PATCH_SIZE):
            new_width, new_height = solo_resize_size(width, height, max_side)
            if (new_width // PATCH_SIZE) * (new_height // PATCH_SIZE) <= max_patches:
                return new_width, new_height
        raise ValueError(f"image of {width}x{height} cannot fit {max_patches} patches under the 'solo' rule "
                         "(its thin side needs more); use resize_mode='fit'")
    if resize_mode == "fit":
        rows, cols = fit_grid(width, height, max_patches)
        return cols * PATCH_SIZE, rows * PATCH_SIZE
    raise ValueError(f"unknown resize_mode {resize_mode!r}; choose one of {RESIZE_MODES}")


def patchify_array(pixels: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 with H, W multiples of 32 → (rows * cols, 3072) uint8 in (c, y, x) order."""
    height, width, channels = pixels.shape
    rows, cols = height // PATCH_SIZE, width // PATCH_SIZE
    blocks = pixels.reshape(rows, PATCH_SIZE, cols, PATCH_SIZE, channels)
    # → (rows, cols, c, y, x): raster patch order, channel-major inside each patch.
    return np.ascontiguousarray(blocks.transpose(0, 2, 4, 1, 3)).reshape(rows * cols, PATCH_DIM)


def unpatchify(patches: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Inverse of `patchify_array`: (rows * cols, 3072) → (rows * 32, cols * 32, 3) uint8."""
    blocks = np.asarray(patches).reshape(rows, cols, NUM_CHANNELS, PATCH_SIZE, PATCH_SIZE)
    return np.ascontiguousarray(blocks.transpose(0, 3, 1, 4, 2)).reshape(
        rows * PATCH_SIZE, cols * PATCH_SIZE, NUM_CHANNELS
    )


def image_to_patches(
    image: Image.Image, resize_mode: str = "fit", max_patches: int = MAX_PATCHES
) -> tuple[np.ndarray, tuple[int, int]]:
    """Resize an RGB image to its patch grid and cut it: returns (uint8 [N, 3072], (rows, cols))."""
    if image.mode != "RGB":
        image = _to_rgb(image)
    new_width, new_height = resize_size(image.width, image.height, resize_mode, max_patches)
    if (new_width, new_height) != image.size:
        image = image.resize((new_width, new_height), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.uint8)
    return patchify_array(pixels), (new_height // PATCH_SIZE, new_width // PATCH_SIZE)


@functools.lru_cache(maxsize=None)
def _imagenet_statistics(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean/std as float32 tensors on ``device``, made once per device: a fresh
    ``torch.tensor(list, device=cuda)`` per call would be a blocking host-to-device copy per step."""
    return (torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=device),
            torch.tensor(IMAGENET_STD, dtype=torch.float32, device=device))


def normalize_patches(patches: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 patches [N, 3072] → float patches, scaled to [0, 1] then ImageNet-normalised per channel.

    Done on the model's device, at batch/model time, so storage and transfer stay uint8.
    """
    if patches.dtype != torch.uint8:
        raise TypeError(f"normalize_patches expects uint8 patches, got {patches.dtype}")
    if patches.shape[-1] != PATCH_DIM:
        raise ValueError(f"patches must have {PATCH_DIM} values each, got shape {tuple(patches.shape)}")
    mean, std = _imagenet_statistics(patches.device)
    channel = patches.reshape(*patches.shape[:-1], NUM_CHANNELS, PATCH_DIM // NUM_CHANNELS).float() / 255.0
    channel = (channel - mean[:, None]) / std[:, None]
    return channel.reshape(patches.shape).to(dtype)


def image_tokens_count(rows: int, cols: int) -> int:
    """Tokens one image occupies: <vision>, rows of <vpatch> with R-1 <vrow_sep>, </vision>."""
    return rows * cols + (rows - 1) + 2


try:  # The HF-style processor class; plain functions above need nothing from transformers.
    from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
except ImportError:  # pragma: no cover - transformers is a hard dependency of the package
    BaseImageProcessor = object  # type: ignore[assignment,misc]
    BatchFeature = dict  # type: ignore[assignment,misc]


class SoloImageProcessor(BaseImageProcessor):
    """Images → uint8 patches and patch grids, the SOLO way (see module docstring).

    Returns a `BatchFeature` with `vision_patches` (uint8 tensor [sum N_i, 3072], images in order)
    and `image_grids` (long tensor [num_images, 2] of (rows, cols)). Normalisation happens in the
    model (`normalize_patches`), so the same uint8 patches serve storage, training and inference.
    """

    model_input_names = ["vision_patches"]

    def __init__(
        self,
        resize_mode: str = "fit",
        patch_size: int = PATCH_SIZE,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        legacy_image_opening: bool = False,
        max_patches: int = MAX_PATCHES,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"unknown resize_mode {resize_mode!r}; choose one of {RESIZE_MODES}")
        if patch_size != PATCH_SIZE:
            raise ValueError(f"SOLO models use {PATCH_SIZE}-px patches, got patch_size={patch_size}")
        self.resize_mode = resize_mode
        self.patch_size = patch_size
        self.max_pixels = max_pixels
        # Open every image as SOLO-7B did (see `load_image`): a converted SOLO-7B's processor sets it.
        self.legacy_image_opening = bool(legacy_image_opening)
        self.max_patches = check_max_patches(max_patches)

    def patchify(
        self, image: ImageSource, name: str | None = None, legacy_solo7b: bool = False
    ) -> tuple[np.ndarray, tuple[int, int]]:
        """One image (any source `load_image` accepts) → (uint8 [N, 3072], (rows, cols)).
        `legacy_solo7b` (or the processor's `legacy_image_opening`): open it as SOLO-7B did (see `load_image`)."""
        loaded = load_image(image, name=name, max_pixels=self.max_pixels,
                            legacy_solo7b=legacy_solo7b or self.legacy_image_opening)
        return image_to_patches(loaded, self.resize_mode, self.max_patches)

    def preprocess(self, images: ImageSource | Iterable[ImageSource], return_tensors=None, **kwargs) -> BatchFeature:
        if isinstance(images, (str, os.PathLike, bytes, bytearray, Image.Image)):
            images = [images]
        patches, grids = [], []
        for image in images:
            image_patches, grid = self.patchify(image)
            patches.append(image_patches)
            grids.append(grid)
        data = {
            "vision_patches": torch.from_numpy(
                np.concatenate(patches) if patches else np.zeros((0, PATCH_DIM), np.uint8)),
            "image_grids": torch.tensor(grids, dtype=torch.long).reshape(-1, 2),
        }
        return BatchFeature(data=data)
