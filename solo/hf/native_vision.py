"""Native-VLM switches of a SOLO model: attention inside image blocks, and 2-D rotary positions.

SOLO (the default of both switches) reads an image block like text. Two config fields change that,
in the Hugging Face model and in the megatron-core model alike: both call the functions below, so
each rule lives here once.

``image_attention``
    ``causal`` (SOLO): every token sees itself and the tokens before it in its document.
    ``bidirectional``: the tokens of one image block (``<vision>`` through its closing token) also
    see each other in both directions. Every other pair stays causal, inside one document; the
    sliding window limits the causal pairs only (an image block, ≤ 1,057 tokens, is far shorter).

``vision_positions``
    ``sequential`` (SOLO): one rotary position per token, counting up from 0 in each document.
    ``2d``: rotary positions in two frequency sections, a row and a column section (the M-RoPE
    idea). Exactly:

    * Let the image's ``<vision>`` token have position p, and the image R rows and C columns.
      The grid token in row r and column c (the patch (r, c) for c < C; the ``<vrow_sep>`` that
      ends row r sits in column C) has row position p + 1 + r and column position p + 1 + c.
    * Every other token (``<vision>``, the closing token, text) has one position, the same in both
      sections. The closing token's is one more than the grid's largest position:
      p + 2 + max(R − 1, C − 1 + [R > 1]); the tokens after it count up from there, to the end of
      the document. A document without images therefore has SOLO's positions.
    * Rotary frequency i (of head_dim / 2, highest first) turns by the row position when i is even
      and by the column position when i is odd: interleaved sections, so each axis gets high and
      low frequencies.
    * With a key/value cache, a step's text continues at its sequential position plus
      ``rope_deltas`` (minus the shifts of the images before the step; ``generate`` passes it).

An image's *layout* is (offset of its ``<vision>`` token in the row, rows, cols): what the packer
records per image (``data_prep`` ``image_layout``), or what :func:`image_layout_from_patch_indices`
reads back from ``vision_patch_indices``.

Shipped next to exported checkpoints as ``trust_remote_code`` code: imports torch and siblings only.
"""

from __future__ import annotations

import torch

from .image_processing_solo import image_tokens_count

IMAGE_ATTENTION = ("causal", "bidirectional")
VISION_POSITIONS = ("sequential", "2d")


def is_native(image_attention: str, vision_positions: str) -> bool:
    """Whether either switch leaves SOLO's behaviour."""
    return image_attention != IMAGE_ATTENTION[0] or vision_positions != VISION_POSITIONS[0]


def check_switches(image_attention: str, vision_positions: str, where: str = "") -> None:
    """ValueError naming the field unless both switches hold one of their choices."""
    if image_attention not in IMAGE_ATTENTION:
        raise ValueError(f"{where}image_attention must be one of {', '.join(IMAGE_ATTENTION)}; got {image_attention!r}")
    if vision_positions not in VISION_POSITIONS:
        raise ValueError(f"{where}vision_positions must be one of {', '.join(VISION_POSITIONS)}; "
                         f"got {vision_positions!r}")


def image_layout_from_patch_indices(vision_patch_indices: torch.Tensor) -> torch.Tensor:
    """(offset of ``<vision>``, rows, cols) of every image in one row of ``vision_patch_indices``.

    Read from the token layout (docs/tokens_and_images.md: ``<vision>``, rows of C ``<vpatch>`` with
    one ``<vrow_sep>`` between rows, the closing token): an image's patches lie 1 apart within a row
    and 2 apart across a row separator; two images are at least 3 apart (closing and opening tokens
    between them).
    Returns int64 [n_images, 3] on the input's device; one host sync.
    """
    positions = torch.nonzero(vision_patch_indices.reshape(-1) >= 0).reshape(-1).cpu()
    layouts = []
    if positions.numel():
        gaps = torch.diff(positions)
        image_starts = [0] + (torch.nonzero(gaps >= 3).reshape(-1) + 1).tolist() + [positions.numel()]
        for first, last in zip(image_starts[:-1], image_starts[1:]):
            patches = positions[first:last]
            rows = 1 + int((torch.diff(patches) == 2).sum())
            cols = patches.numel() // rows
            offset = int(patches[0]) - 1
            expected = offset + 1 + torch.arange(rows)[:, None] * (cols + 1) + torch.arange(cols)[None, :]
            if rows * cols != patches.numel() or not torch.equal(expected.reshape(-1), patches):
                raise ValueError(
                    f"vision_patch_indices: the patches at positions {patches.tolist()} do not form an image "
                    "block (rows of equal length, one <vrow_sep> between rows); build inputs with SoloProcessor"
                )
            layouts.append((offset, rows, cols))
    return torch.tensor(layouts, dtype=torch.long).reshape(-1, 3).to(vision_patch_indices.device)


def image_block_ids(layout: torch.Tensor, length: int) -> torch.Tensor:
    """[length] int64: the image number (row of ``layout``) of every token inside an image block,
    -1 elsewhere. Device ops only (no host sync)."""
    layout = layout.to(torch.long)
    device = layout.device
    start = layout[:, 0]
    end = start + image_tokens_count(layout[:, 1], layout[:, 2])
    ones = torch.ones_like(start)
    opened = torch.zeros(length + 1, dtype=torch.long, device=device).index_add_(0, start, ones)
    inside = (opened - torch.zeros_like(opened).index_add_(0, end, ones)).cumsum(0)[:length] > 0
    return torch.where(inside, opened.cumsum(0)[:length] - 1, -1)


def closing_position_offset(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """2-D position of an image's closing token minus its ``<vision>`` token's (see the module doc)."""
    return 2 + torch.maximum(rows - 1, cols - 1 + (rows > 1).to(rows.dtype))


def image_position_shift(layout: torch.Tensor) -> torch.Tensor:
    """How much lower every later token's 2-D position is than its sequential one, summed over the
    images of ``layout`` (one document): what ``rope_deltas`` subtracts after them."""
    layout = layout.to(torch.long)
    rows, cols = layout[:, 1], layout[:, 2]
    return (image_tokens_count(rows, cols) - 1 - closing_position_offset(rows, cols)).sum()


def rope_section_positions(positions: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
    """[2, S] (row section, column section) rotary positions of one row under ``vision_positions=2d``.

    ``positions`` [S] are the sequential positions (restarting at each document, as packed rows
    give them); ``layout`` the row's images. Device ops only (no host sync).
    """
    positions = positions.to(torch.long)
    length = positions.shape[0]
    layout = layout.to(device=positions.device, dtype=torch.long)
    if layout.shape[0] == 0:
        return positions.expand(2, length).clone()
    offset, rows, cols = layout.unbind(-1)
    span = image_tokens_count(rows, cols)
    index = torch.arange(length, device=positions.device)
    # Tokens from an image's closing token on (in its document) move down by that image's shift.
    marks = torch.zeros(length, dtype=torch.long, device=positions.device)
    marks.index_add_(0, offset + span - 1, span - 1 - closing_position_offset(rows, cols))
    total = marks.cumsum(0)
    new_document = torch.ones(length, dtype=torch.bool, device=positions.device)
    new_document[1:] = positions[1:] != positions[:-1] + 1
    document_start = torch.cummax(torch.where(new_document, index, 0), dim=0).values
    base = positions - (total - (total - marks)[document_start])
    # Grid tokens: (row, column) from their place in the block, counted from <vision>'s position.
    block = image_block_ids(layout, length)
    image = block.clamp(min=0)
    within = (index - offset[image] - 1).clamp(min=0)
    grid = (block >= 0) & (index > offset[image]) & (index < offset[image] + span[image] - 1)
    first = base[offset[image]] + 1
    width = cols[image] + 1
    row = first + torch.div(within, width, rounding_mode="floor")
    col = first + within % width
    return torch.stack([torch.where(grid, row, base), torch.where(grid, col, base)])


def column_frequencies(num_frequencies: int, device=None) -> torch.Tensor:
    """[num_frequencies] bool: the rotary frequencies that turn by the column position (odd ones)."""
    return torch.arange(num_frequencies, device=device) % 2 == 1


__all__ = [
    "IMAGE_ATTENTION",
    "VISION_POSITIONS",
    "check_switches",
    "closing_position_offset",
    "column_frequencies",
    "image_block_ids",
    "image_layout_from_patch_indices",
    "image_position_shift",
    "is_native",
    "rope_section_positions",
]
