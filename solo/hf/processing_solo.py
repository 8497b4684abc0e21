"""SoloProcessor: text with `<image>` placeholders + images → model inputs, in SOLO's token layout.

One image of R × C patches becomes `<vision>`, then the rows of C `<vpatch>` tokens separated by
`<vrow_sep>` (R − 1 of them), then `</vision>` — the layout pretraining uses. `vision_patches`
holds the uint8 patches of the whole batch, flat, and `vision_patch_indices` points each `<vpatch>`
at its row there (−1 for every other token).

Shipped next to exported checkpoints as `trust_remote_code` code: imports only the standard
library, numpy, torch, transformers and its sibling module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .image_processing_solo import PATCH_DIM, SoloImageProcessor, image_tokens_count

VISION_START = "<vision>"
VISION_PATCH = "<vpatch>"
VISION_ROW_SEP = "<vrow_sep>"
VISION_FRAME_SEP = "<vframe_sep>"  # reserved for video, as in SOLO-7B; never emitted
VISION_END = "</vision>"
LOCATION_TOKENS = tuple(f"<loc_{index}>" for index in range(1, 1025))  # reserved, as in SOLO-7B
# Appended in this order after the base vocabulary: a 32,000-entry base gives SOLO-7B's ids.
VISION_TOKENS = (VISION_START, VISION_PATCH, VISION_ROW_SEP, VISION_FRAME_SEP, VISION_END) + LOCATION_TOKENS
IMAGE_PLACEHOLDER = "<image>"

# Mistral-Instruct turns; an image item renders as the `<image>` placeholder, which the processor
# expands into the same `<vision> … </vision>` block that pretraining uses.
CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if item['type'] in ('image', 'image_url') -%}<image>"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}"
    "{%- else -%}{{ raise_exception('unknown content type ' ~ item['type']) }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{{- bos_token -}}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{%- set ns.system = render(message['content']) ~ '\n\n' -%}"
    "{%- elif message['role'] == 'user' -%}[INST] {{ ns.system }}{{ render(message['content']) }} [/INST]"
    "{%- set ns.system = '' -%}"
    "{%- elif message['role'] == 'assistant' -%}{{ ' ' ~ render(message['content']) ~ eos_token }}"
    "{%- else -%}{{ raise_exception('unknown role ' ~ message['role'] ~ '; use system, user or assistant') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


@dataclass(frozen=True)
class VisionTokenIds:
    """The ids of the vision tokens in one tokenizer (never hard-coded: read from the tokenizer)."""

    start: int
    patch: int
    row_sep: int
    end: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "VisionTokenIds":
        vocab = tokenizer.get_vocab()
        missing = [t for t in (VISION_START, VISION_PATCH, VISION_ROW_SEP, VISION_END) if t not in vocab]
        if missing:
            raise ValueError(
                f"tokenizer lacks the SOLO vision tokens {missing}; extend it with solo.tokenizer.extend_tokenizer "
                "or create the checkpoint with `solo create`"
            )
        return cls(vocab[VISION_START], vocab[VISION_PATCH], vocab[VISION_ROW_SEP], vocab[VISION_END])

    def image_block(self, rows: int, cols: int, close_with_start: bool = False) -> np.ndarray:
        """Token ids of one image of rows × cols patches (int64, length rows*cols + rows + 1).

        `close_with_start=True` reproduces SOLO-7B's SFT/demo form, which closes with a second `<vision>`.
        """
        row = np.full(cols + 1, self.patch, dtype=np.int64)
        row[-1] = self.row_sep
        body = np.tile(row, rows)[:-1]  # no separator after the last row
        block = np.empty(image_tokens_count(rows, cols), dtype=np.int64)
        block[0] = self.start
        block[1:-1] = body
        block[-1] = self.start if close_with_start else self.end
        return block


class SoloProcessor(ProcessorMixin):
    """Tokenizer + `SoloImageProcessor` → `input_ids, attention_mask, vision_patches, vision_patch_indices`.

    Each text holds one `<image>` placeholder per image. `images` is a list of images per text (or a
    flat list consumed in order). `legacy_solo7b=True` reproduces SOLO-7B's released prompt form:
    the images' blocks come first, before BOS, each closed by a second `<vision>`, and the
    placeholders (with an adjacent newline) are removed from the text; images are opened as SOLO
    did (EXIF orientation ignored, transparency dropped instead of composited on white).
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        if chat_template is None and tokenizer is not None:
            chat_template = getattr(tokenizer, "chat_template", None)
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def _group_images(self, texts: list[str], images) -> list[list[Any]]:
        counts = [text.count(IMAGE_PLACEHOLDER) for text in texts]
        if images is None:
            images = []
        if not isinstance(images, (list, tuple)):
            images = [images]
        if images and all(isinstance(group, (list, tuple)) for group in images):
            if len(images) != len(texts):
                raise ValueError(f"got {len(images)} image lists for {len(texts)} texts; give one list per text")
            groups = [list(group) for group in images]
        else:
            flat = list(images)
            if len(flat) != sum(counts):
                raise ValueError(
                    f"the texts have {sum(counts)} {IMAGE_PLACEHOLDER} placeholders but {len(flat)} images were given"
                )
            groups, position = [], 0
            for count in counts:
                groups.append(flat[position : position + count])
                position += count
        for index, (count, group) in enumerate(zip(counts, groups)):
            if count != len(group):
                raise ValueError(
                    f"text {index} has {count} {IMAGE_PLACEHOLDER} placeholders but {len(group)} images were given"
                )
        return groups

    def _encode_text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images=None,
        *,
        padding_side: str | None = None,
        add_bos: bool = True,
        legacy_solo7b: bool = False,
        return_tensors: str = "pt",
        **kwargs,
    ) -> BatchFeature:
        if text is None:
            raise ValueError("SoloProcessor needs text; put one <image> placeholder in it per image")
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        if return_tensors != "pt":
            raise ValueError("SoloProcessor returns PyTorch tensors only (return_tensors='pt')")
        texts = [text] if isinstance(text, str) else list(text)
        groups = self._group_images(texts, images)
        ids = VisionTokenIds.from_tokenizer(self.tokenizer)
        bos = self.tokenizer.bos_token

        samples, sample_patches = [], []
        for text_item, group in zip(texts, groups):
            tokens: list[np.ndarray] = []
            patches: list[np.ndarray] = []
            patch_flags: list[np.ndarray] = []

            def add_image(image, close_with_start: bool) -> None:
                image_patches, (rows, cols) = self.image_processor.patchify(image, legacy_solo7b=legacy_solo7b)
                block = ids.image_block(rows, cols, close_with_start)
                tokens.append(block)
                patch_flags.append(block == ids.patch)
                patches.append(image_patches)

            def add_text(segment: str) -> None:
                encoded = np.asarray(self._encode_text(segment), dtype=np.int64)
                tokens.append(encoded)
                patch_flags.append(np.zeros(len(encoded), dtype=bool))

            if legacy_solo7b:
                for image in group:
                    add_image(image, close_with_start=True)
                stripped = re.sub(r"<image>\n|\n<image>|<image>", "", text_item)
                if add_bos and not stripped.startswith(bos):
                    stripped = bos + stripped
                add_text(stripped)
            else:
                if add_bos and not text_item.startswith(bos):
                    text_item = bos + text_item
                segments = text_item.split(IMAGE_PLACEHOLDER)
                for index, segment in enumerate(segments):
                    add_text(segment)
                    if index < len(group):
                        add_image(group[index], close_with_start=False)
            samples.append((np.concatenate(tokens), np.concatenate(patch_flags)))
            sample_patches.append(patches)

        return self._collate(samples, sample_patches, padding_side or self.tokenizer.padding_side)

    def _collate(self, samples, sample_patches, padding_side: str) -> BatchFeature:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        length = max(len(tokens) for tokens, _ in samples)
        batch = len(samples)
        input_ids = torch.full((batch, length), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)
        patch_indices = torch.full((batch, length), -1, dtype=torch.long)
        offset = 0
        for row, (tokens, is_patch) in enumerate(samples):
            start = length - len(tokens) if padding_side == "left" else 0
            span = slice(start, start + len(tokens))
            input_ids[row, span] = torch.from_numpy(tokens)
            attention_mask[row, span] = 1
            count = int(is_patch.sum())
            row_indices = np.full(len(tokens), -1, dtype=np.int64)
            row_indices[is_patch] = np.arange(offset, offset + count)
            patch_indices[row, span] = torch.from_numpy(row_indices)
            offset += count
        flat = [p for patches in sample_patches for p in patches]
        vision_patches = torch.from_numpy(np.concatenate(flat)) if flat else torch.zeros((0, PATCH_DIM), dtype=torch.uint8)
        if vision_patches.shape[0] != offset:
            raise RuntimeError(f"layout bug: {offset} <vpatch> tokens for {vision_patches.shape[0]} patches")
        return BatchFeature(
            data={
                "input_ids": input_ids,
                "attention_mask": attention_mask,
                "vision_patches": vision_patches,
                "vision_patch_indices": patch_indices,
            }
        )

    def apply_chat_template(self, conversation, tokenize: bool = False, **kwargs) -> str:
        """Render messages with the stored Mistral-Instruct template (images as `<image>`)."""
        if tokenize:
            raise ValueError("render with tokenize=False, then call the processor with the text and the images")
        return self.tokenizer.apply_chat_template(conversation, tokenize=False, chat_template=self.chat_template, **kwargs)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "vision_patches", "vision_patch_indices"]


SoloImageProcessor.register_for_auto_class("AutoImageProcessor")
SoloProcessor.register_for_auto_class("AutoProcessor")
