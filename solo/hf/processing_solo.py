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
# expands into the same `<vision> … </vision>` block that pretraining uses. Consecutive messages of
# one role are ONE turn, their contents joined as they are: the rule `solo-data pack` applies too
# (data_prep.encode: consecutive segments of one role form one message), so training and inference
# see the same tokens. A system text goes, followed by a blank line, into the next user turn.
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
    "{%- set previous = loop.previtem['role'] if not loop.first else '' -%}"
    "{%- set following = loop.nextitem['role'] if not loop.last else '' -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- set ns.system = (ns.system if previous == 'system' else '') ~ render(message['content']) -%}"
    "{%- elif message['role'] == 'user' -%}"
    "{%- if previous != 'user' -%}{{ '[INST] ' ~ (ns.system ~ '\n\n' if ns.system else '') }}"
    "{%- set ns.system = '' -%}{%- endif -%}"
    "{{ render(message['content']) }}"
    "{%- if following != 'user' -%}{{ ' [/INST]' }}{%- endif -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- if previous != 'assistant' -%}{{ ' ' }}{%- endif -%}"
    "{{ render(message['content']) }}"
    "{%- if following != 'assistant' -%}{{ eos_token }}{%- endif -%}"
    "{%- else -%}{{ raise_exception('unknown role ' ~ message['role'] ~ '; use system, user or assistant') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def non_special_solo_tokens(tokenizer) -> list[str]:
    """The SOLO tokens (vision and location) that ``tokenizer`` holds as ordinary added tokens.

    The tokenizer rule: SOLO tokens must be special. A non-special added token is matched in text
    even with ``split_special_tokens``, so a caption "<vpatch> <loc_5>" would become vision and
    location ids. ``solo.tokenizer.extend_tokenizer`` (`solo create`) makes them special; the
    processor and `solo-data pack` refuse a tokenizer that breaks the rule.
    """
    solo = set(VISION_TOKENS)
    return [token.content for token in tokenizer.added_tokens_decoder.values()
            if token.content in solo and not token.special]


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
        ordinary = non_special_solo_tokens(tokenizer)
        if ordinary:
            raise ValueError(
                f"tokenizer holds {len(ordinary)} SOLO token(s) as ordinary, non-special tokens "
                f"(e.g. {ordinary[0]!r}): "
                "text containing them would become vision or location ids; rebuild it with "
                "solo.tokenizer.extend_tokenizer (or `solo create`), which makes them special"
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


class ChatPrompt(str):
    """A chat rendered by `SoloProcessor.apply_chat_template`: the text, plus its structure.

    `parts` lists ("id", token id) for the template's own markers (BOS, EOS after an assistant
    turn), ("image",) for an image item and ("text", str) for message text, so the processor emits
    special ids only where the template put them: a message containing "</s>" stays text. Any
    edit of the string (concatenation, slicing) gives a plain `str`, which is tokenised as text.
    """

    parts: tuple

    def __new__(cls, text: str, parts: list[tuple]):
        prompt = super().__new__(cls, text)
        prompt.parts = tuple(parts)
        return prompt


_HIDE_OPEN, _HIDE_CLOSE = "\ue000", "\ue001"  # private-use code points around a hidden text's index
_HIDDEN = re.compile(f"{_HIDE_OPEN}(\\d+){_HIDE_CLOSE}")


class SoloProcessor(ProcessorMixin):
    """Tokenizer + `SoloImageProcessor` → `input_ids, attention_mask, vision_patches, vision_patch_indices`.

    Each text holds one `<image>` placeholder per image. `images` is a list of images per text (or a
    flat list consumed in order).

    Text is text: special-token strings in it (`</s>`, `<unk>`, `<vpatch>`, `<loc_5>`, …) are
    tokenised as ordinary characters, so no caption, page or chat turn can forge a model input.
    Special ids come only from the layout: BOS (`add_bos`, or a BOS string opening the text),
    image blocks, and the markers of a prompt rendered by `apply_chat_template` (a `ChatPrompt`).
    `special_tokens=True` parses special-token strings in trusted prompt text instead, e.g. to ask
    for grounding with `<loc_N>` tokens; vision tokens are refused even then (they come only from
    images, or the `<vpatch>` count would no longer match the patches).

    `legacy_solo7b=True` reproduces SOLO-7B's released prompt form: the images' blocks come first,
    before BOS, each closed by a second `<vision>`, and the placeholders (with an adjacent newline)
    are removed from the text; images are opened as SOLO did (EXIF orientation ignored,
    transparency dropped instead of composited on white). Batches are left-padded (what generation needs) unless
    `padding_side="right"` is passed.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        if chat_template is None and tokenizer is not None:
            chat_template = getattr(tokenizer, "chat_template", None)
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def _group_images(self, texts: list[str], images) -> list[list[Any]]:
        counts = [sum(part[0] == "image" for part in self._parts(text)) for text in texts]
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

    def _parts(self, text: str) -> list[tuple]:
        """A text as ("text", str) / ("image",) / ("id", id) parts (see `ChatPrompt`)."""
        if isinstance(text, ChatPrompt):
            return list(text.parts)
        parts: list[tuple] = []
        bos = self.tokenizer.bos_token
        if bos and text.startswith(bos):  # the BOS a rendered chat opens with: position 0 is BOS anyway
            parts.append(("id", self.tokenizer.bos_token_id))
            text = text[len(bos):]
        for index, segment in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if index:
                parts.append(("image",))
            parts.append(("text", segment))
        return parts

    def _encode_text(self, text: str, special_tokens: bool = False) -> list[int]:
        """Token ids of `text` with every special-token string kept as text, unless `special_tokens`."""
        if not text:
            return []
        if special_tokens:
            forged = [token for token in VISION_TOKENS[:5] if token in text]
            if forged:
                raise ValueError(f"text contains the vision token(s) {forged}; they come only from images "
                                 f"(put an {IMAGE_PLACEHOLDER} placeholder where an image goes)")
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=not special_tokens)["input_ids"]

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images=None,
        *,
        padding_side: str = "left",
        add_bos: bool = True,
        legacy_solo7b: bool = False,
        special_tokens: bool = False,
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
        bos_id = self.tokenizer.bos_token_id

        samples, sample_patches = [], []
        for text_item, group in zip(texts, groups):
            tokens: list[np.ndarray] = []
            patches: list[np.ndarray] = []
            patch_flags: list[np.ndarray] = []

            def add_ids(values: list[int]) -> None:
                tokens.append(np.asarray(values, dtype=np.int64))
                patch_flags.append(np.zeros(len(values), dtype=bool))

            def add_image(image, close_with_start: bool) -> None:
                image_patches, (rows, cols) = self.image_processor.patchify(image, legacy_solo7b=legacy_solo7b)
                block = ids.image_block(rows, cols, close_with_start)
                tokens.append(block)
                patch_flags.append(block == ids.patch)
                patches.append(image_patches)

            parts = self._parts(text_item)
            if legacy_solo7b:
                # SOLO-7B's form: the image blocks first, each closed by <vision>, then BOS and the
                # text without its placeholders (and the newline next to each).
                for image in group:
                    add_image(image, close_with_start=True)
                kept = list(parts)
                for index, part in enumerate(parts):
                    if part[0] != "image":
                        continue
                    before = kept[index - 1] if index else ("none",)
                    after = kept[index + 1] if index + 1 < len(kept) else ("none",)
                    if before[0] == "text" and before[1].endswith("\n"):
                        kept[index - 1] = ("text", before[1][:-1])
                    elif after[0] == "text" and after[1].startswith("\n"):
                        kept[index + 1] = ("text", after[1][1:])
                parts = [part for part in kept if part[0] != "image"]
            if add_bos and parts[:1] != [("id", bos_id)]:
                parts.insert(0, ("id", bos_id))
            images_left = iter(group)
            text_run: list[str] = []  # adjacent text parts are tokenised as one string
            for part in parts + [("end",)]:
                if part[0] == "text":
                    text_run.append(part[1])
                    continue
                add_ids(self._encode_text("".join(text_run), special_tokens))
                text_run = []
                if part[0] == "id":
                    add_ids([part[1]])
                elif part[0] == "image":
                    add_image(next(images_left), close_with_start=False)
            samples.append((np.concatenate(tokens), np.concatenate(patch_flags)))
            sample_patches.append(patches)

        # Left padding regardless of the tokenizer's `padding_side`: transformers 5 does not save
        # that attribute, so a reloaded tokenizer would say "right" and batched generation would
        # continue after the padding. Training collators pass padding_side="right" explicitly.
        return self._collate(samples, sample_patches, padding_side)

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
        vision_patches = (torch.from_numpy(np.concatenate(flat)) if flat
                          else torch.zeros((0, PATCH_DIM), dtype=torch.uint8))
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

    def apply_chat_template(self, conversation, tokenize: bool = False, **kwargs) -> ChatPrompt:
        """Render messages with the stored Mistral-Instruct template (images as `<image>`).

        Returns a `ChatPrompt`: the rendered text, which also remembers which parts the template
        wrote, so that `processor(prompt, images=...)` turns only the template's own BOS/EOS into
        special ids and keeps every message's text as text (a turn containing "</s>" cannot end it).
        """
        if tokenize:
            raise ValueError("render with tokenize=False, then call the processor with the text and the images")
        render = lambda messages: self.tokenizer.apply_chat_template(  # noqa: E731
            messages, tokenize=False, chat_template=self.chat_template, **kwargs)
        hidden: list[str] = []

        def hide(value: str) -> str:
            hidden.append(value)
            return f"{_HIDE_OPEN}{len(hidden) - 1}{_HIDE_CLOSE}"

        def hide_content(content, number: int):
            # Text is a string, nothing else: a dict or list rendered by the template would show
            # its repr, in which "</s>" would become a real EOS.
            if isinstance(content, str):
                return hide(content)
            if not isinstance(content, list):
                raise ValueError(f"message {number}: content must be a string or a list of items, "
                                 f"got {type(content).__name__}")
            for item in content:
                if not isinstance(item, dict):
                    raise ValueError(f"message {number}: a content item must be an object such as "
                                     f"{{'type': 'text', 'text': '...'}}, got {type(item).__name__}")
                if item.get("type") == "text" and not isinstance(item.get("text"), str):
                    raise ValueError(f"message {number}: the 'text' of a text item must be a string, "
                                     f"got {type(item.get('text')).__name__}")
            return [dict(item, text=hide(item["text"])) if item.get("type") == "text" else item for item in content]

        for number, message in enumerate(conversation):
            if not isinstance(message, dict):
                raise ValueError(f"message {number} must be an object with 'role' and 'content', "
                                 f"got {type(message).__name__}")
        masked = [dict(message, content=hide_content(message.get("content"), number))
                  for number, message in enumerate(conversation)]
        skeleton = render(masked)  # the template's own text, each message text replaced by its index
        markers = {token: self.tokenizer.convert_tokens_to_ids(token)
                   for token in (self.tokenizer.bos_token, self.tokenizer.eos_token) if token}
        splitter = re.compile("(" + "|".join(re.escape(token) for token in [*markers, IMAGE_PLACEHOLDER]) + ")")
        parts: list[tuple] = []
        for piece in splitter.split(skeleton):
            if piece in markers:
                parts.append(("id", markers[piece]))
            elif piece == IMAGE_PLACEHOLDER:
                parts.append(("image",))
            elif piece:
                parts.append(("text", _HIDDEN.sub(lambda match: hidden[int(match.group(1))], piece)))
        return ChatPrompt(render(conversation), parts)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "vision_patches", "vision_patch_indices"]


SoloImageProcessor.register_for_auto_class("AutoImageProcessor")
SoloProcessor.register_for_auto_class("AutoProcessor")
