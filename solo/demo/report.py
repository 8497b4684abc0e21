"""The demo's report: one self-contained HTML page (OUT/report.html).

It shows the training loss of every stage that has run (read from each stage's metrics.jsonl, drawn
as inline SVG, so no plotting library is needed), the held-out accuracy next to chance, and
held-out pictures with their question, the model's answer and the expected one. Given another
run's OUT (`solo demo --compare`), it first sets the two runs side by side: loss curves of each
stage drawn together and held-out accuracies in one table.
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
EVALUATIONS = (("eval_pretrain.json", "pretrained model (megatron-core, after stage 3)"),
               ("eval.json", "instruction-tuned model (HF generate)"))
COLOURS = ("#1f5fbf", "#d0542c")  # this run, the compared run


def read_losses(metrics_path: Path) -> list[tuple[int, float]]:
    """(step, loss) pairs of a metrics.jsonl (the format pretraining and SFT share)."""
    points = []
    with open(metrics_path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                record = json.loads(line)
                points.append((int(record["step"]), float(record["loss"])))
    return points


def loss_svg(points: list[tuple[int, float]], width: int = 420, height: int = 200,
             others: tuple[list[tuple[int, float]], ...] = ()) -> str:
    """A line plot of the loss over steps (and of `others` on the same axes, in the next colours),
    with its axis ranges written at the corners."""
    series = [s for s in (points, *others) if s]
    if not series:
        return "<p>no steps recorded</p>"
    pad = 30
    steps = [s for line in series for s, _ in line]
    losses = [loss for line in series for _, loss in line]
    first, last, lo, hi = min(steps), max(steps), min(losses), max(losses)
    span_x = max(last - first, 1)
    span_y = max(hi - lo, 1e-9)
    lines = "".join(
        '<polyline points="' + " ".join(
            f"{pad + (s - first) / span_x * (width - 2 * pad):.1f},"
            f"{height - pad - (loss - lo) / span_y * (height - 2 * pad):.1f}" for s, loss in line)
        + f'" fill="none" stroke="{colour}" stroke-width="1.5"/>'
        for line, colour in zip((points, *others), COLOURS) if line)
    return (
        f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">'
        f'<rect x="{pad}" y="{pad}" width="{width - 2 * pad}" height="{height - 2 * pad}" fill="none" stroke="#bbb"/>'
        f'{lines}'
        f'<text x="2" y="{pad + 4}" font-size="11">{hi:.3g}</text>'
        f'<text x="2" y="{height - pad + 4}" font-size="11">{lo:.3g}</text>'
        f'<text x="{pad}" y="{height - 8}" font-size="11">step {first}</text>'
        f'<text x="{width - pad - 50}" y="{height - 8}" font-size="11">step {last}</text></svg>')


def run_label(out: Path) -> str:
    """A demo run's variant and stage-1 budget, from its OUT/demo.json."""
    try:
        settings = json.loads((out / "demo.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return out.name
    label = settings.get("variant", "solo")
    if settings.get("max_patches"):
        label += f", stage 1 at <= {settings['max_patches']} patches"
    return f"{label} ({out.name})"


def _stage_losses(out: Path) -> dict[str, list[tuple[int, float]]]:
    paths = {name: out / "runs" / name / "metrics.jsonl" for name in STAGE_DIRS}
    return {name: read_losses(path) for name, path in paths.items() if path.exists()}


def comparison_section(out: Path, other: Path) -> str:
    """Two demo runs side by side: each stage's loss curves on shared axes, and a table of last
    losses and held-out accuracies."""
    runs = [(out, _stage_losses(out)), (other, _stage_losses(other))]
    legend = " vs ".join(f"<span style='color:{colour}'>&#9632; {html.escape(run_label(path))}</span>"
                         for (path, _), colour in zip(runs, COLOURS))
    curves = "".join(
        f"<div style='display:inline-block;margin:6px'><h3>{name}</h3>"
        f"{loss_svg(runs[0][1].get(name, []), others=(runs[1][1].get(name, []),))}</div>"
        for name in STAGE_DIRS if any(name in losses for _, losses in runs))
    rows = [f"<th>{name} last loss</th>" + "".join(
        f"<td>{losses[name][-1][1]:.4f}</td>" if losses.get(name) else "<td>—</td>" for _, losses in runs)
        for name in STAGE_DIRS]
    for file, title in EVALUATIONS:
        cells = []
        for path, _ in runs:
            result = json.loads((path / file).read_text(encoding="utf-8")) if (path / file).exists() else None
            cells.append(f"<td>{result['accuracy']:.3f} ({result['correct']}/{result['total']}), chance "
                         f"{result['chance']:.3f}</td>" if result else "<td>—</td>")
        rows.append(f"<th>held-out accuracy, {html.escape(title)}</th>" + "".join(cells))
    header = "<tr><th></th>" + "".join(f"<th>{html.escape(run_label(path))}</th>" for path, _ in runs) + "</tr>"
    return (f"<h2>Side by side</h2><p>{legend}</p>{curves}<table border='1' cellpadding='4' "
            f"style='border-collapse:collapse'>{header}" + "".join(f"<tr>{row}</tr>" for row in rows) + "</table>")


def _image_tag(path: Path, scale: int = 2) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<img src="data:image/png;base64,{data}" width="{64 * scale}" height="{64 * scale}" '
            'style="image-rendering:pixelated">')


def write_report(out: str | Path, compare: Optional[str | Path] = None) -> Optional[Path]:
    """Write OUT/report.html from what the demo has produced so far (with the run in `compare` side
    by side, when given); None if there is nothing yet."""
    out = Path(out)
    sections = []
    if compare is not None:
        sections.append(comparison_section(out, Path(compare)))
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
    for file, title in reversed(EVALUATIONS):
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
