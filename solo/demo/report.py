"""The demo's report: one self-contained HTML page (OUT/report.html).

It shows the training loss of every stage that has run (read from each stage's metrics.jsonl, drawn
as inline SVG, so no plotting library is needed), the held-out accuracy next to chance, and
held-out pictures with their question, the model's answer and the expected one.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Optional

from solo.outputs import write_text_atomic

STAGE_DIRS = ("stage1", "stage2", "stage3", "sft")
SAMPLES = 12


def read_losses(metrics_path: Path) -> list[tuple[int, float]]:
    """(step, loss) pairs of a metrics.jsonl (the format pretraining and SFT share)."""
    points = []
    with open(metrics_path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                record = json.loads(line)
                points.append((int(record["step"]), float(record["loss"])))
    return points


def loss_svg(points: list[tuple[int, float]], width: int = 420, height: int = 200) -> str:
    """A line plot of the loss over steps, with its axis ranges written at the corners."""
    if not points:
        return "<p>no steps recorded</p>"
    pad = 30
    steps = [s for s, _ in points]
    losses = [loss for _, loss in points]
    lo, hi = min(losses), max(losses)
    span_x = max(steps[-1] - steps[0], 1)
    span_y = max(hi - lo, 1e-9)
    coords = " ".join(
        f"{pad + (s - steps[0]) / span_x * (width - 2 * pad):.1f},"
        f"{height - pad - (loss - lo) / span_y * (height - 2 * pad):.1f}" for s, loss in points)
    return (
        f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">'
        f'<rect x="{pad}" y="{pad}" width="{width - 2 * pad}" height="{height - 2 * pad}" fill="none" stroke="#bbb"/>'
        f'<polyline points="{coords}" fill="none" stroke="#1f5fbf" stroke-width="1.5"/>'
        f'<text x="2" y="{pad + 4}" font-size="11">{hi:.3g}</text>'
        f'<text x="2" y="{height - pad + 4}" font-size="11">{lo:.3g}</text>'
        f'<text x="{pad}" y="{height - 8}" font-size="11">step {steps[0]}</text>'
        f'<text x="{width - pad - 50}" y="{height - 8}" font-size="11">step {steps[-1]}</text></svg>')


def _image_tag(path: Path, scale: int = 2) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<img src="data:image/png;base64,{data}" width="{64 * scale}" height="{64 * scale}" '
            'style="image-rendering:pixelated">')


def write_report(out: str | Path) -> Optional[Path]:
    """Write OUT/report.html from what the demo has produced so far; None if there is nothing yet."""
    out = Path(out)
    sections = []
    curves = []
    for name in STAGE_DIRS:
        metrics = out / "runs" / name / "metrics.jsonl"
        if metrics.exists():
            points = read_losses(metrics)
            last = f", last loss {points[-1][1]:.4f}" if points else ""
            curves.append(f"<div style='display:inline-block;margin:6px'><h3>{name} ({len(points)} steps{last})"
                          f"</h3>{loss_svg(points)}</div>")
    if curves:
        sections.append("<h2>Training loss</h2>" + "".join(curves))
    for file, title in (("eval.json", "instruction-tuned model (HF generate)"),
                        ("eval_pretrain.json", "pretrained model (megatron-core, after stage 3)")):
        path = out / file
        if not path.exists():
            continue
        result = json.loads(path.read_text(encoding="utf-8"))
        per_type = ", ".join(f"{html.escape(t)} {a:.2f}" for t, a in result["per_type"].items())
        cells = []
        for answer in result["answers"][:SAMPLES]:
            image = out / "raw" / answer["image"]
            mark = "&#10003;" if answer["correct"] else "&#10007;"
            cells.append(
                f"<td style='padding:6px;vertical-align:top'>{_image_tag(image) if image.exists() else ''}<br>"
                f"{html.escape(answer['question'])}<br><b>{html.escape(answer['predicted'])}</b> {mark}"
                f"<br><small>expected: {html.escape(answer['expected'])}</small></td>")
        rows = "".join("<tr>" + "".join(cells[i:i + 6]) + "</tr>" for i in range(0, len(cells), 6))
        sections.append(
            f"<h2>Held-out questions: {html.escape(title)}</h2>"
            f"<p><b>accuracy {result['accuracy']:.3f}</b> ({result['correct']}/{result['total']}), "
            f"chance {result['chance']:.3f}; per question type: {per_type}</p><table>{rows}</table>")
    if not sections:
        return None
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>solo demo</title></head>"
            "<body style='font-family:sans-serif'><h1>solo demo</h1>" + "".join(sections) + "</body></html>\n")
    path = out / "report.html"
    write_text_atomic(path, page)
    return path
