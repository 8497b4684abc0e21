"""`solo-data preview DIR --pack i --out FILE`: one pack as a picture (.png) or a web page (.html).

Each document of the pack is shown in order with its origin (input, record, piece). Text is decoded
token run by token run: runs that carry loss are green, loss-free runs grey, BOS/EOS shown as <s> and </s>.
Each image is drawn from the patches the reader returns, i.e. exactly what the model
sees, at its patch grid with the patch boundaries outlined.
"""

from __future__ import annotations

import base64
import html
import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from solo.hf.image_processing_solo import PATCH_SIZE, image_tokens_count, unpatchify

from .reader import PackedReader

LOSS_COLOR = (0, 130, 0)
NO_LOSS_COLOR = (140, 140, 140)
GRID_COLOR = (255, 0, 255)
WIDTH = 1100
MARGIN = 12


def _grid_image(patches: np.ndarray, rows: int, cols: int) -> Image.Image:
    image = Image.fromarray(unpatchify(patches, rows, cols))
    draw = ImageDraw.Draw(image)
    for row in range(1, rows):
        draw.line([(0, row * PATCH_SIZE), (cols * PATCH_SIZE, row * PATCH_SIZE)], fill=GRID_COLOR)
    for col in range(1, cols):
        draw.line([(col * PATCH_SIZE, 0), (col * PATCH_SIZE, rows * PATCH_SIZE)], fill=GRID_COLOR)
    return image


def pack_segments(reader: PackedReader, index: int, tokenizer) -> list[dict]:
    """Documents of pack `index` as lists of runs: ("text", str, has_loss) and ("image", PIL, rows, cols)."""
    pack = reader[index]
    tokens, loss, cu, vpi, patches = (pack[k] for k in ("tokens", "loss_mask", "cu_seqlens",
                                                         "vision_patch_indices", "patches"))
    layout = {int(offset): (int(rows), int(cols)) for offset, rows, cols in reader.image_layout(index)}
    info = reader.tokenizer_info
    names = {info["bos_id"]: "<s>", info["eos_id"]: "</s>"}
    documents = []
    for doc, origin in enumerate(reader.doc_origin(index)):
        runs: list[tuple] = []
        position, end = int(cu[doc]), int(cu[doc + 1])
        pending: list[int] = []
        pending_loss = None

        def flush() -> None:
            if pending:
                runs.append(("text", tokenizer.decode(pending), bool(pending_loss)))
                pending.clear()

        while position < end:
            if position in layout:
                flush()
                rows, cols = layout[position]
                first = vpi[position + 1]
                image = _grid_image(patches[first:first + rows * cols], rows, cols)
                runs.append(("image", image, rows, cols))
                position += image_tokens_count(rows, cols)
                continue
            token = int(tokens[position])
            if token in names:
                flush()
                runs.append(("text", names[token], bool(loss[position])))
            else:
                if pending and pending_loss != loss[position]:
                    flush()
                pending.append(token)
                pending_loss = loss[position]
            position += 1
        flush()
        documents.append({"origin": [int(v) for v in origin], "tokens": end - int(cu[doc]),
                          "loss_tokens": int(loss[int(cu[doc]):end].sum()), "runs": runs})
    return documents


def _html(reader: PackedReader, index: int, documents: list[dict]) -> str:
    parts = ["<!doctype html><meta charset='utf-8'><title>pack preview</title><style>",
             "body{font-family:monospace;max-width:1100px;margin:1em auto}.doc{border:1px solid #aaa;"
             "margin:1em 0;padding:.5em}.loss{color:#008200;background:#eaffea}.noloss{color:#8c8c8c}"
             "img{display:block;margin:.3em 0;image-rendering:pixelated}h2{font-size:1em}</style>",
             f"<h1>{html.escape(reader.directory)} — pack {index}</h1>",
             f"<p>{sum(d['tokens'] for d in documents)} of {reader.seq_length} tokens, {len(documents)} documents. "
             "<span class=loss>green: carries loss</span>, <span class=noloss>grey: no loss</span>; "
             "images at their patch grid (magenta lines).</p>"]
    for number, document in enumerate(documents):
        input_index, record, piece = document["origin"]
        parts.append(f"<div class=doc><h2>document {number}: input {input_index}, record {record}, piece {piece} — "
                     f"{document['tokens']} tokens, {document['loss_tokens']} with loss</h2>"
                     "<pre style='white-space:pre-wrap'>")
        for run in document["runs"]:
            if run[0] == "image":
                buffer = io.BytesIO()
                run[1].save(buffer, format="PNG")
                parts.append(f"</pre><div>image {run[2]}×{run[3]} patches</div><img src='data:image/png;base64,"
                             f"{base64.b64encode(buffer.getvalue()).decode()}'><pre style='white-space:pre-wrap'>")
            else:
                parts.append(f"<span class={'loss' if run[2] else 'noloss'}>{html.escape(run[1])}</span>")
        parts.append("</pre></div>")
    return "".join(parts)


def _png(reader: PackedReader, index: int, documents: list[dict]) -> Image.Image:
    font = ImageFont.load_default(size=14)
    line_height = 18
    blocks: list[tuple] = []  # ("line", [(text, color)]) | ("image", PIL)
    header = (f"pack {index}: {sum(d['tokens'] for d in documents)} of {reader.seq_length} tokens, "
              f"{len(documents)} documents (green: loss, grey: no loss)")
    blocks.append(("line", [(header, (0, 0, 0))]))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    for number, document in enumerate(documents):
        input_index, record, piece = document["origin"]
        blocks.append(("rule", None))
        blocks.append(("line", [(f"document {number}: input {input_index}, record {record}, piece {piece}, "
                                 f"{document['tokens']} tokens, {document['loss_tokens']} with loss", (0, 0, 160))]))
        line: list[tuple[str, tuple]] = []
        x = 0
        for run in document["runs"]:
            if run[0] == "image":
                if line:
                    blocks.append(("line", line))
                    line, x = [], 0
                image = run[1]
                if image.width > WIDTH - 2 * MARGIN:
                    scale = (WIDTH - 2 * MARGIN) / image.width
                    size = (int(image.width * scale), int(image.height * scale))
                    image = image.resize(size, Image.Resampling.NEAREST)
                blocks.append(("image", image))
                continue
            color = LOSS_COLOR if run[2] else NO_LOSS_COLOR
            for piece_index, paragraph in enumerate(run[1].split("\n")):
                if piece_index:
                    blocks.append(("line", line))
                    line, x = [], 0
                for word in paragraph.split(" "):
                    text = word + " "
                    width = measure.textlength(text, font=font)
                    if x + width > WIDTH - 2 * MARGIN and line:
                        blocks.append(("line", line))
                        line, x = [], 0
                    line.append((text, color))
                    x += width
        if line:
            blocks.append(("line", line))
    height = MARGIN * 2 + sum(line_height if kind == "line" else 8 if kind == "rule" else value.height + 6
                              for kind, value in blocks)
    canvas = Image.new("RGB", (WIDTH, height), "white")
    draw = ImageDraw.Draw(canvas)
    y = MARGIN
    for kind, value in blocks:
        if kind == "line":
            x = MARGIN
            for text, color in value:
                draw.text((x, y), text, fill=color, font=font)
                x += measure.textlength(text, font=font)
            y += line_height
        elif kind == "rule":
            draw.line([(MARGIN, y + 4), (WIDTH - MARGIN, y + 4)], fill=(180, 180, 180))
            y += 8
        else:
            canvas.paste(value, (MARGIN, y + 3))
            y += value.height + 6
    return canvas


def render_preview(directory: str, index: int, out: str) -> str:
    reader = PackedReader(directory)
    if not 0 <= index < len(reader):
        raise ValueError(f"--pack {index} is out of range: {directory} has {len(reader)} packs")
    tokenizer = reader.load_tokenizer()
    documents = pack_segments(reader, index, tokenizer)
    if out.lower().endswith((".html", ".htm")):
        with open(out, "w", encoding="utf-8") as handle:
            handle.write(_html(reader, index, documents))
    elif out.lower().endswith(".png"):
        _png(reader, index, documents).save(out)
    else:
        raise ValueError(f"--out {out!r}: use a .png or .html file name")
    return out
