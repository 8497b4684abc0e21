"""A tiny random SOLO Hugging Face model (hidden 64, 2 layers) and hand-built samples for it."""

from __future__ import annotations

import torch

from solo.hf import SoloConfig

# Token ids of the tiny vocabulary. Text ids are drawn from [FIRST_TEXT_ID, VISION).
PAD, BOS, EOS = 0, 1, 2
FIRST_TEXT_ID = 3
VISION, VPATCH, VROW_SEP, VISION_END = 500, 501, 502, 504
VOCAB_SIZE = 512
PATCH_DIM = 3 * 32 * 32
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TOLERANCE = 1e-5

TINY = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=PAD,
    bos_token_id=BOS,
    eos_token_id=EOS,
)


def tiny_config(**overrides) -> SoloConfig:
    return SoloConfig(**{**TINY, **overrides})


def make_sample(generator: torch.Generator, text_before: int, grids: list[tuple[int, int]], text_after: int):
    """One sample: BOS, text, images as <vision> rows of <vpatch> / <vrow_sep> </vision>, text.

    Returns (input_ids list, local patch index list with -1 for non-patches, uint8 patches (n, 3072)).
    """

    def text(n: int) -> list[int]:
        return torch.randint(FIRST_TEXT_ID, VISION, (n,), generator=generator).tolist()

    ids, indices = [BOS] + text(text_before), [-1] * (1 + text_before)
    n_patches = 0
    for rows, cols in grids:
        ids.append(VISION)
        indices.append(-1)
        for row in range(rows):
            ids.extend([VPATCH] * cols)
            indices.extend(range(n_patches, n_patches + cols))
            n_patches += cols
            if row < rows - 1:
                ids.append(VROW_SEP)
                indices.append(-1)
        ids.append(VISION_END)
        indices.append(-1)
        after = text(text_after)
        ids.extend(after)
        indices.extend([-1] * len(after))
    patches = torch.randint(0, 256, (n_patches, PATCH_DIM), generator=generator, dtype=torch.uint8)
    return ids, indices, patches


def collate(samples, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad samples into a batch with one flat patch tensor and globally offset patch indices."""
    length = max(len(ids) for ids, _, _ in samples)
    input_ids, attention_mask, patch_indices, patches = [], [], [], []
    offset = 0
    for ids, indices, sample_patches in samples:
        pad = length - len(ids)
        shifted = [i + offset if i >= 0 else -1 for i in indices]
        offset += sample_patches.shape[0]
        patches.append(sample_patches)
        if padding_side == "right":
            input_ids.append(ids + [PAD] * pad)
            attention_mask.append([1] * len(ids) + [0] * pad)
            patch_indices.append(shifted + [-1] * pad)
        else:
            input_ids.append([PAD] * pad + ids)
            attention_mask.append([0] * pad + [1] * len(ids))
            patch_indices.append([-1] * pad + shifted)
    return {
        "input_ids": torch.tensor(input_ids),
        "attention_mask": torch.tensor(attention_mask),
        "vision_patches": torch.cat(patches),
        "vision_patch_indices": torch.tensor(patch_indices),
    }


def mixed_samples(seed: int = 0):
    """An image-text sample with two images, a text-only sample, and a short single-image one."""
    generator = torch.Generator().manual_seed(seed)
    return [
        make_sample(generator, 3, [(2, 3), (1, 2)], 4),
        make_sample(generator, 9, [], 0),
        make_sample(generator, 1, [(1, 1)], 2),
    ]
