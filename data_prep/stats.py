"""`solo-data stats DIR`: pack length and fill histograms, tokens and images per source (input)."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from .packed_format import image_span
from .reader import PackedReader

FILL_EDGES = (0.0, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0)


def compute_stats(directory: str) -> dict[str, Any]:
    reader = PackedReader(directory)
    seq_length = reader.seq_length
    lengths = reader.pack_lengths
    inputs = reader.metadata.get("inputs", [])
    per_source: dict[int, dict[str, int]] = {}
    datasets = reader.datasets
    for index in range(len(reader)):
        # Index-sized reads only: boundaries, image layout, origins and the 1-byte loss mask.
        cu = np.asarray(datasets["cu_seqlens"][index], dtype=np.int64)
        loss_per_doc = np.add.reduceat(np.asarray(datasets["loss_mask"][index], dtype=np.int64), cu[:-1])
        layout = reader.image_layout(index).astype(np.int64)
        doc_of_image = np.searchsorted(cu, layout[:, 0], side="right") - 1
        image_tokens = image_span(layout[:, 1], layout[:, 2])
        for doc, (input_index, _, piece) in enumerate(reader.doc_origin(index)):
            entry = per_source.setdefault(int(input_index), dict(documents=0, pieces=0, tokens=0, loss_tokens=0,
                                                                 vision_tokens=0, images=0, patches=0))
            mine = doc_of_image == doc
            entry["documents"] += int(piece == 0)
            entry["pieces"] += 1
            entry["tokens"] += int(cu[doc + 1] - cu[doc])
            entry["loss_tokens"] += int(loss_per_doc[doc])
            entry["vision_tokens"] += int(image_tokens[mine].sum())
            entry["images"] += int(mine.sum())
            entry["patches"] += int((layout[mine, 1] * layout[mine, 2]).sum())
    length_edges = np.linspace(0, seq_length, 11).astype(int)
    length_counts, _ = np.histogram(lengths, bins=length_edges)
    fills = lengths / seq_length
    fill_counts, _ = np.histogram(fills, bins=FILL_EDGES)
    sources = []
    for input_index in sorted(per_source):
        entry = per_source[input_index]
        name = inputs[input_index] if input_index < len(inputs) else f"input {input_index}"
        sources.append({"input": name, **entry, "text_tokens": entry["tokens"] - entry["vision_tokens"]})
    return {
        "directory": os.path.abspath(directory),
        "seq_length": seq_length,
        "packs": len(reader),
        "tokens": int(lengths.sum()),
        "fill": float(lengths.sum() / (len(reader) * seq_length)) if len(reader) else 0.0,
        "documents_per_pack": _summary(reader.documents_per_pack),
        "images_per_pack": _summary(reader.images_per_pack),
        "image_bytes": _summary(reader.image_bytes_per_image),
        "length_histogram": [{"from": int(a), "to": int(b), "packs": int(c)}
                             for a, b, c in zip(length_edges[:-1], length_edges[1:], length_counts)],
        "fill_histogram": [{"from": a, "to": b, "packs": int(c)}
                           for a, b, c in zip(FILL_EDGES[:-1], FILL_EDGES[1:], fill_counts)],
        "sources": sources,
        "report": _read_report(directory),
    }


def _summary(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {"count": 0}
    return {"count": int(len(values)), "total": int(values.sum()), "mean": round(float(values.mean()), 3),
            "min": int(values.min()), "max": int(values.max())}


def _read_report(directory: str) -> dict[str, Any] | None:
    path = os.path.join(directory, "report.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as handle:
        report = json.load(handle)
    report.pop("rejected", None)  # can be long; it stays in report.json
    return report


def _bar(count: int, top: int, width: int = 40) -> str:
    return "#" * (round(width * count / top) if top else 0)


def format_stats(stats: dict[str, Any]) -> str:
    lines = [f"{stats['directory']}: {stats['packs']:,} packs of ≤ {stats['seq_length']:,} tokens, "
             f"{stats['tokens']:,} tokens, fill {stats['fill']:.4%}"]
    report = stats.get("report")
    if report:
        lines.append(f"documents: {report['documents_in']:,} in, {report['documents_packed']:,} packed, "
                     f"{report['documents_rejected']:,} rejected, {report['documents_split']:,} split; "
                     f"{report['images']:,} images, {report['bytes_per_image']:,.0f} B/image "
                     f"({report['bytes_vs_solo_fp16']:.3f} of SOLO's fp16 patches)")
        for kind, count in sorted(report.get("rejected_by_kind", {}).items(), key=lambda item: -item[1]):
            lines.append(f"  rejected: {count:,} × {kind}")
    for key in ("documents_per_pack", "images_per_pack"):
        summary = stats[key]
        if summary.get("count"):
            lines.append(f"{key.replace('_', ' ')}: mean {summary['mean']}, min {summary['min']}, max {summary['max']}")
    for title, key, label in (("pack length (tokens)", "length_histogram", "{from:>7,}–{to:<7,}"),
                              ("pack fill", "fill_histogram", "{from:>6.1%}–{to:<6.1%}")):
        lines.append(title + ":")
        top = max((row["packs"] for row in stats[key]), default=0)
        for row in stats[key]:
            lines.append(f"  {label.format(**row)} {row['packs']:>9,} {_bar(row['packs'], top)}")
    lines.append("per source: documents, pieces, tokens (text / vision / loss), images, patches")
    for source in stats["sources"]:
        lines.append(f"  {source['input']}: {source['documents']:,} docs, {source['pieces']:,} pieces, "
                     f"{source['tokens']:,} tokens ({source['text_tokens']:,} / {source['vision_tokens']:,} / "
                     f"{source['loss_tokens']:,}), {source['images']:,} images, {source['patches']:,} patches")
    return "\n".join(lines)
