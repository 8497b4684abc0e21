"""Documents → token ids, loss masks and image layouts; the clean-split rule for over-long documents.

Token layout of one document (our rule, fixing SOLO's):

* ``template="plain"`` (pretraining, as SOLO): BOS, then the segments in order — text tokenised
  with ``add_special_tokens=False``, an image as ``VisionTokenIds.image_block(rows, cols)`` — then
  EOS. Messages are concatenated without role markers.
* ``template="mistral"`` (SFT/chat): the Mistral-Instruct layout of ``CHAT_TEMPLATE``: BOS, then
  per turn ``[INST] {system}\\n\\n{user} [/INST]`` and `` {assistant}`` + EOS. The conversation must
  end with an assistant turn. Consecutive messages of one role are one turn, their texts joined as
  they are (the chat template renders them the same way, so training and inference agree).

Text is text: special-token strings in it (``</s>``, ``<vpatch>``, ``<loc_5>``, …) are tokenised as
ordinary characters (``split_special_tokens``); special and vision ids come only from this layout
code (BOS/EOS, image blocks). A literal ``<image>`` is text too, except in the ``llava`` format whose
``<image>`` placeholders the converter turns into images (as ``SoloProcessor`` does with a prompt).

Tokenisation: adjacent text is tokenised as one string — with ``mistral`` everything between two
images or special ids (exactly what the inference processor does with the rendered chat), with
``plain`` each stretch of one loss value (user and assistant text apart, as SOLO did).

Loss (``loss_mask[t] = 1``: token t is a target): text of trainable roles (assistant; user too
with ``loss_on_user``; never system) and every EOS; never BOS, chat markers or any vision token.
A token that spans two roles takes the loss of its last character.

Split rule: a document longer than ``seq_length`` is cut into pieces that each start with their own
BOS; only the last piece ends with the document's EOS (the document does not end elsewhere). Cuts
fall only at clean points — between two text tokens, or just before ``<vision>`` / just after
``</vision>`` — never inside an image block. Pieces are filled greedily in order, except that a
piece that would end with an image moves that image to the next piece when the piece keeps some
text (an image is context for the text after it). Every token of the document lands in exactly one
piece; tokens keep their loss values. Images longer than ``seq_length - 2`` tokens reject the
document (an image cannot be split).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import groupby

import numpy as np

from solo.hf.image_processing_solo import (
    DEFAULT_MAX_PIXELS,
    MAX_PATCHES,
    ImageLoadError,
    image_tokens_count,
    load_image,
    resize_size,
    PATCH_SIZE,
)
from solo.hf.processing_solo import VisionTokenIds

from .schema import TEMPLATES, Document, RejectedInput


@dataclass(frozen=True)
class EncodeOptions:
    seq_length: int
    template: str = "plain"
    loss_on_user: bool = False
    resize_mode: str = "fit"
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_patches: int = MAX_PATCHES  # --max-patches: per-image patch budget (images scaled down to it)

    def fingerprint(self) -> dict:
        budget = {} if self.max_patches == MAX_PATCHES else {"max_patches": self.max_patches}
        return dict(seq_length=self.seq_length, template=self.template, loss_on_user=self.loss_on_user,
                    resize_mode=self.resize_mode, max_pixels=self.max_pixels, **budget)


@dataclass
class EncodedPiece:
    """One packable unit: BOS … (EOS if last piece). `images`: (offset of <vision>, rows, cols, image index,
    patches the image would have without --max-patches)."""

    tokens: np.ndarray  # int32
    loss_mask: np.ndarray  # uint8
    images: list[tuple[int, int, int, int, int]] = field(default_factory=list)


@dataclass
class EncodedDocument:
    pieces: list[EncodedPiece]
    images: list[bytes]  # original encoded bytes, in document order


def plan_pieces(body_length: int, image_spans: list[tuple[int, int]], tail_length: int,
                seq_length: int) -> list[tuple[int, int, bool]]:
    """Cut a document body into pieces (start, end, is_last) under the split rule (module docstring).

    A piece holds BOS + body[start:end] (+ the tail, e.g. EOS, when it is the last one).
    `image_spans` are (start, end) of image blocks in body coordinates, sorted, end exclusive.
    """
    pieces: list[tuple[int, int, bool]] = []
    start = 0
    while True:
        if 1 + (body_length - start) + tail_length <= seq_length:
            pieces.append((start, body_length, True))
            return pieces
        end = start + seq_length - 1
        if tail_length:
            end = min(end, body_length - 1)  # leave the last piece at least one body token
        for span_start, span_end in image_spans:
            if span_start < end < span_end:  # never inside an image block
                end = span_start
                break
        # An image at the very end of a non-final piece moves on with the text that follows it.
        while True:
            trailing = [span for span in image_spans if span[1] == end and span[0] > start]
            if not trailing:
                break
            span_start = trailing[0][0]
            image_tokens = sum(min(e, span_start) - max(s, start) for s, e in image_spans
                               if s < span_start and e > start)
            if (span_start - start) - image_tokens <= 0:  # the piece would keep no text
                break
            end = span_start
        if end <= start:
            raise RuntimeError("split made no progress; an image longer than seq_length - 2 got through")
        pieces.append((start, end, False))
        start = end


class DocumentEncoder:
    """Encodes batches of `Document`s with one fast tokenizer (batched calls)."""

    def __init__(self, tokenizer, options: EncodeOptions):
        if options.template not in TEMPLATES:
            raise ValueError(f"unknown template {options.template!r}; choose one of {TEMPLATES}")
        self.tokenizer = tokenizer
        self.options = options
        self.vision = VisionTokenIds.from_tokenizer(tokenizer)
        self.bos = tokenizer.bos_token_id
        self.eos = tokenizer.eos_token_id
        self.loss_roles = {"assistant"} | ({"user"} if options.loss_on_user else set())

    def image_grid(self, data: bytes, name: str) -> tuple[int, int, int]:
        """Decode the image fully (so broken files are refused now) and return its patch grid (rows,
        cols) and the patches it would have without the --max-patches budget."""
        try:
            image = load_image(data, name=name, max_pixels=self.options.max_pixels)
            width, height = resize_size(image.width, image.height, self.options.resize_mode, self.options.max_patches)
            full_width, full_height = (width, height) if self.options.max_patches == MAX_PATCHES else resize_size(
                image.width, image.height, self.options.resize_mode)
        except ImageLoadError as error:
            raise RejectedInput(f"image {error}") from None
        except ValueError as error:  # e.g. an aspect ratio the 'solo' rule cannot handle
            raise RejectedInput(f"image {name}: {error}") from None
        rows, cols = height // PATCH_SIZE, width // PATCH_SIZE
        if image_tokens_count(rows, cols) + 2 > self.options.seq_length:
            raise RejectedInput(
                f"image {name}: needs {image_tokens_count(rows, cols)} tokens; with BOS and EOS that exceeds "
                f"--seq-length {self.options.seq_length}"
            )
        return rows, cols, (full_width // PATCH_SIZE) * (full_height // PATCH_SIZE)

    def _plan(self, document: Document) -> list[tuple]:
        """Items: ("text", str, loss) | ("ids", [ids], loss) | ("image", index_in_document)."""
        items: list[tuple] = []
        image_index = 0
        if self.options.template == "plain":
            for segment in document.segments:
                if segment.is_image:
                    items.append(("image", image_index))
                    image_index += 1
                else:
                    items.append(("text", segment.text, int(segment.role in self.loss_roles)))
            return items
        messages = [(role, list(group)) for role, group in groupby(document.segments, key=lambda s: s.role)]
        if messages[-1][0] != "assistant":
            raise RejectedInput("conversation does not end with an assistant turn (nothing to learn at its end)")
        system_text = ""
        for role, segments in messages:
            if role == "system":
                if any(segment.is_image for segment in segments):
                    raise RejectedInput("images in a system message are not supported")
                system_text = "".join(segment.text for segment in segments)
                continue
            loss = int(role in self.loss_roles)
            if role == "user":
                items.append(("text", "[INST] ", 0))
                if system_text:
                    items.append(("text", system_text + "\n\n", 0))
                    system_text = ""
            else:
                items.append(("text", " ", loss))
            for segment in segments:
                if segment.is_image:
                    items.append(("image", image_index))
                    image_index += 1
                else:
                    items.append(("text", segment.text, loss))
            if role == "user":
                items.append(("text", " [/INST]", 0))
            else:
                items.append(("ids", [self.eos], 1))
        return items

    def encode(self, documents: list[Document], names: list[str]) -> list[EncodedDocument | RejectedInput]:
        """Encode a batch; a document that cannot be used comes back as a `RejectedInput`."""
        plans: list[tuple | RejectedInput] = []
        texts: list[str] = []
        for document, name in zip(documents, names):
            try:
                images = [segment for segment in document.segments if segment.is_image]
                grids = [self.image_grid(segment.image, segment.image_name or name) for segment in images]
                items = self._plan(document)
            except RejectedInput as error:
                plans.append(error)
                continue
            items = self._merge_text_runs(items)
            texts.extend(item[1] for item in items if item[0] == "text")
            plans.append((items, grids, [segment.image for segment in images]))
        encoded_texts = iter(self._tokenize_runs(texts))

        results: list[EncodedDocument | RejectedInput] = []
        for plan in plans:
            if isinstance(plan, RejectedInput):
                results.append(plan)
                continue
            items, grids, image_bytes = plan
            token_parts, loss_parts, spans = [], [], []
            position = 0
            for item in items:
                if item[0] == "image":
                    rows, cols, full_patches = grids[item[1]]
                    block = self.vision.image_block(rows, cols)
                    token_parts.append(block)
                    loss_parts.append(np.zeros(len(block), np.uint8))
                    spans.append((position, position + len(block), rows, cols, item[1], full_patches))
                    position += len(block)
                elif item[0] == "text":
                    ids, offsets = next(encoded_texts)
                    token_parts.append(np.asarray(ids, dtype=np.int64))
                    loss_parts.append(self._token_loss(item[2], offsets))
                    position += len(ids)
                else:
                    token_parts.append(np.asarray(item[1], dtype=np.int64))
                    loss_parts.append(np.full(len(item[1]), item[2], np.uint8))
                    position += len(item[1])
            body = np.concatenate(token_parts) if token_parts else np.zeros(0, np.int64)
            body_loss = np.concatenate(loss_parts) if loss_parts else np.zeros(0, np.uint8)
            tail = [self.eos] if self.options.template == "plain" else []
            if len(body) == 0:
                results.append(RejectedInput("empty document after tokenisation"))
                continue
            results.append(EncodedDocument(self._cut(body, body_loss, spans, tail), image_bytes))
        return results

    def _merge_text_runs(self, items: list[tuple]) -> list[tuple]:
        """Join adjacent text items into runs tokenised as one string; a run's loss is per character.

        `mistral`: a run spans everything between images and special ids, as the inference
        processor tokenises the rendered chat (it splits only at images), so training and inference
        see the same tokens. `plain`: runs also break where the loss value changes, so every
        message is tokenised on its own as SOLO did, and no token straddles two roles.
        """
        merged: list[tuple] = []
        for item in items:
            if item[0] != "text":
                merged.append(item)
                continue
            flags = np.full(len(item[1]), item[2], np.uint8)
            if merged and merged[-1][0] == "text" and (
                    self.options.template == "mistral" or merged[-1][2][-1:].tolist() == [item[2]]):
                merged[-1] = ("text", merged[-1][1] + item[1], np.concatenate([merged[-1][2], flags]))
            else:
                merged.append(("text", item[1], flags))
        return [item for item in merged if item[0] != "text" or item[1]]

    def _tokenize_runs(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        if not texts:
            return []
        # split_special_tokens: text is text; special and vision ids come only from the layout code.
        encoded = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True,
                                 split_special_tokens=True)
        return list(zip(encoded["input_ids"], encoded["offset_mapping"]))

    @staticmethod
    def _token_loss(char_loss: np.ndarray, offsets: list[tuple[int, int]]) -> np.ndarray:
        """Loss per token = the loss of its last character (a token ending in an answer is trained)."""
        if len(offsets) == 0:
            return np.zeros(0, np.uint8)
        ends = np.asarray([max(end - 1, start) for start, end in offsets], dtype=np.int64)
        return char_loss[np.clip(ends, 0, len(char_loss) - 1)].astype(np.uint8)

    def _cut(self, body, body_loss, spans, tail) -> list[EncodedPiece]:
        pieces = []
        for start, end, last in plan_pieces(len(body), [(s, e) for s, e, *_ in spans], len(tail),
                                            self.options.seq_length):
            tokens = [np.array([self.bos], np.int64), body[start:end]]
            loss = [np.zeros(1, np.uint8), body_loss[start:end]]
            if last and tail:
                tokens.append(np.asarray(tail, np.int64))
                loss.append(np.ones(len(tail), np.uint8))
            piece_images = [(1 + s - start, rows, cols, index, full) for s, e, rows, cols, index, full in spans
                            if start <= s and e <= end]
            pieces.append(EncodedPiece(np.concatenate(tokens).astype(np.int32),
                                       np.concatenate(loss).astype(np.uint8), piece_images))
        return pieces
